//! Client affinity in the SK_REUSEPORT program (eBPF side: `parsrv-ebpf/src/affinity.rs`,
//! userspace: `parsrv::dataplane::affinity`), in the design's terms: the program on each
//! CPU is a dispatcher; DISPATCH_TABLE is their shared dispatch table, one entry per client
//! naming the listener chosen for it; the first connection of a client that has no entry
//! places one with an insert that fails if another CPU placed it first (the client lock), and
//! the loser follows the winner's entry.

use bytemuck::{Pod, Zeroable};

/// Whether a group keeps clients on one handler (`ProgramConfig::affinity.mode`).
pub mod mode {
    /// Every connection is steered on its own.
    pub const NONE: u32 = 0;
    /// Every connection of a client goes to the listener its entry names.
    pub const CLIENT: u32 = 1;
}

/// What happens to a client's connection when the listener its entry names cannot take it.
pub mod when_full {
    /// The socket with most room takes it, and the client's entry moves there.
    pub const MOVE: u32 = 0;
    /// The client waits for its listener: the SYN goes to it and the kernel drops it (or the
    /// program refuses it with `when-full refuse`).
    pub const KEEP: u32 = 1;
}

/// Entries the dispatch table holds by default (120 bytes each in the kernel, see
/// [`lru_table_bytes`], all allocated when the group starts: LRU maps are preallocated).
pub const DEFAULT_TABLE_SIZE: u32 = 65_536;

/// The most entries parsrv lets a dispatch table have: 4,194,304 clients, 512 MiB of locked
/// kernel memory ([`lru_table_bytes`]). The kernel would take 2^27 (16 GiB, allocated at
/// once): one digit too many in a config file should be refused, not take the machine.
pub const MAX_TABLE_SIZE: u32 = 1 << 22;

/// Kernel memory a preallocated (LRU) hash map of `entries` takes, as the kernel counts it
/// (`htab_map_mem_usage`, the `memlock` of its fdinfo): per entry a 48-byte `htab_elem`
/// header with the key and the value each rounded up to 8 bytes, plus a 16-byte bucket per
/// entry rounded up to a power of two.
pub fn lru_table_bytes(entries: u32, key_size: usize, value_size: usize) -> u64 {
    const HTAB_ELEM: u64 = 48;
    const BUCKET: u64 = 16;
    let round8 = |n: usize| n.div_ceil(8) as u64 * 8;
    let element = HTAB_ELEM + round8(key_size) + round8(value_size);
    entries as u64 * element + (entries.next_power_of_two() as u64) * BUCKET
}

/// The first three words of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), as the address
/// lies in memory: IPv4 clients are keyed so, so one key type serves both families and a
/// dual-stack socket's IPv4 clients are the same clients whichever way they arrive.
pub const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

/// A client: its source address cut to the configured prefix, words in network byte order
/// as they lie in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ClientKey {
    pub addr: [u32; 4],
}

/// The listener a client's connections go to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DispatchEntry {
    /// The listener's `struct sock *`, to read its queue without looking for it.
    pub socket: u64,
    /// Its socket cookie: the entry holds only while SLOT_BY_COOKIE maps this cookie to
    /// `slot` (a socket replaced or removed is noticed and the client re-decided).
    pub cookie: u64,
    /// When the entry was placed or last moved (CLOCK_MONOTONIC, ns).
    pub decided_ns: u64,
    /// When a connection of the client last used it; an entry idle longer than the
    /// time-out is expired and the client decided again.
    pub last_seen_ns: u64,
    pub slot: u32,
    /// The membership generation (`ProgramConfig::generation`) at which `cookie` was last
    /// found registered under `slot`: while it is current, the entry holds without checking.
    pub generation: u32,
}

impl DispatchEntry {
    /// How long the client has been idle at `now`. Another CPU may have refreshed
    /// `last_seen_ns` with a clock it read after ours (it placed the entry between our
    /// clock read and our lookup): such an entry is not idle at all, not idle for 2^64 ns.
    #[inline(always)]
    pub fn idle_ns(&self, now: u64) -> u64 {
        now.saturating_sub(self.last_seen_ns)
    }
}

