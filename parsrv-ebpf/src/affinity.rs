//! Client affinity for the SK_REUSEPORT program: the client of a connection, and the dispatch
//! table that names each client's listener (shared types: `parsrv_common::reuseport::affinity`).
//!
//! Every CPU runs the program on its own, so the CPUs are parallel dispatchers sharing one
//! table. A client without an entry is placed with an insert that fails when the entry
//! exists (BPF_NOEXIST, checked under the hash bucket's lock): that insert is the client
//! lock. Of two CPUs deciding the same new client at once, exactly one insert succeeds; the
//! other CPU reads the winner's entry and follows it.

use aya_ebpf::{
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, BPF_ANY, BPF_NOEXIST},
    cty::c_void,
    helpers::generated::bpf_skb_load_bytes_relative,
    macros::map,
    maps::{LruHashMap, PerCpuArray},
    programs::SkReuseportContext,
    EbpfContext,
};
use parsrv_common::reuseport::{
    affinity::{AffinityConfig, AffinityCounters, ClientKey, DispatchEntry, V4_MAPPED_PREFIX},
    FailOpen,
};

use crate::counting::count;

/// Sized by userspace (`--affinity-table`); LRU, so a full table forgets its least recently
/// used clients rather than refusing new ones.
#[map]
static DISPATCH_TABLE: LruHashMap<ClientKey, DispatchEntry> = LruHashMap::with_max_entries(1, 0);

#[map]
static AFFINITY_COUNTERS: PerCpuArray<AffinityCounters> = PerCpuArray::with_max_entries(1, 0);

/// Counts one event of the dispatchers.
#[inline(always)]
pub fn tally(update: impl FnOnce(&mut AffinityCounters)) {
    count(&AFFINITY_COUNTERS, 0, update)
}

const ETH_P_IP: u32 = 0x0800u16.to_be() as u32;
const ETH_P_IPV6: u32 = 0x86ddu16.to_be() as u32;
const AF_INET: u32 = 2;
/// Where the source address lies in an IPv4 and an IPv6 header.
const IPV4_SADDR: u32 = 12;
const IPV6_SADDR: u32 = 8;

/// The client a connection comes from: the SYN's source address, or, when a connection
/// migrates off a closing listener (there may be no packet then), the migrating socket's
/// peer address; cut to the configured prefix.
#[inline(always)]
pub fn client_of(ctx: &SkReuseportContext, config: &AffinityConfig) -> Result<ClientKey, FailOpen> {
    let mut addr = [0u32; 4];
    if let Some(migrating) = ctx.migrating_sk() {
        // A request socket or an established child: both have the peer in sock_common.
        let sock = migrating.sock;
        // SAFETY: context reads of a PTR_TO_SOCK_COMMON the verifier allows (family and
        // the destination address, 4 bytes at a time). All of them, at constant offsets,
        // before choosing: with a branch, LLVM merges the two families' last read into one
        // at a computed offset, and the verifier refuses arithmetic on a socket pointer.
        let (family, peer4, peer6) = unsafe {
            let peer6 = &(*sock).dst_ip6;
            (
                core::ptr::read_volatile(&(*sock).family),
                core::ptr::read_volatile(&(*sock).dst_ip4),
                [
                    core::ptr::read_volatile(&peer6[0]),
                    core::ptr::read_volatile(&peer6[1]),
                    core::ptr::read_volatile(&peer6[2]),
                    core::ptr::read_volatile(&peer6[3]),
                ],
            )
        };
        if family == AF_INET {
            addr[..3].copy_from_slice(&V4_MAPPED_PREFIX);
            addr[3] = peer4;
        } else {
            addr = peer6;
        }
    } else {
        let (offset, words) = match ctx.eth_protocol() {
            ETH_P_IP => {
                addr[..3].copy_from_slice(&V4_MAPPED_PREFIX);
                (IPV4_SADDR, 3..4)
            }
            ETH_P_IPV6 => (IPV6_SADDR, 0..4),
            _ => return Err(FailOpen::NoClient),
        };
        let into = addr[words.clone()].as_mut_ptr();
        let len = (words.end - words.start) as u32 * 4;
        // SAFETY: copies `len` bytes of the network header into `addr[words]`.
        let rc = unsafe {
            bpf_skb_load_bytes_relative(
                ctx.as_ptr(),
                offset,
                into as *mut c_void,
                len,
                BPF_HDR_START_NET,
            )
        };
        if rc != 0 {
            return Err(FailOpen::NoClient);
        }
    }
    // An IPv4 client seen through an IPv6 socket is the same IPv4 client.
    if addr[..3] == V4_MAPPED_PREFIX {
        addr[3] &= config.mask_v4;
    } else {
        for (word, mask) in addr.iter_mut().zip(config.mask_v6) {
            *word &= mask;
        }
    }
    Ok(ClientKey { addr })
}

/// The client's entry, if it has one.
#[inline(always)]
pub fn entry_of(client: &ClientKey) -> Option<*mut DispatchEntry> {
    DISPATCH_TABLE.get_ptr_mut(client)
}

/// Places the client lock: records `entry` for a client that had none. `Err(())` when
/// another CPU placed the client's entry first.
#[inline(always)]
pub fn place(client: &ClientKey, entry: &DispatchEntry) -> Result<(), ()> {
    DISPATCH_TABLE
        .insert(client, entry, BPF_NOEXIST as u64)
        .map_err(|_| ())
}

/// Records `entry` for the client whatever it had (a move, or a client decided again).
#[inline(always)]
pub fn replace(client: &ClientKey, entry: &DispatchEntry) {
    // A failure leaves the old entry, which the next connection re-decides again.
    let _ = DISPATCH_TABLE.insert(client, entry, BPF_ANY as u64);
}

/// Forgets a client whose entry is stale or expired, so that its next decision takes the
/// client lock again.
#[inline(always)]
pub fn forget(client: &ClientKey) {
    let _ = DISPATCH_TABLE.remove(client);
}
