//! `cargo xtask test --vm`: the privileged integration tests, booted under qemu on other
//! kernels.
//!
//! Each kernel (Debian's 5.10, 6.1 and 6.12 packages, fetched without installing them,
//! [`kernel`], or any bzImage given by path) boots a small initramfs ([`image`]) that mounts
//! the host's root file system read-only over 9p; the init then runs the host's release
//! build with cargo-nextest, in the same two profiles as natively, and powers off. The
//! runner reads the serial console ([`console`]) and fails on a failed test, a kernel
//! panic, or a time-out. VMs run one per host CPU at a time.
//!
//! Nothing here needs root: qemu runs unprivileged with TCG, and the tests get root inside
//! the VM. That is the point: a developer without root, or a release checked on the kernels
//! people run.

pub(crate) mod console;
mod image;
mod kernel;

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

pub use console::Outcome;

#[cfg(test)]
use crate::EXIT_FAILED;
use crate::{Fatal, EXIT_BAD_INPUT, EXIT_VM_HUNG};

/// The kernels of a run without --kernel: one older than parsrv's minimum (its tests must
/// skip, naming the feature), Debian 12's and Debian 12's backports'.
pub const DEFAULT_KERNELS: [&str; 3] = ["5.10", "6.1", "6.12"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// Emulation: slow, works everywhere (KVM hangs on this project's CI machines).
    Tcg,
    /// Hardware virtualization, where /dev/kvm works.
    Kvm,
}

pub struct VmOptions {
    /// Debian series (5.10, 6.1, 6.12) or bzImage paths.
    pub kernels: Vec<String>,
    pub accel: Accel,
    /// Per VM, from boot to power-off.
    pub timeout: Duration,
    /// Only tests whose name contains this.
    pub filter: Option<String>,
    /// Each test this many times (nextest --stress-count).
    pub stress: Option<u32>,
    /// Print each console line as it comes; otherwise [`print_consoles`] prints them after.
    pub live_console: bool,
}

impl VmOptions {
    /// Checks the kernels and the filter, without fetching or building anything: a full
    /// `cargo xtask test` calls it first, so bad input fails before the native suite runs.
    pub fn validate(&self) -> Result<()> {
        test_filter(self)?;
        for spec in &self.kernels {
            kernel::KernelSpec::parse(spec)?;
        }
        Ok(())
    }
}

/// What one VM reported.
pub struct VmRun {
    pub label: String,
    pub outcome: Outcome,
    pub took: Duration,
}

/// Builds the image once, boots every kernel, prints a summary, and fails if any VM failed
/// (after running them all, so one bad kernel does not hide the others). `earlier` are rows
/// already run (the host's), printed first in the summary; a failure among them fails the
/// run too, after every VM has run.
pub fn test(options: &VmOptions, earlier: Vec<VmRun>) -> Result<()> {
    let prepared = prepare(options)?;
    let (runs, errors) = run(&prepared, options);
    if !options.live_console {
        print_consoles(&prepared);
    }
    let mut rows = earlier;
    rows.extend(runs);
    report(rows, errors, options)
}

/// Fetches the kernels `options` names into target/vm's cache (what [`prepare`] then finds
/// there): apt and unpacking, mostly waiting on the network and the disk, so it can run
/// beside the build.
pub fn fetch_kernels(options: &VmOptions) -> Result<()> {
    let vm_dir = crate::workspace_root().join("target/vm");
    for kernel in &options.kernels {
        kernel::KernelSpec::parse(kernel)?.resolve(&vm_dir)?;
    }
    Ok(())
}

/// Everything the VMs boot, built and fetched: the image, and per kernel its initramfs and
/// where its results and console go.
pub struct Prepared {
    qemu: PathBuf,
    words: String,
    kernels: Vec<(kernel::Kernel, PathBuf, PathBuf, PathBuf)>,
}

