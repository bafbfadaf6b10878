//! How a run of VMs ends: each VM's whole console, the summary of every row, and the verdict.

use std::fs;

use anyhow::Result;

use super::{console, Prepared, VmOptions, VmRun};

/// Each VM's whole console, prefixed with its kernel, one VM after the other.
pub fn print_consoles(prepared: &Prepared) {
    for (kernel, _, _, log) in &prepared.kernels {
        match fs::read_to_string(log) {
            Ok(console) => {
                for line in console.lines() {
                    println!("[{}] {line}", kernel.label);
                }
            }
            Err(e) => println!("[{}] no console ({}: {e})", kernel.label, log.display()),
        }
    }
}

/// The summary of every row, then the verdict: the first VM error, or the kernels whose
/// tests failed.
pub fn report(runs: Vec<VmRun>, errors: Vec<anyhow::Error>, options: &VmOptions) -> Result<()> {
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
