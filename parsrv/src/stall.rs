//! Stall detection, the pure core: from periodic looks at a slot's socket, decide when its
//! handler has stopped taking connections from a non-empty queue (a SIGSTOP, a GC pause, a
//! single-threaded worker stuck in a slow request), and when it may have the socket's
//! share of new connections back. The spawner's adapter (`spawner/stalls.rs`) takes the
//! looks and carries out the decisions: a stalled slot's socket is demoted (it takes new
//! connections only when every other socket is full) and its queue moved to handlers that
//! accept, by the kernel's migration.
//!
//! What a look sees: the queue's depth (TCP_INFO, exact), the connections the program sent
//! to the socket (its `selected` and `migrated_in` counters), a built-in handler's own count
//! of accepts, and whether the handler's process is stopped. The kernel counts no accepts
//! per listener, so for any handler `arrivals - growth of the queue` is what it took (see
//! [`Look::took_since`]); where the handler counts its accepts, that count decides too.

use std::time::{Duration, Instant};

/// One look at a slot's socket and handler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Look {
    /// Connections waiting in the accept queue.
    pub queue: u32,
    /// Connections the program sent to the socket so far (selected + migrated in).
    pub arrivals: u64,
    /// Connections a built-in handler counted as accepted so far (an exec'd program keeps
    /// no count parsrv can read).
    pub accepted: Option<u64>,
    /// The handler's process is stopped (SIGSTOP, a debugger).
    pub stopped: bool,
    /// How long its threads have waited for a CPU while runnable, so far (schedstat),
    /// read where its queue holds connections (0 elsewhere, or where the kernel keeps no
    /// schedstats).
    pub run_delay_ns: u64,
}

impl Look {
    /// Whether the handler took a connection between `earlier` and this look.
    ///
    /// Arrivals are counted when the program places a SYN, the queue grows when the
    /// handshake completes a moment later: a handshake in flight at one look is counted a
    /// look early, which can make one interval seem to have an accept, never hide one for
    /// good. A SYN that never completes (a flood) counts as an arrival that did not queue:
    /// under a flood a stall is seen later or not at all, never where there is none.
    pub fn took_since(&self, earlier: &Look) -> bool {
        if let (Some(now), Some(then)) = (self.accepted, earlier.accepted) {
            if now != then {
                return true;
            }
        }
        let arrived = self.arrivals.saturating_sub(earlier.arrivals);
        earlier.queue as u64 + arrived > self.queue as u64
    }
}

/// What the adapter should do with a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing.
    Keep,
    /// The handler took nothing from its non-empty queue for the whole of `after`: demote
    /// its socket and move its queue.
    Demote,
    /// A demoted slot's handler is back (it took a connection, or its process was stopped
    /// and runs again): the socket takes its share again.
    Promote,
    /// Nothing shows that a demoted slot's handler is back, but it is time to try it again:
    /// the socket takes its share again (and is demoted again if the handler still stalls).
    Retry,
}

/// Where one slot stands.
#[derive(Clone, Copy, Debug, Default)]
enum State {
    /// Not watched: no ready handler, or its socket is not serving for another reason.
    #[default]
    Idle,
    /// Serving: the last look, and since when the handler has taken nothing from a
    /// non-empty queue (with its run delay then).
    Watching {
        last: (Instant, Look),
        quiet_since: Option<(Instant, u64)>,
    },
    /// Demoted: the last look (none yet: the queue just moved away, so the look at the
    /// demotion compares with nothing), whether the process was stopped at it, when the
    /// slot will be tried again (unless it shows it is back first), and how many tries
    /// failed in a row.
    Demoted {
        last: Option<Look>,
        stopped: bool,
        retry_at: Instant,
        tries: u32,
    },
}

/// The stall detector of one slot.
#[derive(Debug, Default)]
pub struct SlotStall {
    state: State,
    /// Its handler has shown that it accepts: it took a connection, or said it accepts
    /// ([`SlotStall::vouch`]). Only such a slot takes a stalled slot's queue: a handler that
    /// never accepted (a program that does not use its socket) would stall with it too.
    proven: bool,
    /// Failed tries carried over a promotion: a handler that stalls again at once after a
    /// try waits twice as long for the next.
    tries: u32,
    /// The last look while the slot was not watched (its handler starting): what its
    /// handler took between then and its first watched look proves it accepts. Without it,
    /// a handler that served a burst before its first look (a load that starts the moment
    /// the group is ready) would not count as taking connections until the next burst,
    /// and a stalled queue beside it would wait for that.
    baseline: Option<Look>,
}

