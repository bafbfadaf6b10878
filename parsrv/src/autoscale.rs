//! When to grow or shrink a group (`--handlers MIN..MAX`): a small, deterministic policy fed
//! with samples of what the kernel and the program see.
//!
//! - **Up** by one handler when the group has been overloaded for [`OVERLOAD_FOR`]: its
//!   queues at least [`OVERLOAD_OCCUPANCY`] full (summed over sockets, pending handshakes
//!   not counted), or the program dropped or refused connections since the last sample.
//!   At most one step per [`UP_COOLDOWN`], so a new handler gets time to take load before
//!   the next is added. With samples every [`SAMPLE_EVERY`], the first step starts within
//!   about 30 ms of the overload starting.
//! - **Down** by one handler after the queues stayed empty for [`IDLE_FOR`], at most one
//!   step per [`DOWN_COOLDOWN`] (and never within it of a step up). The band between the
//!   two (queues partly full) changes nothing: that is the hysteresis.
//! - Never below MIN or above MAX.
//!
//! The spawner samples only while there is something to see: after [`QUIET_FOR`] of empty
//! queues it stops, and sleeps until the program alerts it (a connection went to a queue at
//! least half full, `dataplane::alerts`) or until a step down is due
//! ([`Autoscaler::next_step_down`]). An idle group costs its spawner no wake-up.

use std::time::{Duration, Instant};

/// How often the spawner samples the queues.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// Queue occupancy (queued / capacity) that counts as overload.
pub const OVERLOAD_OCCUPANCY: f64 = 0.5;
/// How long overload must last before a step up: three samples in a row, so that one
/// burst that the handlers absorb at once does not start a process.
pub const OVERLOAD_FOR: Duration = Duration::from_millis(20);
/// Least time between two steps up.
pub const UP_COOLDOWN: Duration = Duration::from_millis(250);
/// How long the queues must stay empty before a step down.
pub const IDLE_FOR: Duration = Duration::from_secs(3);
/// Least time between a step and a step down.
pub const DOWN_COOLDOWN: Duration = Duration::from_secs(3);
/// Empty queues for this long and the spawner stops sampling until an alert.
pub const QUIET_FOR: Duration = Duration::from_millis(100);

/// One look at the group.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at: Instant,
    pub handlers: u32,
    /// Connections waiting in all accept queues.
    pub queued: u32,
    /// What all queues hold (sum of max + 1).
    pub capacity: u32,
    /// Connections the program dropped or refused so far (a running total).
    pub rejected: u64,
}

/// A change to make, and why, in words for the log and `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

#[derive(Debug)]
pub struct Autoscaler {
    min: u32,
    max: u32,
    overloaded_since: Option<Instant>,
    idle_since: Option<Instant>,
    last_change: Option<Instant>,
    last_rejected: Option<u64>,
}

impl Autoscaler {
    pub fn new(min: u32, max: u32) -> Self {
        Autoscaler {
            min,
            max,
            overloaded_since: None,
            idle_since: None,
            last_change: None,
            last_rejected: None,
        }
    }

    fn cooled(&self, now: Instant, cooldown: Duration) -> bool {
        self.last_change
            .is_none_or(|at| now.duration_since(at) >= cooldown)
    }

    /// When a step down becomes possible if the queues stay empty: None when the group is at
    /// MIN or its queues were not empty at the last sample.
    pub fn next_step_down(&self, handlers: u32) -> Option<Instant> {
        if handlers <= self.min {
            return None;
        }
        let idle_enough = self.idle_since? + IDLE_FOR;
        Some(match self.last_change {
            Some(at) => idle_enough.max(at + DOWN_COOLDOWN),
            None => idle_enough,
        })
    }

