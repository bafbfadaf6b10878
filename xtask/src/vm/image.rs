//! What a test VM boots: a small newc initramfs (a static busybox, the kernel's 9p modules
//! and the first stage of our init, stage1.sh) that mounts the host's root file system
//! read-only over 9p and runs the second stage (init.sh) there. The tests then run with the
//! host's own build (target/checked: parsrv, its example handlers, the test binary) and the
//! host's tools (cargo-nextest, iproute2, BIRD, Python, systemd-analyze), as virtme-ng
//! does: a test runs in a VM exactly as it runs natively, or skips for a kernel feature.

use std::{
    fs,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use cpio::{newc, NewcBuilder};

use super::kernel::{self, Kernel};
use crate::workspace_root;

const STAGE1: &str = include_str!("stage1.sh");
const STAGE2: &str = include_str!("init.sh");
/// The first stage's shell, mount, insmod and switch_root, and the second stage's
/// poweroff. The busybox-static package's binary needs no library.
const BUSYBOX: &str = "/bin/busybox";
/// What a 9p root over virtio needs; modprobe adds their dependencies (netfs, fscache,
/// virtio_ring, ...) and skips what a kernel has built in.
const ROOT_MODULES: [&str; 3] = ["9pnet_virtio", "9p", "virtio_pci"];

/// Where the VM's nextest finds the host's build: nextest's own "reuse build" metadata,
/// under target/vm/nextest.
pub fn nextest_metadata() -> PathBuf {
    workspace_root().join("target/vm/nextest")
}

/// Builds what the VMs run and writes nextest's metadata of it, so that nextest in the VM
/// runs it without cargo. The tests' one build ([`crate::Profile::Checked`], optimized):
/// under emulation a debug parsrv (and the debug test binary beside it) was slow enough that
/// a spawner under load missed the tests' 30 s start deadline and a cluster agent its 20 s
/// one, and one VM took over 25 minutes.
pub fn build() -> Result<()> {
    let profile = crate::Profile::Checked;
    crate::build(profile)?;
    let root = workspace_root();
    let cargo = env!("CARGO");
    // Each package's own command, as CI's build (`ci::native_build`), so they share it.
    for package in ["parsrv", "parsrv-integration-tests"] {
        crate::run_step(
            &format!("building {package}'s examples (for the VMs)"),
            Command::new(cargo)
                .args(["build", "--package", package, "--examples"])
                .args(profile.cargo_args())
                .current_dir(&root),
        )?;
    }
    let meta = nextest_metadata();
    fs::create_dir_all(&meta)?;
    crate::setup::ensure_nextest()?;
    for (file, args) in [
        (
            "binaries.json",
            &[
                "nextest",
                "list",
                "--cargo-profile",
                "checked",
                "--package",
                "parsrv-integration-tests",
                "--list-type",
                "binaries-only",
                "--message-format",
                "json",
            ][..],
        ),
        (
            "cargo.json",
            &[
                "metadata",
                "--format-version",
                "1",
                "--all-features",
                "--no-deps",
            ][..],
        ),
    ] {
        let output = Command::new(cargo)
            .args(args)
            .current_dir(&root)
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running cargo {}", args.join(" ")))?;
        if !output.status.success() {
            bail!("cargo {} failed; see above", args.join(" "));
        }
        fs::write(meta.join(file), output.stdout)?;
    }
    Ok(())
}

/// Writes the initramfs for `kernel` to `out` (through a temporary file, renamed when
/// complete).
pub fn write_initramfs(kernel: &Kernel, out: &Path) -> Result<()> {
    if !Path::new(BUSYBOX).is_file() {
        return Err(crate::Fatal::error(
            crate::EXIT_BAD_INPUT,
            format!(
                "{BUSYBOX} is missing, and the VM's first stage is busybox: apt-get install \
                 busybox-static (`cargo xtask setup` does as root)"
            ),
        ));
    }
    let modules = match &kernel.modules {
        Some(root) => root_modules(root)?,
        None => Vec::new(),
    };
    fs::create_dir_all(out.parent().unwrap())?;
    let partial = out.with_extension("partial");
    let mut archive = Archive {
        out: BufWriter::new(fs::File::create(&partial)?),
        inode: 1,
    };
    for dir in ["bin", "dev", "proc", "newroot", "modules"] {
        archive.dir(dir)?;
    }
    archive.file("init", STAGE1.as_bytes(), 0o755)?;
    archive.file("init.sh", STAGE2.as_bytes(), 0o755)?;
    archive.file("bin/busybox", &fs::read(BUSYBOX)?, 0o755)?;
    let mut order = String::new();
    for (name, data) in &modules {
        archive.file(&format!("modules/{name}"), data, 0o644)?;
        order.push_str(name);
        order.push('\n');
    }
    archive.file("modules/order", order.as_bytes(), 0o644)?;
    let mut out_file = newc::trailer(archive.out)?;
    out_file.flush()?;
    out_file
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    fs::rename(&partial, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// The modules a 9p root needs, in load order, as (file name, uncompressed contents):
/// busybox's insmod takes a .ko.xz only after a failed attempt that the kernel logs, so
/// they are decompressed here.
fn root_modules(root: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let version = kernel::module_version(root)?;
    let mut modules = Vec::new();
    for module in ROOT_MODULES {
        let output = Command::new("modprobe")
            .arg("-d")
            .arg(root)
            .args(["-S", &version, "--show-depends", module])
            .output()
            .context("running modprobe (apt-get install kmod; `cargo xtask setup` does)")?;
        if !output.status.success() {
            bail!(
                "modprobe --show-depends {module} for {}: {}",
                root.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        // "insmod /path/x.ko[.xz] [options]" per module to load, "builtin x" for the rest.
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let Some(path) = line
                .strip_prefix("insmod ")
                .and_then(|l| l.split(' ').next())
            else {
                continue;
            };
            let path = PathBuf::from(path);
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let (name, data) = match file.strip_suffix(".xz") {
                Some(name) => {
                    let out = Command::new("xz")
                        .arg("-dc")
                        .arg(&path)
                        .output()
                        .context("running xz (apt-get install xz-utils)")?;
                    if !out.status.success() {
                        bail!("xz -dc {} failed", path.display());
                    }
                    (name.to_owned(), out.stdout)
                }
                None => (
                    file.clone(),
                    fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
                ),
            };
            if !modules.iter().any(|(n, _)| *n == name) {
                modules.push((name, data));
            }
        }
    }
    Ok(modules)
}

struct Archive {
    out: BufWriter<fs::File>,
    inode: u32,
}

impl Archive {
    fn entry(&mut self, name: &str, mode: u32) -> NewcBuilder {
        self.inode += 1;
        NewcBuilder::new(name).ino(self.inode).mode(mode).nlink(1)
    }

    fn dir(&mut self, name: &str) -> Result<()> {
        let builder = self.entry(name, 0o040_755).nlink(2);
        let writer = builder.write(&mut self.out, 0);
        writer.finish()?;
        Ok(())
    }

    fn file(&mut self, name: &str, data: &[u8], permissions: u32) -> Result<()> {
        let builder = self.entry(name, 0o100_000 | permissions);
        let size = u32::try_from(data.len()).context("a file over 4 GiB")?;
        let mut writer = builder.write(&mut self.out, size);
        writer.write_all(data)?;
        writer.finish()?;
        Ok(())
    }
}
