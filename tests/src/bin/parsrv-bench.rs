//! `cargo xtask bench [SCENARIO...] [--quick]`: benchmark scenarios, each run in its own
//! network namespace on loopback, bounded in time, printing a table with a baseline measured
//! in the same run (this machine is shared and noisy: read ratios, not absolute figures).
//!
//! - `scale-up`: a load step overloads a group of slow handlers (20 ms per request, one at
//!   a time). Figure: time from overload onset (queues >= 50 % full) to the new handler's
//!   first accept, and connections dropped in between. Models: `parsrv` (its autoscaler)
//!   and `tick-1s` (the same group resized by a supervisor that looks once a second, as
//!   common process managers do).
//! - `restart`: five rolling restarts of a 2-handler group under a steady load. Figure:
//!   failed and reset requests. Models: `parsrv` (`parsrv group restart`) and `reuseport`
//!   (plain SO_REUSEPORT: each server stops accepting, closes its socket, and a new one
//!   opens, the way a rolling restart of separate processes goes).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use parsrv::control::{self, Request, Response};
use parsrv_integration_tests::{apps_dir, in_netns, NetCounters, Outcome, Spawner, SteadyLoad};

/// No client runs longer than this, whatever happens.
const LOAD_LIMIT: Duration = Duration::from_secs(120);

const SCENARIOS: [&str; 2] = ["scale-up", "restart"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut wanted: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--quick")
        .collect();
    if let Some(unknown) = wanted.iter().find(|w| !SCENARIOS.contains(w)) {
        eprintln!(
            "parsrv-bench: no scenario '{unknown}': choose from {}",
            SCENARIOS.join(", ")
        );
        std::process::exit(2);
    }
    if wanted.is_empty() {
        wanted = SCENARIOS.to_vec();
    }
    println!(
        "# parsrv benchmarks ({} CPUs, kernel {}, {})\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        if quick { "quick" } else { "full" }
    );
    for scenario in wanted {
        match scenario {
            "scale-up" => in_netns(move || scale_up(quick)),
            "restart" => in_netns(move || restart(quick)),
            _ => unreachable!(),
        }
    }
}

fn addr() -> SocketAddr {
    "127.0.0.1:8080".parse().unwrap()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// One scale-up run: returns (ms from overload onset to the new handler's first accept,
/// connections the program dropped or refused in between, ListenOverflows in between).
fn scale_up_run(name: &str, tick: Option<Duration>) -> (f64, u64, u64) {
    let server = apps_dir().join("slow_server.py");
    let mut args = vec![
        "--listen",
        "127.0.0.1:8080",
        "--handlers",
        "1..4",
        "--backlog",
        "8",
    ];
    if tick.is_some() {
        args.push("--no-autoscale");
    }
    args.extend([
        "--handler",
        "exec",
        "--",
        "/usr/bin/python3",
        server.to_str().unwrap(),
    ]);
    let spawner = Spawner::start(name, &args);
    // The once-a-second supervisor of the baseline.
    let ticking = tick.map(|every| {
        let name = name.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let supervisor = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                thread::sleep(every);
                if let Ok(Response::Status(status)) = control::request(&name, &Request::Status) {
                    let queued: u32 = status
                        .sockets
                        .iter()
                        .filter_map(|s| s.queue)
                        .map(|q| q.depth)
                        .sum();
                    let capacity: u32 = status
                        .sockets
                        .iter()
                        .filter_map(|s| s.queue)
                        .map(|q| q.capacity + 1)
                        .sum();
                    let handlers = status.handlers.len() as u32;
                    if queued * 2 >= capacity && handlers < 4 {
                        let _ = control::request(
                            &name,
                            &Request::Resize {
                                handlers: handlers + 1,
                            },
                        );
                    }
                }
            }
        });
        (stop, supervisor)
    });

    let load = SteadyLoad::start(addr(), 8, LOAD_LIMIT);
    let mut onset: Option<(Instant, u64, NetCounters)> = None;
    let mut result = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let status = spawner.status();
        let queued: u32 = status
            .sockets
            .iter()
            .filter_map(|s| s.queue)
            .map(|q| q.depth)
            .sum();
        let capacity: u32 = status
            .sockets
            .iter()
            .filter_map(|s| s.queue)
            .map(|q| q.capacity + 1)
            .sum();
        let rejected: u64 = status
            .sockets
            .iter()
            .map(|s| s.counters.dropped + s.counters.refused)
            .sum();
        if onset.is_none() && queued * 2 >= capacity {
            onset = Some((Instant::now(), rejected, NetCounters::read()));
        }
        if let (Some((at, rejected_then, kernel_then)), Some(new)) = (&onset, status.sockets.get(1))
        {
            // The new handler has taken a connection from its queue.
            let taken = new.counters.selected + new.counters.migrated_in;
            if taken > 0 && new.queue.is_some_and(|q| (q.depth as u64) < taken) {
                result = Some((
                    at.elapsed().as_secs_f64() * 1000.0,
                    rejected - rejected_then,
                    kernel_then.delta(&NetCounters::read()).listen_overflows,
                ));
                break;
            }
        }
        thread::sleep(Duration::from_millis(2));
    }
    load.finish();
    if let Some((stop, supervisor)) = ticking {
        stop.store(true, Ordering::Relaxed);
        supervisor.join().unwrap();
    }
    spawner.stop();
    result.expect("the group never grew")
}

