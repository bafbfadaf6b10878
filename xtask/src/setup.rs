//! Installs what the eBPF build needs, idempotently: each step first checks whether it is
//! already done (a few milliseconds) and only then installs. Versions are pinned here; see
//! ../shared/TOOLCHAIN.md for why these combinations.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::run_step;

/// The nightly the eBPF crate builds with. It must carry the same LLVM major as bpf-linker
/// (22): later nightlies moved to LLVM 23. parsrv-ebpf/rust-toolchain.toml names it too (a test
/// checks that they agree): parsrv's build.rs builds with that one.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";
/// rust-src for -Z build-std; clippy and rustfmt for `cargo xtask lint`.
const EBPF_COMPONENTS: [&str; 3] = ["rust-src", "clippy", "rustfmt"];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// bpf-linker's feature for Debian's LLVM.
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Debian packages: what bpf-linker links against (LLVM 22), wrk (a third-party load
/// generator the benchmarks confirm their figures with), BIRD (the routing daemon the
/// cluster tests announce the service address with) and strace (whose fault injection kills
/// a spawner at one system call in the fault tests), and dnsperf (a real DNS load tool, in
/// the UDP tests; Unbound, the DNS server they run, is unpacked, not installed:
/// [`ensure_unbound`]).
const APT_PACKAGES: [&str; 10] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "wrk",
    "bird2",
    "strace",
    "dnsperf",
    // The completion scripts' tests load them in each shell parsrv ships one for (bash is
    // there already).
    "zsh",
    "fish",
];

/// What `cargo xtask test --vm` needs besides the build: qemu (TCG is enough), a static
/// busybox for the VM's shell and the commands some tests run as handlers (sh, sleep), and
/// the keys apt checks Debian's kernel packages with (present on Debian, not on Ubuntu).
const VM_APT_PACKAGES: [&str; 5] = [
    "qemu-system-x86",
    "busybox-static",
    "debian-archive-keyring",
    // depmod and modprobe for the Debian kernels' modules (9p, veth, bridge, ...).
    "kmod",
    "xz-utils",
];

/// What the benchmarks compare parsrv with, from Debian: HAProxy (the `affinity` scenario's
/// `balance source`).
const BENCH_APT_PACKAGES: [&str; 1] = ["haproxy"];

pub fn ensure_bench_packages() -> Result<()> {
    ensure_apt_packages(&BENCH_APT_PACKAGES, "HAProxy for the benchmarks")
}

pub fn ensure_all() -> Result<()> {
    ensure_apt_packages(&APT_PACKAGES, "LLVM 22 for bpf-linker, test tools")?;
    ensure_unbound()?;
    ensure_ebpf_toolchain()?;
    ensure_bpf_linker()
}

/// Where [`ensure_unbound`] unpacks Unbound (the tests' `dns::unbound` finds it there).
fn unbound_dir() -> std::path::PathBuf {
    crate::workspace_root().join("target/test-tools/unbound")
}

/// Debian's Unbound for the UDP tests, unpacked into [`unbound_dir`] with the libraries it
/// links against installed, not the package itself: installing it would start a system
/// resolver on 127.0.0.1:53 on a machine with systemd, and enable it at every boot. The
/// tests run the binary with configurations of their own.
fn ensure_unbound() -> Result<()> {
    let dir = unbound_dir();
    let stamp = dir.join("parsrv-unpacked");
    if stamp.exists() && dir.join("usr/sbin/unbound").exists() {
        return Ok(());
    }
    if !crate::running_as_root() {
        bail!("setup unpacks Debian's unbound for the UDP tests: run it as root");
    }
    let download = dir.with_file_name("unbound-download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)?;
    run_step(
        "setup: apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
    )?;
    run_step(
        "setup: apt-get download unbound",
        Command::new("apt-get")
            // Into a directory of root's: apt's download user could not write there.
            .args([
                "download",
                "-qq",
                "-o",
                "APT::Sandbox::User=root",
                "unbound",
            ])
            .current_dir(&download),
    )?;
    let deb = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download unbound left no .deb")?;
    let depends = Command::new("dpkg-deb")
        .arg("-f")
        .arg(&deb)
        .arg("Depends")
        .output()
        .context("dpkg-deb -f")?;
    let libraries = shared_libraries(&String::from_utf8_lossy(&depends.stdout));
    let libraries: Vec<&str> = libraries.iter().map(String::as_str).collect();
    ensure_apt_packages_named(&libraries, "the libraries Unbound links against")?;
    let _ = std::fs::remove_dir_all(&dir);
    run_step(
        "setup: dpkg-deb -x unbound",
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir),
    )?;
    std::fs::write(&stamp, deb.file_name().unwrap().as_encoded_bytes())?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(())
}

