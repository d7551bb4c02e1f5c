//! Table-driven tests of [`choose_path`] at its inclusive boundaries.

use super::*;

fn req(rows: usize, hidden: usize) -> Request {
    Request { rows, hidden, dtype: DType::Bf16, world_size: 4 }
}

#[test]
fn exactly_64_mib_is_fused_one_element_more_is_not() {
    let policy = Policy::default();
    // 8192 x 4096 bf16 = 64 MiB = max_size / 2.
    let r = req(8192, 4096);
    assert_eq!(r.bytes(), 64 << 20);
    assert_eq!(choose_path(&r, &policy), Path::TwoStage);
    // One more element: a tensor of 8192*4096 + 8 elements (one more pack) as 1 row: hidden size
    // is the pack multiple just above. Bytes = 64 MiB + 16 > max_size / 2.
    let bigger = Request { rows: 1, hidden: 8192 * 4096 + 8, ..r };
    assert_eq!(
        choose_path(&bigger, &policy),
        Path::Unfused { all_reduce: AllReduce::Custom, reason: FallbackReason::TooLarge }
    );
    // Literally one element more (the dispatcher does not look at the pack; validation does).
    let one_more = Request { rows: 1, hidden: 8192 * 4096 + 1, ..r };
    assert_eq!(one_more.bytes(), (64 << 20) + 2);
    assert!(matches!(choose_path(&one_more, &policy), Path::Unfused { reason: FallbackReason::TooLarge, .. }));
    // One more row is 8 KiB more: not fused either, and the vendor library takes it where present.
    let more_rows = req(8193, 4096);
    let with_vendor = Policy { vendor_available: true, ..policy };
    assert_eq!(
        choose_path(&more_rows, &with_vendor),
        Path::Unfused { all_reduce: AllReduce::Vendor, reason: FallbackReason::TooLarge }
    );
}

#[test]
fn the_default_threshold_of_each_world_size_is_inclusive() {
    for (world, bytes) in [(1, 2 << 20), (2, 2 << 20), (3, 1 << 20), (4, 1 << 20), (5, 512 << 10), (8, 512 << 10)] {
        assert_eq!(default_one_stage_max_bytes(world), bytes);
        let rows = bytes / (4096 * 2);
        let at = Request { world_size: world, ..req(rows, 4096) };
        assert_eq!(choose_path(&at, &Policy::default()), Path::OneStage, "world {world}: {rows} rows");
        let above = Request { rows: rows + 1, ..at };
        assert_eq!(choose_path(&above, &Policy::default()), Path::TwoStage, "world {world}: {} rows", rows + 1);
    }
}

#[test]
fn exactly_128_kib_is_one_stage_one_more_pack_is_two_stage() {
    // AITER's threshold, configured.
    let policy = Policy { one_stage_max_bytes: AITER_ONE_STAGE_MAX_BYTES, ..Policy::default() };
    // 16 x 4096 bf16 = 128 KiB.
    assert_eq!(req(16, 4096).bytes(), 128 << 10);
    assert_eq!(choose_path(&req(16, 4096), &policy), Path::OneStage);
    // 1 row of 65544 elements = 128 KiB + 16 bytes (the dispatcher looks at bytes, not the hidden size).
    assert_eq!(choose_path(&req(1, 65536), &policy), Path::OneStage);
    assert_eq!(choose_path(&req(1, 65544), &policy), Path::TwoStage);
    assert_eq!(choose_path(&req(17, 4096), &policy), Path::TwoStage);
}

#[test]
fn override_wins_both_ways() {
    let force1 = Policy { force_one_stage: Some(true), push_slot_bytes: 2 << 20, ..Policy::default() };
    let force2 = Policy { force_one_stage: Some(false), ..Policy::default() };
    assert_eq!(choose_path(&req(128, 8192), &force1), Path::OneStage);
    assert_eq!(choose_path(&req(1, 4096), &force2), Path::TwoStage);
    // Where the 1-stage kernel cannot: more bytes than its receive slot (inclusive boundary).
    assert_eq!(choose_path(&req(129, 8192), &force1), Path::TwoStage);
    // The default slot is the world size's threshold: 1 MiB at world 4.
    let default_slot = Policy { force_one_stage: Some(true), ..Policy::default() };
    assert_eq!(choose_path(&req(64, 8192), &default_slot), Path::OneStage, "1 MiB: the default slot");
    assert_eq!(choose_path(&req(65, 8192), &default_slot), Path::TwoStage, "above the default slot");
}

