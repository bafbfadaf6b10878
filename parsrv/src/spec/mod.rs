//! A group's spec: the one model of a group's settings. Each setting is declared once, as a
//! field of [`GroupSpec`] with its flag, default and help: `parsrv run` and `parsrv group
//! add` parse it from flags, a config file's keys are the same flags without the dashes
//! ([`crate::config_file`] parses them with the same parser), the JSON of `status` and of
//! control requests is its serde form, and `group show` prints that form as TOML. Every
//! check lives in this module (`spec/validate.rs`), so every way of defining a
//! group rejects the same values with the same words.

mod derived;
pub mod dynamic_user;
pub mod environment;
pub mod flags;
mod host;
mod listen;
mod validate;
mod values;

pub use host::{executable_by, find_program, usable_cpus};
pub use listen::{Listen, Transport};
pub use validate::{MAX_AFFINITY_TIMEOUT, MAX_THREADS, MIN_AFFINITY_TIMEOUT};
pub use values::{format_cpus, parse_cpus, parse_listen, ClientPrefix, CpuList, HandlerRange};

use std::{fmt, net::SocketAddr};

use clap::ArgAction;

use serde::{Deserialize, Serialize};

use crate::error::Error;

pub use parsrv_common::{
    reuseport::{
        affinity::{DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE},
        MAX_SOCKETS,
    },
    udp::{DEFAULT_FLOW_TABLE, DEFAULT_FLOW_TIMEOUT_SECONDS, MAX_FLOW_TABLE},
};

/// Where a new connection goes while some socket has room. The default, `two-choices`, was
/// chosen by the `policies` benchmark (docs/steering.md, "Policies").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Keep the kernel's hash choice when it has room; otherwise the socket with most room.
    Redirect,
    /// Always the socket with the most room (ties broken by hash).
    LeastLoaded,
    /// The hash choice or one other socket at random, whichever has more room (the power
    /// of two choices); every socket is looked at only when both are full.
    #[default]
    TwoChoices,
}

impl Policy {
    pub fn to_program(self) -> u32 {
        match self {
            Policy::Redirect => parsrv_common::reuseport::policy::REDIRECT,
            Policy::LeastLoaded => parsrv_common::reuseport::policy::LEAST_LOADED,
            Policy::TwoChoices => parsrv_common::reuseport::policy::TWO_CHOICES,
        }
    }
}

/// What happens to a new connection when every socket is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Drop the SYN silently; the client retransmits (1 s, 2 s, ...) and is steered again.
    #[default]
    Drop,
    /// Refuse with a RST: the client gets ECONNREFUSED at once.
    Refuse,
}

impl WhenFull {
    pub fn to_program(self) -> u32 {
        match self {
            WhenFull::Drop => parsrv_common::reuseport::when_full::DROP,
            WhenFull::Refuse => parsrv_common::reuseport::when_full::REFUSE,
        }
    }
}

/// Whether a client's connections all go to one handler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Affinity {
    /// Every connection is steered on its own.
    #[default]
    None,
    /// Every connection of a client (its source address, see --affinity-prefix) goes to the
    /// handler its first one went to, recorded in the kernel's dispatch table.
    Client,
}

/// What happens to a client's connection when its handler's queue is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AffinityWhenFull {
    /// The socket with most room takes it, and the client moves there for good.
    #[default]
    Move,
    /// The client waits for its handler: the SYN is dropped and retransmitted (or refused,
    /// with --when-full refuse).
    Keep,
}

/// How a UDP group's datagrams are steered (docs/udp.md, "Modes").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UdpMode {
    /// Each datagram on its own, to a socket with receive-buffer room (DNS, NTP, syslog).
    #[default]
    Datagram,
    /// A flow's (4-tuple's) first datagram to a socket with room, and the rest of the flow
    /// to that socket until it is idle for --flow-timeout (servers with state per client).
    Flow,
    /// QUIC: a packet whose connection ID carries a socket's cookie to that socket; a
    /// connection's first flight by room, kept together by its connection ID until idle for
    /// --flow-timeout (docs/udp.md, "QUIC").
    Quic,
}

