//! The problem parsrv exists for: one handler stalls. With its queue full (SIGSTOP, stall
//! detection off), plain SO_REUSEPORT keeps hashing connections to the full socket and they
//! fail; parsrv steers around it. With stall detection (the default), its queue is moved to
//! the handlers that accept and its socket demoted, so nothing waits behind it; continued,
//! it serves again. Each runs against a control in the same test.

use std::{net::SocketAddr, time::Duration};

use nix::sys::signal::Signal;
use parsrv::listeners::SocketState;
use parsrv_integration_tests::{
    addr, answering_pid, context_switches, example, group, http_load, privileged, signal,
    stop_process, wait_for, HandlerKind, Needs, NetCounters, Outcome, PlainGroup, Policy,
    SteadyLoad,
};

const HANDLERS: usize = 4;
const BACKLOG: u32 = 8;
// The load the baseline was measured with: 20 clients x 20 connections, 3 s limit.
const CLIENTS: usize = 20;
const PER_CLIENT: usize = 20;
const TIMEOUT: Duration = Duration::from_secs(3);

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn stalled_handler_loses_no_connection_while_plain_reuseport_does() {
    privileged(Needs::program(), || {
        // --- parsrv ---
        let addr: SocketAddr = addr();
        let spawner = group("test-stall", HandlerKind::Http)
            .handlers(4)
            .backlog(8)
            .threads(2)
            // The full-queue guarantee alone (stall detection is tested below).
            .stopped_handlers_keep_their_share()
            .start();
        let stalled = spawner.handler_pid(0);
        stop_process(stalled);
        // Fill the stalled handler's queue to the kernel's "full" (BACKLOG + 1). Connections
        // the others accept are held too.
        let held = spawner.fill_queue(0, addr);
        assert_eq!(
            spawner.status().sockets[0].queue.unwrap().depth,
            BACKLOG + 1
        );

        let before = NetCounters::read();
        let counters_before = spawner.status().sockets[0].counters;
        let result = http_load(addr, CLIENTS, PER_CLIENT, TIMEOUT);
        let kernel = before.delta(&NetCounters::read());
        let status = spawner.status();
        let stalled_socket = status.sockets[0].counters;
        eprintln!(
            "parsrv: {} of {} requests failed, ListenOverflows +{}, {} redirected away from the stalled socket",
            result.failures(),
            result.outcomes.len(),
            kernel.listen_overflows,
            stalled_socket.redirected_away - counters_before.redirected_away,
        );
        assert_eq!(result.outcomes.len(), CLIENTS * PER_CLIENT);
        assert_eq!(result.failures(), 0, "{:?}", result.outcomes);
        assert_eq!(kernel.listen_overflows, 0, "{kernel:?}");
        assert_eq!(kernel.listen_drops, 0, "{kernel:?}");
        // The scenario really happened: the stalled socket was the hash choice of some of
        // these connections, and it took none of them.
        assert!(stalled_socket.redirected_away > counters_before.redirected_away);
        assert_eq!(stalled_socket.selected, counters_before.selected);
        assert_eq!(
            status.errors.total(),
            0,
            "fail-open errors: {:?}",
            status.errors
        );
        signal(stalled, Signal::SIGCONT);
        drop(held);
        assert!(spawner.stop().success());

        // --- control: plain SO_REUSEPORT, same shape, socket 0 never accepts ---
        let control_addr: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        let plain = PlainGroup::start(control_addr, HANDLERS, BACKLOG as i32, &[1, 2, 3]);
        let before = NetCounters::read();
        // A quarter of the load: enough for a quarter of it to hash to the stuck socket and
        // time out (3 s each, which made this control most of the test's 30 s).
        let control = http_load(control_addr, CLIENTS, PER_CLIENT / 4, TIMEOUT);
        let kernel = before.delta(&NetCounters::read());
        eprintln!(
            "plain SO_REUSEPORT: {} of {} requests failed ({} connect timeouts), ListenOverflows +{}",
            control.failures(),
            control.outcomes.len(),
            control.count(Outcome::ConnectTimeout),
            kernel.listen_overflows,
        );
        assert!(
            control.count(Outcome::ConnectTimeout) > 0,
            "{:?}",
            control.outcomes
        );
        assert!(kernel.listen_overflows > 0, "{kernel:?}");
        drop(plain);
    });
}

