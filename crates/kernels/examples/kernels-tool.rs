//! The kernels crate's half of `cargo xtask kernels`: writes the portable source, the facts about
//! it (hash, clang arguments per AMD architecture, where the hip backend looks for an offline code
//! object) and NVRTC's images and logs for each NVIDIA architecture into one directory.
//!
//! Why an example, run by xtask with `cargo run -p arfuse-kernels --example kernels-tool`:
//! - the source text, its hash and the exact compiler flags belong to `arfuse-kernels`
//!   ([`source`]), and NVRTC is reached through its `cuda` backend (cudarc, loaded at run time:
//!   nothing CUDA is linked, so this builds and runs on any machine);
//! - xtask stays free of the crates it checks (a kernels crate that does not build must not take
//!   `cargo xtask test` or `ci` down with it, and every `cargo xtask` command would otherwise
//!   build cudarc first);
//! - clang, `llvm-readelf`, `llvm-objdump` and `nvdisasm` are separate programs anyway, so xtask
//!   runs them and does the parsing, checks, tables and manifest, where its unit tests cover them.
//!
//! ```text
//! kernels-tool OUT_DIR [--amd gfx90a,gfx942] [--nvidia sm_80,sm_90] [--ptxas-verbose]
//! ```
//!
//! Writes `OUT_DIR/arfuse.hip` (the full source), for each NVIDIA architecture
//! `OUT_DIR/nvidia/sm_XY.cubin` and `OUT_DIR/nvidia/compute_XY.ptx` compiled with exactly
//! [`source::nvrtc_options`], and `OUT_DIR/tool.json` describing it all (with every kernel symbol) (a failed NVRTC
//! compilation is recorded there with its log, not fatal: xtask decides). `--ptxas-verbose`
//! compiles each CUBIN once more with `--ptxas-options=-v` and records that log (ptxas's register,
//! spill, stack and shared-memory counts); the images written are always the exact-options ones.
//! Progress goes to stderr.

use arfuse_kernels::{cuda, source, DType, KernelId, Op};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

struct Args {
    out: PathBuf,
    amd: Vec<String>,
    nvidia: Vec<String>,
    ptxas_verbose: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut out = None;
    let (mut amd, mut nvidia, mut ptxas_verbose) = (Vec::new(), Vec::new(), false);
    let list = |value: Option<String>, flag: &str| -> Result<Vec<String>, String> {
        let value = value.ok_or_else(|| format!("{flag} needs a comma-separated list"))?;
        Ok(value.split(',').map(str::trim).filter(|a| !a.is_empty()).map(String::from).collect())
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--amd" => amd = list(args.next(), "--amd")?,
            "--nvidia" => nvidia = list(args.next(), "--nvidia")?,
            "--ptxas-verbose" => ptxas_verbose = true,
            flag if flag.starts_with('-') => return Err(format!("unknown flag {flag}")),
            dir if out.is_none() => out = Some(PathBuf::from(dir)),
            extra => return Err(format!("unexpected argument {extra}")),
        }
    }
    let out = out.ok_or("usage: kernels-tool OUT_DIR [--amd ARCHS] [--nvidia ARCHS] [--ptxas-verbose]")?;
    Ok(Args { out, amd, nvidia, ptxas_verbose })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// One NVIDIA architecture: the CUBIN, the PTX of the matching virtual architecture, the logs.
fn nvidia(out: &Path, arch: &str, ptxas_verbose: bool) -> Result<Value, String> {
    let Some(number) = arch.strip_prefix("sm_") else {
        return Err(format!("{arch}: NVIDIA architectures are named sm_XY"));
    };
    let mut entry = json!({ "arch": arch, "options": source::nvrtc_options(arch) });
    let virtual_arch = format!("compute_{number}");
    let mut errors = Vec::new();
    match cuda::compile_offline(arch, &[]) {
        Ok(image) => {
            let file = format!("nvidia/{arch}.cubin");
            write(&out.join(&file), &image.image)?;
            entry["cubin"] = json!(file);
            entry["log"] = json!(image.log);
            entry["nvrtc_version"] = json!(format!("{}.{}", image.nvrtc_version.0, image.nvrtc_version.1));
        }
        Err(err) => errors.push(err.to_string()),
    }
    match cuda::compile_offline(&virtual_arch, &[]) {
        Ok(image) => {
            let file = format!("nvidia/{virtual_arch}.ptx");
            // The file holds the PTX text; the NUL that cuModuleLoadData wants is not part of it.
            let text = image.image.strip_suffix(&[0]).unwrap_or(&image.image);
            write(&out.join(&file), text)?;
            entry["ptx"] = json!(file);
            entry["ptx_options"] = json!(image.options);
        }
        Err(err) => errors.push(err.to_string()),
    }
    if ptxas_verbose && errors.is_empty() {
        let verbose = ["--ptxas-options=-v".to_string()];
        match cuda::compile_offline(arch, &verbose) {
            Ok(image) => {
                entry["verbose_options"] = json!(image.options);
                entry["verbose_log"] = json!(image.log);
                entry["verbose_cubin_identical"] = json!(Some(&image.image) == entry_cubin(out, &entry).as_ref());
            }
            Err(err) => errors.push(err.to_string()),
        }
    }
    if !errors.is_empty() {
        entry["error"] = json!(errors.join("\n"));
    }
    Ok(entry)
}

fn entry_cubin(out: &Path, entry: &Value) -> Option<Vec<u8>> {
    std::fs::read(out.join(entry["cubin"].as_str()?)).ok()
}

fn run(args: &Args) -> Result<(), String> {
    std::fs::create_dir_all(args.out.join("nvidia")).map_err(|e| format!("creating {}: {e}", args.out.display()))?;
    write(&args.out.join("arfuse.hip"), source::full_source().as_bytes())?;
    let hash = source::source_hash();
    let amd: Vec<Value> = args
        .amd
        .iter()
        .map(|arch| {
            json!({
                "arch": arch,
                "clang_args": source::clang_hip_args(arch),
                "offline_image": source::offline_hsaco_path(arch, hash),
            })
        })
        .collect();
    let mut nvidia_entries = Vec::new();
    let nvrtc = match cuda::Cuda::nvrtc_version() {
        Ok((major, minor)) => {
            for arch in &args.nvidia {
                eprintln!("kernels: nvrtc {major}.{minor} {arch} ...");
                let entry = nvidia(&args.out, arch, args.ptxas_verbose)?;
                if let Some(error) = entry["error"].as_str() {
                    eprintln!("kernels: nvrtc {arch}: FAILED\n{error}");
                }
                nvidia_entries.push(entry);
            }
            json!({ "version": format!("{major}.{minor}") })
        }
        Err(err) => json!({ "error": err.to_string() }),
    };
    let symbols: Vec<String> =
        Op::ALL.iter().flat_map(|&op| DType::ALL.iter().map(move |&dtype| KernelId { op, dtype }.symbol())).collect();
    let report = json!({
        "source": "arfuse.hip",
        "symbols": symbols,
        "source_hash": format!("{hash:016x}"),
        "amd": amd,
        "nvrtc": nvrtc,
        "nvidia": nvidia_entries,
    });
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    write(&args.out.join("tool.json"), text.as_bytes())
}

fn main() -> ExitCode {
    match parse_args().and_then(|args| run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kernels-tool: {err}");
            ExitCode::FAILURE
        }
    }
}
