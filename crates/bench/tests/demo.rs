//! The demo binary end to end: 3 rank processes, every path, exact, safetensors dumps readable.

use std::process::Command;

#[test]
fn demo_runs_every_path_exactly_and_dumps() {
    let dump = std::env::temp_dir().join(format!("arfuse-demo-test-{}", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_arfuse-demo"))
        .args(["--world", "3", "--decode-tokens", "1,5", "--prefill-tokens", "40", "--hidden", "2880", "--iters", "2"])
        .arg("--dump")
        .arg(&dump)
        .output()
        .expect("run arfuse-demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    // 3 shapes x 4 paths, each one line ending in "yes".
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("decode") || l.starts_with("prefill")).collect();
    assert_eq!(rows.len(), 12, "{stdout}");
    assert!(rows.iter().all(|l| l.trim_end().ends_with("yes")), "{stdout}");
    for rank in 0..3 {
        let file = dump.join(format!("rank{rank}-40x2880-bf16.safetensors"));
        let bytes = std::fs::read(&file).expect("dump written");
        let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let out = tensors.tensor("out").expect("out tensor");
        assert_eq!(out.shape(), &[40, 2880]);
    }
    let _ = std::fs::remove_dir_all(&dump);
}
