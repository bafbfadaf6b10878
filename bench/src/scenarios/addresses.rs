//! `addresses`: what serving a group on several addresses costs. The same load (closed loop,
//! a connection per request) against 127.0.0.1:8080 served by N handlers, as interleaved
//! pairs: a group on that one address (no sk_lookup program), and a group on it and on
//! 127.0.0.2:8080 with N handlers each (the sk_lookup program runs for every connection in
//! the namespace; the second address's handlers stay idle). Reported: the throughput ratio
//! of each pair with its spread, and the sk_lookup program's run time per connection
//! (bpf_stats) beside the SK_REUSEPORT program's.

use std::time::Duration;

use parsrv_integration_tests::{group, program_runs as program_stats, HandlerKind};

use crate::{
    harness::{addr, seconds},
    load::{self, closed},
    report::{Report, Table},
    stats::{median, spread},
};

struct Sample {
    rate: f64,
    /// ns per run of the sk_lookup program (two-address group only) and of the SK_REUSEPORT
    /// program.
    lookup_ns: Option<f64>,
    select_ns: f64,
}

fn run(two_addresses: bool, n: usize, duration: Duration) -> Sample {
    let listen: &[&str] = if two_addresses {
        &["127.0.0.1:8080", "127.0.0.2:8080"]
    } else {
        &["127.0.0.1:8080"]
    };
    let spawner = group("bench-addresses", HandlerKind::Http)
        .listen_on(listen)
        .handlers((n * listen.len()) as u32)
        .no_autoscale()
        .start();
    let spec = closed(2 * n, duration);
    let _ = load::run(
        addr(),
        load::Spec {
            duration: Duration::from_millis(200),
            ..spec
        },
    );
    let lookup = parsrv::dataplane::Program::AddressLookup.name();
    let select = parsrv::dataplane::Program::ReuseportSelect.name();
    let (lookup_before, select_before) = (program_stats(lookup), program_stats(select));
    let outcome = load::run(addr(), spec);
    let (lookup_after, select_after) = (program_stats(lookup), program_stats(select));
    let per_run = |before: (u64, u64), after: (u64, u64)| {
        let runs = after.0 - before.0;
        (runs > 0).then(|| (after.1 - before.1) as f64 / runs as f64)
    };
    let sample = Sample {
        rate: outcome.ok as f64 / outcome.elapsed.as_secs_f64(),
        lookup_ns: per_run(lookup_before, lookup_after),
        select_ns: per_run(select_before, select_after).unwrap_or(0.0),
    };
    assert!(spawner.stop().success());
    sample
}

pub fn addresses(report: &mut Report, quick: bool) {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let was = std::fs::read_to_string(STATS).unwrap_or_default();
    let _ = std::fs::write(STATS, "1");
    let sizes: &[usize] = if quick { &[2] } else { &[2, 4, 8] };
    let pairs = if quick { 1 } else { 5 };
    let duration = seconds(quick, 3);
    let (mut rows, mut notes) = (Vec::new(), Vec::new());
    for &n in sizes {
        let (mut one, mut two) = (Vec::new(), Vec::new());
        for pair in 0..pairs {
            let mut order = [false, true];
            if pair % 2 == 1 {
                order.reverse();
            }
            for two_addresses in order {
                let sample = run(two_addresses, n, duration);
                if two_addresses {
                    two.push(sample);
                } else {
                    one.push(sample);
                }
            }
        }
        let ratios: Vec<f64> = two.iter().zip(&one).map(|(t, o)| t.rate / o.rate).collect();
        let ratio = median(ratios.clone());
        let lookup: Vec<f64> = two.iter().filter_map(|s| s.lookup_ns).collect();
        notes.push(format!(
            "N={n}: throughput with the sk_lookup program {ratio:.3}x of the single-address group (target >= 0.97: {}).",
            if ratio >= 0.97 { "met" } else { "NOT met" }
        ));
        rows.push(vec![
            n.to_string(),
            pairs.to_string(),
            format!("{:.0}", median(one.iter().map(|s| s.rate).collect())),
            format!("{:.0}", median(two.iter().map(|s| s.rate).collect())),
            spread(&ratios, 3),
            if lookup.is_empty() {
                "-".into()
            } else {
                spread(&lookup, 0)
            },
            format!(
                "{:.0} / {:.0}",
                median(two.iter().map(|s| s.select_ns).collect()),
                median(one.iter().map(|s| s.select_ns).collect())
            ),
        ]);
    }
    let _ = std::fs::write(STATS, was.trim());
    report.table(
        &Table {
            name: "addresses",
            title: format!(
                "addresses: a group on 127.0.0.1 alone vs on 127.0.0.1 and 127.0.0.2 (sk_lookup program attached), load on 127.0.0.1, N handlers there, {pairs} interleaved pairs of {duration:?}, closed loop, 2 clients per handler, a connection per request"
            ),
            columns: vec![
                "N",
                "pairs",
                "conn/s one address",
                "conn/s two addresses",
                "ratio (median, min-max)",
                "sk_lookup ns/run (median, min-max)",
                "SK_REUSEPORT ns/run two / one",
            ],
            rows,
        },
        &notes,
    );
}
