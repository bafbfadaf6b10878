//! Running parsrv: a spawner of groups ([`Spawner`], started through [`group`]'s builder
//! or a config file), one-shot commands, and their output.

use std::{
    fs,
    io::{self, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use parsrv::{
    control::{self, Request, Response},
    spec::{flags, GroupSpec, HandlerKind, HandlerRange, Policy, WhenFull},
    status::GroupStatus,
};

use crate::*;

/// The address the tests' groups listen on unless they say otherwise (each test has a
/// network namespace of its own, so every test can use it).
pub const ADDR: &str = "127.0.0.1:8080";

/// The test group's address as a `SocketAddr`.
pub fn addr() -> SocketAddr {
    ADDR.parse().unwrap()
}

/// A group to start, described with the model parsrv itself uses ([`GroupSpec`]): the
/// builder sets what a test cares about, and everything else keeps parsrv's defaults.
///
/// ```no_run
/// use parsrv_integration_tests::{group, HandlerKind};
/// let spawner = group("test-stall", HandlerKind::Http).handlers(4).backlog(8).threads(2).start();
/// # drop(spawner);
/// ```
#[must_use]
pub struct GroupBuilder {
    pub spec: GroupSpec,
    /// Flags of `parsrv run` that are not the group's (`--metrics`).
    extra: Vec<String>,
    /// Environment variables for `parsrv run` (NOTIFY_SOCKET, ...).
    envs: Vec<(String, String)>,
}

/// A group named `name` on [`ADDR`], running `handler`, with parsrv's defaults.
pub fn group(name: &str, handler: HandlerKind) -> GroupBuilder {
    GroupBuilder {
        spec: GroupSpec {
            name: name.to_owned(),
            ..GroupSpec::new(ADDR.parse().unwrap(), handler)
        },
        extra: Vec::new(),
        envs: Vec::new(),
    }
}

impl GroupBuilder {
    pub fn listen(mut self, addr: &str) -> Self {
        self.spec.listen = vec![addr.parse().expect("a test address")];
        self
    }

    /// Several `--listen` entries (addresses, or prefixes and port ranges).
    pub fn listen_on(mut self, entries: &[&str]) -> Self {
        self.spec.listen = entries
            .iter()
            .map(|e| e.parse().expect("a test address"))
            .collect();
        self
    }

    /// A fixed number of handlers.
    pub fn handlers(mut self, count: u32) -> Self {
        self.spec.handlers = HandlerRange {
            min: count,
            max: count,
        };
        self
    }

    /// Between `min` and `max` handlers (autoscaled unless [`Self::no_autoscale`]).
    pub fn handlers_between(mut self, min: u32, max: u32) -> Self {
        self.spec.handlers = HandlerRange { min, max };
        self
    }

    pub fn no_autoscale(mut self) -> Self {
        self.spec.autoscale = false;
        self
    }

    pub fn backlog(mut self, backlog: u32) -> Self {
        self.spec.backlog = backlog;
        self
    }

    pub fn threads(mut self, threads: u32) -> Self {
        self.spec.threads = threads;
        self
    }

    pub fn policy(mut self, policy: Policy) -> Self {
        self.spec.policy = policy;
        self
    }

    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.spec.when_full = when_full;
        self
    }

    pub fn drain(mut self) -> Self {
        self.spec.drain = true;
        self
    }

    /// `--stall-after`: 0 turns stall detection off, for a test whose subject is a full
    /// queue (a stopped handler is how a test makes one, and stall detection would move it).
    pub fn stall_after(mut self, seconds: f64) -> Self {
        self.spec.stall_after = seconds;
        self
    }

    /// A stopped handler keeps its share of new connections and holds them in its queue
    /// until that is full: what the full-queue tests build on (a stopped handler is how a
    /// test fills a queue). Stall detection off (it would move the queue) and policy
    /// `redirect` (`two-choices`, the default, sends a connection to a stopped handler's
    /// socket only while its queue is as short as the other socket drawn).
    pub fn stopped_handlers_keep_their_share(self) -> Self {
        self.stall_after(0.0).policy(Policy::Redirect)
    }

    /// Seconds a handler has to exit after SIGTERM (and a drain).
    pub fn grace(mut self, seconds: f64) -> Self {
        self.spec.grace = seconds;
        self
    }

    /// The program an exec handler runs.
    pub fn command(mut self, command: &[&str]) -> Self {
        self.spec.command = command.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Any other setting.
    pub fn with(mut self, change: impl FnOnce(&mut GroupSpec)) -> Self {
        change(&mut self.spec);
        self
    }

    /// Also serve metrics at `addr`.
    pub fn metrics(mut self, addr: &str) -> Self {
        self.extra.extend(["--metrics".to_owned(), addr.to_owned()]);
        self
    }

    /// The arguments of `parsrv run` for this group.
    pub fn args(&self) -> Vec<String> {
        let mut args = self.extra.clone();
        args.extend(flags::to_args(&self.spec));
        args
    }

    /// Sets an environment variable of `parsrv run`.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Starts `parsrv run` with this group and waits until every handler is ready: the
    /// group as it serves once started. (Alive is not enough: while one handler is ready,
    /// parsrv sends a slot whose handler is not yet ready no new connection, so a test that
    /// stopped such a handler to fill its queue would wait in vain.) A group with a handler
    /// that never gets ready starts with [`GroupBuilder::start_answering`].
    pub fn start(self) -> Spawner {
        self.start_with(|| Ok(()))
    }

    /// Starts `parsrv run` with this group and waits only until the spawner answers: for
    /// handlers that are not expected to stay up.
    pub fn start_answering(self) -> Spawner {
        Spawner::start_from(&parsrv_bin(), &self, || Ok(()), false)
    }

    /// Same, with `setup` run in the child before exec (namespaces, capabilities).
    pub fn start_with(
        self,
        setup: impl FnMut() -> io::Result<()> + Send + Sync + 'static,
    ) -> Spawner {
        Spawner::start_from(&parsrv_bin(), &self, setup, true)
    }

    /// Same, running the parsrv binary at `binary` (a copy the test may replace).
    pub fn start_binary(self, binary: &Path) -> Spawner {
        Spawner::start_from(binary, &self, || Ok(()), true)
    }
}

/// Runs `command` to its end and returns its stdout; panics with its stderr unless it
/// succeeded.
pub fn stdout_of(command: &mut Command) -> String {
    let out = command.output().expect("running a command");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The parsrv binary under test (built by `cargo xtask test`, which sets PARSRV_BIN).
pub fn parsrv_bin() -> PathBuf {
    std::env::var_os("PARSRV_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/parsrv"))
}

/// A `parsrv run` process, stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Spawner {
    child: Option<Child>,
    pub name: String,
    log: PathBuf,
}

impl Spawner {
    /// Starts `parsrv run --config FILE EXTRA...` and waits until every one of `groups` has
    /// all its handlers ready (see [`GroupBuilder::start`] for why not merely alive). `label`
    /// names the log.
    pub fn start_config(
        label: &str,
        config: &std::path::Path,
        groups: &[&str],
        extra: &[&str],
    ) -> Spawner {
        let mut command = Command::new(parsrv_bin());
        command.arg("run").arg("--config").arg(config).args(extra);
        Self::launch_config(label, groups, command)
    }

    /// [`Spawner::start_config`] with environment variables (NOTIFY_SOCKET, ...).
    pub fn start_config_with_env(
        label: &str,
        config: &std::path::Path,
        groups: &[&str],
        envs: &[(&str, &str)],
    ) -> Spawner {
        let mut command = Command::new(parsrv_bin());
        command.arg("run").arg("--config").arg(config);
        command.envs(envs.iter().copied());
        Self::launch_config(label, groups, command)
    }

    /// Runs `command` (a whole `parsrv run --config ...`, set up as the test wants: its
    /// capabilities, its environment) and waits until every one of `groups` is ready.
    pub fn launch_config(label: &str, groups: &[&str], command: Command) -> Spawner {
        let first = groups.first().copied().unwrap_or(label);
        Self::launch(label, first, command, |spawner| {
            groups.iter().all(|g| {
                spawner
                    .try_status_of(g)
                    .is_some_and(|s| s.handlers.iter().all(|h| h.ready))
            })
        })
    }

    /// The status of another group of this spawner.
    pub fn status_of(&self, group: &str) -> GroupStatus {
        self.try_status_of(group)
            .unwrap_or_else(|| panic!("no status from {group}:\n{}", self.log()))
    }

    fn try_status_of(&self, group: &str) -> Option<GroupStatus> {
        match control::request(group, &Request::Status) {
            Ok(Response::Status(status)) => Some(*status),
            _ => None,
        }
    }

    /// Starts `parsrv run ARGS...` serving group `name`, with `setup` run in the child
    /// before exec (namespaces, capabilities), and waits until every handler is ready (with
    /// `handlers_ready`; else until the spawner answers). Tests start groups through
    /// [`group`].
    fn start_from(
        binary: &Path,
        group: &GroupBuilder,
        setup: impl FnMut() -> io::Result<()> + Send + Sync + 'static,
        handlers_ready: bool,
    ) -> Spawner {
        let (name, args) = (&group.spec.name, group.args());
        let mut command = Command::new(binary);
        command.envs(group.envs.iter().map(|(k, v)| (k, v)));
        // SAFETY: the tests' setup closures only make system calls.
        unsafe {
            command.pre_exec(setup);
        }
        command.arg("run").args(args);
        Self::launch(name, name, command, |spawner| {
            spawner
                .try_status()
                .is_some_and(|s| !handlers_ready || s.handlers.iter().all(|h| h.ready))
        })
    }

    /// Runs `command` (a whole `parsrv run ...`, as a user would type it) serving group
    /// `group`, and waits until every handler of it is ready.
    pub fn start_command(label: &str, group: &str, command: Command) -> Spawner {
        Self::launch(label, group, command, |spawner| {
            spawner
                .try_status()
                .is_some_and(|s| s.handlers.iter().all(|h| h.ready))
        })
    }

    /// Runs `command` with its output in a log named after `label`, and waits (30 s at
    /// most) until `up` says the spawner serves.
    fn launch(
        label: &str,
        group: &str,
        mut command: Command,
        up: impl Fn(&Spawner) -> bool,
    ) -> Spawner {
        // Numbered: two tests may run spawners of the same name at once (each isolated).
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let number = STARTED.fetch_add(1, Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("parsrv-test-{label}-{number}.log"));
        let child = command
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting parsrv run");
        let mut spawner = Spawner {
            child: Some(child),
            name: group.to_owned(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = spawner.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("parsrv run exited early ({status}):\n{}", spawner.log());
            }
            if up(&spawner) {
                return spawner;
            }
            assert!(
                Instant::now() < deadline,
                "never came up:\n{}",
                spawner.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The groups running here, as `parsrv group list` names them (sorted by name).
    pub fn running_groups() -> Vec<String> {
        let (_, out, _) = Spawner::parsrv(&["group", "list"]);
        out.lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }

    /// Runs a parsrv command; returns (exit code, stdout, stderr).
    pub fn parsrv(args: &[&str]) -> (i32, String, String) {
        let out = Command::new(parsrv_bin()).args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most `limit`) until every handler of the group says it is ready (alive is
    /// not enough: a handler is alive from its fork, before its exec); says whether they did.
    pub fn wait_until_ready(&self, limit: Duration) -> bool {
        wait_for(limit, || self.status().handlers.iter().all(|h| h.ready))
    }

    /// Waits (at most `limit`) until the spawner's output contains `text`; says whether it did.
    pub fn wait_for_log(&self, text: &str, limit: Duration) -> bool {
        wait_for(limit, || self.log().contains(text))
    }

    /// The file the spawner's output goes to (it outlives the spawner).
    pub fn log_path(&self) -> PathBuf {
        self.log.clone()
    }

    fn try_status(&self) -> Option<GroupStatus> {
        self.try_status_of(&self.name)
    }

    /// The group's status, as `parsrv status --json` reports it.
    pub fn status(&self) -> GroupStatus {
        match control::request(&self.name, &Request::Status) {
            Ok(Response::Status(status)) => *status,
            other => {
                // Where the spawner is, for whoever reads the failure.
                let pid = self.pid();
                let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
                    .map(|tasks| {
                        tasks
                            .flatten()
                            .map(|t| {
                                let read = |f: &str| {
                                    std::fs::read_to_string(t.path().join(f)).unwrap_or_default()
                                };
                                format!("{:?} {} {}", t.file_name(), read("wchan"), read("stack"))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                panic!(
                    "no status from {}: {other:?}\nspawner threads: {threads:#?}\n{}",
                    self.name,
                    self.log()
                )
            }
        }
    }

    /// Same, through the real CLI: `parsrv status NAME --json`.
    pub fn status_via_cli(&self) -> GroupStatus {
        let json = stdout_of(Command::new(parsrv_bin()).args(["status", &self.name, "--json"]));
        serde_json::from_str(&json).expect("status JSON")
    }

    pub fn handler_pid(&self, slot: usize) -> u32 {
        self.status().handlers[slot].pid.expect("handler running")
    }

    /// Sends HTTP requests to `addr` until socket `slot`'s queue is full by the kernel's
    /// test (depth > capacity), holding the connections that wait there. Meant for a stopped
    /// handler's slot: the live handlers answer their share at once, which keeps their
    /// queues empty (an idle held connection would also block a one-at-a-time server).
    pub fn fill_queue(&self, slot: usize, addr: SocketAddr) -> Vec<TcpStream> {
        let mut held = Vec::new();
        let full = wait_for(Duration::from_secs(30), || {
            if let Ok(mut conn) = connect(addr, Duration::from_secs(3)) {
                let _ = conn.write_all(HTTP_REQUEST);
                // Answered: a live handler took it (keep its queue empty). Not answered:
                // it waits in the stopped handler's queue; hold it there.
                if read_answer(&mut conn, Duration::from_millis(500)).is_err() {
                    held.push(conn);
                }
            }
            let queue = self.status().sockets[slot].queue.unwrap();
            queue.depth > queue.capacity
        });
        assert!(full, "socket {slot}'s queue never filled:\n{}", self.log());
        held
    }

    /// Sends SIGTERM and waits for the spawner to exit (killing it after 20 s).
    pub fn stop(self) -> ExitStatus {
        self.stop_with(nix::sys::signal::Signal::SIGTERM)
    }

    /// Sends `stop` (SIGTERM or SIGINT) and waits for the spawner to exit (killing it after
    /// 20 s).
    pub fn stop_with(mut self, stop: nix::sys::signal::Signal) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let status = stop_child(&mut child, stop);
        stop_orphan(&self.name);
        status
    }
}

/// A test that killed its spawner leaves the group's handlers serving: stop them as an
/// operator would (`parsrv stop`), so that nothing outlives the test.
pub fn stop_orphan(name: &str) {
    if parsrv::spawner::record_path(name).exists() && !control::is_live(&control::socket_path(name))
    {
        let _ = Spawner::parsrv(&["stop", name]);
    }
}

fn stop_child(child: &mut Child, stop: nix::sys::signal::Signal) -> ExitStatus {
    if let Some(status) = child.try_wait().unwrap() {
        return status; // already gone (a test may have killed it)
    }
    signal(child.id(), stop);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("parsrv run did not stop within 20 s of {stop}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        // A failing test keeps the spawner's whole log in its output (the file is in the
        // test's private /tmp, gone with it): a flake is read, not guessed at.
        if std::thread::panicking() {
            eprintln!(
                "--- log of the spawner of group {} ({}):\n{}--- end of that log",
                self.name,
                self.log.display(),
                self.log()
            );
        }
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, nix::sys::signal::Signal::SIGTERM);
            stop_orphan(&self.name);
        }
    }
}

/// Where the example handlers are built (next to the parsrv binary under test).
pub fn example(name: &str) -> PathBuf {
    parsrv_bin().parent().unwrap().join("examples").join(name)
}

/// The virtualenv with gunicorn and uvicorn (`cargo xtask setup` installs it).
pub fn pyenv() -> PathBuf {
    std::env::var_os("PARSRV_PYENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv"))
}

/// The test applications under tests/apps.
pub fn apps_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("apps")
}

/// Runs parsrv with `args` and `setup` applied in the child before exec; returns (exit
/// code, stderr).
pub fn run_parsrv(
    args: &[&str],
    setup: impl FnMut() -> io::Result<()> + Send + Sync + 'static,
) -> (i32, String) {
    let mut command = Command::new(parsrv_bin());
    command.args(args).stdin(Stdio::null());
    // SAFETY: the tests' setup closures only make system calls.
    unsafe {
        command.pre_exec(setup);
    }
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(60));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wait_output(mut child: Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("parsrv did not exit within {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The error line of a failed parsrv command, checked against parsrv's output contract
/// ([`parsrv::output`]): whatever it logged first, its stderr ends with exactly one line that
/// is not a log line, starting `parsrv: `. Panics, showing the stderr, otherwise.
pub fn error_line(stderr: &str) -> &str {
    parsrv::output::error_line(stderr)
        .unwrap_or_else(|| panic!("not log lines and then one error line:\n{stderr}"))
}
