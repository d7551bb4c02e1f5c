//! The demo binary end to end: every path exact, the safetensors dumps checked by
//! `--verify-dump` (and a corrupted one refused), the backend choice (`auto` takes a working GPU
//! or says why it runs the cpu backend; an explicit GPU backend without a GPU is refused clearly).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// One demo at a time: on a GPU host each run puts its ranks on the same GPUs.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The binary cargo built, or (in a bundle from `cargo xtask bundle`, run on another machine) the
/// `arfuse-demo` beside this test executable.
fn demo_exe() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_arfuse-demo"));
    if built.exists() {
        return built;
    }
    let beside = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join("arfuse-demo")));
    beside.filter(|p| p.exists()).unwrap_or(built)
}

fn demo(args: &[&str], dump: Option<&Path>) -> Output {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut cmd = Command::new(demo_exe());
    cmd.args(args);
    if let Some(dir) = dump {
        cmd.arg("--dump").arg(dir);
    }
    cmd.output().expect("run arfuse-demo")
}

fn text(output: &Output) -> (String, String) {
    (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("arfuse-demo-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The table's rows: one per shape and path, each ending in "yes" when exact.
fn table_rows(stdout: &str) -> Vec<&str> {
    stdout.lines().filter(|l| l.starts_with("decode") || l.starts_with("prefill")).collect()
}

const SHAPES: [&str; 10] =
    ["--world", "3", "--decode-tokens", "1,5", "--prefill-tokens", "40", "--hidden", "2880", "--iters", "2"];

#[test]
fn demo_runs_every_path_exactly_and_dumps() {
    let dump = scratch("cpu");
    let output = demo(&[&SHAPES[..], &["--backend", "cpu"]].concat(), Some(&dump));
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("(cpu backend, rank processes over POSIX shm)"), "{stdout}");
    // 3 shapes x 4 paths, each one line ending in "yes".
    let rows = table_rows(&stdout);
    assert_eq!(rows.len(), 12, "{stdout}");
    assert!(rows.iter().all(|l| l.trim_end().ends_with("yes")), "{stdout}");
    for rank in 0..3 {
        let file = dump.join(format!("rank{rank}-40x2880-bf16.safetensors"));
        let bytes = std::fs::read(&file).expect("dump written");
        let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let out = tensors.tensor("out").expect("out tensor");
        assert_eq!(out.shape(), &[40, 2880]);
    }

    let verified = demo(&["--verify-dump", dump.to_str().expect("utf-8 path")], None);
    let (stdout, stderr) = text(&verified);
    assert!(verified.status.success(), "verify-dump failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(": 9 files, 3 shapes"), "{stdout}");

    // One bit of one element of rank 1's residual_out flipped.
    let victim = dump.join("rank1-5x2880-bf16.safetensors");
    let mut bytes = std::fs::read(&victim).expect("dump");
    let at = {
        let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let data = tensors.tensor("residual_out").expect("residual_out").data();
        data.as_ptr() as usize - bytes.as_ptr() as usize + 2 * 1000
    };
    bytes[at] ^= 0x01;
    std::fs::write(&victim, &bytes).expect("rewrite");
    let refused = demo(&["--verify-dump", dump.to_str().expect("utf-8 path")], None);
    let (stdout, stderr) = text(&refused);
    assert!(!refused.status.success(), "a corrupted dump passed:\n{stdout}");
    assert!(stderr.contains("5x2880 bf16") && stderr.contains("rank 1: residual_out"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dump);
}

#[test]
fn auto_takes_a_working_gpu_or_says_why_it_runs_the_cpu_backend() {
    let dump = scratch("auto");
    let output = demo(&SHAPES, Some(&dump));
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    if stderr.contains("no GPU backend works here") {
        assert!(stderr.contains("cuda: ") && stderr.contains("hip: "), "both GPU backends' reasons: {stderr}");
        assert!(stdout.contains("(cpu backend, rank processes over POSIX shm)"), "{stdout}");
    } else {
        assert!(stdout.contains("cuda backend, ranks as threads") || stdout.contains("hip backend, ranks as threads"));
    }
    let rows = table_rows(&stdout);
    assert_eq!(rows.len(), 12, "{stdout}");
    assert!(rows.iter().all(|l| l.trim_end().ends_with("yes")), "{stdout}");
    let verified = demo(&["--verify-dump", dump.to_str().expect("utf-8 path")], None);
    assert!(verified.status.success(), "verify-dump failed: {:?}", text(&verified));
    let _ = std::fs::remove_dir_all(&dump);
}

#[test]
fn an_explicit_gpu_backend_without_a_gpu_is_refused_clearly() {
    for backend in ["cuda", "hip"] {
        let args = ["--backend", backend, "--world", "2", "--decode-tokens", "1", "--prefill-tokens", "8"];
        let output = demo(&[&args[..], &["--hidden", "256", "--iters", "1"]].concat(), None);
        let (stdout, stderr) = text(&output);
        if output.status.success() {
            // A machine with that GPU: the table came from it.
            assert!(stdout.contains(&format!("{backend} backend, ranks as threads")), "{stdout}");
        } else {
            assert!(stderr.contains(&format!("--backend {backend}: no working {backend} GPU here: ")), "{stderr}");
            assert!(stderr.contains("`--backend cpu`"), "{stderr}");
            assert!(table_rows(&stdout).is_empty(), "{stdout}");
        }
    }
}

/// `--fp8`: every path's FP8 codes and scales checked in the run, and `--dump` writes them
/// (`out_fp8` u8, `scales` f32, the `fp8` metadata) so that `--verify-dump` checks them again
/// independently; a flipped code is refused.
#[test]
fn demo_quantises_exactly_and_dumps_the_codes_and_scales() {
    let dump = scratch("fp8");
    let shapes =
        ["--world", "2", "--decode-tokens", "1,5", "--prefill-tokens", "40", "--hidden", "4096", "--iters", "1"];
    for (spec, per_row) in [("e4m3fn:per-group", 32usize), ("e4m3fnuz:per-token", 1), ("e4m3fn:per-tensor=0.01", 0)] {
        let _ = std::fs::remove_dir_all(&dump);
        let output = demo(&[&shapes[..], &["--backend", "cpu", "--fp8", spec]].concat(), Some(&dump));
        let (stdout, stderr) = text(&output);
        assert!(output.status.success(), "demo --fp8 {spec} failed:\n{stdout}\n{stderr}");
        let file = dump.join("rank1-40x4096-bf16.safetensors");
        let bytes = std::fs::read(&file).expect("dump written");
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
        assert_eq!(header.metadata().as_ref().and_then(|m| m.get("fp8")).map(String::as_str), Some(spec));
        let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        assert_eq!(tensors.tensor("out_fp8").expect("out_fp8").shape(), &[40, 4096]);
        match per_row {
            0 => assert!(tensors.tensor("scales").is_err(), "{spec}: no scales per tensor"),
            n => assert_eq!(tensors.tensor("scales").expect("scales").shape(), &[40, n]),
        }
        let verified = demo(&["--verify-dump", dump.to_str().expect("utf-8 path")], None);
        let (stdout, stderr) = text(&verified);
        assert!(verified.status.success(), "verify-dump --fp8 {spec} failed:\n{stdout}\n{stderr}");
    }
    // One code of rank 0 changed.
    let victim = dump.join("rank0-5x4096-bf16.safetensors");
    let mut bytes = std::fs::read(&victim).expect("dump");
    let at = {
        let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let data = tensors.tensor("out_fp8").expect("out_fp8").data();
        data.as_ptr() as usize - bytes.as_ptr() as usize + 777
    };
    bytes[at] ^= 0x01;
    std::fs::write(&victim, &bytes).expect("rewrite");
    let refused = demo(&["--verify-dump", dump.to_str().expect("utf-8 path")], None);
    let (stdout, stderr) = text(&refused);
    assert!(!refused.status.success(), "a corrupted FP8 dump passed:\n{stdout}");
    assert!(stderr.contains("FP8 code 777"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dump);
}
