//! Tests of the `hip` backend.
//!
//! The first group runs anywhere the crate builds with `--features hip` (CI included, no GPU):
//! the IPC handle's layout, our status/attribute/flag numbers against `hip-runtime-sys` (so a
//! `hip-bindgen` build checks them against the host's headers), clean errors for status codes no
//! header knows, the architecture lookup, hipRTC options, code-object checks, the disk cache, the
//! hipRTC probe, and a hipRTC compile for gfx90a where hipRTC loads.
//!
//! [`launch_params_arrive_by_value`] runs on an AMD GPU (and skips loudly elsewhere, or fails
//! where `ARFUSE_REQUIRE_BACKENDS` names `hip`). Everything else that needs a GPU is the
//! backend-generic suite, `tests/gpu` (`hip::` tests there).

use super::device::{
    arch_from_compute_capability, arch_from_target_version, find_arch, node_arch_at, parse_arch_name,
    parse_kfd_properties, ArchSource, PciLocation,
};
use super::module::{check_image, read_cache, write_cache};
use super::result::{self, attr, code, flags};
use super::*;
use crate::source::fnv1a;
use crate::Error;
use hip_runtime_sys as bindings;
use std::mem::{offset_of, size_of};
use std::path::Path;

// ---- without a GPU ------------------------------------------------------------------------------

#[test]
fn handle_is_104_plain_bytes() {
    assert_eq!(size_of::<HipIpcHandle>(), 104);
    assert_eq!(std::mem::align_of::<HipIpcHandle>(), 8);
    assert_eq!(
        [
            offset_of!(HipIpcHandle, origin.pid),
            offset_of!(HipIpcHandle, origin.ordinal),
            offset_of!(HipIpcHandle, origin.process_token),
            offset_of!(HipIpcHandle, origin.ptr),
            offset_of!(HipIpcHandle, origin.len),
            offset_of!(HipIpcHandle, memory),
            offset_of!(HipIpcHandle, reserved),
            offset_of!(HipIpcHandle, handle),
        ],
        [0, 4, 8, 16, 24, 32, 36, 40]
    );
    assert_eq!(size_of::<bindings::hipIpcMemHandle_t>(), 64, "the runtime's handle is 64 bytes");
    let handle = HipIpcHandle {
        origin: crate::gpu::HandleOrigin { pid: 7, ordinal: 1, process_token: 9, ptr: 0x1000, len: 4096 },
        memory: 1,
        reserved: 0,
        handle: std::array::from_fn(|i| i as u8),
    };
    let bytes = bytemuck::bytes_of(&handle);
    assert_eq!(bytes.len(), 104);
    assert_eq!(bytemuck::pod_read_unaligned::<HipIpcHandle>(bytes), handle);
    assert!(handle.is_uncached());
    assert!(!handle.origin.is_from_this_process());
}

#[test]
fn status_codes_match_the_bindings() {
    use bindings::hipError_t as E;
    let pairs = [
        (code::SUCCESS, E::hipSuccess),
        (code::INVALID_VALUE, E::hipErrorInvalidValue),
        (code::OUT_OF_MEMORY, E::hipErrorOutOfMemory),
        (code::NO_DEVICE, E::hipErrorNoDevice),
        (code::INVALID_DEVICE, E::hipErrorInvalidDevice),
        (code::PEER_ACCESS_UNSUPPORTED, E::hipErrorPeerAccessUnsupported),
        (code::NOT_FOUND, E::hipErrorNotFound),
        (code::NOT_READY, E::hipErrorNotReady),
        (code::PEER_ACCESS_ALREADY_ENABLED, E::hipErrorPeerAccessAlreadyEnabled),
        (code::STREAM_CAPTURE_INVALIDATED, E::hipErrorStreamCaptureInvalidated),
    ];
    for (ours, theirs) in pairs {
        // Converting a variant we named to its number is defined; the reverse is what we avoid.
        assert_eq!(ours, theirs as i32, "{theirs:?}");
        // The name is the loaded runtime's (`hipGetErrorName`), spelled as the bindings spell it.
        assert_eq!(result::code_name(ours).as_deref(), Some(format!("{theirs:?}").as_str()));
    }
    // The runtime's names are the bindings' across the range (spot checks).
    for theirs in [E::hipErrorInvalidImage, E::hipErrorIllegalAddress, E::hipErrorLaunchFailure, E::hipErrorTbd] {
        assert_eq!(result::code_name(theirs as i32).as_deref(), Some(format!("{theirs:?}").as_str()));
    }
}