/// The shared libraries of a package's `Depends` field: the first alternative of each entry
/// whose name starts with `lib`, without its version (the others, such as adduser, are for
/// the package's scripts, which an unpacked copy does not run).
fn shared_libraries(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|entry| {
            let first = entry.split('|').next()?.trim();
            let name = first.split([' ', '(', ':']).next()?.trim();
            name.starts_with("lib").then(|| name.to_owned())
        })
        .collect()
}

/// cargo-nextest runs the integration tests (profiles in .config/nextest.toml, whose
/// `default-filter` needs 0.9.74 or newer). The machines this project runs on carry it;
/// elsewhere it is installed once.
pub fn ensure_nextest() -> Result<()> {
    let version = Command::new(env!("CARGO"))
        .args(["nextest", "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let word = text.split_whitespace().nth(1)?.to_owned();
            let mut parts = word.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next()??, parts.next()??))
        });
    if version.is_some_and(|v| v >= (0, 9, 74)) {
        return Ok(());
    }
    run_step(
        "setup: cargo install cargo-nextest",
        Command::new(env!("CARGO")).args(["install", "cargo-nextest", "--locked"]),
    )
}

/// The virtualenv with the third-party servers the integration tests run as handlers.
pub fn pyenv() -> std::path::PathBuf {
    crate::workspace_root().join("target/pyenv")
}

/// Installs tests/apps/requirements.txt (pinned) into [`pyenv`], unless the same file was
/// installed there already.
pub fn ensure_python_servers() -> Result<()> {
    let requirements = crate::workspace_root().join("tests/apps/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    // The system's python3 where there is one, not the first on PATH: the servers run as
    // handlers under --user too (the README's example, run by the docs test), and a dynamic
    // user cannot execute an interpreter under root's home (pyenv's, 0700), which the
    // virtualenv's python3 would point to.
    let python = ["/usr/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("python3");
    if python == "/usr/bin/python3" {
        ensure_apt_packages(&["python3-venv"], "the venv module of Debian's python3")?;
    }
    let wanted = format!("{wanted}# interpreter: {python}\n");
    let stamp = pyenv().join("parsrv-requirements.txt");
    if std::fs::read_to_string(&stamp).is_ok_and(|done| done == wanted) {
        return Ok(());
    }
    eprintln!(
        "xtask setup: installing the test servers (gunicorn, uvicorn) into {} ({python})",
        pyenv().display()
    );
    run_step(
        "setup: python3 -m venv (test servers)",
        Command::new(python)
            .args(["-m", "venv", "--clear"])
            .arg(pyenv()),
    )?;
    run_step(
        "setup: pip install -r tests/apps/requirements.txt",
        Command::new(pyenv().join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&requirements),
    )?;
    std::fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))
}

/// The packages the VM tests need (see [`VM_APT_PACKAGES`]).
pub fn ensure_vm_packages() -> Result<()> {
    ensure_apt_packages(&VM_APT_PACKAGES, "qemu, busybox and kmod for the VM tests")
}

/// What `cargo xtask package --test` needs: debootstrap, for a clean Debian root.
pub fn ensure_package_test_packages() -> Result<()> {
    ensure_apt_packages(&["debootstrap"], "debootstrap for the package test")
}

