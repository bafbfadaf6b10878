//! UDP flow mode (`--udp-mode flow`): each flow (4-tuple) stays on the socket its first
//! datagram went to, while a socket fills and after the flow's idle time-out passes, checked
//! per 4-tuple from the source address of every datagram each socket holds; against the
//! datagram mode, which splits flows between sockets as soon as one fills, in the same test
//! and network namespace. Then a group under `parsrv run` in flow mode with one handler
//! stopped, its status and the kernel's counters.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    os::fd::AsFd,
    time::{Duration, Instant},
};

use parsrv::{
    dataplane::{udp::UdpSettings, Program},
    spec::{HandlerKind, UdpMode},
};
use parsrv_common::udp::UdpSlotCounters;
use parsrv_integration_tests::{
    counter_sum, each_flow_placed_once, figure, group, lru_table_is_sized_as_said, meminfo,
    privileged, program_counters, send_flows, send_from_new_sources, send_round, signal,
    steer_udp_with, stop_process, udp_group, wait_for, Needs, Queries, UdpCounters, ADDR,
    LARGE_BUFFER, SMALL_BUFFER,
};
use socket2::Socket;

const SOCKETS: usize = 4;
const FLOWS: usize = 200;
const PER_FLOW: usize = 10;
const DATAGRAMS: usize = FLOWS * PER_FLOW;

/// Where each flow's datagrams were found: source address -> sockets (by slot) that held
/// any, and the kernel's drops at each socket over the run.
#[derive(Debug)]
struct Placement {
    sockets_of: BTreeMap<SocketAddr, BTreeSet<usize>>,
    read: [u64; SOCKETS],
    drops: [u64; SOCKETS],
    kernel: UdpCounters,
}

impl Placement {
    /// Flows whose datagrams were found on more than one socket.
    fn split(&self) -> usize {
        self.sockets_of.values().filter(|s| s.len() > 1).count()
    }

    /// Flows found on `slot`.
    fn flows_on(&self, slot: usize) -> u64 {
        self.sockets_of
            .values()
            .filter(|s| s.contains(&slot))
            .count() as u64
    }
}

