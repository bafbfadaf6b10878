//! `cluster`: what the host dispatchers cost and what they save, on the 3-host topology of
//! the cluster tests (clients -> router with an L4-hashed multipath route -> 3 hosts; all
//! network namespaces, documentation addresses).
//!
//! - Throughput: short connections (connect, one echo, close) from 20 client addresses for a
//!   fixed time, through the plain multipath route (no agent, no dispatcher) and with the
//!   three dispatchers running, as interleaved pairs. With the dispatchers each client is
//!   served by one host, so about two thirds of its packets take one more hop (forwarded
//!   on the segment by the host the route chose).
//! - The dispatcher's cost per packet: its run time over its runs (bpf_stats), summed over
//!   the three hosts.
//! - Broken connections per membership change: 60 long-lived connections, a host removed
//!   from the route and one added back, with and without the dispatchers.

use std::{
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use parsrv_integration_tests::{
    cluster::{LongLived, Topology, SERVICE, SERVICE_PORT},
    program_runs,
};

use crate::{
    harness::seconds,
    report::{Report, Table},
    stats::{median, spread},
};

/// Connections opened, one echo each, and closed, from every client address at once for
/// `duration`: (completed, failed, elapsed).
fn short_connections(topology: &Topology, duration: Duration) -> (u64, u64, Duration) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let service: SocketAddr = format!("{SERVICE}:{SERVICE_PORT}").parse().unwrap();
    let started = Instant::now();
    let threads: Vec<_> = topology
        .client_addrs
        .iter()
        .map(|&client| {
            let ns = format!("/run/netns/{}", topology.clients);
            let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
            thread::spawn(move || {
                nix::sched::setns(
                    File::open(ns).unwrap(),
                    nix::sched::CloneFlags::CLONE_NEWNET,
                )
                .unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match one_echo(client, service) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    for t in threads {
        t.join().unwrap();
    }
    (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        elapsed,
    )
}

fn one_echo(client: Ipv4Addr, service: SocketAddr) -> std::io::Result<()> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(client.into(), 0).into())?;
    socket.connect_timeout(&service.into(), Duration::from_secs(2))?;
    let mut stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"ping\n")?;
    let mut echo = [0u8; 5];
    stream.read_exact(&mut echo)?;
    Ok(())
}

/// Connections broken when the route goes from all three hosts to hosts 1 and 2, and when
/// it goes from hosts 1 and 2 to all three.
fn broken_per_change(topology: &Topology) -> (usize, usize, usize) {
    let clients = topology.client_addrs.clone();
    let limit = Duration::from_secs(60);
    let mut broken = Vec::new();
    for (before, after) in [(&[1u16, 2, 3][..], &[1u16, 2][..]), (&[1, 2], &[1, 2, 3])] {
        topology.route_over(before);
        thread::sleep(Duration::from_millis(200));
        let load = LongLived::open(topology, &clients, 3, limit);
        thread::sleep(Duration::from_millis(500));
        topology.route_over(after);
        thread::sleep(Duration::from_secs(4));
        broken.push(load.broken());
        load.finish();
    }
    (clients.len() * 3, broken[0], broken[1])
}

pub fn cluster(report: &mut Report, quick: bool) {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let was = std::fs::read_to_string(STATS).unwrap_or_default();
    let _ = std::fs::write(STATS, "1");
    let mut topology = Topology::build(3, 20);
    for id in 1..=3 {
        topology.start_group(id);
    }
    topology.route_over(&[1, 2, 3]);
    let pairs = if quick { 1 } else { 5 };
    let duration = seconds(quick, 3);
    let program = parsrv::dataplane::Program::ClusterDispatch.name();
    let (mut plain, mut dispatched, mut per_packet, mut failures) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    for pair in 0..pairs {
        let mut order = [false, true];
        if pair % 2 == 1 {
            order.reverse();
        }
        for with_dispatchers in order {
            if with_dispatchers {
                for id in 1..=3 {
                    topology.start_agent(id);
                }
                topology.wait_ready(&[1, 2, 3]);
            }
            let _ = short_connections(&topology, Duration::from_millis(200));
            let before = program_runs(program);
            let (ok, failed, elapsed) = short_connections(&topology, duration);
            let after = program_runs(program);
            failures += failed;
            let rate = ok as f64 / elapsed.as_secs_f64();
            if with_dispatchers {
                dispatched.push(rate);
                let runs = after.0 - before.0;
                if runs > 0 {
                    per_packet.push((after.1 - before.1) as f64 / runs as f64);
                }
                for id in 1..=3 {
                    topology.stop_agent(id);
                }
            } else {
                plain.push(rate);
            }
        }
    }
    let ratios: Vec<f64> = dispatched.iter().zip(&plain).map(|(d, p)| d / p).collect();
    let ratio = median(ratios.clone());
    let cost = if per_packet.is_empty() {
        f64::NAN
    } else {
        median(per_packet.clone())
    };
    let (total, plain_removed, plain_added) = broken_per_change(&topology);
    for id in 1..=3 {
        topology.start_agent(id);
    }
    topology.wait_ready(&[1, 2, 3]);
    let (_, dispatch_removed, dispatch_added) = broken_per_change(&topology);
    let _ = std::fs::write(STATS, was.trim());
    let notes = vec![
        format!(
            "Throughput with the dispatchers {ratio:.3}x of plain ECMP (target >= 0.9: {}).",
            if ratio >= 0.9 { "met" } else { "NOT met" }
        ),
        format!(
            "Dispatcher cost {cost:.0} ns per packet (target <= 200: {}); {failures} connections failed in all samples.",
            if cost <= 200.0 { "met" } else { "NOT met" }
        ),
        format!(
            "Broken of {total} long-lived connections: host 3 removed from the route: plain ECMP {plain_removed}, dispatchers {dispatch_removed}; host 3 added back: plain ECMP {plain_added}, dispatchers {dispatch_added}."
        ),
    ];
    report.table(
        &Table {
            name: "cluster",
            title: format!(
                "cluster: 3 hosts behind an L4-hashed multipath route, 20 client addresses, short connections (one echo each), {pairs} interleaved pairs of {duration:?}"
            ),
            columns: vec![
                "pairs",
                "conn/s plain ECMP",
                "conn/s dispatchers",
                "ratio (median, min-max)",
                "dispatcher ns/packet (median, min-max)",
                "broken on removal plain / dispatchers",
                "broken on addition plain / dispatchers",
            ],
            rows: vec![vec![
                pairs.to_string(),
                format!("{:.0}", median(plain.clone())),
                format!("{:.0}", median(dispatched.clone())),
                spread(&ratios, 3),
                if per_packet.is_empty() {
                    "-".into()
                } else {
                    spread(&per_packet, 0)
                },
                format!("{plain_removed} / {dispatch_removed} of {total}"),
                format!("{plain_added} / {dispatch_added} of {total}"),
            ]],
        },
        &notes,
    );
    drop(topology);
}