    /// Takes a sample; returns the change to make now, if any.
    pub fn observe(&mut self, sample: Sample) -> Option<Decision> {
        let now = sample.at;
        let new_rejections = sample
            .rejected
            .saturating_sub(self.last_rejected.unwrap_or(sample.rejected));
        self.last_rejected = Some(sample.rejected);
        let occupancy = if sample.capacity == 0 {
            0.0
        } else {
            sample.queued as f64 / sample.capacity as f64
        };
        let overloaded = occupancy >= OVERLOAD_OCCUPANCY || new_rejections > 0;

        if overloaded {
            self.idle_since = None;
            let since = *self.overloaded_since.get_or_insert(now);
            let lasted = now.duration_since(since);
            if lasted >= OVERLOAD_FOR && sample.handlers < self.max && self.cooled(now, UP_COOLDOWN)
            {
                self.overloaded_since = None;
                self.last_change = Some(now);
                return Some(Decision {
                    from: sample.handlers,
                    to: sample.handlers + 1,
                    reason: format!(
                        "queues {}/{} full ({:.0} %) for {} ms, {} dropped or refused since the last sample",
                        sample.queued,
                        sample.capacity,
                        occupancy * 100.0,
                        lasted.as_millis(),
                        new_rejections
                    ),
                });
            }
        } else if sample.queued == 0 {
            self.overloaded_since = None;
            let since = *self.idle_since.get_or_insert(now);
            let lasted = now.duration_since(since);
            if lasted >= IDLE_FOR && sample.handlers > self.min && self.cooled(now, DOWN_COOLDOWN) {
                self.idle_since = Some(now);
                self.last_change = Some(now);
                return Some(Decision {
                    from: sample.handlers,
                    to: sample.handlers - 1,
                    reason: format!("queues empty for {:.1} s", lasted.as_secs_f64()),
                });
            }
        } else {
            // Some load, no overload: keep the size.
            self.overloaded_since = None;
            self.idle_since = None;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Feed {
        scaler: Autoscaler,
        start: Instant,
        now: Duration,
        handlers: u32,
        rejected: u64,
    }

    impl Feed {
        fn new(min: u32, max: u32) -> Self {
            Feed {
                scaler: Autoscaler::new(min, max),
                start: Instant::now(),
                now: Duration::ZERO,
                handlers: min,
                rejected: 0,
            }
        }

        /// Feeds samples every SAMPLE_EVERY for `period` with queues `queued`/100 full,
        /// applying each decision; returns the decisions.
        fn run(
            &mut self,
            period: Duration,
            queued: u32,
            rejections_per_sample: u64,
        ) -> Vec<Decision> {
            let mut decisions = Vec::new();
            let end = self.now + period;
            while self.now < end {
                self.now += SAMPLE_EVERY;
                self.rejected += rejections_per_sample;
                let sample = Sample {
                    at: self.start + self.now,
                    handlers: self.handlers,
                    queued,
                    capacity: 100,
                    rejected: self.rejected,
                };
                if let Some(decision) = self.scaler.observe(sample) {
                    self.handlers = decision.to;
                    decisions.push(decision);
                }
            }
            decisions
        }
    }

    #[test]
    fn sustained_overload_adds_a_handler_within_40_ms() {
        let mut feed = Feed::new(1, 4);
        let decisions = feed.run(Duration::from_millis(40), 60, 0);
        assert_eq!(decisions.len(), 1, "{decisions:?}");
        assert_eq!((decisions[0].from, decisions[0].to), (1, 2));
        assert!(
            decisions[0].reason.contains("60/100"),
            "{}",
            decisions[0].reason
        );
    }

    #[test]
    fn a_short_spike_does_not_scale() {
        let mut feed = Feed::new(1, 4);
        assert!(feed.run(OVERLOAD_FOR, 90, 0).is_empty());
        assert!(feed.run(Duration::from_millis(200), 10, 0).is_empty());
    }

    #[test]
    fn drops_count_as_overload_even_with_short_queues() {
        let mut feed = Feed::new(1, 4);
        let decisions = feed.run(Duration::from_millis(100), 5, 1);
        assert_eq!(decisions.len(), 1);
        assert!(decisions[0].reason.contains("1 dropped or refused"));
    }

    #[test]
    fn growth_is_paced_by_the_cooldown_and_capped_at_max() {
        let mut feed = Feed::new(1, 3);
        let decisions = feed.run(Duration::from_secs(2), 80, 0);
        assert_eq!(
            decisions.iter().map(|d| d.to).collect::<Vec<_>>(),
            [2, 3],
            "{decisions:?}"
        );
        assert_eq!(feed.handlers, 3);
        // Steps at least UP_COOLDOWN apart, the first after OVERLOAD_FOR and a sample: two
        // within UP_COOLDOWN + OVERLOAD_FOR are impossible.
        let mut fast = Feed::new(1, 10);
        assert_eq!(fast.run(UP_COOLDOWN + OVERLOAD_FOR, 80, 0).len(), 1);
    }

    #[test]
    fn partial_load_keeps_the_size_and_idleness_shrinks_it_to_min() {
        let mut feed = Feed::new(1, 4);
        feed.run(Duration::from_secs(2), 80, 0);
        let grown = feed.handlers;
        assert!(grown > 2);
        // Hysteresis band: queues partly full, nothing changes however long.
        assert!(feed.run(Duration::from_secs(10), 20, 0).is_empty());
        // Idle: one step down per DOWN_COOLDOWN, never below min.
        let decisions = feed.run(Duration::from_secs(30), 0, 0);
        assert_eq!(decisions.len() as u32, grown - 1, "{decisions:?}");
        assert!(decisions.iter().all(|d| d.to == d.from - 1));
        assert_eq!(feed.handlers, 1);
        assert!(decisions[0].reason.starts_with("queues empty for 3.0 s"));
    }

    #[test]
    fn no_step_down_right_after_a_step_up() {
        let mut feed = Feed::new(1, 4);
        feed.run(Duration::from_millis(100), 60, 0);
        assert_eq!(feed.handlers, 2);
        // Idle at once: the step down waits for IDLE_FOR and DOWN_COOLDOWN.
        assert!(feed.run(Duration::from_millis(2900), 0, 0).is_empty());
        assert_eq!(feed.run(Duration::from_millis(200), 0, 0).len(), 1);
    }

    #[test]
    fn a_sleeping_autoscaler_knows_when_the_next_step_down_is_due() {
        let mut feed = Feed::new(1, 4);
        feed.run(Duration::from_millis(100), 60, 0);
        assert_eq!(feed.handlers, 2);
        let grown_at = feed.start + Duration::from_millis(30);
        // Queues not empty at the last sample: nothing is due.
        assert_eq!(feed.scaler.next_step_down(feed.handlers), None);
        feed.run(Duration::from_millis(10), 0, 0);
        let idle_since = feed.start + feed.now;
        // Both the idle time and the cooldown since the step up must pass.
        assert_eq!(
            feed.scaler.next_step_down(feed.handlers),
            Some((idle_since + IDLE_FOR).max(grown_at + DOWN_COOLDOWN))
        );
        // At MIN, nothing is ever due.
        assert_eq!(feed.scaler.next_step_down(1), None);
        // And the step comes when it said.
        let due = feed.scaler.next_step_down(feed.handlers).unwrap();
        let decisions = feed.run(due - (feed.start + feed.now), 0, 0);
        assert_eq!(decisions.len(), 1, "{decisions:?}");
    }
}
