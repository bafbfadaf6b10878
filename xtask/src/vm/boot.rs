//! One VM: qemu booting a kernel with the test image, its console followed until power-off, a
//! panic or the time-out; and the tests that run it with a fake qemu.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Instant,
};

use anyhow::{Context as _, Result};

use super::{kernel, Accel, Outcome, VmOptions, VmRun};
use crate::{Fatal, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_VM_HUNG};

/// One kernel to boot with the test image.
pub(super) struct Vm<'a> {
    pub(super) qemu: &'a Path,
    pub(super) kernel: &'a kernel::Kernel,
    pub(super) initramfs: &'a Path,
    /// A directory of the host the VM writes nextest's results into.
    pub(super) results: &'a Path,
    /// Kernel command line words for the init (see [`kernel_words`](super::kernel_words)).
    pub(super) kernel_words: &'a str,
    pub(super) options: &'a VmOptions,
    /// Where the console is kept.
    pub(super) log_path: &'a Path,
    /// The nice value qemu runs at: 0 for the first VM in line, [`BEHIND_THE_LONGEST`] for
    /// the others.
    pub(super) nice: i32,
}

/// The nice value of every VM but the first in line (the newest kernel, which runs the
/// most tests and ends last). 0, measured: during the VMs' first minutes the host's own
/// tests run too, and at equal priority the newest kernel's VM, the one CI waits for, lost
/// about 3 of its 19.5 minutes (fresh clone of 31f074b, 2026-12-05). At 5 it took 18.3
/// minutes (00fd642), but the 6.1 VM, at a third of the weight behind the host's benchmark
/// build and the 6.12 VM, once failed `twenty_spawner_kills_...` (1 of 8070 requests, its
/// steps bounded at 3 s) and took twice its time (fresh clone of 19f12fa). A VM's tests are
/// not written for a tenth of a CPU: all VMs run at the host's priority.
pub(super) const BEHIND_THE_LONGEST: i32 = 0;

impl Vm<'_> {
    /// [`Vm::boot`], once more if the kernel panicked before our init printed a line: an
    /// emulator fault there (seen once, with one qemu thread per vCPU) says nothing of
    /// parsrv, and a kernel that cannot boot panics again. The first console stays in
    /// `*.early-panic.log`.
    pub(super) fn boot_retrying_early_panics(&self) -> Result<VmRun> {
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
    pub(super) fn boot(&self) -> Result<VmRun> {
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
            // loglevel=5: kernel warnings (WARN's "cut here" reports, at KERN_WARNING) reach
            // the console too. A 6.12 VM panicked twice in the BIRD cluster test with a
            // kernel already tainted by a warning the console (loglevel=4) did not show.
            .arg("-append")
            .arg(format!(
                "console=ttyS0 loglevel=5 panic=-1 oops=panic rdinit=/init {kernel_words}{}",
                extra_kernel_words()
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
        let (status, cpu) = crate::phases::wait_with_cpu(&mut child).context("waiting for qemu")?;
        let took = started.elapsed();
        crate::record_phase(
            &format!("the VM with kernel {label} (qemu)"),
            took,
            Some(cpu),
        );
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
            let code = if outcome.booted() {
                EXIT_FAILED
            } else {
                EXIT_BAD_INPUT
            };
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

/// `PARSRV_VM_KERNEL_ARGS`: more words for the VMs' kernel command line, to measure what a
/// kernel setting does to the suite's time (e.g. `mitigations=off`).
fn extra_kernel_words() -> String {
    std::env::var("PARSRV_VM_KERNEL_ARGS")
        .map(|words| format!(" {words}"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, path::PathBuf, time::Duration};

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
            shards: 1,
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
        for (nice, expected) in [(0, own), (5, (own + 5).min(19))] {
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
}
