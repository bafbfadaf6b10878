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

/// One scale-up run, with `spare` handlers kept ready beside the group's (`--spare`).
pub fn scale_up_run(name: &str, tick: Option<Duration>, spare: u32) -> ScaleUp {
    let server = apps_dir().join("slow_server.py");
    let mut slow = group(name, HandlerKind::Exec)
        .handlers_between(1, 4)
        .backlog(8)
        .command(&["/usr/bin/python3", server.to_str().unwrap()])
        // Ready when it says so: without the notify protocol parsrv takes an exec handler
        // as ready after a second, and until then its socket takes only what the others
        // cannot hold, which is what this would measure.
        .with(|s| {
            s.spare = spare;
            s.notify = true;
        });
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
    let initial = spawner.status();
    let decisions_before = initial.scaling.decisions;
    let sockets_before = initial.sockets.len();
    let mut result = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let status = spawner.status();
        // The overload of the group's first handler: a spare's socket is empty until then.
        let parsrv::kernel::Occupancy { queued, capacity } =
            parsrv::kernel::Occupancy::of(status.sockets.first().and_then(|s| s.queue));
        let rejected: u64 = status
            .sockets
            .iter()
            .map(|s| s.counters.dropped + s.counters.refused)
            .sum();
        if onset.is_none() && queued * 2 >= capacity {
            onset = Some((Instant::now(), rejected, NetCounters::read()));
        }
        if let (Some((at, ..)), None) = (&onset, decided) {
            if status.scaling.decisions > decisions_before || status.sockets.len() > sockets_before
            {
                decided = Some(at.elapsed().as_secs_f64() * 1000.0);
            }
        }
        if let (Some((at, rejected_then, kernel_then)), Some(new)) = (&onset, status.sockets.get(1))
        {
            // The second handler (started by the resize, or the spare) has taken a connection
            // from its queue.
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
    // Interleaved: parsrv, parsrv with a spare, tick, parsrv, ...
    let models = [
        ("parsrv", None, 0),
        ("parsrv --spare 1", None, 1),
        ("tick-1s", Some(Duration::from_secs(1)), 0),
    ];
    let mut results: Vec<Vec<ScaleUp>> = models.iter().map(|_| Vec::new()).collect();
    for i in 0..runs {
        for (m, (_, tick, spare)) in models.iter().enumerate() {
            results[m].push(scale_up_run(&format!("bench-up-{i}"), *tick, *spare));
        }
    }
    for ((model, ..), runs) in models.iter().zip(&results) {
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
        title: format!("scale-up: overload onset (the first handler's queue half full) -> a second handler's first accept (median (min-max) of {runs}, interleaved; slow Python handlers saying READY=1 (--notify), 20 ms/request, 8 clients, --handlers 1..4)"),
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
    let verdict = |value: f64, target: f64| {
        if value <= target {
            format!("{value:.0} ms, met")
        } else {
            format!("{value:.0} ms, MISSED by {:.0} ms", value - target)
        }
    };
    report.table(
        &table,
        &[format!(
            "Targets: parsrv <= 50 ms: {}; with a spare <= 10 ms: {}. The decision is parsrv's; what follows it is starting the handler (a Python interpreter here) until it accepts. A spare is started and ready beforehand: its socket takes connections once the first handler's queue is full, and the autoscaler's step makes it an ordinary handler and starts the next spare.",
            verdict(base, 50.0),
            verdict(medians[1], 10.0)
        )],
    );
}