/// Checks the input, builds the image and fetches the kernels (bad input fails here, before
/// anything slow runs).
pub fn prepare(options: &VmOptions) -> Result<Prepared> {
    let qemu = find_qemu()?;
    let specs = options
        .kernels
        .iter()
        .map(|k| kernel::KernelSpec::parse(k))
        .collect::<Result<Vec<_>>>()?;
    let filter = test_filter(options)?;
    image::build()?;
    let root = crate::workspace_root();
    let vm_dir = root.join("target/vm");
    let words = kernel_words(&root, &filter, options.stress)?;
    // The VM mounts its results share there (nextest's store, .config/nextest.toml).
    fs::create_dir_all(root.join("target/nextest"))?;
    let mut kernels = Vec::new();
    for spec in &specs {
        let kernel = spec.resolve(&vm_dir)?;
        let label = kernel.label.replace('/', "_");
        let initramfs = vm_dir.join(format!("initramfs-{label}.cpio"));
        image::write_initramfs(&kernel, &initramfs)?;
        let results = vm_dir.join(format!("results-{label}"));
        let _ = fs::remove_dir_all(&results);
        fs::create_dir_all(&results)?;
        let log = vm_dir.join(format!("console-{label}.log"));
        kernels.push((kernel, initramfs, results, log));
    }
    Ok(Prepared {
        qemu,
        words,
        kernels,
    })
}

/// Boots every kernel, as many at once as the host has CPUs (each VM is one host thread
/// under TCG), the newest first: a newer kernel has more of the features the tests need, so
/// it runs more of them and takes longest (6.12 22 minutes, 6.1 17, 5.10 3 in the CI of
/// 264c63a); started last, the longest would finish alone. Returns what each VM reported
/// and the errors of those that did not report (hung, panicked, refused).
pub fn run(prepared: &Prepared, options: &VmOptions) -> (Vec<VmRun>, Vec<anyhow::Error>) {
    let Prepared {
        qemu,
        words,
        kernels,
    } = prepared;
    let jobs = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(kernels.len().max(1));
    let mut order: Vec<_> = kernels.iter().collect();
    order.sort_by_key(|(kernel, ..)| std::cmp::Reverse(series(&kernel.label)));
    let queue = std::sync::Mutex::new(
        order
            .into_iter()
            .enumerate()
            .map(|(place, vm)| (place == 0, vm))
            .collect::<std::collections::VecDeque<_>>(),
    );
    let vms_started = Instant::now();
    let outcomes: Vec<Result<VmRun>> = thread::scope(|scope| {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                let queue = &queue;
                scope.spawn(move || {
                    let mut done = Vec::new();
                    loop {
                        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                        let Some((first_in_line, (kernel, initramfs, results, log))) = next else {
                            break done;
                        };
                        eprintln!(
                            "xtask: booting {} ({}) with {:?}, time-out {} s",
                            kernel.label,
                            kernel.image.display(),
                            options.accel,
                            options.timeout.as_secs()
                        );
                        done.push(
                            Vm {
                                qemu,
                                kernel,
                                initramfs,
                                results,
                                kernel_words: words,
                                options,
                                log_path: log,
                                nice: if first_in_line { 0 } else { BEHIND_THE_LONGEST },
                            }
                            .boot_retrying_early_panics(),
                        );
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a VM's thread panicked"))
            .collect()
    });
    let mut runs = Vec::new();
    let mut errors = Vec::new();
    for outcome in outcomes {
        match outcome {
            Ok(run) => runs.push(run),
            Err(e) => errors.push(e),
        }
    }
    // In the order asked for, whichever finished first.
    runs.sort_by_key(|run| kernels.iter().position(|(k, ..)| k.label == run.label));
    crate::record_phase(
        &format!("integration tests in VMs ({jobs} at a time)"),
        vms_started.elapsed(),
    );
    (runs, errors)
}

/// A Debian series label's (major, minor), for the order VMs start in; a bzImage by path
/// sorts after them.
fn series(label: &str) -> (u32, u32) {
    let mut parts = label.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor),
        _ => (0, 0),
    }
}

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
        anyhow::bail!(
            "tests failed on {}: the summary above says which",
            failed
                .iter()
                .map(|r| r.label.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// The words of the kernel command line that tell the init where the host's build and
/// tools are (the same paths in the VM: its root is the host's).
fn kernel_words(root: &Path, filter: &str, stress: Option<u32>) -> Result<String> {
    let nextest = find_in_path("cargo-nextest").ok_or_else(|| {
        Fatal::error(
            EXIT_BAD_INPUT,
            "cargo-nextest is not on PATH, and the VMs run the tests with it: cargo install \
             cargo-nextest --locked (`cargo xtask test` does)",
        )
    })?;
    let pyenv = crate::setup::pyenv();
    let parsrv = crate::Profile::Checked.parsrv();
    let paths = [root, parsrv.as_path(), nextest.as_path(), pyenv.as_path()];
    if let Some(path) = paths
        .iter()
        .find(|p| p.to_string_lossy().contains(char::is_whitespace))
    {
        return Err(Fatal::error(
            EXIT_BAD_INPUT,
            format!(
                "{} has white space, which cannot travel on the VM's kernel command line: \
                 move it to a path without",
                path.display()
            ),
        ));
    }
    let mut words = format!(
        "parsrv.workspace={} parsrv.bin={} parsrv.nextest={} parsrv.pyenv={} parsrv.results={}",
        root.display(),
        parsrv.display(),
        nextest.display(),
        pyenv.display(),
        root.join("target/nextest").display()
    );
    if let Some(count) = stress {
        words.push_str(&format!(" parsrv.stress={count}"));
    }
    if !filter.is_empty() {
        words.push_str(&format!(" parsrv.filter={filter}"));
    }
    Ok(words)
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// The test name filter the init passes to nextest, checked to travel on the kernel
/// command line.
fn test_filter(options: &VmOptions) -> Result<String> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(filter) = &options.filter {
        if filter.is_empty() || filter.contains([',', ' ', '\t', '\n']) {
            return Err(Fatal::error(
                EXIT_BAD_INPUT,
                format!(
                    "test filter {filter:?} cannot reach the VM (it travels on the kernel \
                     command line): give part of a test name, without commas or spaces"
                ),
            ));
        }
        args.push(filter);
    }
    Ok(args.join(","))
}

/// qemu-system-x86_64 from $QEMU or PATH.
fn find_qemu() -> Result<PathBuf> {
    find_qemu_in(std::env::var_os("QEMU"), std::env::var_os("PATH"))
}

fn find_qemu_in(
    qemu: Option<std::ffi::OsString>,
    paths: Option<std::ffi::OsString>,
) -> Result<PathBuf> {
    if let Some(path) = qemu {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(Fatal::error(
                EXIT_BAD_INPUT,
                format!(
                    "QEMU={} does not exist: point QEMU at qemu-system-x86_64, or unset it to \
                     use the one on PATH",
                    path.display()
                ),
            ));
        }
        return Ok(path);
    }
    let found = paths.and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("qemu-system-x86_64"))
            .find(|candidate| candidate.is_file())
    });
    found.ok_or_else(|| {
        Fatal::error(
            EXIT_BAD_INPUT,
            "qemu-system-x86_64 is not on PATH: install it (apt-get install qemu-system-x86; \
             `cargo xtask setup` does as root), or set QEMU to its path",
        )
    })
}