/// A handler that never accepts (a single-threaded worker stuck in a slow request) while
/// its process runs: its queue is moved to the others after `--stall-after` and its socket
/// is demoted, so no request waits behind it. Control in the same test: the same group and
/// load with stall detection off, where the requests that queued behind it fail.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_handler_that_takes_nothing_from_its_queue_is_demoted_and_its_queue_moved() {
    privileged(Needs::program(), || {
        // Slot 0 holds its socket and never accepts; the others serve one connection at a
        // time with a blocking accept() (a server written for systemd).
        let script = format!(
            "if [ \"$PARSRV_SLOT\" = 0 ]; then exec sleep 600; fi; exec {}",
            example("blocking_handler").display()
        );
        let run = |stall_after: f64| {
            let spawner = group("test-stall-detect", HandlerKind::Exec)
                .handlers(4)
                .backlog(BACKLOG)
                .stall_after(stall_after)
                // redirect, as when this test's overflow bound below was derived: under
                // two-choices a 6.1 VM once counted ListenOverflows +2 with one stall and no
                // failed request (stop 40's fresh-clone run; not yet explained).
                .policy(Policy::Redirect)
                .command(&["sh", "-c", &script])
                .start();
            // Exec handlers count as ready after a second.
            assert!(
                spawner.wait_until_ready(Duration::from_secs(10)),
                "{}",
                spawner.log()
            );
            let before = NetCounters::read();
            let result = http_load(addr(), CLIENTS, PER_CLIENT, TIMEOUT);
            let kernel = before.delta(&NetCounters::read());
            let status = spawner.status();
            assert!(spawner.stop().success());
            (result, kernel, status)
        };
        let (control, control_kernel, control_status) = run(0.0);
        let (result, kernel, status) = run(0.1);
        let stalled = &status.sockets[0];
        eprintln!(
            "stall detection off: {} of {} requests failed ({:?} queued at slot 0); \
             on: {} failed, slot 0 stalled {} times, {} connections moved from it, \
             TCPMigrateReqSuccess +{} (off: +{})",
            control.failures(),
            control.outcomes.len(),
            control_status.sockets[0].queue,
            result.failures(),
            stalled.stalled,
            stalled.moved_from_stall,
            kernel.migrate_req_success,
            control_kernel.migrate_req_success,
        );
        // Control: what hashed to slot 0 before its queue was full waited there for good.
        assert!(control.failures() > 0, "{:?}", control.outcomes);
        assert_eq!(control_status.sockets[0].stalled, 0);
        // Stall detection: nothing waited behind it, every move was the kernel's.
        assert_eq!(result.failures(), 0, "{:?}", result.outcomes);
        assert!(stalled.stalled >= 1, "{status:?}");
        assert!(stalled.moved_from_stall >= 1, "{status:?}");
        assert!(kernel.migrate_req_success >= stalled.moved_from_stall);
        assert_eq!(kernel.migrate_req_failure, 0, "{kernel:?}");
        // Tried again after a second (a slow VM's load outlasts it), a handler that still
        // takes nothing fills its queue once more, and two handshakes racing for its last
        // place overflow it at the final ACK (the client's ACK is retransmitted, nothing
        // fails): seen once in a 6.1 VM beside another VM. Without a second try, none.
        assert!(
            kernel.listen_overflows == 0 || stalled.stalled > 1,
            "{kernel:?}, {stalled:?}"
        );
        assert_eq!(status.errors.total(), 0, "{:?}", status.errors);
        // Its process was left alone: the same one, never restarted.
        assert_eq!(status.handlers[0].restarts, 0);
    });
}

