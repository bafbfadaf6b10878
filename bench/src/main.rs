//! `cargo xtask bench [SCENARIO...] [--quick]` (or `parsrv bench`): parsrv against the
//! dispatch models it replaces ([`models`]), each scenario in its own network namespace on
//! loopback, bounded in time. Every table compares models measured in the same run (this
//! machine is shared and noisy: read the ratios). Results go to a folder (`report.md`, CSV,
//! PNG charts) labelled with machine, date, commit and parameters.

mod addresses;
mod affinity;
mod cluster;
mod faults;
mod lifecycle;
mod load;
mod models;
mod overhead;
mod report;
mod spawner_kill;

use std::{
    net::SocketAddr,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use load::{Connections, Spec};
use models::{Model, Served};
use parsrv_integration_tests::{isolated, signal, NetCounters};
use report::{Report, Table};

/// No client of the lifecycle scenarios runs longer than this, whatever happens.
pub const LOAD_LIMIT: Duration = Duration::from_secs(120);

const SCENARIOS: [&str; 13] = [
    "uniform",
    "stall",
    "burst",
    "slow-handler",
    "prog-cost",
    "scale-up",
    "restart",
    "faults",
    "spawner-kill",
    "affinity",
    "overhead",
    "addresses",
    "cluster",
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("acceptor") => models::acceptor(args[1].parse().expect("worker count")),
        Some("worker") => models::worker(),
        Some("sticky-worker") => affinity::sticky_worker(),
        _ => {}
    }
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let mut wanted: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--") && Some(*a) != out.as_ref().and_then(|o| o.to_str()))
        .collect();
    if let Some(unknown) = wanted.iter().find(|w| !SCENARIOS.contains(w)) {
        eprintln!(
            "parsrv-bench: no scenario '{unknown}': choose from {}",
            SCENARIOS.join(", ")
        );
        std::process::exit(2);
    }
    if wanted.is_empty() {
        wanted = SCENARIOS.to_vec();
    }
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let commit = std::env::var("PARSRV_COMMIT").unwrap_or_else(|_| "unknown".into());
    let dir = out.unwrap_or_else(|| {
        PathBuf::from("target/bench").join(format!(
            "{}-{}",
            now.replace(':', ""),
            if quick { "quick" } else { "full" }
        ))
    });
    let header = format!(
        "# parsrv benchmarks\n\nMachine: {} CPUs, kernel {}. Date: {now}. Commit: {commit}. Run: {}.\n\
         Loopback in a network namespace of its own per scenario; every model serves with parsrv's \
         built-in HTTP handler code, one thread per worker.\n\n{}",
        thread::available_parallelism().map_or(0, |n| n.get()),
        parsrv::features::kernel_build(),
        if quick { "quick (checks the harness; figures mean little)" } else { "full" },
        verification_table()
    );
    let mut report = Report::new(dir, &header);
    for wanted in wanted {
        let scenario: &'static str = SCENARIOS.iter().find(|s| **s == wanted).expect("checked");
        // Each scenario in namespaces of its own (network; mounts with a fresh bpffs).
        report = isolated(move || {
            let mut report = report;
            match scenario {
                "uniform" => uniform(&mut report, quick),
                "stall" => stall(&mut report, quick),
                "burst" => burst(&mut report, quick),
                "slow-handler" => slow_handler(&mut report, quick),
                "prog-cost" => prog_cost(&mut report, quick),
                "scale-up" => lifecycle::scale_up(&mut report, quick),
                "restart" => lifecycle::restart(&mut report, quick),
                "faults" => faults::faults(&mut report, quick),
                "spawner-kill" => spawner_kill::spawner_kill(&mut report, quick),
                "affinity" => affinity::affinity(&mut report, quick),
                "overhead" => overhead::overhead(&mut report, quick),
                "addresses" => addresses::addresses(&mut report, quick),
                "cluster" => cluster::cluster(&mut report, quick),
                _ => unreachable!(),
            }
            report
        });
    }
    let path = report.finish();
    println!("\nreport: {}", path.display());
}

/// What the verifier spent on each program of the parsrv under test, on this kernel (`parsrv
/// kernel --json`), and which object that is: the margin to the verifier's budget, kept with
/// the figures it was measured beside.
fn verification_table() -> String {
    let bin = parsrv_integration_tests::parsrv_bin();
    let version = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .replace('\n', "; ")
        })
        .unwrap_or_default();
    let mut table = format!("Binary: {version}.\n\n| program | verifier cost here |\n|---|---|\n");
    for p in parsrv_integration_tests::kernel_report(&[]).programs {
        table.push_str(&format!("| `{}` | {} |\n", p.program, p.describe()));
    }
    table
}

