//! The host side of a call, without a device: validation, the dispatch decision, argument packing
//! and launch bookkeeping, measured through a backend whose launches do nothing. Shows what the
//! Rust path adds per call on top of the kernels (the target is well under 1 µs).
//!
//! Run: `cargo bench -p arfuse-bench --bench host`.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use arfuse_fusion::dispatch::{choose_path, Policy, Request};
use arfuse_fusion::{AllReduce, AllReduceRmsNorm, Args, Config, FallbackReason, Path, TensorMut, TensorRef};
use arfuse_ipc::ThreadRendezvous;
use arfuse_kernels::source::launch_config;
use arfuse_kernels::{Backend, BackendKind, DType, DevicePtr, KernelId, LaunchParams, Op, Result};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use half::bf16;
use std::time::Duration;

/// A backend with nothing behind it: memory is host memory nobody reads, launches return at once.
struct Null;

impl Backend for Null {
    const KIND: BackendKind = BackendKind::Cpu;
    type Device = ();
    type Stream = ();
    type Event = ();
    type SharedBuffer = Box<[u8]>;
    type IpcHandle = u64;
    type PeerMapping = u64;

    fn device_count() -> Result<usize> {
        Ok(1)
    }
    fn open_device(_: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn describe(_: &()) -> String {
        "null".into()
    }
    fn create_stream(_: &()) -> Result<()> {
        Ok(())
    }
    fn alloc_shared(_: &(), bytes: usize) -> Result<Box<[u8]>> {
        Ok(vec![0u8; bytes].into_boxed_slice())
    }
    fn shared_ptr(buffer: &Box<[u8]>) -> DevicePtr {
        DevicePtr(buffer.as_ptr() as u64)
    }
    fn shared_len(buffer: &Box<[u8]>) -> usize {
        buffer.len()
    }
    fn export_handle(buffer: &Box<[u8]>) -> Result<u64> {
        Ok(buffer.as_ptr() as u64)
    }
    fn open_handle(_: &(), handle: &u64) -> Result<u64> {
        Ok(*handle)
    }
    fn peer_ptr(mapping: &u64) -> DevicePtr {
        DevicePtr(*mapping)
    }
    unsafe fn copy(_: &(), _: DevicePtr, _: DevicePtr, _: usize) -> Result<()> {
        Ok(())
    }
    unsafe fn launch(_: &(), _: &(), kernel: KernelId, params: &LaunchParams) -> Result<()> {
        black_box((kernel, params));
        Ok(())
    }
    unsafe fn read_back(_: &(), _: DevicePtr, dst: &mut [u8]) -> Result<()> {
        dst.fill(0);
        Ok(())
    }
    unsafe fn write(_: &(), _: DevicePtr, _: &[u8]) -> Result<()> {
        Ok(())
    }
    fn synchronize(_: &()) -> Result<()> {
        Ok(())
    }
    fn record_event(_: &()) -> Result<()> {
        Ok(())
    }
    fn elapsed(_: &(), _: &()) -> Result<Duration> {
        Ok(Duration::ZERO)
    }
}

fn host_path(c: &mut Criterion) {
    let policy = Policy::default();
    let request = Request { rows: 4, hidden: 4096, dtype: DType::Bf16, world_size: 8 };
    c.bench_function("dispatch decision", |b| b.iter(|| choose_path(black_box(&request), black_box(&policy))));
    // What a GPU backend adds before its driver call: the grid of the launch.
    let params = LaunchParams { rows: 4, hidden: 4096, world_size: 2, ..LaunchParams::default() };
    let kernel = KernelId { op: Op::FusedOneStage, dtype: DType::Bf16 };
    c.bench_function("launch configuration", |b| {
        b.iter(|| launch_config(black_box(kernel), black_box(&params), black_box(66), black_box(32)))
    });

    // Two ranks meet once (the operator is created collectively); rank 0 is then measured alone,
    // which the null backend allows because its launches never wait for a peer.
    let config = Config::default().with_policy(Policy::default().with_max_size(8 << 20));
    let mut ops: Vec<AllReduceRmsNorm<Null>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ThreadRendezvous::group(2, Duration::from_secs(10))
            .into_iter()
            .map(|mut rdv| scope.spawn(move || AllReduceRmsNorm::<Null>::new(&(), &mut rdv, config)))
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread").expect("operator")).collect()
    });
    let mut op = ops.swap_remove(0);
    let (rows, hidden) = (4usize, 4096usize);
    let elems = rows * hidden;
    // Aligned fake addresses: the null backend never dereferences them.
    let base = 1u64 << 40;
    let at = |i: u64| DevicePtr(base + i * (elems as u64 * 2).next_multiple_of(256));
    for (name, path) in [
        ("forward (dispatched: fused 1-stage), 4x4096 bf16", None),
        ("forward_on fused 2-stage, 4x4096 bf16", Some(Path::TwoStage)),
        (
            "forward_on unfused, 4x4096 bf16",
            Some(Path::Unfused { all_reduce: AllReduce::Custom, reason: FallbackReason::Disabled }),
        ),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                // SAFETY: the null backend never touches the memory behind these addresses.
                let args = unsafe {
                    Args::<Null, bf16> {
                        input: TensorRef::from_raw(at(0), elems),
                        residual: TensorRef::from_raw(at(1), elems),
                        weight: TensorRef::from_raw(at(2), hidden),
                        out: TensorMut::from_raw(at(3), elems),
                        residual_out: TensorMut::from_raw(at(4), elems),
                        eps: 1e-6,
                    }
                };
                let ran = match path {
                    None => op.forward(&(), args),
                    Some(path) => op.forward_on(&(), path, args),
                };
                black_box(ran.expect("forward"))
            })
        });
    }
}

criterion_group!(benches, host_path);
criterion_main!(benches);
