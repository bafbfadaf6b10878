//! How a run of VMs ends: each VM's whole console, the summary of every row, and the verdict.

use std::fs;

use anyhow::Result;

use super::{console, Prepared, VmOptions, VmRun};

/// Each VM's whole console, prefixed with its kernel (and share), one VM after the other.
pub fn print_consoles(prepared: &Prepared) {
    for vm in &prepared.vms {
        let label = &vm.kernel.label;
        match fs::read_to_string(&vm.log) {
            Ok(console) => {
                for line in console.lines() {
                    println!("[{label}] {line}");
                }
            }
            Err(e) => println!("[{label}] no console ({}: {e})", vm.log.display()),
        }
    }
}

/// The summary of every row, one per kernel (the VMs that shared a kernel's tests as one),
/// then the verdict: the first VM error, or the kernels whose tests failed.
pub fn report(runs: Vec<VmRun>, errors: Vec<anyhow::Error>, options: &VmOptions) -> Result<()> {
    let runs = per_kernel(runs);
    console::print_summary(&runs);
    let failed: Vec<&VmRun> = runs.iter().filter(|r| !r.outcome.passed()).collect();
    if let Some(first) = errors.into_iter().next() {
        return Err(first);
    }
    if !failed.is_empty() && failed.iter().all(|r| r.outcome.ran_nothing()) {
        anyhow::bail!(
            "no test ran in the VM{}: does the filter match a test name?",
            options
                .filter
                .as_ref()
                .map(|f| format!(" (filter {f:?})"))
                .unwrap_or_default()
        );
    }
    if !failed.is_empty() {
        // Named here, on the run's last lines: a CI log is often read from its end, and the
        // summary is far above it (the steps' times come between).
        anyhow::bail!(
            "tests failed on {}",
            failed
                .iter()
                .map(|r| format!("{} ({})", r.label, r.outcome.what_failed().join("; ")))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// One row per kernel: the rows of VMs that shared a kernel's tests ("6.12 1/2", "6.12
/// 2/2") as one, in the order of their first; its time is the longest of them.
fn per_kernel(runs: Vec<VmRun>) -> Vec<VmRun> {
    let mut rows: Vec<VmRun> = Vec::new();
    for run in runs {
        let kernel = run.label.split(' ').next().unwrap_or_default().to_owned();
        match rows.iter_mut().find(|row| row.label == kernel) {
            Some(row) => {
                row.outcome.add(run.outcome);
                row.took = row.took.max(run.took);
            }
            None => rows.push(VmRun {
                label: kernel,
                ..run
            }),
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn run(label: &str, console: &str, minutes: u64) -> VmRun {
        let mut outcome = console::Outcome::default();
        for line in console.lines() {
            outcome.feed(line);
        }
        VmRun {
            label: label.into(),
            outcome,
            took: Duration::from_secs(60 * minutes),
        }
    }

    fn console(passed: u32, failed: &str, skip: &str) -> String {
        let mut text = String::from("parsrv-vm: kernel 6.12.95\nparsrv-vm: run serial\n");
        for n in 0..passed {
            text += &format!("        PASS [   1.000s] parsrv-integration-tests::suite a::t{n}\n");
        }
        if !failed.is_empty() {
            text += &format!("        FAIL [   1.000s] parsrv-integration-tests::suite {failed}\n");
        }
        text += &format!("parsrv-vm: exit serial {}\n", u32::from(!failed.is_empty()));
        if !skip.is_empty() {
            text += &format!("parsrv-vm: skip {skip}\n");
        }
        text += &format!(
            "parsrv-vm: done failed-binaries={}\n",
            u32::from(!failed.is_empty())
        );
        text
    }

    #[test]
    fn the_vms_of_one_kernel_are_one_row_that_fails_if_one_of_them_failed() {
        let rows = per_kernel(vec![
            run("6.12 1/2", &console(3, "", "b::t: needs tcx"), 10),
            run("6.1", &console(2, "", ""), 15),
            run("6.12 2/2", &console(2, "c::broken", ""), 12),
        ]);
        let labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(labels, ["6.12", "6.1"]);
        let both = &rows[0];
        assert_eq!(both.outcome.passed, 5);
        assert_eq!(both.outcome.failed, 1);
        assert_eq!(both.outcome.failures.len(), 1);
        assert!(
            both.outcome.failures[0].contains("c::broken"),
            "{:?}",
            both.outcome.failures
        );
        assert_eq!(both.outcome.skips, ["b::t: needs tcx"]);
        assert_eq!(both.outcome.release.as_deref(), Some("6.12.95"));
        assert_eq!(both.took, Duration::from_secs(12 * 60));
        assert!(!both.outcome.passed());
        assert!(rows[1].outcome.passed());
        // Both halves passing pass, however they split the tests.
        let rows = per_kernel(vec![
            run("6.12 1/2", &console(0, "", "b::t: needs tcx"), 10),
            run("6.12 2/2", &console(2, "", ""), 12),
        ]);
        assert_eq!(rows.len(), 1);
        assert!(
            rows[0].outcome.passed(),
            "{:?}",
            rows[0].outcome.what_failed()
        );
    }
}
