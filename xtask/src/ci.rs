//! `cargo xtask test` and `cargo xtask lint`: the suite as CI runs it (lint, the unit tests, the
//! native builds and privileged integration tests with the benchmarks' quick run), beside the
//! VMs.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::{
    bench::bench,
    build,
    ebpf::{ebpf_cargo, EBPF_TARGET_ARGS},
    fresh, run_step, running_as_root, setup, vm, workspace_root, Profile,
};

/// The whole suite: the one build, then the VMs (each one host thread, nearly all of its
/// time the emulated CPU) side by side with the native integration tests and benchmarks
/// (mostly waiting on timers and the network); beside both, at the lowest priority, the
/// formatting checks and the eBPF crate's clippy, and once the native tests are done
/// (their build directory is then free: cargo locks it for a whole command), the
/// workspace's clippy and the unit tests, both in that build directory.
///
/// Not the VMs first, beside the builds: tried (c655da9), it saved no time, since the
/// builds and the VMs both want both CPUs, and an emulated VM that lost its CPU to the
/// compilers missed a test's 30-s start deadline (gunicorn with --notify, in 6.1 and 6.12).
/// At nice 19, lint and the unit tests take almost nothing from them: they ran in the last
/// minutes, beside the longest VM alone.
pub(crate) fn test_everywhere(filter: &Option<String>, vm_options: &vm::VmOptions) -> Result<()> {
    // Without root, what is missing is reported by the VM runner (exit 2). Before the build:
    // its own apt installs would wait on this one's dpkg lock, or fail.
    if running_as_root() {
        setup::ensure_vm_packages()?;
    }
    // The kernels come beside the build (30 s of apt, unpacking and depmod, 2026-12-05),
    // with apt's private state and no dpkg lock (vm/kernel.rs).
    let (built, fetched) = std::thread::scope(|scope| {
        let fetched = scope.spawn(|| vm::fetch_kernels(vm_options));
        let built = native_build();
        (built, fetched.join().expect("the kernels' thread panicked"))
    });
    built?;
    fetched?;
    let vms = vm::prepare(vm_options)?;
    let lint_log = workspace_root().join("target/lint.log");
    let unit_log = workspace_root().join("target/unit-tests.log");
    let clippy_log = workspace_root().join("target/clippy.log");
    let (host, (clippy, unit), linted, (vm_runs, vm_errors)) = std::thread::scope(|scope| {
        let in_vms = scope.spawn(|| vm::run(&vms, vm_options));
        let linted = scope.spawn(|| {
            setup::ensure_all()?;
            let beside: Vec<_> = lint_steps()
                .into_iter()
                .filter(|(step, _)| *step != WORKSPACE_CLIPPY)
                .collect();
            at_lowest_priority(beside, &lint_log)
        });
        let host = native_integration(filter);
        // Each on its own: a lint failure must not hide the unit tests' results.
        let workspace_clippy = lint_steps()
            .into_iter()
            .filter(|(step, _)| *step == WORKSPACE_CLIPPY)
            .collect();
        let clippy = at_lowest_priority(workspace_clippy, &clippy_log);
        let unit = at_lowest_priority(vec![("unit tests", unit_tests(filter))], &unit_log);
        (
            host,
            (clippy, unit),
            linted.join().expect("the lint thread panicked"),
            in_vms.join().expect("the VMs' thread panicked"),
        )
    });
    vm::print_consoles(&vms);
    let mut host = host?;
    for (what, outcome, log) in [
        (
            "lint (fmt, the eBPF crate's clippy -D warnings)",
            linted,
            &lint_log,
        ),
        ("the workspace's clippy -D warnings", clippy, &clippy_log),
        ("unit tests", unit, &unit_log),
    ] {
        match outcome {
            Ok(()) => eprintln!("xtask: {what}: passed (output in {})", log.display()),
            Err(e) => {
                eprintln!("{}", std::fs::read_to_string(log).unwrap_or_default());
                host.outcome.failed_binaries.push(format!("{what}: {e:#}"));
            }
        }
    }
    let mut rows = vec![host];
    rows.extend(vm_runs);
    vm::report(rows, vm_errors, vm_options)
}

