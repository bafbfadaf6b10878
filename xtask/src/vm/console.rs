//! Reading a test VM's serial console: the init's `parsrv-vm:` lines, libtest's own result
//! lines, and kernel panics.

/// Why the init refused to run the tests: the kernel cannot run parsrv at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    NoBpf,
    NoBpffs,
    NoBtf,
    Other(String),
}

impl Refusal {
    pub fn explain(&self, kernel: &str) -> String {
        match self {
            Refusal::NoBpf => format!(
                "kernel {kernel} has no bpf() system call: build it with CONFIG_BPF_SYSCALL=y"
            ),
            Refusal::NoBpffs => format!(
                "kernel {kernel} cannot mount bpffs: build it with CONFIG_BPF_SYSCALL=y (bpffs \
                 comes with it)"
            ),
            Refusal::NoBtf => format!(
                "kernel {kernel} has no BTF (/sys/kernel/btf/vmlinux), which parsrv reads its \
                 offsets from: build it with CONFIG_DEBUG_INFO_BTF=y"
            ),
            Refusal::Other(what) => format!("the VM with kernel {kernel} refused: {what}"),
        }
    }
}

/// What a VM's console said, line by line.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `uname -r` inside the VM: the init's first line, proof that it started.
    pub release: Option<String>,
    /// Tests passed and failed, summed over libtest's `test result:` lines.
    pub passed: u32,
    pub failed: u32,
    /// Names of failed tests.
    pub failures: Vec<String>,
    /// `test: reason` of every skipped test.
    pub skips: Vec<String>,
    /// `test: figure` of every figure a test recorded (verifier costs, ...).
    pub figures: Vec<String>,
    /// Test binaries that exited non-zero (a crash counts even without a result line).
    pub failed_binaries: Vec<String>,
    /// The init's last line: how many binaries failed.
    pub done: Option<u32>,
    pub refused: Option<Refusal>,
    pub panic: Option<String>,
    pub last_line: String,
}

const PREFIX: &str = "parsrv-vm: ";

impl Outcome {
    pub fn feed(&mut self, line: &str) {
        // Serial lines can carry a carriage return or a kernel message's interleaving.
        let line = line.trim_end_matches('\r');
        if !line.trim().is_empty() {
            self.last_line = line.to_owned();
        }
        if line.contains("Kernel panic - not syncing") {
            self.panic = Some(line.trim().to_owned());
        }
        if let Some(said) = line.strip_prefix(PREFIX) {
            self.init_line(said);
        } else if let Some(result) = line.strip_prefix("test result: ") {
            self.passed += count_before(result, " passed");
            self.failed += count_before(result, " failed");
        } else if let Some(test) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            self.failures.push(test.to_owned());
        }
    }

    fn init_line(&mut self, said: &str) {
        if let Some(release) = said.strip_prefix("kernel ") {
            self.release = Some(release.to_owned());
        } else if let Some(what) = said.strip_prefix("error: ") {
            self.refused = Some(match what {
                "no-bpf" => Refusal::NoBpf,
                "no-bpffs" => Refusal::NoBpffs,
                "no-btf" => Refusal::NoBtf,
                other => Refusal::Other(other.to_owned()),
            });
        } else if let Some(skip) = said.strip_prefix("skip ") {
            self.skips.push(skip.to_owned());
        } else if let Some(figure) = said.strip_prefix("figure ") {
            self.figures.push(figure.to_owned());
        } else if let Some(exit) = said.strip_prefix("exit ") {
            let mut words = exit.split_whitespace();
            if let (Some(binary), Some(status)) = (words.next(), words.next()) {
                if status != "0" {
                    self.failed_binaries
                        .push(format!("{binary} (exit {status})"));
                }
            }
        } else if let Some(hung) = said.strip_prefix("hung ") {
            let binary = hung.split(':').next().unwrap_or(hung);
            self.failures.push(format!("{binary} (hung, killed)"));
        } else if let Some(done) = said.strip_prefix("done failed-binaries=") {
            self.done = done.trim().parse().ok();
        }
    }

    pub fn booted(&self) -> bool {
        self.release.is_some()
    }

    /// Every binary ran cleanly, and not one test passed, failed or was skipped.
    pub fn ran_nothing(&self) -> bool {
        self.done == Some(0)
            && self.passed == 0
            && self.failed == 0
            && self.failures.is_empty()
            && self.skips.is_empty()
    }

    /// Every binary ran and exited 0, no test failed, and at least one test passed or was
    /// skipped with a reason (an empty run proves nothing).
    pub fn passed(&self) -> bool {
        self.done == Some(0)
            && self.failed_binaries.is_empty()
            && self.failed == 0
            && self.failures.is_empty()
            && self.panic.is_none()
            && (self.passed > 0 || !self.skips.is_empty())
    }
}

