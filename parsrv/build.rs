//! Builds parsrv's eBPF programs (the parsrv-ebpf crate) and embeds them, and tells the binary
//! what it embedded: each object's SHA-256 and the toolchain that built it (`parsrv
//! --version`). So a plain `cargo build -p parsrv` or `cargo install --locked --path parsrv`
//! gives a binary that runs groups, on a machine where `cargo xtask setup` (or the README's
//! commands) installed the pinned nightly and bpf-linker.
//!
//! This does what aya-build does (aya-template's build.rs), with two differences, for reasons:
//! - parsrv-ebpf stays its own workspace: its profile (LTO, one codegen unit, BTF) and its
//!   lock file decide the programs' instructions and so their verification cost, which is
//!   measured and tested. aya-build builds the crate as a package of the *userspace*
//!   workspace (`cargo build --package`), under that workspace's profiles and lock file.
//! - One build for all of parsrv's profiles: the objects go to `<target>/ebpf`, not to
//!   `OUT_DIR`. aya-build's per-`OUT_DIR` build took 26 s per profile here (2026-12-06), and
//!   the test suite builds parsrv in three (clippy, checked, release).
//!
//! `AYA_BUILD_SKIP=1` (aya-build's switch) embeds nothing instead: the binary then refuses to
//! start a group and says why. (To try another object without rebuilding, parsrv reads
//! `PARSRV_EBPF_OBJECT` when it runs: `dataplane::OBJECT_ENV`.)

use std::{
    env,
    ffi::OsString,
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::{exit, Command, Stdio},
};

use sha2::{Digest, Sha256};

/// Builds without the programs (aya-build's name for it).
const SKIP_ENV: &str = "AYA_BUILD_SKIP";
/// Each binary of parsrv-ebpf, and the file `dataplane::EbpfObject` embeds it from.
const OBJECTS: [(&str, &str); 7] = [
    ("parsrv", "parsrv-ebpf.o"),
    ("address-lookup", "address-lookup.o"),
    ("cluster-dispatch", "cluster-dispatch.o"),
    ("reuseport-audit", "reuseport-audit.o"),
    ("udp-datagram", "udp-datagram.o"),
    ("udp-flow", "udp-flow.o"),
    ("udp-quic", "udp-quic.o"),
];
const EBPF_TARGET: &str = "bpfel-unknown-none";

