//! The benchmark's plots: fault-latency CDF per mode, guest progress across
//! the move, and downtime / guest stall against memory size.

use super::matrix::{size_arg, Mode, Peer};
use super::record::RunRecord;
use super::serial::{across, last_tick_us, round_rates, SerialLog};
use super::svg::{document, Axis, Chart, Legend, Mark, Scale, Series, SvgError};

/// Errors drawing plots.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Drawing failed.
    #[error(transparent)]
    Svg(#[from] SvgError),
}

/// Colour of a mode's series.
pub fn color(mode: &str) -> &'static str {
    match mode.parse::<Mode>() {
        Ok(Mode::Postcopy) => "#1f77b4",
        Ok(Mode::Precopy) => "#ff7f0e",
        Ok(Mode::StopAndCopy) => "#2ca02c",
        Ok(Mode::Hybrid) => "#9467bd",
        Err(_) => "#555555",
    }
}

fn series_name(r: &RunRecord) -> String {
    if r.peer == Peer::Ferry.as_str() {
        r.mode.clone()
    } else {
        format!("{} ({})", r.mode, r.peer)
    }
}

/// One successful run per (peer, mode): the largest memory size, then the
/// first repetition. In table order, Ferry first.
pub fn representatives(records: &[RunRecord]) -> Vec<&RunRecord> {
    let mut out: Vec<&RunRecord> = Vec::new();
    for r in records.iter().filter(|r| r.ok()) {
        match out
            .iter_mut()
            .find(|o| o.peer == r.peer && o.mode == r.mode)
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
    out.sort_by_key(|r| (r.peer != "ferry", r.mode.parse::<Mode>().ok()));
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
                color: color(&r.mode).into(),
                dashed: r.peer != "ferry",
                line: true,
                points: cdf,
                ..Default::default()
            })
        })
        .collect();
    let chart = Chart {
        title: "Demand-fault latency CDF (fault read → page installed)".into(),
        x: Axis::fit(
            "fault latency (µs, log scale)",
            Scale::Log,
            series.iter().flat_map(|s| s.points.iter().map(|p| p.0)),
        ),
        y: Axis {
            label: "fraction of faults ≤ x".into(),
            scale: Scale::Linear,
            min: 0.0,
            max: 1.0,
            fixed_ticks: vec![0.0, 0.25, 0.5, 0.75, 0.9, 1.0],
        },
        series,
        marks: vec![],
        bands: vec![],
        empty_note: "no demand faults in these runs (only post-copy modes fault)".into(),
        legend: Legend::BottomRight,
    };
    Ok(chart.render(820.0, 480.0)?)
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

/// (2) Guest progress over time, one panel per run, with the pause and
/// resume instants marked and the downtime shaded.
pub fn progress_svg(runs: &[Progress]) -> Result<String, PlotError> {
    let (w, ph) = (900.0, 230.0);
    let mut body = String::new();
    let n = runs.len().max(1);
    for (i, p) in runs.iter().enumerate() {
        let window: Vec<(f64, f64)> = p
            .rates
            .iter()
            .copied()
            .filter(|(t, _)| *t >= -1.0 && *t <= p.resume_s + 1.5)
            .map(|(t, r)| (t, r / 1e3))
            .collect();
        let mut x = Axis::fit(
            "seconds from the pause (≈ last source TICK)",
            Scale::Linear,
            window.iter().map(|q| q.0).chain([0.0, p.resume_s]),
        );
        x.min = x.min.min(-1.0);
        let resume_label = if p.resume_from_stats {
            format!("resume (+{:.1} ms)", p.resume_s * 1e3)
        } else {
            format!("first dest TICK (+{:.1} ms)", p.resume_s * 1e3)
        };
        let chart = Chart {
            title: format!(
                "Guest progress: {} ({} RAM), vCPU 0",
                p.name,
                size_arg(p.mem)
            ),
            x,
            y: Axis::fit("k rounds/s", Scale::Linear, window.iter().map(|q| q.1)),
            series: vec![Series {
                name: p.name.clone(),
                color: color(&p.mode).into(),
                line: true,
                dots: true,
                points: window,
                ..Default::default()
            }],
            marks: vec![
                Mark {
                    x: 0.0,
                    label: "pause".into(),
                    color: "#d62728".into(),
                    label_left: true,
                },
                Mark {
                    x: p.resume_s,
                    label: resume_label,
                    color: "#2ca02c".into(),
                    label_left: false,
                },
            ],
            bands: vec![(0.0, p.resume_s, "#d62728".into())],
            empty_note: "no ticks".into(),
            legend: Legend::None,
        };
        body.push_str(&chart.render_at(0.0, i as f64 * ph, w, ph)?);
    }
    if runs.is_empty() {
        body.push_str("<text x=\"450\" y=\"115\" text-anchor=\"middle\" font-family=\"sans-serif\">no successful runs</text>\n");
    }
    Ok(document(w, ph * n as f64, &body))
}

