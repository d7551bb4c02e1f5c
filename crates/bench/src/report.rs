//! What `arfuse-bench` measures and prints, independent of any device: the shape lists, the
//! percentile statistics, the memory-bandwidth floor, the tables and their JSON form.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// How a mode's calls are issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decode shapes: every timed batch of calls is one captured graph, replayed.
    Decode,
    /// Prefill shapes: calls launched eagerly from the host.
    Prefill,
}

impl Mode {
    /// How the mode issues its calls, for table headers.
    pub fn how(self) -> &'static str {
        match self {
            Mode::Decode => "graph-captured",
            Mode::Prefill => "eager",
        }
    }
}

/// One benchmarked tensor shape: `rows` tokens of `hidden` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// Tokens.
    pub rows: usize,
    /// Hidden size.
    pub hidden: usize,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.rows, self.hidden)
    }
}

/// The issue's decode token counts.
pub const DECODE_TOKENS: [usize; 6] = [1, 4, 16, 32, 64, 80];
/// The issue's hidden sizes.
pub const HIDDEN_SIZES: [usize; 8] = [2880, 4096, 5120, 6144, 7168, 8192, 14336, 16384];
/// The issue's prefill token count (with every hidden size), plus [`PREFILL_LARGE`].
pub const PREFILL_TOKENS: usize = 128;
/// The largest prefill shape: 64 MiB of bf16, the largest fused tensor by default.
pub const PREFILL_LARGE: Shape = Shape { rows: 8192, hidden: 4096 };

/// Every `tokens` x `hidden` pair, tokens outermost.
pub fn grid(tokens: &[usize], hidden: &[usize]) -> Vec<Shape> {
    tokens.iter().flat_map(|&rows| hidden.iter().map(move |&hidden| Shape { rows, hidden })).collect()
}

/// Percentiles of a set of timings, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// 10th percentile.
    pub p10: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Samples the percentiles are taken over.
    pub samples: usize,
}

impl Stats {
    /// Percentiles of `samples` (nearest rank on the sorted samples). `None` when empty.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted[((q * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)];
        Some(Stats { p10: at(0.1), p50: at(0.5), p90: at(0.9), samples: sorted.len() })
    }
}

/// Bytes a call must move through device memory on the GPU the ranks share: every rank reads its
/// input, the residual and the weight's worth of rows once, and writes out and residual_out, and
/// its input is read once more by the reduction (its own or its peers'): five tensors of
/// `rows x hidden` per rank, against the four of an add+RMSNorm alone.
pub fn floor_bytes(shape: Shape, elem_bytes: usize, ranks_per_gpu: usize) -> u64 {
    5 * (shape.rows * shape.hidden * elem_bytes) as u64 * ranks_per_gpu as u64
}

/// One path's timing of one shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathTiming {
    /// The path's name (`unfused`, `fused-1stage`, `fused-2stage`).
    pub path: String,
    /// Microseconds per call.
    pub stats: Stats,
    /// Whether the outputs of the last call on the first input set matched the reference
    /// (residual_out bit-exact, out within 1 ulp, every element written); `None` if not checked.
    pub exact: Option<bool>,
}

/// One shape of one mode: every path timed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Decode or prefill.
    pub mode: Mode,
    /// The shape.
    pub shape: Shape,
    /// Storage dtype name.
    pub dtype: String,
    /// The path the dispatcher picks for this shape.
    pub dispatched: String,
    /// Every path timed (the unfused one first).
    pub paths: Vec<PathTiming>,
    /// [`floor_bytes`] for this shape.
    pub floor_bytes: u64,
}

impl Row {
    /// The timing of `path`, if it was run.
    pub fn path(&self, path: &str) -> Option<&PathTiming> {
        self.paths.iter().find(|p| p.path == path)
    }
    /// The unfused path's median.
    pub fn unfused_us(&self) -> Option<f64> {
        self.path("unfused").map(|p| p.stats.p50)
    }
    /// The dispatched (fused) path's median.
    pub fn fused_us(&self) -> Option<f64> {
        self.path(&self.dispatched).map(|p| p.stats.p50)
    }
    /// unfused / fused, medians.
    pub fn speedup(&self) -> Option<f64> {
        Some(self.unfused_us()? / self.fused_us()?)
    }
}

