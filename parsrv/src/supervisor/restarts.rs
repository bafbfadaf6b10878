//! When a slot's next handler starts: the restart policy, a pure core (time and the
//! handler's exit are its inputs).

use std::time::{Duration, Instant};

/// When a slot's next handler starts, after one exited. A handler that became ready was
/// serving: it is replaced at once, however often it is killed, so that a kill storm does
/// not leave sockets without handlers while their queues wait. Backoff is for crash loops:
/// handlers that exit before they are ready (systemd's start limits work the same way),
/// and handlers that become ready but exit so often (more than [`Restarts::BURST`] in
/// [`Restarts::BURST_WINDOW`]) that they would fork without pause.
#[derive(Debug, Default)]
pub(super) struct Restarts {
    /// Exits in a row that counted as failures.
    failures: u32,
    /// When the last ready handlers exited, oldest first (at most [`Restarts::BURST`]).
    ready_exits: std::collections::VecDeque<Instant>,
}
impl Restarts {
    const FIRST: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(5);
    /// A handler that ran this long is considered healthy again, ready or not.
    const STABLE: Duration = Duration::from_secs(10);
    /// Ready handlers restarted at once within [`Restarts::BURST_WINDOW`]; the next exit
    /// in that window backs off. A kill every 200 ms among 4 handlers (the kill-storm test)
    /// hits one slot at most a few times a second.
    const BURST: usize = 10;
    const BURST_WINDOW: Duration = Duration::from_secs(1);

    /// The delay before the next start, for a handler that exited at `now` after running
    /// for `ran` (`ready`: it had become ready), or that could not start at all.
    pub(super) fn after_exit(&mut self, now: Instant, ran: Duration, ready: bool) -> Duration {
        if ran >= Self::STABLE {
            self.failures = 0;
        }
        if ready {
            while self
                .ready_exits
                .front()
                .is_some_and(|at| now.saturating_duration_since(*at) >= Self::BURST_WINDOW)
            {
                self.ready_exits.pop_front();
            }
            if self.ready_exits.len() < Self::BURST {
                self.ready_exits.push_back(now);
                self.failures = 0;
                return Duration::ZERO;
            }
        }
        let delay = match self.failures {
            0 => Duration::ZERO,
            n => Self::FIRST
                .saturating_mul(1 << (n - 1).min(16))
                .min(Self::CAP),
        };
        self.failures += 1;
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crash_loop(restarts: &mut Restarts, now: Instant, exits: usize) -> Vec<Duration> {
        (0..exits)
            .map(|_| restarts.after_exit(now, Duration::from_millis(5), false))
            .collect()
    }

    #[test]
    fn handlers_that_die_before_ready_back_off_doubling_to_a_cap() {
        let now = Instant::now();
        let mut restarts = Restarts::default();
        let delays = crash_loop(&mut restarts, now, 10);
        assert_eq!(delays[0], Duration::ZERO);
        assert_eq!(delays[1], Duration::from_millis(100));
        assert_eq!(delays[2], Duration::from_millis(200));
        assert_eq!(delays[3], Duration::from_millis(400));
        assert_eq!(delays[9], Restarts::CAP);
        // A short run does not forgive; a stable one does.
        assert_eq!(
            restarts.after_exit(now, Duration::from_secs(1), false),
            Restarts::CAP
        );
        assert_eq!(
            restarts.after_exit(now, Restarts::STABLE, false),
            Duration::ZERO
        );
    }

    #[test]
    fn a_handler_that_was_ready_restarts_at_once_even_after_a_crash_loop() {
        let now = Instant::now();
        let mut restarts = Restarts::default();
        crash_loop(&mut restarts, now, 6);
        // Killed 0.3 s after it became ready: it served, so its successor starts at once,
        // and a later crash before readiness starts the backoff over.
        assert_eq!(
            restarts.after_exit(now, Duration::from_millis(300), true),
            Duration::ZERO
        );
        assert_eq!(
            crash_loop(&mut restarts, now, 2),
            [Duration::ZERO, Restarts::FIRST]
        );
    }

    #[test]
    fn a_kill_storm_never_delays_a_ready_handler() {
        // One slot killed every 200 ms for 10 s, each time after it became ready.
        let start = Instant::now();
        let mut restarts = Restarts::default();
        for kill in 0..50 {
            let at = start + Duration::from_millis(200 * kill);
            assert_eq!(
                restarts.after_exit(at, Duration::from_millis(200), true),
                Duration::ZERO,
                "kill {kill}"
            );
        }
    }

    #[test]
    fn ready_handlers_exiting_without_pause_back_off_after_a_burst() {
        // Ready, then dead on its first request, in a loop: BURST restarts at once within
        // the window, then backoff; once the window has passed, at once again.
        let now = Instant::now();
        let mut restarts = Restarts::default();
        let at = |ms| now + Duration::from_millis(ms);
        for exit in 0..Restarts::BURST as u64 {
            assert_eq!(
                restarts.after_exit(at(exit), Duration::from_millis(1), true),
                Duration::ZERO
            );
        }
        let burst = Restarts::BURST as u64;
        assert_eq!(
            restarts.after_exit(at(burst), Duration::from_millis(1), true),
            Duration::ZERO,
            "the first exit past the burst is a first failure"
        );
        assert_eq!(
            restarts.after_exit(at(burst + 1), Duration::from_millis(1), true),
            Restarts::FIRST
        );
        assert_eq!(
            restarts.after_exit(at(1_000), Duration::from_millis(1), true),
            Duration::ZERO
        );
    }
}
