//! The benchmark's plots, drawn with `plotters`' SVG backend: fault-latency
//! CDF per mode, guest progress across the move, downtime / guest stall
//! against memory size, and guest work lost against working-set size.
//!
//! `plotters` draws the axes, grid, labels, series, legends and error bars;
//! this module only picks the data, the axis ranges (plotters does not fit
//! them) and the tick positions of the log axes it asks for.

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::matrix::{size_arg, Mode, Peer};
use super::record::RunRecord;
use super::serial::{across, last_tick_us, round_rates, SerialLog};
use super::summary::Spread;

/// Errors drawing plots.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// plotters failed (an SVG backend writing to a string should not).
    #[error("drawing failed: {0}")]
    Draw(String),
}

fn draw_err<E: std::fmt::Display>(e: E) -> PlotError {
    PlotError::Draw(e.to_string())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

const FONT: &str = "sans-serif";
const GRID: RGBColor = RGBColor(221, 221, 221);
const PAUSE: RGBColor = RGBColor(214, 39, 40);
const RESUME: RGBColor = RGBColor(44, 160, 44);

/// Colour of a mode's series.
pub fn color(mode: &str) -> RGBColor {
    match mode.parse::<Mode>() {
        Ok(Mode::Postcopy) => RGBColor(31, 119, 180),
        Ok(Mode::Precopy) => RGBColor(255, 127, 14),
        Ok(Mode::StopAndCopy) => RGBColor(44, 160, 44),
        Ok(Mode::Hybrid) => RGBColor(148, 103, 189),
        Err(_) => RGBColor(85, 85, 85),
    }
}

fn series_name(r: &RunRecord) -> String {
    if r.peer == Peer::Ferry.as_str() && !r.pinned {
        r.mode.clone()
    } else {
        format!("{} ({})", r.mode, r.peer_label())
    }
}

/// A number for a tick label: `0.5`, `20`, `1.5k`, `2M`.
pub fn fmt_num(v: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    match v.abs() {
        a if a >= 1e6 => format!("{}M", trim(format!("{:.1}", v / 1e6))),
        a if a >= 1e4 => format!("{}k", trim(format!("{:.1}", v / 1e3))),
        a if a >= 10.0 || a == 0.0 => trim(format!("{v:.0}")),
        _ => trim(format!("{v:.3}")),
    }
}

/// An axis: label, scale, range and (optionally) fixed tick values.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    /// Axis description.
    pub label: String,
    /// Base-10 log scale (values <= 0 are not drawn).
    pub log: bool,
    /// Smallest value shown.
    pub min: f64,
    /// Largest value shown.
    pub max: f64,
    /// Tick values; empty = plotters' own.
    pub ticks: Vec<f64>,
}

impl Axis {
    /// An axis that fits `values`: log = whole decades; linear = from 0
    /// (or the smallest value, if negative) to the largest plus 5%.
    pub fn fit(label: &str, log: bool, values: impl IntoIterator<Item = f64>) -> Axis {
        let vals: Vec<f64> = values
            .into_iter()
            .filter(|v| v.is_finite() && (!log || *v > 0.0))
            .collect();
        let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (min, max) = if vals.is_empty() {
            (if log { 1.0 } else { 0.0 }, 10.0)
        } else if log {
            let a = 10f64.powf(lo.log10().floor());
            let b = 10f64.powf(hi.log10().ceil());
            (a, if b <= a { a * 10.0 } else { b })
        } else {
            let a = lo.min(0.0);
            (a, hi + (hi - a).max(1e-9) * 0.05)
        };
        Axis {
            label: label.into(),
            log,
            min,
            max,
            ticks: Vec::new(),
        }
    }

    fn shows(&self, v: f64) -> bool {
        v.is_finite() && (!self.log || v > 0.0)
    }

    fn ticks_or<R: Ranged<ValueType = f64>>(&self, r: &R) -> Vec<f64> {
        if self.ticks.is_empty() {
            r.key_points(8usize)
        } else {
            self.ticks.clone()
        }
    }

    fn linear(&self) -> Ticked<RangedCoordf64> {
        let r: RangedCoordf64 = (self.min..self.max).into();
        let t = self.ticks_or(&r);
        Ticked(r, t)
    }

