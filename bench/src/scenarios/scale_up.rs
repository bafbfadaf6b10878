//! `scale-up`: overload onset to a new handler's first accept, with parsrv's autoscaler
//! against a once-a-second supervisor resizing the same group.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use parsrv::control::{self, Request, Response};
use parsrv_integration_tests::{apps_dir, group, HandlerKind, NetCounters, SteadyLoad};

use crate::{
    harness::{addr, LOAD_LIMIT},
    report::{Report, Table},
    stats::median,
};

/// What one scale-up run measured.
pub struct ScaleUp {
    /// ms from the overload's onset to the new handler's first accept.
    pub reaction_ms: f64,
    /// ms from the onset to the resize decision (the detection), when the status says it.
    pub decided_ms: Option<f64>,
    /// Connections the program dropped or refused in between, and ListenOverflows.
    pub rejected: u64,
    pub overflows: u64,
}

/// One scale-up run.
pub fn scale_up_run(name: &str, tick: Option<Duration>) -> ScaleUp {
    let server = apps_dir().join("slow_server.py");
    let mut slow = group(name, HandlerKind::Exec)
        .handlers_between(1, 4)
        .backlog(8)
        .command(&["/usr/bin/python3", server.to_str().unwrap()]);
    if tick.is_some() {
        // The baseline: its own once-a-second supervisor resizes, not parsrv's autoscaler.
        slow = slow.no_autoscale();
    }
    let spawner = slow.start();
    // The once-a-second supervisor of the baseline.
    let ticking = tick.map(|every| {
        let name = name.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let supervisor = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                thread::sleep(every);
                if let Ok(Response::Status(status)) = control::request(&name, &Request::Status) {
                    let parsrv::kernel::Occupancy { queued, capacity } = status.occupancy();
                    let handlers = status.handlers.len() as u32;
                    if queued * 2 >= capacity && handlers < 4 {
                        let _ = control::request(
                            &name,
                            &Request::Resize {
                                handlers: handlers + 1,
                            },
                        );
                    }
                }
            }
        });
        (stop, supervisor)
    });

    let load = SteadyLoad::start(addr(), 8, LOAD_LIMIT, Duration::from_secs(3));
    let mut onset: Option<(Instant, u64, NetCounters)> = None;
    let mut decided: Option<f64> = None;
    let decisions_before = spawner.status().scaling.decisions;
    let mut result = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let status = spawner.status();
        let parsrv::kernel::Occupancy { queued, capacity } = status.occupancy();
        let rejected: u64 = status
            .sockets
            .iter()
            .map(|s| s.counters.dropped + s.counters.refused)
            .sum();
        if onset.is_none() && queued * 2 >= capacity {
            onset = Some((Instant::now(), rejected, NetCounters::read()));
        }
        if let (Some((at, ..)), None) = (&onset, decided) {
            if status.scaling.decisions > decisions_before || status.sockets.len() > 1 {
                decided = Some(at.elapsed().as_secs_f64() * 1000.0);
            }
        }
        if let (Some((at, rejected_then, kernel_then)), Some(new)) = (&onset, status.sockets.get(1))
        {
            // The new handler has taken a connection from its queue.
            let taken = new.counters.selected + new.counters.migrated_in;
            if taken > 0 && new.queue.is_some_and(|q| (q.depth as u64) < taken) {
                result = Some(ScaleUp {
                    reaction_ms: at.elapsed().as_secs_f64() * 1000.0,
                    decided_ms: decided,
                    rejected: rejected - rejected_then,
                    overflows: kernel_then.delta(&NetCounters::read()).listen_overflows,
                });
                break;
            }
        }
        thread::sleep(Duration::from_millis(2));
    }
    load.finish();
    if let Some((stop, supervisor)) = ticking {
        stop.store(true, Ordering::Relaxed);
        supervisor.join().unwrap();
    }
    spawner.stop();
    result.expect("the group never grew")
}

pub fn scale_up(report: &mut Report, quick: bool) {
    let runs = if quick { 1 } else { 7 };
    let mut rows = Vec::new();
    let mut medians = Vec::new();
    // Interleaved: parsrv, tick, parsrv, tick, ...
    let mut results: [Vec<ScaleUp>; 2] = [Vec::new(), Vec::new()];
    let models = [("parsrv", None), ("tick-1s", Some(Duration::from_secs(1)))];
    for i in 0..runs {
        for (m, (_, tick)) in models.iter().enumerate() {
            results[m].push(scale_up_run(&format!("bench-up-{i}"), *tick));
        }
    }
    for ((model, _), runs) in models.iter().zip(&results) {
        let reaction: Vec<f64> = runs.iter().map(|r| r.reaction_ms).collect();
        let decided: Vec<f64> = runs.iter().filter_map(|r| r.decided_ms).collect();
        let started: Vec<f64> = runs
            .iter()
            .filter_map(|r| Some(r.reaction_ms - r.decided_ms?))
            .collect();
        let fmt = |v: &[f64]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                let lo = v.iter().copied().fold(f64::MAX, f64::min);
                let hi = v.iter().copied().fold(f64::MIN, f64::max);
                format!("{:.0} ({lo:.0}-{hi:.0})", median(v.to_vec()))
            }
        };
        medians.push(median(reaction.clone()));
        rows.push(vec![
            model.to_string(),
            fmt(&reaction),
            fmt(&decided),
            fmt(&started),
            format!(
                "{:.0}",
                median(runs.iter().map(|r| r.rejected as f64).collect())
            ),
            format!(
                "{:.0}",
                median(runs.iter().map(|r| r.overflows as f64).collect())
            ),
        ]);
    }
    let base = medians[0];
    for (row, m) in rows.iter_mut().zip(&medians) {
        row.push(format!("{:.1}", m / base));
    }
    let table = Table {
        name: "scale-up",
        title: format!("scale-up: overload onset -> new handler's first accept (median (min-max) of {runs}, interleaved; slow Python handlers, 20 ms/request, 8 clients, --handlers 1..4)"),
        columns: vec![
            "model",
            "reaction (ms)",
            "onset -> decision (ms)",
            "decision -> first accept (ms)",
            "dropped/refused meanwhile",
            "ListenOverflows meanwhile",
            "ratio to parsrv",
        ],
        rows,
    };
    let verdict = if base <= 50.0 {
        "met".to_string()
    } else {
        format!("MISSED by {:.0} ms", base - 50.0)
    };
    report.table(
        &table,
        &[format!(
            "Target: parsrv <= 50 ms: {verdict}. The decision is parsrv's; what follows it is starting the handler (a Python interpreter here) until it accepts."
        )],
    );
}
