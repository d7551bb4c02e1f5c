//! `arfuse-demo`: ranks (threads on the GPUs where one works, else cpu rank processes) run decode-
//! and prefill-like shapes through every path, check each against the reference and print a table
//! (what `cargo xtask demo` runs).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    arfuse_bench::demo::main(arfuse_bench::demo::DemoArgs::parse())
}
