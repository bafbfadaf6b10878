//! `--listen`: where a group serves. One entry is an address and a port (`127.0.0.1:8080`,
//! `[::1]:8080`), or a prefix of addresses and a range of ports (`127.0.0.0/24:8080`,
//! `[::1]:8000-8099`) that nobody binds: the group's sockets for it bind one address and port
//! of it ([`Listen::bind_addr`]) and the sk_lookup program hands them the rest. A group may
//! have several entries (`--listen` given again, `listen = [...]` in a file); each has its own
//! sockets: `ADDR=COUNT` gives an entry COUNT sockets in each round of the slots (slot `i`
//! binds the entry at `i % total` of the pattern each entry repeated COUNT times, in order;
//! by default COUNT is 1: round-robin).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use parsrv_common::lookup::{RuleKey, PORT_BITS, V4_MAPPED};

/// The protocol of a group's sockets: `udp://` before an entry makes it UDP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Listening TCP sockets (the default; `tcp://` may be written).
    #[default]
    Tcp,
    /// UDP sockets: each handler receives datagrams on its own socket, and the udp-datagram
    /// program sends each to a socket with receive-buffer room (docs/udp.md).
    Udp,
}

/// One `--listen` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Listen {
    pub transport: Transport,
    /// The first address of the prefix (the address itself for one address).
    pub addr: IpAddr,
    /// Prefix length: 32 (IPv4) or 128 (IPv6) for one address.
    pub prefix: u8,
    pub first_port: u16,
    pub last_port: u16,
    /// Sockets of this entry in each round of slots (`=COUNT`, default 1).
    pub count: u32,
}

pub(super) const LISTEN_FORM: &str = "expected ADDR:PORT with a numeric address (127.0.0.1:8080, \
     [::1]:8080), or a prefix and a port range (127.0.0.0/24:8080, [::1]:8000-8099), and \
     optionally =COUNT sockets (127.0.0.1:8080=3); udp://ADDR:PORT for UDP";

/// The most sockets one entry may ask for in a round (`=COUNT`): a group's most sockets.
const MAX_COUNT: u32 = parsrv_common::reuseport::MAX_SOCKETS;

impl Listen {
    fn full(addr: IpAddr) -> u8 {
        if addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// One address and port.
    pub fn single(addr: SocketAddr) -> Listen {
        Listen {
            transport: Transport::Tcp,
            addr: addr.ip(),
            prefix: Listen::full(addr.ip()),
            first_port: addr.port(),
            last_port: addr.port(),
            count: 1,
        }
    }

    /// One address and one port: the kernel's own lookup finds its sockets.
    pub fn is_single(&self) -> bool {
        self.prefix == Listen::full(self.addr) && self.first_port == self.last_port
    }

    /// Where the entry's sockets bind: the address itself, or for a prefix the first
    /// address after the network address (the network address of a /31, /32, /127, /128);
    /// the first port of a range.
    pub fn bind_addr(&self) -> SocketAddr {
        let host_bits = Listen::full(self.addr) - self.prefix;
        let ip = if host_bits >= 2 {
            match self.addr {
                IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) + 1)),
                IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) + 1)),
            }
        } else {
            self.addr
        };
        SocketAddr::new(ip, self.first_port)
    }

    /// The last address of the prefix.
    pub fn last_addr(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(v4) => {
                let host = u32::MAX.checked_shr(self.prefix as u32).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) | host))
            }
            IpAddr::V6(v6) => {
                let host = u128::MAX.checked_shr(self.prefix as u32).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) | host))
            }
        }
    }

    /// How many (prefix, port) rules the entry takes in the program's table: one per port.
    pub fn rule_count(&self) -> u32 {
        (self.last_port - self.first_port) as u32 + 1
    }

    /// The entry's rules: for each port, the LPM key (prefix length in bits, key).
    pub fn rules(&self) -> impl Iterator<Item = (u32, RuleKey)> + '_ {
        let addr = mapped(self.addr);
        // The port's bits, then the address's in its IPv6 form. A wildcard address covers
        // its family ([::] IPv4 too: a dual-stack socket takes both).
        let address_bits = match self.addr {
            IpAddr::V4(v4) if v4.is_unspecified() && self.is_single() => 96,
            IpAddr::V6(v6) if v6.is_unspecified() && self.is_single() => 0,
            _ => 128 - Listen::full(self.addr) as u32 + self.prefix as u32,
        };
        let prefix_len = PORT_BITS + address_bits;
        (self.first_port..=self.last_port).map(move |port| {
            (
                prefix_len,
                RuleKey {
                    port: port.to_be_bytes(),
                    addr,
                },
            )
        })
    }

    /// Whether a connection to `addr:port` could reach both entries: a common address (a
    /// wildcard covers its family, and [::] IPv4 too) and a common port.
    pub fn overlaps(&self, other: &Listen) -> bool {
        // TCP and UDP ports are separate spaces (DNS serves both on 53).
        if self.transport != other.transport
            || self.last_port < other.first_port
            || other.last_port < self.first_port
        {
            return false;
        }
        let wildcard = |l: &Listen| l.is_single() && l.addr.is_unspecified();
        match (self.addr, other.addr) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                wildcard(self) || wildcard(other) || self.contains(other) || other.contains(self)
            }
            (IpAddr::V6(_), IpAddr::V4(_)) => wildcard(self),
            (IpAddr::V4(_), IpAddr::V6(_)) => wildcard(other),
        }
    }

    /// Whether `other`'s first address lies in this prefix (same family).
    fn contains(&self, other: &Listen) -> bool {
        let (a, b) = (mapped(self.addr), mapped(other.addr));
        let bits = 128 - Listen::full(self.addr) as u32 + self.prefix as u32;
        let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
        u128::from_be_bytes(a) & mask == u128::from_be_bytes(b) & mask
    }
}

