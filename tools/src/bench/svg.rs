//! A small hand-made SVG chart: linear or log axes, line/point series with
//! optional min–max whiskers, vertical markers and shaded bands, a legend.

use std::fmt::Write;

/// Errors building a chart.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SvgError {
    /// The chart area is too small to draw in.
    #[error("chart area {0}x{1} is too small")]
    TooSmall(f64, f64),
}

/// Axis scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Linear.
    Linear,
    /// Base-10 logarithmic (values <= 0 are not drawn).
    Log,
}

/// An axis: label, scale, range.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    /// Label under / beside the axis.
    pub label: String,
    /// Scale.
    pub scale: Scale,
    /// Smallest value shown.
    pub min: f64,
    /// Largest value shown.
    pub max: f64,
    /// Tick values to use instead of automatic ones (empty = automatic).
    pub fixed_ticks: Vec<f64>,
}

impl Axis {
    /// An axis that fits `values` (log: whole decades; linear: from 0 when
    /// all values are positive, padded by 5%).
    pub fn fit(label: &str, scale: Scale, values: impl IntoIterator<Item = f64>) -> Axis {
        let vals: Vec<f64> = values
            .into_iter()
            .filter(|v| v.is_finite() && (scale == Scale::Linear || *v > 0.0))
            .collect();
        let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (min, max) = match scale {
            _ if vals.is_empty() => (if scale == Scale::Log { 1.0 } else { 0.0 }, 10.0),
            Scale::Log => {
                let a = 10f64.powf(lo.log10().floor());
                let b = 10f64.powf(hi.log10().ceil());
                (a, if b <= a { a * 10.0 } else { b })
            }
            Scale::Linear => {
                let a = if lo >= 0.0 { 0.0 } else { lo };
                let span = (hi - a).max(1e-9);
                (a, hi + span * 0.05)
            }
        };
        Axis {
            label: label.into(),
            scale,
            min,
            max,
            fixed_ticks: Vec::new(),
        }
    }

    /// 0..1 position of `v`, or None if it cannot be drawn.
    fn frac(&self, v: f64) -> Option<f64> {
        if !v.is_finite() {
            return None;
        }
        match self.scale {
            Scale::Linear => Some((v - self.min) / (self.max - self.min)),
            Scale::Log if v > 0.0 && self.min > 0.0 => {
                Some((v.log10() - self.min.log10()) / (self.max.log10() - self.min.log10()))
            }
            Scale::Log => None,
        }
    }

    /// Tick values.
    pub fn ticks(&self) -> Vec<f64> {
        if !self.fixed_ticks.is_empty() {
            return self.fixed_ticks.clone();
        }
        match self.scale {
            Scale::Log => {
                let (a, b) = (
                    self.min.log10().floor() as i32,
                    self.max.log10().ceil() as i32,
                );
                let step = ((b - a) / 8 + 1).max(1);
                (a..=b)
                    .step_by(step as usize)
                    .map(|k| 10f64.powi(k))
                    .filter(|v| *v >= self.min * 0.999 && *v <= self.max * 1.001)
                    .collect()
            }
            Scale::Linear => {
                let span = self.max - self.min;
                if span <= 0.0 || !span.is_finite() {
                    return vec![self.min];
                }
                let raw = span / 6.0;
                let mag = 10f64.powf(raw.log10().floor());
                let step = [1.0, 2.0, 5.0, 10.0]
                    .iter()
                    .map(|m| m * mag)
                    .find(|s| *s >= raw)
                    .unwrap_or(10.0 * mag);
                let first = (self.min / step).ceil() as i64;
                let last = (self.max / step).floor() as i64;
                (first..=last).map(|i| i as f64 * step).collect()
            }
        }
    }
}

/// A number for a tick label: `0.5`, `20`, `1.5k`, `2M`.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if a >= 1e6 {
        format!("{}M", trim(format!("{:.1}", v / 1e6)))
    } else if a >= 1e4 {
        format!("{}k", trim(format!("{:.1}", v / 1e3)))
    } else if a >= 10.0 || a == 0.0 {
        trim(format!("{v:.0}"))
    } else {
        trim(format!("{v:.3}"))
    }
}