    fn logarithmic(&self) -> Ticked<LogCoord<f64>> {
        let r: LogCoord<f64> = (self.min..self.max).log_scale().into();
        let t = self.ticks_or(&r);
        Ticked(r, t)
    }
}

/// A plotters axis with the given ticks and no light grid lines.
/// (plotters' own `WithKeyPoints` has no label formatter on a linear `f64`
/// axis, so it cannot take `fmt_num` labels.)
struct Ticked<R>(R, Vec<f64>);

impl<R: Ranged<ValueType = f64>> Ranged for Ticked<R> {
    type ValueType = f64;
    type FormatOption = DefaultFormatting;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        self.0.map(v, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.1.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.0.range()
    }
}

/// One data series.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// Colour.
    pub color: RGBColor,
    /// Dashed line (the QEMU peer).
    pub dashed: bool,
    /// A dot at each point.
    pub dots: bool,
    /// The points, joined by a line.
    pub points: Vec<(f64, f64)>,
    /// Error bars `(x, min, median, max)`.
    pub whiskers: Vec<(f64, f64, f64, f64)>,
}

/// A vertical marker line with a label at its top.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    /// Where.
    pub x: f64,
    /// Label.
    pub label: String,
    /// Colour.
    pub color: RGBColor,
    /// The label goes left of the line (else right).
    pub label_left: bool,
}

/// A chart: what to draw and how.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Caption.
    pub title: String,
    /// Horizontal axis.
    pub x: Axis,
    /// Vertical axis.
    pub y: Axis,
    /// Data.
    pub series: Vec<Series>,
    /// Vertical markers.
    pub marks: Vec<Mark>,
    /// Shaded x ranges `(from, to, colour)`.
    pub bands: Vec<(f64, f64, RGBColor)>,
    /// Shown in the middle when there is nothing to plot.
    pub empty_note: String,
    /// Legend placement; `None` = no legend.
    pub legend: Option<SeriesLabelPosition>,
}

impl Chart {
    /// Draws the chart on `area`.
    fn draw(&self, area: &Area) -> Result<(), PlotError> {
        match (self.x.log, self.y.log) {
            (false, false) => self.draw_on(area, self.x.linear(), self.y.linear()),
            (true, false) => self.draw_on(area, self.x.logarithmic(), self.y.linear()),
            (false, true) => self.draw_on(area, self.x.linear(), self.y.logarithmic()),
            (true, true) => self.draw_on(area, self.x.logarithmic(), self.y.logarithmic()),
        }
    }

