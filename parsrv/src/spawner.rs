//! `parsrv run`: the spawner. It owns the group's sockets, the program and its pins, and one
//! supervised handler per socket ([`crate::supervisor`]); it never touches a connection.
//!
//! Start, each step undone by a guard if a later one fails: check privileges, BTF, bpffs and
//! that the group is not already running; bind the sockets; load the program (maps pinned in
//! a staging directory); register every socket; attach; publish the pins; start handlers.
//!
//! While running, the group can change size (`parsrv group resize`, or the autoscaler with
//! `--handlers MIN..MAX`): a new slot gets a new socket, registered before its handler
//! starts; the highest slot is removed by shutting its socket down (the kernel runs the
//! program for every queued connection and pending handshake, which moves them to sockets
//! with room), then retiring its handler (it finishes what it accepted). `parsrv group
//! restart` or SIGUSR2 replaces every handler, one at a time, on its own socket.
//!
//! Stop (SIGINT/SIGTERM): with `--drain`, refuse new connections and let the queues empty
//! first (bounded by `--grace`); then stop handlers (SIGTERM, grace period, SIGKILL),
//! remove the control socket, detach, unpin.

use std::{
    cell::{Cell, RefCell},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    rc::Rc,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use parsrv_common::ProgramConfig;
use tokio::sync::watch;

use crate::{
    autoscale::{self, Autoscaler, Sample},
    config::{GroupSpec, HandlerKind},
    control::{self, ControlSocket, Request, Response},
    error::{Error, Result},
    group::SocketGroup,
    handler::HandlerStats,
    kernel,
    program::{Pins, Steering},
    status::{self, GroupStatus, HandlerStatus, ScalingStatus, SocketStatus},
    supervisor::{process_alive, process_stopped, Launcher, Slot},
};

/// Everything `parsrv run` needs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub spec: GroupSpec,
    /// How long a handler may take to exit after SIGTERM before it gets SIGKILL (and how
    /// long a drain may take).
    pub grace: Duration,
    /// How long a replacement handler may take to become ready in a restart.
    pub ready_timeout: Duration,
    /// On SIGINT/SIGTERM, refuse new connections and serve the queued ones before stopping.
    pub drain: bool,
}

