//! The SK_REUSEPORT program (`parsrv-ebpf/src/reuseport.rs`, userspace
//! `parsrv::dataplane::reuseport`): for every new connection to a group, pick a listening
//! socket whose accept queue has room. Its maps are pinned under the group's directory.

use bytemuck::{Pod, Zeroable};

pub mod affinity;

/// Slots in the socket array: the most handler sockets one group can have.
///
/// Equal to the kernel's initial `sock_reuseport` capacity (INIT_SOCKS), so a full group never
/// makes the kernel reallocate `socks[]`, and the program's scan loop has a fixed bound.
pub const MAX_SOCKETS: u32 = 128;

/// Names of the program and maps in the eBPF object, and of their pins under the group's
/// bpffs directory. The eBPF side names its statics exactly so: a name that differs makes
/// loading fail, naming it (`dataplane::reuseport::Steering::load`), in every privileged test.
pub mod names {
    /// The SK_REUSEPORT program (section `sk_reuseport/migrate`).
    pub const PROGRAM: &str = "parsrv_select";
    /// SOCKMAP: slot -> listening socket. A SOCKMAP, not a REUSEPORT_SOCKARRAY, so that the
    /// sk_lookup program ([`crate::lookup`]) can hand connections to the same sockets: a
    /// socket can be in only one of the two kinds, and `bpf_sk_select_reuseport` takes both.
    /// Slots are the group's across all its addresses (each address is a reuseport group of
    /// its own in the kernel).
    pub const SOCKETS: &str = "SOCKETS";
    /// HASH: socket cookie -> slot, to map a listener found in the kernel's group to its slot.
    pub const SLOT_BY_COOKIE: &str = "SLOT_BY_COOKIE";
    /// PERCPU_ARRAY of [`SlotCounters`](super::SlotCounters), indexed by slot.
    pub const SLOT_COUNTERS: &str = "SLOT_COUNTERS";
    /// PERCPU_ARRAY of one [`GlobalCounters`](super::GlobalCounters).
    pub const GLOBAL_COUNTERS: &str = "GLOBAL_COUNTERS";
    /// ARRAY of one [`ProgramConfig`](super::ProgramConfig).
    pub const CONFIG: &str = "CONFIG";
    /// PERCPU_ARRAY of [`SlotCacheEntry`](super::SlotCacheEntry), indexed by position in
    /// the kernel's `socks[]` (not pinned: private to the program).
    pub const SLOT_CACHE: &str = "SLOT_CACHE";
    /// LRU_HASH of [`ClientKey`](affinity::ClientKey) -> [`DispatchEntry`](affinity::DispatchEntry):
    /// the dispatch table of client affinity, sized by userspace at load time.
    pub const DISPATCH_TABLE: &str = "DISPATCH_TABLE";
    /// PERCPU_ARRAY of one [`AffinityCounters`](affinity::AffinityCounters).
    pub const AFFINITY_COUNTERS: &str = "AFFINITY_COUNTERS";
    /// PERCPU_ARRAY scratch space (not pinned: private to the program).
    pub const SCRATCH: &str = "SCRATCH";
    /// PERCPU_ARRAY of one u64: when the CPU last reported a fail-open error to the log
    /// (not pinned: private to the program).
    pub const LAST_REPORT: &str = "LAST_REPORT";
    /// aya-log's ring buffer of log records, read by the spawner (aya-log names it).
    pub const LOGS: &str = "AYA_LOGS";
    /// RINGBUF of [`QueueAlert`](super::QueueAlert)s: a queue at least half full, which
    /// wakes the autoscaler when it sleeps.
    pub const QUEUE_ALERTS: &str = "QUEUE_ALERTS";
    /// PERCPU_ARRAY of one u64: when the CPU last sent a queue alert (not pinned: private to
    /// the program).
    pub const LAST_ALERT: &str = "LAST_ALERT";
}

/// A connection went to a socket whose queue is (with it) at least half full. Sent at most
/// once per [`ALERT_EVERY_NS`] per CPU, so an overloaded group costs its spawner a few
/// records, not one per connection; a group whose queues stay below half sends none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct QueueAlert {
    pub slot: u32,
    pub _reserved: u32,
}

/// At most one [`QueueAlert`] per CPU this often.
pub const ALERT_EVERY_NS: u64 = 10_000_000;

