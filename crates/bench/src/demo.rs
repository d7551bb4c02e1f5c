//! The demo: every case on every path, checked against the reference, on the cpu backend (rank
//! processes) or a GPU backend (ranks as threads of one process).
//!
//! - **cpu**: a launcher re-executes its own binary with `--rank R` for every rank; ranks meet
//!   through a Unix-socket rendezvous in a private temporary directory, run every case on every
//!   path, and print one `ARFUSE-RESULT {json}` line per case, which the launcher gathers into the
//!   table.
//! - **cuda / hip** (`demo/gpu.rs`): the ranks are threads of this process, each with its own stream,
//!   spread over the GPUs (several per GPU when there are fewer GPUs than ranks), meeting through
//!   an in-process rendezvous; each times its calls with device events.
//!
//! `--backend auto` (the default) takes cuda if a CUDA device works (it opens and its kernels
//! load), else hip, else cpu, and says why on stderr. `--dump DIR` writes every rank's inputs and
//! outputs of every shape (the dispatched path) as safetensors files; `--verify-dump DIR` checks
//! such a directory against the reference ([`verify`]).

#[cfg(any(feature = "cuda", feature = "hip"))]
mod gpu;
pub mod verify;

use anyhow::{bail, Context, Result};
use arfuse_fusion::{
    AllReduce, AllReduceRmsNorm, Args, BytesMut, Config, FallbackReason, Path, QuantOut, TensorMut, TensorRef, Variant,
};
use arfuse_ipc::UnixRendezvous;
use arfuse_kernels::api::Cpu;
use arfuse_kernels::contract::{Epilogue, Fp8Format, Quant, Scaling};
use arfuse_kernels::{Backend, DType, Element};
use arfuse_testkit::quant::ExactOutputs;
use arfuse_testkit::{poison, unwritten, Fixture, Problem, Reference};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Command-line arguments of `arfuse-demo`.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "arfuse-demo",
    about = "Fused all-reduce + residual + RMSNorm across ranks (GPU threads or cpu rank processes), every path \
             checked against the reference"
)]
pub struct DemoArgs {
    /// Number of ranks: processes on the cpu backend; threads of this process on a GPU backend,
    /// spread over the GPUs (several per GPU when there are fewer GPUs than ranks).
    #[arg(long, default_value_t = 4)]
    pub world: usize,
    /// Backend: `auto` takes cuda if a CUDA device works, else hip, else cpu.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// GPUs to spread the ranks over (GPU backends; default: every GPU, at most one per rank).
    #[arg(long)]
    pub gpus: Option<usize>,
    /// Decode-like token counts.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub decode_tokens: Vec<usize>,
    /// Prefill-like token counts.
    #[arg(long, value_delimiter = ',', default_value = "128")]
    pub prefill_tokens: Vec<usize>,
    /// Hidden sizes.
    #[arg(long, value_delimiter = ',', default_value = "2880,4096")]
    pub hidden: Vec<usize>,
    /// Storage dtype: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Timed calls per case and path.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Write every rank's inputs and outputs (of the dispatched path, every shape) as safetensors
    /// files `rank{R}-{tokens}x{hidden}-{dtype}.safetensors` into this directory.
    #[arg(long, value_name = "DIR")]
    pub dump: Option<PathBuf>,
    /// Check the files a `--dump` wrote into DIR against the reference (every rank of every shape:
    /// residual_out bit-exact, out within the accepted band, every element written), then exit.
    #[arg(long, value_name = "DIR")]
    pub verify_dump: Option<PathBuf>,
    /// Also quantise `out` to FP8 in the same call (issue 17): `FORMAT:SCALING`, FORMAT `e4m3fn`
    /// or `e4m3fnuz`, SCALING `per-token`, `per-group` (of 128) or `per-tensor=SCALE`. The codes
    /// and scales are checked bit-exact against testkit's independent computation, and `--dump`
    /// writes them too (`out_fp8`, u8, and `scales`, f32).
    #[arg(long, value_name = "FORMAT:SCALING")]
    pub fp8: Option<String>,
    /// Seconds a rank waits for its peers.
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
    /// Internal: run as this rank process (cpu backend), meeting the others in `--dir`.
    #[arg(long, hide = true)]
    pub rank: Option<usize>,
    /// Internal: the rendezvous directory.
    #[arg(long, hide = true)]
    pub dir: Option<PathBuf>,
}

