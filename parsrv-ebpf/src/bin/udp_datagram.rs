//! The UDP datagram program: for every datagram to a UDP group, keep the kernel's hash
//! choice while its receive buffer has room, else try one other socket at random, else
//! send the datagram to the socket with the most room; when none has room, leave it to the
//! kernel's hash and count it ([`udp_room::choose`]). Never SK_DROP: on UDP the kernel turns
//! a drop into an ICMP port unreachable (shared types and names: `parsrv_common::udp`;
//! userspace: `parsrv::dataplane::udp`). Its own object: a UDP group loads nothing of the
//! TCP program, nor of the flow program.
//!
//! The kernel runs it once per datagram (once per GRO train) and only while the best-scoring
//! socket is unconnected; a connected UDP socket of the group is matched before it runs.
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

use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_reuseport, programs::SkReuseportContext};
use parsrv_common::udp::UdpFailOpen;

use udp_room::{apply, choose, count_error, Choice, Draw, UDP_CONFIG};

#[sk_reuseport]
pub fn parsrv_datagram(ctx: SkReuseportContext) -> u32 {
    let result = match UDP_CONFIG.get(0) {
        Some(config) => {
            let mut choice = Choice::UNKNOWN;
            choose(&ctx, config, Draw::Random, &mut choice).and_then(|()| apply(&ctx, &choice))
        }
        None => Err(UdpFailOpen::NoConfig),
    };
    if let Err(error) = result {
        count_error(error);
    }
    // Whatever happened: on UDP a drop would be answered with an ICMP port unreachable.
    SK_PASS
}