impl UdpMode {
    /// Whether the mode's program keeps a table (--flow-table, --flow-timeout): of flows, or
    /// of QUIC first flights.
    pub fn keeps_a_table(self) -> bool {
        matches!(self, UdpMode::Flow | UdpMode::Quic)
    }
}

/// The code each handler process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum HandlerKind {
    /// Echo every byte back until the client closes.
    Echo,
    /// HTTP/1.1: 200 with a short text body, keep-alive.
    Http,
    /// Any program given after `--`, handed its socket by socket activation (fd 3).
    Exec,
}

macro_rules! display_as_value_enum {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                use clap::ValueEnum as _;
                f.write_str(self.to_possible_value().expect("no skipped variants").get_name())
            }
        }
    )*};
}
display_as_value_enum!(
    Policy,
    WhenFull,
    Affinity,
    AffinityWhenFull,
    HandlerKind,
    UdpMode
);

/// One group: a set of SO_REUSEPORT sockets on one address and port, one per handler.
///
/// Each field is one setting: its doc comment is the flag's help, its name the config key
/// and JSON key, its `arg` the flag and default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Group name for pins and `parsrv status` [default: ADDR-PORT].
    #[arg(long, default_value = "", hide_default_value = true)]
    pub name: String,
    /// Address and port the handler sockets bind, e.g. 127.0.0.1:8080 or [::1]:8080. Give it
    /// again for more addresses (each gets its own handlers: slot i binds entry i % entries);
    /// a prefix and a port range (127.0.0.0/24:8080, [::1]:8000-8099) serve addresses and
    /// ports nobody binds. A connection to a full address goes to another's sockets.
    #[arg(long, value_name = "ADDR:PORT", required = true, action = ArgAction::Append,
          value_parser = listen::parse)]
    #[serde(with = "listen::one_or_many")]
    pub listen: Vec<Listen>,
    /// What each handler runs: a built-in server, or `exec` and a program after `--`.
    #[arg(long, value_enum)]
    pub handler: HandlerKind,
    /// Handler processes, one socket each (1 to 128): a count, or MIN..MAX to grow and
    /// shrink with load.
    #[arg(long, default_value = "4", value_name = "N|MIN..MAX")]
    pub handlers: HandlerRange,
    /// With --handlers MIN..MAX: change the size only by `parsrv group resize`, not with
    /// load (config key: `autoscale = false`).
    #[arg(long = "no-autoscale", action = ArgAction::SetFalse)]
    pub autoscale: bool,
    /// Accept-queue length of each socket (capped by net.core.somaxconn).
    #[arg(long, default_value_t = 128, value_name = "B")]
    pub backlog: u32,
    /// Threads accepting in parallel on each handler's socket (exec handlers get it as
    /// PARSRV_THREADS).
    #[arg(long, default_value_t = 1, value_name = "T")]
    pub threads: u32,
    /// Where a new connection goes while some socket has room.
    #[arg(long, value_enum, default_value_t)]
    pub policy: Policy,
    /// What happens when every socket is full.
    #[arg(long, value_enum, default_value_t)]
    pub when_full: WhenFull,
    /// Keep each client on one handler (`client`), or steer every connection on its own.
    #[arg(long, value_enum, default_value_t)]
    pub affinity: Affinity,
    /// With --affinity client: how many leading bits of the source address name a client,
    /// for IPv4 and IPv6.
    #[arg(long, default_value_t, value_name = "V4LEN,V6LEN")]
    pub affinity_prefix: ClientPrefix,
    /// With --affinity client: seconds a client may stay idle before its entry expires and
    /// its next connection is decided again.
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    pub affinity_timeout: f64,
    /// With --affinity client: clients the dispatch table holds; beyond that the least
    /// recently seen are forgotten. All of it is allocated at start (120 bytes each; `parsrv check` prints the total).
    #[arg(long, default_value_t = DEFAULT_TABLE_SIZE, value_name = "ENTRIES")]
    pub affinity_table: u32,
    /// With --affinity client: what happens when a client's handler has no room.
    #[arg(long, value_enum, default_value_t)]
    pub affinity_when_full: AffinityWhenFull,
    /// A UDP group: steer each datagram on its own (`datagram`), keep each flow (4-tuple)
    /// on the socket its first datagram went to (`flow`), or each QUIC connection on the
    /// socket its connection IDs name (`quic`).
    #[arg(long, value_enum, default_value_t)]
    #[serde(default, skip_serializing_if = "is_default")]
    pub udp_mode: UdpMode,
    /// A UDP group: each socket's receive buffer in bytes (8192 to 1073741824), as `parsrv
    /// status` shows it; by default the kernel's (net.core.rmem_default). Set whatever
    /// net.core.rmem_max says.
    #[arg(
        long,
        default_value_t = 0,
        hide_default_value = true,
        value_name = "BYTES"
    )]
    #[serde(default, skip_serializing_if = "is_zero")]
    pub receive_buffer: u32,
    /// With --udp-mode flow (quic): seconds a flow (a connection's first flight) may send
    /// nothing before its next datagram is placed again, as a new one's.
    #[arg(long, default_value_t = DEFAULT_FLOW_TIMEOUT_SECONDS, value_name = "SECONDS")]
    #[serde(default = "default_flow_timeout")]
    pub flow_timeout: f64,
    /// With --udp-mode flow (quic): flows (first flights) the kernel's table holds; beyond
    /// that the least recently used are forgotten. All of it is allocated at start (120 bytes each; `parsrv check` prints the total).
    #[arg(long, default_value_t = DEFAULT_FLOW_TABLE, value_name = "ENTRIES")]
    #[serde(default = "default_flow_table")]
    pub flow_table: u32,
    /// Pin handlers to these CPUs, round-robin by slot: `0-3`, `0,2`.
    #[arg(
        long,
        value_name = "LIST",
        default_value = "",
        hide_default_value = true
    )]
    #[serde(default, skip_serializing_if = "CpuList::is_empty")]
    pub cpus: CpuList,
    /// Run handlers as this user (and group), without capabilities; `dynamic`: as a uid of
    /// this group's own, which no user and no other group has (as systemd's DynamicUser=).
    #[arg(long, value_name = "NAME[:GROUP]|dynamic")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// An environment variable for the handlers (repeat for more; config key: `env = {
    /// KEY = "VALUE" }`). Handlers get these, PATH, LANG, LANGUAGE, LC_* and TZ from
    /// parsrv's environment, and the socket-activation variables: nothing else of it.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "environment::as_table"
    )]
    pub env: Vec<environment::EnvVar>,
    /// Seconds a handler may take to exit after SIGTERM before SIGKILL (and a drain).
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub grace: f64,
    /// Seconds a replacement handler may take to become ready in a restart.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub ready_timeout: f64,
    /// Handlers kept started and ready beyond the group's size, on sockets that take
    /// connections only when every other socket is full (as PHP-FPM's min_spare_servers):
    /// a burst is served at once while the autoscaler starts more. A step up makes a spare
    /// serve and starts a new spare; a step down makes the last serving handler a spare.
    #[arg(long, default_value_t = 0, value_name = "N")]
    #[serde(default, skip_serializing_if = "is_zero")]
    pub spare: u32,
    /// Seconds a handler may take no connection from its non-empty queue before it counts
    /// as stalled: its queue moves to the handlers that accept, and its socket takes new
    /// connections only when the others are full, until it serves again. 0: never.
    #[arg(long, default_value_t = DEFAULT_STALL_AFTER, value_name = "SECONDS")]
    #[serde(default = "default_stall_after")]
    pub stall_after: f64,
    /// Pass each handler its socket in non-blocking mode (O_NONBLOCK), as systemd's
    /// NonBlocking=yes does; by default it is blocking, as systemd passes it. Built-in
    /// handlers set the mode they need themselves.
    #[arg(long)]
    pub nonblocking: bool,
    /// Exec handlers speak systemd's notify protocol: each gets a NOTIFY_SOCKET of its own
    /// and is ready once it sends READY=1 (as a unit with Type=notify), instead of after a
    /// second of running. For servers that do (gunicorn). Built-in handlers say so anyway.
    #[arg(long)]
    pub notify: bool,
    /// On SIGINT/SIGTERM, refuse new connections (RST) and let the queued ones be served
    /// (at most --grace) before stopping the handlers.
    #[arg(long)]
    pub drain: bool,
    /// With --handler exec: the program each handler runs, and its arguments. It gets its
    /// socket as fd 3 with LISTEN_FDS=1, LISTEN_PID, LISTEN_FDNAMES (socket activation).
    #[arg(last = true, value_name = "COMMAND")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

