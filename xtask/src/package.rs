//! `cargo xtask package`: a release build of parsrv laid out as a Debian system has it, then a
//! `.deb` of that tree (dpkg-deb, with the maintainer scripts in `dist/debian/`) and a
//! tarball of the same files with their checksums, both under `target/package/`.
//!
//! dpkg-deb rather than cargo-deb: what the package needs beyond files is its maintainer
//! scripts, and those must upgrade a running service with `parsrv upgrade` (the spawner
//! re-executes the new binary, handlers and connections untouched), which is exactly what
//! cargo-deb's generated systemd scripts do not do (they restart the unit).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{build, run_step, workspace_root, Profile};

/// Where each file of the package goes, from the staged tree's root.
const SBIN: &str = "usr/sbin/parsrv";
const UNIT: &str = "usr/lib/systemd/system/parsrv.service";
const CONFIG: &str = "etc/parsrv/parsrv.toml";
const MAN: &str = "usr/share/man/man8";
const BASH: &str = "usr/share/bash-completion/completions/parsrv";
const ZSH: &str = "usr/share/zsh/vendor-completions/_parsrv";
const FISH: &str = "usr/share/fish/vendor_completions.d/parsrv.fish";
const DOC: &str = "usr/share/doc/parsrv";

pub fn package(test: bool) -> Result<()> {
    build(Profile::Release)?;
    let root = workspace_root();
    let version = version(&root)?;
    let out = root.join("target/package");
    let name = format!("parsrv_{version}_amd64");
    let tree = out.join(&name);
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    stage(&root, &tree)?;
    let control = tree.join("DEBIAN");
    fs::create_dir_all(&control)?;
    let binary = tree.join(SBIN);
    fs::write(
        control.join("control"),
        control_file(&version, &libc_needed(&binary)?, installed_kib(&tree)?),
    )?;
    fs::write(control.join("conffiles"), format!("/{CONFIG}\n"))?;
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &root.join("dist/debian").join(script),
            &control.join(script),
            0o755,
        )?;
    }
    let deb = out.join(format!("{name}.deb"));
    run_step(
        "building the Debian package (dpkg-deb)",
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&tree)
            .arg(&deb),
    )?;
    let tarball = out.join(format!("parsrv-{version}-x86_64-linux.tar.gz"));
    write_tarball(&tree, &version, &tarball)?;
    println!("{}\n{}", deb.display(), tarball.display());
    if test {
        test_install(&root, &out, &tree, &version, &deb)?;
    }
    Ok(())
}

/// The `package::` integration test, given this package, a next one (the same files as
/// version VERSION+next1, which dpkg orders after it) and a clean Debian 12 root.
fn test_install(root: &Path, out: &Path, tree: &Path, version: &str, deb: &Path) -> Result<()> {
    crate::setup::ensure_package_test_packages()?;
    // A standard system's tools besides minbase: man, systemd, and procps (priority
    // important: on every installed Debian, not in minbase).
    let debian = out.join("debian-12");
    if !["usr/bin/man", "usr/bin/systemd-analyze", "usr/bin/kill"]
        .iter()
        .all(|tool| debian.join(tool).exists())
    {
        let _ = fs::remove_dir_all(&debian);
        run_step(
            "making a clean Debian 12 root (debootstrap, once)",
            Command::new("debootstrap")
                .args([
                    "--variant=minbase",
                    "--include=man-db,systemd,procps",
                    "bookworm",
                ])
                .arg(&debian)
                .arg("http://deb.debian.org/debian"),
        )?;
    }
    let next_tree = out.join("parsrv_next");
    if next_tree.exists() {
        fs::remove_dir_all(&next_tree)?;
    }
    run_step(
        "staging the next package",
        Command::new("cp").arg("-a").arg(tree).arg(&next_tree),
    )?;
    let control = next_tree.join("DEBIAN/control");
    let text = fs::read_to_string(&control)?;
    fs::write(
        &control,
        text.replace(
            &format!("Version: {version}\n"),
            &format!("Version: {version}+next1\n"),
        ),
    )?;
    let next_deb = out.join(format!("parsrv_{version}+next1_amd64.deb"));
    run_step(
        "building the next package (dpkg-deb)",
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&next_tree)
            .arg(&next_deb),
    )?;
    build(Profile::Checked)?;
    run_step(
        "the package test (install, upgrade under load, remove)",
        Command::new(env!("CARGO"))
            .args([
                "nextest",
                "run",
                "--profile",
                "default",
                "--cargo-profile",
                "checked",
            ])
            .args([
                "--package",
                "parsrv-integration-tests",
                "--run-ignored",
                "only",
            ])
            .args(["-E", "test(/^package::/)", "--no-capture"])
            .env("PARSRV_BIN", Profile::Checked.parsrv())
            .env("PARSRV_DEB", deb)
            .env("PARSRV_DEB_NEXT", &next_deb)
            .env("PARSRV_DEBIAN_ROOT", &debian)
            .current_dir(root),
    )
}

