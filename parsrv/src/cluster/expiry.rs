//! Which of this host's clients have gone idle: a client that has had no connection here for
//! the idle time-out is forgotten (its entry leaves the table, and the peers are told), so
//! that its next connection is decided again. A pure core: it is fed the clients this host
//! serves, the clients connected now and the time, and answers with the clients to forget;
//! the agent (`cluster::agent`) reads the connections and writes the table.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

#[derive(Clone, Debug)]
pub struct IdleClients {
    timeout: Duration,
    /// This host's clients seen without a connection, and since when.
    since: BTreeMap<Ipv4Addr, Instant>,
}

impl IdleClients {
    pub fn new(timeout: Duration) -> IdleClients {
        IdleClients {
            timeout,
            since: BTreeMap::new(),
        }
    }

    /// Looks at the clients at `now`: `served_here` are the table's clients this host serves,
    /// `connected` those with a connection here now. Returns the clients idle for the
    /// time-out, which it stops following. A client counts as idle from the first look that
    /// found it without a connection, so it is forgotten between one and two looks' periods
    /// after the time-out; one that connects again, or that another host now serves, starts
    /// over.
    pub fn expired(
        &mut self,
        served_here: &BTreeSet<Ipv4Addr>,
        connected: &BTreeSet<Ipv4Addr>,
        now: Instant,
    ) -> Vec<Ipv4Addr> {
        self.since
            .retain(|client, _| served_here.contains(client) && !connected.contains(client));
        let mut expired = Vec::new();
        for client in served_here.difference(connected) {
            let since = *self.since.entry(*client).or_insert(now);
            if now.saturating_duration_since(since) >= self.timeout {
                expired.push(*client);
            }
        }
        for client in &expired {
            self.since.remove(client);
        }
        expired
    }

    /// How many clients it follows (idle, not yet expired).
    pub fn idle(&self) -> usize {
        self.since.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn set(clients: &[u8]) -> BTreeSet<Ipv4Addr> {
        clients
            .iter()
            .map(|c| Ipv4Addr::new(192, 0, 2, *c))
            .collect()
    }

    fn at(start: Instant, seconds: u64) -> Instant {
        start + Duration::from_secs(seconds)
    }

    #[test]
    fn a_connected_client_never_expires() {
        let start = Instant::now();
        let mut idle = IdleClients::new(TIMEOUT);
        for second in (0..100).step_by(2) {
            assert!(idle
                .expired(&set(&[1]), &set(&[1]), at(start, second))
                .is_empty());
        }
        assert_eq!(idle.idle(), 0);
    }

    #[test]
    fn an_idle_client_expires_at_the_time_out_and_not_before() {
        let start = Instant::now();
        let mut idle = IdleClients::new(TIMEOUT);
        assert!(idle.expired(&set(&[1, 2]), &set(&[2]), start).is_empty());
        assert_eq!(idle.idle(), 1);
        assert!(idle
            .expired(&set(&[1, 2]), &set(&[2]), at(start, 9))
            .is_empty());
        assert_eq!(
            idle.expired(&set(&[1, 2]), &set(&[2]), at(start, 10)),
            vec![Ipv4Addr::new(192, 0, 2, 1)]
        );
        // Forgotten once: the table no longer has it, and nothing here follows it.
        assert_eq!(idle.idle(), 0);
        assert!(idle
            .expired(&set(&[2]), &set(&[2]), at(start, 12))
            .is_empty());
    }

    #[test]
    fn a_client_that_connects_again_starts_over() {
        let start = Instant::now();
        let mut idle = IdleClients::new(TIMEOUT);
        idle.expired(&set(&[1]), &set(&[]), start);
        idle.expired(&set(&[1]), &set(&[1]), at(start, 8));
        assert!(idle
            .expired(&set(&[1]), &set(&[]), at(start, 12))
            .is_empty());
        assert!(idle
            .expired(&set(&[1]), &set(&[]), at(start, 21))
            .is_empty());
        assert_eq!(idle.expired(&set(&[1]), &set(&[]), at(start, 22)).len(), 1);
    }

    #[test]
    fn a_client_another_host_took_over_is_no_longer_followed() {
        let start = Instant::now();
        let mut idle = IdleClients::new(TIMEOUT);
        idle.expired(&set(&[1]), &set(&[]), start);
        // Host 2's entry won: this host no longer serves the client, and must not forget
        // an entry that is not its own.
        assert!(idle.expired(&set(&[]), &set(&[]), at(start, 5)).is_empty());
        assert_eq!(idle.idle(), 0);
        // Back here later: its idle time counts from then.
        assert!(idle
            .expired(&set(&[1]), &set(&[]), at(start, 11))
            .is_empty());
        assert_eq!(idle.expired(&set(&[1]), &set(&[]), at(start, 21)).len(), 1);
    }
}
