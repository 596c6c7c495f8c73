//! The benchmark matrix: modes × memory sizes × working sets × dirty rates
//! × vCPUs, each point repeated, plus the QEMU peer's points.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::parse_size;

/// Errors in a matrix description (all from untrusted CLI input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MatrixError {
    /// A list option was empty.
    #[error("--{0} needs at least one value")]
    Empty(&'static str),
    /// A mode name is unknown.
    #[error("unknown mode {0:?}: expected postcopy, precopy, stop-and-copy or hybrid")]
    Mode(String),
    /// A value of a list option did not parse.
    #[error("--{opt}: {msg}")]
    Value {
        /// The option.
        opt: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// Every point was filtered out.
    #[error("no runnable point: every working set is at least as large as the memory size")]
    NoPoints,
}

/// How a VM moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Pause, send state, resume, then fetch pages on demand + push.
    Postcopy,
    /// Iterative pre-copy with dirty logging, then a short stop.
    Precopy,
    /// Pause, copy everything, resume.
    StopAndCopy,
    /// A few pre-copy rounds, then post-copy.
    Hybrid,
}

impl Mode {
    /// Every mode, in table order.
    pub const ALL: [Mode; 4] = [
        Mode::Postcopy,
        Mode::Precopy,
        Mode::StopAndCopy,
        Mode::Hybrid,
    ];

    /// The name used on the command line and in results.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Postcopy => "postcopy",
            Mode::Precopy => "precopy",
            Mode::StopAndCopy => "stop-and-copy",
            Mode::Hybrid => "hybrid",
        }
    }

    /// Modes that the QEMU peer runs too.
    pub fn qemu_has(self) -> bool {
        matches!(self, Mode::Postcopy | Mode::Precopy)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = MatrixError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s.trim())
            .ok_or_else(|| MatrixError::Mode(s.trim().to_string()))
    }
}

/// Who runs the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Ferry's own `ferry-source` / `ferry-dest`.
    Ferry,
    /// `qemu-system-x86_64` with the same guest ELF.
    Qemu,
    /// Ferry with mutual TLS on both connections (`--tls`).
    FerryTls,
}

impl Peer {
    /// `ferry` or `qemu`.
    pub fn as_str(self) -> &'static str {
        match self {
            Peer::Ferry => "ferry",
            Peer::Qemu => "qemu",
            Peer::FerryTls => "ferry-tls",
        }
    }
}

/// One matrix point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Point {
    /// Migration mode.
    pub mode: Mode,
    /// Guest RAM, bytes.
    pub mem: u64,
    /// Working set, bytes.
    pub ws: u64,
    /// How the working set was asked for (a size or a share of memory).
    pub ws_spec: WsSpec,
    /// Dirty-rate limit, pages/s (0 = none).
    pub rate: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The source runs on CPU 0 and the destination on CPU 1.
    pub pinned: bool,
    /// The guest's access pattern over its working set.
    pub pattern: Pattern,
}

/// The workload guest's access pattern (its `pattern=` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Pattern {
    /// Uniformly random pages of the working set.
    #[default]
    Random,
    /// 90% of accesses to the first 10% of the working set, the rest to
    /// the other 90%: a small hot set inside a large working set.
    Hotcold,
    /// 99% of accesses to the last 10% of the working set (the part a
    /// sweep in page order reaches last): a hot set inside a mostly cold
    /// working set.
    Skewed,
}

impl Pattern {
    /// The guest's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Random => "random",
            Pattern::Hotcold => "hotcold",
            Pattern::Skewed => "skewed",
        }
    }

    /// The guest's arguments for it.
    pub fn guest_args(self) -> &'static str {
        match self {
            Pattern::Random => "pattern=random",
            Pattern::Hotcold => "pattern=hotcold",
            Pattern::Skewed => "pattern=hotcold hot_pct=99 hot_last=1",
        }
    }
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(Pattern::Random),
            "hotcold" => Ok(Pattern::Hotcold),
            "skewed" => Ok(Pattern::Skewed),
            _ => Err(format!(
                "unknown pattern {s:?} (expected random, hotcold or skewed)"
            )),
        }
    }
}

