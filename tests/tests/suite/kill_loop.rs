//! Handlers SIGKILLed at random, every 200 ms, under a steady load and under an open-loop one:
//! the only requests lost are those a killed process had already accepted. A handler that
//! was ready is started again at once, however often it is killed; one that keeps dying
//! before it is ready is started again after a delay, and meanwhile its socket is out of
//! the group (its queue moved to the live handlers, no new connection sent to it), so
//! nothing waits for a dead handler.
//!
//! The accounting uses the handlers' own counters: every connection a handler accepted is
//! counted in its slot's shared page (which the next process of the slot keeps counting
//! in), so `accepted - answered` is what died with a killed process. Every failed request
//! must be one of those.

use std::time::{Duration, Instant};

use parsrv::listeners::SocketState;
use parsrv_integration_tests::{
    addr, group, group_whose_slot_1_is_never_ready, http_load, kill_loop, privileged, HandlerKind,
    KillLoad, Needs, Outcome, SteadyLoad,
};

const KILLS: usize = 25;

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_kill_loop_loses_only_what_killed_handlers_had_accepted() {
    privileged(Needs::program(), || {
        let spawner = group("test-kill-loop", HandlerKind::Http)
            .handlers(4)
            .threads(2)
            .start();
        let run = kill_loop(
            &spawner,
            KILLS,
            Duration::from_millis(200),
            KillLoad::Steady { clients: 8 },
        );
        eprintln!("{run:?}");
        assert!(run.kills >= KILLS * 3 / 4, "only {} kills", run.kills);
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

/// The kill storm of issue 30: before, each slot's backoff grew to 1.6-3.2 s under it, most
/// sockets waited for a handler at once, and the program dropped about 900 SYNs as "all
/// full" (ListenOverflows +942, 66-100 of 2,000 connections timed out). Ready handlers now
/// restart at once.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_kill_storm_under_open_loop_load_loses_only_what_killed_handlers_had_accepted() {
    privileged(Needs::program(), || {
        let spawner = group("test-kill-storm", HandlerKind::Http)
            .handlers(4)
            .threads(2)
            .backlog(64)
            .start();
        // An open loop does not slow down with the machine: at the 200 connections/s
        // an emulated CPU is overloaded before any kill (queues full, handshakes timing
        // out). So the rate is a quarter of what this group serves here, measured first,
        // at most 200/s: the kills, not the load, are what is tested.
        let started = Instant::now();
        let calibration = http_load(addr(), 8, 25, Duration::from_secs(3));
        assert_eq!(calibration.failures(), 0, "{:?}", calibration.outcomes);
        let capacity = 200.0 / started.elapsed().as_secs_f64();
        let per_second = ((capacity / 4.0) as u32).clamp(10, 200);
        let kills = 50;
        let run = kill_loop(
            &spawner,
            kills,
            Duration::from_millis(200),
            KillLoad::Open { per_second },
        );
        eprintln!("{capacity:.0} requests/s closed-loop, the storm at {per_second}/s: {run:?}");
        // Read before any assertion, printed with every failure: whether the program saw
        // every queue full (dropped), failed open (errors), and where the queues stood.
        let status = spawner.status();
        let dropped: u64 = status.sockets.iter().map(|s| s.counters.dropped).sum();
        let seen = format!(
            "program errors {:?}; sockets {:?}",
            status.errors,
            status
                .sockets
                .iter()
                .map(|s| (s.slot, s.state, s.queue, s.counters))
                .collect::<Vec<_>>()
        );
        assert!(run.kills >= kills * 3 / 4, "only {} kills", run.kills);
        assert_eq!(run.requests, per_second as u64 * 10);
        assert!(
            run.failed >= run.lost_in_flight
                && run.failed - run.lost_in_flight <= 2 * run.kills as u64,
            "a request failed that no killed handler had accepted: {run:?}\n{}",
            spawner.log()
        );
        assert_eq!(run.never_connected, 0, "{run:?}\n{}", spawner.log());
        assert_eq!(
            (run.kernel.migrate_req_failure, run.kernel.listen_overflows),
            (0, 0),
            "{run:?}; {seen}\n{}",
            spawner.log()
        );
        assert_eq!(dropped, 0, "the program saw every queue full: {seen}");
        assert!(spawner.stop().success());
    });
}

/// The crash loop's side of the same rule: a slot whose handler dies before it is ready
/// waits out a growing delay, with its socket out of the group, while the other slots serve
/// every request.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_slot_crash_looping_before_ready_is_out_of_the_group_while_it_waits() {
    privileged(Needs::program(), || {
        // Ready by the notify protocol: slot 1 never says READY=1, so it always dies before
        // ready. (Without it an exec handler counts as ready after a second, and in a 6.1 VM
        // short of CPU `sh -c 'sleep 0.2; exit 3'` lived longer than that: restarted at once
        // as a handler that had served, never parked.)
        let spawner = group_whose_slot_1_is_never_ready("test-crash-slot", "sleep 0.2; exit 3");
        let load = SteadyLoad::start(addr(), 4, Duration::from_secs(30), Duration::from_secs(3));
        let mut parked_looks = 0;
        let mut sent_while_parked = 0;
        let mut previous = spawner.status();
        // At least 4 s, and until slot 1 was seen parked twice (its first parks are 100 and
        // 200 ms: in a VM short of CPU, where each look takes longer and the crash loop runs
        // slower, 4 s saw one restart and no park), at most 25 s.
        let started = Instant::now();
        let looking = |parked_looks: usize| {
            let elapsed = started.elapsed();
            elapsed < Duration::from_secs(25)
                && (elapsed < Duration::from_secs(4) || parked_looks < 2)
        };
        while looking(parked_looks) {
            std::thread::sleep(Duration::from_millis(50));
            let status = spawner.status();
            let (socket, handler) = (&status.sockets[1], &status.handlers[1]);
            let (was_socket, was_handler) = (&previous.sockets[1], &previous.handlers[1]);
            if socket.state == SocketState::Parked && handler.restart_in_ms.is_some() {
                parked_looks += 1;
                if was_socket.state == SocketState::Parked
                    && (was_handler.restarts, was_handler.pid) == (handler.restarts, handler.pid)
                {
                    sent_while_parked += socket.counters.selected - was_socket.counters.selected;
                }
            }
            previous = status;
        }
        let outcomes = load.finish();
        let failed = outcomes.iter().filter(|o| **o != Outcome::Ok).count();
        let status = spawner.status();
        eprintln!(
            "{} requests, {failed} failed; slot 1: {} restarts, parked at {parked_looks} looks",
            outcomes.len(),
            status.handlers[1].restarts
        );
        assert!(
            parked_looks > 0,
            "slot 1 was never seen waiting out of the group"
        );
        assert_eq!(sent_while_parked, 0);
        assert_eq!(failed, 0, "{outcomes:?}\n{}", spawner.log());
        assert!(spawner.log().contains("keeps exiting: next start in"));
        assert!(spawner.stop().success());
    });
}
