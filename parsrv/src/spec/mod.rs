//! A group's spec: the one model of a group's settings. Each setting is declared once, as a
//! field of [`GroupSpec`] with its flag, default and help: `parsrv run` and `parsrv group
//! add` parse it from flags, a config file's keys are the same flags without the dashes
//! ([`crate::config_file`] parses them with the same parser), the JSON of `status` and of
//! control requests is its serde form, and `group show` prints that form as TOML. Every
//! check lives here, so every way of defining a group rejects the same values with the same
//! words.

pub mod dynamic_user;
pub mod environment;
pub mod flags;
mod host;
mod listen;
mod values;

pub use host::{executable_by, find_program, usable_cpus};
pub use listen::Listen;
pub use values::{format_cpus, parse_cpus, parse_listen, ClientPrefix, CpuList, HandlerRange};

use std::{fmt, net::SocketAddr};

use clap::ArgAction;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use parsrv_common::reuseport::{
    affinity::{DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE},
    MAX_SOCKETS,
};

/// Where a new connection goes while some socket has room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Keep the kernel's hash choice when it has room; otherwise the socket with most room.
    #[default]
    Redirect,
    /// Always the socket with the most room (ties broken by hash).
    LeastLoaded,
    /// The hash choice or one other socket at random, whichever has more room (the power
    /// of two choices); every socket is looked at only when both are full.
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
display_as_value_enum!(Policy, WhenFull, Affinity, AffinityWhenFull, HandlerKind);

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

    /// The entries as `status` and logs show them: `127.0.0.2:80 127.0.0.3:80`.
    pub fn listen_text(&self) -> String {
        let entries: Vec<String> = self.listen.iter().map(ToString::to_string).collect();
        entries.join(" ")
    }

    /// The first pair of entries, one of this group's and one of `other`'s, that a connection
    /// could match both of.
    pub fn overlap_with(&self, other: &GroupSpec) -> Option<(Listen, Listen)> {
        self.listen.iter().find_map(|a| {
            other
                .listen
                .iter()
                .find(|b| a.overlaps(b))
                .map(|b| (*a, *b))
        })
    }

    /// Where the slots' sockets bind, as a pattern that repeats: each entry's bound address,
    /// its COUNT times, in entry order (slot i binds `pattern[i % len]`).
    pub fn slot_pattern(&self) -> Vec<SocketAddr> {
        self.listen
            .iter()
            .flat_map(|l| std::iter::repeat_n(l.bind_addr(), l.count as usize))
            .collect()
    }

    /// Whether the group needs the sk_lookup program: more than one entry, or a prefix or
    /// a port range.
    pub fn needs_lookup(&self) -> bool {
        !matches!(self.listen.as_slice(), [one] if one.is_single())
    }

    /// Whether the group grows and shrinks with load (`--handlers MIN..MAX`, MIN < MAX).
    pub fn autoscaled(&self) -> bool {
        self.autoscale && self.handlers.max > self.handlers.min
    }

    /// The CPU handler `slot` is pinned to, if any.
    pub fn cpu_of(&self, slot: u32) -> Option<u32> {
        let cpus = &self.cpus.0;
        (!cpus.is_empty()).then(|| cpus[slot as usize % cpus.len()])
    }

    /// Resolves `--user NAME[:GROUP]` (default group: the user's own), or `dynamic` (see
    /// [`dynamic_user`]).
    pub fn credentials(&self) -> Result<Option<Credentials>> {
        let Some(spec) = &self.user else {
            return Ok(None);
        };
        if spec == dynamic_user::DYNAMIC {
            return Ok(Some(dynamic_user::credentials_of(&self.name)));
        }
        let (user_name, group_name) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec.as_str(), None),
        };
        let user = nix::unistd::User::from_name(user_name)
            .ok()
            .flatten()
            .ok_or_else(|| {
                invalid(
                    "--user",
                    spec,
                    "no such user: create it, or name one from /etc/passwd",
                )
            })?;
        let gid = match group_name {
            None => user.gid.as_raw(),
            Some(g) => nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| invalid("--user", spec, "no such group: name one from /etc/group"))?
                .gid
                .as_raw(),
        };
        Ok(Some(Credentials {
            uid: user.uid.as_raw(),
            gid,
        }))
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

    /// Checks every value; the first bad one is reported with its fix.
    pub fn validate(&self) -> Result<()> {
        match self.problems().into_iter().next() {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    /// What is wrong with the `--listen` entries as a whole.
    fn listen_problems(&self) -> Vec<Error> {
        use parsrv_common::lookup::{MAX_LISTENS, MAX_RULES};
        let mut problems = Vec::new();
        for entry in &self.listen {
            if entry.first_port == 0 {
                problems.push(invalid(
                    "--listen",
                    entry,
                    "port 0 would give each socket a different port: name a fixed port",
                ));
            }
        }
        for (i, a) in self.listen.iter().enumerate() {
            if let Some(b) = self.listen[..i].iter().find(|b| b.overlaps(a)) {
                problems.push(invalid(
                    "--listen",
                    a,
                    format!(
                        "overlaps --listen {b} of the same group: a connection would match \
                         both; give each address and port once"
                    ),
                ));
            }
        }
        let rules: u32 = self.listen.iter().map(Listen::rule_count).sum();
        if self.listen.len() > MAX_LISTENS as usize || rules > MAX_RULES {
            problems.push(invalid(
                "--listen",
                self.listen
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
                format!(
                    "{} entries with {rules} ports in all: a group serves at most {MAX_LISTENS} \
                     entries and {MAX_RULES} ports; split it into several groups",
                    self.listen.len()
                ),
            ));
        }
        // (A count below 1 is --handlers' own problem, reported with its range.)
        let round: u32 = self.listen.iter().map(|l| l.count).sum();
        if self.handlers.min >= 1 && self.listen.len() > 1 && self.handlers.min < round {
            problems.push(invalid(
                "--handlers",
                self.handlers,
                format!(
                    "each --listen entry needs its own handlers, {round} in a round of slots \
                     (one per entry, or its =COUNT): give at least {round} (as MIN with MIN..MAX)"
                ),
            ));
        }
        problems
    }

    /// Every bad value, each with its fix (a config file reports them all at once).
    pub fn problems(&self) -> Vec<Error> {
        let mut problems = Vec::new();
        if let Err(e) = validate_name(&self.name) {
            problems.push(e);
        }
        for (variable, why) in environment::HandlerEnv::problems_of(&self.env) {
            problems.push(invalid("--env", variable, why));
        }
        problems.extend(self.listen_problems());
        let range = self.handlers.to_string();
        let HandlerRange { min, max } = self.handlers;
        if !(1..=MAX_SOCKETS).contains(&min) || !(1..=MAX_SOCKETS).contains(&max) {
            problems.push(invalid(
                "--handlers",
                &range,
                format!("must be 1 to {MAX_SOCKETS} (the socket map's size)"),
            ));
        } else if max < min {
            problems.push(invalid("--handlers", &range, "MIN..MAX needs MIN <= MAX"));
        }
        if self.backlog == 0 {
            problems.push(invalid(
                "--backlog",
                self.backlog,
                "must be at least 1 (the accept-queue length of each socket)",
            ));
        }
        if !(1..=MAX_THREADS).contains(&self.threads) {
            problems.push(invalid(
                "--threads",
                self.threads,
                format!("must be 1 to {MAX_THREADS} accepting threads per handler"),
            ));
        }
        for (option, seconds) in [
            ("--grace", self.grace),
            ("--ready-timeout", self.ready_timeout),
        ] {
            if !(seconds.is_finite() && (0.0..=3600.0).contains(&seconds)) {
                problems.push(invalid(option, seconds, "must be 0 to 3600 seconds"));
            }
        }
        problems.extend(self.affinity_problems());
        let credentials = match self.credentials() {
            Ok(credentials) => credentials,
            Err(e) => {
                problems.push(e);
                None
            }
        };
        if self.notify && self.handler != HandlerKind::Exec {
            problems.push(invalid(
                "--notify",
                self.handler,
                "only for --handler exec: built-in handlers report readiness themselves",
            ));
        }
        match (self.handler, self.command.first()) {
            (HandlerKind::Exec, None) => problems.push(invalid(
                "--handler",
                "exec",
                "give the program after `--`, e.g. --handler exec -- uvicorn --fd 3 app:app",
            )),
            (HandlerKind::Exec, Some(program)) => match find_program(program) {
                Err(reason) => problems.push(invalid("--handler exec", program, reason)),
                Ok(path) => {
                    if let (Some(credentials), Some(user)) = (credentials, &self.user) {
                        if let Err(reason) = executable_by(&path, credentials) {
                            problems.push(invalid(
                                "--handler exec",
                                program,
                                format!("user {user} cannot run it: {reason}; install it where that user can reach it, or choose another --user"),
                            ));
                        }
                    }
                }
            },
            (_, Some(program)) => problems.push(invalid(
                "--handler",
                self.handler,
                format!("'{program}' after `--` needs --handler exec"),
            )),
            (_, None) => {}
        }
        let usable = usable_cpus();
        if let Some(cpu) = self.cpus.0.iter().find(|c| !usable.contains(c)) {
            problems.push(invalid(
                "--cpus",
                cpu,
                format!(
                    "not a CPU this process may use; usable: {}",
                    format_cpus(&usable)
                ),
            ));
        }
        problems
    }

    fn affinity_problems(&self) -> Vec<Error> {
        let mut problems = Vec::new();
        let ClientPrefix { v4, v6 } = self.affinity_prefix;
        if !(1..=32).contains(&v4) || !(1..=128).contains(&v6) {
            problems.push(invalid(
                "--affinity-prefix",
                self.affinity_prefix,
                "IPv4 lengths are 1 to 32 and IPv6 lengths 1 to 128, e.g. 32,64",
            ));
        }
        if !(self.affinity_timeout.is_finite()
            && (MIN_AFFINITY_TIMEOUT..=MAX_AFFINITY_TIMEOUT).contains(&self.affinity_timeout))
        {
            problems.push(invalid(
                "--affinity-timeout",
                self.affinity_timeout,
                format!(
                    "must be {MIN_AFFINITY_TIMEOUT} to {MAX_AFFINITY_TIMEOUT} seconds of idle time"
                ),
            ));
        }
        if !(1..=MAX_TABLE_SIZE).contains(&self.affinity_table) {
            problems.push(invalid(
                "--affinity-table",
                self.affinity_table,
                format!("must be 1 to {MAX_TABLE_SIZE} entries (512 MiB of kernel memory at most)"),
            ));
        }
        if self.affinity == Affinity::None {
            let defaults = GroupSpec::on(&self.listen, self.handler);
            let given = [
                (
                    "--affinity-prefix",
                    self.affinity_prefix.to_string(),
                    self.affinity_prefix != defaults.affinity_prefix,
                ),
                (
                    "--affinity-timeout",
                    self.affinity_timeout.to_string(),
                    self.affinity_timeout != defaults.affinity_timeout,
                ),
                (
                    "--affinity-table",
                    self.affinity_table.to_string(),
                    self.affinity_table != defaults.affinity_table,
                ),
                (
                    "--affinity-when-full",
                    self.affinity_when_full.to_string(),
                    self.affinity_when_full != defaults.affinity_when_full,
                ),
            ];
            if let Some((option, value, _)) = given.iter().find(|(_, _, given)| *given) {
                problems.push(invalid(
                    option,
                    value,
                    "only applies with --affinity client: add it, or drop this option",
                ));
            }
        }
        problems
    }

    /// The program's affinity settings.
    pub fn affinity_config(&self) -> parsrv_common::reuseport::affinity::AffinityConfig {
        use parsrv_common::reuseport::affinity::{mode, when_full, AffinityConfig};
        let (mask_v4, mask_v6) =
            AffinityConfig::masks(self.affinity_prefix.v4 as u8, self.affinity_prefix.v6 as u8);
        AffinityConfig {
            mode: match self.affinity {
                Affinity::None => mode::NONE,
                Affinity::Client => mode::CLIENT,
            },
            when_full: match self.affinity_when_full {
                AffinityWhenFull::Move => when_full::MOVE,
                AffinityWhenFull::Keep => when_full::KEEP,
            },
            timeout_ns: (self.affinity_timeout * 1e9) as u64,
            mask_v6,
            mask_v4,
            _reserved: 0,
        }
    }

    /// Entries of the dispatch table the kernel allocates: one when affinity is off (a map
    /// cannot be empty).
    /// What the group's dispatch table takes in kernel memory, for people: `None` without
    /// client affinity (then it has a one-entry table).
    pub fn dispatch_table_memory(&self) -> Option<String> {
        use parsrv_common::reuseport::affinity::{lru_table_bytes, ClientKey, DispatchEntry};
        (self.affinity == Affinity::Client).then(|| {
            let bytes = lru_table_bytes(
                self.affinity_table,
                size_of::<ClientKey>(),
                size_of::<DispatchEntry>(),
            );
            format!(
                "affinity table of {} clients: {:.1} MiB of locked kernel memory, allocated when \
                 the group starts",
                self.affinity_table,
                bytes as f64 / (1 << 20) as f64
            )
        })
    }

    pub fn dispatch_table_size(&self) -> u32 {
        match self.affinity {
            Affinity::None => 1,
            Affinity::Client => self.affinity_table,
        }
    }

    pub fn grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.grace)
    }

    pub fn ready_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.ready_timeout)
    }
}

