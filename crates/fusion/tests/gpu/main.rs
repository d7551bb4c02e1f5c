//! The operator on the GPU backends, written once (generic over [`GpuBackend`]) and instantiated
//! per backend: `cuda::<test>` with the `cuda` feature, `hip::<test>` with `hip`. Ranks are threads
//! sharing one GPU (peer pointers, no IPC) or processes over the runtime's IPC; every path, graph
//! replay with nothing registered, a dead rank, leaks; checked against the testkit reference
//! and against each other.
//!
//! Skips loudly without a GPU; fails instead when `ARFUSE_REQUIRE_BACKENDS` names the backend
//! (`arfuse_testkit::require_backend`). On a GPU host:
//! `ARFUSE_REQUIRE_BACKENDS=cuda <test binary> cuda:: --test-threads=1 --nocapture` (or `hip::`).

#[cfg(feature = "cuda")]
mod cudarc_tensors;
mod epilogues;
mod graphs;
mod paths;
mod processes;

use std::sync::RwLock;

use arfuse_fusion::{AllReduce, FallbackReason, Path};
use arfuse_kernels::GpuBackend;

/// The unfused path with our own all-reduce, forced.
const UNFUSED: Path = Path::Unfused { all_reduce: AllReduce::Custom, reason: FallbackReason::Disabled };

/// Whether `test` can run on `B` here: a device is visible (else it skips loudly, or fails where
/// `ARFUSE_REQUIRE_BACKENDS` names the backend).
fn gpu_available<B: GpuBackend>(test: &str) -> bool {
    let available = match B::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err(format!("no {} device", B::KIND)),
        Err(e) => Err(e.to_string()),
    };
    arfuse_testkit::require_backend(B::KIND.name(), test, available)
}

/// The device, shared by the tests of this binary (`read`) or held by one alone (`write`): a test
/// that measures the device-wide free memory must not see other tests allocate and free beside it
/// (the leak test failed that way on 2026-12-01 when run with the default test threads).
static DEVICE: RwLock<()> = RwLock::new(());

/// One `#[test]` per suite function, named as the function, calling it for `$backend` with the
/// test's libtest path (`cuda::one_captured_graph_replayed_many_times_stays_exact`), which the
/// process tests re-run in their child ranks; `$lock` is how it holds [`DEVICE`].
macro_rules! instantiate {
    ($backend:ty; $($module:ident :: $test:ident : $lock:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                let _device = crate::DEVICE.$lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                crate::$module::$test::<$backend>(&arfuse_testkit::test_path!($test));
            }
        )*
    };
}

/// The suite for one backend.
macro_rules! suite {
    ($backend:ty) => {
        instantiate!(
            $backend;
            paths::operator_every_path_matches_the_reference: read,
            epilogues::every_epilogue_on_every_path_is_exact: read,
            epilogues::the_separate_quantisation_kernel_is_exact: read,
            epilogues::every_16_bit_value_quantises_exactly: read,
            graphs::one_captured_graph_replayed_many_times_stays_exact: read,
            graphs::graphs_of_every_path_replay_with_nothing_registered: read,
            graphs::graphs_of_every_path_replay_with_nothing_registered_over_ipc: read,
            graphs::a_graph_of_many_two_stage_calls_replays_exact: read,
            processes::operators_over_ipc_created_and_dropped_leak_no_fd_and_no_device_memory: write,
            processes::a_dead_rank_process_makes_its_peer_time_out_not_hang: read,
        );
    };
}

#[cfg(feature = "cuda")]
mod cuda {
    suite!(arfuse_kernels::api::Cuda);

    /// The cuda backend alone: an engine's cudarc tensors on its own cudarc stream.
    #[test]
    fn cudarc_tensors_on_the_engines_own_stream_in_place_out_of_place_and_captured() {
        let _device = crate::DEVICE.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let test =
            arfuse_testkit::test_path!(cudarc_tensors_on_the_engines_own_stream_in_place_out_of_place_and_captured);
        crate::cudarc_tensors::cudarc_tensors_on_the_engines_own_stream_in_place_out_of_place_and_captured(&test);
    }
}

#[cfg(feature = "hip")]
mod hip {
    suite!(arfuse_kernels::api::Hip);
}
