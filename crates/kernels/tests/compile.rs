//! The CI compile check for AMD: the kernel source builds header-free with clang for gfx90a,
//! gfx942 and gfx950, every kernel is there, and the hot loops use 16-byte *global* loads
//! (`global_load_dwordx4`, never the slower `flat_load_dwordx4`). Skipped (loudly) without
//! clang-22 unless `ARFUSE_REQUIRE_COMPILERS` names `clang`.

use arfuse_kernels::{source, DType, KernelId, Op};
use std::process::Command;

fn tool(names: &[&str]) -> Option<String> {
    let rocm = std::env::var("ROCM_PATH").unwrap_or_else(|_| "/opt/rocm".into());
    let candidates = names
        .iter()
        .map(|n| format!("{rocm}/llvm/bin/{}", n.trim_end_matches("-22")))
        .chain(names.iter().map(|n| n.to_string()));
    candidates.into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

#[test]
fn kernels_compile_for_gfx90a_gfx942_gfx950_with_global_loads() {
    let (Some(clang), Some(objdump)) = (tool(&["clang++-22"]), tool(&["llvm-objdump-22"])) else {
        let why = "clang++-22 / llvm-objdump-22 not found (apt-get install clang-22 llvm-22)";
        arfuse_testkit::require_compiler(
            "clang",
            "kernels_compile_for_gfx90a_gfx942_gfx950_with_global_loads",
            Err(why),
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("arfuse-compile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("arfuse.hip");
    std::fs::write(&file, source::full_source()).expect("write source");
    for arch in ["gfx90a", "gfx942", "gfx950"] {
        let object = dir.join(format!("arfuse-{arch}.o"));
        let out = Command::new(&clang)
            .args(source::clang_hip_args(arch))
            .arg("-Werror")
            .arg("-o")
            .arg(&object)
            .arg(&file)
            .output()
            .expect("run clang");
        assert!(out.status.success(), "{arch}: {}", String::from_utf8_lossy(&out.stderr));
        let dis = Command::new(&objdump).arg("-d").arg(&object).output().expect("run llvm-objdump");
        let dis = String::from_utf8_lossy(&dis.stdout);
        for op in Op::ALL {
            for dtype in DType::ALL {
                let symbol = KernelId { op, dtype }.symbol();
                assert!(dis.contains(&format!("<{symbol}>:")), "{arch}: no kernel {symbol}");
            }
        }
        let global = dis.matches("global_load_dwordx4").count();
        let flat = dis.matches("flat_load_dwordx4").count();
        println!("clang {arch}: {global} global_load_dwordx4, {flat} flat_load_dwordx4");
        assert!(global >= 18, "{arch}: the hot loops do not use 16-byte global loads");
        assert_eq!(flat, 0, "{arch}: peer loads went through the flat address space");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