fn scale_up(quick: bool) {
    let runs = if quick { 1 } else { 3 };
    println!("## scale-up: overload onset -> new handler's first accept (median of {runs})\n");
    println!("| model | reaction (ms) | dropped/refused meanwhile | ListenOverflows meanwhile | ratio to parsrv |");
    println!("|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (model, tick) in [("parsrv", None), ("tick-1s", Some(Duration::from_secs(1)))] {
        let runs: Vec<_> = (0..runs)
            .map(|i| scale_up_run(&format!("bench-up-{i}"), tick))
            .collect();
        let reaction = median(runs.iter().map(|r| r.0).collect());
        let dropped = median(runs.iter().map(|r| r.1 as f64).collect());
        let overflows = median(runs.iter().map(|r| r.2 as f64).collect());
        rows.push((model, reaction, dropped, overflows));
    }
    let base = rows[0].1;
    for (model, reaction, dropped, overflows) in rows {
        println!(
            "| {model} | {reaction:.0} | {dropped:.0} | {overflows:.0} | {:.1} |",
            reaction / base
        );
    }
    println!("\nTarget: parsrv <= 100 ms.\n");
}

fn restart(quick: bool) {
    let restarts = if quick { 2 } else { 5 };
    println!("## restart: {restarts} rolling restarts of 2 handlers under 4 clients\n");
    println!("| model | requests | failed | of which reset |");
    println!("|---|---|---|---|");
    // parsrv
    let spawner = Spawner::start(
        "bench-restart",
        &[
            "--listen",
            "127.0.0.1:8080",
            "--handlers",
            "2",
            "--handler",
            "http",
        ],
    );
    let load = SteadyLoad::start(addr(), 4, LOAD_LIMIT);
    for _ in 0..restarts {
        match control::request("bench-restart", &Request::Restart) {
            Ok(Response::Done(_)) => {}
            other => panic!("restart failed: {other:?}"),
        }
    }
    let outcomes = load.finish();
    spawner.stop();
    print_restart_row("parsrv", &outcomes);

    // Plain SO_REUSEPORT: each server in turn stops accepting, closes, and a new one opens.
    let control_addr: SocketAddr = "127.0.0.1:8081".parse().unwrap();
    let mut servers: Vec<PlainServer> = (0..2).map(|_| PlainServer::start(control_addr)).collect();
    let load = SteadyLoad::start(control_addr, 4, LOAD_LIMIT);
    thread::sleep(Duration::from_millis(200));
    for _ in 0..restarts {
        for server in &mut servers {
            let old = std::mem::replace(server, PlainServer::start(control_addr));
            old.stop_and_close();
        }
    }
    let outcomes = load.finish();
    print_restart_row("reuseport", &outcomes);
    println!("\nTarget: parsrv 0 failed, 0 reset.\n");
}

fn print_restart_row(model: &str, outcomes: &[Outcome]) {
    println!(
        "| {model} | {} | {} | {} |",
        outcomes.len(),
        outcomes.iter().filter(|o| **o != Outcome::Ok).count(),
        outcomes.iter().filter(|o| **o == Outcome::Reset).count()
    );
}

/// One plain SO_REUSEPORT server: a socket and a thread answering HTTP on it.
struct PlainServer {
    socket: Arc<socket2::Socket>,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl PlainServer {
    fn start(addr: SocketAddr) -> PlainServer {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_reuse_port(true).unwrap();
        socket.bind(&addr.into()).unwrap();
        socket.listen(128).unwrap();
        socket.set_nonblocking(true).unwrap();
        let socket = Arc::new(socket);
        let stop = Arc::new(AtomicBool::new(false));
        let (s, flag) = (socket.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match s.accept() {
                    Ok((conn, _)) => {
                        let mut conn: std::net::TcpStream = conn.into();
                        conn.set_nonblocking(false).unwrap();
                        thread::spawn(move || {
                            use std::io::{Read, Write};
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
                            let _ = conn.read(&mut [0u8; 1024]);
                            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        PlainServer {
            socket,
            stop,
            thread,
        }
    }

    /// A graceful exit of a plain server process: stop accepting, then close (what is
    /// still queued is reset by the kernel).
    fn stop_and_close(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        thread::sleep(Duration::from_millis(50)); // the exit takes a moment; the hash still sends here
        drop(self.socket);
    }
}
