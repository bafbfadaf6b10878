//! `cargo xtask`: everything that needs more than plain cargo. Every command first runs the
//! set-up it depends on (idempotent, quick when already done).

mod fresh;
mod setup;
mod soak;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the eBPF program needs: apt packages (LLVM 22), the pinned
    /// nightly with rust-src, bpf-linker built against that LLVM.
    Setup,
    /// Build the eBPF object (target/ebpf/bpfel-unknown-none/release/parsrv).
    BuildEbpf,
    /// Build the eBPF object, then parsrv with it embedded.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run a demo group in the foreground (as root): 127.0.0.1:8080, 4 http
    /// handlers. Arguments after `--` replace the demo's `parsrv run` arguments.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build, then show a cluster (as root): a router and three hosts in network namespaces,
    /// BIRD and parsrv on each, clients with long-lived connections; prints where the
    /// connections go while a host joins, drains and leaves. Removes everything after.
    ClusterDemo,
    /// cargo fmt --check and cargo clippy -D warnings, for the workspace and the eBPF crate.
    Lint,
    /// Build (release), then run benchmark scenarios (as root; each in its own network
    /// namespace): uniform, stall, burst, slow-handler, prog-cost, scale-up, restart.
    /// Prints tables and writes target/bench/DATE/ (report.md, CSV, PNG charts).
    Bench {
        /// Scenarios to run (default: all).
        scenarios: Vec<String>,
        /// A few seconds per scenario: checks the harness, not the figures.
        #[arg(long)]
        quick: bool,
    },
    /// Lint, build, then run the unit tests, the privileged integration tests (as root;
    /// each in its own network namespace), a quick run of every benchmark scenario, and the
    /// integration tests again in VMs on Debian's 5.10, 6.1 and 6.12 kernels. With --vm: only
    /// the VM part.
    Test {
        /// Only tests whose name contains this (passed to the test harness).
        filter: Option<String>,
        /// Only the integration tests, in VMs (needs no root): one per --kernel.
        #[arg(long, conflicts_with = "no_vm")]
        vm: bool,
        /// Skip the VM part of the full run.
        #[arg(long)]
        no_vm: bool,
        /// Kernels for the VMs: a Debian series (5.10, 6.1, 6.12), fetched and cached in
        /// target/vm, or a bzImage path. Repeat, or separate with commas [default: 5.10, 6.1,
        /// 6.12].
        #[arg(
            long = "kernel",
            value_name = "5.10|6.1|6.12|PATH",
            value_delimiter = ','
        )]
        kernels: Vec<String>,
        /// qemu accelerator: tcg works everywhere; kvm where /dev/kvm works.
        #[arg(long, value_enum, default_value = "tcg")]
        accel: vm::Accel,
        /// Seconds one VM may run, from boot to power-off, before it is killed as hung. The VMs
        /// run every test their kernel has the features for, the cluster's and Python's too,
        /// under TCG (nextest kills a test hung for 5 minutes by itself).
        #[arg(long, default_value_t = 2400, value_name = "SECONDS")]
        timeout: u64,
        /// With --vm: run each selected test this many times in each VM (nextest's
        /// --stress-count), to soak a test on other kernels; `cargo xtask soak` does it here.
        #[arg(long, value_name = "N", requires = "vm")]
        stress: Option<u32>,
    },
    /// Run one privileged integration test (or those whose name contains TEST) many times,
    /// as the suite runs it, optionally beside CPU hogs, and keep the whole output of every
    /// failed run under target/soak/ (as root). Finds flakes; never retries them away.
    Soak {
        /// The test's name, or part of it.
        test: String,
        /// Only the test with exactly this name (its path in the binary: `kill_loop::...`
        /// is not needed; the name alone).
        #[arg(long)]
        exact: bool,
        #[arg(long, default_value_t = 30)]
        runs: u32,
        /// Threads that keep CPUs busy for the whole soak.
        #[arg(long, default_value_t = 0)]
        hogs: u32,
    },
}

/// A step failed (a build, a test).
pub const EXIT_FAILED: i32 = 1;
/// Bad input: an option, a kernel path, a missing tool, a kernel parsrv cannot run on.
pub const EXIT_BAD_INPUT: i32 = 2;
/// A VM hung (killed at --timeout) or its kernel panicked.
pub const EXIT_VM_HUNG: i32 = 3;

/// An error with its own exit code; any other error exits with [`EXIT_FAILED`].
#[derive(Debug)]
pub struct Fatal {
    pub code: i32,
    pub message: String,
}

impl Fatal {
    pub fn error(code: i32, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Fatal {
            code,
            message: message.into(),
        })
    }
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fatal {}

