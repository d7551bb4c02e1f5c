//! The GPU conformance suite of `arfuse-kernels`, written once (generic over [`GpuBackend`]) and
//! instantiated per backend, as cubecl generates one suite per runtime: `cuda::<test>` with the
//! `cuda` feature, `hip::<test>` with `hip`. Ranks are simulated as threads of this process on
//! device 0 (each with its own stream, the device opened with `co_resident_ranks = world`), every
//! kernel compared bit for bit with the CPU backend running the same ranks as threads; two
//! processes over the runtime's IPC.
//!
//! Without a device, the runtime, or a way to build the kernels, each test prints `SKIP <backend>:
//! <reason> (<test>)` and passes, unless `ARFUSE_REQUIRE_BACKENDS` names the backend: then it fails
//! (`arfuse_testkit::require_backend`). On a GPU host:
//! `ARFUSE_REQUIRE_BACKENDS=cuda <test binary> cuda:: --test-threads=1 --nocapture` (or `hip::`).
//! The tests also take one lock, so they never share the GPU with each other: ranks that spin on
//! each other must all be resident at once.
//!
//! Shared buffer of each rank, as the `ipc` crate lays it out:
//! `[SIGNAL_BYTES signal][receive area][scratch][push region]`.

mod calls;
mod ipc;
mod ranks;
mod suite;

use arfuse_kernels::GpuBackend;
use std::sync::{Mutex, MutexGuard};

/// What the suite checks that only one backend has (its device's and shared memory's own
/// properties); everything else is common.
trait Specific: GpuBackend {
    /// Checks of a device opened for one rank.
    fn check_device(device: &Self::Device) {
        let _ = device;
    }
    /// Checks of a shared buffer and the handle exported for it.
    fn check_shared(shared: &Self::SharedBuffer, handle: &Self::IpcHandle) {
        let _ = (shared, handle);
    }
}

static GPU: Mutex<()> = Mutex::new(());

/// The GPU, locked for one test; `None` (after saying why) where the test cannot run.
/// `needs_kernels`: the test launches the arfuse kernels, so it needs a way to build them.
fn gpu<B: GpuBackend>(test: &str, needs_kernels: bool) -> Option<MutexGuard<'static, ()>> {
    let guard = GPU.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let available = match B::device_count() {
        Ok(0) => Err(format!("no {} device is visible", B::KIND)),
        Ok(_) if needs_kernels => B::kernels_available().map_err(|e| e.to_string()),
        Ok(_) => Ok(()),
        Err(err) => Err(err.to_string()),
    };
    arfuse_testkit::require_backend(B::KIND.name(), test, available).then_some(guard)
}

/// One `#[test]` per suite function, named as the function, calling it for `$backend` with the
/// test's libtest path (`cuda::kernels_match_the_cpu_backend`).
macro_rules! instantiate {
    ($module:ident, $backend:ty; $($test:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                crate::suite::$test::<$backend>(concat!(stringify!($module), "::", stringify!($test)));
            }
        )*
    };
}

/// The suite for one backend.
macro_rules! suite {
    ($module:ident, $backend:ty) => {
        instantiate!(
            $module, $backend;
            without_a_gpu_the_backend_says_so,
            device_memory_handles_and_events,
            kernels_match_the_cpu_backend,
            thousand_back_to_back_calls_stay_exact,
            a_lagging_rank_s_local_kernel_runs_while_its_peers_spin,
            every_call_with_the_device_epoch_advances_it_once,
            graph_replay_matches_eager,
            stalled_peer_times_out,
            a_peer_in_another_call_is_a_mismatch_and_nothing_is_written,
            ipc_two_processes,
            ipc_two_processes_exchange_data,
        );
    };
}

#[cfg(feature = "cuda")]
mod cuda {
    use arfuse_kernels::api::Cuda;

    impl super::Specific for Cuda {}

    suite!(cuda, Cuda);
}

#[cfg(feature = "hip")]
mod hip {
    use arfuse_kernels::api::Hip;
    use arfuse_kernels::hip::{HipDevice, HipIpcHandle, HipShared};

    impl super::Specific for Hip {
        fn check_device(device: &HipDevice) {
            assert!(device.arch().is_some(), "architecture not found: {device:?}");
        }
        fn check_shared(shared: &HipShared, handle: &HipIpcHandle) {
            println!("hip shared memory uncached: {}", shared.is_uncached());
            assert_eq!(handle.is_uncached(), shared.is_uncached());
        }
    }

    suite!(hip, Hip);
}
