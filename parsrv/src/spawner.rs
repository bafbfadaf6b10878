//! `parsrv run`: the spawner. It runs one or more socket groups ([`Group`]); each owns its
//! sockets, its instance of the program and its pins, and one supervised handler per socket
//! ([`crate::supervisor`]). The spawner never touches a connection.
//!
//! A group starts in steps, each undone if a later one fails, so that a refused group leaves
//! nothing behind and disturbs no other: bind the sockets; load the program (maps pinned in
//! a staging directory); register every socket; attach; publish the pins; bind its control
//! socket; start handlers.
//!
//! While running, a group can change size (`parsrv group resize`, or its autoscaler): a new
//! slot gets a new socket, registered before its handler starts; the highest slot is removed
//! by shutting its socket down (the kernel runs the program for every queued connection and
//! pending handshake, which moves them to sockets with room), then retiring its handler.
//! `parsrv group restart` or SIGUSR2 replaces every handler, one at a time.
//!
//! Groups come and go while the spawner runs: `parsrv group add` (through the spawner's own
//! control socket), `parsrv group remove`, and SIGHUP, which re-reads the config file.
//!
//! Stop (SIGINT/SIGTERM), group by group: with `drain`, refuse new connections and let the
//! queues empty first (bounded by `grace`); then stop handlers (SIGTERM, grace period,
//! SIGKILL), remove the control socket, detach, unpin.

use std::{
    cell::{Cell, RefCell},
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    rc::Rc,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use parsrv_common::{KernelOffsets, ProgramConfig};
use tokio::sync::watch;

use crate::{
    autoscale::{self, Autoscaler, Sample},
    config::{GroupSpec, HandlerKind},
    config_file::ConfigFile,
    control::{self, ControlSocket, Request, Response},
    error::{Error, Result},
    group::SocketGroup,
    handler::HandlerStats,
    kernel, metrics,
    program::{Pins, Steering},
    status::{self, GroupStatus, HandlerStatus, ScalingStatus, SocketStatus},
    supervisor::{process_alive, process_stopped, Launcher, Slot},
};

/// Everything `parsrv run` needs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The groups to run (validated, names and addresses distinct).
    pub groups: Vec<GroupSpec>,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<SocketAddr>,
    /// The config file the groups came from: SIGHUP reads it again.
    pub config: Option<PathBuf>,
}

/// Runs the groups until SIGINT or SIGTERM.
pub fn run(options: RunOptions) -> Result<()> {
    for spec in &options.groups {
        spec.validate()?;
    }
    // Checks that touch nothing come first, so a refusal leaves nothing behind.
    kernel::check_capabilities()?;
    let btf = kernel::vmlinux_btf()?;
    crate::features::KernelFeatures::probe_with(Some(&btf)).require_all()?;
    let offsets = kernel::offsets_in(&btf)?;
    drop(btf); // some megabytes, not needed while serving
    crate::program::object()?;
    for spec in &options.groups {
        ensure_not_running(&spec.name)?;
    }
    kernel::ensure_bpffs(Path::new(kernel::BPFFS))?;
    // Bound now, so that a port in use fails before any group starts.
    let metrics = options
        .metrics
        .map(|addr| {
            std::net::TcpListener::bind(addr).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    Error::MetricsInUse { addr }
                } else {
                    Error::io(format!("binding the metrics address {addr}"))(e)
                }
            })
        })
        .transpose()?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the spawner's runtime"))?;
    tokio::task::LocalSet::new().block_on(&runtime, async move {
        let spawner = Rc::new(Spawner {
            offsets,
            config: options.config,
            groups: RefCell::default(),
        });
        for spec in options.groups {
            if let Err(e) = spawner.start_group(spec) {
                spawner.stop_all().await;
                return Err(e);
            }
        }
        spawner.serve(metrics).await
    })
}

