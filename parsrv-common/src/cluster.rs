//! The host dispatcher (`parsrv-ebpf/src/bin/cluster_dispatch.rs`, userspace
//! `parsrv::dataplane::cluster`): a dispatcher with its local dispatch table, one per host of a
//! cluster behind ECMP. A tc program on the host's interface towards the routers sees every packet
//! for the service address and port, and looks the client up in the host's copy of the cluster's
//! dispatch table:
//!
//! - the client's server is this host: the local stack takes it (and the group's
//!   SK_REUSEPORT program picks the handler, as on one host);
//! - it is another host: the packet goes to that host on the same L2 segment (destination
//!   MAC rewritten, sent out again), as IPVS direct routing does; the answer goes straight
//!   from that host to the client;
//! - no entry: the packet goes to the client's *locking dispatcher*, the one every host
//!   computes for the client from the hosts it knows (rendezvous hashing, [`home_score`]).
//!   There, a packet that opens a connection places the client lock (an insert that fails
//!   if any CPU placed one first) and decides in the same step, for the host with most
//!   room; the agent broadcasts the entry. So the parallel first connections of a new
//!   client, whichever hosts the routers hash them to, meet at one dispatcher and one
//!   decision; two dispatchers lock one client only while they disagree on which hosts are
//!   up, and then the earlier lock wins everywhere ([`ClientEntry::wins_over`]);
//! - a packet another host forwarded (its source MAC is a peer's) is this host's, unless
//!   this host is the client's locking dispatcher and the client is served elsewhere (two
//!   hops at most: a packet from the locking dispatcher is always kept).
//!
//! IPv4 only for now; the table is keyed by the client's address (all connections of one
//! client reach one host: session affinity across dispatchers).

use bytemuck::{Pod, Zeroable};

/// The most hosts in one cluster (host ids are 1..=MAX_HOSTS; index 0 of HOSTS is unused).
pub const MAX_HOSTS: u32 = 16;

/// Names of the program and maps in the eBPF object, and of their pins under the cluster's
/// bpffs directory (`/sys/fs/bpf/parsrv/_cluster-NAME-HOST/`).
pub mod names {
    /// The tc (SCHED_CLS) program.
    pub const PROGRAM: &str = "parsrv_cluster";
    /// Pin of its tcx link to the interface: pinned, the dispatcher outlives the agent;
    /// unpinned, it detaches.
    pub const LINK: &str = "parsrv_cluster_link";
    /// ARRAY of one [`ClusterConfig`](super::ClusterConfig).
    pub const CONFIG: &str = "CLUSTER_CONFIG";
    /// LRU_HASH of client IPv4 address (network order) -> [`ClientEntry`](super::ClientEntry):
    /// the host's copy of the cluster's dispatch table.
    pub const CLIENTS: &str = "CLUSTER_CLIENTS";
    /// ARRAY of [`Host`](super::Host) indexed by host id.
    pub const HOSTS: &str = "CLUSTER_HOSTS";
    /// HASH of a peer's MAC (padded to 8 bytes) -> host id: a packet from one was forwarded
    /// by that host's dispatcher.
    pub const PEER_MACS: &str = "CLUSTER_PEER_MACS";
    /// RINGBUF of [`Decision`](super::Decision): the entries this dispatcher placed, for the
    /// agent to broadcast.
    pub const DECISIONS: &str = "CLUSTER_DECISIONS";
    /// PERCPU_ARRAY of one [`DispatchCounters`](super::DispatchCounters).
    pub const COUNTERS: &str = "CLUSTER_COUNTERS";
}

/// What the dispatcher serves and who it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ClusterConfig {
    /// The service address, network byte order.
    pub service_addr: [u8; 4],
    /// The service port, network byte order.
    pub service_port: [u8; 2],
    /// This host's id.
    pub this_host: u16,
    /// The interface the dispatcher runs on, which forwarded packets leave by.
    pub ifindex: u32,
    /// This host's MAC on it (the source of forwarded packets).
    pub mac: [u8; 6],
    /// The highest host id of the cluster: the per-host loops stop there.
    pub max_host: u16,
}

/// A client's entry in the dispatch table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ClientEntry {
    /// The host that serves the client.
    pub host: u16,
    /// The host whose dispatcher placed the client lock and decided.
    pub locker: u16,
    /// [`entry_flags`]: this host's own, not broadcast.
    pub flags: u32,
    /// When the lock was placed (CLOCK_MONOTONIC, ns), with `locker` the order that settles
    /// two locks placed at once on different hosts: the lower (`locked_ns`, `locker`) holds.
    pub locked_ns: u64,
    /// The last packet of the client this host saw (ns), for expiry on the serving host.
    pub last_seen_ns: u64,
}

impl ClientEntry {
    /// Whether this entry holds against `other` for the same client (two
    /// dispatchers that lock one new client at once converge on one server).
    pub fn wins_over(&self, other: &ClientEntry) -> bool {
        (self.locked_ns, self.locker) <= (other.locked_ns, other.locker)
    }
}

/// [`ClientEntry::flags`].
pub mod entry_flags {
    /// This host decided the client for itself before an earlier lock elsewhere won: it may
    /// still have connections of the client, which stay here (the dispatcher looks for a
    /// local socket before forwarding the client's packets).
    pub const MAY_HAVE_OWN: u32 = 1;
}

