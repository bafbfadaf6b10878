//! The sk_lookup program: one group on several addresses (shared types:
//! `parsrv_common::lookup`).
//!
//! Attached to the network namespace, the kernel runs it for every new connection there,
//! before its own listener lookup, and for every address: it must pass what is not its
//! group's untouched. For an address and port of its group (LOOKUP_RULES):
//!
//! 1. While a socket bound to the requested listen entry has room, that entry keeps the
//!    connection: untouched if its sockets bind exactly the requested address and port (the
//!    kernel finds them), else handed to that socket.
//! 2. Otherwise the socket with most room bound to another entry of the group takes it.
//! 3. If every socket is full, the requested entry keeps it and its SK_REUSEPORT program
//!    applies `--when-full`.
//!
//! A socket is handed over with `bpf_sk_assign(flags 0)`: its reuseport group's SK_REUSEPORT
//! program then picks among that address's sockets, as for a connection to it. The accepted
//! connection's local address stays the one the client asked for.
//!
//! Queues are read as the SK_REUSEPORT program reads them ([`queue::listener`]), from the
//! socket the SOCKETS lookup returns (a reference, released at once).
//!
//! Its own object: a group on one address loads none of it. It shares the group's SOCKETS
//! and CONFIG with the reuseport object through their pins (see `sockets.rs`).
#![no_std]
#![no_main]

#[path = "../counting.rs"]
#[allow(dead_code)] // the rate limit (`due`) is the reuseport object's
mod counting;
#[path = "../queue.rs"]
#[allow(dead_code)] // the scan for most room is the reuseport object's
mod queue;
#[path = "../runtime.rs"]
mod runtime;
#[path = "../sockets.rs"]
mod sockets;

use aya_ebpf::{
    bindings::{bpf_sock, sk_action::SK_PASS},
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_map_lookup_elem, bpf_sk_release},
    macros::{map, sk_lookup},
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, PerCpuArray, SockMap,
    },
    programs::SkLookupContext,
};
use parsrv_common::{
    lookup::{
        AddressCounters, Rule, RuleKey, MAX_LISTENS, MAX_RULES, PORT_BITS, V4_MAPPED, V6_ONLY,
    },
    reuseport::{FailOpen, KernelOffsets, ProgramConfig, MAX_SOCKETS},
};

use crate::{
    counting::count,
    queue::{address_of_sock, listener},
    sockets::{CONFIG, SOCKETS},
};

#[map]
static LOOKUP_RULES: LpmTrie<RuleKey, Rule> = LpmTrie::with_max_entries(MAX_RULES, 0);

#[map]
static SLOT_LISTEN: Array<u32> = Array::with_max_entries(MAX_SOCKETS, 0);

#[map]
static ADDRESS_COUNTERS: PerCpuArray<AddressCounters> =
    PerCpuArray::with_max_entries(MAX_LISTENS, 0);

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn parsrv_lookup(ctx: SkLookupContext) -> u32 {
    // Never SK_DROP: an error leaves the connection to the kernel's own lookup.
    let _ = steer(&ctx);
    SK_PASS
}

#[inline(always)]
fn steer(ctx: &SkLookupContext) -> Result<(), FailOpen> {
    // Every field is read up front, whatever the family: the verifier allows only constant
    // offsets into the context, and reads in two branches get merged by LLVM into one load
    // at a computed offset.
    let lookup = ctx.lookup;
    // SAFETY: reads of the program's context fields, volatile so that each stays one load.
    let [protocol, family, port, ip4, ip6_0, ip6_1, ip6_2, ip6_3] = unsafe {
        use core::ptr::{addr_of, read_volatile};
        [
            read_volatile(addr_of!((*lookup).protocol)),
            read_volatile(addr_of!((*lookup).family)),
            read_volatile(addr_of!((*lookup).local_port)),
            read_volatile(addr_of!((*lookup).local_ip4)),
            read_volatile(addr_of!((*lookup).local_ip6[0])),
            read_volatile(addr_of!((*lookup).local_ip6[1])),
            read_volatile(addr_of!((*lookup).local_ip6[2])),
            read_volatile(addr_of!((*lookup).local_ip6[3])),
        ]
    };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let mut key = RuleKey {
        port: (port as u16).to_be_bytes(),
        addr: [0; 16],
    };
    if family == AF_INET {
        key.addr[..12].copy_from_slice(&V4_MAPPED);
        key.addr[12..].copy_from_slice(&ip4.to_ne_bytes());
    } else if family == AF_INET6 {
        key.addr[..4].copy_from_slice(&ip6_0.to_ne_bytes());
        key.addr[4..8].copy_from_slice(&ip6_1.to_ne_bytes());
        key.addr[8..12].copy_from_slice(&ip6_2.to_ne_bytes());
        key.addr[12..].copy_from_slice(&ip6_3.to_ne_bytes());
    } else {
        return Ok(());
    }
    let Some(rule) = LOOKUP_RULES.get(Key::new(PORT_BITS + 128, key)) else {
        // Not the group's: untouched.
        return Ok(());
    };
    let rule = *rule;
    let config = CONFIG.get(0).ok_or(FailOpen::NoConfig)?;
    let counted = rule.listen;

    // 1. A socket of the requested entry with room (the scan stops at the first).
    let own = scan(config, rule.listen + 1, family, Among::Own)?;
    if own.room_slot != NONE {
        count(&ADDRESS_COUNTERS, counted, |c| c.served += 1);
        if rule.bound == 0 {
            assign(ctx, own.room_slot);
        }
        return Ok(());
    }
    // 2. The socket with most room among the other entries'.
    let other = scan(config, rule.listen + 1, family, Among::Others)?;
    if other.room_slot != NONE {
        count(&ADDRESS_COUNTERS, counted, |c| c.moved_away += 1);
        count(&ADDRESS_COUNTERS, other.room_listen, |c| c.moved_in += 1);
        assign(ctx, other.room_slot);
        return Ok(());
    }
    // 3. Every socket full (or none at all).
    if own.any_slot == NONE && other.any_slot == NONE {
        count(&ADDRESS_COUNTERS, counted, |c| c.no_socket += 1);
        return Ok(());
    }
    count(&ADDRESS_COUNTERS, counted, |c| c.all_full += 1);
    if rule.bound == 0 {
        // Nothing is bound here: a socket of the entry (else of another) must take it for
        // its SK_REUSEPORT program to apply --when-full.
        let slot = if own.any_slot != NONE {
            own.any_slot
        } else {
            other.any_slot
        };
        assign(ctx, slot);
    }
    Ok(())
}

