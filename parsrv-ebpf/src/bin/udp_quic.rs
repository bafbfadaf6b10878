//! The UDP quic program, for QUIC servers: a packet whose destination connection ID starts
//! with the cookie of one of the group's sockets goes to that socket, whatever its room, since
//! only that handler has the connection's keys (the layout: `parsrv_common::udp::quic`). A
//! long-header packet without one is of a connection's first flight (the client's Initial,
//! which can span several datagrams, and 0-RTT): it is placed by room as the datagram
//! program places a datagram ([`udp_room::choose`]), and its destination connection ID,
//! which the client keeps until the server answers, is recorded in an LRU table, so that
//! the rest of the flight follows it until the ID is idle for the group's time-out. A
//! short-header packet without a cookie of the group (a connection this group does not
//! know) is placed by room. Never SK_DROP, as the other UDP programs (userspace:
//! `parsrv::dataplane::udp`).
#![no_std]
#![no_main]

// `due` is for the TCP program's log, which this one does not keep.
#[allow(dead_code)]
#[path = "../counting.rs"]
mod counting;
#[path = "../runtime.rs"]
mod runtime;
#[path = "../udp_room.rs"]
mod udp_room;
#[path = "../udp_table.rs"]
mod udp_table;

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    cty::c_void,
    helpers::{bpf_ktime_get_ns, generated::bpf_skb_load_bytes},
    macros::{map, sk_reuseport},
    maps::{LruHashMap, PerCpuArray},
    programs::SkReuseportContext,
};
use parsrv_common::udp::{
    quic::{COOKIE_LEN, LONG_DCID, LONG_DCID_LEN, LONG_HEADER, MAX_CID_LEN, SHORT_DCID},
    FirstFlightKey, FlowEntry, UdpConfig, UdpFailOpen,
};

use counting::count;
use udp_room::{
    apply, choose, count_error, select, Choice, Draw, NO_SLOT, UDP_CONFIG, UDP_SLOT_BY_COOKIE,
    UDP_SLOT_COUNTERS,
};
use udp_table::{follow, record};

/// First flights by destination connection ID. Userspace sizes it at load (`--flow-table`);
/// beyond that the least recently used are forgotten.
#[map]
static UDP_FIRST_FLIGHTS: LruHashMap<FirstFlightKey, FlowEntry> =
    LruHashMap::with_max_entries(1, 0);

/// Per CPU: what [`find`] read and decided. In a map value, not on the stack: the verifier
/// tracks stack bytes and registers, and each of find's outcomes then reached [`choose`] in a
/// state of its own, so it walked the scan once for each (53,408 insns processed on 6.18
/// instead of about 9,000); it does not track a map value's bytes.
#[repr(C)]
struct Scratch {
    key: FirstFlightKey,
    cookie: [u8; COOKIE_LEN],
    found: u32,
    dcid_len: u8,
    first: u8,
    _pad: [u8; 2],
}

#[map]
static QUIC_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The UDP header, before the QUIC packet: `ctx.data` starts at the UDP header.
const UDP_HEADER: u32 = 8;

#[sk_reuseport]
pub fn parsrv_quic(ctx: SkReuseportContext) -> u32 {
    let result = match UDP_CONFIG.get(0) {
        Some(config) => steer(&ctx, config),
        None => Err(UdpFailOpen::NoConfig),
    };
    if let Err(error) = result {
        count_error(error);
    }
    // Whatever happened: on UDP a drop would be answered with an ICMP port unreachable.
    SK_PASS
}

// What [`find`] made of a packet (`Scratch::found`).
/// Sent to its socket (by its cookie, or as the rest of a recorded first flight).
const FOLLOWED: u32 = 0;
/// A first flight's first packet (or the first after its idle time-out): placed by room,
/// then recorded.
const NEW_FLIGHT: u32 = 1;
/// The same, replacing an expired or orphaned entry.
const EXPIRED_FLIGHT: u32 = 2;
/// Anything else: placed by room, not recorded.
const OTHER: u32 = 3;

/// One call of [`choose`] for every path that places by room: each call site is the whole
/// scan again for the verifier.
#[inline(always)]
fn steer(ctx: &SkReuseportContext, config: &UdpConfig) -> Result<(), UdpFailOpen> {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(scratch) = QUIC_SCRATCH.get_ptr_mut(0) else {
        return Err(UdpFailOpen::NoConfig);
    };
    // SAFETY: this CPU's element; nothing else runs on this CPU meanwhile.
    let scratch = unsafe { &mut *scratch };
    scratch.found = OTHER;
    find(ctx, config, scratch, now);
    let found = scratch.found;
    if found == FOLLOWED {
        return Ok(());
    }
    let mut choice = Choice::UNKNOWN;
    choose(ctx, config, Draw::FromHash, &mut choice)?;
    if found != NEW_FLIGHT && found != EXPIRED_FLIGHT {
        return apply(ctx, &choice);
    }
    record(
        ctx,
        &UDP_FIRST_FLIGHTS,
        &scratch.key,
        &choice,
        now,
        found == EXPIRED_FLIGHT,
    )
}

