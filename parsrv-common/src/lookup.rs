//! The sk_lookup program (`parsrv-ebpf/src/lookup.rs`, userspace `parsrv::dataplane::lookup`):
//! one group on several addresses. The kernel runs it for every new
//! connection in the network namespace, before it looks for a listener. For the addresses and
//! ports of its group it hands the connection to a socket of the group: one bound to the
//! address the client asked for while any of those has room, else the one with most room
//! bound to another address of the group. The chosen socket's reuseport group then runs the
//! SK_REUSEPORT program as usual. The accepted connection keeps the address the client asked
//! for as its local address.
//!
//! It shares the SK_REUSEPORT program's SOCKETS (a SOCKMAP: a socket cannot be in a
//! REUSEPORT_SOCKARRAY and a SOCKMAP at once, and `bpf_sk_select_reuseport` takes either) and
//! its CONFIG (for the kernel offsets).

use bytemuck::{Pod, Zeroable};

/// The most (address prefix, port) rules one group may have: every port of a range is a rule.
pub const MAX_RULES: u32 = 4096;

/// The most listen addresses (`--listen` entries) one group may have.
pub const MAX_LISTENS: u32 = 16;

/// Names of the program and maps in the eBPF object, and of their pins under the group's
/// bpffs directory.
pub mod names {
    /// The SK_LOOKUP program.
    pub const PROGRAM: &str = "parsrv_lookup";
    /// Pin of its link to the network namespace (a BPF link: pinned, it outlives the spawner;
    /// unpinned with the group's directory, it detaches).
    pub const LINK: &str = "parsrv_lookup_link";
    /// LPM_TRIE of [`RuleKey`](super::RuleKey) -> [`Rule`](super::Rule): which addresses and
    /// ports the group serves, and for each, the listen entry it belongs to.
    pub const RULES: &str = "LOOKUP_RULES";
    /// ARRAY of u32 indexed by slot: the listen entry of the slot's socket, plus one (0: no
    /// socket), with [`V6_ONLY`](super::V6_ONLY) set for an IPv6 socket that cannot take
    /// IPv4 connections.
    pub const SLOT_LISTEN: &str = "SLOT_LISTEN";
    /// PERCPU_ARRAY of [`AddressCounters`](super::AddressCounters), indexed by listen entry.
    pub const COUNTERS: &str = "ADDRESS_COUNTERS";
    /// PERCPU_ARRAY scratch space (not pinned: private to the program).
    pub const SCRATCH: &str = "LOOKUP_SCRATCH";
}

/// Bit of a SLOT_LISTEN value: the socket is IPv6 with IPV6_V6ONLY. The kernel hands an IPv4
/// connection to an IPv6 socket only without it (`bpf_sk_assign`: EAFNOSUPPORT), and an IPv6
/// connection never to an IPv4 socket.
pub const V6_ONLY: u32 = 1 << 31;

/// Bits of [`RuleKey`] before the address: the port.
pub const PORT_BITS: u32 = 16;

/// The first 12 bytes of an IPv4-mapped IPv6 address (`::ffff:0:0/96`): IPv4 rules are keyed
/// so, and one trie holds both families.
pub const V4_MAPPED: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// A rule's key in the LPM trie (after the kernel's 4-byte prefix length): the port, then the
/// address, both in network byte order, so the prefix length counts the port's 16 bits and
/// then the address's. IPv4 addresses are IPv4-mapped ([`V4_MAPPED`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RuleKey {
    pub port: [u8; 2],
    pub addr: [u8; 16],
}

/// What a rule says about a connection to an address and port it covers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Rule {
    /// The listen entry (index in the spec's `listen`) whose sockets serve it first.
    pub listen: u32,
    /// 1 if the entry's sockets are bound to exactly this address and port: the kernel's
    /// own lookup finds them, so the program need not hand the connection over while they
    /// have room. 0 for the addresses and ports of a prefix or range nobody binds.
    pub bound: u32,
}

counters! {
    /// Per listen entry (per CPU in the kernel; userspace sums them).
    pub struct AddressCounters {
        served => ("served", "New connections for the address that its own sockets took."),
        moved_away => ("moved-away", "New connections for the address sent to another address's socket because every socket of its own was full."),
        moved_in => ("moved-in", "New connections for another address of the group that this address's sockets took."),
        all_full => ("all-full", "New connections for the address that found every socket of every address full (then --when-full applies)."),
        no_socket => ("no-socket", "New connections for the address while the group had no socket registered at all (the kernel's own lookup then applies)."),
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], Pod (bytemuck's derive checks there is no padding).
    unsafe impl aya::Pod for super::RuleKey {}
    unsafe impl aya::Pod for super::Rule {}
    unsafe impl aya::Pod for super::AddressCounters {}
}
