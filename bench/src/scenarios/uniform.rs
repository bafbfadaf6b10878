//! `uniform`: every model under the same closed-loop load, repeated in rotating order, with
//! a keep-alive comparison and, in a full run, wrk's figures for parsrv and reuseport.

use std::time::Duration;

use crate::{
    harness::{addr, measure, seconds},
    load::{self, closed, Connections, Spec},
    models::{Model, Served},
    report::{Report, Table},
    stats::{fairness, median, ratio_line, spread},
};

pub fn uniform(report: &mut Report, quick: bool) {
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
