//! The validated model of one socket group. The CLI builds it from flags; every check lives
//! here so that every way of defining a group rejects the same values with the same words.

use std::{fmt, net::SocketAddr, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use parsrv_common::reuseport::MAX_SOCKETS;

/// Where a new connection goes while some socket has room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Keep the kernel's hash choice when it has room; otherwise the socket with most room.
    #[default]
    Redirect,
    /// Always the socket with the most room (ties broken by hash).
    LeastLoaded,
}

impl Policy {
    pub fn to_program(self) -> u32 {
        match self {
            Policy::Redirect => parsrv_common::reuseport::policy::REDIRECT,
            Policy::LeastLoaded => parsrv_common::reuseport::policy::LEAST_LOADED,
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
display_as_value_enum!(Policy, WhenFull, HandlerKind);

/// One group: a set of SO_REUSEPORT sockets on one address and port, one per handler.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupSpec {
    /// Names the bpffs pin directory and the control socket.
    pub name: String,
    pub listen: SocketAddr,
    /// Handlers at start, and the least the group shrinks to (`--handlers N` or MIN..MAX).
    pub handlers: u32,
    /// The most the group grows to; equal to `handlers` when the size is fixed.
    pub handlers_max: u32,
    /// Whether load changes the size within MIN..MAX (otherwise only `parsrv group resize`).
    #[serde(default = "enabled")]
    pub autoscale: bool,
    pub backlog: u32,
    pub handler: HandlerKind,
    pub threads: u32,
    pub policy: Policy,
    pub when_full: WhenFull,
    /// The program and its arguments, for `HandlerKind::Exec` (empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// CPUs handlers are pinned to, round-robin by slot (empty: not pinned).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpus: Vec<u32>,
    /// Who handlers run as (`NAME` or `NAME:GROUP`); `None`: as the spawner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Seconds a handler may take to exit after SIGTERM before SIGKILL (and a drain).
    pub grace: f64,
    /// Seconds a replacement handler may take to become ready in a restart.
    pub ready_timeout: f64,
    /// Refuse new connections and serve the queued ones before stopping.
    pub drain: bool,
}

/// Defaults shared by the flags and the config file.
pub mod defaults {
    pub const HANDLERS: u32 = 4;
    pub const BACKLOG: u32 = 128;
    pub const THREADS: u32 = 1;
    pub const GRACE: f64 = 5.0;
    pub const READY_TIMEOUT: f64 = 10.0;
}

/// A user and group resolved from `--user`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
}

impl GroupSpec {
    /// A group on `listen` running `handler`, with every other setting at its default.
    pub fn new(listen: SocketAddr, handler: HandlerKind) -> Self {
        GroupSpec {
            name: GroupSpec::default_name(&listen),
            listen,
            handlers: defaults::HANDLERS,
            handlers_max: defaults::HANDLERS,
            autoscale: true,
            backlog: defaults::BACKLOG,
            handler,
            threads: defaults::THREADS,
            policy: Policy::default(),
            when_full: WhenFull::default(),
            command: Vec::new(),
            cpus: Vec::new(),
            user: None,
            grace: defaults::GRACE,
            ready_timeout: defaults::READY_TIMEOUT,
            drain: false,
        }
    }

    /// Whether the group grows and shrinks with load (`--handlers MIN..MAX`, MIN < MAX).
    pub fn autoscaled(&self) -> bool {
        self.autoscale && self.handlers_max > self.handlers
    }

    /// The CPU handler `slot` is pinned to, if any.
    pub fn cpu_of(&self, slot: u32) -> Option<u32> {
        (!self.cpus.is_empty()).then(|| self.cpus[slot as usize % self.cpus.len()])
    }