/// (3) A metric (median, min–max whiskers) against memory size, one series
/// per (peer, mode), over the runs of the first working set, first dirty
/// rate and fewest vCPUs.
pub fn metric_vs_mem_svg(
    records: &[RunRecord],
    path: &str,
    scale: f64,
    title: &str,
    ylabel: &str,
) -> Result<String, PlotError> {
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
        .filter(|r| r.ws_spec == ws && r.dirty_rate == rate && r.vcpus == vcpus)
        .collect();
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
    let mut mems: Vec<u64> = sel.iter().map(|r| r.mem_size).collect();
    mems.sort_unstable();
    mems.dedup();
    let mut series = Vec::new();
    for (_, _, peer, mode) in keys {
        let mut s = Series {
            name: if peer == "ferry" {
                mode.clone()
            } else {
                format!("{mode} ({peer})")
            },
            color: color(&mode).into(),
            dashed: peer != "ferry",
            line: true,
            dots: true,
            ..Default::default()
        };
        for &m in &mems {
            let v: Vec<f64> = sel
                .iter()
                .filter(|r| r.peer == peer && r.mode == mode && r.mem_size == m)
                .filter_map(|r| r.num(path))
                .map(|v| v * scale)
                .filter(|v| *v > 0.0)
                .collect();
            if let Ok(Some(sp)) = super::summary::Spread::of(&v) {
                let x = (m >> 20) as f64;
                s.points.push((x, sp.median));
                s.whiskers.push((x, sp.min, sp.max));
            }
        }
        if !s.points.is_empty() {
            series.push(s);
        }
    }
    let xs: Vec<f64> = mems.iter().map(|m| (*m >> 20) as f64).collect();
    let mut x = Axis::fit(
        "guest memory (MiB, log scale)",
        Scale::Log,
        xs.iter().copied(),
    );
    if let (Some(a), Some(b)) = (xs.first(), xs.last()) {
        x.min = a / 1.5;
        x.max = b * 1.5;
    }
    x.fixed_ticks = xs;
    let chart = Chart {
        title: format!(
            "{title} (ws {}, dirty rate {}, {vcpus} vCPU)",
            if ws.ends_with('%') {
                format!("{ws} of memory")
            } else {
                ws.clone()
            },
            if rate == 0 {
                "unlimited".to_string()
            } else {
                format!("{rate} pages/s")
            }
        ),
        x,
        y: Axis::fit(
            ylabel,
            Scale::Log,
            series
                .iter()
                .flat_map(|s| s.whiskers.iter().flat_map(|w| [w.1, w.2])),
        ),
        series,
        marks: vec![],
        bands: vec![],
        empty_note: "no successful runs".into(),
        // Slow modes climb to the top right and post-copy hugs the bottom;
        // small guests leave the top left empty.
        legend: Legend::TopLeft,
    };
    Ok(chart.render(820.0, 480.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::matrix::test_spec;
    use crate::bench::serial::parse_log;

    fn rec(peer: Peer, mode: Mode, mem: u64, downtime: Option<u64>) -> RunRecord {
        let spec = test_spec(peer, mode, mem, 0);
        let mut r = RunRecord::new(&spec, "loopback", "x");
        let mut s = serde_json::json!({"guest_stall_ms": 60.0,
            "fault_latency_us": {"overall": {"count": 3, "cdf": [[40, 0.3], [90, 0.9], [2000, 1.0]]}}});
        if let Some(d) = downtime {
            s["downtime_us"] = d.into();
        }
        r.set_stats(s).unwrap();
        r
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
        assert_eq!(cdf.matches("class=\"series\"").count(), 3, "{cdf}");
        assert!(cdf.contains("data-name=\"postcopy (qemu) (1G, 3 faults)\""));
        let dt = metric_vs_mem_svg(&recs, "downtime_us", 1e-3, "Downtime", "ms").unwrap();
        // postcopy: 2 sizes (a line); precopy: 1 point; qemu: no downtime.
        assert_eq!(dt.matches("class=\"series\"").count(), 1);
        assert_eq!(dt.matches("class=\"whisker\"").count(), 3);
        assert_eq!(dt.matches("class=\"legend\"").count(), 2);
        assert!(dt.contains(">256<") && dt.contains(">1024<"));
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
        assert_eq!(svg.matches("class=\"mark\"").count(), 4);
        assert_eq!(svg.matches("class=\"band\"").count(), 2);
        assert_eq!(svg.matches("class=\"legend\"").count(), 0);
        assert!(svg.contains("precopy (qemu)"));
        assert!(progress_svg(&[]).unwrap().contains("no successful runs"));
        assert!(progress(
            &rec(Peer::Ferry, Mode::Postcopy, 1, None),
            &SerialLog::default(),
            &dst
        )
        .is_none());
    }
}
