//! Handlers SIGKILLed at random, every 200 ms, under a steady load: the only requests lost
//! are those a killed process had already accepted. A handler that keeps dying is started
//! again after a delay, and meanwhile its socket is out of the group (its queue moved to
//! the live handlers, no new connection sent to it), so nothing waits for a dead handler.
//!
//! The accounting uses the handlers' own counters: every connection a handler accepted is
//! counted in its slot's shared page (which the next process of the slot keeps counting
//! in), so `accepted - answered` is what died with a killed process. Every failed request
//! must be one of those.

use std::time::Duration;

use nix::sys::signal::Signal;
use parsrv_integration_tests::{
    addr, group, privileged, signal, wait_for, HandlerKind, Needs, Outcome, SteadyLoad,
};

const HANDLERS: usize = 4;
const KILLS: usize = 25;
const KILL_EVERY: Duration = Duration::from_millis(200);

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_kill_loop_loses_only_what_killed_handlers_had_accepted() {
    privileged(Needs::program(), || {
        let spawner = group("test-kill-loop", HandlerKind::Http)
            .handlers(HANDLERS as u32)
            .threads(2)
            .start();
        let load = SteadyLoad::start(
            addr(),
            8,
            KILL_EVERY * KILLS as u32 * 2,
            Duration::from_secs(3),
        );
        // A fixed sequence of victims (xorshift), so that runs compare.
        let mut state: u32 = 0x2545_f491;
        let mut kills = 0;
        // Looks at slots waiting out a restart delay while another slot has a handler:
        // each must be out of the group, and the program must send it nothing meanwhile.
        let (mut waiting, mut waiting_in_the_group, mut sent_to_parked) = (0, 0, 0);
        let mut previous: Option<parsrv::status::GroupStatus> = None;
        for _ in 0..KILLS {
            std::thread::sleep(KILL_EVERY);
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let status = spawner.status();
            let live = status.handlers.iter().filter(|h| h.pid.is_some()).count();
            for (handler, socket) in status.handlers.iter().zip(&status.sockets) {
                if handler.pid.is_none()
                    && handler.restart_in_ms.is_some_and(|ms| ms > 0)
                    && live > 0
                {
                    waiting += 1;
                    waiting_in_the_group += usize::from(!socket.parked);
                }
                let before = previous.as_ref().map(|p| &p.sockets[socket.slot as usize]);
                if let Some(before) = before.filter(|b| b.parked && socket.parked) {
                    sent_to_parked += socket.counters.selected - before.counters.selected;
                }
            }
            previous = Some(status.clone());
            if let Some(pid) = status.handlers[state as usize % HANDLERS].pid {
                signal(pid, Signal::SIGKILL);
                kills += 1;
            }
        }
        // The load goes on while the last victims come back, then stops.
        std::thread::sleep(Duration::from_secs(1));
        let outcomes = load.finish();
        assert!(
            wait_for(Duration::from_secs(15), || spawner
                .status()
                .handlers
                .iter()
                .all(|h| h.alive)),
            "handlers did not come back:\n{}",
            spawner.log()
        );
        let status = spawner.status();
        let accepted: u64 = status.handlers.iter().filter_map(|h| h.accepted).sum();
        let restarts: u32 = status.handlers.iter().map(|h| h.restarts).sum();
        let answered = outcomes.iter().filter(|o| **o == Outcome::Ok).count() as u64;
        let failed = outcomes.len() as u64 - answered;
        let lost_in_flight = accepted - answered;
        let timed_out = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::ConnectTimeout | Outcome::Refused))
            .count();
        eprintln!(
            "{kills} kills, {restarts} restarts, {waiting} looks at a slot waiting to restart \
             ({waiting_in_the_group} of them still in the group, {sent_to_parked} connections \
             sent to parked sockets): {} requests, {failed} failed, {lost_in_flight} of them \
             accepted by a killed process, {timed_out} never connected",
            outcomes.len()
        );
        assert!(kills >= KILLS * 3 / 4, "only {kills} kills");
        assert!(waiting > 0, "the loop never made a restart wait");
        assert_eq!(
            (waiting_in_the_group, sent_to_parked),
            (0, 0),
            "a slot waiting to restart kept receiving connections"
        );
        assert_eq!(
            failed,
            lost_in_flight,
            "a request failed that no killed handler had accepted\n{}",
            spawner.log()
        );
        assert_eq!(timed_out, 0);
        assert!(spawner.stop().success());
    });
}
