//! UDP: the udp-datagram program (issue 32's first part) on a reuseport group of four UDP
//! sockets, against the same group without it, in the same test and network namespace.
//! One socket stands for a stalled handler: nobody reads it while the datagrams arrive and
//! its receive buffer is small. The kernel's hash sends it about a quarter of the flows and
//! drops what does not fit (`Udp: RcvbufErrors`); the program sends those datagrams to a
//! socket with room and drops nothing until every buffer is full, and then still never
//! refuses one (a refusal would be an ICMP port unreachable: `Udp: NoPorts`).
//!
//! What each socket holds is read back datagram by datagram and compared with the kernel's
//! counters and the program's own.

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    time::{Duration, Instant},
};

use parsrv::dataplane::Program;
use parsrv_common::udp::UdpSlotCounters;
use parsrv_integration_tests::{
    figure, meminfo, privileged, send_datagrams, steer_udp, udp_group, Needs, UdpCounters,
    LARGE_BUFFER, SMALL_BUFFER,
};
use socket2::Socket;

const SOCKETS: usize = 4;
/// Flows (client sockets, each its own 4-tuple and so its own hash) and datagrams per flow.
const FLOWS: usize = 200;
const PER_FLOW: usize = 10;
const DATAGRAMS: usize = FLOWS * PER_FLOW;

/// What one run found: datagrams read from each socket, the kernel's drops at each, and the
/// namespace's UDP counters over the run.
#[derive(Debug)]
struct Run {
    read: [u64; SOCKETS],
    drops: [u64; SOCKETS],
    kernel: UdpCounters,
}

