//! A running group: one value that owns its spec, its members (sockets, program maps,
//! supervised handlers), its pins and attachment, and its tasks; it changes size, restarts
//! its handlers, drains, reports its status (`group_status.rs`) and stops.
//!
//! It starts in steps, each undone if a later one fails, so that a refused group leaves
//! nothing behind and disturbs no other: bind the sockets; load the program (maps pinned in
//! a staging directory); register every socket; attach; publish the pins. The spawner then
//! binds its control socket and starts its handlers.

use std::{
    cell::{Cell, RefCell},
    path::PathBuf,
    rc::Rc,
    time::{Duration, Instant},
};

use parsrv_common::{
    audit::UNREADABLE,
    reuseport::{KernelOffsets, ProgramConfig},
};
use tokio::sync::watch;

use super::{
    adopt::Adoption,
    members::{Members, Program},
    record::{GroupRecord, HandlerRecord, SlotRecord},
};
use crate::{
    control::ControlError,
    dataplane::{
        audit::Audit,
        pins::{self, Pins},
        reuseport::{ProgramLog, Steering},
        udp::{DatagramSteering, UdpSettings},
    },
    error::{Error, Result},
    listeners::{Listeners, SocketState},
    spec::GroupSpec,
    status::{self, ScalingStatus},
    supervisor::{process_start_time, Launcher, SlotEvent, SlotEvents},
};

/// Detaches the program from the group when dropped: it holds a duplicate of a member
/// socket of each address (each address is a reuseport group of its own in the kernel).
struct Attachment(Vec<socket2::Socket>);

impl Attachment {
    /// A duplicate of a socket of each address that is in its kernel group (not parked).
    fn of(listeners: &[crate::listeners::Listener], addresses: usize) -> Result<Attachment> {
        (0..addresses as u32)
            .filter_map(|entry| {
                listeners
                    .iter()
                    .find(|l| l.entry() == entry && l.state() != SocketState::Parked)
            })
            .map(|l| {
                l.socket()
                    .try_clone()
                    .map_err(Error::io("duplicating a group socket"))
            })
            .collect::<Result<_>>()
            .map(Attachment)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        for member in &self.0 {
            if let Err(e) = Steering::detach(member) {
                log::error!("{e}");
            }
        }
    }
}

impl SlotEvents for RunningGroup {
    fn on(&self, slot: u32, event: SlotEvent) -> Result<SocketState> {
        let state = {
            let mut members = self.members.borrow_mut();
            match event {
                SlotEvent::Starting => members.handler_starting(slot)?,
                SlotEvent::Started => members.listeners()[slot as usize].state(),
                SlotEvent::Ready => members.handler_ready(slot)?,
                SlotEvent::Gone { restart_delayed } => {
                    members.handler_gone(slot, restart_delayed)?
                }
            }
        };
        if event != SlotEvent::Starting {
            self.save_record()?;
        }
        Ok(state)
    }
}

pub(crate) struct RunningGroup {
    pub spec: GroupSpec,
    pub(super) members: RefCell<Members>,
    pub(super) pins_dir: Option<PathBuf>,
    /// Held while the membership changes (resize, restart): one change at a time.
    pub membership: tokio::sync::Mutex<()>,
    /// Notified after every resize, by hand or not: a sleeping autoscaler learns that a
    /// step down may have become due.
    pub resized: tokio::sync::Notify,
    stop: watch::Sender<bool>,
    pub(super) scaling: RefCell<ScalingStatus>,
    pub(super) audit: RefCell<status::AuditStatus>,
    pub(super) draining: Cell<bool>,
    /// Per slot: its stalls and the connections moved from its queue then.
    pub(super) stalls: RefCell<Vec<super::stalls::StallCounts>>,
    /// Detach and unpin, in that order, once the handlers are gone.
    teardown: RefCell<Option<(Attachment, Option<Pins>)>>,
    /// Its control socket, watchdog and autoscaler.
    tasks: RefCell<Vec<tokio::task::JoinHandle<()>>>,
    /// The program's log records, until a task forwards them ([`forward_program_log`]).
    program_log: RefCell<Option<ProgramLog>>,
}

