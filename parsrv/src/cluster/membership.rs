//! Who is in the cluster, as one agent sees it: each peer's state and load, whether it is
//! present, whether its table has arrived, whether it is gone and since when; and this
//! host's own state (joining until it may take clients). A pure state machine: it is fed
//! the time and what the transport heard, and answers with what changed; the agent
//! (`cluster::agent`) writes that to the dispatcher and runs the hooks. Unit-tested here
//! without sockets or namespaces.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use parsrv_common::cluster::host_state;

use super::protocol::HostState;

/// One peer, as this agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// What it last said of itself.
    pub state: HostState,
    pub room: i32,
    pub last_heard: Option<Instant>,
    /// Heard within the time-out: its MAC is in the dispatcher and its clients are its own.
    pub present: bool,
    /// Its whole table has arrived (since it was last present).
    pub synced: bool,
    /// Was present, then went silent (since then): no new client goes there; its clients'
    /// entries stay for the idle time-out (it may be only its agent that died).
    pub gone_since: Option<Instant>,
}

/// What changed, for the agent to act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A peer was heard for the first time, or again after it was gone.
    Up(u16),
    /// A peer went silent for longer than the time-out.
    Gone(u16),
    /// This host may take new clients now.
    Ready,
}

#[derive(Clone, Debug)]
pub struct Membership {
    this_host: u16,
    peer_timeout: Duration,
    idle_timeout: Duration,
    started: Instant,
    state: HostState,
    peers: BTreeMap<u16, Peer>,
}

impl Membership {
    /// A joining host with `peers`, none heard yet, at `now`.
    pub fn new(
        this_host: u16,
        peers: impl IntoIterator<Item = u16>,
        peer_timeout: Duration,
        idle_timeout: Duration,
        now: Instant,
    ) -> Membership {
        let peers = peers
            .into_iter()
            .map(|id| {
                let peer = Peer {
                    state: HostState::Joining,
                    room: 0,
                    last_heard: None,
                    present: false,
                    synced: false,
                    gone_since: None,
                };
                (id, peer)
            })
            .collect();
        Membership {
            this_host,
            peer_timeout,
            idle_timeout,
            started: now,
            state: HostState::Joining,
            peers,
        }
    }

    pub fn this_host(&self) -> u16 {
        self.this_host
    }

    /// This host's own state.
    pub fn state(&self) -> HostState {
        self.state
    }

    /// This host stops taking new clients (it withdraws).
    pub fn drain(&mut self) {
        self.state = HostState::Draining;
    }

    pub fn peers(&self) -> &BTreeMap<u16, Peer> {
        &self.peers
    }

    /// A message (any) came from `from` at `now`. Panics for a host that is not a
    /// configured peer: the transport takes messages only from those.
    pub fn heard(&mut self, from: u16, now: Instant) -> Option<Change> {
        let peer = self.peers.get_mut(&from).expect("a configured peer");
        peer.last_heard = Some(now);
        if peer.present {
            return None;
        }
        peer.present = true;
        peer.gone_since = None;
        Some(Change::Up(from))
    }

    /// `from` said its state and room.
    pub fn load(&mut self, from: u16, state: HostState, room: i32) {
        let peer = self.peers.get_mut(&from).expect("a configured peer");
        peer.state = state;
        peer.room = room;
    }

    /// `from`'s whole table has arrived.
    pub fn synced(&mut self, from: u16) {
        self.peers.get_mut(&from).expect("a configured peer").synced = true;
    }

    /// Looks at the peers at `now`: those silent for longer than the peer time-out are gone
    /// (no new client goes there, their clients' next connections are decided again). This
    /// host stays joining until every peer has been heard from and has sent its table, or
    /// one time-out has passed (the others are down): taking clients before would pass
    /// packets of live connections that this host does not know to its own stack.
    pub fn tick(&mut self, now: Instant) -> Vec<Change> {
        let timeout = self.peer_timeout;
        let mut changes = Vec::new();
        for (id, peer) in &mut self.peers {
            let silent = peer
                .last_heard
                .is_none_or(|t| now.saturating_duration_since(t) > timeout);
            if peer.present && silent {
                peer.present = false;
                peer.synced = false;
                peer.gone_since = Some(now);
                changes.push(Change::Gone(*id));
            }
        }
        if self.state == HostState::Joining {
            let all_heard = self.peers.values().all(|p| p.present && p.synced);
            if all_heard || now.saturating_duration_since(self.started) > timeout {
                self.state = HostState::Ready;
                changes.push(Change::Ready);
            }
        }
        changes
    }

