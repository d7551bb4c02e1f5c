//! `arfuse-bench`: the fused-vs-unfused tables (what `cargo xtask bench` runs).
//!
//! Decode shapes are timed graph-captured, prefill shapes eagerly; every path (unfused, fused
//! 1-stage, fused 2-stage) on every shape, with the dispatcher's pick marked. The tables go to
//! stdout as Markdown, the same data to `--json FILE`, and SVG plots of it beside that file
//! ([`crate::plot`]); `--plot FILE.json` draws the plots of an existing report instead of running.

use crate::report::{grid, Mode, Shape, DECODE_TOKENS, HIDDEN_SIZES, PREFILL_LARGE, PREFILL_TOKENS};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// Command-line arguments of `arfuse-bench`.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "arfuse-bench", about = "Fused all-reduce + residual + RMSNorm against the unfused path, per shape")]
pub struct BenchArgs {
    /// Ranks (threads of this process; several share a GPU when there are fewer GPUs).
    #[arg(long, default_value_t = 2)]
    pub world: usize,
    /// GPUs to spread the ranks over (at most the number present).
    #[arg(long, default_value_t = 1)]
    pub gpus: usize,
    /// Backend: `cuda` or `hip` (whichever this build has).
    #[arg(long, default_value = "cuda")]
    pub backend: String,
    /// Storage dtype: bf16 or f16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Modes to run: decode, prefill.
    #[arg(long, value_delimiter = ',', default_values = ["decode", "prefill"])]
    pub modes: Vec<String>,
    /// Decode token counts.
    #[arg(long, value_delimiter = ',', default_values_t = DECODE_TOKENS)]
    pub decode_tokens: Vec<usize>,
    /// Hidden sizes (decode and prefill).
    #[arg(long, value_delimiter = ',', default_values_t = HIDDEN_SIZES)]
    pub hidden: Vec<usize>,
    /// Prefill token counts (with every hidden size); 8192x4096 is added unless --no-large.
    #[arg(long, value_delimiter = ',', default_values_t = [PREFILL_TOKENS])]
    pub prefill_tokens: Vec<usize>,
    /// Leave out the 8192x4096 prefill shape.
    #[arg(long)]
    pub no_large: bool,
    /// Calls per timed batch (one graph) in decode mode.
    #[arg(long, default_value_t = 100)]
    pub iters: usize,
    /// Calls per timed batch in prefill mode.
    #[arg(long, default_value_t = 10)]
    pub prefill_iters: usize,
    /// Untimed batches first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed batches (the samples of p10/p50/p90).
    #[arg(long, default_value_t = 20)]
    pub repeats: usize,
    /// Skip checking outputs against the reference.
    #[arg(long)]
    pub no_check: bool,
    /// Input sets the calls of a shape rotate through (default: enough that they do not all sit
    /// in a 50 MB L2 cache, 2 to 8). `--input-sets 1` reads the same, L2-resident tensors on every
    /// call, as the push prototype of ANCHORS.md measures.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub input_sets: Option<u16>,
    /// Input seed.
    #[arg(long, default_value_t = 0x00a7_f05e)]
    pub seed: u64,
    /// Also time each fused path with `out` quantised to FP8 in the same call (issue 17; rows
    /// `fused-1stage+fp8`, `fused-2stage+fp8`) and as the plain call followed by the separate
    /// quantisation kernel (`fused-1stage+quant`, `fused-2stage+quant`): `FORMAT:SCALING` as
    /// `arfuse-demo --fp8` (`e4m3fn:per-token`, `e4m3fn:per-tensor=0.01`, ...). Checked bit-exact
    /// unless --no-check.
    #[arg(long, value_name = "FORMAT:SCALING")]
    pub fp8: Option<String>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Do not draw the SVG plots beside `--json` (one per mode, a panel per hidden size).
    #[arg(long)]
    pub no_plots: bool,
    /// Draw the SVG plots of these existing reports (`--json` files) and exit, without running.
    #[arg(long, value_name = "FILE.json", value_delimiter = ',')]
    pub plot: Vec<PathBuf>,
    /// With `--plot`: the peers' timings (`peers/peers.py --json`) to draw as lines too.
    #[arg(long, value_name = "FILE.json")]
    pub peers: Option<PathBuf>,
    /// With `--plot`: where to write the SVGs (default: beside each report).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Write (or update, for this world size) the dispatcher's tune table here: the 1-stage
    /// threshold this run measured (what `cargo xtask tune` runs; read with `ARFUSE_TUNE_FILE`).
    #[arg(long)]
    pub tune_out: Option<PathBuf>,
}

