//! What a test needs (root, kernel features, Python) and what happens when it is missing:
//! [`privileged`] runs the test, skips it, or fails it.

use std::{
    fs,
    io::{self, Write},
    thread,
};

use crate::*;

/// Where skipped tests are listed, one `test: reason` line each (set by `cargo xtask test`,
/// which prints them in its summary).
pub const SKIPS_ENV: &str = "PARSRV_TEST_SKIPS";

/// Where a run that leaves the host-only tests to the host (a VM's) lists them, one `test:
/// why` line each; set only there (by the VMs' init), so a test runs wherever it is unset.
pub const HOST_ONLY_ENV: &str = "PARSRV_TEST_HOST_ONLY";

/// What a privileged test needs of the machine it runs on, stated by the test itself.
#[derive(Clone, Debug, Default)]
pub struct Needs {
    kernel: Vec<Feature>,
    python: bool,
    network_tools: bool,
    host_only: Option<&'static str>,
}

impl Needs {
    /// Root only (every privileged test needs it for its namespaces).
    pub fn nothing() -> Needs {
        Needs::default()
    }

    /// What running parsrv's program needs of the kernel: the list `parsrv run` checks
    /// ([`parsrv::dataplane::Program::requires`]).
    pub fn program() -> Needs {
        Needs {
            kernel: parsrv::dataplane::Program::ReuseportSelect
                .requires()
                .to_vec(),
            ..Needs::default()
        }
    }

    /// What running `program` needs of the kernel ([`parsrv::dataplane::Program::requires`]).
    pub fn program_of(program: parsrv::dataplane::Program) -> Needs {
        Needs {
            kernel: program.requires().to_vec(),
            ..Needs::default()
        }
    }

    /// What running `program` needs too.
    pub fn and_program(mut self, program: parsrv::dataplane::Program) -> Needs {
        for feature in program.requires() {
            if !self.kernel.contains(feature) {
                self.kernel.push(*feature);
            }
        }
        self
    }

    /// One kernel feature more.
    pub fn and(mut self, feature: Feature) -> Needs {
        self.kernel.push(feature);
        self
    }

    /// Python with the test servers (gunicorn, uvicorn, prometheus_client) that `cargo
    /// xtask test` installs in [`pyenv`] (the VMs run the host's).
    pub fn and_python(mut self) -> Needs {
        self.python = true;
        self
    }

    /// The test checks nothing that depends on the kernel (the docs' text, a unit file's
    /// syntax): the VMs, which exist to run the suite on other kernels, leave it to the host
    /// and list it with `why` in their summary (not as a skip: it did run, once, natively).
    pub fn host_only(mut self, why: &'static str) -> Needs {
        self.host_only = Some(why);
        self
    }

    /// What the cluster tests build hosts and routers with: iproute2 (netns, veth,
    /// bridge), util-linux's nsenter and BIRD (`cargo xtask setup` installs it; the VMs run
    /// the host's).
    pub fn and_network_tools(mut self) -> Needs {
        self.network_tools = true;
        self
    }
}

/// Runs a privileged test, inside [`isolated`], if the machine has what it `needs`. What
/// it lacks either skips the test (a kernel older than the release that brought a
/// feature, recorded by [`skip`]), or fails it (a kernel new enough that lacks a feature,
/// a tool or a Python environment the set-up should have installed): a skip is only ever
/// for the kernel.
pub fn privileged(needs: Needs, test: impl FnOnce() + Send + 'static) {
    if let Some(why) = needs.host_only {
        if std::env::var_os(HOST_ONLY_ENV).is_some() {
            report("host only", HOST_ONLY_ENV, why);
            return;
        }
    }
    if !kernel_has(&needs.kernel) {
        return;
    }
    if needs.python {
        let python = pyenv().join("bin/python3");
        assert!(
            python.exists(),
            "needs {}: run `cargo xtask setup`",
            python.display()
        );
    }
    if needs.network_tools {
        for tool in ["ip", "nsenter", "bird", "birdc"] {
            assert!(
                std::process::Command::new(tool).arg("-h").output().is_ok(),
                "needs {tool}: run `cargo xtask setup` (apt packages iproute2, util-linux, bird2)"
            );
        }
    }
    isolated(test)
}

/// Whether the running kernel has `features`; call it first, and return when it says no.
///
/// A kernel older than the release that introduced a missing feature skips the test: this
/// records why and returns false. A kernel that is new enough and still lacks one fails the
/// test: that is a kernel built without the feature or a broken probe, not a reason to skip.
pub fn kernel_has(features: &[Feature]) -> bool {
    let probed = KernelProbe::of_this_run();
    let missing: Vec<Feature> = features
        .iter()
        .copied()
        .filter(|f| !probed.present.contains(f))
        .collect();
    let Some(&first) = missing.first() else {
        return true;
    };
    let version = probed
        .version
        .unwrap_or_else(|| panic!("cannot parse kernel release {}", probed.release));
    for &feature in &missing {
        assert!(
            version < feature.since(),
            "kernel {} should have {} (Linux {}+) but the probe found none",
            probed.release,
            feature.name(),
            feature.since()
        );
    }
    skip(&format!(
        "kernel {} predates {} (Linux {}+)",
        probed.release,
        first.name(),
        first.since()
    ));
    false
}