/// Bytes of the QUEUE_ALERTS ring: room for 512 alerts (8 bytes of record header each),
/// far more than a sleeping reader can be sent before it wakes.
pub const QUEUE_ALERTS_BYTES: u32 = 8192;

/// The `SO_INCOMING_CPU` of a socket whose slot has no ready handler: the spawner sets it
/// when a handler dies and sets it back to -1 (the kernel's "none") once the next one is
/// ready. The program ranks such a socket below every socket with a handler, so it gets a
/// new connection only when none of those has room, and keeps what it has queued for the
/// next handler.
///
/// Why this field: the state must live in the socket itself (the program scans the kernel's
/// `socks[]`, which has no slot numbers) and must not change what the kernel admits. The
/// earlier marker, `listen(fd, 0)`, did: a handshake already in flight to the socket
/// overflowed at its final ACK when the queue held a connection (ListenOverflows +1 each).
/// A listener's `sk_incoming_cpu` is never updated by the kernel (only established and UDP
/// sockets record their CPU), TCP's listener lookup only compares it with the current CPU
/// (which a negative number never equals), and a negative value leaves the reuseport
/// group's own count of CPU-bound sockets alone (`reuseport_update_incoming_cpu`). A child
/// inherits it until its first packet overwrites it.
pub const NO_HANDLER_MARK: i32 = -2;

/// The `SO_INCOMING_CPU` of a socket whose handler was ready and died, while the next one
/// (started at once) is not ready yet. Like [`NO_HANDLER_MARK`] it ranks below every socket
/// with a handler, but when every socket with a handler is full by the kernel's test, its
/// queue is a place: the connection waits there for the next handler (a restart takes
/// milliseconds) rather than its SYN being dropped (the client retries after a second).
/// A slot whose handler has never been ready keeps [`NO_HANDLER_MARK`]: that handler may
/// never be.
pub const RESTARTING_MARK: i32 = -4;

/// The `SO_INCOMING_CPU` of a socket whose ready handler is to take connections only when
/// every other socket is full: a spare (`--spare`), or a stalled handler's demoted socket.
/// The program ranks it below every unmarked socket with room, but unlike
/// [`NO_HANDLER_MARK`] it keeps its real room by the kernel's test: when every unmarked
/// socket is full, it takes the connection (its handler serves it at once) rather than
/// the SYN being dropped.
pub const LAST_RESORT_MARK: i32 = -3;

/// Where a new connection goes while some socket has room.
pub mod policy {
    /// Keep the kernel's hash choice when that socket has room, else the socket with most room.
    pub const REDIRECT: u32 = 0;
    /// Always the socket with the most room; ties go to the first one from the hash choice on.
    pub const LEAST_LOADED: u32 = 1;
    /// The power of two choices: the hash choice or one other socket picked at random,
    /// whichever has more room (ties to the hash choice); the socket with most room only
    /// when both are full.
    pub const TWO_CHOICES: u32 = 2;
}

/// What happens to a new connection when every socket is full.
pub mod when_full {
    /// Drop the SYN silently (the kernel counts ListenOverflows); the client retransmits and is
    /// steered again once a handler has made room.
    pub const DROP: u32 = 0;
    /// Answer with a RST: the client gets ECONNREFUSED at once.
    pub const REFUSE: u32 = 1;
}

/// Byte offsets of the kernel struct members the program reads with `bpf_probe_read_kernel`.
///
/// They differ between kernel builds, so userspace takes them from the running kernel's BTF at
/// load time; never hard-code them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct KernelOffsets {
    /// `struct sock.sk_ack_backlog` (u32): established children waiting in the accept queue.
    pub sk_ack_backlog: u32,
    /// `struct sock.sk_max_ack_backlog` (u32): min(listen backlog, net.core.somaxconn).
    pub sk_max_ack_backlog: u32,
    /// `struct sock.sk_reuseport_cb` (pointer to `struct sock_reuseport`).
    pub sk_reuseport_cb: u32,
    /// `struct sock.__sk_common.skc_cookie` (u64; 0 until SO_COOKIE or a diag dump made one).
    pub skc_cookie: u32,
    /// `struct sock.__sk_common.skc_incoming_cpu` (i32): [`NO_HANDLER_MARK`] while the
    /// socket's slot has no ready handler.
    pub skc_incoming_cpu: u32,
    /// `inet_connection_sock.icsk_accept_queue.qlen` (u32): handshakes in progress.
    pub accept_queue_qlen: u32,
    /// `struct sock_reuseport.num_socks` (u16): live listeners in `socks[]`.
    pub reuseport_num_socks: u32,
    /// `struct sock_reuseport.socks` (flexible array of `struct sock *`).
    pub reuseport_socks: u32,
}

