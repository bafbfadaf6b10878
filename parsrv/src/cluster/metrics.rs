//! A cluster agent's metrics (`metrics = "ADDR:PORT"` in `[cluster]`), from the same status
//! `parsrv cluster status --json` shows: its peers as it sees them, its table, and the
//! dispatcher's and the agent's counters (each described once, where it is declared).

use hyper::StatusCode;
use parsrv_common::cluster::{AgentCounters, DispatchCounters};

use super::{protocol::HostState, ClusterStatus};
use crate::metrics::{write, Exposed, Family};

impl Exposed for ClusterStatus {
    fn metrics(&self) -> String {
        render(self)
    }

    fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data") + "\n"
    }

    /// 200 while this host takes new clients; 503 while it joins or drains (a load
    /// balancer or a health-checking routing daemon then leaves it out).
    fn health(&self) -> (StatusCode, String) {
        match self.state {
            HostState::Ready => (StatusCode::OK, format!("host {} ready", self.host)),
            HostState::Joining => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("host {} joining: not every peer heard from yet", self.host),
            ),
            HostState::Draining => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("host {} draining", self.host),
            ),
        }
    }
}

/// The exposition text for one host's view of its cluster.
pub fn render(status: &ClusterStatus) -> String {
    let this = format!("cluster=\"{}\",host=\"{}\"", status.name, status.host);
    let one = |name: &str, kind, help, value: f64| Family {
        name: name.to_owned(),
        kind,
        help,
        samples: vec![(this.clone(), value)],
    };
    let peers =
        |name: &str, help, value: &dyn Fn(&crate::status::cluster::PeerStatus) -> f64| Family {
            name: name.to_owned(),
            kind: "gauge",
            help,
            samples: status
                .peers
                .iter()
                .map(|p| (format!("{this},peer=\"{}\"", p.host), value(p)))
                .collect(),
        };
    let mut families = vec![
        one(
            "parsrv_cluster_ready",
            "gauge",
            "1 while this host takes new clients.",
            (status.state == HostState::Ready) as u8 as f64,
        ),
        one(
            "parsrv_cluster_room",
            "gauge",
            "Free places in this host's accept queues, as it reports them to its peers.",
            status.room as f64,
        ),
        one(
            "parsrv_cluster_table_clients",
            "gauge",
            "Clients in this host's copy of the dispatch table.",
            status.table.clients as f64,
        ),
        one(
            "parsrv_cluster_table_served_here",
            "gauge",
            "Clients of the table this host serves.",
            status.table.served_here as f64,
        ),
        one(
            "parsrv_cluster_table_locked_here",
            "gauge",
            "Clients of the table this host's dispatcher locked and decided.",
            status.table.locked_here as f64,
        ),
        peers(
            "parsrv_cluster_peer_up",
            "1 while the peer is heard from within the time-out.",
            &|p| p.state.is_some() as u8 as f64,
        ),
        peers(
            "parsrv_cluster_peer_room",
            "Free places in the peer's accept queues, as it last reported.",
            &|p| p.room as f64,
        ),
        peers(
            "parsrv_cluster_peer_clients",
            "Clients of the table the peer serves.",
            &|p| p.clients as f64,
        ),
    ];
    for (counter, value) in DispatchCounters::COUNTERS
        .iter()
        .zip(status.dispatcher.values())
    {
        families.push(one(
            &format!("parsrv_cluster_packets_{}_total", counter.name),
            "counter",
            counter.help,
            value as f64,
        ));
    }
    for (counter, value) in AgentCounters::COUNTERS.iter().zip(status.messages.values()) {
        families.push(one(
            &format!("parsrv_cluster_agent_{}_total", counter.name),
            "counter",
            counter.help,
            value as f64,
        ));
    }
    write(&families)
}