impl BenchArgs {
    /// The (mode, shape) list, in run order.
    pub fn cases(&self) -> Result<Vec<(Mode, Shape)>> {
        let mut cases = Vec::new();
        for mode in &self.modes {
            match mode.as_str() {
                "decode" => {
                    cases.extend(grid(&self.decode_tokens, &self.hidden).into_iter().map(|s| (Mode::Decode, s)))
                }
                "prefill" => {
                    cases.extend(grid(&self.prefill_tokens, &self.hidden).into_iter().map(|s| (Mode::Prefill, s)));
                    if !self.no_large {
                        cases.push((Mode::Prefill, PREFILL_LARGE));
                    }
                }
                other => bail!("unknown mode {other:?} (decode, prefill)"),
            }
        }
        if cases.is_empty() {
            bail!("nothing to run");
        }
        Ok(cases)
    }
}

/// Runs the bench: prints the tables, writes the JSON.
pub fn main(args: BenchArgs) -> Result<()> {
    if !args.plot.is_empty() {
        for json in &args.plot {
            for svg in crate::plot::plot_file(json, args.peers.as_deref(), args.out.as_deref())? {
                println!("{}", svg.display());
            }
        }
        return Ok(());
    }
    let cases = args.cases()?;
    if args.world < 2 {
        bail!("--world must be at least 2 (an all-reduce needs peers)");
    }
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let report = run_backend(&args, cases, command)?;
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        if !args.no_plots {
            let plotted = crate::plot::plot_file(path, None, None)?;
            let names: Vec<String> = plotted.iter().map(|p| p.display().to_string()).collect();
            eprintln!("plots: {}", names.join(", "));
        }
    }
    print!("{}", report.render());
    if let Some(path) = &args.tune_out {
        write_tune_table(&report, path)?;
    }
    if report.rows.iter().any(|r| r.paths.iter().any(|p| p.exact == Some(false))) {
        bail!("some outputs differ from the reference (marked NO)");
    }
    Ok(())
}

/// Writes the 1-stage threshold `report` measured into the tune table at `path`, keeping the other
/// world sizes' lines of a table already there. Shapes with a wrong output do not count.
fn write_tune_table(report: &crate::report::Report, path: &std::path::Path) -> Result<()> {
    use arfuse_fusion::tune::{one_stage_crossover, TuneTable};
    let points: Vec<(u64, f64, f64)> = report
        .rows
        .iter()
        .filter(|r| r.paths.iter().all(|p| p.exact != Some(false)))
        .filter_map(|r| {
            let elem = arfuse_kernels::DType::ALL.into_iter().find(|d| d.name() == r.dtype)?.size();
            let bytes = (r.shape.rows * r.shape.hidden * elem) as u64;
            Some((bytes, r.path("fused-1stage")?.stats.p50, r.path("fused-2stage")?.stats.p50))
        })
        .collect();
    let Some(threshold) = one_stage_crossover(&points) else {
        eprintln!("tune: 2-stage was faster at every payload measured; the table is left as it is");
        return Ok(());
    };
    let mut table = if path.exists() { TuneTable::load(path)? } else { TuneTable::default() };
    table.one_stage_max_bytes.retain(|&(world, _)| world != report.world_size);
    table.one_stage_max_bytes.push((report.world_size, threshold as usize));
    table.one_stage_max_bytes.sort_unstable();
    table.source = format!("arfuse tune table: {}, {}, {}", report.device, report.date, report.command);
    std::fs::write(path, table.render()).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "tune: world {}: 1-stage up to {threshold} bytes per rank (measured over {} shapes) -> {}",
        report.world_size,
        points.len(),
        path.display()
    );
    Ok(())
}

