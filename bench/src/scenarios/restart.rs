//! `restart`: rolling restarts of a group under load, against plain SO_REUSEPORT servers
//! closed and opened again in turn.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use parsrv::control::{self, Request, Response};
use parsrv_integration_tests::{group, HandlerKind, Outcome, SteadyLoad};

use crate::{
    harness::{addr, LOAD_LIMIT},
    report::{Report, Table},
};

pub fn restart(report: &mut Report, quick: bool) {
    let restarts = if quick { 2 } else { 5 };
    let spawner = group("bench-restart", HandlerKind::Http)
        .handlers(2)
        .start();
    let load = SteadyLoad::start(addr(), 4, LOAD_LIMIT, Duration::from_secs(3));
    // A failed restart is a finding for the report, not a crash of the suite.
    let mut restart_errors = Vec::new();
    for _ in 0..restarts {
        match control::request("bench-restart", &Request::Restart) {
            Ok(Response::Done(_)) => {}
            other => restart_errors.push(format!("{other:?}")),
        }
    }
    let parsrv = load.finish();
    spawner.stop();

    // Plain SO_REUSEPORT: each server in turn stops accepting, closes, and a new one opens.
    let control_addr: SocketAddr = "127.0.0.1:8081".parse().unwrap();
    let mut servers: Vec<PlainServer> = (0..2).map(|_| PlainServer::start(control_addr)).collect();
    let load = SteadyLoad::start(control_addr, 4, LOAD_LIMIT, Duration::from_secs(3));
    thread::sleep(Duration::from_millis(200));
    for _ in 0..restarts {
        for server in &mut servers {
            let old = std::mem::replace(server, PlainServer::start(control_addr));
            old.stop_and_close();
        }
    }
    let plain = load.finish();
    let row = |model: &str, outcomes: &[Outcome]| {
        vec![
            model.to_string(),
            outcomes.len().to_string(),
            outcomes
                .iter()
                .filter(|o| **o != Outcome::Ok)
                .count()
                .to_string(),
            outcomes
                .iter()
                .filter(|o| **o == Outcome::Reset)
                .count()
                .to_string(),
        ]
    };
    let failed = parsrv.iter().filter(|o| **o != Outcome::Ok).count();
    report.table(
        &Table {
            name: "restart",
            title: format!("restart: {restarts} rolling restarts of 2 handlers under 4 clients"),
            columns: vec!["model", "requests", "failed", "of which reset"],
            rows: vec![row("parsrv", &parsrv), row("reuseport", &plain)],
        },
        &[format!(
            "Target: parsrv 0 failed, 0 reset: {}.{}",
            if failed == 0 && restart_errors.is_empty() {
                "met".to_string()
            } else {
                format!("MISSED ({failed} failed)")
            },
            if restart_errors.is_empty() {
                String::new()
            } else {
                format!(" Restarts that failed: {}", restart_errors.join("; "))
            }
        )],
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