impl Point {
    /// The CPU that `side`'s process is pinned to, for a pinned point.
    pub fn cpu(&self, side: crate::netns::Side) -> Option<usize> {
        self.pinned
            .then_some(usize::from(side == crate::netns::Side::Dest))
    }

    /// How long the guest needs to write its working set once, before its
    /// first TICK: Ferry's source moves it `--after` this plus the asked-for
    /// time, so that the guest ticks for about as long before the move
    /// whatever its working set (about 2.5 ms/MiB was seen on a busy 2-core
    /// host; 4 ms/MiB leaves a margin).
    pub fn setup_allowance(&self) -> Duration {
        Duration::from_millis((self.ws >> 20) * 4)
    }

    /// The guest command line (the VMM adds `cpus=`).
    pub fn guest_args(&self) -> String {
        format!(
            "ws={} {} write=80 rate={} report_ms=50",
            size_arg(self.ws),
            self.pattern.guest_args(),
            self.rate
        )
    }
}

/// One run: a point, a peer, a repetition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSpec {
    /// Who runs it.
    pub peer: Peer,
    /// The point.
    pub point: Point,
    /// Repetition index, from 0.
    pub repeat: u32,
}

impl RunSpec {
    /// A short file-name-safe label, e.g. `ferry-postcopy-1G-ws64M-r0-v1-0`.
    pub fn label(&self) -> String {
        let p = &self.point;
        format!(
            "{}-{}-{}-ws{}-r{}-v{}{}-{}",
            self.peer.as_str(),
            p.mode,
            size_arg(p.mem),
            size_arg(p.ws),
            p.rate,
            p.vcpus,
            if p.pinned { "-pin" } else { "" },
            self.repeat
        )
    }
}

/// A size as a guest/CLI argument: the largest exact unit.
pub fn size_arg(b: u64) -> String {
    for (unit, shift) in [("G", 30), ("M", 20), ("K", 10)] {
        if b >= 1 << shift && b & ((1 << shift) - 1) == 0 {
            return format!("{}{unit}", b >> shift);
        }
    }
    b.to_string()
}

/// The whole matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matrix {
    /// Modes.
    pub modes: Vec<Mode>,
    /// Memory sizes.
    pub mem: Vec<u64>,
    /// Working-set sizes.
    pub ws: Vec<WsSpec>,
    /// Dirty rates.
    pub rate: Vec<u64>,
    /// vCPU counts.
    pub vcpus: Vec<u32>,
    /// Repetitions per point.
    pub repeat: u32,
    /// Extra `(mode, memory, working set)` points outside the cross
    /// product (each with every dirty rate and vCPU count), e.g. `--quick`'s
    /// large working set for post-copy.
    pub extra: Vec<(Mode, u64, WsSpec)>,
    /// Unpinned and/or pinned runs of each point (`--pin`).
    pub pin: Vec<bool>,
    /// The guest's access pattern at every point.
    pub pattern: Pattern,
}

