//! What `parsrv status` reports: the spawner builds a [`GroupStatus`] on request and the CLI
//! prints it as a table ([`GroupStatus::render`]) or as JSON (the schema is documented in
//! docs/cli.md), and with `--watch` as rates ([`GroupStatus::render_rates`]).

pub mod cluster;
mod rates;
mod table;

use std::path::PathBuf;

use parsrv_common::{
    lookup::AddressCounters,
    reuseport::{affinity::AffinityCounters, GlobalCounters, SlotCounters},
    udp::{UdpErrors, UdpSlotCounters},
};
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::reuseport::RunStats,
    kernel::{Occupancy, QueueDepth, ReceiveBuffer},
    listeners::SocketState,
    spec::{GroupSpec, Listen},
};

/// Bumped on any incompatible change to the JSON. 2: the group's settings moved under
/// `spec`, in the same form as everywhere else (`parsrv group show --json`, `group add`).
/// 3: `sockets[].parked` became `sockets[].state`; `handlers[].ready`. 4: `sockets[].state`
/// can be `demoted`; `sockets[].stalled`, `sockets[].moved_from_stall`.
pub const SCHEMA_VERSION: u32 = 5;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub schema: u32,
    /// The group as it was started.
    pub spec: GroupSpec,
    pub spawner_pid: u32,
    /// The spawner's version and when its image started (a `parsrv upgrade` keeps the pid
    /// and changes this), in milliseconds since the Unix epoch.
    #[serde(default)]
    pub spawner_version: String,
    #[serde(default)]
    pub spawner_started_ms: u64,
    /// Where the maps are pinned.
    pub pins: Option<PathBuf>,
    pub scaling: ScalingStatus,
    /// Refusing new connections while the queues empty, before stopping (`--drain`).
    pub draining: bool,
    pub handlers: Vec<HandlerStatus>,
    pub sockets: Vec<SocketStatus>,
    /// Connections the program served by the kernel's hash because of an internal error.
    pub errors: GlobalCounters,
    /// A UDP group: datagrams its program left to the kernel's hash because of an internal
    /// error (`errors` is then zero: it is the TCP program's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datagram_errors: Option<UdpErrors>,
    /// A UDP group in flow mode (`--udp-mode flow`): its flow table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_table: Option<FlowTableStatus>,
    pub program: RunStats,
    /// The watchdog's checks that the group's sockets run its program.
    #[serde(default)]
    pub audit: AuditStatus,
    /// With `--affinity client`: the dispatch table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<AffinityStatus>,
    /// A group on several addresses, a prefix or a port range: each `--listen` entry, in
    /// order (slot i's socket is bound to entry i % entries).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<AddressStatus>,
}

/// One `--listen` entry of a group served by the sk_lookup program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressStatus {
    pub listen: Listen,
    /// Where its sockets are bound.
    pub bound: std::net::SocketAddr,
    /// The slots whose sockets are bound there.
    pub slots: Vec<u32>,
    /// Their queues together, read when the status was taken.
    pub queue: Occupancy,
    /// What the sk_lookup program did with connections for this entry.
    pub counters: AddressCounters,
}

/// The dispatch table of a group with client affinity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinityStatus {
    /// Clients with an entry that has not expired.
    pub entries: u64,
    /// Entries the table holds at most (`--affinity-table`).
    pub capacity: u32,
    pub counters: AffinityCounters,
}

/// What the autoscaler did (its limits are the spec's `handlers` and `handlers_max`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScalingStatus {
    /// Resizes the autoscaler made.
    pub decisions: u64,
    /// The latest of them, with the numbers that caused it.
    pub last_decision: Option<String>,
}

