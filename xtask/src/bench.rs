//! `cargo xtask bench`: the benchmark harness, on a release build for figures or on the tests'
//! build for a quick check.

use std::process::Command;

use anyhow::{bail, Result};

use crate::{build, fresh, run_step, running_as_root, setup, workspace_root, Profile};

/// Figures come from release builds; a quick run only checks the harness, on the build
/// the tests already made.
pub(crate) fn bench(scenarios: Vec<String>, quick: bool) -> Result<()> {
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
