//! The UDP programs (`parsrv-ebpf/src/bin/udp_datagram.rs`, `udp_flow.rs` and `udp_quic.rs`,
//! their common part `parsrv-ebpf/src/udp_room.rs`; userspace `parsrv::dataplane::udp`):
//! SK_REUSEPORT programs for a group of UDP sockets.
//!
//! The datagram program keeps each datagram on the kernel's hash choice while that socket's
//! receive buffer has room, and otherwise sends it to one other socket drawn at random if
//! that one has room, else to the socket with the most room. The flow program places the
//! first datagram of each flow (4-tuple) the same way and records the socket in an LRU
//! table, and sends the flow's later datagrams there, until the flow is idle for the
//! group's time-out. The quic program sends a QUIC packet whose destination connection ID
//! carries a socket's cookie ([`quic`]) to that socket, and places the first flight of a
//! connection (long-header packets without a cookie) by room, keeping it together by its
//! destination connection ID. None ever drops: SK_DROP on UDP
//! makes the kernel answer with an ICMP port unreachable, so when no socket has room the
//! datagram is left to the kernel's hash (which drops it if it does not fit, counted by the
//! kernel in `Udp: RcvbufErrors`), and counted here.
//!
//! Room is read exactly from the kernel: `sk_rcvbuf - sk_rmem_alloc` of each socket, the
//! same two numbers the kernel compares when it queues a datagram (`__udp_enqueue_schedule_skb`).

use bytemuck::{Pod, Zeroable};

/// The most sockets one UDP group may have (a power of two: the scan masks indices with it).
pub const MAX_SOCKETS: u32 = 128;

/// Names of the program and maps in the eBPF object.
pub mod names {
    /// The datagram program (kernel names hold at most 15 bytes).
    pub const PROGRAM: &str = "parsrv_datagram";
    /// The flow program.
    pub const FLOW_PROGRAM: &str = "parsrv_flow";
    /// The flow program's LRU_HASH of [`FlowKey`](super::FlowKey) ->
    /// [`FlowEntry`](super::FlowEntry), sized at load time (`--flow-table`).
    pub const FLOWS: &str = "UDP_FLOWS";
    /// The quic program.
    pub const QUIC_PROGRAM: &str = "parsrv_quic";
    /// The quic program's LRU_HASH of [`FirstFlightKey`](super::FirstFlightKey) ->
    /// [`FlowEntry`](super::FlowEntry), sized at load time (`--flow-table`).
    pub const FIRST_FLIGHTS: &str = "UDP_FIRST_FLIGHTS";
    /// The flow and quic programs' PERCPU_ARRAY of one
    /// [`UdpTableCounters`](super::UdpTableCounters). A group a parsrv before it pinned has
    /// none.
    pub const TABLE_COUNTERS: &str = "UDP_TABLE_COUNTERS";
    /// REUSEPORT_SOCKARRAY of the group's sockets by slot. Not a SOCKMAP as TCP groups use:
    /// a UDP socket put in a SOCKMAP gets its protocol operations replaced (its receive path
    /// goes through the sockmap's psock), which a plain receive buffer must not.
    pub const SOCKETS: &str = "UDP_SOCKETS";
    /// ARRAY of one [`UdpConfig`](super::UdpConfig).
    pub const CONFIG: &str = "UDP_CONFIG";
    /// HASH of socket cookie -> slot: how the program turns a socket it found in the
    /// kernel's group into the key it selects.
    pub const SLOT_BY_COOKIE: &str = "UDP_SLOT_BY_COOKIE";
    /// PERCPU_ARRAY of [`UdpSlotCounters`](super::UdpSlotCounters) by slot.
    pub const SLOT_COUNTERS: &str = "UDP_SLOT_COUNTERS";
    /// PERCPU_ARRAY of one [`UdpErrors`](super::UdpErrors).
    pub const ERRORS: &str = "UDP_ERRORS";
}

