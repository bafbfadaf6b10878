//! The maps a group's two programs share: its sockets by slot (SOCKETS), which the
//! SK_REUSEPORT program selects among (the sockets of one address) and the sk_lookup program
//! hands connections to (a socket of another address), and its settings (CONFIG).
//!
//! Each program is in an object of its own, and both objects declare these maps by including
//! this file. The group's spawner loads the reuseport object first and pins its maps; the
//! lookup object, loaded only for a group on several addresses, is given those pins for
//! these two names, so that the kernel builds both programs on the same two maps
//! (`parsrv::dataplane::loader::load_sharing`).
//!
//! A SOCKMAP, not a REUSEPORT_SOCKARRAY: the kernel refuses to put one socket in both kinds
//! (EBUSY), sk_lookup's `bpf_sk_assign` takes a socket only from a SOCKMAP or SOCKHASH, and
//! `bpf_sk_select_reuseport` accepts a SOCKMAP too (Linux 5.8+). Like the sockarray, a
//! SOCKMAP drops a listener by itself when it is unhashed (shut down or closed), so a slot
//! whose socket left its group selects nothing.

use aya_ebpf::{
    macros::map,
    maps::{Array, SockMap},
};
use parsrv_common::reuseport::{ProgramConfig, MAX_SOCKETS};

#[map]
pub static SOCKETS: SockMap = SockMap::with_max_entries(MAX_SOCKETS, 0);

/// The group's settings and the kernel's offsets, which userspace writes (element 0).
#[map]
pub static CONFIG: Array<ProgramConfig> = Array::with_max_entries(1, 0);
