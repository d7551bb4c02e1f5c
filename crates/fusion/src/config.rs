//! Operator configuration and every `ARFUSE_*` environment variable the operator reads.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `ARFUSE_USE_1STAGE` | `1`: always 1-stage (where the kernel can), `0`: always 2-stage | by size |
//! | `ARFUSE_ONE_STAGE_MAX_BYTES` | 1-stage iff bytes <= this | 0: by world size, `dispatch::default_one_stage_max_bytes` (2 MiB up to 2 ranks, 1 MiB up to 4, 512 KiB up to 8) |
//! | `ARFUSE_MAX_SIZE` | twice the largest call our kernels take (fused iff bytes <= half of it): each rank allocates a receive area and a scratch of half of it | 134217728 |
//! | `ARFUSE_DISABLE_FUSION` | `1`: always the unfused path | `0` |
//! | `ARFUSE_DEADLINE_MS` | how long a rank waits for a peer before failing | 5000 |
//! | `ARFUSE_TUNE_FILE` | a measured table of 1-stage thresholds per world size ([`crate::tune`]) | none |
//! | `ARFUSE_NORM` | `standard`: `w · x̂`; `gemma`: `(1 + w) · x̂`, weights stored as offsets ([`Norm`]) | `standard` |
//! | `ARFUSE_PUSH_SLOT_BYTES` | bytes of each push receive slot (the largest 1-stage call); 0: the 1-stage threshold | 0 |
//! | `ARFUSE_PROGRAMMATIC_MAX_WORLD` | the most ranks at which the fused kernel starts early on NVIDIA sm_90+ (programmatic dependent launch); 0: never. Read by arfuse-kernels once per process, at the first launch | 8 (every world size) |

use crate::dispatch::Policy;
use crate::{Error, Result};
pub use arfuse_kernels::contract::Norm;
use std::time::Duration;

/// Default time a rank waits for its peers before it reports [`Error::PeerTimeout`].
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

/// How an operator is built and dispatches.
///
/// `#[non_exhaustive]`: start from [`Config::default`] or [`Config::from_env`] and change what you
/// need with the `with_*` methods (or by assigning the public fields), so that a field added in a
/// later release does not break your build.
///
/// ```
/// use arfuse_fusion::{Config, Policy};
/// use std::time::Duration;
///
/// let config = Config::default()
///     .with_deadline(Duration::from_secs(10))
///     .with_policy(Policy::default().with_max_size(64 << 20));
/// assert_eq!(config.policy.max_size, 64 << 20);
/// config.validate().unwrap();
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// The dispatch policy.
    pub policy: Policy,
    /// How long a rank waits for a peer.
    pub deadline: Duration,
    /// A fault this rank injects into itself, for tests of how its peers fail
    /// (docs/reliability.md). Only with the `test-hooks` feature, which no production build
    /// should enable: [`Fault::AbortBetweenStages`] aborts the process. Neither
    /// [`Config::default`] nor [`Config::from_env`] ever sets it. The one field that may differ
    /// between the ranks.
    #[cfg(feature = "test-hooks")]
    pub fault: Option<Fault>,
    /// How RMSNorm applies its weight: [`Norm::Standard`] (`w · x̂`) or Gemma's
    /// [`Norm::GemmaOffset`] (`(1 + w) · x̂`, the checkpoint's weights used as they are). Every
    /// call and path of the operator uses it (`arfuse_kernels::contract`, "Epilogues").
    pub norm: Norm,
}

/// A fault injected on purpose at a point no test can reach from outside a call: between the
/// two stages of a 2-stage call (after the first kernel and its closing barrier, before the
/// local kernel that normalises the rows the other ranks own). It fires once, at the first 2-stage call of the operator.
///
/// Only with the `test-hooks` feature (tests of how peers fail; docs/reliability.md).
#[cfg(feature = "test-hooks")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The process aborts (`std::process::abort`, no destructor runs), as a crash there would.
    AbortBetweenStages,
    /// The rank sleeps this long there, as a rank stalled there (descheduled, stopped) would.
    StallBetweenStages(Duration),
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: Policy::default(),
            deadline: DEFAULT_DEADLINE,
            #[cfg(feature = "test-hooks")]
            fault: None,
            norm: Norm::Standard,
        }
    }
}

impl Config {
    /// `self` with the dispatch policy `policy`.
    #[must_use]
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// `self` with a rank waiting at most `deadline` for a peer.
    #[must_use]
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// `self` with RMSNorm's weight applied as `norm` says (Gemma's `(1 + w)`: [`Norm::GemmaOffset`]).
    pub fn with_norm(mut self, norm: Norm) -> Self {
        self.norm = norm;
        self
    }