/// Which backend the demo runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// cuda if a CUDA device works, else hip, else cpu.
    Auto,
    /// NVIDIA GPUs (feature `cuda`).
    Cuda,
    /// AMD GPUs (feature `hip`).
    Hip,
    /// The cpu backend: rank processes over POSIX shared memory.
    Cpu,
}

/// The backend a run resolved to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolved {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda,
    #[cfg(feature = "hip")]
    Hip,
}

/// One case on one path, as one rank measured it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaseResult {
    /// Rank that measured.
    pub rank: usize,
    /// Tokens.
    pub rows: usize,
    /// Hidden size.
    pub hidden: usize,
    /// `decode` or `prefill`.
    pub mode: String,
    /// Path asked for (`auto` = the dispatcher's choice).
    pub asked: String,
    /// Path that ran.
    pub ran: String,
    /// Median time per call in microseconds.
    pub us_per_call: f64,
    /// Max ulp distance of `out` to the f64 reference.
    pub max_ulp_out: u32,
    /// `residual_out` bit-identical to the reference.
    pub residual_exact: bool,
    /// Every element of both outputs written.
    pub all_written: bool,
}

const RESULT_TAG: &str = "ARFUSE-RESULT ";

/// The paths every case runs on: the dispatcher's choice, then each path forced.
const PATHS: [(&str, Option<Path>); 4] = [
    ("auto", None),
    ("1stage", Some(Path::OneStage)),
    ("2stage", Some(Path::TwoStage)),
    ("unfused", Some(Path::Unfused { all_reduce: AllReduce::Custom, reason: FallbackReason::Disabled })),
];

/// Entry point of the binary.
pub fn main(args: DemoArgs) -> Result<()> {
    if let Some(dir) = &args.verify_dump {
        return verify::verify_dump(dir).map(|summary| println!("{summary}"));
    }
    if args.world == 0 {
        bail!("--world must be at least 1");
    }
    // A rank process of the cpu backend (the launcher below starts them).
    if let Some(rank) = args.rank {
        return rank_main(&args, rank);
    }
    match resolve(args.backend)? {
        Resolved::Cpu => launch(&args),
        #[cfg(feature = "cuda")]
        Resolved::Cuda => gpu::run::<arfuse_kernels::api::Cuda>(&args),
        #[cfg(feature = "hip")]
        Resolved::Hip => gpu::run::<arfuse_kernels::api::Hip>(&args),
    }
}

/// The backend `choice` means here: an explicit GPU backend that does not work is an error naming
/// why; `auto` falls back to the next one and says why on stderr.
fn resolve(choice: BackendChoice) -> Result<Resolved> {
    let cuda = || -> std::result::Result<Resolved, String> {
        #[cfg(feature = "cuda")]
        return gpu::probe::<arfuse_kernels::api::Cuda>().map(|()| Resolved::Cuda);
        #[cfg(not(feature = "cuda"))]
        Err("this arfuse-demo was built without the `cuda` feature".into())
    };
    let hip = || -> std::result::Result<Resolved, String> {
        #[cfg(feature = "hip")]
        return gpu::probe::<arfuse_kernels::api::Hip>().map(|()| Resolved::Hip);
        #[cfg(not(feature = "hip"))]
        Err("this arfuse-demo was built without the `hip` feature (`cargo xtask demo` adds it on a ROCm host)".into())
    };
    let refused = |backend: &str, why: String| {
        anyhow::anyhow!(
            "--backend {backend}: no working {backend} GPU here: {why}; `--backend cpu` (or `auto`) runs the cpu backend"
        )
    };
    match choice {
        BackendChoice::Cpu => Ok(Resolved::Cpu),
        BackendChoice::Cuda => cuda().map_err(|why| refused("cuda", why)),
        BackendChoice::Hip => hip().map_err(|why| refused("hip", why)),
        BackendChoice::Auto => {
            let mut reasons = Vec::new();
            for (name, probe) in [("cuda", &cuda as &dyn Fn() -> _), ("hip", &hip)] {
                match probe() {
                    Ok(backend) => return Ok(backend),
                    Err(why) => reasons.push(format!("{name}: {why}")),
                }
            }
            eprintln!("arfuse-demo: no GPU backend works here ({}); running the cpu backend", reasons.join("; "));
            Ok(Resolved::Cpu)
        }
    }
}