/// How long a demoted slot waits before it is tried again when nothing shows it is back:
/// [`FIRST_RETRY`] after the demotion, doubling with each try that stalls again, up to
/// [`MAX_RETRY`]. A try costs the connections that reach the socket in one stall time
/// (they are moved again when it stalls again), so tries are rare once a handler keeps
/// stalling; a stopped process is never tried, its resumption is seen at the next look.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
pub const MAX_RETRY: Duration = Duration::from_secs(8);

/// How often the adapter looks at each slot, for a stall time of `after`: a stall is seen
/// between `after` and `after + look_every(after)`.
pub fn look_every(after: Duration) -> Duration {
    (after / 4).max(Duration::from_millis(5))
}

impl SlotStall {
    /// The handler says it accepts (a built-in handler's accept threads run; an exec'd
    /// server sent READY=1).
    pub fn vouch(&mut self) {
        self.proven = true;
    }

    /// Whether the slot can take a stalled slot's queue: it has shown that it accepts, and
    /// took from its queue at every look for the last stall time (or had none).
    pub fn takes_connections(&self) -> bool {
        self.proven
            && matches!(
                self.state,
                State::Watching {
                    quiet_since: None,
                    ..
                }
            )
    }

    /// A look at a serving slot with a ready handler, at `now`. With no other slot that
    /// `takes_connections`, a stall is not acted on (there is nowhere to move the queue);
    /// it is, at the first look once there is.
    pub fn serving(
        &mut self,
        now: Instant,
        look: Look,
        after: Duration,
        others_take: bool,
    ) -> Decision {
        if let (State::Idle, Some(baseline)) = (self.state, self.baseline.take()) {
            self.proven |= look.took_since(&baseline);
        }
        let quiet_since = match self.state {
            State::Watching { last, quiet_since } => {
                if look.took_since(&last.1) {
                    // It serves: a try that led here succeeded.
                    self.tries = 0;
                    self.proven = true;
                    None
                } else if look.queue == 0 {
                    None
                } else {
                    // Quiet since the look before, at the latest.
                    Some(quiet_since.unwrap_or((last.0, last.1.run_delay_ns)))
                }
            }
            _ => None,
        };
        self.state = State::Watching {
            last: (now, look),
            quiet_since,
        };
        // A stopped process accepts nothing until it is continued, however long that takes:
        // it is stalled now, even with an empty queue (on an address whose every handler is
        // stopped, nothing could move a queue that formed meanwhile: the kernel migrates
        // connections only within one address's reuseport group).
        let quiet_too_long =
            quiet_since.is_some_and(|(since, _)| now.saturating_duration_since(since) >= after);
        // Waiting for a CPU for half the quiet time or more: starved, not stalled (an
        // overloaded or emulated CPU). It takes its queue once it runs; moving the queue
        // meanwhile would overfill the others, and an accept() it was woken in would fail
        // (EINVAL) between the move's shutdown and listen().
        let starved = quiet_since.is_some_and(|(since, delay_then)| {
            let quiet = now.saturating_duration_since(since).as_nanos() as u64;
            look.run_delay_ns.saturating_sub(delay_then) * 2 >= quiet
        });
        if quiet_too_long && starved && !look.stopped {
            self.state = State::Watching {
                last: (now, look),
                quiet_since: None,
            };
            return Decision::Keep;
        }
        if others_take && (look.stopped || quiet_too_long) {
            self.demote(now, look);
            return Decision::Demote;
        }
        Decision::Keep
    }

    /// Demoted at `now`: tried again after [`FIRST_RETRY`], doubled per failed try.
    fn demote(&mut self, now: Instant, look: Look) {
        let delay = FIRST_RETRY
            .saturating_mul(1 << self.tries.min(8))
            .min(MAX_RETRY);
        self.state = State::Demoted {
            last: None,
            stopped: look.stopped,
            retry_at: now + delay,
            tries: self.tries,
        };
    }

