//! `cargo xtask kernels`: compile the portable kernel source for every target architecture without
//! a GPU, check it, report register and memory use per kernel, and emit the images.
//!
//! Two halves (see `crates/kernels/examples/kernels-tool.rs` for why):
//! - `arfuse-kernels`' example `kernels-tool` writes the full source, its hash, the exact clang
//!   arguments per AMD architecture (`source::clang_hip_args`), every kernel symbol, and NVRTC's
//!   CUBIN, PTX and logs per NVIDIA architecture (exactly `source::nvrtc_options`; NVRTC is
//!   loaded at run time, nothing CUDA is linked) into a work directory, with `tool.json`;
//! - this module runs clang-22 on that source for each AMD architecture, reads the code objects'
//!   metadata (`llvm-readelf --notes`) and disassembly (`llvm-objdump -d`), ptxas's `-v` log and,
//!   where `nvdisasm` is installed, the CUBINs' SASS; it checks, prints tables, writes images.
//!
//! The checks are the compile tests' (`crates/kernels/tests/compile.rs`, the NVRTC test in
//! `cuda/module.rs`), with their thresholds: every kernel symbol present; on AMD no warning (the
//! test compiles with `-Werror`), at least 18 `global_load_dwordx4` and no `flat_load_dwordx4` per
//! architecture; on NVIDIA at least 18 `ld.global.v4.u32` and 18 `st.global.v4.u32` in the PTX.
//! The SASS counts (`LDG.E.128`, and generic `LD.E.128`) are reported, not checked: no threshold
//! for them has been agreed.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use xshell::{cmd, Shell};

/// The AMD architectures checked (those of `tests/compile.rs`).
pub(crate) const AMD_ARCHS: [&str; 3] = ["gfx90a", "gfx942", "gfx950"];
/// The NVIDIA architectures checked (those of the NVRTC compile test).
pub(crate) const NVIDIA_ARCHS: [&str; 3] = ["sm_80", "sm_90", "sm_100"];
/// Fewest 16-byte global loads (AMD) / PTX 128-bit global loads and stores (NVIDIA) per
/// architecture: the compile tests' threshold (six kernels with hot loops, three dtypes).
const MIN_WIDE_ACCESSES: usize = 18;

/// What `cargo xtask kernels` was asked to do beyond compiling and checking (which it always does).
pub(crate) struct Options {
    pub(crate) report: bool,
    pub(crate) emit: Option<PathBuf>,
}

// ---- parsers ----------------------------------------------------------------------------------

/// One AMD kernel's resource use, from the code object's `NT_AMDGPU_METADATA` note.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct AmdKernel {
    pub(crate) name: String,
    pub(crate) vgpr: u64,
    pub(crate) agpr: u64,
    pub(crate) sgpr: u64,
    pub(crate) vgpr_spill: u64,
    pub(crate) sgpr_spill: u64,
    /// `.private_segment_fixed_size`: scratch bytes per work-item.
    pub(crate) scratch: u64,
    /// `.group_segment_fixed_size`: LDS bytes per work-group.
    pub(crate) lds: u64,
    pub(crate) dynamic_stack: bool,
}

/// The kernels in `llvm-readelf --notes` output (the YAML of `amdhsa.kernels`), in file order.
pub(crate) fn parse_amd_notes(text: &str) -> Vec<AmdKernel> {
    let mut kernels: Vec<AmdKernel> = Vec::new();
    for line in text.lines() {
        // A kernel entry starts with `  - .` at the list's indentation (`.args` entries are deeper).
        if line.starts_with("  - .") {
            kernels.push(AmdKernel::default());
        }
        let Some(kernel) = kernels.last_mut() else { continue };
        let entry = line.trim_start_matches([' ', '-']);
        let Some((key, value)) = entry.split_once(':') else { continue };
        let value = value.trim();
        let number = || value.parse::<u64>().unwrap_or(0);
        match key {
            ".name" => kernel.name = value.to_string(),
            ".vgpr_count" => kernel.vgpr = number(),
            ".agpr_count" => kernel.agpr = number(),
            ".sgpr_count" => kernel.sgpr = number(),
            ".vgpr_spill_count" => kernel.vgpr_spill = number(),
            ".sgpr_spill_count" => kernel.sgpr_spill = number(),
            ".private_segment_fixed_size" => kernel.scratch = number(),
            ".group_segment_fixed_size" => kernel.lds = number(),
            ".uses_dynamic_stack" => kernel.dynamic_stack = value == "true",
            _ => {}
        }
        if line.starts_with("amdhsa.") && !line.starts_with("amdhsa.kernels") {
            break;
        }
    }
    kernels.retain(|k| !k.name.is_empty());
    kernels
}

