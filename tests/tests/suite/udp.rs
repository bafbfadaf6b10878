//! UDP: a UDP group under `parsrv run` with one handler stopped, against plain SO_REUSEPORT
//! echo servers with one that never reads; and the udp-datagram program at the library level
//! on a reuseport group of four UDP sockets, against the same group without it, in the same
//! test and network namespace.
//! One socket stands for a stalled handler: nobody reads it while the datagrams arrive and
//! its receive buffer is small. The kernel's hash sends it about a quarter of the flows and
//! drops what does not fit (`Udp: RcvbufErrors`); the program sends those datagrams to a
//! socket with room and drops nothing until every buffer is full, and then still never
//! refuses one (a refusal would be an ICMP port unreachable: `Udp: NoPorts`).
//!
//! What each socket holds is read back datagram by datagram and compared with the kernel's
//! counters and the program's own. And UDP groups as operators manage them: restarts,
//! upgrades, metrics, `group add`/`remove` and SIGHUP.

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    time::{Duration, Instant},
};

use parsrv::{
    dataplane::Program,
    spec::{HandlerKind, UdpMode},
};
use parsrv_integration_tests::{
    counter_sum,
    dns::{
        self, answered_and_latency, dnsperf_with_one_stopped, DnsperfCounts, PlainUnbound,
        DNS_CLIENTS, DNS_QUERIES, DNS_RATE,
    },
    echo_threads, error_line, figure, group, http_get, meminfo, privileged, program_counters,
    send_datagrams, signal, steer_udp, stop_process, udp_group, wait_for, Needs, Outcome, Queries,
    Spawner, UdpCounters, ADDR, DEFAULT_BUFFER, LARGE_BUFFER, SMALL_BUFFER,
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

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_stalled_udp_socket_loses_datagrams_to_the_kernels_hash_and_none_to_parsrv() {
    privileged(Needs::program_of(Program::UdpDatagram), || {
        let buffers = [SMALL_BUFFER, LARGE_BUFFER, LARGE_BUFFER, LARGE_BUFFER];

        // The control: the kernel's hash alone.
        let (plain, addr) = udp_group(&buffers);
        let small_capacity = meminfo(plain[0].as_fd()).size;
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
            counter_sum(&counters, |c| c.kept)
                + counter_sum(&counters, |c| c.steered_in)
                + counter_sum(&counters, |c| c.all_full),
            DATAGRAMS as u64,
            "{detail}"
        );
        assert_eq!(counter_sum(&counters, |c| c.all_full), 0, "{detail}");
        assert_eq!(
            counter_sum(&counters, |c| c.steered_away),
            counter_sum(&counters, |c| c.steered_in),
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
        let capacity: u64 = sockets.iter().map(|s| meminfo(s.as_fd()).size as u64).sum();
        let steering = steer_udp(&sockets);
        let full = run(&sockets, addr);
        accounted(&full, "every buffer small");
        let counters = steering.slot_counters(SOCKETS as u32).unwrap();
        let errors = steering.errors().unwrap();
        let detail = format!("{full:?}, program {counters:?}, errors {errors:?}");
        assert_eq!(errors.total(), 0, "{detail}");
        let all_full = counter_sum(&counters, |c| c.all_full);
        assert_eq!(
            counter_sum(&counters, |c| c.kept)
                + counter_sum(&counters, |c| c.steered_in)
                + all_full,
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

/// Open loop: a round of one datagram from each flow every 10 ms (20,000 datagrams/s for
/// 0.1 s), whatever the answers do.
const PACE: Duration = Duration::from_millis(10);
/// The servers that run are done answering once none answered for this long (what the
/// stopped one holds never will be until it resumes). Only the figures depend on it: the
/// program ran, and the kernel dropped or queued, inside each sendto() on loopback.
const QUIET: Duration = Duration::from_millis(500);

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_stopped_udp_handler_loses_no_datagram_in_a_parsrv_group_and_its_overflow_in_a_plain_one() {
    privileged(Needs::program_of(Program::UdpDatagram), || {
        // The control: four plain SO_REUSEPORT echo servers, one of which reads nothing
        // until the end, each with the kernel's default buffer as parsrv's.
        let (mut sockets, addr) = udp_group(&[DEFAULT_BUFFER; SOCKETS]);
        let stopped = sockets.remove(0);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let servers = echo_threads(sockets, stop.clone());
        let before = UdpCounters::read();
        let mut plain = Queries::send(addr, FLOWS, PER_FLOW, PACE);
        plain.answers_until_quiet(QUIET, Duration::from_secs(5));
        let plain_kernel = before.delta(&UdpCounters::read());
        let answered_while_stopped = plain.answered;
        // The stopped server resumes: it answers what its buffer held.
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
        while let Ok((len, from)) = stopped.recv_from(&mut buf) {
            // SAFETY: recv_from initialized the first `len` bytes.
            let bytes: Vec<u8> = buf[..len]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            stopped.send_to(&bytes, &from).unwrap();
        }
        let lost = plain_kernel.rcvbuf_errors as usize;
        let plain_answered = plain.answers(DATAGRAMS - lost, Duration::from_secs(5));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        servers.into_iter().for_each(|t| t.join().unwrap());
        let detail = format!("plain: {plain_kernel:?}, {answered_while_stopped} answered while one was stopped, {plain_answered} in all");
        assert!(lost > 0, "the control lost nothing: {detail}");
        assert_eq!(plain_kernel.no_ports, 0, "{detail}");
        // Every datagram was answered or counted lost by the kernel.
        assert_eq!(plain_answered, DATAGRAMS - lost, "{detail}");

        // parsrv: four echo handlers, one stopped.
        let spawner = group("udp-stopped", HandlerKind::Echo)
            .listen(&format!("udp://{ADDR}"))
            .handlers(SOCKETS as u32)
            .start();
        let addr: SocketAddr = ADDR.parse().unwrap();
        let pid = spawner.handler_pid(0);
        stop_process(pid);
        let before = UdpCounters::read();
        let mut queries = Queries::send(addr, FLOWS, PER_FLOW, PACE);
        let answered_while_stopped = queries.answers_until_quiet(QUIET, Duration::from_secs(5));
        let kernel = before.delta(&UdpCounters::read());
        let status = spawner.status();
        signal(pid, nix::sys::signal::Signal::SIGCONT);
        let answered = queries.answers(DATAGRAMS, Duration::from_secs(10));
        let counters = program_counters(&status);
        let detail = format!(
            "parsrv: {kernel:?}, {answered_while_stopped} answered while handler 0 was stopped, \
             {answered} in all; program {counters:?}, errors {:?}, {}",
            status.datagram_errors,
            status.render()
        );
        assert_eq!(kernel.rcvbuf_errors, 0, "{detail}");
        assert_eq!(kernel.no_ports, 0, "{detail}");
        assert_eq!(answered, DATAGRAMS, "every datagram answered: {detail}");
        assert_eq!(
            status.datagram_errors.map(|e| e.total()),
            Some(0),
            "{detail}"
        );
        // Each datagram counted once, none left to the hash; the stopped handler's socket
        // kept what fit and the rest of its share went to the others.
        assert_eq!(
            counter_sum(&counters, |c| c.kept) + counter_sum(&counters, |c| c.steered_in),
            DATAGRAMS as u64,
            "{detail}"
        );
        assert_eq!(counter_sum(&counters, |c| c.all_full), 0, "{detail}");
        assert!(counters[0].steered_away > 0, "{detail}");
        assert!(
            status.sockets.iter().all(|s| s
                .datagrams
                .as_ref()
                .and_then(|d| d.buffer)
                .map(|b| b.drops)
                == Some(0)),
            "{detail}"
        );
        figure(&format!(
            "handler 0 of 4 stopped, {DATAGRAMS} datagrams from {FLOWS} flows at 20,000/s: plain \
             SO_REUSEPORT lost {lost} (Udp RcvbufErrors); parsrv lost 0, {} steered off the \
             stopped handler, which answered the {} it held once resumed",
            counters[0].steered_away,
            answered - answered_while_stopped
        ));
        spawner.stop();
    });
}

/// A UDP server written for systemd's `ListenDatagram=`: it takes its socket from fd 3
/// (`LISTEN_FDS=1`, `LISTEN_PID` its own pid), checks that it is a datagram socket, and
/// answers each datagram with its pid.
const ACTIVATED_SERVER: &str = r#"
import os, socket
assert os.environ["LISTEN_FDS"] == "1" and os.environ["LISTEN_PID"] == str(os.getpid())
s = socket.socket(fileno=3)
assert s.type == socket.SOCK_DGRAM, s.type
s.setblocking(True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(str(os.getpid()).encode(), peer)
"#;

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn an_exec_handler_gets_its_udp_socket_by_socket_activation_as_systemd_hands_it() {
    privileged(Needs::program_of(Program::UdpDatagram), || {
        let spawner = group("udp-exec", HandlerKind::Exec)
            .listen(&format!("udp://{ADDR}"))
            .handlers(2)
            .command(&["python3", "-c", ACTIVATED_SERVER])
            .start();
        let pids: Vec<u32> = (0..2).map(|slot| spawner.handler_pid(slot)).collect();
        let addr: SocketAddr = ADDR.parse().unwrap();
        let clients: Vec<std::net::UdpSocket> = (0..100)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let mut answered_by = std::collections::BTreeMap::<u32, usize>::new();
        for client in &clients {
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            client.send_to(b"who answers?", addr).unwrap();
            let mut buf = [0u8; 32];
            let len = client.recv(&mut buf).expect("an answer");
            let pid: u32 = std::str::from_utf8(&buf[..len]).unwrap().parse().unwrap();
            *answered_by.entry(pid).or_default() += 1;
        }
        // 100 flows over 2 sockets: each handler answers some (all on one: 2^-99).
        assert_eq!(
            answered_by.keys().copied().collect::<Vec<_>>(),
            {
                let mut sorted = pids.clone();
                sorted.sort();
                sorted
            },
            "{answered_by:?}"
        );
        figure(&format!(
            "2 exec'd python3 UDP servers answered {answered_by:?}"
        ));
        spawner.stop();
    });
}

/// A real DNS server and a real load tool: Debian's Unbound as the exec handler, taking its
/// UDP socket by systemd's socket activation (and saying READY=1 by its notify protocol),
/// four of them with one stopped, under dnsperf. The control, in the same namespace: four
/// Unbound servers binding the port themselves with SO_REUSEPORT, one stopped, the same
/// load: what the kernel's hash sent the stopped one beyond its buffer is lost.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn unbound_under_dnsperf_loses_no_query_to_a_stopped_handler_where_plain_reuseport_loses_some() {
    privileged(Needs::program_of(Program::UdpDatagram), || {
        dns::as_if_systemd_ran();
        let dir = std::env::temp_dir().join(format!("parsrv-unbound-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let addr: SocketAddr = ADDR.parse().unwrap();

        // The stopped server's receive buffer is small (8 KiB, about 9 queries), so that
        // what the kernel's hash sends it overflows whatever the kernel's default buffer
        // holds (on 6.1 the default held a stopped server's whole share).
        let small = dns::unbound_config(&dir, addr.port(), true, Some(SMALL_BUFFER));
        let default = dns::unbound_config(&dir, addr.port(), true, None);
        let mut configs = vec![default; SOCKETS];
        configs[0] = small;
        let plain = PlainUnbound::start(&configs);
        let (plain_counts, plain_kernel, plain_latencies, plain_output) =
            dnsperf_with_one_stopped(&dir, addr, DNS_QUERIES, plain.pid(0));
        drop(plain);
        let detail = format!("plain: {plain_counts:?}, {plain_kernel:?}\n{plain_output}");
        assert_eq!(plain_counts.sent, DNS_QUERIES, "{detail}");
        assert!(plain_counts.lost > 0, "the control lost nothing: {detail}");
        assert!(plain_kernel.rcvbuf_errors > 0, "{detail}");
        // Every query lost was one the kernel dropped at a full buffer (the servers'
        // answers can be dropped too, at dnsperf's sockets: counted there as well).
        assert!(plain_kernel.rcvbuf_errors >= plain_counts.lost, "{detail}");
        assert_eq!(plain_kernel.no_ports, 0, "{detail}");

        let config = dns::unbound_config(&dir, addr.port(), false, None);
        let spawner = dns::unbound_group("udp-unbound", addr, SOCKETS as u32, &config).start();
        // Each handler is the process parsrv started (pid unchanged: Unbound did not
        // daemonize), holds its slot's socket as fd 3, and bound no socket of its own: the
        // group's four are the only UDP sockets on the port.
        assert_eq!(udp_sockets_on(addr.port()), SOCKETS, "{}", spawner.log());
        // Handler 0's socket gets the control's small buffer (the same socket: its fd 3).
        dns::set_handler_buffer(spawner.handler_pid(0), SMALL_BUFFER);
        let (counts, kernel, latencies, output) =
            dnsperf_with_one_stopped(&dir, addr, DNS_QUERIES, spawner.handler_pid(0));
        let status = spawner.status();
        let counters = program_counters(&status);
        let detail = format!(
            "parsrv: {counts:?}, {kernel:?}, program {counters:?}\n{output}\n{}",
            spawner.log()
        );
        assert_eq!(
            counts,
            DnsperfCounts {
                sent: DNS_QUERIES,
                completed: DNS_QUERIES,
                lost: 0
            },
            "{detail}"
        );
        assert_eq!(kernel.rcvbuf_errors, 0, "{detail}");
        assert_eq!(kernel.no_ports, 0, "{detail}");
        assert_eq!(
            counter_sum(&counters, |c| c.kept) + counter_sum(&counters, |c| c.steered_in),
            DNS_QUERIES,
            "{detail}"
        );
        assert!(counters[0].steered_away > 0, "{detail}");
        figure(&format!(
            "Unbound x4 (one stopped) under dnsperf, {DNS_QUERIES} queries from {DNS_CLIENTS} \
             clients at {DNS_RATE}/s: plain SO_REUSEPORT lost {} (Udp RcvbufErrors +{}); \
             parsrv lost 0, {} steered off the stopped handler",
            plain_counts.lost, plain_kernel.rcvbuf_errors, counters[0].steered_away
        ));
        // Latency, not asserted (an emulated VM's differs by an order of magnitude): the
        // stopped handler's held queries are answered once it resumes, a few in 2,000.
        figure(&format!(
            "Unbound x4 (one stopped) under dnsperf: plain SO_REUSEPORT {}; parsrv {}",
            answered_and_latency(&plain_counts, &plain_latencies),
            answered_and_latency(&counts, &latencies)
        ));
        spawner.stop();
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// UDP sockets bound to `port` in this network namespace (/proc/net/udp, IPv4).
fn udp_sockets_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/thread-self/net/udp").unwrap();
    let wanted = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            line.split_whitespace()
                .nth(1)
                .is_some_and(|local| local.ends_with(&wanted))
        })
        .count()
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_killed_udp_handler_is_restarted_on_its_socket_and_no_datagram_is_lost() {
    privileged(Needs::program_of(Program::UdpDatagram), || {
        let spawner = group("udp-killed", HandlerKind::Echo)
            .listen(&format!("udp://{ADDR}"))
            .handlers(SOCKETS as u32)
            .start();
        let addr: SocketAddr = ADDR.parse().unwrap();
        let cookie = spawner.status().sockets[0].cookie;
        let before = UdpCounters::read();
        // Killed, then datagrams at once: those hashed to its socket wait in its buffer for
        // the next handler, or go to the others once the spawner marked it.
        signal(spawner.handler_pid(0), nix::sys::signal::Signal::SIGKILL);
        let mut during = Queries::send(addr, FLOWS, 2, PACE);
        let answered_during = during.answers(during.sent, Duration::from_secs(10));
        assert!(
            wait_for(Duration::from_secs(10), || {
                let status = spawner.status();
                status.handlers[0].restarts == 1 && status.handlers[0].ready
            }),
            "handler 0 was not restarted: {}",
            spawner.status().render()
        );
        let mut after = Queries::send(addr, FLOWS, 2, PACE);
        let answered_after = after.answers(after.sent, Duration::from_secs(10));
        let kernel = before.delta(&UdpCounters::read());
        let status = spawner.status();
        let detail = format!("{kernel:?}\n{}", status.render());
        assert_eq!(answered_during, during.sent, "{detail}");
        assert_eq!(answered_after, after.sent, "{detail}");
        assert_eq!(kernel.rcvbuf_errors, 0, "{detail}");
        // The same socket, serving again, and taking its share.
        assert_eq!(status.sockets[0].cookie, cookie, "{detail}");
        assert_eq!(
            status.sockets[0].state,
            parsrv::listeners::SocketState::Serving,
            "{detail}"
        );
        assert!(status.handlers[0].accepted.unwrap_or(0) > 0, "{detail}");
        spawner.stop();
    });
}

/// Binds a UDP socket to 127.0.0.1:PORT with SO_REUSEADDR, then another with SO_REUSEPORT,
/// and says how each went.
const BIND_BESIDE: &str = r#"
import socket, sys
said = []
for option in (socket.SO_REUSEADDR, socket.SO_REUSEPORT):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, option, 1)
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
        said.append("bound")
    except OSError as e:
        said.append("in-use" if e.errno == 98 else str(e))
print(",".join(said))
"#;

/// What uid 65534 gets binding beside sockets on `port` (see [`BIND_BESIDE`]).
fn bind_beside_as_nobody(port: u16) -> String {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("python3")
        .args(["-c", BIND_BESIDE, &port.to_string()])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A local user cannot bind beside a UDP group's sockets and take part of its datagrams:
/// the kernel lets another uid's socket share a UDP port when both set SO_REUSEADDR (no uid
/// check for it, unlike SO_REUSEPORT's), so parsrv sets it only on TCP sockets.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_local_user_cannot_bind_beside_a_udp_groups_sockets() {
    privileged(Needs::program_of(Program::UdpDatagram), || {
        // The control: a root socket with SO_REUSEADDR on another port.
        let control =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        control.set_reuse_address(true).unwrap();
        let port = 9053;
        control
            .bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())
            .unwrap();
        assert_eq!(bind_beside_as_nobody(port), "bound,in-use");
        let spawner = group("udp-beside", HandlerKind::Echo)
            .listen(&format!("udp://{ADDR}"))
            .handlers(2)
            .start();
        let group_port = ADDR.parse::<SocketAddr>().unwrap().port();
        assert_eq!(bind_beside_as_nobody(group_port), "in-use,in-use");
        spawner.stop();
    });
}

fn echoes(addr: SocketAddr) -> bool {
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    client.send_to(b"ping", addr).unwrap();
    let mut buf = [0u8; 8];
    matches!(client.recv(&mut buf), Ok(4) if &buf[..4] == b"ping")
}

/// Running, not a zombie waiting for its parent (this test, for a spawner it started).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command's closing parenthesis.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// `parsrv upgrade` of a spawner running a UDP group: the new image adopts the group (the
/// same handlers, the same program), and an open-loop load across it loses no datagram
/// (kernel counters: no receive-buffer error, no ICMP). Then the spawner is killed and
/// `parsrv stop` stops what it left (adopting it to stop it): no handler, pin or record is
/// left, the port is closed.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_udp_group_is_upgraded_under_load_losing_nothing_and_parsrv_stop_ends_it_when_its_spawner_is_gone(
) {
    privileged(Needs::program_of(Program::UdpDatagram), || {
        const FLOWS: usize = 50;
        let addr: SocketAddr = ADDR.parse().unwrap();
        let name = "udp-upgrade";
        let spawner = group(name, HandlerKind::Echo)
            .listen(&format!("udp://{ADDR}"))
            .handlers(2)
            .start();
        let before = spawner.status();
        let pid = spawner.pid().to_string();
        let kernel_before = UdpCounters::read();
        let finished = std::sync::Arc::new(std::sync::OnceLock::new());
        let upgrade = std::thread::spawn({
            let finished = finished.clone();
            move || {
                std::thread::sleep(Duration::from_millis(200));
                let result =
                    parsrv_integration_tests::Spawner::parsrv(&["upgrade", "--spawner", &pid]);
                let _ = finished.set(Instant::now());
                result
            }
        });
        // Open loop: a round of one datagram from each of 50 clients every 25 ms, from
        // before the upgrade until 0.5 s after it (at least 1 s, at most 30 s).
        let mut queries =
            Queries::send_until(addr, FLOWS, (40, 1200), Duration::from_millis(25), || {
                finished
                    .get()
                    .is_some_and(|at| at.elapsed() > Duration::from_millis(500))
            });
        let load_end = Instant::now();
        let (code, out, err) = upgrade.join().unwrap();
        let upgraded_at = *finished.get().unwrap();
        let datagrams = queries.sent;
        let answered = queries.answers(datagrams, Duration::from_secs(20));
        let kernel = kernel_before.delta(&UdpCounters::read());
        let after = spawner.status();
        let detail = format!(
            "upgrade exit {code}: {out}{err}; {kernel:?}, {answered} answered; {}\n{}",
            after.render(),
            spawner.log()
        );
        assert_eq!(code, 0, "{detail}");
        assert!(
            out.contains(&format!("group {name}: adopted by the new image")),
            "{detail}"
        );
        assert!(
            upgraded_at < load_end,
            "the upgrade outlasted the load: {detail}"
        );
        assert_eq!(after.spawner_pid, before.spawner_pid, "{detail}");
        assert!(
            after.spawner_started_ms > before.spawner_started_ms,
            "{detail}"
        );
        assert_eq!(
            after.handlers.iter().map(|h| h.pid).collect::<Vec<_>>(),
            before.handlers.iter().map(|h| h.pid).collect::<Vec<_>>(),
            "{detail}"
        );
        assert_eq!(answered, datagrams, "{detail}");
        assert_eq!((kernel.rcvbuf_errors, kernel.no_ports), (0, 0), "{detail}");
        assert_eq!(
            after.datagram_errors.map(|e| e.total()),
            Some(0),
            "{detail}"
        );
        // The program's counters went on across the upgrade: each datagram counted once.
        let counters = program_counters(&after);
        let steered = counter_sum(&counters, |c| c.kept + c.steered_in + c.all_full);
        assert_eq!(steered, datagrams as u64, "{detail}");

        // Its spawner killed: `parsrv stop` (which stop_with runs after the signal) takes
        // the group over to stop it.
        let handlers: Vec<u32> = after.handlers.iter().filter_map(|h| h.pid).collect();
        assert!(parsrv::dataplane::pins::group_dir(name).exists());
        let status = spawner.stop_with(nix::sys::signal::Signal::SIGKILL);
        assert!(!status.success());
        assert!(
            wait_for(Duration::from_secs(5), || handlers
                .iter()
                .all(|&pid| !alive(pid))),
            "handlers left after `parsrv stop`"
        );
        assert!(!parsrv::dataplane::pins::group_dir(name).exists());
        assert!(!parsrv::spawner::record_path(name).exists());
        assert!(!echoes(addr));
    });
}

/// A UDP group's handler that dies while no spawner runs takes its socket with it (the
/// last copy: what its buffer held is lost, as with any UDP server). The next spawner
/// adopts the group's other handler, gives the slot a new socket, registered with the
/// adopted program before any datagram could reach it unnamed, and a new handler; both
/// slots then get datagrams and every one is answered.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_udp_handler_that_died_with_no_spawner_gets_a_new_socket_from_the_adopting_spawner() {
    privileged(Needs::program_of(Program::UdpDatagram), || {
        let addr: SocketAddr = ADDR.parse().unwrap();
        let name = "udp-adopt-slot";
        let builder = || {
            group(name, HandlerKind::Echo)
                .listen(&format!("udp://{ADDR}"))
                .handlers(2)
        };
        let first = builder().start();
        let before = first.status();
        let (dead, survivor) = (first.handler_pid(0), first.handler_pid(1));
        assert!(parsrv_integration_tests::socket_is_nonblocking(survivor));
        parsrv_integration_tests::kill_spawner(&first);
        signal(dead, nix::sys::signal::Signal::SIGKILL);
        assert!(wait_for(Duration::from_secs(5), || !alive(dead)));
        let next = builder().start();
        let after = next.status();
        let detail = format!("{}\n{}", after.render(), next.log());
        assert!(
            next.log().contains("adopting its running handlers"),
            "{detail}"
        );
        assert_eq!(next.handler_pid(1), survivor, "{detail}");
        assert_ne!(next.handler_pid(0), dead, "{detail}");
        assert_eq!(
            after.sockets[1].cookie, before.sockets[1].cookie,
            "{detail}"
        );
        assert_ne!(
            after.sockets[0].cookie, before.sockets[0].cookie,
            "{detail}"
        );
        // Datagrams from 100 sources: the kernel's hash sends some to each socket, and the
        // program names both (no unknown socket).
        let mut queries = Queries::send(addr, 100, 2, PACE);
        assert_eq!(
            queries.answers(200, Duration::from_secs(5)),
            200,
            "{detail}"
        );
        let after = next.status();
        let detail = format!("{}\n{}", after.render(), next.log());
        assert_eq!(
            after.datagram_errors.map(|e| e.total()),
            Some(0),
            "{detail}"
        );
        let counters = program_counters(&after);
        assert!(counters.iter().all(|c| c.kept > 0), "{detail}");
        drop(first);
        // The adopted handler's socket keeps the mode it set (O_NONBLOCK, its receive
        // threads poll), and so it stops on SIGTERM, within its grace.
        assert!(
            parsrv_integration_tests::socket_is_nonblocking(survivor),
            "{detail}"
        );
        let log = next.log_path();
        assert!(next.stop().success(), "{detail}");
        let log = std::fs::read_to_string(log).unwrap();
        assert!(!log.contains("did not exit within"), "{log}");
    });
}

/// A UDP group's spare (`--spare 1`): a socket whose ready handler gets datagrams only when
/// no serving socket has room. With room, it gets none of 1,000; with both serving
/// handlers stopped (SIGSTOP), it answers what their buffers cannot hold, and nothing is
/// lost. The control, in the same test: the same group without the spare loses that
/// overflow (Udp RcvbufErrors).
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_udp_spare_takes_only_what_the_stopped_handlers_cannot_hold_where_without_it_that_is_lost() {
    privileged(Needs::program_of(Program::UdpDatagram), || {
        const BUFFER: u32 = 256 << 10;
        const FLOWS: usize = 100;
        const PER_FLOW: usize = 20;
        const DATAGRAMS: usize = FLOWS * PER_FLOW;
        let addr: SocketAddr = ADDR.parse().unwrap();
        let builder = |name: &str, spare: u32| {
            group(name, HandlerKind::Echo)
                .listen(&format!("udp://{ADDR}"))
                .handlers(2)
                .with(move |s| {
                    s.spare = spare;
                    s.receive_buffer = BUFFER;
                })
        };
        // Both serving handlers stopped while DATAGRAMS come; what each answered then, in
        // all, and the kernel's counters meanwhile.
        let overflow = |spawner: &parsrv_integration_tests::Spawner| {
            let pids = [spawner.handler_pid(0), spawner.handler_pid(1)];
            pids.iter().for_each(|&pid| stop_process(pid));
            let before = UdpCounters::read();
            let mut queries = Queries::send(addr, FLOWS, PER_FLOW, PACE);
            let while_stopped = queries.answers_until_quiet(QUIET, Duration::from_secs(10));
            let kernel = before.delta(&UdpCounters::read());
            let status = spawner.status();
            for pid in pids {
                signal(pid, nix::sys::signal::Signal::SIGCONT);
            }
            let lost = kernel.rcvbuf_errors as usize;
            let answered = queries.answers(DATAGRAMS - lost, Duration::from_secs(10));
            (while_stopped, answered, kernel, status)
        };

        let control = builder("udp-no-spare", 0).start();
        let (_, control_answered, control_kernel, _) = overflow(&control);
        assert!(control.stop().success());
        let detail = format!("without a spare: {control_kernel:?}, {control_answered} answered");
        assert!(control_kernel.rcvbuf_errors > 0, "{detail}");
        assert_eq!(
            control_answered + control_kernel.rcvbuf_errors as usize,
            DATAGRAMS,
            "{detail}"
        );

        let spawner = builder("udp-spare", 1).start();
        let status = spawner.status();
        assert_eq!(status.sockets.len(), 3, "{}", status.render());
        assert_eq!(
            status.sockets[2].state,
            parsrv::listeners::SocketState::Spare,
            "{}",
            status.render()
        );
        // With room: the spare gets nothing.
        let mut queries = Queries::send(addr, FLOWS / 2, PER_FLOW, PACE);
        assert_eq!(
            queries.answers(DATAGRAMS / 2, Duration::from_secs(10)),
            DATAGRAMS / 2
        );
        let counters = program_counters(&spawner.status());
        assert_eq!(counters[2].kept + counters[2].steered_in, 0, "{counters:?}");
        let (while_stopped, answered, kernel, status) = overflow(&spawner);
        let counters = program_counters(&status);
        let detail = format!(
            "with a spare: {kernel:?}, {while_stopped} answered while both were stopped, \
             {answered} in all; program {counters:?}; {}; without: {control_kernel:?}",
            status.render()
        );
        assert_eq!((kernel.rcvbuf_errors, kernel.no_ports), (0, 0), "{detail}");
        assert_eq!(answered, DATAGRAMS, "{detail}");
        // The spare answered what the stopped handlers' buffers could not hold, which is
        // what the group without it lost.
        assert!(
            counters[2].steered_in + counters[2].kept >= control_kernel.rcvbuf_errors,
            "{detail}"
        );
        assert!(while_stopped > 0, "{detail}");
        figure(&format!(
            "2 handlers stopped, {DATAGRAMS} datagrams: with a spare 0 lost ({} to the \
             spare), without one {} lost",
            counters[2].steered_in + counters[2].kept,
            control_kernel.rcvbuf_errors
        ));
        assert!(spawner.stop().success());
    });
}

/// A Prometheus scrape of a UDP group shows its sockets' buffers and the datagram program's
/// counters, equal to its status, and none of the TCP socket counters.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_udp_groups_metrics_show_its_buffers_and_counters_as_its_status_does() {
    privileged(Needs::program_of(Program::UdpDatagram), || {
        const METRICS: &str = "127.0.0.1:9464";
        let spawner = group("udp-metrics", HandlerKind::Echo)
            .listen(&format!("udp://{ADDR}"))
            .handlers(2)
            .metrics(METRICS)
            .start();
        let mut queries = Queries::send(ADDR.parse().unwrap(), 50, 2, PACE);
        assert_eq!(queries.answers(100, Duration::from_secs(5)), 100);
        let status = spawner.status();
        let (code, text) = parsrv_integration_tests::get_page_from(
            None,
            METRICS.parse().unwrap(),
            "/metrics",
            Duration::from_secs(2),
        )
        .unwrap();
        assert_eq!(code, 200, "{text}");
        let sample = |name: &str, slot: u32| -> Option<f64> {
            let prefix = format!("{name}{{group=\"udp-metrics\",slot=\"{slot}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .map(|v| v.parse().unwrap())
        };
        let mut kept = 0.0;
        for socket in &status.sockets {
            let datagrams = socket.datagrams.as_ref().unwrap();
            let slot = socket.slot;
            assert_eq!(
                sample("parsrv_socket_datagrams_kept_total", slot),
                Some(datagrams.counters.kept as f64),
                "{text}"
            );
            assert_eq!(
                sample("parsrv_socket_receive_buffer_bytes", slot),
                datagrams.buffer.map(|b| b.size as f64),
                "{text}"
            );
            assert_eq!(
                sample("parsrv_socket_receive_drops_total", slot),
                Some(0.0),
                "{text}"
            );
            assert_eq!(sample("parsrv_socket_selected_total", slot), None, "{text}");
            kept += datagrams.counters.kept as f64;
        }
        assert_eq!(kept, 100.0, "{text}");
        assert!(spawner.stop().success());
    });
}

/// Whether a plain socket could bind `addr` (UDP) now: nothing holds it.
fn udp_port_free(addr: SocketAddr) -> bool {
    std::net::UdpSocket::bind(addr).is_ok()
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn udp_groups_come_and_go_with_group_add_remove_and_sighup_beside_a_tcp_group_on_their_port() {
    privileged(Needs::program_of(Program::UdpFlow), || {
        let udp: SocketAddr = ADDR.parse().unwrap();
        let tcp_only = format!(
            "[[group]]\nname = \"web\"\nlisten = \"{ADDR}\"\nhandler = \"http\"\nhandlers = 1\n"
        );
        let config = std::env::temp_dir().join("parsrv-test-udp-groups.toml");
        std::fs::write(&config, &tcp_only).unwrap();
        let spawner = Spawner::start_config("udp-groups", &config, &["web"], &[]);

        // group add: a UDP group in flow mode on the TCP group's port number.
        let listen = format!("udp://{ADDR}");
        let add = |name: &str| {
            Spawner::parsrv(&[
                "group",
                "add",
                "--name",
                name,
                "--listen",
                &listen,
                "--handler",
                "echo",
                "--handlers",
                "2",
                "--udp-mode",
                "flow",
            ])
        };
        let (code, out, err) = add("dns");
        assert_eq!(code, 0, "{out}{err}\n{}", spawner.log());
        assert_eq!(Spawner::running_groups(), ["dns", "web"]);
        assert!(echoes(udp), "{}", spawner.log());
        assert_eq!(
            http_get(ADDR.parse().unwrap(), Duration::from_secs(5)),
            Outcome::Ok
        );
        let (code, shown, err) = Spawner::parsrv(&["group", "show", "dns"]);
        assert_eq!(code, 0, "{err}");
        assert!(shown.contains("udp_mode = \"flow\""), "{shown}");
        // The same UDP address again: refused, nothing changed.
        let (code, _, err) = add("dns-again");
        assert_eq!(code, 2, "{err}");
        assert!(error_line(&err).contains("already served here"), "{err}");
        assert_eq!(Spawner::running_groups(), ["dns", "web"]);
        // group remove: stopped, its port free again, the TCP group untouched.
        let (code, out, err) = Spawner::parsrv(&["group", "remove", "dns"]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(Spawner::running_groups(), ["web"]);
        assert!(udp_port_free(udp), "{}", spawner.log());

        // SIGHUP: a UDP group (datagram mode) arrives from the file, then leaves.
        let with_udp = format!(
            "{tcp_only}\n[[group]]\nname = \"dns\"\nlisten = \"udp://{ADDR}\"\nhandler = \"echo\"\nhandlers = 2\n"
        );
        std::fs::write(&config, with_udp).unwrap();
        signal(spawner.pid(), nix::sys::signal::Signal::SIGHUP);
        assert!(
            wait_for(Duration::from_secs(15), || Spawner::running_groups()
                == ["dns", "web"]),
            "{:?}\n{}",
            Spawner::running_groups(),
            spawner.log()
        );
        assert!(
            wait_for(Duration::from_secs(5), || echoes(udp)),
            "{}",
            spawner.log()
        );
        assert_eq!(spawner.status_of("dns").spec.udp_mode, UdpMode::Datagram);
        std::fs::write(&config, &tcp_only).unwrap();
        signal(spawner.pid(), nix::sys::signal::Signal::SIGHUP);
        assert!(
            wait_for(Duration::from_secs(15), || Spawner::running_groups()
                == ["web"]),
            "{:?}\n{}",
            Spawner::running_groups(),
            spawner.log()
        );
        assert!(udp_port_free(udp), "{}", spawner.log());
        assert!(spawner.stop().success());
    });
}

/// `--handlers 1..2` on a UDP group: its one handler stopped under open-loop load, its
/// receive buffer fills past half, and the autoscaler adds a socket and handler, which
/// take what the stopped one's buffer cannot hold: nothing lost, where the same group with
/// `--no-autoscale` loses that overflow (Udp RcvbufErrors), in the same test. Once idle,
/// the group steps back down to one handler.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_udp_group_grows_when_its_buffer_fills_and_shrinks_when_idle_where_a_fixed_one_loses_the_overflow(
) {
    privileged(Needs::program_of(Program::UdpDatagram), || {
        // 512 KiB holds about 600 of these datagrams (truesize 832 bytes each): the
        // autoscaler sees half of it full after about 300, and the rest, at 500 a second,
        // gives it over half a second to add a socket, which takes datagrams at once (they
        // wait there for its handler).
        const BUFFER: u32 = 512 << 10;
        // 50 flows, so that the hash gives the stopped handler's socket about half of them
        // once there are two (with 10, the one run in 28 that failed here may have been one
        // where one or two flows hashed there: then none needed steering off it).
        const LOAD_FLOWS: usize = 50;
        const ROUNDS: usize = 40;
        const LOAD_PACE: Duration = Duration::from_millis(100);
        const SENT: usize = LOAD_FLOWS * ROUNDS;
        let addr: SocketAddr = ADDR.parse().unwrap();
        let builder = |name: &str, autoscale: bool| {
            group(name, HandlerKind::Echo)
                .listen(&format!("udp://{ADDR}"))
                .handlers_between(1, 2)
                .with(move |s| {
                    s.autoscale = autoscale;
                    s.receive_buffer = BUFFER;
                })
        };
        // The one handler stopped while the load comes; what was answered in all, the
        // kernel's counters meanwhile, and the status at the load's end.
        let overload = |spawner: &parsrv_integration_tests::Spawner| {
            let pid = spawner.handler_pid(0);
            stop_process(pid);
            let before = UdpCounters::read();
            let mut queries = Queries::send(addr, LOAD_FLOWS, ROUNDS, LOAD_PACE);
            let kernel = before.delta(&UdpCounters::read());
            let status = spawner.status();
            signal(pid, nix::sys::signal::Signal::SIGCONT);
            let lost = kernel.rcvbuf_errors as usize;
            let answered = queries.answers(SENT - lost, Duration::from_secs(20));
            (answered, kernel, status)
        };

        let fixed = builder("udp-fixed", false).start();
        let (fixed_answered, fixed_kernel, fixed_status) = overload(&fixed);
        let detail = format!(
            "--no-autoscale: {fixed_kernel:?}, {fixed_answered} answered; {}",
            fixed_status.render()
        );
        assert!(fixed.stop().success());
        assert_eq!(fixed_status.handlers.len(), 1, "{detail}");
        assert!(fixed_kernel.rcvbuf_errors > 0, "{detail}");
        assert_eq!(
            fixed_answered + fixed_kernel.rcvbuf_errors as usize,
            SENT,
            "{detail}"
        );

        let spawner = builder("udp-autoscaled", true).start();
        let (answered, kernel, status) = overload(&spawner);
        let counters = program_counters(&status);
        let detail = format!(
            "autoscaled: {kernel:?}, {answered} answered; program {counters:?}; {}\n{}; \
             {detail}",
            status.render(),
            spawner.log()
        );
        assert_eq!((kernel.rcvbuf_errors, kernel.no_ports), (0, 0), "{detail}");
        assert_eq!(answered, SENT, "{detail}");
        assert_eq!(status.handlers.len(), 2, "{detail}");
        assert!(status.scaling.decisions >= 1, "{detail}");
        assert!(
            spawner.log().contains("autoscale: 1 -> 2 handlers"),
            "{detail}"
        );
        // The new socket took its flows (kept: their hash choice) and, once the stopped
        // handler's buffer had no room, the flows hashed there (steered in).
        assert!(counters[1].kept > 0, "{detail}");
        assert!(counters[1].steered_in > 0, "{detail}");
        assert_eq!(
            status.datagram_errors.map(|e| e.total()),
            Some(0),
            "{detail}"
        );

        // Idle: back to one handler, the one that was stopped.
        let shrunk = wait_for(Duration::from_secs(30), || {
            spawner.status().handlers.len() == 1
        });
        let log = spawner.log();
        assert!(
            shrunk,
            "never stepped down: {}\n{log}",
            spawner.status().render()
        );
        assert!(log.contains("autoscale: 2 -> 1 handlers"), "{log}");
        let mut after = Queries::send(addr, LOAD_FLOWS, 2, PACE);
        assert_eq!(
            after.answers(LOAD_FLOWS * 2, Duration::from_secs(10)),
            LOAD_FLOWS * 2
        );
        figure(&format!(
            "1 handler of a UDP group stopped, {SENT} datagrams at 500/s into a {} KiB \
             buffer: autoscaled 1 -> 2, 0 lost ({} to the new socket), back to 1 once idle; \
             with --no-autoscale {} lost",
            BUFFER >> 10,
            counters[1].kept + counters[1].steered_in,
            fixed_kernel.rcvbuf_errors
        ));
        assert!(spawner.stop().success());
    });
}

/// A kill storm on a UDP group: a random handler of 4 SIGKILLed every 200 ms, 25 times,
/// under open-loop load (500 datagrams a second). A killed handler's socket stays open in
/// the spawner with what its buffer holds, marked as having no handler (the program sends
/// new datagrams elsewhere), and its successor answers what waited there. So the only
/// datagrams lost are those a killed process had read and not yet answered, at most one per
/// kill (one thread each), and the kernel drops none.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_udp_kill_storm_loses_at_most_what_killed_handlers_had_read_and_the_kernel_drops_none() {
    privileged(Needs::program_of(Program::UdpDatagram), || {
        use std::sync::{
            atomic::{AtomicBool, Ordering},
            Arc,
        };
        const KILLS: usize = 25;
        const EVERY: Duration = Duration::from_millis(200);
        // 500 datagrams a second: 100 clients, a round every 200 ms. A rate the live
        // handlers keep up with in an emulated VM while two of the four restart there (at
        // 2,000 a second the 6.12 VM's buffers all filled and the kernel dropped about 800,
        // each counted `all-full` by the program). Each client holds the answers to its ~30
        // datagrams unread until the end (its buffer holds about 250; the kernel's
        // RcvbufErrors counts a client socket's drops too: 20 clients at 2,000 a second
        // overflowed theirs).
        const LOAD_FLOWS: usize = 100;
        const LOAD_PACE: Duration = Duration::from_millis(200);
        let addr: SocketAddr = ADDR.parse().unwrap();
        let spawner = group("udp-kill-storm", HandlerKind::Echo)
            .listen(&format!("udp://{ADDR}"))
            .handlers(4)
            .start();
        let before = UdpCounters::read();
        let storm_over = Arc::new(AtomicBool::new(false));
        // From before the first kill until 0.5 s after the last: at most 150 rounds.
        let load = std::thread::spawn({
            let storm_over = storm_over.clone();
            move || {
                let mut over_at: Option<Instant> = None;
                Queries::send_until(addr, LOAD_FLOWS, (3, 150), LOAD_PACE, || {
                    storm_over.load(Ordering::Relaxed)
                        && over_at.get_or_insert_with(Instant::now).elapsed()
                            > Duration::from_millis(500)
                })
            }
        });
        let mut victims = parsrv_integration_tests::Victims::new();
        let mut kills = 0;
        for _ in 0..KILLS {
            std::thread::sleep(EVERY);
            let victim = victims.next(4);
            kills += usize::from(parsrv_integration_tests::kill_handler(
                &spawner.status(),
                victim,
            ));
        }
        storm_over.store(true, Ordering::Relaxed);
        let mut queries = load.join().unwrap();
        let back = wait_for(Duration::from_secs(20), || {
            spawner.status().handlers.iter().all(|h| h.alive && h.ready)
        });
        let answered = queries.answers(queries.sent, Duration::from_secs(10));
        let kernel = before.delta(&UdpCounters::read());
        let status = spawner.status();
        let restarts: u32 = status.handlers.iter().map(|h| h.restarts).sum();
        let lost = queries.sent - answered;
        let detail = format!(
            "{kills} kills, {restarts} restarts; sent {}, answered {answered}; {kernel:?}; {}\n{}",
            queries.sent,
            status.render(),
            spawner.log()
        );
        assert!(back, "a handler did not come back: {detail}");
        assert!(kills >= KILLS * 3 / 4, "only {kills} kills: {detail}");
        assert!(restarts as usize >= kills, "{detail}");
        // Nothing lost in the kernel: every datagram reached a socket with room.
        assert_eq!((kernel.rcvbuf_errors, kernel.no_ports), (0, 0), "{detail}");
        assert_eq!(
            status.datagram_errors.map(|e| e.total()),
            Some(0),
            "{detail}"
        );
        // What a killed process had read and not answered: at most one per kill.
        assert!(lost <= kills, "{detail}");
        figure(&format!(
            "UDP kill storm, 4 handlers, {kills} SIGKILLs in {:?} under {} datagrams at \
             500/s: {lost} lost (read by a killed process), Udp RcvbufErrors +0",
            EVERY * KILLS as u32,
            queries.sent
        ));
        assert!(spawner.stop().success());
    });
}
