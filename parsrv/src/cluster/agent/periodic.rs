//! The agent's periodic work: the dispatcher's decisions sent on as they come, the
//! heartbeat (this host's load, and a look at the peers), the local group's room, and the
//! expiry of idle clients.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Instant};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use super::{Shared, EXPIRY_EVERY, HEARTBEAT, LOAD_EVERY};
use crate::{
    cluster::protocol::{Message, WireEntry, ENTRIES_PER_MESSAGE},
    control::{self, Request, Response},
    dataplane::cluster::decision_from,
};

/// Sends on to every peer each entry the dispatcher places.
pub(super) async fn broadcast_decisions(agent: Shared, ring: RingBuf<MapData>) {
    // SAFETY: the ring owns its fd, which stays open (and the same) until the AsyncFd drops
    // it.
    let mut ring =
        match unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) } {
            Ok(ring) => ring,
            Err(e) => {
                log::error!("watching the dispatcher's ring: {}", e.into_parts().1);
                return;
            }
        };
    loop {
        let Ok(mut ready) = ring.readable_mut().await else {
            return;
        };
        // The kernel wakes the reader when a record arrives with nothing unread before it:
        // empty the ring before waiting again.
        let mut entries = Vec::new();
        while let Some(item) = ready.get_inner_mut().next() {
            if let Some(decision) = decision_from(&item) {
                entries.push(WireEntry::new(decision.client, &decision.entry));
            }
        }
        ready.clear_ready();
        if entries.is_empty() {
            continue;
        }
        let mut agent = agent.borrow_mut();
        agent.messages.broadcast += entries.len() as u64;
        for chunk in entries.chunks(ENTRIES_PER_MESSAGE) {
            agent.send_all(&Message::Entries {
                entries: chunk.to_vec(),
            });
        }
    }
}

/// Sends this host's load every beat, and looks at its peers.
pub(super) async fn heartbeat(agent: Shared) {
    let mut beat = tokio::time::interval(HEARTBEAT);
    loop {
        beat.tick().await;
        let mut agent = agent.borrow_mut();
        let load = Message::Load {
            state: agent.membership.state(),
            room: agent.room,
        };
        agent.send_all(&load);
        agent.check_peers();
    }
}

/// Reads the free places of the local group's queues (its sockets that take connections).
pub(super) async fn read_load(agent: Shared) {
    let group = agent.borrow().spec.group.clone();
    let mut every = tokio::time::interval(LOAD_EVERY);
    loop {
        every.tick().await;
        let asked = group.clone();
        let room =
            tokio::task::spawn_blocking(move || match control::request(&asked, &Request::Room) {
                Ok(Response::Room(room)) => Some(room),
                _ => None,
            })
            .await
            .ok()
            .flatten();
        let mut agent = agent.borrow_mut();
        match room {
            Some(room) => agent.room = room,
            None => log::debug!(
                "group '{group}' did not answer: the room stays {}",
                agent.room
            ),
        }
        if let Err(e) = agent.write_own_host() {
            log::error!("recording this host's load: {e}");
        }
    }
}

/// Forgets this host's clients that have had no connection here for the idle time-out, and
/// tells the peers.
pub(super) async fn expire(agent: Shared) {
    let mut every = tokio::time::interval(EXPIRY_EVERY);
    loop {
        every.tick().await;
        let service = agent.borrow().spec.service;
        let connected = tokio::task::spawn_blocking(move || crate::sock_diag::clients_of(service))
            .await
            .map_err(std::io::Error::other)
            .and_then(|read| read);
        let mut agent = agent.borrow_mut();
        agent.forget_long_gone();
        // Not knowing who is connected is not "nobody": an unread round expires nothing.
        let connected = match connected {
            Ok(connected) => connected,
            Err(e) => {
                log::warn!("reading the connections to {service}: {e}; no client expires now");
                continue;
            }
        };
        let this = agent.this_host();
        let served_here: BTreeSet<Ipv4Addr> = agent
            .dispatcher
            .clients()
            .into_iter()
            .filter(|(_, e)| e.host == this)
            .map(|(c, _)| Ipv4Addr::from(c))
            .collect();
        let expired = agent.idle.expired(&served_here, &connected, Instant::now());
        if expired.is_empty() {
            continue;
        }
        for client in &expired {
            agent.dispatcher.forget_client(client.octets());
        }
        agent.messages.expired += expired.len() as u64;
        agent.send_all(&Message::Forget { clients: expired });
    }
}
