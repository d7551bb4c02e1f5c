//! Tests of the rank harnesses. The process tests re-execute this test binary: each test is
//! its own parent (when `child()` is `None`) and its own children.

use super::*;
use crate::test_path;
use std::fs;
use std::os::unix::fs::PermissionsExt;

#[test]
fn threads_return_in_rank_order_and_borrow() {
    let data = [10, 20, 30, 40];
    let results = run_threads(4, |rank| (rank, data[rank] + rank, std::thread::current().name().map(String::from)));
    assert_eq!(results[2], (2, 32, Some("rank-2".to_string())));
    assert_eq!(results.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
}

#[test]
#[should_panic(expected = "1 of 3 ranks failed:\n  rank 2 panicked: boom on purpose")]
fn a_panicking_thread_names_its_rank() {
    run_threads(3, |rank| {
        if rank == 2 {
            panic!("boom on purpose");
        }
    });
}

#[test]
fn threads_with_a_timeout() {
    let ok = run_threads_timeout(3, Duration::from_secs(60), |rank| rank * 2).expect("all ranks finish");
    assert_eq!(ok, vec![0, 2, 4]);

    let error = run_threads_timeout(3, Duration::from_millis(300), |rank| {
        match rank {
            // A rank that waits forever for a peer that never comes.
            1 => loop {
                std::thread::park();
            },
            2 => panic!("rank two gives up"),
            _ => rank,
        }
    })
    .expect_err("ranks 1 and 2 fail");
    let text = error.to_string();
    assert!(matches!(error, HarnessError::RanksFailed { failed: 2, world_size: 3, .. }));
    assert!(text.contains("rank 1 had not finished after 300ms"), "{text}");
    assert!(text.contains("rank 2 panicked: rank two gives up"), "{text}");
}

#[test]
fn test_paths_drop_the_crate_name() {
    assert_eq!(test_path_from("arfuse_testkit::harness::tests", "t"), "harness::tests::t");
    assert_eq!(test_path_from("it", "top_level"), "top_level");
    assert_eq!(test_path!(my_test), "harness::tests::my_test");
}

#[test]
fn private_dirs_are_private_fresh_and_removed() {
    let a = fresh_private_dir().expect("a private dir");
    let b = fresh_private_dir().expect("another");
    assert_ne!(a.path(), b.path());
    let mode = fs::metadata(a.path()).expect("exists").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    fs::write(a.path().join("f"), b"x").expect("writable");
    let path = a.path().to_path_buf();
    drop(a);
    assert!(!path.exists(), "removed with its contents");
    let kept = b.keep();
    assert!(kept.exists());
    fs::remove_dir_all(kept).expect("cleanup");
}

/// Each child writes a file named by its rank, waits until its peers' files exist (so the ranks
/// run at the same time and share the directory), and checks it cannot start a nested harness.
#[test]
fn three_processes_share_a_private_dir() {
    if let Some(me) = child() {
        assert_eq!(me.world_size, 3);
        assert_eq!(me.test_path, "harness::tests::three_processes_share_a_private_dir");
        fs::write(me.dir.join(format!("rank-{}", me.rank)), format!("{} of {}", me.rank, me.world_size))
            .expect("writing the rank file");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(0..3).all(|peer| me.dir.join(format!("rank-{peer}")).exists()) {
            assert!(Instant::now() < deadline, "rank {} never saw its peers", me.rank);
            std::thread::sleep(Duration::from_millis(5));
        }
        let nested = run_processes("anything", 2, Duration::from_secs(1));
        assert!(matches!(nested, Err(HarnessError::Nested { world_size: 3, .. })), "{nested:?}");
        println!("rank {} done", me.rank);
        return;
    }
    let dir = fresh_private_dir().expect("a private dir");
    let options = ProcessOptions::new(3, Duration::from_secs(120)).dir(dir.path());
    let outcomes = run_processes_with(&test_path!(three_processes_share_a_private_dir), &options).expect("harness");
    assert_ranks_succeeded(&outcomes);
    for (rank, outcome) in outcomes.iter().enumerate() {
        assert_eq!(outcome.rank, rank);
        assert!(outcome.stdout.contains(&format!("rank {rank} done")), "{}", outcome.stdout);
        let text = fs::read_to_string(dir.path().join(format!("rank-{rank}"))).expect("the rank's file");
        assert_eq!(text, format!("{rank} of 3"));
    }
}

#[test]
fn a_failing_rank_is_reported_with_its_message() {
    if let Some(me) = child() {
        assert!(me.rank != 1, "rank {} fails on purpose", me.rank);
        return;
    }
    let outcomes = run_processes(&test_path!(a_failing_rank_is_reported_with_its_message), 3, Duration::from_secs(120))
        .expect("harness");
    assert!(outcomes[0].succeeded() && outcomes[2].succeeded());
    assert!(!outcomes[1].succeeded() && !outcomes[1].timed_out && outcomes[1].ran_test);
    let message = outcomes[1].panic_message().expect("a panic message");
    assert!(message.contains("panicked at") && message.contains("rank 1 fails on purpose"), "{message}");
    let error = check_ranks(&outcomes).expect_err("rank 1 failed");
    let text = error.to_string();
    assert!(text.starts_with("1 of 3 ranks failed:\nrank 1: failed (exit status: 101)"), "{text}");
    assert!(text.contains("rank 1 fails on purpose"), "{text}");
}

#[test]
fn a_stalled_rank_is_killed_at_the_timeout() {
    if let Some(me) = child() {
        if me.rank == 0 {
            loop {
                std::thread::park();
            }
        }
        return;
    }
    let started = Instant::now();
    let outcomes = run_processes(&test_path!(a_stalled_rank_is_killed_at_the_timeout), 2, Duration::from_secs(5))
        .expect("harness");
    assert!(started.elapsed() < Duration::from_secs(30), "the harness does not wait for a stalled rank");
    assert!(outcomes[0].timed_out && !outcomes[0].succeeded());
    assert!(outcomes[1].succeeded(), "{}", outcomes[1]);
    let text = check_ranks(&outcomes).expect_err("rank 0 stalled").to_string();
    assert!(text.contains("rank 0: killed after the timeout"), "{text}");
}

#[test]
fn a_wrong_test_path_is_not_a_silent_pass() {
    let outcomes = run_processes("harness::tests::no_such_test", 1, Duration::from_secs(60)).expect("harness");
    assert!(outcomes[0].status.success() && !outcomes[0].ran_test && !outcomes[0].succeeded());
    let text = check_ranks(&outcomes).expect_err("nothing ran").to_string();
    assert!(text.contains("ran no test"), "{text}");
    assert!(matches!(run_processes("x", 0, Duration::from_secs(1)), Err(HarnessError::EmptyWorld)));
}
