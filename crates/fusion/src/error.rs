//! The error type of `arfuse-fusion`: what a user of the operator sees.

use arfuse_kernels::DType;
use std::time::Duration;

/// Everything a call or the construction of an operator can refuse or report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two tensors of one call have different lengths.
    #[error("shape mismatch: {what} has {got} elements, expected {expected}")]
    ShapeMismatch {
        /// Which tensor.
        what: &'static str,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// The hidden size is not a multiple of the 16-byte pack.
    #[error("hidden size {hidden} is not a multiple of the pack ({pack} elements of {dtype})")]
    HiddenNotMultipleOfPack {
        /// The hidden size (the weight's length).
        hidden: usize,
        /// Elements per pack.
        pack: usize,
        /// The dtype.
        dtype: DType,
    },
    /// The hidden size is zero or beyond every kernel.
    #[error("hidden size {hidden} unsupported (1..={max})")]
    HiddenUnsupported {
        /// The hidden size.
        hidden: usize,
        /// The largest supported.
        max: usize,
    },
    /// A tensor is not aligned to 16 bytes.
    #[error("{what} at {ptr:#x} is not aligned to {align} bytes")]
    Misaligned {
        /// Which tensor.
        what: &'static str,
        /// Its address.
        ptr: u64,
        /// The required alignment.
        align: usize,
    },
    /// The world size is outside what this operator supports.
    #[error("world size {world_size} unsupported ({supported})")]
    WorldSizeUnsupported {
        /// The world size.
        world_size: usize,
        /// What is supported.
        supported: &'static str,
    },
    /// epsilon is NaN, infinite or negative.
    #[error("eps {eps} must be finite and non-negative")]
    BadEps {
        /// The value given.
        eps: f32,
    },
    /// Two tensors of a call overlap in a way the operator does not allow; nothing was launched.
    /// The only overlaps allowed are `residual_out == residual` and `out == input`, each the
    /// identical range (same address, same length).
    #[error(
        "{a} and {b} {}: the only overlaps allowed are residual_out == residual (residual updated \
         in place) and out == input (out written over the input), each the identical range; any \
         other overlap of input, residual, weight, out and residual_out is refused",
        if *.identical { "are the same memory" } else { "partly overlap" }
    )]
    Aliasing {
        /// The first tensor of the pair (in the order input, residual, weight, out, residual_out).
        a: &'static str,
        /// The second.
        b: &'static str,
        /// Whether the two are the identical range (else they overlap partly).
        identical: bool,
    },
    /// Per-group FP8 quantisation of a row whose hidden size is not a multiple of the group
    /// (128); nothing was launched.
    #[error("per-group FP8 quantisation needs a hidden size that is a multiple of {group}, not {hidden}")]
    QuantGroupUnsupported {
        /// The call's hidden size.
        hidden: usize,
        /// The group size (`arfuse_kernels::contract::QUANT_GROUP`).
        group: usize,
    },
    /// A static (per-tensor) FP8 scale that is not finite and positive; nothing was launched.
    #[error("the static FP8 scale {scale} must be finite and > 0")]
    BadQuantScale {
        /// The scale given.
        scale: f32,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The path needs the vendor collective library, which is not available.
    #[error("path needs the vendor collective library ({reason}), which is not available")]
    VendorUnavailable {
        /// Why the vendor library was needed.
        reason: String,
    },
    /// A peer did not arrive within the deadline; the operator is unusable afterwards.
    #[error("rank {rank}: peer rank {peer} did not respond within {deadline:?}")]
    PeerTimeout {
        /// This rank.
        rank: u32,
        /// The missing peer.
        peer: u32,
        /// The deadline.
        deadline: Duration,
    },
    /// A peer runs a different call (another shape, path or dtype, or it skipped a call).
    #[error("rank {rank}: peer rank {peer} runs a different call ({detail})")]
    CallMismatch {
        /// This rank.
        rank: u32,
        /// The peer that differs.
        peer: u32,
        /// Both calls, as the kernels described them.
        detail: String,
    },
    /// An earlier call failed in a way that leaves the shared buffers in an unknown state.
    #[error("operator unusable after an earlier failure ({0}); drop it and create a new group")]
    Poisoned(String),
    /// This rank's shared buffer does not fit in the shared-memory filesystem: the buffer's memory
    /// is reserved when the operator is created (so that a short `/dev/shm` is this error from
    /// `new`, never a `SIGBUS` in a later call), and the filesystem refused it. Nothing was left
    /// behind. Every rank of a group needs its own buffer in the same filesystem.
    #[error(
        "shared memory too small: this rank's buffer of {requested} bytes does not fit in {path} ({} free); \
         each rank of the group needs 64 KiB + max_size and its push region there: lower max_size \
         (Config::policy.max_size, env ARFUSE_MAX_SIZE; default 128 MiB) or give {path} more room \
         (e.g. docker run --shm-size)",
        free(*.available)
    )]
    SharedMemoryTooSmall {
        /// Bytes the buffer needs.
        requested: u64,
        /// Bytes the filesystem had free when it refused, where known.
        available: Option<u64>,
        /// The filesystem, `/dev/shm`.
        path: &'static str,
        /// The refusal as the device runtime reported it.
        #[source]
        source: arfuse_kernels::Error,
    },
    /// An error of the device runtime.
    #[error(transparent)]
    Kernels(arfuse_kernels::Error),
    /// An error of the rendezvous or the shared buffers.
    #[error(transparent)]
    Ipc(arfuse_ipc::Error),
}