fn ensure_apt_packages(packages: &[&'static str], purpose: &str) -> Result<()> {
    ensure_apt_packages_named(packages, purpose)
}

fn ensure_apt_packages_named(packages: &[&str], purpose: &str) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !apt_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask setup: installing {}", missing.join(" "));
    if !crate::running_as_root() {
        bail!(
            "setup needs the apt packages {}: install them as root (apt-get install -y {0})",
            missing.join(" ")
        );
    }
    run_step(
        "setup: apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
    )?;
    run_step(
        &format!("setup: apt-get install ({purpose})"),
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn apt_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

fn ensure_ebpf_toolchain() -> Result<()> {
    let installed = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ])
        .output()
        .context("setup: rustup is not on PATH (install it from rustup.rs)")?;
    let components = String::from_utf8_lossy(&installed.stdout);
    let has = |name: &str| components.lines().any(|c| c.starts_with(name));
    if installed.status.success() && EBPF_COMPONENTS.iter().all(|c| has(c)) {
        return Ok(());
    }
    eprintln!(
        "xtask setup: installing Rust {EBPF_TOOLCHAIN} with {} (for the eBPF crate)",
        EBPF_COMPONENTS.join(", ")
    );
    run_step(
        "setup: rustup toolchain install (the eBPF crate's nightly)",
        Command::new("rustup")
            .args([
                "toolchain",
                "install",
                EBPF_TOOLCHAIN,
                "--profile",
                "minimal",
            ])
            .args(EBPF_COMPONENTS.iter().flat_map(|c| ["--component", c])),
    )
}

/// bpf-linker as cargo recorded installing it: version and features.
fn bpf_linker_installed() -> Option<(String, Vec<String>, bool)> {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo")))?;
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join(".crates2.json")).ok()?).ok()?;
    let (key, info) = record["installs"]
        .as_object()?
        .iter()
        .find(|(key, _)| key.starts_with("bpf-linker "))?;
    let version = key.split_whitespace().nth(1)?.to_owned();
    let features = info["features"]
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str().map(str::to_owned))
        .collect();
    let no_default = info["no_default_features"].as_bool().unwrap_or(false);
    Some((version, features, no_default))
}

fn ensure_bpf_linker() -> Result<()> {
    let runs = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if let Some((version, features, no_default)) = bpf_linker_installed() {
        if runs
            && version == BPF_LINKER_VERSION
            && no_default
            && features.iter().any(|f| f == BPF_LINKER_LLVM_FEATURE)
        {
            return Ok(());
        }
    }
    eprintln!(
        "xtask setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)"
    );
    run_step(
        "setup: cargo install bpf-linker (against Debian's LLVM 22)",
        Command::new(env!("CARGO"))
            .args(["install", "bpf-linker", "--locked", "--force"])
            .args(["--version", BPF_LINKER_VERSION])
            .args([
                "--no-default-features",
                "--features",
                BPF_LINKER_LLVM_FEATURE,
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )?;
    let runs = Command::new("bpf-linker").arg("--version").output();
    match runs {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!(
            "setup: bpf-linker was installed but does not run from PATH: add \
             ~/.cargo/bin to PATH"
        ),
    }
}

#[cfg(test)]
mod tests {
    /// The nightly set-up installs is the one parsrv's build.rs builds the programs with
    /// (it reads the channel from parsrv-ebpf/rust-toolchain.toml).
    #[test]
    fn the_installed_nightly_is_the_ebpf_crates_pinned_one() {
        let file = crate::workspace_root().join("parsrv-ebpf/rust-toolchain.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let pinned = format!("channel = \"{}\"", super::EBPF_TOOLCHAIN);
        assert!(
            text.lines().any(|l| l.trim() == pinned),
            "{} does not say {pinned}",
            file.display()
        );
    }

    /// Unbound 1.17's Depends field in Debian 12: the libraries, and nothing for the
    /// package's own scripts.
    #[test]
    fn unbounds_libraries_are_read_off_its_depends_field() {
        let depends = "adduser, lsb-base (>= 3.0-6), libc6 (>= 2.36), libevent-2.1-7 (>= \
                       2.1.8-stable), libnghttp2-14 (>= 1.3.0), libprotobuf-c1 (>= 1.0.1), \
                       libpython3.11 (>= 3.11.0), libssl3 (>= 3.0.0), libsystemd0, \
                       libfoo1 | libbar1";
        assert_eq!(
            super::shared_libraries(depends),
            [
                "libc6",
                "libevent-2.1-7",
                "libnghttp2-14",
                "libprotobuf-c1",
                "libpython3.11",
                "libssl3",
                "libsystemd0",
                "libfoo1"
            ]
        );
    }
}
