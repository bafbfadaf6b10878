//! A running group's members: its listening sockets, their registration in the program's
//! maps, and the supervised handler of each. The rule "slot i = socket i = `SOCKETS[i]` =
//! supervised slot i" is kept here and nowhere else: slots are only added and removed
//! through [`Members`], at the top.

use std::{os::fd::AsRawFd, rc::Rc};

use tokio::sync::watch;

use crate::{
    dataplane::{reuseport::Steering, udp::DatagramSteering},
    error::{Error, Result},
    kernel::Occupancy,
    listeners::{Listener, Listeners, SocketState},
    supervisor::{AdoptedHandler, Launcher, Slot},
};

/// The program a group's sockets are registered with: a TCP group's steering program, or a
/// UDP group's datagram program (docs/udp.md).
pub(crate) enum Program {
    // Boxed: each holds its maps' handles and an aya object, hundreds of bytes.
    Connections(Box<Steering>),
    Datagrams(Box<DatagramSteering>),
}

impl Program {
    /// Attaches it to the reuseport group `member` belongs to.
    pub fn attach(&mut self, member: &impl std::os::fd::AsFd) -> Result<()> {
        match self {
            Program::Connections(steering) => steering.attach(member),
            Program::Datagrams(datagrams) => datagrams.attach(member),
        }
    }
}

pub(crate) struct Members {
    listeners: Listeners,
    program: Program,
    /// One per listener once handlers run (slot i serves listener i).
    slots: Vec<Rc<Slot>>,
    launcher: Rc<Launcher>,
    /// Tells every slot's supervisor that the group stops.
    stopped: watch::Receiver<bool>,
    /// Handlers taken over from a spawner that is gone, by slot, until their slot starts.
    adopted: Vec<Option<AdoptedHandler>>,
    /// The top slot while it is being removed: its socket left the group for good, and
    /// what its handler does meanwhile must not bring it back (listen() would).
    leaving: Option<u32>,
}

/// A slot on its way out: its socket is shut down and forgotten by the program; its handler
/// is still finishing what it accepted.
pub(crate) struct Leaving {
    pub slot: Rc<Slot>,
    /// Whether the program forgot the socket cleanly.
    pub forgotten: Result<()>,
}

impl Members {
    /// Registers every listener with the program, in slot order. Handlers start with
    /// [`Members::start_handlers`], once the group is reachable.
    pub fn register(
        listeners: Listeners,
        mut program: Program,
        launcher: Rc<Launcher>,
        stopped: watch::Receiver<bool>,
        adopted: Vec<Option<AdoptedHandler>>,
    ) -> Result<Members> {
        for ((slot, listener), adopted) in (0..).zip(listeners.listeners()).zip(
            adopted
                .iter()
                .map(Option::is_some)
                .chain(std::iter::repeat(false)),
        ) {
            // An adopted handler's socket is in the maps already, its slot's entry too.
            if !adopted {
                match &mut program {
                    Program::Connections(steering) => steering.register(slot, listener)?,
                    Program::Datagrams(datagrams) => datagrams.register(slot, listener)?,
                }
            }
        }
        Ok(Members {
            listeners,
            program,
            slots: Vec::new(),
            launcher,
            stopped,
            adopted,
            leaving: None,
        })
    }

    /// Starts a handler for every listener that has none.
    pub fn start_handlers(&mut self) -> Result<()> {
        while self.slots.len() < self.listeners.listeners().len() {
            self.start_handler()?;
        }
        Ok(())
    }

    fn start_handler(&mut self) -> Result<()> {
        let index = self.slots.len() as u32;
        let fd = self.listeners.listeners()[index as usize]
            .socket()
            .as_raw_fd();
        let adopted = self.adopted.get_mut(index as usize).and_then(Option::take);
        let slot = Slot::start(
            self.launcher.clone(),
            index,
            fd,
            self.stopped.clone(),
            adopted,
        )
        .map_err(Error::io(
            "creating a handler's counters page and notify socket",
        ))?;
        self.slots.push(slot);
        Ok(())
    }

    /// How many slots have a supervised handler.
    pub fn len(&self) -> u32 {
        self.slots.len() as u32
    }

    /// The slots but the spares: the group's size.
    pub fn active(&self) -> u32 {
        self.len().saturating_sub(self.launcher.spec.spare)
    }

    /// Whether slot `index` is a spare: the top `--spare` slots are.
    fn is_spare(&self, index: u32) -> bool {
        index + self.launcher.spec.spare >= self.listeners.listeners().len() as u32
    }

