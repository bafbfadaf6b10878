//! `stall`: one worker of four stopped mid-run under an open-loop load: what fails, how long
//! the rest waits, and what the kernel's accept queues overflowed, for each policy against
//! plain SO_REUSEPORT, one listener handing out connections and one shared accept queue.

use std::{collections::BTreeMap, thread};

use parsrv_integration_tests::signal;

use crate::{
    harness::{measure, seconds},
    load::open_loop,
    models::Model,
    report::{Report, Table},
    stats::{median, ratio_line, spread},
};

/// Arrival rate of the stall scenario: open loop, so that a stall shows in latency instead of
/// slowing the clients down (coordinated omission).
const STALL_RATE: f64 = 1500.0;

/// Every model, in the order of the first round (later rounds rotate it).
const MODELS: [Model; 7] = [
    Model::Listener,
    Model::Shared,
    Model::Reuseport,
    Model::ParsrvNoStallDetection,
    Model::ParsrvRedirect,
    Model::ParsrvTwoChoices,
    Model::ParsrvLeastLoaded,
];

/// What one run of one model gave.
struct Run {
    failed: u64,
    total: u64,
    p99: f64,
    p999: f64,
    max: f64,
    overflows: u64,
}

pub fn stall(report: &mut Report, quick: bool) {
    let duration = seconds(quick, 6);
    let stop_for = duration.mul_f64(0.5);
    let rounds = if quick { 1 } else { 3 };
    let mut runs: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
    // parsrv's own p99 under the same load without a stall (the default policy), for the
    // target, measured in the same rounds.
    let mut unstalled_p99 = Vec::new();
    for round in 0..rounds {
        // The order rotated each round: a slow moment of the machine does not always fall
        // on the same model.
        let mut order = MODELS.to_vec();
        order.rotate_left(round % MODELS.len());
        for model in order {
            let (outcome, _, kernel) =
                measure(model, 4, 8, open_loop(STALL_RATE, duration), |served| {
                    // A fixed period mid-run: one worker stopped.
                    thread::sleep(duration.mul_f64(0.25));
                    let pid = served.workers[0];
                    signal(pid, nix::sys::signal::Signal::SIGSTOP);
                    thread::sleep(stop_for);
                    signal(pid, nix::sys::signal::Signal::SIGCONT);
                });
            runs.entry(model.name()).or_default().push(Run {
                failed: outcome.failures(),
                total: outcome.ok + outcome.failures(),
                p99: outcome.ms(0.99),
                p999: outcome.ms(0.999),
                max: outcome.max_ms(),
                overflows: kernel.listen_overflows,
            });
        }
        let (uniform, _, _) = measure(
            Model::ParsrvTwoChoices,
            4,
            8,
            open_loop(STALL_RATE, duration),
            |_| {},
        );
        unstalled_p99.push(uniform.ms(0.99));
    }
    let figure =
        |name: &str, of: fn(&Run) -> f64| -> Vec<f64> { runs[name].iter().map(of).collect() };
    let rows = MODELS
        .iter()
        .map(|model| {
            let name = model.name();
            let failed: u64 = runs[name].iter().map(|r| r.failed).sum();
            let total: u64 = runs[name].iter().map(|r| r.total).sum();
            vec![
                name.into(),
                format!(
                    "{failed} of {total} ({:.1} %)",
                    100.0 * failed as f64 / total.max(1) as f64
                ),
                spread(&figure(name, |r| r.p99), 1),
                spread(&figure(name, |r| r.p999), 1),
                format!("{:.0}", median(figure(name, |r| r.max))),
                spread(&figure(name, |r| r.overflows as f64), 0),
            ]
        })
        .collect();
    let failed = |name: &str| runs[name].iter().map(|r| r.failed).sum::<u64>();
    let overflows = |name: &str| runs[name].iter().map(|r| r.overflows).sum::<u64>();
    let default = Model::ParsrvTwoChoices.name();
    let parsrv_clean = [
        Model::ParsrvRedirect,
        Model::ParsrvTwoChoices,
        Model::ParsrvLeastLoaded,
    ]
    .iter()
    .all(|m| failed(m.name()) == 0 && overflows(m.name()) == 0);
    let notes = vec![
        format!(
            "Targets: every parsrv policy 0 failures and 0 ListenOverflows: {}; reuseport fails: {} ({}); {}",
            if parsrv_clean { "met" } else { "MISSED" },
            if failed("reuseport") > 0 { "yes" } else { "NO" },
            failed("reuseport"),
            ratio_line(
                "parsrv two-choices p99 / its own unstalled p99 (medians)",
                median(figure(default, |r| r.p99)) / median(unstalled_p99.clone()),
                2.0,
                false
            ),
        ),
        "A stalled `listener` worker keeps receiving its round-robin share, and those requests wait; a stalled `shared` worker simply stops taking from the one queue.".into(),
        format!(
            "Stall detection (`--stall-after`, default 0.1 s): redirect's p99 {:.1} ms with it, {:.1} ms without (the stopped worker's queue waits for it), medians.",
            median(figure(Model::ParsrvRedirect.name(), |r| r.p99)),
            median(figure(Model::ParsrvNoStallDetection.name(), |r| r.p99)),
        ),
    ];
    report.table(
        &Table {
            name: "stall",
            title: format!(
                "stall: 4 workers, backlog 8, open loop at {STALL_RATE} connections/s (latency from each request's intended start), {duration:?}; worker 0 stopped for {stop_for:?} mid-run; {rounds} rounds in rotating order, medians (min-max)"
            ),
            columns: vec![
                "model",
                "failed (all rounds)",
                "p99 ms",
                "p99.9 ms",
                "max ms, median",
                "ListenOverflows",
            ],
            rows,
        },
        &notes,
    );
    let bars: Vec<(String, f64)> = MODELS
        .iter()
        .map(|m| (m.name().to_string(), failed(m.name()) as f64))
        .collect();
    report.chart(
        "stall",
        "stall: failed requests while one worker is stopped (all rounds)",
        "failed requests",
        &bars,
    );
}
