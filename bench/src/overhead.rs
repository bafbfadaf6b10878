//! `overhead`: what steering costs against plain SO_REUSEPORT, told apart from this
//! machine's noise. Each comparison runs as interleaved pairs (reuseport then parsrv, then
//! parsrv then reuseport, ...), and the report gives the median of the per-pair ratios with
//! their spread, for throughput and for p99. Measured in the same runs, to say where a cost
//! goes: CPU time and context switches of the whole machine per connection (`perf stat -a`,
//! when perf is installed), the program's own run time (bpf_stats), and the spawner's
//! wake-ups, under load and idle.

use std::{process::Command, thread, time::Duration};

use crate::{
    addr, load, median,
    models::{Model, Served},
    report::{Report, Table},
    seconds,
};

/// What one run measured.
struct Sample {
    rate: f64,
    p99_ms: f64,
    /// Machine-wide CPU time per connection (µs) and context switches per connection.
    cpu_us_per_conn: Option<f64>,
    switches_per_conn: Option<f64>,
    /// parsrv only: the program's ns per run, and the spawner's wake-ups per second.
    program_ns: Option<f64>,
    spawner_wakeups: Option<f64>,
}

/// Context switches of every thread of `pid` so far: each one a wake-up (or a preemption).
fn switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// `perf stat -a` for `duration`: (task-clock ms, context switches) of the whole machine.
fn perf_stat(duration: Duration) -> Option<(f64, f64)> {
    let out = Command::new("perf")
        .args([
            "stat",
            "-a",
            "-x,",
            "-e",
            "task-clock,context-switches",
            "--",
        ])
        .arg("sleep")
        .arg(format!("{}", duration.as_secs_f64()))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let value = |event: &str| {
        text.lines()
            .find(|l| l.contains(event))
            .and_then(|l| l.split(',').next()?.trim().parse::<f64>().ok())
    };
    Some((value("task-clock")?, value("context-switches")?))
}

fn run(model: Model, n: usize, duration: Duration) -> Sample {
    let served = Served::start(model, n, 128, addr());
    let spec = crate::closed(2 * n, duration);
    // Warm up: every worker up and accepting.
    let _ = load::run(
        addr(),
        load::Spec {
            duration: Duration::from_millis(200),
            ..spec
        },
    );
    let spawner = served.spawner();
    let program_before = spawner.map(|s| s.status().program);
    let switches_before = spawner.map(|s| switches(s.pid()));
    let (outcome, perf) = thread::scope(|scope| {
        // Counted over the load's middle: its start and end are the harness's.
        let perf = scope.spawn(|| {
            thread::sleep(duration / 10);
            perf_stat(duration * 8 / 10)
        });
        let outcome = load::run(addr(), spec);
        (outcome, perf.join().unwrap())
    });
    let program = spawner.map(|s| s.status().program);
    let wakeups = spawner
        .zip(switches_before)
        .map(|(s, before)| (switches(s.pid()) - before) as f64 / duration.as_secs_f64());
    served.stop();
    let program_ns = program_before.zip(program).and_then(|(before, after)| {
        let runs = after.run_count - before.run_count;
        (runs > 0).then(|| (after.run_time_ns - before.run_time_ns) as f64 / runs as f64)
    });
    // The perf window is 8/10 of the load; the load's rate gives its connections.
    let connections = outcome.per_second() * duration.as_secs_f64() * 0.8;
    Sample {
        rate: outcome.per_second(),
        p99_ms: outcome.ms(0.99),
        cpu_us_per_conn: perf.map(|(ms, _)| ms * 1000.0 / connections),
        switches_per_conn: perf.map(|(_, cs)| cs / connections),
        program_ns,
        spawner_wakeups: wakeups,
    }
}

fn spread(values: &[f64]) -> String {
    let lo = values.iter().copied().fold(f64::MAX, f64::min);
    let hi = values.iter().copied().fold(f64::MIN, f64::max);
    format!("{:.3} ({lo:.3}-{hi:.3})", median(values.to_vec()))
}

