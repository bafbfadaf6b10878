//! The group's sockets by slot, shared by the SK_REUSEPORT program (which selects among the
//! sockets of one address) and the sk_lookup program (which hands a connection to a socket of
//! another address).
//!
//! A SOCKMAP, not a REUSEPORT_SOCKARRAY: the kernel refuses to put one socket in both kinds
//! (EBUSY), sk_lookup's `bpf_sk_assign` takes a socket only from a SOCKMAP or SOCKHASH, and
//! `bpf_sk_select_reuseport` accepts a SOCKMAP too (Linux 5.8+). Like the sockarray, a
//! SOCKMAP drops a listener by itself when it is unhashed (shut down or closed), so a slot
//! whose socket left its group selects nothing.

use aya_ebpf::{
    cty::{c_long, c_void},
    helpers::generated::bpf_sk_select_reuseport,
    macros::map,
    maps::SockMap,
    programs::SkReuseportContext,
};
use parsrv_common::reuseport::MAX_SOCKETS;

#[map]
pub static SOCKETS: SockMap = SockMap::with_max_entries(MAX_SOCKETS, 0);

/// Makes the socket in `slot` the one the kernel gives the connection to. Fails (-ENOENT)
/// if the slot is empty and (-EBADFD) if its socket is in another reuseport group, i.e.
/// bound to another address of the group.
#[inline(always)]
pub fn select(ctx: &SkReuseportContext, slot: u32) -> Result<(), c_long> {
    let mut key = slot;
    // SAFETY: the helper reads the key and looks it up in the map; `ctx.md` is the
    // program's context.
    let rc = unsafe {
        bpf_sk_select_reuseport(
            ctx.md,
            &SOCKETS as *const SockMap as *mut c_void,
            &mut key as *mut u32 as *mut c_void,
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(rc)
    }
}