fn main() {
    println!("cargo:rerun-if-env-changed={SKIP_ENV}");
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let ebpf_crate = manifest_dir.join("../parsrv-ebpf");
    // What the objects are made of. A directory is watched whole (every file's mtime).
    for input in [
        ebpf_crate.join("src"),
        ebpf_crate.join("Cargo.toml"),
        ebpf_crate.join("Cargo.lock"),
        ebpf_crate.join("rust-toolchain.toml"),
        ebpf_crate.join(".cargo"),
        manifest_dir.join("../parsrv-common/src"),
        manifest_dir.join("../parsrv-common/Cargo.toml"),
        // parsrv-common takes its edition and version from the workspace.
        manifest_dir.join("../Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", input.display());
    }

    let skip = env::var(SKIP_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let built = if skip {
        println!(
            "cargo:warning={SKIP_ENV} is set: parsrv is built without its eBPF programs and \
             cannot start a group"
        );
        None
    } else {
        Some(build_ebpf(&ebpf_crate, &out_dir))
    };

    for (binary, embedded) in OBJECTS {
        let bytes = match &built {
            Some(built) => match fs::read(built.dir.join(binary)) {
                Ok(bytes) if !bytes.is_empty() => bytes,
                Ok(_) => fail(&format!("the eBPF build produced an empty {binary}")),
                Err(e) => fail(&format!("the eBPF build produced no {binary}: {e}")),
            },
            None => Vec::new(),
        };
        if binary == "parsrv" {
            let hash = if bytes.is_empty() {
                "none".to_owned()
            } else {
                Sha256::digest(&bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            };
            println!("cargo:rustc-env=PARSRV_EBPF_OBJECT_SHA256={hash}");
        }
        fs::write(out_dir.join(embedded), bytes).unwrap();
    }
    let toolchain = match &built {
        Some(built) => built.toolchain.clone(),
        None => "no eBPF object embedded".to_owned(),
    };
    println!("cargo:rustc-env=PARSRV_EBPF_TOOLCHAIN={toolchain}");
    println!("cargo:rustc-env=PARSRV_COMMIT={}", commit(&manifest_dir));
}

/// Where the eBPF build left its objects, and what built them.
struct Built {
    dir: PathBuf,
    /// "nightly-... (rustc ...), bpf-linker ... (LLVM ...)".
    toolchain: String,
}

/// Builds parsrv-ebpf with its pinned nightly into `<target>/ebpf`, a no-op (under a second)
/// when nothing changed. Exits with one line naming the fix when the toolchain is missing.
fn build_ebpf(ebpf_crate: &Path, out_dir: &Path) -> Built {
    let nightly = pinned_nightly(&ebpf_crate.join("rust-toolchain.toml"));
    let missing = |what: &str| -> ! {
        fail(&format!(
            "{what} is missing: parsrv's eBPF programs build with Rust {nightly} (with \
             rust-src) and bpf-linker; `cargo xtask setup` installs both (about 3 minutes \
             once), or set {SKIP_ENV}=1 to build a binary without them"
        ))
    };
    if first_lines(Command::new("rustup").arg("--version"), 1).is_none() {
        missing("rustup");
    }
    let rustc = first_lines(
        Command::new("rustup").args(["run", &nightly, "rustc", "--version"]),
        1,
    )
    .unwrap_or_else(|| missing(&format!("Rust {nightly}")));
    // bpf-linker as the inner build finds it: `rustup run` puts cargo's bin directory on PATH.
    let linker_path = first_lines(
        Command::new("rustup").args(["run", &nightly, "sh", "-c", "command -v bpf-linker"]),
        1,
    )
    .filter(|path| !path.is_empty())
    .unwrap_or_else(|| missing("bpf-linker"));
    let linker = first_lines(Command::new(&linker_path).arg("--version"), 1)
        .unwrap_or_else(|| missing("bpf-linker"));
    let toolchain = format!(
        "{nightly} ({rustc}), {linker} (LLVM {})",
        linker_llvm(Path::new(&linker_path))
    );

    let target_dir = cargo_target_dir(out_dir).join("ebpf");
    let mut cargo = Command::new("rustup");
    cargo
        // --locked: parsrv-ebpf's Cargo.lock decides the programs' code (and so their
        // verification cost); a build must not rewrite it.
        .args(["run", &nightly, "cargo", "build", "--release", "--locked"])
        .args(["--target", EBPF_TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(ebpf_crate);
    // Nothing of this build's settings may reach that one: cargo sets these for build
    // scripts (the host's rustflags, clippy's wrapper, this profile), and the eBPF crate's
    // own config and profile must decide its build.
    for (name, _) in env::vars_os() {
        if is_outer_build_setting(&name) {
            cargo.env_remove(name);
        }
    }
    // cargo reads a build script's stdout for instructions: the inner cargo's output goes to
    // stderr (shown when the build fails).
    let stderr = std::io::stderr().as_fd().try_clone_to_owned().unwrap();
    let status = cargo
        .stdout(Stdio::from(stderr))
        .status()
        .unwrap_or_else(|e| fail(&format!("running {cargo:?}: {e}")));
    if !status.success() {
        fail(&format!(
            "building parsrv's eBPF programs failed ({status}); the compiler's output is above"
        ));
    }
    Built {
        dir: target_dir.join(EBPF_TARGET).join("release"),
        toolchain,
    }
}

/// The LLVM bpf-linker generates the programs' code with: the version of the libLLVM it
/// links (Debian's llvm-22 here), from that LLVM's llvm-config, else the library's name.
fn linker_llvm(linker: &Path) -> String {
    let ldd = first_lines(Command::new("ldd").arg(linker), usize::MAX).unwrap_or_default();
    let Some(library) = ldd
        .lines()
        .filter(|l| l.contains("libLLVM"))
        .find_map(|l| l.split("=>").nth(1)?.split_whitespace().next())
        .map(PathBuf::from)
    else {
        return "linked statically, version unknown".to_owned();
    };
    library
        .parent()
        .and_then(Path::parent)
        .and_then(|prefix| {
            first_lines(
                Command::new(prefix.join("bin/llvm-config")).arg("--version"),
                1,
            )
        })
        .unwrap_or_else(|| library.file_name().unwrap().to_string_lossy().into_owned())
}

/// The channel of parsrv-ebpf/rust-toolchain.toml: the one place the nightly is named for
/// the build (xtask's setup installs the same, see xtask/src/setup.rs).
fn pinned_nightly(file: &Path) -> String {
    let text = fs::read_to_string(file)
        .unwrap_or_else(|e| fail(&format!("reading {}: {e}", file.display())));
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|l| l.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .next()
        .unwrap_or_else(|| fail(&format!("{} names no channel", file.display())))
}

/// `<target>` of `OUT_DIR` = `<target>[/<triple>]/<profile>/build/parsrv-<hash>/out`.
fn cargo_target_dir(out_dir: &Path) -> PathBuf {
    let mut dir = out_dir.ancestors().nth(4).unwrap().to_owned();
    if let (Some(name), Ok(triple)) = (dir.file_name(), env::var("TARGET")) {
        // `--target <triple>` puts the profile directories one level down.
        if name == triple.as_str() {
            dir.pop();
        }
    }
    dir
}

/// A variable cargo sets for build scripts, or one that configures a build (other than where
/// cargo lives, its network settings and its jobserver).
fn is_outer_build_setting(name: &OsString) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    let kept = ["CARGO_HOME", "CARGO_MAKEFLAGS"].contains(&name)
        || [
            "CARGO_NET_",
            "CARGO_HTTP_",
            "CARGO_REGISTRIES_",
            "CARGO_REGISTRY_",
            "CARGO_TERM_",
        ]
        .iter()
        .any(|p| name.starts_with(p));
    !kept
        && (name.starts_with("CARGO")
            || name.starts_with("RUSTC")
            || name.starts_with("RUSTDOC")
            || [
                "RUSTFLAGS",
                "RUSTUP_TOOLCHAIN",
                "TARGET",
                "HOST",
                "OUT_DIR",
                "PROFILE",
                "OPT_LEVEL",
                "DEBUG",
                "NUM_JOBS",
            ]
            .contains(&name))
}

/// The first `n` lines of a command's output, or None when it cannot run or fails.
fn first_lines(command: &mut Command, n: usize) -> Option<String> {
    let out = command.stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.lines()
            .take(n)
            .collect::<Vec<_>>()
            .join("\n")
            .trim()
            .to_owned(),
    )
}

/// One line for the person building, then exit: cargo prints it under "failed to run custom
/// build command".
fn fail(line: &str) -> ! {
    eprintln!("error: {line}");
    exit(1)
}

/// The commit checked out (12 hex digits), or "unknown" outside a git checkout (a source
/// tarball, `cargo install` from a copy). Built again when HEAD moves.
fn commit(manifest_dir: &Path) -> String {
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(manifest_dir)
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let dir = PathBuf::from(dir);
        let mut watched = vec![dir.join("HEAD")];
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watched.push(dir.join(branch));
        }
        // A missing file would make cargo run this script at every build.
        for file in watched.into_iter().filter(|f| f.exists()) {
            println!("cargo:rerun-if-changed={}", file.display());
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
}