#[test]
fn attribute_numbers_match_the_bindings() {
    use bindings::hipDeviceAttribute_t as A;
    let pairs = [
        (attr::COMPUTE_CAPABILITY_MAJOR, A::hipDeviceAttributeComputeCapabilityMajor),
        (attr::COMPUTE_CAPABILITY_MINOR, A::hipDeviceAttributeComputeCapabilityMinor),
        (attr::MULTIPROCESSOR_COUNT, A::hipDeviceAttributeMultiprocessorCount),
        (attr::PCI_BUS_ID, A::hipDeviceAttributePciBusId),
        (attr::PCI_DEVICE_ID, A::hipDeviceAttributePciDeviceId),
        (attr::PCI_DOMAIN_ID, A::hipDeviceAttributePciDomainID),
        (attr::MAX_SHARED_MEMORY_PER_BLOCK, A::hipDeviceAttributeMaxSharedMemoryPerBlock),
        (attr::WARP_SIZE, A::hipDeviceAttributeWarpSize),
    ];
    for (ours, theirs) in pairs {
        assert_eq!(ours, theirs as i32, "{theirs:?}");
    }
}

#[test]
fn flag_values_match_the_bindings() {
    assert_eq!(flags::STREAM_NON_BLOCKING, bindings::hipStreamNonBlocking);
    assert_eq!(flags::MEMCPY_DEVICE_TO_DEVICE, bindings::hipMemcpyKind::hipMemcpyDeviceToDevice as i32);
    assert_eq!(
        flags::CAPTURE_MODE_THREAD_LOCAL,
        bindings::hipStreamCaptureMode::hipStreamCaptureModeThreadLocal as i32
    );
    // The bindings' own HIP version spells the IPC flag as our function does for that version.
    assert_eq!(
        flags::ipc_lazy_enable_peer_access(bindings::HIP_VERSION_MAJOR as i32),
        bindings::hipIpcMemLazyEnablePeerAccess,
        "hipIpcMemLazyEnablePeerAccess of HIP {}",
        bindings::HIP_VERSION_MAJOR
    );
    assert_eq!((flags::ipc_lazy_enable_peer_access(5), flags::ipc_lazy_enable_peer_access(6)), (0, 1));
    assert_eq!(flags::ipc_lazy_enable_peer_access(7), 1);
    assert_eq!(result::split_version(50221153), (5, 2, 21153));
    assert_eq!(result::split_version(70051831), (7, 0, 51831));
}

#[test]
fn unknown_status_codes_give_a_clean_error() {
    for unknown in [123_456, 1055, 2000, -1, i32::MAX, i32::MIN] {
        assert_eq!(result::code_name(unknown), None);
        let text = result::describe_code(unknown);
        assert!(text.contains(&unknown.to_string()) && text.contains("unknown"), "{text}");
        match result::error("hipSomething", unknown) {
            Error::Driver { backend, call, code, message } => {
                assert_eq!((backend, call, code), (crate::BackendKind::Hip, "hipSomething", unknown));
                assert!(!message.is_empty());
                println!("status {unknown}: {message}");
            }
            other => panic!("expected a driver error, got {other:?}"),
        }
    }
    let known = result::error("hipDeviceEnablePeerAccess", code::PEER_ACCESS_ALREADY_ENABLED);
    assert!(known.to_string().contains("hipErrorPeerAccessAlreadyEnabled"), "{known}");
    assert!(result::check("hipSomething", code::SUCCESS).is_ok());
    assert!(matches!(result::check("hipSomething", 9999), Err(Error::Driver { code: 9999, .. })));
}

/// A KFD node's `properties`, as the amdgpu driver writes them (abridged).
const KFD_GPU_NODE: &str = "cpu_cores_count 0\nsimd_count 1216\nmem_banks_count 1\ngfx_target_version 90402\n\
     vendor_id 4098\ndevice_id 29857\nlocation_id 49920\ndomain 0\ndrm_render_minor 128\nnum_xcc 8\n";
const KFD_CPU_NODE: &str = "cpu_cores_count 96\nsimd_count 0\ngfx_target_version 0\nlocation_id 0\ndomain 0\n";

