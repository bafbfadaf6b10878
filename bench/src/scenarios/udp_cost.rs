//! `udp-cost`: the UDP programs' run time per datagram (bpf_stats), the datagram program on
//! its three paths and the flow program on two, per socket count, and the send rate of a
//! loopback client with each against a plain SO_REUSEPORT group of the same sockets (on
//! loopback the kernel delivers a datagram inside the sender's sendto(), so the program's
//! cost lands on the sender).
//!
//! - `room`: every buffer has room, so every datagram stays on its hash choice after one
//!   socket is read (the fast path);
//! - `one-stalled`: socket 0's small buffer is full, so the datagrams hashed to it (1/N) make
//!   the program scan every socket for the one with most room;
//! - `all-full`: every buffer is full, so every datagram scans every socket, finds none with
//!   room and is left to the kernel's hash (the worst case);
//! - `flow, room` and `flow, one-stalled`: the flow program (`--udp-mode flow`) on the same
//!   buffers as `room` and `one-stalled`: each flow's first datagram placed by room and
//!   recorded, the other 39 of 40 sent where the flow table says.
//! - `quic, cookie`: the quic program (`--udp-mode quic`), every buffer with room, each
//!   client sending short-header packets whose destination connection ID starts with the
//!   cookie of one socket (client i: socket i mod N), as a server's connections do: each
//!   sent to its socket by the cookie's lookup;
//! - `quic, first flight`: the same program, each client sending long-header (Initial)
//!   packets with a random destination connection ID of its own: the first placed by room
//!   and recorded, the other 39 of 40 sent where the first-flight table says. 64-byte
//!   packets: the program reads the header only (a real Initial is 1,200 bytes or more).

use std::{collections::BTreeMap, time::Instant};

use parsrv::{dataplane::udp::UdpSettings, quic::COOKIE_LEN, spec::UdpMode};
use parsrv_integration_tests::{
    send_datagrams, send_payloads, steer_udp_with, udp_group, LARGE_BUFFER, SMALL_BUFFER,
};

use crate::{
    report::{Report, Table},
    stats::{median, spread},
};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    Plain,
    Room,
    OneStalled,
    AllFull,
    FlowRoom,
    FlowOneStalled,
    QuicCookie,
    QuicFirstFlight,
}

impl Case {
    const ALL: [Case; 8] = [
        Case::Plain,
        Case::Room,
        Case::OneStalled,
        Case::AllFull,
        Case::FlowRoom,
        Case::FlowOneStalled,
        Case::QuicCookie,
        Case::QuicFirstFlight,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::Plain => "plain SO_REUSEPORT, room",
            Case::Room => "room",
            Case::OneStalled => "one-stalled",
            Case::AllFull => "all-full",
            Case::FlowRoom => "flow, room",
            Case::FlowOneStalled => "flow, one-stalled",
            Case::QuicCookie => "quic, cookie",
            Case::QuicFirstFlight => "quic, first flight",
        }
    }

    /// The program the case runs (None: plain SO_REUSEPORT).
    fn settings(self) -> Option<UdpSettings> {
        match self {
            Case::Plain => None,
            Case::Room | Case::OneStalled | Case::AllFull => Some(UdpSettings::datagram()),
            Case::FlowRoom | Case::FlowOneStalled => Some(UdpSettings::flow(
                std::time::Duration::from_secs(60),
                parsrv::spec::DEFAULT_FLOW_TABLE,
            )),
            Case::QuicCookie | Case::QuicFirstFlight => Some(UdpSettings {
                mode: UdpMode::Quic,
                ..UdpSettings::flow(
                    std::time::Duration::from_secs(60),
                    parsrv::spec::DEFAULT_FLOW_TABLE,
                )
            }),
        }
    }

    fn buffers(self, n: usize) -> Vec<usize> {
        match self {
            Case::Plain
            | Case::Room
            | Case::FlowRoom
            | Case::QuicCookie
            | Case::QuicFirstFlight => vec![LARGE_BUFFER; n],
            Case::OneStalled | Case::FlowOneStalled => {
                let mut buffers = vec![LARGE_BUFFER; n];
                buffers[0] = SMALL_BUFFER;
                buffers
            }
            Case::AllFull => vec![SMALL_BUFFER; n],
        }
    }
}

/// One round of one case: ns per program run (None without the program), datagrams sent
/// per second.
type Sample = (Option<f64>, f64);

