//! `affinity`: what client affinity costs the program, and what it is for: handlers that keep
//! per-client state, served by parsrv with `--affinity client`, by parsrv without it, and by
//! HAProxy (`balance source`, the usual dispatcher-process answer) in front of the same
//! handlers, in the same run, repeated in rotating order.

use std::{
    collections::{BTreeMap, VecDeque},
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use parsrv_integration_tests::{
    connect_from, group, signal, stop_process, wait_for, Affinity, HandlerKind, Spawner,
};

use crate::{
    harness::{addr, seconds},
    load,
    load::{client_source, Spec},
    models::{listening, spawn_with_fds, Model, Served},
    report::{Report, Table},
    stats::median,
};

/// A sticky worker's cache of client states: this many clients.
const CACHE: usize = 64;
/// What a request costs when the worker lacks its client's state (fetching a session).
const MISS_COST: Duration = Duration::from_millis(1);
const CLIENTS: u32 = 200;
const WORKERS: usize = 4;
const BACKLOG: u32 = 16;

/// `parsrv-bench sticky-worker`: an HTTP server on fd 3 (socket activation) that keeps the
/// state of its last [`CACHE`] clients (`GET /c/ID`) and needs [`MISS_COST`] for a client
/// whose state it lacks. One request at a time, as a worker process with a session cache.
pub fn sticky_worker() -> ! {
    // SAFETY: fd 3 is the listening socket parsrv or the benchmark handed over.
    let listener = unsafe { TcpListener::from_raw_fd(3) };
    listener.set_nonblocking(false).unwrap();
    let mut cache: VecDeque<String> = VecDeque::with_capacity(CACHE);
    loop {
        let Ok((mut stream, _)) = listener.accept() else {
            continue;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut request = Vec::with_capacity(256);
        let mut chunk = [0u8; 512];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&chunk[..n]),
            }
        }
        let text = String::from_utf8_lossy(&request);
        let client = text
            .split_whitespace()
            .nth(1)
            .and_then(|path| path.strip_prefix("/c/"))
            .unwrap_or("-")
            .to_owned();
        match cache.iter().position(|c| *c == client) {
            Some(at) => {
                let hit = cache.remove(at).unwrap();
                cache.push_front(hit);
            }
            None => {
                thread::sleep(MISS_COST);
                if cache.len() == CACHE {
                    cache.pop_back();
                }
                cache.push_front(client);
            }
        }
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
    }
}

pub fn affinity(report: &mut Report, quick: bool) {
    cost(report, quick);
    sticky(report, quick);
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)))
}

/// The program's run time per selection with affinity against `redirect`, 16 sockets, the
/// same load of 200 clients, in interleaved pairs.
fn cost(report: &mut Report, quick: bool) {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let was = std::fs::read_to_string(STATS).unwrap_or_default();
    let _ = std::fs::write(STATS, "1");
    let pairs = if quick { 1 } else { 5 };
    let duration = seconds(quick, 3);
    let spec = Spec {
        client_addresses: CLIENTS,
        ..load::closed(8, duration)
    };
    let mut runs: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for pair in 0..pairs {
        let mut order = [Model::ParsrvRedirect, Model::ParsrvAffinity];
        if pair % 2 == 1 {
            order.reverse();
        }
        for model in order {
            let served = Served::start(model, 16, 128, addr());
            let before = served.spawner().unwrap().status().program;
            let _ = load::run(addr(), spec);
            let status = served.spawner().unwrap().status();
            let after = status.program;
            if let Some(affinity) = &status.affinity {
                eprintln!(
                    "affinity-cost: {} runs, dispatchers {:?}",
                    after.run_count - before.run_count,
                    affinity.counters
                );
            }
            served.stop();
            let ns = (after.run_time_ns - before.run_time_ns) as f64
                / (after.run_count - before.run_count).max(1) as f64;
            runs.entry(model.name()).or_default().push(ns);
        }
    }
    let _ = std::fs::write(STATS, was.trim());
    let differences: Vec<f64> = runs[Model::ParsrvAffinity.name()]
        .iter()
        .zip(&runs[Model::ParsrvRedirect.name()])
        .map(|(with, without)| with - without)
        .collect();
    let rows = runs
        .iter()
        .map(|(model, ns)| {
            let (lo, hi) = min_max(ns);
            vec![
                model.to_string(),
                ns.len().to_string(),
                format!("{:.0}", median(ns.clone())),
                format!("{lo:.0}-{hi:.0}"),
            ]
        })
        .collect();
    let (lo, hi) = min_max(&differences);
    let extra = median(differences.clone());
    report.table(
        &Table {
            name: "affinity-cost",
            title: format!(
                "affinity-cost: the program's run time per selection, 16 sockets, {CLIENTS} clients, 8 at a time, {pairs} interleaved pairs of {duration:?}"
            ),
            columns: vec!["model", "runs", "median ns per run", "min-max"],
            rows,
        },
        &[format!(
            "Affinity costs {extra:.0} ns more per selection than redirect (median of the pairs' differences, {lo:.0} to {hi:.0}); target at most 100 ns: {}.",
            if extra <= 100.0 { "met" } else { "NOT met" }
        )],
    );
}

