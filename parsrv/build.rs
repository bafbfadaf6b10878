//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object comes from a separate nightly build (parsrv-ebpf is its own workspace), so a
//! plain `cargo build` or `cargo clippy` of this crate must work without it: then an empty
//! placeholder is embedded, and `parsrv run` says how to build the real one.

use std::{env, fs, path::PathBuf};

/// Overrides where the object is taken from.
const OBJECT_ENV: &str = "PARSRV_EBPF_OBJECT";

fn main() {
    println!("cargo:rerun-if-env-changed={OBJECT_ENV}");
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let object = env::var_os(OBJECT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("../target/ebpf/bpfel-unknown-none/release/parsrv"));
    println!("cargo:rerun-if-changed={}", object.display());

    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("parsrv-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) if !bytes.is_empty() => fs::write(&out, bytes).unwrap(),
        _ => fs::write(&out, []).unwrap(),
    }
}