/// The storage dtype `--dtype` names.
/// `FORMAT:SCALING` of `--fp8` (and of a dump's `fp8` metadata).
pub fn parse_fp8(spec: &str) -> Result<Quant> {
    let (format, scaling) = spec.split_once(':').with_context(|| format!("--fp8 {spec:?}: FORMAT:SCALING"))?;
    let format = match format {
        "e4m3fn" => Fp8Format::E4m3Fn,
        "e4m3fnuz" => Fp8Format::E4m3Fnuz,
        other => bail!("--fp8: format {other:?} is not e4m3fn or e4m3fnuz"),
    };
    let scaling = match scaling {
        "per-token" => Scaling::PerToken,
        "per-group" => Scaling::PerGroup,
        other => match other.strip_prefix("per-tensor=") {
            Some(scale) => Scaling::PerTensor(scale.parse().with_context(|| format!("--fp8 scale {scale:?}"))?),
            None => bail!("--fp8: scaling {other:?} is not per-token, per-group or per-tensor=SCALE"),
        },
    };
    Ok(Quant { format, scaling })
}

/// The `--fp8` text of `quant` (exact: a static scale as the shortest f32 that reads back).
pub fn fp8_spec(quant: &Quant) -> String {
    let scaling = match quant.scaling {
        Scaling::PerTensor(s) => format!("{}={s:?}", quant.scaling.name()),
        dynamic => dynamic.name().to_string(),
    };
    format!("{}:{scaling}", quant.format.name())
}

/// An FP8 output read back: the codes and scales of one rank's call.
pub(crate) struct Fp8Out<'a> {
    pub(crate) quant: Quant,
    pub(crate) codes: &'a [u8],
    pub(crate) scales: &'a [f32],
}

/// Fails unless the FP8 output of `fixture`'s call equals testkit's computation bit for bit.
pub(crate) fn check_fp8<T: Element>(what: &str, fixture: &Fixture<T>, fp8: &Fp8Out<'_>) -> Result<()> {
    let want = ExactOutputs::compute(fixture, &Epilogue { quant: Some(fp8.quant), ..Epilogue::default() });
    if let Some(i) = want.codes.iter().zip(fp8.codes).position(|(a, b)| a != b) {
        bail!("{what}: FP8 code {i} is {:#04x}, the contract's is {:#04x}", fp8.codes[i], want.codes[i]);
    }
    if let Some(i) = want.scales.iter().zip(fp8.scales).position(|(a, b)| a.to_bits() != b.to_bits()) {
        bail!("{what}: FP8 scale {i} is {:e}, the contract's is {:e}", fp8.scales[i], want.scales[i]);
    }
    if want.codes.len() != fp8.codes.len() || want.scales.len() != fp8.scales.len() {
        bail!("{what}: FP8 output of the wrong size");
    }
    Ok(())
}

fn parse_dtype(name: &str) -> Result<DType> {
    DType::ALL
        .into_iter()
        .find(|d| d.name() == name)
        .with_context(|| format!("unknown dtype {name:?} (bf16, f16, f32)"))
}

