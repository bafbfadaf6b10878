//! Building the eBPF objects (their own nightly and workspace), and parsrv with them embedded
//! in a cargo [`Profile`].

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::{run_step, setup, workspace_root};

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
    let objects = [
        "parsrv",
        "address-lookup",
        "cluster-dispatch",
        "reuseport-audit",
    ];
    for built in objects.map(|o| object.with_file_name(o)) {
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

/// The eBPF crate's cargo: its own nightly, its own workspace, without the variables the
/// cargo running xtask set (they would point it at stable).
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