const WORKSPACE_CLIPPY: &str = "cargo clippy (workspace)";

/// `cargo xtask lint`'s steps, in order.
fn lint_steps() -> Vec<(&'static str, Command)> {
    let root = workspace_root();
    let cargo = env!("CARGO");
    let mut fmt = Command::new(cargo);
    fmt.args(["fmt", "--all", "--check"]).current_dir(&root);
    // In the suite's profile: the proc macros and build scripts it compiled serve clippy
    // too (in the dev profile clippy compiled them again: 284 s of CPU of the 58 minutes
    // a CI run took, 2026-12-07). Its lints do not depend on the profile; debug
    // assertions are on in both.
    let mut clippy = Command::new(cargo);
    clippy
        .args(["clippy", "--workspace", "--all-targets"])
        .args(Profile::Checked.cargo_args())
        .args(["--", "-D", "warnings"])
        .current_dir(&root);
    let mut ebpf_fmt = ebpf_cargo();
    ebpf_fmt.args(["fmt", "--check"]);
    let mut ebpf_clippy = ebpf_cargo();
    ebpf_clippy
        .args(["clippy", "--release"])
        .args(EBPF_TARGET_ARGS)
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        .args(["--", "-D", "warnings"]);
    vec![
        ("cargo fmt --check (workspace)", fmt),
        (WORKSPACE_CLIPPY, clippy),
        ("cargo fmt --check (parsrv-ebpf)", ebpf_fmt),
        ("cargo clippy (parsrv-ebpf)", ebpf_clippy),
    ]
}

pub(crate) fn lint() -> Result<()> {
    setup::ensure_all()?;
    for (step, mut command) in lint_steps() {
        run_step(step, &mut command)?;
    }
    Ok(())
}

/// `steps` at the lowest CPU priority (nice 19), their output into `log`: beside the VMs,
/// which then keep their CPUs, they take only what the VMs and the native tests leave (the
/// last minutes of a run, when one VM is left, leave a whole CPU). The first failure stops
/// them.
fn at_lowest_priority(steps: Vec<(&str, Command)>, log: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    for (step, mut command) in steps {
        command.stdout(file.try_clone()?).stderr(file.try_clone()?);
        // SAFETY: nice(2) is async-signal-safe, and the closure touches no other state.
        unsafe {
            command.pre_exec(|| {
                // -1 is also a valid new nice value: errno would tell, and a step that
                // kept its priority only takes more CPU from the VMs.
                nix::libc::nice(19);
                Ok(())
            });
        }
        run_step(step, &mut command)
            .with_context(|| format!("its output is in {}", log.display()))?;
    }
    Ok(())
}

/// The unit tests of every crate but the integration tests, in [`Profile::Checked`].
pub(crate) fn unit_tests(filter: &Option<String>) -> Command {
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["test", "--workspace"])
        .args(Profile::Checked.cargo_args())
        .args(["--exclude", "parsrv-integration-tests"])
        .args(filter.iter())
        .current_dir(workspace_root());
    cargo
}

/// The builds the tests run (parsrv, its example handlers, the integration test binary and
/// its package's examples, all in [`Profile::Checked`]: the VMs run the same build).
pub(crate) fn native_build() -> Result<()> {
    build(Profile::Checked)?;
    let root = workspace_root();
    let cargo = env!("CARGO");
    if !running_as_root() {
        bail!("the privileged integration tests need root: run `cargo xtask test` as root");
    }
    setup::ensure_python_servers()?;
    setup::ensure_bench_packages()?;
    setup::ensure_nextest()?;
    // Built now, not by the first command that runs them: that may run beside the VMs.
    // One cargo command per package, each selecting what the command that runs it later
    // selects: cargo unifies features over the packages of one command, and a build with
    // other features is another build (one command for all three cost 23 s more, 2026-12-05).
    // Not the benchmarks: what they add to parsrv's build (38 CPU-seconds, once their
    // charts no longer rebuilt parsrv, 2026-12-07) is built when they run, after the
    // host's tests, and the VMs start 20 s sooner.
    for (what, args) in [
        (
            "the example handlers",
            &["build", "--package", "parsrv", "--examples"][..],
        ),
        (
            "the integration tests",
            &["test", "--no-run", "--package", "parsrv-integration-tests"],
        ),
    ] {
        run_step(
            &format!("building {what}"),
            Command::new(cargo)
                .args(args)
                .args(Profile::Checked.cargo_args())
                .current_dir(&root),
        )?;
    }
    Ok(())
}

