//! What a running group reports: its status (`parsrv status`, the metrics), the room in its
//! queues (a cluster agent's load) and its dispatch table's entries (`parsrv affinity`).

use std::{
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use super::{group::RunningGroup, members::Members};
use crate::{
    control::ControlError,
    error::Result,
    handler::HandlerStats,
    kernel::Occupancy,
    spec::{Affinity, HandlerKind},
    status::{
        self, AddressStatus, AffinityEntry, AffinityStatus, DatagramStatus, FlowTableStatus,
        GroupStatus, HandlerStatus, SocketStatus,
    },
    supervisor::process_alive,
};

/// The most flows a status reads from a flow table (two syscalls per flow, on the thread
/// that also supervises the handlers, so not unbounded); a larger table's figures are then
/// lower bounds (`FlowTableStatus::truncated`).
const FLOW_WALK_LIMIT: usize = 65_536;

impl RunningGroup {
    /// The free places in the accept queues of the sockets that take connections: a cluster
    /// agent's load, asked for every half second. Cheaper than [`RunningGroup::status`],
    /// which also reads every slot's counters and handler.
    pub fn room(&self) -> i32 {
        let members = self.members.borrow();
        let serving = members
            .pairs()
            .filter(|(_, listener)| listener.state() == crate::listeners::SocketState::Serving)
            .filter_map(|(_, listener)| listener.queue().ok());
        let occupancy = crate::kernel::Occupancy::of(serving);
        occupancy.capacity as i32 - occupancy.queued as i32
    }

    pub fn status(&self) -> Result<GroupStatus> {
        let spec = &self.spec;
        let members = self.members.borrow();
        let counters = match members.steering() {
            Some(steering) => steering.slot_counters(members.len())?,
            None => vec![Default::default(); members.len() as usize],
        };
        let datagrams = match members.datagrams() {
            Some(program) => program
                .slot_counters(members.len())?
                .into_iter()
                .map(Some)
                .collect(),
            None => vec![None; members.len() as usize],
        };
        // Read before the walk: an entry added meanwhile is then walked but not counted
        // added, and the evictions come out short by it rather than long.
        let table_counters = match members.datagrams() {
            Some(program) => program.table_counters()?,
            None => None,
        };
        // One walk of the flow table (flow mode): each socket's live flows, and the whole.
        // Bounded: one map lookup per flow on the spawner's thread, which supervises too.
        let flows = match members.datagrams() {
            Some(program) => program.placed(FLOW_WALK_LIMIT)?,
            None => Vec::new(),
        };
        let timeout = members.datagrams().and_then(|p| p.flow_timeout());
        let live = |slot: Option<u32>| {
            flows
                .iter()
                .filter(|f| slot.is_none_or(|slot| f.slot == slot))
                .filter(|f| timeout.is_some_and(|t| f.idle < t))
                .count() as u64
        };
        let truncated = flows.len() >= FLOW_WALK_LIMIT;
        let added = table_counters.map(|c| c.added);
        let flow_table = timeout.map(|timeout| FlowTableStatus {
            truncated,
            entries: flows.len() as u64,
            live: live(None),
            capacity: spec.flow_table,
            timeout_ms: timeout.as_millis() as u64,
            added,
            evicted: added
                .filter(|_| !truncated)
                .map(|added| added.saturating_sub(flows.len() as u64)),
        });
        let stalls = self.stalls.borrow();
        let sockets = members
            .pairs()
            .zip(counters.into_iter().zip(datagrams))
            .map(|((slot, listener), (counters, datagrams))| {
                let stall = stalls.get(slot.index as usize).copied().unwrap_or_default();
                SocketStatus {
                    datagrams: datagrams.map(|counters| DatagramStatus {
                        buffer: crate::kernel::receive_buffer(listener.socket().as_fd()).ok(),
                        counters,
                        flows: timeout.map(|_| live(Some(slot.index))),
                    }),
                    slot: slot.index,
                    cookie: listener.cookie(),
                    queue: listener.queue().ok(),
                    state: listener.state(),
                    counters,
                    stalled: stall.stalled,
                    moved_from_stall: stall.moved,
                    stall_spared: stall.spared,
                }
            })
            .collect();
        let handlers = members
            .slots()
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
                    ready: state.ready,
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
        Ok(GroupStatus {
            schema: status::SCHEMA_VERSION,
            spec: spec.clone(),
            spawner_pid: std::process::id(),
            spawner_version: env!("CARGO_PKG_VERSION").into(),
            spawner_started_ms: super::executed().started_ms,
            pins: self.pins_dir.clone(),
            scaling: self.scaling.borrow().clone(),
            draining: self.draining.get(),
            handlers,
            sockets,
            errors: match members.steering() {
                Some(steering) => steering.global_counters()?,
                None => Default::default(),
            },
            datagram_errors: members.datagrams().map(|p| p.errors()).transpose()?,
            flow_table,
            program: match (members.steering(), members.datagrams()) {
                (Some(steering), _) => steering.run_stats()?,
                (None, Some(datagrams)) => datagrams.run_stats()?,
                (None, None) => unreachable!("a group runs one program"),
            },
            audit: self.audit.borrow().clone(),
            affinity: self.affinity_status(&members)?,
            addresses: self.address_status(&members)?,
        })
    }

    /// Each `--listen` entry of a group the sk_lookup program serves.
    fn address_status(&self, members: &Members) -> Result<Vec<AddressStatus>> {
        let Some(addresses) = members.steering().and_then(|s| s.addresses()) else {
            return Ok(Vec::new());
        };
        let counters = addresses.counters(self.spec.listen.len())?;
        Ok((0..)
            .zip(self.spec.listen.iter().zip(counters))
            .map(|(entry, (listen, counters))| {
                let own: Vec<_> = members
                    .listeners()
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.entry() == entry)
                    .collect();
                AddressStatus {
                    listen: *listen,
                    bound: listen.bind_addr(),
                    slots: own.iter().map(|(slot, _)| *slot as u32).collect(),
                    queue: Occupancy::of(own.iter().filter_map(|(_, l)| l.queue().ok())),
                    counters,
                }
            })
            .collect())
    }

    fn affinity_status(&self, members: &Members) -> Result<Option<AffinityStatus>> {
        if self.spec.affinity == Affinity::None {
            return Ok(None);
        }
        let Some(steering) = members.steering() else {
            return Ok(None);
        };
        let table = steering.dispatch_table();
        Ok(Some(AffinityStatus {
            entries: table.entries(self.spec.affinity_config().timeout_ns)?.len() as u64,
            capacity: table.capacity(),
            counters: table.counters()?,
        }))
    }

    /// The dispatch table's entries (of `client` only, if given), with each slot's handler.
    pub fn affinity_entries(
        &self,
        client: Option<std::net::IpAddr>,
    ) -> Result<Vec<AffinityEntry>, ControlError> {
        if self.spec.affinity == Affinity::None {
            return Err(ControlError::Refused(format!(
                "group {} runs without client affinity (--affinity none): it has no dispatch table",
                self.spec.name
            )));
        }
        let config = self.spec.affinity_config();
        let wanted = client
            .map(|c| crate::dataplane::affinity::client_key(c, config.mask_v4, config.mask_v6));
        let members = self.members.borrow();
        let Some(steering) = members.steering() else {
            return Ok(Vec::new());
        };
        let entries = steering.dispatch_table().entries(config.timeout_ns)?;
        let pid_of = |slot: u32| {
            members
                .slots()
                .iter()
                .find(|s| s.index == slot)
                .and_then(|s| s.state.borrow().pid)
        };
        Ok(entries
            .into_iter()
            .filter(|e| {
                wanted.is_none_or(|key| crate::dataplane::affinity::client_addr(&key) == e.client)
            })
            .map(|entry| AffinityEntry {
                pid: pid_of(entry.slot),
                entry,
            })
            .collect())
    }
}
