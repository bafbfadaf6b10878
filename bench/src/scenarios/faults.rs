//! `faults`: what faults and abuse cost, with the harness the tests use. A handler kill loop
//! (requests lost, and of those, in flight in a killed process), a spoofed SYN flood (real
//! clients failed per policy and when-full mode, against plain SO_REUSEPORT), and scrapes of
//! the monitoring endpoint with idle clients holding connections to it.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use parsrv_integration_tests::{
    flooded_load, group, kill_loop, HandlerKind, KillLoad, PlainGroup, Policy, WhenFull,
};

use crate::{
    harness::addr,
    report::{Report, Table},
    stats::median,
};

const METRICS: &str = "127.0.0.1:9100";

pub fn faults(report: &mut Report, quick: bool) {
    kills(report, quick);
    flood(report, quick);
    scrape(report, quick);
}

fn kills(report: &mut Report, quick: bool) {
    let rounds = if quick { 1 } else { 3 };
    let kills = if quick { 10 } else { 25 };
    let mut rows = Vec::new();
    for round in 0..rounds {
        let spawner = group("bench-kills", HandlerKind::Http)
            .handlers(4)
            .threads(2)
            .start();
        let run = kill_loop(
            &spawner,
            kills,
            Duration::from_millis(200),
            KillLoad::Steady { clients: 8 },
        );
        spawner.stop();
        rows.push(vec![
            (round + 1).to_string(),
            run.kills.to_string(),
            run.requests.to_string(),
            run.failed.to_string(),
            run.lost_in_flight.to_string(),
            run.never_connected.to_string(),
            format!("{} of {}", run.waiting_in_the_group, run.waiting),
        ]);
    }
    report.table(
        &Table {
            name: "faults-kills",
            title: format!(
                "faults: a random handler of 4 SIGKILLed every 200 ms ({kills} times), 8 clients"
            ),
            columns: vec![
                "round",
                "kills",
                "requests",
                "failed",
                "of which in flight in a killed process",
                "never connected",
                "slots waiting to restart still in the group",
            ],
            rows,
        },
        &[
            "Target: every failed request was in flight in a killed process; no slot waiting \
           to restart stays in the group."
                .to_string(),
        ],
    );
}

fn flood(report: &mut Report, quick: bool) {
    let load_for = Duration::from_secs(if quick { 2 } else { 5 });
    let per_second = 3000;
    let (handlers, backlog) = (2, 8);
    let mut rows = Vec::new();
    for policy in [Policy::Redirect, Policy::LeastLoaded] {
        for when_full in [WhenFull::Refuse, WhenFull::Drop] {
            let spawner = group("bench-flood", HandlerKind::Http)
                .handlers(handlers)
                .backlog(backlog)
                .threads(2)
                .policy(policy)
                .when_full(when_full)
                .start();
            let run = flooded_load((handlers * backlog) as usize, per_second, load_for);
            spawner.stop();
            rows.push(vec![
                format!("parsrv {policy}, when-full {when_full}"),
                run.requests.to_string(),
                run.failed.to_string(),
                run.syncookies_sent.to_string(),
            ]);
        }
    }
    let plain = PlainGroup::start(addr(), handlers as usize, backlog as i32, &[0, 1]);
    let run = flooded_load((handlers * backlog) as usize, per_second, load_for);
    drop(plain);
    rows.push(vec![
        "reuseport".into(),
        run.requests.to_string(),
        run.failed.to_string(),
        run.syncookies_sent.to_string(),
    ]);
    report.table(
        &Table {
            name: "faults-flood",
            title: format!(
                "faults: {per_second} spoofed SYNs/s, 4 real clients for {load_for:?}, \
                 {handlers} workers, backlog {backlog}"
            ),
            columns: vec!["model", "requests", "failed", "syncookies sent"],
            rows,
        },
        &["Target: parsrv fails no more real clients than plain SO_REUSEPORT (0).".to_string()],
    );
}

/// Where the scrapes come from: not the idle clients' address (127.0.0.1), whose share of
/// the endpoint (32 connections) they hold, as Prometheus is not the host that floods it.
const SCRAPER: &str = "127.0.0.2";

/// Milliseconds for one `GET /metrics` answered in full, from [`SCRAPER`].
fn scrape_ms() -> f64 {
    let started = Instant::now();
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    socket
        .bind(&std::net::SocketAddr::new(SCRAPER.parse().unwrap(), 0).into())
        .expect("binding the scraper's address");
    socket
        .connect(&METRICS.parse::<std::net::SocketAddr>().unwrap().into())
        .expect("metrics endpoint");
    let mut conn: TcpStream = socket.into();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).expect("a scrape answer");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "scrape failed");
    started.elapsed().as_secs_f64() * 1e3
}

fn scrape(report: &mut Report, quick: bool) {
    let scrapes = if quick { 5 } else { 50 };
    let idle = 200;
    let spawner = group("bench-scrape", HandlerKind::Http)
        .handlers(4)
        .metrics(METRICS)
        .start();
    let alone: Vec<f64> = (0..scrapes).map(|_| scrape_ms()).collect();
    let held: Vec<TcpStream> = (0..idle)
        .map(|_| TcpStream::connect(METRICS).expect("an idle connection"))
        .collect();
    let crowded: Vec<f64> = (0..scrapes).map(|_| scrape_ms()).collect();
    drop(held);
    spawner.stop();
    let row = |what: String, ms: &[f64]| {
        vec![
            what,
            format!("{:.2}", median(ms.to_vec())),
            format!("{:.2}", ms.iter().cloned().fold(0.0, f64::max)),
        ]
    };
    let ratio = median(crowded.clone()) / median(alone.clone());
    report.table(
        &Table {
            name: "faults-scrape",
            title: format!("faults: {scrapes} scrapes of /metrics, alone and with {idle} idle connections held from another address"),
            columns: vec!["scrapes", "median ms", "max ms"],
            rows: vec![
                row("alone".into(), &alone),
                row(format!("with {idle} idle clients"), &crowded),
            ],
        },
        &[format!(
            "Median with idle clients / alone: {ratio:.2}. Target: every scrape answered (before: none within 30 s with 20 idle clients)."
        )],
    );
}