/// The case issue 30 starts from: a group on two addresses with two handlers each, both
/// handlers of one address stopped, 200 requests to that address with a 3 s time-out.
/// Before stall detection 18 failed (the two queues' worth: a queue moves only within its
/// address's reuseport group, and both of that address's handlers were stopped); with it,
/// the stopped handlers' sockets are demoted as soon as the spawner sees them stopped, and
/// the sk_lookup program sends that address's connections to the other address's handlers.
/// Continued, both serve their address again. Control: the same with detection off.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn an_address_whose_handlers_are_all_stopped_loses_nothing_and_serves_again_when_continued() {
    privileged(
        Needs::program().and(parsrv_integration_tests::Feature::SkLookup),
        || {
            let stopped_addr: SocketAddr = "127.0.0.2:8080".parse().unwrap();
            let run = |stall_after: f64| {
                let spawner = group("test-stall-address", HandlerKind::Http)
                    .listen_on(&["127.0.0.2:8080", "127.0.0.3:8080"])
                    .handlers(4)
                    .backlog(BACKLOG)
                    .no_autoscale()
                    .stall_after(stall_after)
                    .start();
                assert!(spawner.wait_until_ready(Duration::from_secs(10)));
                // Slots 0 and 2 are the first address's.
                let stopped = [spawner.handler_pid(0), spawner.handler_pid(2)];
                stopped.iter().for_each(|pid| stop_process(*pid));
                if stall_after > 0.0 {
                    assert!(
                        wait_for(Duration::from_secs(5), || {
                            let status = spawner.status();
                            [0, 2]
                                .iter()
                                .all(|s| status.sockets[*s].state == SocketState::Demoted)
                        }),
                        "the stopped handlers' sockets were not demoted:\n{}",
                        spawner.log()
                    );
                }
                let result = http_load(stopped_addr, 10, 20, TIMEOUT);
                (spawner, stopped, result)
            };
            let (control, stopped, control_result) = run(0.0);
            stopped.iter().for_each(|pid| signal(*pid, Signal::SIGCONT));
            assert!(control.stop().success());
            let (spawner, stopped, result) = run(0.1);
            eprintln!(
                "both handlers of an address stopped, 200 requests to it: {} failed with \
                 stall detection off, {} with it on",
                control_result.failures(),
                result.failures()
            );
            assert!(control_result.failures() > 0);
            assert_eq!(result.failures(), 0, "{:?}", result.outcomes);
            // Continued: promoted at the next look, and the address's own handlers answer.
            stopped.iter().for_each(|pid| signal(*pid, Signal::SIGCONT));
            assert!(
                wait_for(Duration::from_secs(5), || {
                    let status = spawner.status();
                    [0, 2]
                        .iter()
                        .all(|s| status.sockets[*s].state == SocketState::Serving)
                }),
                "not promoted back:\n{}",
                spawner.log()
            );
            let answered_by = |pid: u32| {
                (0..50).any(|_| {
                    parsrv_integration_tests::get_page(stopped_addr, "/", TIMEOUT)
                        .ok()
                        .and_then(|(_, body)| answering_pid(&body))
                        == Some(pid)
                })
            };
            assert!(
                stopped.iter().all(|pid| answered_by(*pid)),
                "{}",
                spawner.log()
            );
            let status = spawner.status();
            assert_eq!(
                (status.handlers[0].restarts, status.handlers[2].restarts),
                (0, 0)
            );
            assert!(spawner.log().contains("serves again after its stall"));
            assert!(spawner.stop().success());
        },
    );
}

/// A server with a blocking accept() loop that ends on any accept error (written for
/// systemd) is stopped for 5 s under load, demoted, and continued: it keeps its pid and
/// serves again, and nothing failed meanwhile. An idle spawner watching for stalls stays
/// (almost) asleep.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_blocking_accept_handler_stopped_for_5_s_is_demoted_then_serves_again_unharmed() {
    privileged(Needs::program(), || {
        let server = example("blocking_handler");
        let spawner = group("test-stall-resume", HandlerKind::Exec)
            .handlers(3)
            .backlog(BACKLOG)
            .command(&[server.to_str().unwrap()])
            .start();
        assert!(spawner.wait_until_ready(Duration::from_secs(10)));
        let idle = {
            let before = context_switches(spawner.pid());
            std::thread::sleep(Duration::from_secs(2));
            context_switches(spawner.pid()) - before
        };
        let stalled = spawner.handler_pid(0);
        stop_process(stalled);
        let load = SteadyLoad::start(addr(), 4, Duration::from_secs(5), TIMEOUT);
        std::thread::sleep(Duration::from_secs(5));
        let outcomes = load.finish();
        let during = spawner.status();
        signal(stalled, Signal::SIGCONT);
        assert!(
            wait_for(Duration::from_secs(5), || spawner.status().sockets[0].state
                == SocketState::Serving),
            "{}",
            spawner.log()
        );
        let mine = format!("blocking handler pid {stalled}");
        let served_again = (0..60).any(|_| {
            parsrv_integration_tests::get_page(addr(), "/", TIMEOUT)
                .is_ok_and(|(_, body)| body.contains(&mine))
        });
        let failed = outcomes.iter().filter(|o| **o != Outcome::Ok).count();
        let status = spawner.status();
        eprintln!(
            "idle spawner: {idle} wake-ups in 2 s; stopped 5 s: {} requests, {failed} failed, \
             socket {:?} meanwhile, served again: {served_again}",
            outcomes.len(),
            during.sockets[0].state
        );
        assert!(idle <= 20, "an idle spawner woke {idle} times in 2 s");
        assert_eq!(during.sockets[0].state, SocketState::Demoted);
        assert_eq!(failed, 0, "{outcomes:?}");
        assert!(served_again, "{}", spawner.log());
        assert_eq!(status.handlers[0].pid, Some(stalled));
        assert_eq!(status.handlers[0].restarts, 0);
        assert!(
            !spawner.log().contains("blocking_handler: accept:"),
            "{}",
            spawner.log()
        );
        assert!(spawner.stop().success());
    });
}