pub fn addr() -> SocketAddr {
    "127.0.0.1:8080".parse().unwrap()
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn seconds(quick: bool, full: u64) -> Duration {
    if quick {
        Duration::from_millis(800)
    } else {
        Duration::from_secs(full)
    }
}

/// Fairness: the most any worker accepted over the least (1.0 is perfectly even).
fn fairness(accepted: &[u64]) -> f64 {
    let max = *accepted.iter().max().unwrap_or(&0) as f64;
    let min = *accepted.iter().min().unwrap_or(&0) as f64;
    if min == 0.0 {
        f64::INFINITY
    } else {
        max / min
    }
}

fn deltas(after: &[u64], before: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// Serves `model` with `workers`, runs `spec` against it; returns the load's outcome and what
/// each worker accepted meanwhile.
fn measure(
    model: Model,
    workers: usize,
    backlog: u32,
    spec: Spec,
    during: impl FnOnce(&Served) + Send,
) -> (load::Outcome, Vec<u64>, NetCounters) {
    let served = Served::start(model, workers, backlog, addr());
    // Warm up: every worker up and accepting.
    let _ = load::run(
        addr(),
        Spec {
            duration: Duration::from_millis(200),
            ..spec
        },
    );
    let before = served.accepted();
    let kernel = NetCounters::read();
    let outcome = thread::scope(|scope| {
        let running = scope.spawn(|| load::run(addr(), spec));
        during(&served);
        running.join().unwrap()
    });
    let kernel = kernel.delta(&NetCounters::read());
    let accepted = deltas(&served.accepted(), &before);
    served.stop();
    (outcome, accepted, kernel)
}

/// Arrival rate of the stall scenario: open loop, so that a stall shows in latency instead of
/// slowing the clients down (coordinated omission).
const STALL_RATE: f64 = 1500.0;

fn open_loop(rate: f64, duration: Duration) -> Spec {
    Spec {
        clients: 0,
        duration,
        connections: Connections::PerRequest,
        rate: Some(rate),
        timeout: Duration::from_secs(3),
        client_addresses: 0,
    }
}

fn closed(clients: usize, duration: Duration) -> Spec {
    Spec {
        clients,
        duration,
        connections: Connections::PerRequest,
        rate: None,
        timeout: Duration::from_secs(3),
        client_addresses: 0,
    }
}

fn ratio_line(name: &str, value: f64, target: f64, higher_is_better: bool) -> String {
    let met = if higher_is_better {
        value >= target
    } else {
        value <= target
    };
    let cmp = if higher_is_better { ">=" } else { "<=" };
    if met {
        format!("{name}: {value:.2} (target {cmp} {target}): met.")
    } else {
        format!(
            "{name}: {value:.2} (target {cmp} {target}): MISSED by {:.2}.",
            (value - target).abs()
        )
    }
}

/// `median (min-max)` of `values`, with `digits` decimals.
pub fn spread(values: &[f64], digits: usize) -> String {
    let lo = values.iter().copied().fold(f64::MAX, f64::min);
    let hi = values.iter().copied().fold(f64::MIN, f64::max);
    format!(
        "{:.digits$} ({lo:.digits$}-{hi:.digits$})",
        median(values.to_vec())
    )
}

fn uniform(report: &mut Report, quick: bool) {
    let sizes: &[usize] = if quick { &[2] } else { &[2, 4, 8] };
    let rounds = if quick { 1 } else { 3 };
    let duration = seconds(quick, 4);
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut chart = Vec::new();
    for &n in sizes {
        // Every model once per round, the order rotated each round, so that a slow moment
        // of the machine does not always fall on the same model; ratios are taken within a
        // round.
        let mut runs: std::collections::BTreeMap<&str, Vec<(load::Outcome, f64)>> =
            std::collections::BTreeMap::new();
        for round in 0..rounds {
            let mut order = Model::ALL.to_vec();
            order.rotate_left(round % Model::ALL.len());
            for model in order {
                let (outcome, accepted, _) =
                    measure(model, n, 128, closed(2 * n, duration), |_| {});
                let fair = fairness(&accepted);
                runs.entry(model.name()).or_default().push((outcome, fair));
            }
        }
        for model in Model::ALL {
            let samples = &runs[model.name()];
            let of = |f: &dyn Fn(&(load::Outcome, f64)) -> f64| -> Vec<f64> {
                samples.iter().map(f).collect()
            };
            let rate = of(&|s| s.0.per_second());
            rows.push(vec![
                n.to_string(),
                model.name().into(),
                spread(&rate, 0),
                format!("{:.2}", median(of(&|s| s.0.ms(0.5)))),
                spread(&of(&|s| s.0.ms(0.99)), 2),
                format!("{:.2}", median(of(&|s| s.0.ms(0.999)))),
                format!("{:.2}", median(of(&|s| s.0.connect_ms(0.99)))),
                format!("{:.2}", median(of(&|s| s.1))),
                samples
                    .iter()
                    .map(|s| s.0.failures())
                    .sum::<u64>()
                    .to_string(),
            ]);
            if n == sizes[sizes.len() / 2] {
                chart.push((model.name().to_string(), median(rate)));
            }
        }
        let ratio = |a: &str, b: &str| -> Vec<f64> {
            runs[a]
                .iter()
                .zip(&runs[b])
                .map(|(x, y)| x.0.per_second() / y.0.per_second())
                .collect()
        };
        let to_reuseport = ratio("parsrv redirect", "reuseport");
        let to_listener = ratio("parsrv redirect", "listener");
        let fair: Vec<f64> = runs["parsrv redirect"].iter().map(|s| s.1).collect();
        notes.push(format!(
            "N={n} (medians of {rounds} rounds, min-max): parsrv/reuseport throughput {}; parsrv/listener {}; {}",
            spread(&to_reuseport, 2),
            spread(&to_listener, 2),
            ratio_line("parsrv fairness max/min", median(fair), 1.2, false),
        ));
    }
    let keep_alive = Spec {
        connections: Connections::KeepAlive,
        ..closed(8, duration)
    };
    let kept: Vec<String> = [Model::Reuseport, Model::ParsrvRedirect]
        .into_iter()
        .map(|model| {
            let (outcome, _, _) = measure(model, 4, 128, keep_alive, |_| {});
            format!(
                "{} {:.0} requests/s (p99 {:.2} ms)",
                model.name(),
                outcome.per_second(),
                outcome.ms(0.99)
            )
        })
        .collect();
    notes.push(format!(
        "Keep-alive (8 clients, N=4; the dispatch only sees the connections, not their requests): {}.",
        kept.join(", ")
    ));
    if !quick {
        notes.push(wrk_confirmation(duration));
    }
    report.table(
        &Table {
            name: "uniform",
            title: format!("uniform: closed loop, 2 clients per worker, a connection per request, {rounds} rounds of {duration:?} in rotating order (median, min-max)"),
            columns: vec!["N", "model", "conn/s", "p50 ms", "p99 ms", "p99.9 ms", "connect p99 ms", "fairness max/min", "failed"],
            rows,
        },
        &notes,
    );
    report.chart(
        "uniform",
        "uniform: new connections per second",
        "connections/s",
        &chart,
    );
}

/// The same uniform load from wrk (Debian's), for parsrv and reuseport, to confirm ours.
fn wrk_confirmation(duration: Duration) -> String {
    let Ok(_) = std::process::Command::new("wrk").arg("--version").output() else {
        return "wrk is not installed: no third-party confirmation in this run.".into();
    };
    let mut lines = Vec::new();
    for model in [Model::Reuseport, Model::ParsrvRedirect] {
        let served = Served::start(model, 4, 128, addr());
        let out = std::process::Command::new("wrk")
            .args([
                "-t2",
                "-c8",
                &format!("-d{}s", duration.as_secs().max(1)),
                "-H",
                "Connection: close",
            ])
            .arg(format!("http://{}/", addr()))
            .output();
        served.stop();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let per_second = text
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .map(str::trim)
            .unwrap_or("?");
        lines.push(format!("{} {per_second}/s", model.name()));
    }
    format!(
        "wrk -t2 -c8 with `Connection: close`, N=4: {}.",
        lines.join(", ")
    )
}

fn stall(report: &mut Report, quick: bool) {
    let duration = seconds(quick, 6);
    let stop_for = duration.mul_f64(0.5);
    let mut rows = Vec::new();
    let mut results = std::collections::BTreeMap::new();
    for model in [
        Model::Listener,
        Model::Shared,
        Model::Reuseport,
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

fn burst(report: &mut Report, quick: bool) {
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

fn slow_handler(report: &mut Report, quick: bool) {
    let duration = seconds(quick, 5);
    let mut rows = Vec::new();
    let mut bars = Vec::new();
    for model in Model::ALL {
        let (outcome, accepted, _) = measure(model, 4, 64, closed(8, duration), |served| {
            // Worker 0 runs 1 ms in every 10: ten times slower, never stopped for long.
            let pid = served.workers[0];
            let end = Instant::now() + duration;
            while Instant::now() < end {
                signal(pid, nix::sys::signal::Signal::SIGSTOP);
                thread::sleep(Duration::from_millis(9));
                signal(pid, nix::sys::signal::Signal::SIGCONT);
                thread::sleep(Duration::from_millis(1));
            }
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

fn prog_cost(report: &mut Report, quick: bool) {
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