    /// Peers gone for longer than the idle time-out at `now`: nobody else would expire their
    /// clients.
    pub fn long_gone(&self, now: Instant) -> BTreeSet<u16> {
        self.peers
            .iter()
            .filter(|(_, p)| {
                p.gone_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.idle_timeout)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether entries naming `host` hold: this host, or a peer not known to be gone (one
    /// not heard from yet may just be slower to connect than its peers' tables).
    pub fn not_gone(&self, host: u16) -> bool {
        host == self.this_host
            || self
                .peers
                .get(&host)
                .is_some_and(|p| p.gone_since.is_none())
    }

    /// This host's state as the dispatcher's host table says it: only a ready host takes
    /// new clients.
    pub fn own_host_state(&self) -> u16 {
        match self.state {
            HostState::Ready => host_state::READY,
            HostState::Joining | HostState::Draining => host_state::DRAINING,
        }
    }

    /// Peer `id`'s state as the dispatcher's host table says it.
    pub fn peer_host_state(&self, id: u16) -> u16 {
        let peer = &self.peers[&id];
        match (peer.present, peer.state) {
            (false, _) => host_state::ABSENT,
            (true, HostState::Ready) => host_state::READY,
            (true, _) => host_state::DRAINING,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER_TIMEOUT: Duration = Duration::from_millis(500);
    const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

    fn two_peers(start: Instant) -> Membership {
        Membership::new(1, [2, 3], PEER_TIMEOUT, IDLE_TIMEOUT, start)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_host_joins_once_every_peer_has_sent_its_table() {
        let t0 = Instant::now();
        let mut m = two_peers(t0);
        assert_eq!(m.own_host_state(), host_state::DRAINING);
        assert_eq!(m.heard(2, t0 + ms(10)), Some(Change::Up(2)));
        assert_eq!(m.heard(2, t0 + ms(20)), None, "up once");
        assert_eq!(m.heard(3, t0 + ms(30)), Some(Change::Up(3)));
        m.synced(2);
        assert_eq!(m.tick(t0 + ms(40)), vec![], "host 3's table is missing");
        assert_eq!(m.state(), HostState::Joining);
        m.synced(3);
        assert_eq!(m.tick(t0 + ms(50)), vec![Change::Ready]);
        assert_eq!(m.own_host_state(), host_state::READY);
        assert_eq!(m.tick(t0 + ms(60)), vec![], "ready once");
    }

    #[test]
    fn a_host_whose_peers_are_down_joins_after_one_timeout() {
        let t0 = Instant::now();
        let mut m = two_peers(t0);
        assert_eq!(
            m.tick(t0 + PEER_TIMEOUT),
            vec![],
            "not more than the time-out yet"
        );
        assert_eq!(m.tick(t0 + PEER_TIMEOUT + ms(1)), vec![Change::Ready]);
        assert_eq!(m.peer_host_state(2), host_state::ABSENT);
    }

    #[test]
    fn a_silent_peer_is_gone_keeps_its_clients_for_the_idle_timeout_then_loses_them() {
        let t0 = Instant::now();
        let mut m = two_peers(t0);
        m.heard(2, t0);
        m.load(2, HostState::Ready, 7);
        assert_eq!(m.peer_host_state(2), host_state::READY);
        assert!(m.not_gone(2) && m.not_gone(3) && m.not_gone(1));
        // Heard within the time-out: still there.
        m.heard(2, t0 + ms(400));
        assert!(!m.tick(t0 + ms(800)).contains(&Change::Gone(2)));
        // Silent for longer than the time-out: gone, once.
        let gone_at = t0 + ms(901);
        assert!(m.tick(gone_at).contains(&Change::Gone(2)));
        assert_eq!(m.tick(gone_at + ms(100)), vec![]);
        assert_eq!(m.peer_host_state(2), host_state::ABSENT);
        assert!(!m.not_gone(2), "its entries no longer hold against others'");
        assert!(m.not_gone(3), "never heard is not gone");
        // Its clients stay for the idle time-out, then go.
        assert!(m.long_gone(gone_at + IDLE_TIMEOUT - ms(1)).is_empty());
        assert_eq!(m.long_gone(gone_at + IDLE_TIMEOUT), BTreeSet::from([2]));
    }

    #[test]
    fn a_gone_peer_heard_again_is_back_and_must_send_its_table_again() {
        let t0 = Instant::now();
        let mut m = two_peers(t0);
        m.heard(2, t0);
        m.synced(2);
        let later = t0 + ms(600);
        assert!(m.tick(later).contains(&Change::Gone(2)));
        assert!(!m.peers()[&2].synced);
        assert_eq!(m.heard(2, later + ms(1)), Some(Change::Up(2)));
        assert!(m.not_gone(2));
        assert!(m.long_gone(later + IDLE_TIMEOUT).is_empty());
    }

    #[test]
    fn a_draining_peer_or_host_takes_no_new_clients() {
        let t0 = Instant::now();
        let mut m = two_peers(t0);
        m.heard(3, t0 + ms(400));
        m.load(3, HostState::Draining, 5);
        assert_eq!(m.peer_host_state(3), host_state::DRAINING);
        assert_eq!(m.tick(t0 + PEER_TIMEOUT + ms(1)), vec![Change::Ready]);
        m.drain();
        assert_eq!(m.own_host_state(), host_state::DRAINING);
        assert_eq!(
            m.tick(t0 + ms(950)),
            vec![Change::Gone(3)],
            "and no second ready"
        );
    }
}
