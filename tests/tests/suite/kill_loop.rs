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

use parsrv_integration_tests::{group, kill_loop, privileged, HandlerKind, Needs};

const KILLS: usize = 25;

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_kill_loop_loses_only_what_killed_handlers_had_accepted() {
    privileged(Needs::program(), || {
        let spawner = group("test-kill-loop", HandlerKind::Http)
            .handlers(4)
            .threads(2)
            .start();
        let run = kill_loop(&spawner, KILLS, Duration::from_millis(200), 8);
        eprintln!("{run:?}");
        assert!(run.kills >= KILLS * 3 / 4, "only {} kills", run.kills);
        assert!(run.waiting > 0, "the loop never made a restart wait");
        assert_eq!(
            (run.waiting_in_the_group, run.sent_while_not_serving),
            (0, 0),
            "a slot waiting to restart kept receiving connections"
        );
        // Every failed request was accepted by a process that was then killed. The handler
        // counts a connection right after accept() returns: a kill in between loses one it
        // never counted, at most one per accepting thread (2) per kill. Anything else would
        // show in the kernel's counters (a failed migration, a SYN dropped on a full queue)
        // or as a client that never connected.
        assert!(
            run.failed >= run.lost_in_flight
                && run.failed - run.lost_in_flight <= 2 * run.kills as u64,
            "a request failed that no killed handler had accepted: {run:?}\n{}",
            spawner.log()
        );
        assert_eq!(run.never_connected, 0, "{run:?}");
        // The program's fail-open errors, by cause: a connection the kernel's hash placed
        // can land on a socket without a handler.
        let errors = spawner.status().errors;
        eprintln!("program fail-open errors: {errors:?}");
        assert_eq!(
            (run.kernel.migrate_req_failure, run.kernel.listen_overflows),
            (0, 0),
            "{run:?}\nprogram fail-open errors: {errors:?}"
        );
        assert_eq!(errors.total(), 0, "the program failed open: {errors:?}");
        assert!(spawner.stop().success());
    });
}