#[test]
fn architecture_from_the_kfd_topology() {
    // location_id 49920 = 0xc300: bus 0xc3, device 0, function 0.
    let at = PciLocation { domain: Some(0), bus: 0xc3, device: 0 };
    let gpu = parse_kfd_properties(KFD_GPU_NODE);
    assert_eq!(node_arch_at(&gpu, at).as_deref(), Some("gfx942"));
    assert_eq!(node_arch_at(&gpu, PciLocation { domain: None, ..at }).as_deref(), Some("gfx942"));
    assert_eq!(node_arch_at(&gpu, PciLocation { bus: 0xc4, ..at }), None);
    assert_eq!(node_arch_at(&gpu, PciLocation { domain: Some(1), ..at }), None);
    assert_eq!(node_arch_at(&parse_kfd_properties(KFD_CPU_NODE), PciLocation { bus: 0, ..at }), None);
    for (version, arch) in
        [(90010, "gfx90a"), (90402, "gfx942"), (90500, "gfx950"), (110000, "gfx1100"), (100300, "gfx1030")]
    {
        assert_eq!(arch_from_target_version(version).as_deref(), Some(arch), "{version}");
    }

    // A topology directory: a CPU node and two GPUs.
    let root = std::env::temp_dir().join(format!("arfuse-hip-kfd-test-{}", std::process::id()));
    let node = |n: usize, text: &str| {
        let dir = root.join(n.to_string());
        std::fs::create_dir_all(&dir).expect("node dir");
        std::fs::write(dir.join("properties"), text).expect("properties");
    };
    node(0, KFD_CPU_NODE);
    node(1, KFD_GPU_NODE);
    node(2, &KFD_GPU_NODE.replace("49920", "1024").replace("90402", "90010"));
    let cc = (9, 0);
    let found = |env: Option<&str>, pci| find_arch(env, &root, pci, cc).expect("find_arch");
    assert_eq!(found(None, at), Some(("gfx942".into(), ArchSource::KfdTopology)));
    assert_eq!(
        found(None, PciLocation { domain: Some(0), bus: 4, device: 0 }),
        Some(("gfx90a".into(), ArchSource::KfdTopology))
    );
    // The environment wins; an unknown location falls back to the compute capability (9.0: none).
    assert_eq!(found(Some("gfx950"), at), Some(("gfx950".into(), ArchSource::Environment)));
    assert_eq!(found(None, PciLocation { domain: Some(0), bus: 9, device: 0 }), None);
    assert_eq!(
        find_arch(None, &root.join("missing"), at, (9, 4)).expect("find_arch"),
        Some(("gfx942".into(), ArchSource::ComputeCapability))
    );
    assert!(matches!(find_arch(Some("sm_90"), &root, at, cc), Err(Error::BackendUnavailable { .. })));
    // Two nodes at one location that disagree (never seen; refuse to guess).
    node(3, &KFD_GPU_NODE.replace("90402", "90500"));
    assert_eq!(found(None, at), None);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn architecture_names() {
    assert_eq!(parse_arch_name("gfx942").as_deref(), Some("gfx942"));
    assert_eq!(parse_arch_name("GFX90A").as_deref(), Some("gfx90a"));
    assert_eq!(parse_arch_name("gfx942:sramecc+:xnack-").as_deref(), Some("gfx942"));
    assert_eq!(parse_arch_name("gfx1100").as_deref(), Some("gfx1100"));
    for bad in ["", "gfx", "sm_90", "gfx9x2", "gfx94", "942", "gfx942/../x"] {
        assert_eq!(parse_arch_name(bad), None, "{bad:?}");
    }
    assert_eq!(arch_from_compute_capability((9, 4)), Some("gfx942"));
    assert_eq!(arch_from_compute_capability((9, 5)), Some("gfx950"));
    assert_eq!(arch_from_compute_capability((9, 0)), None, "gfx900, gfx906, gfx908 and gfx90a share 9.0");
}

#[test]
fn hiprtc_options_keep_what_hiprtc_takes() {
    let clang: Vec<String> = [
        "-x",
        "hip",
        "--offload-arch=gfx90a",
        "--cuda-device-only",
        "--no-gpu-bundle-output",
        "-nogpuinc",
        "-nogpulib",
        "-mcode-object-version=5",
        "-O3",
        "-ffp-contract=off",
        "-std=c++17",
        "-DARFUSE_HIP=1",
        "-D",
        "WAVE=64",
        "-I",
        "/somewhere",
        "-c",
        "-o",
        "out.o",
        "k.cu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(
        rtc_options(&clang, "gfx942"),
        ["--offload-arch=gfx942", "-O3", "-ffp-contract=off", "-std=c++17", "-DARFUSE_HIP=1", "-DWAVE=64"]
    );
}

#[test]
fn offline_code_objects_live_where_xtask_puts_them() {
    assert_eq!(
        offline_image_path(Path::new("/k"), "gfx942", 0xabc),
        Path::new("/k/gfx942/arfuse-0000000000000abc.hsaco")
    );
    assert_eq!(KERNEL_DIR_ENV, "ARFUSE_KERNEL_DIR");
    assert_eq!(ARCH_ENV, "ARFUSE_HIP_ARCH");
}

/// A minimal AMDGPU ELF64: the header, then one PROGBITS section header covering the file.
fn tiny_elf() -> Vec<u8> {
    let mut elf = vec![0u8; 128];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little-endian
    elf[6] = 1;
    elf[0x12] = 0xe0; // EM_AMDGPU
    elf[0x28..0x30].copy_from_slice(&64u64.to_le_bytes()); // e_shoff
    elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf[0x3c..0x3e].copy_from_slice(&1u16.to_le_bytes()); // e_shnum
    elf[64 + 4] = 1; // SHT_PROGBITS
    elf[64 + 32..64 + 40].copy_from_slice(&128u64.to_le_bytes()); // sh_size
    elf
}

#[test]
fn code_object_checks_reject_truncation() {
    let elf = tiny_elf();
    assert_eq!(check_image(&elf), Ok(()));
    assert!(check_image(&elf[..127]).is_err(), "a section past the end");
    assert!(check_image(&elf[..40]).is_err(), "a header cut short");
    let mut x86 = elf.clone();
    x86[0x12] = 0x3e;
    assert!(check_image(&x86).unwrap_err().contains("not AMDGPU"));
    assert!(check_image(b"CCOB compressed").is_err());
    assert!(check_image(b"").is_err());

    let mut bundle = b"__CLANG_OFFLOAD_BUNDLE__".to_vec();
    bundle.extend_from_slice(&1u64.to_le_bytes());
    let payload_at = bundle.len() + 24 + 3;
    bundle.extend_from_slice(&(payload_at as u64).to_le_bytes());
    bundle.extend_from_slice(&4u64.to_le_bytes());
    bundle.extend_from_slice(&3u64.to_le_bytes());
    bundle.extend_from_slice(b"hip");
    bundle.extend_from_slice(b"\x7fELF");
    assert_eq!(check_image(&bundle), Ok(()));
    assert!(check_image(&bundle[..bundle.len() - 1]).is_err());
}

#[test]
fn cache_files_round_trip_and_reject_damage() {
    let dir = std::env::temp_dir().join(format!("arfuse-hip-cache-test-{}", std::process::id()));
    let path = dir.join("gfx942").join("x.hsaco");
    let payload = tiny_elf();
    write_cache(&path, &payload);
    assert_eq!(read_cache(&path), Some(payload.clone()));
    let mut file = std::fs::read(&path).unwrap_or_default();
    std::fs::write(&path, &file[..file.len() - 1]).ok();
    assert_eq!(read_cache(&path), None, "truncated");
    let last = file.len() - 1;
    file[last] ^= 1;
    std::fs::write(&path, &file).ok();
    assert_eq!(read_cache(&path), None, "a flipped bit");
    // A whole file whose payload is no code object is refused too.
    write_cache(&path, b"not a code object");
    assert_eq!(read_cache(&path), None);
    assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hiprtc_candidates_prefer_the_runtime_directory() {
    let names = result::rtc::candidates(
        Some(Path::new("/opt/rocm/lib")),
        Some(Path::new("/opt/rocm/lib/libamdhip64.so.6.2.60200")),
        Some(6),
    );
    assert_eq!(
        names,
        [
            "/opt/rocm/lib/libhiprtc.so.6",
            "/opt/rocm/lib/libhiprtc.so",
            "libhiprtc.so.6",
            "libhiprtc.so",
            "libhiprtc.so.7",
            "libhiprtc.so.5",
            "/opt/rocm/lib/libamdhip64.so.6.2.60200",
        ]
    );
    assert_eq!(
        result::rtc::candidates(None, None, None),
        ["libhiprtc.so", "libhiprtc.so.7", "libhiprtc.so.6", "libhiprtc.so.5"]
    );
}

/// The linked runtime answers without a device (the rest of "without a GPU the backend says so"
/// is the generic suite's).
#[test]
fn the_linked_runtime_reports_its_version() {
    let version = Hip::runtime_version().expect("the linked runtime reports its version");
    println!("hip runtime {version:?}, loaded from {:?}", result::runtime_library_path());
    assert!(version.0 >= 5, "{version:?}");
}

/// The C++ mirror of `LaunchParams` and a kernel that echoes every field of its by-value argument.
const PROBE_SOURCE: &str = r#"
struct LaunchParams {
    unsigned long long receive[8], scratch[8], signals[8];
    unsigned long long input, residual, weight, out, residual_out, barrier_base, deadline_ns;
    unsigned int rows, hidden, rank, world_size;
    float eps;
    unsigned int reserved0;
    unsigned long long reserved1;
    unsigned long long push[8];
    unsigned int push_slot_bytes, flags;
};
static_assert(sizeof(LaunchParams) == 352, "LaunchParams layout");
extern "C" __global__ void arfuse_probe(LaunchParams p) {
    unsigned long long* out = (unsigned long long*)p.out;
    unsigned int lane = __builtin_amdgcn_workitem_id_x();
    unsigned int block = __builtin_amdgcn_workgroup_id_x();
    if (lane == 0 && block == 0) {
        out[0] = p.receive[0]; out[1] = p.receive[7]; out[2] = p.scratch[3]; out[3] = p.signals[5];
        out[4] = p.input; out[5] = p.residual; out[6] = p.weight; out[7] = p.residual_out;
        out[8] = p.barrier_base; out[9] = p.deadline_ns;
        out[10] = p.rows | ((unsigned long long)p.hidden << 32);
        out[11] = p.rank | ((unsigned long long)p.world_size << 32);
        out[12] = __builtin_bit_cast(unsigned int, p.eps) | (p.reserved1 << 32);
        out[13] = warpSize;
    }
    if (lane == 0) {
        __hip_atomic_fetch_add(&out[14], 1ull, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
    }
}
"#;

/// The probe's arguments: every field distinct.
fn probe_params(out: u64) -> crate::LaunchParams {
    let mut p = crate::LaunchParams {
        input: 0x1111,
        residual: 0x2222,
        weight: 0x3333,
        out,
        residual_out: 0x4444,
        barrier_base: 0x5555_0000_0000_0006,
        deadline_ns: 7_000_000_000,
        rows: 81,
        hidden: 2880,
        rank: 5,
        world_size: 6,
        eps: 1e-6,
        reserved0: 0,
        reserved1: 0xabcd,
        ..Default::default()
    };
    p.receive[0] = 0xa0;
    p.receive[7] = 0xa7;
    p.scratch[3] = 0xb3;
    p.signals[5] = 0xc5;
    p
}

/// What the probe writes for `params` on a device with `wave` lanes per wavefront, `blocks` blocks.
fn probe_expected(p: &crate::LaunchParams, wave: u64, blocks: u64) -> Vec<u64> {
    vec![
        p.receive[0],
        p.receive[7],
        p.scratch[3],
        p.signals[5],
        p.input,
        p.residual,
        p.weight,
        p.residual_out,
        p.barrier_base,
        p.deadline_ns,
        u64::from(p.rows) | u64::from(p.hidden) << 32,
        u64::from(p.rank) | u64::from(p.world_size) << 32,
        u64::from(p.eps.to_bits()) | p.reserved1 << 32,
        wave,
        blocks,
    ]
}

/// hipRTC loads (or says what it tried), compiles the probe kernel to a code object that passes our
/// checks, and reports a compile error as [`Error::Compile`] with its log. gfx90a only: Debian's
/// hipRTC 5.2 aborts the process on gfx942 and gfx950.
#[test]
fn hiprtc_probe_and_compile() {
    let library = match result::rtc::library() {
        Ok(library) => library,
        Err(err) => {
            arfuse_testkit::require_compiler("hiprtc", "hip::tests::hiprtc_probe_and_compile", Err(err));
            return;
        }
    };
    println!("hipRTC from {} ({:?})", library.path(), library.file());
    let options = rtc_options(&["-O3".into(), "-ffp-contract=off".into(), "-std=c++17".into()], "gfx90a");
    let code = super::module::compile(library, "gfx90a", &options, PROBE_SOURCE).expect("compile the probe");
    assert_eq!(check_image(&code), Ok(()), "hipRTC's output passes the code-object check");
    assert!(code.windows(12).any(|w| w == b"arfuse_probe"), "the symbol is in the code object");
    match super::module::compile(library, "gfx90a", &options, "extern \"C\" __global__ void broken( {") {
        Err(Error::Compile { arch, log, .. }) => {
            assert_eq!(arch, "gfx90a");
            assert!(log.contains("error"), "{log}");
        }
        other => panic!("expected a compile error, got {:?}", other.map(|code| code.len())),
    }
}

// ---- on an AMD GPU ---------------------------------------------------------------------------------

/// A kernel taking `LaunchParams` by value, compiled by hipRTC for this device and loaded with
/// `hipModuleLaunchKernel`'s argument array, sees every field; the wavefront size it reports is the
/// attribute's; the same launch captured into a graph and replayed runs again.
#[test]
fn launch_params_arrive_by_value() {
    const TEST: &str = "hip::tests::launch_params_arrive_by_value";
    let available = match Hip::device_count() {
        Ok(0) => Err("no hip device is visible".to_string()),
        Ok(_) => result::rtc::library().map(|_| ()).map_err(|e| e.to_string()),
        Err(err) => Err(err.to_string()),
    };
    if !arfuse_testkit::require_backend("hip", TEST, available) {
        return;
    }
    let device = Hip::open_device(0, 1).expect("open device 0");
    let stream = Hip::create_stream(&device).expect("stream");
    let Some(arch) = device.arch() else { panic!("architecture not found: {device:?}") };
    let library = result::rtc::library().expect("hipRTC (probed above)");
    let options = rtc_options(&["-O3".into(), "-std=c++17".into()], arch);
    let code = super::module::compile(library, arch, &options, PROBE_SOURCE).expect("compile the probe");
    device.bind().expect("bind");
    check_image(&code).expect("a whole code object");
    // SAFETY: `code` is a whole code object (checked above).
    let module = unsafe { result::module::load_data(&code) }.expect("load the probe");
    let name = std::ffi::CString::new("arfuse_probe").expect("name");
    // SAFETY: the module is live until the unload below.
    let function =
        unsafe { result::module::get_function(module, &name) }.expect("get function").expect("the probe is defined");
    let out = HipBuffer::<u64>::zeros(&device, 16).expect("out");
    let params = probe_params(out.device_ptr().0);
    let blocks = 3u32;
    let launch = |stream: &HipStream| {
        let mut argument = params;
        let mut arguments = [(&mut argument as *mut crate::LaunchParams).cast::<std::ffi::c_void>()];
        // SAFETY: the probe takes one `LaunchParams` by value and writes 15 words of `out`, which
        // outlives the synchronisations below.
        unsafe {
            result::module::launch_kernel(function, blocks, 2 * device.warp_size(), 0, stream.raw(), &mut arguments)
        }
    };
    launch(&stream).expect("launch");
    Hip::synchronize(&stream).expect("synchronize");
    let got = out.download(&stream).expect("download");
    assert_eq!(got[..15], probe_expected(&params, u64::from(device.warp_size()), u64::from(blocks))[..]);

    stream.begin_capture().expect("begin capture");
    let launched = launch(&stream);
    let graph = stream.end_capture();
    launched.expect("captured launch");
    let graph = graph.expect("end capture");
    // SAFETY: the graph's kernel writes `out`, alive until after the synchronisation.
    unsafe { graph.launch(&stream) }.expect("replay");
    Hip::synchronize(&stream).expect("synchronize");
    let got = out.download(&stream).expect("download");
    assert_eq!(got[14], 2 * u64::from(blocks), "the replay ran every block once more");
    drop(graph);
    // SAFETY: the module is ours and no queued work uses it any more.
    unsafe { result::module::unload(module) }.expect("unload");
    device.check_err().expect("no parked errors");
    println!("hip: LaunchParams by value through hipModuleLaunchKernel and a graph replay on {arch}");
}
