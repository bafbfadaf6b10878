//! The host dispatcher: a tc program on the host's interface towards the routers, for the
//! packets of the cluster's service address and port (shared types and the design:
//! `parsrv_common::cluster`). Every other packet passes untouched.
//!
//! tc rather than XDP: the packet stays an skb, so a locally generated packet's pending
//! checksum (CHECKSUM_PARTIAL) survives being sent out again, which native XDP_TX on veth
//! loses; and it needs no XDP program on the peer device.
//!
//! Its own object: a cluster agent loads it without any group's maps, and a group without
//! the cluster's.
#![no_std]
#![no_main]

// Shared with the steering object, whose rate limit (`due`) this object does not use.
#[path = "../counting.rs"]
#[allow(dead_code)]
mod counting;
#[path = "../runtime.rs"]
mod runtime;

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        BPF_F_CURRENT_NETNS, BPF_NOEXIST, TC_ACT_OK,
    },
    cty::c_void,
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_loop, bpf_redirect, bpf_sk_release, bpf_skc_lookup_tcp},
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
    EbpfContext,
};
use parsrv_common::cluster::{
    entry_flags, home_score, host_state, ClientEntry, ClusterConfig, Decision, DispatchCounters,
    Host, MAX_HOSTS,
};

use crate::counting::count;

#[map]
static CLUSTER_CONFIG: Array<ClusterConfig> = Array::with_max_entries(1, 0);

/// Sized by userspace (`table_size`); every map of the object is created for every group
/// too, so the object's own sizes stay small.
#[map]
static CLUSTER_CLIENTS: LruHashMap<[u8; 4], ClientEntry> = LruHashMap::with_max_entries(1, 0);

#[map]
static CLUSTER_HOSTS: Array<Host> = Array::with_max_entries(MAX_HOSTS + 1, 0);

#[map]
static CLUSTER_PEER_MACS: HashMap<[u8; 8], u16> = HashMap::with_max_entries(MAX_HOSTS, 0);

#[map]
static CLUSTER_DECISIONS: RingBuf = RingBuf::with_byte_size(4096, 0);

#[map]
static CLUSTER_COUNTERS: PerCpuArray<DispatchCounters> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_LISTEN: u32 = 10;

/// How often an entry's `last_seen_ns` is written at most: every packet writing it would
/// bounce its cache line between CPUs, and expiry counts in seconds.
const TOUCH_EVERY_NS: u64 = 1_000_000_000;

#[classifier]
pub fn parsrv_cluster(ctx: TcContext) -> i32 {
    dispatch(&ctx).unwrap_or(TC_ACT_OK)
}

/// The service's packet as the dispatcher needs it.
struct Packet {
    client: [u8; 4],
    tuple: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    /// A SYN without ACK: the packet opens a connection.
    opens: bool,
}