/// parsrv's version, from the workspace's Cargo.toml.
fn version(root: &Path) -> Result<String> {
    let manifest = fs::read_to_string(root.join("Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .map(str::to_owned)
        .context("no version in the workspace's Cargo.toml")
}

/// The package's files, laid out as installed.
fn stage(root: &Path, tree: &Path) -> Result<()> {
    let binary = tree.join(SBIN);
    install(&root.join("target/release/parsrv"), &binary, 0o755)?;
    install(&root.join("dist/parsrv.service"), &tree.join(UNIT), 0o644)?;
    install(&root.join("dist/parsrv.toml"), &tree.join(CONFIG), 0o644)?;
    // The example config must be one parsrv accepts.
    run_step(
        "checking the packaged config (parsrv check)",
        Command::new(&binary)
            .args(["check", "--config"])
            .arg(tree.join(CONFIG)),
    )?;
    let man = tree.join(MAN);
    run_step(
        "writing the man pages (parsrv man)",
        Command::new(&binary).arg("man").arg(&man),
    )?;
    // Debian compresses man pages, reproducibly (-n: no name or time in the header).
    run_step(
        "compressing the man pages",
        Command::new("sh")
            .arg("-c")
            .arg("gzip -9n -- \"$0\"/*.8")
            .arg(&man),
    )?;
    for (shell, path) in [("bash", BASH), ("zsh", ZSH), ("fish", FISH)] {
        let script = Command::new(&binary)
            .args(["completions", shell])
            .output()
            .context("running parsrv completions")?;
        if !script.status.success() || script.stdout.is_empty() {
            bail!("parsrv completions {shell} failed");
        }
        write(&tree.join(path), &script.stdout, 0o644)?;
    }
    let doc = tree.join(DOC);
    install(&root.join("README.md"), &doc.join("README.md"), 0o644)?;
    for entry in fs::read_dir(root.join("docs"))? {
        let path = entry?.path();
        let name = path.file_name().unwrap();
        install(&path, &doc.join("docs").join(name), 0o644)?;
    }
    write(&doc.join("copyright"), copyright().as_bytes(), 0o644)
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write(to, &bytes, mode)
}

fn write(to: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::create_dir_all(to.parent().unwrap())?;
    fs::write(to, bytes).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The newest glibc symbol version the binary links against: the libc6 it depends on.
fn libc_needed(binary: &Path) -> Result<String> {
    let out = Command::new("objdump")
        .arg("-T")
        .arg(binary)
        .output()
        .context("running objdump (Debian package binutils)")?;
    let symbols = String::from_utf8_lossy(&out.stdout);
    let newest = symbols
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let parts: Option<Vec<u32>> = v.split('.').map(|p| p.parse().ok()).collect();
            parts.map(|p| (p, v.to_owned()))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .context("the binary names no glibc version")?;
    Ok(newest.1)
}

/// The installed size dpkg shows, in KiB.
fn installed_kib(tree: &Path) -> Result<u64> {
    fn walk(dir: &Path) -> Result<u64> {
        let mut bytes = 0;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            bytes += if meta.is_dir() {
                walk(&entry.path())?
            } else {
                meta.len()
            };
        }
        Ok(bytes)
    }
    Ok(walk(tree)?.div_ceil(1024))
}

/// The control file. procps: the unit reloads with /bin/kill (systemd 252, Debian 12's, has
/// no Type=notify-reload yet), which a minimal Debian lacks: `systemd-analyze verify` of the
/// installed unit fails there without it.
fn control_file(version: &str, libc: &str, kib: u64) -> String {
    format!(
        "Package: parsrv\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: parsrv developers <parsrv@example.org>\n\
         Installed-Size: {kib}\n\
         Depends: libc6 (>= {libc}), procps\n\
         Recommends: systemd\n\
         Section: net\n\
         Priority: optional\n\
         Description: parallel handlers on SO_REUSEPORT sockets, steered by eBPF\n \
         Many handler processes serve one service in parallel with no dispatcher process:\n \
         an eBPF SK_REUSEPORT program picks, in the kernel, for every new connection, a\n \
         socket whose accept queue has room. The spawner grows, shrinks, restarts and\n \
         upgrades handlers losing no queued connection. Needs Linux 5.17 or newer.\n"
    )
}

fn copyright() -> String {
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
     Upstream-Name: parsrv\n\n\
     Files: *\n\
     License: MIT or Apache-2.0\n\
     Comment: the embedded eBPF programs are GPL-2.0-only OR MIT (the kernel's GPL-only\n \
     helpers need a GPL-compatible licence).\n"
        .to_owned()
}

/// The staged files (not DEBIAN/) under `parsrv-VERSION/`, with SHA256SUMS of every file,
/// and a `.sha256` of the tarball beside it.
fn write_tarball(tree: &Path, version: &str, tarball: &Path) -> Result<()> {
    let out = tarball.parent().unwrap();
    let top = format!("parsrv-{version}");
    let dir = out.join(&top);
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    run_step(
        "laying out the release tarball",
        Command::new("cp")
            .arg("-a")
            .arg(tree.join("etc"))
            .arg(tree.join("usr"))
            .arg(&dir),
    )?;
    let sums = Command::new("sh")
        .arg("-c")
        .arg("cd \"$0\" && find etc usr -type f | sort | xargs sha256sum")
        .arg(&dir)
        .output()
        .context("running sha256sum")?;
    if !sums.status.success() {
        bail!(
            "sha256sum failed: {}",
            String::from_utf8_lossy(&sums.stderr)
        );
    }
    fs::write(dir.join("SHA256SUMS"), &sums.stdout)?;
    run_step(
        "writing the release tarball",
        Command::new("tar")
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "-C",
            ])
            .arg(out)
            .arg("-czf")
            .arg(tarball)
            .arg(&top),
    )?;
    let digest = Command::new("sha256sum")
        .arg(tarball.file_name().unwrap())
        .current_dir(out)
        .output()?;
    fs::write(
        PathBuf::from(format!("{}.sha256", tarball.display())),
        digest.stdout,
    )?;
    Ok(())
}
