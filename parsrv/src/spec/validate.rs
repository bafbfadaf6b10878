//! The checks of a [`GroupSpec`]: every bad value, each reported with its option and its fix,
//! the same whichever way the group was defined.

use super::{
    environment, executable_by, find_program, format_cpus, invalid, usable_cpus, Affinity,
    ClientPrefix, GroupSpec, HandlerKind, HandlerRange, Listen, MAX_FLOW_TABLE, MAX_SOCKETS,
    MAX_TABLE_SIZE,
};
use crate::error::{Error, Result};

/// Bounds of `--affinity-timeout`, seconds: below a second, entries would expire between a
/// browser's connections; a week is longer than any session worth keeping.
pub const MIN_AFFINITY_TIMEOUT: f64 = 1.0;
pub const MAX_AFFINITY_TIMEOUT: f64 = 7.0 * 86400.0;

/// Bounds of `--flow-timeout`, seconds: a flow idle for less than 10 ms is no flow; a day is
/// longer than any UDP session keeps state.
pub const MIN_FLOW_TIMEOUT: f64 = 0.01;
pub const MAX_FLOW_TIMEOUT: f64 = 86400.0;

/// Bounds of `--receive-buffer`, bytes: twice the UDP program's reserve (a socket with less
/// never counts as having room), to 1 GiB (SO_RCVBUFFORCE takes half of it as an int).
pub const MIN_RECEIVE_BUFFER: u32 = 2 * parsrv_common::udp::DEFAULT_RESERVE;
pub const MAX_RECEIVE_BUFFER: u32 = 1 << 30;

/// Enough for any machine parsrv targets; more threads per socket only add wake-ups.
pub const MAX_THREADS: u32 = 1024;

impl GroupSpec {
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