/// Sends, then reads every socket until all DATAGRAMS are accounted for (read or dropped by
/// the kernel), for at most 10 s.
fn run(sockets: &[Socket], addr: SocketAddr) -> Run {
    let before = UdpCounters::read();
    let drops_before: Vec<u32> = sockets.iter().map(|s| meminfo(s.as_fd()).drops).collect();
    send_datagrams(addr, FLOWS, PER_FLOW);
    let mut read = [0u64; SOCKETS];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    loop {
        for (i, socket) in sockets.iter().enumerate() {
            while socket.recv(&mut buf).is_ok() {
                read[i] += 1;
            }
        }
        let kernel = before.delta(&UdpCounters::read());
        if read.iter().sum::<u64>() + kernel.rcvbuf_errors >= DATAGRAMS as u64
            || Instant::now() > deadline
        {
            let mut drops = [0u64; SOCKETS];
            for (i, socket) in sockets.iter().enumerate() {
                drops[i] = (meminfo(socket.as_fd()).drops - drops_before[i]) as u64;
            }
            return Run {
                read,
                drops,
                kernel,
            };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Checks what every run must show: each datagram read once or dropped by the kernel at a
/// socket, no ICMP refusal, and the kernel's counters agreeing with the sockets'.
fn accounted(run: &Run, what: &str) {
    let read: u64 = run.read.iter().sum();
    let drops: u64 = run.drops.iter().sum();
    assert_eq!(read + drops, DATAGRAMS as u64, "{what}: {run:?}");
    assert_eq!(run.kernel.in_datagrams, read, "{what}: {run:?}");
    assert_eq!(run.kernel.rcvbuf_errors, drops, "{what}: {run:?}");
    assert_eq!(run.kernel.in_errors, drops, "{what}: {run:?}");
    assert_eq!(
        run.kernel.no_ports, 0,
        "{what}: no datagram refused: {run:?}"
    );
}

fn sum(counters: &[UdpSlotCounters], field: fn(&UdpSlotCounters) -> u64) -> u64 {
    counters.iter().map(field).sum()
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_stalled_udp_socket_loses_datagrams_to_the_kernels_hash_and_none_to_parsrv() {
    privileged(Needs::program_of(Program::UdpDatagram), || {
        let buffers = [SMALL_BUFFER, LARGE_BUFFER, LARGE_BUFFER, LARGE_BUFFER];

        // The control: the kernel's hash alone.
        let (plain, addr) = udp_group(&buffers);
        let small_capacity = meminfo(plain[0].as_fd()).rcvbuf;
        let control = run(&plain, addr);
        accounted(&control, "plain SO_REUSEPORT");
        // The small socket held what fit and the kernel dropped the rest of its share; the
        // others dropped nothing.
        assert!(
            control.drops[0] > 0,
            "the control lost nothing: {control:?}"
        );
        assert_eq!(control.drops[1..], [0, 0, 0], "{control:?}");
        figure(&format!(
            "plain SO_REUSEPORT: {} of {DATAGRAMS} datagrams dropped (Udp RcvbufErrors), \
             the small socket ({small_capacity} bytes) held {}",
            control.kernel.rcvbuf_errors, control.read[0]
        ));
        drop(plain);

        // The same group with the program.
        let (sockets, addr) = udp_group(&buffers);
        let steering = steer_udp(&sockets);
        let steered = run(&sockets, addr);
        accounted(&steered, "udp-datagram");
        let counters = steering.slot_counters(SOCKETS as u32).unwrap();
        let errors = steering.errors().unwrap();
        let detail = format!("{steered:?}, program {counters:?}, errors {errors:?}");
        assert_eq!(steered.kernel.rcvbuf_errors, 0, "{detail}");
        assert_eq!(errors.total(), 0, "{detail}");
        // The program ran once per datagram and counted each once.
        assert_eq!(
            sum(&counters, |c| c.kept)
                + sum(&counters, |c| c.steered_in)
                + sum(&counters, |c| c.all_full),
            DATAGRAMS as u64,
            "{detail}"
        );
        assert_eq!(sum(&counters, |c| c.all_full), 0, "{detail}");
        assert_eq!(
            sum(&counters, |c| c.steered_away),
            sum(&counters, |c| c.steered_in),
            "{detail}"
        );
        // What each socket holds is what the program sent it, datagram for datagram.
        for (slot, c) in counters.iter().enumerate() {
            assert_eq!(
                steered.read[slot],
                c.kept + c.steered_in,
                "slot {slot}: {detail}"
            );
        }
        // It moved the small socket's share, and only that: the others always had room.
        assert!(counters[0].steered_away > 0, "{detail}");
        assert_eq!(counters[0].steered_in, 0, "{detail}");
        assert!(
            counters[1..].iter().all(|c| c.steered_away == 0),
            "{detail}"
        );
        figure(&format!(
            "parsrv udp-datagram: 0 of {DATAGRAMS} dropped; the small socket kept {} and \
             {} went to the others (program {} insns verified)",
            counters[0].kept,
            counters[0].steered_away,
            steering
                .run_stats()
                .unwrap()
                .verified_insns
                .map_or("?".into(), |n| n.to_string())
        ));
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn when_every_udp_buffer_is_full_the_kernels_hash_decides_and_nothing_is_refused() {
    privileged(Needs::program_of(Program::UdpDatagram), || {
        let (sockets, addr) = udp_group(&[SMALL_BUFFER; SOCKETS]);
        let capacity: u64 = sockets
            .iter()
            .map(|s| meminfo(s.as_fd()).rcvbuf as u64)
            .sum();
        let steering = steer_udp(&sockets);
        let full = run(&sockets, addr);
        accounted(&full, "every buffer small");
        let counters = steering.slot_counters(SOCKETS as u32).unwrap();
        let errors = steering.errors().unwrap();
        let detail = format!("{full:?}, program {counters:?}, errors {errors:?}");
        assert_eq!(errors.total(), 0, "{detail}");
        let all_full = sum(&counters, |c| c.all_full);
        assert_eq!(
            sum(&counters, |c| c.kept) + sum(&counters, |c| c.steered_in) + all_full,
            DATAGRAMS as u64,
            "{detail}"
        );
        // Far more than fits: most were left to the hash, which dropped them (never the
        // program: NoPorts is 0, checked by `accounted`). A datagram the program placed had
        // room, so every drop is one it left to the hash.
        assert!(full.kernel.rcvbuf_errors > 0, "{detail}");
        assert!(full.kernel.rcvbuf_errors <= all_full, "{detail}");
        // Every socket took its part before the hash took over.
        assert!(full.read.iter().all(|&n| n > 0), "{detail}");
        let read: u64 = full.read.iter().sum();
        figure(&format!(
            "every buffer full ({capacity} bytes in all): {all_full} left to the kernel's \
             hash, {} dropped by the kernel, {read} held, 0 refused",
            full.kernel.rcvbuf_errors
        ));
    });
}