/// Byte offsets of the kernel struct members the program reads, from the running kernel's
/// BTF (never hard-coded).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct UdpOffsets {
    /// `struct sock.sk_backlog.rmem_alloc` (atomic_t, `sk_rmem_alloc`): bytes the socket's
    /// queued datagrams hold (their truesize, not their payload).
    pub sk_rmem_alloc: u32,
    /// `struct sock.sk_rcvbuf` (int): the most `sk_rmem_alloc` may reach.
    pub sk_rcvbuf: u32,
    /// `struct sock.sk_reuseport_cb` (pointer to `struct sock_reuseport`).
    pub sk_reuseport_cb: u32,
    /// `struct sock.__sk_common.skc_cookie` (u64).
    pub skc_cookie: u32,
    /// `struct sock.__sk_common.skc_incoming_cpu` (i32): the marks of
    /// [`crate::reuseport::NO_HANDLER_MARK`] and [`crate::reuseport::LAST_RESORT_MARK`].
    pub skc_incoming_cpu: u32,
    /// `struct sock_reuseport.num_socks` (u16).
    pub reuseport_num_socks: u32,
    /// `struct sock_reuseport.socks` (flexible array of `struct sock *`).
    pub reuseport_socks: u32,
}

/// The program's configuration: one element of the CONFIG array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct UdpConfig {
    pub offsets: UdpOffsets,
    /// Bytes a socket must have free to count as having room ([`DEFAULT_RESERVE`]).
    pub reserve: u32,
    /// Bumped by userspace whenever it changes the sockets or their slots; the program's
    /// per-CPU slot cache trusts only entries of the current generation. Never 0.
    pub generation: u32,
    pub _pad: u32,
    /// The flow program: nanoseconds a flow may send nothing before its next datagram is
    /// placed again, as a new flow's (`--flow-timeout`). Unused by the datagram program.
    pub flow_idle_ns: u64,
}

/// A flow as the flow program records it: the datagram's 4-tuple, IPv4 addresses in their
/// IPv4-mapped IPv6 form (`::ffff:a.b.c.d`), so that an IPv6 socket's IPv4 clients and
/// its IPv6 clients never share a key. Ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    pub source: [u8; 16],
    pub destination: [u8; 16],
    pub source_port: u16,
    pub destination_port: u16,
}

/// A recorded flow: the slot its socket has, and when it last sent (`bpf_ktime_get_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowEntry {
    pub last_ns: u64,
    pub slot: u32,
    pub _pad: u32,
}

/// A QUIC connection's first flight as the quic program records it: the destination
/// connection ID the client chose (RFC 9000 section 7.2: at least 8 bytes, at most 20),
/// zero-padded, and its length. The client keeps it for every long-header packet until the
/// server's first answer gives it a connection ID of the server's (with the cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FirstFlightKey {
    pub dcid: [u8; quic::MAX_CID_LEN],
    pub dcid_len: u8,
    pub _pad: [u8; 3],
}

/// The layout of a QUIC packet the quic program reads, and of the cookie a QUIC server puts
/// in its connection IDs (docs/udp.md, "QUIC"). The same layout as nginx's `quic_bpf`: the
/// first 8 bytes of every connection ID the server issues are its socket's cookie
/// (`SO_COOKIE`), here in network byte order; the rest is the server's (random). A packet
/// whose destination connection ID starts with a cookie of the group goes to that socket,
/// whatever its room: only that handler has the connection's keys.
///
/// The cookie is in the clear: an observer can tell connections served by one socket apart
/// from others (RFC 9000 section 5.1 asks that connection IDs not be linkable; QUIC-LB's
/// encrypted layouts are the way to that, and are not implemented).
pub mod quic {
    /// Bytes of the cookie at the start of a connection ID.
    pub const COOKIE_LEN: usize = 8;
    /// The longest connection ID of QUIC version 1 (RFC 9000 section 17.2).
    pub const MAX_CID_LEN: usize = 20;
    /// The header form bit of a packet's first byte: set for a long header (Initial,
    /// 0-RTT, Handshake, Retry), clear for a short one (1-RTT).
    pub const LONG_HEADER: u8 = 0x80;
    /// From the start of the UDP payload: a short header's destination connection ID (its
    /// length is not in the packet: the server knows it; a cookie is its first 8 bytes).
    pub const SHORT_DCID: usize = 1;
    /// A long header's destination connection ID length byte, after the first byte and the
    /// 4-byte version.
    pub const LONG_DCID_LEN: usize = 5;
    /// A long header's destination connection ID.
    pub const LONG_DCID: usize = 6;