/// How a sticky run's handlers are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sticky {
    ParsrvAffinity,
    Parsrv,
    Haproxy,
}

impl Sticky {
    fn name(self) -> &'static str {
        match self {
            Sticky::ParsrvAffinity => "parsrv --affinity client",
            Sticky::Parsrv => "parsrv (no affinity)",
            Sticky::Haproxy => "HAProxy balance source",
        }
    }
}

/// Sticky workers served one of the ways, with worker 0's pid.
struct Running {
    spawner: Option<Spawner>,
    children: Vec<Child>,
    worker0: u32,
    /// HAProxy's servers, to fill worker 0's queue directly.
    server0: Option<SocketAddr>,
}

impl Running {
    fn start(how: Sticky) -> Running {
        let worker = std::env::current_exe().unwrap();
        let worker = worker.to_str().unwrap();
        match how {
            Sticky::ParsrvAffinity | Sticky::Parsrv => {
                let spawner = group("bench-sticky", HandlerKind::Exec)
                    .listen(&addr().to_string())
                    .handlers(WORKERS as u32)
                    .backlog(BACKLOG)
                    .command(&[worker, "sticky-worker"])
                    // The scenario stops worker 0 to fill its queue and measures what its
                    // clients meet then: stall detection would move the queue, and
                    // two-choices would send its share elsewhere (the published rows are
                    // `redirect`'s).
                    .stopped_handlers_keep_their_share()
                    .with(|s| {
                        if how == Sticky::ParsrvAffinity {
                            s.affinity = Affinity::Client
                        }
                    })
                    .start();
                // Exec handlers count as ready after a second.
                assert!(wait_for(Duration::from_secs(10), || spawner
                    .status()
                    .handlers
                    .iter()
                    .all(|h| h.ready)));
                let worker0 = spawner.status().handlers[0].pid.unwrap();
                Running {
                    spawner: Some(spawner),
                    children: Vec::new(),
                    worker0,
                    server0: None,
                }
            }
            Sticky::Haproxy => {
                let servers: Vec<SocketAddr> = (0..WORKERS)
                    .map(|i| SocketAddr::from(([127, 0, 0, 1], 9001 + i as u16)))
                    .collect();
                let mut children: Vec<Child> = servers
                    .iter()
                    .map(|&server| {
                        let socket = listening(server, BACKLOG, false);
                        socket.set_nonblocking(false).unwrap();
                        let mut command = Command::new(worker);
                        command.arg("sticky-worker");
                        spawn_with_fds(command, &[socket.as_raw_fd()])
                    })
                    .collect();
                let worker0 = children[0].id();
                let config = std::env::temp_dir()
                    .join(format!("parsrv-bench-haproxy-{}.cfg", std::process::id()));
                std::fs::write(&config, haproxy_config(&servers)).unwrap();
                let haproxy = Command::new("haproxy")
                    .arg("-db")
                    .arg("-f")
                    .arg(&config)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("haproxy (apt-get install haproxy; `cargo xtask bench` installs it)");
                children.push(haproxy);
                assert!(
                    wait_for(Duration::from_secs(10), || TcpStream::connect(addr())
                        .is_ok()),
                    "haproxy did not listen"
                );
                let _ = std::fs::remove_file(&config);
                Running {
                    spawner: None,
                    children,
                    worker0,
                    server0: Some(servers[0]),
                }
            }
        }
    }

