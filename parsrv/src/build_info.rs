//! What this binary was built from: the embedded eBPF object's hash and the toolchain that
//! built it (both from build.rs, which builds the object), for `parsrv --version`
//! and for a verifier refusal, so that a report names exactly what ran.

use sha2::{Digest, Sha256};

/// SHA-256 of the embedded eBPF object, in hex ("none" without one).
pub const EBPF_OBJECT_SHA256: &str = env!("PARSRV_EBPF_OBJECT_SHA256");

/// The pinned nightly, bpf-linker and LLVM that built the embedded object.
pub const EBPF_TOOLCHAIN: &str = env!("PARSRV_EBPF_TOOLCHAIN");

/// The commit this binary was built from (`git describe`, "-dirty" with uncommitted
/// changes), or "unknown" when built outside a git checkout.
pub const COMMIT: &str = env!("PARSRV_COMMIT");

/// The first 16 hex digits of the SHA-256 of `bytes`: enough to tell two builds apart.
pub fn short_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_short_hash_is_the_start_of_the_full_one() {
        // SHA-256 of the empty string.
        assert_eq!(short_sha256(b""), "e3b0c44298fc1c14");
        if EBPF_OBJECT_SHA256 != "none" {
            let embedded = crate::dataplane::object(crate::dataplane::EbpfObject::Parsrv);
            if let Ok(bytes) = embedded {
                if std::env::var_os(crate::dataplane::OBJECT_ENV).is_none() {
                    assert!(EBPF_OBJECT_SHA256.starts_with(&short_sha256(&bytes)));
                }
            }
        }
    }
}