    /// `self` with `fault` injected on this rank (feature `test-hooks`; see [`Config::fault`]).
    #[cfg(feature = "test-hooks")]
    #[must_use]
    pub fn with_fault(mut self, fault: Fault) -> Self {
        self.fault = Some(fault);
        self
    }

    /// The defaults, overridden by the `ARFUSE_*` environment variables.
    pub fn from_env() -> Result<Self> {
        Config::default().with_env(|name| std::env::var(name).ok())
    }

    /// `self`, overridden by the variables `lookup` returns (a seam for tests).
    pub fn with_env(mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let parse = |name: &str| -> Result<Option<u64>> {
            lookup(name)
                .map(|v| v.trim().parse::<u64>().map_err(|e| Error::Config(format!("{name}={v:?}: {e}"))))
                .transpose()
        };
        let parse_switch = |name: &str| -> Result<Option<bool>> {
            match parse(name)? {
                None => Ok(None),
                Some(0) => Ok(Some(false)),
                Some(1) => Ok(Some(true)),
                Some(other) => Err(Error::Config(format!("{name} must be 0 or 1, not {other}"))),
            }
        };
        if let Some(on) = parse_switch("ARFUSE_USE_1STAGE")? {
            self.policy.force_one_stage = Some(on);
        }
        if let Some(v) = parse("ARFUSE_ONE_STAGE_MAX_BYTES")? {
            self.policy.one_stage_max_bytes = v as usize;
        }
        if let Some(v) = parse("ARFUSE_MAX_SIZE")? {
            self.policy.max_size = v as usize;
        }
        if let Some(v) = parse("ARFUSE_DISABLE_FUSION")? {
            self.policy.enabled = v == 0;
        }
        if let Some(v) = parse("ARFUSE_DEADLINE_MS")? {
            self.deadline = Duration::from_millis(v);
        }
        if let Some(path) = lookup("ARFUSE_TUNE_FILE").filter(|p| !p.trim().is_empty()) {
            self.policy.apply(&crate::TuneTable::load(std::path::Path::new(path.trim()))?);
        }
        if let Some(v) = parse("ARFUSE_PUSH_SLOT_BYTES")? {
            self.policy.push_slot_bytes = v as usize;
        }
        if let Some(v) = lookup("ARFUSE_NORM") {
            self.norm = match v.trim() {
                "standard" => Norm::Standard,
                "gemma" => Norm::GemmaOffset,
                other => return Err(Error::Config(format!("ARFUSE_NORM must be standard or gemma, not {other:?}"))),
            };
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks the values for consistency.
    pub fn validate(&self) -> Result<()> {
        let max = self.policy.max_size;
        if max == 0 || max % 32 != 0 || max / 2 > u32::MAX as usize {
            return Err(Error::Config(format!("max_size {max} must be a positive multiple of 32 bytes below 8 GiB")));
        }
        if self.deadline.is_zero() {
            return Err(Error::Config("deadline must be positive".into()));
        }
        let slot = self.policy.push_slot_bytes;
        if slot % arfuse_kernels::PACK_BYTES != 0 || slot > max / 2 {
            return Err(Error::Config(format!(
                "push_slot_bytes {slot} must be a multiple of {} bytes, at most max_size / 2 = {}",
                arfuse_kernels::PACK_BYTES,
                max / 2
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn override_both_ways_and_garbage_refused() {
        let c = Config::default().with_env(env(&[("ARFUSE_USE_1STAGE", "1")])).expect("valid");
        assert_eq!(c.policy.force_one_stage, Some(true));
        let c = Config::default().with_env(env(&[("ARFUSE_USE_1STAGE", "0")])).expect("valid");
        assert_eq!(c.policy.force_one_stage, Some(false));
        assert!(Config::default().with_env(env(&[("ARFUSE_USE_1STAGE", "2")])).is_err());
        assert!(Config::default().with_env(env(&[("ARFUSE_MAX_SIZE", "abc")])).is_err());
        assert!(Config::default().with_env(env(&[("ARFUSE_MAX_SIZE", "100")])).is_err());
        assert!(Config::default().with_env(env(&[("ARFUSE_TUNE_FILE", "/nonexistent/arfuse-tune")])).is_err());
        let c = Config::default().with_env(env(&[])).expect("defaults");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn builder_methods_set_their_field_and_nothing_else() {
        let policy = Policy::default().with_max_size(1 << 20).with_force_one_stage(Some(false));
        let c = Config::default().with_policy(policy).with_deadline(Duration::from_millis(7));
        let mut expected = Config::default();
        expected.policy.max_size = 1 << 20;
        expected.policy.force_one_stage = Some(false);
        expected.deadline = Duration::from_millis(7);
        assert_eq!(c, expected);
        c.validate().expect("valid");
    }
}