    /// Writes `cookie` into the first [`COOKIE_LEN`] bytes of `cid`, as the quic program
    /// reads it. `cid` must be at least [`COOKIE_LEN`] long.
    pub fn write_cookie(cookie: u64, cid: &mut [u8]) {
        cid[..COOKIE_LEN].copy_from_slice(&cookie.to_be_bytes());
    }

    /// The cookie a connection ID starts with (`None` when it is shorter than one).
    pub fn cookie(cid: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(cid.get(..COOKIE_LEN)?.try_into().ok()?))
    }

    /// The destination connection ID of a QUIC packet (the UDP payload), as the quic program
    /// finds it: a long header's as long as its length byte says, a short header's the
    /// [`COOKIE_LEN`] bytes the program reads. `None` when the packet is too short.
    pub fn destination_cid(packet: &[u8]) -> Option<&[u8]> {
        let first = *packet.first()?;
        if first & LONG_HEADER == 0 {
            return packet.get(SHORT_DCID..SHORT_DCID + COOKIE_LEN);
        }
        let len = *packet.get(LONG_DCID_LEN)? as usize;
        if len > MAX_CID_LEN {
            return None;
        }
        packet.get(LONG_DCID..LONG_DCID + len)
    }
}

/// `--flow-timeout`'s default: 30 s, the idle time-out most QUIC stacks default to and the
/// kernel's conntrack gives an unanswered UDP flow.
pub const DEFAULT_FLOW_TIMEOUT_SECONDS: f64 = 30.0;

/// `--flow-table`'s default (120 bytes of kernel memory each, `lru_table_bytes`: 7.5 MiB).
pub const DEFAULT_FLOW_TABLE: u32 = 65_536;

/// `--flow-table`'s most.
pub const MAX_FLOW_TABLE: u32 = 1 << 22;

/// What a socket must have free in its receive buffer to count as having room: a
/// datagram's truesize, not its payload, is charged (832 bytes for a 32-byte datagram on
/// loopback, 1,280 for 512 bytes, measured on 6.18), and on Linux 6.18 the kernel refuses a
/// datagram whose truesize does not fit (`rmem + truesize > rcvbuf`), while 6.1 and 6.12 still
/// take one while `rmem <= rcvbuf`. 4 KiB covers a full-size Ethernet datagram's truesize
/// with room to spare, so a socket with room takes the datagram on every kernel.
pub const DEFAULT_RESERVE: u32 = 4096;

/// How long a CPU that found no socket of its group with room skips the full scan (the
/// hash choice and one other at random are still read for every datagram): 1 ms. At 128
/// sockets a scan costs about 13 us (the `udp-cost` benchmark), so when every buffer is full
/// the scans take at most about 1.3 % of each CPU instead of all of it.
pub const FULL_MEMO_NS: u64 = 1_000_000;

/// What the program last learned about the socket at one position of the kernel's
/// `socks[]`: its address and slot, valid while `generation` is the CONFIG's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct UdpSlotCacheEntry {
    pub addr: u64,
    pub slot: u32,
    pub generation: u32,
}

counters! {
    /// Per-slot counters (per CPU in the kernel; userspace sums them).
    pub struct UdpSlotCounters {
        kept => ("kept", "Datagrams left on the kernel's hash choice, this socket, because its receive buffer had room."),
        steered_in => ("steered-in", "Datagrams sent to this socket (drawn as a second choice, or found with the most room) because their hash choice had no room."),
        steered_away => ("steered-away", "Datagrams hashed to this socket that went to another because its receive buffer had no room."),
        all_full => ("all-full", "Datagrams hashed to this socket while no socket of the group had room: left to the kernel's hash, which drops them if they do not fit (Udp RcvbufErrors)."),
        flows => ("flows", "Flow mode: flows placed on this socket (their first datagram, or the first after an idle time-out, is also counted by kept, steered-in or all-full). Quic mode: first flights (new destination connection IDs without a cookie), counted the same way."),
        flow_datagrams => ("flow-datagrams", "Flow mode: later datagrams of a flow placed on this socket, sent here whatever its room. Quic mode: later datagrams of a first flight."),
        cookie_datagrams => ("cookie-datagrams", "Quic mode: packets whose destination connection ID carried this socket's cookie, sent here whatever its room."),
    }
}