fn median_of(samples: &[Sample], field: fn(&Sample) -> Option<f64>, digits: usize) -> String {
    let values: Vec<f64> = samples.iter().filter_map(field).collect();
    if values.is_empty() {
        "-".into()
    } else {
        format!("{:.digits$}", median(values))
    }
}

pub fn overhead(report: &mut Report, quick: bool) {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let was = std::fs::read_to_string(STATS).unwrap_or_default();
    let _ = std::fs::write(STATS, "1");
    let sizes: &[usize] = if quick { &[2] } else { &[2, 4, 8, 16] };
    let pairs = if quick { 1 } else { 5 };
    let duration = seconds(quick, 3);
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &n in sizes {
        let (mut plain, mut parsrv) = (Vec::new(), Vec::new());
        for pair in 0..pairs {
            let mut order = [Model::Reuseport, Model::ParsrvRedirect];
            if pair % 2 == 1 {
                order.reverse();
            }
            for model in order {
                let sample = run(model, n, duration);
                if model == Model::Reuseport {
                    plain.push(sample);
                } else {
                    parsrv.push(sample);
                }
            }
        }
        let rate: Vec<f64> = parsrv
            .iter()
            .zip(&plain)
            .map(|(p, r)| p.rate / r.rate)
            .collect();
        let p99: Vec<f64> = parsrv
            .iter()
            .zip(&plain)
            .map(|(p, r)| p.p99_ms / r.p99_ms)
            .collect();
        let rate_median = median(rate.clone());
        let p99_median = median(p99.clone());
        notes.push(format!(
            "N={n}: throughput {rate_median:.3}x (target >= 0.99: {}), p99 {p99_median:.3}x (target <= 1.05: {}).",
            if rate_median >= 0.99 { "met" } else { "NOT met" },
            if p99_median <= 1.05 { "met" } else { "NOT met" },
        ));
        rows.push(vec![
            n.to_string(),
            pairs.to_string(),
            spread(&rate),
            spread(&p99),
            format!(
                "{} / {}",
                median_of(&parsrv, |s| s.cpu_us_per_conn, 1),
                median_of(&plain, |s| s.cpu_us_per_conn, 1)
            ),
            format!(
                "{} / {}",
                median_of(&parsrv, |s| s.switches_per_conn, 2),
                median_of(&plain, |s| s.switches_per_conn, 2)
            ),
            median_of(&parsrv, |s| s.program_ns, 0),
            median_of(&parsrv, |s| s.spawner_wakeups, 0),
        ]);
    }
    let _ = std::fs::write(STATS, was.trim());
    // The spawner with nothing to do: its wake-ups per second.
    let served = Served::start(Model::ParsrvRedirect, 4, 128, addr());
    let idle = seconds(quick, 5);
    let pid = served.spawner().unwrap().pid();
    let before = switches(pid);
    thread::sleep(idle);
    let idle_wakeups = (switches(pid) - before) as f64 / idle.as_secs_f64();
    served.stop();
    notes.push(format!(
        "Idle (4 handlers, no connection, {idle:?}): the spawner woke {idle_wakeups:.0} times a second."
    ));
    report.table(
        &Table {
            name: "overhead",
            title: format!(
                "overhead: parsrv redirect against plain SO_REUSEPORT, {pairs} interleaved pairs of {duration:?} per size, closed loop, 2 clients per worker, a connection per request"
            ),
            columns: vec![
                "N",
                "pairs",
                "conn/s ratio median (min-max)",
                "p99 ratio median (min-max)",
                "CPU µs per connection, parsrv / reuseport",
                "context switches per connection, parsrv / reuseport",
                "program ns per run",
                "spawner wake-ups/s under load",
            ],
            rows,
        },
        &notes,
    );
}