    /// Stops worker 0 and fills its accept queue, as the `stall` scenario does: the held
    /// connections are returned.
    fn stall_worker0(&self) -> Vec<TcpStream> {
        stop_process(self.worker0);
        let mut held = Vec::new();
        match (self.server0, &self.spawner) {
            (Some(server0), _) => {
                for _ in 0..=BACKLOG {
                    held.push(TcpStream::connect(server0).unwrap());
                }
            }
            (None, Some(spawner)) => {
                // Its clients' connections go to it; the others' are answered (and let go).
                let full = wait_for(Duration::from_secs(20), || {
                    for client in 0..CLIENTS {
                        let Ok(mut conn) =
                            connect_from(client_source(client), addr(), Duration::from_secs(1))
                        else {
                            continue;
                        };
                        let _ = conn.write_all(
                            format!("GET /c/{client} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes(),
                        );
                        let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
                        let mut answer = [0u8; 64];
                        if !matches!(conn.read(&mut answer), Ok(n) if n > 0) {
                            held.push(conn);
                        }
                        let queue = spawner.status().sockets[0].queue.unwrap();
                        if queue.depth > queue.capacity {
                            return true;
                        }
                    }
                    false
                });
                assert!(full, "worker 0's queue never filled");
            }
            (None, None) => unreachable!(),
        }
        held
    }

    fn stop(mut self) {
        signal(self.worker0, nix::sys::signal::Signal::SIGCONT);
        if let Some(spawner) = self.spawner.take() {
            spawner.stop();
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A plain, well-kept HAProxy in front of the workers: L4 (`mode tcp`, as parsrv), sticky by
/// source address, health checks that take a dead server out, and redispatch of a connection
/// whose server does not answer.
fn haproxy_config(servers: &[SocketAddr]) -> String {
    let mut config = String::from(
        "global\n  maxconn 4000\n\
         defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 10s\n  timeout server 10s\n  retries 2\n  option redispatch\n\
         frontend sticky\n  bind 127.0.0.1:8080\n  default_backend workers\n\
         backend workers\n  balance source\n",
    );
    for (i, server) in servers.iter().enumerate() {
        config.push_str(&format!("  server w{i} {server} check inter 1s fall 2\n"));
    }
    config
}

/// What one sticky run measured.
struct Run {
    rate: f64,
    p99_ms: f64,
    failed: BTreeMap<&'static str, u64>,
}

fn sticky(report: &mut Report, quick: bool) {
    let rounds = if quick { 1 } else { 3 };
    let duration = seconds(quick, 5);
    let spec = Spec {
        client_addresses: CLIENTS,
        timeout: Duration::from_secs(2),
        ..load::closed(16, duration)
    };
    let all = [Sticky::ParsrvAffinity, Sticky::Parsrv, Sticky::Haproxy];
    // (how, stalled) -> one per round
    let mut results: BTreeMap<(usize, bool), Vec<Run>> = BTreeMap::new();
    for round in 0..rounds {
        for stalled in [false, true] {
            let mut order: Vec<usize> = (0..all.len()).collect();
            order.rotate_left(round % all.len());
            for index in order {
                let running = Running::start(all[index]);
                // Warm up: every client has been seen (and, with affinity, placed).
                let _ = load::run(
                    addr(),
                    Spec {
                        duration: Duration::from_millis(500),
                        ..spec
                    },
                );
                let held = if stalled {
                    running.stall_worker0()
                } else {
                    Vec::new()
                };
                let outcome = load::run(addr(), spec);
                drop(held);
                running.stop();
                results.entry((index, stalled)).or_default().push(Run {
                    rate: outcome.per_second(),
                    p99_ms: outcome.ms(0.99),
                    failed: outcome.failed.clone(),
                });
            }
        }
    }
    let mut rows = Vec::new();
    let mut medians: BTreeMap<(usize, bool), (f64, f64)> = BTreeMap::new();
    for ((index, stalled), runs) in &results {
        let rates: Vec<f64> = runs.iter().map(|r| r.rate).collect();
        let p99s: Vec<f64> = runs.iter().map(|r| r.p99_ms).collect();
        let mut failed: BTreeMap<&str, u64> = BTreeMap::new();
        for run in runs {
            for (kind, n) in &run.failed {
                *failed.entry(kind).or_default() += n;
            }
        }
        let (rate_lo, rate_hi) = min_max(&rates);
        let (p99_lo, p99_hi) = min_max(&p99s);
        medians.insert(
            (*index, *stalled),
            (median(rates.clone()), median(p99s.clone())),
        );
        rows.push(vec![
            all[*index].name().into(),
            if *stalled {
                "worker 0 stopped, queue full"
            } else {
                "all serve"
            }
            .into(),
            format!("{:.0} ({rate_lo:.0}-{rate_hi:.0})", median(rates)),
            format!("{:.1} ({p99_lo:.1}-{p99_hi:.1})", median(p99s)),
            if failed.is_empty() {
                "0".into()
            } else {
                format!("{failed:?}")
            },
        ]);
    }
    let ratio = |a: usize, b: usize, stalled| {
        let (x, y) = (medians[&(a, stalled)], medians[&(b, stalled)]);
        (x.0 / y.0, x.1 / y.1)
    };
    let (vs_haproxy, p99_vs_haproxy) = ratio(0, 2, false);
    let (vs_plain, _) = ratio(0, 1, false);
    let stalled_failures: u64 = results[&(0, true)]
        .iter()
        .map(|r| r.failed.values().sum::<u64>())
        .sum();
    report.table(
        &Table {
            name: "affinity-sticky",
            title: format!(
                "affinity-sticky: {WORKERS} workers that keep the state of {CACHE} clients each and need {MISS_COST:?} for another's; {CLIENTS} clients, 16 at a time, connection per request, {rounds} rounds of {duration:?} in rotating order"
            ),
            columns: vec!["served by", "condition", "conn/s median (min-max)", "p99 ms median (min-max)", "failed (all rounds)"],
            rows,
        },
        &[
            format!(
                "parsrv --affinity client / HAProxy balance source: throughput {vs_haproxy:.2}x (target >= 1.5: {}), p99 {p99_vs_haproxy:.2}x (target <= 1: {}).",
                if vs_haproxy >= 1.5 { "met" } else { "NOT met" },
                if p99_vs_haproxy <= 1.0 { "met" } else { "NOT met" },
            ),
            format!("parsrv --affinity client / parsrv without: throughput {vs_plain:.2}x."),
            format!(
                "Worker 0 stopped with a full queue: parsrv --affinity client (move) failed {stalled_failures} requests over all rounds (target 0: {}).",
                if stalled_failures == 0 { "met" } else { "NOT met" }
            ),
        ],
    );
}
