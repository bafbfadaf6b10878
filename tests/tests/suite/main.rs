//! The privileged integration tests, one module per concern, in one binary: one link
//! instead of one per file, and one executable for the VMs to read over 9p (see
//! docs/testing.md). Run them with `cargo xtask test` (as root), which runs them with
//! cargo-nextest in the two profiles of `.config/nextest.toml`; each test is its own
//! process there, in namespaces of its own.

mod addresses;
mod adoption;
mod affinity;
mod bad_input;
mod cluster;
mod demo;
mod docs;
mod flood;
mod groups;
mod handlers;
mod isolation;
mod kill_loop;
mod lifecycle;
mod migration;
mod monitoring;
mod package;
mod policy;
mod program_log;
mod scaling;
mod stall;
mod systemd;
mod trust;
mod two_spawners;
mod udp;
mod udp_flow;
mod udp_quic;
mod verifier;
mod when_full;
