//! `parsrv run`: the spawner. It owns the group's sockets, the program and its pins, and the
//! handler processes; it never touches a connection itself.
//!
//! Order of work, each step undone by a guard if a later one fails: check privileges, BTF,
//! bpffs and that the group is not already running; bind the sockets; load the program
//! (maps pinned in a staging directory); register every socket; attach; publish the pins;
//! start handlers. Shutdown (SIGINT/SIGTERM) runs it backwards: stop handlers (SIGTERM,
//! grace period, SIGKILL), remove the control socket, detach, unpin.

use std::{
    cell::RefCell,
    io,
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    rc::Rc,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use parsrv_common::ProgramConfig;
use tokio::sync::watch;

use crate::{
    config::{Credentials, GroupSpec, HandlerKind},
    control::{self, ControlSocket, Request, Response},
    error::{Error, Result},
    group::SocketGroup,
    handler::{HandlerStats, SharedStats, LISTEN_FD, STATS_FD},
    kernel,
    program::{Pins, Steering},
    status::{self, GroupStatus, HandlerStatus, SocketStatus},
};

/// Everything `parsrv run` needs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub spec: GroupSpec,
    /// How long a handler may take to exit after SIGTERM before it gets SIGKILL.
    pub grace: Duration,
}

/// Runs the group until SIGINT or SIGTERM.
pub fn run(options: RunOptions) -> Result<()> {
    let RunOptions { spec, grace } = options;
    spec.validate()?;

    // Checks that touch nothing come first, so a refusal leaves nothing behind.
    let credentials = spec.credentials()?;
    kernel::check_capabilities()?;
    let offsets = kernel::kernel_offsets()?;
    crate::program::object()?;
    let control_path = control::socket_path(&spec.name);
    if control::is_live(&control_path) {
        return Err(Error::GroupRunning {
            name: spec.name.clone(),
            socket: control_path,
        });
    }
    let bpffs = Path::new(kernel::BPFFS);
    kernel::ensure_bpffs(bpffs)?;
    let pin_dir = pin_dir(&spec.name);
    // No spawner answers for this group, so pins under its name are a dead one's.
    Pins::remove_stale(&pin_dir)?;

    let group = SocketGroup::bind(spec.listen, spec.handlers, spec.backlog)?;
    let config = ProgramConfig {
        offsets,
        policy: spec.policy.to_program(),
        when_full: spec.when_full.to_program(),
        generation: 0, // Steering owns it
    };
    let mut steering = Steering::load(config, Some(&pin_dir))?;
    for (slot, listener) in (0..).zip(group.listeners()) {
        steering.register(slot, listener)?;
    }
    steering.attach(&group.listeners()[0])?;
    let attached = Attachment(
        group.listeners()[0]
            .socket()
            .try_clone()
            .map_err(Error::io("duplicating a group socket"))?,
    );
    let pins = steering.publish_pins()?;

    let slots = (0..spec.handlers)
        .map(|slot| {
            Ok(Slot {
                stats: SharedStats::create(slot)
                    .map_err(Error::io("creating a handler's shared counters"))?,
                state: RefCell::default(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let shared = Rc::new(Shared {
        spec,
        grace,
        credentials,
        group,
        steering,
        slots,
        pins: pins.as_ref().map(|p| p.dir().to_owned()),
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the spawner's runtime"))?;
    let result = tokio::task::LocalSet::new().block_on(&runtime, serve(shared.clone()));
    drop(attached);
    drop(pins);
    result
}

/// Where a group's maps are pinned.
pub fn pin_dir(group: &str) -> PathBuf {
    Path::new(kernel::BPFFS).join("parsrv").join(group)
}

/// Detaches the program from the group when dropped (holds a duplicate of a member socket).
struct Attachment(socket2::Socket);

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Err(e) = Steering::detach(&self.0) {
            log::error!("{e}");
        }
    }
}

struct Shared {
    spec: GroupSpec,
    grace: Duration,
    credentials: Option<Credentials>,
    group: SocketGroup,
    steering: Steering,
    slots: Vec<Slot>,
    pins: Option<PathBuf>,
}

struct Slot {
    stats: SharedStats,
    state: RefCell<HandlerState>,
}

#[derive(Default)]
struct HandlerState {
    pid: Option<u32>,
    restarts: u32,
    last_exit: Option<String>,
    /// When the next start is due, while the slot waits out its backoff.
    restart_at: Option<Instant>,
    /// The handler's pid once a warning about it was logged (warn once per process).
    warned: Option<u32>,
}

async fn serve(shared: Rc<Shared>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(Error::io("installing a SIGINT handler"))?;
    let mut terminate =
        signal(SignalKind::terminate()).map_err(Error::io("installing a SIGTERM handler"))?;
    let control = ControlSocket::bind(&shared.spec.name)?;
    let (stop, stopped) = watch::channel(false);

    let supervisors: Vec<_> = (0..shared.spec.handlers)
        .map(|slot| tokio::task::spawn_local(supervise(shared.clone(), slot, stopped.clone())))
        .collect();
    log::info!(
        "group {} serves {} with {} {} handlers (policy {}, when-full {}); status: parsrv status {}",
        shared.spec.name,
        shared.spec.listen,
        shared.spec.handlers,
        shared.spec.handler,
        shared.spec.policy,
        shared.spec.when_full,
        shared.spec.name
    );
    let answering = {
        let shared = shared.clone();
        tokio::task::spawn_local(async move {
            control.serve(|request| answer(&shared, request)).await;
        })
    };
    let watching = tokio::task::spawn_local(watch_handlers(shared.clone()));

    tokio::select! {
        _ = interrupt.recv() => log::info!("SIGINT: stopping group {}", shared.spec.name),
        _ = terminate.recv() => log::info!("SIGTERM: stopping group {}", shared.spec.name),
    }
    let _ = stop.send(true);
    for supervisor in supervisors {
        let _ = supervisor.await;
    }
    watching.abort();
    answering.abort();
    let _ = answering.await; // drops the ControlSocket, which removes its file
    Ok(())
}

fn answer(shared: &Shared, request: Request) -> Response {
    match request {
        Request::Status => match group_status(shared) {
            Ok(status) => Response::Status(Box::new(status)),
            Err(e) => Response::Error(e.to_string()),
        },
    }
}

fn group_status(shared: &Shared) -> Result<GroupStatus> {
    let spec = &shared.spec;
    let counters = shared.steering.slot_counters(spec.handlers)?;
    let sockets = (0..)
        .zip(shared.group.listeners())
        .zip(counters)
        .map(|((slot, listener), counters)| SocketStatus {
            slot,
            cookie: listener.cookie(),
            queue: listener.queue().ok(),
            counters,
        })
        .collect();
    let handlers = (0..)
        .zip(&shared.slots)
        .map(|(slot, s)| {
            let state = s.state.borrow();
            // Only built-in handlers keep counters; an exec'd program's are its own.
            let stats = (spec.handler != HandlerKind::Exec).then(|| s.stats.stats());
            let count = |field: fn(&HandlerStats) -> &AtomicU64| {
                stats.map(|stats| field(stats).load(Ordering::Relaxed))
            };
            HandlerStatus {
                slot,
                pid: state.pid,
                alive: state.pid.is_some_and(process_alive),
                cpu: spec.cpu_of(slot),
                restarts: state.restarts,
                last_exit: state.last_exit.clone(),
                restart_in_ms: state
                    .restart_at
                    .map(|at| at.saturating_duration_since(Instant::now()).as_millis() as u64),
                accepted: count(|s| &s.accepted),
                lost_races: count(|s| &s.lost_races),
                active: count(|s| &s.active),
            }
        })
        .collect();
    Ok(GroupStatus {
        schema: status::SCHEMA_VERSION,
        name: spec.name.clone(),
        listen: spec.listen,
        policy: spec.policy,
        when_full: spec.when_full,
        backlog: spec.backlog,
        handler: spec.handler,
        command: spec.command.clone(),
        threads: spec.threads,
        cpus: spec.cpus.clone(),
        user: spec.user.clone(),
        spawner_pid: std::process::id(),
        pins: shared.pins.clone(),
        handlers,
        sockets,
        errors: shared.steering.global_counters()?,
        program: shared.steering.run_stats()?,
    })
}

/// Running and not a zombie (a stopped process counts as alive: it still owns its slot).
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Restart delays for a handler that keeps exiting: immediate the first time (its queue is
/// waiting), then doubling up to a cap, back to immediate after a stable run.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(5);
    /// A handler that ran this long is considered healthy again.
    const STABLE: Duration = Duration::from_secs(10);

    fn next(&mut self) -> Duration {
        let delay = match self.failures {
            0 => Duration::ZERO,
            n => Self::FIRST
                .saturating_mul(1 << (n - 1).min(16))
                .min(Self::CAP),
        };
        self.failures += 1;
        delay
    }

    fn ran_for(&mut self, run: Duration) {
        if run >= Self::STABLE {
            self.failures = 0;
        }
    }
}

/// Keeps one slot's handler running until `stop`, then stops it.
async fn supervise(shared: Rc<Shared>, slot: u32, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::default();
    let state = &shared.slots[slot as usize].state;
    let mut first = true;
    loop {
        if *stop.borrow() {
            return;
        }
        match spawn_handler(&shared, slot) {
            Err(e) => log::error!("handler {slot}: cannot start: {e}"),
            Ok(mut child) => {
                let pid = child.id().unwrap_or_default();
                forward_output(&mut child, slot, pid);
                {
                    let mut state = state.borrow_mut();
                    state.pid = Some(pid);
                    state.restart_at = None;
                    if !first {
                        state.restarts += 1;
                    }
                }
                first = false;
                let started = Instant::now();
                tokio::select! {
                    exit = child.wait() => {
                        // Whatever it started (a server's workers, holding copies of fd 3)
                        // must not outlive it and serve beside its successor.
                        kill_group(pid, nix::sys::signal::Signal::SIGKILL);
                        let how = describe_exit(exit);
                        state.borrow_mut().last_exit = Some(how.clone());
                        state.borrow_mut().pid = None;
                        if *stop.borrow() {
                            return;
                        }
                        backoff.ran_for(started.elapsed());
                        log::warn!(
                            "handler {slot} (pid {pid}) {how}; its socket keeps its queue, restarting"
                        );
                    }
                    _ = stop.changed() => {
                        let how = stop_handler(&mut child, pid, shared.grace).await;
                        log::info!("handler {slot} (pid {pid}) {how}");
                        let mut state = state.borrow_mut();
                        state.last_exit = Some(how);
                        state.pid = None;
                        return;
                    }
                }
            }
        }
        let delay = backoff.next();
        if !delay.is_zero() {
            log::warn!("handler {slot} keeps exiting: next start in {delay:?}");
        }
        state.borrow_mut().restart_at = Some(Instant::now() + delay);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

fn describe_exit(exit: io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match exit {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (_, Some(signal)) => format!("was killed by signal {signal}"),
            _ => format!("ended ({status})"),
        },
        Err(e) => format!("could not be waited for ({e})"),
    }
}

/// SIGTERM (and SIGCONT, in case it was stopped) to the handler's process group, then
/// SIGKILL to the group after `grace`, and to whatever of it is left once the handler exits.
async fn stop_handler(child: &mut tokio::process::Child, pid: u32, grace: Duration) -> String {
    use nix::sys::signal::Signal;
    kill_group(pid, Signal::SIGTERM);
    kill_group(pid, Signal::SIGCONT);
    let how = match tokio::time::timeout(grace, child.wait()).await {
        Ok(exit) => describe_exit(exit),
        Err(_) => {
            kill_group(pid, Signal::SIGKILL);
            let _ = child.wait().await;
            format!("did not exit within {grace:?} of SIGTERM: killed")
        }
    };
    kill_group(pid, Signal::SIGKILL);
    how
}

/// Signals handler `pid`'s process group (each handler leads one; see place_handler).
fn kill_group(pid: u32, signal: nix::sys::signal::Signal) {
    // ESRCH: the group is gone already.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), signal);
}

fn spawn_handler(shared: &Shared, slot: u32) -> io::Result<tokio::process::Child> {
    let spec = &shared.spec;
    let listener = shared.group.listeners()[slot as usize].socket().as_raw_fd();
    // Exec handlers get their socket and nothing else.
    let stats = (spec.handler != HandlerKind::Exec)
        .then(|| shared.slots[slot as usize].stats.fd().as_raw_fd());
    let cpus = spec.cpu_of(slot).map(|cpu| {
        let mut set = nix::sched::CpuSet::new();
        let _ = set.set(cpu as usize); // validated against the usable CPUs
        set
    });
    let parent = std::process::id();
    // /proc/self/exe rather than current_exe(): still this very binary if the file was
    // replaced on disk since the spawner started.
    let mut command = tokio::process::Command::new("/proc/self/exe");
    command
        .arg0("parsrv")
        .args(["handler", "--kind", &spec.handler.to_string()])
        .args(["--threads", &spec.threads.to_string()])
        .args(["--slot", &slot.to_string()])
        .args(["--group", &spec.name])
        .args(["--spawner", &parent.to_string()]);
    if let Some(credentials) = shared.credentials {
        command
            .args(["--uid", &credentials.uid.to_string()])
            .args(["--gid", &credentials.gid.to_string()]);
    }
    if !spec.command.is_empty() {
        command.arg("--").args(&spec.command);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        command.pre_exec(move || place_handler(listener, stats, cpus, parent as libc::pid_t));
    }
    command.spawn()
}

/// Copies a handler's stdout and stderr to the spawner's stderr, a line at a time, each
/// prefixed with the handler's slot and pid.
fn forward_output(child: &mut tokio::process::Child, slot: u32, pid: u32) {
    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
    fn copy(stream: impl AsyncRead + Unpin + 'static, slot: u32, pid: u32) {
        tokio::task::spawn_local(async move {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                // Bounded: a handler printing without newlines cannot grow this forever.
                match (&mut reader)
                    .take(MAX_LOG_LINE)
                    .read_until(b'\n', &mut line)
                    .await
                {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        eprintln!(
                            "parsrv[{}] handler {slot}[{pid}]: {}",
                            std::process::id(),
                            text.trim_end_matches(['\n', '\r'])
                        );
                    }
                }
            }
        });
    }
    if let Some(out) = child.stdout.take() {
        copy(out, slot, pid);
    }
    if let Some(err) = child.stderr.take() {
        copy(err, slot, pid);
    }
}

/// Longest handler output line copied as one line.
const MAX_LOG_LINE: u64 = 16 * 1024;

/// How often handlers are checked for serving outside their socket.
const WATCH_PERIOD: Duration = Duration::from_secs(2);
/// How long a socket's queue may stay non-empty without ever shrinking before its handler
/// is reported as not accepting.
const STUCK_AFTER: Duration = Duration::from_secs(10);

/// Warns (once per handler process) about a handler that does not use the socket parsrv
/// gave it as given: one that listens on a socket of its own, that changed the socket's
/// queue length, or whose queue never shrinks.
async fn watch_handlers(shared: Rc<Shared>) {
    let inodes: Vec<Option<u64>> = shared
        .group
        .listeners()
        .iter()
        .map(|l| kernel::socket_inode(l.socket().as_fd()).ok())
        .collect();
    let mut stuck_since: Vec<Option<(Instant, u32)>> = vec![None; inodes.len()];
    loop {
        tokio::time::sleep(WATCH_PERIOD).await;
        for (slot, listener) in shared.group.listeners().iter().enumerate() {
            let state = &shared.slots[slot].state;
            let Some(pid) = state.borrow().pid else {
                stuck_since[slot] = None;
                continue;
            };
            if state.borrow().warned == Some(pid) {
                continue;
            }
            let own = kernel::listening_sockets(pid)
                .into_iter()
                .find(|(inode, _)| Some(*inode) != inodes[slot]);
            if let Some((_, addr)) = own {
                log::warn!(
                    "handler {slot} (pid {pid}) listens on {addr} itself instead of serving \
                     the socket parsrv passed as fd 3: its connections bypass the group; make \
                     it use fd 3 (LISTEN_FDS, as gunicorn does by itself; uvicorn --fd 3)"
                );
                state.borrow_mut().warned = Some(pid);
                continue;
            }
            let queue = listener.queue().unwrap_or_default();
            if queue.capacity != 0 && queue.capacity != listener.configured_capacity() {
                log::warn!(
                    "handler {slot} (pid {pid}) changed its socket's accept-queue length from {} \
                     to {} (it called listen() again with its own backlog): give the server the \
                     same backlog (e.g. uvicorn --backlog {}) so that --backlog holds",
                    listener.configured_capacity(),
                    queue.capacity,
                    shared.spec.backlog
                );
                state.borrow_mut().warned = Some(pid);
                continue;
            }
            let depth = queue.depth;
            let stopped = process_stopped(pid);
            stuck_since[slot] = match stuck_since[slot] {
                _ if depth == 0 || stopped => None,
                Some((since, last)) if depth >= last => Some((since, depth)),
                _ => Some((Instant::now(), depth)),
            };
            if let Some((since, depth)) = stuck_since[slot] {
                if since.elapsed() >= STUCK_AFTER {
                    log::warn!(
                        "handler {slot} (pid {pid}) has not taken a connection from its socket \
                         in {STUCK_AFTER:?} ({depth} waiting): is it accepting on fd 3?"
                    );
                    state.borrow_mut().warned = Some(pid);
                }
            }
        }
    }
}

/// Stopped (SIGSTOP) or traced: not accepting, but not misconfigured either.
fn process_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "T" || state == "t")
    })
}

