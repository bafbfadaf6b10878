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

/// What a privileged test needs of the machine it runs on, stated by the test itself.
#[derive(Clone, Debug, Default)]
pub struct Needs {
    kernel: Vec<Feature>,
    python: bool,
    network_tools: bool,
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
            python: false,
            network_tools: false,
        }
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
    let probed = parsrv::features::KernelFeatures::probe();
    let missing: Vec<Feature> = features
        .iter()
        .copied()
        .filter(|&f| !probed.has(f))
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