    /// After a slot was added or removed at the top: the slot that left the spares' range
    /// serves, the one that entered it becomes a spare (each once its handler is ready).
    pub fn spares_follow(&mut self) -> Result<()> {
        for index in 0..self.len() {
            let ready = self.slots[index as usize].state.borrow().ready;
            let state = self.listeners.listeners()[index as usize].state();
            let wanted = match (self.is_spare(index), state) {
                (false, SocketState::Spare) => SocketState::Serving,
                (true, SocketState::Serving) if ready => SocketState::Spare,
                _ => continue,
            };
            self.set_state(index, wanted)?;
        }
        Ok(())
    }

    pub fn slots(&self) -> &[Rc<Slot>] {
        &self.slots
    }

    pub fn listeners(&self) -> &[Listener] {
        self.listeners.listeners()
    }

    /// Each slot with its listener.
    pub fn pairs(&self) -> impl Iterator<Item = (&Rc<Slot>, &Listener)> {
        self.slots.iter().zip(self.listeners.listeners())
    }

    /// A TCP group's steering program; None for a UDP group.
    pub fn steering(&self) -> Option<&Steering> {
        match &self.program {
            Program::Connections(steering) => Some(steering.as_ref()),
            Program::Datagrams(_) => None,
        }
    }

    pub fn steering_mut(&mut self) -> Option<&mut Steering> {
        match &mut self.program {
            Program::Connections(steering) => Some(steering.as_mut()),
            Program::Datagrams(_) => None,
        }
    }

    /// A UDP group's datagram program; None for a TCP group.
    pub fn datagrams(&self) -> Option<&DatagramSteering> {
        match &self.program {
            Program::Connections(_) => None,
            Program::Datagrams(datagrams) => Some(datagrams.as_ref()),
        }
    }

    pub fn program_mut(&mut self) -> &mut Program {
        &mut self.program
    }

    /// The steering program of a TCP group, for what only TCP groups do (stalls, parking,
    /// moving queues); a UDP group's request for it is refused, with the reason.
    fn tcp(&mut self, what: &str) -> Result<&mut Steering> {
        match &mut self.program {
            Program::Connections(steering) => Ok(steering.as_mut()),
            Program::Datagrams(_) => Err(Error::Rejected(format!(
                "{what}: not for a UDP group (it has no accept queue; docs/udp.md)"
            ))),
        }
    }

    /// The group's load, read now, as the autoscaler weighs it: what waits in every queue,
    /// spares' included, against the room of the group's own slots. A spare's empty queue
    /// is a reserve, not room: counted as room it hid the overload that should make the
    /// spare serve (one handler's queue 7 of 9 full beside an empty spare's read as 44 %,
    /// under the 50 % that counts as overload, and the group never grew). A UDP group's:
    /// its receive buffers ([`Self::buffer_occupancy`]).
    pub fn occupancy(&self) -> Occupancy {
        if self.datagrams().is_some() {
            return self.buffer_occupancy();
        }
        let queues = self.listeners.listeners().iter().enumerate();
        queues.fold(Occupancy::default(), |sum, (index, listener)| {
            // A socket whose read fails counts as empty.
            let Ok(queue) = listener.queue() else {
                return sum;
            };
            let room = if self.is_spare(index as u32) {
                0
            } else {
                queue.capacity + 1
            };
            Occupancy {
                queued: sum.queued + queue.depth,
                capacity: sum.capacity + room,
            }
        })
    }

    /// A UDP group's load: the KiB its datagrams hold in every receive buffer (rounded up,
    /// so that one queued datagram is not nothing), spares' included, against the KiB of
    /// the group's own slots' buffers (SO_MEMINFO: `sk_rmem_alloc` and `sk_rcvbuf`, what
    /// the program weighs).
    fn buffer_occupancy(&self) -> Occupancy {
        let sockets = self.listeners.listeners().iter().enumerate();
        sockets.fold(Occupancy::default(), |sum, (index, listener)| {
            // A socket whose read fails counts as empty.
            let socket = std::os::fd::AsFd::as_fd(listener.socket());
            let Ok(buffer) = crate::kernel::receive_buffer(socket) else {
                return sum;
            };
            let room = if self.is_spare(index as u32) {
                0
            } else {
                buffer.size / 1024
            };
            Occupancy {
                queued: sum.queued + buffer.used.div_ceil(1024),
                capacity: sum.capacity + room,
            }
        })
    }

