//! Helpers for parsrv's privileged integration tests (tests/tests/*.rs).
//!
//! Every test runs inside [`isolated`]: a network namespace of its own with only loopback,
//! and a mount namespace of its own with a fresh bpffs at /sys/fs/bpf and an empty /run, so
//! tests cannot disturb each other or the host, see no pins, control sockets or mounts of
//! the host or of an earlier run, and kernel counters read there ([`NetCounters`]) count
//! only that test's traffic. Every load is bounded in connections and time. The tests are
//! `#[ignore]`d so that a plain `cargo test` stays unprivileged; `cargo xtask test` runs
//! them as root with `--ignored`.

use std::{
    fs,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::process::CommandExt,
    },
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use parsrv::{
    control::{self, Request, Response},
    status::GroupStatus,
};

pub use parsrv;
pub use parsrv::features::Feature;

/// What every test that loads the steering program needs of the kernel.
pub const PROGRAM: &[Feature] = &[
    Feature::Btf,
    Feature::SkReuseport,
    Feature::CapBpf,
    Feature::SelectOrMigrate,
    Feature::ReuseportCtxSk,
    Feature::BpfLoop,
];

/// Where skipped tests are listed, one `test: reason` line each (set by `cargo xtask test`,
/// which prints them in its summary).
pub const SKIPS_ENV: &str = "PARSRV_TEST_SKIPS";

/// What a privileged test needs of the machine it runs on, stated by the test itself.
#[derive(Clone, Debug, Default)]
pub struct Needs {
    kernel: Vec<Feature>,
    python: bool,
}

impl Needs {
    /// Root only (every privileged test needs it for its namespaces).
    pub fn nothing() -> Needs {
        Needs::default()
    }

    /// What loading parsrv's program needs of the kernel ([`PROGRAM`]).
    pub fn program() -> Needs {
        Needs {
            kernel: PROGRAM.to_vec(),
            python: false,
        }
    }

    /// One kernel feature more.
    pub fn and(mut self, feature: Feature) -> Needs {
        self.kernel.push(feature);
        self
    }

    /// Python with the test servers (gunicorn, uvicorn, prometheus_client) that `cargo
    /// xtask setup` installs in [`pyenv`]; the VM image has none.
    pub fn and_python(mut self) -> Needs {
        self.python = true;
        self
    }
}

/// Set by an environment that has no Python by design (the VMs' init): tests that need it
/// skip there, where anywhere else a missing Python fails them (the set-up installs it).
pub const NO_PYTHON_ENV: &str = "PARSRV_TEST_NO_PYTHON";

/// Runs a privileged test, inside [`isolated`], if the machine has what it `needs`. What
/// it lacks either skips the test (a kernel older than the release that brought a feature;
/// no Python where [`NO_PYTHON_ENV`] says so), recorded by [`skip`], or fails it (a kernel
/// new enough that lacks a feature, a Python environment the set-up should have made).
pub fn privileged(needs: Needs, test: impl FnOnce() + Send + 'static) {
    if !kernel_has(&needs.kernel) {
        return;
    }
    if needs.python {
        if std::env::var_os(NO_PYTHON_ENV).is_some() {
            skip("needs Python, which this environment lacks (the VM image has none)");
            return;
        }
        let python = pyenv().join("bin/python3");
        assert!(
            python.exists(),
            "needs {}: run `cargo xtask setup`",
            python.display()
        );
    }
    isolated(test)
}

/// Whether the running kernel has `features`; call it first, and return when it says no.
///
/// A kernel older than the release that introduced a missing feature skips the test: this
/// records why and returns false. A kernel that is new enough and still lacks one fails the
/// test: that is a kernel built without the feature or a broken probe, not a reason to skip.
pub fn kernel_has(features: &[Feature]) -> bool {
    let probed = parsrv::features::KernelFeatures::probe();
    let missing: Vec<Feature> = features
        .iter()
        .copied()
        .filter(|&f| !probed.has(f))
        .collect();
    let Some(&first) = missing.first() else {
        return true;
    };
    let version = probed
        .version
        .unwrap_or_else(|| panic!("cannot parse kernel release {}", probed.release));
    for &feature in &missing {
        assert!(
            version < feature.since(),
            "kernel {} should have {} (Linux {}+) but the probe found none",
            probed.release,
            feature.name(),
            feature.since()
        );
    }
    skip(&format!(
        "kernel {} predates {} (Linux {}+)",
        probed.release,
        first.name(),
        first.since()
    ));
    false
}