/// The machine-level measurements every floor is computed from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Floors {
    /// Device-to-device copy bandwidth, bytes read plus written per second, in GB/s.
    pub copy_gbs: f64,
    /// One tiny graph node (a 16-byte copy), back to back inside a graph, in microseconds.
    pub graph_node_us: f64,
}

impl Floors {
    /// The floor of a call moving `bytes`: the bandwidth floor, and for graph-captured calls at
    /// least one graph node.
    pub fn floor_us(&self, bytes: u64, mode: Mode) -> f64 {
        let bandwidth = bytes as f64 / (self.copy_gbs * 1e3);
        match mode {
            Mode::Decode => bandwidth.max(self.graph_node_us),
            Mode::Prefill => bandwidth,
        }
    }
}

/// A whole run: where and how it was measured, and every row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The device (name, architecture) and how many.
    pub device: String,
    /// Backend name.
    pub backend: String,
    /// UTC time the run started (RFC 3339).
    pub date: String,
    /// The command line.
    pub command: String,
    /// Ranks.
    pub world_size: usize,
    /// Ranks sharing each GPU (more than 1: ranks simulated on one GPU).
    pub ranks_per_gpu: usize,
    /// Calls per timed batch in decode mode (one graph).
    pub iters: usize,
    /// Calls per timed batch in prefill mode (0 in reports written before it was recorded).
    #[serde(default)]
    pub prefill_iters: usize,
    /// Timed batches per path (the samples of each statistic).
    pub repeats: usize,
    /// How the captured decode graphs get their inputs: `pushed, nothing registered` since every
    /// path pushes; reports of earlier versions say `in place` (2-stage inputs registered after
    /// capture) or `staged` (copied into a staging buffer), or nothing (staged).
    #[serde(default)]
    pub graph_inputs: String,
    /// Input sets the calls rotate through, per shape: (shape, sets).
    pub input_sets: Vec<(Shape, usize)>,
    /// `--fp8`'s `FORMAT:SCALING` (as `arfuse-demo --fp8` takes it), empty without: what the
    /// `+fp8` and `+quant` rows quantise, and what `peers/peers.py` times torch.compile's
    /// add+RMSNorm+FP8 quantisation with.
    #[serde(default)]
    pub fp8: String,
    /// Machine floors.
    pub floors: Floors,
    /// The rows.
    pub rows: Vec<Row>,
}

/// The peers' timings that `peers/peers.py --json` writes (other libraries on the same shapes).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    /// The device the peers ran on.
    #[serde(default)]
    pub device: String,
    /// UTC time of the run.
    #[serde(default)]
    pub date: String,
    /// Every peer's timing of every shape it ran.
    #[serde(default)]
    pub results: Vec<PeerTiming>,
}

/// One peer's timing of one shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerTiming {
    /// The peer's name (e.g. `torch.compile add+rmsnorm`).
    pub peer: String,
    /// Decode or prefill.
    pub mode: Mode,
    /// Tokens.
    pub rows: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Microseconds per call.
    pub stats: Stats,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

impl Report {
    /// The FP8-out rows of one mode (`--fp8`), in Markdown: each fused path plain, with its FP8
    /// output fused (`+fp8`), and as the plain call followed by the separate quantisation kernel
    /// (`+quant`), each with its ratio to the plain call (issue 17's target: `+fp8` at most 1.1 at
    /// decode shapes), and `+fp8` against `+quant`. Empty without them.
    pub fn fp8_table(&self, mode: Mode) -> String {
        let rows: Vec<&Row> =
            self.rows.iter().filter(|r| r.mode == mode && r.path("fused-1stage+fp8").is_some()).collect();
        if rows.is_empty() {
            return String::new();
        }
        let spec = if self.fp8.is_empty() { String::new() } else { format!(" {}", self.fp8) };
        let mut s = format!(
            "FP8 out{spec}, {mode:?} ({}), p50 µs\n\n| shape | fused-1stage | +fp8 | ratio | +quant | ratio | fp8/quant | \
             fused-2stage | +fp8 | ratio | +quant | ratio | fp8/quant |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
            mode.how()
        );
        for row in rows {
            let mut cells = Vec::new();
            for path in ["fused-1stage", "fused-2stage"] {
                let plain = row.path(path).map(|p| p.stats.p50);
                let fp8 = row.path(&format!("{path}+fp8")).map(|p| p.stats.p50);
                let quant = row.path(&format!("{path}+quant")).map(|p| p.stats.p50);
                let ratio = |a: Option<f64>, b: Option<f64>| opt(a.zip(b).map(|(a, b)| b / a), 2);
                cells.push(format!(
                    "{} | {} | {} | {} | {} | {}",
                    opt(plain, 1),
                    opt(fp8, 1),
                    ratio(plain, fp8),
                    opt(quant, 1),
                    ratio(plain, quant),
                    ratio(quant, fp8)
                ));
            }
            let _ = writeln!(s, "| {} | {} | {} |", row.shape, cells[0], cells[1]);
        }
        s
    }