fn ensure_not_running(name: &str) -> Result<()> {
    let control_path = control::socket_path(name);
    if control::is_live(&control_path) {
        return Err(Error::GroupRunning {
            name: name.to_owned(),
            socket: control_path,
        });
    }
    Ok(())
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

pub(crate) struct Spawner {
    offsets: KernelOffsets,
    config: Option<PathBuf>,
    groups: RefCell<BTreeMap<String, Rc<Group>>>,
}

impl Spawner {
    fn group(&self, name: &str) -> Option<Rc<Group>> {
        self.groups.borrow().get(name).cloned()
    }

    /// Starts a group. On error, whatever it had created is gone again.
    fn start_group(self: &Rc<Self>, spec: GroupSpec) -> Result<Rc<Group>> {
        spec.validate()?;
        ensure_not_running(&spec.name)?;
        if let Some(other) = self
            .groups
            .borrow()
            .values()
            .find(|g| g.spec.listen == spec.listen || g.spec.name == spec.name)
        {
            return Err(Error::Rejected(format!(
                "group '{}' ({}) is already served here as '{}' ({}): give the new group its own name and address",
                spec.name, spec.listen, other.spec.name, other.spec.listen
            )));
        }
        let credentials = spec.credentials()?;
        let pin_dir = pin_dir(&spec.name);
        // No spawner answers for this group, so pins under its name are a dead one's.
        Pins::remove_stale(&pin_dir)?;

        let sockets = SocketGroup::bind(spec.listen, spec.handlers, spec.backlog)?;
        let config = ProgramConfig {
            offsets: self.offsets,
            policy: spec.policy.to_program(),
            when_full: spec.when_full.to_program(),
            generation: 0, // Steering owns it
            flags: 0,
        };
        let mut steering = Steering::load(config, Some(&pin_dir))?;
        for (slot, listener) in (0..).zip(sockets.listeners()) {
            steering.register(slot, listener)?;
        }
        steering.attach(&sockets.listeners()[0])?;
        let attachment = Attachment(
            sockets.listeners()[0]
                .socket()
                .try_clone()
                .map_err(Error::io("duplicating a group socket"))?,
        );
        let pins = steering.publish_pins()?;
        let control = ControlSocket::bind(&spec.name)?;

        let (stop, stopped) = watch::channel(false);
        let group = Rc::new(Group {
            launcher: Rc::new(Launcher {
                spec: spec.clone(),
                credentials,
                grace: spec.grace(),
                ready_timeout: spec.ready_timeout(),
            }),
            pins_dir: pins.as_ref().map(|p| p.dir().to_owned()),
            spec,
            group: RefCell::new(sockets),
            steering: RefCell::new(steering),
            slots: RefCell::default(),
            membership: tokio::sync::Mutex::new(()),
            stop,
            stopped,
            scaling: RefCell::default(),
            draining: Cell::new(false),
            guards: RefCell::new(Some((attachment, pins))),
            tasks: RefCell::default(),
        });
        let initial: Vec<_> = {
            let sockets = group.group.borrow();
            (0..)
                .zip(sockets.listeners())
                .map(|(i, l)| (i, l.socket().as_raw_fd()))
                .collect()
        };
        for (index, fd) in initial {
            let slot = Slot::start(group.launcher.clone(), index, fd, group.stopped.clone())
                .map_err(Error::io("creating a handler's shared counters"))?;
            group.slots.borrow_mut().push(slot);
        }
        let answering = {
            let (spawner, name) = (self.clone(), group.spec.name.clone());
            tokio::task::spawn_local(async move {
                control
                    .serve(move |request| {
                        let (spawner, name) = (spawner.clone(), name.clone());
                        async move { spawner.answer(&name, request).await }
                    })
                    .await;
            })
        };
        let mut tasks = vec![
            answering,
            tokio::task::spawn_local(watch_handlers(group.clone())),
        ];
        if group.spec.autoscaled() {
            tasks.push(tokio::task::spawn_local(autoscale(group.clone())));
        }
        *group.tasks.borrow_mut() = tasks;
        let spec = &group.spec;
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
        self.groups
            .borrow_mut()
            .insert(group.spec.name.clone(), group.clone());
        Ok(group)
    }

    /// Stops and forgets one group. It answers `status` while it drains and stops.
    async fn remove_group(&self, name: &str) -> bool {
        let Some(group) = self.group(name) else {
            return false;
        };
        group.stop().await;
        self.groups.borrow_mut().remove(name);
        true
    }

    async fn stop_all(&self) {
        let names: Vec<String> = self.groups.borrow().keys().cloned().collect();
        for name in names {
            self.remove_group(&name).await;
        }
    }

    async fn serve(self: Rc<Self>, metrics: Option<std::net::TcpListener>) -> Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let installing = |kind: &str| Error::io(format!("installing a {kind} handler"));
        let mut interrupt = signal(SignalKind::interrupt()).map_err(installing("SIGINT"))?;
        let mut terminate = signal(SignalKind::terminate()).map_err(installing("SIGTERM"))?;
        let mut restart = signal(SignalKind::user_defined2()).map_err(installing("SIGUSR2"))?;
        let mut reload = signal(SignalKind::hangup()).map_err(installing("SIGHUP"))?;
        let own = ControlSocket::bind_spawner()?;
        let answering = {
            let spawner = self.clone();
            tokio::task::spawn_local(async move {
                own.serve(move |request| {
                    let spawner = spawner.clone();
                    async move { spawner.answer_spawner(request).await }
                })
                .await;
            })
        };
        let exporting = match metrics {
            Some(listener) => {
                let listener = tokio::net::TcpListener::from_std({
                    listener
                        .set_nonblocking(true)
                        .map_err(Error::io("the metrics socket"))?;
                    listener
                })
                .map_err(Error::io("the metrics socket"))?;
                log::info!(
                    "metrics: http://{}/metrics",
                    listener
                        .local_addr()
                        .map_err(Error::io("the metrics socket"))?
                );
                let spawner = self.clone();
                Some(tokio::task::spawn_local(metrics::serve(
                    listener,
                    move || spawner.statuses(),
                )))
            }
            None => None,
        };
        loop {
            tokio::select! {
                _ = interrupt.recv() => { log::info!("SIGINT: stopping"); break; }
                _ = terminate.recv() => { log::info!("SIGTERM: stopping"); break; }
                _ = restart.recv() => {
                    log::info!("SIGUSR2: restarting every handler of every group");
                    let groups: Vec<_> = self.groups.borrow().values().cloned().collect();
                    tokio::task::spawn_local(async move {
                        for group in groups {
                            if let Err(e) = group.restart_all().await {
                                log::error!("{e}");
                            }
                        }
                    });
                }
                _ = reload.recv() => self.reload().await,
            }
        }
        answering.abort();
        if let Some(exporting) = exporting {
            exporting.abort();
        }
        self.stop_all().await;
        Ok(())
    }

    /// SIGHUP: reads the config file again; starts the groups it adds, stops (draining) the
    /// ones it removes, and reports the ones it changes.
    async fn reload(self: &Rc<Self>) {
        let Some(path) = &self.config else {
            log::warn!("SIGHUP: nothing to reload (not started with --config)");
            return;
        };
        let file = match ConfigFile::load(path) {
            Ok(file) => file,
            Err(e) => {
                log::error!("SIGHUP: {e}; nothing changed");
                return;
            }
        };
        let wanted: BTreeMap<String, GroupSpec> = file
            .groups
            .into_iter()
            .map(|g| (g.name.clone(), g))
            .collect();
        let running: Vec<String> = self.groups.borrow().keys().cloned().collect();
        for name in running.iter().filter(|n| !wanted.contains_key(*n)) {
            log::info!("SIGHUP: group {name} left the config: stopping it");
            self.remove_group(name).await;
        }
        for (name, spec) in wanted {
            match self.group(&name) {
                None => match self.start_group(spec) {
                    Ok(_) => log::info!("SIGHUP: group {name} started"),
                    Err(e) => log::error!("SIGHUP: group {name} not started: {e}"),
                },
                Some(group) if group.spec != spec => {
                    let changed = changed_fields(&group.spec, &spec);
                    log::warn!(
                        "SIGHUP: group {name} changed ({changed}): a running group keeps its \
                         settings; apply them with `parsrv group remove {name}` and `parsrv group \
                         add`, or for the handler count within MIN..MAX `parsrv group resize {name} N`"
                    );
                }
                Some(_) => {}
            }
        }
    }

    fn statuses(&self) -> Vec<GroupStatus> {
        let groups: Vec<_> = self.groups.borrow().values().cloned().collect();
        groups.iter().filter_map(|g| g.status().ok()).collect()
    }

    async fn answer_spawner(self: Rc<Self>, request: Request) -> Response {
        match request {
            Request::Add { groups } => {
                // All or nothing: check every group first, then start them; a failure
                // stops the ones this request started.
                for spec in &groups {
                    if let Err(e) = spec.validate() {
                        return Response::Rejected(e.to_string());
                    }
                }
                let mut started: Vec<String> = Vec::new();
                for spec in groups {
                    let name = spec.name.clone();
                    if let Err(e) = self.start_group(spec) {
                        for done in &started {
                            self.remove_group(done).await;
                        }
                        return match e.exit_code() {
                            crate::error::EXIT_USAGE => Response::Rejected(e.to_string()),
                            _ => Response::Error(format!("group {name}: {e}")),
                        };
                    }
                    started.push(name);
                }
                Response::Done(format!("started {}", started.join(", ")))
            }
            other => Response::Rejected(format!("a spawner's own socket does not take {other:?}")),
        }
    }

    async fn answer(self: Rc<Self>, name: &str, request: Request) -> Response {
        let Some(group) = self.group(name) else {
            return Response::Error(format!("group {name} is stopping"));
        };
        match request {
            Request::Status => match group.status() {
                Ok(status) => Response::Status(Box::new(status)),
                Err(e) => Response::Error(e.to_string()),
            },
            Request::Show => Response::Spec(Box::new(group.spec.clone())),
            Request::Remove => {
                self.remove_group(name).await;
                Response::Done(format!("group {name}: drained and stopped"))
            }
            Request::Resize { handlers } => group.resize(handlers).await,
            Request::Restart => match group.restart_all().await {
                Ok(message) => Response::Done(message),
                Err(message) => Response::Error(message),
            },
            Request::Add { .. } => {
                Response::Rejected("add groups through the spawner: `parsrv group add`".into())
            }
        }
    }
}