/// Records that the calling test skips its checks, and why (printed, and listed in
/// `$PARSRV_TEST_SKIPS` for the summary). The test then returns.
pub fn skip(reason: &str) {
    let test = thread::current().name().unwrap_or("?").to_owned();
    eprintln!("skipped {test}: {reason}");
    if let Some(path) = std::env::var_os(SKIPS_ENV) {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("opening the skip list");
        writeln!(file, "{test}: {reason}").expect("writing the skip list");
    }
}

/// Set (to 1) by `cargo xtask test` and the VMs' init, which start the suite in the state
/// of a machine that has just booted (no bpffs at /sys/fs/bpf, an empty /run): the tests
/// then check that they did.
pub const FRESH_MACHINE_ENV: &str = "PARSRV_TEST_FRESH_MACHINE";

/// The parsrv binary under test (built by `cargo xtask test`, which sets PARSRV_BIN).
pub fn parsrv_bin() -> PathBuf {
    std::env::var_os("PARSRV_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/parsrv"))
}

/// Runs `test` on a thread of its own, in namespaces of its own, as on a machine that has
/// just booted with parsrv's needs met:
/// - a network namespace with only loopback, up;
/// - a mount namespace (propagation private: nothing leaks back to the host) in which
///   /sys/fs/bpf is a new bpffs instance of its own (holding only what the kernel puts in
///   every new one), whatever was mounted there before is detached, and /run is an empty
///   tmpfs, so the run directory (control sockets) does not exist yet.
///
/// Threads and processes the test starts inherit both namespaces; when the last of them
/// ends, the bpffs instance and its pins go with it. A test that wants bpffs unmounted
/// calls [`unmount_bpffs`] first.
pub fn isolated<T: Send + 'static>(test: impl FnOnce() -> T + Send + 'static) -> T {
    thread::spawn(move || {
        use nix::sched::CloneFlags;
        // A thread may take namespaces of its own: unshare(CLONE_NEWNS) implies CLONE_FS,
        // which gives this thread (and what it starts) its own root, cwd and mounts.
        nix::sched::unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS)
            .expect("unshare(CLONE_NEWNET | CLONE_NEWNS): the integration tests must run as root");
        loopback_up().expect("bringing up lo in the test's namespace");
        fresh_mounts().expect("mounting a fresh bpffs and /run in the test's namespace");
        test()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Where parsrv looks for bpffs (and so where each test mounts its own).
pub const BPFFS: &str = parsrv::kernel::BPFFS;

/// In the calling thread's (new) mount namespace: private propagation, a fresh bpffs, an
/// empty /run.
fn fresh_mounts() -> nix::Result<()> {
    use nix::mount::{mount, MsFlags};
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    unmount_bpffs();
    mount_bpffs()?;
    mount(
        Some("tmpfs"),
        "/run",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
}

/// Detaches every bpffs mounted at /sys/fs/bpf in the calling thread's mount namespace (it
/// can be mounted more than once on the same path): parsrv then finds none, as on a machine
/// that has just booted. Only inside [`isolated`].
pub fn unmount_bpffs() {
    while nix::mount::umount2(BPFFS, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
}

/// Mounts a new, empty bpffs instance at /sys/fs/bpf. Only inside [`isolated`].
pub fn mount_bpffs() -> nix::Result<()> {
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
}

/// Whether /sys/fs/bpf, as the calling thread sees it, is a bpffs. Written apart from
/// parsrv's own check (`kernel::ensure_bpffs`), which the tests judge.
pub fn bpffs_mounted() -> bool {
    nix::sys::statfs::statfs(BPFFS)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

fn loopback_up() -> io::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: ifreq is plain data; the ioctls read and write only it.
    unsafe {
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Kernel TCP counters of the calling thread's network namespace.
///
/// Read from /proc/thread-self/net: /proc/net follows the main thread, whose namespace is
/// not the test's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub listen_overflows: u64,
    pub listen_drops: u64,
    pub out_rsts: u64,
    pub migrate_req_success: u64,
    pub migrate_req_failure: u64,
}

impl NetCounters {
    pub fn read() -> Self {
        let netstat = fs::read_to_string("/proc/thread-self/net/netstat").expect("netstat");
        let snmp = fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
        NetCounters {
            listen_overflows: counter(&netstat, "TcpExt", "ListenOverflows"),
            listen_drops: counter(&netstat, "TcpExt", "ListenDrops"),
            out_rsts: counter(&snmp, "Tcp", "OutRsts"),
            migrate_req_success: counter(&netstat, "TcpExt", "TCPMigrateReqSuccess"),
            migrate_req_failure: counter(&netstat, "TcpExt", "TCPMigrateReqFailure"),
        }
    }

    /// What happened between `self` and `later`.
    pub fn delta(&self, later: &Self) -> Self {
        NetCounters {
            listen_overflows: later.listen_overflows - self.listen_overflows,
            listen_drops: later.listen_drops - self.listen_drops,
            out_rsts: later.out_rsts - self.out_rsts,
            migrate_req_success: later.migrate_req_success - self.migrate_req_success,
            migrate_req_failure: later.migrate_req_failure - self.migrate_req_failure,
        }
    }
}

/// Every counter of the calling thread's namespace, as `Table.Name`: to show, when an
/// assertion on one fails, what else moved (TcpExt's TCPAbortOn* say why a RST was sent).
pub fn all_net_counters() -> std::collections::BTreeMap<String, u64> {
    let mut all = std::collections::BTreeMap::new();
    for file in ["netstat", "snmp"] {
        let table = fs::read_to_string(format!("/proc/thread-self/net/{file}")).expect(file);
        let lines: Vec<&str> = table.lines().collect();
        for pair in lines.chunks(2) {
            let [header, values] = pair else { continue };
            let mut names = header.split_whitespace();
            let prefix = names.next().unwrap_or("").trim_end_matches(':');
            for (name, value) in names.zip(values.split_whitespace().skip(1)) {
                if let Ok(value) = value.parse() {
                    all.insert(format!("{prefix}.{name}"), value);
                }
            }
        }
    }
    all
}

/// The counters that changed between two [`all_net_counters`], as `name +delta`.
pub fn changed_net_counters(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> String {
    after
        .iter()
        .filter_map(|(name, value)| {
            let old = before.get(name).copied().unwrap_or(0);
            (*value != old).then(|| format!("{name} {:+}", *value as i64 - old as i64))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One counter from a /proc/net/{netstat,snmp} table: a header line and a value line that
/// start with the same `prefix:`.
fn counter(table: &str, prefix: &str, name: &str) -> u64 {
    let prefix = format!("{prefix}:");
    let mut lines = table.lines().filter(|l| l.starts_with(&prefix));
    let (header, values) = (lines.next().expect("header"), lines.next().expect("values"));
    header
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(h, _)| *h == name)
        .unwrap_or_else(|| panic!("no {name} in {prefix}"))
        .1
        .parse()
        .expect("a number")
}

/// A `parsrv run` process, stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Spawner {
    child: Option<Child>,
    pub name: String,
    log: PathBuf,
}

impl Spawner {
    /// Starts `parsrv run --name NAME ARGS...` and waits until every handler is up.
    pub fn start(name: &str, args: &[&str]) -> Spawner {
        Self::start_with(name, args, || Ok(()))
    }

    /// Starts `parsrv run --config FILE EXTRA...` and waits until every one of `groups` has
    /// all its handlers up. `label` names the log.
    pub fn start_config(
        label: &str,
        config: &std::path::Path,
        groups: &[&str],
        extra: &[&str],
    ) -> Spawner {
        let mut command = Command::new(parsrv_bin());
        command.arg("run").arg("--config").arg(config).args(extra);
        let first = groups.first().copied().unwrap_or(label);
        Self::launch(label, first, command, |spawner| {
            groups.iter().all(|g| {
                spawner
                    .try_status_of(g)
                    .is_some_and(|s| s.handlers.iter().all(|h| h.alive))
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

    /// Same, with `setup` run in the child before exec (namespaces, capabilities).
    pub fn start_with(
        name: &str,
        args: &[&str],
        setup: impl FnMut() -> io::Result<()> + Send + Sync + 'static,
    ) -> Spawner {
        let mut command = Command::new(parsrv_bin());
        // SAFETY: the tests' setup closures only make system calls.
        unsafe {
            command.pre_exec(setup);
        }
        command.args(["run", "--name", name]).args(args);
        Self::launch(name, name, command, |spawner| {
            spawner
                .try_status()
                .is_some_and(|s| s.handlers.iter().all(|h| h.alive))
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
        self.try_status()
            .unwrap_or_else(|| panic!("no status from {}:\n{}", self.name, self.log()))
    }

    /// Same, through the real CLI: `parsrv status NAME --json`.
    pub fn status_via_cli(&self) -> GroupStatus {
        let out = Command::new(parsrv_bin())
            .args(["status", &self.name, "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
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
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        stop_child(&mut child)
    }
}

fn stop_child(child: &mut Child) -> ExitStatus {
    if let Some(status) = child.try_wait().unwrap() {
        return status; // already gone (a test may have killed it)
    }
    signal(child.id(), nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("parsrv run did not stop within 20 s of SIGTERM");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
    }
}

pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
        .unwrap_or_else(|e| panic!("kill({pid}, {signal}): {e}"));
}

/// Stops a process with SIGSTOP and waits until every one of its threads has stopped: kill()
/// returns before they do, and a thread already woken by a connection would still accept it.
pub fn stop_process(pid: u32) {
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let all_stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|task| {
                    std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                        stat.rsplit_once(')')
                            .and_then(|(_, rest)| rest.split_whitespace().next())
                            == Some("T")
                    })
                })
            })
            .unwrap_or(false)
    };
    assert!(
        wait_for(Duration::from_secs(5), all_stopped),
        "process {pid} did not stop"
    );
}

/// Processes whose process group is `pgid` (a handler and its children: parsrv puts each
/// handler in a group of its own).
pub fn group_members(pgid: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // After "comm)": state ppid pgrp ...
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse::<u32>().ok())
                    == Some(pgid)
            })
        })
        .collect()
}

/// Stops a handler and every process it started (its process group), and waits until all
/// their threads have stopped.
pub fn stop_handler_group(pgid: u32) {
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    for pid in group_members(pgid) {
        stop_process(pid);
    }
}

/// Resumes a handler group stopped with [`stop_handler_group`].
pub fn resume_handler_group(pgid: u32) {
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
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

/// Waits until `done` holds, for at most `limit`; says whether it did.
pub fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    done()
}

/// How one client connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Ok,
    /// connect() did not complete in time: SYNs dropped.
    ConnectTimeout,
    /// connect() was answered with a RST.
    Refused,
    /// The connection was reset after it was established.
    Reset,
    /// Connected, but no complete answer in time.
    NoAnswer,
    Other,
}

fn classify(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Outcome::Refused,
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => Outcome::Reset,
        _ => Outcome::Other,
    }
}

/// Connects with a deadline.
pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Outcome> {
    TcpStream::connect_timeout(&addr, timeout).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Outcome::ConnectTimeout,
        _ => classify(&e),
    })
}

