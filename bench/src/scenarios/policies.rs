//! `policies`: the three policies side by side on the workloads a default must serve (even
//! load, one slow worker, one stopped worker) at 2 to 64 sockets, in rotating order, with
//! the winner of each row: the numbers the default policy is chosen by (docs/steering.md).

use std::{collections::BTreeMap, thread, time::Duration};

use parsrv_integration_tests::signal;

use crate::{
    harness::{measure, seconds, slow_down},
    load::{closed, open_loop, Outcome, Spec},
    models::{Model, Served},
    report::{Report, Table},
    stats::{median, spread},
};

const POLICIES: [Model; 3] = [
    Model::ParsrvRedirect,
    Model::ParsrvTwoChoices,
    Model::ParsrvLeastLoaded,
];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    /// Every worker alike, closed loop.
    Uniform,
    /// Worker 0 runs 1 ms in every 10, closed loop.
    Slow,
    /// Worker 0 stopped for the middle half of the run, open loop (a stall shows in
    /// latency instead of slowing the clients down), the default queue length (128): what
    /// waits behind the stopped worker until stall detection moves it shows in the tail.
    Stall,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::Uniform, Workload::Slow, Workload::Stall];

    fn name(self) -> &'static str {
        match self {
            Workload::Uniform => "uniform",
            Workload::Slow => "one worker 10x slower",
            Workload::Stall => "one worker stopped",
        }
    }

    /// The load and the queue length.
    fn load(self, sockets: usize, duration: Duration) -> (Spec, u32) {
        let clients = (2 * sockets).min(32);
        match self {
            Workload::Uniform | Workload::Slow => (closed(clients, duration), 128),
            Workload::Stall => (open_loop(STALL_RATE, duration), 128),
        }
    }

    /// What is done to worker 0 while the load runs.
    fn disturb(self, served: &Served, duration: Duration) {
        let pid = served.workers[0];
        match self {
            Workload::Uniform => {}
            Workload::Slow => slow_down(pid, duration),
            Workload::Stall => {
                thread::sleep(duration.mul_f64(0.25));
                signal(pid, nix::sys::signal::Signal::SIGSTOP);
                thread::sleep(duration.mul_f64(0.5));
                signal(pid, nix::sys::signal::Signal::SIGCONT);
            }
        }
    }
}

/// The stall workload's arrival rate (as in the `stall` scenario).
const STALL_RATE: f64 = 1500.0;

pub fn policies(report: &mut Report, quick: bool) {
    let sizes: &[usize] = if quick { &[2] } else { &[2, 8, 32, 64] };
    let rounds = if quick { 1 } else { 3 };
    let duration = seconds(quick, 3);
    let mut runs: BTreeMap<(usize, Workload, &str), Vec<Outcome>> = BTreeMap::new();
    for &sockets in sizes {
        for workload in Workload::ALL {
            for round in 0..rounds {
                // The order rotated each round: a slow moment of the machine does not always
                // fall on the same policy.
                let mut order = POLICIES.to_vec();
                order.rotate_left(round % POLICIES.len());
                for model in order {
                    let (spec, backlog) = workload.load(sockets, duration);
                    let (outcome, _, _) = measure(model, sockets, backlog, spec, |served| {
                        workload.disturb(served, duration)
                    });
                    runs.entry((sockets, workload, model.name()))
                        .or_default()
                        .push(outcome);
                }
            }
        }
    }
    let mut rows = Vec::new();
    let mut wins: BTreeMap<&str, u32> = BTreeMap::new();
    for &sockets in sizes {
        for workload in Workload::ALL {
            let score = |name: &str| -> (u64, f64) {
                let outcomes = &runs[&(sockets, workload, name)];
                let failed = outcomes.iter().map(Outcome::failures).sum();
                let figure = match workload {
                    // Closed loop: throughput is what a policy gives (higher is better).
                    Workload::Uniform | Workload::Slow => {
                        -median(outcomes.iter().map(Outcome::per_second).collect())
                    }
                    // Open loop: every policy gets the same arrivals; the tail tells (the
                    // few connections that waited behind the stopped worker).
                    Workload::Stall => median(outcomes.iter().map(|o| o.ms(0.999)).collect()),
                };
                (failed, figure)
            };
            let winner = POLICIES
                .iter()
                .map(|m| m.name())
                .min_by(|a, b| {
                    let (fa, xa) = score(a);
                    let (fb, xb) = score(b);
                    fa.cmp(&fb).then(xa.total_cmp(&xb))
                })
                .unwrap();
            *wins.entry(winner).or_default() += 1;
            for model in POLICIES {
                let outcomes = &runs[&(sockets, workload, model.name())];
                let rate: Vec<f64> = outcomes.iter().map(Outcome::per_second).collect();
                let p99: Vec<f64> = outcomes.iter().map(|o| o.ms(0.99)).collect();
                let p999: Vec<f64> = outcomes.iter().map(|o| o.ms(0.999)).collect();
                let max: Vec<f64> = outcomes.iter().map(|o| o.max_ms()).collect();
                rows.push(vec![
                    sockets.to_string(),
                    workload.name().into(),
                    model.name().into(),
                    spread(&rate, 0),
                    spread(&p99, 2),
                    spread(&p999, 1),
                    format!("{:.0}", median(max)),
                    outcomes
                        .iter()
                        .map(Outcome::failures)
                        .sum::<u64>()
                        .to_string(),
                    if model.name() == winner { "best" } else { "" }.into(),
                ]);
            }
        }
    }
    let tally: Vec<String> = wins.iter().map(|(m, n)| format!("{m} {n}")).collect();
    report.table(
        &Table {
            name: "policies",
            title: format!(
                "policies: {rounds} rounds in rotating order of {duration:?} per policy; closed loop with 2 clients per socket (at most 32); the stopped worker's runs open loop at {STALL_RATE} connections/s, worker 0 stopped for the middle half; backlog 128 (the default) and stall detection on (the default, 0.1 s) throughout"
            ),
            columns: vec![
                "sockets",
                "workload",
                "policy",
                "conn/s median (min-max)",
                "p99 ms median (min-max)",
                "p99.9 ms median (min-max)",
                "max ms, median",
                "failed (all rounds)",
                "row's best",
            ],
            rows,
        },
        &[format!(
            "Best per row: fewest failed, then the highest median conn/s (closed loop) or the lowest median p99.9 (open loop). Rows won: {}.",
            tally.join(", ")
        )],
    );
}
