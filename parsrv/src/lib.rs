//! parsrv: many handler processes serve one port in parallel, with no dispatcher process.
//!
//! A spawner ([`spawner`]) creates a group of SO_REUSEPORT sockets on one address and port
//! ([`listeners`]), one per handler process ([`handler`]). An SK_REUSEPORT eBPF program
//! ([`dataplane`], source in parsrv-ebpf) picks, in the kernel, for every new connection, a
//! socket whose accept queue has room, reading the queues' real depth at offsets taken from
//! the kernel's BTF ([`kernel`]), on kernels that have every feature it needs ([`features`]).
//! `parsrv status` ([`status`]) asks the spawner through its control socket ([`control`]).
//! A handler program takes its socket with [`activation`]. What goes to stdout and stderr,
//! and how an error is told from a log line, is [`output`].

pub mod activation;
pub mod autoscale;
pub mod build_info;
pub mod cli;
pub mod cluster;
pub mod config_file;
pub mod control;
pub mod dataplane;
pub mod error;
pub mod features;
pub mod handler;
pub mod kernel;
pub mod listeners;
pub mod metrics;
pub mod output;
pub mod procfs;
pub mod quic;
pub mod run_dir;
pub mod service_manager;
pub mod sock_diag;
pub mod spawner;
pub mod spec;
pub mod stall;
pub mod status;
pub mod supervisor;

pub use error::{Error, Result};
