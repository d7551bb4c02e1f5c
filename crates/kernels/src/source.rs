//! The portable kernel source (one text for CUDA and HIP) and how to compile and launch it.
//!
//! `gpu/arfuse.h` is the portability header, `gpu/kernels.cu` the kernels; [`full_source`]
//! inlines the header so NVRTC and hipRTC need no include path. The same text and flags are what
//! the compile checks in CI use.

use crate::{KernelId, LaunchParams, Op, MAX_BLOCKS};

/// The portability header.
pub const HEADER: &str = include_str!("gpu/arfuse.h");
/// The kernels.
pub const KERNELS: &str = include_str!("gpu/kernels.cu");

/// Largest number of 16-byte packs in a row (the sum-of-squares tree lives in shared memory):
/// hidden 32768 for bf16/f16, 16384 for f32. Mirrors `ARFUSE_MAX_ROW_PACKS`.
pub const MAX_ROW_PACKS: usize = 4096;
/// The largest hidden size the kernels take for `dtype` ([`MAX_ROW_PACKS`] packs): 32768 for
/// bf16/f16, 16384 for f32. Every path runs the same row routine, so this is the one limit on the
/// hidden size (the operator refuses anything beyond it before dispatch).
pub const fn max_hidden(dtype: crate::DType) -> usize {
    MAX_ROW_PACKS * dtype.pack_elems()
}
/// Packs each thread keeps in registers (`ARFUSE_MAX_PACKS_PER_THREAD`).
const MAX_PACKS_PER_THREAD: usize = 4;
/// Threads per block of the element-wise kernels.
const ELEMENTWISE_THREADS: u32 = 512;

/// The whole source, header inlined.
pub fn full_source() -> String {
    KERNELS.replace("#include \"arfuse.h\"", HEADER)
}

/// The FNV-1a 64 offset basis: the hash of no bytes.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a 64 of `hash` (a running hash, [`FNV_OFFSET`] to start) extended by `bytes`.
pub fn fnv1a_extend(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// FNV-1a 64 of `bytes`: the one hash of the workspace (source hash, cache keys and checksums, the
/// test kit's snapshot digests). Stable across hosts and releases.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_extend(FNV_OFFSET, bytes)
}

/// A stable 64-bit FNV-1a hash of [`full_source`] (cache keys, offline image names).
pub fn source_hash() -> u64 {
    fnv1a(full_source().as_bytes())
}

/// Where an offline-built AMD code object of this source for `arch` lives, relative to the
/// directory named by `ARFUSE_KERNEL_DIR`: `<arch>/arfuse-<source hash, 16 hex digits>.hsaco`.
/// `cargo xtask kernels --emit DIR` writes there and the hip backend's loader
/// (`hip::offline_image_path`, which a test holds to this) reads from there.
pub fn offline_hsaco_path(arch: &str, source_hash: u64) -> String {
    format!("{arch}/arfuse-{source_hash:016x}.hsaco")
}

