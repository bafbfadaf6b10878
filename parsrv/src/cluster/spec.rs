//! The `[cluster]` section of the config file: who this host is, its peers, the service.
//!
//! ```toml
//! [cluster]
//! name = "web"                          # its pins: /sys/fs/bpf/parsrv/_cluster-web/
//! host = 1                              # this host's id, 1..=16, unique in the cluster
//! address = "192.0.2.11:7946"           # where this host's agent takes its peers' messages
//! interface = "eth0"                    # towards the routers: the dispatcher runs here
//! service = "203.0.113.10:80"           # the address the routers spread (on this host's lo)
//! group = "web"                         # the local group that serves it (its room is shared)
//! peers = [{ host = 2, address = "192.0.2.12:7946" }, { host = 3, address = "192.0.2.13:7946" }]
//! ready = ["birdc", "enable", "service"]     # optional: run when this host takes clients
//! draining = ["birdc", "disable", "service"] # optional: run when it stops taking new ones
//! metrics = "127.0.0.1:9101"                # optional: Prometheus, /status, /healthz
//! # Peers speak mutual TLS (`parsrv cluster certs --name web --hosts 1,2,3 --dir DIR`
//! # makes these); `plaintext = true` instead sends peer messages in the clear.
//! tls = { ca = "/etc/parsrv/cluster/ca.pem", cert = "/etc/parsrv/cluster/host-1.pem", key = "/etc/parsrv/cluster/host-1.key" }
//! ```

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use parsrv_common::cluster::MAX_HOSTS;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub name: String,
    pub host: u16,
    pub address: SocketAddr,
    pub interface: String,
    pub service: SocketAddrV4,
    pub group: String,
    pub peers: Vec<Peer>,
    /// Milliseconds without a message after which a peer counts as gone.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    /// Seconds a client may stay without connections on its host before its entry goes.
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// Most clients in the dispatch table.
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    /// Command run when this host starts taking new clients (e.g. announce the service
    /// route through the routing daemon).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ready: Vec<String>,
    /// Command run when this host stops taking new clients (withdraw the route).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<String>,
    /// Prometheus metrics, `/status` and `/healthz` of this host's agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// The cluster's CA and this host's certificate and key: peers speak mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::tls::TlsFiles>,
    /// Peer messages in the clear, recognised by source address only: for a network only
    /// the cluster's hosts can reach. Exactly one of `tls` and `plaintext = true` is needed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plaintext: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub host: u16,
    pub address: SocketAddr,
}

fn default_peer_timeout_ms() -> u64 {
    1500
}

fn default_idle_timeout_s() -> u64 {
    300
}

fn default_table_size() -> u32 {
    65536
}

impl ClusterSpec {
    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_s)
    }

    pub fn service_ip(&self) -> Ipv4Addr {
        *self.service.ip()
    }

    /// The peer whose agent connects from `ip`, if any.
    pub fn peer_at(&self, ip: std::net::IpAddr) -> Option<&Peer> {
        self.peers.iter().find(|p| p.address.ip() == ip)
    }

    /// What is wrong with it, each a sentence naming the cause and the fix (empty: valid).
    /// Only what can be seen without the host: [`crate::cluster::check_host`] checks the
    /// interface and the service address.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let valid_id = |id: u16| id >= 1 && id as u32 <= MAX_HOSTS;
        problems.extend(invalid_name(&self.name));
        match (&self.tls, self.plaintext) {
            (Some(_), true) => problems.push(
                "both tls and plaintext = true: peers speak one or the other; remove one".into(),
            ),
            (None, false) => problems.push(
                "no tls: give tls = { ca = ..., cert = ..., key = ... } (`parsrv cluster certs` \
                 makes them), or plaintext = true to send peer messages in the clear"
                    .into(),
            ),
            _ => {}
        }
        if !valid_id(self.host) {
            problems.push(format!("host {}: a host id is 1 to {MAX_HOSTS}", self.host));
        }
        if self.service.port() == 0 || self.address.port() == 0 {
            problems.push("service and address need a port other than 0".into());
        }
        if self.peers.is_empty() {
            problems.push("no peers: a cluster needs at least one other host".into());
        }
        let mut ids = BTreeSet::from([self.host]);
        let mut addresses = BTreeSet::from([self.address]);
        for peer in &self.peers {
            if !valid_id(peer.host) {
                problems.push(format!(
                    "peer host {}: a host id is 1 to {MAX_HOSTS}",
                    peer.host
                ));
            }
            if !ids.insert(peer.host) {
                problems.push(format!(
                    "host id {} is used twice (this host and peers must have distinct ids)",
                    peer.host
                ));
            }
            if !addresses.insert(peer.address) {
                problems.push(format!(
                    "address {} is used twice (each host's agent has its own)",
                    peer.address
                ));
            }
        }
        if self.peer_timeout_ms < 100 {
            problems.push(
                "peer_timeout_ms below 100: peers would count as gone between two heartbeats"
                    .into(),
            );
        }
        use parsrv_common::reuseport::affinity::{lru_table_bytes, MAX_TABLE_SIZE};
        if !(1..=MAX_TABLE_SIZE).contains(&self.table_size) {
            problems.push(format!(
                "table_size {}: give the most clients the table holds, 1 to {MAX_TABLE_SIZE} \
                 ({} MiB of kernel memory at most)",
                self.table_size,
                lru_table_bytes(
                    MAX_TABLE_SIZE,
                    size_of::<[u8; 4]>(),
                    size_of::<parsrv_common::cluster::ClientEntry>()
                ) >> 20
            ));
        }
        problems
    }
}

/// What is wrong with a cluster's name, if anything: it names pins and certificates.
pub fn invalid_name(name: &str) -> Option<String> {
    let valid = !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (!valid).then(|| format!("cluster name '{name}': use 1 to 48 letters, digits, '-' and '_'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ClusterSpec {
        toml::from_str(
            r#"
            name = "web"
            host = 1
            address = "192.0.2.11:7946"
            interface = "eth0"
            service = "203.0.113.10:80"
            group = "web"
            peers = [{ host = 2, address = "192.0.2.12:7946" }]
            plaintext = true
            "#,
        )
        .unwrap()
    }

    #[test]
    fn a_valid_section_has_no_problem_and_defaults() {
        let spec = spec();
        assert_eq!(spec.problems(), Vec::<String>::new());
        assert_eq!(spec.peer_timeout(), Duration::from_millis(1500));
        assert_eq!(spec.table_size, 65536);
    }

    #[test]
    fn duplicate_ids_and_addresses_are_named() {
        let mut spec = spec();
        spec.peers.push(Peer {
            host: 1,
            address: "192.0.2.12:7946".parse().unwrap(),
        });
        let problems = spec.problems();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("host id 1 is used twice")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("192.0.2.12:7946 is used twice")),
            "{problems:?}"
        );
        spec.host = 17;
        assert!(spec.problems().iter().any(|p| p.contains("host 17")));
    }
}
