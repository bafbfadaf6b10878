//! One slot of a group: the handler process serving that slot's socket, kept running
//! (restarted at once when it exits after it was ready, with backoff when it crash-loops), replaced on request without a gap, and retired.
//!
//! Each slot has a task running [`supervise`]; the spawner talks to it through [`Slot`].

use std::{
    cell::RefCell,
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    process::Stdio,
    rc::Rc,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    handler::{Launch, SharedStats},
    listeners::SocketState,
    spec::{Credentials, GroupSpec, HandlerKind},
};

mod notify;
mod pidfd;
mod process;
mod restarts;

pub use crate::procfs::{process_start_time, process_state};
pub use pidfd::PidFd;
use process::{
    describe_exit, forward_output, kill_group, kill_handler, output_pipe, place_handler,
};
pub(crate) use process::{process_alive, process_stopped};
use restarts::Restarts;

/// What a slot's supervisor tells the group as its handler comes and goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotEvent {
    /// A handler is about to start on the slot's socket.
    Starting,
    /// It runs (its pid is in the slot's state), spawned or adopted.
    Started,
    /// It is ready (see [`Running::ready`]).
    Ready,
    /// It exited; the next one starts at once or after a delay.
    Gone { restart_delayed: bool },
}

/// The group's side of [`SlotEvent`]s: it decides where the slot's socket stands
/// ([`SocketState`]) so that no new connection waits for a handler that is not there while
/// another could take it, and records the change for a spawner that adopts the group.
pub trait SlotEvents {
    fn on(&self, slot: u32, event: SlotEvent) -> crate::Result<SocketState>;
}
/// What every handler of a group is started with.
pub struct Launcher {
    pub spec: GroupSpec,
    pub credentials: Option<Credentials>,
    /// How long a handler may take to exit after SIGTERM before SIGKILL.
    pub grace: Duration,
    /// How long a replacement may take to become ready during a restart.
    pub ready_timeout: Duration,
    /// The group, set once it exists.
    pub group: std::cell::OnceCell<std::rc::Weak<dyn SlotEvents>>,
}
impl Launcher {
    /// Tells the group about slot `slot` (a no-op before the group exists, or once it is
    /// gone); a failure is logged, and the slot carries on.
    fn tell(&self, slot: u32, event: SlotEvent) -> Option<SocketState> {
        let group = self.group.get().and_then(std::rc::Weak::upgrade)?;
        group
            .on(slot, event)
            .inspect_err(|e| log::error!("handler {slot}: {event:?}: {e}"))
            .ok()
    }
}
/// An exec'd program gives no sign of readiness parsrv can read; one that is still running
/// this long after start counts as ready. (Built-in handlers say so themselves.)
const EXEC_READY_AFTER: Duration = Duration::from_secs(1);
/// How often a starting handler is checked for readiness.
const READY_POLL: Duration = Duration::from_millis(5);
/// What the spawner knows of a slot's handler, for `status`.
#[derive(Default)]
pub struct HandlerState {
    pub pid: Option<u32>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// When the next start is due, while the slot waits out its backoff.
    pub restart_at: Option<Instant>,
    /// Whether the running handler is ready (see [`Running::ready`]).
    pub ready: bool,
    /// The handler's pid once a warning about it was logged (warn once per process).
    pub warned: Option<u32>,
}
/// Why a handler was not replaced; the old one keeps serving in each case.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    #[error("handler {slot} is not supervised any more")]
    NotSupervised { slot: u32 },
    #[error("handler {slot} stopped during its restart")]
    Stopped { slot: u32 },
    #[error("handler {slot}: cannot start a replacement ({source}): kept pid {old} serving")]
    CannotStart {
        slot: u32,
        old: u32,
        #[source]
        source: io::Error,
    },
    #[error("handler {slot}: the replacement (pid {new}) {why}: kept pid {old} serving")]
    NotReady {
        slot: u32,
        new: u32,
        old: u32,
        /// What the replacement did instead, and where it was waiting.
        why: String,
    },
}
enum Command {
    /// Start a new process on the slot's socket, wait until it is ready, then stop the old.
    Replace(oneshot::Sender<Result<String, ReplaceError>>),
    /// Stop the handler for good (the slot is being removed, or the group stops).
    Retire,
}
/// A slot as the spawner holds it.
pub struct Slot {
    pub index: u32,
    /// The slot's socket (owned by the spawner's SocketGroup, which outlives the slot).
    pub listen_fd: RawFd,
    pub stats: SharedStats,
    /// With `--notify`: the socket its exec handler says READY=1 on.
    notify: Option<notify::NotifySocket>,
    pub state: RefCell<HandlerState>,
    commands: mpsc::UnboundedSender<Command>,
    task: RefCell<Option<tokio::task::JoinHandle<()>>>,
}
impl Slot {
    /// Starts supervising slot `index`, whose socket is `listen_fd` (inside a LocalSet): its
    /// `adopted` handler if it has one, otherwise a new one.
    pub fn start(
        launcher: Rc<Launcher>,
        index: u32,
        listen_fd: RawFd,
        stop: watch::Receiver<bool>,
        mut adopted: Option<AdoptedHandler>,
    ) -> io::Result<Rc<Slot>> {
        // An adopted built-in handler counts on in the page it has; otherwise a new one.
        let stats = match adopted.as_mut().and_then(|a| a.stats.take()) {
            Some(stats) => stats,
            None => SharedStats::create(index)?,
        };
        let notify = launcher
            .spec
            .notify
            .then(|| notify::NotifySocket::bind(&launcher.spec.name, index, launcher.credentials))
            .transpose()?;
        let (commands, receiver) = mpsc::unbounded_channel();
        let slot = Rc::new(Slot {
            index,
            listen_fd,
            stats,
            notify,
            state: RefCell::default(),
            commands,
            task: RefCell::new(None),
        });
        let task =
            tokio::task::spawn_local(supervise(launcher, slot.clone(), stop, receiver, adopted));
        *slot.task.borrow_mut() = Some(task);
        Ok(slot)
    }

