//! `prog-cost`: the SK_REUSEPORT program's run time per selection for each policy and
//! socket count (bpf_stats), and throughput with the program against without it.

use std::collections::BTreeMap;

use crate::{
    harness::{addr, measure, seconds},
    load::{self, closed},
    models::{Model, Served},
    report::{Report, Table},
    stats::{median, ratio_line, spread},
};

const POLICIES: [Model; 3] = [
    Model::ParsrvRedirect,
    Model::ParsrvTwoChoices,
    Model::ParsrvLeastLoaded,
];

pub fn prog_cost(report: &mut Report, quick: bool) {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let was = std::fs::read_to_string(STATS).unwrap_or_default();
    let _ = std::fs::write(STATS, "1");
    let sizes: &[usize] = if quick { &[2] } else { &[2, 16, 64] };
    let rounds = if quick { 1 } else { 3 };
    let duration = seconds(quick, 4);
    let mut rows = Vec::new();
    // Per size and policy: ns per run and conn/s of each round.
    let mut runs: BTreeMap<(usize, &str), Vec<(f64, f64)>> = BTreeMap::new();
    for &n in sizes {
        // Every policy once per round, the order rotated each round: a slow moment of the
        // machine does not always fall on the same policy.
        for round in 0..rounds {
            let mut order = POLICIES.to_vec();
            order.rotate_left(round % POLICIES.len());
            for policy in order {
                let served = Served::start(policy, n, 128, addr());
                let before = served.spawner().unwrap().status().program;
                let outcome = load::run(addr(), closed(8, duration));
                let after = served.spawner().unwrap().status().program;
                served.stop();
                let count = after.run_count - before.run_count;
                let ns = (after.run_time_ns - before.run_time_ns) as f64 / count.max(1) as f64;
                runs.entry((n, policy.name()))
                    .or_default()
                    .push((ns, outcome.per_second()));
            }
        }
        for policy in POLICIES {
            let samples = &runs[&(n, policy.name())];
            let ns: Vec<f64> = samples.iter().map(|s| s.0).collect();
            let rate: Vec<f64> = samples.iter().map(|s| s.1).collect();
            rows.push(vec![
                n.to_string(),
                policy.name().into(),
                spread(&ns, 0),
                spread(&rate, 0),
            ]);
        }
    }
    let median_ns = |n: usize, policy: Model| -> Option<f64> {
        runs.get(&(n, policy.name()))
            .map(|s| median(s.iter().map(|s| s.0).collect()))
    };
    let at_16 = median_ns(16, Model::ParsrvRedirect);
    let largest = *sizes.last().unwrap();
    let two_choices_extra = median_ns(largest, Model::ParsrvTwoChoices)
        .zip(median_ns(largest, Model::ParsrvRedirect))
        .map(|(two, redirect)| two - redirect);
    // An empty program's cost on this machine is the floor (measured by hand: ~100 ns).
    let n = if quick { 2 } else { 16 };
    let with = measure(Model::ParsrvRedirect, n, 128, closed(8, duration), |_| {})
        .0
        .per_second();
    let without = measure(Model::Reuseport, n, 128, closed(8, duration), |_| {})
        .0
        .per_second();
    let _ = std::fs::write(STATS, was.trim());
    let mut notes = vec![format!(
        "Throughput with the program / without (plain SO_REUSEPORT), N={n}: {:.3}.",
        with / without
    )];
    if let Some(extra) = two_choices_extra {
        notes.push(ratio_line(
            &format!("two-choices minus redirect at {largest} sockets, median ns per selection"),
            extra,
            50.0,
            false,
        ));
    }
    if let Some(ns) = at_16 {
        notes.push(ratio_line(
            "median ns per selection at 16 sockets, redirect",
            ns,
            100.0,
            false,
        ));
    }
    notes.push("On this machine an empty SK_REUSEPORT program already costs about 100 ns per run under bpf_stats (see bench/README.md, Cost of the program).".into());
    report.table(
        &Table {
            name: "prog-cost",
            title: format!("prog-cost: the program's run time per selection (kernel.bpf_stats_enabled), 8 clients, {rounds} rounds of {duration:?} in rotating order"),
            columns: vec!["sockets", "policy", "ns per run, median (min-max)", "conn/s, median (min-max)"],
            rows,
        },
        &notes,
    );
}