/// The fields in which two specs of one group differ, by name.
fn changed_fields(old: &GroupSpec, new: &GroupSpec) -> String {
    let (Ok(serde_json::Value::Object(old)), Ok(serde_json::Value::Object(new))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return "settings".into();
    };
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) struct Group {
    spec: GroupSpec,
    launcher: Rc<Launcher>,
    group: RefCell<SocketGroup>,
    steering: RefCell<Steering>,
    /// One per socket, in slot order (slot i serves socket i).
    slots: RefCell<Vec<Rc<Slot>>>,
    pins_dir: Option<PathBuf>,
    /// Held while the group's membership changes (resize, restart): one change at a time.
    membership: tokio::sync::Mutex<()>,
    stop: watch::Sender<bool>,
    stopped: watch::Receiver<bool>,
    scaling: RefCell<ScalingState>,
    draining: Cell<bool>,
    /// Detach and unpin, in that order, once the handlers are gone.
    guards: RefCell<Option<(Attachment, Option<Pins>)>>,
    /// Its control socket, watchdog and autoscaler.
    tasks: RefCell<Vec<tokio::task::JoinHandle<()>>>,
}

#[derive(Default)]
struct ScalingState {
    decisions: u64,
    last: Option<String>,
}

impl Group {
    fn handlers(&self) -> u32 {
        self.slots.borrow().len() as u32
    }

