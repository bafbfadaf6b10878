//! The UDP flow program: the first datagram of each flow (4-tuple) is placed by room as the
//! datagram program places every datagram ([`udp_room::choose`]), and the flow's socket is
//! recorded in an LRU table; its later datagrams go to that socket whatever its room, until
//! the flow sends nothing for the group's idle time-out, when its next datagram is placed
//! again. For servers that keep state per client address and port (QUIC without connection
//! ids of its own, DTLS, game and media sessions), which the datagram program would split
//! between handlers as soon as a socket fills. Never SK_DROP, as the datagram program
//! (shared types and names: `parsrv_common::udp`; userspace: `parsrv::dataplane::udp`).
//!
//! A flow whose socket has no room stays: moving it would hand its datagrams to a handler
//! that has none of its state. A flow whose socket left the group (the selection fails) is
//! placed again.
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
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, sk_action::SK_PASS},
    cty::c_void,
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_skb_load_bytes, bpf_skb_load_bytes_relative},
    },
    macros::{map, sk_reuseport},
    maps::LruHashMap,
    programs::SkReuseportContext,
};
use parsrv_common::udp::{FlowEntry, FlowKey, UdpConfig, UdpFailOpen};

use udp_room::{apply, choose, count_error, Choice, Draw, UDP_CONFIG};
use udp_table::{follow, record};

/// Flows by 4-tuple. Userspace sizes it at load (`--flow-table`); beyond that the least
/// recently used are forgotten, and their next datagram is placed again.
#[map]
static UDP_FLOWS: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(1, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

#[sk_reuseport]
pub fn parsrv_flow(ctx: SkReuseportContext) -> u32 {
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

#[inline(always)]
fn steer(ctx: &SkReuseportContext, config: &UdpConfig) -> Result<(), UdpFailOpen> {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut key = FlowKey {
        source: [0; 16],
        destination: [0; 16],
        source_port: 0,
        destination_port: 0,
    };
    if read_flow(ctx, &mut key).is_err() {
        count_error(UdpFailOpen::FlowUnread);
        return place(ctx, config);
    }
    let mut replace = false;
    if let Some(entry) = UDP_FLOWS.get_ptr_mut(key) {
        // SAFETY: a value of the flow table; another CPU may write `last_ns` meanwhile,
        // which only ever moves it to another recent time.
        let entry = unsafe { &mut *entry };
        // Signed: another CPU that read the clock after this one may have written its time
        // already, and a flow seen a moment "later" is a live flow, not one idle for 2^64 ns.
        let idle = now.wrapping_sub(entry.last_ns) as i64;
        if idle < config.flow_idle_ns as i64 {
            entry.last_ns = now;
            if follow(ctx, entry.slot) {
                return Ok(());
            }
            // Its socket left the group (the slot is empty): placed again below.
        }
        replace = true;
    }
    let mut choice = Choice::UNKNOWN;
    choose(ctx, config, Draw::FromHash, &mut choice)?;
    record(ctx, &UDP_FLOWS, &key, &choice, now, replace)
}

/// Places one datagram by room without recording its flow.
#[inline(always)]
fn place(ctx: &SkReuseportContext, config: &UdpConfig) -> Result<(), UdpFailOpen> {
    let mut choice = Choice::UNKNOWN;
    choose(ctx, config, Draw::FromHash, &mut choice)?;
    apply(ctx, &choice)
}

/// Reads the datagram's 4-tuple into `key`. `ctx.data` starts at the UDP header; the
/// addresses are before it, at the network header.
#[inline(always)]
fn read_flow(ctx: &SkReuseportContext, key: &mut FlowKey) -> Result<(), ()> {
    let skb = ctx.md as *const c_void;
    // SAFETY: the helpers copy at most the given length into the given field of `key`.
    unsafe {
        let ports = core::ptr::addr_of_mut!(key.source_port) as *mut c_void;
        // source_port and destination_port are adjacent, as in the UDP header.
        if bpf_skb_load_bytes(skb, 0, ports, 4) != 0 {
            return Err(());
        }
        match u16::from_be(ctx.eth_protocol() as u16) {
            ETH_P_IP => {
                // saddr and daddr at 12 and 16, into the IPv4-mapped form.
                let mut addresses = [0u8; 8];
                if bpf_skb_load_bytes_relative(
                    skb,
                    12,
                    addresses.as_mut_ptr() as *mut c_void,
                    8,
                    BPF_HDR_START_NET,
                ) != 0
                {
                    return Err(());
                }
                key.source[10] = 0xff;
                key.source[11] = 0xff;
                key.source[12..16].copy_from_slice(&addresses[..4]);
                key.destination[10] = 0xff;
                key.destination[11] = 0xff;
                key.destination[12..16].copy_from_slice(&addresses[4..]);
            }
            ETH_P_IPV6 => {
                // saddr and daddr at 8 and 24, adjacent as in `key`.
                let addresses = core::ptr::addr_of_mut!(key.source) as *mut c_void;
                if bpf_skb_load_bytes_relative(skb, 8, addresses, 32, BPF_HDR_START_NET) != 0 {
                    return Err(());
                }
            }
            _ => return Err(()),
        }
    }
    Ok(())
}
