//! Who the Unix-socket rendezvous admits: a symbolic link in place of the directory is refused;
//! strangers (a liveness probe, a second rank 0, garbage, silence, a wrong token, another user's
//! process) are dropped alone while the group's members meet and gather correctly.

use arfuse_ipc::unix::{SOCKET_NAME, TOKEN_ENV};
use arfuse_ipc::wire::{encode, Frame, Kind};
use arfuse_ipc::{Error, Rendezvous, Result, UnixRendezvous};
use arfuse_testkit::{fresh_private_dir, test_path, PrivateDir};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Rendezvous timeout of the members: long, since no test waits for it to run out.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long a wait may go without progress before a test gives up.
const NO_PROGRESS: Duration = Duration::from_secs(30);
/// The uid the cross-user test runs the group as (`nobody`).
const OTHER_UID: u32 = 65534;
/// Set in the re-executed test binary that runs the group as [`OTHER_UID`]: the directory.
const UID_CHILD_ENV: &str = "ARFUSE_IPC_TEST_UID_CHILD_DIR";

/// A fresh private directory and the rendezvous directory inside it (not created yet).
fn group_dir() -> (PrivateDir, PathBuf) {
    let base = fresh_private_dir().expect("private dir");
    let dir = base.path().join("rv");
    (base, dir)
}

/// Connects to the socket in `dir` as a raw client once a hub listens there. `alive` is asked
/// between attempts and may panic (a hub process that exited).
fn connect_raw(dir: &Path, mut alive: impl FnMut()) -> UnixStream {
    let path = dir.join(SOCKET_NAME);
    let since = Instant::now();
    loop {
        match UnixStream::connect(&path) {
            Ok(stream) => return stream,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                assert!(since.elapsed() < NO_PROGRESS, "no hub listened at {} for {NO_PROGRESS:?}", path.display());
                alive();
                std::thread::yield_now();
            }
            Err(e) => panic!("connecting to {}: {e}", path.display()),
        }
    }
}

/// The hub closed `stream` without sending it anything (end of file, or a reset where it left
/// our bytes unread).
fn assert_dropped(mut stream: UnixStream) {
    stream.set_read_timeout(Some(NO_PROGRESS)).expect("read timeout");
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) => assert!(got.is_empty(), "a stranger was sent {} bytes", got.len()),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("the hub kept a stranger's connection for {NO_PROGRESS:?} without a word")
        }
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "waiting to be dropped: {e}"),
    }
}

/// Joins as `rank` of `world` with `token` and gathers one round of `[rank]`.
fn member(dir: &Path, rank: usize, world: usize, token: &[u8]) -> Result<Vec<Vec<u8>>> {
    UnixRendezvous::connect_with_token(dir, rank, world, TIMEOUT, token)?.all_gather(&[rank as u8])
}

fn expected(world: usize) -> Vec<Vec<u8>> {
    (0..world).map(|r| vec![r as u8]).collect()
}

#[test]
fn a_symlink_in_place_of_the_directory_is_refused() {
    let (base, dir) = group_dir();
    std::fs::DirBuilder::new().mode(0o700).create(&dir).expect("dir");
    let link = base.path().join("link");
    std::os::unix::fs::symlink(&dir, &link).expect("symlink");
    let err = UnixRendezvous::connect(&link, 0, 1, TIMEOUT).expect_err("a symlinked directory");
    assert!(matches!(&err, Error::InsecureDir { reason, .. } if reason.contains("symbolic link")), "{err}");
    // The directory itself is fine, and nothing was created through the link.
    UnixRendezvous::connect(&dir, 0, 1, TIMEOUT).expect("the real directory");
    assert!(!dir.join(SOCKET_NAME).exists(), "socket file left behind");
}

#[test]
fn a_stray_probe_and_a_second_rank_0_do_not_break_a_live_group() {
    let (_base, dir) = group_dir();
    std::thread::scope(|s| {
        let hub = s.spawn(|| member(&dir, 0, 2, b""));
        // A liveness probe: connect and close at once, as a second rank 0 does.
        drop(connect_raw(&dir, || {}));
        let err = UnixRendezvous::connect(&dir, 0, 2, TIMEOUT).expect_err("rank 0 is taken");
        assert!(err.to_string().contains("in use by another live rendezvous"), "{err}");
        let one = member(&dir, 1, 2, b"").expect("rank 1 gathers");
        assert_eq!(one, expected(2));
        assert_eq!(hub.join().expect("hub thread").expect("the hub gathers"), expected(2));
    });
}

#[test]
fn a_client_sending_garbage_is_dropped_and_the_group_meets() {
    let (_base, dir) = group_dir();
    std::thread::scope(|s| {
        let hub = s.spawn(|| member(&dir, 0, 3, b""));
        let mut garbage = connect_raw(&dir, || {});
        garbage.write_all(b"GET / HTTP/1.1\r\nHost: arfuse\r\n\r\n").expect("write");
        assert_dropped(garbage);
        // A well-formed frame that is not a hello (a round-5 contribution) is no member either.
        let mut early = connect_raw(&dir, || {});
        let frame = Frame { kind: Kind::Contribute, rank: 1, world: 3, round: 5, payload: vec![1] };
        early.write_all(&encode(&frame).expect("encode")).expect("write");
        assert_dropped(early);
        let dir = &dir;
        let others: Vec<_> = (1..3).map(|rank| s.spawn(move || member(dir, rank, 3, b""))).collect();
        for other in others {
            assert_eq!(other.join().expect("rank thread").expect("a member gathers"), expected(3));
        }
        assert_eq!(hub.join().expect("hub thread").expect("the hub gathers"), expected(3));
    });
}

