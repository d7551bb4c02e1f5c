//! Peer failure across real rank processes (cpu backend, Unix-socket rendezvous, POSIX shared
//! memory): one rank is killed, or stalls, at each phase of the group's life. Every survivor gets
//! a typed error within the deadline plus a margin (measured), drops everything, and leaves no
//! shared-memory segment; every child is reaped with the exit status its fault implies.
//!
//! Survivors never sleep: they wait only in arfuse's own deadlines. A stalled rank sleeps — that
//! sleep *is* the fault — past every survivor's bound, then carries on and must itself end in a
//! typed error (and never in wrong data).

use super::call;
use arfuse_fusion::{AllReduceRmsNorm, Config, Error, Fault, Path};
use arfuse_ipc::UnixRendezvous;
use arfuse_kernels::api::Cpu;
use arfuse_kernels::{Backend, DType};
use arfuse_testkit::{
    child, fresh_private_dir, run_processes_with, test_path, ChildRank, Fixture, Problem, ProcessOptions, Reference,
    TestSeed,
};
use half::bf16;
use std::os::unix::process::ExitStatusExt;
use std::path::Path as FsPath;
use std::time::{Duration, Instant};

/// Ranks of every scenario (rank 0 is the rendezvous hub).
const WORLD: usize = 3;
/// The operator's deadline, and the rendezvous timeout in the scenarios that fail the rendezvous.
const DEADLINE: Duration = Duration::from_secs(2);
/// What a survivor may take beyond the deadline to report (scheduling on a loaded 2-CPU runner).
const MARGIN: Duration = Duration::from_secs(3);
/// A stalled rank sleeps past every survivor's bound.
const STALL: Duration = Duration::from_secs(6);
/// Calls that succeed before the fault (the group demonstrably worked).
const GOOD_CALLS: usize = 3;

/// Where the faulty rank fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Before it connects to the rendezvous.
    BeforeJoining,
    /// Connected, before the exchange of shared-buffer handles (inside `AllReduceRmsNorm::new`).
    AfterJoining,
    /// The operator is live and `GOOD_CALLS` calls ran; before the first barrier of the next call.
    BeforeFirstBarrier,
    /// In a 2-stage call, after the reduce-scatter, before add+RMSNorm ([`Fault`]).
    BetweenStages,
}

/// How it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    /// SIGKILL (or, between the stages, abort): no destructor runs.
    Killed,
    /// Sleeps [`STALL`], then carries on.
    Stalled,
}

/// A failure as a rank saw it.
#[derive(Debug)]
enum Seen {
    PeerTimeout { peer: u32 },
    RendezvousTimeout { missing: String },
    PeerClosed,
    Poisoned,
    Other(String),
}

fn seen_ipc(error: &arfuse_ipc::Error) -> Seen {
    match error {
        arfuse_ipc::Error::RendezvousTimeout { missing, .. } => Seen::RendezvousTimeout { missing: missing.clone() },
        arfuse_ipc::Error::Protocol(what) if what.contains("closed its connection") => Seen::PeerClosed,
        other => Seen::Other(other.to_string()),
    }
}

fn seen(error: &Error) -> Seen {
    match error {
        Error::PeerTimeout { peer, .. } => Seen::PeerTimeout { peer: *peer },
        Error::Poisoned(_) => Seen::Poisoned,
        Error::Ipc(e) => seen_ipc(e),
        other => Seen::Other(other.to_string()),
    }
}

/// Where a rank's run ended: the step, what it saw, how long that step took.
#[derive(Debug)]
struct Ending {
    step: Step,
    seen: Seen,
    took: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Connect,
    Create,
    Call(usize),
}

/// `/dev/shm` entries of process `pid` (the cpu backend names segments `/arfuse-<pid>-…`).
fn segments_of(pid: u32) -> usize {
    let prefix = format!("arfuse-{pid}-");
    std::fs::read_dir("/dev/shm")
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&prefix)).count())
        .unwrap_or(0)
}

/// The faulty rank's fault at the point it is called.
fn strike(how: How) {
    match how {
        How::Killed => {
            // SAFETY: sending a signal to ourselves; SIGKILL ends the process before kill returns.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            unreachable!("SIGKILL returned");
        }
        How::Stalled => std::thread::sleep(STALL),
    }
}