/// Escapes text for SVG.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One data series.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// CSS colour.
    pub color: String,
    /// Dashed line.
    pub dashed: bool,
    /// Draw a line through the points.
    pub line: bool,
    /// Draw a dot at each point.
    pub dots: bool,
    /// The points.
    pub points: Vec<(f64, f64)>,
    /// Whiskers `(x, low, high)`.
    pub whiskers: Vec<(f64, f64, f64)>,
}

/// A vertical marker line.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    /// Where.
    pub x: f64,
    /// Label at the top.
    pub label: String,
    /// CSS colour.
    pub color: String,
    /// Put the label left of the line (else right).
    pub label_left: bool,
}

/// Where the legend goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Legend {
    /// Top right inside the plot.
    #[default]
    TopRight,
    /// Bottom right inside the plot.
    BottomRight,
    /// Top left inside the plot.
    TopLeft,
    /// No legend.
    None,
}

/// A chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// Title above the plot.
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
    pub bands: Vec<(f64, f64, String)>,
    /// Text shown in the middle when there is nothing to plot.
    pub empty_note: String,
    /// Legend placement.
    pub legend: Legend,
}

const LEFT: f64 = 72.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 46.0;

impl Chart {
    /// The chart as an SVG group at `(ox, oy)` of size `w` × `h`.
    pub fn render_at(&self, ox: f64, oy: f64, w: f64, h: f64) -> Result<String, SvgError> {
        let (pw, ph) = (w - LEFT - RIGHT, h - TOP - BOTTOM);
        if pw < 40.0 || ph < 40.0 {
            return Err(SvgError::TooSmall(w, h));
        }
        let (x0, y0) = (ox + LEFT, oy + TOP);
        let px = |v: f64| self.x.frac(v).map(|f| x0 + f * pw);
        let py = |v: f64| self.y.frac(v).map(|f| y0 + ph - f * ph);
        let clip = format!("clip{}x{}", ox as i64, oy as i64);
        let mut s = String::new();
        let _ = writeln!(s, "<g font-family=\"sans-serif\" font-size=\"12\">");
        let _ = writeln!(
            s,
            "<clipPath id=\"{clip}\"><rect x=\"{x0:.1}\" y=\"{y0:.1}\" width=\"{pw:.1}\" height=\"{ph:.1}\"/></clipPath>"
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"15\" font-weight=\"bold\" text-anchor=\"middle\">{}</text>",
            x0 + pw / 2.0,
            oy + 22.0,
            escape(&self.title)
        );
        let _ = writeln!(
            s,
            "<rect x=\"{x0:.1}\" y=\"{y0:.1}\" width=\"{pw:.1}\" height=\"{ph:.1}\" fill=\"white\" stroke=\"#444\"/>"
        );
        // Grid and tick labels.
        for t in self.x.ticks() {
            if let Some(x) = px(t) {
                let _ = writeln!(
                    s,
                    "<line x1=\"{x:.1}\" y1=\"{y0:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
                     <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                    y0 + ph,
                    y0 + ph + 16.0,
                    fmt_num(t)
                );
            }
        }
        for t in self.y.ticks() {
            if let Some(y) = py(t) {
                let _ = writeln!(
                    s,
                    "<line x1=\"{x0:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
                     <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                    x0 + pw,
                    x0 - 6.0,
                    y + 4.0,
                    fmt_num(t)
                );
            }
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x0 + pw / 2.0,
            oy + h - 10.0,
            escape(&self.x.label)
        );
        let (lx, ly) = (ox + 16.0, y0 + ph / 2.0);
        let _ = writeln!(
            s,
            "<text x=\"{lx:.1}\" y=\"{ly:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 {lx:.1} {ly:.1})\">{}</text>",
            escape(&self.y.label)
        );
        let _ = writeln!(s, "<g clip-path=\"url(#{clip})\">");
        for (a, b, color) in &self.bands {
            if let (Some(xa), Some(xb)) = (px(*a), px(*b)) {
                let _ = writeln!(
                    s,
                    "<rect class=\"band\" x=\"{:.1}\" y=\"{y0:.1}\" width=\"{:.1}\" height=\"{ph:.1}\" fill=\"{color}\" fill-opacity=\"0.25\"/>",
                    xa.min(xb),
                    (xb - xa).abs().max(1.0)
                );
            }
        }
        for m in &self.marks {
            if let Some(x) = px(m.x) {
                let _ = writeln!(
                    s,
                    "<line class=\"mark\" x1=\"{x:.1}\" y1=\"{y0:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"{}\" stroke-width=\"1.5\" stroke-dasharray=\"4 3\"/>",
                    y0 + ph,
                    m.color
                );
            }
        }
        for se in &self.series {
            let pts: Vec<(f64, f64)> = se
                .points
                .iter()
                .filter_map(|(x, y)| Some((px(*x)?, py(*y)?)))
                .collect();
            let dash = if se.dashed {
                " stroke-dasharray=\"7 4\""
            } else {
                ""
            };
            let name = escape(&se.name);
            if se.line && pts.len() > 1 {
                let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                let _ = writeln!(
                    s,
                    "<polyline class=\"series\" data-name=\"{name}\" points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash}/>",
                    path.join(" "),
                    se.color
                );
            }
            if se.dots || pts.len() == 1 {
                for (x, y) in &pts {
                    let _ = writeln!(
                        s,
                        "<circle class=\"dot\" data-name=\"{name}\" cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3.5\" fill=\"{}\"/>",
                        se.color
                    );
                }
            }
            for (x, lo, hi) in &se.whiskers {
                if let (Some(x), Some(a), Some(b)) = (px(*x), py(*lo), py(*hi)) {
                    let _ = writeln!(
                        s,
                        "<path class=\"whisker\" d=\"M{x:.1},{a:.1}V{b:.1}M{:.1},{a:.1}h8M{:.1},{b:.1}h8\" stroke=\"{}\" fill=\"none\"/>",
                        x - 4.0,
                        x - 4.0,
                        se.color
                    );
                }
            }
        }
        let _ = writeln!(s, "</g>");
        for m in &self.marks {
            if let Some(x) = px(m.x) {
                let (tx, anchor) = if m.label_left {
                    (x - 3.0, "end")
                } else {
                    (x + 3.0, "start")
                };
                let _ = writeln!(
                    s,
                    "<text x=\"{tx:.1}\" y=\"{:.1}\" fill=\"{}\" font-size=\"11\" text-anchor=\"{anchor}\">{}</text>",
                    y0 + 12.0,
                    m.color,
                    escape(&m.label)
                );
            }
        }
        let drawn: Vec<&Series> = self
            .series
            .iter()
            .filter(|se| !se.points.is_empty())
            .collect();
        if drawn.is_empty() {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#888\">{}</text>",
                x0 + pw / 2.0,
                y0 + ph / 2.0,
                escape(&self.empty_note)
            );
        } else if self.legend != Legend::None {
            let lw = 10.0
                + 7.0
                    * drawn
                        .iter()
                        .map(|se| se.name.chars().count())
                        .max()
                        .unwrap_or(0) as f64
                + 34.0;
            let lh = 8.0 + 16.0 * drawn.len() as f64;
            let ly = if self.legend == Legend::BottomRight {
                y0 + ph - lh - 6.0
            } else {
                y0 + 6.0
            };
            let lx = if self.legend == Legend::TopLeft {
                x0 + 6.0
            } else {
                x0 + pw - lw - 6.0
            };
            let _ = writeln!(
                s,
                "<rect x=\"{lx:.1}\" y=\"{ly:.1}\" width=\"{lw:.1}\" height=\"{lh:.1}\" fill=\"white\" fill-opacity=\"0.85\" stroke=\"#bbb\"/>"
            );
            for (i, se) in drawn.iter().enumerate() {
                let y = ly + 14.0 + 16.0 * i as f64;
                let dash = if se.dashed {
                    " stroke-dasharray=\"7 4\""
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{}\" stroke-width=\"2.5\"{dash}/>\
                     <text class=\"legend\" x=\"{:.1}\" y=\"{y:.1}\">{}</text>",
                    lx + 6.0,
                    y - 4.0,
                    lx + 30.0,
                    y - 4.0,
                    se.color,
                    lx + 36.0,
                    escape(&se.name)
                );
            }
        }
        let _ = writeln!(s, "</g>");
        Ok(s)
    }

    /// The chart as a whole SVG document.
    pub fn render(&self, w: f64, h: f64) -> Result<String, SvgError> {
        Ok(document(w, h, &self.render_at(0.0, 0.0, w, h)?))
    }
}

