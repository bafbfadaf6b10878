//! The VM's whole root file system: a newc initramfs with our init, a static busybox,
//! parsrv, its example handler and the integration test binaries, all statically linked.

use std::{
    fs,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};
use cpio::{newc, NewcBuilder};

use crate::workspace_root;

/// The target the static binaries are built for. Naming it explicitly keeps build scripts
/// and proc-macros (built for the host) out of `+crt-static`.
const TARGET: &str = "x86_64-unknown-linux-gnu";
const INIT: &str = include_str!("init.sh");
/// The shell, mount, ip and poweroff of the init, and the `sh` and `sleep` some tests run
/// as handlers. The busybox-static package's binary needs no library.
const BUSYBOX: &str = "/bin/busybox";

/// The example handlers the tests run (`parsrv/examples/`).
const EXAMPLES: [&str; 2] = ["hello_handler", "blocking_handler"];

/// Statically linked binaries for the VM.
pub struct Payload {
    pub parsrv: PathBuf,
    /// (example name, path), for [`EXAMPLES`].
    pub examples: Vec<(&'static str, PathBuf)>,
    /// (test binary name, path): one per tests/tests/*.rs.
    pub tests: Vec<(String, PathBuf)>,
}

/// Builds parsrv (with the eBPF object embedded), its example handler and the integration
/// tests, release and static.
pub fn build_static() -> Result<Payload> {
    crate::build_ebpf()?;
    let root = workspace_root();
    let static_cargo = || {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.current_dir(&root).env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        );
        cargo
    };
    crate::run_step(
        "building parsrv and its example handlers (static, for the VM)",
        static_cargo()
            .args(["build", "--release", "--target", TARGET])
            .args(["--package", "parsrv", "--bin", "parsrv"])
            .args(EXAMPLES.iter().flat_map(|name| ["--example", name])),
    )?;
    let out = root.join("target").join(TARGET).join("release");

    // The test binaries' names carry a hash: take them from cargo's own report.
    let output = static_cargo()
        .args(["test", "--release", "--target", TARGET])
        .args([
            "--package",
            "parsrv-integration-tests",
            "--tests",
            "--no-run",
        ])
        .args(["--message-format", "json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !output.status.success() {
        bail!("building the integration tests (static, for the VM) failed; see above");
    }
    let mut tests = Vec::new();
    for line in output.stdout.split(|&b| b == b'\n') {
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        let is_test_binary = message["reason"] == "compiler-artifact"
            && message["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
        if let (true, Some(executable)) = (is_test_binary, message["executable"].as_str()) {
            let name = message["target"]["name"]
                .as_str()
                .unwrap_or("test")
                .to_owned();
            tests.push((name, PathBuf::from(executable)));
        }
    }
    if tests.is_empty() {
        bail!("cargo reported no integration test binaries");
    }
    tests.sort();
    Ok(Payload {
        parsrv: out.join("parsrv"),
        examples: EXAMPLES
            .iter()
            .map(|name| (*name, out.join("examples").join(name)))
            .collect(),
        tests,
    })
}

/// Writes the initramfs to `out` (through a temporary file, renamed when complete), unless
/// the one there was made from the same inputs.
pub fn write_initramfs(payload: &Payload, out: &Path) -> Result<()> {
    let inputs = out.with_extension("inputs");
    let fingerprint = fingerprint(payload)?;
    if out.is_file() && fs::read_to_string(&inputs).is_ok_and(|done| done == fingerprint) {
        eprintln!("xtask: {} is up to date", out.display());
        return Ok(());
    }
    let _ = fs::remove_file(&inputs);
    if !Path::new(BUSYBOX).is_file() {
        return Err(crate::Fatal::error(
            crate::EXIT_BAD_INPUT,
            format!(
                "{BUSYBOX} is missing, and the VM's shell is busybox: apt-get install \
                 busybox-static (`cargo xtask setup` does as root)"
            ),
        ));
    }
    fs::create_dir_all(out.parent().unwrap())?;
    let partial = out.with_extension("partial");
    let mut archive = Archive {
        out: BufWriter::new(fs::File::create(&partial)?),
        inode: 1,
    };
    for dir in [
        "bin",
        "dev",
        "etc",
        "proc",
        "sys",
        "tmp",
        "run",
        "root",
        "opt",
        "opt/parsrv",
        "opt/parsrv/examples",
        "opt/parsrv/tests",
    ] {
        archive.dir(dir)?;
    }
    archive.file("init", INIT.as_bytes(), 0o755)?;
    archive.file("bin/busybox", &fs::read(BUSYBOX)?, 0o755)?;
    // Tests that drop privileges look users up (glibc reads these without NSS modules).
    archive.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    )?;
    archive.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    archive.copy("opt/parsrv/parsrv", &payload.parsrv)?;
    for (name, path) in &payload.examples {
        archive.copy(&format!("opt/parsrv/examples/{name}"), path)?;
    }
    let mut list = String::new();
    for (name, path) in &payload.tests {
        archive.copy(&format!("opt/parsrv/tests/{name}"), path)?;
        list.push_str(name);
        list.push('\n');
    }
    archive.file("opt/parsrv/tests.list", list.as_bytes(), 0o644)?;
    let mut out_file = newc::trailer(archive.out)?;
    out_file.flush()?;
    out_file
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    fs::rename(&partial, out).with_context(|| format!("writing {}", out.display()))?;
    fs::write(&inputs, fingerprint)?;
    Ok(())
}

/// What the image is made of: every file's path, size and modification time, and the init.
fn fingerprint(payload: &Payload) -> Result<String> {
    let mut text = format!("{INIT}\n");
    let files = [Path::new(BUSYBOX), &payload.parsrv]
        .into_iter()
        .chain(payload.examples.iter().map(|(_, path)| path.as_path()))
        .chain(payload.tests.iter().map(|(_, path)| path.as_path()));
    for file in files {
        let meta = fs::metadata(file).with_context(|| format!("reading {}", file.display()))?;
        let modified = meta.modified()?.duration_since(std::time::UNIX_EPOCH)?;
        text.push_str(&format!(
            "{} {} {}\n",
            file.display(),
            meta.len(),
            modified.as_nanos()
        ));
    }
    Ok(text)
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

    fn copy(&mut self, name: &str, from: &Path) -> Result<()> {
        let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.file(name, &data, 0o755)
    }
}
