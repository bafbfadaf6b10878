//! The values of settings that have a form of their own: `--handlers N|MIN..MAX`, `--cpus
//! LIST`, `--listen ADDR:PORT`. Each reads and writes the same text on the command line, in
//! a config file and in JSON.

use std::{fmt, net::SocketAddr, str::FromStr};

use serde::{Deserialize, Serialize};

use super::invalid;
use crate::error::{Error, Result};

/// `--handlers`: a fixed count (`4`, min = max) or a range `MIN..MAX`. In a file and in JSON
/// it is the number or the string, as on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandlerRange {
    pub min: u32,
    pub max: u32,
}

impl FromStr for HandlerRange {
    type Err = String;

    fn from_str(value: &str) -> std::result::Result<Self, String> {
        let bad = || "expected a count (4) or a range MIN..MAX (2..8)".to_string();
        let number = |s: &str| s.trim().parse::<u32>().map_err(|_| bad());
        match value.split_once("..") {
            Some((min, max)) => Ok(HandlerRange {
                min: number(min)?,
                max: number(max)?,
            }),
            None => number(value).map(|n| HandlerRange { min: n, max: n }),
        }
    }
}

impl fmt::Display for HandlerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..{}", self.min, self.max)
        }
    }
}

impl Serialize for HandlerRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.min == self.max {
            s.serialize_u32(self.min)
        } else {
            s.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for HandlerRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Count(u32),
            Range(String),
        }
        match Form::deserialize(d)? {
            Form::Count(n) => Ok(HandlerRange { min: n, max: n }),
            Form::Range(range) => range.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `--affinity-prefix V4LEN,V6LEN`: how much of a client's source address names the client
/// (32,64: an IPv4 address, an IPv6 /64, which one host or home network usually has).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientPrefix {
    pub v4: u32,
    pub v6: u32,
}

impl Default for ClientPrefix {
    fn default() -> Self {
        ClientPrefix { v4: 32, v6: 64 }
    }
}

impl FromStr for ClientPrefix {
    type Err = String;

    fn from_str(value: &str) -> std::result::Result<Self, String> {
        let bad = || "expected two prefix lengths V4LEN,V6LEN, e.g. 32,64".to_string();
        let (v4, v6) = value.split_once(',').ok_or_else(bad)?;
        let number = |s: &str| s.trim().parse::<u32>().map_err(|_| bad());
        Ok(ClientPrefix {
            v4: number(v4)?,
            v6: number(v6)?,
        })
    }
}

impl fmt::Display for ClientPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.v4, self.v6)
    }
}

/// Values written in JSON and TOML as the text of their flag.
macro_rules! serde_as_text {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    )*};
}
serde_as_text!(ClientPrefix, CpuList);

/// `--cpus`: CPU numbers, written as a list of numbers and ranges (`0-3`, `0,2`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuList(pub Vec<u32>);

impl CpuList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for CpuList {
    type Err = String;

    fn from_str(list: &str) -> std::result::Result<Self, String> {
        if list.is_empty() {
            return Ok(CpuList::default());
        }
        parse_cpus(list).map(CpuList).map_err(|e| match e {
            Error::InvalidOption { reason, .. } => reason,
            other => other.to_string(),
        })
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_cpus(&self.0))
    }
}

/// `--listen`'s parser, with the fix in its words.
pub(super) fn listen_value(value: &str) -> std::result::Result<SocketAddr, String> {
    SocketAddr::from_str(value).map_err(|_| LISTEN_FORM.to_string())
}

const LISTEN_FORM: &str =
    "expected ADDR:PORT with a numeric address, e.g. 127.0.0.1:8080 or [::1]:8080";

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

/// Parses `ADDR:PORT` (`127.0.0.1:8080`, `[::1]:8080`, `0.0.0.0:80`), with the fix in the error.
pub fn parse_listen(value: &str) -> Result<SocketAddr> {
    listen_value(value).map_err(|reason| invalid("--listen", value, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handlers_parse_as_count_or_range() {
        let range = |min, max| HandlerRange { min, max };
        assert_eq!("4".parse(), Ok(range(4, 4)));
        assert_eq!("2..8".parse(), Ok(range(2, 8)));
        assert_eq!(range(2, 8).to_string(), "2..8");
        assert_eq!(range(4, 4).to_string(), "4");
        for bad in ["", "x", "2..", "..8", "2...8", "-1"] {
            assert!(bad.parse::<HandlerRange>().is_err(), "{bad}");
        }
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
}
