//! The validated model of one socket group. The CLI builds it from flags; every check lives
//! here so that every way of defining a group rejects the same values with the same words.

use std::{fmt, net::SocketAddr, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use parsrv_common::MAX_SOCKETS;

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
            Policy::Redirect => parsrv_common::policy::REDIRECT,
            Policy::LeastLoaded => parsrv_common::policy::LEAST_LOADED,
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
            WhenFull::Drop => parsrv_common::when_full::DROP,
            WhenFull::Refuse => parsrv_common::when_full::REFUSE,
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    /// Names the bpffs pin directory and the control socket.
    pub name: String,
    pub listen: SocketAddr,
    pub handlers: u32,
    pub backlog: u32,
    pub handler: HandlerKind,
    pub threads: u32,
    pub policy: Policy,
    pub when_full: WhenFull,
}

impl GroupSpec {
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
        validate_name(&self.name)?;
        if self.listen.port() == 0 {
            return Err(invalid(
                "--listen",
                self.listen,
                "port 0 would give each socket a different port: name a fixed port",
            ));
        }
        if !(1..=MAX_SOCKETS).contains(&self.handlers) {
            return Err(invalid(
                "--handlers",
                self.handlers,
                format!("must be 1 to {MAX_SOCKETS} (the socket map's size)"),
            ));
        }
        if self.backlog == 0 {
            return Err(invalid(
                "--backlog",
                self.backlog,
                "must be at least 1 (the accept-queue length of each socket)",
            ));
        }
        if !(1..=MAX_THREADS).contains(&self.threads) {
            return Err(invalid(
                "--threads",
                self.threads,
                format!("must be 1 to {MAX_THREADS} accepting threads per handler"),
            ));
        }
        Ok(())
    }
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
            backlog: 64,
            handler: HandlerKind::Http,
            threads: 2,
            policy: Policy::Redirect,
            when_full: WhenFull::Drop,
        }
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
        let cases: [(&str, Spoil); 8] = [
            ("--handlers", |s| s.handlers = 0),
            ("--handlers", |s| s.handlers = MAX_SOCKETS + 1),
            ("--backlog", |s| s.backlog = 0),
            ("--threads", |s| s.threads = 0),
            ("--listen", |s| s.listen.set_port(0)),
            ("--name", |s| s.name = "a/b".into()),
            ("--name", |s| s.name = "_staging".into()),
            ("--name", |s| s.name = "a.b".into()),
        ];
        for (option, spoil) in cases {
            let mut s = spec();
            spoil(&mut s);
            assert_eq!(rejected_option(&s), option, "{s:?}");
        }
    }

    #[test]
    fn limits_are_inclusive() {
        let mut s = spec();
        s.handlers = MAX_SOCKETS;
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
            parsrv_common::policy::REDIRECT
        );
        assert_eq!(
            Policy::LeastLoaded.to_program(),
            parsrv_common::policy::LEAST_LOADED
        );
        assert_eq!(WhenFull::Drop.to_program(), parsrv_common::when_full::DROP);
        assert_eq!(
            WhenFull::Refuse.to_program(),
            parsrv_common::when_full::REFUSE
        );
        assert_eq!(Policy::LeastLoaded.to_string(), "least-loaded");
    }
}
