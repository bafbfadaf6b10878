//! Helpers for parsrv's privileged integration tests (tests/tests/*.rs).
//!
//! Every test runs inside [`isolated`]: a network namespace of its own with only loopback,
//! and a mount namespace of its own with a fresh bpffs at /sys/fs/bpf and an empty /run, so
//! tests cannot disturb each other or the host, see no pins, control sockets or mounts of
//! the host or of an earlier run, and kernel counters read there ([`NetCounters`]) count
//! only that test's traffic. Every load is bounded in connections and time. The tests are
//! `#[ignore]`d so that a plain `cargo test` stays unprivileged; `cargo xtask test` runs
//! them as root with `--ignored`.
//!
//! By concern: [`privileges`] (what a test needs, skip or fail), [`namespaces`] (each test
//! isolated), [`clients`] (many source addresses), [`spawner`] (running parsrv, and the [`group`] builder), [`load`] (clients),
//! [`plain`] (the plain SO_REUSEPORT control), [`flood`] (spoofed SYNs), [`faults`] (kill loops), [`netstat`] (the
//! kernel's counters),
//! [`processes`] (handlers seen from outside).

pub mod clients;
pub mod cluster;
pub mod dns;
pub mod docs;
pub mod faults;
pub mod flood;
pub mod load;
pub mod namespaces;
pub mod netstat;
pub mod plain;
pub mod privileges;
pub mod processes;
pub mod quic;
pub mod spawner;
pub mod udp;

pub use clients::*;
pub use faults::*;
pub use flood::*;
pub use load::*;
pub use namespaces::*;
pub use netstat::*;
pub use plain::*;
pub use privileges::*;
pub use processes::*;
pub use spawner::*;
pub use udp::*;

pub use parsrv;
pub use parsrv::features::Feature;
pub use parsrv::spec::{Affinity, AffinityWhenFull, HandlerKind, Policy, WhenFull};