    fn draw_on<X, Y>(&self, area: &Area, x: X, y: Y) -> Result<(), PlotError>
    where
        X: Ranged<ValueType = f64, FormatOption = DefaultFormatting>,
        Y: Ranged<ValueType = f64, FormatOption = DefaultFormatting>,
    {
        let mut chart = ChartBuilder::on(area)
            .caption(&self.title, (FONT, 17).into_font().style(FontStyle::Bold))
            .margin(12)
            .x_label_area_size(46)
            .y_label_area_size(64)
            .build_cartesian_2d(x, y)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc(&self.x.label)
            .y_desc(&self.y.label)
            .x_label_formatter(&|v| fmt_num(*v))
            .y_label_formatter(&|v| fmt_num(*v))
            .bold_line_style(GRID)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .draw()
            .map_err(draw_err)?;
        let (y0, y1) = (self.y.min, self.y.max);
        for (a, b, c) in &self.bands {
            chart
                .draw_series([Rectangle::new([(*a, y0), (*b, y1)], c.mix(0.25).filled())])
                .map_err(draw_err)?;
        }
        for m in &self.marks {
            let style = m.color.stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new([(m.x, y0), (m.x, y1)], 5, 4, style))
                .map_err(draw_err)?;
            let (dx, h) = if m.label_left {
                (-4, HPos::Right)
            } else {
                (4, HPos::Left)
            };
            let text = (FONT, 13)
                .into_font()
                .color(&m.color)
                .pos(Pos::new(h, VPos::Top));
            chart
                .draw_series([
                    EmptyElement::at((m.x, y1)) + Text::new(m.label.clone(), (dx, 4), text)
                ])
                .map_err(draw_err)?;
        }
        let mut drawn = 0;
        for s in &self.series {
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| self.x.shows(*x) && self.y.shows(*y))
                .collect();
            if pts.is_empty() {
                continue;
            }
            drawn += 1;
            let (c, line) = (s.color, s.color.stroke_width(2));
            let legend_line = |(x, y): (i32, i32)| [(x, y), (x + 24, y)];
            let ann = if s.dashed {
                chart
                    .draw_series(DashedLineSeries::new(pts.clone(), 7, 4, line))
                    .map_err(draw_err)?
                    .legend(move |p| DashedPathElement::new(legend_line(p), 7, 4, line))
            } else {
                chart
                    .draw_series(LineSeries::new(pts.clone(), line))
                    .map_err(draw_err)?
                    .legend(move |p| PathElement::new(legend_line(p), line))
            };
            ann.label(&s.name);
            if s.dots || (pts.len() == 1 && s.whiskers.is_empty()) {
                chart
                    .draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled())))
                    .map_err(draw_err)?;
            }
            chart
                .draw_series(
                    s.whiskers
                        .iter()
                        .filter(|w| self.x.shows(w.0) && self.y.shows(w.1) && self.y.shows(w.3))
                        .map(|w| ErrorBar::new_vertical(w.0, w.1, w.2, w.3, c.filled(), 8)),
                )
                .map_err(draw_err)?;
        }
        if drawn == 0 {
            let pa = chart.plotting_area().strip_coord_spec();
            let (w, h) = pa.dim_in_pixel();
            let style = (FONT, 15)
                .into_font()
                .color(&RGBColor(136, 136, 136))
                .pos(Pos::new(HPos::Center, VPos::Center));
            pa.draw_text(&self.empty_note, &style, (w as i32 / 2, h as i32 / 2))
                .map_err(draw_err)?;
        } else if let Some(pos) = self.legend.clone() {
            chart
                .configure_series_labels()
                .position(pos)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(187, 187, 187))
                .label_font((FONT, 14))
                .draw()
                .map_err(draw_err)?;
        }
        Ok(())
    }
}

/// An SVG document of `w` × `h` drawn by `f` on a white background.
fn svg(
    w: u32,
    h: u32,
    f: impl FnOnce(&Area) -> Result<(), PlotError>,
) -> Result<String, PlotError> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        f(&root)?;
        root.present().map_err(draw_err)?;
    }
    Ok(out)
}

/// One successful run per (peer, mode): the largest memory size, then the
/// first repetition. In table order, Ferry first.
pub fn representatives(records: &[RunRecord]) -> Vec<&RunRecord> {
    let mut out: Vec<&RunRecord> = Vec::new();
    for r in records.iter().filter(|r| r.ok()) {
        match out
            .iter_mut()
            .find(|o| o.peer == r.peer && o.mode == r.mode && o.pinned == r.pinned)
        {
            Some(o) => {
                if (r.mem_size, std::cmp::Reverse(r.repeat))
                    > (o.mem_size, std::cmp::Reverse(o.repeat))
                {
                    *o = r;
                }
            }
            None => out.push(r),
        }
    }
    out.sort_by_key(|r| (r.peer != "ferry", r.mode.parse::<Mode>().ok(), r.pinned));
    out
}

/// (1) Demand-fault latency CDF per mode (runs that have one), log x.
pub fn cdf_svg(records: &[RunRecord]) -> Result<String, PlotError> {
    let series: Vec<Series> = representatives(records)
        .into_iter()
        .filter_map(|r| {
            let cdf = r.cdf();
            (!cdf.is_empty()).then(|| Series {
                name: format!(
                    "{} ({}, {} faults)",
                    series_name(r),
                    size_arg(r.mem_size),
                    r.num("fault_latency_us/overall/count").unwrap_or(0.0)
                ),
                color: color(&r.mode),
                dashed: r.peer != "ferry",
                dots: r.pinned,
                points: cdf,
                ..Default::default()
            })
        })
        .collect();
    let chart = Chart {
        title: "Demand-fault latency CDF (fault read → page installed)".into(),
        x: Axis::fit(
            "fault latency (µs, log scale)",
            true,
            series.iter().flat_map(|s| s.points.iter().map(|p| p.0)),
        ),
        y: Axis {
            label: "fraction of faults ≤ x".into(),
            log: false,
            min: 0.0,
            max: 1.0,
            ticks: vec![0.0, 0.25, 0.5, 0.75, 0.9, 1.0],
        },
        series,
        marks: vec![],
        bands: vec![],
        empty_note: "no demand faults in these runs (only post-copy modes fault)".into(),
        legend: Some(SeriesLabelPosition::LowerRight),
    };
    svg(820, 480, |a| chart.draw(a))
}

