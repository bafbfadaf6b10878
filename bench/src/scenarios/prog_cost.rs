//! `prog-cost`: the SK_REUSEPORT program's run time per selection for each policy and
//! socket count (bpf_stats), and throughput with the program against without it.

use crate::{
    harness::{addr, measure, seconds},
    load::{self, closed},
    models::{Model, Served},
    report::{Report, Table},
    stats::ratio_line,
};

pub fn prog_cost(report: &mut Report, quick: bool) {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let was = std::fs::read_to_string(STATS).unwrap_or_default();
    let _ = std::fs::write(STATS, "1");
    let sizes: &[usize] = if quick { &[2] } else { &[2, 16, 64] };
    let duration = seconds(quick, 4);
    let mut rows = Vec::new();
    let mut at_16 = None;
    for &n in sizes {
        for policy in [
            Model::ParsrvRedirect,
            Model::ParsrvTwoChoices,
            Model::ParsrvLeastLoaded,
        ] {
            let served = Served::start(policy, n, 128, addr());
            let before = served.spawner().unwrap().status().program;
            let outcome = load::run(addr(), closed(8, duration));
            let after = served.spawner().unwrap().status().program;
            served.stop();
            let runs = after.run_count - before.run_count;
            let ns = (after.run_time_ns - before.run_time_ns) as f64 / runs.max(1) as f64;
            if n == 16 && policy == Model::ParsrvRedirect {
                at_16 = Some(ns);
            }
            rows.push(vec![
                n.to_string(),
                policy.name().into(),
                runs.to_string(),
                format!("{ns:.0}"),
                format!("{:.0}", outcome.per_second()),
            ]);
        }
    }
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
    if let Some(ns) = at_16 {
        notes.push(ratio_line(
            "mean ns per selection at 16 sockets, redirect",
            ns,
            100.0,
            false,
        ));
    }
    notes.push("On this machine an empty SK_REUSEPORT program already costs about 100 ns per run under bpf_stats (see bench/README.md, Cost of the program).".into());
    report.table(
        &Table {
            name: "prog-cost",
            title: format!("prog-cost: the program's run time per selection (kernel.bpf_stats_enabled), 8 clients, {duration:?}"),
            columns: vec!["sockets", "policy", "runs", "ns per run", "conn/s"],
            rows,
        },
        &notes,
    );
}