/// `n bytes`, or `an unknown number of bytes`.
fn free(available: Option<u64>) -> String {
    available.map_or_else(|| "an unknown number of bytes".to_owned(), |n| format!("{n} bytes"))
}

impl From<arfuse_kernels::Error> for Error {
    /// The cross-rank failures a kernel reports (the CPU backend's launch errors, or the error word
    /// of a GPU kernel decoded by `arfuse_kernels::ErrorWord::to_error`) become the operator's own
    /// [`Error::PeerTimeout`] and [`Error::CallMismatch`];
    /// [`Error::SharedMemoryTooSmall`] for a short `/dev/shm` (so that the message names the
    /// operator's knob); [`Error::Kernels`] for everything else.
    fn from(e: arfuse_kernels::Error) -> Self {
        use arfuse_kernels::Error as K;
        match e {
            K::PeerTimeout { rank, peer, deadline_ms, .. } => {
                Error::PeerTimeout { rank, peer, deadline: Duration::from_millis(deadline_ms) }
            }
            K::CallMismatch { rank, peer, ours, theirs } => {
                Error::CallMismatch { rank, peer, detail: format!("ours: {ours}; theirs: {theirs}") }
            }
            K::ShmTooSmall { requested, available, path, .. } => {
                Error::SharedMemoryTooSmall { requested, available, path, source: e }
            }
            other => Error::Kernels(other),
        }
    }
}