#[test]
fn a_silent_client_does_not_hold_up_the_group() {
    let (_base, dir) = group_dir();
    std::thread::scope(|s| {
        let hub = s.spawn(|| member(&dir, 0, 2, b""));
        // One says nothing, one stops halfway through its header; both stay connected.
        let silent = connect_raw(&dir, || {});
        let mut halfway = connect_raw(&dir, || {});
        let hello = encode(&Frame { kind: Kind::Contribute, rank: 1, world: 2, round: 0, payload: vec![] });
        halfway.write_all(&hello.expect("encode")[..10]).expect("write");
        assert_eq!(member(&dir, 1, 2, b"").expect("rank 1 gathers"), expected(2));
        assert_eq!(hub.join().expect("hub thread").expect("the hub gathers"), expected(2));
        // The hub is done accepting: the strangers are let go.
        assert_dropped(silent);
        assert_dropped(halfway);
    });
}

#[test]
fn a_client_with_a_wrong_token_is_dropped_and_the_group_meets() {
    let (_base, dir) = group_dir();
    let token = b"group-secret-1234";
    std::thread::scope(|s| {
        let hub = s.spawn(|| member(&dir, 0, 2, token));
        // Each claims rank 1 before the real one comes, and learns it was dropped at its first round.
        for wrong in [&b"group-secret-1235"[..], b"", b"group-secret"] {
            let mut stray = UnixRendezvous::connect_with_token(&dir, 1, 2, TIMEOUT, wrong).expect("connect");
            let err = stray.all_gather(b"x").expect_err("dropped by the hub");
            assert!(err.to_string().contains("a peer closed its connection"), "{err}");
        }
        assert_eq!(member(&dir, 1, 2, token).expect("rank 1 gathers"), expected(2));
        assert_eq!(hub.join().expect("hub thread").expect("the hub gathers"), expected(2));
    });
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

#[test]
fn another_users_directory_is_refused() {
    if !running_as_root() {
        eprintln!("SKIPPED another_users_directory_is_refused: needs root to chown a directory to uid {OTHER_UID}");
        return;
    }
    let (_base, dir) = group_dir();
    std::fs::DirBuilder::new().mode(0o700).create(&dir).expect("dir");
    std::os::unix::fs::chown(&dir, Some(OTHER_UID), Some(OTHER_UID)).expect("chown");
    let err = UnixRendezvous::connect(&dir, 0, 1, TIMEOUT).expect_err("another user's directory");
    assert!(matches!(&err, Error::InsecureDir { reason, .. } if reason.contains("belongs to uid 65534")), "{err}");
}

/// The group's side of [`another_users_client_is_refused_by_peer_credentials`], as [`OTHER_UID`]:
/// the hub, and rank 1 once the parent (root, a stranger here) says it has been dropped.
fn group_as_other_user(dir: &Path) {
    std::thread::scope(|s| {
        let hub = s.spawn(|| UnixRendezvous::connect(dir, 0, 2, TIMEOUT)?.all_gather(b"hub"));
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).expect("stdin");
        assert_eq!(line.trim(), "go", "the parent's word");
        let mut rv = UnixRendezvous::connect(dir, 1, 2, TIMEOUT).expect("rank 1");
        let got = rv.all_gather(b"one").expect("rank 1 gathers");
        assert_eq!(got, vec![b"hub".to_vec(), b"one".to_vec()]);
        assert_eq!(hub.join().expect("hub thread").expect("the hub gathers"), got);
    });
    println!("group of uid {OTHER_UID}: met and gathered");
}

/// Another user's process that reaches the socket is refused by `SO_PEERCRED`, even with the right
/// token and a free rank. A user without privileges cannot even reach it (the directory is 0700),
/// so the roles are reversed: the group runs as [`OTHER_UID`] in a re-executed test binary, and
/// the stranger is this process, root, which can enter any directory.
#[test]
fn another_users_client_is_refused_by_peer_credentials() {
    if let Some(dir) = std::env::var_os(UID_CHILD_ENV) {
        group_as_other_user(Path::new(&dir));
        return;
    }
    if !running_as_root() {
        eprintln!(
            "SKIPPED another_users_client_is_refused_by_peer_credentials: needs root to run the group as uid {OTHER_UID}"
        );
        return;
    }
    let token = "token-known-to-the-stranger-too";
    let (base, dir) = group_dir();
    std::fs::DirBuilder::new().mode(0o700).create(&dir).expect("dir");
    // The group's user must reach its directory: its parent (ours, 0700) is opened to search only.
    std::fs::set_permissions(base.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).expect("chmod");
    std::os::unix::fs::chown(&dir, Some(OTHER_UID), Some(OTHER_UID)).expect("chown");
    let exe = std::env::current_exe().expect("test binary");
    let mut child: Child = Command::new(&exe)
        .args(["--exact", &test_path!(another_users_client_is_refused_by_peer_credentials), "--nocapture"])
        .args(["--test-threads=1"])
        .env(UID_CHILD_ENV, &dir)
        .env(TOKEN_ENV, token)
        .uid(OTHER_UID)
        .gid(OTHER_UID)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the group");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stranger = connect_raw(&dir, || {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("the group exited ({status}) before its hub listened:\n{err}");
        }
    });
    let hello = Frame { kind: Kind::Contribute, rank: 1, world: 2, round: 0, payload: token.into() };
    // The hub may drop the stranger before its hello is written (it checks the peer's credentials
    // on accept, before reading): a broken pipe or reset on the write is the refusal seen early.
    match stranger.write_all(&encode(&hello).expect("encode")) {
        Ok(()) => assert_dropped(stranger),
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
            "writing the stranger's hello: {e}"
        ),
    }
    stdin.write_all(b"go\n").expect("tell the group");
    drop(stdin);
    let out = child.wait_with_output().expect("wait for the group");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("met and gathered"),
        "the group of uid {OTHER_UID} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
