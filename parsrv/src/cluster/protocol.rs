//! What the hosts' agents tell each other (the dispatch table updates), one JSON
//! object per line over TCP. Each agent connects to every configured peer and sends on that
//! connection only; it reads what its peers send on the connections they opened. A
//! connection from an address that is not a configured peer, or whose hello names another
//! host or cluster, is closed at once.
//!
//! JSON lines rather than a binary format: a few hundred bytes per new client, readable with
//! `socat` when something goes wrong. (A gossip library such as memberlist, or etcd, would
//! fit a large cluster; explicitly configured peers and full-mesh broadcast fit this design and
//! a handful of hosts without another daemon.)

use std::net::Ipv4Addr;

use parsrv_common::cluster::ClientEntry;
use serde::{Deserialize, Serialize};

pub use crate::status::cluster::HostState;

/// Longest line accepted (a full table is sent in chunks of [`ENTRIES_PER_MESSAGE`]).
pub const MAX_LINE: usize = 1 << 20;

/// Entries per `entries` message when a whole table is sent.
pub const ENTRIES_PER_MESSAGE: usize = 2048;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Message {
    /// First on every connection: who is talking.
    Hello {
        cluster: String,
        host: u16,
        /// Its MAC on the shared segment, `aa:bb:cc:dd:ee:ff`.
        mac: String,
    },
    /// Every heartbeat: whether the host takes new clients, and its free queue places.
    Load { state: HostState, room: i32 },
    /// Entries placed (a client lock and its decision, made in one step by the dispatcher
    /// that saw the client first), or this host's whole table when a peer connects.
    Entries { entries: Vec<WireEntry> },
    /// Clients whose entries expired on the host that served them.
    Forget { clients: Vec<Ipv4Addr> },
    /// After the table sent on a new connection: the receiver has all the sender knew.
    Synced,
}

/// One dispatch table entry on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    pub client: Ipv4Addr,
    /// The host that serves the client.
    pub host: u16,
    /// The host whose dispatcher placed the lock.
    pub locker: u16,
    /// When (CLOCK_MONOTONIC of the locker's machine, ns): with `locker`, orders two locks.
    pub locked_ns: u64,
}

impl WireEntry {
    pub fn new(client: [u8; 4], entry: &ClientEntry) -> WireEntry {
        WireEntry {
            client: Ipv4Addr::from(client),
            host: entry.host,
            locker: entry.locker,
            locked_ns: entry.locked_ns,
        }
    }

    /// As the dispatcher stores it, last seen `now`.
    pub fn entry(&self, now_ns: u64) -> ClientEntry {
        ClientEntry {
            host: self.host,
            locker: self.locker,
            flags: 0,
            locked_ns: self.locked_ns,
            last_seen_ns: now_ns,
        }
    }
}

pub fn encode(message: &Message) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("serializable");
    line.push(b'\n');
    line
}

pub fn decode(line: &str) -> Result<Message, serde_json::Error> {
    serde_json::from_str(line)
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_one_line_each() {
        let messages = [
            Message::Hello {
                cluster: "web".into(),
                host: 2,
                mac: format_mac([2, 0, 0, 0, 0, 0x1f]),
            },
            Message::Load {
                state: HostState::Draining,
                room: -3,
            },
            Message::Entries {
                entries: vec![WireEntry {
                    client: Ipv4Addr::new(198, 51, 100, 7),
                    host: 3,
                    locker: 1,
                    locked_ns: 42,
                }],
            },
            Message::Forget {
                clients: vec![Ipv4Addr::new(198, 51, 100, 7)],
            },
            Message::Synced,
        ];
        for message in messages {
            let line = encode(&message);
            assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
            let text = std::str::from_utf8(&line).unwrap();
            assert_eq!(decode(text.trim_end()).unwrap(), message);
        }
        assert!(encode(&Message::Load {
            state: HostState::Ready,
            room: 1
        })
        .starts_with(br#"{"type":"load","state":"ready""#));
    }

    #[test]
    fn macs_parse_and_print() {
        assert_eq!(parse_mac("02:00:00:00:00:1f"), Some([2, 0, 0, 0, 0, 0x1f]));
        assert_eq!(format_mac([2, 0, 0, 0, 0, 0x1f]), "02:00:00:00:00:1f");
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:1f:00"), None);
        assert_eq!(parse_mac("zz:00:00:00:00:1f"), None);
    }
}