pub const HTTP_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: parsrv-test\r\nConnection: close\r\n\r\n";

/// Reads an HTTP answer to the end; returns it if it is a 200.
pub fn read_answer(stream: &mut TcpStream, timeout: Duration) -> Result<String, Outcome> {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut answer = String::new();
    match stream.read_to_string(&mut answer) {
        Ok(_) if answer.starts_with("HTTP/1.1 200 OK") => Ok(answer),
        Ok(_) => Err(Outcome::NoAnswer),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(Outcome::NoAnswer)
        }
        Err(e) => Err(classify(&e)),
    }
}

/// One HTTP request on a new connection, each step within `timeout`.
pub fn http_get(addr: SocketAddr, timeout: Duration) -> Outcome {
    let mut stream = match connect(addr, timeout) {
        Ok(s) => s,
        Err(outcome) => return outcome,
    };
    if let Err(e) = stream.write_all(HTTP_REQUEST) {
        return classify(&e);
    }
    match read_answer(&mut stream, timeout) {
        Ok(_) => Outcome::Ok,
        Err(outcome) => outcome,
    }
}

/// Clients making one HTTP request per connection, back to back, until stopped (and at
/// most `limit`); every outcome is kept.
pub struct SteadyLoad {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    clients: Vec<thread::JoinHandle<()>>,
}