    /// Resolves `--user NAME[:GROUP]` (default group: the user's own).
    pub fn credentials(&self) -> Result<Option<Credentials>> {
        let Some(spec) = &self.user else {
            return Ok(None);
        };
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

    /// Every bad value, each with its fix (a config file reports them all at once).
    pub fn problems(&self) -> Vec<Error> {
        let mut problems = Vec::new();
        if let Err(e) = validate_name(&self.name) {
            problems.push(e);
        }
        if self.listen.port() == 0 {
            problems.push(invalid(
                "--listen",
                self.listen,
                "port 0 would give each socket a different port: name a fixed port",
            ));
        }
        let range = if self.handlers_max != self.handlers {
            format!("{}..{}", self.handlers, self.handlers_max)
        } else {
            self.handlers.to_string()
        };
        if !(1..=MAX_SOCKETS).contains(&self.handlers)
            || !(1..=MAX_SOCKETS).contains(&self.handlers_max)
        {
            problems.push(invalid(
                "--handlers",
                &range,
                format!("must be 1 to {MAX_SOCKETS} (the socket map's size)"),
            ));
        } else if self.handlers_max < self.handlers {
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
        let credentials = match self.credentials() {
            Ok(credentials) => credentials,
            Err(e) => {
                problems.push(e);
                None
            }
        };
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
        if let Some(cpu) = self.cpus.iter().find(|c| !usable.contains(c)) {
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

    pub fn grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.grace)
    }

    pub fn ready_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.ready_timeout)
    }
}

/// Where `program` resolves (a path, or a name looked up in PATH), if it can be executed.
pub fn find_program(program: &str) -> std::result::Result<std::path::PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let candidates: Vec<std::path::PathBuf> = if program.contains('/') {
        vec![program.into()]
    } else {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join(program))
            .collect()
    };
    let mut found_not_executable = None;
    for path in candidates {
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
                return Ok(path)
            }
            Ok(_) => found_not_executable = Some(path),
            Err(_) => {}
        }
    }
    Err(match found_not_executable {
        Some(path) => format!("{} is not an executable file: chmod +x it", path.display()),
        None if program.contains('/') => "no such file: check the path".to_string(),
        None => "not found in PATH: give its full path, or install it".to_string(),
    })
}

/// Whether a process with exactly these credentials (handlers keep no supplementary group)
/// may execute `path`: search permission on every directory on the way, execute permission
/// on the file. Permission bits only (no ACLs); root passes.
pub fn executable_by(
    path: &std::path::Path,
    credentials: Credentials,
) -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if credentials.uid == 0 {
        return Ok(());
    }
    let path = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let allowed = |meta: &std::fs::Metadata| {
        let mode = meta.mode();
        if meta.uid() == credentials.uid {
            mode & 0o100 != 0
        } else if meta.gid() == credentials.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        }
    };
    for dir in path.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !allowed(&meta) {
            return Err(format!("no search permission on {}", dir.display()));
        }
    }
    let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !allowed(&meta) {
        return Err(format!("no execute permission on {}", path.display()));
    }
    Ok(())
}

/// CPUs this process may run on (its affinity mask).
pub fn usable_cpus() -> Vec<u32> {
    nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| {
            (0..nix::sched::CpuSet::count() as u32)
                .filter(|&cpu| set.is_set(cpu as usize).unwrap_or(false))
                .collect()
        })
        .unwrap_or_default()
}

