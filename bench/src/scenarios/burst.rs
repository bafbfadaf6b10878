//! `burst`: more connections at once than the workers' accept queues hold, and how long
//! until every one is answered.

use std::time::{Duration, Instant};

use parsrv_integration_tests::NetCounters;

use crate::{
    harness::addr,
    load::{self, Connections, Spec},
    models::{Model, Served},
    report::{Report, Table},
};

pub fn burst(report: &mut Report, quick: bool) {
    // 4 workers x (backlog 8 + 1) = 36 places; bursts of 120 connections at once.
    let (workers, backlog, burst) = (4, 8, 120);
    let mut rows = Vec::new();
    for model in [Model::Reuseport, Model::ParsrvRedirect] {
        let served = Served::start(model, workers, backlog, addr());
        let before = NetCounters::read();
        let program_before = served.spawner().map(|s| s.status());
        let started = Instant::now();
        let spec = Spec {
            clients: burst,
            duration: Duration::from_millis(10),
            connections: Connections::PerRequest,
            rate: Some(burst as f64 * 100.0),
            timeout: if quick {
                Duration::from_secs(2)
            } else {
                Duration::from_secs(4)
            },
            client_addresses: 0,
        };
        let outcome = load::run(addr(), spec);
        let recovery = started.elapsed();
        let kernel = before.delta(&NetCounters::read());
        let dropped = match (served.spawner(), program_before) {
            (Some(spawner), Some(before)) => {
                let sum = |s: &parsrv::status::GroupStatus| -> u64 {
                    s.sockets.iter().map(|s| s.counters.dropped).sum()
                };
                (sum(&spawner.status()) - sum(&before)).to_string()
            }
            _ => "-".into(),
        };
        rows.push(vec![
            model.name().into(),
            format!(
                "{} of {}",
                outcome.failures(),
                outcome.ok + outcome.failures()
            ),
            format!("{:?}", outcome.failed),
            kernel.listen_overflows.to_string(),
            dropped,
            format!("{:.0}", recovery.as_secs_f64() * 1000.0),
            format!("{:.0}", outcome.max_ms()),
        ]);
        served.stop();
    }
    report.table(
        &Table {
            name: "burst",
            title: format!("burst: {burst} connections at once into {workers} workers x (backlog {backlog} + 1) places"),
            columns: vec!["model", "failed", "by kind", "ListenOverflows", "program dropped", "all answered after ms", "max ms"],
            rows,
        },
        &["Dropped SYNs are retransmitted by the clients (1 s, 2 s, ...): the burst is absorbed as the queues drain. parsrv's `dropped` counts the SYNs it handed to a full socket; the kernel counts the same as ListenOverflows.".into()],
    );
}