impl SteadyLoad {
    /// `timeout` bounds each step of a request (connect, answer).
    pub fn start(
        addr: SocketAddr,
        clients: usize,
        limit: Duration,
        timeout: Duration,
    ) -> SteadyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let deadline = Instant::now() + limit;
        let clients = (0..clients)
            .map(|_| {
                let (stop, outcomes) = (stop.clone(), outcomes.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let outcome = http_get(addr, timeout);
                        outcomes.lock().unwrap().push(outcome);
                    }
                })
            })
            .collect();
        SteadyLoad {
            stop,
            outcomes,
            clients,
        }
    }

    pub fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.join().unwrap();
        }
        Arc::try_unwrap(self.outcomes)
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

/// What a bounded load produced.
#[derive(Debug, Default, Clone)]
pub struct LoadResult {
    pub outcomes: Vec<Outcome>,
}

impl LoadResult {
    pub fn count(&self, outcome: Outcome) -> usize {
        self.outcomes.iter().filter(|o| **o == outcome).count()
    }

    pub fn failures(&self) -> usize {
        self.outcomes.len() - self.count(Outcome::Ok)
    }
}

/// `threads` clients each making `per_thread` HTTP requests, one connection each, every
/// step within `timeout`. Bounded: at most threads x per_thread connections, each ending
/// within about 2 x timeout.
pub fn http_load(
    addr: SocketAddr,
    threads: usize,
    per_thread: usize,
    timeout: Duration,
) -> LoadResult {
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(threads * per_thread)));
    let clients: Vec<_> = (0..threads)
        .map(|_| {
            let outcomes = outcomes.clone();
            thread::spawn(move || {
                for _ in 0..per_thread {
                    let outcome = http_get(addr, timeout);
                    outcomes.lock().unwrap().push(outcome);
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    let outcomes = Arc::try_unwrap(outcomes).unwrap().into_inner().unwrap();
    LoadResult { outcomes }
}

/// A plain SO_REUSEPORT group with no program, for control runs in the same test: `count`
/// sockets on `addr`; the sockets whose index is in `serving` get a thread that answers
/// HTTP like parsrv's http handler; the others never accept. Stops when dropped.
pub struct PlainGroup {
    pub sockets: Vec<Arc<socket2::Socket>>,
    stop: Arc<AtomicBool>,
    servers: Vec<thread::JoinHandle<()>>,
}

impl PlainGroup {
    pub fn start(addr: SocketAddr, count: usize, backlog: i32, serving: &[usize]) -> PlainGroup {
        let sockets: Vec<_> = (0..count)
            .map(|_| {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                )
                .unwrap();
                s.set_reuse_port(true).unwrap();
                s.bind(&addr.into()).unwrap();
                s.listen(backlog).unwrap();
                s.set_nonblocking(true).unwrap();
                Arc::new(s)
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let servers = serving
            .iter()
            .map(|&i| {
                let (socket, stop) = (sockets[i].clone(), stop.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match socket.accept() {
                            Ok((conn, _)) => {
                                let mut conn: TcpStream = conn.into();
                                conn.set_nonblocking(false).unwrap();
                                thread::spawn(move || answer_http(&mut conn));
                            }
                            Err(_) => thread::sleep(Duration::from_millis(1)),
                        }
                    }
                })
            })
            .collect();
        PlainGroup {
            sockets,
            stop,
            servers,
        }
    }
}

fn answer_http(conn: &mut TcpStream) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let _ =
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nplain\n");
}

impl Drop for PlainGroup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
    }
}

