//! Skipping a test that needs a backend or compiler this machine lacks: loudly (`SKIP <what>:
//! <why> (<test>)` on stdout), and never where the run asked for it: when
//! `ARFUSE_REQUIRE_BACKENDS` (backends: `cuda`, `hip`, `nccl`) or `ARFUSE_REQUIRE_COMPILERS`
//! (`nvrtc`, `clang`, `hiprtc`) names it, the skip is a failure instead. `cargo xtask test
//! --require cuda,nvrtc` sets both. Nothing is ignored, nothing returns silently.

use std::fmt::Display;

/// The comma-separated backends whose tests must run, not skip.
pub const REQUIRE_BACKENDS_ENV: &str = "ARFUSE_REQUIRE_BACKENDS";
/// The comma-separated compilers whose tests must run, not skip.
pub const REQUIRE_COMPILERS_ENV: &str = "ARFUSE_REQUIRE_COMPILERS";

/// Whether `list` (separated by `,`, `;`, `:` or white space) names `name`, case-insensitively.
pub fn names(list: &str, name: &str) -> bool {
    list.split([',', ';', ':', ' ']).any(|entry| entry.trim().eq_ignore_ascii_case(name))
}

/// Whether the environment variable `env` names `name` (see [`names`]).
pub fn required(env: &str, name: &str) -> bool {
    std::env::var(env).is_ok_and(|list| names(&list, name))
}

/// Prints why `test` does not run here and returns `false`, for what no configuration can require
/// (a property of the machine, such as too few GPUs for a world size).
pub fn skip(what: &str, test: &str, why: impl Display) -> bool {
    println!("SKIP {what}: {why} ({test})");
    false
}

/// Whether `test`, which needs `backend`, can run: `true` when `availability` is `Ok`. Otherwise
/// it prints `SKIP <backend>: <why> (<test>)` and returns `false`, or, where
/// `ARFUSE_REQUIRE_BACKENDS` names `backend`, panics (the test fails).
///
/// ```no_run
/// # fn device_count() -> Result<usize, String> { Ok(0) }
/// let available = device_count().and_then(|n| if n > 0 { Ok(()) } else { Err("no device".into()) });
/// if !arfuse_testkit::require_backend("cuda", "my_test", available) {
///     return;
/// }
/// ```
#[track_caller]
pub fn require_backend<E: Display>(backend: &str, test: &str, availability: Result<(), E>) -> bool {
    require(REQUIRE_BACKENDS_ENV, backend, test, availability)
}

/// [`require_backend`] for a compiler (`nvrtc`, `clang`, `hiprtc`), required by
/// `ARFUSE_REQUIRE_COMPILERS`.
#[track_caller]
pub fn require_compiler<E: Display>(compiler: &str, test: &str, availability: Result<(), E>) -> bool {
    require(REQUIRE_COMPILERS_ENV, compiler, test, availability)
}

#[track_caller]
fn require<E: Display>(env: &str, what: &str, test: &str, availability: Result<(), E>) -> bool {
    decide(env, std::env::var(env).ok().as_deref(), what, test, availability)
}

/// [`require`] with the variable's value given.
#[track_caller]
fn decide<E: Display>(env: &str, list: Option<&str>, what: &str, test: &str, availability: Result<(), E>) -> bool {
    match availability {
        Ok(()) => true,
        Err(why) if list.is_some_and(|list| names(list, what)) => {
            panic!("{test}: {env} names {what}, but it is unavailable: {why}")
        }
        Err(why) => skip(what, test, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_read_the_way_xtask_writes_them() {
        assert!(names("cuda,nvrtc,clang", "nvrtc"));
        assert!(names(" cuda ; HIP ", "hip"));
        assert!(names("nccl:cuda", "cuda"));
        assert!(!names("cuda-dynamic,hipx", "cuda"));
        assert!(!names("", "cuda"));
    }

    #[test]
    fn an_available_backend_runs_and_a_missing_one_skips() {
        assert!(decide(REQUIRE_BACKENDS_ENV, Some("cuda"), "cuda", "t", Ok::<(), String>(())));
        assert!(!decide(REQUIRE_BACKENDS_ENV, Some("hip,nccl"), "cuda", "t", Err("no device")));
        assert!(!decide(REQUIRE_BACKENDS_ENV, None, "cuda", "t", Err("no device")));
    }

    #[test]
    #[should_panic(expected = "t: ARFUSE_REQUIRE_BACKENDS names cuda, but it is unavailable: no device")]
    fn a_required_backend_that_is_missing_fails() {
        decide(REQUIRE_BACKENDS_ENV, Some("hip,cuda"), "cuda", "t", Err("no device"));
    }
}