/// Bounds of `--affinity-timeout`, seconds: below a second, entries would expire between a
/// browser's connections; a week is longer than any session worth keeping.
pub const MIN_AFFINITY_TIMEOUT: f64 = 1.0;
pub const MAX_AFFINITY_TIMEOUT: f64 = 7.0 * 86400.0;

/// Enough for any machine parsrv targets; more threads per socket only add wake-ups.
pub const MAX_THREADS: u32 = 1024;

fn validate_name(name: &str) -> Result<()> {
    // bpffs refuses '.' in names; a leading letter or digit keeps group names apart from
    // parsrv's own staging entries.
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "--name",
            name,
            "use 1 to 64 of A-Z a-z 0-9 - _, starting with a letter or digit",
        ))
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

    fn spec() -> GroupSpec {
        GroupSpec {
            name: "web".into(),
            backlog: 64,
            threads: 2,
            ..GroupSpec::new("127.0.0.1:8080".parse().unwrap(), HandlerKind::Http)
        }
    }

    #[test]
    fn problems_are_all_reported() {
        let mut s = spec();
        s.backlog = 0;
        s.threads = 0;
        s.grace = -1.0;
        let options: Vec<&str> = s
            .problems()
            .into_iter()
            .map(|p| match p {
                Error::InvalidOption { option, .. } => option,
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(options, ["--backlog", "--threads", "--grace"]);
    }

    fn rejected_option(spec: &GroupSpec) -> &'static str {
        match spec.validate() {
            Err(Error::InvalidOption { option, .. }) => option,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn a_handler_range_autoscales_unless_told_not_to() {
        let mut s = spec();
        assert!(!s.autoscaled());
        s.handlers = HandlerRange { min: 2, max: 8 };
        s.validate().unwrap();
        assert!(s.autoscaled());
        s.autoscale = false;
        assert!(!s.autoscaled());
    }

    #[test]
    fn accepts_a_sane_group() {
        spec().validate().unwrap();
    }

    #[test]
    fn rejects_each_bad_value_naming_its_option() {
        type Spoil = fn(&mut GroupSpec);
        let cases: [(&str, Spoil); 28] = [
            ("--affinity-prefix", |s| {
                s.affinity = Affinity::Client;
                s.affinity_prefix.v4 = 33;
            }),
            ("--affinity-prefix", |s| {
                s.affinity = Affinity::Client;
                s.affinity_prefix.v6 = 0;
            }),
            ("--affinity-timeout", |s| {
                s.affinity = Affinity::Client;
                s.affinity_timeout = 0.0;
            }),
            ("--affinity-table", |s| {
                s.affinity = Affinity::Client;
                s.affinity_table = 0;
            }),
            ("--affinity-table", |s| {
                s.affinity = Affinity::Client;
                s.affinity_table = MAX_TABLE_SIZE + 1;
            }),
            ("--affinity-timeout", |s| s.affinity_timeout = 60.0),
            ("--affinity-when-full", |s| {
                s.affinity_when_full = AffinityWhenFull::Keep
            }),
            ("--handlers", |s| s.handlers.min = 0),
            ("--handlers", |s| s.handlers.min = MAX_SOCKETS + 1),
            ("--handlers", |s| s.handlers.max = 2),
            ("--handlers", |s| s.handlers.max = MAX_SOCKETS + 1),
            ("--backlog", |s| s.backlog = 0),
            ("--threads", |s| s.threads = 0),
            ("--listen", |s| s.listen[0].first_port = 0),
            ("--listen", |s| s.listen.push(s.listen[0])),
            ("--listen", |s| {
                s.listen.push("127.0.0.0/8:1-65535".parse().unwrap())
            }),
            ("--handlers", |s| {
                s.handlers.min = 1;
                s.listen.push("127.0.0.2:80".parse().unwrap());
            }),
            ("--handlers", |s| {
                s.handlers = HandlerRange { min: 3, max: 3 };
                s.listen.push("127.0.0.2:80=3".parse().unwrap());
            }),
            ("--name", |s| s.name = "a/b".into()),
            ("--name", |s| s.name = "_staging".into()),
            ("--name", |s| s.name = "a.b".into()),
            ("--handler", |s| s.handler = HandlerKind::Exec),
            ("--handler", |s| s.command = vec!["true".into()]),
            ("--handler exec", |s| {
                s.handler = HandlerKind::Exec;
                s.command = vec!["no-such-program-parsrv".into()];
            }),
            ("--handler exec", |s| {
                s.handler = HandlerKind::Exec;
                s.command = vec!["/etc/passwd".into()];
            }),
            ("--cpus", |s| s.cpus = CpuList(vec![4095])),
            ("--user", |s| s.user = Some("no-such-user-parsrv".into())),
            ("--user", |s| {
                s.user = Some("root:no-such-group-parsrv".into())
            }),
        ];
        for (option, spoil) in cases {
            let mut s = spec();
            spoil(&mut s);
            assert_eq!(rejected_option(&s), option, "{s:?}");
        }
    }

    #[test]
    fn exec_cpus_and_user_that_exist_are_accepted() {
        let mut s = spec();
        s.handler = HandlerKind::Exec;
        s.command = vec!["true".into(), "--ignored".into()];
        s.cpus = CpuList(usable_cpus());
        s.user = Some("root:root".into());
        s.validate().unwrap();
        assert_eq!(
            s.credentials().unwrap(),
            Some(Credentials { uid: 0, gid: 0 })
        );
        assert_eq!(s.cpu_of(0), Some(s.cpus.0[0]));
        assert_eq!(
            s.cpu_of(s.cpus.0.len() as u32),
            Some(s.cpus.0[0]),
            "round-robin"
        );
        assert!(find_program("sh").unwrap().is_absolute());
    }

    #[test]
    fn limits_are_inclusive() {
        let mut s = spec();
        s.handlers = HandlerRange {
            min: MAX_SOCKETS,
            max: MAX_SOCKETS,
        };
        s.threads = MAX_THREADS;
        s.backlog = 1;
        s.validate().unwrap();
    }

    #[test]
    fn default_names_are_file_names() {
        assert_eq!(
            GroupSpec::default_name(&"127.0.0.1:8080".parse().unwrap()),
            "127_0_0_1-8080"
        );
        let v6 = GroupSpec::default_name(&"[::1]:8080".parse().unwrap());
        assert_eq!(v6, "ip6-__1-8080");
        validate_name(&v6).unwrap();
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