    /// Adds a slot at the top: a new socket, registered before its handler starts.
    pub fn add(&mut self) -> Result<()> {
        let index = self.listeners.listeners().len() as u32;
        let mut named = None;
        let program = &mut self.program;
        let added = self.listeners.join_listener(|cookie| {
            named = Some(cookie);
            match program {
                Program::Connections(steering) => steering.register_cookie(index, cookie),
                Program::Datagrams(datagrams) => datagrams.register_cookie(index, cookie),
            }
        });
        let registered = added.and_then(|listener| match program {
            Program::Connections(steering) => steering.register(index, listener),
            Program::Datagrams(datagrams) => datagrams.register(index, listener),
        });
        if let Err(e) = registered {
            if self.listeners.listeners().len() as u32 > index {
                self.listeners.remove_last();
            }
            if let Some(cookie) = named {
                let _ = match program {
                    Program::Connections(steering) => steering.unregister(index, cookie),
                    Program::Datagrams(datagrams) => datagrams.unregister(index, cookie),
                };
            }
            return Err(e);
        }
        self.start_handler()
    }

    /// Whether a slot other than `index` has a ready handler on a serving socket, to take
    /// the connections a socket without a handler should not wait with.
    fn others_serve(&self, index: u32) -> bool {
        self.pairs().any(|(slot, listener)| {
            slot.index != index
                && Some(slot.index) != self.leaving
                && slot.state.borrow().ready
                && matches!(listener.state(), SocketState::Serving | SocketState::Spare)
        })
    }

    /// Slot `index`'s handler is about to start: its socket must be in the group (a handler
    /// accepting on a parked socket gets EINVAL), and while other slots serve it waits for
    /// its handler to be ready before it takes new connections.
    pub fn handler_starting(&mut self, index: u32) -> Result<SocketState> {
        let wanted = if !self.others_serve(index) {
            SocketState::Serving
        } else if self.listeners.listeners()[index as usize].state() == SocketState::Restarting {
            // Started at once after a ready handler (`handler_gone`).
            SocketState::Restarting
        } else {
            SocketState::AwaitingHandler
        };
        self.set_state(index, wanted)
    }

    /// Slot `index`'s handler is ready: its socket takes its share again. Slots whose
    /// handler went, or started, while none was ready kept their sockets serving (their
    /// queues were the best place then); now there is one to leave new connections to, and
    /// they step back as [`Members::handler_gone`] or [`Members::handler_starting`] would have
    /// had them: a handler that is not ready may never be (one that dies before it says so,
    /// in a loop), and what its socket takes meanwhile waits for it.
    pub fn handler_ready(&mut self, index: u32) -> Result<SocketState> {
        let ready = if self.is_spare(index) {
            SocketState::Spare
        } else if self.listeners.listeners()[index as usize].state() == SocketState::Demoted {
            // An adopted handler that the last spawner had found stalled: stall detection
            // tries it again (a demoted slot's handler is otherwise never "ready" anew: a
            // new one follows an exit, which changes the socket's state).
            SocketState::Demoted
        } else {
            SocketState::Serving
        };
        let state = self.set_state(index, ready)?;
        let now = std::time::Instant::now();
        let not_ready: Vec<(u32, SocketState)> = self
            .pairs()
            .filter(|(slot, listener)| {
                let state = slot.state.borrow();
                // A handler that runs and is not ready, or none that waits for a restart;
                // not a slot whose supervision has not begun yet: adopted handlers are
                // taken over one slot after the other, and marking the later ones "no
                // handler" when the first is ready sent new connections to the one socket
                // still unmarked, even a demoted one (in a VM 4 clients' connections waited
                // there until they timed out).
                slot.index != index
                    && listener.state() == SocketState::Serving
                    && !state.ready
                    && (state.pid.is_some() || state.restart_at.is_some())
            })
            .map(|(slot, _)| {
                let delayed = slot.state.borrow().restart_at.is_some_and(|at| at > now);
                let wanted = if delayed {
                    SocketState::Parked
                } else {
                    SocketState::AwaitingHandler
                };
                (slot.index, wanted)
            })
            .collect();
        for (other, wanted) in not_ready {
            self.set_state(other, wanted)?;
        }
        Ok(state)
    }

    /// Puts slot `index`'s socket back in the group if someone shut it down behind
    /// parsrv's back (a handler may `shutdown()` fd 3: the kernel then takes the socket out
    /// of the group and of SOCKETS, and the slot would get no connection again). Says
    /// whether it had to.
    pub fn heal_shut_down(&mut self, index: u32) -> Result<bool> {
        let listener = &self.listeners.listeners()[index as usize];
        let state = listener.state();
        // A UDP socket has no listening state to lose (shutdown() of an unconnected one
        // fails with ENOTCONN).
        if state == SocketState::Parked
            || self.leaving == Some(index)
            || listener.transport() == crate::spec::Transport::Udp
        {
            return Ok(false);
        }
        match crate::kernel::tcp_state(std::os::fd::AsFd::as_fd(listener.socket())) {
            Ok(crate::kernel::TCP_LISTEN) | Err(_) => return Ok(false),
            Ok(_) => {}
        }
        self.tcp("healing a socket")?.forget_socket(index)?;
        self.listeners.mark_parked(index as usize);
        self.set_state(index, state)?;
        Ok(true)
    }