/// The affinity settings, part of `ProgramConfig`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AffinityConfig {
    /// One of [`mode`].
    pub mode: u32,
    /// One of [`when_full`].
    pub when_full: u32,
    /// Idle time after which a client's entry expires, ns.
    pub timeout_ns: u64,
    /// Masks of the client prefix, as they lie in memory: IPv6 (all four words) and IPv4
    /// (the last word of a mapped address).
    pub mask_v6: [u32; 4],
    pub mask_v4: u32,
    pub _reserved: u32,
}

impl AffinityConfig {
    /// Masks that keep the first `v4_len` bits of an IPv4 address and `v6_len` of an IPv6
    /// one.
    pub fn masks(v4_len: u8, v6_len: u8) -> (u32, [u32; 4]) {
        let v4 = u32::MAX
            .checked_shl(32 - u32::from(v4_len.min(32)))
            .unwrap_or(0);
        let v6 = u128::MAX
            .checked_shl(128 - u32::from(v6_len.min(128)))
            .unwrap_or(0);
        let bytes = v6.to_be_bytes();
        let word = |i: usize| u32::from_ne_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
        (
            u32::from_ne_bytes(v4.to_be_bytes()),
            [word(0), word(1), word(2), word(3)],
        )
    }
}

counters! {
    /// What the dispatchers did (per CPU in the kernel; userspace sums them).
    pub struct AffinityCounters {
        hits => ("hits", "Connections that followed their client's entry in the dispatch table."),
        new_clients => ("new", "Clients without an entry whose first connection placed one (took the client lock)."),
        lock_races => ("races", "First connections of a client that lost the client lock to another CPU deciding the same client at the same time, and followed the winner's entry."),
        moved => ("moved", "Entries moved to another socket because the client's own was full (affinity-when-full move)."),
        waited => ("waited", "Connections held for their client's full socket (affinity-when-full keep): dropped for a retransmit, or refused."),
        expired => ("expired", "Entries found idle for longer than the time-out, and the client decided again."),
        stale => ("stale", "Entries whose socket had left the group (removed or replaced), and the client decided again."),
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], Pod (checked by bytemuck's derive), as aya requires.
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::DispatchEntry {}
    unsafe impl aya::Pod for super::AffinityCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(words: [u32; 4]) -> [u8; 16] {
        bytemuck::cast(words)
    }

    #[test]
    fn masks_keep_the_prefix_bytes_in_packet_order() {
        let (v4, v6) = AffinityConfig::masks(24, 64);
        assert_eq!(v4.to_ne_bytes(), [255, 255, 255, 0]);
        assert_eq!(bytes(v6), [[255; 8], [0; 8]].concat()[..]);
        let (v4, v6) = AffinityConfig::masks(32, 128);
        assert_eq!((v4, v6), (u32::MAX, [u32::MAX; 4]));
        let (v4, v6) = AffinityConfig::masks(0, 0);
        assert_eq!((v4, v6), (0, [0; 4]));
        let (_, v6) = AffinityConfig::masks(32, 60);
        assert_eq!(bytes(v6)[7], 0xf0);
    }

    #[test]
    fn an_entry_refreshed_by_a_later_clock_is_not_idle() {
        let entry = DispatchEntry {
            last_seen_ns: 1_000,
            ..Default::default()
        };
        assert_eq!(entry.idle_ns(1_500), 500);
        // Placed by another CPU after this one read its clock: idle 0, not expired.
        assert_eq!(entry.idle_ns(999), 0);
    }

    #[test]
    fn the_mapped_prefix_is_ffff_in_memory() {
        let mut words = [0; 4];
        words[..3].copy_from_slice(&V4_MAPPED_PREFIX);
        assert_eq!(
            &bytes(words)[..12],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
        );
    }
}