impl From<arfuse_ipc::Error> for Error {
    /// A device-runtime error met while creating the shared buffers converts as
    /// [`From<arfuse_kernels::Error>`] does; everything else is [`Error::Ipc`].
    fn from(e: arfuse_ipc::Error) -> Self {
        match e {
            arfuse_ipc::Error::Kernels(k @ arfuse_kernels::Error::ShmTooSmall { .. }) => k.into(),
            other => Error::Ipc(other),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AllReduceRmsNorm, Config};
    use arfuse_kernels::api::Cpu;
    use arfuse_kernels::Backend;

    fn short() -> arfuse_kernels::Error {
        arfuse_kernels::Error::ShmTooSmall {
            requested: 201_392_128,
            available: Some(67_108_864),
            path: "/dev/shm",
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        }
    }

    #[test]
    fn a_short_dev_shm_names_the_size_and_the_knob_through_either_wrapping() {
        for err in [Error::from(short()), Error::from(arfuse_ipc::Error::Kernels(short()))] {
            assert!(
                matches!(
                    err,
                    Error::SharedMemoryTooSmall {
                        requested: 201_392_128,
                        available: Some(67_108_864),
                        path: "/dev/shm",
                        ..
                    }
                ),
                "{err:?}"
            );
            let text = err.to_string();
            for part in
                ["201392128 bytes", "/dev/shm (67108864 bytes free)", "Config::policy.max_size", "ARFUSE_MAX_SIZE"]
            {
                assert!(text.contains(part), "{part:?} missing from {text:?}");
            }
            let source = std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default();
            assert!(source.contains("201392128"), "source {source:?}");
        }
        // Every other error keeps its wrapping.
        let other = arfuse_kernels::Error::InvalidHandle("x".into());
        assert!(matches!(Error::from(other), Error::Kernels(arfuse_kernels::Error::InvalidHandle(_))));
        assert!(matches!(Error::from(arfuse_ipc::Error::Invalid("y".into())), Error::Ipc(_)));
    }

    /// Set in the child of the test below, which runs with a 64 MiB tmpfs (Docker's default) on
    /// `/dev/shm` in a mount namespace of its own.
    const CHILD: &str = "ARFUSE_FUSION_SMALL_SHM_CHILD";
    const DONE: &str = "small-shm operator child: all checks passed";

    #[test]
    fn the_default_operator_in_a_64_mib_dev_shm_is_refused_by_new() {
        let module = module_path!();
        let test = format!(
            "{}::the_default_operator_in_a_64_mib_dev_shm_is_refused_by_new",
            &module[module.find("::").map_or(0, |i| i + 2)..]
        );
        if std::env::var_os(CHILD).is_some() {
            let device = Cpu::open_device(0, 1).expect("cpu device");
            let mut group = arfuse_ipc::ThreadRendezvous::group(1, std::time::Duration::from_secs(5));
            // Default max_size 128 MiB: 64 KiB + 128 MiB per rank (receive area and scratch of
            // 64 MiB each; one rank, so the receive area has no rounding slack), and the push region.
            let config = Config::default();
            let push = arfuse_kernels::params::push_region_bytes(1, config.policy.push_slot_bytes_for(1));
            let err = AllReduceRmsNorm::<Cpu>::new(&device, &mut group[0], config).expect_err("128 MiB in 64 MiB");
            let expected = (65_536 + 2 * (64 << 20) + push) as u64;
            assert!(
                matches!(err, Error::SharedMemoryTooSmall { requested, .. } if requested == expected),
                "{err:?}, expected {expected} bytes"
            );
            assert!(err.to_string().contains("ARFUSE_MAX_SIZE"), "{err}");
            assert_eq!(std::fs::read_dir("/dev/shm").expect("read /dev/shm").count(), 0, "a segment was left behind");
            // The knob the message names: 32 MiB (32 MiB + 64 KiB + the push region) fits.
            let mut config = Config::default();
            config.policy.max_size = 32 << 20;
            let mut group = arfuse_ipc::ThreadRendezvous::group(1, std::time::Duration::from_secs(5));
            AllReduceRmsNorm::<Cpu>::new(&device, &mut group[0], config).expect("max_size 32 MiB in 64 MiB");
            println!("{DONE}");
            return;
        }
        let exe = std::env::current_exe().expect("current_exe");
        // util-linux unshare -m makes every mount private, so the tmpfs stays in the child's namespace.
        let output = std::process::Command::new("unshare")
            .args(["-m", "sh", "-c", "mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm && exec \"$0\" \"$@\""])
            .arg(exe)
            .args([test.as_str(), "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output();
        let output = match output {
            Ok(o) if o.status.success() || String::from_utf8_lossy(&o.stdout).contains("running 1 test") => o,
            Ok(o) => {
                println!(
                    "SKIP {test}: cannot mount a private 64 MiB tmpfs on /dev/shm (needs root and unshare -m): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return;
            }
            Err(e) => {
                println!("SKIP {test}: cannot run unshare: {e}");
                return;
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "child {}:\n{stdout}\n{stderr}", output.status);
        assert!(stdout.contains(DONE), "the child did not run its checks:\n{stdout}\n{stderr}");
    }
}
