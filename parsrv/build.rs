//! Embeds the eBPF object built by `cargo xtask build-ebpf`, and tells the binary what it
//! embedded: the object's SHA-256 and the toolchain that built it (`parsrv --version`).
//!
//! The object comes from a separate nightly build (parsrv-ebpf is its own workspace), so a
//! plain `cargo build` or `cargo clippy` of this crate must work without it: then an empty
//! placeholder is embedded, and `parsrv run` says how to build the real one.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use sha2::{Digest, Sha256};

/// Overrides where the object is taken from.
const OBJECT_ENV: &str = "PARSRV_EBPF_OBJECT";

fn main() {
    println!("cargo:rerun-if-env-changed={OBJECT_ENV}");
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let object = env::var_os(OBJECT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("../target/ebpf/bpfel-unknown-none/release/parsrv"));
    println!("cargo:rerun-if-changed={}", object.display());
    // Written by xtask beside the object: "nightly-... (rustc ...), bpf-linker ... (LLVM ...)".
    let toolchain_note = object.with_extension("toolchain");
    println!("cargo:rerun-if-changed={}", toolchain_note.display());

    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("parsrv-ebpf.o");
    let bytes = fs::read(&object).unwrap_or_default();
    fs::write(&out, &bytes).unwrap();
    let (hash, toolchain) = if bytes.is_empty() {
        ("none".to_owned(), "no eBPF object embedded".to_owned())
    } else {
        let hash: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let toolchain = fs::read_to_string(&toolchain_note)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "an unrecorded toolchain (not built by xtask)".to_owned());
        (hash, toolchain)
    };
    println!("cargo:rustc-env=PARSRV_EBPF_OBJECT_SHA256={hash}");
    // The other objects of the same build (no override: the tests feed broken objects only
    // as the main one).
    for other in ["address-lookup", "cluster-dispatch", "reuseport-audit"] {
        let built = manifest_dir
            .join("../target/ebpf/bpfel-unknown-none/release")
            .join(other);
        println!("cargo:rerun-if-changed={}", built.display());
        let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join(format!("{other}.o"));
        fs::write(out, fs::read(&built).unwrap_or_default()).unwrap();
    }
    println!("cargo:rustc-env=PARSRV_EBPF_TOOLCHAIN={toolchain}");
    println!("cargo:rustc-env=PARSRV_COMMIT={}", commit(&manifest_dir));
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
