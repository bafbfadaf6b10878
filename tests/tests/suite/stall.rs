//! The problem parsrv exists for: one handler stalls. With its queue full (SIGSTOP, stall
//! detection off), plain SO_REUSEPORT keeps hashing connections to the full socket and they
//! fail; parsrv steers around it. With stall detection (the default), its queue is moved to
//! the handlers that accept and its socket demoted, so nothing waits behind it; continued,
//! it serves again. Each runs against a control in the same test.

use std::{net::SocketAddr, time::Duration};

use nix::sys::signal::Signal;
use parsrv::listeners::SocketState;
use parsrv_integration_tests::{
    addr, alive, answering_pid, context_switches, example, fd_of_process, group, http_load,
    is_listening, privileged, signal, stop_process, wait_for, HandlerKind, KillAtSyscall, Needs,
    NetCounters, Outcome, PlainGroup, SteadyLoad,
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
    // More places in each queue than the load has clients (one connection each at a time),
    // so that no queue reaches its last place and ListenOverflows must stay 0 whatever the
    // timing. With BACKLOG (8), the never-accepting handler's queue filled before the
    // first look and, in a 6.1 VM, two handshakes took its last place: the program's choice
    // and the request socket that counts it are not one step, so a SYN on another CPU in
    // between sees the place free too (the kernel admits both; the second overflows at its
    // final ACK and completes on a retransmission: ListenOverflows +2, no request failed).
    const MORE_PLACES_THAN_CLIENTS: u32 = 24;
    const _: () = assert!(MORE_PLACES_THAN_CLIENTS as usize + 1 > CLIENTS);
    privileged(Needs::program(), || {
        let script = slot_0_never_accepts();
        let run = |stall_after: f64| {
            let spawner = group("test-stall-detect", HandlerKind::Exec)
                .handlers(4)
                .backlog(MORE_PLACES_THAN_CLIENTS)
                .stall_after(stall_after)
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
            let log = spawner.log();
            assert!(spawner.stop().success());
            (result, kernel, status, log)
        };
        let (control, control_kernel, control_status, _) = run(0.0);
        let (result, kernel, status, log) = run(0.1);
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
        assert_eq!(result.failures(), 0, "{:?}\n{log}", result.outcomes);
        assert!(stalled.stalled >= 1, "{status:?}\n{log}");
        assert!(stalled.moved_from_stall >= 1, "{status:?}");
        assert!(kernel.migrate_req_success >= stalled.moved_from_stall);
        assert_eq!(kernel.migrate_req_failure, 0, "{kernel:?}");
        // No queue ever had fewer places than there were clients: nothing overflowed.
        assert_eq!(kernel.listen_overflows, 0, "{kernel:?}, {stalled:?}");
        assert_eq!(status.errors.total(), 0, "{:?}", status.errors);
        // Its process was left alone: the same one, never restarted.
        assert_eq!(status.handlers[0].restarts, 0);
    });
}

/// Slot 0 holds its socket and never accepts; the others serve one connection at a time
/// with a blocking accept() (a server written for systemd). For `sh -c`.
fn slot_0_never_accepts() -> String {
    format!(
        "if [ \"$PARSRV_SLOT\" = 0 ]; then exec sleep 600; fi; exec {}",
        example("blocking_handler").display()
    )
}