    /// Slot `index`'s handler exited. While other slots serve, its socket gets no new
    /// connection they can take: kept in the group with its queue when the next handler
    /// starts at once (it serves the queue; the handler that died had been ready, and so
    /// will the next soon be: the socket takes what every other socket with a handler is
    /// too full for), out of it when the restart is delayed (the queue moves to live
    /// handlers). Otherwise its queue is the best place a connection can wait, at full
    /// length.
    pub fn handler_gone(&mut self, index: u32, restart_delayed: bool) -> Result<SocketState> {
        let wanted = match (self.others_serve(index), restart_delayed) {
            (false, _) => SocketState::Serving,
            (true, false) => SocketState::Restarting,
            (true, true) => SocketState::Parked,
        };
        self.set_state(index, wanted)
    }

    /// Slot `index`'s handler looked stalled (see [`crate::stall`]): its socket is demoted
    /// and its queue moves to the other sockets. The mark comes first, so that no new
    /// connection joins the queue meanwhile; then, if the queue still holds a connection,
    /// shutting the socket down makes the kernel run the program for each queued connection
    /// and pending handshake, which places them on sockets with room, and listen() puts the
    /// same socket (same open file in the handler, same cookie) back in the group at once,
    /// marked, and registered again. A stopped handler blocked in accept() left the call
    /// when it was stopped; it calls again on resumption, on a socket that listens.
    ///
    /// Unless the handler is stopped, an empty queue at that point means the handler took
    /// it since the look that found it stalled (a handler starved of CPU, not stalled): the
    /// mark is cleared and `None` returned. Moving nothing would gain nothing, and the
    /// handler, back in accept(), would have that call fail with EINVAL between the shutdown
    /// and the listen (a blocking server then exits: seen beside CPU hogs). A stopped
    /// handler runs no accept(), and its socket is demoted whatever its queue (its pending
    /// handshakes move too). Otherwise returns how many connections the program moved (its
    /// `migrated_in` counters).
    pub fn demote_stalled(&mut self, index: u32, handler_stopped: bool) -> Result<Option<u64>> {
        let len = self.len();
        let migrated = |steering: &mut Steering| -> Result<u64> {
            Ok(steering
                .slot_counters(len)?
                .iter()
                .map(|c| c.migrated_in)
                .sum())
        };
        // A slot on its way out is left to its removal (as `set_state` leaves it).
        if self.leaving == Some(index) {
            return Ok(None);
        }
        self.set_state(index, SocketState::Demoted)?;
        // A queue that cannot be read is taken as holding connections: moved, as before.
        let queued = self.listeners.listeners()[index as usize]
            .queue()
            .map_or(1, |q| q.depth);
        if queued == 0 && !handler_stopped {
            self.set_state(index, SocketState::Serving)?;
            return Ok(None);
        }
        let before = migrated(self.tcp("moving a stalled queue")?)?;
        if let Err(e) = self.listeners.move_queue(index as usize) {
            if self.listeners.listeners()[index as usize].state() == SocketState::Parked {
                // Shut down but not listening again: out of the group, as its state says.
                let _ = self.tcp("moving a stalled queue")?.forget_socket(index);
            }
            return Err(e);
        }
        // The kernel emptied its SOCKETS entry when it stopped listening.
        let Program::Connections(steering) = &mut self.program else {
            unreachable!("checked above: a TCP group");
        };
        steering.register(index, &self.listeners.listeners()[index as usize])?;
        Ok(Some(migrated(steering)?.saturating_sub(before)))
    }

    /// Slot `index`'s stalled handler serves again: its socket takes its share again (if it
    /// is still demoted: a handler that exited meanwhile set it otherwise).
    pub fn promote(&mut self, index: u32) -> Result<bool> {
        if self.listeners.listeners()[index as usize].state() != SocketState::Demoted {
            return Ok(false);
        }
        self.set_state(index, SocketState::Serving)?;
        Ok(true)
    }

