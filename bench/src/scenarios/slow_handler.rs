//! `slow-handler`: one worker of four ten times slower than the others, under every model.

use crate::{
    harness::{measure, seconds, slow_down},
    load::closed,
    models::Model,
    report::{Report, Table},
};

pub fn slow_handler(report: &mut Report, quick: bool) {
    let duration = seconds(quick, 5);
    let mut rows = Vec::new();
    let mut bars = Vec::new();
    for model in Model::ALL {
        let (outcome, accepted, _) = measure(model, 4, 64, closed(8, duration), |served| {
            // Worker 0 runs 1 ms in every 10: ten times slower, never stopped for long.
            slow_down(served.workers[0], duration);
        });
        rows.push(vec![
            model.name().into(),
            format!("{:.0}", outcome.per_second()),
            format!("{:.2}", outcome.ms(0.5)),
            format!("{:.1}", outcome.ms(0.99)),
            format!("{:.1}", outcome.ms(0.999)),
            format!("{accepted:?}"),
        ]);
        bars.push((model.name().to_string(), outcome.ms(0.99)));
    }
    report.table(
        &Table {
            name: "slow-handler",
            title: format!("slow-handler: worker 0 runs 1 ms in 10 (10x slower), 8 clients, {duration:?}"),
            columns: vec!["model", "conn/s", "p50 ms", "p99 ms", "p99.9 ms", "accepted per worker"],
            rows,
        },
        &["`redirect` moves connections off the slow worker only once its queue is full (backlog 64 here); `least-loaded` moves them as soon as its queue is longer than another's.".into()],
    );
    report.chart("slow-handler", "slow-handler: p99 latency", "ms", &bars);
}
