//! `dns`: a real DNS server under a real DNS load tool with one server stalled. Four of
//! Debian's Unbound (one thread each) on one port, the first stopped (SIGSTOP) with an 8 KiB
//! receive buffer while dnsperf sends its queries in open loop (200 clients, 5,000 a second),
//! then continued; answered queries and each answer's latency (dnsperf -v):
//!
//! - `plain SO_REUSEPORT`: four Unbound servers binding the port themselves, the kernel's
//!   hash choosing among them;
//! - `parsrv`: the same four as exec handlers of a UDP group (socket activation, READY=1 by
//!   notify), the datagram program choosing by room.
//!
//! The cases alternate round by round in rotating order, in one network namespace.

use std::net::SocketAddr;

use parsrv_integration_tests::{
    dns::{self, dnsperf_with_one_stopped, percentile, PlainUnbound},
    SMALL_BUFFER,
};

use crate::{
    report::{Report, Table},
    stats::{median, spread},
};

const ADDR: &str = "127.0.0.1:5353";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Plain,
    Parsrv,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Plain => "plain SO_REUSEPORT",
            Case::Parsrv => "parsrv (datagram mode)",
        }
    }
}

/// One run: answered, sent, p50 and p99 of the answers' latency in ms.
type Sample = (u64, u64, f64, f64);

pub fn dns(report: &mut Report, quick: bool) {
    dns::as_if_systemd_ran();
    let dir = std::env::temp_dir().join(format!("parsrv-bench-dns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let addr: SocketAddr = ADDR.parse().unwrap();
    let (rounds, queries) = if quick { (1, 500) } else { (5, 2000) };
    let mut samples: Vec<(Case, Sample)> = Vec::new();
    for round in 0..rounds {
        let mut order = [Case::Plain, Case::Parsrv];
        order.rotate_left(round % 2);
        for case in order {
            samples.push((case, run(case, &dir, addr, queries)));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut rows = Vec::new();
    for case in [Case::Plain, Case::Parsrv] {
        let of = |f: fn(&Sample) -> f64| -> Vec<f64> {
            samples
                .iter()
                .filter(|(c, _)| *c == case)
                .map(|(_, s)| f(s))
                .collect()
        };
        let answered = of(|s| s.0 as f64);
        let lost = of(|s| (s.1 - s.0) as f64 / s.1 as f64 * 100.0);
        rows.push(vec![
            case.name().into(),
            spread(&answered, 0),
            format!("{:.1} %", median(lost)),
            spread(&of(|s| s.2), 2),
            spread(&of(|s| s.3), 2),
        ]);
    }
    report.table(
        &Table {
            name: "dns",
            title: format!(
                "dns: Unbound x4, one stopped (8 KiB buffer) while dnsperf sends {queries} \
                 queries from {} clients at {}/s, then continued; {rounds} rounds, cases in \
                 rotating order",
                dns::DNS_CLIENTS,
                dns::DNS_RATE
            ),
            columns: vec![
                "case",
                "answered, median (min-max)",
                "lost, median",
                "latency p50 ms, median (min-max)",
                "latency p99 ms, median (min-max)",
            ],
            rows,
        },
        &[
            "Latency of answered queries only (a lost query has none); the stopped server's \
             held queries are answered once it is continued, about a second late."
                .into(),
        ],
    );
}

fn run(case: Case, dir: &std::path::Path, addr: SocketAddr, queries: u64) -> Sample {
    let (counts, _, latencies, _) = match case {
        Case::Plain => {
            let small = dns::unbound_config(dir, addr.port(), true, Some(SMALL_BUFFER));
            let default = dns::unbound_config(dir, addr.port(), true, None);
            let mut configs = vec![default; 4];
            configs[0] = small;
            let servers = PlainUnbound::start(&configs);
            dnsperf_with_one_stopped(dir, addr, queries, servers.pid(0))
        }
        Case::Parsrv => {
            let config = dns::unbound_config(dir, addr.port(), false, None);
            let spawner = dns::unbound_group("bench-dns", addr, 4, &config).start();
            // Handler 0's socket gets the plain case's small buffer.
            dns::set_handler_buffer(spawner.handler_pid(0), SMALL_BUFFER);
            let result = dnsperf_with_one_stopped(dir, addr, queries, spawner.handler_pid(0));
            spawner.stop();
            result
        }
    };
    let ms = |p: f64| percentile(&latencies, p).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    (counts.completed, counts.sent, ms(50.0), ms(99.0))
}
