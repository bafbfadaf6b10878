//! parsrv's eBPF programs, one file each, and what they share:
//!
//! - [`reuseport`]: the SK_REUSEPORT program. For every new connection (and every connection
//!   migrating off a closing listener) it picks a listener of the group whose accept queue
//!   has room.
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
mod counting;
mod queue;
mod reuseport;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
