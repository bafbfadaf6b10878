//! Running xtask's steps and timing them: every step's start, duration and CPU time, printed
//! at the end of `cargo xtask test`.
//!
//! CI on 2 cores is bound by CPU, not by any one step: the steps overlap, and what one takes
//! the others lack. So each step's CPU time (its processes and every descendant they waited
//! for, from wait4's rusage) is printed beside its wall time, and the run's total beside the
//! CPU the machine had.

use std::{
    process::{Child, Command, ExitStatus},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

/// Runs `command`, failing with `step` named if it does not succeed.
pub fn run_step(step: &str, command: &mut Command) -> Result<()> {
    let started = std::time::Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("{step}: cannot start {command:?}"))?;
    let (status, cpu) = wait_with_cpu(&mut child).with_context(|| format!("{step}: waiting"))?;
    record_phase(step, started.elapsed(), Some(cpu));
    if !status.success() {
        bail!("{step} failed ({status}); the output above says why");
    }
    Ok(())
}

/// Waits for `child` to exit; returns its status and the CPU time (user and system) it and
/// the descendants it waited for used.
pub fn wait_with_cpu(child: &mut Child) -> std::io::Result<(ExitStatus, Duration)> {
    use std::os::unix::process::ExitStatusExt as _;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: nix::libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 on our own child's pid, with pointers to locals. The child is reaped
        // here, and std's handle never waits for it again (a Child is not waited on drop).
        let pid =
            unsafe { nix::libc::wait4(child.id() as nix::libc::pid_t, &mut status, 0, &mut usage) };
        if pid >= 0 {
            break;
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    let time = |t: nix::libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok((
        ExitStatus::from_raw(status),
        time(usage.ru_utime) + time(usage.ru_stime),
    ))
}

/// Every step this run took, when it started and how long it took: printed at the end of
/// `cargo xtask test`, so that CI's log says where its minutes went. Steps of the VMs, the
/// native tests and lint overlap: their start tells which ran beside which.
static PHASES: std::sync::Mutex<Vec<Phase>> = std::sync::Mutex::new(Vec::new());

/// A step's name, when it started (from xtask's start), how long it took, and its CPU time
/// if known.
type Phase = (String, Duration, Duration, Option<Duration>);

/// When xtask started, for [`PHASES`].
pub(crate) static STARTED: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

/// Records a step that took `took` and, if known, `cpu` of CPU time.
pub fn record_phase(step: &str, took: Duration, cpu: Option<Duration>) {
    let started = STARTED.elapsed().saturating_sub(took);
    PHASES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((step.to_owned(), started, took, cpu));
}

pub(crate) fn print_phases() {
    let mut phases = PHASES.lock().unwrap_or_else(|e| e.into_inner());
    phases.sort_by_key(|(_, started, ..)| *started);
    let wall = STARTED.elapsed();
    println!(
        "\nxtask: time per step ({:.1} min from xtask's start; steps beside each other overlap):",
        wall.as_secs_f64() / 60.0
    );
    println!("  {:>7}  {:>8}  {:>8}", "start", "took", "CPU");
    for (step, started, took, cpu) in phases.iter() {
        let start = started.as_secs();
        let cpu = cpu.map_or("".into(), |c| format!("{:.1} s", c.as_secs_f64()));
        println!(
            "  {:>4}:{:02}  {:>6.1} s  {cpu:>8}  {step}",
            start / 60,
            start % 60,
            took.as_secs_f64()
        );
    }
    // Every process xtask started and waited for, whichever step it belonged to.
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill.
    let mut usage: nix::libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage into a local.
    if unsafe { nix::libc::getrusage(nix::libc::RUSAGE_CHILDREN, &mut usage) } == 0 {
        let cpu = usage.ru_utime.tv_sec + usage.ru_stime.tv_sec;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "xtask: CPU used by every step: {:.1} min of the {:.1} min that {cores} CPUs had \
             in that time ({:.0} %)",
            cpu as f64 / 60.0,
            wall.as_secs_f64() * cores as f64 / 60.0,
            cpu as f64 * 100.0 / (wall.as_secs_f64() * cores as f64)
        );
    }
}