    /// What a UDP group (`--listen udp://...`) cannot have: what exists for UDP so far is
    /// one address, a number of handlers resized by hand, and the three modes (docs/udp.md); a
    /// setting of TCP's accept queues or of what UDP groups do not do yet is refused, not
    /// ignored.
    fn udp_problems(&self) -> Vec<Error> {
        use super::Transport;
        let mut problems = Vec::new();
        let udp = self.listen.iter().filter(|l| l.transport == Transport::Udp);
        let Some(first) = udp.clone().next() else {
            return problems;
        };
        if udp.count() != self.listen.len() || self.listen.len() > 1 {
            problems.push(invalid(
                "--listen",
                first,
                "a UDP group has one --listen entry, and no TCP one: give TCP and UDP on one \
                 port as two groups",
            ));
        }
        if !first.is_single() || first.count != 1 {
            problems.push(invalid(
                "--listen",
                first,
                "a UDP group serves one address and port, without a prefix, range or =COUNT \
                 (not supported for UDP yet)",
            ));
        }
        let defaults = GroupSpec::new(*first, self.handler);
        let tcp_only = |option: &'static str, value: String| {
            invalid(
                option,
                value,
                "is a TCP setting: a UDP group has no accept queue; leave it out",
            )
        };
        if self.policy != defaults.policy {
            problems.push(tcp_only("--policy", self.policy.to_string()));
        }
        if self.when_full != defaults.when_full {
            problems.push(tcp_only("--when-full", self.when_full.to_string()));
        }
        if self.backlog != defaults.backlog {
            problems.push(tcp_only("--backlog", self.backlog.to_string()));
        }
        if self.drain {
            problems.push(tcp_only("--drain", "true".into()));
        }
        if self.affinity != Affinity::None {
            problems.push(invalid(
                "--affinity",
                self.affinity,
                "UDP groups have no client affinity yet (docs/udp.md); leave it out",
            ));
        }
        if self.handler == HandlerKind::Http {
            problems.push(invalid(
                "--handler",
                self.handler,
                "HTTP is TCP: a UDP group runs --handler echo or exec",
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
        problems.extend(self.udp_problems());
        problems.extend(self.udp_setting_problems());
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
        } else if max + self.spare > MAX_SOCKETS {
            problems.push(invalid(
                "--spare",
                self.spare,
                format!(
                    "with --handlers {range}, at most {} (MAX + spares is at most {MAX_SOCKETS}, \
                     the socket map's size)",
                    MAX_SOCKETS - max
                ),
            ));
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
        if !(self.stall_after == 0.0
            || (self.stall_after.is_finite() && (0.01..=3600.0).contains(&self.stall_after)))
        {
            problems.push(invalid(
                "--stall-after",
                self.stall_after,
                "must be 0 (off) or 0.01 to 3600 seconds",
            ));
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

    /// What is wrong with the UDP settings: bounds, and a setting given where it does not
    /// apply (a TCP group's `--udp-mode` or `--receive-buffer`, a datagram group's flow
    /// settings).
    fn udp_setting_problems(&self) -> Vec<Error> {
        let mut problems = Vec::new();
        if !(self.flow_timeout.is_finite()
            && (MIN_FLOW_TIMEOUT..=MAX_FLOW_TIMEOUT).contains(&self.flow_timeout))
        {
            problems.push(invalid(
                "--flow-timeout",
                self.flow_timeout,
                format!("must be {MIN_FLOW_TIMEOUT} to {MAX_FLOW_TIMEOUT} seconds of idle time"),
            ));
        }
        if !(1..=MAX_FLOW_TABLE).contains(&self.flow_table) {
            problems.push(invalid(
                "--flow-table",
                self.flow_table,
                format!("must be 1 to {MAX_FLOW_TABLE} entries (480 MiB of kernel memory at most)"),
            ));
        }
        if self.receive_buffer != 0
            && !(MIN_RECEIVE_BUFFER..=MAX_RECEIVE_BUFFER).contains(&self.receive_buffer)
        {
            problems.push(invalid(
                "--receive-buffer",
                self.receive_buffer,
                format!(
                    "must be {MIN_RECEIVE_BUFFER} to {MAX_RECEIVE_BUFFER} bytes (twice the \
                     room the program needs to count a socket as having room, to 1 GiB)"
                ),
            ));
        }
        if !self.is_udp() && self.receive_buffer != 0 {
            problems.push(invalid(
                "--receive-buffer",
                self.receive_buffer,
                "is a UDP setting (a TCP group's room is its accept queue: --backlog); leave it out",
            ));
        }
        let defaults = GroupSpec::on(&self.listen, self.handler);
        if !self.is_udp() && self.udp_mode != defaults.udp_mode {
            problems.push(invalid(
                "--udp-mode",
                self.udp_mode,
                "is a UDP setting (a TCP connection stays with its handler anyway); leave it out",
            ));
        }
        if !self.udp_mode.keeps_a_table() {
            let given = [
                (
                    "--flow-timeout",
                    self.flow_timeout.to_string(),
                    self.flow_timeout != defaults.flow_timeout,
                ),
                (
                    "--flow-table",
                    self.flow_table.to_string(),
                    self.flow_table != defaults.flow_table,
                ),
            ];
            if let Some((option, value, _)) = given.iter().find(|(_, _, given)| *given) {
                problems.push(invalid(
                    option,
                    value,
                    "only applies with --udp-mode flow or quic: add one, or drop this option",
                ));
            }
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
}

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

#[cfg(test)]
mod tests {
    use super::super::{tests::spec, AffinityWhenFull, CpuList, Credentials, UdpMode};
    use super::*;

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

    fn udp_group() -> GroupSpec {
        GroupSpec::new("udp://127.0.0.1:443".parse().unwrap(), HandlerKind::Echo)
    }

    #[test]
    fn a_udp_group_in_flow_mode_is_accepted() {
        GroupSpec {
            udp_mode: UdpMode::Flow,
            flow_timeout: 5.0,
            flow_table: 1024,
            receive_buffer: 65536,
            ..udp_group()
        }
        .validate()
        .unwrap();
    }

    /// A UDP group may have a range of handlers, autoscaled by its receive buffers as a TCP
    /// group is by its accept queues (or resized by hand with --no-autoscale).
    #[test]
    fn a_udp_group_with_a_range_of_handlers_is_accepted_and_autoscaled() {
        let mut udp = udp_group();
        udp.handlers = "2..4".parse().unwrap();
        assert!(udp.autoscale);
        udp.validate().unwrap();
        assert!(udp.autoscaled());
        udp.autoscale = false;
        assert!(!udp.autoscaled());
        let mut tcp = spec();
        tcp.handlers = "2..4".parse().unwrap();
        assert!(tcp.autoscaled());
    }

    fn rejected_option(spec: &GroupSpec) -> &'static str {
        match spec.validate() {
            Err(Error::InvalidOption { option, .. }) => option,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_sane_group() {
        spec().validate().unwrap();
    }

    #[test]
    fn rejects_each_bad_value_naming_its_option() {
        type Spoil = fn(&mut GroupSpec);
        let cases: [(&str, Spoil); 36] = [
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
            ("--udp-mode", |s| s.udp_mode = UdpMode::Flow),
            ("--receive-buffer", |s| s.receive_buffer = 1 << 20),
            ("--receive-buffer", |s| {
                *s = udp_group();
                s.receive_buffer = 4096;
            }),
            ("--flow-timeout", |s| s.flow_timeout = 60.0),
            ("--flow-table", |s| {
                s.udp_mode = UdpMode::Flow;
                s.flow_table = MAX_FLOW_TABLE + 1;
            }),
            ("--flow-timeout", |s| {
                *s = udp_group();
                s.flow_timeout = 3600.0;
            }),
            ("--flow-timeout", |s| {
                *s = udp_group();
                s.udp_mode = UdpMode::Flow;
                s.flow_timeout = 0.0;
            }),
            ("--flow-table", |s| {
                *s = udp_group();
                s.udp_mode = UdpMode::Quic;
                s.flow_table = 0;
            }),
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
}
