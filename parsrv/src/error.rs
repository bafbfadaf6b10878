//! Errors a user can act on: each names the cause and the fix, and maps to an exit code.

use std::{io, path::PathBuf};

/// Exit code for bad command-line input (as clap uses for its own parse errors).
pub const EXIT_USAGE: i32 = 2;
/// Exit code for everything that failed at run time.
pub const EXIT_RUNTIME: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {option} '{value}': {reason}")]
    InvalidOption {
        option: &'static str,
        value: String,
        reason: String,
    },

    #[error(
        "{addr} is already in use by a socket outside this group (another server, or another \
         user's SO_REUSEPORT group): stop it or choose another --listen"
    )]
    AddressInUse { addr: std::net::SocketAddr },

    #[error("cannot {action} {addr}: {source}")]
    Socket {
        action: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error(
        "parsrv run needs {missing} to load and attach its eBPF program: run it as root, or \
         grant the capabilities (setcap cap_bpf,cap_perfmon,cap_sys_admin,cap_net_admin+ep \
         on the binary)"
    )]
    MissingCapabilities { missing: String },

    #[error(
        "group {group} runs its handlers as another user (--user), which needs {missing}: \
         run parsrv as root with them (the unit's CapabilityBoundingSet names them all)"
    )]
    MissingHandlerCapabilities { group: String, missing: String },

    #[error(
        "bpffs is not mounted at {path} and mounting it failed ({source}): mount it with \
         `mount -t bpf bpf {path}`"
    )]
    NoBpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "kernel BTF not found at {path}: parsrv reads struct offsets from it; use a kernel \
         built with CONFIG_DEBUG_INFO_BTF=y, or point PARSRV_VMLINUX_BTF at a BTF file that \
         matches the running kernel"
    )]
    NoBtf { path: PathBuf },

    #[error(
        "kernel {release} lacks {feature} (Linux {since}+), which parsrv's program needs: run \
         parsrv on Linux {minimum} or newer (`parsrv kernel` lists what it needs)"
    )]
    KernelFeature {
        release: String,
        feature: &'static str,
        since: String,
        minimum: String,
    },

    #[error(
        "kernel BTF at {path} lacks {what}: this kernel's layout is not one parsrv knows; \
         report it with `uname -r`"
    )]
    BtfLayout { path: PathBuf, what: String },

    #[error(transparent)]
    VerifierRefused(Box<VerifierRefusal>),

    #[error(
        "no eBPF program to load (this binary was built without it, or PARSRV_EBPF_OBJECT \
         names an empty file): build without AYA_BUILD_SKIP, with `cargo xtask build` (which sets up the eBPF toolchain) or `cargo build` after `cargo xtask setup`"
    )]
    NoEbpfObject,

    #[error(
        "group '{name}' is already running under spawner {}{} (control socket {socket} answers): stop it, or \
         pick another --name",
        spawner.map_or("?".to_string(), |pid| pid.to_string()),
        if *spawner == Some(std::process::id()) { " (this one)" } else { "" }
    )]
    GroupRunning {
        name: String,
        socket: PathBuf,
        /// The pid at the other end of the control socket (SO_PEERCRED).
        spawner: Option<u32>,
    },

    #[error(
        "group '{name}' runs (handlers {pids:?}) with other settings: {differences}; run it as it runs to adopt it, or stop it first (`parsrv stop {name}`)"
    )]
    GroupDiffers {
        name: String,
        pids: Vec<u32>,
        differences: String,
    },

    #[error(
        "no running parsrv group{which}: start one with `parsrv run`, or name one of: {known}"
    )]
    GroupNotRunning { which: String, known: String },

    #[error("metrics address {addr} is already in use: choose another --metrics (or metrics = ...) port")]
    MetricsInUse { addr: std::net::SocketAddr },

    #[error("no running parsrv spawner{which}: start one with `parsrv run`; running: {known}")]
    NoSpawner { which: String, known: String },

    #[error("several parsrv groups are running ({known}): name one, e.g. `parsrv status {first}`")]
    GroupAmbiguous { known: String, first: String },

    #[error(
        "{path} is {why}: parsrv acts as root on what it holds, so it must be root's and \
         writable by no one else (chown root: {path} && chmod 0700 {path})"
    )]
    UntrustedPath { path: PathBuf, why: String },

    #[error(
        "{addr} is inside --listen {range}, and {owner} listens there already: the group would \
         take its connections; stop that server or leave its address out of the range"
    )]
    RangeTaken {
        range: String,
        addr: std::net::SocketAddr,
        owner: String,
    },

    #[error(
        "{path} has been locked by {holder} for {waited} s: another parsrv is starting a group \
         in this network namespace, or a stray process holds the lock; stop it and run again"
    )]
    NamespaceLockHeld {
        path: PathBuf,
        holder: String,
        waited: u64,
    },

    /// The spawner refused a request as bad input (and changed nothing).
    #[error("{0}")]
    Rejected(String),

    /// The spawner failed to do what a request asked.
    #[error("group '{group}': {message}")]
    Spawner { group: String, message: String },

    #[error("{context}: {source:#}")]
    Ebpf {
        context: String,
        #[source]
        source: anyhow::Error,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::InvalidOption { .. } | Error::Rejected(_) | Error::GroupDiffers { .. } => {
                EXIT_USAGE
            }
            _ => EXIT_RUNTIME,
        }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub fn ebpf<E: Into<anyhow::Error>>(context: impl Into<String>) -> impl FnOnce(E) -> Error {
        let context = context.into();
        move |source| Error::Ebpf {
            context,
            source: source.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A program the kernel's verifier refused, in one line (`dataplane::verification` makes it
/// and writes the whole log to a file).
#[derive(Debug, thiserror::Error)]
#[error(
    "the kernel's verifier refused {program} ({processed}, limit {limit}): {reason}; \
     kernel {kernel}; eBPF {toolchain}; full log: {log}"
)]
pub struct VerifierRefusal {
    pub program: &'static str,
    /// "N insns processed".
    pub processed: String,
    pub limit: String,
    /// The verifier's own words (the last line before its statistics).
    pub reason: String,
    /// `uname -r (uname -v)`.
    pub kernel: String,
    /// The object's hash and the toolchain that built it (or the file it came from).
    pub toolchain: String,
    /// The file with the whole log, or why it could not be written.
    pub log: String,
}