#[test]
fn the_hidden_size_is_no_path_decision() {
    // Both fused kernels take every hidden size the kernels take (one row routine): forcing 1-stage
    // on one row of the kernels' largest hidden size is 1-stage, never an error or a fallback.
    let max = arfuse_kernels::max_hidden(DType::Bf16);
    let policy = Policy { force_one_stage: Some(true), ..Policy::default() };
    assert_eq!(choose_path(&req(1, max), &policy), Path::OneStage);
    assert_eq!(choose_path(&req(1, 8200), &policy), Path::OneStage);
}

#[test]
fn hidden_2880_and_every_llm_size_fuse() {
    let policy = Policy::default();
    for hidden in [2880, 4096, 5120, 6144, 7168, 8192, 14336, 16384, 32768] {
        for rows in [1, 4, 16, 80, 81, 128] {
            let path = choose_path(&req(rows, hidden), &policy);
            assert!(matches!(path, Path::OneStage | Path::TwoStage), "{rows}x{hidden}: {path:?}");
        }
    }
    // Beyond the kernels' limit the operator refuses the call before dispatch
    // (it/refusals.rs::hidden_sizes_beyond_the_kernels_or_half_of_max_size_are_refused).
    assert_eq!(arfuse_kernels::max_hidden(DType::Bf16), 32768);
}

#[test]
fn every_reason_to_fall_back() {
    let base = Policy::default();
    let cases = [
        (Policy { enabled: false, ..base }, 4, AllReduce::Custom, FallbackReason::Disabled),
        (Policy { peer_access: false, ..base }, 4, AllReduce::Vendor, FallbackReason::NoPeerAccess),
        (Policy { single_host: false, ..base }, 4, AllReduce::Vendor, FallbackReason::MultiHost),
        (base, 9, AllReduce::Vendor, FallbackReason::WorldSizeUnsupported),
        (base, 16, AllReduce::Vendor, FallbackReason::WorldSizeUnsupported),
    ];
    for (policy, world_size, all_reduce, reason) in cases {
        let r = Request { world_size, ..req(4, 4096) };
        assert_eq!(choose_path(&r, &policy), Path::Unfused { all_reduce, reason }, "{policy:?} world {world_size}");
    }
}

#[test]
fn world_sizes_1_to_8_fuse_including_6() {
    for world_size in 1..=8 {
        let r = Request { world_size, ..req(4, 4096) };
        assert_eq!(choose_path(&r, &Policy::default()), Path::OneStage);
    }
}

#[test]
fn empty_is_noop() {
    assert_eq!(choose_path(&req(0, 4096), &Policy::default()), Path::Noop);
}

#[test]
fn too_large_goes_to_the_vendor_only_where_one_is_available() {
    let without = Policy::default();
    let with = Policy { vendor_available: true, ..without };
    // 8193 x 4096 bf16 = 64 MiB + 8 KiB > max_size / 2.
    let r = req(8193, 4096);
    assert_eq!(
        choose_path(&r, &without),
        Path::Unfused { all_reduce: AllReduce::Custom, reason: FallbackReason::TooLarge }
    );
    assert_eq!(
        choose_path(&r, &with),
        Path::Unfused { all_reduce: AllReduce::Vendor, reason: FallbackReason::TooLarge }
    );
    // At the boundary, fused with or without the vendor library.
    assert_eq!(choose_path(&req(8192, 4096), &with), Path::TwoStage);
    // A smaller max_size moves the boundary with it.
    let small = Policy { max_size: 1 << 20, ..with };
    // 512 KiB = max_size / 2: fused, 1-stage (the threshold, 1 MiB at world 4, is above it).
    assert_eq!(choose_path(&req(64, 4096), &small), Path::OneStage);
    assert_eq!(
        choose_path(&req(65, 4096), &small),
        Path::Unfused { all_reduce: AllReduce::Vendor, reason: FallbackReason::TooLarge }
    );
}