/// Runs the group until SIGINT or SIGTERM.
pub fn run(options: RunOptions) -> Result<()> {
    let RunOptions {
        spec,
        grace,
        ready_timeout,
        drain,
    } = options;
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
        flags: 0,
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

    let launcher = Rc::new(Launcher {
        spec: spec.clone(),
        credentials,
        grace,
        ready_timeout,
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the spawner's runtime"))?;
    let pins_dir = pins.as_ref().map(|p| p.dir().to_owned());
    let result = tokio::task::LocalSet::new().block_on(&runtime, async move {
        let (stop, stopped) = watch::channel(false);
        let shared = Rc::new(Shared {
            spec,
            launcher,
            drain,
            group: RefCell::new(group),
            steering: RefCell::new(steering),
            slots: RefCell::default(),
            pins: pins_dir,
            membership: tokio::sync::Mutex::new(()),
            stopped,
            scaling: RefCell::default(),
            draining: Cell::new(false),
        });
        serve(shared, stop).await
    });
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
    launcher: Rc<Launcher>,
    drain: bool,
    group: RefCell<SocketGroup>,
    steering: RefCell<Steering>,
    /// One per socket, in slot order (slot i serves socket i).
    slots: RefCell<Vec<Rc<Slot>>>,
    pins: Option<PathBuf>,
    /// Held while the group's membership changes (resize, restart): one change at a time.
    membership: tokio::sync::Mutex<()>,
    stopped: watch::Receiver<bool>,
    scaling: RefCell<ScalingState>,
    draining: Cell<bool>,
}

#[derive(Default)]
struct ScalingState {
    decisions: u64,
    last: Option<String>,
}

impl Shared {
    fn handlers(&self) -> u32 {
        self.slots.borrow().len() as u32
    }

    /// Adds a slot: a new socket, registered with the program, then its handler.
    fn add_slot(&self) -> Result<()> {
        let mut group = self.group.borrow_mut();
        let index = group.listeners().len() as u32;
        let listener = group.add_listener()?;
        let fd = listener.socket().as_raw_fd();
        if let Err(e) = self.steering.borrow_mut().register(index, listener) {
            group.remove_last();
            return Err(e);
        }
        drop(group);
        let slot = Slot::start(self.launcher.clone(), index, fd, self.stopped.clone())
            .map_err(Error::io("creating a handler's shared counters"))?;
        self.slots.borrow_mut().push(slot);
        Ok(())
    }

    /// Removes the highest slot without losing a connection: shutting its socket down makes
    /// the kernel run the program for each queued connection and pending handshake, and the
    /// program moves them to a socket with room; then the handler finishes what it had
    /// accepted and is retired, and the socket is closed.
    async fn remove_last_slot(&self) -> Result<()> {
        let Some(slot) = self.slots.borrow().last().cloned() else {
            return Ok(());
        };
        let cookie = {
            let group = self.group.borrow();
            let listener = &group.listeners()[slot.index as usize];
            listener
                .socket()
                .shutdown(std::net::Shutdown::Read)
                .map_err(Error::io(format!(
                    "shutting down the socket of slot {}",
                    slot.index
                )))?;
            listener.cookie()
        };
        // The socket has left the group for good: finish the removal whatever else fails,
        // so that the group is never left with a slot whose socket is dead.
        let forgotten = self.steering.borrow_mut().unregister(slot.index, cookie);
        slot.retire().await;
        self.slots.borrow_mut().pop();
        self.group.borrow_mut().remove_last();
        forgotten
    }

    /// Grows or shrinks the group to `target` handlers; the caller holds `membership`.
    async fn resize_to(&self, target: u32) -> Result<()> {
        while self.handlers() < target {
            self.add_slot()?;
        }
        while self.handlers() > target {
            self.remove_last_slot().await?;
        }
        Ok(())
    }
}

async fn serve(shared: Rc<Shared>, stop: watch::Sender<bool>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(Error::io("installing a SIGINT handler"))?;
    let mut terminate =
        signal(SignalKind::terminate()).map_err(Error::io("installing a SIGTERM handler"))?;
    let mut restart =
        signal(SignalKind::user_defined2()).map_err(Error::io("installing a SIGUSR2 handler"))?;
    let control = ControlSocket::bind(&shared.spec.name)?;

    let initial: Vec<_> = {
        let group = shared.group.borrow();
        (0..)
            .zip(group.listeners())
            .map(|(i, l)| (i, l.socket().as_raw_fd()))
            .collect()
    };
    for (index, fd) in initial {
        let slot = Slot::start(shared.launcher.clone(), index, fd, shared.stopped.clone())
            .map_err(Error::io("creating a handler's shared counters"))?;
        shared.slots.borrow_mut().push(slot);
    }
    let spec = &shared.spec;
    log::info!(
        "group {} serves {} with {} {} handlers{} (policy {}, when-full {}); status: parsrv status {}",
        spec.name,
        spec.listen,
        spec.handlers,
        spec.handler,
        match (spec.autoscaled(), spec.handlers_max > spec.handlers) {
            (true, _) => format!(" (autoscaled {}..{})", spec.handlers, spec.handlers_max),
            (false, true) => format!(" (resizable {}..{})", spec.handlers, spec.handlers_max),
            _ => String::new(),
        },
        spec.policy,
        spec.when_full,
        spec.name
    );
    let answering = {
        let shared = shared.clone();
        tokio::task::spawn_local(async move {
            control
                .serve(move |request| {
                    let shared = shared.clone();
                    async move { answer(&shared, request).await }
                })
                .await;
        })
    };
    let watching = tokio::task::spawn_local(watch_handlers(shared.clone()));
    let scaling = spec
        .autoscaled()
        .then(|| tokio::task::spawn_local(autoscale(shared.clone())));

    loop {
        tokio::select! {
            _ = interrupt.recv() => { log::info!("SIGINT: stopping group {}", shared.spec.name); break; }
            _ = terminate.recv() => { log::info!("SIGTERM: stopping group {}", shared.spec.name); break; }
            _ = restart.recv() => {
                log::info!("SIGUSR2: restarting every handler of group {}", shared.spec.name);
                let shared = shared.clone();
                tokio::task::spawn_local(async move {
                    if let Err(e) = restart_all(&shared).await {
                        log::error!("{e}");
                    }
                });
            }
        }
    }
    if let Some(scaling) = scaling {
        scaling.abort();
    }
    if shared.drain {
        drain(&shared).await;
    }
    let _ = stop.send(true);
    let slots: Vec<_> = shared.slots.borrow().clone();
    for slot in slots {
        slot.finished().await;
    }
    watching.abort();
    answering.abort();
    let _ = answering.await; // drops the ControlSocket, which removes its file
    Ok(())
}

/// Refuses new connections (the program answers them with a RST: clients fail fast and can
/// go elsewhere) while the handlers empty the queues, for at most `--grace`.
async fn drain(shared: &Shared) {
    if let Err(e) = shared.steering.borrow_mut().set_draining(true) {
        log::error!("cannot drain: {e}");
        return;
    }
    shared.draining.set(true);
    let queued = || -> u32 {
        let group = shared.group.borrow();
        group
            .listeners()
            .iter()
            .map(|l| l.queue().map_or(0, |q| q.depth))
            .sum()
    };
    let started = Instant::now();
    let before = queued();
    log::info!(
        "draining group {}: new connections are refused, {before} queued",
        shared.spec.name
    );
    while queued() > 0 && started.elapsed() < shared.launcher.grace {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match queued() {
        0 => log::info!("drained in {:?}", started.elapsed()),
        left => log::warn!(
            "drain ran out of --grace ({:?}) with {left} connections still queued: they are reset",
            shared.launcher.grace
        ),
    }
}

/// Replaces every handler, one at a time; stops at the first that fails (the old one keeps
/// serving, and the group keeps its size).
async fn restart_all(shared: &Shared) -> std::result::Result<String, String> {
    let _changing = shared.membership.lock().await;
    let slots: Vec<_> = shared.slots.borrow().clone();
    for (done, slot) in slots.iter().enumerate() {
        slot.replace().await.map_err(|e| {
            format!(
                "{e}; rolling restart stopped after {done} of {} handlers",
                slots.len()
            )
        })?;
    }
    let message = format!(
        "group {}: replaced all {} handlers, one at a time",
        shared.spec.name,
        slots.len()
    );
    log::info!("{message}");
    Ok(message)
}

async fn answer(shared: &Rc<Shared>, request: Request) -> Response {
    match request {
        Request::Status => match group_status(shared) {
            Ok(status) => Response::Status(Box::new(status)),
            Err(e) => Response::Error(e.to_string()),
        },
        Request::Resize { handlers } => {
            let (min, max) = (shared.spec.handlers, shared.spec.handlers_max);
            if !(min..=max).contains(&handlers) {
                return Response::Rejected(format!(
                    "cannot resize group {} to {handlers} handlers: it was started with --handlers {min}..{max}; \
                     choose a count in that range (restart it with a wider --handlers to change the range)",
                    shared.spec.name
                ));
            }
            let _changing = shared.membership.lock().await;
            let from = shared.handlers();
            match shared.resize_to(handlers).await {
                Ok(()) => {
                    let message =
                        format!("group {}: {from} -> {handlers} handlers", shared.spec.name);
                    log::info!("{message} (by request)");
                    Response::Done(message)
                }
                Err(e) => Response::Error(format!("resizing group {}: {e}", shared.spec.name)),
            }
        }
        Request::Restart => match restart_all(shared).await {
            Ok(message) => Response::Done(message),
            Err(message) => Response::Error(message),
        },
    }
}

/// Samples the group every [`autoscale::SAMPLE_EVERY`] and applies the policy's decisions.
async fn autoscale(shared: Rc<Shared>) {
    let mut scaler = Autoscaler::new(shared.spec.handlers, shared.spec.handlers_max);
    let mut ticker = tokio::time::interval(autoscale::SAMPLE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticker.tick().await;
        let Some(sample) = sample(&shared) else {
            continue;
        };
        let Some(decision) = scaler.observe(sample) else {
            continue;
        };
        // A resize or restart by hand is under way: its outcome counts, not ours.
        let Ok(_changing) = shared.membership.try_lock() else {
            continue;
        };
        log::info!(
            "autoscale: {} -> {} handlers: {}",
            decision.from,
            decision.to,
            decision.reason
        );
        {
            let mut scaling = shared.scaling.borrow_mut();
            scaling.decisions += 1;
            scaling.last = Some(format!(
                "{} -> {}: {}",
                decision.from, decision.to, decision.reason
            ));
        }
        if let Err(e) = shared.resize_to(decision.to).await {
            log::error!("autoscale: resizing to {} failed: {e}", decision.to);
        }
    }
}

fn sample(shared: &Shared) -> Option<Sample> {
    let handlers = shared.handlers();
    let (queued, capacity) = {
        let group = shared.group.borrow();
        group
            .listeners()
            .iter()
            .fold((0, 0), |(queued, capacity), l| match l.queue() {
                Ok(q) => (queued + q.depth, capacity + q.capacity + 1),
                Err(_) => (queued, capacity),
            })
    };
    let counters = shared.steering.borrow().slot_counters(handlers).ok()?;
    Some(Sample {
        at: Instant::now(),
        handlers,
        queued,
        capacity,
        rejected: counters.iter().map(|c| c.dropped + c.refused).sum(),
    })
}

fn group_status(shared: &Shared) -> Result<GroupStatus> {
    let spec = &shared.spec;
    let steering = shared.steering.borrow();
    let group = shared.group.borrow();
    let slots = shared.slots.borrow();
    let counters = steering.slot_counters(slots.len() as u32)?;
    let sockets = (0..)
        .zip(group.listeners())
        .zip(counters)
        .map(|((slot, listener), counters)| SocketStatus {
            slot,
            cookie: listener.cookie(),
            queue: listener.queue().ok(),
            counters,
        })
        .collect();
    let handlers = slots
        .iter()
        .map(|s| {
            let state = s.state.borrow();
            // Only built-in handlers keep counters; an exec'd program's are its own.
            let stats = (spec.handler != HandlerKind::Exec).then(|| s.stats.stats());
            let count = |field: fn(&HandlerStats) -> &AtomicU64| {
                stats.map(|stats| field(stats).load(Ordering::Relaxed))
            };
            HandlerStatus {
                slot: s.index,
                pid: state.pid,
                alive: state.pid.is_some_and(process_alive),
                cpu: spec.cpu_of(s.index),
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
    let scaling = shared.scaling.borrow();
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
        scaling: ScalingStatus {
            min: spec.handlers,
            max: spec.handlers_max,
            autoscaled: spec.autoscaled(),
            decisions: scaling.decisions,
            last_decision: scaling.last.clone(),
        },
        draining: shared.draining.get(),
        handlers,
        sockets,
        errors: steering.global_counters()?,
        program: steering.run_stats()?,
    })
}

/// How often handlers are checked for serving outside their socket.
const WATCH_PERIOD: Duration = Duration::from_secs(2);
/// How long a socket's queue may stay non-empty without ever shrinking before its handler
/// is reported as not accepting.
const STUCK_AFTER: Duration = Duration::from_secs(10);

/// Warns (once per handler process) about a handler that does not use the socket parsrv
/// gave it as given: one that listens on a socket of its own, that changed the socket's
/// queue length, or whose queue never shrinks.
async fn watch_handlers(shared: Rc<Shared>) {
    // Per slot: since when its queue has not shrunk, and how deep it was.
    let mut stuck_since: Vec<Option<(Instant, u32)>> = Vec::new();
    loop {
        tokio::time::sleep(WATCH_PERIOD).await;
        let group = shared.group.borrow();
        let slots = shared.slots.borrow();
        stuck_since.resize(slots.len(), None);
        for (slot, listener) in group.listeners().iter().enumerate().take(slots.len()) {
            let state = &slots[slot].state;
            let Some(pid) = state.borrow().pid else {
                stuck_since[slot] = None;
                continue;
            };
            if state.borrow().warned == Some(pid) {
                continue;
            }
            let inode = kernel::socket_inode(listener.socket().as_fd()).ok();
            let own = kernel::listening_sockets(pid)
                .into_iter()
                .find(|(found, _)| Some(*found) != inode);
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
