//! The audit iterator: for every TCP socket of the network namespace that belongs to a
//! reuseport group, the id of the program the group runs (shared types and why:
//! `parsrv_common::audit`). Its own object, so that nothing else is loaded with it.
//!
//! It reads `struct sock` and what hangs off it with `bpf_probe_read_kernel` at offsets
//! userspace took from the running kernel's BTF and wrote to [`AUDIT_OFFSETS`] (a read-only
//! global, frozen before the load: the verifier sees constants). A probe read never faults:
//! a socket torn down under the walk reads as an error, written as [`UNREADABLE`].
#![no_std]
#![no_main]

#[path = "../runtime.rs"]
mod runtime;

use aya_ebpf::{
    bindings::seq_file,
    cty::c_void,
    helpers::{bpf_probe_read_kernel, generated::bpf_seq_write},
};
use parsrv_common::audit::{AuditOffsets, AuditRecord, UNREADABLE};

/// `struct bpf_iter_meta` (include/linux/bpf.h).
#[repr(C)]
struct IterMeta {
    seq: *mut seq_file,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__tcp` (net/ipv4/tcp_ipv4.c): the iterator's context.
#[repr(C)]
pub struct IterTcp {
    meta: *mut IterMeta,
    sk_common: *mut c_void,
    uid: u32,
}

/// Set by the loader. Not zero-initialized, so that it lands in `.rodata` (which the loader
/// can patch) and not in `.bss`; unpatched, every read fails and reads as [`UNREADABLE`].
#[no_mangle]
static AUDIT_OFFSETS: AuditOffsets = AuditOffsets {
    sk_reuseport_cb: u32::MAX,
    skc_cookie: u32::MAX,
    reuseport_prog: u32::MAX,
    prog_aux: u32::MAX,
    aux_id: u32::MAX,
};

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel never faults; a bad address gives an error.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// The id of the program of the group whose `struct sock_reuseport` is at `reuse`: 0 for
/// none (or a classic BPF one, which has no id).
#[inline(always)]
fn program_id(reuse: u64, off: &AuditOffsets) -> Option<u32> {
    let prog: u64 = read(reuse + off.reuseport_prog as u64)?;
    if prog == 0 {
        return Some(0);
    }
    let aux: u64 = read(prog + off.prog_aux as u64)?;
    read(aux + off.aux_id as u64)
}

/// The program: run by the kernel once per TCP socket of the namespace, then once with no
/// socket.
///
/// # Safety
///
/// Only the kernel calls it, with its iterator context.
#[no_mangle]
#[link_section = "iter/tcp"]
pub unsafe extern "C" fn parsrv_reuseport_audit(ctx: *mut IterTcp) -> i32 {
    // SAFETY: the context's fields, and the meta's seq, are pointers the kernel provides.
    let (seq, sk) = unsafe { ((*(*ctx).meta).seq, (*ctx).sk_common) };
    // NULL once, after the last socket.
    if sk.is_null() {
        return 0;
    }
    // SAFETY: a read of the global the loader set; volatile, so it is not folded to the
    // placeholder.
    let off = unsafe { core::ptr::read_volatile(&AUDIT_OFFSETS) };
    // `struct sock` starts with its `struct sock_common`.
    let sk = sk as u64;
    let reuse: u64 = match read(sk + off.sk_reuseport_cb as u64) {
        Some(0) | None => return 0,
        Some(reuse) => reuse,
    };
    let record = AuditRecord {
        cookie: read(sk + off.skc_cookie as u64).unwrap_or(0),
        program_id: program_id(reuse, &off).unwrap_or(UNREADABLE),
        _pad: 0,
    };
    // SAFETY: seq is the iterator's own; the record is on this stack for the call.
    unsafe {
        bpf_seq_write(
            seq,
            &record as *const AuditRecord as *const c_void,
            core::mem::size_of::<AuditRecord>() as u32,
        );
    }
    0
}