/// Reads the packet's header: follows a cookie of the group, or a recorded first flight
/// (filling `scratch.key`), and says in `scratch.found` what happened or how to place it
/// (left [`OTHER`] on every early return).
#[inline(always)]
fn find(ctx: &SkReuseportContext, config: &UdpConfig, scratch: &mut Scratch, now: u64) {
    if load(
        ctx,
        UDP_HEADER,
        &mut scratch.first as *mut u8 as *mut c_void,
        1,
    )
    .is_err()
    {
        count_error(UdpFailOpen::QuicUnread);
        return;
    }
    let long = scratch.first & LONG_HEADER != 0;
    let dcid = if long { LONG_DCID } else { SHORT_DCID } as u32;
    // A long header's ID may be shorter than a cookie (then it is no cookie of ours).
    scratch.dcid_len = COOKIE_LEN as u8;
    if long
        && load(
            ctx,
            UDP_HEADER + LONG_DCID_LEN as u32,
            &mut scratch.dcid_len as *mut u8 as *mut c_void,
            1,
        )
        .is_err()
    {
        count_error(UdpFailOpen::QuicUnread);
        return;
    }
    let dcid_len = scratch.dcid_len;
    if dcid_len as usize >= COOKIE_LEN
        && load(
            ctx,
            UDP_HEADER + dcid,
            scratch.cookie.as_mut_ptr() as *mut c_void,
            COOKIE_LEN as u32,
        )
        .is_ok()
    {
        // Not counted when there is none: most such lookups are of a client's random ID.
        // SAFETY: plain u32 values, copied out at once.
        let slot = unsafe { UDP_SLOT_BY_COOKIE.get(u64::from_be_bytes(scratch.cookie)) }
            .copied()
            .unwrap_or(NO_SLOT);
        if slot != NO_SLOT && select(ctx, slot).is_ok() {
            count(&UDP_SLOT_COUNTERS, slot, |c| c.cookie_datagrams += 1);
            scratch.found = FOLLOWED;
            return;
        }
        // No socket of the group has that cookie (a client's random ID, or a socket that
        // left the group).
    }
    if !long || dcid_len as usize > MAX_CID_LEN {
        return;
    }
    // All 20 bytes at once (an Initial is at least 1,200 bytes long; a shorter 0-RTT packet
    // is placed by room), then the bytes past the ID's length cleared.
    if load(
        ctx,
        UDP_HEADER + LONG_DCID as u32,
        scratch.key.dcid.as_mut_ptr() as *mut c_void,
        MAX_CID_LEN as u32,
    )
    .is_err()
    {
        count_error(UdpFailOpen::QuicUnread);
        return;
    }
    for i in 0..MAX_CID_LEN {
        if i >= dcid_len as usize {
            scratch.key.dcid[i] = 0;
        }
    }
    scratch.key.dcid_len = dcid_len;
    scratch.key._pad = [0; 3];
    // By reference: by value, the key is copied to the stack, which the verifier tracks.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let Some(entry) = UDP_FIRST_FLIGHTS.get_ptr_mut(&scratch.key) else {
        scratch.found = NEW_FLIGHT;
        return;
    };
    // SAFETY: a value of the table; another CPU may write `last_ns` meanwhile, which only
    // ever moves it to another recent time.
    let entry = unsafe { &mut *entry };
    // Signed, as in the flow program: a time another CPU wrote a moment later is recent.
    let idle = now.wrapping_sub(entry.last_ns) as i64;
    if idle < config.flow_idle_ns as i64 {
        entry.last_ns = now;
        if follow(ctx, entry.slot) {
            scratch.found = FOLLOWED;
            return;
        }
        // Its socket left the group: placed again.
    }
    scratch.found = EXPIRED_FLIGHT;
}

/// Copies `len` bytes of the packet from `offset` (from the UDP header) to `to`.
#[inline(always)]
fn load(ctx: &SkReuseportContext, offset: u32, to: *mut c_void, len: u32) -> Result<(), ()> {
    // SAFETY: the helper copies at most `len` bytes into `to`, which the callers size.
    if unsafe { bpf_skb_load_bytes(ctx.md as *const c_void, offset, to, len) } == 0 {
        Ok(())
    } else {
        Err(())
    }
}