    /// Stops the group: drain (if asked), handlers, tasks (the control socket goes), then
    /// detach and unpin.
    async fn stop(&self) {
        if self.spec.drain {
            self.drain().await;
        }
        let _ = self.stop.send(true);
        let slots: Vec<_> = self.slots.borrow().clone();
        for slot in slots {
            slot.finished().await;
        }
        for task in self.tasks.borrow_mut().drain(..) {
            task.abort();
        }
        // Yield so that aborted tasks drop what they hold (the control socket file).
        tokio::task::yield_now().await;
        self.guards.borrow_mut().take();
        log::info!("group {} stopped", self.spec.name);
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

    async fn resize(&self, handlers: u32) -> Response {
        let (min, max) = (self.spec.handlers, self.spec.handlers_max);
        if !(min..=max).contains(&handlers) {
            return Response::Rejected(format!(
                "cannot resize group {} to {handlers} handlers: it was started with --handlers {min}..{max}; \
                 choose a count in that range (restart it with a wider --handlers to change the range)",
                self.spec.name
            ));
        }
        let _changing = self.membership.lock().await;
        let from = self.handlers();
        match self.resize_to(handlers).await {
            Ok(()) => {
                let message = format!("group {}: {from} -> {handlers} handlers", self.spec.name);
                log::info!("{message} (by request)");
                Response::Done(message)
            }
            Err(e) => Response::Error(format!("resizing group {}: {e}", self.spec.name)),
        }
    }

    /// Refuses new connections (the program answers them with a RST: clients fail fast and can
    /// go elsewhere) while the handlers empty the queues, for at most `--grace`.
    async fn drain(&self) {
        let shared = self;
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
    async fn restart_all(&self) -> std::result::Result<String, String> {
        let shared = self;
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

    fn status(&self) -> Result<GroupStatus> {
        let shared = self;
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
            pins: shared.pins_dir.clone(),
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
}

/// Samples the group every [`autoscale::SAMPLE_EVERY`] and applies the policy's decisions.
async fn autoscale(shared: Rc<Group>) {
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

fn sample(shared: &Group) -> Option<Sample> {
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

/// How often handlers are checked for serving outside their socket.
const WATCH_PERIOD: Duration = Duration::from_secs(2);
/// How long a socket's queue may stay non-empty without ever shrinking before its handler
/// is reported as not accepting.
const STUCK_AFTER: Duration = Duration::from_secs(10);

/// Warns (once per handler process) about a handler that does not use the socket parsrv
/// gave it as given: one that listens on a socket of its own, that changed the socket's
/// queue length, or whose queue never shrinks.
async fn watch_handlers(shared: Rc<Group>) {
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