#[inline(always)]
fn dispatch(ctx: &TcContext) -> Result<i32, ()> {
    let config = CLUSTER_CONFIG.get(0).ok_or(())?;
    let Some(packet) = service_packet(ctx, config)? else {
        return Ok(TC_ACT_OK);
    };
    let this = config.this_host;
    // SAFETY: in bounds (checked by `at`); plain bytes.
    let source = unsafe { *at::<[u8; 6]>(ctx, 6).ok_or(())? };
    let mut peer_key = [0u8; 8];
    peer_key[..6].copy_from_slice(&source);
    let stored = CLUSTER_CLIENTS.get_ptr_mut(packet.client);
    // SAFETY: a plain value, copied.
    if let Some(&sender) = unsafe { CLUSTER_PEER_MACS.get(peer_key) } {
        // Another host's dispatcher sent it here. It is this host's (the entry that made
        // the peer send it may not have reached us yet), unless this host is the client's
        // locking dispatcher and the peer is not: then it came for the lock. A packet from
        // the locking dispatcher is always kept, so no packet is forwarded more than twice.
        // (The common case first: the entry names this host.)
        // SAFETY: a map value, read once.
        let ours = stored.is_some_and(|e| unsafe { (*e).host } == this);
        if ours || {
            let home = home(packet.client, config);
            home != this || sender == home
        } {
            tally(|c| c.from_peer += 1);
            return Ok(TC_ACT_OK);
        }
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(stored) = stored else {
        return without_entry(ctx, config, &packet, now);
    };
    // SAFETY: a map value; `last_seen_ns` is advisory, a lost update is harmless.
    let entry = unsafe {
        if now.wrapping_sub((*stored).last_seen_ns) > TOUCH_EVERY_NS {
            (*stored).last_seen_ns = now;
        }
        *stored
    };
    if entry.host == this {
        tally(|c| c.local += 1);
        return Ok(TC_ACT_OK);
    }
    let host = CLUSTER_HOSTS.get(entry.host as u32).ok_or(())?;
    if host.state == host_state::ABSENT {
        tally(|c| c.host_gone += 1);
        if packet.opens {
            // The client is decided again, from this connection on.
            let _ = CLUSTER_CLIENTS.remove(packet.client);
            return without_entry(ctx, config, &packet, now);
        }
        // Its host went silent: maybe only its agent died, and its dispatcher and handlers
        // serve on (no single point of failure), so its connections' packets still go there. If the host is
        // dead they are lost either way.
    }
    // Only a host whose own lock lost to an earlier one can have connections of a client
    // served elsewhere (the agent marks that entry): a socket lookup for those only.
    if !packet.opens && entry.flags & entry_flags::MAY_HAVE_OWN != 0 && open_here(ctx, &packet) {
        tally(|c| c.own_connection += 1);
        return Ok(TC_ACT_OK);
    }
    forward(ctx, config, entry.host)
}

/// A client without an entry: to its locking dispatcher, which locks and decides on a
/// packet that opens a connection.
#[inline(always)]
fn without_entry(
    ctx: &TcContext,
    config: &ClusterConfig,
    packet: &Packet,
    now: u64,
) -> Result<i32, ()> {
    let home = home(packet.client, config);
    if home != config.this_host && home != NO_HOST {
        tally(|c| c.to_home += 1);
        return forward(ctx, config, home);
    }
    if !packet.opens {
        tally(|c| c.no_entry += 1);
        return Ok(TC_ACT_OK);
    }
    match lock_and_decide(packet, config, now) {
        Some(entry) if entry.host != config.this_host => forward(ctx, config, entry.host),
        _ => Ok(TC_ACT_OK),
    }
}

/// No host (the tables are empty or every host is gone).
const NO_HOST: u16 = 0;

/// The client's locking dispatcher: of the hosts up, the one with the highest
/// [`home_score`].
#[inline(always)]
fn home(client: [u8; 4], config: &ClusterConfig) -> u16 {
    walk_hosts(config, client, home_step)
}

/// One host of [`home`] (id `index + 1`): 0 to go on, 1 to stop.
#[inline(never)]
extern "C" fn home_step(index: u64, _unused: *mut c_void) -> i64 {
    visit_host(index, |walk, id, host| {
        if host.state == host_state::ABSENT {
            return;
        }
        let score = home_score(walk.client, id as u16);
        // Ids rise, so `>=` gives a tie to the higher id.
        if walk.best == NO_HOST as u32 || score >= walk.best_score {
            walk.best = id;
            walk.best_score = score;
        }
    })
}

/// A step of [`walk_hosts`]: `visit` host `index + 1` with the walk's state. 0 to go on, 1
/// to stop (past the table).
#[inline(always)]
fn visit_host(index: u64, visit: impl FnOnce(&mut HostWalk, u32, &Host)) -> i64 {
    let id = index as u32 + 1;
    let (Some(walk), Some(host)) = (CLUSTER_SCRATCH.get_ptr_mut(0), CLUSTER_HOSTS.get(id)) else {
        return 1;
    };
    // SAFETY: this CPU's scratch element, filled by walk_hosts before the loop.
    visit(unsafe { &mut *walk }, id, host);
    0
}

/// The state of a walk over the hosts ([`home`], [`most_room`]), in this CPU's
/// CLUSTER_SCRATCH: never on the caller's stack, so the verifier checks each step once (the
/// rule in parsrv-ebpf's crate docs, "Verification cost").
#[repr(C)]
struct HostWalk {
    client: [u8; 4],
    /// The host found so far, or NO_HOST, and its score (home) or room (most_room).
    best: u32,
    best_score: u32,
    best_room: i32,
}

#[map]
static CLUSTER_SCRATCH: PerCpuArray<HostWalk> = PerCpuArray::with_max_entries(1, 0);

/// Runs `step` for hosts 1..=max_host under bpf_loop and returns the host it found.
#[inline(always)]
fn walk_hosts(
    config: &ClusterConfig,
    client: [u8; 4],
    step: extern "C" fn(u64, *mut c_void) -> i64,
) -> u16 {
    let Some(walk) = CLUSTER_SCRATCH.get_ptr_mut(0) else {
        return NO_HOST;
    };
    // SAFETY: this CPU's scratch element; nothing else runs on this CPU until the program
    // returns. `step` has the callback signature bpf_loop expects and finds its state itself.
    unsafe {
        *walk = HostWalk {
            client,
            best: NO_HOST as u32,
            best_score: 0,
            best_room: 0,
        };
        bpf_loop(
            (config.max_host as u32).min(MAX_HOSTS),
            step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
        (*walk).best as u16
    }
}

/// A pointer to a `T` at `offset` in the packet, if the packet's linear data holds it (the
/// verifier's bounds check).
#[inline(always)]
fn at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Bytes of an IPv4 TCP packet up to the TCP flags, without IP options.
const HEADERS: usize = ETH_HLEN + 20 + 14;

/// The packet's client and connection if it is TCP to the service address and port. Read
/// in place (direct packet access: a few loads, where a helper call per field costs more);
/// headers not in the linear data yet are pulled in first.
#[inline(always)]
fn service_packet(ctx: &TcContext, config: &ClusterConfig) -> Result<Option<Packet>, ()> {
    if at::<[u8; HEADERS]>(ctx, 0).is_none() {
        // Too short, or not linear: pull, and give up on a packet shorter than that.
        if ctx.pull_data(HEADERS as u32).is_err() {
            return Ok(None);
        }
    }
    let ip = at::<[u8; 20]>(ctx, ETH_HLEN).ok_or(())?;
    let proto = at::<[u8; 2]>(ctx, 12).ok_or(())?;
    // SAFETY: in bounds, checked by `at`; plain bytes.
    let (proto, ip) = unsafe { (*proto, *ip) };
    if u16::from_be_bytes(proto) != ETH_P_IP
        || ip[0] >> 4 != 4
        || ip[9] != IPPROTO_TCP
        || ip[16..20] != config.service_addr
    {
        return Ok(None);
    }
    let tcp = ETH_HLEN + ((ip[0] & 0x0f) as usize) * 4;
    if at::<[u8; 14]>(ctx, tcp).is_none() && ctx.pull_data((tcp + 14) as u32).is_err() {
        return Ok(None);
    }
    let header = at::<[u8; 14]>(ctx, tcp).ok_or(())?;
    // SAFETY: in bounds, checked by `at`.
    let header = unsafe { *header };
    if header[2..4] != config.service_port {
        return Ok(None);
    }
    let client = [ip[12], ip[13], ip[14], ip[15]];
    Ok(Some(Packet {
        client,
        tuple: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: u32::from_ne_bytes(client),
            daddr: u32::from_ne_bytes(config.service_addr),
            sport: u16::from_ne_bytes([header[0], header[1]]),
            dport: u16::from_ne_bytes([header[2], header[3]]),
        },
        opens: header[13] & (TCP_SYN | TCP_ACK) == TCP_SYN,
    }))
}

/// Places the client lock and decides in one step (the lock is placed
/// when there is no entry and no lock): an insert that fails if the client has an entry,
/// checked under the bucket's lock, so of two CPUs exactly one places it and the other
/// follows. The entry names the ready host with most room; the agent broadcasts it.
#[inline(always)]
fn lock_and_decide(packet: &Packet, config: &ClusterConfig, now: u64) -> Option<ClientEntry> {
    let Some(host) = most_room(config) else {
        tally(|c| c.no_host += 1);
        return None;
    };
    let entry = ClientEntry {
        host,
        locker: config.this_host,
        flags: 0,
        locked_ns: now,
        last_seen_ns: now,
    };
    if CLUSTER_CLIENTS
        .insert(packet.client, entry, BPF_NOEXIST as u64)
        .is_err()
    {
        tally(|c| c.lock_races += 1);
        // SAFETY: a plain value, copied.
        return unsafe { CLUSTER_CLIENTS.get(packet.client) }.copied();
    }
    tally(|c| c.locked += 1);
    // Taken until the host's next report, so the next new clients spread.
    if let Some(chosen) = CLUSTER_HOSTS.get_ptr_mut(host as u32) {
        // SAFETY: a map value; racing CPUs may lose a decrement: the figure is advisory
        // and replaced at the next report.
        unsafe { (*chosen).room -= 1 };
    }
    // If the ring is full the entry is not broadcast: the client's packets that reach
    // another host then find no entry there; a new connection there locks again, and the
    // earlier lock wins when both entries meet.
    let _ = CLUSTER_DECISIONS.output::<Decision>(
        &Decision {
            client: packet.client,
            _pad: 0,
            entry,
        },
        0,
    );
    Some(entry)
}

/// The ready host with most room (the lowest id on a tie).
#[inline(always)]
fn most_room(config: &ClusterConfig) -> Option<u16> {
    let best = walk_hosts(config, [0; 4], most_room_step);
    (best != NO_HOST).then_some(best)
}

/// One host of [`most_room`] (id `index + 1`): 0 to go on, 1 to stop.
#[inline(never)]
extern "C" fn most_room_step(index: u64, _unused: *mut c_void) -> i64 {
    visit_host(index, |walk, id, host| {
        if host.state == host_state::READY
            && (walk.best == NO_HOST as u32 || host.room > walk.best_room)
        {
            walk.best = id;
            walk.best_room = host.room;
        }
    })
}

/// Whether the packet belongs to a connection open (or opening, or closing) on this host:
/// the kernel's own lookup finds a socket other than a listener.
#[inline(always)]
fn open_here(ctx: &TcContext, packet: &Packet) -> bool {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 { ipv4: packet.tuple },
    };
    // SAFETY: the helper reads the IPv4 part of the tuple, whose size it is given; a socket
    // it returns is released before returning.
    unsafe {
        let sock = bpf_skc_lookup_tcp(
            ctx.as_ptr() as *mut c_void,
            &mut tuple,
            core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sock.is_null() {
            return false;
        }
        let state = (*sock).state;
        bpf_sk_release(sock as *mut c_void);
        state != TCP_LISTEN
    }
}

/// Sends the packet to `host` on the same segment: its MAC as destination, ours as source
/// (which tells its dispatcher the packet is its own), out of the interface it came in by.
#[inline(always)]
fn forward(ctx: &TcContext, config: &ClusterConfig, host: u16) -> Result<i32, ()> {
    let target = CLUSTER_HOSTS.get(host as u32).ok_or(())?;
    if target.mac == [0; 6] {
        // A host not heard from yet (an entry from a peer's table came first): its MAC is
        // unknown, so the local stack is the only place to go.
        tally(|c| c.no_host += 1);
        return Ok(TC_ACT_OK);
    }
    let macs = at::<[u8; 12]>(ctx, 0).ok_or(())?;
    // SAFETY: in bounds (checked by `at`), and tc programs may write the packet.
    unsafe {
        let macs = &mut *macs;
        macs[..6].copy_from_slice(&target.mac);
        macs[6..].copy_from_slice(&config.mac);
    }
    tally(|c| c.forwarded += 1);
    // SAFETY: a helper taking plain values; it answers TC_ACT_REDIRECT.
    Ok(unsafe { bpf_redirect(config.ifindex, 0) } as i32)
}

#[inline(always)]
fn tally(update: impl FnOnce(&mut DispatchCounters)) {
    count(&CLUSTER_COUNTERS, 0, update)
}