/// Hands the connection to the socket in `slot`; its reuseport group's program runs next.
#[inline(always)]
fn assign(ctx: &SkLookupContext, slot: u32) {
    // A failure (the socket left meanwhile) leaves the connection to the kernel's lookup.
    let _ = SOCKETS.redirect_sk_lookup(ctx, slot, 0);
}

/// Which sockets a scan looks at.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Among {
    /// Those of one listen entry; the scan stops at the first with room.
    Own,
    /// Those of every other entry; the scan looks at all for the one with most room.
    Others,
}

/// "No slot".
const NONE: u32 = u32::MAX;

/// A scan over the group's slots, under bpf_loop (see [`scan_slot`]). Its state lives in
/// this CPU's LOOKUP_SCRATCH, never on the caller's stack: the callback gets no context (the
/// rule in parsrv-ebpf's crate docs, "Verification cost").
#[repr(C)]
#[derive(Clone, Copy)]
struct Scan {
    off: KernelOffsets,
    /// The listen entry + 1 of the connection.
    tag: u32,
    /// The connection's family.
    family: u32,
    among: Among,
    /// The slot of the socket with most room (room > 0), its room and its entry, or NONE.
    room_slot: u32,
    room_listen: u32,
    room: i64,
    /// Some socket looked at, whatever its queue, or NONE.
    any_slot: u32,
}

#[map]
static LOOKUP_SCRATCH: PerCpuArray<Scan> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn scan(config: &ProgramConfig, tag: u32, family: u32, among: Among) -> Result<Scan, FailOpen> {
    let state = LOOKUP_SCRATCH.get_ptr_mut(0).ok_or(FailOpen::ReadFailed)?;
    // SAFETY: this CPU's scratch element; nothing else runs on this CPU until the program
    // returns. scan_slot has the callback signature bpf_loop expects and finds its state
    // itself.
    unsafe {
        *state = Scan {
            off: config.offsets,
            tag,
            family,
            among,
            room_slot: NONE,
            room_listen: 0,
            room: 0,
            any_slot: NONE,
        };
        bpf_loop(
            config.slots.min(MAX_SOCKETS),
            scan_slot as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
        Ok(*state)
    }
}

/// One slot of [`scan`]: 0 to go on, 1 to stop.
#[inline(never)]
extern "C" fn scan_slot(slot: u64, _unused: *mut c_void) -> i64 {
    let Some(scan) = LOOKUP_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch element, which scan filled before the loop.
    let scan = unsafe { &mut *scan };
    let slot = slot as u32;
    let Some(&value) = SLOT_LISTEN.get(slot) else {
        return 1;
    };
    let tag = value & !V6_ONLY;
    let own = tag == scan.tag;
    if tag == 0 || own != (scan.among == Among::Own) {
        return 0;
    }
    // SAFETY: a SOCKMAP lookup returns a referenced socket or null; it is released below on
    // every path.
    let sk = unsafe {
        bpf_map_lookup_elem(
            &SOCKETS as *const SockMap as *mut c_void,
            &slot as *const u32 as *const c_void,
        )
    } as *mut bpf_sock;
    if sk.is_null() {
        return 0;
    }
    // An IPv6 connection only to an IPv6 socket; an IPv4 one to an IPv4 socket or a
    // dual-stack IPv6 one.
    // SAFETY: a field of the socket the lookup returned.
    let sk_family = unsafe { (*sk).family };
    let fits = sk_family == scan.family || (sk_family == AF_INET6 && value & V6_ONLY == 0);
    if !fits {
        // SAFETY: the reference the lookup took.
        unsafe { bpf_sk_release(sk as *mut c_void) };
        return 0;
    }
    let seen = address_of_sock(sk).and_then(|addr| listener(addr, slot, &scan.off));
    // SAFETY: the reference the lookup took.
    unsafe { bpf_sk_release(sk as *mut c_void) };
    let Ok(seen) = seen else {
        return 0;
    };
    scan.any_slot = slot;
    if seen.room > 0 && (scan.room_slot == NONE || seen.room > scan.room) {
        scan.room_slot = slot;
        scan.room = seen.room;
        scan.room_listen = tag - 1;
        if own {
            return 1;
        }
    }
    0
}