fn main() {
    std::sync::LazyLock::force(&STARTED);
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { EXIT_BAD_INPUT } else { 0 });
    });
    if let Err(e) = run(cli.command) {
        eprintln!("xtask: {e:#}");
        let code = e.downcast_ref::<Fatal>().map_or(EXIT_FAILED, |f| f.code);
        std::process::exit(code);
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::ensure_all()
            .and_then(|()| setup::ensure_python_servers())
            .and_then(|()| setup::ensure_vm_packages()),
        Task::BuildEbpf => build_ebpf(),
        Task::Build { release } => build(if release {
            Profile::Release
        } else {
            Profile::Dev
        }),
        Task::Run { args } => run_demo(args),
        Task::ClusterDemo => cluster_demo(),
        Task::Lint => lint(),
        Task::Bench { scenarios, quick } => bench(scenarios, quick),
        Task::Soak {
            test,
            exact,
            runs,
            hogs,
        } => soak::soak(&soak::SoakOptions {
            test,
            exact,
            runs,
            hogs,
        }),
        Task::Test {
            filter,
            vm,
            no_vm,
            kernels,
            accel,
            timeout,
            stress,
        } => {
            let vm_options = vm::VmOptions {
                stress,
                kernels: if kernels.is_empty() {
                    vm::DEFAULT_KERNELS.iter().map(|k| k.to_string()).collect()
                } else {
                    kernels
                },
                accel,
                timeout: Duration::from_secs(timeout),
                filter: filter.clone(),
                // Beside the native tests, the consoles come after them, not interleaved.
                live_console: vm,
            };
            if !no_vm {
                vm_options.validate()?;
            }
            let result = if vm {
                // Without root, what is missing is reported by the VM runner (exit 2).
                if running_as_root() {
                    setup::ensure_vm_packages()?;
                }
                vm::test(&vm_options, Vec::new())
            } else if no_vm {
                let host = lint()
                    .and_then(|()| run_step("unit tests", &mut unit_tests(&filter)))
                    .and_then(|()| native_build())
                    .and_then(|()| native_integration(&filter))?;
                let rows = [host];
                vm::console::print_summary(&rows);
                match rows.iter().all(|r| r.outcome.passed()) {
                    true => Ok(()),
                    false => Err(Fatal::error(
                        EXIT_FAILED,
                        "integration tests failed: the summary above says which",
                    )),
                }
            } else {
                test_everywhere(&filter, &vm_options)
            };
            print_phases();
            result
        }
    }
}

