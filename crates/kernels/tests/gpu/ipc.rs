//! Two processes on one GPU over the runtime's IPC: this test binary starts itself again as rank 1
//! (the child runs the same test, told so by `ARFUSE_GPU_IPC_CHILD`), and the ranks exchange
//! tagged lines (the parent's on the child's stdin, the child's on its stdout).

use crate::calls::{compare, cpu_reference, random_inputs, Call};
use crate::ranks::{arm_push_region, Layout, Local, Rank, WATCHDOG};
use crate::{gpu, Specific};
use arfuse_kernels::{DType, Error, MAX_RANKS};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

/// Set in the child process to the libtest path of the test it runs as rank 1.
const IPC_CHILD_ENV: &str = "ARFUSE_GPU_IPC_CHILD";
const IPC_TAG: &str = "ARFUSE-IPC";
/// Bytes of each rank's shared buffer in the data exchange.
const IPC_BYTES: usize = 1 << 20;

/// One rank's side of a two-process test: `send` tells the other process a tagged line,
/// `receive` waits for one.
type RankFn = fn(usize, &mut dyn FnMut(&str), &mut dyn FnMut(&str) -> String) -> Result<(), String>;

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn handle_from_hex<H: bytemuck::Pod>(hex: &str) -> H {
    let bytes: Vec<u8> =
        (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex handle")).collect();
    bytemuck::pod_read_unaligned(&bytes)
}

/// (6) Two processes on one GPU: each opens the other's shared buffer with the runtime's IPC, the
/// fused call is exact, handles close cleanly.
pub(crate) fn ipc_two_processes<B: Specific>(test: &str) {
    if two_processes::<B>(test, true, fused_call_rank::<B>) {
        println!("{} ipc: two processes, FusedOneStage bf16 4x4096 over the runtime's IPC: exact", B::KIND);
    }
}

/// (7) Two processes on one GPU, no kernels: each writes a pattern into its own shared buffer, maps
/// the peer's through IPC (twice: the second mapping shares the first open), reads the peer's
/// pattern through it, writes its rank into the peer's last 4 KiB, and checks what the peer wrote
/// into its own. This checks the runtime's IPC path (and its flag spelling) where no compiler is.
pub(crate) fn ipc_two_processes_exchange_data<B: Specific>(test: &str) {
    two_processes::<B>(test, false, exchange_rank::<B>);
}

/// Runs `rank_fn` as rank 0 here and as rank 1 in a child process running `test`; whether the
/// ranks ran (`false`: skipped, or this is the child).
fn two_processes<B: Specific>(test: &str, needs_kernels: bool, rank_fn: RankFn) -> bool {
    if std::env::var(IPC_CHILD_ENV).is_ok_and(|child| child == test) {
        // Rank 1: tagged lines on stdout, the parent's on stdin.
        let Some(_gpu) = gpu::<B>(&format!("{test} (child)"), needs_kernels) else { return false };
        let stdin = std::io::stdin();
        let mut send = |line: &str| {
            println!("\n{IPC_TAG} {line}");
            let _ = std::io::stdout().flush();
        };
        let mut receive = |tag: &str| -> String {
            let mut line = String::new();
            loop {
                line.clear();
                let n = stdin.lock().read_line(&mut line).expect("read from the parent");
                assert!(n > 0, "the parent closed the pipe while we waited for {tag}");
                if let Some(rest) = line.trim().strip_prefix(tag) {
                    return rest.to_string();
                }
            }
        };
        if let Err(e) = rank_fn(1, &mut send, &mut receive) {
            panic!("rank 1: {e}");
        }
        return false;
    }
    let Some(_gpu) = gpu::<B>(test, needs_kernels) else { return false };
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(IPC_CHILD_ENV, test)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the rank 1 process");
    let mut to_child = child.stdin.take().expect("child stdin");
    let from_child = child.stdout.take().expect("child stdout");
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(from_child).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut send = |line: &str| {
        writeln!(to_child, "{line}").expect("write to rank 1");
        to_child.flush().expect("flush to rank 1");
    };
    let mut receive = |tag: &str| -> String {
        let wanted = format!("{IPC_TAG} {tag}");
        loop {
            match lines.recv_timeout(WATCHDOG) {
                Ok(line) => {
                    if let Some(at) = line.find(&wanted) {
                        return line[at + wanted.len()..].to_string();
                    }
                    if !line.trim().is_empty() {
                        println!("[rank 1] {line}");
                    }
                }
                Err(e) => panic!("no {tag} line from rank 1 ({e}); see its output above"),
            }
        }
    };
    let outcome = rank_fn(0, &mut send, &mut receive);
    drop(to_child);
    let status = child.wait().expect("wait for rank 1");
    outcome.unwrap_or_else(|e| panic!("rank 0: {e}"));
    assert!(status.success(), "rank 1 failed: {status}");
    true
}

/// One rank of [`ipc_two_processes`]: maps the peer's buffer through IPC, runs a fused call,
/// compares with the CPU.
fn fused_call_rank<B: Specific>(
    rank: usize,
    send: &mut dyn FnMut(&str),
    receive: &mut dyn FnMut(&str) -> String,
) -> Result<(), String> {
    const WORLD: usize = 2;
    let (rows, hidden) = (4usize, 4096usize);
    let elems = rows * hidden;
    let layout = Layout { half: elems * 2 };
    let device = B::open_device(0, WORLD).map_err(|e| e.to_string())?;
    B::prepare(&device).map_err(|e| e.to_string())?;
    let stream = B::create_stream(&device).map_err(|e| e.to_string())?;
    let shared = B::alloc_shared(&device, layout.bytes(WORLD)).map_err(|e| e.to_string())?;
    arm_push_region::<B>(&device, &shared, layout, WORLD);
    let local = Local::zeros(&device, elems * 2);
    let handle = B::export_handle(&shared).map_err(|e| e.to_string())?;
    send(&format!("HANDLE {}", to_hex(bytemuck::bytes_of(&handle))));
    let peer_handle: B::IpcHandle = handle_from_hex(receive("HANDLE").trim());
    let mapping = B::open_handle(&device, &peer_handle).map_err(|e| format!("open the peer's handle: {e}"))?;
    if !B::is_ipc(&mapping) {
        return Err("the peer's handle was taken for this process's own".into());
    }
    let mut bases = [0u64; MAX_RANKS];
    bases[rank] = B::shared_ptr(&shared).0;
    bases[1 - rank] = B::peer_ptr(&mapping).0;
    let r = Rank::<B> { rank, world: WORLD, device, stream, _shared: shared, _peers: Vec::new(), bases, layout, local };
    let inputs = random_inputs::<half::bf16>(WORLD, rows, hidden, 2024);
    r.load(&inputs, 0);
    let started = Instant::now();
    r.launch(Call::FusedOneStage, DType::Bf16, &r.params(rows, hidden, 0, 0)).map_err(|e| e.to_string())?;
    r.wait("the fused call across processes");
    let took = started.elapsed();
    let word = r.error_word();
    let outcome = if word.kind() != 0 {
        Err(format!("rank {rank}: error word {:#x} (kind {}, peer {})", word.0, word.kind(), word.peer()))
    } else {
        let cpu = cpu_reference(&inputs, Call::FusedOneStage);
        compare(
            &format!("rank {rank} out"),
            &r.download::<half::bf16>(Rank::<B>::addr(&r.local.out), elems),
            &cpu[rank].out,
            hidden,
        )
        .and_then(|()| {
            let got = r.download::<half::bf16>(Rank::<B>::addr(&r.local.residual_out), elems);
            compare(&format!("rank {rank} residual_out"), &got, &cpu[rank].residual_out, hidden)
        })
    };
    println!("{} ipc: rank {rank} (pid {}): fused call over IPC took {took:?}", B::KIND, std::process::id());
    // Close our mapping of the peer's buffer before the peer frees it, and keep ours until the peer
    // has closed its mapping of it.
    drop(mapping);
    send("CLOSED");
    receive("CLOSED");
    B::check_err(&r.device).map_err(|e| e.to_string())?;
    drop(r);
    outcome
}

fn pattern(rank: usize) -> Vec<u8> {
    (0..IPC_BYTES).map(|i| (i * 31 + rank * 101 + 7) as u8).collect()
}

/// One rank of [`ipc_two_processes_exchange_data`].
fn exchange_rank<B: Specific>(
    rank: usize,
    send: &mut dyn FnMut(&str),
    receive: &mut dyn FnMut(&str) -> String,
) -> Result<(), String> {
    let e = |what: &'static str| move |err: Error| format!("rank {rank}: {what}: {err}");
    let device = B::open_device(0, 2).map_err(e("open device"))?;
    let stream = B::create_stream(&device).map_err(e("stream"))?;
    let shared = B::alloc_shared(&device, IPC_BYTES).map_err(e("alloc shared"))?;
    let own = B::shared_ptr(&shared);
    // SAFETY: inside the `IPC_BYTES` buffer.
    unsafe { B::write(&stream, own, &pattern(rank)) }.map_err(e("write pattern"))?;
    let handle = B::export_handle(&shared).map_err(e("export"))?;
    send(&format!("HANDLE {}", to_hex(bytemuck::bytes_of(&handle))));
    let peer_handle: B::IpcHandle = handle_from_hex(receive("HANDLE").trim());
    let mapping = B::open_handle(&device, &peer_handle).map_err(e("open the peer's handle"))?;
    let again = B::open_handle(&device, &peer_handle).map_err(e("open the peer's handle again"))?;
    if !B::is_ipc(&mapping) || B::peer_ptr(&again) != B::peer_ptr(&mapping) {
        return Err(format!(
            "rank {rank}: mappings at {:?} and {:?}: not one shared IPC open",
            B::peer_ptr(&mapping),
            B::peer_ptr(&again)
        ));
    }
    drop(again);
    let peer = B::peer_ptr(&mapping);
    let mut seen = vec![0u8; IPC_BYTES - 4096];
    // SAFETY: inside the peer's `IPC_BYTES` buffer, mapped until `mapping` drops.
    unsafe { B::read_back(&stream, peer, &mut seen) }.map_err(e("read the peer's buffer"))?;
    if seen[..] != pattern(1 - rank)[..IPC_BYTES - 4096] {
        return Err(format!("rank {rank}: the peer's buffer does not hold the peer's pattern"));
    }
    // SAFETY: the last 4 KiB of the peer's buffer; both sides read it only after "WRITTEN".
    unsafe { B::write(&stream, peer.add(IPC_BYTES - 4096), &[rank as u8 + 1; 4096]) }
        .map_err(e("write to the peer"))?;
    send("WRITTEN");
    receive("WRITTEN");
    let mut tail = vec![0u8; 4096];
    // SAFETY: inside our own buffer.
    unsafe { B::read_back(&stream, own.add(IPC_BYTES - 4096), &mut tail) }.map_err(e("read own tail"))?;
    let outcome = if tail.iter().all(|&b| b == (1 - rank) as u8 + 1) {
        Ok(())
    } else {
        Err(format!("rank {rank}: the peer's write did not arrive in our buffer"))
    };
    // Close our mapping before the peer frees its buffer; keep ours until the peer closed its.
    drop(mapping);
    send("CLOSED");
    receive("CLOSED");
    B::check_err(&device).map_err(e("parked error"))?;
    println!(
        "{} ipc: rank {rank} (pid {}): exchanged {IPC_BYTES} bytes over the runtime's IPC",
        B::KIND,
        std::process::id()
    );
    outcome
}