    /// The table of one mode, in Markdown.
    pub fn table(&self, mode: Mode) -> String {
        let rows: Vec<&Row> = self.rows.iter().filter(|r| r.mode == mode).collect();
        let mut s = String::new();
        if rows.is_empty() {
            return s;
        }
        let how = match mode {
            Mode::Decode if !self.graph_inputs.is_empty() => format!("{}, inputs {}", mode.how(), self.graph_inputs),
            _ => mode.how().to_string(),
        };
        let _ = writeln!(
            s,
            "{mode:?} ({how}), world {w} ({rpg} ranks per GPU), {dtype}: p50 µs per call [p10–p90], {iters} calls x {reps} batches",
            w = self.world_size,
            rpg = self.ranks_per_gpu,
            dtype = rows[0].dtype,
            iters = if mode == Mode::Decode { self.iters } else { self.prefill_iters },
            reps = self.repeats,
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| shape | unfused µs | fused µs | speedup | path | 1-stage µs | 2-stage µs | GB/s | floor µs | of floor | exact |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|");
        for row in rows {
            let fused = row.fused_us();
            let cell = |name: &str| {
                row.path(name).map_or_else(
                    || "-".to_string(),
                    |p| format!("{:.1} [{:.1}–{:.1}]", p.stats.p50, p.stats.p10, p.stats.p90),
                )
            };
            let floor = self.floors.floor_us(row.floor_bytes, mode);
            let gbs = fused.map(|us| row.floor_bytes as f64 / (us * 1e3));
            let exact = if row.paths.iter().all(|p| p.exact == Some(true)) {
                "yes"
            } else if row.paths.iter().any(|p| p.exact == Some(false)) {
                "NO"
            } else {
                "unchecked"
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} |",
                row.shape,
                opt(row.unfused_us(), 1),
                opt(fused, 1),
                opt(row.speedup(), 2),
                row.dispatched,
                cell("fused-1stage"),
                cell("fused-2stage"),
                opt(gbs, 0),
                floor,
                opt(fused.map(|us| floor / us), 2),
                exact,
            );
        }
        s
    }

    /// Every table, with the header that says where, when and how.
    pub fn render(&self) -> String {
        let mut s = format!(
            "arfuse-bench on {} ({}), {}\ncommand: {}\nfloors: copy {:.0} GB/s (read+write), graph node {:.2} µs\n\n",
            self.device, self.backend, self.date, self.command, self.floors.copy_gbs, self.floors.graph_node_us
        );
        for mode in [Mode::Decode, Mode::Prefill] {
            let table = self.table(mode);
            if !table.is_empty() {
                s.push_str(&table);
                s.push('\n');
            }
            let fp8 = self.fp8_table(mode);
            if !fp8.is_empty() {
                s.push_str(&fp8);
                s.push('\n');
            }
        }
        s
    }
}