/// `--stall-after`'s default, chosen by measurement (docs/steering.md#stalled-handlers).
pub const DEFAULT_STALL_AFTER: f64 = 0.1;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// A record written before flow mode existed runs with the defaults.
fn default_flow_timeout() -> f64 {
    DEFAULT_FLOW_TIMEOUT_SECONDS
}

fn default_flow_table() -> u32 {
    DEFAULT_FLOW_TABLE
}

/// A record written before `--stall-after` existed runs with the default.
fn default_stall_after() -> f64 {
    DEFAULT_STALL_AFTER
}

/// A user and group resolved from `--user`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
}

impl GroupSpec {
    /// A group on `listen` running `handler`, with every other setting at its default (the
    /// flags' defaults: they are declared once, on the fields).
    pub fn new(listen: Listen, handler: HandlerKind) -> Self {
        GroupSpec::on(&[listen], handler)
    }

    /// A group on several entries (see [`GroupSpec::new`]).
    pub fn on(listen: &[Listen], handler: HandlerKind) -> Self {
        use clap::{FromArgMatches, Parser};
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            spec: GroupSpec,
        }
        let mut args = vec![
            "defaults".to_owned(),
            "--handler".to_owned(),
            handler.to_string(),
        ];
        for entry in listen {
            args.push(format!("--listen={entry}"));
        }
        let matches = <Defaults as clap::CommandFactory>::command().get_matches_from(args);
        Defaults::from_arg_matches(&matches)
            .expect("the defaults parse")
            .spec
            .named()
    }

    /// This spec with its name filled in when none was given (`--name` defaults to the
    /// address).
    pub fn named(mut self) -> Self {
        if self.name.is_empty() {
            self.name = GroupSpec::default_name(&self.listen[0].bind_addr());
        }
        self
    }

    /// The name a group gets when none is given: its address and port, with the characters
    /// bpffs refuses in names ('.', and ':' for readability) replaced by '_'.
    pub fn default_name(listen: &SocketAddr) -> String {
        let ip = listen.ip().to_string().replace(['.', ':'], "_");
        match listen {
            SocketAddr::V4(_) => format!("{ip}-{}", listen.port()),
            SocketAddr::V6(_) => format!("ip6-{ip}-{}", listen.port()),
        }
    }
}

