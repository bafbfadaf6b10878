//! `spawner-kill`: the spawner SIGKILLed under steady load, then started again, which adopts
//! its handlers. Prints the requests failed across each cycle and how long the group ran
//! without supervision (from the kill until the new spawner answered `status` for the
//! adopted group), against the same load with the handlers of the old design, which died
//! with their spawner: a plain server process killed and started again.

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use parsrv_integration_tests::{
    group, lone_server, signal, HandlerKind, Outcome, Spawner, SteadyLoad,
};

use crate::{
    harness::addr,
    report::{Report, Table},
    stats::median,
};

pub fn spawner_kill(report: &mut Report, quick: bool) {
    let cycles = if quick { 3 } else { 10 };
    let build = || {
        group("bench-spawner-kill", HandlerKind::Http)
            .handlers(4)
            .threads(2)
    };
    let mut spawner = build().start();
    let pids =
        |s: &Spawner| -> Vec<Option<u32>> { s.status().handlers.iter().map(|h| h.pid).collect() };
    let handlers = pids(&spawner);
    let load = SteadyLoad::start(addr(), 4, Duration::from_secs(120), Duration::from_secs(3));
    let mut gaps = Vec::new();
    let mut kept = 0;
    for _ in 0..cycles {
        sleep(Duration::from_millis(500));
        let killed = Instant::now();
        signal(spawner.pid(), nix::sys::signal::Signal::SIGKILL);
        let old = spawner;
        spawner = build().start();
        gaps.push(killed.elapsed().as_secs_f64() * 1e3);
        kept += usize::from(pids(&spawner) == handlers);
        drop(old);
    }
    sleep(Duration::from_millis(500));
    let outcomes = load.finish();
    spawner.stop();
    let failed = outcomes.iter().filter(|o| **o != Outcome::Ok).count();
    let mut rows = vec![vec![
        "parsrv: spawner SIGKILLed, next run adopts".to_string(),
        cycles.to_string(),
        outcomes.len().to_string(),
        failed.to_string(),
        format!("{kept} of {cycles}"),
        format!("{:.0}", median(gaps.clone())),
        format!("{:.0}", gaps.iter().cloned().fold(0.0, f64::max)),
    ]];

    // The control: a server process that holds its socket alone, killed and started again
    // (what a spawner whose handlers die with it gives).
    let load = SteadyLoad::start(addr(), 4, Duration::from_secs(120), Duration::from_secs(3));
    let mut gaps = Vec::new();
    let mut server = lone_server(addr());
    for _ in 0..cycles {
        sleep(Duration::from_millis(500));
        let killed = Instant::now();
        let _ = server.kill();
        let _ = server.wait();
        server = lone_server(addr());
        gaps.push(killed.elapsed().as_secs_f64() * 1e3);
    }
    sleep(Duration::from_millis(500));
    let outcomes = load.finish();
    let _ = server.kill();
    let _ = server.wait();
    let failed = outcomes.iter().filter(|o| **o != Outcome::Ok).count();
    rows.push(vec![
        "control: the server process killed and started again".to_string(),
        cycles.to_string(),
        outcomes.len().to_string(),
        failed.to_string(),
        "-".into(),
        format!("{:.0}", median(gaps.clone())),
        format!("{:.0}", gaps.iter().cloned().fold(0.0, f64::max)),
    ]);
    report.table(
        &Table {
            name: "spawner-kill",
            title: format!("spawner-kill: {cycles} SIGKILLs under 4 steady clients, connection per request"),
            columns: vec![
                "model",
                "kills",
                "requests",
                "failed",
                "handler pids kept",
                "unsupervised median ms",
                "unsupervised max ms",
            ],
            rows,
        },
        &["Target: parsrv 0 failed and every handler kept; the control shows what a death costs without it.".to_string()],
    );
}
