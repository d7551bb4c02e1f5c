//! The tests, each a function generic over the backend and given its own libtest path (for skip
//! messages and for re-running itself as a child process); `main.rs` instantiates them.

use crate::calls::{check_case, compare, cpu_reference, gave_up, gpu_calls, random_inputs, Call, Inputs, Outputs};
use crate::ranks::{open_group, Layout, Rank};
use crate::{gpu, Specific};
use arfuse_kernels::gpu::DeviceBuffer;
use arfuse_kernels::{DType, Element, Error, ErrorWord, GpuBackend};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

pub(crate) use crate::ipc::{ipc_two_processes, ipc_two_processes_exchange_data};

/// Never panics without a GPU: devices, none, or a clean "unavailable"; and where the runtime
/// finds no device, opening one is a clean "unavailable" too.
pub(crate) fn without_a_gpu_the_backend_says_so<B: GpuBackend>(_test: &str) {
    match B::device_count() {
        Ok(n) => println!("{}: {n} device(s)", B::KIND),
        Err(Error::BackendUnavailable { reason, .. }) => println!("{} unavailable: {reason}", B::KIND),
        Err(other) => panic!("unexpected error: {other}"),
    }
    if B::device_count().ok() == Some(0) {
        match B::open_device(0, 1) {
            Err(Error::BackendUnavailable { reason, .. }) => println!("open_device(0): {reason}"),
            Err(other) => panic!("expected BackendUnavailable without devices, got {other}"),
            Ok(device) => panic!("expected BackendUnavailable without devices, got {}", B::describe(&device)),
        }
    }
}

/// (1) The device opens and describes itself; shared memory is zeroed, exports, and opens in the same
/// process as its raw pointer; host round trips and copies are exact; events time a copy.
pub(crate) fn device_memory_handles_and_events<B: Specific>(test: &str) {
    let Some(_gpu) = gpu::<B>(test, false) else { return };
    let device = B::open_device(0, 1).expect("open device 0");
    println!("{} device: {}", B::KIND, B::describe(&device));
    assert!(B::multiprocessors(&device) > 0 && B::warp_size(&device) > 0);
    B::check_device(&device);
    let stream = B::create_stream(&device).expect("stream");

    const BYTES: usize = 1 << 20;
    let shared = B::alloc_shared(&device, BYTES).expect("alloc shared");
    let mut host = vec![0xa5u8; BYTES];
    // SAFETY: reads inside the 1 MiB buffer.
    unsafe { B::read_back(&stream, B::shared_ptr(&shared), &mut host) }.expect("read back");
    assert!(host.iter().all(|&b| b == 0), "shared memory starts zeroed");

    let handle = B::export_handle(&shared).expect("export");
    let origin = B::handle_origin(&handle);
    assert!(origin.is_from_this_process());
    assert_eq!((origin.device_ptr(), origin.len), (B::shared_ptr(&shared), BYTES as u64));
    B::check_shared(&shared, &handle);
    let mapping = B::open_handle(&device, &handle).expect("open own handle");
    assert_eq!(B::peer_ptr(&mapping), B::shared_ptr(&shared));
    assert!(!B::is_ipc(&mapping));
    let empty: B::IpcHandle = bytemuck::Zeroable::zeroed();
    assert!(matches!(B::open_handle(&device, &empty), Err(Error::InvalidHandle(_))));

    let mut rng = StdRng::seed_from_u64(1);
    // A quarter of the buffer, so that the device copy to BYTES / 2 below does not overlap it.
    let data: Vec<u8> = (0..BYTES / 4).map(|_| rng.gen()).collect();
    let base = B::shared_ptr(&shared);
    // SAFETY: every access below stays inside the 1 MiB buffer.
    unsafe {
        B::write(&stream, base.add(4096), &data).expect("write");
        B::copy(&stream, base.add(BYTES / 2), base.add(4096), 4096).expect("copy");
        let mut back = vec![0u8; data.len()];
        B::read_back(&stream, base.add(4096), &mut back).expect("read back");
        assert_eq!(back, data, "write/read_back round trip");
        let mut copied = vec![0u8; 4096];
        B::read_back(&stream, base.add(BYTES / 2), &mut copied).expect("read back");
        assert_eq!(copied, data[..4096], "device copy");
    }

    let floats: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
    let buffer = DeviceBuffer::<B, _>::from_slice(&stream, &floats).expect("buffer");
    assert_eq!(buffer.download(&stream).expect("download"), floats);

    const BIG: usize = 64 << 20;
    let src = DeviceBuffer::<B, u8>::zeros(&device, BIG).expect("alloc");
    let dst = DeviceBuffer::<B, u8>::zeros(&device, BIG).expect("alloc");
    let start = B::record_event(&stream).expect("event");
    for _ in 0..4 {
        // SAFETY: both buffers hold `BIG` bytes and outlive the synchronisation below.
        unsafe { B::copy(&stream, dst.device_ptr(), src.device_ptr(), BIG) }.expect("copy");
    }
    let end = B::record_event(&stream).expect("event");
    let elapsed = B::elapsed(&start, &end).expect("elapsed");
    B::synchronize(&stream).expect("synchronize");
    assert!(elapsed > Duration::ZERO);
    println!(
        "{}: 4 device copies of 64 MiB took {elapsed:?} ({:.0} GB/s read + written)",
        B::KIND,
        (8 * BIG) as f64 / elapsed.as_secs_f64() / 1e9
    );
    drop(mapping);
    B::check_err(&device).expect("no parked errors");
}