/// In the forked child, before exec: put the handler's socket at fd 3 and (built-in
/// handlers) its counters at fd 4, and close every other fd beside stdio. Pin it to its CPU, tie its life to the spawner's, and
/// move it out of the terminal's process group so that Ctrl-C reaches only the spawner,
/// which stops handlers in order.
fn place_handler(
    listener: RawFd,
    stats: Option<RawFd>,
    cpus: Option<nix::sched::CpuSet>,
    parent: libc::pid_t,
) -> io::Result<()> {
    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }
    // SAFETY: plain fd and process syscalls on values owned by this (forked) process.
    unsafe {
        // Copy the sources out of the way first: either may sit at 3 or 4.
        let listener = check(libc::fcntl(listener, libc::F_DUPFD_CLOEXEC, 10))?;
        let stats = match stats {
            Some(fd) => Some(check(libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10))?),
            None => None,
        };
        check(libc::dup2(listener, LISTEN_FD))?;
        libc::close(listener);
        if let Some(stats) = stats {
            check(libc::dup2(stats, STATS_FD))?;
            libc::close(stats);
        }
        // Whatever parsrv itself inherited without close-on-exec must not reach the handler.
        let first_unused = if stats.is_some() {
            STATS_FD + 1
        } else {
            LISTEN_FD + 1
        } as u32;
        if libc::syscall(libc::SYS_close_range, first_unused, u32::MAX, 0) != 0 {
            // Kernels before 5.9: close them one by one.
            for fd in first_unused as RawFd..4096 {
                libc::close(fd);
            }
        }
        if let Some(cpus) = cpus {
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)?;
        }
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
        // The spawner may have died before prctl took effect.
        if libc::getppid() != parent {
            return Err(io::Error::other("spawner exited"));
        }
        check(libc::setpgid(0, 0))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_immediate_doubles_caps_and_resets() {
        let mut backoff = Backoff::default();
        let delays: Vec<_> = (0..10).map(|_| backoff.next()).collect();
        assert_eq!(delays[0], Duration::ZERO);
        assert_eq!(delays[1], Duration::from_millis(100));
        assert_eq!(delays[2], Duration::from_millis(200));
        assert_eq!(delays[3], Duration::from_millis(400));
        assert_eq!(delays[9], Backoff::CAP);
        backoff.ran_for(Duration::from_secs(1));
        assert_eq!(backoff.next(), Backoff::CAP);
        backoff.ran_for(Backoff::STABLE);
        assert_eq!(backoff.next(), Duration::ZERO);
    }

    #[test]
    fn process_alive_reads_proc() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped: a zombie is not alive.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!process_alive(pid));
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    #[test]
    fn describes_exits() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            describe_exit(Ok(ExitStatus::from_raw(3 << 8))),
            "exited with code 3"
        );
        assert_eq!(
            describe_exit(Ok(ExitStatus::from_raw(9))),
            "was killed by signal 9"
        );
    }
}