    /// Replaces the handler with a new process, with no moment where none accepts; keeps
    /// the old one if the new one does not become ready.
    pub async fn replace(&self) -> Result<String, ReplaceError> {
        let slot = self.index;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Replace(reply))
            .map_err(|_| ReplaceError::NotSupervised { slot })?;
        answer.await.unwrap_or(Err(ReplaceError::Stopped { slot }))
    }

    /// Stops the handler for good and waits until it is gone.
    pub async fn retire(&self) {
        let _ = self.commands.send(Command::Retire);
        self.finished().await;
    }

    /// Waits for the supervising task to end.
    pub async fn finished(&self) {
        let task = self.task.borrow_mut().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}
/// A handler another spawner started (one that died, or this process before it re-executed
/// itself), taken over with what the slot needs of it.
pub struct AdoptedHandler {
    pub process: PidFd,
    /// A copy of the read end of its output pipe ([`crate::handler::OUTPUT_FD`]), if it
    /// still has one.
    pub output: Option<OwnedFd>,
    /// A built-in handler's counters page ([`crate::handler::STATS_FD`]).
    pub stats: Option<SharedStats>,
    pub restarts: u32,
    pub ready: bool,
}

/// A handler process: spawned by this spawner, or adopted.
enum HandlerProcess {
    Spawned(tokio::process::Child),
    Adopted(PidFd),
}

/// A running handler process.
struct Running {
    process: HandlerProcess,
    pid: u32,
    started: Instant,
}
impl Running {
    fn start(launcher: &Launcher, slot: &Slot) -> io::Result<Running> {
        let (child, output) = spawn_handler(launcher, slot)?;
        let pid = child.id().unwrap_or_default();
        forward_output(output, slot.index, pid);
        Ok(Running {
            process: HandlerProcess::Spawned(child),
            pid,
            started: Instant::now(),
        })
    }

    fn adopt(handler: AdoptedHandler, slot: &Slot) -> Running {
        let pid = handler.process.pid();
        if let Some(output) = handler.output {
            forward_output(output, slot.index, pid);
        }
        Running {
            process: HandlerProcess::Adopted(handler.process),
            pid,
            started: Instant::now(),
        }
    }

    /// Waits until it exits, and says how.
    async fn exited(&mut self) -> String {
        match &mut self.process {
            HandlerProcess::Spawned(child) => describe_exit(child.wait().await),
            HandlerProcess::Adopted(process) => process.exited().await,
        }
    }

    /// Signals the process and its process group.
    fn signal(&self, signal: nix::sys::signal::Signal) {
        match &self.process {
            HandlerProcess::Spawned(_) => kill_handler(self.pid, signal),
            HandlerProcess::Adopted(process) => {
                let _ = process.signal(signal);
                kill_group(self.pid, signal);
            }
        }
    }