/// Counts of `needles` per function in a disassembly: `llvm-objdump -d` (functions start at
/// `<hex> <name>:`) or `nvdisasm` (at `//----- .text.<name> -----`). An instruction counts when one
/// of its whitespace-separated words is a needle, or starts with the needle followed by a `.`
/// (so `LDG.E.128` counts `LDG.E.128.STRONG.SYS`, and `global_load_dwordx4` not `s_load_dwordx4`).
pub(crate) fn count_per_function(disassembly: &str, needles: &[&str]) -> BTreeMap<String, Vec<usize>> {
    let mut counts: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut current = String::from("(before any function)");
    for line in disassembly.lines() {
        if let Some(name) = function_header(line) {
            current = name.to_string();
            counts.entry(current.clone()).or_insert_with(|| vec![0; needles.len()]);
            continue;
        }
        let code = line.split("//").next().unwrap_or_default();
        for word in code.split_whitespace() {
            for (i, needle) in needles.iter().enumerate() {
                if word == *needle || word.strip_prefix(needle).is_some_and(|rest| rest.starts_with('.')) {
                    counts.entry(current.clone()).or_insert_with(|| vec![0; needles.len()])[i] += 1;
                }
            }
        }
    }
    counts
}

fn function_header(line: &str) -> Option<&str> {
    if let Some(rest) = line.strip_prefix("//") {
        let rest = rest.trim_start_matches('-').trim_start();
        return rest.strip_prefix(".text.").map(|r| r.split_whitespace().next().unwrap_or_default());
    }
    let (address, rest) = line.split_once(' ')?;
    if address.is_empty() || !address.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    rest.strip_prefix('<')?.strip_suffix(">:")
}

/// One NVIDIA kernel's resource use, from ptxas's `-v` log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NvidiaKernel {
    pub(crate) name: String,
    pub(crate) registers: u64,
    pub(crate) stack_frame: u64,
    pub(crate) spill_stores: u64,
    pub(crate) spill_loads: u64,
    pub(crate) shared: u64,
}

/// The entry functions in a ptxas `-v` log, in log order.
pub(crate) fn parse_ptxas_log(log: &str) -> Vec<NvidiaKernel> {
    let mut kernels: Vec<NvidiaKernel> = Vec::new();
    // `12 bytes smem` → 12 for `smem`.
    let amount = |text: &str, unit: &str| -> Option<u64> {
        text.split(',')
            .find_map(|part| part.trim().strip_suffix(unit)?.trim().strip_suffix("bytes")?.trim().parse().ok())
    };
    for line in log.lines() {
        let info = line.trim_start_matches("ptxas").trim_start_matches(" info").trim_start_matches([' ', ':', '.']);
        if let Some(rest) = info.strip_prefix("Compiling entry function '") {
            let name = rest.split('\'').next().unwrap_or_default();
            kernels.push(NvidiaKernel { name: name.to_string(), ..NvidiaKernel::default() });
            continue;
        }
        let Some(kernel) = kernels.last_mut() else { continue };
        if info.contains("bytes stack frame") {
            kernel.stack_frame = amount(info, "stack frame").unwrap_or(0);
            kernel.spill_stores = amount(info, "spill stores").unwrap_or(0);
            kernel.spill_loads = amount(info, "spill loads").unwrap_or(0);
        } else if let Some(rest) = info.strip_prefix("Used ") {
            kernel.registers = rest.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
            kernel.shared = amount(rest, "smem").unwrap_or(0);
        }
    }
    kernels
}