    fn set_state(&mut self, index: u32, wanted: SocketState) -> Result<SocketState> {
        let listener = &self.listeners.listeners()[index as usize];
        let was = listener.state();
        if self.leaving == Some(index) {
            return Ok(was);
        }
        // A UDP socket cannot leave its kernel group but by closing; while its slot's
        // handler waits out a restart delay it stays, marked, and what it receives waits in
        // its buffer for the next handler (the program sends datagrams there only when no
        // served socket has room).
        // The datagram program ranks every socket without a handler alike (below every
        // socket with one and with room, above none with room).
        let wanted = match (wanted, listener.transport()) {
            (SocketState::Parked | SocketState::Restarting, crate::spec::Transport::Udp) => {
                SocketState::AwaitingHandler
            }
            _ => wanted,
        };
        let back_in = self.listeners.set_state(index as usize, wanted)?;
        if back_in {
            let Program::Connections(steering) = &mut self.program else {
                unreachable!("only a TCP socket leaves its group");
            };
            steering.register(index, &self.listeners.listeners()[index as usize])?;
        } else if wanted == SocketState::Parked && was != SocketState::Parked {
            // The kernel emptied the socket's SOCKETS entry; its cookie stays known.
            self.tcp("parking a socket")?.forget_socket(index)?;
        }
        Ok(wanted)
    }

    /// Takes the top slot out of the group: shutting its socket down makes the kernel run
    /// the program for each queued connection and pending handshake, and the program moves
    /// them to a socket with room. The caller retires the handler, then calls
    /// [`Members::remove_top`].
    ///
    /// A UDP socket cannot leave its kernel group but by closing, and what its buffer holds
    /// would go with it: it is marked as having no handler, so that the program sends new
    /// datagrams and new flows elsewhere while its flows (flow mode) and connections (quic
    /// mode) go on reaching it; the caller waits for them to end
    /// ([`Members::udp_leaving_busy`]) before it retires the handler.
    pub fn leave_top(&mut self) -> Result<Option<Leaving>> {
        let Some(slot) = self.slots.last().cloned() else {
            return Ok(None);
        };
        if let Program::Datagrams(_) = self.program {
            self.set_state(slot.index, SocketState::AwaitingHandler)?;
            self.leaving = Some(slot.index);
            return Ok(Some(Leaving {
                slot,
                forgotten: Ok(()),
            }));
        }
        let listener = &self.listeners.listeners()[slot.index as usize];
        // A parked socket is out of the group already.
        if listener.state() != SocketState::Parked {
            listener
                .socket()
                .shutdown(std::net::Shutdown::Read)
                .map_err(Error::io(format!(
                    "shutting down the socket of slot {}",
                    slot.index
                )))?;
        }
        // The socket has left the group for good: the removal goes on whatever else fails,
        // so that the group is never left with a slot whose socket is dead.
        self.leaving = Some(slot.index);
        let cookie = listener.cookie();
        let forgotten = self
            .tcp("removing a handler")?
            .unregister(slot.index, cookie);
        Ok(Some(Leaving { slot, forgotten }))
    }

    /// Forgets the top slot and closes its socket, once its handler is gone. A UDP socket
    /// is forgotten by the program here (its cookie, and its place in the program's cached
    /// view of the group); the kernel takes it out of the group as it closes.
    pub fn remove_top(&mut self) -> Result<()> {
        self.leaving = None;
        self.slots.pop();
        let Some(listener) = self.listeners.remove_last() else {
            return Ok(());
        };
        let cookie = listener.cookie();
        // Closed first: once out of the kernel's group, no datagram can reach the socket
        // after the program stopped knowing it (one would go to it unnamed, and be lost).
        drop(listener);
        match &mut self.program {
            Program::Datagrams(datagrams) => datagrams.forget(self.slots.len() as u32, cookie),
            Program::Connections(_) => Ok(()),
        }
    }

    /// What still reaches the leaving top slot of a UDP group (see [`Members::leave_top`]):
    /// bytes in its receive buffer, and (flow and quic modes) entries of the program's
    /// table placed on it that are not idle. Nothing is busy when both are 0.
    pub fn udp_leaving_busy(&self, table_limit: usize) -> Result<(u32, usize)> {
        let (Some(index), Program::Datagrams(datagrams)) = (self.leaving, &self.program) else {
            return Ok((0, 0));
        };
        let socket = std::os::fd::AsFd::as_fd(&self.listeners.listeners()[index as usize]);
        let buffered = crate::kernel::receive_buffer(socket).map_or(0, |b| b.used);
        let timeout = datagrams.flow_timeout().unwrap_or_default();
        let live = datagrams
            .placed(table_limit)?
            .iter()
            .filter(|p| p.slot == index && p.idle < timeout)
            .count();
        Ok((buffered, live))
    }
}
