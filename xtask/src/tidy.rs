//! Tidy checks, run as tests (`cargo test -p xtask`): conventions that clippy does not check.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "target" || n == "snapshots") {
                    continue;
                }
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    fn sources() -> Vec<(PathBuf, String)> {
        let root = super::super::project_root();
        let mut files = Vec::new();
        rust_files(&root.join("crates"), &mut files);
        rust_files(&root.join("xtask"), &mut files);
        assert!(files.len() > 10, "tidy found too few files under {}", root.display());
        files
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                (p, text)
            })
            .collect()
    }

    #[test]
    fn every_file_starts_with_a_module_doc() {
        for (path, text) in sources() {
            let first = text.lines().next().unwrap_or_default();
            let is_main_test = path.ends_with("main.rs") || path.components().any(|c| c.as_os_str() == "tests");
            assert!(
                first.starts_with("//!") || (is_main_test && first.starts_with("//")),
                "{} must start with a `//!` line",
                path.display()
            );
        }
    }

    #[test]
    fn no_ignored_tests_or_leftovers() {
        // Built from pieces so this file does not trip its own check.
        let banned = [concat!("#[", "ignore"), concat!("todo", "!("), concat!("dbg", "!(")];
        for (path, text) in sources() {
            for b in banned {
                assert!(!text.contains(b), "{} contains {b}", path.display());
            }
        }
    }

    #[test]
    fn unsafe_only_in_allowed_places_and_always_justified() {
        for (path, text) in sources() {
            let p = path.to_string_lossy();
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let code = line.trim_start();
                if code.starts_with("//") || !code.contains(concat!("unsafe", " {")) {
                    continue;
                }
                assert!(!p.contains("crates/ipc/src"), "{}:{}: `unsafe` in arfuse-ipc", p, i + 1);
                let justified = lines[..i].iter().rev().take(6).any(|l| l.contains("SAFETY"));
                assert!(justified, "{}:{}: unsafe block without a `// SAFETY:` comment above", p, i + 1);
            }
        }
    }

    /// Library folders (and files) where FFI may live: arfuse-kernels' backends and the vendor
    /// collective binding (ARCHITECTURE.md, "Architecture invariants").
    const FFI_HOMES: [&str; 4] = [
        "crates/kernels/src/cpu/",
        "crates/kernels/src/cuda/",
        "crates/kernels/src/hip/",
        "crates/kernels/src/collective/",
    ];
    /// Library files outside [`FFI_HOMES`] that may hold `unsafe`: the GPU core and the `Backend`
    /// trait's default `fill_shared` (calls of the trait's unsafe copies on memory they own or
    /// bounds-checked, the `DeviceSlice` impls of `DeviceBuffer`), and the callers of arfuse's own
    /// unsafe launch/copy/replay methods (the operator, the separate FP8 quantisation, the bench
    /// runner).
    const UNSAFE_CALLERS: [&str; 5] = [
        "crates/kernels/src/gpu/",
        "crates/kernels/src/backend.rs",
        "crates/fusion/src/operator.rs",
        "crates/fusion/src/quantize.rs",
        "crates/bench/src/runner.rs",
    ];

    /// What marks foreign-function code: declared or loaded foreign symbols, pointer casts of them.
    const FFI_MARKERS: [&str; 5] = [concat!("extern \"C\"", " {"), "transmute", "libloading::", "libc::dl", "#[link("];

    /// The invariant of ARCHITECTURE.md holds for library code (`crates/<crate>/src/`): FFI only in
    /// [`FFI_HOMES`], any other `unsafe` only in [`UNSAFE_CALLERS`]. Tests, examples and benches
    /// may call arfuse's unsafe methods (and `libc` to kill a rank process) wherever they need to.
    #[test]
    fn unsafe_lives_where_architecture_md_says() {
        let root = super::super::project_root();
        let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap_or_default();
        for home in FFI_HOMES.iter().chain(&UNSAFE_CALLERS) {
            let named = home.trim_start_matches("crates/").trim_end_matches('/');
            let named = named.rsplit_once("/src/").map(|(_, f)| f).unwrap_or(named);
            assert!(architecture.contains(named), "ARCHITECTURE.md does not name {named} as a home of `unsafe`");
        }
        for (path, text) in sources() {
            let relative = path.strip_prefix(&root).unwrap_or(&path).to_string_lossy().replace('\\', "/");
            let library = relative.starts_with("crates/") && relative.contains("/src/");
            if !library {
                continue;
            }
            let in_ffi_home = FFI_HOMES.iter().any(|home| relative.starts_with(home));
            let may_call = in_ffi_home || UNSAFE_CALLERS.iter().any(|home| relative.starts_with(home));
            for (i, line) in text.lines().enumerate() {
                let code = line.trim_start();
                if code.starts_with("//") {
                    continue;
                }
                if let Some(marker) = FFI_MARKERS.iter().find(|m| code.contains(*m)) {
                    assert!(in_ffi_home, "{relative}:{}: FFI (`{marker}`) outside the kernels' backends", i + 1);
                }
                // Built from pieces so this file does not trip the check for justified blocks above.
                let uses = [concat!("unsafe", " {"), "unsafe impl", "unsafe fn", "unsafe extern"];
                let unsafe_code = uses.iter().any(|u| code.contains(u));
                assert!(
                    !unsafe_code || may_call,
                    "{relative}:{}: `unsafe` in a file ARCHITECTURE.md does not allow",
                    i + 1
                );
            }
        }
    }

    /// `major.minor.patch` → comparable numbers (a missing patch is 0).
    fn version(text: &str) -> [u64; 3] {
        let mut parts = text.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
        [parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0)]
    }

    /// The declared `rust-version` is true: no package Cargo.lock resolves (default features, every
    /// platform, dev-dependencies included) needs a newer Rust than the workspace says it needs.
    /// No other toolchain can be installed where CI runs, so this stands in for an MSRV build.
    #[test]
    fn rust_version_covers_every_dependency() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let output = std::process::Command::new(cargo)
            .args(["metadata", "--format-version", "1"])
            .current_dir(super::super::project_root())
            .output()
            .expect("cargo metadata runs");
        assert!(output.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&output.stderr));
        let meta: serde_json::Value = serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
        let ids = |value: &serde_json::Value| -> std::collections::HashSet<String> {
            value.as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect()
        };
        let members = ids(&meta["workspace_members"]);
        let resolved: std::collections::HashSet<String> = meta["resolve"]["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|node| node["id"].as_str().map(str::to_owned))
            .collect();
        let packages = meta["packages"].as_array().expect("cargo metadata lists packages");
        let needed = packages
            .iter()
            .filter(|p| p["id"].as_str().is_some_and(|id| resolved.contains(id) && !members.contains(id)))
            .filter_map(|p| {
                Some((
                    version(p["rust_version"].as_str()?),
                    format!("{} {}", p["name"].as_str()?, p["version"].as_str()?),
                ))
            })
            .max()
            .expect("some dependency declares a rust-version");
        for member in packages.iter().filter(|p| p["id"].as_str().is_some_and(|id| members.contains(id))) {
            let declared = member["rust_version"].as_str().unwrap_or("none");
            assert!(
                version(declared) >= needed.0,
                "{} declares rust-version {declared}, but {} needs {}.{}.{}: raise [workspace.package] rust-version",
                member["name"].as_str().unwrap_or("a member"),
                needed.1,
                needed.0[0],
                needed.0[1],
                needed.0[2],
            );
        }
    }
}