/// The other side of stall detection: handlers that accept, however busy, lose nothing.
/// One-connection-at-a-time servers under more clients than they serve keep their queues
/// non-empty; at every `--stall-after` from 0.01 s to the default, no request fails, and a
/// handler is restarted only for the one known harm (an EINVAL accept during a move). How many were taken for stalled is printed: none natively (a
/// handler that accepts is never quiet), a few in an emulated VM, where a runnable handler
/// can wait over 100 ms for the CPU (it is demoted, its queue served elsewhere, and it
/// takes its share again once it takes a connection).
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn busy_handlers_that_accept_are_not_harmed_by_stall_detection() {
    privileged(Needs::program(), || {
        let server = example("blocking_handler");
        for stall_after in [0.01, 0.03, parsrv::spec::DEFAULT_STALL_AFTER] {
            let spawner = group("test-stall-busy", HandlerKind::Exec)
                .handlers(4)
                .backlog(BACKLOG)
                .stall_after(stall_after)
                .command(&[server.to_str().unwrap()])
                .start();
            assert!(spawner.wait_until_ready(Duration::from_secs(10)));
            let load = SteadyLoad::start(addr(), 32, Duration::from_secs(3), TIMEOUT);
            // The scenario: queues held connections (printed: every queue at once; beside
            // other loads, as in CI beside two VMs, the clients get less of the CPU).
            let mut all_queued = false;
            let mut any_queued = false;
            let until = std::time::Instant::now() + Duration::from_secs(3);
            while std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
                let queued: Vec<bool> = spawner
                    .status()
                    .sockets
                    .iter()
                    .map(|s| s.queue.is_some_and(|q| q.depth > 0))
                    .collect();
                all_queued |= queued.iter().all(|q| *q);
                any_queued |= queued.iter().any(|q| *q);
            }
            let outcomes = load.finish();
            let status = spawner.status();
            let stalls: u64 = status.sockets.iter().map(|s| s.stalled).sum();
            let moved: u64 = status.sockets.iter().map(|s| s.moved_from_stall).sum();
            let restarts: u32 = status.handlers.iter().map(|h| h.restarts).sum();
            let failed: Vec<_> = outcomes.iter().filter(|o| **o != Outcome::Ok).collect();
            eprintln!(
                "--stall-after {stall_after}: {stalls} taken for stalled ({moved} moved), \
                 {} requests, {} failed, {restarts} restarts, every queue non-empty at once: \
                 {all_queued}",
                outcomes.len(),
                failed.len()
            );
            assert!(any_queued, "the load never queued a connection");
            assert!(
                failed.is_empty(),
                "--stall-after {stall_after}: {failed:?}\n{}",
                spawner.log()
            );
            // The one harm left (docs/limits.md): an accept() that falls between a move's
            // shutdown and listen fails with EINVAL, and this server ends on any accept
            // error. Natively none (printed above); in emulated VMs at 0.01 s, 1-3 in 3 s.
            // Every restart must be that one.
            let log = spawner.log();
            let einval = log
                .matches("blocking_handler: accept: Invalid argument")
                .count();
            assert_eq!(restarts as usize, einval, "{log}");
            assert!(spawner.stop().success());
        }
    });
}