/// The privileged integration tests here, in their two profiles, then a quick run of every
/// benchmark scenario: the host's row of the summary.
pub(crate) fn native_integration(filter: &Option<String>) -> Result<vm::VmRun> {
    let started = std::time::Instant::now();
    let root = workspace_root();
    let cargo = env!("CARGO");
    // Tests skipped on a kernel too old for them list themselves here.
    let skips = root.join("target/test-skips.txt");
    let _ = std::fs::remove_file(&skips);
    // And what they measured, printed after them (see the tests' `figure`).
    let figures = root.join("target/test-figures.txt");
    let _ = std::fs::remove_file(&figures);
    // What the first test probed of this kernel, for the others.
    let kernel_probe = root.join("target/test-kernel-probe.txt");
    let _ = std::fs::remove_file(&kernel_probe);
    // Side by side first, then the tests that must run alone (.config/nextest.toml says
    // which and why). Both run every test even after a failure: one CI run shows them all.
    let mut failed = Vec::new();
    for profile in ["parallel", "serial"] {
        let started = std::time::Instant::now();
        let outcome = run_step(
            &format!(
                "privileged integration tests, {profile} (as on a freshly booted machine: \
                 no bpffs, empty /run)"
            ),
            fresh::as_on_a_fresh_machine(&mut Command::new(cargo))
                .args(["nextest", "run", "--no-fail-fast", "--profile", profile])
                .args(["--cargo-profile", "checked"])
                .args([
                    "--package",
                    "parsrv-integration-tests",
                    "--run-ignored",
                    "only",
                ])
                .args(filter.iter())
                .env("PARSRV_BIN", Profile::Checked.parsrv())
                .env("PARSRV_PYENV", setup::pyenv())
                .env("PARSRV_TEST_SKIPS", &skips)
                .env("PARSRV_TEST_FIGURES", &figures)
                .env("PARSRV_TEST_KERNEL_PROBE", &kernel_probe)
                .current_dir(&root),
        );
        eprintln!(
            "xtask: {profile} integration tests took {} s",
            started.elapsed().as_secs()
        );
        if let Err(e) = outcome {
            failed.push(e);
        }
    }
    match std::fs::read_to_string(&skips) {
        Ok(list) => eprintln!("xtask: skipped on this kernel:\n{list}"),
        Err(_) => eprintln!("xtask: no integration test skipped on this kernel"),
    }
    if let Ok(list) = std::fs::read_to_string(&figures) {
        eprintln!("xtask: figures the tests measured on this kernel:\n{list}");
    }
    let mut outcome = vm::console::Outcome::from_junit(
        &["parallel", "serial"].map(|p| root.join(format!("target/nextest/{p}/junit-{p}.xml"))),
    );
    outcome.release = Some(uname_r());
    outcome.skips = read_lines(&skips);
    outcome.figures = read_lines(&figures);
    outcome.done = Some(failed.len() as u32);
    outcome.failed_binaries = failed.iter().map(|e| e.to_string()).collect();
    // Keeps the benchmark harness working; asserts nothing about the figures.
    if let Err(e) = bench(Vec::new(), true) {
        outcome.failed_binaries.push(format!("benchmarks: {e}"));
    }
    Ok(vm::VmRun {
        label: "host".into(),
        outcome,
        took: started.elapsed(),
    })
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|text| text.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn uname_r() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}