/// One rank's run: meet, create, call until the first error (at most `GOOD_CALLS + 3` calls).
/// Returns how it ended; successful calls are checked against the reference on the way.
fn run_rank(me: &ChildRank, phase: Phase, how: How, faulty: usize) -> Ending {
    let is_faulty = me.rank == faulty;
    let at = |p: Phase| is_faulty && phase == p;
    let seed = TestSeed::new("kills");
    let problem = Problem::new(WORLD, 4, 4096, DType::Bf16).with_seed(seed.seed());
    let fixture = Fixture::<bf16>::generate(&problem);
    let reference = Reference::compute(&fixture);

    if at(Phase::BeforeJoining) {
        strike(how);
    }
    let rendezvous_timeout = match phase {
        Phase::BeforeJoining | Phase::AfterJoining => DEADLINE,
        _ => Duration::from_secs(60),
    };
    let start = Instant::now();
    let mut rendezvous = match UnixRendezvous::connect(&me.dir, me.rank, WORLD, rendezvous_timeout) {
        Ok(r) => r,
        Err(e) => return Ending { step: Step::Connect, seen: seen_ipc(&e), took: start.elapsed() },
    };
    if at(Phase::AfterJoining) {
        strike(how);
    }
    let device = Cpu::open_device(0, 1).expect("cpu");
    let stream = Cpu::create_stream(&device).expect("stream");
    let mut config = Config::default();
    config.policy.max_size = 1 << 20;
    config.policy.push_slot_bytes = 1 << 19;
    config.deadline = DEADLINE;
    if at(Phase::BetweenStages) {
        config.fault = Some(match how {
            How::Killed => Fault::AbortBetweenStages,
            How::Stalled => Fault::StallBetweenStages(STALL),
        });
    }
    let mut op = match AllReduceRmsNorm::<Cpu>::new(&device, &mut rendezvous, config) {
        Ok(op) => op,
        // From the start of the rendezvous: a rank waits there for the hub, which waits for all.
        Err(e) => return Ending { step: Step::Create, seen: seen(&e), took: start.elapsed() },
    };
    let mut ending = None;
    for i in 0..GOOD_CALLS + 3 {
        if i == GOOD_CALLS && at(Phase::BeforeFirstBarrier) {
            strike(how);
        }
        // 1-stage until the fault, 2-stage from then on (the between-stages fault fires there).
        let path = if i < GOOD_CALLS { Path::OneStage } else { Path::TwoStage };
        let start = Instant::now();
        match call(&mut op, &stream, Some(path), &fixture) {
            Ok(got) => {
                let what = format!("rank {} call {i} ({path})", me.rank);
                reference.assert_residual_out_exact(&what, &got.residual_out);
                reference.assert_out_within(&what, &got.out, 1);
            }
            Err(e) => {
                ending = Some(Ending { step: Step::Call(i), seen: seen(&e), took: start.elapsed() });
                break;
            }
        }
    }
    let ending = ending.unwrap_or_else(|| panic!("rank {}: every call succeeded although a peer failed", me.rank));
    // A failed operator refuses everything after, without waiting.
    let start = Instant::now();
    let again = call(&mut op, &stream, Some(Path::TwoStage), &fixture).err().expect("refused after a failure");
    assert!(matches!(again, Error::Poisoned(_)), "rank {}: {again}", me.rank);
    assert!(start.elapsed() < MARGIN, "a poisoned operator answered after {:?}", start.elapsed());
    drop(op);
    drop(rendezvous);
    ending
}

/// What survivor `rank` must see, given the fault.
fn check_survivor(rank: usize, phase: Phase, faulty: usize, ending: &Ending) {
    let Ending { step, seen, took } = ending;
    let bound = DEADLINE + MARGIN;
    assert!(*took <= bound, "rank {rank}: {seen:?} at {step:?} after {took:?}, above {bound:?}");
    let waited_deadline = || assert!(*took >= DEADLINE, "rank {rank}: {seen:?} after only {took:?}");
    match phase {
        Phase::BeforeJoining => match (faulty, rank) {
            // The hub never listens: everyone times out connecting.
            (0, _) => {
                assert!(matches!(step, Step::Connect) && matches!(seen, Seen::RendezvousTimeout { .. }), "{ending:?}");
                waited_deadline();
            }
            // The hub times out accepting, naming the missing rank, and closes the group.
            (_, 0) => match seen {
                Seen::RendezvousTimeout { missing } if *step == Step::Connect => {
                    assert!(missing.contains(&faulty.to_string()), "rank 0 names rank {faulty}: {missing}");
                    waited_deadline();
                }
                _ => panic!("rank 0: {ending:?}"),
            },
            // Connected ranks learn it when the hub closes their connection.
            _ => assert!(matches!((step, seen), (Step::Create, Seen::PeerClosed)), "rank {rank}: {ending:?}"),
        },
        // The dead rank's connection closes: everyone learns it at once.
        Phase::AfterJoining => {
            assert!(matches!((step, seen), (Step::Create, Seen::PeerClosed)), "rank {rank}: {ending:?}")
        }
        Phase::BeforeFirstBarrier | Phase::BetweenStages => {
            // Between the stages the dead rank has done its part of the call: the survivors finish
            // it (exact, checked) and time out at the next one.
            let call = if phase == Phase::BeforeFirstBarrier { GOOD_CALLS } else { GOOD_CALLS + 1 };
            match seen {
                Seen::PeerTimeout { peer } if *step == Step::Call(call) => {
                    assert_eq!(*peer as usize, faulty, "rank {rank} names the faulty rank");
                    waited_deadline();
                }
                _ => panic!("rank {rank}: expected a peer timeout at call {call}: {ending:?}"),
            }
        }
    }
}