/// Guest progress of one run across its move.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Series name, e.g. `postcopy` or `precopy (qemu)`.
    pub name: String,
    /// Mode (for the colour).
    pub mode: String,
    /// Memory size.
    pub mem: u64,
    /// `(seconds relative to the pause, rounds/s of vCPU 0)`.
    pub rates: Vec<(f64, f64)>,
    /// Resume instant, seconds after the pause.
    pub resume_s: f64,
    /// Downtime is from the stats (else the first destination tick).
    pub resume_from_stats: bool,
}

/// Builds a run's progress from its serial logs: pause ≈ the source's last
/// tick, resume = pause + downtime (or the first destination tick when the
/// downtime is unknown).
pub fn progress(r: &RunRecord, src: &SerialLog, dst: &SerialLog) -> Option<Progress> {
    let pause = last_tick_us(src)?;
    let ticks = across(src, dst, 0);
    let rates = round_rates(&ticks)
        .into_iter()
        .map(|(us, rate)| ((us as f64 - pause as f64) / 1e6, rate))
        .collect();
    let (resume_s, from_stats) = match r.num("downtime_us") {
        Some(d) => (d / 1e6, true),
        None => {
            let first = dst
                .ticks
                .iter()
                .map(|t| t.host_us)
                .filter(|t| *t > pause)
                .min()?;
            ((first - pause) as f64 / 1e6, false)
        }
    };
    Some(Progress {
        name: series_name(r),
        mode: r.mode.clone(),
        mem: r.mem_size,
        rates,
        resume_s,
        resume_from_stats: from_stats,
    })
}

/// The progress panel of one run.
fn progress_chart(p: &Progress) -> Chart {
    let window: Vec<(f64, f64)> = p
        .rates
        .iter()
        .copied()
        // Up to the end of the log: a guest slow to get back (post-copy of a
        // large working set) is shown until it has (ferry-bench waits for
        // that, up to a few seconds).
        .filter(|(t, _)| *t >= -1.0 && *t <= p.resume_s + 8.0)
        .map(|(t, r)| (t, r / 1e3))
        .collect();
    let mut x = Axis::fit(
        "seconds from the pause (≈ last source TICK)",
        false,
        window.iter().map(|q| q.0).chain([0.0, p.resume_s]),
    );
    x.min = x.min.min(-1.0);
    let mut y = Axis::fit("k rounds/s", false, window.iter().map(|q| q.1));
    // Headroom for the mark labels above the steady rate.
    y.max = y.min + (y.max - y.min) * 1.2;
    let resume_label = if p.resume_from_stats {
        format!("resume (+{:.1} ms)", p.resume_s * 1e3)
    } else {
        format!("first dest TICK (+{:.1} ms)", p.resume_s * 1e3)
    };
    Chart {
        title: format!(
            "Guest progress: {} ({} RAM), vCPU 0",
            p.name,
            size_arg(p.mem)
        ),
        x,
        y,
        series: vec![Series {
            name: p.name.clone(),
            color: color(&p.mode),
            dots: true,
            points: window,
            ..Default::default()
        }],
        marks: vec![
            Mark {
                x: 0.0,
                label: "pause".into(),
                color: PAUSE,
                label_left: true,
            },
            Mark {
                x: p.resume_s,
                label: resume_label,
                color: RESUME,
                label_left: false,
            },
        ],
        bands: vec![(0.0, p.resume_s, PAUSE)],
        empty_note: "no ticks".into(),
        legend: None,
    }
}