    /// Whether it serves its socket yet.
    fn ready(&self, launcher: &Launcher, slot: &Slot) -> bool {
        match launcher.spec.handler {
            HandlerKind::Exec => match &slot.notify {
                Some(notify) => notify.said_ready(self.pid),
                None => self.started.elapsed() >= EXEC_READY_AFTER,
            },
            _ => slot.stats.stats().ready.load(Ordering::Relaxed) == self.pid as u64,
        }
    }
}
/// Keeps the slot's handler running until `stop` or a retirement, then stops it.
async fn supervise(
    launcher: Rc<Launcher>,
    slot: Rc<Slot>,
    mut stop: watch::Receiver<bool>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut adopted: Option<AdoptedHandler>,
) {
    let index = slot.index;
    let mut restarts = Restarts::default();
    let mut first = true;
    loop {
        // An adopted handler is taken charge of even if the group is stopping already
        // (`parsrv stop` of a group whose spawner is gone): so it is stopped, not dropped.
        if adopted.is_none() && *stop.borrow() {
            return;
        }
        let started = match adopted.take() {
            Some(handler) => {
                let ready = handler.ready;
                slot.state.borrow_mut().restarts = handler.restarts;
                Ok((Running::adopt(handler, &slot), ready))
            }
            None => {
                // Back in the group before the handler looks at its socket.
                launcher.tell(index, SlotEvent::Starting);
                Running::start(&launcher, &slot).map(|running| (running, false))
            }
        };
        // How long the handler ran and whether it became ready: a start that failed did
        // neither.
        let mut ran = (Duration::ZERO, false);
        match started {
            Err(e) => log::error!("handler {index}: cannot start: {e}"),
            Ok((mut running, mut ready)) => {
                {
                    let mut state = slot.state.borrow_mut();
                    state.pid = Some(running.pid);
                    state.restart_at = None;
                    state.ready = ready;
                    if !first {
                        state.restarts += 1;
                    }
                }
                first = false;
                launcher.tell(index, SlotEvent::Started);
                // An adopted handler that was ready: its socket serves at full length, even
                // if the last spawner died between the two steps.
                if ready {
                    launcher.tell(index, SlotEvent::Ready);
                }
                loop {
                    tokio::select! {
                        how = running.exited() => {
                            // Whatever it started (a server's workers, holding copies of fd
                            // 3) must not outlive it and serve beside its successor.
                            kill_group(running.pid, nix::sys::signal::Signal::SIGKILL);
                            {
                                let mut state = slot.state.borrow_mut();
                                state.last_exit = Some(how.clone());
                                state.pid = None;
                                state.ready = false;
                            }
                            if *stop.borrow() {
                                return;
                            }
                            ran = (running.started.elapsed(), ready);
                            log::warn!("handler {index} (pid {}) {how}", running.pid);
                            break;
                        }
                        // Polled only until the handler is ready, which takes milliseconds
                        // for a built-in one (a second for an exec'd one).
                        _ = tokio::time::sleep(READY_POLL), if !ready => {
                            if running.ready(&launcher, &slot) {
                                ready = true;
                                slot.state.borrow_mut().ready = true;
                                launcher.tell(index, SlotEvent::Ready);
                            }
                        }
                        _ = stop.changed() => {
                            retire(&launcher, &slot, running).await;
                            return;
                        }
                        command = commands.recv() => match command {
                            None | Some(Command::Retire) => {
                                retire(&launcher, &slot, running).await;
                                return;
                            }
                            Some(Command::Replace(reply)) => {
                                let result = replace(&launcher, &slot, &mut running).await;
                                let _ = reply.send(result);
                            }
                        }
                    }
                }
            }
        }
        let delay = restarts.after_exit(Instant::now(), ran.0, ran.1);
        // Started again at once, the successor serves the queue; until it is ready, new
        // connections go to the live handlers. A delayed one would leave the queue waiting:
        // it moves to the live handlers.
        let socket = launcher.tell(
            index,
            SlotEvent::Gone {
                restart_delayed: !delay.is_zero(),
            },
        );
        let socket = match socket {
            Some(SocketState::Parked) => {
                "its socket is out of the group meanwhile, its queue moved to the others"
            }
            Some(SocketState::Restarting) => {
                "its socket keeps its queue and takes new connections only when every socket with a ready handler is full"
            }
            Some(SocketState::AwaitingHandler) => {
                "its socket keeps its queue and takes new connections only while no other socket has a ready handler"
            }
            _ => "its socket keeps its queue",
        };
        if delay.is_zero() {
            log::warn!("handler {index}: restarting; {socket}");
        } else {
            log::warn!("handler {index} keeps exiting: next start in {delay:?}; {socket}");
        }
        slot.state.borrow_mut().restart_at = Some(Instant::now() + delay);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
            command = commands.recv() => match command {
                None | Some(Command::Retire) => return,
                // Not running: starting it is the restart.
                Some(Command::Replace(reply)) => {
                    let _ = reply.send(Ok(format!("handler {index} was waiting to restart: started now")));
                }
            }
        }
    }
}
async fn retire(launcher: &Launcher, slot: &Slot, mut running: Running) {
    let how = stop_handler(&mut running, launcher.grace).await;
    log::info!("handler {} (pid {}) {how}", slot.index, running.pid);
    let mut state = slot.state.borrow_mut();
    state.last_exit = Some(how);
    state.pid = None;
}
/// A rolling restart's step for one slot: the new process starts on the same socket beside
/// the old one (both accept from the one queue), and only once it is ready is the old one
/// stopped, gracefully. Nothing queued is touched, so nothing is lost.
async fn replace(
    launcher: &Launcher,
    slot: &Slot,
    running: &mut Running,
) -> Result<String, ReplaceError> {
    let index = slot.index;
    let old = running.pid;
    let mut fresh = Running::start(launcher, slot).map_err(|source| ReplaceError::CannotStart {
        slot: index,
        old,
        source,
    })?;
    let new = fresh.pid;
    let deadline = tokio::time::sleep(launcher.ready_timeout);
    tokio::pin!(deadline);
    let verdict = loop {
        tokio::select! {
            how = fresh.exited() => break Err(format!("exited before it was ready ({how})")),
            _ = &mut deadline => break Err(format!("was not ready within {:?}", launcher.ready_timeout)),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {
                if fresh.ready(launcher, slot) {
                    break Ok(());
                }
            }
        }
    };
    if let Err(why) = verdict {
        // What it was doing, for whoever reads the error.
        let seen = process_state(new)
            .zip(crate::procfs::wchan(new))
            .map_or(String::new(), |(state, wchan)| {
                format!(" (state {state}, waiting in {wchan})")
            });
        fresh.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = fresh.exited().await;
        let error = ReplaceError::NotReady {
            slot: index,
            new,
            old,
            why: format!("{why}{seen}"),
        };
        log::error!("{error}");
        return Err(error);
    }
    let mut previous = std::mem::replace(running, fresh);
    slot.state.borrow_mut().pid = Some(new);
    let how = stop_handler(&mut previous, launcher.grace).await;
    let message = format!("handler {index}: pid {old} replaced by pid {new} (the old one {how})");
    log::info!("{message}");
    Ok(message)
}
/// SIGTERM (and SIGCONT, in case it was stopped) to the handler's process group, then
/// SIGKILL to the group after `grace`, and to whatever of it is left once the handler exits.
async fn stop_handler(running: &mut Running, grace: Duration) -> String {
    use nix::sys::signal::Signal;
    running.signal(Signal::SIGTERM);
    running.signal(Signal::SIGCONT);
    let how = match tokio::time::timeout(grace, running.exited()).await {
        Ok(how) => how,
        Err(_) => {
            running.signal(Signal::SIGKILL);
            let _ = running.exited().await;
            format!("did not exit within {grace:?} of SIGTERM: killed")
        }
    };
    kill_group(running.pid, Signal::SIGKILL);
    how
}
/// Starts a handler process; returns it and the read end of its output pipe.
fn spawn_handler(launcher: &Launcher, slot: &Slot) -> io::Result<(tokio::process::Child, OwnedFd)> {
    let spec = &launcher.spec;
    let listener = slot.listen_fd;
    // Exec handlers get their socket and nothing else.
    let stats = (spec.handler != HandlerKind::Exec).then(|| slot.stats.fd().as_raw_fd());
    let cpus = spec.cpu_of(slot.index).map(|cpu| {
        let mut set = nix::sched::CpuSet::new();
        let _ = set.set(cpu as usize); // validated against the usable CPUs
        set
    });
    let launch = Launch {
        kind: spec.handler,
        threads: spec.threads,
        slot: slot.index,
        group: spec.name.clone(),
        credentials: launcher.credentials,
        command: spec.command.clone(),
    };
    let (output, output_writer) = output_pipe()?;
    let output_raw = output.as_raw_fd();
    // /proc/self/exe rather than current_exe(): still this very binary if the file was
    // replaced on disk since the spawner started.
    let mut command = tokio::process::Command::new("/proc/self/exe");
    command
        .arg0("parsrv")
        .arg("handler")
        .args(launch.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::from(output_writer.try_clone()?))
        .stderr(Stdio::from(output_writer))
        // A handler outlives whatever happens to this spawner; orderly paths retire it.
        .kill_on_drop(false);
    // Not the spawner's environment (root's HOME, secrets it was started with, the service
    // manager's variables): a few any program expects, and the group's own.
    command.env_clear().envs(
        crate::spec::environment::HandlerEnv::from_vars(&spec.env).for_handlers(std::env::vars()),
    );
    // Its own, with --notify.
    if let Some(notify) = &slot.notify {
        command.env("NOTIFY_SOCKET", notify.path());
    }
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        command.pre_exec(move || place_handler(listener, stats, output_raw, cpus));
    }
    Ok((command.spawn()?, output))
}
