//! parsrv's eBPF programs, one file each, and what they share:
//!
//! - [`reuseport`]: the SK_REUSEPORT program. For every new connection (and every connection
//!   migrating off a closing listener) it picks a listener of the group whose accept queue
//!   has room.
//! - [`lookup`]: the sk_lookup program. For every new connection to an address and port of a
//!   group on several addresses, it keeps the connection at the address asked for while a
//!   socket there has room, else hands it to the socket with most room on another address.
//! - [`cluster`]: the host dispatcher, a tc program. For the packets of a cluster's service it
//!   looks the client up in the host's copy of the cluster's dispatch table: served here, or
//!   forwarded to the host that serves it, or locked and decided here for a new client.
//! - [`sockets`]: the group's sockets by slot, which both programs choose from.
//! - [`queue`]: reading a listener's accept queue from the kernel, and finding the listener
//!   with the most room among many.
//! - [`affinity`]: client affinity: the client of a connection and the dispatch table.
//! - [`alerts`]: telling userspace that a queue is at least half full.
//! - [`counting`]: per-CPU counters.
//!
//! Types and map names shared with userspace are declared once in parsrv-common, one module
//! per program.
#![no_std]
#![no_main]

mod affinity;
mod alerts;
mod cluster;
mod counting;
mod lookup;
mod queue;
mod reuseport;
mod sockets;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
