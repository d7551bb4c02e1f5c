//! `peers/peers.py --self-check`: its CPU-safe parts (the `--fp8` spec read from an arfuse-bench
//! JSON, the merged tables and targets, and, where CPU torch is installed, the FP8 quantisation it
//! times against the contract's codes) run on any machine with python3. Without python3 the test
//! says so and passes (the script only runs on the GPU machine, which has it).

use std::process::Command;

#[test]
fn peers_script_self_check_passes() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/peers.py");
    let output = match Command::new("python3").arg(script).arg("--self-check").output() {
        Ok(output) => output,
        Err(e) => {
            println!("SKIP: no python3 to run {script}: {e}");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "peers.py --self-check failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("self-check: ok"), "{stdout}");
    assert!(stdout.matches("  ok   ").count() >= 8, "fewer checks than written:\n{stdout}");
}