/// The whole suite: the one build, then the VMs (each one host thread, nearly all of its
/// time the emulated CPU) side by side with the native integration tests and benchmarks
/// (mostly waiting on timers and the network); beside both, at the lowest priority, lint,
/// and once the native tests are done (their build directory is then free), the unit
/// tests.
///
/// Not the VMs first, beside the builds: tried (c655da9), it saved no time, since the
/// builds and the VMs both want both CPUs, and an emulated VM that lost its CPU to the
/// compilers missed a test's 30-s start deadline (gunicorn with --notify, in 6.1 and 6.12).
/// At nice 19, lint and the unit tests take almost nothing from them: they ran in the last
/// minutes, beside the longest VM alone.
fn test_everywhere(filter: &Option<String>, vm_options: &vm::VmOptions) -> Result<()> {
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
    let (host, unit, linted, (vm_runs, vm_errors)) = std::thread::scope(|scope| {
        let in_vms = scope.spawn(|| vm::run(&vms, vm_options));
        let linted = scope.spawn(|| {
            setup::ensure_all()?;
            at_lowest_priority(lint_steps(), &lint_log)
        });
        let host = native_integration(filter);
        let unit = at_lowest_priority(vec![("unit tests", unit_tests(filter))], &unit_log);
        (
            host,
            unit,
            linted.join().expect("the lint thread panicked"),
            in_vms.join().expect("the VMs' thread panicked"),
        )
    });
    vm::print_consoles(&vms);
    let mut host = host?;
    for (what, outcome, log) in [
        ("lint (fmt, clippy -D warnings)", linted, &lint_log),
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

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

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
static STARTED: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

pub fn record_phase(step: &str, took: Duration) {
    let started = STARTED.elapsed().saturating_sub(took);
    PHASES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((step.to_owned(), started, took));
}

fn print_phases() {
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

/// The object `parsrv`'s build.rs embeds.
pub fn ebpf_object() -> PathBuf {
    workspace_root().join("target/ebpf/bpfel-unknown-none/release/parsrv")
}

pub(crate) fn build_ebpf() -> Result<()> {
    setup::ensure_all()?;
    let root = workspace_root();
    run_step(
        "building the eBPF program (parsrv-ebpf, nightly + bpf-linker)",
        ebpf_cargo()
            .args(["build", "--release"])
            .args(EBPF_TARGET_ARGS)
            .arg("--target-dir")
            .arg(root.join("target/ebpf")),
    )?;
    let object = ebpf_object();
    // One object per binary of parsrv-ebpf; parsrv's build.rs embeds each.
    for built in ["parsrv", "cluster-dispatch", "reuseport-audit"].map(|o| object.with_file_name(o))
    {
        let size = std::fs::metadata(&built)
            .with_context(|| format!("the eBPF build produced no {}", built.display()))?
            .len();
        if size == 0 {
            bail!("the eBPF build produced an empty {}", built.display());
        }
    }
    record_ebpf_toolchain(&object)
}

/// Writes beside the object what built it, for parsrv's build.rs (`parsrv --version`, and a
/// verifier refusal names it): the nightly, bpf-linker and the LLVM it links against.
/// Rewritten only when it changes, so that parsrv is not rebuilt for nothing.
fn record_ebpf_toolchain(object: &std::path::Path) -> Result<()> {
    let first_line = |command: &mut Command| -> Result<String> {
        let out = command
            .output()
            .with_context(|| format!("running {command:?}"))?;
        if !out.status.success() {
            bail!(
                "{command:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned())
    };
    let rustc = first_line(Command::new("rustup").args([
        "run",
        setup::EBPF_TOOLCHAIN,
        "rustc",
        "--version",
    ]))?;
    let linker = first_line(Command::new("bpf-linker").arg("--version"))?;
    let llvm = first_line(Command::new(setup::llvm_config()).arg("--version"))?;
    let note = format!(
        "{} ({rustc}), {linker} (LLVM {llvm})\n",
        setup::EBPF_TOOLCHAIN
    );
    let path = object.with_extension("toolchain");
    if std::fs::read_to_string(&path).ok().as_deref() != Some(note.as_str()) {
        std::fs::write(&path, note).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A cargo profile xtask builds in, and where its binaries land.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// `cargo xtask build`: unoptimized parsrv, optimized dependencies.
    Dev,
    /// What users run: `cargo xtask run`, `cargo xtask bench`.
    Release,
    /// What the tests run, natively and in the VMs: release code with debug assertions
    /// and overflow checks (Cargo.toml says why one profile).
    Checked,
}

impl Profile {
    /// cargo's arguments for this profile.
    pub fn cargo_args(self) -> &'static [&'static str] {
        match self {
            Profile::Dev => &[],
            Profile::Release => &["--release"],
            Profile::Checked => &["--profile", "checked"],
        }
    }

    /// Where its binaries land.
    pub fn dir(self) -> PathBuf {
        workspace_root().join("target").join(match self {
            Profile::Dev => "debug",
            Profile::Release => "release",
            Profile::Checked => "checked",
        })
    }

    /// Its parsrv binary.
    pub fn parsrv(self) -> PathBuf {
        self.dir().join("parsrv")
    }
}

/// The eBPF object, then parsrv with it embedded, in `profile`.
pub(crate) fn build(profile: Profile) -> Result<()> {
    build_ebpf()?;
    run_step(
        &format!("building parsrv ({profile:?})"),
        Command::new(env!("CARGO"))
            .args(["build", "--package", "parsrv"])
            .args(profile.cargo_args())
            .current_dir(workspace_root()),
    )
}

/// The demo's `parsrv` arguments, shared with the test that runs it as a user would
/// (tests/tests/suite/demo.rs).
const DEMO_ARGS: &str = include_str!("demo.args");

fn run_demo(args: Vec<String>) -> Result<()> {
    build(Profile::Release)?;
    let args = if args.is_empty() {
        DEMO_ARGS.split_whitespace().map(String::from).collect()
    } else {
        args
    };
    let parsrv = Profile::Release.parsrv();
    eprintln!(
        "xtask: starting {} {}\n\
         xtask: try, from another terminal:\n  \
           curl http://127.0.0.1:8080/\n  \
           {} status          (or --json)\n\
         xtask: stop with Ctrl-C",
        parsrv.display(),
        args.join(" "),
        parsrv.display()
    );
    // Replace xtask (cargo run already replaced cargo): Ctrl-C then reaches parsrv alone,
    // which stops its handlers in order.
    use std::os::unix::process::CommandExt as _;
    let error = Command::new(&parsrv).args(&args).exec();
    Err(error).with_context(|| format!("running {}", parsrv.display()))
}

fn cluster_demo() -> Result<()> {
    // Set-up (bird2 included) comes with the build.
    build(Profile::Release)?;
    if !running_as_root() {
        return Err(Fatal::error(
            EXIT_BAD_INPUT,
            "the cluster demo needs root (network namespaces, eBPF): run `cargo xtask cluster-demo` as root",
        ));
    }
    let root = workspace_root();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args([
            "run",
            "--quiet",
            "--package",
            "parsrv-bench",
            "--bin",
            "cluster-demo",
        ])
        .args(Profile::Release.cargo_args())
        .env("PARSRV_BIN", Profile::Release.parsrv())
        .current_dir(&root);
    run_step("the cluster demo", &mut cargo)
}

/// The eBPF crate's cargo: its own nightly, its own workspace, without the variables the
/// cargo running xtask set (they would point it at stable).
fn ebpf_cargo() -> Command {
    let root = workspace_root();
    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", setup::EBPF_TOOLCHAIN, "cargo"])
        .current_dir(root.join("parsrv-ebpf"));
    for var in [
        "RUSTC",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
    ] {
        cargo.env_remove(var);
    }
    cargo
}

const EBPF_TARGET_ARGS: [&str; 4] = ["--target", "bpfel-unknown-none", "-Z", "build-std=core"];

/// `cargo xtask lint`'s steps, in order.
fn lint_steps() -> Vec<(&'static str, Command)> {
    let root = workspace_root();
    let cargo = env!("CARGO");
    let mut fmt = Command::new(cargo);
    fmt.args(["fmt", "--all", "--check"]).current_dir(&root);
    let mut clippy = Command::new(cargo);
    clippy
        .args(["clippy", "--workspace", "--all-targets"])
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
        ("cargo clippy (workspace)", clippy),
        ("cargo fmt --check (parsrv-ebpf)", ebpf_fmt),
        ("cargo clippy (parsrv-ebpf)", ebpf_clippy),
    ]
}

fn lint() -> Result<()> {
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
fn unit_tests(filter: &Option<String>) -> Command {
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["test", "--workspace"])
        .args(Profile::Checked.cargo_args())
        .args(["--exclude", "parsrv-integration-tests"])
        .args(filter.iter())
        .current_dir(workspace_root());
    cargo
}

/// The benchmark harness in [`Profile::Checked`], as [`bench`]'s quick run runs it.
fn bench_build() -> Command {
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--package", "parsrv-bench"])
        .args(Profile::Checked.cargo_args())
        .current_dir(workspace_root());
    cargo
}

/// The builds the tests run (parsrv, its example handlers, the integration test binary, all
/// in [`Profile::Checked`]: the VMs run the same build).
fn native_build() -> Result<()> {
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
    // The benchmarks are not among them: nothing runs them before the host's tests end, so
    // they are built then, beside the VMs ([`bench_build`]), not in the 86 s the VMs would
    // wait for them here. At normal priority: built at nice 19 behind two VMs, they took
    // 11.5 minutes and the host's row ended last (fresh clone of 00fd642, 2026-12-05).
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
fn native_integration(filter: &Option<String>) -> Result<vm::VmRun> {
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
    if let Err(e) = run_step("building the benchmarks", &mut bench_build())
        .and_then(|()| bench(Vec::new(), true))
    {
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

/// Figures come from release builds; a quick run only checks the harness, on the build
/// the tests already made.
fn bench(scenarios: Vec<String>, quick: bool) -> Result<()> {
    let profile = match quick {
        true => Profile::Checked,
        false => Profile::Release,
    };
    build(profile)?;
    setup::ensure_python_servers()?;
    setup::ensure_bench_packages()?;
    if !running_as_root() {
        bail!(
            "the benchmarks need root (network namespaces, eBPF): run `cargo xtask bench` as root"
        );
    }
    let root = workspace_root();
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(&root)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut cargo = Command::new(env!("CARGO"));
    fresh::as_on_a_fresh_machine(&mut cargo);
    cargo.args(["run", "--quiet", "--package", "parsrv-bench"]);
    cargo
        .args(profile.cargo_args())
        .args(["--bin", "parsrv-bench", "--"])
        .args(&scenarios)
        .env("PARSRV_BIN", profile.parsrv())
        .env("PARSRV_PYENV", setup::pyenv())
        .env("PARSRV_COMMIT", commit)
        .current_dir(&root);
    if quick {
        cargo.arg("--quick");
    }
    run_step("benchmarks", &mut cargo)
}

pub(crate) fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