/// Every case, in run order: (mode, problem). Every rank builds the same list.
fn cases(args: &DemoArgs, dtype: DType) -> Vec<(&'static str, Problem)> {
    let shapes =
        args.decode_tokens.iter().map(|&t| ("decode", t)).chain(args.prefill_tokens.iter().map(|&t| ("prefill", t)));
    shapes
        .flat_map(|(mode, rows)| {
            args.hidden.iter().map(move |&hidden| {
                let seed = (rows * 100_003 + hidden) as u64;
                (mode, Problem { world_size: args.world, rows, hidden, dtype, eps: 1e-6, seed })
            })
        })
        .collect()
}

/// The operator's configuration: the environment's `ARFUSE_*` settings, the rank deadline of
/// `--timeout-s`, and (unless `ARFUSE_PUSH_SLOT_BYTES` says otherwise) push slots large enough
/// that every case can be forced onto the 1-stage path.
fn demo_config(args: &DemoArgs, dtype: DType) -> Result<Config> {
    let mut config = Config::from_env()?.with_deadline(Duration::from_secs(args.timeout_s));
    if config.policy.push_slot_bytes == 0 {
        let largest = cases(args, dtype).iter().map(|(_, p)| p.bytes()).max().unwrap_or(16);
        config.policy.push_slot_bytes = largest.min(config.policy.max_size / 2).next_multiple_of(16);
    }
    Ok(config)
}

/// What one rank saw of one case on one path, from its outputs read back.
#[allow(clippy::too_many_arguments)]
fn case_result<T: Element>(
    rank: usize,
    mode: &str,
    problem: &Problem,
    asked: &str,
    ran: Path,
    us_per_call: f64,
    reference: &Reference<T>,
    out: &[T],
    residual_out: &[T],
) -> CaseResult {
    CaseResult {
        rank,
        rows: problem.rows,
        hidden: problem.hidden,
        mode: mode.into(),
        asked: asked.into(),
        ran: ran.name().into(),
        us_per_call,
        max_ulp_out: reference.out_max_ulp(out),
        residual_exact: reference.residual_out_mismatches(residual_out).total == 0,
        all_written: unwritten(out).is_empty() && unwritten(residual_out).is_empty(),
    }
}

/// Prints the table; fails when a rank failed or a case was not exact.
fn finish(args: &DemoArgs, how: &str, results: &[CaseResult], failed: &[String]) -> Result<()> {
    print_table(args, how, results);
    if !failed.is_empty() {
        bail!("ranks failed: {}", failed.join("; "));
    }
    if results.iter().any(|r| !r.residual_exact || r.max_ulp_out > 1 || !r.all_written) {
        bail!("some cases were not exact (see the table)");
    }
    Ok(())
}