counters! {
    /// Internal errors. On each the program passes the datagram to the kernel's hash choice
    /// and counts the error here (per CPU; userspace sums them).
    pub struct UdpErrors, index enum UdpFailOpen {
        no_config / NoConfig => ("no-config", "The CONFIG element (or the quic program's per-CPU scratch element) was missing (the loader did not write it)."),
        read_failed / ReadFailed => ("read-failed", "A bpf_probe_read_kernel failed (bad offset or a racing teardown)."),
        bad_group / BadGroup => ("bad-group", "The group had no live socket or more than MAX_SOCKETS."),
        unknown_socket / UnknownSocket => ("unknown-socket", "A chosen socket's cookie was not in the slot map (a socket parsrv did not register joined the group)."),
        select_failed / SelectFailed => ("select-failed", "bpf_sk_select_reuseport refused the chosen slot."),
        flow_unread / FlowUnread => ("flow-unread", "Flow mode: the datagram's addresses could not be read; it was placed by room and not recorded."),
        flow_unrecorded / FlowUnrecorded => ("flow-unrecorded", "Flow mode: the flow table refused a new flow (kernel memory); its datagram was placed by room. Quic mode: the same for a first flight."),
        quic_unread / QuicUnread => ("quic-unread", "Quic mode: the datagram was too short for a QUIC header's connection ID; it was placed by room."),
    }
}

counters! {
    /// What the flow and quic programs did to their LRU table (per CPU in the kernel;
    /// userspace sums them). The kernel counts no evictions: `added` less the entries the
    /// table holds is how many it evicted (userspace deletes none).
    pub struct UdpTableCounters {
        added => ("added", "Entries the flow table (quic mode: the first-flight table) took for a key it did not hold: a new flow, or one the table had evicted. Less the entries it holds, the entries the kernel evicted, least recently used first, to make room: each such flow's next datagram is placed again."),
    }
}

impl UdpErrors {
    /// All errors: datagrams the kernel's hash placed because the program failed open.
    pub fn total(&self) -> u64 {
        self.values().iter().sum()
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], Pod (checked by bytemuck's derive), as aya requires of map values.
    unsafe impl aya::Pod for super::UdpConfig {}
    unsafe impl aya::Pod for super::UdpSlotCounters {}
    unsafe impl aya::Pod for super::UdpErrors {}
    unsafe impl aya::Pod for super::UdpTableCounters {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowEntry {}
    unsafe impl aya::Pod for super::FirstFlightKey {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::quic::*;

    #[test]
    fn a_cookie_written_into_a_connection_id_is_read_back_from_either_header() {
        let mut cid = [0xaa; 12];
        write_cookie(0x0102_0304_0506_0708, &mut cid);
        assert_eq!(&cid[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(cookie(&cid), Some(0x0102_0304_0506_0708));
        // 1-RTT: first byte 0b01xx_xxxx, then the connection ID.
        let short: Vec<u8> = [&[0x41][..], &cid, b"payload"].concat();
        assert_eq!(
            destination_cid(&short).and_then(cookie),
            Some(0x0102_0304_0506_0708)
        );
        // Handshake: first byte 0b1110_xxxx, version 1, length 12, the ID, then the source's.
        let long: Vec<u8> = [&[0xe0, 0, 0, 0, 1, 12][..], &cid, &[4, 9, 9, 9, 9]].concat();
        assert_eq!(destination_cid(&long), Some(&cid[..]));
    }

    #[test]
    fn short_or_overlong_headers_have_no_connection_id() {
        assert_eq!(destination_cid(&[]), None);
        assert_eq!(destination_cid(&[0x41, 1, 2, 3]), None);
        assert_eq!(destination_cid(&[0xc0, 0, 0, 0, 1]), None);
        let overlong: Vec<u8> = [&[0xc0, 0, 0, 0, 1, 21][..], &[0; 40]].concat();
        assert_eq!(destination_cid(&overlong), None);
        // A client's Initial with an 8-byte random ID carries no cookie of the group
        // (any 8 bytes read as some cookie; the program looks it up among the group's).
        assert_eq!(cookie(&[1, 2, 3]), None);
    }
}