/// An address as the program's key holds it (IPv4 mapped into IPv6).
fn mapped(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => {
            let mut bytes = [0; 16];
            bytes[..12].copy_from_slice(&V4_MAPPED);
            bytes[12..].copy_from_slice(&v4.octets());
            bytes
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// `--listen`'s parser for clap.
pub(super) fn parse(value: &str) -> Result<Listen, String> {
    value.parse()
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let form = || LISTEN_FORM.to_string();
        let (transport, value) = if let Some(rest) = value.strip_prefix("udp://") {
            (Transport::Udp, rest)
        } else {
            (
                Transport::Tcp,
                value.strip_prefix("tcp://").unwrap_or(value),
            )
        };
        let (value, count) = match value.rsplit_once('=') {
            Some((value, count)) => match count.trim().parse::<u32>() {
                Ok(n) if (1..=MAX_COUNT).contains(&n) => (value, n),
                _ => {
                    return Err(format!(
                        "=COUNT '{count}' is not 1 to {MAX_COUNT}: the sockets this entry gets \
                         in each round of slots"
                    ))
                }
            },
            None => (value, 1),
        };
        // The port part is after the last ':' outside brackets.
        let (host, ports) = if let Some(rest) = value.strip_prefix('[') {
            let (host, ports) = rest.split_once("]:").ok_or_else(form)?;
            (host, ports)
        } else {
            value.rsplit_once(':').ok_or_else(form)?
        };
        let (addr, prefix) = match host.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (host, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| form())?;
        if value.starts_with('[') != addr.is_ipv6() {
            return Err(form());
        }
        let full = Listen::full(addr);
        let prefix = match prefix {
            Some(len) => match len.parse::<u8>() {
                Ok(len) if len <= full => len,
                _ => {
                    return Err(format!(
                        "prefix length '{len}' is not 0 to {full}: an {} prefix has {full} bits",
                        if addr.is_ipv4() { "IPv4" } else { "IPv6" }
                    ))
                }
            },
            None => full,
        };
        let port = |p: &str| p.trim().parse::<u16>().map_err(|_| form());
        let (first_port, last_port) = match ports.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(ports)?, port(ports)?),
        };
        if first_port > last_port {
            return Err(format!(
                "port range {first_port}-{last_port} is upside down: write the lower port first \
                 ({last_port}-{first_port})"
            ));
        }
        let listen = Listen {
            transport,
            addr,
            prefix,
            first_port,
            last_port,
            count,
        };
        // The first address of the prefix, whatever was written.
        let bits = 128 - full as u32 + prefix as u32;
        let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
        let network = u128::from_be_bytes(mapped(addr)) & mask;
        let addr = match addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(network as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(network)),
        };
        Ok(Listen { addr, ..listen })
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.transport == Transport::Udp {
            f.write_str("udp://")?;
        }
        let full = Listen::full(self.addr);
        let host = if self.prefix == full {
            self.addr.to_string()
        } else {
            format!("{}/{}", self.addr, self.prefix)
        };
        match self.addr {
            IpAddr::V4(_) => write!(f, "{host}:")?,
            IpAddr::V6(_) => write!(f, "[{host}]:")?,
        }
        if self.first_port == self.last_port {
            write!(f, "{}", self.first_port)?;
        } else {
            write!(f, "{}-{}", self.first_port, self.last_port)?;
        }
        if self.count != 1 {
            write!(f, "={}", self.count)?;
        }
        Ok(())
    }
}

