//! `cargo xtask test --vm`: the privileged integration tests, booted under qemu on other
//! kernels.
//!
//! Each kernel (Debian's 5.10, 6.1 and 6.12 packages, fetched without installing them,
//! [`kernel`], or any bzImage given by path) boots a small initramfs ([`image`]) that mounts
//! the host's root file system read-only over 9p; the init then runs the host's release
//! build with cargo-nextest, in the same two profiles as natively, and powers off. The
//! runner reads the serial console ([`console`]) and fails on a failed test, a kernel
//! panic, or a time-out. VMs run one per host CPU at a time; the newest kernel's tests may
//! be split between several ([`shards_of`]).
//!
//! Nothing here needs root: qemu runs unprivileged with TCG, and the tests get root inside
//! the VM. That is the point: a developer without root, or a release checked on the kernels
//! people run.

mod boot;
pub(crate) mod console;
mod image;
mod kernel;
mod report;

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;

use boot::{Vm, BEHIND_THE_LONGEST};
pub use console::Outcome;
pub use report::{print_consoles, report};

use crate::{Fatal, EXIT_BAD_INPUT};

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
    /// VMs the first kernel's tests are split between (see [`shards_of`]).
    pub shards: u32,
    /// Print each console line as it comes; otherwise [`print_consoles`] prints them after.
    pub live_console: bool,
}

impl VmOptions {
    /// Checks the kernels and the filter, without fetching or building anything: a full
    /// `cargo xtask test` calls it first, so bad input fails before the native suite runs.
    pub fn validate(&self) -> Result<()> {
        test_filter(self)?;
        if self.shards == 0 {
            return Err(Fatal::error(
                EXIT_BAD_INPUT,
                "--shards 0: give 1 to run each kernel's tests in one VM, or more to split \
                 the first kernel's",
            ));
        }
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

/// Everything the VMs boot, built and fetched: the image, and per VM its kernel, initramfs,
/// command line, and where its results and console go.
pub struct Prepared {
    qemu: PathBuf,
    vms: Vec<PreparedVm>,
}

struct PreparedVm {
    /// The kernel, labelled with the VM's share of its tests ("6.12 1/2") when split.
    kernel: kernel::Kernel,
    initramfs: PathBuf,
    words: String,
    results: PathBuf,
    log: PathBuf,
}

/// Into how many VMs each of `kernels` (in the order they boot, newest first) is split: the
/// first into `shards`, unless a filter or --stress picks the tests (a few tests split
/// would leave VMs with nothing to run). The newest kernel has every feature the tests
/// need, so it runs the most: in CI on 2 CPUs its one VM was the longest step (6.12: 20.8
/// minutes, 977 CPU-seconds, where the 6.1 VM took 15.7; the 6.12-only cluster tests alone
/// 349 CPU-seconds; 2026-12-07, ecaa706). CI does not split it (see [`run`]); a run of
/// that one kernel on 2 CPUs is twice as fast split in two.
fn shards_of(kernels: usize, shards: u32, picked: bool) -> Vec<u32> {
    (0..kernels)
        .map(|i| if i == 0 && !picked { shards.max(1) } else { 1 })
        .collect()
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
        kernels.push(spec.resolve(&vm_dir)?);
    }
    kernels.sort_by_key(|kernel| std::cmp::Reverse(series(&kernel.label)));
    let picked = options.filter.is_some() || options.stress.is_some();
    let shards = shards_of(kernels.len(), options.shards, picked);
    let mut vms = Vec::new();
    for (kernel, shards) in kernels.into_iter().zip(shards) {
        let name = kernel.label.replace('/', "_");
        let initramfs = vm_dir.join(format!("initramfs-{name}.cpio"));
        image::write_initramfs(&kernel, &initramfs)?;
        for shard in 1..=shards {
            let (label, name, words) = if shards == 1 {
                (kernel.label.clone(), name.clone(), words.clone())
            } else {
                (
                    format!("{} {shard}/{shards}", kernel.label),
                    format!("{name}-{shard}of{shards}"),
                    format!("{words} parsrv.partition=count:{shard}/{shards}"),
                )
            };
            let results = vm_dir.join(format!("results-{name}"));
            let _ = fs::remove_dir_all(&results);
            fs::create_dir_all(&results)?;
            vms.push(PreparedVm {
                kernel: kernel::Kernel {
                    label,
                    ..kernel.clone()
                },
                initramfs: initramfs.clone(),
                words,
                results,
                log: vm_dir.join(format!("console-{name}.log")),
            });
        }
    }
    Ok(Prepared { qemu, vms })
}

/// Boots every VM, as many at once as the host has CPUs (each VM is one host thread under
/// TCG), the newest kernel first: a newer kernel has more of the features the tests need,
/// so it runs more of them and takes longest (6.12 22 minutes, 6.1 17, 5.10 3 in the CI of
/// 264c63a); started last, the longest would finish alone. Returns what each VM reported
/// and the errors of those that did not report (hung, panicked, refused).
///
/// Not one more VM than CPUs, although a VM is busy only about three quarters of the time
/// (6.12 977 CPU-seconds in 1,245 s, 6.1 678 in 942): measured in CI with the newest
/// kernel split in two (2026-12-07, 370b10c), three VMs at once used the CPUs fully (96 %)
/// and took 270 CPU-seconds more; the 6.1 VM, starved, became the longest (20.8 minutes
/// instead of 15.7), the run took no less (24.8 minutes against 25.0), and a crash-loop
/// test's timing gave way there.
pub fn run(prepared: &Prepared, options: &VmOptions) -> (Vec<VmRun>, Vec<anyhow::Error>) {
    let Prepared { qemu, vms } = prepared;
    let jobs = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(vms.len().max(1));
    let queue = std::sync::Mutex::new(
        vms.iter()
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
                        let Some((first_in_line, vm)) = next else {
                            break done;
                        };
                        let PreparedVm {
                            kernel,
                            initramfs,
                            words,
                            results,
                            log,
                        } = vm;
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
    // In the order they boot, whichever finished first.
    runs.sort_by_key(|run| vms.iter().position(|vm| vm.kernel.label == run.label));
    crate::record_phase(
        &format!("integration tests in VMs ({jobs} at a time)"),
        vms_started.elapsed(),
        None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_kernel_boots_first_and_a_bzimage_by_path_last() {
        let mut labels = ["5.10", "bzImage-custom", "6.12", "6.1"];
        labels.sort_by_key(|label| std::cmp::Reverse(series(label)));
        assert_eq!(labels, ["6.12", "6.1", "5.10", "bzImage-custom"]);
    }

    #[test]
    fn only_the_first_kernel_is_split_and_never_for_picked_tests() {
        assert_eq!(shards_of(3, 2, false), [2, 1, 1]);
        assert_eq!(shards_of(3, 1, false), [1, 1, 1]);
        assert_eq!(shards_of(1, 3, false), [3]);
        assert_eq!(shards_of(3, 2, true), [1, 1, 1]);
        assert!(shards_of(0, 2, false).is_empty());
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
