//! parsrv's eBPF programs, one file and one object each. This object (`parsrv`) holds the
//! program every group loads, and the modules the others take from it:
//!
//! - [`reuseport`]: the SK_REUSEPORT program. For every new connection (and every connection
//!   migrating off a closing listener) it picks a listener of the group whose accept queue
//!   has room.
//! - [`sockets`]: the maps a group's programs share: its sockets by slot and its settings.
//! - [`queue`]: reading a listener's accept queue from the kernel, and finding the listener
//!   with the most room among many.
//! - [`affinity`]: client affinity: the client of a connection and the dispatch table.
//! - [`alerts`]: telling userspace that a queue is at least half full.
//! - [`counting`]: per-CPU counters and rate limits.
//!
//! Objects of their own, under `src/bin/`:
//! - `address_lookup.rs`, the sk_lookup program, loaded only for a group on several
//!   addresses: for every new connection to an address and port of the group it keeps the
//!   connection at the address asked for while a socket there has room, else hands it to the
//!   socket with most room on another address. It shares the group's SOCKETS and CONFIG
//!   through their pins ([`sockets`]).
//! - `cluster_dispatch.rs`, the cluster's host dispatcher (a tc program: for the packets of a
//!   cluster's service it looks the client up in the host's copy of the cluster's dispatch
//!   table: served here, or forwarded to the host that serves it, or locked and decided here
//!   for a new client).
//! - `reuseport_audit.rs`, the watchdog's audit iterator (`iter/tcp`).
//!
//! So a group on one address creates only the reuseport program's maps, none of the lookup
//! program's or the cluster's, and a cluster agent none of a group's.
//!
//! Types and map names shared with userspace are declared once in parsrv-common, one module
//! per program.
//!
//! # Verification cost
//!
//! The kernel's verifier walks every path of a program and refuses it after one million
//! instructions processed. How close a program comes depends on the kernel build and on the
//! code the compiler emits: the steering program once passed on one build of Linux 6.18.44
//! and was refused on another. So every program stays under **100,000** (a tenfold margin),
//! and the figure is measured, not assumed: `parsrv kernel` prints it per program,
//! `parsrv status` per group, and the integration test `tests/tests/verifier.rs` fails above
//! it, natively and in every VM of the kernel matrix. The rules that keep it low:
//!
//! - **No bpf_loop callback keeps running state on the caller's stack.** Since Linux 6.7 the
//!   verifier re-checks a callback until the caller's state repeats; a best-so-far value the
//!   callback writes into the caller's stack gets a new range on each pass, the state never
//!   repeats, and the walk runs to the budget (1,000,001 processed for `parsrv_select`,
//!   18,435 once its scan state moved into a map value). Keep the state in a per-CPU map
//!   value (`SCRATCH`, `LOOKUP_SCRATCH`, `CLUSTER_SCRATCH`), whose contents the verifier does
//!   not track, and pass the callback a NULL context.
//! - **Loops over many elements run under bpf_loop**, so the body is verified once and not
//!   once per iteration; a plain bounded loop is only for a few iterations without branches
//!   that carry state (the cluster dispatcher's two 16-host loops took 802,296 as plain
//!   loops, 2,354 under bpf_loop).
//! - **Work shared by every path comes once, where the paths have merged** (the queue alert in
//!   `parsrv_select`), and values that would need a branch are computed with arithmetic
//!   ([`queue::Listener::half_full`]): each branch doubles the paths behind it.
//!
//! Runtime settings (policy, when-full, affinity) are read from CONFIG, a map: the verifier
//! walks every path whatever they say, so one figure per program covers every configuration
//! (the test checks that each configuration's group reports it).
#![no_std]
#![no_main]

mod affinity;
mod alerts;
mod counting;
mod queue;
mod reuseport;
mod runtime;
mod sockets;
