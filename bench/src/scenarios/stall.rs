//! `stall`: one worker of four stopped mid-run under an open-loop load: what fails, how long
//! the rest waits, and what the kernel's accept queues overflowed.

use std::thread;

use parsrv_integration_tests::signal;

use crate::{
    harness::{measure, seconds},
    load::open_loop,
    models::Model,
    report::{Report, Table},
    stats::ratio_line,
};

/// Arrival rate of the stall scenario: open loop, so that a stall shows in latency instead of
/// slowing the clients down (coordinated omission).
const STALL_RATE: f64 = 1500.0;

pub fn stall(report: &mut Report, quick: bool) {
    let duration = seconds(quick, 6);
    let stop_for = duration.mul_f64(0.5);
    let mut rows = Vec::new();
    let mut results = std::collections::BTreeMap::new();
    for model in [
        Model::Listener,
        Model::Shared,
        Model::Reuseport,
        Model::ParsrvNoStallDetection,
        Model::ParsrvRedirect,
    ] {
        let (outcome, _, kernel) =
            measure(model, 4, 8, open_loop(STALL_RATE, duration), |served| {
                // A fixed period mid-run: one worker stopped.
                thread::sleep(duration.mul_f64(0.25));
                let pid = served.workers[0];
                signal(pid, nix::sys::signal::Signal::SIGSTOP);
                thread::sleep(stop_for);
                signal(pid, nix::sys::signal::Signal::SIGCONT);
            });
        let total = outcome.ok + outcome.failures();
        rows.push(vec![
            model.name().into(),
            format!(
                "{} of {total} ({:.1} %)",
                outcome.failures(),
                100.0 * outcome.failures() as f64 / total.max(1) as f64
            ),
            format!("{:.1}", outcome.ms(0.99)),
            format!("{:.1}", outcome.ms(0.999)),
            format!("{:.1}", outcome.max_ms()),
            kernel.listen_overflows.to_string(),
        ]);
        results.insert(
            model.name(),
            (
                outcome.failures(),
                kernel.listen_overflows,
                outcome.ms(0.99),
            ),
        );
    }
    // parsrv's own p99 under the same load without a stall, for the target.
    let (uniform, _, _) = measure(
        Model::ParsrvRedirect,
        4,
        8,
        open_loop(STALL_RATE, duration),
        |_| {},
    );
    let (failures, overflows, p99) = results["parsrv redirect"];
    let notes = vec![
        format!(
            "Targets: parsrv 0 failures and 0 ListenOverflows: {} ({failures}, {overflows}); reuseport fails: {} ({}); {}",
            if failures == 0 && overflows == 0 { "met" } else { "MISSED" },
            if results["reuseport"].0 > 0 { "yes" } else { "NO" },
            results["reuseport"].0,
            ratio_line("parsrv p99 / its own uniform p99", p99 / uniform.ms(0.99), 2.0, false),
        ),
        "A stalled `listener` worker keeps receiving its round-robin share, and those requests wait; a stalled `shared` worker simply stops taking from the one queue.".into(),
        format!(
            "Stall detection (`--stall-after`, default 0.1 s): p99 {:.1} ms with it, {:.1} ms without (the stopped worker's queue waits for it); failures {} and {}.",
            p99,
            results["parsrv redirect, no stall detection"].2,
            failures,
            results["parsrv redirect, no stall detection"].0,
        ),
    ];
    report.table(
        &Table {
            name: "stall",
            title: format!(
                "stall: 4 workers, backlog 8, open loop at {STALL_RATE} connections/s (latency from each request's intended start), {duration:?}; worker 0 stopped for {stop_for:?} mid-run"
            ),
            columns: vec!["model", "failed", "p99 ms", "p99.9 ms", "max ms", "ListenOverflows"],
            rows,
        },
        &notes,
    );
    let bars: Vec<(String, f64)> = results
        .iter()
        .map(|(m, r)| (m.to_string(), r.0 as f64))
        .collect();
    report.chart(
        "stall",
        "stall: failed requests while one worker is stopped",
        "failed requests",
        &bars,
    );
}
