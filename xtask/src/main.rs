//! `cargo xtask`: the project's automation, in Rust (matklad's xtask pattern).
//!
//! Every cargo command it runs is echoed, so a user can rerun it by hand.

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
    /// Run the demo: rank processes, every path, a table of time / max ulp / bit-exactness.
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
    /// Everything CI checks: fmt, clippy (default and hip features), docs, then `test`.
    Ci,
    /// Build the test binaries and bench/demo binaries (release) into one folder with a run script.
    Bundle {
        /// Output folder.
        #[arg(long, default_value = "bundle")]
        out: PathBuf,
    },
    /// Run the fused-vs-unfused tables (arguments passed to `arfuse-bench`).
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
            cmd!(sh, "cargo run --release -p arfuse-bench --bin arfuse-demo -- {args...}").run()?;
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

fn test(sh: &Shell, require: &[String], hip: bool) -> Result<()> {
    // Snapshots are checked, never written, by the test command.
    let _insta = sh.push_env("INSTA_UPDATE", "no");
    let _force = sh.push_env("INSTA_FORCE_PASS", "0");
    let required = require.join(",");
    let _req = sh.push_env("ARFUSE_REQUIRE_BACKENDS", &required);
    let _req_c = sh.push_env("ARFUSE_REQUIRE_COMPILERS", &required);
    eprintln!("$ cargo test --workspace (ARFUSE_REQUIRE_BACKENDS={required:?})");
    cmd!(sh, "cargo test --workspace --all-targets").run().context("workspace tests")?;
    if hip {
        if !hip_available() {
            bail!("--hip given but no include/hip/hip_runtime_api.h under {}", hip_path());
        }
        let _env = sh.push_env("HIP_PATH", hip_path());
        cmd!(sh, "cargo test -p arfuse-kernels --no-default-features --features hip").run().context("hip feature")?;
    }
    cmd!(sh, "cargo test -p xtask").run().context("tidy")?;
    Ok(())
}

fn bundle(sh: &Shell, out: &Path) -> Result<()> {
    let out = project_root().join(out);
    sh.remove_path(&out)?;
    sh.create_dir(&out)?;
    let messages = cmd!(sh, "cargo test --release --workspace --no-run --message-format=json").read()?;
    let mut tests = Vec::new();
    for line in messages.lines() {
        if !line.contains("\"executable\":\"") || !line.contains("\"test\":true") {
            continue;
        }
        if let Some(exe) = line.split("\"executable\":\"").nth(1).and_then(|s| s.split('"').next()) {
            tests.push(PathBuf::from(exe));
        }
    }
    cmd!(sh, "cargo build --release -p arfuse-bench --bins").run()?;
    let target = project_root().join("target/release");
    for exe in &tests {
        let name = exe.file_name().context("test executable without a name")?;
        sh.copy_file(exe, out.join(name))?;
    }
    for bin in ["arfuse-demo", "arfuse-bench"] {
        if target.join(bin).exists() {
            sh.copy_file(target.join(bin), out.join(bin))?;
        }
    }
    let mut script = String::from(
        "#!/usr/bin/env bash\n# Runs every bundled test binary; GPU tests fail (not skip) when ARFUSE_REQUIRE_BACKENDS names their backend.\nset -u\ncd \"$(dirname \"$0\")\"\nfail=0\nfor t in ",
    );
    for exe in &tests {
        if let Some(name) = exe.file_name().and_then(|n| n.to_str()) {
            script.push_str(name);
            script.push(' ');
        }
    }
    script.push_str("; do\n  echo \"== $t\"\n  ./$t --test-threads=1 \"$@\" || fail=1\ndone\nexit $fail\n");
    let run = out.join("run-tests.sh");
    sh.write_file(&run, script)?;
    cmd!(sh, "chmod +x {run}").run()?;
    eprintln!("bundle: {} test binaries + demo/bench in {}", tests.len(), out.display());
    Ok(())
}