/// Runs the scenario: in a child, the rank's part; in the parent, the ranks, then the checks.
fn scenario(test: &str, phase: Phase, how: How, faulty: usize) {
    if let Some(me) = child() {
        std::fs::write(me.dir.join(format!("pid-{}", me.rank)), std::process::id().to_string()).expect("pid file");
        if me.rank == faulty {
            // SAFETY: prctl with PR_SET_DUMPABLE takes an integer argument; an abort dumps no core.
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
        }
        let ending = run_rank(&me, phase, how, faulty);
        eprintln!("kills: rank {} ended at {:?} with {:?} after {:?}", me.rank, ending.step, ending.seen, ending.took);
        if me.rank == faulty {
            // The stalled rank woke up to a dead group: any typed failure, never data (checked).
            match &ending.seen {
                Seen::Other(what) => panic!("stalled rank: an untyped failure at {:?}: {what}", ending.step),
                Seen::Poisoned => panic!("stalled rank: poisoned before any failure: {ending:?}"),
                _ => {}
            }
        } else {
            check_survivor(me.rank, phase, faulty, &ending);
        }
        assert_eq!(segments_of(std::process::id()), 0, "rank {}: shared memory left after drop", me.rank);
        return;
    }
    let dir = fresh_private_dir().expect("private dir");
    let options = ProcessOptions::new(WORLD, Duration::from_secs(90)).dir(dir.path());
    let outcomes = run_processes_with(test, &options).expect("process harness");
    for outcome in &outcomes {
        if outcome.rank == faulty && how == How::Killed {
            let signal = if phase == Phase::BetweenStages { libc::SIGABRT } else { libc::SIGKILL };
            assert_eq!(outcome.status.signal(), Some(signal), "{outcome}");
            assert!(!outcome.timed_out, "{outcome}");
        } else {
            assert!(outcome.succeeded(), "{outcome}");
        }
        // Survivors' measured figures, for the log (`--nocapture`).
        for line in outcome.stderr.lines().filter(|l| l.starts_with("kills:")) {
            println!("{line}");
        }
    }
    for rank in 0..WORLD {
        let pid: u32 = read_pid(dir.path(), rank);
        assert!(!is_our_zombie(pid), "rank {rank} (pid {pid}) is a zombie");
        assert_eq!(segments_of(pid), 0, "rank {rank} (pid {pid}) left shared memory in /dev/shm");
    }
}

fn read_pid(dir: &FsPath, rank: usize) -> u32 {
    let text = std::fs::read_to_string(dir.join(format!("pid-{rank}"))).expect("pid file of every rank");
    text.trim().parse().expect("a pid")
}

/// `pid` is a child of this process that exited and was never waited for.
fn is_our_zombie(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false; // reaped: gone
    };
    // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let mut fields = rest.split_whitespace();
    let state = fields.next().unwrap_or("");
    let ppid: u32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    state == "Z" && ppid == std::process::id()
}

#[test]
fn killed_before_joining_the_rendezvous_hub() {
    scenario(&test_path!(killed_before_joining_the_rendezvous_hub), Phase::BeforeJoining, How::Killed, 0);
}

#[test]
fn killed_before_joining_the_rendezvous_non_hub() {
    scenario(&test_path!(killed_before_joining_the_rendezvous_non_hub), Phase::BeforeJoining, How::Killed, 2);
}

#[test]
fn stalled_before_joining_the_rendezvous_hub() {
    scenario(&test_path!(stalled_before_joining_the_rendezvous_hub), Phase::BeforeJoining, How::Stalled, 0);
}

#[test]
fn stalled_before_joining_the_rendezvous_non_hub() {
    scenario(&test_path!(stalled_before_joining_the_rendezvous_non_hub), Phase::BeforeJoining, How::Stalled, 1);
}

#[test]
fn killed_after_joining_before_the_buffer_exchange_hub() {
    scenario(&test_path!(killed_after_joining_before_the_buffer_exchange_hub), Phase::AfterJoining, How::Killed, 0);
}

#[test]
fn killed_after_joining_before_the_buffer_exchange_non_hub() {
    scenario(&test_path!(killed_after_joining_before_the_buffer_exchange_non_hub), Phase::AfterJoining, How::Killed, 2);
}

#[test]
fn killed_before_the_first_barrier_of_a_call() {
    scenario(&test_path!(killed_before_the_first_barrier_of_a_call), Phase::BeforeFirstBarrier, How::Killed, 0);
}

#[test]
fn stalled_before_the_first_barrier_of_a_call() {
    scenario(&test_path!(stalled_before_the_first_barrier_of_a_call), Phase::BeforeFirstBarrier, How::Stalled, 2);
}

#[test]
fn killed_between_the_two_stages() {
    scenario(&test_path!(killed_between_the_two_stages), Phase::BetweenStages, How::Killed, 1);
}

#[test]
fn stalled_between_the_two_stages() {
    scenario(&test_path!(stalled_between_the_two_stages), Phase::BetweenStages, How::Stalled, 0);
}