/// What the watchdog found when it asked the kernel which program each of the group's
/// sockets runs (`dataplane::audit`), since this spawner took the group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditStatus {
    /// Checks made (one every few seconds).
    pub checks: u64,
    /// Times it found one of the group's addresses running another program or none (someone
    /// holding a socket replaced or detached it) and attached the group's program again.
    pub restored: u64,
    /// The last of those: "ADDRESS: ran WHAT".
    pub last_restored: Option<String>,
    /// Why the group is not checked, when it is not (a kernel without `iter/tcp`).
    pub unavailable: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerStatus {
    pub slot: u32,
    /// The current process, if one is running.
    pub pid: Option<u32>,
    pub alive: bool,
    /// Whether the handler said it serves (built-in handlers), or has run for a second
    /// (exec handlers); until then its socket waits for it if other slots serve.
    pub ready: bool,
    /// The CPU it is pinned to (`--cpus`).
    pub cpu: Option<u32>,
    /// Times this slot's handler was started again after exiting.
    pub restarts: u32,
    /// How the last process of this slot ended, if one did.
    pub last_exit: Option<String>,
    /// While the slot waits out its restart backoff: how long until the next start.
    pub restart_in_ms: Option<u64>,
    /// Built-in handlers only (`None` for exec handlers): connections accepted,
    pub accepted: Option<u64>,
    /// accept() calls that lost the race to another thread of the handler (EAGAIN),
    pub lost_races: Option<u64>,
    /// connections being served.
    pub active: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketStatus {
    pub slot: u32,
    pub cookie: u64,
    /// Read with TCP_INFO when the status was taken; `None` if that failed.
    pub queue: Option<QueueDepth>,
    /// Whether it takes its share of new connections, waits for its slot's next handler, is
    /// out of the group while the handler waits out a restart delay, or is demoted while its
    /// handler is stalled.
    pub state: SocketState,
    pub counters: SlotCounters,
    /// Times its handler was found stalled (`--stall-after`) and its socket demoted, and the
    /// connections moved from its queue to the other sockets then (see [`crate::stall`]).
    #[serde(default)]
    pub stalled: u64,
    #[serde(default)]
    pub moved_from_stall: u64,
    /// Times its handler looked stalled but was left serving: a thread of it was runnable
    /// (it may be about to accept), or it took its queue before the move.
    #[serde(default)]
    pub stall_spared: u64,
    /// A UDP group's socket: its receive buffer and what the datagram program did (`queue`
    /// is then None and `counters` zero: they are TCP's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datagrams: Option<DatagramStatus>,
}

/// One UDP socket of a group (docs/udp.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatagramStatus {
    /// Read with SO_MEMINFO when the status was taken; None if that failed.
    pub buffer: Option<ReceiveBuffer>,
    pub counters: UdpSlotCounters,
    /// Flow mode: the flows the table keeps on this socket that sent within the time-out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<u64>,
}

/// A UDP group's flow table (docs/udp.md, "Modes").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTableStatus {
    /// Flows recorded, idle or not (an idle one is placed again by its next datagram).
    pub entries: u64,
    /// Of those, the ones that sent within the time-out.
    pub live: u64,
    /// The most it holds (`--flow-table`): beyond it the least recently used are forgotten.
    pub capacity: u32,
    pub timeout_ms: u64,
    /// The status read only the first 65,536 flows: `entries`, `live` and each socket's
    /// `flows` are then lower bounds.
    #[serde(default)]
    pub truncated: bool,
    /// Entries the table took for keys it did not hold (a new flow, or one it had
    /// evicted). None for a group an older parsrv pinned without the counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added: Option<u64>,
    /// `added` less `entries`: the entries the kernel evicted to make room (the table was
    /// full), each flow placed again by its next datagram. Read while the program runs, so
    /// right to within the entries added during one status read. None when `added` is, or
    /// when `truncated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted: Option<u64>,
}

/// One client of `parsrv affinity`: its entry, and the handler its slot runs now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinityEntry {
    #[serde(flatten)]
    pub entry: crate::dataplane::affinity::ClientEntry,
    pub pid: Option<u32>,
}