    /// A look at a demoted slot, at `now`. It is tried again only while some other slot
    /// `takes_connections` (`others_take`): a try that stalls again moves its queue there,
    /// so a try costs at most one stall time of its share. Without one (a spawner that just
    /// adopted the group has not yet seen which exec'd handlers accept), what reached it
    /// would wait for it.
    pub fn demoted(&mut self, now: Instant, look: Look, others_take: bool) -> Decision {
        let State::Demoted {
            last,
            stopped,
            retry_at,
            tries,
        } = self.state
        else {
            // Demoted before this detector knew it (by the spawner whose group this one
            // adopted): it waits out a first try's delay, as after a demotion here.
            self.demote(now, look);
            return Decision::Keep;
        };
        let resumed = stopped && !look.stopped;
        let took = last.is_some_and(|last| look.took_since(&last));
        if resumed || took {
            self.tries = 0;
            self.state = State::Idle;
            return Decision::Promote;
        }
        if !look.stopped && now >= retry_at && others_take {
            self.tries = tries + 1;
            self.state = State::Idle;
            return Decision::Retry;
        }
        self.state = State::Demoted {
            last: Some(look),
            stopped: look.stopped,
            retry_at,
            tries,
        };
        Decision::Keep
    }

    /// The slot is neither serving with a ready handler nor demoted (its handler exited,
    /// is starting, or the socket is out of the group): start over when it serves again,
    /// from `look` (the slot now, if the adapter has it).
    pub fn not_watched(&mut self, look: Option<Look>) {
        self.state = State::Idle;
        self.proven = false;
        self.baseline = look;
    }

    /// The adapter found the handler about to run (a thread of it is runnable): not acted
    /// on now; the stall time starts over.
    pub fn not_now(&mut self, now: Instant, look: Look) {
        self.state = State::Watching {
            last: (now, look),
            quiet_since: None,
        };
    }