// ---- the command ------------------------------------------------------------------------------

/// A program: the first candidate whose `--version` runs.
fn find_tool(candidates: &[String]) -> Option<String> {
    candidates
        .iter()
        .find(|c| Command::new(c.as_str()).arg("--version").output().is_ok_and(|o| o.status.success()))
        .cloned()
}

/// `$ROCM_PATH/llvm/bin/<name>` (else `/opt/rocm`), then `<name>-22` on the path: as the compile test.
fn llvm_tool(name: &str) -> Option<String> {
    let rocm = std::env::var("ROCM_PATH").unwrap_or_else(|_| "/opt/rocm".into());
    find_tool(&[format!("{rocm}/llvm/bin/{name}"), format!("{name}-22")])
}

/// `$NVDISASM`, `nvdisasm` on the path, then under `$CUDA_PATH` (else `/usr/local/cuda`).
fn nvdisasm() -> Option<String> {
    let cuda = std::env::var("CUDA_PATH").unwrap_or_else(|_| "/usr/local/cuda".into());
    let mut candidates: Vec<String> = std::env::var("NVDISASM").into_iter().collect();
    candidates.extend(["nvdisasm".to_string(), format!("{cuda}/bin/nvdisasm")]);
    find_tool(&candidates)
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().trim().to_string()
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
}