/// (2) Guest progress over time, one panel per run, with the pause and
/// resume instants marked and the downtime shaded.
pub fn progress_svg(runs: &[Progress]) -> Result<String, PlotError> {
    let (w, ph) = (900u32, 240u32);
    svg(w, ph * runs.len().max(1) as u32, |root| {
        if runs.is_empty() {
            let style = (FONT, 15)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Center));
            return root
                .draw_text("no successful runs", &style, (w as i32 / 2, ph as i32 / 2))
                .map_err(draw_err);
        }
        for (p, panel) in runs.iter().zip(root.split_evenly((runs.len(), 1))) {
            progress_chart(p).draw(&panel)?;
        }
        Ok(())
    })
}

/// What [`metric_svg`] puts on its x axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    /// Guest memory, over the runs of the first working set.
    Mem,
    /// Working-set size, over the runs of every memory size.
    Ws,
}

/// A metric plot: which stats key, how to scale it, how to label it.
#[derive(Debug, Clone, Copy)]
pub struct Metric<'a> {
    /// `/`-separated stats path.
    pub path: &'a str,
    /// Factor to the plotted unit.
    pub scale: f64,
    /// Title (the selection is appended).
    pub title: &'a str,
    /// y-axis description.
    pub ylabel: &'a str,
    /// The x axis.
    pub by: By,
    /// Log y (values <= 0 are left out); else linear.
    pub log_y: bool,
}