/// Parses a CPU list: `0-3`, `0,2`, `0-1,4`.
pub fn parse_cpus(list: &str) -> Result<Vec<u32>> {
    let bad = |reason: &str| invalid("--cpus", list, reason.to_string());
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let part = part.trim();
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let (first, last): (u32, u32) = match (first.parse(), last.parse()) {
            (Ok(a), Ok(b)) if a <= b => (a, b),
            _ => return Err(bad("expected CPU numbers and ranges, e.g. 0-3 or 0,2")),
        };
        if last - first >= 4096 {
            return Err(bad("range too large"));
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// `[0, 1, 2, 5]` -> `0-2,5`.
pub fn format_cpus(cpus: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        while i + 1 < cpus.len() && cpus[i + 1] == cpus[i] + 1 {
            i += 1;
        }
        parts.push(if cpus[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", cpus[i])
        });
        i += 1;
    }
    parts.join(",")
}

fn enabled() -> bool {
    true
}

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

fn invalid(option: &'static str, value: impl fmt::Display, reason: impl Into<String>) -> Error {
    Error::InvalidOption {
        option,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Parses `--handlers`: `N` (fixed) or `MIN..MAX` (autoscaled between them).
pub fn parse_handlers(value: &str) -> Result<(u32, u32)> {
    let bad = || {
        invalid(
            "--handlers",
            value,
            "expected a count (4) or a range MIN..MAX (2..8)",
        )
    };
    match value.split_once("..") {
        Some((min, max)) => Ok((
            min.trim().parse().map_err(|_| bad())?,
            max.trim().parse().map_err(|_| bad())?,
        )),
        None => {
            let n = value.trim().parse().map_err(|_| bad())?;
            Ok((n, n))
        }
    }
}

/// Parses `ADDR:PORT` (`127.0.0.1:8080`, `[::1]:8080`, `0.0.0.0:80`), with the fix in the error.
pub fn parse_listen(value: &str) -> Result<SocketAddr> {
    SocketAddr::from_str(value).map_err(|_| {
        invalid(
            "--listen",
            value,
            "expected ADDR:PORT with a numeric address, e.g. 127.0.0.1:8080 or [::1]:8080",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GroupSpec {
        GroupSpec {
            name: "web".into(),
            listen: "127.0.0.1:8080".parse().unwrap(),
            handlers: 4,
            handlers_max: 4,
            autoscale: true,
            backlog: 64,
            handler: HandlerKind::Http,
            threads: 2,
            policy: Policy::Redirect,
            when_full: WhenFull::Drop,
            command: vec![],
            cpus: vec![],
            user: None,
            grace: 5.0,
            ready_timeout: 10.0,
            drain: false,
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
    fn accepts_a_sane_group() {
        spec().validate().unwrap();
    }

    #[test]
    fn rejects_each_bad_value_naming_its_option() {
        type Spoil = fn(&mut GroupSpec);
        let cases: [(&str, Spoil); 17] = [
            ("--handlers", |s| s.handlers = 0),
            ("--handlers", |s| s.handlers = MAX_SOCKETS + 1),
            ("--handlers", |s| s.handlers_max = 2),
            ("--handlers", |s| s.handlers_max = MAX_SOCKETS + 1),
            ("--backlog", |s| s.backlog = 0),
            ("--threads", |s| s.threads = 0),
            ("--listen", |s| s.listen.set_port(0)),
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
            ("--cpus", |s| s.cpus = vec![4095]),
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
        s.cpus = usable_cpus();
        s.user = Some("root:root".into());
        s.validate().unwrap();
        assert_eq!(
            s.credentials().unwrap(),
            Some(Credentials { uid: 0, gid: 0 })
        );
        assert_eq!(s.cpu_of(0), Some(s.cpus[0]));
        assert_eq!(
            s.cpu_of(s.cpus.len() as u32),
            Some(s.cpus[0]),
            "round-robin"
        );
        assert!(find_program("sh").unwrap().is_absolute());
    }

    #[test]
    fn executable_by_walks_directories_and_mode_bits() {
        use std::os::unix::fs::PermissionsExt;
        let nobody = Credentials {
            uid: 65534,
            gid: 65534,
        };
        executable_by(std::path::Path::new("/bin/sh"), nobody).unwrap();
        let dir = std::env::temp_dir().join(format!("parsrv-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let program = dir.join("prog");
        std::fs::write(&program, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = executable_by(&program, nobody).unwrap_err();
        assert!(err.starts_with("no execute permission"), "{err}");
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        executable_by(&program, nobody).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = executable_by(&program, nobody).unwrap_err();
        assert!(err.starts_with("no search permission on"), "{err}");
        executable_by(&program, Credentials { uid: 0, gid: 0 }).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn handlers_parse_as_count_or_range() {
        assert_eq!(parse_handlers("4").unwrap(), (4, 4));
        assert_eq!(parse_handlers("2..8").unwrap(), (2, 8));
        for bad in ["", "x", "2..", "..8", "2...8", "-1"] {
            assert_eq!(
                parse_handlers(bad).unwrap_err().exit_code(),
                crate::error::EXIT_USAGE,
                "{bad}"
            );
        }
        let mut s = spec();
        (s.handlers, s.handlers_max) = (2, 8);
        s.validate().unwrap();
        assert!(s.autoscaled());
    }

    #[test]
    fn cpu_lists_parse_and_print() {
        assert_eq!(parse_cpus("0-1").unwrap(), [0, 1]);
        assert_eq!(parse_cpus("3,0-1, 1").unwrap(), [0, 1, 3]);
        for bad in ["", "a", "2-1", "0-", "-1", "0-99999"] {
            assert_eq!(
                parse_cpus(bad).unwrap_err().exit_code(),
                crate::error::EXIT_USAGE,
                "{bad}"
            );
        }
        assert_eq!(format_cpus(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert!(!usable_cpus().is_empty());
    }

    #[test]
    fn limits_are_inclusive() {
        let mut s = spec();
        s.handlers = MAX_SOCKETS;
        s.handlers_max = MAX_SOCKETS;
        s.threads = MAX_THREADS;
        s.backlog = 1;
        s.validate().unwrap();
    }

    #[test]
    fn listen_parses_v4_and_v6_and_explains_bad_input() {
        assert_eq!(parse_listen("127.0.0.1:80").unwrap().port(), 80);
        assert!(parse_listen("[::1]:8080").unwrap().is_ipv6());
        for bad in ["localhost:80", "127.0.0.1", "127.0.0.1:99999", "::1:80", ""] {
            let err = parse_listen(bad).unwrap_err();
            assert!(
                err.to_string().contains("expected ADDR:PORT"),
                "{bad}: {err}"
            );
            assert_eq!(err.exit_code(), crate::error::EXIT_USAGE);
        }
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
        assert_eq!(Policy::LeastLoaded.to_string(), "least-loaded");
    }
}