/// One kernel to boot with the test image.
struct Vm<'a> {
    qemu: &'a Path,
    kernel: &'a kernel::Kernel,
    initramfs: &'a Path,
    /// A directory of the host the VM writes nextest's results into.
    results: &'a Path,
    /// Kernel command line words for the init (see [`kernel_words`]).
    kernel_words: &'a str,
    options: &'a VmOptions,
    /// Where the console is kept.
    log_path: &'a Path,
    /// The nice value qemu runs at: 0 for the first VM in line, [`BEHIND_THE_LONGEST`] for
    /// the others.
    nice: i32,
}

/// The nice value of every VM but the first in line (the newest kernel, which runs the
/// most tests and ends last). During the VMs' first minutes the host's own integration tests
/// run too, three CPU-bound parties on two CPUs: at equal priority each got two thirds of a
/// CPU, and the newest kernel's VM, the one CI waits for, lost about 3 of its 19.5 minutes
/// (fresh clone of 31f074b, 2026-12-05). At nice 5 (a third of the weight) the others yield
/// to it and to the host's tests; they have the minutes to spare.
const BEHIND_THE_LONGEST: i32 = 5;

impl Vm<'_> {
    /// [`Vm::boot`], once more if the kernel panicked before our init printed a line: an
    /// emulator fault there (seen once, with one qemu thread per vCPU) says nothing of
    /// parsrv, and a kernel that cannot boot panics again. The first console stays in
    /// `*.early-panic.log`.
    fn boot_retrying_early_panics(&self) -> Result<VmRun> {
        let Vm {
            kernel, log_path, ..
        } = *self;
        let first = self.boot();
        let console = fs::read_to_string(log_path).unwrap_or_default();
        let early_panic = first.is_err()
            && console.contains("Kernel panic")
            && !console.lines().any(|l| l.starts_with("parsrv-vm: "));
        if !early_panic {
            return first;
        }
        let kept = log_path.with_extension("early-panic.log");
        fs::rename(log_path, &kept)?;
        eprintln!(
            "xtask: kernel {} panicked before the init ran ({}); booting it once more",
            kernel.label,
            kept.display()
        );
        self.boot()
    }

    /// Boots one kernel with the test image and follows its console until power-off, a panic
    /// or the time-out.
    fn boot(&self) -> Result<VmRun> {
        let Vm {
            qemu,
            kernel,
            initramfs,
            results,
            kernel_words,
            options,
            log_path,
            nice,
        } = *self;
        let share = |id: &str, path: &Path, readonly: bool| {
            [
                "-fsdev".to_owned(),
                format!(
                    "local,id={id},path={},security_model=none,multidevs=remap{}",
                    path.display(),
                    if readonly { ",readonly=on" } else { "" }
                ),
                "-device".to_owned(),
                format!("virtio-9p-pci,fsdev={id},mount_tag={id}"),
            ]
        };
        let mut shares = Vec::new();
        shares.extend(share("hostroot", Path::new("/"), true));
        shares.extend(share("results", results, false));
        if let Some(modules) = &kernel.modules {
            shares.extend(share("modules", modules, true));
        }
        let (accel, cpu) = match options.accel {
            // One host thread for both vCPUs. With one thread per vCPU (qemu 7.2 here), a 6.12
            // guest died at boot with "Oops: int3" in code the kernel was patching while the
            // other vCPU ran it (text_poke_bp): cross-modified code is not coherent there.
            //
            // qemu64, not max: the baseline x86-64 CPU, without AVX2 and SSE4, which glibc's
            // string functions would otherwise use and TCG emulates slowly. The adoption
            // tests took 104-111 s instead of 128-129 s in a 6.12 VM (two pairs side by side,
            // 2026-12-05), `parsrv kernel` 1.34 s instead of 1.65-1.80 s. The guest keeps the
            // tsc clocksource; parsrv and its eBPF need nothing of the newer CPUs.
            Accel::Tcg => ("tcg,thread=single", "qemu64"),
            Accel::Kvm => ("kvm", "host"),
        };
        let started = Instant::now();
        let mut command = Command::new(qemu);
        command
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-no-reboot"])
            .args(["-accel", accel, "-cpu", cpu, "-smp", "2", "-m", "2048"])
            .arg("-kernel")
            .arg(&kernel.image)
            .arg("-initrd")
            .arg(initramfs)
            .args(&shares)
            // panic=-1 reboots at once on a panic, and -no-reboot turns that into qemu exiting.
            .arg("-append")
            .arg(format!(
                "console=ttyS0 loglevel=4 panic=-1 oops=panic rdinit=/init {kernel_words}"
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A killed xtask takes its VM with it: qemu would run on, re-parented to init. (The
        // signal follows this thread, which waits for qemu to the end.)
        // SAFETY: a prctl and nice(2) between fork and exec, both async-signal-safe. nice's
        // result is not checked (-1 is a valid nice value): a VM that kept its priority only
        // takes more of the CPU.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)?;
                nix::libc::nice(nice);
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", qemu.display()))?;

        let (lines_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().expect("piped");
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });

        let mut log = fs::File::create(log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut outcome = Outcome::default();
        let deadline = started + options.timeout;
        let label = &kernel.label;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    writeln!(log, "{line}").ok();
                    if options.live_console {
                        println!("[{label}] {line}");
                    }
                    outcome.feed(&line);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Only the qemu this function started, by its own handle.
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Fatal::error(
                        EXIT_VM_HUNG,
                        format!(
                            "the VM with kernel {label} hung: no result after {} s, killed (last \
                         console line: {:?}; whole console: {}); raise --timeout if it was \
                         only slow",
                            options.timeout.as_secs(),
                            outcome.last_line,
                            log_path.display()
                        ),
                    ));
                }
            }
        }
        let status = child.wait().context("waiting for qemu")?;
        let took = started.elapsed();
        let qemu_errors = stderr.join().unwrap_or_default();
        if let Some(panic) = &outcome.panic {
            return Err(Fatal::error(
                EXIT_VM_HUNG,
                format!(
                    "kernel {label} panicked: {panic} (console: {})",
                    log_path.display()
                ),
            ));
        }
        if let Some(refusal) = &outcome.refused {
            return Err(Fatal::error(EXIT_BAD_INPUT, refusal.explain(label)));
        }
        if outcome.done.is_none() {
            let why = qemu_errors
                .lines()
                .find(|l| !l.trim().is_empty())
                .map(|l| format!("qemu said: {}", l.trim()))
                .unwrap_or_else(|| format!("qemu exited with {status}"));
            let code = if outcome.booted() { 1 } else { EXIT_BAD_INPUT };
            return Err(Fatal::error(
                code,
                format!(
                    "the VM with kernel {label} stopped before the tests finished; {why} \
                 (console: {})",
                    log_path.display()
                ),
            ));
        }
        Ok(VmRun {
            label: label.clone(),
            outcome,
            took,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A stand-in for qemu: a script that prints `console` as the VM's serial output,
    /// `stderr` as qemu's own errors, then exits with `exit` (or sleeps, if None).
    fn fake_qemu(name: &str, console: &str, stderr: &str, exit: Option<i32>) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-vm-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let end = match exit {
            Some(code) => format!("exit {code}"),
            None => "exec sleep 600".to_owned(),
        };
        let source = dir.join("qemu.sh");
        fs::write(
            &source,
            format!("#!/bin/sh\nprintf '%s' '{console}'\nprintf '%s' '{stderr}' >&2\n{end}\n"),
        )
        .unwrap();
        fs::set_permissions(&source, fs::Permissions::from_mode(0o755)).unwrap();
        // The executable is written by `cp`, never opened for writing in this process: a
        // child that another test thread forks meanwhile would inherit that descriptor
        // until its exec, and exec'ing the script then fails with ETXTBSY.
        let script = dir.join("qemu");
        let copied = Command::new("cp").arg(&source).arg(&script).status();
        assert!(copied.is_ok_and(|s| s.success()), "cp {source:?}");
        script
    }

    /// Runs `boot` on a VM whose qemu is `qemu` (a fake) and whose console goes to `log`.
    fn with_fake_vm<T>(
        qemu: &Path,
        timeout: Duration,
        log: &Path,
        boot: impl FnOnce(&Vm) -> T,
    ) -> T {
        with_fake_vm_at(qemu, timeout, log, 0, boot)
    }

    /// [`with_fake_vm`], with qemu at nice value `nice`.
    fn with_fake_vm_at<T>(
        qemu: &Path,
        timeout: Duration,
        log: &Path,
        nice: i32,
        boot: impl FnOnce(&Vm) -> T,
    ) -> T {
        let kernel = kernel::Kernel {
            label: "fake".into(),
            image: PathBuf::from("/nonexistent"),
            modules: None,
        };
        let options = VmOptions {
            kernels: Vec::new(),
            accel: Accel::Tcg,
            timeout,
            filter: None,
            stress: None,
            live_console: false,
        };
        boot(&Vm {
            qemu,
            kernel: &kernel,
            initramfs: Path::new("/nonexistent"),
            results: Path::new("/nonexistent"),
            kernel_words: "",
            options: &options,
            log_path: log,
            nice,
        })
    }

    #[test]
    fn a_vm_behind_the_first_in_line_runs_its_qemu_at_a_lower_priority() {
        let dir = std::env::temp_dir().join(format!("xtask-vm-{}-nice", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let said = dir.join("nice");
        // Field 19 of stat is the nice value, which cut inherits from the script.
        let source = dir.join("qemu.sh");
        fs::write(
            &source,
            format!(
                "#!/bin/sh\ncut -d' ' -f19 /proc/self/stat > {}\n",
                said.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&source, fs::Permissions::from_mode(0o755)).unwrap();
        let qemu = dir.join("qemu");
        assert!(Command::new("cp")
            .arg(&source)
            .arg(&qemu)
            .status()
            .unwrap()
            .success());
        let own: i32 = fs::read_to_string("/proc/self/stat")
            .unwrap()
            .split(' ')
            .nth(18)
            .unwrap()
            .parse()
            .unwrap();
        for (nice, expected) in [
            (0, own),
            (BEHIND_THE_LONGEST, (own + BEHIND_THE_LONGEST).min(19)),
        ] {
            let _ = fs::remove_file(&said);
            // The fake stops before any test ran: an error, which is not what this checks.
            let _ = with_fake_vm_at(
                &qemu,
                Duration::from_secs(30),
                &dir.join("log"),
                nice,
                |vm| vm.boot(),
            );
            let ran_at: i32 = fs::read_to_string(&said).unwrap().trim().parse().unwrap();
            assert_eq!(ran_at, expected, "qemu asked to run at +{nice}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_newest_kernel_boots_first_and_a_bzimage_by_path_last() {
        let mut labels = ["5.10", "bzImage-custom", "6.12", "6.1"];
        labels.sort_by_key(|label| std::cmp::Reverse(series(label)));
        assert_eq!(labels, ["6.12", "6.1", "5.10", "bzImage-custom"]);
    }

    fn boot_fake(qemu: &Path, timeout: Duration) -> Result<VmRun> {
        let run = with_fake_vm(qemu, timeout, &qemu.with_file_name("log"), |vm| vm.boot());
        fs::remove_dir_all(qemu.parent().unwrap()).unwrap();
        run
    }

    fn fatal(result: Result<VmRun>) -> (i32, String) {
        let error = result.err().expect("an error");
        let fatal = error.downcast_ref::<Fatal>().expect("a Fatal");
        assert_eq!(fatal.message.lines().count(), 1, "{fatal}");
        (fatal.code, fatal.message.clone())
    }

    #[test]
    fn a_hung_vm_is_killed_at_the_time_out_and_reported_as_hung() {
        let qemu = fake_qemu(
            "hung",
            "parsrv-vm: kernel 6.1\nparsrv-vm: run stall\n",
            "",
            None,
        );
        let started = Instant::now();
        let (code, message) = fatal(boot_fake(&qemu, Duration::from_secs(2)));
        assert_eq!(code, EXIT_VM_HUNG);
        assert!(
            message.contains("hung: no result after 2 s, killed"),
            "{message}"
        );
        assert!(message.contains("parsrv-vm: run stall"), "{message}");
        // Killed, not waited for: the fake sleeps for ten minutes.
        assert!(started.elapsed() < Duration::from_secs(60));
    }

    #[test]
    fn panics_refusals_and_qemu_errors_each_get_their_exit_code() {
        // (name, console, qemu's stderr, qemu's exit, expected exit code, words)
        let cases = [
            (
                "panic",
                "parsrv-vm: kernel 6.1\n[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n",
                "",
                0,
                EXIT_VM_HUNG,
                "panicked: [ 1.0] Kernel panic",
            ),
            (
                "no-btf",
                "parsrv-vm: kernel 6.1\nparsrv-vm: error: no-btf\n",
                "",
                0,
                EXIT_BAD_INPUT,
                "CONFIG_DEBUG_INFO_BTF=y",
            ),
            (
                "no-bpf",
                "parsrv-vm: kernel 6.1\nparsrv-vm: error: no-bpf\n",
                "",
                0,
                EXIT_BAD_INPUT,
                "CONFIG_BPF_SYSCALL=y",
            ),
            (
                "kvm",
                "",
                "qemu-system-x86_64: failed to initialize kvm: No such file\n",
                1,
                EXIT_BAD_INPUT,
                "qemu said: qemu-system-x86_64: failed to initialize kvm",
            ),
            (
                "short",
                "parsrv-vm: kernel 6.1\nparsrv-vm: run stall\n",
                "",
                0,
                EXIT_FAILED,
                "stopped before the tests finished",
            ),
        ];
        for (name, console, stderr, exit, expected, words) in cases {
            let qemu = fake_qemu(name, console, stderr, Some(exit));
            let (code, message) = fatal(boot_fake(&qemu, Duration::from_secs(30)));
            assert_eq!(code, expected, "{name}: {message}");
            assert!(message.contains(words), "{name}: {message}");
        }
    }

    #[test]
    fn only_a_panic_before_the_init_is_retried_once() {
        let dir = std::env::temp_dir().join(format!("xtask-vm-{}-retry", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let boots = dir.join("boots");
        // Panics before the init on its first boot, then runs cleanly.
        let qemu = dir.join("qemu");
        fs::write(
            &qemu,
            format!(
                "#!/bin/sh\necho x >> {0}\nif [ $(wc -l < {0}) = 1 ]; then\n\
                 printf '[ 1.1] Kernel panic - not syncing: Fatal exception\\n'; exit 0; fi\n\
                 printf 'parsrv-vm: kernel 6.12\\n PASS [ 1.0s] parsrv-integration-tests::a b\\n\
                 parsrv-vm: exit stall 0\\nparsrv-vm: done failed-binaries=0\\n'\n",
                boots.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&qemu, fs::Permissions::from_mode(0o755)).unwrap();
        let log = dir.join("console.log");
        let retrying = |qemu: &Path| {
            with_fake_vm(qemu, Duration::from_secs(30), &log, |vm| {
                vm.boot_retrying_early_panics()
            })
        };
        let run = retrying(&qemu).unwrap();
        assert!(run.outcome.passed());
        assert_eq!(fs::read_to_string(&boots).unwrap().lines().count(), 2);
        assert!(fs::read_to_string(dir.join("console.early-panic.log"))
            .unwrap()
            .contains("Kernel panic"));

        // A panic after the init started is the run's result: not retried.
        fs::write(&boots, "").unwrap();
        fs::write(
            &qemu,
            format!(
                "#!/bin/sh\necho x >> {}\n\
                 printf 'parsrv-vm: kernel 6.1\\n[ 9.9] Kernel panic - not syncing: oops\\n'\n",
                boots.display()
            ),
        )
        .unwrap();
        let (code, _) = fatal(retrying(&qemu));
        assert_eq!(code, EXIT_VM_HUNG);
        assert_eq!(fs::read_to_string(&boots).unwrap().lines().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_finished_run_returns_its_outcome() {
        let qemu = fake_qemu(
            "done",
            "parsrv-vm: kernel 6.1\n PASS [ 1.0s] parsrv-integration-tests::a b\n PASS [ 1.0s] parsrv-integration-tests::a c\nparsrv-vm: exit stall 0\nparsrv-vm: done failed-binaries=0\n",
            "",
            Some(0),
        );
        let run = boot_fake(&qemu, Duration::from_secs(30)).unwrap();
        assert!(run.outcome.passed());
        assert_eq!(run.outcome.passed, 2);
    }

    #[test]
    fn missing_qemu_is_bad_input_naming_the_fix() {
        let error = find_qemu_in(None, Some("/nonexistent".into())).unwrap_err();
        let fatal = error.downcast_ref::<Fatal>().unwrap();
        assert_eq!(fatal.code, EXIT_BAD_INPUT);
        assert!(
            fatal.message.contains("apt-get install qemu-system-x86"),
            "{fatal}"
        );
        let error = find_qemu_in(Some("/nonexistent/qemu".into()), None).unwrap_err();
        assert!(error
            .to_string()
            .contains("QEMU=/nonexistent/qemu does not exist"));
        let sh = find_qemu_in(Some("/bin/sh".into()), None).unwrap();
        assert_eq!(sh, PathBuf::from("/bin/sh"));
    }
}