    /// Whether the detector holds the slot demoted.
    pub fn is_demoted(&self) -> bool {
        matches!(self.state, State::Demoted { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_millis(100);
    const EVERY: Duration = Duration::from_millis(25);

    fn look(queue: u32, arrivals: u64) -> Look {
        Look {
            queue,
            arrivals,
            ..Look::default()
        }
    }

    /// Feeds `looks` to a serving slot, one every [`EVERY`] from `start`; the decisions.
    fn watch(slot: &mut SlotStall, start: Instant, looks: &[Look]) -> Vec<Decision> {
        (0u32..)
            .zip(looks)
            .map(|(n, l)| slot.serving(start + EVERY * n, *l, AFTER, true))
            .collect()
    }

    #[test]
    fn a_queue_that_nobody_takes_from_is_a_stall_after_the_stall_time() {
        let start = Instant::now();
        let mut slot = SlotStall::default();
        // Connections keep arriving and all stay: nothing was taken.
        let looks: Vec<_> = (0..5).map(|n| look(2 + n, 10 + n as u64)).collect();
        let decisions = watch(&mut slot, start, &looks);
        // Quiet from the first look (0 ms); 100 ms later, at the fifth look: demoted.
        assert_eq!(decisions[..4], [Decision::Keep; 4]);
        assert_eq!(decisions[4], Decision::Demote);
        assert!(slot.is_demoted());
    }

    #[test]
    fn a_busy_handler_whose_queue_never_shrinks_is_not_a_stall() {
        // Full, and refilled between looks as fast as the handler takes: the depth is the
        // same at every look, but more arrived than the queue grew.
        let start = Instant::now();
        let mut slot = SlotStall::default();
        let looks: Vec<_> = (0..40).map(|n| look(9, 100 + 3 * n)).collect();
        let decisions = watch(&mut slot, start, &looks);
        assert!(decisions.iter().all(|d| *d == Decision::Keep));
    }

    #[test]
    fn one_accept_in_the_stall_time_keeps_the_slot_serving() {
        let start = Instant::now();
        let mut slot = SlotStall::default();
        // Four quiet looks, then the queue shrinks by one with nothing new: an accept.
        let looks = [
            look(5, 10),
            look(5, 10),
            look(5, 10),
            look(5, 10),
            look(4, 10),
            look(4, 10),
            look(4, 10),
            look(4, 10),
        ];
        let decisions = watch(&mut slot, start, &looks);
        assert!(
            decisions.iter().all(|d| *d == Decision::Keep),
            "{decisions:?}"
        );
        // ... and quiet again from there: demoted 100 ms after the last accept.
        assert_eq!(
            slot.serving(start + EVERY * 8, look(4, 10), AFTER, true),
            Decision::Demote
        );
    }

    #[test]
    fn an_empty_queue_is_never_a_stall() {
        let start = Instant::now();
        let mut slot = SlotStall::default();
        let looks = vec![look(0, 7); 20];
        assert!(watch(&mut slot, start, &looks)
            .iter()
            .all(|d| *d == Decision::Keep));
    }

    #[test]
    fn a_built_in_handlers_own_count_of_accepts_decides_too() {
        // The queue grew by exactly what arrived, but the handler counted an accept (a
        // handshake completed between the two reads of a look): not quiet.
        let start = Instant::now();
        let mut slot = SlotStall::default();
        let counted = |queue, arrivals, accepted| Look {
            queue,
            arrivals,
            accepted: Some(accepted),
            ..Look::default()
        };
        let looks: Vec<_> = (0..10)
            .map(|n| counted(3 + n, 10 + n as u64, n as u64))
            .collect();
        assert!(watch(&mut slot, start, &looks)
            .iter()
            .all(|d| *d == Decision::Keep));
    }

    #[test]
    fn a_stopped_handler_is_demoted_at_once_and_promoted_when_it_runs_again_not_before() {
        let start = Instant::now();
        let mut slot = SlotStall::default();
        let stopped = Look {
            stopped: true,
            ..look(0, 3)
        };
        // Stopped with an empty queue: nothing waits yet, but nothing would be taken.
        assert_eq!(watch(&mut slot, start, &[stopped]), [Decision::Demote]);
        // Long past the retry time: still stopped, still demoted (its queue moved: empty).
        let later = start + MAX_RETRY * 2;
        let moved = Look {
            queue: 0,
            ..stopped
        };
        assert_eq!(slot.demoted(later, moved, true), Decision::Keep);
        // SIGCONT: promoted at the next look.
        assert_eq!(
            slot.demoted(later + EVERY, look(0, 3), true),
            Decision::Promote
        );
        assert!(!slot.is_demoted());
    }

    #[test]
    fn a_demoted_handler_that_takes_a_connection_is_promoted_at_once() {
        let start = Instant::now();
        let mut slot = SlotStall::default();
        watch(&mut slot, start, &[look(3, 3); 5]);
        assert!(slot.is_demoted());
        // Every other socket was full: one connection came to it, and it took it.
        assert_eq!(
            slot.demoted(start + EVERY * 6, look(1, 4), true),
            Decision::Keep
        );
        assert_eq!(
            slot.demoted(start + EVERY * 7, look(0, 4), true),
            Decision::Promote
        );
    }

    #[test]
    fn a_slot_found_demoted_is_tried_again_after_the_first_delay() {
        let start = Instant::now();
        // Adopted demoted: held until FIRST_RETRY from the first look.
        let mut slot = SlotStall::default();
        assert_eq!(slot.demoted(start, look(0, 2), true), Decision::Keep);
        assert_eq!(
            slot.demoted(start + FIRST_RETRY - EVERY, look(0, 2), true),
            Decision::Keep
        );
        assert_eq!(
            slot.demoted(start + FIRST_RETRY, look(0, 2), true),
            Decision::Retry
        );
    }

    #[test]
    fn a_slot_is_tried_again_only_while_another_takes_connections() {
        let start = Instant::now();
        let mut slot = SlotStall::default();
        assert_eq!(slot.demoted(start, look(0, 2), false), Decision::Keep);
        // Due, but nowhere to move its queue if it stalls again: held.
        let due = start + FIRST_RETRY;
        assert_eq!(slot.demoted(due, look(0, 2), false), Decision::Keep);
        assert_eq!(slot.demoted(due + EVERY, look(0, 2), false), Decision::Keep);
        // Another slot shows it accepts: tried at once.
        assert_eq!(
            slot.demoted(due + EVERY * 2, look(0, 2), true),
            Decision::Retry
        );
        // Taking a connection promotes it whether or not others take.
        let mut slot = SlotStall::default();
        assert_eq!(slot.demoted(start, look(0, 2), false), Decision::Keep);
        assert_eq!(
            slot.demoted(start + EVERY, look(0, 2), false),
            Decision::Keep
        );
        assert_eq!(
            slot.demoted(start + EVERY * 2, look(0, 3), false),
            Decision::Promote
        );
    }

    #[test]
    fn a_handler_that_keeps_stalling_is_tried_less_and_less_often() {
        let start = Instant::now();
        let mut slot = SlotStall::default();
        let mut now = start;
        let mut waits = Vec::new();
        for _ in 0..6 {
            // Serving: stalls again (quiet for the stall time).
            let mut decision = Decision::Keep;
            while decision != Decision::Demote {
                now += EVERY;
                decision = slot.serving(now, look(2, 2), AFTER, true);
            }
            let demoted_at = now;
            // Demoted: nothing shows it is back, until the retry time.
            loop {
                now += EVERY;
                if slot.demoted(now, look(0, 2), true) == Decision::Retry {
                    break;
                }
            }
            waits.push((now - demoted_at).as_millis() / 1000);
        }
        // 1, 2, 4, 8, 8, 8 s (to the next look).
        assert_eq!(waits, [1, 2, 4, 8, 8, 8]);
    }

    #[test]
    fn a_slot_that_stops_serving_starts_over() {
        let start = Instant::now();
        let mut slot = SlotStall::default();
        watch(&mut slot, start, &[look(3, 3); 4]);
        slot.not_watched(Some(look(3, 3)));
        // A new handler: quiet is counted from its first look, not the old one's.
        let decisions = watch(&mut slot, start + EVERY * 4, &[look(3, 3); 4]);
        assert!(decisions.iter().all(|d| *d == Decision::Keep));
    }

    #[test]
    fn a_stall_waits_for_a_slot_that_takes_connections() {
        let start = Instant::now();
        let mut quiet = SlotStall::default();
        let mut other = SlotStall::default();
        // The other slot's handler has taken nothing yet: it may be a program that never
        // accepts, so nothing moves to it.
        other.serving(start, look(0, 0), AFTER, true);
        assert!(!other.takes_connections());
        for n in 0..8 {
            assert_eq!(
                quiet.serving(
                    start + EVERY * n,
                    look(3, 3),
                    AFTER,
                    other.takes_connections()
                ),
                Decision::Keep
            );
        }
        // It takes one: the quiet slot, long stalled, is demoted at the next look.
        other.serving(start + EVERY * 8, look(0, 1), AFTER, true);
        assert!(other.takes_connections());
        assert_eq!(
            quiet.serving(
                start + EVERY * 9,
                look(3, 3),
                AFTER,
                other.takes_connections()
            ),
            Decision::Demote
        );
        // A built-in handler vouches for itself; a new handler on the slot must again.
        let mut built_in = SlotStall::default();
        built_in.vouch();
        built_in.serving(start, look(0, 0), AFTER, true);
        assert!(built_in.takes_connections());
        built_in.not_watched(None);
        assert!(!built_in.takes_connections());
    }

    #[test]
    fn a_handler_that_served_before_its_first_watched_look_takes_a_stalled_queue() {
        // The load began the moment the group was ready, between a look at the starting
        // handler and its first watched one, and ended before the next: what it took then
        // shows it accepts.
        let start = Instant::now();
        let mut other = SlotStall::default();
        other.not_watched(Some(look(0, 0)));
        other.serving(start, look(0, 90), AFTER, false);
        assert!(other.takes_connections());
        other.serving(start + EVERY, look(0, 90), AFTER, false);
        assert!(other.takes_connections());
        // A handler that took nothing then has shown nothing.
        let mut idle = SlotStall::default();
        idle.not_watched(Some(look(2, 2)));
        idle.serving(start, look(2, 2), AFTER, false);
        assert!(!idle.takes_connections());
        // Nor does a look taken before a restart vouch for the next handler's first.
        let mut restarted = SlotStall::default();
        restarted.not_watched(Some(look(0, 5)));
        restarted.not_watched(None);
        restarted.serving(start, look(0, 9), AFTER, false);
        assert!(!restarted.takes_connections());
    }

    #[test]
    fn a_handler_that_waits_for_a_cpu_is_starved_not_stalled() {
        // Quiet for the stall time, but runnable and waiting for a CPU for most of it (an
        // overloaded or emulated machine): not demoted, and the quiet time starts over.
        let start = Instant::now();
        let mut slot = SlotStall::default();
        let waiting = |n: u32| Look {
            run_delay_ns: u64::from(n) * 20_000_000,
            ..look(3, 3)
        };
        let decisions: Vec<_> = (0u32..8)
            .map(|n| slot.serving(start + EVERY * n, waiting(n), AFTER, true))
            .collect();
        assert!(
            decisions.iter().all(|d| *d == Decision::Keep),
            "{decisions:?}"
        );
        // The same quiet with no wait for a CPU: a stall.
        let mut stalled = SlotStall::default();
        let decisions: Vec<_> = (0u32..5)
            .map(|n| stalled.serving(start + EVERY * n, look(3, 3), AFTER, true))
            .collect();
        assert_eq!(decisions[4], Decision::Demote);
    }
}