/// (2) Every call, both dtypes, many shapes and world sizes: bit for bit what the CPU backend computes.
pub(crate) fn kernels_match_the_cpu_backend<B: Specific>(test: &str) {
    let Some(_gpu) = gpu::<B>(test, true) else { return };
    const HIDDENS: [usize; 4] = [2880, 4096, 8192, 16384];
    const ROWS: [usize; 6] = [1, 4, 80, 81, 128, 1024];
    let mut table = String::new();
    let mut failures = Vec::new();
    let started = Instant::now();
    for world in [2usize, 4, 8, 3, 6] {
        // The 8192 x 4096 case (64 MiB per rank) runs once, at world size 8.
        let big = world == 8;
        let max_elems = if big { 8192 * 4096 } else { 1024 * 16384 };
        let layout = Layout { half: max_elems * 2 };
        let ranks = open_group::<B>(world, layout, max_elems * 2);
        if world == 2 {
            println!("{} conformance on {}", B::KIND, B::describe(&ranks[0].device));
        }
        let (hiddens, rows): (&[usize], &[usize]) =
            if world == 3 || world == 6 { (&[2880, 4096], &[1, 81, 128]) } else { (&HIDDENS, &ROWS) };
        let mut next_call = 0u64;
        'dtypes: for dtype in [DType::Bf16, DType::F16] {
            let mut shapes: Vec<(usize, usize)> =
                hiddens.iter().flat_map(|&h| rows.iter().map(move |&r| (r, h))).collect();
            if big && dtype == DType::Bf16 {
                shapes.push((8192, 4096));
            }
            let (mut cases, mut calls_run, mut compared) = (0usize, 0usize, 0usize);
            let failures_before = failures.len();
            let t0 = Instant::now();
            for (rows, hidden) in shapes {
                // Only calls that cross ranks take an epoch (the descriptor slots rely on every epoch
                // having a barrier); add+RMSNorm reuses the last one, which it ignores.
                let calls: Vec<(Call, u64)> = Call::ALL
                    .iter()
                    .map(|&c| {
                        if c.crosses_ranks() {
                            next_call += 1;
                        }
                        (c, next_call - 1)
                    })
                    .collect();
                let seed = ((world * 1_000_003 + rows * 10_007 + hidden) as u64) ^ ((dtype as u64) << 48);
                let label = format!("world {world} {dtype} {rows}x{hidden}");
                let outcome = match dtype {
                    DType::Bf16 => run_case::<B, half::bf16>(&ranks, &label, rows, hidden, seed, &calls, &mut failures),
                    _ => run_case::<B, half::f16>(&ranks, &label, rows, hidden, seed, &calls, &mut failures),
                };
                match outcome {
                    Ok(n) => compared += n,
                    Err(protocol) => {
                        // Flags are now inconsistent: the rest of this world size would only time out.
                        failures.push(format!("{label}: {protocol}; skipping the rest of world size {world}"));
                        break 'dtypes;
                    }
                }
                cases += 1;
                calls_run += calls.len();
            }
            let status = if failures.len() == failures_before { "ok" } else { "FAILED" };
            let _ = writeln!(
                table,
                "{world:>5}  {dtype:<5} {cases:>5} {calls_run:>6} {compared:>14} {:>9.1?}  {status}",
                t0.elapsed()
            );
        }
        for r in &ranks {
            B::check_err(&r.device).expect("no parked errors");
        }
    }
    println!("world  dtype cases  calls  elems-compared      time  result\n{table}total {:.1?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// One shape: GPU calls, CPU references, comparisons. `Err` when the protocol itself failed.
fn run_case<B: GpuBackend, T: Element>(
    ranks: &[Rank<B>],
    label: &str,
    rows: usize,
    hidden: usize,
    seed: u64,
    calls: &[(Call, u64)],
    failures: &mut Vec<String>,
) -> Result<usize, String> {
    let inputs = random_inputs::<T>(ranks.len(), rows, hidden, seed);
    let gpu = gpu_calls(ranks, &inputs, calls)?;
    let kinds: Vec<Call> = calls.iter().map(|&(c, _)| c).collect();
    let mut references = Vec::new();
    let mut compared = check_case(label, &inputs, &kinds, &gpu, &mut references, failures);
    // The CPU's own 2-stage path equals its 1-stage path (checked where cheap).
    if rows * hidden <= 1 << 20 {
        for (two, one) in
            [(Call::FusedTwoStage, Call::FusedOneStage), (Call::AllReduceTwoStage, Call::AllReduceOneStage)]
        {
            let Some((_, b)) = references.iter().find(|(c, _)| *c == one) else { continue };
            let a = cpu_reference(&inputs, two);
            for rank in 0..ranks.len() {
                compared += a[rank].out.len();
                if let Err(e) = compare(
                    &format!("{label} cpu {two:?} vs {one:?} rank {rank} out"),
                    &a[rank].out,
                    &b[rank].out,
                    hidden,
                ) {
                    failures.push(e);
                }
            }
        }
    }
    Ok(compared)
}

/// (3) 1000 calls of changing shapes and paths, launched back to back in batches (no host
/// synchronisation inside a batch, each call on its own slot of the local tensors), the receive
/// areas reused by every 2-stage call at once: all exact.
pub(crate) fn thousand_back_to_back_calls_stay_exact<B: Specific>(test: &str) {
    let Some(_gpu) = gpu::<B>(test, true) else { return };
    const WORLD: usize = 4;
    const CALLS: usize = 1000;
    const BATCH: usize = 16;
    const SHAPES: [(usize, usize); 9] =
        [(1, 4096), (3, 2880), (8, 8192), (16, 4096), (80, 2880), (81, 4096), (2, 8192), (128, 4096), (1, 2880)];
    const KINDS: [Call; 4] =
        [Call::FusedOneStage, Call::FusedTwoStage, Call::AllReduceOneStage, Call::AllReduceTwoStage];
    let slot_bytes = 128 * 8192 * 2;
    let ranks = open_group::<B>(WORLD, Layout { half: slot_bytes }, BATCH * slot_bytes);
    let mut failures = Vec::new();
    let started = Instant::now();
    for batch_start in (0..CALLS).step_by(BATCH) {
        let batch: Vec<(usize, Call, usize, usize)> = (batch_start..(batch_start + BATCH).min(CALLS))
            .map(|index| {
                let (rows, hidden) = SHAPES[(index * 5 + index / 9) % SHAPES.len()];
                (index, KINDS[index % KINDS.len()], rows, hidden)
            })
            .collect();
        let inputs: Vec<Inputs<half::bf16>> = batch
            .iter()
            .map(|&(index, _, rows, hidden)| random_inputs(WORLD, rows, hidden, 77_000 + index as u64))
            .collect();
        let loaded = std::sync::Barrier::new(WORLD);
        let gpu: Vec<Result<Vec<Outputs<half::bf16>>, String>> = std::thread::scope(|scope| {
            let threads: Vec<_> = ranks
                .iter()
                .map(|r| {
                    let (batch, inputs, loaded) = (&batch, &inputs, &loaded);
                    scope.spawn(move || {
                        // Upload and poison every slot, then launch the whole batch without waiting
                        // (once every rank has uploaded: no copy, a driver call that may wait for
                        // the device, while a peer's kernel spins).
                        for (slot, input) in inputs.iter().enumerate() {
                            r.load(input, (slot * slot_bytes) as u64);
                        }
                        loaded.wait();
                        for (slot, &(index, call, rows, hidden)) in batch.iter().enumerate() {
                            let params = r.params(rows, hidden, slot * slot_bytes, index as u64);
                            r.launch(call, DType::Bf16, &params)
                                .map_err(|e| format!("rank {} call {index}: {e}", r.rank))?;
                        }
                        r.wait("a batch of calls");
                        gave_up(r, &format!("the batch from call {batch_start}"))?;
                        Ok(batch
                            .iter()
                            .enumerate()
                            .map(|(slot, &(_, call, rows, hidden))| {
                                let offset = (slot * slot_bytes) as u64;
                                Outputs {
                                    out: r.download(Rank::<B>::addr(&r.local.out) + offset, rows * hidden),
                                    residual_out: if call.writes_residual() {
                                        r.download(Rank::<B>::addr(&r.local.residual_out) + offset, rows * hidden)
                                    } else {
                                        Vec::new()
                                    },
                                }
                            })
                            .collect())
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().expect("rank thread")).collect()
        });
        // Every rank's failure, and what each rank's header slots hold (which call every peer
        // reached), not only the first rank's error.
        let errors: Vec<String> = gpu.iter().filter_map(|r| r.as_ref().err().cloned()).collect();
        if !errors.is_empty() {
            let headers: Vec<String> = ranks
                .iter()
                .map(|r| format!("rank {} header epochs [rotation][sender]: {:?}", r.rank, r.headers()))
                .collect();
            let calls: Vec<String> =
                batch.iter().map(|&(index, call, rows, hidden)| format!("{index}: {call:?} {rows}x{hidden}")).collect();
            panic!(
                "{}\n{}\nbatch (call: kind shape; a call's epoch is call + 1, its barriers 2 epoch and 2 epoch + 1): {}",
                errors.join("\n"),
                headers.join("\n"),
                calls.join(", ")
            );
        }
        let gpu: Vec<Vec<Outputs<half::bf16>>> = gpu.into_iter().filter_map(Result::ok).collect();
        for (slot, &(index, call, rows, hidden)) in batch.iter().enumerate() {
            let per_rank: Vec<Vec<Outputs<half::bf16>>> = gpu.iter().map(|r| vec![r[slot].clone()]).collect();
            let label = format!("call {index} ({rows}x{hidden})");
            check_case(&label, &inputs[slot], &[call], &per_rank, &mut Vec::new(), &mut failures);
        }
        assert!(failures.is_empty(), "{}", failures.iter().take(20).cloned().collect::<Vec<_>>().join("\n"));
    }
    println!("{}: {CALLS} back-to-back calls at world size {WORLD}, bf16, exact ({:.1?})", B::KIND, started.elapsed());
}

/// (3a) A rank that lags behind its peers runs a local kernel (the unfused path's add+RMSNorm, or
/// 2-stage's second kernel) while the peers' blocks of the next cross-rank call already spin on
/// every multiprocessor: the local kernel must still find room, so that the lagging rank reaches
/// the call. (It did not while the kernels' shared memory carveouts differed: a multiprocessor
/// runs blocks of one L1/shared split at a time, and the peers timed out; docs/reliability.md.)
/// World 4, the peers' 1-stage all-reduce of 128x4096 (3 x 66 blocks: at least one on every SM),
/// launched first; the lagging rank then launches its local kernel and the same call.
pub(crate) fn a_lagging_rank_s_local_kernel_runs_while_its_peers_spin<B: Specific>(test: &str) {
    let Some(_gpu) = gpu::<B>(test, true) else { return };
    const WORLD: usize = 4;
    const ROUNDS: usize = 12;
    let (rows, hidden) = (128usize, 4096usize);
    let elems = rows * hidden;
    let slot_bytes = elems * 2;
    let ranks = open_group::<B>(WORLD, Layout { half: slot_bytes }, 2 * slot_bytes);
    let late = &ranks[WORLD - 1];
    let started = Instant::now();
    for round in 0..ROUNDS {
        let seed = 93_000 + round as u64 * 10;
        let all_reduce = random_inputs::<half::bf16>(WORLD, rows, hidden, seed);
        let local = random_inputs::<half::bf16>(WORLD, rows, hidden, seed + 1);
        for r in &ranks {
            r.load(&all_reduce, 0);
        }
        late.load(&local, slot_bytes as u64);
        for r in &ranks {
            r.wait("the uploads");
        }
        // The peers first, then the lagging rank's local kernel (slot 1) and its call (slot 0),
        // all from this thread, microseconds apart (the kernels' deadline is the suite's 5 s).
        let params: Vec<_> = ranks.iter().map(|r| r.params(rows, hidden, 0, round as u64)).collect();
        for (r, p) in ranks.iter().zip(&params).take(WORLD - 1) {
            r.launch(Call::AllReduceOneStage, DType::Bf16, p).expect("launch a peer's all-reduce");
        }
        let local_params = late.params(rows, hidden, slot_bytes, round as u64);
        late.launch(Call::AddRmsNorm, DType::Bf16, &local_params).expect("launch the local kernel");
        late.launch(Call::AllReduceOneStage, DType::Bf16, &params[WORLD - 1]).expect("launch the late all-reduce");
        let mut failures = Vec::new();
        for r in &ranks {
            r.wait("the round");
            if let Err(e) = gave_up(r, &format!("round {round}")) {
                failures.push(e);
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        let sums = cpu_reference(&all_reduce, Call::AllReduceOneStage);
        let normed = cpu_reference(&local, Call::AddRmsNorm);
        for r in &ranks {
            let out = r.download(Rank::<B>::addr(&r.local.out), elems);
            if let Err(e) =
                compare(&format!("round {round} rank {} all-reduce", r.rank), &out, &sums[r.rank].out, hidden)
            {
                failures.push(e);
            }
        }
        let base = slot_bytes as u64;
        let out = late.download(Rank::<B>::addr(&late.local.out) + base, elems);
        let residual_out = late.download(Rank::<B>::addr(&late.local.residual_out) + base, elems);
        for (what, got, want) in
            [("out", &out, &normed[late.rank].out), ("residual_out", &residual_out, &normed[late.rank].residual_out)]
        {
            if let Err(e) = compare(&format!("round {round} local add+rmsnorm {what}"), got, want, hidden) {
                failures.push(e);
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
    println!(
        "{}: {ROUNDS} rounds of a lagging rank's local kernel under 3 peers' spinning 128x4096 all-reduce: exact ({:.1?})",
        B::KIND,
        started.elapsed()
    );
}

/// (3b) With the epoch taken from device memory (`barrier_base` 0, as the operator launches and a
/// graph replays), every call of every kind and grid (one block, many, rows fewer than the ranks)
/// advances every rank's epoch word by exactly one, back to back in one batch, gives no error, and
/// its outputs are the CPU backend's.
pub(crate) fn every_call_with_the_device_epoch_advances_it_once<B: Specific>(test: &str) {
    let Some(_gpu) = gpu::<B>(test, true) else { return };
    const SHAPES: [(usize, usize); 5] = [(1, 4096), (3, 2880), (8, 8192), (81, 4096), (1, 16384)];
    for world in [2usize, 4] {
        let slot_bytes = 81 * 4096 * 2;
        let ranks = open_group::<B>(world, Layout { half: slot_bytes }, slot_bytes * Call::ALL.len());
        let mut failures = Vec::new();
        let mut epochs = 0u64;
        for (s, &(rows, hidden)) in SHAPES.iter().enumerate() {
            let inputs: Vec<Inputs<half::bf16>> = Call::ALL
                .iter()
                .enumerate()
                .map(|(c, _)| random_inputs(world, rows, hidden, 91_000 + (s * 10 + c) as u64))
                .collect();
            let before: Vec<u64> = ranks.iter().map(|r| r.epoch_word()).collect();
            let gpu: Vec<Vec<Outputs<half::bf16>>> = std::thread::scope(|scope| {
                let threads: Vec<_> = ranks
                    .iter()
                    .map(|r| {
                        let inputs = &inputs;
                        scope.spawn(move || {
                            for (slot, input) in inputs.iter().enumerate() {
                                r.load(input, (slot * slot_bytes) as u64);
                            }
                            for (slot, &call) in Call::ALL.iter().enumerate() {
                                let mut params = r.params(rows, hidden, slot * slot_bytes, 0);
                                params.barrier_base = 0;
                                r.launch(call, DType::Bf16, &params).expect("launch");
                            }
                            r.wait("calls with the device epoch");
                            assert_eq!(
                                r.error_word().kind(),
                                0,
                                "rank {}: {rows}x{hidden}: {:?}",
                                r.rank,
                                r.error_word()
                            );
                            (0..Call::ALL.len())
                                .map(|slot| {
                                    let offset = (slot * slot_bytes) as u64;
                                    let elems = rows * hidden;
                                    Outputs {
                                        out: r.download(Rank::<B>::addr(&r.local.out) + offset, elems),
                                        residual_out: r
                                            .download(Rank::<B>::addr(&r.local.residual_out) + offset, elems),
                                    }
                                })
                                .collect()
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().expect("rank thread")).collect()
            });
            let crossing = Call::ALL.iter().filter(|c| c.crosses_ranks()).count() as u64;
            epochs += crossing;
            for (r, rank) in ranks.iter().enumerate() {
                assert_eq!(
                    rank.epoch_word(),
                    before[r] + crossing,
                    "world {world} rank {r} {rows}x{hidden}: the epoch word after {crossing} cross-rank calls"
                );
                assert_eq!(rank.epoch_word(), epochs, "world {world} rank {r}: epochs so far");
            }
            for (slot, &call) in Call::ALL.iter().enumerate() {
                let per_rank: Vec<Vec<Outputs<half::bf16>>> = gpu.iter().map(|r| vec![r[slot].clone()]).collect();
                let label = format!("world {world} {rows}x{hidden} {call:?} with the device epoch");
                check_case(&label, &inputs[slot], &[call], &per_rank, &mut Vec::new(), &mut failures);
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        println!(
            "{}: world {world}: {} shapes x {} calls with the device epoch: each advanced it once, exact",
            B::KIND,
            SHAPES.len(),
            Call::ALL.len()
        );
    }
}

/// (4) A decode call captured into a graph and replayed gives the bits of the eager call; a
/// second graph replayed after new inputs were written reads the new inputs.
pub(crate) fn graph_replay_matches_eager<B: Specific>(test: &str) {
    let Some(_gpu) = gpu::<B>(test, true) else { return };
    const WORLD: usize = 2;
    let (rows, hidden) = (4usize, 4096usize);
    let elems = rows * hidden;
    let ranks = open_group::<B>(WORLD, Layout { half: elems * 2 }, elems * 2);
    let first = random_inputs::<half::bf16>(WORLD, rows, hidden, 4);
    let second = random_inputs::<half::bf16>(WORLD, rows, hidden, 5);
    type Three = (Outputs<half::bf16>, Outputs<half::bf16>, Outputs<half::bf16>);
    let results: Vec<Three> = std::thread::scope(|scope| {
        let threads: Vec<_> = ranks
            .iter()
            .map(|r| {
                let (first, second) = (&first, &second);
                scope.spawn(move || {
                    let run = |what: &str| {
                        r.wait(what);
                        assert_eq!(r.error_word().kind(), 0, "rank {}: {what} gave up", r.rank);
                        Outputs {
                            out: r.download(Rank::<B>::addr(&r.local.out), elems),
                            residual_out: r.download(Rank::<B>::addr(&r.local.residual_out), elems),
                        }
                    };
                    r.load(first, 0);
                    r.launch(Call::FusedOneStage, DType::Bf16, &r.params(rows, hidden, 0, 0)).expect("eager launch");
                    let eager = run("eager call");
                    // Capture two calls (each a graph: a replay repeats its barrier value, so each graph
                    // is replayed once), then replay.
                    let mut graphs = Vec::new();
                    for index in [1, 2] {
                        B::begin_capture(&r.stream).expect("begin capture");
                        let launched = r.launch(Call::FusedOneStage, DType::Bf16, &r.params(rows, hidden, 0, index));
                        let graph = B::end_capture(&r.stream);
                        launched.expect("captured launch");
                        graphs.push(graph.expect("end capture"));
                    }
                    r.load(first, 0);
                    // SAFETY: the graph's kernels use this group's buffers, alive until the scope ends.
                    unsafe { B::replay(&graphs[0], &r.stream) }.expect("replay");
                    let replay = run("first graph replay");
                    r.load(second, 0);
                    // SAFETY: as above.
                    unsafe { B::replay(&graphs[1], &r.stream) }.expect("replay");
                    let fresh = run("second graph replay");
                    (eager, replay, fresh)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("rank thread")).collect()
    });
    let mut failures = Vec::new();
    let first_cpu = cpu_reference(&first, Call::FusedOneStage);
    let second_cpu = cpu_reference(&second, Call::FusedOneStage);
    for (rank, (eager, replay, fresh)) in results.iter().enumerate() {
        let checks = [
            ("eager out vs cpu", &eager.out, &first_cpu[rank].out),
            ("eager residual_out vs cpu", &eager.residual_out, &first_cpu[rank].residual_out),
            ("replay out vs eager", &replay.out, &eager.out),
            ("replay residual_out vs eager", &replay.residual_out, &eager.residual_out),
            ("second replay out vs cpu", &fresh.out, &second_cpu[rank].out),
            ("second replay residual_out vs cpu", &fresh.residual_out, &second_cpu[rank].residual_out),
        ];
        for (what, got, want) in checks {
            if let Err(e) = compare(&format!("rank {rank} {what}"), got, want, hidden) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!(
        "{}: graph capture + replay of FusedOneStage {rows}x{hidden} bf16 at world size {WORLD}: same bits as eager",
        B::KIND
    );
}

/// (4b) Two ranks in different calls of the fused 1-stage kernel (other row counts): each gives
/// up with a call mismatch naming the other, and neither writes an output element. With rows of
/// 8192 (no spare warp: the first threads check the headers, reading them before the data) and of
/// 4096 (a spare warp checks them), and one rank with fewer rows than the other has blocks.
pub(crate) fn a_peer_in_another_call_is_a_mismatch_and_nothing_is_written<B: Specific>(test: &str) {
    let Some(_gpu) = gpu::<B>(test, true) else { return };
    const WORLD: usize = 2;
    for (hidden, rows) in [(8192usize, [16usize, 8]), (4096, [16, 8]), (8192, [1, 2])] {
        let most = rows[0].max(rows[1]);
        let ranks = open_group::<B>(WORLD, Layout { half: most * hidden * 2 }, most * hidden * 2);
        let inputs: Vec<Inputs<half::bf16>> =
            rows.iter().map(|&n| random_inputs(WORLD, n, hidden, 95_000 + (hidden * n) as u64)).collect();
        for (r, input) in ranks.iter().zip(&inputs) {
            r.load(input, 0);
            r.wait("the uploads");
        }
        for (r, &n) in ranks.iter().zip(&rows) {
            r.launch(Call::FusedOneStage, DType::Bf16, &r.params(n, hidden, 0, 0)).expect("launch");
        }
        let mut failures = Vec::new();
        for (r, &n) in ranks.iter().zip(&rows) {
            r.wait("the mismatched call");
            let word = r.error_word();
            let label = format!("{hidden} wide, rows {rows:?}, rank {}", r.rank);
            if word.kind() != ErrorWord::KIND_CALL_MISMATCH || word.peer() as usize != 1 - r.rank {
                failures.push(format!(
                    "{label}: error word {:#x} (kind {}, peer {})",
                    word.0,
                    word.kind(),
                    word.peer()
                ));
            }
            for (what, buffer) in [("out", &r.local.out), ("residual_out", &r.local.residual_out)] {
                let got: Vec<half::bf16> = r.download(Rank::<B>::addr(buffer), n * hidden);
                let written = got.len() - arfuse_testkit::unwritten(&got).len();
                if written != 0 {
                    failures.push(format!("{label}: {written} of {} {what} elements written", got.len()));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
    println!("{}: fused 1-stage calls of other row counts: a call mismatch on both ranks, nothing written", B::KIND);
}

/// (5) World size 2, rank 1 never launches: rank 0's kernel gives up by itself after its deadline,
/// and its error word names a peer timeout on rank 1.
pub(crate) fn stalled_peer_times_out<B: Specific>(test: &str) {
    let Some(_gpu) = gpu::<B>(test, true) else { return };
    const WORLD: usize = 2;
    let deadline = Duration::from_millis(200);
    let (rows, hidden) = (4usize, 4096usize);
    let ranks = open_group::<B>(WORLD, Layout { half: rows * hidden * 2 }, rows * hidden * 2);
    let r = &ranks[0];
    let inputs = random_inputs::<half::bf16>(WORLD, rows, hidden, 3);
    r.upload(Rank::<B>::addr(&r.local.input), &inputs.x[0]);
    r.upload(Rank::<B>::addr(&r.local.residual), &inputs.residual);
    r.upload(Rank::<B>::addr(&r.local.weight), &inputs.weight);
    let mut params = r.params(rows, hidden, 0, 0);
    let base = params.barrier_base;
    params.deadline_ns = deadline.as_nanos() as u64;
    let start = Instant::now();
    r.launch(Call::FusedOneStage, DType::Bf16, &params).expect("launch");
    r.wait("the lone rank's kernel");
    let took = start.elapsed();
    let word = r.error_word();
    println!(
        "{}: lone rank 0 gave up after {took:?} (deadline {deadline:?}): error word {:#x} kind {} peer {} barrier {}",
        B::KIND,
        word.0,
        word.kind(),
        word.peer(),
        word.barrier()
    );
    assert_eq!(word.kind(), ErrorWord::KIND_PEER_TIMEOUT, "error word {:#x}", word.0);
    assert_eq!(word.peer(), 1, "the missing peer is rank 1");
    assert!((base..base + 2).contains(&word.barrier()), "barrier {} of this call", word.barrier());
    assert!(took >= deadline / 2, "gave up after {took:?}, before the deadline");
    assert!(took < deadline + Duration::from_secs(5), "took {took:?} for a {deadline:?} deadline");
}