/// The number right before `what` in a libtest summary such as
/// `ok. 5 passed; 1 failed; 0 ignored; ...`.
pub(crate) fn count_before(result: &str, what: &str) -> u32 {
    result
        .split(';')
        .find_map(|part| part.trim_end().strip_suffix(what))
        .and_then(|rest| rest.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The table of every VM's run, and what each skipped or failed.
pub fn print_summary(runs: &[super::VmRun]) {
    if runs.is_empty() {
        return;
    }
    println!("\nVM test summary (tests that need Python skip in VMs, each saying so):");
    println!(
        "{:<10} {:<26} {:>6} {:>6} {:>7} {:>8}  result",
        "kernel", "release", "passed", "failed", "skipped", "minutes"
    );
    for run in runs {
        let o = &run.outcome;
        println!(
            "{:<10} {:<26} {:>6} {:>6} {:>7} {:>8.1}  {}",
            run.label,
            o.release.as_deref().unwrap_or("?"),
            // libtest counts a skipped test as passed.
            o.passed.saturating_sub(o.skips.len() as u32),
            o.failed,
            o.skips.len(),
            run.took.as_secs_f64() / 60.0,
            if o.passed() { "ok" } else { "FAILED" }
        );
        for skip in &o.skips {
            println!("    skipped {skip}");
        }
        for failure in &o.failures {
            println!("    failed {failure}");
        }
        for figure in &o.figures {
            println!("    figure {figure}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(console: &str) -> Outcome {
        let mut outcome = Outcome::default();
        for line in console.lines() {
            outcome.feed(line);
        }
        outcome
    }

    #[test]
    fn a_clean_run_passes_and_counts_libtest_results() {
        let o = outcome(
            "[    0.000000] Linux version 6.1.0-56-amd64\n\
             parsrv-vm: kernel 6.1.0-56-amd64\r\n\
             parsrv-vm: run stall\n\
             test stalled_handler_loses_no_connection_while_plain_reuseport_does ... ok\n\
             test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9.10s\n\
             parsrv-vm: exit stall 0\n\
             test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 2 filtered out; finished in 1s\n\
             parsrv-vm: exit lifecycle 0\n\
             parsrv-vm: done failed-binaries=0\n",
        );
        assert_eq!(o.release.as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!((o.passed, o.failed), (5, 0));
        assert!(o.failed_binaries.is_empty());
        assert!(o.passed());
    }

    #[test]
    fn figures_the_tests_recorded_are_collected_for_the_summary() {
        let o = outcome(
            "parsrv-vm: kernel 6.12.48+deb12-amd64\n\
             test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
             parsrv-vm: exit verifier 0\n\
             parsrv-vm: figure every_program: parsrv_select 18,435 insns processed of 1,000,000 (1.8%)\n\
             parsrv-vm: done failed-binaries=0\n",
        );
        assert_eq!(
            o.figures,
            vec!["every_program: parsrv_select 18,435 insns processed of 1,000,000 (1.8%)"]
        );
        assert!(o.skips.is_empty() && o.passed());
    }

    #[test]
    fn failures_crashes_and_skips_are_reported() {
        let o = outcome(
            "parsrv-vm: kernel 5.10.0-32-amd64\n\
             test when_full_drop ... FAILED\n\
             test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n\
             parsrv-vm: exit when_full 101\n\
             parsrv-vm: exit policy 134\n\
             parsrv-vm: hung scaling: killed after 300 s; its processes and the spawners' logs:\n\
             parsrv-vm: exit scaling 137\n\
             parsrv-vm: skip redirect_keeps: kernel 5.10.0-32-amd64 predates the bpf_loop helper (Linux 5.17+)\n\
             parsrv-vm: done failed-binaries=2\n",
        );
        assert_eq!(o.failures, vec!["when_full_drop", "scaling (hung, killed)"]);
        assert_eq!(o.failed_binaries.len(), 3);
        assert_eq!(o.skips.len(), 1);
        assert!(!o.passed());
    }

    #[test]
    fn a_run_that_only_skips_passes_but_an_empty_one_does_not() {
        let skipped = outcome(
            "parsrv-vm: kernel 5.10.0-32-amd64\n\
             test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
             parsrv-vm: exit stall 0\n\
             parsrv-vm: skip stalled: kernel 5.10 predates x\n\
             parsrv-vm: done failed-binaries=0\n",
        );
        assert!(skipped.passed());
        let empty = outcome("parsrv-vm: kernel 6.1\nparsrv-vm: done failed-binaries=0\n");
        assert!(!empty.passed());
        assert!(empty.ran_nothing() && !skipped.ran_nothing());
    }

    #[test]
    fn panics_refusals_and_unfinished_runs_do_not_pass() {
        let panic = outcome(
            "parsrv-vm: kernel 6.1\n[   12.3] Kernel panic - not syncing: Attempted to kill init!\n",
        );
        assert!(panic
            .panic
            .as_deref()
            .unwrap()
            .contains("Attempted to kill init"));
        assert!(!panic.passed());
        let refused = outcome("parsrv-vm: kernel 6.1\nparsrv-vm: error: no-btf\n");
        assert_eq!(refused.refused, Some(Refusal::NoBtf));
        assert!(refused
            .refused
            .unwrap()
            .explain("6.1")
            .contains("CONFIG_DEBUG_INFO_BTF=y"));
        let unfinished = outcome("parsrv-vm: kernel 6.1\nparsrv-vm: run stall\n");
        assert!(unfinished.booted() && !unfinished.passed());
        assert_eq!(unfinished.last_line, "parsrv-vm: run stall");
    }
}
