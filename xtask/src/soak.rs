//! `cargo xtask soak TEST`: runs one privileged integration test (or the tests whose name
//! contains TEST) many times, as the suite runs them, optionally beside CPU hogs, and keeps
//! the whole output of every failed run. A flaky test is a bug with a cause: this is how
//! its failures are found and read, never how it is retried into green.

use std::{
    fs,
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{fresh, setup, vm::console::count_before, workspace_root, Fatal, EXIT_BAD_INPUT};

pub struct SoakOptions {
    /// Passed to the test harness as a name filter; `--exact` with `exact`.
    pub test: String,
    pub exact: bool,
    pub runs: u32,
    /// Threads spinning on the CPU for the whole soak (each bounded by it).
    pub hogs: u32,
}

pub fn soak(options: &SoakOptions) -> Result<()> {
    if options.runs == 0 {
        return Err(Fatal::error(EXIT_BAD_INPUT, "--runs must be at least 1"));
    }
    if !crate::running_as_root() {
        return Err(Fatal::error(
            EXIT_BAD_INPUT,
            "the privileged integration tests need root: run `cargo xtask soak` as root",
        ));
    }
    // The suite's own build (see `Profile::Checked`).
    let profile = crate::Profile::Checked;
    crate::build(profile)?;
    setup::ensure_python_servers()?;
    let root = workspace_root();
    let cargo = env!("CARGO");
    crate::run_step(
        "building the example handlers and the tests",
        Command::new(cargo)
            .args(["build", "--package", "parsrv", "--examples"])
            .args(profile.cargo_args())
            .current_dir(&root),
    )?;
    crate::run_step(
        "building the integration tests",
        Command::new(cargo)
            // As CI's build (`ci::native_build`), so they share it; this also builds the
            // package's examples (the QUIC server).
            .args(["test", "--no-run"])
            .args(["--package", "parsrv-integration-tests"])
            .args(profile.cargo_args())
            .current_dir(&root),
    )?;
    // With --exact, the test's whole path in the suite (`kill_loop::NAME`): the name alone
    // is enough to give.
    let filter = if options.exact && !options.test.contains("::") {
        full_name(&root, &options.test)?
    } else {
        options.test.clone()
    };
    let dir = root.join("target/soak").join(sanitize(&options.test));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let spinning = Arc::new(AtomicBool::new(true));
    let hogs: Vec<_> = (0..options.hogs)
        .map(|_| {
            let spinning = spinning.clone();
            thread::spawn(move || {
                let mut x = 0u64;
                while spinning.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut failed: Vec<(u32, PathBuf, Duration)> = Vec::new();
    let mut passed = 0;
    let mut ran_nothing = 0;
    for run in 1..=options.runs {
        let log = dir.join(format!("run-{run}.log"));
        let took = Instant::now();
        let out = fresh::as_on_a_fresh_machine(&mut Command::new(cargo))
            // --tests: the integration tests, not the harness's doc examples.
            .args(["test", "--quiet", "--tests"])
            .args(profile.cargo_args())
            .args(["--package", "parsrv-integration-tests", "--"])
            .args(["--ignored", "--test-threads=1", "--nocapture"])
            .arg(&filter)
            .args(options.exact.then_some("--exact"))
            .env("PARSRV_BIN", profile.parsrv())
            .env("PARSRV_PYENV", setup::pyenv())
            .env("RUST_BACKTRACE", "1")
            .current_dir(&root)
            .output()
            .context("running the tests")?;
        let took = took.elapsed();
        let mut text = out.stdout;
        text.extend_from_slice(&out.stderr);
        let text = String::from_utf8_lossy(&text).into_owned();
        let ran: u32 = text
            .lines()
            .filter_map(|l| l.strip_prefix("test result: "))
            .map(|r| count_before(r, " passed") + count_before(r, " failed"))
            .sum();
        if out.status.success() && ran == 0 {
            ran_nothing += 1;
        } else if out.status.success() {
            passed += 1;
        } else {
            fs::write(&log, &text).with_context(|| format!("writing {}", log.display()))?;
            failed.push((run, log, took));
        }
        eprintln!(
            "xtask soak: run {run}/{}: {} in {:.1} s",
            options.runs,
            if !out.status.success() {
                "FAILED"
            } else if ran == 0 {
                "no test ran"
            } else {
                "ok"
            },
            took.as_secs_f64()
        );
    }
    spinning.store(false, Ordering::Relaxed);
    for hog in hogs {
        let _ = hog.join();
    }
    println!(
        "soak {}: {passed} of {} runs passed, {} failed ({} CPU hogs, {:.1} minutes)",
        options.test,
        options.runs,
        failed.len(),
        options.hogs,
        started.elapsed().as_secs_f64() / 60.0
    );
    for (run, log, took) in &failed {
        println!(
            "  run {run} failed after {:.1} s; its whole output: {}",
            took.as_secs_f64(),
            log.display()
        );
        // The lines that say why, for a log read from CI's output.
        let text = fs::read_to_string(log).unwrap_or_default();
        for line in text.lines().filter(|l| {
            l.starts_with("error")
                || l.contains("panicked at")
                || l.contains("assertion")
                || l.contains("left:")
                || l.contains("right:")
                || l.contains("fail-open")
        }) {
            println!("    {line}");
        }
    }
    if ran_nothing > 0 {
        bail!(
            "{ran_nothing} of {} runs ran no test: does '{}' name a privileged test?",
            options.runs,
            options.test
        );
    }
    if !failed.is_empty() {
        bail!("{} of {} runs failed", failed.len(), options.runs);
    }
    Ok(())
}

/// A test filter as a directory name.
fn sanitize(test: &str) -> String {
    test.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The path (`module::name`) of the one integration test named `name`.
fn full_name(root: &std::path::Path, name: &str) -> Result<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "test",
            "--quiet",
            "--tests",
            "--package",
            "parsrv-integration-tests",
        ])
        .args(["--", "--ignored", "--list"])
        .current_dir(root)
        .output()
        .context("listing the integration tests")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let found: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|path| *path == name || path.ends_with(&format!("::{name}")))
        .collect();
    match found.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => Err(Fatal::error(
            EXIT_BAD_INPUT,
            format!("no integration test is named {name:?}: give its exact name, or drop --exact"),
        )),
        many => Err(Fatal::error(
            EXIT_BAD_INPUT,
            format!(
                "{} tests are named {name:?}: give its module too ({})",
                many.len(),
                many.join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_filters_become_directory_names() {
        assert_eq!(sanitize("kill_loop::a b/c"), "kill_loop__a_b_c");
    }
}
