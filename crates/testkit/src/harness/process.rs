//! The process harness: child ranks re-execute the current test binary for one exact test.

use crate::HarnessError;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Environment variable carrying a child's rank.
pub const ENV_RANK: &str = "ARFUSE_TESTKIT_RANK";
/// Environment variable carrying the world size.
pub const ENV_WORLD: &str = "ARFUSE_TESTKIT_WORLD";
/// Environment variable carrying the shared private directory.
pub const ENV_DIR: &str = "ARFUSE_TESTKIT_DIR";
/// Environment variable carrying the test path the child was started for.
pub const ENV_TEST: &str = "ARFUSE_TESTKIT_TEST";

/// How often the parent polls its children for exit.
const POLL: Duration = Duration::from_millis(5);
/// Lines of a failed child's stderr quoted in reports.
const STDERR_TAIL_LINES: usize = 30;

/// What a child rank learns from its environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildRank {
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// A private directory (mode 0700) shared by all ranks of this run, removed after it.
    pub dir: PathBuf,
    /// The libtest path the parent asked for.
    pub test_path: String,
}

/// This process's rank if it is a child started by [`run_processes`], else `None`.
///
/// # Panics
/// If `ARFUSE_TESTKIT_RANK` is set but the other variables are missing or malformed (a child
/// started by hand, wrongly): running the test as if it were the parent would be worse.
pub fn child() -> Option<ChildRank> {
    let rank = std::env::var(ENV_RANK).ok()?;
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{ENV_RANK} is set but {name} is not"));
    let number = |name: &str, text: &str| -> usize {
        text.parse().unwrap_or_else(|_| panic!("{name}={text:?} is not a number"))
    };
    let rank = number(ENV_RANK, &rank);
    let world_size = number(ENV_WORLD, &var(ENV_WORLD));
    assert!(rank < world_size, "{ENV_RANK}={rank} is not below {ENV_WORLD}={world_size}");
    Some(ChildRank { rank, world_size, dir: PathBuf::from(var(ENV_DIR)), test_path: var(ENV_TEST) })
}

/// A directory only this user can enter (mode 0700), under `std::env::temp_dir()`, removed
/// (with its contents) on drop unless [`PrivateDir::keep`] is called.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
    keep: bool,
}

impl PrivateDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory on disk (to inspect it after a failure) and returns its path.
    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.path.clone()
    }
}

impl AsRef<Path> for PrivateDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: a leftover directory in the temp dir is not worth a panic in drop.
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Creates a fresh [`PrivateDir`]: a new name every call (never an existing directory, so no
/// one can prepare it in advance), created with mode 0700.
pub fn fresh_private_dir() -> Result<PrivateDir, HarnessError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir();
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let mut attempt = 0;
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("arfuse-testkit-{}-{n}-{nanos:08x}", std::process::id()));
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        match builder.create(&path) {
            Ok(()) => return Ok(PrivateDir { path, keep: false }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(source) => return Err(HarnessError::PrivateDir { path, source }),
        }
    }
}

/// How [`run_processes_with`] runs the ranks.
#[derive(Clone, Debug)]
pub struct ProcessOptions {
    /// Number of rank processes.
    pub world_size: usize,
    /// How long all ranks together may take; ranks still running then are killed.
    pub timeout: Duration,
    /// Once a rank has failed, how long the others may still run before they are killed
    /// (`None`: they get the full `timeout`; set this when peers of a dead rank could hang).
    pub failure_grace: Option<Duration>,
    /// Extra environment variables for every child.
    pub env: Vec<(String, String)>,
    /// The shared directory to use (the caller keeps and removes it); `None`: a fresh
    /// [`PrivateDir`] removed after the run.
    pub dir: Option<PathBuf>,
    /// Also copy every child's stderr to this process's stderr as it arrives (progress of long
    /// runs); it is captured in [`ChildOutcome::stderr`] either way.
    pub echo_stderr: bool,
    /// Bound the run by lack of progress instead of `timeout`: the ranks still running are killed
    /// once no child has written anything (stdout or stderr) for this long, however long the
    /// whole run takes (a loaded machine slows a run down, it does not stall it).
    pub stall_timeout: Option<Duration>,
}

impl ProcessOptions {
    /// `world_size` ranks, `timeout` in all, no grace period, no extra environment, a fresh directory.
    pub fn new(world_size: usize, timeout: Duration) -> Self {
        ProcessOptions {
            world_size,
            timeout,
            failure_grace: None,
            env: Vec::new(),
            dir: None,
            echo_stderr: false,
            stall_timeout: None,
        }
    }

    /// Adds an environment variable for every child.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Uses `dir` as the shared directory.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Copies the children's stderr to ours as it arrives.
    pub fn echo_stderr(mut self) -> Self {
        self.echo_stderr = true;
        self
    }

    /// Kills the remaining ranks `grace` after the first one failed.
    pub fn failure_grace(mut self, grace: Duration) -> Self {
        self.failure_grace = Some(grace);
        self
    }
}