/// Runs the plan on the backend `args.backend` names, for the dtype it names.
#[cfg(any(feature = "cuda", feature = "hip"))]
fn run_backend(args: &BenchArgs, cases: Vec<(Mode, Shape)>, command: String) -> Result<crate::report::Report> {
    use crate::runner::{run, Plan};
    use arfuse_kernels::GpuBackend;
    fn on<B: GpuBackend>(args: &BenchArgs, plan: &Plan) -> Result<crate::report::Report> {
        let progress = indicatif::ProgressBar::new(0);
        progress.set_style(
            indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
                .context("progress template")?,
        );
        let report = match args.dtype.as_str() {
            "bf16" => run::<B, half::bf16>(plan, &progress),
            "f16" => run::<B, half::f16>(plan, &progress),
            other => bail!("unsupported dtype {other:?} (bf16, f16)"),
        }?;
        progress.finish_and_clear();
        Ok(report)
    }
    let plan = Plan {
        world_size: args.world,
        gpus: args.gpus,
        cases,
        decode_iters: args.iters,
        prefill_iters: args.prefill_iters,
        warmup: args.warmup,
        repeats: args.repeats,
        check: !args.no_check,
        input_sets: args.input_sets.map(usize::from),
        seed: args.seed,
        command,
        fp8: args.fp8.as_deref().map(crate::demo::parse_fp8).transpose()?,
    };
    match args.backend.as_str() {
        #[cfg(feature = "cuda")]
        "cuda" => on::<arfuse_kernels::api::Cuda>(args, &plan),
        #[cfg(feature = "hip")]
        "hip" => on::<arfuse_kernels::api::Hip>(args, &plan),
        other => bail!("backend {other:?} is not in this build (features: cuda, hip)"),
    }
}

/// Without a GPU backend in the build there is nothing to time.
#[cfg(not(any(feature = "cuda", feature = "hip")))]
fn run_backend(args: &BenchArgs, _: Vec<(Mode, Shape)>, _: String) -> Result<crate::report::Report> {
    bail!("backend {:?}: this build has no GPU backend (features: cuda, hip)", args.backend)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn the_default_run_covers_the_issue_shapes() {
        let args = BenchArgs::parse_from(["arfuse-bench"]);
        let cases = args.cases().expect("cases");
        assert_eq!(cases.iter().filter(|(m, _)| *m == Mode::Decode).count(), 48);
        let prefill: Vec<Shape> = cases.iter().filter(|(m, _)| *m == Mode::Prefill).map(|(_, s)| *s).collect();
        assert_eq!(prefill.len(), 9);
        assert_eq!(prefill[8], PREFILL_LARGE);
        assert!(prefill[..8].iter().all(|s| s.rows == 128));
    }

    #[test]
    fn flags_narrow_the_run_and_bad_modes_are_refused() {
        let args =
            BenchArgs::parse_from(["arfuse-bench", "--modes", "decode", "--decode-tokens", "1,16", "--hidden", "4096"]);
        let cases = args.cases().expect("cases");
        assert_eq!(
            cases,
            vec![(Mode::Decode, Shape { rows: 1, hidden: 4096 }), (Mode::Decode, Shape { rows: 16, hidden: 4096 })]
        );
        let bad = BenchArgs::parse_from(["arfuse-bench", "--modes", "train"]);
        assert!(bad.cases().is_err());
    }
}
