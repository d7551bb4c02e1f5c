//! Measured dispatch thresholds: the table `cargo xtask tune` (`arfuse-bench --tune-out`) writes
//! and the dispatcher reads (`ARFUSE_TUNE_FILE`, or [`crate::Policy::apply`]).
//!
//! A text file, one threshold per line, `#` comments (the first says where and when it was
//! measured):
//!
//! ```text
//! # arfuse tune table: NVIDIA H100 80GB HBM3 x1, 2026-11-25T08:05:03Z, arfuse-bench --world 2 ...
//! world 2 one_stage_max_bytes 4194304
//! ```
//!
//! A world size without a line keeps the configured `one_stage_max_bytes`.

use crate::{Error, Result};
use arfuse_kernels::MAX_RANKS;
use std::fmt::Write as _;
use std::path::Path;

/// The 1-stage threshold measured for each world size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TuneTable {
    /// Where and when the table was measured (the first comment line, without `# `).
    pub source: String,
    /// `(world size, one_stage_max_bytes)`, at most one entry per world size.
    pub one_stage_max_bytes: Vec<(usize, usize)>,
}

impl TuneTable {
    /// Parses the text of a table.
    pub fn parse(text: &str) -> Result<Self> {
        let mut table = TuneTable::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(comment) = line.strip_prefix('#') {
                if table.source.is_empty() {
                    table.source = comment.trim().to_string();
                }
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let bad = |why: &str| Error::Config(format!("tune table line {}: {why}: {line:?}", n + 1));
            let words: Vec<&str> = line.split_whitespace().collect();
            let [key, world, name, value] = words[..] else {
                return Err(bad("expected `world <N> one_stage_max_bytes <BYTES>`"));
            };
            if key != "world" || name != "one_stage_max_bytes" {
                return Err(bad("expected `world <N> one_stage_max_bytes <BYTES>`"));
            }
            let world: usize = world.parse().map_err(|_| bad("world size is not a number"))?;
            let bytes: usize = value.parse().map_err(|_| bad("byte count is not a number"))?;
            if world == 0 || world > MAX_RANKS {
                return Err(bad("world size outside 1..=8"));
            }
            if table.one_stage_max_bytes.iter().any(|&(w, _)| w == world) {
                return Err(bad("world size given twice"));
            }
            table.one_stage_max_bytes.push((world, bytes));
        }
        Ok(table)
    }

    /// Reads and parses the table at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("reading the tune table {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// The text of the table ([`parse`](Self::parse) reads it back).
    pub fn render(&self) -> String {
        let mut s = format!("# {}\n", self.source.replace('\n', " "));
        for &(world, bytes) in &self.one_stage_max_bytes {
            let _ = writeln!(s, "world {world} one_stage_max_bytes {bytes}");
        }
        s
    }
}

/// The largest payload (bytes per rank) up to which the fused 1-stage path was measured at least as
/// fast as the 2-stage path on every shape up to it: `points` are `(bytes, 1-stage µs, 2-stage µs)`.
/// `None` when 2-stage wins already at the smallest payload measured. Nothing is extrapolated:
/// past the largest measured payload the threshold stops.
pub fn one_stage_crossover(points: &[(u64, f64, f64)]) -> Option<u64> {
    let mut sorted = points.to_vec();
    sorted.sort_by_key(|p| p.0);
    // The first payload at which 2-stage wins on some shape ends the range.
    let first_loss = sorted.iter().find(|&&(_, one, two)| one > two).map(|p| p.0);
    sorted.iter().filter(|&&(bytes, _, _)| first_loss.map_or(true, |loss| bytes < loss)).map(|p| p.0).max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_round_trips_and_bad_lines_are_refused() {
        let table =
            TuneTable { source: "test machine, today".into(), one_stage_max_bytes: vec![(2, 4 << 20), (8, 1 << 17)] };
        assert_eq!(TuneTable::parse(&table.render()).expect("parses"), table);
        for bad in [
            "world 2 one_stage_max_bytes",
            "world two one_stage_max_bytes 5",
            "world 9 one_stage_max_bytes 5",
            "world 2 two_stage_max_bytes 5",
            "world 2 one_stage_max_bytes 5\nworld 2 one_stage_max_bytes 6",
        ] {
            assert!(matches!(TuneTable::parse(bad), Err(Error::Config(_))), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_crossover_is_the_last_payload_before_two_stage_first_wins() {
        let points = [(1 << 10, 9.0, 13.0), (1 << 20, 14.0, 18.0), (1 << 22, 30.0, 40.0), (1 << 26, 600.0, 400.0)];
        assert_eq!(one_stage_crossover(&points), Some(1 << 22));
        // Unordered input, and a loss in the middle ends the range there.
        let points = [(1 << 22, 30.0, 40.0), (1 << 10, 9.0, 13.0), (1 << 20, 19.0, 18.0)];
        assert_eq!(one_stage_crossover(&points), Some(1 << 10));
        assert_eq!(one_stage_crossover(&[(64, 12.0, 11.0)]), None);
        assert_eq!(one_stage_crossover(&[(64, 10.0, 11.0)]), Some(64));
        assert_eq!(one_stage_crossover(&[]), None);
    }
}
