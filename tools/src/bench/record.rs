//! One record per run in `results.json`: the migration statistics (the
//! stats JSON keys of `ferry-dest`, or what QEMU reported), the run's
//! parameters, and an error string for runs that failed.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::matrix::{Mode, Peer, RunSpec};

/// Errors building or saving records.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Stats were not a JSON object.
    #[error("statistics are not a JSON object: {0}")]
    NotObject(String),
    /// Reading results.json failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// results.json is not what `save` writes.
    #[error("{path} is not a ferry-bench results file: {why}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's complaint.
        why: String,
    },
    /// Writing results.json failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// One run's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    /// `ferry` or `qemu`.
    pub peer: String,
    /// Migration mode.
    pub mode: String,
    /// Guest RAM, bytes.
    pub mem_size: u64,
    /// Working set, bytes.
    pub ws_size: u64,
    /// The working set as asked for: `64M`, or `25%` of memory.
    #[serde(default)]
    pub ws_spec: String,
    /// Dirty-rate limit, pages/s (0 = none).
    pub dirty_rate: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Repetition index.
    pub repeat: u32,
    /// The source and the destination were pinned to different cores.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
    /// `loopback` or `netns` (with the link rate, if any).
    pub net: String,
    /// The run's directory (logs), relative to the output directory.
    pub run_dir: String,
    /// Why the run failed; absent for a successful run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The statistics keys (downtime_us, total_ms, ...).
    #[serde(flatten)]
    pub stats: Map<String, Value>,
}

impl RunRecord {
    /// A record with the run's parameters and no statistics yet.
    pub fn new(spec: &RunSpec, net: &str, run_dir: &str) -> Self {
        RunRecord {
            peer: spec.peer.as_str().into(),
            mode: spec.point.mode.as_str().into(),
            mem_size: spec.point.mem,
            ws_size: spec.point.ws,
            ws_spec: spec.point.ws_spec.label(),
            dirty_rate: spec.point.rate,
            vcpus: spec.point.vcpus,
            repeat: spec.repeat,
            pinned: spec.point.pinned,
            net: net.into(),
            run_dir: run_dir.into(),
            error: None,
            stats: Map::new(),
        }
    }

    /// Takes the statistics keys from `stats`; the parameters keep their
    /// own values (`mode`, `mem_size` and `vcpus` are in both).
    pub fn set_stats(&mut self, stats: Value) -> Result<(), RecordError> {
        let Value::Object(mut m) = stats else {
            return Err(RecordError::NotObject(stats.to_string()));
        };
        for k in [
            "peer",
            "mode",
            "mem_size",
            "ws_size",
            "dirty_rate",
            "vcpus",
            "repeat",
            "pinned",
            "net",
            "run_dir",
            "error",
        ] {
            m.remove(k);
        }
        self.stats = m;
        Ok(())
    }

    /// `ferry`, `qemu`, or either with ` pinned`.
    pub fn peer_label(&self) -> String {
        if self.pinned {
            format!("{} pinned", self.peer)
        } else {
            self.peer.clone()
        }
    }

    /// Did the run succeed?
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// A number at a `/`-separated path in the statistics, e.g.
    /// `fault_latency_us/overall/p99`.
    pub fn num(&self, path: &str) -> Option<f64> {
        let mut parts = path.split('/');
        let mut v = self.stats.get(parts.next()?)?;
        for p in parts {
            v = v.get(p)?;
        }
        v.as_f64().filter(|x| x.is_finite())
    }

    /// The fault-latency CDF points `(µs, fraction)`.
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        self.stats
            .get("fault_latency_us")
            .and_then(|f| f.get("overall"))
            .and_then(|o| o.get("cdf"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The parsed mode and peer, when they are known names.
    pub fn mode_peer(&self) -> Option<(Mode, Peer)> {
        let mode = self.mode.parse().ok()?;
        let peer = match self.peer.as_str() {
            "ferry" => Peer::Ferry,
            "qemu" => Peer::Qemu,
            _ => return None,
        };
        Some((mode, peer))
    }
}

/// What a finished run produced: its statistics and both serial logs.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The statistics JSON object.
    pub stats: Value,
    /// The source's serial log.
    pub src: super::serial::SerialLog,
    /// The destination's serial log.
    pub dst: super::serial::SerialLog,
}

/// Reads a `results.json` written by [`save`].
pub fn load(path: &std::path::Path) -> Result<Vec<RunRecord>, RecordError> {
    let text = std::fs::read_to_string(path).map_err(|source| RecordError::Read {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| RecordError::Parse {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// Writes `results.json` (an array of records, pretty-printed).
pub fn save(path: &std::path::Path, records: &[RunRecord]) -> Result<(), RecordError> {
    let text = serde_json::to_string_pretty(records).unwrap_or_else(|_| "[]".into());
    std::fs::write(path, text + "\n").map_err(|source| RecordError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::matrix::test_spec;

    #[test]
    fn flattened_round_trip() {
        let mut spec = test_spec(Peer::Ferry, Mode::Postcopy, 1 << 30, 1);
        spec.point.vcpus = 2;
        let mut r = RunRecord::new(&spec, "loopback", "runs/x");
        r.set_stats(serde_json::json!({
            "mode": "postcopy", "mem_size": 1, "vcpus": 2, "downtime_us": 1200,
            "fault_latency_us": {"overall": {"p99": 400, "cdf": [[50, 0.5], [400, 1.0]]}}
        }))
        .unwrap();
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["downtime_us"], 1200);
        assert_eq!(j["mem_size"], 1u64 << 30);
        assert_eq!(j["peer"], "ferry");
        assert!(j.get("error").is_none());
        let back: RunRecord = serde_json::from_value(j).unwrap();
        assert_eq!(back, r);
        assert_eq!(r.num("fault_latency_us/overall/p99"), Some(400.0));
        assert_eq!(r.num("nope/x"), None);
        assert_eq!(r.cdf(), vec![(50.0, 0.5), (400.0, 1.0)]);
        assert_eq!(r.mode_peer(), Some((Mode::Postcopy, Peer::Ferry)));
        assert!(r.set_stats(serde_json::json!([1])).is_err());
    }
}