/// The program's configuration: one element of the CONFIG array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ProgramConfig {
    pub offsets: KernelOffsets,
    /// One of [`policy`].
    pub policy: u32,
    /// One of [`when_full`].
    pub when_full: u32,
    /// Bumped by userspace whenever it changes the group's membership (SOCKETS and
    /// SLOT_BY_COOKIE): the program's per-CPU slot cache only trusts entries of the current
    /// generation. Never 0, so that a zeroed cache entry never matches.
    pub generation: u32,
    /// Bits of [`flags`].
    pub flags: u32,
    /// One past the highest slot registered: the sk_lookup program ([`crate::lookup`]) scans
    /// slots `0..slots`.
    pub slots: u32,
    /// Explicit padding (Pod): `affinity` is 8-byte aligned.
    pub _reserved: u32,
    pub affinity: affinity::AffinityConfig,
}

/// Bits of `ProgramConfig::flags`.
pub mod flags {
    /// The group is draining before shutdown: refuse (RST) every new connection, while
    /// queued ones are served and migration still works.
    pub const DRAINING: u32 = 1;
}

/// What the program last learned about the listener at one position of the kernel's
/// `socks[]`: its address and slot, valid while `generation` is the CONFIG's. It spares the
/// per-connection path a cookie read and a hash lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SlotCacheEntry {
    pub addr: u64,
    pub slot: u32,
    pub generation: u32,
}

counters! {
    /// Per-slot counters (per CPU in the kernel; userspace sums them).
    pub struct SlotCounters {
        selected => ("selected", "New connections the program steered to the socket, including ones redirected to it."),
        redirected_away => ("redirected", "New connections whose hash choice was this socket but went elsewhere because it was full."),
        dropped => ("dropped", "SYNs dropped silently while every socket was full (when-full drop), counted on the socket the kernel dropped them at."),
        refused => ("refused", "Connections refused with a RST while every socket was full (when-full refuse) or the group drained, counted on their hash choice."),
        migrated_in => ("migrated", "Queued connections and pending handshakes migrated to the socket from a closing one."),
    }
}

counters! {
    /// Internal errors. On each the program fails open: the kernel's hash choice serves the
    /// connection, and the error is counted here (per CPU; userspace sums them). The program
    /// names an error by its [`FailOpen`] variant.
    pub struct GlobalCounters, index enum FailOpen {
        no_config / NoConfig => ("no-config", "The CONFIG element was missing (the loader did not write it)."),
        read_failed / ReadFailed => ("read-failed", "A bpf_probe_read_kernel failed (bad offset or a racing teardown)."),
        bad_group / BadGroup => ("bad-group", "The group had no live socket or more than MAX_SOCKETS."),
        unknown_socket / UnknownSocket => ("unknown-socket", "A chosen socket's cookie was not in SLOT_BY_COOKIE (a socket parsrv did not register joined the group)."),
        select_failed / SelectFailed => ("select-failed", "bpf_sk_select_reuseport refused the chosen slot."),
        no_client / NoClient => ("no-client", "The client's address could not be read from the packet or the migrating socket (client affinity)."),
    }
}

impl GlobalCounters {
    /// All errors: connections served by the kernel's hash because the program failed open.
    pub fn total(&self) -> u64 {
        self.values().iter().sum()
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are #[repr(C)], Pod (checked by bytemuck's derive: no padding, any bit
    // pattern valid), as aya requires of map values.
    unsafe impl aya::Pod for super::ProgramConfig {}
    unsafe impl aya::Pod for super::SlotCounters {}
    unsafe impl aya::Pod for super::GlobalCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_fail_open_error_counts_in_its_own_field() {
        for (index, error) in FailOpen::ALL.into_iter().enumerate() {
            let mut counters = GlobalCounters::default();
            error.increment(&mut counters);
            let mut expected = [0; GlobalCounters::COUNT];
            expected[index] = 1;
            assert_eq!(counters.values(), expected, "{error:?}");
            assert_eq!(counters.total(), 1);
        }
    }
}