fn launch(args: &DemoArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("arfuse-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    set_private(&dir)?;
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    eprintln!(
        "arfuse-demo: {} rank processes on the cpu backend ({})",
        args.world,
        Cpu::describe(&arfuse_kernels::cpu::CpuDevice)
    );
    let mut children = Vec::new();
    for rank in 0..args.world {
        let mut cmd = Command::new(&exe);
        cmd.args(std::env::args_os().skip(1)).arg("--rank").arg(rank.to_string()).arg("--dir").arg(&dir);
        // The backend was resolved here; a rank process always runs the cpu backend.
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        children.push(cmd.spawn().with_context(|| format!("starting rank {rank}"))?);
    }
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for (rank, mut child) in children.into_iter().enumerate() {
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines() {
                let line = line?;
                match line.strip_prefix(RESULT_TAG) {
                    Some(json) => results.push(serde_json::from_str::<CaseResult>(json)?),
                    None => println!("[rank {rank}] {line}"),
                }
            }
        }
        let status = child.wait()?;
        if !status.success() {
            failed.push(format!("rank {rank}: {status}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("arfuse-demo: done in {:.1} s", started.elapsed().as_secs_f64());
    finish(args, "cpu backend, rank processes over POSIX shm", &results, &failed)
}

#[cfg(unix)]
fn set_private(dir: &FsPath) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

fn print_table(args: &DemoArgs, how: &str, results: &[CaseResult]) {
    // One row per (shape, path): the slowest rank's time, the worst rank's numerics.
    let mut rows: BTreeMap<(usize, usize, String), Vec<&CaseResult>> = BTreeMap::new();
    for r in results {
        rows.entry((r.rows, r.hidden, r.asked.clone())).or_default().push(r);
    }
    println!();
    println!("arfuse-demo: world size {}, {}, {} timed calls per row ({how})", args.world, args.dtype, args.iters);
    println!(
        "{:<8} {:>6} x {:<6} {:<8} {:<14} {:>12} {:>10} {:>14}",
        "mode", "tokens", "hidden", "asked", "ran", "us/call", "max ulp", "residual exact"
    );
    for ((rows_n, hidden, asked), rs) in &rows {
        let worst_us = rs.iter().map(|r| r.us_per_call).fold(0.0, f64::max);
        let max_ulp = rs.iter().map(|r| r.max_ulp_out).max().unwrap_or(0);
        let exact = rs.iter().all(|r| r.residual_exact && r.all_written) && rs.len() == args.world;
        let ran = rs.first().map(|r| r.ran.as_str()).unwrap_or("-");
        let mode = rs.first().map(|r| r.mode.as_str()).unwrap_or("-");
        println!(
            "{:<8} {:>6} x {:<6} {:<8} {:<14} {:>12.1} {:>10} {:>14}",
            mode,
            rows_n,
            hidden,
            asked,
            ran,
            worst_us,
            max_ulp,
            if exact { "yes" } else { "NO" }
        );
    }
}

fn rank_main(args: &DemoArgs, rank: usize) -> Result<()> {
    let dir = args.dir.clone().context("--rank needs --dir")?;
    let timeout = Duration::from_secs(args.timeout_s);
    let mut rendezvous = UnixRendezvous::connect(&dir, rank, args.world, timeout)?;
    let dtype = parse_dtype(&args.dtype)?;
    let device = Cpu::open_device(0, 1)?;
    let stream = Cpu::create_stream(&device)?;
    let mut op = AllReduceRmsNorm::<Cpu>::new(&device, &mut rendezvous, demo_config(args, dtype)?)?;
    for (mode, problem) in cases(args, dtype) {
        match dtype {
            DType::Bf16 => run_case::<half::bf16>(args, &mut op, &stream, mode, &problem)?,
            DType::F16 => run_case::<half::f16>(args, &mut op, &stream, mode, &problem)?,
            DType::F32 => run_case::<f32>(args, &mut op, &stream, mode, &problem)?,
        }
    }
    Ok(())
}

fn run_case<T: Element>(
    args: &DemoArgs,
    op: &mut AllReduceRmsNorm<Cpu>,
    stream: &<Cpu as Backend>::Stream,
    mode: &str,
    problem: &Problem,
) -> Result<()> {
    let rank = op.rank();
    let fixture = Fixture::<T>::generate(problem);
    let reference = Reference::compute(&fixture);
    let elems = problem.rows * problem.hidden;
    let quant = args.fp8.as_deref().map(parse_fp8).transpose()?;
    let n_scales = quant.map_or(0, |q| problem.rows * q.scaling.scales_per_row(problem.hidden));
    for (asked, forced) in PATHS {
        let mut out = vec![T::from_f32(0.0); elems];
        let mut residual_out = vec![T::from_f32(0.0); elems];
        let mut codes = vec![0u8; if quant.is_some() { elems } else { 0 }];
        let mut scales = vec![f32::NAN; n_scales];
        let mut times = Vec::with_capacity(args.iters);
        let mut ran = Path::Noop;
        for iter in 0..args.iters + 1 {
            poison(&mut out);
            poison(&mut residual_out);
            codes.fill(0xa5);
            scales.fill(f32::NAN);
            let call = Args {
                input: TensorRef::new(&fixture.inputs[rank][..]),
                residual: TensorRef::new(&fixture.residual[..]),
                weight: TensorRef::new(&fixture.weight[..]),
                out: TensorMut::new(&mut out[..]),
                residual_out: TensorMut::new(&mut residual_out[..]),
                eps: problem.eps,
            };
            let variant = Variant {
                no_residual: false,
                quant: quant.map(|quant| QuantOut {
                    quant,
                    codes: BytesMut::host(&mut codes[..]),
                    scales: (n_scales > 0).then(|| TensorMut::new(&mut scales[..])),
                }),
            };
            let start = Instant::now();
            ran = match forced {
                Some(path) => op.forward_on_with(stream, path, call, variant)?,
                None => op.forward_with(stream, call, variant)?,
            };
            if iter > 0 {
                times.push(start.elapsed());
            }
        }
        times.sort();
        let median = times.get(times.len() / 2).copied().unwrap_or_default();
        let us = median.as_secs_f64() * 1e6;
        let result = case_result(rank, mode, problem, asked, ran, us, &reference, &out, &residual_out);
        println!("{RESULT_TAG}{}", serde_json::to_string(&result)?);
        let fp8 = quant.map(|quant| Fp8Out { quant, codes: &codes, scales: &scales });
        if let Some(fp8) = &fp8 {
            check_fp8(&format!("rank {rank} {problem} {asked}"), &fixture, fp8)?;
        }
        if let (Some(dir), "auto") = (&args.dump, asked) {
            dump(dir, rank, problem, &fixture, &out, &residual_out, fp8.as_ref())?;
        }
    }
    Ok(())
}

fn dump<T: Element>(
    dir: &FsPath,
    rank: usize,
    problem: &Problem,
    fixture: &Fixture<T>,
    out: &[T],
    residual_out: &[T],
    fp8: Option<&Fp8Out<'_>>,
) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    std::fs::create_dir_all(dir)?;
    let dtype = match T::DTYPE {
        DType::Bf16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::F32 => Dtype::F32,
    };
    let shape = vec![problem.rows, problem.hidden];
    let bytes = |v: &[T]| -> Vec<u8> { bytemuck::cast_slice(v).to_vec() };
    let tensors = [
        ("input", bytes(&fixture.inputs[rank]), shape.clone()),
        ("residual", bytes(&fixture.residual), shape.clone()),
        ("weight", bytes(&fixture.weight), vec![problem.hidden]),
        ("out", bytes(out), shape.clone()),
        ("residual_out", bytes(residual_out), shape.clone()),
    ];
    let mut views = tensors
        .iter()
        .map(|(name, data, shape)| Ok((name.to_string(), TensorView::new(dtype, shape.clone(), data)?)))
        .collect::<Result<Vec<_>>>()?;
    let scale_bytes: Vec<u8> = fp8.map(|f| bytemuck::cast_slice(f.scales).to_vec()).unwrap_or_default();
    if let Some(f) = fp8 {
        // The codes as u8 (safetensors' F8_E4M3 is e4m3fn only; the `fp8` metadata names the format).
        views.push(("out_fp8".to_string(), TensorView::new(Dtype::U8, shape.clone(), f.codes)?));
        let per_row = f.quant.scaling.scales_per_row(problem.hidden);
        if per_row > 0 {
            views.push(("scales".to_string(), TensorView::new(Dtype::F32, vec![problem.rows, per_row], &scale_bytes)?));
        }
    }
    let mut meta = std::collections::HashMap::new();
    if let Some(f) = fp8 {
        meta.insert("fp8".to_string(), fp8_spec(&f.quant));
    }
    meta.insert("world_size".to_string(), problem.world_size.to_string());
    meta.insert("rank".to_string(), rank.to_string());
    meta.insert("eps".to_string(), format!("{:e}", problem.eps));
    let path = dir.join(format!("rank{rank}-{}x{}-{}.safetensors", problem.rows, problem.hidden, T::DTYPE));
    safetensors::serialize_to_file(views, &Some(meta), &path)?;
    Ok(())
}
