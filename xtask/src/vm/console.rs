//! Reading a test VM's serial console: the init's `parsrv-vm:` lines, nextest's status
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
    /// Tests passed and failed, from nextest's status lines (a skipped test passes).
    pub passed: u32,
    pub failed: u32,
    /// Between nextest's `Summary` and the next run's `Starting`: the failures listed
    /// again there are not counted twice.
    in_summary: bool,
    /// Names of failed tests.
    pub failures: Vec<String>,
    /// `test: reason` of every skipped test.
    pub skips: Vec<String>,
    /// `test: why` of every test that checks nothing of the kernel, left to the host (it
    /// passes here without running).
    pub host_only: Vec<String>,
    /// `test: figure` of every figure a test recorded (verifier costs, ...).
    pub figures: Vec<String>,
    /// nextest runs (one per profile) that exited non-zero (a crash counts even without a
    /// status line).
    pub failed_binaries: Vec<String>,
    /// The init's last line: how many nextest runs failed.
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
        } else {
            self.nextest_line(line.trim_start());
        }
    }

    /// `PASS [   2.082s] ( 1/17) parsrv-integration-tests::groups some_test`, and the
    /// other final statuses (FAIL, TIMEOUT, SIGSEGV, ...); SLOW and the like are progress.
    fn nextest_line(&mut self, line: &str) {
        if line.starts_with("Starting ") {
            self.in_summary = false;
            return;
        }
        if line.starts_with("Summary [") {
            self.in_summary = true;
            return;
        }
        let Some((status, rest)) = line.split_once(" [") else {
            return;
        };
        // "( 1/17) " precedes the name when nextest runs more than one test.
        let Some((_, test)) = rest.split_once(" parsrv-integration-tests::") else {
            return;
        };
        if self.in_summary {
            return;
        }
        match status.trim() {
            "PASS" | "LEAK" => self.passed += 1,
            "FAIL" | "LEAK-FAIL" | "TIMEOUT" | "ABORT" => {
                self.failed += 1;
                self.failures.push(format!("{test} ({})", status.trim()));
            }
            signal if signal.starts_with("SIG") => {
                self.failed += 1;
                self.failures.push(format!("{test} ({signal})"));
            }
            _ => {}
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
        } else if let Some(test) = said.strip_prefix("host-only ") {
            self.host_only.push(test.to_owned());
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

    /// The integration tests' results from nextest's JUnit files (the native run's row):
    /// a `<testcase>` with a `<failure>` or `<error>` failed, any other passed. A missing
    /// file adds nothing (its run's own failure is reported apart).
    pub fn from_junit(files: &[std::path::PathBuf]) -> Outcome {
        let mut outcome = Outcome::default();
        for file in files {
            let Ok(xml) = std::fs::read_to_string(file) else {
                continue;
            };
            for case in xml.split("<testcase ").skip(1) {
                let attribute = |name: &str| {
                    case.split_once(&format!("{name}=\""))
                        .and_then(|(_, rest)| rest.split_once('"'))
                        .map(|(value, _)| value.to_owned())
                        .unwrap_or_default()
                };
                // The element ends at its own close, or at once when it has no children.
                let head_end = case.find('>').unwrap_or(case.len());
                let body = if case[..head_end].ends_with('/') {
                    ""
                } else {
                    case.split("</testcase>").next().unwrap_or("")
                };
                if body.contains("<failure") || body.contains("<error") {
                    outcome.failed += 1;
                    let binary = attribute("classname");
                    let binary = binary.rsplit("::").next().unwrap_or(&binary);
                    outcome
                        .failures
                        .push(format!("{binary} {}", attribute("name")));
                } else {
                    outcome.passed += 1;
                }
            }
        }
        outcome
    }

    /// Adds what another VM of the same kernel reported (its share of the tests): counts
    /// and lists add up, the run is done once both are, and the first panic or refusal
    /// stays.
    pub fn add(&mut self, other: Outcome) {
        self.release = self.release.take().or(other.release);
        self.passed += other.passed;
        self.failed += other.failed;
        self.failures.extend(other.failures);
        self.skips.extend(other.skips);
        self.host_only.extend(other.host_only);
        self.figures.extend(other.figures);
        self.failed_binaries.extend(other.failed_binaries);
        self.done = self.done.zip(other.done).map(|(a, b)| a + b);
        self.refused = self.refused.take().or(other.refused);
        self.panic = self.panic.take().or(other.panic);
        if self.done.is_none() && !other.last_line.is_empty() {
            self.last_line = other.last_line;
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
    /// What failed, each named, for the run's last line: the failed tests, then what
    /// failed without naming a test (a runner's exit, a benchmark, a panic, no end at all).
    pub fn what_failed(&self) -> Vec<String> {
        let mut what: Vec<String> = self.failures.clone();
        what.extend(self.failed_binaries.iter().cloned());
        if let Some(panic) = &self.panic {
            what.push(format!("panic: {panic}"));
        }
        if what.is_empty() && self.done.is_none() {
            what.push(format!("no end (last line: {})", self.last_line.trim()));
        }
        what
    }

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
    println!("\nIntegration test summary, per kernel (a test skips only for a kernel feature, naming it;");
    println!("one that checks nothing of the kernel runs on the host only):");
    println!(
        "{:<10} {:<26} {:>6} {:>6} {:>7} {:>9} {:>8}  result",
        "kernel", "release", "passed", "failed", "skipped", "host only", "minutes"
    );
    for run in runs {
        let o = &run.outcome;
        println!(
            "{:<10} {:<26} {:>6} {:>6} {:>7} {:>9} {:>8.1}  {}",
            run.label,
            o.release.as_deref().unwrap_or("?"),
            // libtest counts a skipped test, and one left to the host, as passed.
            o.passed
                .saturating_sub(o.skips.len() as u32)
                .saturating_sub(o.host_only.len() as u32),
            o.failed,
            o.skips.len(),
            o.host_only.len(),
            run.took.as_secs_f64() / 60.0,
            if o.passed() { "ok" } else { "FAILED" }
        );
        for skip in &o.skips {
            println!("    skipped {skip}");
        }
        for test in &o.host_only {
            println!("    on the host only {test}");
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
    fn a_clean_run_passes_and_counts_nextest_results() {
        let o = outcome(
            "[    0.000000] Linux version 6.1.0-56-amd64\n\
             parsrv-vm: kernel 6.1.0-56-amd64\r\n\
             parsrv-vm: run parallel\n\
             \x20   Starting 2 tests across 8 binaries\n\
             \x20       PASS [   2.082s] ( 1/2) parsrv-integration-tests::groups check_reports\n\
             \x20       SLOW [> 60.000s] ( 2/2) parsrv-integration-tests::stall stalled\n\
             \x20       PASS [  62.269s] ( 2/2) parsrv-integration-tests::stall stalled\n\
             \x20    Summary [  64.000s] 2 tests run: 2 passed, 0 skipped\n\
             parsrv-vm: exit parallel 0\n\
             \x20   Starting 1 test across 15 binaries\n\
             \x20       PASS [   1.000s] parsrv-integration-tests::lifecycle x\n\
             parsrv-vm: exit serial 0\n\
             parsrv-vm: done failed-binaries=0\n",
        );
        assert_eq!(o.release.as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!((o.passed, o.failed), (3, 0));
        assert!(o.failed_binaries.is_empty());
        assert!(o.passed());
    }

    #[test]
    fn figures_the_tests_recorded_are_collected_for_the_summary() {
        let o = outcome(
            "parsrv-vm: kernel 6.12.48+deb12-amd64\n\
             \x20       PASS [   3.739s] ( 1/1) parsrv-integration-tests::verifier every_program\n\
             parsrv-vm: exit serial 0\n\
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
    fn tests_left_to_the_host_are_listed_apart_from_skips() {
        let o = outcome(
            "parsrv-vm: kernel 6.1.0-57-amd64\n\
             \x20       PASS [   0.100s] ( 1/2) parsrv-integration-tests::suite docs::every_block\n\
             \x20       PASS [   2.000s] ( 2/2) parsrv-integration-tests::suite lifecycle::stops\n\
             parsrv-vm: exit parallel 0\n\
             parsrv-vm: host-only docs::every_block: checks the docs\n\
             parsrv-vm: done failed-binaries=0\n",
        );
        assert_eq!(o.host_only, vec!["docs::every_block: checks the docs"]);
        assert!(o.skips.is_empty());
        assert_eq!(o.passed, 2);
        assert!(o.passed());
    }

    #[test]
    fn failures_time_outs_crashes_and_skips_are_reported_once() {
        let o = outcome(
            "parsrv-vm: kernel 5.10.0-32-amd64\n\
             \x20   Starting 3 tests across 8 binaries\n\
             \x20       FAIL [   1.234s] ( 1/3) parsrv-integration-tests::when_full when_full_drop\n\
             \x20    TIMEOUT [ 300.001s] ( 2/3) parsrv-integration-tests::scaling resize\n\
             \x20    SIGSEGV [   0.100s] ( 3/3) parsrv-integration-tests::policy redirect\n\
             \x20    Summary [ 301.000s] 3 tests run: 0 passed, 3 failed, 0 skipped\n\
             \x20       FAIL [   1.234s] ( 1/3) parsrv-integration-tests::when_full when_full_drop\n\
             parsrv-vm: exit parallel 100\n\
             parsrv-vm: skip redirect_keeps: kernel 5.10.0-32-amd64 predates the bpf_loop helper (Linux 5.17+)\n\
             parsrv-vm: done failed-binaries=1\n",
        );
        assert_eq!(
            o.failures,
            vec![
                "when_full when_full_drop (FAIL)",
                "scaling resize (TIMEOUT)",
                "policy redirect (SIGSEGV)"
            ]
        );
        assert_eq!(o.failed, 3);
        assert_eq!(o.failed_binaries, vec!["parallel (exit 100)"]);
        assert_eq!(o.skips.len(), 1);
        assert!(!o.passed());
        // The run's last line names them all.
        assert_eq!(
            o.what_failed(),
            vec![
                "when_full when_full_drop (FAIL)",
                "scaling resize (TIMEOUT)",
                "policy redirect (SIGSEGV)",
                "parallel (exit 100)"
            ]
        );
    }

    #[test]
    fn a_run_that_only_skips_passes_but_an_empty_one_does_not() {
        let skipped = outcome(
            "parsrv-vm: kernel 5.10.0-32-amd64\n\
             \x20       PASS [   0.010s] ( 1/1) parsrv-integration-tests::stall stalled\n\
             parsrv-vm: exit serial 0\n\
             parsrv-vm: skip stalled: kernel 5.10 predates x\n\
             parsrv-vm: done failed-binaries=0\n",
        );
        assert!(skipped.passed());
        let empty = outcome("parsrv-vm: kernel 6.1\nparsrv-vm: done failed-binaries=0\n");
        assert!(!empty.passed());
        assert!(empty.ran_nothing() && !skipped.ran_nothing());
    }

    #[test]
    fn junit_results_count_passes_and_name_failures() {
        let dir = std::env::temp_dir().join(format!("xtask-junit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("junit.xml");
        std::fs::write(
            &file,
            r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="nextest-run" tests="3" failures="1" errors="0">
<testsuite name="parsrv-integration-tests::stall" tests="2">
<testcase name="a_stall" classname="parsrv-integration-tests::stall" timestamp="x" time="1.0">
</testcase>
<testcase name="b_stall" classname="parsrv-integration-tests::stall" time="1.0"><failure type="test failure">boom</failure>
<system-out>a "quoted" thing</system-out></testcase>
<testcase name="c" classname="parsrv-integration-tests::policy" time="0.1"/>
</testsuite></testsuites>"#,
        )
        .unwrap();
        let o = Outcome::from_junit(&[file.clone(), dir.join("missing.xml")]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((o.passed, o.failed), (2, 1));
        assert_eq!(o.failures, vec!["stall b_stall"]);
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