/// Wraps SVG content into a document with a white background.
pub fn document(w: f64, h: f64, body: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" viewBox=\"0 0 {w:.0} {h:.0}\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_fit_and_tick() {
        let a = Axis::fit("x", Scale::Log, [30.0, 4000.0, -1.0, 0.0]);
        assert_eq!((a.min, a.max), (10.0, 10000.0));
        assert_eq!(a.ticks(), vec![10.0, 100.0, 1000.0, 10000.0]);
        let l = Axis::fit("y", Scale::Linear, [2.0, 95.0]);
        assert_eq!(l.min, 0.0);
        assert!(l.max > 95.0);
        let t = l.ticks();
        assert_eq!(t[0], 0.0);
        assert!(
            t.windows(2).all(|w| (w[1] - w[0] - 20.0).abs() < 1e-9),
            "{t:?}"
        );
        assert_eq!(Axis::fit("e", Scale::Log, []).min, 1.0);
        assert_eq!(fmt_num(20000.0), "20k");
        assert_eq!(fmt_num(1500000.0), "1.5M");
        assert_eq!(fmt_num(0.25), "0.25");
        assert_eq!(fmt_num(100.0), "100");
    }

    #[test]
    fn renders_series_marks_and_legend() {
        let c = Chart {
            title: "a < b & c".into(),
            x: Axis::fit("µs", Scale::Log, [10.0, 1000.0]),
            y: Axis {
                label: "fraction".into(),
                scale: Scale::Linear,
                min: 0.0,
                max: 1.0,
                fixed_ticks: vec![],
            },
            series: vec![
                Series {
                    name: "postcopy".into(),
                    color: "#1f77b4".into(),
                    line: true,
                    points: vec![(10.0, 0.1), (100.0, 0.5), (1000.0, 1.0)],
                    ..Default::default()
                },
                Series {
                    name: "qemu".into(),
                    color: "#d62728".into(),
                    dashed: true,
                    dots: true,
                    points: vec![(50.0, 0.5)],
                    whiskers: vec![(50.0, 0.4, 0.6)],
                    ..Default::default()
                },
            ],
            marks: vec![Mark {
                x: 100.0,
                label: "pause".into(),
                color: "red".into(),
                label_left: true,
            }],
            bands: vec![(100.0, 200.0, "red".into())],
            empty_note: String::new(),
            legend: Legend::BottomRight,
        };
        let svg = c.render(640.0, 400.0).unwrap();
        assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt; b &amp; c"));
        assert_eq!(svg.matches("class=\"series\"").count(), 1);
        assert!(svg.contains("data-name=\"postcopy\""));
        assert_eq!(svg.matches("class=\"dot\"").count(), 1);
        assert_eq!(svg.matches("class=\"whisker\"").count(), 1);
        assert_eq!(svg.matches("class=\"mark\"").count(), 1);
        assert_eq!(svg.matches("class=\"legend\"").count(), 2);
        assert_eq!(svg.matches("<g").count(), svg.matches("</g>").count());
        assert!(c.render(50.0, 50.0).is_err());
    }
}
