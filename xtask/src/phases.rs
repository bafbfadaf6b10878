//! Running xtask's steps and timing them: every step's start and duration, printed at the end
//! of `cargo xtask test`.

use std::{process::Command, time::Duration};

use anyhow::{bail, Context as _, Result};

/// Runs `command`, failing with `step` named if it does not succeed.
pub fn run_step(step: &str, command: &mut Command) -> Result<()> {
    let started = std::time::Instant::now();
    let status = command
        .status()
        .with_context(|| format!("{step}: cannot start {command:?}"))?;
    record_phase(step, started.elapsed());
    if !status.success() {
        bail!("{step} failed ({status}); the output above says why");
    }
    Ok(())
}

/// Every step this run took, when it started and how long it took: printed at the end of
/// `cargo xtask test`, so that CI's log says where its minutes went. Steps of the VMs, the
/// native tests and lint overlap: their start tells which ran beside which.
static PHASES: std::sync::Mutex<Vec<(String, Duration, Duration)>> =
    std::sync::Mutex::new(Vec::new());

/// When xtask started, for [`PHASES`].
pub(crate) static STARTED: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

pub fn record_phase(step: &str, took: Duration) {
    let started = STARTED.elapsed().saturating_sub(took);
    PHASES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((step.to_owned(), started, took));
}

pub(crate) fn print_phases() {
    let mut phases = PHASES.lock().unwrap_or_else(|e| e.into_inner());
    phases.sort_by_key(|(_, started, _)| *started);
    println!(
        "\nxtask: time per step ({:.1} min from xtask's start; steps beside each other overlap):",
        STARTED.elapsed().as_secs_f64() / 60.0
    );
    println!("  {:>7}  {:>7}", "start", "took");
    for (step, started, took) in phases.iter() {
        let start = started.as_secs();
        println!(
            "  {:>4}:{:02}  {:>5.1} s  {step}",
            start / 60,
            start % 60,
            took.as_secs_f64()
        );
    }
}