/// Runs `cargo xtask kernels`; every failure is collected, printed, and makes it fail at the end.
pub(crate) fn run(sh: &Shell, root: &Path, options: &Options) -> Result<()> {
    let work = std::env::temp_dir().join(format!("arfuse-xtask-kernels-{}", std::process::id()));
    let result = run_in(sh, root, options, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run_in(sh: &Shell, root: &Path, options: &Options, work: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work.join("amd"))?;
    let (amd_list, nvidia_list) = (AMD_ARCHS.join(","), NVIDIA_ARCHS.join(","));
    let verbose = options.report.then_some("--ptxas-verbose");
    eprintln!("kernels: the source and NVRTC images (cargo run -p arfuse-kernels --example kernels-tool)");
    {
        let _dir = sh.push_dir(root);
        cmd!(
            sh,
            "cargo run --quiet -p arfuse-kernels --example kernels-tool -- {work} --amd {amd_list} --nvidia {nvidia_list} {verbose...}"
        )
        .run()
        .context("kernels-tool (the kernels crate's half of this command) failed")?;
    }
    let tool: Value = serde_json::from_str(&std::fs::read_to_string(work.join("tool.json"))?)?;
    let source_hash = tool["source_hash"].as_str().unwrap_or_default().to_string();
    let symbols = strings(&tool["symbols"]);
    let mut failures: Vec<String> = Vec::new();
    let mut out = String::new();
    let mut manifest: Vec<Value> = Vec::new();

    // AMD.
    let clang = llvm_tool("clang++");
    let readelf = llvm_tool("llvm-readelf");
    let objdump = llvm_tool("llvm-objdump");
    let (Some(clang), Some(readelf), Some(objdump)) = (clang, readelf, objdump) else {
        failures.push(
            "AMD: clang++-22, llvm-readelf-22 or llvm-objdump-22 not found \
             (apt-get install -y --no-install-recommends clang-22 lld-22 llvm-22)"
                .into(),
        );
        return finish(options, &mut out, &failures, &source_hash, work, &manifest);
    };
    let clang_version = first_line(&sh.cmd(&clang).arg("--version").read().unwrap_or_default());
    for entry in tool["amd"].as_array().into_iter().flatten() {
        let arch = entry["arch"].as_str().unwrap_or_default();
        eprintln!("kernels: {clang} {arch} ...");
        let object = work.join("amd").join(format!("{arch}.hsaco"));
        let compiled = Command::new(&clang)
            .args(strings(&entry["clang_args"]))
            .arg("-o")
            .arg(&object)
            .arg(work.join("arfuse.hip"))
            .output()
            .with_context(|| format!("running {clang}"))?;
        let log = String::from_utf8_lossy(&compiled.stderr).into_owned();
        if !compiled.status.success() {
            failures.push(format!("{arch}: {clang} failed:\n{log}"));
            continue;
        }
        if log.contains("warning:") {
            failures.push(format!("{arch}: {clang} warned (the compile test uses -Werror):\n{log}"));
        }
        let dis = sh.cmd(&objdump).arg("-d").arg(&object).read()?;
        let counts = count_per_function(&dis, &["global_load_dwordx4", "flat_load_dwordx4"]);
        let total = |i: usize| counts.values().map(|c| c[i]).sum::<usize>();
        let (global, flat) = (total(0), total(1));
        for symbol in symbols.iter().filter(|s| !counts.contains_key(s.as_str())) {
            failures.push(format!("{arch}: no kernel {symbol} in the code object"));
        }
        if global < MIN_WIDE_ACCESSES {
            failures.push(format!(
                "{arch}: {global} global_load_dwordx4 (< {MIN_WIDE_ACCESSES}): the hot loops do not use 16-byte global loads"
            ));
        }
        if flat > 0 {
            failures.push(format!("{arch}: {flat} flat_load_dwordx4: peer loads went through the flat address space"));
        }
        eprintln!("kernels: {arch}: {global} global_load_dwordx4, {flat} flat_load_dwordx4");
        if options.report {
            let notes = parse_amd_notes(&sh.cmd(&readelf).arg("--notes").arg(&object).read()?);
            amd_table(&mut out, arch, &clang_version, &notes, &counts, global, flat);
        }
        if options.emit.is_some() {
            let file = entry["offline_image"].as_str().unwrap_or_default().to_string();
            manifest.push(json!({
                "vendor": "amd", "arch": arch, "kind": "hsaco", "file": file, "from": object,
                "source_hash": source_hash, "compiler": "clang", "compiler_version": clang_version,
                "options": strings(&entry["clang_args"]),
            }));
        }
    }

    // NVIDIA.
    if let Some(error) = tool["nvrtc"]["error"].as_str() {
        failures.push(format!(
            "NVIDIA: {error} (pip install --target DIR nvidia-cuda-nvrtc==13.0.88 and set LD_LIBRARY_PATH to DIR/nvidia/cu13/lib)"
        ));
        return finish(options, &mut out, &failures, &source_hash, work, &manifest);
    }
    let nvrtc_version = tool["nvrtc"]["version"].as_str().unwrap_or_default().to_string();
    let disassembler = nvdisasm();
    if options.report {
        match &disassembler {
            Some(tool) => {
                let _ = writeln!(out, "\nSASS by {}", first_line_matching(sh, tool, "release"));
            }
            None => {
                let note = "SASS NOT CHECKED: nvdisasm not found (set NVDISASM, or pip install \
                            nvidia-cuda-nvdisasm); the LDG.E.128 / LD.E.128 columns say n/a";
                eprintln!("kernels: {note}");
                let _ = writeln!(out, "\n{note}");
            }
        }
    }
    for entry in tool["nvidia"].as_array().into_iter().flatten() {
        let arch = entry["arch"].as_str().unwrap_or_default();
        if let Some(error) = entry["error"].as_str() {
            failures.push(format!("{arch}: NVRTC {nvrtc_version} failed:\n{error}"));
            continue;
        }
        let cubin_file = work.join(entry["cubin"].as_str().unwrap_or_default());
        let ptx_file = work.join(entry["ptx"].as_str().unwrap_or_default());
        let cubin = std::fs::read(&cubin_file)?;
        for symbol in &symbols {
            if !cubin.windows(symbol.len()).any(|w| w == symbol.as_bytes()) {
                failures.push(format!("{arch}: no kernel {symbol} in the CUBIN"));
            }
        }
        let ptx = std::fs::read_to_string(&ptx_file)?;
        let (loads, stores) = (ptx.matches("ld.global.v4.u32").count(), ptx.matches("st.global.v4.u32").count());
        if loads < MIN_WIDE_ACCESSES || stores < MIN_WIDE_ACCESSES {
            failures.push(format!(
                "{arch}: the PTX has {loads} ld.global.v4.u32 and {stores} st.global.v4.u32 (< {MIN_WIDE_ACCESSES}): \
                 the hot loops are not 16-byte global accesses"
            ));
        }
        eprintln!("kernels: {arch}: PTX {loads} ld.global.v4.u32, {stores} st.global.v4.u32");
        if options.report {
            let sass = match &disassembler {
                Some(tool) => match sh.cmd(tool).arg("-c").arg(&cubin_file).read() {
                    Ok(text) => Some(count_per_function(&text, &["LDG.E.128", "LD.E.128"])),
                    Err(err) => {
                        failures.push(format!("{arch}: {tool} failed: {err}"));
                        None
                    }
                },
                None => None,
            };
            let kernels = parse_ptxas_log(entry["verbose_log"].as_str().unwrap_or_default());
            if kernels.is_empty() {
                failures.push(format!("{arch}: no ptxas -v output in NVRTC's log"));
            }
            nvidia_table(&mut out, arch, &nvrtc_version, &kernels, sass.as_ref(), loads, stores);
        }
        if options.emit.is_some() {
            let virtual_arch = arch.replace("sm_", "compute_");
            for (kind, target, from, options) in [
                ("cubin", arch.to_string(), cubin_file.clone(), strings(&entry["options"])),
                ("ptx", virtual_arch.clone(), ptx_file.clone(), strings(&entry["ptx_options"])),
            ] {
                manifest.push(json!({
                    "vendor": "nvidia", "arch": target, "kind": kind,
                    "file": format!("{target}/arfuse-{source_hash}.{kind}"), "from": from,
                    "source_hash": source_hash, "compiler": "nvrtc", "compiler_version": nvrtc_version,
                    "options": options,
                }));
            }
        }
    }
    finish(options, &mut out, &failures, &source_hash, work, &manifest)
}

fn first_line_matching(sh: &Shell, tool: &str, word: &str) -> String {
    let text = sh.cmd(tool).arg("--version").read().unwrap_or_default();
    let line = text.lines().find(|l| l.contains(word)).map(str::trim).unwrap_or_default();
    format!("{tool} ({line})")
}

/// Prints the report, writes the emitted images and manifest, fails if anything failed.
fn finish(
    options: &Options,
    out: &mut String,
    failures: &[String],
    source_hash: &str,
    work: &Path,
    manifest: &[Value],
) -> Result<()> {
    if options.report {
        print!("{out}");
    }
    if let Some(dir) = &options.emit {
        for image in manifest {
            let to = dir.join(image["file"].as_str().unwrap_or_default());
            let from = PathBuf::from(image["from"].as_str().unwrap_or_default());
            std::fs::create_dir_all(to.parent().unwrap_or(dir))?;
            std::fs::copy(&from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
        let images: Vec<Value> = manifest
            .iter()
            .map(|image| {
                let mut image = image.clone();
                if let Some(map) = image.as_object_mut() {
                    map.remove("from");
                }
                image
            })
            .collect();
        let text = serde_json::to_string_pretty(&json!({ "source_hash": source_hash, "images": images }))?;
        std::fs::write(dir.join("manifest.json"), text + "\n")?;
        std::fs::copy(work.join("arfuse.hip"), dir.join(format!("arfuse-{source_hash}.hip")))?;
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        eprintln!(
            "kernels: {} images and manifest.json in {dir} (for the hip backend: ARFUSE_KERNEL_DIR={dir})",
            images.len(),
            dir = dir.display()
        );
    }
    if !failures.is_empty() {
        for failure in failures {
            eprintln!("kernels: FAILED {failure}");
        }
        bail!("{} kernel check(s) failed (source {source_hash})", failures.len());
    }
    eprintln!("kernels: every check passed (source {source_hash})");
    Ok(())
}

fn amd_table(
    out: &mut String,
    arch: &str,
    compiler: &str,
    notes: &[AmdKernel],
    counts: &BTreeMap<String, Vec<usize>>,
    global: usize,
    flat: usize,
) {
    let _ = writeln!(
        out,
        "\n{arch} ({compiler}): {global} global_load_dwordx4 (>= {MIN_WIDE_ACCESSES}), {flat} flat_load_dwordx4 (= 0)"
    );
    let _ = writeln!(
        out,
        "{:<30} {:>5} {:>5} {:>5} {:>11} {:>8} {:>6} {:>7} {:>7}",
        "kernel", "VGPR", "AGPR", "SGPR", "spill v/s", "scratch", "LDS", "gld_x4", "flat_x4"
    );
    for k in notes {
        let c = counts.get(&k.name).cloned().unwrap_or_else(|| vec![0, 0]);
        let scratch = if k.dynamic_stack { format!("{}+dyn", k.scratch) } else { k.scratch.to_string() };
        let _ = writeln!(
            out,
            "{:<30} {:>5} {:>5} {:>5} {:>11} {:>8} {:>6} {:>7} {:>7}",
            k.name,
            k.vgpr,
            k.agpr,
            k.sgpr,
            format!("{}/{}", k.vgpr_spill, k.sgpr_spill),
            scratch,
            k.lds,
            c[0],
            c[1]
        );
    }
    let helpers: Vec<usize> = counts
        .iter()
        .filter(|(name, _)| !notes.iter().any(|k| &k.name == *name))
        .fold(vec![0, 0], |acc, (_, c)| vec![acc[0] + c[0], acc[1] + c[1]]);
    if helpers.iter().any(|&n| n > 0) {
        let _ = writeln!(
            out,
            "{:<30} {:>5} {:>5} {:>5} {:>11} {:>8} {:>6} {:>7} {:>7}",
            "(non-kernel functions)", "", "", "", "", "", "", helpers[0], helpers[1]
        );
    }
}

fn nvidia_table(
    out: &mut String,
    arch: &str,
    nvrtc: &str,
    kernels: &[NvidiaKernel],
    sass: Option<&BTreeMap<String, Vec<usize>>>,
    loads: usize,
    stores: usize,
) {
    let _ = writeln!(
        out,
        "\n{arch} (NVRTC {nvrtc}, ptxas -v): PTX {loads} ld.global.v4.u32, {stores} st.global.v4.u32 (>= {MIN_WIDE_ACCESSES})"
    );
    let _ = writeln!(
        out,
        "{:<30} {:>5} {:>12} {:>6} {:>6} {:>10} {:>9}",
        "kernel", "regs", "spill st/ld", "stack", "smem", "LDG.E.128", "LD.E.128"
    );
    for k in kernels {
        let (ldg, ld) = match sass {
            Some(counts) => {
                let c = counts.get(&k.name).cloned().unwrap_or_else(|| vec![0, 0]);
                (c[0].to_string(), c[1].to_string())
            }
            None => ("n/a".to_string(), "n/a".to_string()),
        };
        let _ = writeln!(
            out,
            "{:<30} {:>5} {:>12} {:>6} {:>6} {:>10} {:>9}",
            k.name,
            k.registers,
            format!("{}/{}", k.spill_stores, k.spill_loads),
            k.stack_frame,
            k.shared,
            ldg,
            ld
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real output of this project's compilers (Debian clang 22.1.8, NVRTC 13.0, nvdisasm 13.2),
    // trimmed to a few kernels or lines each (see each file).

    #[test]
    fn amd_notes_give_registers_spills_scratch_and_lds() {
        let kernels = parse_amd_notes(include_str!("fixtures/readelf-notes-gfx942.txt"));
        assert_eq!(kernels.len(), 2, "{kernels:?}");
        assert_eq!(
            kernels[0],
            AmdKernel {
                name: "fused_ar_rmsnorm_1stage_bf16".into(),
                vgpr: 64,
                agpr: 0,
                sgpr: 61,
                vgpr_spill: 0,
                sgpr_spill: 0,
                scratch: 288,
                lds: 16388,
                dynamic_stack: false,
            }
        );
        assert_eq!((kernels[1].name.as_str(), kernels[1].vgpr, kernels[1].sgpr), ("reduce_scatter_bf16", 72, 86));
        assert_eq!((kernels[1].scratch, kernels[1].lds), (288, 4));
    }

    #[test]
    fn ptxas_log_gives_registers_spills_stack_and_smem() {
        let kernels = parse_ptxas_log(include_str!("fixtures/ptxas-v-sm_80.txt"));
        let names: Vec<&str> = kernels.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["add_rmsnorm_f32", "allgather_f32", "allreduce_1stage_f32", "scratch_add_rmsnorm_f32"]);
        assert_eq!(
            kernels[0],
            NvidiaKernel {
                name: "add_rmsnorm_f32".into(),
                registers: 42,
                stack_frame: 0,
                spill_stores: 0,
                spill_loads: 0,
                shared: 16384
            }
        );
        assert_eq!((kernels[1].registers, kernels[1].shared), (14, 0));
        assert_eq!(
            kernels[2],
            NvidiaKernel {
                name: "allreduce_1stage_f32".into(),
                registers: 32,
                stack_frame: 288,
                spill_stores: 8,
                spill_loads: 16,
                shared: 4
            }
        );
    }

    #[test]
    fn objdump_loads_are_counted_per_function() {
        let counts = count_per_function(
            include_str!("fixtures/objdump-gfx942.txt"),
            &["global_load_dwordx4", "flat_load_dwordx4"],
        );
        assert_eq!(counts["fused_ar_rmsnorm_1stage_bf16"], [3, 0]);
        assert_eq!(counts["allgather_bf16"], [1, 0]);
        assert_eq!(counts["fused_ar_rmsnorm_1stage_f16"], [1, 0]);
        assert_eq!(counts["_Z8norm_rowI3F16Z12fused_1stageIS0_EbRK12LaunchParamsEUlyE_EvS4_jT0_"], [3, 0]);
        assert_eq!(counts.values().map(|c| c[0]).sum::<usize>(), 20);
        // Scalar `s_load_dwordx4` and the encoding comments do not count.
        assert_eq!(
            count_per_function(
                "0 <k>:\n\ts_load_dwordx4 s[16:19], s[2:3], 0x100 // global_load_dwordx4",
                &["global_load_dwordx4"]
            )["k"],
            [0]
        );
        assert_eq!(count_per_function("0 <k>:\n\tflat_load_dwordx4 v[2:5], v[2:3]", &["flat_load_dwordx4"])["k"], [1]);
    }

    #[test]
    fn sass_loads_are_counted_per_function() {
        let counts = count_per_function(include_str!("fixtures/nvdisasm-sm_90.txt"), &["LDG.E.128", "LD.E.128"]);
        assert_eq!(counts["add_rmsnorm_f32"], [3, 0]);
        assert_eq!(counts["allgather_f32"], [1, 0]);
        // 64-bit system-scope flag loads are not 16-byte loads; the peer load is generic `LD.E.128`.
        assert_eq!(counts["allreduce_1stage_f32"], [0, 1]);
        assert_eq!(counts["scratch_add_rmsnorm_f32"], [3, 0]);
        let strong =
            count_per_function("//--- .text.k ---\n  LDG.E.128.STRONG.SYS R4, desc[UR4][R2.64] ;", &["LDG.E.128"]);
        assert_eq!(strong["k"], [1]);
    }
}
