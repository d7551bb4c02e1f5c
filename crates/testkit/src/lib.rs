//! # arfuse-testkit
//!
//! What every arfuse test, the demo and the bench share: seeded fixtures, an independent f64
//! reference of the numerics contract (`arfuse_kernels::contract`), ulp comparison, output poisoning, rank
//! harnesses (threads, processes) and a compact numerics summary for `insta` snapshots.
//!
//! | need | here |
//! |---|---|
//! | inputs for P ranks, shaped like real activations | [`Problem`], [`Fixture`] |
//! | the contract, computed independently (own rounding, f64 norm) | [`Reference`] |
//! | "within n ulp", bit-exact comparisons with readable reports | [`ulp_distance`], [`Mismatches`] |
//! | "every output element was written" | [`poison()`], [`poisoned`], [`unwritten`], [`assert_all_written`] |
//! | ranks as threads / as processes re-executing the test binary | [`run_threads`], [`child`], [`run_processes`] |
//! | one seed per test, overridable, printed on failure | [`TestSeed`] |
//! | skip loudly where a backend is missing, fail where it is required | [`require_backend`] |
//! | snapshot text split into invariant and backend-specific parts | [`NumericsSummary`] |
//!
//! It depends on `arfuse-kernels` only (for [`DType`] and [`Element`]), never on `ipc` or
//! `fusion`, so those crates can use it from their unit tests without a dependency cycle.
//! The reference deliberately does **not** call `arfuse_kernels::contract`: it decodes and rounds
//! storage values with its own code ([`float`]) so that a bug in the shared building blocks
//! makes tests fail instead of agreeing with itself.
//!
//! This is a test library: the `assert_*` helpers panic on purpose (that is the test failure),
//! and constructors panic on arguments that can only come from a broken test (documented under
//! `# Panics`). Everything that can fail for environmental reasons (spawning processes, creating
//! directories) returns [`HarnessError`].

pub mod error;
pub mod fixtures;
pub mod float;
pub mod harness;
pub mod poison;
pub mod quant;
pub mod reference;
pub mod seeds;
pub mod skip;
pub mod summary;
pub mod ulp;

pub use arfuse_kernels::{DType, Element};
pub use error::HarnessError;
pub use fixtures::{Fixture, Problem};
pub use harness::{
    assert_ranks_succeeded, check_ranks, child, fresh_private_dir, run_processes, run_processes_with, run_threads,
    run_threads_each, run_threads_timeout, ChildOutcome, ChildRank, PrivateDir, ProcessOptions,
};
pub use poison::{
    assert_all_written, is_poison, poison, poison_bits, poison_value, poisoned, unwritten, unwritten_ranges,
};
pub use reference::{Mismatch, Mismatches, Reference};
pub use seeds::TestSeed;
pub use skip::{require_backend, require_compiler};
pub use summary::{fnv1a64, NumericsSummary, Sample};
pub use ulp::{max_ulp, ulp_distance};

/// Re-exported so that [`with_dtype!`] works in crates that do not depend on `half` themselves.
pub use half;

/// Runs a generic body once with `$T` bound to the element type of a runtime [`DType`].
///
/// ```
/// use arfuse_testkit::{with_dtype, DType, Element};
/// let size = with_dtype!(DType::F16, T => std::mem::size_of::<T>() + (T::DTYPE == DType::F16) as usize);
/// assert_eq!(size, 3);
/// ```
#[macro_export]
macro_rules! with_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::Bf16 => {
                type $T = $crate::half::bf16;
                $body
            }
            $crate::DType::F16 => {
                type $T = $crate::half::f16;
                $body
            }
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
        }
    };
}

/// The libtest path (`module::path::name`, without the crate name) of a test function in the
/// calling module, for [`run_processes`]: `test_path!(my_test)`.
#[macro_export]
macro_rules! test_path {
    ($name:ident) => {
        $crate::harness::test_path_from(module_path!(), stringify!($name))
    };
}