/// Where the first test of a run keeps what it probed of the kernel, for the others (set
/// by `cargo xtask test`, natively and in each VM; removed before every run).
pub const KERNEL_PROBE_ENV: &str = "PARSRV_TEST_KERNEL_PROBE";

/// What [`kernel_has`] needs of [`parsrv::features::KernelFeatures`].
struct KernelProbe {
    release: String,
    version: Option<parsrv::features::KernelVersion>,
    present: Vec<Feature>,
}

impl KernelProbe {
    /// Probed once per run: the probe parses the kernel's BTF, which takes about a second
    /// per test under emulation, and a kernel does not change during a run. Without
    /// `$PARSRV_TEST_KERNEL_PROBE` (a test run by hand), every test probes.
    fn of_this_run() -> KernelProbe {
        let kept = std::env::var_os(KERNEL_PROBE_ENV).map(std::path::PathBuf::from);
        if let Some(probe) = kept
            .as_deref()
            .and_then(|path| fs::read_to_string(path).ok())
            .and_then(|text| KernelProbe::parse(&text))
        {
            return probe;
        }
        let probed = parsrv::features::KernelFeatures::probe();
        let probe = KernelProbe {
            present: Feature::ALL
                .iter()
                .copied()
                .filter(|&f| probed.has(f))
                .collect(),
            version: probed.version,
            release: probed.release,
        };
        if let Some(path) = kept {
            // Parallel tests may probe at once: each writes whole (the same text) by rename.
            let staging = path.with_extension(format!("{}", std::process::id()));
            fs::write(&staging, probe.text()).expect("writing the kernel probe");
            fs::rename(&staging, &path).expect("writing the kernel probe");
        }
        probe
    }

    /// `release` on the first line, then the present features (their Rust names).
    fn text(&self) -> String {
        let mut text = format!("{}\n", self.release);
        for feature in &self.present {
            text.push_str(&format!("{feature:?}\n"));
        }
        text
    }

    fn parse(text: &str) -> Option<KernelProbe> {
        let mut lines = text.lines();
        let release = lines.next()?.to_owned();
        // Another kernel's probe (a stale file) is no answer for this one.
        if release != parsrv::features::kernel_release() {
            return None;
        }
        let present = lines
            .map(|name| {
                Feature::ALL
                    .iter()
                    .copied()
                    .find(|f| format!("{f:?}") == name)
            })
            .collect::<Option<Vec<_>>>()?;
        Some(KernelProbe {
            version: parsrv::features::KernelVersion::parse(&release),
            release,
            present,
        })
    }
}

/// Records that the calling test skips its checks, and why (printed, and listed in
/// `$PARSRV_TEST_SKIPS` for the summary). The test then returns.
pub fn skip(reason: &str) {
    report("skipped", SKIPS_ENV, reason);
}

/// Where [`figure`] lists what tests measured, for the run's summary.
pub const FIGURES_ENV: &str = "PARSRV_TEST_FIGURES";

/// Records a figure the calling test measured (printed, and listed in `$PARSRV_TEST_FIGURES`,
/// which `cargo xtask test` prints after the run, natively and for each VM), so that CI's
/// log shows how far each limit is, run after run, and not only when a test fails.
pub fn figure(line: &str) {
    report("figure", FIGURES_ENV, line);
}

/// Prints `what TEST: line` and appends `TEST: line` to the file `list_env` names, if any.
fn report(what: &str, list_env: &str, line: &str) {
    let test = thread::current().name().unwrap_or("?").to_owned();
    eprintln!("{what} {test}: {line}");
    if let Some(path) = std::env::var_os(list_env) {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.to_string_lossy()));
        writeln!(file, "{test}: {line}").expect("writing the list");
    }
}

/// Drops a capability from the bounding set: the exec'd program then lacks it even as root.
pub fn drop_capability(cap: libc::c_int) -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What `parsrv kernel --json` said (the parts the tests and the benchmark report read).
#[derive(Debug)]
pub struct KernelReport {
    pub code: i32,
    /// `uname -r (uname -v)` as parsrv reports it.
    pub build: String,
    /// What the verifier spent on each program, or why it was not loaded.
    pub programs: Vec<parsrv::dataplane::verification::ProgramReport>,
    pub stderr: String,
}

/// Runs `parsrv kernel --json` with `envs`; panics unless it prints the report.
pub fn kernel_report(envs: &[(&str, &std::path::Path)]) -> KernelReport {
    let out = std::process::Command::new(parsrv_bin())
        .args(["kernel", "--json"])
        .envs(envs.iter().copied())
        .output()
        .expect("running parsrv kernel --json");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("parsrv kernel --json ({e}):\n{stdout}"));
    KernelReport {
        code: out.status.code().unwrap_or(-1),
        build: report["build"].as_str().unwrap_or_default().to_owned(),
        programs: serde_json::from_value(report["programs"].clone())
            .unwrap_or_else(|e| panic!("the programs' report ({e}):\n{stdout}")),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
