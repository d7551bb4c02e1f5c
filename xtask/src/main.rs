//! `cargo xtask`: the project's automation, in Rust (matklad's xtask pattern).
//!
//! Every cargo command it runs is echoed, so a user can rerun it by hand.

mod kernels;
mod tidy;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use xshell::{cmd, Shell};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "arfuse project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the demo: every path on the GPUs (cuda, else hip, where one works) or on rank processes
    /// of the cpu backend, a table of time / max ulp / bit-exactness. On a ROCm host the hip
    /// backend is built in too.
    Demo {
        /// Arguments passed to `arfuse-demo` (see `cargo xtask demo -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the test suite: workspace tests (snapshots checked, never updated), kernel compile
    /// checks where the compilers are installed, tidy.
    Test {
        /// Fail instead of skipping when these backends/compilers are missing (e.g. `cuda,nvrtc,clang`).
        #[arg(long, value_delimiter = ',')]
        require: Vec<String>,
        /// Also build and test the `hip` feature (needs libamdhip64; HIP_PATH defaults to /usr).
        #[arg(long)]
        hip: bool,
    },
    /// Compile the kernels without a GPU for gfx90a/gfx942/gfx950 (clang-22) and sm_80/sm_90/sm_100
    /// (NVRTC 13.0), check them (symbols, 16-byte global loads); optionally report and emit.
    ///
    /// Every mode compiles and checks; with no flag, `--check` is meant. Exits non-zero on any
    /// failure, naming the architecture and the compiler's log.
    Kernels {
        /// Compile for every architecture and check (the compile tests' rules).
        #[arg(long)]
        check: bool,
        /// Also print per kernel and architecture: registers, spills, scratch/stack, shared
        /// memory, 16-byte load counts (AMD: code-object metadata and ISA; NVIDIA: ptxas -v and,
        /// where nvdisasm is installed, SASS).
        #[arg(long)]
        report: bool,
        /// Also write the AMD code objects, NVIDIA CUBINs and PTX and a manifest.json into DIR
        /// (AMD: DIR is what the hip backend's ARFUSE_KERNEL_DIR takes).
        #[arg(long, value_name = "DIR")]
        emit: Option<PathBuf>,
    },
    /// Everything CI checks: fmt, clippy (default and hip features), docs, then `test`.
    Ci,
    /// Build the test binaries and bench/demo binaries (release) into one folder with a run script.
    Bundle {
        /// Output folder.
        #[arg(long, default_value = "bundle")]
        out: PathBuf,
    },
    /// Measure the 1-stage/2-stage crossover on this host and write the dispatcher's table
    /// (`arfuse-bench --tune-out`; use it with `ARFUSE_TUNE_FILE`). Arguments go to arfuse-bench.
    Tune {
        /// The table to write or update.
        #[arg(long, default_value = "target/arfuse-tune.txt")]
        out: PathBuf,
        /// Arguments passed to `arfuse-bench` (e.g. `--world 4`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the fused-vs-unfused tables and plots (arguments passed to `arfuse-bench`;
    /// `-- --plot FILE.json` redraws the plots of a report).
    Bench {
        /// Arguments passed to `arfuse-bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let sh = Shell::new()?;
    sh.change_dir(project_root());
    match cli.command {
        Command::Demo { args } => {
            if rocm_host() && hip_available() {
                // The default features (cuda, loaded at run time) plus the hip backend, so that
                // `--backend auto` finds whichever GPU this host has.
                let _env = sh.push_env("HIP_PATH", hip_path());
                let feature = hip_feature();
                cmd!(sh, "cargo run --release -p arfuse-bench --features {feature} --bin arfuse-demo -- {args...}")
                    .run()?;
            } else {
                cmd!(sh, "cargo run --release -p arfuse-bench --bin arfuse-demo -- {args...}").run()?;
            }
        }
        Command::Test { require, hip } => test(&sh, &require, hip)?,
        Command::Ci => {
            cmd!(sh, "cargo fmt --all -- --check").run()?;
            cmd!(sh, "cargo clippy --workspace --all-targets -- -D warnings").run()?;
            if hip_available() {
                let _env = sh.push_env("HIP_PATH", hip_path());
                cmd!(
                    sh,
                    "cargo clippy -p arfuse-kernels --no-default-features --features hip --all-targets -- -D warnings"
                )
                .run()?;
            }
            {
                let _env = sh.push_env("RUSTDOCFLAGS", "-D warnings");
                cmd!(sh, "cargo doc --workspace --no-deps").run()?;
            }
            test(&sh, &[], hip_available())?;
        }
        Command::Bundle { out } => bundle(&sh, &out)?,
        // `--check` is what every mode does; the flag only spells it out.
        Command::Kernels { check: _, report, emit } => {
            let emit = emit.map(|dir| std::env::current_dir().unwrap_or_default().join(dir));
            kernels::run(&sh, &project_root(), &kernels::Options { report, emit })?;
        }
        Command::Tune { out, args } => {
            let out = std::env::current_dir().unwrap_or_default().join(out);
            cmd!(sh, "cargo run --release -p arfuse-bench --bin arfuse-bench -- --tune-out {out} {args...}").run()?;
        }
        Command::Bench { args } => {
            cmd!(sh, "cargo run --release -p arfuse-bench --bin arfuse-bench -- {args...}").run()?;
        }
    }
    Ok(())
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(1).map(Path::to_path_buf).unwrap_or_default()
}

fn hip_path() -> String {
    std::env::var("HIP_PATH").or_else(|_| std::env::var("ROCM_PATH")).unwrap_or_else(|_| {
        if Path::new("/opt/rocm/include/hip/hip_runtime_api.h").exists() {
            "/opt/rocm".into()
        } else {
            "/usr".into()
        }
    })
}

fn hip_available() -> bool {
    Path::new(&hip_path()).join("include/hip/hip_runtime_api.h").exists()
}

/// A ROCm installation (not just Debian's HIP headers): `ROCM_PATH` set, or `/opt/rocm`.
fn rocm_host() -> bool {
    std::env::var_os("ROCM_PATH").is_some() || Path::new("/opt/rocm/include/hip/hip_runtime_api.h").exists()
}

/// `HIP_VERSION_MAJOR` of the headers under `hip_path()`.
fn hip_version_major() -> Option<u32> {
    parse_hip_version_major(&std::fs::read_to_string(Path::new(&hip_path()).join("include/hip/hip_version.h")).ok()?)
}

fn parse_hip_version_major(header: &str) -> Option<u32> {
    header.lines().find_map(|line| line.strip_prefix("#define HIP_VERSION_MAJOR")?.trim().parse().ok())
}

/// The cargo feature that builds the hip backend here: `hip-bindgen` (bindings generated from the
/// host's own headers) from HIP 6 on, whose ABI differs from the 5.4 bindings `hip-runtime-sys`
/// ships; `hip` for HIP 5.
fn hip_feature() -> &'static str {
    match hip_version_major() {
        Some(major) if major >= 6 => "hip-bindgen",
        _ => "hip",
    }
}

fn test(sh: &Shell, require: &[String], hip: bool) -> Result<()> {
    // Snapshots are checked, never written, by the test command.
    let _insta = sh.push_env("INSTA_UPDATE", "no");
    let _force = sh.push_env("INSTA_FORCE_PASS", "0");
    let required = require.join(",");
    let _req = sh.push_env("ARFUSE_REQUIRE_BACKENDS", &required);
    let _req_c = sh.push_env("ARFUSE_REQUIRE_COMPILERS", &required);
    eprintln!("$ cargo test --workspace (ARFUSE_REQUIRE_BACKENDS={required:?})");
    cmd!(sh, "cargo test --workspace --all-targets").run().context("workspace tests")?;
    // `--all-targets` leaves the documentation's examples out.
    cmd!(sh, "cargo test --workspace --doc").run().context("doctests")?;
    // On a ROCm host the hip backend's tests run without being asked for.
    let hip = hip || (rocm_host() && hip_available());
    if hip {
        if !hip_available() {
            bail!("--hip given but no include/hip/hip_runtime_api.h under {}", hip_path());
        }
        let _env = sh.push_env("HIP_PATH", hip_path());
        let feature = hip_feature();
        eprintln!("$ hip backend: HIP {:?} under {} -> feature {feature}", hip_version_major(), hip_path());
        cmd!(sh, "cargo test -p arfuse-kernels --no-default-features --features {feature}")
            .run()
            .context("hip feature")?;
        // The operator's GPU suite instantiated for HIP (its CPU tests ran above, with the workspace).
        cmd!(sh, "cargo test -p arfuse-fusion --no-default-features --features {feature} --test gpu")
            .run()
            .context("hip feature, operator")?;
    }
    cmd!(sh, "cargo test -p xtask").run().context("tidy")?;
    Ok(())
}

fn bundle(sh: &Shell, out: &Path) -> Result<()> {
    let out = project_root().join(out);
    sh.remove_path(&out)?;
    sh.create_dir(&out)?;
    let messages = cmd!(sh, "cargo test --release --workspace --no-run --message-format=json").read()?;
    let tests = test_executables(&messages)?;
    cmd!(sh, "cargo build --release -p arfuse-bench --bins").run()?;
    // The graph-captured decode example, whose cudarc graph path only a GPU host runs.
    cmd!(sh, "cargo build --release -p arfuse-fusion --example 03-graph-decode").run()?;
    let mut names = Vec::new();
    for (name, exe) in &tests {
        sh.copy_file(exe, out.join(name))?;
        names.push(name.clone());
    }
    let target = project_root().join("target/release");
    for bin in ["arfuse-demo", "arfuse-bench", "examples/03-graph-decode"] {
        let name = bin.rsplit('/').next().unwrap_or(bin);
        sh.copy_file(target.join(bin), out.join(name))?;
    }
    sh.create_dir(out.join("peers"))?;
    sh.copy_file(project_root().join("crates/bench/peers/peers.py"), out.join("peers/peers.py"))?;
    sh.write_file(out.join("tests.txt"), names.join("\n") + "\n")?;
    for (script, text) in [
        ("run-tests.sh", include_str!("bundle/run-tests.sh")),
        ("run-bench.sh", include_str!("bundle/run-bench.sh")),
        ("run-demo.sh", include_str!("bundle/run-demo.sh")),
        ("nvrtc.sh", include_str!("bundle/nvrtc.sh")),
    ] {
        let path = out.join(script);
        sh.write_file(&path, text)?;
        cmd!(sh, "chmod +x {path}").run()?;
    }
    eprintln!(
        "bundle: {} test binaries, arfuse-bench, arfuse-demo, the 03-graph-decode example and the peers script in {}",
        names.len(),
        out.display()
    );
    Ok(())
}

/// `(package-target name, path)` of every test executable in cargo's JSON messages.
fn test_executables(messages: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut tests = Vec::new();
    for line in messages.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(exe), Some(true)) = (msg["executable"].as_str(), msg["profile"]["test"].as_bool()) else { continue };
        // "path+file:///…/crates/kernels#arfuse-kernels@0.1.0", or "…/xtask#0.1.0" when the name is the folder's.
        let id = msg["package_id"].as_str().unwrap_or("unknown");
        let (url, fragment) = id.rsplit_once('#').unwrap_or((id, ""));
        let package = match fragment.split_once('@') {
            Some((name, _)) => name,
            None => url.rsplit('/').next().unwrap_or("unknown"),
        };
        let target = msg["target"]["name"].as_str().context("test target without a name")?;
        let kind = msg["target"]["kind"][0].as_str().unwrap_or("test");
        let name = if kind == "lib" || target == package.replace('-', "_") {
            format!("{package}-unit")
        } else {
            format!("{package}-{target}")
        };
        tests.push((name, PathBuf::from(exe)));
    }
    if tests.is_empty() {
        bail!("cargo listed no test executables");
    }
    Ok(tests)
}

#[cfg(test)]
mod hip_version_tests {
    #[test]
    fn the_major_version_is_read_from_hip_version_h() {
        let rocm6 = "// Auto-generated\n#define HIP_VERSION_MAJOR 6\n#define HIP_VERSION_MINOR 4\n";
        assert_eq!(super::parse_hip_version_major(rocm6), Some(6));
        assert_eq!(super::parse_hip_version_major("#define HIP_VERSION_MAJORX 6\n"), None);
        assert_eq!(super::parse_hip_version_major(""), None);
    }
}