/// NVRTC options for `arch` (`sm_90`, `compute_90`, ...): no FMA contraction, IEEE division and
/// square root, no flush to zero (the numerics contract).
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    [
        &format!("--gpu-architecture={arch}"),
        "--std=c++17",
        "--fmad=false",
        "--prec-div=true",
        "--prec-sqrt=true",
        "--ftz=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The `-D` options of `ARFUSE_KERNEL_DEFINES` (space-separated; anything else in it is ignored):
/// how a measurement builds the kernels with a stage left out (the `ARFUSE_EXP_*` switches of
/// `gpu/kernels.cu`, which give wrong results on purpose; see docs/performance.md). Part of the
/// compiler options, so of the disk cache's key. Unset in normal use.
pub fn experiment_defines() -> Vec<String> {
    std::env::var("ARFUSE_KERNEL_DEFINES")
        .map(|v| v.split_whitespace().filter(|d| d.starts_with("-DARFUSE_EXP_")).map(str::to_string).collect())
        .unwrap_or_default()
}

/// clang arguments compiling the source (as a file, `-x hip`) for AMD `arch` (`gfx942`, ...),
/// header-free; add `-o OUT FILE`.
pub fn clang_hip_args(arch: &str) -> Vec<String> {
    [
        "-x",
        "hip",
        &format!("--offload-arch={arch}"),
        "--cuda-device-only",
        "--no-gpu-bundle-output",
        "-nogpuinc",
        "-nogpulib",
        "-mcode-object-version=5",
        "-O3",
        "-ffp-contract=off",
        "-std=c++17",
        "-c",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// How to launch one kernel: grid and block sizes and dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in the grid (x dimension only).
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
    /// Launched as a programmatic dependent of the kernel before it in the stream, where the
    /// backend has that (CUDA on sm_90 and later: `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`;
    /// elsewhere a plain launch): the kernel's blocks may be scheduled while that kernel finishes,
    /// and wait for it in `wait_for_prior_grid` (gpu/arfuse.h) before reading memory. Only for
    /// kernels that call it first, and that release their own dependents no earlier than when
    /// their blocks depend on nothing else (see [`programmatic_launch`]).
    pub programmatic: bool,
}

/// The most ranks at which the fused kernel is launched as a programmatic dependent: every world
/// size (8), or `ARFUSE_PROGRAMMATIC_MAX_WORLD` (0 turns it off; read once per process). Measured
/// on one H200 shared by the ranks (docs/performance.md, 2026-12-02): 0.7–1.5 µs off every decode
/// call at 2 and 4 ranks, 1.0 µs at 8 (1×4096). It was held at 4 while 8 ranks hung with it, until
/// the release was found to come from the header-checking warp too early (kernels.cu `fused_rows`).
pub const DEFAULT_PROGRAMMATIC_MAX_WORLD: u32 = 8;

/// Whether `op` at `world` ranks is launched as a programmatic dependent
/// ([`LaunchConfig::programmatic`]): the fused 1-stage kernels (plain and with the epilogue) up to
/// [`DEFAULT_PROGRAMMATIC_MAX_WORLD`] ranks, unless `ARFUSE_KERNEL_DEFINES` holds
/// `-DARFUSE_EXP_NO_PDL` (a measurement of what it saves).
///
/// The kernel's blocks then start while the kernel before it ends. They wait for it before their
/// first read, and release the next call's kernel only once every peer's data for their rows has
/// arrived: by then every peer's blocks of the call are running, and none of ours needs anything
/// more from a peer, so blocks that start early never keep a peer's blocks off the multiprocessors
/// they wait for (the co-residency rule of [`resident_blocks`] still holds). A block's release
/// takes effect at its first thread's, so only threads that waited for a pack of the block's
/// row from every peer release: a header checker has seen only the peers' block 0.
pub fn programmatic_launch(op: Op, world: u32) -> bool {
    static MAX_WORLD: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let max_world = *MAX_WORLD.get_or_init(|| {
        if experiment_defines().iter().any(|d| d == "-DARFUSE_EXP_NO_PDL") {
            return 0;
        }
        std::env::var("ARFUSE_PROGRAMMATIC_MAX_WORLD")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_PROGRAMMATIC_MAX_WORLD)
    });
    op.plain() == Op::FusedOneStage && world <= max_world
}

/// The launch configuration of `kernel` for `params` on a device with `sm_count` multiprocessors
/// (compute units) available to this rank and a warp (wavefront) of `warp_size` threads.
///
/// Kernels that wait on peers use at most [`resident_blocks`] blocks (and [`MAX_BLOCKS`]), so that
/// every rank's blocks are resident together; the grid depends only on the shape and `sm_count`,
/// so every rank launches the same grid.
pub fn launch_config(kernel: KernelId, params: &LaunchParams, sm_count: u32, warp_size: u32) -> LaunchConfig {
    let warp = warp_size.max(1);
    let sm_count = sm_count.max(1);
    let rows = params.rows;
    let elems = u64::from(rows) * u64::from(params.hidden);
    let packs = elems / kernel.dtype.pack_elems() as u64;
    if packs == 0 {
        // A cross-rank call with nothing to move still exchanges its call header (it counts as a
        // call on every rank); a local kernel has nothing to do.
        let grid = u32::from(kernel.op.crosses_ranks());
        return LaunchConfig {
            grid,
            block: warp,
            shared_bytes: 0,
            programmatic: programmatic_launch(kernel.op, params.world_size),
        };
    }
    let row_packs = params.hidden / kernel.dtype.pack_elems() as u32;
    let row_threads = row_packs.next_multiple_of(warp).clamp(warp, 1024);
    debug_assert!(row_packs as usize <= MAX_ROW_PACKS && row_packs <= row_threads * MAX_PACKS_PER_THREAD as u32);
    // The local row kernels (the unfused path's and 2-stage's second kernels, the separate
    // quantisation) run their rows at four packs a thread, in the fewest threads that hold a row:
    // such a kernel can start on a rank while its peers' next cross-rank kernels already spin,
    // spread over the multiprocessors by the scheduler, and a block that needs a whole
    // multiprocessor (1024 threads at 64 registers) may then find none free; a small one always
    // finds room (measured: 4 ranks on one H200, a 1024-thread second kernel waited until its
    // peers' deadline). The row routine's tree is the same at any width (kernels.cu `norm_row`).
    let local_row_threads = row_packs.div_ceil(MAX_PACKS_PER_THREAD as u32).next_multiple_of(warp).clamp(warp, 1024);
    let elementwise = |work: u64, cap: u32| -> u32 {
        work.div_ceil(u64::from(ELEMENTWISE_THREADS)).min(u64::from(cap)).max(1) as u32
    };
    let (grid, block) = match kernel.op {
        Op::FusedOneStage | Op::FusedOneStageEpilogue => {
            // One warp more than the row's packs, where it fits and every row still gets a block
            // of its own: its threads check the peers' call headers while the others wait for
            // the data (kernels.cu `check_headers`), one round trip off a call.
            let with_checkers = row_threads + warp;
            let spare =
                row_packs <= row_threads && with_checkers <= 1024 && rows <= resident_blocks(sm_count, with_checkers);
            let block = if spare { with_checkers } else { row_threads };
            (rows.min(resident_blocks(sm_count, block)), block)
        }
        Op::AddRmsNorm | Op::AddRmsNormEpilogue => (rows.min(65_535), local_row_threads),
        Op::ScratchAddRmsNorm | Op::ScratchAddRmsNormEpilogue => {
            // The rows the other ranks own (kernels.cu `chunk_of`); none: nothing to launch.
            // Where rows have more than 1024 packs, the first kernel normalised none (kernels.cu
            // `owner_normalises`): every row.
            let world = params.world_size.max(1) as usize;
            let owned = crate::params::chunk_range(params.rank as usize, world, rows as usize).len();
            let ours = if row_packs <= 1024 { owned } else { 0 };
            ((rows as usize - ours).min(65_535) as u32, local_row_threads)
        }
        Op::FusedTwoStage | Op::FusedTwoStageEpilogue => {
            // A block per row of the largest chunk, at most as many as stay resident.
            let chunk = crate::params::chunk_len(rows as usize, params.world_size.max(1) as usize) as u32;
            (chunk.min(resident_blocks(sm_count, row_threads)).max(1), row_threads)
        }
        Op::AllReduceOneStage => {
            (elementwise(packs, resident_blocks(sm_count, ELEMENTWISE_THREADS)), ELEMENTWISE_THREADS)
        }
        Op::ReduceScatter => {
            let chunk = packs.div_ceil(u64::from(params.world_size.max(1)));
            (elementwise(chunk, resident_blocks(sm_count, ELEMENTWISE_THREADS)), ELEMENTWISE_THREADS)
        }
        Op::AllGather => (elementwise(packs, 65_535), ELEMENTWISE_THREADS),
        // A block per row, like the row routine's local kernels (per-token scales are a block's).
        Op::QuantizeFp8 => (rows.min(65_535), local_row_threads),
    };
    LaunchConfig { grid, block, shared_bytes: 0, programmatic: programmatic_launch(kernel.op, params.world_size) }
}

/// How many blocks of `block` threads a cross-rank kernel may launch on `sm_count` multiprocessors
/// (compute units) with every block resident at once: `sm_count × min(1024 / block, 16)`, at most
/// [`MAX_BLOCKS`]. Every kernel is compiled to fit a 1024-thread block on one multiprocessor
/// (`ARFUSE_LAUNCH_BOUNDS`: at most 64 registers per thread on NVIDIA, 128 VGPRs on AMD), so
/// `1024 / block` blocks of `block` threads take no more registers and threads than that one
/// block; 16 blocks is the smallest per-multiprocessor block limit of the GPUs we run on (NVIDIA
/// sm_75, AMD gfx9), and a block's ~1 KiB of shared memory fits 16 times everywhere. Blocks of a
/// spinning kernel that were not resident could wait for peers that cannot start.
pub fn resident_blocks(sm_count: u32, block: u32) -> u32 {
    let per_sm = (1024 / block.max(1)).clamp(1, 16);
    sm_count.max(1).saturating_mul(per_sm).min(MAX_BLOCKS as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    fn params(rows: u32, hidden: u32, world: u32) -> LaunchParams {
        LaunchParams { rows, hidden, world_size: world, ..LaunchParams::default() }
    }

    #[test]
    fn grids_fit_and_rows_are_covered() {
        for op in Op::ALL {
            for dtype in [DType::Bf16, DType::F16] {
                for (rows, hidden) in [(1, 2880), (81, 8192), (8192, 4096), (1, 32768), (3, 16384)] {
                    let kernel = KernelId { op, dtype };
                    let c = launch_config(kernel, &params(rows, hidden, 4), 132 / 4, 32);
                    // (Rank 0's second 2-stage kernel has nothing to do in a 1-row call: it owns the row.)
                    let idle = op.plain() == Op::ScratchAddRmsNorm && rows == 1 && hidden <= 8192;
                    assert!(c.grid >= u32::from(!idle), "{kernel} {rows}x{hidden}: {c:?}");
                    assert!(c.block <= 1024 && c.block % 32 == 0, "{kernel} {rows}x{hidden}: {c:?}");
                    if op.crosses_ranks() {
                        let resident = 33 * (1024 / c.block).min(16);
                        assert!(c.grid <= resident && c.grid as usize <= MAX_BLOCKS, "{kernel}: {c:?}");
                    }
                    let row_packs = hidden as usize / dtype.pack_elems();
                    assert!(
                        row_packs <= c.block as usize * MAX_PACKS_PER_THREAD
                            || !matches!(
                                op.plain(),
                                Op::FusedOneStage
                                    | Op::AddRmsNorm
                                    | Op::ScratchAddRmsNorm
                                    | Op::QuantizeFp8
                                    | Op::FusedTwoStage
                            )
                    );
                }
            }
        }
        let fused = KernelId { op: Op::FusedOneStage, dtype: DType::Bf16 };
        assert_eq!(launch_config(fused, &params(1, 4096, 2), 66, 32).block, 544, "a warp of header checkers");
        assert_eq!(launch_config(fused, &params(1, 8192, 2), 66, 32).block, 1024, "no room for one");
        let many = launch_config(fused, &params(128, 4096, 2), 66, 32);
        assert_eq!((many.grid, many.block), (128, 512), "a block per row beats the checkers");
        let empty = launch_config(KernelId { op: Op::FusedOneStage, dtype: DType::Bf16 }, &params(0, 4096, 2), 132, 32);
        assert_eq!(empty.grid, 1, "a zero-row call still exchanges its header");
        let empty = launch_config(KernelId { op: Op::AddRmsNorm, dtype: DType::Bf16 }, &params(0, 4096, 2), 132, 32);
        assert_eq!(empty.grid, 0);
        // The fused 2-stage path: the first kernel a block per row of a chunk (the same grid on
        // every rank), the second one per row another rank owns, or per row where rows are wider
        // than a block (the first kernel then normalises none).
        let two = |op, rows, hidden, world, rank| {
            let p = LaunchParams { rank, ..params(rows, hidden, world) };
            launch_config(KernelId { op, dtype: DType::Bf16 }, &p, 66, 32)
        };
        for rank in 0..3 {
            assert_eq!(two(Op::FusedTwoStage, 10, 4096, 3, rank).grid, 4, "rank {rank}: ceil(10 / 3) rows");
        }
        assert_eq!(two(Op::FusedTwoStage, 8192, 4096, 2, 1).grid, 132, "as many as stay resident");
        let others: Vec<u32> = (0..3).map(|rank| two(Op::ScratchAddRmsNorm, 10, 4096, 3, rank).grid).collect();
        assert_eq!(others, [6, 6, 8], "rows 0..4, 4..8, 8..10 owned");
        assert_eq!(two(Op::ScratchAddRmsNorm, 1, 4096, 2, 1).grid, 1, "rank 1 owns no row of 1");
        assert_eq!(two(Op::ScratchAddRmsNorm, 10, 16384, 3, 0).grid, 10, "wide rows: every row");
        // The local row kernels run at four packs a thread in the fewest threads (a block never
        // needs a whole multiprocessor below 4096 packs a row).
        for op in [Op::ScratchAddRmsNorm, Op::AddRmsNorm, Op::QuantizeFp8, Op::AddRmsNormEpilogue] {
            let block = |hidden| two(op, 64, hidden, 2, 1).block;
            assert_eq!([block(2880), block(4096), block(8192), block(16384), block(32768)], [96, 128, 256, 512, 1024]);
        }
    }

    /// Only the fused 1-stage kernels (plain and with the epilogue) wait for the kernel before it (`wait_for_prior_grid` before
    /// its first read) and releases its dependents late enough (kernels.cu `fused_rows`); every
    /// other kernel reads memory from its first instruction, so it must start after the one before.
    #[test]
    fn only_the_fused_kernel_is_a_programmatic_dependent() {
        for op in Op::ALL {
            for rows in [0, 1, 200] {
                let c = launch_config(KernelId { op, dtype: DType::Bf16 }, &params(rows, 4096, 2), 66, 32);
                assert_eq!(c.programmatic, op.plain() == Op::FusedOneStage, "{op:?} {rows} rows");
            }
            let c = launch_config(KernelId { op, dtype: DType::Bf16 }, &params(16, 4096, 8), 16, 32);
            assert_eq!(c.programmatic, op.plain() == Op::FusedOneStage, "{op:?} at 8 ranks");
        }
        // The release comes only from threads that waited for a pack of the row (a block's first
        // release counts for it; the header-checking warp has seen only the peers' block 0).
        let releases: Vec<&str> = KERNELS.lines().filter(|l| l.contains("release_dependent_grid();")).collect();
        assert_eq!(releases.len(), 1, "one release site: {releases:?}");
        assert!(releases[0].contains("tid_x() < n_packs"), "released by pack holders only: {}", releases[0]);
        for (entry, early) in [
            ("fused_ar_rmsnorm_1stage_##dtype", "load_early<E>(p)"),
            ("fused_ar_rmsnorm_1stage_epi_##dtype", "load_early<Epi<E>>(p)"),
        ] {
            let body = KERNELS.split(&format!("ARFUSE_KERNEL({entry})")).nth(1).unwrap_or_default();
            let first_statement = body.lines().nth(1).unwrap_or_default();
            assert!(first_statement.contains(early), "{entry} starts with {early}: {first_statement}");
        }
        let load_early = KERNELS.split("Early<E> load_early(const LaunchParams& p) {").nth(1).unwrap_or_default();
        let before_wait = load_early.split("wait_for_prior_grid();").next().unwrap_or_default();
        assert!(!before_wait.contains("load_pack") && !before_wait.contains("load16"), "nothing read before the wait");
    }

    /// `cargo xtask kernels --emit` and the hip backend agree on where offline code objects live.
    #[cfg(feature = "hip")]
    #[test]
    fn offline_images_are_where_the_hip_loader_looks() {
        let dir = std::path::Path::new("/opt/arfuse/kernels");
        let hash = source_hash();
        assert_eq!(crate::hip::offline_image_path(dir, "gfx942", hash), dir.join(offline_hsaco_path("gfx942", hash)));
    }

    /// The kernel source writes each cross-rank kernel's op code and each element type's dtype
    /// code into its call headers as literals (`cross_rank<E, ..>(p, 3, ..)`, `kCode = 1`); the one
    /// owner of those numbers is Rust ([`Op::code`], the `DType` discriminant), and this holds the
    /// source to them.
    #[test]
    fn the_kernel_source_writes_rusts_op_and_dtype_codes() {
        let lines: Vec<&str> = KERNELS.lines().collect();
        let mut seen = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let Some(rest) = line.split("ARFUSE_KERNEL(").nth(1).filter(|_| !line.contains("#define")) else {
                continue;
            };
            let Some((stem, _)) = rest.split_once("_##dtype") else { continue };
            let op = Op::ALL.iter().copied().find(|op| op.stem() == stem);
            let op = op.unwrap_or_else(|| panic!("kernel {stem} is no Op"));
            // The entry's body: up to its closing line (a few lines), not into the next entry.
            let body: Vec<&str> = lines[i..].iter().take(4).copied().collect();
            let body = body.join(" ");
            let body = body.split("ARFUSE_KERNEL(").take(2).collect::<Vec<_>>().join("");
            let code = body.split("cross_rank<").nth(1).map(|call| {
                let after = call.split_once("(p, ").map(|(_, after)| after).unwrap_or_default();
                after.split(',').next().unwrap_or_default().trim().parse::<u64>().unwrap_or(u64::MAX)
            });
            match code {
                Some(code) => {
                    assert_eq!(code, op.code(), "{stem}: op code {code} in kernels.cu, Op::code() {}", op.code())
                }
                None => assert!(!op.crosses_ranks(), "{stem} crosses ranks but sends no header"),
            }
            seen.push(op);
        }
        assert_eq!(seen, Op::ALL, "one kernel per op, in Op::ALL's order");
        for dtype in DType::ALL {
            let struct_name = match dtype {
                DType::Bf16 => "struct Bf16 {",
                DType::F16 => "struct F16 {",
                DType::F32 => "struct F32 {",
            };
            let at = KERNELS.find(struct_name).unwrap_or_else(|| panic!("no {struct_name}"));
            let code = KERNELS[at..].split("kCode = ").nth(1).and_then(|c| c.split(';').next()).unwrap_or_default();
            assert_eq!(code.trim(), (dtype as u32).to_string(), "{dtype}: kCode in kernels.cu");
        }
    }

    #[test]
    fn the_header_mirrors_the_rust_constants() {
        let src = full_source();
        assert!(!src.contains("#include"), "header not inlined");
        for (name, value) in [
            ("ARFUSE_MAX_RANKS", crate::MAX_RANKS),
            ("ARFUSE_MAX_BLOCKS", crate::MAX_BLOCKS),
            ("ARFUSE_PUSH_ROTATIONS", crate::params::PUSH_ROTATIONS),
            ("ARFUSE_PUSH_HEADER_BYTES", crate::params::PUSH_HEADER_BYTES),
            ("ARFUSE_MAX_ROW_PACKS", MAX_ROW_PACKS),
            ("ARFUSE_MAX_PACKS_PER_THREAD", MAX_PACKS_PER_THREAD),
        ] {
            assert!(src.contains(&format!("#define {name} {value}\n")), "{name} != {value} in arfuse.h");
        }
        for (name, value) in [
            ("ARFUSE_ERROR_PEER_TIMEOUT", crate::ErrorWord::KIND_PEER_TIMEOUT),
            ("ARFUSE_ERROR_CALL_MISMATCH", crate::ErrorWord::KIND_CALL_MISMATCH),
        ] {
            assert!(src.contains(&format!("#define {name} {value}ull\n")), "{name} != {value} in arfuse.h");
        }
        assert_eq!(crate::params::SIGNAL_ERROR_OFFSET, crate::MAX_BLOCKS * crate::MAX_RANKS * 8);
        assert!(src.contains(&format!("#define ARFUSE_PUSH_SENTINEL {:#x}u\n", crate::params::PUSH_SENTINEL)));
        assert!(src.contains(&format!("#define ARFUSE_FLAG_REFUSED {}u\n", crate::params::FLAG_REFUSED)));
        assert!(src.contains(&format!("#define ARFUSE_OP_CODE_REFUSED {}u\n", crate::params::OP_CODE_REFUSED)));
        for (name, value) in [
            ("ARFUSE_EPILOGUE_GEMMA", crate::params::EPILOGUE_GEMMA),
            ("ARFUSE_EPILOGUE_NO_RESIDUAL", crate::params::EPILOGUE_NO_RESIDUAL),
            ("ARFUSE_EPILOGUE_CALL_SHIFT", crate::params::EPILOGUE_CALL_SHIFT),
        ] {
            assert!(src.contains(&format!("#define {name} {value}u\n")), "{name} != {value} in arfuse.h");
        }
        for (name, value) in [
            ("ARFUSE_EPILOGUE_SCALE_MASK", crate::params::EPILOGUE_SCALE_MASK),
            ("ARFUSE_EPILOGUE_SCALE_PER_TENSOR", crate::params::EPILOGUE_SCALE_PER_TENSOR),
            ("ARFUSE_EPILOGUE_SCALE_PER_TOKEN", crate::params::EPILOGUE_SCALE_PER_TOKEN),
            ("ARFUSE_EPILOGUE_SCALE_PER_GROUP", crate::params::EPILOGUE_SCALE_PER_GROUP),
            ("ARFUSE_EPILOGUE_FNUZ", crate::params::EPILOGUE_FNUZ),
            ("ARFUSE_EPILOGUE_CALL_MASK", crate::params::EPILOGUE_CALL_MASK),
        ] {
            assert!(src.contains(&format!("#define {name} {value:#x}u\n")), "{name} != {value:#x} in arfuse.h");
        }
        // The FP8 constants the kernels write as bits: the contract's values.
        use crate::contract::Fp8Format;
        for (f, bits) in [(Fp8Format::E4m3Fn, "0x36924925u"), (Fp8Format::E4m3Fnuz, "0x37088889u")] {
            assert!(src.contains(bits), "min scale of {} not in arfuse.h", f.name());
            assert_eq!(format!("{:#x}u", f.min_scale().to_bits()), bits, "{}", f.name());
        }
        for (f, bits) in [(Fp8Format::E4m3Fn, "0x43e00000u"), (Fp8Format::E4m3Fnuz, "0x43700000u")] {
            assert!(src.contains(bits));
            assert_eq!(format!("{:#x}u", f.max().to_bits()), bits);
        }
        for op in Op::ALL {
            for dtype in DType::ALL {
                let symbol = KernelId { op, dtype }.symbol();
                let (stem, suffix) = symbol.rsplit_once('_').unwrap_or_default();
                assert!(src.contains(&format!("ARFUSE_KERNEL({stem}_##dtype)")), "no kernel {symbol}");
                assert!(src.contains(&format!("ARFUSE_INSTANTIATE({suffix},")), "no instantiation for {suffix}");
            }
        }
    }
}