pub(crate) fn invalid(
    option: &'static str,
    value: impl fmt::Display,
    reason: impl Into<String>,
) -> Error {
    Error::InvalidOption {
        option,
        value: value.to_string(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid group with some settings off their defaults.
    pub(super) fn spec() -> GroupSpec {
        GroupSpec {
            name: "web".into(),
            backlog: 64,
            threads: 2,
            ..GroupSpec::new("127.0.0.1:8080".parse().unwrap(), HandlerKind::Http)
        }
    }

    #[test]
    fn enums_map_to_the_program_constants() {
        assert_eq!(
            Policy::Redirect.to_program(),
            parsrv_common::reuseport::policy::REDIRECT
        );
        assert_eq!(
            Policy::LeastLoaded.to_program(),
            parsrv_common::reuseport::policy::LEAST_LOADED
        );
        assert_eq!(
            WhenFull::Drop.to_program(),
            parsrv_common::reuseport::when_full::DROP
        );
        assert_eq!(
            WhenFull::Refuse.to_program(),
            parsrv_common::reuseport::when_full::REFUSE
        );
        assert_eq!(
            Policy::TwoChoices.to_program(),
            parsrv_common::reuseport::policy::TWO_CHOICES
        );
        assert_eq!(Policy::LeastLoaded.to_string(), "least-loaded");
    }
}