/// How one rank process ended.
#[derive(Debug)]
pub struct ChildOutcome {
    /// The rank.
    pub rank: usize,
    /// Its exit status (after a kill: the signal's).
    pub status: ExitStatus,
    /// It was killed because the run's timeout (or a failure's grace period) ran out.
    pub timed_out: bool,
    /// libtest reported running exactly one test (otherwise the test path matched nothing).
    pub ran_test: bool,
    /// What it wrote to stdout (libtest's lines, and the test's own with `--nocapture`).
    pub stdout: String,
    /// What it wrote to stderr (panic messages).
    pub stderr: String,
    /// From the start of the run to its exit.
    pub elapsed: Duration,
}

impl ChildOutcome {
    /// It ran its test, which passed, in time.
    pub fn succeeded(&self) -> bool {
        self.status.success() && !self.timed_out && self.ran_test
    }

    /// The panic report in its stderr (`panicked at file:line:col:` and the message), if any.
    pub fn panic_message(&self) -> Option<String> {
        let lines: Vec<&str> = self.stderr.lines().collect();
        let at = lines.iter().position(|line| line.contains("panicked at"))?;
        let end = lines[at + 1..]
            .iter()
            .position(|line| line.starts_with("note:") || line.starts_with("stack backtrace:") || line.is_empty())
            .map_or(lines.len(), |n| at + 1 + n);
        Some(lines[at..end].join("\n"))
    }
}

impl fmt::Display for ChildOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.timed_out {
            "killed after the timeout".to_string()
        } else if !self.ran_test && self.status.success() {
            "ran no test (the test path matched nothing; use test_path!)".to_string()
        } else if self.succeeded() {
            "passed".to_string()
        } else {
            format!("failed ({})", self.status)
        };
        write!(f, "rank {}: {verdict} after {:.2} s", self.rank, self.elapsed.as_secs_f64())?;
        if self.succeeded() {
            return Ok(());
        }
        if let Some(message) = self.panic_message() {
            write!(f, "\n    {}", message.replace('\n', "\n    "))?;
        }
        let lines: Vec<&str> = self.stderr.lines().collect();
        if !lines.is_empty() {
            let from = lines.len().saturating_sub(STDERR_TAIL_LINES);
            write!(f, "\n    stderr (last {} lines):", lines.len() - from)?;
            for line in &lines[from..] {
                write!(f, "\n    | {line}")?;
            }
        }
        Ok(())
    }
}

/// [`run_processes_with`] with `world_size` ranks, `timeout`, and default options.
pub fn run_processes(test_path: &str, world_size: usize, timeout: Duration) -> Result<Vec<ChildOutcome>, HarnessError> {
    run_processes_with(test_path, &ProcessOptions::new(world_size, timeout))
}

/// Runs the test `test_path` (a libtest path without the crate name, see [`crate::test_path!`])
/// of the current test binary in `options.world_size` child processes and waits for them.
///
/// Every child gets `ARFUSE_TESTKIT_{RANK,WORLD,DIR,TEST}` and `options.env`, no stdin, and its
/// stdout and stderr captured. The parent polls for exits (no sleeps for synchronisation: the
/// children meet through the directory or whatever the test uses); when the timeout runs out,
/// the remaining children are killed. Returns every rank's outcome, failed ones included
/// (tests of failure behaviour inspect them); use [`check_ranks`] or [`assert_ranks_succeeded`].
/// Errors are the harness's own: no binary, no directory, a child that could not be started.
pub fn run_processes_with(test_path: &str, options: &ProcessOptions) -> Result<Vec<ChildOutcome>, HarnessError> {
    if let Some(me) = child() {
        return Err(HarnessError::Nested { rank: me.rank, world_size: me.world_size });
    }
    let world_size = options.world_size;
    if world_size == 0 {
        return Err(HarnessError::EmptyWorld);
    }
    let exe = std::env::current_exe().map_err(HarnessError::CurrentExe)?;
    let fresh;
    let dir = match &options.dir {
        Some(dir) => dir.as_path(),
        None => {
            fresh = fresh_private_dir()?;
            fresh.path()
        }
    };
    let started = Instant::now();
    // Milliseconds after `started` at which any child last wrote something.
    let activity = Arc::new(AtomicU64::new(0));
    let mut running: Vec<Running> = Vec::with_capacity(world_size);
    for rank in 0..world_size {
        let mut command = Command::new(&exe);
        command
            .args(["--exact", test_path, "--nocapture", "--test-threads=1"])
            .env(ENV_RANK, rank.to_string())
            .env(ENV_WORLD, world_size.to_string())
            .env(ENV_DIR, dir)
            .env(ENV_TEST, test_path)
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match command.spawn() {
            Ok(child) => running.push(Running::new(rank, child, options.echo_stderr, started, &activity)),
            Err(source) => {
                for r in &mut running {
                    r.kill();
                }
                return Err(HarnessError::Spawn { rank, world_size, source });
            }
        }
    }
    // A timeout too long to add to an instant (`Duration::MAX`) never expires.
    let mut deadline = started.checked_add(options.timeout);
    loop {
        let mut all_done = true;
        let mut wait_error = None;
        for r in running.iter_mut().filter(|r| r.status.is_none()) {
            match r.child.try_wait() {
                Ok(Some(status)) => {
                    r.finish(status, started);
                    if !status.success() {
                        if let Some(grace) = options.failure_grace {
                            let end = Instant::now() + grace;
                            deadline = Some(deadline.map_or(end, |d| d.min(end)));
                        }
                    }
                }
                Ok(None) => all_done = false,
                Err(source) => {
                    wait_error = Some(HarnessError::Wait { rank: r.rank, source });
                    break;
                }
            }
        }
        if let Some(error) = wait_error {
            for r in &mut running {
                r.kill();
            }
            return Err(error);
        }
        if all_done {
            break;
        }
        let expired = match options.stall_timeout {
            Some(stall) => started.elapsed() >= Duration::from_millis(activity.load(Ordering::Relaxed)) + stall,
            None => deadline.is_some_and(|d| Instant::now() >= d),
        };
        if expired {
            for r in running.iter_mut().filter(|r| r.status.is_none()) {
                let rank = r.rank;
                r.timed_out = true;
                let _ = r.child.kill();
                let status = r.child.wait().map_err(|source| HarnessError::Wait { rank, source })?;
                r.finish(status, started);
            }
            break;
        }
        std::thread::sleep(POLL);
    }
    Ok(running.into_iter().map(Running::into_outcome).collect())
}

