//! parsrv built in a cargo [`Profile`] (its build.rs builds the eBPF objects with their own
//! nightly and embeds them), and the eBPF crate's own cargo for its lint.

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::{run_step, setup, workspace_root};

/// The eBPF crate's cargo (for its fmt and clippy): its own nightly, its own workspace,
/// without the variables the cargo running xtask set (they would point it at stable).
pub(crate) fn ebpf_cargo() -> Command {
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

pub(crate) const EBPF_TARGET_ARGS: [&str; 4] =
    ["--target", "bpfel-unknown-none", "-Z", "build-std=core"];

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

/// parsrv in `profile`, after installing what its build.rs needs for the eBPF programs (the
/// pinned nightly, bpf-linker): a plain `cargo build`, as a user without xtask runs it.
pub(crate) fn build(profile: Profile) -> Result<()> {
    setup::ensure_all()?;
    run_step(
        &format!("building parsrv and its eBPF programs ({profile:?})"),
        Command::new(env!("CARGO"))
            .args(["build", "--package", "parsrv"])
            .args(profile.cargo_args())
            .current_dir(workspace_root()),
    )
}