/// Writes the program's log records to the spawner's log as they come (inside a LocalSet).
pub async fn forward_program_log(log: ProgramLog) {
    use tokio::io::{unix::AsyncFd, Interest};
    // SAFETY: the fd is the ring buffer's, owned by `log`, which the AsyncFd owns and never
    // changes: it stays open and the same for the AsyncFd's whole life.
    let Ok(mut ready) = (unsafe { AsyncFd::register_with_interest(log, Interest::READABLE) })
    else {
        log::error!("cannot wait for the program's log records: they are not shown");
        return;
    };
    loop {
        let Ok(mut guard) = ready.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

impl RunningGroup {
    /// Creates the group's sockets, program and pins; handlers start with
    /// [`RunningGroup::start_handlers`]. On error, whatever it had created is gone again.
    ///
    /// With `adoption`, the group's handlers, sockets, program and pins are those a spawner
    /// that is gone left running; slots whose handler is gone get a new socket.
    pub fn create(
        spec: GroupSpec,
        offsets: KernelOffsets,
        adoption: Option<Adoption>,
    ) -> Result<Rc<RunningGroup>> {
        let credentials = spec.credentials()?;
        // Groups added later (`parsrv group add`, SIGHUP) are checked here.
        crate::kernel::check_capabilities_for(std::slice::from_ref(&spec))?;
        // A group that starts takes its dynamic uid only if nothing has it; an adopted one
        // has it already (its handlers run with it).
        if let (Some(credentials), None) = (credentials, &adoption) {
            if spec.user.as_deref() == Some(crate::spec::dynamic_user::DYNAMIC) {
                crate::spec::dynamic_user::check_free(&spec.name, credentials)?;
            }
        }
        let pin_dir = pins::group_dir(&spec.name);
        let config = ProgramConfig {
            offsets,
            policy: spec.policy.to_program(),
            when_full: spec.when_full.to_program(),
            generation: 0, // Steering owns it
            flags: 0,
            slots: 0, // Steering owns it
            _reserved: 0,
            affinity: spec.affinity_config(),
        };
        let (mut listeners, program, adopted) = match adoption {
            None => {
                // The caller made sure that no spawner answers for this group and that no
                // handler of it runs, so pins under its name are a dead one's.
                Pins::remove_stale(&pin_dir)?;
                spec.listen
                    .iter()
                    .try_for_each(crate::listeners::ensure_local)?;
                crate::listeners::ensure_range_free(&spec.listen)?;
                let transport = spec.listen[0].transport;
                let listeners = Listeners::bind(
                    &spec.slot_pattern(),
                    transport,
                    spec.handlers.min + spec.spare,
                    spec.backlog,
                    spec.receive_buffer,
                )?;
                let program = if spec.is_udp() {
                    Program::Datagrams(Box::new(DatagramSteering::load(
                        UdpSettings::of(&spec),
                        Some(&pin_dir),
                    )?))
                } else {
                    Program::Connections(Box::new(Steering::load(
                        config,
                        spec.dispatch_table_size(),
                        Some(&pin_dir),
                        spec.needs_lookup().then_some(spec.listen.as_slice()),
                    )?))
                };
                (listeners, program, Vec::new())
            }
            Some(adoption) => {
                let mut program = if spec.is_udp() {
                    Program::Datagrams(Box::new(DatagramSteering::adopt(
                        UdpSettings::of(&spec),
                        &pin_dir,
                    )?))
                } else {
                    Program::Connections(Box::new(Steering::adopt(
                        config,
                        &pin_dir,
                        spec.needs_lookup(),
                    )?))
                };
                let (mut sockets, mut handlers) = (Vec::new(), Vec::new());
                for (index, (slot, recorded)) in
                    (0..).zip(adoption.slots.into_iter().zip(&adoption.record.slots))
                {
                    match slot {
                        Some(slot) => {
                            sockets.push(Some(slot.socket));
                            handlers.push(Some(slot.handler));
                        }
                        None => {
                            // Its socket closed with its handler; a new one takes the slot.
                            match &mut program {
                                Program::Connections(steering) => {
                                    steering.unregister(index, recorded.cookie)?
                                }
                                Program::Datagrams(datagrams) => {
                                    datagrams.unregister(index, recorded.cookie)?
                                }
                            }
                            sockets.push(None);
                            handlers.push(None);
                        }
                    }
                }
                let listeners = Listeners::adopt(
                    &spec.slot_pattern(),
                    spec.listen[0].transport,
                    spec.backlog,
                    spec.receive_buffer,
                    spec.nonblocking,
                    sockets,
                    |slot, cookie| match &mut program {
                        Program::Connections(steering) => steering.register_cookie(slot, cookie),
                        // The socket itself by `Members::register`: a UDP socket must be
                        // bound to enter SOCKETS.
                        Program::Datagrams(datagrams) => datagrams.register_cookie(slot, cookie),
                    },
                )?;
                (listeners, program, handlers)
            }
        };
        let adopting = !adopted.is_empty();
        if !adopting {
            listeners.set_nonblocking(spec.nonblocking)?;
        }
        let launcher = Rc::new(Launcher {
            spec: spec.clone(),
            credentials,
            grace: spec.grace(),
            ready_timeout: spec.ready_timeout(),
            group: Default::default(),
        });
        let (stop, stopped) = watch::channel(false);
        let mut members =
            Members::register(listeners, program, launcher.clone(), stopped, adopted)?;
        if adopting {
            // A socket the last spawner took out of the group and did not put back (killed
            // between a move's shutdown and its listen()): back in the group before the
            // program is attached through the group's sockets (attaching through one that
            // does not listen fails).
            for slot in 0..members.listeners().len() as u32 {
                if members.heal_shut_down(slot)? {
                    log::warn!(
                        "group {}: the socket of slot {slot} was out of the group (its last \
                         spawner was killed in the middle of a move): put back",
                        spec.name
                    );
                }
            }
        }
        let attachment = Attachment::of(members.listeners(), spec.listen.len())?;
        for member in &attachment.0 {
            members.program_mut().attach(member)?;
        }
        // A UDP group's program keeps no log (docs/udp.md).
        let program_log = match members.steering_mut() {
            Some(steering) => Some(steering.take_log(&spec.name)?),
            None => None,
        };
        let pins = match (adopting, members.program_mut()) {
            (true, _) => Some(Pins::adopt(pin_dir)),
            (false, Program::Connections(steering)) => steering.publish_pins()?,
            (false, Program::Datagrams(datagrams)) => datagrams.publish_pins()?,
        };
        let group = Rc::new(RunningGroup {
            pins_dir: pins.as_ref().map(|p| p.dir().to_owned()),
            spec,
            members: RefCell::new(members),
            membership: tokio::sync::Mutex::new(()),
            resized: tokio::sync::Notify::new(),
            stop,
            scaling: RefCell::default(),
            audit: RefCell::default(),
            draining: Cell::new(false),
            stalls: RefCell::default(),
            teardown: RefCell::new(Some((attachment, pins))),
            program_log: RefCell::new(program_log),
            tasks: RefCell::default(),
        });
        let events: std::rc::Weak<dyn SlotEvents> = Rc::downgrade(&group) as _;
        let _ = launcher.group.set(events);
        Ok(group)
    }

    /// Writes what a spawner that adopts the group needs ([`GroupRecord`]).
    pub fn save_record(&self) -> Result<()> {
        let members = self.members.borrow();
        let slots = members
            .pairs()
            .map(|(slot, listener)| {
                let state = slot.state.borrow();
                SlotRecord {
                    cookie: listener.cookie(),
                    handler: state.pid.and_then(|pid| {
                        Some(HandlerRecord {
                            pid,
                            start_time: process_start_time(pid)?,
                            restarts: state.restarts,
                            ready: state.ready,
                        })
                    }),
                }
            })
            .collect();
        GroupRecord {
            spawner_pid: std::process::id(),
            spec: self.spec.clone(),
            slots,
        }
        .write()
    }

    /// The program's log records, for [`forward_program_log`] (once).
    pub fn take_program_log(&self) -> Option<ProgramLog> {
        self.program_log.borrow_mut().take()
    }

    pub fn start_handlers(&self) -> Result<()> {
        self.members.borrow_mut().start_handlers()
    }

    /// Keeps `task` until the group stops.
    pub fn own_task(&self, task: tokio::task::JoinHandle<()>) {
        self.tasks.borrow_mut().push(task);
    }

    pub fn members(&self) -> std::cell::Ref<'_, Members> {
        self.members.borrow()
    }

    /// Asks the kernel (through `audit`) which program each of the group's sockets runs, and
    /// attaches the group's program again to each address whose sockets run another or
    /// none. Returns, per address restored, the address and what it ran instead.
    pub fn restore_program(&self, audit: &mut Audit) -> Result<Vec<String>> {
        let members = self.members.borrow();
        // A UDP group's sockets are not in the TCP iterator's walk (the watchdog is for TCP
        // groups: docs/udp.md).
        let Some(steering) = members.steering() else {
            return Ok(Vec::new());
        };
        let ours = steering.run_stats()?.program_id;
        // A parked socket is shut down, out of the kernel's group: the walk would not meet
        // it, and would go on through every connection of the namespace looking for it.
        let cookies: Vec<u64> = members
            .listeners()
            .iter()
            .filter(|l| l.state() != SocketState::Parked)
            .map(|l| l.cookie())
            .collect();
        let running = audit.programs(&cookies)?;
        let mut restored: Vec<(u32, String)> = Vec::new();
        for listener in members.listeners() {
            let Some(&id) = running.get(&listener.cookie()) else {
                continue;
            };
            // One socket per address suffices: the program belongs to its reuseport group.
            if id == ours
                || id == UNREADABLE
                || restored.iter().any(|(e, _)| *e == listener.entry())
            {
                continue;
            }
            steering.attach(listener.socket())?;
            let instead = match id {
                0 => "ran no program, or a classic BPF one".to_owned(),
                id => format!("ran program id {id}"),
            };
            restored.push((listener.entry(), format!("{}: {instead}", listener.addr())));
        }
        let mut audit_status = self.audit.borrow_mut();
        audit_status.checks += 1;
        audit_status.restored += restored.len() as u64;
        if let Some((_, last)) = restored.last() {
            audit_status.last_restored = Some(last.clone());
        }
        Ok(restored.into_iter().map(|(_, what)| what).collect())
    }

    /// Records that the group's program cannot be audited here, and why.
    pub fn audit_unavailable(&self, why: &str) {
        self.audit.borrow_mut().unavailable = Some(why.to_owned());
    }

    /// See `Members::heal_shut_down`; the record follows.
    pub fn heal_shut_down(&self, slot: u32) -> Result<bool> {
        let healed = self.members.borrow_mut().heal_shut_down(slot)?;
        if healed {
            self.save_record()?;
        }
        Ok(healed)
    }

    /// The program's queue alerts, for the autoscaler (the one reader).
    pub fn take_queue_alerts(&self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.members
            .borrow_mut()
            .steering_mut()
            .and_then(Steering::take_alerts)
    }

    /// The group's size: its slots but the spares (`--spare`), which the autoscaler and
    /// `parsrv group resize` count.
    pub fn handlers(&self) -> u32 {
        self.members.borrow().active()
    }

    /// Counts an autoscaler decision for `status`.
    pub fn record_decision(&self, decision: String) {
        let mut scaling = self.scaling.borrow_mut();
        scaling.decisions += 1;
        scaling.last_decision = Some(decision);
    }

    /// Stops the group: drain (if asked), handlers, tasks (the control socket goes), then
    /// detach and unpin.
    pub async fn stop(&self) {
        if self.spec.drain {
            self.drain().await;
        }
        let _ = self.stop.send(true);
        let slots = self.members.borrow().slots().to_vec();
        for slot in slots {
            slot.finished().await;
        }
        for task in self.tasks.borrow_mut().drain(..) {
            task.abort();
        }
        // Yield so that aborted tasks drop what they hold (the control socket file).
        tokio::task::yield_now().await;
        // Detach through a socket in the kernel's group: a parked one (shut down) is not.
        if let Some((attachment, _)) = self.teardown.borrow_mut().as_mut() {
            if let Ok(members) =
                Attachment::of(self.members.borrow().listeners(), self.spec.listen.len())
            {
                *attachment = members;
            }
        }
        self.teardown.borrow_mut().take();
        GroupRecord::remove(&self.spec.name);
        log::info!("group {} stopped", self.spec.name);
    }

    /// Removes the top slot without losing a connection (see [`Members::leave_top`]).
    async fn remove_top_slot(&self) -> Result<()> {
        let Some(leaving) = self.members.borrow_mut().leave_top()? else {
            return Ok(());
        };
        if self.spec.is_udp() {
            self.udp_slot_winds_down(leaving.slot.index).await;
        }
        leaving.slot.retire().await;
        let forgotten = self.members.borrow_mut().remove_top();
        let slots = self.handlers() as usize;
        self.stalls.borrow_mut().truncate(slots);
        leaving.forgotten.and(forgotten)
    }

    /// Waits, for at most `--grace`, until the leaving UDP slot `index` has nothing left
    /// to read and (flow and quic modes) no flow placed on it that is not idle: udpgrm's
    /// generations, where existing flows finish on the old handler while new ones go
    /// elsewhere. Past the grace, what still comes is placed again by room once the socket
    /// is gone (and what its buffer holds then is lost with it, said in the log).
    async fn udp_slot_winds_down(&self, index: u32) {
        // A table walk per look, never on the datagrams' path: at most this many entries.
        const TABLE_LIMIT: usize = 65_536;
        let (started, grace) = (Instant::now(), self.spec.grace());
        loop {
            let busy = self.members.borrow().udp_leaving_busy(TABLE_LIMIT);
            match busy {
                Ok((0, 0)) => {
                    log::info!(
                        "group {}: slot {index} wound down in {:?}",
                        self.spec.name,
                        started.elapsed()
                    );
                    return;
                }
                Ok((buffered, flows)) if started.elapsed() >= grace => {
                    log::warn!(
                        "group {}: slot {index} still had {flows} live flows and {buffered} \
                         bytes unread after --grace ({grace:?}); removed anyway: its flows are \
                         placed again, its unread datagrams are lost",
                        self.spec.name
                    );
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    log::error!(
                        "group {}: cannot read what slot {index} still gets ({e}); removed",
                        self.spec.name
                    );
                    return;
                }
            }
            // Each look walks the table (one syscall per entry): five a second at most.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Grows or shrinks the group to `target` handlers; the caller holds `membership`.
    /// With spares, a step up adds a spare at the top and the lowest spare serves at once
    /// (its handler is ready); a step down removes the top spare and the highest serving
    /// slot becomes a spare.
    pub async fn resize_to(&self, target: u32) -> Result<()> {
        while self.handlers() < target {
            let mut members = self.members.borrow_mut();
            members.add()?;
            members.spares_follow()?;
        }
        while self.handlers() > target {
            self.remove_top_slot().await?;
            self.members.borrow_mut().spares_follow()?;
        }
        self.resized.notify_waiters();
        self.save_record()
    }

    /// `parsrv group resize`: within the MIN..MAX the group was started with.
    pub async fn resize(&self, handlers: u32) -> Result<String, ControlError> {
        let (min, max) = (self.spec.handlers.min, self.spec.handlers.max);
        if !(min..=max).contains(&handlers) {
            return Err(ControlError::Refused(format!(
                "cannot resize group {} to {handlers} handlers: it was started with --handlers {min}..{max}; \
                 choose a count in that range (restart it with a wider --handlers to change the range)",
                self.spec.name
            )));
        }
        let _changing = self.membership.lock().await;
        let from = self.handlers();
        self.resize_to(handlers)
            .await
            .map_err(|e| ControlError::Failed(format!("resizing group {}: {e}", self.spec.name)))?;
        let message = format!("group {}: {from} -> {handlers} handlers", self.spec.name);
        log::info!("{message} (by request)");
        Ok(message)
    }

    /// Refuses new connections (the program answers them with a RST: clients fail fast and can
    /// go elsewhere) while the handlers empty the queues, for at most `--grace`.
    async fn drain(&self) {
        let draining = match self.members.borrow_mut().steering_mut() {
            Some(steering) => steering.set_draining(true),
            // Refused for UDP groups (spec::validate): nothing to refuse with.
            None => return,
        };
        if let Err(e) = draining {
            log::error!("cannot drain: {e}");
            return;
        }
        self.draining.set(true);
        let queued = || self.members.borrow().occupancy().queued;
        let (started, grace) = (Instant::now(), self.spec.grace());
        log::info!(
            "draining group {}: new connections are refused, {} queued",
            self.spec.name,
            queued()
        );
        while queued() > 0 && started.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match queued() {
            0 => log::info!("drained in {:?}", started.elapsed()),
            left => log::warn!(
                "drain ran out of --grace ({grace:?}) with {left} connections still queued: they are reset"
            ),
        }
    }

    /// Replaces every handler, one at a time; stops at the first that fails (the old one keeps
    /// serving, and the group keeps its size).
    pub async fn restart_all(&self) -> Result<String, ControlError> {
        let _changing = self.membership.lock().await;
        let slots = self.members.borrow().slots().to_vec();
        for (done, slot) in slots.iter().enumerate() {
            slot.replace().await.map_err(|e| {
                ControlError::Failed(format!(
                    "{e}; rolling restart stopped after {done} of {} handlers",
                    slots.len()
                ))
            })?;
        }
        let message = format!(
            "group {}: replaced all {} handlers, one at a time",
            self.spec.name,
            slots.len()
        );
        log::info!("{message}");
        Ok(message)
    }
}