/// The current UTC time as RFC 3339 (seconds), without a date-time dependency.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_of_the_sorted_samples() {
        let samples: Vec<f64> = (1..=11).rev().map(f64::from).collect();
        let s = Stats::of(&samples).expect("stats");
        assert_eq!((s.p10, s.p50, s.p90, s.samples), (2.0, 6.0, 10.0, 11));
        assert_eq!(Stats::of(&[]), None);
        let one = Stats::of(&[3.5]).expect("stats");
        assert_eq!((one.p10, one.p50, one.p90), (3.5, 3.5, 3.5));
    }

    #[test]
    fn the_issue_shapes_are_all_there() {
        let decode = grid(&DECODE_TOKENS, &HIDDEN_SIZES);
        assert_eq!(decode.len(), 48);
        assert_eq!(decode[0], Shape { rows: 1, hidden: 2880 });
        assert_eq!(decode[47], Shape { rows: 80, hidden: 16384 });
        assert_eq!(PREFILL_LARGE.rows * PREFILL_LARGE.hidden * 2, 64 << 20);
    }

    #[test]
    fn floors_take_the_larger_of_bandwidth_and_one_graph_node() {
        let floors = Floors { copy_gbs: 3000.0, graph_node_us: 1.0 };
        // 64 MiB x 5 x 2 ranks at 3000 GB/s: 223.7 µs.
        let bytes = floor_bytes(PREFILL_LARGE, 2, 2);
        assert_eq!(bytes, 5 * 2 * (64 << 20));
        let got = floors.floor_us(bytes, Mode::Prefill);
        assert!((got - bytes as f64 / 3e12 * 1e6).abs() < 1e-9, "{got}");
        assert_eq!(floors.floor_us(1000, Mode::Decode), 1.0);
        assert!(floors.floor_us(1000, Mode::Prefill) < 0.001);
    }

    fn timing(path: &str, p50: f64, exact: Option<bool>) -> PathTiming {
        PathTiming { path: path.into(), stats: Stats { p10: p50 - 1.0, p50, p90: p50 + 1.0, samples: 3 }, exact }
    }

    #[test]
    fn the_table_shows_speedup_of_the_dispatched_path_and_flags_mismatches() {
        let row = |exact| Row {
            mode: Mode::Decode,
            shape: Shape { rows: 4, hidden: 4096 },
            dtype: "bf16".into(),
            dispatched: "fused-1stage".into(),
            paths: vec![
                timing("unfused", 20.0, Some(true)),
                timing("fused-1stage", 10.0, exact),
                timing("fused-2stage", 16.0, Some(true)),
            ],
            floor_bytes: floor_bytes(Shape { rows: 4, hidden: 4096 }, 2, 2),
        };
        let mut report = Report {
            device: "test".into(),
            backend: "none".into(),
            date: utc_now(),
            command: "test".into(),
            world_size: 2,
            ranks_per_gpu: 2,
            iters: 10,
            prefill_iters: 5,
            repeats: 3,
            graph_inputs: "in place".into(),
            fp8: String::new(),
            input_sets: vec![],
            floors: Floors { copy_gbs: 3000.0, graph_node_us: 1.0 },
            rows: vec![row(Some(true))],
        };
        assert_eq!(report.rows[0].speedup(), Some(2.0));
        let table = report.table(Mode::Decode);
        assert!(
            table.contains("| 4x4096 | 20.0 | 10.0 | 2.00 | fused-1stage | 10.0 [9.0–11.0] | 16.0 [15.0–17.0] |"),
            "{table}"
        );
        assert!(table.trim_end().ends_with("| yes |"), "{table}");
        assert!(report.table(Mode::Prefill).is_empty());
        report.rows[0] = row(Some(false));
        assert!(report.table(Mode::Decode).trim_end().ends_with("| NO |"));
        let json = serde_json::to_string(&report).expect("json");
        let back: Report = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, report);
        // `--fp8` rows: their own table, plain beside quantised, with the ratio.
        assert!(report.fp8_table(Mode::Decode).is_empty());
        report.rows[0].paths.push(timing("fused-1stage+fp8", 10.5, Some(true)));
        report.rows[0].paths.push(timing("fused-2stage+fp8", 20.0, Some(true)));
        let fp8 = report.fp8_table(Mode::Decode);
        assert!(fp8.contains("| 4x4096 | 10.0 | 10.5 | 1.05 | - | - | - | 16.0 | 20.0 | 1.25 | - | - | - |"), "{fp8}");
        // With the separate quantisation kernel's rows: their ratio to plain, and fused against it.
        report.rows[0].paths.push(timing("fused-1stage+quant", 14.0, Some(true)));
        report.rows[0].paths.push(timing("fused-2stage+quant", 25.0, Some(true)));
        report.fp8 = "e4m3fn:per-token".into();
        let fp8 = report.fp8_table(Mode::Decode);
        assert!(fp8.starts_with("FP8 out e4m3fn:per-token, Decode"), "{fp8}");
        assert!(
            fp8.contains(
                "| 4x4096 | 10.0 | 10.5 | 1.05 | 14.0 | 1.40 | 0.75 | 16.0 | 20.0 | 1.25 | 25.0 | 1.56 | 0.80 |"
            ),
            "{fp8}"
        );
        assert!(report.render().contains(&fp8));
    }

    #[test]
    fn utc_now_is_rfc3339() {
        let now = utc_now();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z') && &now[10..11] == "T", "{now}");
    }
}
