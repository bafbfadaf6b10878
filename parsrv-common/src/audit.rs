//! The audit iterator (`parsrv-ebpf/src/bin/reuseport_audit.rs`, userspace
//! `parsrv::dataplane::audit`): which program each reuseport group of the network namespace
//! runs.
//!
//! The kernel has no getsockopt for a reuseport group's program, and any process holding one
//! of the group's sockets may replace or detach it (`SO_ATTACH_REUSEPORT_CBPF`,
//! `SO_DETACH_REUSEPORT_BPF`, unprivileged). Handlers are kept from doing so by their seccomp
//! filter; the spawner's watchdog checks with this iterator that nobody else did either, and
//! attaches the group's program again if someone did. It is a BPF iterator over the
//! namespace's TCP sockets (`iter/tcp`, Linux 5.9+) that writes one [`AuditRecord`] per
//! socket of a reuseport group (only listeners are in one: a child's `sk_reuseport_cb` is
//! cleared when it is cloned).

use bytemuck::{Pod, Zeroable};

/// Names in the eBPF object.
pub mod names {
    /// The iterator program (section `iter/tcp`).
    pub const PROGRAM: &str = "parsrv_reuseport_audit";
    /// Its read-only global of [`AuditOffsets`](super::AuditOffsets), set at load time.
    pub const OFFSETS: &str = "AUDIT_OFFSETS";
    /// The kernel iterator it attaches to (`bpf_iter_tcp`).
    pub const ITERATOR: &str = "tcp";
}

/// Byte offsets of what the iterator reads with `bpf_probe_read_kernel`, from the running
/// kernel's BTF (never hard-coded: they differ between builds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AuditOffsets {
    /// `struct sock.sk_reuseport_cb` (pointer to `struct sock_reuseport`; NULL outside a group).
    pub sk_reuseport_cb: u32,
    /// `struct sock.__sk_common.skc_cookie` (u64; 0 until SO_COOKIE made one).
    pub skc_cookie: u32,
    /// `struct sock_reuseport.prog` (pointer to `struct bpf_prog`; NULL without a program).
    pub reuseport_prog: u32,
    /// `struct bpf_prog.aux` (pointer to `struct bpf_prog_aux`).
    pub prog_aux: u32,
    /// `struct bpf_prog_aux.id` (u32; 0 for a classic BPF selector, which has no id).
    pub aux_id: u32,
}

/// One socket of a reuseport group, as the iterator writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AuditRecord {
    /// The socket's cookie (what SO_COOKIE returns; 0 if nobody asked for one yet).
    pub cookie: u64,
    /// The id of the program its group runs: 0 for none or a classic BPF one,
    /// [`UNREADABLE`] when a read failed.
    pub program_id: u32,
    pub _pad: u32,
}

/// [`AuditRecord::program_id`] when the iterator could not read the program (a racing
/// teardown, or a bad offset).
pub const UNREADABLE: u32 = u32::MAX;

#[cfg(feature = "user")]
mod user {
    unsafe impl aya::Pod for super::AuditOffsets {}
    unsafe impl aya::Pod for super::AuditRecord {}
}