/// (3) A metric (median, min–max error bars) against memory or working-set
/// size, one series per (peer, mode), over the runs of the first dirty rate
/// and fewest vCPUs (and, against memory, the first working set).
pub fn metric_svg(records: &[RunRecord], m: &Metric) -> Result<String, PlotError> {
    let ok: Vec<&RunRecord> = records.iter().filter(|r| r.ok()).collect();
    let (ws, rate, vcpus) = match ok.first() {
        Some(f) => (
            f.ws_spec.clone(),
            f.dirty_rate,
            ok.iter().map(|r| r.vcpus).min().unwrap_or(1),
        ),
        None => (String::new(), 0, 1),
    };
    let sel: Vec<&RunRecord> = ok
        .into_iter()
        .filter(|r| r.dirty_rate == rate && r.vcpus == vcpus)
        .filter(|r| m.by == By::Ws || r.ws_spec == ws)
        .collect();
    let xval = |r: &RunRecord| match m.by {
        By::Mem => r.mem_size >> 20,
        By::Ws => r.ws_size >> 20,
    };
    let mut keys: Vec<(bool, Option<Mode>, String, String)> = sel
        .iter()
        .map(|r| {
            (
                r.peer != "ferry",
                r.mode.parse().ok(),
                r.peer.clone(),
                r.mode.clone(),
            )
        })
        .collect();
    keys.sort();
    keys.dedup();
    let mut xs: Vec<u64> = sel.iter().map(|r| xval(r)).collect();
    xs.sort_unstable();
    xs.dedup();
    let mut series = Vec::new();
    for (_, _, peer, mode) in keys {
        let mut s = Series {
            name: if peer == "ferry" {
                mode.clone()
            } else {
                format!("{mode} ({peer})")
            },
            color: color(&mode),
            dashed: peer != "ferry",
            // The error bars mark the medians.
            dots: false,
            ..Default::default()
        };
        for &xv in &xs {
            let v: Vec<f64> = sel
                .iter()
                .filter(|r| r.peer == peer && r.mode == mode && xval(r) == xv)
                .filter_map(|r| r.num(m.path))
                .map(|v| v * m.scale)
                .filter(|v| !m.log_y || *v > 0.0)
                .collect();
            if let Ok(Some(sp)) = Spread::of(&v) {
                let x = xv as f64;
                s.points.push((x, sp.median));
                s.whiskers.push((x, sp.min, sp.median, sp.max));
            }
        }
        if !s.points.is_empty() {
            series.push(s);
        }
    }
    let xf: Vec<f64> = xs.iter().map(|v| *v as f64).collect();
    let xlabel = match m.by {
        By::Mem => "guest memory (MiB, log scale)",
        By::Ws => "working set (MiB, log scale)",
    };
    let mut x = Axis::fit(xlabel, true, xf.iter().copied());
    if let (Some(a), Some(b)) = (xf.first(), xf.last()) {
        x.min = a / 1.5;
        x.max = b * 1.5;
    }
    x.ticks = xf;
    let rate = if rate == 0 {
        "unlimited".to_string()
    } else {
        format!("{rate} pages/s")
    };
    let selection = match m.by {
        By::Mem if ws.ends_with('%') => format!("ws {ws} of memory"),
        By::Mem => format!("ws {ws}"),
        By::Ws => "all memory sizes".into(),
    };
    let mut y = Axis::fit(
        m.ylabel,
        m.log_y,
        series
            .iter()
            .flat_map(|s| s.whiskers.iter().flat_map(|w| [w.1, w.3])),
    );
    if !m.log_y {
        // Room for the legend above the data.
        y.max += (y.max - y.min) * 0.1 * series.len() as f64;
    }
    let chart = Chart {
        title: format!("{} ({selection}, dirty rate {rate}, {vcpus} vCPU)", m.title),
        x,
        y,
        series,
        marks: vec![],
        bands: vec![],
        empty_note: "no successful runs".into(),
        // Slow modes climb to the top right and post-copy hugs the bottom;
        // small guests leave the top left empty.
        legend: Some(SeriesLabelPosition::UpperLeft),
    };
    svg(820, 480, |a| chart.draw(a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::matrix::test_spec;
    use crate::bench::serial::parse_log;

    fn rec(peer: Peer, mode: Mode, mem: u64, downtime: Option<u64>) -> RunRecord {
        let spec = test_spec(peer, mode, mem, 0);
        let mut r = RunRecord::new(&spec, "loopback", "x");
        let mut s = serde_json::json!({"guest_stall_ms": 60.0, "guest_lost_ms": 40.0,
            "fault_latency_us": {"overall": {"count": 3, "cdf": [[40, 0.3], [90, 0.9], [2000, 1.0]]}}});
        if let Some(d) = downtime {
            s["downtime_us"] = d.into();
        }
        r.set_stats(s).unwrap();
        r
    }

    /// The text of every `<text>` element.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                Some(
                    t.split_once('>')?
                        .1
                        .split_once("</text>")?
                        .0
                        .trim()
                        .to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn axes_fit_and_numbers_format() {
        let a = Axis::fit("x", true, [30.0, 4000.0, -1.0, 0.0]);
        assert_eq!((a.min, a.max), (10.0, 10000.0));
        assert_eq!(a.logarithmic().1, [10.0, 100.0, 1e3, 1e4]);
        let l = Axis::fit("y", false, [-2.0, 98.0]);
        assert_eq!((l.min, l.max), (-2.0, 103.0));
        assert_eq!(Axis::fit("e", true, []).min, 1.0);
        assert_eq!(fmt_num(20000.0), "20k");
        assert_eq!(fmt_num(1500000.0), "1.5M");
        assert_eq!(fmt_num(0.25), "0.25");
        assert_eq!(fmt_num(100.0), "100");
    }

    #[test]
    fn cdf_and_metric_plots_have_a_series_per_mode() {
        let recs = vec![
            rec(Peer::Ferry, Mode::Postcopy, 256 << 20, Some(1000)),
            rec(Peer::Ferry, Mode::Postcopy, 1 << 30, Some(1500)),
            rec(Peer::Ferry, Mode::Precopy, 1 << 30, Some(20_000)),
            rec(Peer::Qemu, Mode::Postcopy, 1 << 30, None),
        ];
        let reps = representatives(&recs);
        assert_eq!(reps.len(), 3);
        assert_eq!(reps[0].mem_size, 1 << 30);
        assert_eq!(reps[2].peer, "qemu");
        let cdf = cdf_svg(&recs).unwrap();
        let t = texts(&cdf);
        assert!(
            t.iter().any(|t| t.starts_with("Demand-fault latency CDF")),
            "{t:?}"
        );
        assert!(t.contains(&"fault latency (µs, log scale)".to_string()));
        assert!(t.contains(&"fraction of faults ≤ x".to_string()));
        assert!(t.contains(&"postcopy (qemu) (1G, 3 faults)".to_string()));
        assert!(t.contains(&"precopy (1G, 3 faults)".to_string()));
        // Log x: decade ticks; fixed y ticks.
        for tick in ["10", "100", "1000", "0.9"] {
            assert!(t.contains(&tick.to_string()), "{tick}: {t:?}");
        }
        let dt = metric_svg(
            &recs,
            &Metric {
                path: "downtime_us",
                scale: 1e-3,
                title: "Downtime vs memory",
                ylabel: "downtime (ms, log scale)",
                by: By::Mem,
                log_y: true,
            },
        )
        .unwrap();
        let t = texts(&dt);
        // postcopy and precopy in the legend; qemu has no downtime.
        assert!(t.contains(&"postcopy".to_string()) && t.contains(&"precopy".to_string()));
        assert!(!t.iter().any(|t| t.contains("(qemu)")), "{t:?}");
        assert!(t.contains(&"256".to_string()) && t.contains(&"1024".to_string()));
        assert!(t
            .iter()
            .any(|t| t.starts_with("Downtime vs memory (ws 64M")));
        // One error bar (a circle at the median) per (series, size).
        assert_eq!(dt.matches("<circle").count(), 3, "{dt}");
        let lost = metric_svg(
            &recs,
            &Metric {
                path: "guest_lost_ms",
                scale: 1.0,
                title: "Guest work lost",
                ylabel: "lost (ms)",
                by: By::Ws,
                log_y: false,
            },
        )
        .unwrap();
        let t = texts(&lost);
        assert!(t.contains(&"postcopy (qemu)".to_string()), "{t:?}");
        assert!(t.contains(&"64".to_string()) && t.contains(&"lost (ms)".to_string()));
        let none = metric_svg(
            &[],
            &Metric {
                path: "x",
                scale: 1.0,
                title: "t",
                ylabel: "y",
                by: By::Mem,
                log_y: true,
            },
        )
        .unwrap();
        assert!(texts(&none).contains(&"no successful runs".to_string()));
    }

    #[test]
    fn progress_panels_mark_pause_and_resume() {
        let src = parse_log("10.000000 FERRY TICK 0 0 1 1 1\n10.050000 FERRY TICK 0 1000 1 1 1\n10.100000 FERRY TICK 0 2000 1 1 1\n");
        let dst =
            parse_log("10.400000 FERRY TICK 0 3000 1 1 1\n10.450000 FERRY TICK 0 4000 1 1 1\n");
        let with = progress(
            &rec(Peer::Ferry, Mode::Postcopy, 1 << 30, Some(2000)),
            &src,
            &dst,
        )
        .unwrap();
        assert_eq!(with.rates.len(), 4);
        assert!((with.rates[2].0 - 0.3).abs() < 1e-9);
        assert!((with.resume_s - 0.002).abs() < 1e-12 && with.resume_from_stats);
        let without = progress(&rec(Peer::Qemu, Mode::Precopy, 1 << 30, None), &src, &dst).unwrap();
        assert!((without.resume_s - 0.3).abs() < 1e-9 && !without.resume_from_stats);
        let svg = progress_svg(&[with, without]).unwrap();
        let t = texts(&svg);
        assert_eq!(t.iter().filter(|t| *t == "pause").count(), 2, "{t:?}");
        assert!(t.contains(&"resume (+2.0 ms)".to_string()));
        assert!(t.contains(&"first dest TICK (+300.0 ms)".to_string()));
        assert!(t.contains(&"Guest progress: precopy (qemu) (1G RAM), vCPU 0".to_string()));
        // No legend: the series name is only in the title.
        assert!(!t.contains(&"postcopy".to_string()));
        // Shaded downtime: a translucent rectangle per panel.
        assert_eq!(svg.matches("opacity=\"0.25\"").count(), 2, "{svg}");
        assert!(texts(&progress_svg(&[]).unwrap()).contains(&"no successful runs".to_string()));
        assert!(progress(
            &rec(Peer::Ferry, Mode::Postcopy, 1, None),
            &SerialLog::default(),
            &dst
        )
        .is_none());
    }
}