impl Serialize for Listen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A group's entries in JSON and TOML: one entry as a string (as before there were several),
/// several as an array of strings.
pub mod one_or_many {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Listen;

    pub fn serialize<S: Serializer>(listen: &[Listen], s: S) -> Result<S::Ok, S::Error> {
        match listen {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Listen>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            One(Listen),
            Many(Vec<Listen>),
        }
        Ok(match Form::deserialize(d)? {
            Form::One(one) => vec![one],
            Form::Many(many) => many,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(text: &str) -> Listen {
        text.parse().unwrap()
    }

    #[test]
    fn reads_and_writes_every_form() {
        for text in [
            "127.0.0.1:8080",
            "[::1]:8080",
            "127.0.0.0/24:8080",
            "[::1]:8000-8099",
            "[2001:db8::/64]:443",
            "127.0.0.8/29:9001-9003",
            "127.0.0.2:8080=3",
            "[::1]:8000-8099=2",
            "udp://127.0.0.1:5353",
            "udp://[::1]:53",
        ] {
            assert_eq!(listen(text).to_string(), text);
        }
        assert_eq!(listen("tcp://127.0.0.1:80"), listen("127.0.0.1:80"));
        assert_eq!(listen("udp://127.0.0.1:53").transport, Transport::Udp);
        // The prefix's first address, whatever was written.
        assert_eq!(listen("127.0.0.9/29:80").to_string(), "127.0.0.8/29:80");
    }

    #[test]
    fn refuses_bad_forms_with_the_fix() {
        for (bad, says) in [
            ("127.0.0.1", "expected ADDR:PORT"),
            ("::1:80", "expected ADDR:PORT"),
            ("[127.0.0.1]:80", "expected ADDR:PORT"),
            ("127.0.0.1:8099-8000", "upside down"),
            ("127.0.0.0/33:80", "not 0 to 32"),
            ("[::1/129]:80", "not 0 to 128"),
            ("localhost:80", "numeric address"),
            ("127.0.0.1:80=0", "not 1 to 128"),
            ("127.0.0.1:80=x", "not 1 to 128"),
        ] {
            let err = bad.parse::<Listen>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_prefix_binds_its_first_host_address_and_first_port() {
        assert_eq!(
            listen("127.0.0.8/29:9001-9003").bind_addr(),
            "127.0.0.9:9001".parse().unwrap()
        );
        assert_eq!(
            listen("127.0.0.2:80").bind_addr(),
            "127.0.0.2:80".parse().unwrap()
        );
        assert_eq!(
            listen("[::1]:8000-8099").bind_addr(),
            "[::1]:8000".parse().unwrap()
        );
        assert_eq!(
            listen("127.0.0.8/29:80").last_addr(),
            "127.0.0.15".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn rules_cover_each_port_with_the_prefix_length_in_key_bits() {
        let rules: Vec<_> = listen("127.0.0.8/29:9001-9003").rules().collect();
        assert_eq!(rules.len(), 3);
        // 16 port bits, 96 bits of the IPv4-mapped prefix, 29 address bits.
        assert_eq!(rules[0].0, 16 + 96 + 29);
        assert_eq!(rules[2].1.port, 9003u16.to_be_bytes());
        assert_eq!(rules[0].1.addr[12..], [127, 0, 0, 8]);
        let (len, _) = listen("[::1]:80").rules().next().unwrap();
        assert_eq!(len, 16 + 128);
        // Wildcards cover their family; [::] IPv4 as well.
        assert_eq!(listen("0.0.0.0:80").rules().next().unwrap().0, 16 + 96);
        assert_eq!(listen("[::]:80").rules().next().unwrap().0, 16);
    }

    #[test]
    fn overlap_needs_a_common_port_and_address() {
        let overlaps = |a: &str, b: &str| listen(a).overlaps(&listen(b));
        assert!(overlaps("127.0.0.0/24:8080", "127.0.0.5:8080"));
        assert!(overlaps("127.0.0.1:8000-8099", "127.0.0.1:8050"));
        assert!(overlaps("0.0.0.0:80", "127.0.0.1:80"));
        assert!(overlaps("[::]:80", "127.0.0.1:80"));
        assert!(!overlaps("127.0.0.0/24:8080", "127.0.1.5:8080"));
        assert!(!overlaps("127.0.0.0/24:8080", "127.0.0.5:8081"));
        assert!(!overlaps("[::1]:80", "127.0.0.1:80"));
        assert!(!overlaps("udp://127.0.0.1:53", "127.0.0.1:53"));
        assert!(overlaps("udp://127.0.0.1:53", "udp://0.0.0.0:53"));
    }
}
