//! `parsrv cluster status`: this host, its peers as it sees them, its table and its
//! dispatcher's counters. One model, sent as JSON by the agent (`crate::cluster`) over the
//! control protocol and rendered by the CLI; beside the groups' status, so that the control
//! protocol's types depend on no agent.

use std::net::SocketAddr;

use parsrv_common::cluster::{AgentCounters, DispatchCounters};
use serde::{Deserialize, Serialize};

/// Where a host is in the cluster, as it says in its heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostState {
    /// Not yet taking clients (it has not heard from every peer yet).
    Joining,
    Ready,
    Draining,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub name: String,
    pub host: u16,
    pub agent_pid: u32,
    pub state: HostState,
    pub room: i32,
    pub service: SocketAddr,
    pub interface: String,
    pub peers: Vec<PeerStatus>,
    pub table: TableStatus,
    pub dispatcher: DispatchCounters,
    pub messages: AgentCounters,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub host: u16,
    pub address: SocketAddr,
    /// None: never heard from, or gone (silent for longer than the peer time-out).
    pub state: Option<HostState>,
    pub room: i32,
    /// Milliseconds since its last message.
    pub heard_ms_ago: Option<u64>,
    /// Whether this agent's connection to it is up.
    pub connected: bool,
    /// Clients of the table it serves.
    pub clients: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableStatus {
    pub clients: usize,
    /// Served by this host.
    pub served_here: usize,
    /// Locked and decided by this host's dispatcher.
    pub locked_here: usize,
}

impl ClusterStatus {
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let state = |s: Option<HostState>| match s {
            Some(HostState::Joining) => "joining",
            Some(HostState::Ready) => "ready",
            Some(HostState::Draining) => "draining",
            None => "gone",
        };
        let _ = writeln!(
            out,
            "cluster {}: host {} ({}, room {}), service {} on {}, agent pid {}",
            self.name,
            self.host,
            state(Some(self.state)),
            self.room,
            self.service,
            self.interface,
            self.agent_pid
        );
        let _ = writeln!(
            out,
            "table: {} clients, {} served here, {} locked here",
            self.table.clients, self.table.served_here, self.table.locked_here
        );
        let _ = writeln!(
            out,
            "{:>5} {:<22} {:<9} {:>6} {:>9} {:>7} {:>8}",
            "peer", "address", "state", "room", "heard", "link", "clients"
        );
        for peer in &self.peers {
            let heard = peer
                .heard_ms_ago
                .map_or("never".to_owned(), |ms| format!("{ms}ms"));
            let _ = writeln!(
                out,
                "{:>5} {:<22} {:<9} {:>6} {:>9} {:>7} {:>8}",
                peer.host,
                peer.address.to_string(),
                state(peer.state),
                peer.room,
                heard,
                if peer.connected { "up" } else { "down" },
                peer.clients
            );
        }
        let line = |counters: &[parsrv_common::Counter], values: &[u64]| {
            counters
                .iter()
                .zip(values)
                .map(|(c, v)| format!("{} {v}", c.column))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "dispatcher: {}",
            line(DispatchCounters::COUNTERS, &self.dispatcher.values())
        );
        let _ = writeln!(
            out,
            "agent: {}",
            line(AgentCounters::COUNTERS, &self.messages.values())
        );
        out
    }
}
