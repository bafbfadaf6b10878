//! `cargo xtask bench [SCENARIO...] [--quick]` (or `parsrv bench`; `--list` names the
//! scenarios and what each measures): parsrv against the
//! dispatch models it replaces ([`models`]), each scenario in its own network namespace on
//! loopback, bounded in time. Every table compares models measured in the same run (this
//! machine is shared and noisy: read the ratios). Results go to a folder (`report.md`, CSV,
//! SVG charts) labelled with machine, date, commit and parameters.

mod harness;
mod load;
mod models;
mod report;
mod scenarios;
mod stats;

use std::{path::PathBuf, thread};

use parsrv_integration_tests::isolated;
use report::Report;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("acceptor") => models::acceptor(args[1].parse().expect("worker count")),
        Some("worker") => models::worker(),
        Some("sticky-worker") => scenarios::sticky_worker(),
        _ => {}
    }
    if args.iter().any(|a| a == "--list") {
        for scenario in scenarios::SCENARIOS {
            println!("{:<14} {}", scenario.name, scenario.description);
        }
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let wanted: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--") && Some(*a) != out.as_ref().and_then(|o| o.to_str()))
        .collect();
    let selected = scenarios::select(&wanted).unwrap_or_else(|unknown| {
        let names: Vec<&str> = scenarios::SCENARIOS.iter().map(|s| s.name).collect();
        eprintln!(
            "parsrv-bench: no scenario '{unknown}': choose from {} (--list says what each measures)",
            names.join(", ")
        );
        std::process::exit(2);
    });
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
        parsrv::kernel::kernel_build(),
        if quick { "quick (checks the harness; figures mean little)" } else { "full" },
        verification_table()
    );
    let mut report = Report::new(dir, &header);
    for scenario in selected {
        // Each scenario in namespaces of its own (network; mounts with a fresh bpffs).
        report = isolated(move || {
            let mut report = report;
            (scenario.run)(&mut report, quick);
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