/// Sends FLOWS x PER_FLOW datagrams round by round, reading nothing meanwhile, then reads
/// every socket until every datagram is read or counted dropped by the kernel (at most
/// 10 s).
fn place(sockets: &[Socket], addr: SocketAddr) -> Placement {
    let before = UdpCounters::read();
    let drops_before: Vec<u32> = sockets.iter().map(|s| meminfo(s.as_fd()).drops).collect();
    let clients = send_flows(addr, FLOWS, PER_FLOW);
    let mut sockets_of: BTreeMap<SocketAddr, BTreeSet<usize>> = BTreeMap::new();
    let mut read = [0u64; SOCKETS];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    loop {
        for (slot, socket) in sockets.iter().enumerate() {
            while let Ok((_, from)) = socket.recv_from(&mut buf) {
                read[slot] += 1;
                let from = from.as_socket().expect("an IP source");
                sockets_of.entry(from).or_default().insert(slot);
            }
        }
        let kernel = before.delta(&UdpCounters::read());
        if read.iter().sum::<u64>() + kernel.rcvbuf_errors >= DATAGRAMS as u64
            || Instant::now() > deadline
        {
            let mut drops = [0u64; SOCKETS];
            for (slot, socket) in sockets.iter().enumerate() {
                drops[slot] = (meminfo(socket.as_fd()).drops - drops_before[slot]) as u64;
            }
            let placement = Placement {
                sockets_of,
                read,
                drops,
                kernel,
            };
            // Every datagram read once or dropped by the kernel at a socket, none refused,
            // and every datagram read came from one of this run's clients.
            let detail = format!("{placement:?}");
            assert_eq!(
                read.iter().sum::<u64>() + drops.iter().sum::<u64>(),
                DATAGRAMS as u64,
                "{detail}"
            );
            assert_eq!(
                placement.kernel.rcvbuf_errors,
                drops.iter().sum::<u64>(),
                "{detail}"
            );
            assert_eq!(placement.kernel.no_ports, 0, "{detail}");
            let clients: BTreeSet<SocketAddr> = clients.into_iter().collect();
            assert!(
                placement.sockets_of.keys().all(|a| clients.contains(a)),
                "{detail}"
            );
            return placement;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn each_flow_stays_on_one_socket_while_one_fills_where_the_datagram_mode_splits_flows() {
    privileged(Needs::program_of(Program::UdpFlow), || {
        // Socket 0 stands for a stalled handler: a small buffer nobody reads during the run.
        let buffers = [SMALL_BUFFER, LARGE_BUFFER, LARGE_BUFFER, LARGE_BUFFER];

        // The control: the datagram mode moves a flow's later datagrams off socket 0 once
        // it fills, so the flows hashed there are found on two sockets.
        let (sockets, addr) = udp_group(&buffers);
        let datagram = steer_udp_with(&sockets, UdpSettings::datagram());
        let control = place(&sockets, addr);
        let control_counters = datagram.slot_counters(SOCKETS as u32).unwrap();
        let detail = format!("datagram mode: {control:?}, program {control_counters:?}");
        assert!(control.split() > 0, "no flow was split: {detail}");
        assert_eq!(control.kernel.rcvbuf_errors, 0, "{detail}");
        drop((datagram, sockets));

        // Flow mode: every flow on one socket, whatever socket 0's room.
        let (sockets, addr) = udp_group(&buffers);
        let flow = steer_udp_with(&sockets, UdpSettings::flow(Duration::from_secs(60), 4096));
        let placed = place(&sockets, addr);
        let counters = flow.slot_counters(SOCKETS as u32).unwrap();
        let errors = flow.errors().unwrap();
        let detail = format!("flow mode: {placed:?}, program {counters:?}, errors {errors:?}");
        assert_eq!(placed.split(), 0, "a flow was split: {detail}");
        assert_eq!(
            placed.sockets_of.len(),
            FLOWS,
            "every flow was read: {detail}"
        );
        assert_eq!(errors.total(), 0, "{detail}");
        // Each flow placed once, by room; its other datagrams followed it.
        assert_eq!(
            counter_sum(&counters, |c| c.flows),
            FLOWS as u64,
            "{detail}"
        );
        assert_eq!(
            counter_sum(&counters, |c| c.kept) + counter_sum(&counters, |c| c.steered_in),
            FLOWS as u64,
            "{detail}"
        );
        assert_eq!(
            counter_sum(&counters, |c| c.flow_datagrams),
            (DATAGRAMS - FLOWS) as u64,
            "{detail}"
        );
        for (slot, c) in counters.iter().enumerate() {
            assert_eq!(placed.flows_on(slot), c.flows, "slot {slot}: {detail}");
            // What a socket got is its flows' datagrams: read there, or dropped there.
            assert_eq!(
                placed.read[slot] + placed.drops[slot],
                c.flows + c.flow_datagrams,
                "slot {slot}: {detail}"
            );
        }
        // New flows went elsewhere once socket 0 had no room, and only socket 0 dropped:
        // the flows it kept lost what did not fit.
        assert!(counters[0].steered_away > 0, "{detail}");
        assert!(counters[0].flows < (FLOWS / SOCKETS) as u64, "{detail}");
        assert_eq!(placed.drops[1..], [0, 0, 0], "{detail}");
        let table = flow.flows(usize::MAX).unwrap();
        assert_eq!(table.len(), FLOWS, "{detail}");
        for recorded in &table {
            assert!(recorded.idle < Duration::from_secs(60), "{recorded:?}");
        }
        figure(&format!(
            "{FLOWS} flows x {PER_FLOW} datagrams, socket 0 small and unread: datagram mode \
             split {} flows between sockets; flow mode split 0, placed {} flows on socket 0 \
             (its {} datagrams beyond its buffer dropped, Udp RcvbufErrors) and {} elsewhere",
            control.split(),
            counters[0].flows,
            placed.drops[0],
            FLOWS as u64 - counters[0].flows
        ));
    });
}

/// SO_RCVBUF of `socket`, the kernel's smallest (about 2.3 KiB): below the program's 4 KiB
/// reserve, so the socket has no room by the program's measure, though a datagram or two
/// still fit.
fn shrink_buffer(socket: &Socket) {
    socket.set_recv_buffer_size(1).unwrap();
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_flow_stays_on_a_socket_without_room_and_is_placed_again_after_its_idle_time_out() {
    privileged(Needs::program_of(Program::UdpFlow), || {
        const TIMEOUT: Duration = Duration::from_secs(2);
        let (sockets, addr) = udp_group(&[LARGE_BUFFER; SOCKETS]);
        let flow = steer_udp_with(&sockets, UdpSettings::flow(TIMEOUT, 64));
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
        // Where one datagram went: the socket that holds it (waiting at most 5 s).
        let received_on = |buf: &mut [std::mem::MaybeUninit<u8>]| -> usize {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                for (slot, socket) in sockets.iter().enumerate() {
                    if socket.recv_from(buf).is_ok() {
                        return slot;
                    }
                }
                assert!(Instant::now() < deadline, "no socket got the datagram");
                std::thread::sleep(Duration::from_millis(5));
            }
        };

        client.send_to(b"first", addr).unwrap();
        let first = received_on(&mut buf);
        let placed_at = Instant::now();
        shrink_buffer(&sockets[first]);
        // Within the time-out: the flow stays on its socket, which has no room.
        client.send_to(b"second", addr).unwrap();
        let second = received_on(&mut buf);
        let within = placed_at.elapsed();
        // Idle past the time-out: placed again, by room, so elsewhere.
        std::thread::sleep(TIMEOUT + Duration::from_millis(500));
        client.send_to(b"third", addr).unwrap();
        let third = received_on(&mut buf);
        let counters = flow.slot_counters(SOCKETS as u32).unwrap();
        let detail = format!(
            "sockets {first}, {second}, {third}; second sent {within:?} after the first; \
             program {counters:?}"
        );
        assert!(within < TIMEOUT, "the test was too slow to check: {detail}");
        assert_eq!(second, first, "{detail}");
        assert_ne!(third, first, "{detail}");
        assert_eq!(counters[first].flows, 1, "{detail}");
        assert_eq!(counters[first].flow_datagrams, 1, "{detail}");
        assert_eq!(counters[first].steered_away, 1, "{detail}");
        assert_eq!(counters[third].flows, 1, "{detail}");
        assert_eq!(counters[third].steered_in, 1, "{detail}");
        assert_eq!(flow.errors().unwrap().total(), 0, "{detail}");
        // One entry, the flow's, now on its new socket.
        let table = flow.flows(usize::MAX).unwrap();
        assert_eq!(table.len(), 1, "{table:?}");
        assert_eq!(table[0].slot as usize, third, "{table:?}");
        assert_eq!(
            std::net::SocketAddr::from((
                std::net::Ipv6Addr::from(table[0].key.source)
                    .to_ipv4_mapped()
                    .expect("an IPv4 flow is keyed by its mapped address"),
                u16::from_be(table[0].key.source_port)
            )),
            client.local_addr().unwrap(),
            "{table:?}"
        );
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_flow_mode_group_keeps_each_flow_on_its_handler_with_one_handler_stopped() {
    privileged(Needs::program_of(Program::UdpFlow), || {
        const PACE: Duration = Duration::from_millis(10);
        const PER_FLOW: usize = 3;
        const DATAGRAMS: usize = FLOWS * PER_FLOW;
        const TABLE: u32 = 8192;
        // 64 KiB: about 75 datagrams of 32 bytes. All 200 flows start in the first round,
        // while the stopped handler's socket is empty, so it gets its hash share, about 50
        // flows and 150 datagrams: it keeps them, and drops what does not fit.
        const BUFFER: u32 = 65536;
        const METRICS: &str = "127.0.0.1:9464";
        let builder = group("udp-flows", HandlerKind::Echo)
            .listen(&format!("udp://{ADDR}"))
            .handlers(SOCKETS as u32)
            .metrics(METRICS)
            .with(|s| {
                s.udp_mode = UdpMode::Flow;
                s.flow_table = TABLE;
                s.receive_buffer = BUFFER;
            });
        let said = builder
            .spec
            .table_memory()
            .expect("a flow table's memory is said");
        let spawner = builder.start();
        lru_table_is_sized_as_said(
            spawner.pid(),
            TABLE,
            size_of::<parsrv_common::udp::FlowKey>(),
            &said,
        );
        let addr: SocketAddr = ADDR.parse().unwrap();
        let pid = spawner.handler_pid(0);
        stop_process(pid);
        let before = UdpCounters::read();
        let mut queries = Queries::send(addr, FLOWS, PER_FLOW, PACE);
        let answered_while_stopped =
            queries.answers_until_quiet(Duration::from_millis(500), Duration::from_secs(5));
        let stopped = spawner.status();
        signal(pid, nix::sys::signal::Signal::SIGCONT);
        let kernel_now = || before.delta(&UdpCounters::read());
        let lost = kernel_now().rcvbuf_errors as usize;
        let answered = queries.answers(DATAGRAMS - lost, Duration::from_secs(10));
        let kernel = kernel_now();
        let after = spawner.status();
        let counters = program_counters(&after);
        let table = after.flow_table.expect("a flow group's table");
        let detail = format!(
            "{kernel:?}, {answered_while_stopped} answered while handler 0 was stopped, \
             {answered} in all; {table:?}; {}",
            after.render()
        );
        // Every datagram answered, or dropped by the kernel at the stopped handler's socket
        // (a flow stays with its handler, full or not); none refused.
        assert_eq!(
            answered + kernel.rcvbuf_errors as usize,
            DATAGRAMS,
            "{detail}"
        );
        assert_eq!(kernel.no_ports, 0, "{detail}");
        assert_eq!(
            after.datagram_errors.map(|e| e.total()),
            Some(0),
            "{detail}"
        );
        assert!(answered_while_stopped < DATAGRAMS, "{detail}");
        let drops: Vec<u64> = after
            .sockets
            .iter()
            .map(|s| {
                s.datagrams
                    .as_ref()
                    .and_then(|d| d.buffer)
                    .map_or(0, |b| b.drops as u64)
            })
            .collect();
        assert_eq!(drops[1..], [0, 0, 0], "{detail}");
        assert!(drops[0] > 0, "the stopped handler's flows stayed: {detail}");
        assert!(
            after.sockets.iter().all(|s| s
                .datagrams
                .as_ref()
                .and_then(|d| d.buffer)
                .is_some_and(|b| b.size == BUFFER)),
            "--receive-buffer sets every socket's: {detail}"
        );
        // Each flow placed once; the rest of each followed it.
        each_flow_placed_once(&counters, FLOWS, DATAGRAMS, &detail);
        assert_eq!(table.entries, FLOWS as u64, "{detail}");
        assert_eq!(table.live, FLOWS as u64, "{detail}");
        assert!(!table.truncated, "{detail}");
        // The table took one entry per flow and evicted none.
        assert_eq!(
            (table.added, table.evicted),
            (Some(FLOWS as u64), Some(0)),
            "{detail}"
        );
        // Each handler answered exactly its flows' datagrams that its socket took: the
        // first of each (kept or steered in) and the rest.
        for (slot, (handler, c)) in after.handlers.iter().zip(&counters).enumerate() {
            assert_eq!(
                handler.accepted.map(|n| n + drops[slot]),
                Some(c.kept + c.steered_in + c.flow_datagrams),
                "slot {slot}: {detail}"
            );
            let live = after.sockets[slot].datagrams.as_ref().and_then(|d| d.flows);
            assert_eq!(live, Some(c.flows), "slot {slot}: {detail}");
        }
        let text = stopped.render();
        assert!(text.contains("udp mode flow"), "{text}");
        assert!(text.contains(", 0 evicted,"), "{text}");
        // Metrics say what the status says (nothing sends meanwhile).
        let (code, page) = parsrv_integration_tests::get_page_from(
            None,
            METRICS.parse().unwrap(),
            "/metrics",
            Duration::from_secs(2),
        )
        .unwrap();
        assert_eq!(code, 200, "{page}");
        let group_sample = |name: &str| -> Option<f64> {
            let prefix = format!("{name}{{group=\"udp-flows\"}} ");
            page.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .map(|v| v.parse().unwrap())
        };
        for (name, value) in [
            ("parsrv_flow_table_entries", table.entries),
            ("parsrv_flow_table_added_total", FLOWS as u64),
            ("parsrv_flow_table_evicted_total", 0),
        ] {
            assert_eq!(group_sample(name), Some(value as f64), "{name}: {page}");
        }
        for (slot, c) in counters.iter().enumerate() {
            let sample = |name: &str| -> Option<f64> {
                let prefix = format!("{name}{{group=\"udp-flows\",slot=\"{slot}\"}} ");
                page.lines()
                    .find_map(|l| l.strip_prefix(&prefix))
                    .map(|v| v.parse().unwrap())
            };
            let live = after.sockets[slot].datagrams.as_ref().and_then(|d| d.flows);
            assert_eq!(
                sample("parsrv_socket_flows"),
                live.map(|n| n as f64),
                "{page}"
            );
            assert_eq!(
                sample("parsrv_socket_datagrams_flow_datagrams_total"),
                Some(c.flow_datagrams as f64),
                "{page}"
            );
        }
        figure(&format!(
            "flow mode, {BUFFER}-byte buffers, handler 0 of 4 stopped, {FLOWS} flows x \
             {PER_FLOW}: handler 0 kept its {} flows, answered {} of their datagrams once \
             resumed, the kernel dropped {} at its socket; the other handlers dropped 0",
            counters[0].flows,
            after.handlers[0].accepted.unwrap_or(0),
            drops[0]
        ));
        assert!(spawner.stop().success());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_rolling_restart_under_load_loses_no_datagram_and_moves_no_flow() {
    privileged(Needs::program_of(Program::UdpFlow), || {
        // Open loop: 200 flows, a round of one datagram each every 25 ms for 2 s or more
        // (a restart takes about 0.2 s here, more in an emulated VM), while every handler
        // is replaced one at a time.
        const PER_FLOW: usize = 80;
        const DATAGRAMS: usize = FLOWS * PER_FLOW;
        const PACE: Duration = Duration::from_millis(25);
        let name = "udp-restart";
        let spawner = group(name, HandlerKind::Echo)
            .listen(&format!("udp://{ADDR}"))
            .handlers(SOCKETS as u32)
            .with(|s| s.udp_mode = UdpMode::Flow)
            .start();
        let before_pids: Vec<Option<u32>> =
            spawner.status().handlers.iter().map(|h| h.pid).collect();
        let before = UdpCounters::read();
        let load_start = Instant::now();
        let restart = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let result = parsrv_integration_tests::Spawner::parsrv(&["group", "restart", name]);
            (result, Instant::now())
        });
        let mut queries = Queries::send(ADDR.parse().unwrap(), FLOWS, PER_FLOW, PACE);
        let load_end = Instant::now();
        let ((code, out, err), restart_end) = restart.join().unwrap();
        let answered = queries.answers(DATAGRAMS, Duration::from_secs(20));
        let kernel = before.delta(&UdpCounters::read());
        let after = spawner.status();
        let counters = program_counters(&after);
        let detail = format!(
            "restart exit {code}: {out}{err}; {kernel:?}, {answered} answered; {}",
            after.render()
        );
        assert_eq!(code, 0, "{detail}");
        assert!(out.contains("replaced all 4 handlers"), "{detail}");
        // The test's premise: the restart ended while the load still ran.
        assert!(
            restart_end < load_end,
            "the restart outlasted the load (make the load longer): {detail}"
        );
        // Every datagram answered: those in a socket's buffer while its handler changed
        // waited there for the next one.
        assert_eq!(answered, DATAGRAMS, "{detail}");
        assert_eq!(kernel.rcvbuf_errors, 0, "{detail}");
        assert_eq!(kernel.no_ports, 0, "{detail}");
        // Every handler replaced, and no flow placed twice: each stayed on its socket.
        for (old, new) in before_pids.iter().zip(&after.handlers) {
            assert!(new.pid.is_some() && new.pid != *old, "{detail}");
        }
        each_flow_placed_once(&counters, FLOWS, DATAGRAMS, &detail);
        figure(&format!(
            "flow mode, all 4 handlers replaced one at a time (done {:?} into a {:?} load) \
             under {FLOWS} flows x {PER_FLOW} (open loop, a round every {PACE:?}): {answered} \
             of {DATAGRAMS} answered, no flow placed twice",
            restart_end - load_start,
            load_end - load_start
        ));
        assert!(spawner.stop().success());
    });
}

/// A UDP group outlives its spawner: killed (SIGKILL) under open-loop load, the next spawner
/// takes over its handlers, sockets, program and flow table. Every datagram is answered
/// (what came while no spawner ran was steered by the program the group kept), the
/// handlers are the same processes, and no flow is placed twice: the table and the
/// counters the kernel keeps for the program go on across the adoption. The kernel's own
/// counters agree (no receive-buffer error, no ICMP).
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_killed_spawners_flow_group_is_adopted_under_load_losing_no_datagram_and_moving_no_flow() {
    privileged(Needs::program_of(Program::UdpFlow), || {
        // Open loop: 100 flows, a round every 25 ms, from before the spawner is killed
        // (0.2 s in) until 1 s after the next one has taken over (0.1 s later here, 1.5 to
        // 4 s in an emulated VM); at least 2 s, at most 30 s.
        const FLOWS: usize = 100;
        const PACE: Duration = Duration::from_millis(25);
        let name = "udp-adopt";
        let builder = move || {
            group(name, HandlerKind::Echo)
                .listen(&format!("udp://{ADDR}"))
                .handlers(SOCKETS as u32)
                .with(|s| s.udp_mode = UdpMode::Flow)
        };
        let first = builder().start();
        let handlers: Vec<u32> = (0..SOCKETS).map(|slot| first.handler_pid(slot)).collect();
        let before = UdpCounters::read();
        let load_start = Instant::now();
        let first_pid = first.pid();
        let finished = std::sync::Arc::new(std::sync::OnceLock::new());
        let takeover = std::thread::spawn({
            let finished = finished.clone();
            move || {
                std::thread::sleep(Duration::from_millis(200));
                signal(first_pid, nix::sys::signal::Signal::SIGKILL);
                let next = builder().start();
                let _ = finished.set(Instant::now());
                next
            }
        });
        let mut queries =
            Queries::send_until(ADDR.parse().unwrap(), FLOWS, (80, 1200), PACE, || {
                finished
                    .get()
                    .is_some_and(|at: &Instant| at.elapsed() > Duration::from_secs(1))
            });
        let load_end = Instant::now();
        let next = takeover.join().unwrap();
        let adopted_at = *finished.get().unwrap();
        let (datagrams, per_flow) = (queries.sent, queries.sent / FLOWS);
        let answered = queries.answers(datagrams, Duration::from_secs(20));
        let kernel = before.delta(&UdpCounters::read());
        let after = next.status();
        let counters = program_counters(&after);
        let detail = format!(
            "{kernel:?}, {answered} answered; {}\nfirst spawner: {}\nnext spawner: {}",
            after.render(),
            first.log(),
            next.log()
        );
        assert!(
            next.log().contains("adopting its running handlers"),
            "{detail}"
        );
        // The test's premise: the adoption came while the load still ran.
        assert!(
            adopted_at < load_end,
            "the adoption outlasted the load (make the load longer): {detail}"
        );
        assert_eq!(
            after.handlers.iter().map(|h| h.pid).collect::<Vec<_>>(),
            handlers.iter().map(|&p| Some(p)).collect::<Vec<_>>(),
            "{detail}"
        );
        assert!(after.handlers.iter().all(|h| h.restarts == 0), "{detail}");
        assert_eq!(answered, datagrams, "{detail}");
        assert_eq!(kernel.rcvbuf_errors, 0, "{detail}");
        assert_eq!(kernel.no_ports, 0, "{detail}");
        assert_eq!(
            after.datagram_errors.map(|e| e.total()),
            Some(0),
            "{detail}"
        );
        // Counted by the program from the group's start, across both spawners: each flow
        // placed once, every later datagram found in the table.
        each_flow_placed_once(&counters, FLOWS, datagrams, &detail);
        figure(&format!(
            "flow mode, spawner killed {:?} into a {:?} open-loop load ({FLOWS} flows x \
             {per_flow}, a round every {PACE:?}) and adopted {:?} in: {answered} of \
             {datagrams} answered, no flow placed twice, the same {SOCKETS} handlers",
            Duration::from_millis(200),
            load_end - load_start,
            adopted_at - load_start
        ));
        drop(first);
        assert!(next.stop().success(), "{detail}");
    });
}

/// Flows on one socket across a resize, as udpgrm's generations keep them: a flow group
/// grows from 2 to 3 handlers under load, and the flows placed before stay where they are
/// (the new socket gets none of them, only new flows); it then shrinks back to 2 while
/// flows still run on the socket that leaves: that socket takes no new flow from then on,
/// the step down waits until its flows have gone idle, and none of them is placed again.
/// Every datagram of the three loads is answered; the kernel counts no receive-buffer
/// error and no ICMP.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_flow_group_grows_and_shrinks_under_load_and_no_flow_changes_socket() {
    privileged(Needs::program_of(Program::UdpFlow), || {
        use std::sync::{atomic::AtomicBool, atomic::Ordering, Arc, OnceLock};
        const PACE: Duration = Duration::from_millis(25);
        // Load A: placed on 2 sockets, going on while the group grows. Load B: new flows,
        // placed on 3, going on while it shrinks. Load C: new flows while the top socket
        // leaves. A and B last as long as what they span (bounded in rounds).
        const A_FLOWS: usize = 60;
        const B_FLOWS: usize = 90;
        const C: (usize, usize) = (30, 20);
        let name = "udp-resize";
        let addr: SocketAddr = ADDR.parse().unwrap();
        let spawner = group(name, HandlerKind::Echo)
            .listen(&format!("udp://{ADDR}"))
            .handlers_between(2, 3)
            .grace(30.0)
            .with(|s| {
                s.udp_mode = UdpMode::Flow;
                s.flow_timeout = 1.0;
            })
            .start();
        let before = UdpCounters::read();
        let resize = |handlers: u32| {
            let handlers = handlers.to_string();
            parsrv_integration_tests::Spawner::parsrv(&["group", "resize", name, &handlers])
        };
        let flows_by_slot = |spawner: &parsrv_integration_tests::Spawner| -> Vec<u64> {
            program_counters(&spawner.status())
                .iter()
                .map(|c| c.flows)
                .collect()
        };

        // Grow under load A, which goes on until 0.3 s after the step up.
        let grown = Arc::new(OnceLock::new());
        let grow = std::thread::spawn({
            let grown = grown.clone();
            move || {
                std::thread::sleep(Duration::from_millis(300));
                let result = resize(3);
                let _ = grown.set(Instant::now());
                result
            }
        });
        let mut a = Queries::send_until(addr, A_FLOWS, (20, 1200), PACE, || {
            grown
                .get()
                .is_some_and(|at: &Instant| at.elapsed() > Duration::from_millis(300))
        });
        let (code, out, err) = grow.join().unwrap();
        assert_eq!(code, 0, "{out}{err}\n{}", spawner.log());
        let after_a = flows_by_slot(&spawner);
        assert_eq!(after_a.len(), 3, "{}", spawner.status().render());
        // A's flows stayed on the two sockets they were placed on.
        assert_eq!(after_a, [after_a[0], after_a[1], 0]);
        assert_eq!(after_a[0] + after_a[1], A_FLOWS as u64);

        // The new socket serves once its handler is ready (until then the program sends it
        // nothing while another has room: seconds in an emulated VM).
        let serving = wait_for(Duration::from_secs(20), || {
            spawner.status().sockets[2].state == parsrv::listeners::SocketState::Serving
        });
        assert!(serving, "the new slot never served: {}", spawner.log());

        // Shrink under load B, whose flows the hash spreads over 3 sockets; B goes on
        // until load C is done.
        let c_done = Arc::new(AtomicBool::new(false));
        let b_load = std::thread::spawn({
            let c_done = c_done.clone();
            move || {
                Queries::send_until(addr, B_FLOWS, (20, 1200), PACE, || {
                    c_done.load(Ordering::Relaxed)
                })
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let before_shrink = flows_by_slot(&spawner);
        let on_leaving = before_shrink[2];
        assert!(
            on_leaving > 0,
            "no flow of B on the top socket: {before_shrink:?}"
        );
        let shrink_started = Instant::now();
        let shrink = std::thread::spawn(move || (resize(2), Instant::now()));
        // Load C once the top socket is marked as leaving: none of its flows goes there.
        let marked = wait_for(Duration::from_secs(20), || {
            spawner.status().sockets[2].state == parsrv::listeners::SocketState::AwaitingHandler
        });
        assert!(marked, "the top socket was never marked: {}", spawner.log());
        let mut c = Queries::send(addr, C.0, C.1, PACE);
        let during = flows_by_slot(&spawner);
        c_done.store(true, Ordering::Relaxed);
        let detail = format!("{}\n{}", spawner.status().render(), spawner.log());
        assert_eq!(
            during.len(),
            3,
            "the top socket left before its flows ended: {detail}"
        );
        assert_eq!(
            during[2], on_leaving,
            "a new flow went to the leaving socket: {detail}"
        );
        let mut b = b_load.join().unwrap();
        let b_end = Instant::now();
        let ((code, out, err), shrunk_at) = shrink.join().unwrap();
        let detail = format!(
            "{out}{err}\n{}\n{}",
            spawner.status().render(),
            spawner.log()
        );
        assert_eq!(code, 0, "{detail}");
        // The step down waited for B's flows on the leaving socket to end.
        assert!(
            shrunk_at > b_end,
            "shrunk {:?} before B ended: {detail}",
            b_end - shrunk_at
        );
        assert!(spawner.log().contains("slot 2 wound down"), "{detail}");

        let sent = a.sent + b.sent + c.sent;
        let answered = a.answers(a.sent, Duration::from_secs(20))
            + b.answers(b.sent, Duration::from_secs(20))
            + c.answers(c.sent, Duration::from_secs(20));
        let kernel = before.delta(&UdpCounters::read());
        let after = flows_by_slot(&spawner);
        let detail = format!(
            "{kernel:?}; {}\n{}",
            spawner.status().render(),
            spawner.log()
        );
        assert_eq!(answered, sent, "{detail}");
        assert_eq!((kernel.rcvbuf_errors, kernel.no_ports), (0, 0), "{detail}");
        // No flow placed again: the two sockets left hold what they had before the step
        // down, and C's flows.
        assert_eq!(after.len(), 2, "{detail}");
        assert_eq!(
            after[0] + after[1],
            before_shrink[0] + before_shrink[1] + C.0 as u64,
            "{detail}"
        );
        assert_eq!(
            spawner.status().datagram_errors.map(|e| e.total()),
            Some(0),
            "{detail}"
        );
        figure(&format!(
            "flow mode, 2 -> 3 -> 2 handlers under load: {on_leaving} flows on the leaving \
             socket finished there, the step down took {:?} (until they were idle for the \
             1 s time-out); {answered} datagrams answered, no flow placed twice",
            shrunk_at - shrink_started
        ));
        assert!(spawner.stop().success());
    });
}

/// The flood tests' table: far smaller than the flood, so that it evicts.
const FLOOD_TABLE: u32 = 256;
/// Flows that were there before the flood and come back after it.
const REAL_FLOWS: usize = 100;
/// New flows of the flood, each from its own source address.
const FLOOD: usize = 2_000;

/// Reads `sockets` until `want` datagrams were read (at most 10 s): each one's source and
/// the slot it was read on, in the order read.
fn read_sources(sockets: &[Socket], want: usize) -> Vec<(SocketAddr, usize)> {
    let mut read = Vec::new();
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 128];
    let deadline = Instant::now() + Duration::from_secs(10);
    while read.len() < want && Instant::now() < deadline {
        for (slot, socket) in sockets.iter().enumerate() {
            while let Ok((_, from)) = socket.recv_from(&mut buf) {
                read.push((from.as_socket().expect("an IP source"), slot));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(read.len(), want, "datagrams read within 10 s");
    read
}

/// A flood of new keys between two rounds of real flows (a datagram each): the table of
/// `settings` (FLOOD_TABLE entries) evicts the real flows' entries, the program's `added`
/// counter shows it, and each real flow, placed again, goes back to the socket it was on,
/// though socket 0 has no room from the start and the flows its hash choice takes were
/// placed on a second choice. `real(flow)` and `flood(i)` are the datagrams' bytes.
fn flood_between_two_rounds(
    settings: UdpSettings,
    real: impl Fn(usize) -> Vec<u8>,
    flood: impl Fn(usize) -> Vec<u8>,
) {
    let (sockets, addr) = udp_group(&[LARGE_BUFFER; SOCKETS]);
    shrink_buffer(&sockets[0]);
    let steering = steer_udp_with(&sockets, settings);
    let counters = || steering.slot_counters(SOCKETS as u32).unwrap();
    let added = || steering.table_counters().unwrap().expect("a table").added;
    let kernel_before = UdpCounters::read();

    let clients = parsrv_integration_tests::clients(REAL_FLOWS);
    send_round(&clients, addr, &real);
    let first: BTreeMap<SocketAddr, usize> =
        read_sources(&sockets, REAL_FLOWS).into_iter().collect();
    let before_flood = counters();
    send_from_new_sources(addr, FLOOD, &flood);
    read_sources(&sockets, FLOOD);
    let after_flood = counters();
    let added_after_flood = added();
    let entries = steering.placed(usize::MAX).unwrap().len() as u64;

    send_round(&clients, addr, &real);
    let second = read_sources(&sockets, REAL_FLOWS);
    let after = counters();
    let delta = |field: fn(&UdpSlotCounters) -> u64| {
        counter_sum(&after, field) - counter_sum(&after_flood, field)
    };
    let placed_again = delta(|c| c.flows);
    let followed = delta(|c| c.flow_datagrams);
    let moved: Vec<_> = second
        .iter()
        .filter(|(source, slot)| first.get(source) != Some(slot))
        .collect();
    let kernel = kernel_before.delta(&UdpCounters::read());
    let detail = format!(
        "table {entries} entries, added {added_after_flood} by the flood's end; \
         placed again {placed_again}, followed {followed}; moved {moved:?}; \
         before the flood {before_flood:?}, after it {after_flood:?}, at the end {after:?}; \
         {kernel:?}"
    );

    // The premises: flows hashed to socket 0 were placed on a second choice, the flood
    // overflowed the table, and it evicted (nearly) every real flow's entry.
    assert_eq!(first.len(), REAL_FLOWS, "{detail}");
    assert!(before_flood[0].steered_away > 0, "{detail}");
    assert_eq!(before_flood[0].flows, 0, "{detail}");
    assert!(entries <= FLOOD_TABLE as u64, "{detail}");
    assert!(placed_again >= REAL_FLOWS as u64 * 9 / 10, "{detail}");
    assert!(
        after[0].steered_away > after_flood[0].steered_away,
        "{detail}"
    );
    // Every key the table did not hold was counted added, and nothing else.
    assert_eq!(added_after_flood, (REAL_FLOWS + FLOOD) as u64, "{detail}");
    assert_eq!(added(), added_after_flood + placed_again, "{detail}");
    assert!(
        added_after_flood - entries >= (REAL_FLOWS + FLOOD) as u64 - FLOOD_TABLE as u64,
        "evictions: {detail}"
    );
    // What is tested: no real flow changed socket, placed again or not.
    assert_eq!(placed_again + followed, REAL_FLOWS as u64, "{detail}");
    assert!(moved.is_empty(), "{detail}");
    assert_eq!(steering.errors().unwrap().total(), 0, "{detail}");
    assert_eq!((kernel.rcvbuf_errors, kernel.no_ports), (0, 0), "{detail}");
    figure(&format!(
        "{:?} mode, table of {FLOOD_TABLE}: a flood of {FLOOD} new keys evicted {} entries \
         ({placed_again} of the {REAL_FLOWS} real flows'); placed again, 0 of them changed \
         socket ({} had been steered off the full socket 0)",
        settings.mode,
        added_after_flood - entries,
        before_flood[0].steered_away
    ));
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_flood_of_new_flows_evicts_real_ones_counted_and_each_is_placed_again_on_its_socket() {
    privileged(Needs::program_of(Program::UdpFlow), || {
        flood_between_two_rounds(
            UdpSettings::flow(Duration::from_secs(60), FLOOD_TABLE),
            |flow| format!("real flow {flow}").into_bytes(),
            |i| format!("flood {i}").into_bytes(),
        );
    });
}

/// A QUIC Initial's first bytes (long header, version 1) with destination connection ID
/// `dcid`, padded to 64 bytes: all the quic program reads. The IDs start with 0xd0 0x5e, so
/// they are no socket cookie (cookies are small counters).
fn initial(dcid: u64) -> Vec<u8> {
    let mut packet = vec![0xc0, 0, 0, 0, 1, 8];
    packet.extend_from_slice(&(0xd05e_0000_0000_0000 | dcid).to_be_bytes());
    packet.resize(64, 0);
    packet
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_flood_of_made_up_quic_initials_evicts_real_first_flights_counted_and_each_stays_on_its_socket()
{
    privileged(Needs::program_of(Program::UdpQuic), || {
        // Each real client's first flight: two Initials with its ID, the flood between them.
        flood_between_two_rounds(
            UdpSettings {
                mode: UdpMode::Quic,
                ..UdpSettings::flow(Duration::from_secs(60), FLOOD_TABLE)
            },
            |flow| initial(flow as u64),
            |i| initial((1 << 32) + i as u64),
        );
    });
}

/// A sender that learned a socket's cookie (from a connection ID its server gave out) aims
/// a flood of short-header packets at it: quic mode sends each to that socket whatever its
/// room, so the flood fills that one buffer and the kernel drops there, and the other
/// sockets lose nothing: the first flights of 100 real clients sent meanwhile are all
/// placed elsewhere and all read.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_flood_aimed_at_one_sockets_cookie_fills_that_socket_only_and_new_connections_go_elsewhere() {
    privileged(Needs::program_of(Program::UdpQuic), || {
        let mut buffers = [LARGE_BUFFER; SOCKETS];
        buffers[0] = SMALL_BUFFER;
        let (sockets, addr) = udp_group(&buffers);
        let steering = steer_udp_with(
            &sockets,
            UdpSettings {
                mode: UdpMode::Quic,
                ..UdpSettings::flow(Duration::from_secs(60), 4096)
            },
        );
        let cookie = parsrv::kernel::socket_cookie(sockets[0].as_fd()).unwrap();
        let aimed = |_: usize| {
            // A short header (1-RTT), its connection ID starting with socket 0's cookie.
            let mut packet = vec![0x40];
            packet.extend_from_slice(&cookie.to_be_bytes());
            packet.resize(64, 0xaa);
            packet
        };
        let kernel_before = UdpCounters::read();
        let drops_before: Vec<u32> = sockets.iter().map(|s| meminfo(s.as_fd()).drops).collect();
        let clients = parsrv_integration_tests::clients(REAL_FLOWS);
        // Half the flood, the real clients' first Initials, the other half, their second.
        send_from_new_sources(addr, FLOOD / 2, aimed);
        send_round(&clients, addr, |flow| initial(flow as u64));
        send_from_new_sources(addr, FLOOD / 2, |i| aimed(i + FLOOD / 2));
        send_round(&clients, addr, |flow| initial(flow as u64));
        let counters = steering.slot_counters(SOCKETS as u32).unwrap();
        let kernel = kernel_before.delta(&UdpCounters::read());
        let drops: Vec<u64> = sockets
            .iter()
            .zip(&drops_before)
            .map(|(s, before)| (meminfo(s.as_fd()).drops - before) as u64)
            .collect();
        // What the other sockets hold: the real clients' Initials, two each, and nothing else.
        let read = read_sources(&sockets[1..], 2 * REAL_FLOWS);
        let real: BTreeSet<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
        let detail = format!(
            "program {counters:?}; drops {drops:?}; {kernel:?}; errors {:?}",
            steering.errors().unwrap()
        );
        assert_eq!(counters[0].cookie_datagrams, FLOOD as u64, "{detail}");
        assert!(drops[0] > 0, "the flood did not fill socket 0: {detail}");
        assert_eq!(drops[1..], [0, 0, 0], "{detail}");
        assert_eq!(kernel.rcvbuf_errors, drops[0], "{detail}");
        assert!(
            read.iter().all(|(source, _)| real.contains(source)),
            "{detail}"
        );
        // Each real first flight placed once, off the full socket 0, and followed.
        assert_eq!(
            counter_sum(&counters, |c| c.flows),
            REAL_FLOWS as u64,
            "{detail}"
        );
        assert_eq!(counters[0].flows, 0, "{detail}");
        assert_eq!(
            counter_sum(&counters, |c| c.flow_datagrams),
            REAL_FLOWS as u64,
            "{detail}"
        );
        assert_eq!(steering.errors().unwrap().total(), 0, "{detail}");
        figure(&format!(
            "{FLOOD} packets aimed at socket 0's cookie: all to socket 0 ({} dropped there, \
             Udp RcvbufErrors +{}), 0 dropped elsewhere; {REAL_FLOWS} real first flights \
             meanwhile all placed on the other sockets and read",
            drops[0], kernel.rcvbuf_errors
        ));
    });
}