fn split(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn nonempty<T>(opt: &'static str, v: Vec<T>) -> Result<Vec<T>, MatrixError> {
    if v.is_empty() {
        Err(MatrixError::Empty(opt))
    } else {
        Ok(v)
    }
}

/// Parses `postcopy,precopy`; duplicates are dropped.
pub fn parse_modes(list: &str) -> Result<Vec<Mode>, MatrixError> {
    let mut out: Vec<Mode> = Vec::new();
    for m in split(list) {
        let m: Mode = m.parse()?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    nonempty("modes", out)
}

/// Parses a list of sizes such as `256M,1G` (each at least `min` bytes).
pub fn parse_sizes(opt: &'static str, list: &str, min: u64) -> Result<Vec<u64>, MatrixError> {
    let mut out = Vec::new();
    for s in split(list) {
        let v = parse_size(s).map_err(|msg| MatrixError::Value { opt, msg })?;
        if v < min {
            return Err(MatrixError::Value {
                opt,
                msg: format!("{s:?} is below the minimum {}", size_arg(min)),
            });
        }
        if !out.contains(&v) {
            out.push(v);
        }
    }
    nonempty(opt, out)
}

/// A working-set size: fixed, or a percentage of each guest's memory (so
/// the touched memory grows with the guest, as in the downtime-vs-memory plot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WsSpec {
    /// This many bytes.
    Bytes(u64),
    /// This percentage of guest memory, rounded down to whole MiB.
    Percent(u64),
}

impl WsSpec {
    /// `64M` or `25%`.
    pub fn label(self) -> String {
        match self {
            WsSpec::Bytes(b) => size_arg(b),
            WsSpec::Percent(p) => format!("{p}%"),
        }
    }

    /// The size for a guest of `mem` bytes.
    pub fn resolve(self, mem: u64) -> u64 {
        match self {
            WsSpec::Bytes(b) => b,
            WsSpec::Percent(p) => (mem.saturating_mul(p) / 100) & !((1 << 20) - 1),
        }
    }
}

/// Parses a list of working sets: sizes (`64M`) or percentages (`25%`).
pub fn parse_ws(list: &str) -> Result<Vec<WsSpec>, MatrixError> {
    let mut out = Vec::new();
    for s in split(list) {
        let spec = match s.strip_suffix('%') {
            Some(p) => match p.parse::<u64>() {
                Ok(p) if (1..100).contains(&p) => WsSpec::Percent(p),
                _ => {
                    return Err(MatrixError::Value {
                        opt: "ws",
                        msg: format!("{s:?} is not a percentage between 1% and 99%"),
                    })
                }
            },
            None => WsSpec::Bytes(parse_sizes("ws", s, 1 << 20)?[0]),
        };
        if !out.contains(&spec) {
            out.push(spec);
        }
    }
    nonempty("ws", out)
}

/// Parses `--pin`: `off`, `on` or `both` (unpinned and pinned runs of
/// every point).
pub fn parse_pin(s: &str) -> Result<Vec<bool>, MatrixError> {
    match s.trim() {
        "off" => Ok(vec![false]),
        "on" => Ok(vec![true]),
        "both" => Ok(vec![false, true]),
        other => Err(MatrixError::Value {
            opt: "pin",
            msg: format!("{other:?} is not off, on or both"),
        }),
    }
}

/// Parses a list of integers in `lo..=hi`.
pub fn parse_ints(
    opt: &'static str,
    list: &str,
    lo: u64,
    hi: u64,
) -> Result<Vec<u64>, MatrixError> {
    let mut out = Vec::new();
    for s in split(list) {
        let v: u64 = s.parse().map_err(|_| MatrixError::Value {
            opt,
            msg: format!("{s:?} is not a whole number"),
        })?;
        if !(lo..=hi).contains(&v) {
            return Err(MatrixError::Value {
                opt,
                msg: format!("{v} is outside {lo}..={hi}"),
            });
        }
        if !out.contains(&v) {
            out.push(v);
        }
    }
    nonempty(opt, out)
}

impl Matrix {
    /// Every point, in table order; points whose working set does not fit
    /// in memory are left out.
    pub fn points(&self) -> Vec<Point> {
        let mut combos = Vec::new();
        for &mode in &self.modes {
            for &mem in &self.mem {
                combos.extend(self.ws.iter().map(|spec| (mode, mem, *spec)));
            }
            combos.extend(self.extra.iter().filter(|e| e.0 == mode));
        }
        let mut out = Vec::new();
        for (mode, mem, spec) in combos {
            let ws = spec.resolve(mem);
            if ws >= mem || ws < 1 << 20 {
                continue;
            }
            for &rate in &self.rate {
                for &vcpus in &self.vcpus {
                    for &pinned in &self.pin {
                        let p = Point {
                            mode,
                            mem,
                            ws,
                            ws_spec: spec,
                            rate,
                            vcpus,
                            pinned,
                            pattern: self.pattern,
                        };
                        if !out.contains(&p) {
                            out.push(p);
                        }
                    }
                }
            }
        }
        out
    }

    /// Every run: Ferry's points, then (with `qemu`) QEMU's points for the
    /// modes it has, with one vCPU (QEMU does not start this guest's APs),
    /// each repeated `repeat` times. Runs of one point are adjacent. With
    /// `tls`, every Ferry run is followed by the same run over mutual TLS
    /// (alternating, so both see the same host conditions).
    pub fn runs(&self, qemu: bool, tls: bool) -> Result<Vec<RunSpec>, MatrixError> {
        let points = self.points();
        if points.is_empty() {
            return Err(MatrixError::NoPoints);
        }
        let repeated = |peer: Peer, point: Point| {
            (0..self.repeat).map(move |repeat| RunSpec {
                peer,
                point,
                repeat,
            })
        };
        let mut out = Vec::new();
        let mut qemu_points: Vec<Point> = Vec::new();
        for p in points {
            if tls {
                for r in repeated(Peer::Ferry, p) {
                    out.push(r);
                    out.push(RunSpec {
                        peer: Peer::FerryTls,
                        ..r
                    });
                }
            } else {
                out.extend(repeated(Peer::Ferry, p));
            }
            let q = Point { vcpus: 1, ..p };
            if qemu && p.mode.qemu_has() && !qemu_points.contains(&q) {
                qemu_points.push(q);
            }
        }
        for q in qemu_points {
            out.extend(repeated(Peer::Qemu, q));
        }
        Ok(out)
    }
}

/// A run of a 64 MiB working set, 1 vCPU, no rate limit, for tests.
#[cfg(test)]
pub(crate) fn test_spec(peer: Peer, mode: Mode, mem: u64, repeat: u32) -> RunSpec {
    RunSpec {
        peer,
        point: Point {
            mode,
            mem,
            ws: 64 << 20,
            ws_spec: WsSpec::Bytes(64 << 20),
            rate: 0,
            vcpus: 1,
            pinned: false,
            pattern: Pattern::Random,
        },
        repeat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix() -> Matrix {
        Matrix {
            modes: parse_modes("postcopy, stop-and-copy,precopy").unwrap(),
            mem: parse_sizes("mem", "256M,1G", 64 << 20).unwrap(),
            ws: parse_ws("64M,512M").unwrap(),
            rate: parse_ints("rate", "0,20000", 0, u64::MAX).unwrap(),
            vcpus: parse_ints("vcpus", "1,2", 1, 8)
                .unwrap()
                .into_iter()
                .map(|v| v as u32)
                .collect(),
            repeat: 2,
            extra: vec![],
            pin: vec![false],
            pattern: Pattern::Random,
        }
    }

    #[test]
    fn expansion_skips_oversized_working_sets() {
        let m = matrix();
        let pts = m.points();
        // 3 modes × (256M: ws 64M only; 1G: both) × 2 rates × 2 vcpus
        assert_eq!(pts.len(), 3 * 3 * 2 * 2);
        assert!(pts.iter().all(|p| p.ws < p.mem));
        assert_eq!(pts[0].mode, Mode::Postcopy);
        assert_eq!(
            pts[0].guest_args(),
            "ws=64M pattern=random write=80 rate=0 report_ms=50"
        );
        assert_eq!(pts[0].setup_allowance(), Duration::from_millis(256));
        // An extra point joins its mode (with every rate and vCPU count);
        // one already in the product is not repeated.
        let m = Matrix {
            extra: vec![
                (Mode::Postcopy, 2 << 30, WsSpec::Bytes(1 << 30)),
                (Mode::Postcopy, 1 << 30, WsSpec::Bytes(64 << 20)),
                (Mode::Hybrid, 2 << 30, WsSpec::Bytes(1 << 30)),
            ],
            ..matrix()
        };
        let pts2 = m.points();
        assert_eq!(pts2.len(), pts.len() + 4);
        assert!(pts2[..16]
            .iter()
            .all(|p| p.mode == Mode::Postcopy && (p.mem == 2 << 30) == (p.ws == 1 << 30)));
        assert_eq!(pts2[12].mem, 2 << 30);
    }

    #[test]
    fn percentage_working_sets_scale_with_memory() {
        let ws = parse_ws("25%,64M").unwrap();
        assert_eq!(ws[0].resolve(1 << 30), 256 << 20);
        assert_eq!(ws[0].resolve(4 << 30), 1 << 30);
        assert_eq!(ws[1].resolve(4 << 30), 64 << 20);
        assert!(parse_ws("0%").is_err());
        assert!(parse_ws("100%").is_err());
        assert!(parse_ws("x%").is_err());
    }

    #[test]
    fn runs_add_qemu_rows_with_one_vcpu() {
        let m = matrix();
        let runs = m.runs(true, false).unwrap();
        let ferry = runs.iter().filter(|r| r.peer == Peer::Ferry).count();
        let qemu: Vec<_> = runs.iter().filter(|r| r.peer == Peer::Qemu).collect();
        assert_eq!(ferry, 36 * 2);
        // postcopy + precopy, 3 (mem, ws) pairs, 2 rates, vcpus collapsed to 1, ×2 repeats
        assert_eq!(qemu.len(), 2 * 3 * 2 * 2);
        assert!(qemu
            .iter()
            .all(|r| r.point.vcpus == 1 && r.point.mode.qemu_has()));
        assert_eq!(m.runs(false, false).unwrap().len(), 72);
        let tls = m.runs(false, true).unwrap();
        assert_eq!(tls.len(), 144);
        assert!(tls.chunks(2).all(|p| p[0].peer == Peer::Ferry
            && p[1].peer == Peer::FerryTls
            && p[0].point == p[1].point
            && p[0].repeat == p[1].repeat));
        assert_eq!(runs[0].repeat, 0);
        assert_eq!(runs[1].repeat, 1);
        assert_eq!(runs[1].point, runs[0].point);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(parse_modes(""), Err(MatrixError::Empty("modes")));
        assert!(matches!(parse_modes("postcopy,warp"), Err(MatrixError::Mode(m)) if m == "warp"));
        assert!(parse_sizes("mem", "1Q", 1).is_err());
        assert!(parse_sizes("mem", "1K", 1 << 20).is_err());
        assert!(parse_ints("vcpus", "0", 1, 8).is_err());
        assert!(parse_ints("vcpus", "9", 1, 8).is_err());
        assert!(parse_ints("rate", "-1", 0, 10).is_err());
        assert!(parse_ints("rate", "1.5", 0, 10).is_err());
        let m = Matrix {
            mem: vec![64 << 20],
            ws: vec![WsSpec::Bytes(64 << 20)],
            ..matrix()
        };
        assert_eq!(m.runs(true, false), Err(MatrixError::NoPoints));
    }

    #[test]
    fn labels_and_sizes() {
        assert_eq!(size_arg(1 << 30), "1G");
        assert_eq!(size_arg(1536 << 20), "1536M");
        assert_eq!(size_arg(4097), "4097");
        let r = RunSpec {
            peer: Peer::Qemu,
            point: Point {
                mode: Mode::StopAndCopy,
                mem: 1 << 30,
                ws: 64 << 20,
                ws_spec: WsSpec::Bytes(64 << 20),
                rate: 0,
                vcpus: 1,
                pinned: false,
                pattern: Pattern::Random,
            },
            repeat: 2,
        };
        assert_eq!(r.label(), "qemu-stop-and-copy-1G-ws64M-r0-v1-2");
        let pinned = RunSpec {
            point: Point {
                pinned: true,
                ..r.point
            },
            ..r
        };
        assert_eq!(pinned.label(), "qemu-stop-and-copy-1G-ws64M-r0-v1-pin-2");
        assert_eq!(pinned.point.cpu(crate::netns::Side::Source), Some(0));
        assert_eq!(pinned.point.cpu(crate::netns::Side::Dest), Some(1));
        assert_eq!(r.point.cpu(crate::netns::Side::Dest), None);
        assert_eq!(parse_pin("both"), Ok(vec![false, true]));
        assert!(parse_pin("sometimes").is_err());
    }
}
