//! `parsrv affinity`: the clients of a group with client affinity and where they go.

use super::group::done;
use crate::{
    control::{self, Request, Response},
    error::{Error, Result},
};

pub(super) fn affinity(group: &str, client: Option<std::net::IpAddr>, json: bool) -> Result<()> {
    let entries = match control::request(group, &Request::Affinity { client })? {
        Response::Affinity(entries) => entries,
        other => return done(group.to_owned(), other),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&entries).expect("plain data")
        );
        return Ok(());
    }
    if let (Some(client), true) = (client, entries.is_empty()) {
        return Err(Error::Rejected(format!(
            "group {group} has no entry for client {client}: it has not connected, or its \
             entry expired or was forgotten"
        )));
    }
    println!(
        "{:<40} {:>4} {:>8} {:>10} {:>10}",
        "client", "slot", "pid", "age-s", "idle-s"
    );
    for e in &entries {
        println!(
            "{:<40} {:>4} {:>8} {:>10.1} {:>10.1}",
            e.entry.client.to_string(),
            e.entry.slot,
            e.pid.map_or("-".to_string(), |p| p.to_string()),
            e.entry.age_ms as f64 / 1e3,
            e.entry.idle_ms as f64 / 1e3
        );
    }
    Ok(())
}