/// A child being waited for, with the threads draining its pipes.
struct Running {
    rank: usize,
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    status: Option<ExitStatus>,
    timed_out: bool,
    elapsed: Duration,
}

impl Running {
    fn new(rank: usize, mut child: Child, echo_stderr: bool, started: Instant, activity: &Arc<AtomicU64>) -> Self {
        let stdout = child.stdout.take().map(|pipe| drain(pipe, false, started, activity.clone()));
        let stderr = child.stderr.take().map(|pipe| drain(pipe, echo_stderr, started, activity.clone()));
        Running { rank, child, stdout, stderr, status: None, timed_out: false, elapsed: Duration::ZERO }
    }

    fn finish(&mut self, status: ExitStatus, started: Instant) {
        self.status = Some(status);
        self.elapsed = started.elapsed();
    }

    /// Kills and reaps a child (harness failure path).
    fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn into_outcome(mut self) -> ChildOutcome {
        let join = |handle: Option<JoinHandle<String>>| handle.and_then(|h| h.join().ok()).unwrap_or_default();
        let stdout = join(self.stdout.take());
        let stderr = join(self.stderr.take());
        let ran_test = stdout.lines().any(|line| line.trim() == "running 1 test");
        // `status` is always set here: every child is reaped before the outcomes are built.
        let status = match self.status {
            Some(status) => status,
            None => self.child.wait().unwrap_or_else(|_| exit_status_failure()),
        };
        ChildOutcome {
            rank: self.rank,
            status,
            timed_out: self.timed_out,
            ran_test,
            stdout,
            stderr,
            elapsed: self.elapsed,
        }
    }
}

/// An exit status that is not success (for a child whose status could not be read).
fn exit_status_failure() -> ExitStatus {
    #[cfg(unix)]
    {
        std::os::unix::process::ExitStatusExt::from_raw(1 << 8)
    }
    #[cfg(not(unix))]
    {
        std::os::windows::process::ExitStatusExt::from_raw(1)
    }
}

/// Reads a pipe to its end on a thread (so a chatty child never blocks on a full pipe), copying
/// what it reads to our stderr if `echo`, and noting in `activity` when it last read something.
fn drain(
    mut pipe: impl Read + Send + 'static,
    echo: bool,
    started: Instant,
    activity: Arc<AtomicU64>,
) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    activity.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    if echo {
                        // Written past libtest's capture on purpose: progress of a long run.
                        let _ = std::io::Write::write_all(&mut std::io::stderr(), &chunk[..n]);
                    }
                    bytes.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A read error ends the capture; what was read so far is kept.
                Err(_) => break,
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// `Ok(())` if every rank succeeded, else [`HarnessError::RanksFailed`] describing each failed rank.
pub fn check_ranks(outcomes: &[ChildOutcome]) -> Result<(), HarnessError> {
    let failed: Vec<&ChildOutcome> = outcomes.iter().filter(|o| !o.succeeded()).collect();
    if failed.is_empty() {
        return Ok(());
    }
    let report = failed.iter().map(|o| o.to_string()).collect::<Vec<_>>().join("\n");
    Err(HarnessError::RanksFailed { failed: failed.len(), world_size: outcomes.len(), report })
}

/// Panics (the intended test failure) unless every rank succeeded, with a report per failed rank.
#[track_caller]
pub fn assert_ranks_succeeded(outcomes: &[ChildOutcome]) {
    if let Err(error) = check_ranks(outcomes) {
        panic!("{error}");
    }
}