/// The spawner killed in the middle of a move, after the stalled socket's shutdown and
/// before its listen() (strace kills it at that call): the socket is out of the group with
/// nobody to put it back. The other handlers serve on; the next spawner adopts the group,
/// puts the socket back (demoted, its handler still takes nothing) with the queue length it
/// had, and the same handlers serve on. No request fails or waits behind it throughout.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_spawner_killed_between_a_moves_shutdown_and_listen_leaves_no_connection_waiting() {
    privileged(Needs::program(), || {
        const BACKLOG_HERE: u32 = 24;
        let script = slot_0_never_accepts();
        let build = || {
            group("test-stall-killed", HandlerKind::Exec)
                .handlers(4)
                .backlog(BACKLOG_HERE)
                .command(&["sh", "-c", &script])
        };
        let spawner = build().start();
        assert!(
            spawner.wait_until_ready(Duration::from_secs(10)),
            "{}",
            spawner.log()
        );
        let handlers: Vec<u32> = (0..4).map(|slot| spawner.handler_pid(slot)).collect();
        // Its first listen() from now on is the move's: the group is started, has a fixed
        // size, and only slot 0 can stall.
        let mut kill = KillAtSyscall::arm(spawner.pid(), "listen");
        let before = NetCounters::read();
        let load = SteadyLoad::start(addr(), 4, Duration::from_secs(60), TIMEOUT);
        assert!(kill.struck(Duration::from_secs(20)), "{}", spawner.log());
        let mut steps = vec![("killed", load.so_far())];
        assert!(
            wait_for(Duration::from_secs(5), || !alive(spawner.pid())),
            "the spawner outlived strace's SIGKILL"
        );
        // Killed inside the window: the slot's socket is shut down and not listening (the
        // move's log line, written after the listen(), never came).
        let socket_0 = || fd_of_process(handlers[0], 3).expect("slot 0's socket");
        assert!(!is_listening(&socket_0()), "{}", spawner.log());
        assert!(!spawner
            .log()
            .contains("queued connections to the other handlers"));
        // A second without a spawner: the others serve everything.
        std::thread::sleep(Duration::from_secs(1));
        steps.push(("adopting", load.so_far()));
        let again = build().start();
        assert!(
            again.wait_until_ready(Duration::from_secs(10)),
            "{}",
            again.log()
        );
        steps.push(("adopted", load.so_far()));
        let adopted: Vec<u32> = (0..4).map(|slot| again.handler_pid(slot)).collect();
        assert_eq!(adopted, handlers, "{}", again.log());
        assert!(
            wait_for(Duration::from_secs(10), || is_listening(&socket_0())
                && again.status().sockets[0].state == SocketState::Demoted),
            "slot 0's socket was not put back, demoted:\n{}",
            again.log()
        );
        steps.push(("put back", load.so_far()));
        // Where connections wait meanwhile: per slot, state, queue depth and selections.
        let looks: Vec<String> = (0..6)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(400));
                let status = again.status();
                let slots: Vec<String> = status
                    .sockets
                    .iter()
                    .map(|s| {
                        format!(
                            "{:?}/{}/{}/{}",
                            s.state,
                            s.queue.map_or(0, |q| q.depth),
                            s.counters.selected,
                            s.counters.migrated_in
                        )
                    })
                    .collect();
                format!(
                    "{} done: {} errors {:?}",
                    load.so_far(),
                    slots.join(" "),
                    status.errors
                )
            })
            .collect();
        // (The looks above served on for 2.4 s with the socket back in the group: longer
        // than the watchdog's period, whose look at the queue length comes before the end.)
        let outcomes = load.finish();
        let kernel = before.delta(&NetCounters::read());
        let status = again.status();
        let failed = outcomes.iter().filter(|o| **o != Outcome::Ok).count();
        eprintln!(
            "{} requests across the kill and the adoption, {failed} failed; kernel {kernel:?}",
            outcomes.len()
        );
        assert!(outcomes.len() > 20, "{}", outcomes.len());
        // It stayed demoted from the adoption on: the new spawner tried it again (after a
        // second) before it ever had to move a queue from it. (Promoted at adoption, it
        // took its share at once and the first thing said of it was a move: in a 6.1 VM,
        // 4 requests waited there over 3 s while the new spawner learnt which handlers
        // accept.)
        let log = again.log();
        let first_said = log.lines().find(|l| {
            l.contains("handler 0")
                && (l.contains("took no connection") || l.contains("tried again"))
        });
        assert!(
            first_said.is_none_or(|l| l.contains("tried again")),
            "{log}"
        );
        // Where the failures fell among the test's steps (requests ended before each).
        let failures: Vec<_> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| **o != Outcome::Ok)
            .collect();
        eprintln!("steps {steps:?}; failed requests (index, outcome) {failures:?}; looks every 0.4 s after: {looks:#?}");
        assert_eq!(failed, 0, "{failures:?}\n{}", again.log());
        assert_eq!(kernel.migrate_req_failure, 0, "{kernel:?}");
        assert_eq!(kernel.listen_overflows, 0, "{kernel:?}");
        assert_eq!(status.errors.total(), 0, "{:?}", status.errors);
        // The queue length parsrv gave it, not the 0 a socket that is not listening reads.
        assert_eq!(
            status.sockets[0].queue.unwrap().capacity,
            BACKLOG_HERE,
            "{status:?}"
        );
        assert!(
            !again
                .log()
                .contains("changed its socket's accept-queue length"),
            "{}",
            again.log()
        );
        drop(spawner);
        assert!(again.stop().success());
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
            let before = NetCounters::read();
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
            // Printed with a failure: which of the kernel's paths reset or dropped one.
            let kernel = before.delta(&NetCounters::read());
            let status = spawner.status();
            let stalls: u64 = status.sockets.iter().map(|s| s.stalled).sum();
            let moved: u64 = status.sockets.iter().map(|s| s.moved_from_stall).sum();
            let spared: u64 = status.sockets.iter().map(|s| s.stall_spared).sum();
            let restarts: u32 = status.handlers.iter().map(|h| h.restarts).sum();
            let failed: Vec<_> = outcomes.iter().filter(|o| **o != Outcome::Ok).collect();
            eprintln!(
                "--stall-after {stall_after}: {stalls} taken for stalled ({moved} moved), \
                 {spared} looked stalled but left serving, {} requests, {} failed, {restarts} restarts, every queue non-empty at once: \
                 {all_queued}",
                outcomes.len(),
                failed.len()
            );
            assert!(any_queued, "the load never queued a connection");
            assert!(
                failed.is_empty(),
                "--stall-after {stall_after}: {failed:?}, {kernel:?}, program errors {:?}\n{}",
                status.errors,
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
