//! `arfuse-bench`: fused vs unfused per shape, decode graph-captured and prefill eager (what
//! `cargo xtask bench` runs).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    arfuse_bench::bench::main(arfuse_bench::bench::BenchArgs::parse())
}
