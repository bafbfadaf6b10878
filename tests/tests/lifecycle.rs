//! Handlers and the spawner over their life: respawn on the same socket without losing a
//! queued connection, exact status, one socket per handler, parallel accept, shutdown that
//! leaves nothing behind, and no orphans when the spawner itself is killed.

use std::{io::Write, path::Path, time::Duration};

use nix::sys::signal::Signal;
use parsrv::{control, dataplane::pins::group_dir as pin_dir, kernel, listeners::SocketState};
use parsrv_integration_tests::{
    addr, connect, example, fd_of_process, group, http_get, is_listening, loaded_parsrv_programs,
    privileged, processes_mentioning, read_answer, signal, stop_process, wait_for, HandlerKind,
    Needs, NetCounters, Outcome, HTTP_REQUEST,
};

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn killed_handler_is_respawned_on_its_socket_and_serves_its_queue() {
    privileged(Needs::program(), || {
        let spawner = group("test-respawn", HandlerKind::Http)
            .handlers(2)
            .backlog(16)
            .start();
        let old = spawner.handler_pid(0);
        stop_process(old);
        // Requests wait in the stopped handler's queue (handler 1 answers the others).
        let mut held = Vec::new();
        assert!(wait_for(Duration::from_secs(20), || {
            let mut conn = connect(addr(), Duration::from_secs(2)).unwrap();
            conn.write_all(HTTP_REQUEST).unwrap();
            held.push(conn);
            spawner.status().sockets[0].queue.unwrap().depth >= 4
        }));
        let queued = spawner.status().sockets[0].queue.unwrap().depth;

        signal(old, Signal::SIGKILL);
        assert!(wait_for(Duration::from_secs(10), || {
            let h = &spawner.status().handlers[0];
            h.alive && h.pid.is_some_and(|p| p != old)
        }));
        let new = spawner.handler_pid(0);
        let answers: Vec<String> = held
            .iter_mut()
            .map(|conn| read_answer(conn, Duration::from_secs(10)).expect("every request answered"))
            .collect();
        let by_new = answers
            .iter()
            .filter(|a| a.ends_with(&format!("parsrv handler 0 (pid {new})\n")))
            .count();
        eprintln!("{queued} queued at the killed handler, {by_new} served by its successor {new}");
        assert_eq!(by_new, queued as usize, "{answers:?}");
        let status = spawner.status();
        assert_eq!(status.handlers[0].restarts, 1);
        assert_eq!(
            status.handlers[0].last_exit.as_deref(),
            Some("was killed by signal 9")
        );
        assert_eq!(status.sockets[0].queue.unwrap().depth, 0);
        assert!(spawner.stop().success());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn status_reports_kernel_queue_depths_and_each_handler_holds_only_its_socket() {
    privileged(Needs::program(), || {
        let spawner = group("test-status", HandlerKind::Echo)
            .handlers(3)
            .backlog(8)
            .start();
        let pids: Vec<u32> = (0..3).map(|slot| spawner.handler_pid(slot)).collect();
        for &pid in &pids {
            stop_process(pid);
        }
        let held: Vec<_> = (0..10)
            .map(|_| connect(addr(), Duration::from_secs(2)).unwrap())
            .collect();
        assert!(wait_for(Duration::from_secs(2), || spawner
            .status()
            .sockets
            .iter()
            .map(|s| s.queue.unwrap().depth)
            .sum::<u32>()
            == 10));

        let status = spawner.status_via_cli();
        for (slot, &pid) in pids.iter().enumerate() {
            // The handler's fd 3, read with TCP_INFO by this test: the kernel's own numbers.
            let socket = fd_of_process(pid, 3).unwrap();
            let kernel_queue = kernel::queue_depth(std::os::fd::AsFd::as_fd(&socket)).unwrap();
            assert_eq!(
                status.sockets[slot].queue,
                Some(kernel_queue),
                "slot {slot}"
            );
            assert_eq!(kernel_queue.capacity, 8);
            let cookie = kernel::socket_cookie(std::os::fd::AsFd::as_fd(&socket)).unwrap();
            assert_eq!(
                status.sockets[slot].cookie, cookie,
                "handler {slot} holds slot {slot}'s socket"
            );
            // No other listening socket (no sibling's socket) leaked into the handler: every
            // listening fd it has is its own socket (accept threads hold duplicates of fd 3).
            for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .flatten()
            {
                let fd: i32 = entry.file_name().to_string_lossy().parse().unwrap();
                let copy = fd_of_process(pid, fd).unwrap();
                if is_listening(&copy) {
                    let other = kernel::socket_cookie(std::os::fd::AsFd::as_fd(&copy)).unwrap();
                    assert_eq!(
                        other, cookie,
                        "handler {slot} also holds another group socket at fd {fd}"
                    );
                }
            }
        }
        // The table says the same.
        let out = std::process::Command::new(parsrv_integration_tests::parsrv_bin())
            .args(["status", "test-status"])
            .output()
            .unwrap();
        let table = String::from_utf8(out.stdout).unwrap();
        for socket in &status.sockets {
            let queue = socket.queue.unwrap();
            let row = table
                .lines()
                .find(|l| l.split_whitespace().next() == Some(&socket.slot.to_string()))
                .unwrap_or_else(|| panic!("no row for slot {}: {table}", socket.slot));
            assert!(
                row.contains(&format!(" {}/{} ", queue.depth, queue.capacity)),
                "{row}"
            );
        }
        for &pid in &pids {
            signal(pid, Signal::SIGCONT);
        }
        drop(held);
        assert!(spawner.stop().success());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn threads_accept_in_parallel_and_lost_races_are_counted() {
    privileged(Needs::program(), || {
        let spawner = group("test-threads", HandlerKind::Http)
            .handlers(1)
            .threads(4)
            .start();
        const REQUESTS: u64 = 300;
        for _ in 0..REQUESTS {
            assert_eq!(http_get(addr(), Duration::from_secs(3)), Outcome::Ok);
        }
        let handler = &spawner.status().handlers[0];
        eprintln!(
            "{:?} accepted, {:?} lost races among 4 threads",
            handler.accepted, handler.lost_races
        );
        assert_eq!(handler.accepted, Some(REQUESTS));
        // How many threads lose a race depends on scheduling (poll() re-checks readiness
        // after waking, so a late thread usually sleeps on); the accounting itself is unit
        // tested in parsrv's handler module.
        let threads = std::fs::read_dir(format!("/proc/{}/task", handler.pid.unwrap()))
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.starts_with("parsrv-accept"))
            })
            .count();
        assert_eq!(threads, 4);
        assert!(spawner.stop().success());
    });
}

fn leftovers(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    if pin_dir(name).exists() {
        found.push(format!("pins {}", pin_dir(name).display()));
    }
    if control::socket_path(name).exists() {
        found.push(format!(
            "control socket {}",
            control::socket_path(name).display()
        ));
    }
    for pid in processes_mentioning(&format!("--name {name}")) {
        found.push(format!("process {pid}"));
    }
    found
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn sigterm_and_sigint_stop_cleanly_and_leave_nothing_behind() {
    privileged(Needs::program(), || {
        let programs_before = loaded_parsrv_programs();
        for (name, stop_signal) in [
            ("test-sigterm", Signal::SIGTERM),
            ("test-sigint", Signal::SIGINT),
        ] {
            let spawner = group(name, HandlerKind::Http).handlers(3).start();
            let handlers: Vec<u32> = (0..3).map(|s| spawner.handler_pid(s)).collect();
            assert!(pin_dir(name)
                .join(parsrv_common::reuseport::names::SOCKETS)
                .exists());
            assert!(control::socket_path(name).exists());
            assert_eq!(loaded_parsrv_programs().len(), programs_before.len() + 1);
            assert_eq!(http_get(addr(), Duration::from_secs(3)), Outcome::Ok);

            let pid = spawner.pid();
            signal(pid, stop_signal);
            let status = spawner.stop();
            assert!(status.success(), "{name}: {status}");
            for handler in handlers {
                assert!(
                    !Path::new(&format!("/proc/{handler}")).exists(),
                    "handler {handler} left"
                );
            }
            assert_eq!(leftovers(name), Vec::<String>::new());
            assert!(wait_for(Duration::from_secs(5), || loaded_parsrv_programs(
            ) == programs_before));
            // Nothing listens any more.
            assert_eq!(
                connect(addr(), Duration::from_secs(1)).unwrap_err(),
                Outcome::Refused
            );
        }
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_stale_record_and_pins_of_a_dead_group_are_removed_by_the_next_run() {
    privileged(Needs::program(), || {
        let programs_before = loaded_parsrv_programs();
        let name = "test-spawner-kill";
        let echo_group = || group(name, HandlerKind::Echo).handlers(2);
        let spawner = echo_group().start();
        let handlers: Vec<u32> = (0..2).map(|s| spawner.handler_pid(s)).collect();
        signal(spawner.pid(), Signal::SIGKILL);
        // The handlers outlive their spawner (see adoption.rs); here they die too, and with
        // them the group: only the pins (held by bpffs) and the record remain.
        for pid in &handlers {
            signal(*pid, Signal::SIGKILL);
        }
        assert!(wait_for(Duration::from_secs(5), || handlers
            .iter()
            .all(|h| !Path::new(&format!("/proc/{h}")).exists())));
        // The program stays loaded while pinned (for a spawner to adopt it).
        assert!(pin_dir(name).exists());
        assert!(parsrv::spawner::record_path(name).exists());

        let again = echo_group().start();
        let log = again.log();
        assert!(log.contains("no handler of the last run is left"), "{log}");
        assert!(log.contains("removed stale pins"), "{log}");
        assert!(again.stop().success());
        assert_eq!(leftovers(name), Vec::<String>::new());
        assert!(!parsrv::spawner::record_path(name).exists());
        assert!(wait_for(Duration::from_secs(5), || loaded_parsrv_programs(
        ) == programs_before));
        drop(spawner);
    });
}

/// Sequential requests; each slot's `selected` counter before and after.
fn selected_over(spawner: &parsrv_integration_tests::Spawner, requests: usize) -> Vec<u64> {
    let before = spawner.status();
    for _ in 0..requests {
        assert_eq!(http_get(addr(), Duration::from_secs(3)), Outcome::Ok);
    }
    let after = spawner.status();
    before
        .sockets
        .iter()
        .zip(&after.sockets)
        .map(|(b, a)| a.counters.selected - b.counters.selected)
        .collect()
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_restarted_handler_gets_new_connections_only_once_it_is_ready() {
    privileged(Needs::program(), || {
        // Exec handlers count as ready after a second of running: a window wide enough to
        // look at. Both sockets take connections while both handlers are ready.
        let spawner = group("test-awaiting", HandlerKind::Exec)
            .handlers(2)
            .backlog(8)
            .command(&[example("blocking_handler").to_str().unwrap()])
            .start_answering();
        let serving = |status: &parsrv::status::GroupStatus| {
            status.handlers.iter().all(|h| h.ready)
                && status.sockets.iter().all(|s| {
                    s.state == SocketState::Serving && s.queue.is_some_and(|q| q.capacity == 8)
                })
        };
        assert!(wait_for(Duration::from_secs(10), || serving(
            &spawner.status()
        )));
        // The control: the kernel's hash sends some of 40 connections to each socket (all
        // to one: odds 2^-39).
        let spread = selected_over(&spawner, 40);
        assert!(spread.iter().all(|&n| n > 0), "{spread:?}");

        // Killed, the handler of slot 0 is started again at once, and its socket waits for
        // it: queue length 0 (as the kernel reports it), no new connection while slot 1
        // has room.
        let old = spawner.handler_pid(0);
        let netstat = NetCounters::read();
        signal(old, Signal::SIGKILL);
        assert!(
            wait_for(Duration::from_secs(5), || {
                let status = spawner.status();
                status.handlers[0].pid.is_some_and(|p| p != old)
                    && status.sockets[0].state == SocketState::AwaitingHandler
            }),
            "{}",
            spawner.log()
        );
        let status = spawner.status();
        assert!(!status.handlers[0].ready);
        assert_eq!(status.sockets[0].queue.unwrap().capacity, 0);
        assert!(status.render().contains("handler 0: not ready yet"));
        let while_waiting = selected_over(&spawner, 10);
        // All of them within the second before the successor counts as ready.
        assert_eq!(
            spawner.status().sockets[0].state,
            SocketState::AwaitingHandler,
            "10 requests took the successor's whole second to be ready: cannot tell"
        );
        assert_eq!(while_waiting, [0, 10], "{}", spawner.log());
        assert_eq!(
            NetCounters::read().delta(&netstat).listen_overflows,
            0,
            "a SYN was dropped"
        );

        // Ready, it takes its share again, at the configured queue length.
        assert!(wait_for(Duration::from_secs(10), || serving(
            &spawner.status()
        )));
        let spread = selected_over(&spawner, 40);
        assert!(spread[0] > 0, "{spread:?}");
        assert!(spawner.stop().success());
    });
}