pub fn udp_cost(report: &mut Report, quick: bool) {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let was = std::fs::read_to_string(STATS).unwrap_or_default();
    let _ = std::fs::write(STATS, "1");
    let sizes: &[usize] = if quick { &[4] } else { &[4, 32, 128] };
    let rounds = if quick { 1 } else { 5 };
    // 256 flows x 40: 10,240 datagrams (12 MB of truesize: fits a large buffer unread).
    let (flows, per_flow) = if quick { (64, 10) } else { (256, 40) };
    let datagrams = (flows * per_flow) as f64;
    let mut runs: BTreeMap<(usize, Case), Vec<Sample>> = BTreeMap::new();
    for &n in sizes {
        for round in 0..rounds {
            // Every case once per round, the order rotated each round.
            let mut order = Case::ALL.to_vec();
            order.rotate_left(round % Case::ALL.len());
            for case in order {
                let (sockets, addr) = udp_group(&case.buffers(n));
                let steering = case.settings().map(|s| steer_udp_with(&sockets, s));
                let before = steering.as_ref().map(|s| s.run_stats().unwrap());
                let cookies: Vec<u64> = sockets
                    .iter()
                    .map(|s| parsrv::quic::socket_cookie(s).unwrap())
                    .collect();
                let start = Instant::now();
                match case {
                    Case::QuicCookie => send_payloads(addr, flows, per_flow, |flow, _| {
                        short_header(cookies[flow % cookies.len()], flow)
                    }),
                    Case::QuicFirstFlight => {
                        send_payloads(addr, flows, per_flow, |flow, _| initial(flow))
                    }
                    _ => send_datagrams(addr, flows, per_flow),
                }
                let rate = datagrams / start.elapsed().as_secs_f64();
                if let Some(steering) = &steering {
                    on_its_path(case, steering, n, flows, per_flow);
                }
                let ns = steering.as_ref().zip(before).map(|(s, before)| {
                    let after = s.run_stats().unwrap();
                    (after.run_time_ns - before.run_time_ns) as f64
                        / (after.run_count - before.run_count).max(1) as f64
                });
                runs.entry((n, case)).or_default().push((ns, rate));
            }
        }
    }
    let _ = std::fs::write(STATS, was.trim());
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &n in sizes {
        let plain_rate = median(runs[&(n, Case::Plain)].iter().map(|s| s.1).collect());
        for case in Case::ALL {
            let samples = &runs[&(n, case)];
            let ns: Vec<f64> = samples.iter().filter_map(|s| s.0).collect();
            let rate: Vec<f64> = samples.iter().map(|s| s.1).collect();
            rows.push(vec![
                n.to_string(),
                case.name().into(),
                if ns.is_empty() {
                    "-".into()
                } else {
                    spread(&ns, 0)
                },
                spread(&rate, 0),
                format!("{:.3}", median(rate.clone()) / plain_rate),
            ]);
        }
        let room = median(runs[&(n, Case::Room)].iter().map(|s| s.1).collect());
        let flow_room = median(runs[&(n, Case::FlowRoom)].iter().map(|s| s.1).collect());
        let quic_cookie = median(runs[&(n, Case::QuicCookie)].iter().map(|s| s.1).collect());
        notes.push(format!(
            "{n} sockets: send rate, every buffer with room / plain SO_REUSEPORT: datagram mode {:.3}, flow mode {:.3}, quic mode by cookie {:.3} (medians; the plain group's 32-byte datagrams against the quic rows' 32-byte short-header packets).",
            room / plain_rate,
            flow_room / plain_rate,
            quic_cookie / plain_rate
        ));
    }
    notes.push("An empty SK_REUSEPORT program costs about 100 ns per run under bpf_stats on this machine (bench/README.md, Cost of the program).".into());
    report.table(
        &Table {
            name: "udp-cost",
            title: format!("udp-cost: the UDP programs' run time per datagram (kernel.bpf_stats_enabled) and a loopback sender's rate, {flows} flows x {per_flow} datagrams of 32 bytes, {rounds} rounds in rotating order"),
            columns: vec!["sockets", "case", "ns per run, median (min-max)", "datagrams/s sent, median (min-max)", "rate / plain"],
            rows,
        },
        &notes,
    );
}

/// A 32-byte QUIC short-header (1-RTT) packet to the connection whose ID starts with
/// `cookie`, then 8 bytes naming `flow` (a server's IDs are the cookie, then random bytes).
fn short_header(cookie: u64, flow: usize) -> Vec<u8> {
    let mut packet = vec![0u8; 32];
    // Header form 0 (short), fixed bit 1.
    packet[0] = 0x40;
    parsrv::quic::write_cookie(cookie, &mut packet[1..1 + COOKIE_LEN]);
    packet[1 + COOKIE_LEN..1 + 2 * COOKIE_LEN].copy_from_slice(&(flow as u64).to_be_bytes());
    packet
}

/// A 64-byte QUIC long-header Initial packet (version 1) whose 8-byte destination
/// connection ID is the client's own (from `flow`, never a cookie of the group: the first
/// byte is 0xff, and cookies are small counters), with no source ID.
fn initial(flow: usize) -> Vec<u8> {
    let mut packet = vec![0u8; 64];
    // Header form 1 (long), fixed bit 1, type Initial (0).
    packet[0] = 0xc0;
    packet[1..5].copy_from_slice(&1u32.to_be_bytes());
    packet[5] = 8;
    packet[6..14].copy_from_slice(&(0xff00_0000_0000_0000 | flow as u64).to_be_bytes());
    packet[14] = 0;
    packet
}

/// Panics unless the quic program took the path its case measures: every packet by its
/// cookie, or every first flight placed once and followed after.
fn on_its_path(
    case: Case,
    steering: &parsrv::dataplane::udp::DatagramSteering,
    n: usize,
    flows: usize,
    per_flow: usize,
) {
    let counters = steering.slot_counters(n as u32).unwrap();
    let (mut cookie, mut placed, mut followed) = (0, 0, 0);
    for c in &counters {
        cookie += c.cookie_datagrams;
        placed += c.flows;
        followed += c.flow_datagrams;
    }
    let (total, flows, per_flow) = ((flows * per_flow) as u64, flows as u64, per_flow as u64);
    match case {
        Case::QuicCookie => assert_eq!(cookie, total, "quic, cookie: not every packet by cookie"),
        Case::QuicFirstFlight => assert_eq!(
            (placed, followed),
            (flows, flows * (per_flow - 1)),
            "quic, first flight: not every flight placed once and followed"
        ),
        _ => {}
    }
}
