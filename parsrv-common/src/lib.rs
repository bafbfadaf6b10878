//! Types and names shared by parsrv's eBPF programs and their userspace: one module per
//! program ([`reuseport`]: the SK_REUSEPORT program that picks a socket with room;
//! [`lookup`]: the sk_lookup program that serves one group on several addresses;
//! [`cluster`]: the tc program that dispatches a cluster's clients between hosts; [`audit`]:
//! the iterator that tells which program each reuseport group runs; [`udp`]: the SK_REUSEPORT
//! program of a UDP group, which sends each datagram to a socket with receive-buffer room),
//! and the way counters
//! are declared once ([`counters`]).
//!
//! Everything here is `#[repr(C)]`, `bytemuck::Pod` and free of implicit padding, so the two
//! sides agree on layout byte for byte. The eBPF side builds this crate `no_std`; userspace
//! enables the `user` feature for aya's `Pod` marker and serde.
#![no_std]

#[macro_use]
pub mod counters;

pub mod audit;
pub mod cluster;
pub mod lookup;
pub mod reuseport;
pub mod udp;

pub use counters::Counter;

/// Names parsrv reserves under its bpffs directory (`/sys/fs/bpf/parsrv`). Group names
/// start with a letter or digit, so nothing reserved can collide with a group.
pub mod scope {
    /// Prefix of the directory that holds the state of one network namespace (followed by
    /// the namespace's inode number): state that belongs to no single group.
    pub const NETNS_PREFIX: &str = "_netns-";
    /// Prefix of a directory being filled before it is renamed into place (followed by what
    /// it will be, and the pid of the process filling it).
    pub const STAGING_PREFIX: &str = "_staging-";
}