/// A copy of file descriptor `fd` of process `pid` (pidfd_getfd; needs root).
pub fn fd_of_process(pid: u32, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: raw syscalls with plain integer arguments; results checked.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as RawFd);
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if copy < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(copy as RawFd))
    }
}

/// Whether `fd` is a listening socket.
pub fn is_listening(fd: &OwnedFd) -> bool {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && accepting == 1
}

/// IDs of loaded programs named like parsrv's.
pub fn loaded_parsrv_programs() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(parsrv_common::reuseport::names::PROGRAM))
        .map(|p| p.id())
        .collect()
}

/// Whether any process's command line mentions `needle` (to find handlers left behind).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .contains(needle)
            {
                pids.push(pid);
            }
        }
    }
    pids
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

/// Drops a capability from the bounding set: the exec'd program then lacks it even as root.
pub fn drop_capability(cap: libc::c_int) -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The error line of a failed parsrv command, checked against parsrv's output contract
/// ([`parsrv::output`]): whatever it logged first, its stderr ends with exactly one line that
/// is not a log line, starting `parsrv: `. Panics, showing the stderr, otherwise.
pub fn error_line(stderr: &str) -> &str {
    parsrv::output::error_line(stderr)
        .unwrap_or_else(|| panic!("not log lines and then one error line:\n{stderr}"))
}