#[test]
fn topology_reasons_go_to_the_vendor_with_or_without_it() {
    // Our kernels cannot run there at all: the vendor path is chosen even where no library is
    // loaded (the operator then refuses the call with `VendorUnavailable`, never runs a wrong path).
    for vendor_available in [false, true] {
        let base = Policy { vendor_available, ..Policy::default() };
        let cases = [
            (Policy { peer_access: false, ..base }, 4, FallbackReason::NoPeerAccess),
            (Policy { single_host: false, ..base }, 4, FallbackReason::MultiHost),
            (base, 9, FallbackReason::WorldSizeUnsupported),
            (base, 64, FallbackReason::WorldSizeUnsupported),
        ];
        for (policy, world_size, reason) in cases {
            for (rows, hidden) in [(1, 4096), (16, 8192), (8193, 4096)] {
                let r = Request { world_size, ..req(rows, hidden) };
                assert_eq!(
                    choose_path(&r, &policy),
                    Path::Unfused { all_reduce: AllReduce::Vendor, reason },
                    "{rows}x{hidden} world {world_size} vendor {vendor_available}"
                );
            }
        }
    }
}

#[test]
fn reasons_take_precedence_in_a_fixed_order() {
    // World size, then hosts, then peer access, then configuration, then size.
    let everything_wrong =
        Policy { enabled: false, peer_access: false, single_host: false, vendor_available: true, ..Policy::default() };
    let r = Request { world_size: 9, ..req(8193, 4096) };
    assert!(matches!(
        choose_path(&r, &everything_wrong),
        Path::Unfused { reason: FallbackReason::WorldSizeUnsupported, .. }
    ));
    let r = Request { world_size: 8, ..r };
    assert!(matches!(choose_path(&r, &everything_wrong), Path::Unfused { reason: FallbackReason::MultiHost, .. }));
    let p = Policy { single_host: true, ..everything_wrong };
    assert!(matches!(choose_path(&r, &p), Path::Unfused { reason: FallbackReason::NoPeerAccess, .. }));
    let p = Policy { peer_access: true, ..p };
    assert_eq!(choose_path(&r, &p), Path::Unfused { all_reduce: AllReduce::Custom, reason: FallbackReason::Disabled });
    // An empty tensor is a no-op even where nothing else could run.
    assert_eq!(choose_path(&Request { world_size: 9, ..req(0, 4096) }, &everything_wrong), Path::Noop);
}

#[test]
fn path_names_say_which_all_reduce_ran() {
    let vendor = Path::Unfused { all_reduce: AllReduce::Vendor, reason: FallbackReason::MultiHost };
    let custom = Path::Unfused { all_reduce: AllReduce::Custom, reason: FallbackReason::TooLarge };
    assert_eq!(vendor.to_string(), "vendor");
    assert_eq!(custom.to_string(), "unfused");
    assert_eq!(Path::OneStage.to_string(), "fused-1stage");
    assert_eq!(Path::TwoStage.to_string(), "fused-2stage");
    assert_eq!(Path::Noop.to_string(), "noop");
}

#[test]
fn a_measured_threshold_replaces_the_default_for_its_world_size_only() {
    let mut policy = Policy::default();
    let table = crate::TuneTable { source: "test".into(), one_stage_max_bytes: vec![(4, 4 << 20)] };
    policy.apply(&table);
    // 4 MiB at world 4: 1-stage up to and including it, 2-stage one pack more.
    let at = req(512, 4096);
    assert_eq!(at.bytes(), 4 << 20);
    assert_eq!(choose_path(&at, &policy), Path::OneStage);
    assert_eq!(choose_path(&Request { rows: 513, ..at }, &policy), Path::TwoStage);
    // World 2 has no measurement: its default, 2 MiB, applies.
    let world2 = Request { world_size: 2, ..req(256, 4096) };
    assert_eq!(choose_path(&world2, &policy), Path::OneStage);
    assert_eq!(choose_path(&Request { rows: 257, ..world2 }, &policy), Path::TwoStage);
    // The override still wins over a measurement.
    let forced = Policy { force_one_stage: Some(false), ..policy };
    assert_eq!(choose_path(&at, &forced), Path::TwoStage);
}