/// A host of the cluster as this dispatcher knows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Host {
    /// Its MAC on the shared segment.
    pub mac: [u8; 6],
    /// One of [`host_state`].
    pub state: u16,
    /// Free places in its accept queues, as it last reported; the dispatcher takes one per
    /// client it sends there, until the next report.
    pub room: i32,
    pub _pad: u32,
}

/// [`Host::state`].
pub mod host_state {
    /// Unknown, or gone silent: no new client goes there, and its clients' new connections
    /// are decided again; packets of their open connections still go there (it may be only
    /// its agent that died).
    pub const ABSENT: u16 = 0;
    /// Takes new clients.
    pub const READY: u16 = 1;
    /// Keeps its clients, takes no new one.
    pub const DRAINING: u16 = 2;
}

/// An entry the dispatcher placed, for the agent to broadcast.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Decision {
    /// The client's IPv4 address, network byte order.
    pub client: [u8; 4],
    pub _pad: u32,
    pub entry: ClientEntry,
}

counters! {
    /// What the dispatcher did with the service's packets (per CPU; userspace sums).
    pub struct DispatchCounters {
        local => ("local", "Packets of clients this host serves, passed to the local stack."),
        forwarded => ("forwarded", "Packets of clients another host serves, sent to that host."),
        from_peer => ("from-peer", "Packets another host's dispatcher forwarded here, passed to the local stack."),
        own_connection => ("own-connection", "Packets of a connection open on this host although the table names another host (a lock lost to an earlier one), kept here."),
        locked => ("locked", "New clients this dispatcher locked and decided."),
        lock_races => ("lock-races", "New clients another CPU of this host locked first (followed)."),
        to_home => ("to-home", "Packets of a client without an entry here, sent to its locking dispatcher."),
        no_entry => ("no-entry", "Packets of a client without an entry that open no connection, at its locking dispatcher: passed to the local stack."),
        no_host => ("no-host", "Packets passed to the local stack for want of a host: a new client that found no ready host, or a host whose MAC is not known yet."),
        host_gone => ("host-gone", "Packets of a client whose host went silent: a new connection is decided again, others still sent there."),
    }
}

/// The client's locking dispatcher is the host, among those up, with the highest score
/// (rendezvous hashing: when a host comes or goes, only the clients it wins or held move).
/// Shared by the program and userspace so both compute the same host.
#[inline(always)]
pub fn home_score(client: [u8; 4], host: u16) -> u32 {
    // splitmix64's finalizer over (host, client): every input bit moves every output bit.
    let mut x = (u32::from_be_bytes(client) as u64) ^ ((host as u64) << 32);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    x as u32
}

/// The locking dispatcher of `client` among `hosts` (ids of the hosts up).
pub fn home_of(client: [u8; 4], hosts: impl IntoIterator<Item = u16>) -> Option<u16> {
    hosts
        .into_iter()
        .max_by_key(|&host| (home_score(client, host), host))
}

counters! {
    /// What a host's agent did with the table's entries and its peers' connections (kept
    /// by the agent; not shared with the program).
    pub struct AgentCounters {
        broadcast => ("broadcast", "Entries this host's dispatcher placed and the agent broadcast."),
        taken => ("taken", "Entries received from peers and written into the table."),
        lost => ("lost", "Entries received that lost against an earlier lock in the table."),
        host_left => ("host-left", "Entries removed because their host went silent and stayed so for the idle time-out."),
        expired => ("expired", "Entries of this host's clients that expired (and were forgotten everywhere)."),
        refused => ("refused", "Connections refused: not from a configured peer, or a wrong hello."),
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], Pod (bytemuck's derive checks there is no padding).
    unsafe impl aya::Pod for super::ClusterConfig {}
    unsafe impl aya::Pod for super::ClientEntry {}
    unsafe impl aya::Pod for super::Host {}
    unsafe impl aya::Pod for super::Decision {}
    unsafe impl aya::Pod for super::DispatchCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earlier_lock_wins_and_a_tie_goes_to_the_lower_host() {
        let at = |locked_ns, locker| ClientEntry {
            locked_ns,
            locker,
            ..Default::default()
        };
        assert!(at(5, 3).wins_over(&at(6, 1)));
        assert!(!at(6, 1).wins_over(&at(5, 3)));
        assert!(at(5, 1).wins_over(&at(5, 2)));
        assert!(!at(5, 2).wins_over(&at(5, 1)));
    }

    #[test]
    fn homes_spread_and_only_a_leaving_hosts_clients_move() {
        let clients: [[u8; 4]; 300] =
            core::array::from_fn(|i| [198, 51, (i / 256) as u8, (i % 256) as u8]);
        let mut per_host = [0usize; 4];
        for client in clients {
            per_host[home_of(client, [1, 2, 3]).unwrap() as usize] += 1;
        }
        // 100 each on average; a fair hash stays well within 60..140.
        assert!(
            per_host[1..].iter().all(|&n| (60..140).contains(&n)),
            "{per_host:?}"
        );
        for client in clients {
            let before = home_of(client, [1, 2, 3]).unwrap();
            let after = home_of(client, [1, 2]).unwrap();
            if before != 3 {
                assert_eq!(before, after);
            }
        }
    }
}