impl GroupStatus {
    /// Connections waiting in all the group's queues, and what the queues hold (sum of
    /// max + 1): their occupancy.
    pub fn occupancy(&self) -> Occupancy {
        Occupancy::of(self.sockets.iter().filter_map(|s| s.queue))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::spec::{CpuList, HandlerKind, HandlerRange, Policy, WhenFull};

    pub(crate) fn sample() -> GroupStatus {
        GroupStatus {
            schema: SCHEMA_VERSION,
            spec: GroupSpec {
                name: "web".into(),
                handlers: HandlerRange { min: 1, max: 4 },
                policy: Policy::LeastLoaded,
                when_full: WhenFull::Refuse,
                backlog: 16,
                threads: 2,
                cpus: CpuList(vec![1]),
                ..GroupSpec::new("127.0.0.1:8080".parse().unwrap(), HandlerKind::Http)
            },
            spawner_pid: 42,
            spawner_version: "0.0.0".into(),
            spawner_started_ms: 1,
            pins: Some("/sys/fs/bpf/parsrv/web".into()),
            scaling: ScalingStatus {
                decisions: 2,
                last_decision: Some("1 -> 2: queues 9/9 full".into()),
            },
            audit: AuditStatus {
                checks: 3,
                restored: 1,
                last_restored: Some("127.0.0.1:8080: ran no program, or a classic BPF one".into()),
                unavailable: None,
            },
            draining: false,
            handlers: vec![HandlerStatus {
                slot: 0,
                pid: Some(43),
                alive: true,
                cpu: Some(1),
                accepted: Some(7),
                lost_races: Some(2),
                ..Default::default()
            }],
            sockets: vec![SocketStatus {
                slot: 0,
                cookie: 99,
                queue: Some(QueueDepth {
                    depth: 3,
                    capacity: 16,
                }),
                counters: SlotCounters {
                    selected: 10,
                    redirected_away: 1,
                    ..Default::default()
                },
                ..Default::default()
            }],
            errors: GlobalCounters::default(),
            datagram_errors: None,
            flow_table: None,
            program: RunStats {
                program_id: 5,
                run_count: 10,
                run_time_ns: 700,
                stats_enabled: true,
                verified_insns: Some(18_435),
            },
            affinity: Some(AffinityStatus {
                entries: 2,
                capacity: 64,
                counters: AffinityCounters {
                    hits: 5,
                    lock_races: 1,
                    ..Default::default()
                },
            }),
            addresses: vec![AddressStatus {
                listen: "127.0.0.0/29:8080-8081".parse().unwrap(),
                bound: "127.0.0.1:8080".parse().unwrap(),
                slots: vec![0],
                queue: Occupancy {
                    queued: 3,
                    capacity: 17,
                },
                counters: AddressCounters {
                    served: 4,
                    moved_away: 2,
                    ..Default::default()
                },
            }],
        }
    }

    #[test]
    fn occupancy_sums_queues_and_their_room() {
        let mut status = sample();
        assert_eq!(
            (status.occupancy().queued, status.occupancy().capacity),
            (3, 17)
        );
        status.sockets.push(status.sockets[0].clone());
        status.sockets[1].queue = None; // unreadable: not counted
        assert_eq!(
            (status.occupancy().queued, status.occupancy().capacity),
            (3, 17)
        );
        status.sockets[1].queue = Some(QueueDepth {
            depth: 9,
            capacity: 8,
        });
        assert_eq!(
            (status.occupancy().queued, status.occupancy().capacity),
            (12, 26)
        );
    }

    #[test]
    fn counters_json_keys_and_values_follow_their_descriptions() {
        // Every counter a value of its own: 1, 2, 3... in field order.
        let mut counters = SlotCounters::default();
        for (value, n) in counters.values_mut().iter_mut().zip(1..) {
            *value = n;
        }
        let json = serde_json::to_value(counters).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut names: Vec<&str> = SlotCounters::COUNTERS.iter().map(|c| c.name).collect();
        names.sort(); // serde_json's map is sorted
        assert_eq!(keys, names);
        for (counter, value) in SlotCounters::COUNTERS.iter().zip(counters.values()) {
            assert_eq!(json[counter.name], value, "{}", counter.name);
        }
        let mut sum = counters;
        sum.add(&counters);
        assert_eq!(sum.values(), counters.values().map(|v| 2 * v));
        let errors = GlobalCounters {
            read_failed: 2,
            select_failed: 1,
            ..Default::default()
        };
        assert_eq!(errors.total(), 3);
    }

    #[test]
    fn json_round_trips_with_kebab_case_enums() {
        let status = sample();
        let json = serde_json::to_string(&status).unwrap();
        assert!(json.contains(r#""policy":"least-loaded""#), "{json}");
        assert!(json.contains(r#""when_full":"refuse""#), "{json}");
        assert_eq!(serde_json::from_str::<GroupStatus>(&json).unwrap(), status);
    }
}
