//! Handlers and the spawner over their life: respawn on the same socket without losing a
//! queued connection, exact status, one socket per handler, parallel accept, shutdown that
//! leaves nothing behind, and no orphans when the spawner itself is killed.

use std::{io::Write, path::Path, time::Duration};

use nix::sys::signal::Signal;
use parsrv::{control, dataplane::pins::group_dir as pin_dir, kernel, listeners::SocketState};
use parsrv_integration_tests::{
    addr, connect, example, fd_of_process, group, group_whose_slot_1_is_never_ready, http_get,
    is_listening, loaded_parsrv_programs, privileged, processes_mentioning, read_answer, signal,
    stop_process, wait_for, HandlerKind, Needs, NetCounters, Outcome, HTTP_REQUEST,
};

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn killed_handler_is_respawned_on_its_socket_and_serves_its_queue() {
    privileged(Needs::program(), || {
        let spawner = group("test-respawn", HandlerKind::Http)
            .handlers(2)
            .backlog(16)
            // Stall detection off: a stopped handler is how this test holds connections in
            // a queue, and it would move them.
            .stopped_handlers_keep_their_share()
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
            // Stall detection off: a stopped handler is how this test holds connections in
            // a queue, and it would move them.
            .stopped_handlers_keep_their_share()
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

/// A handshake in flight to a socket when its handler dies completes into that socket's
/// queue and is served by the next handler: marking the socket must not change what the
/// kernel admits. The earlier mark, `listen(fd, 0)`, made such a handshake overflow at its
/// final ACK whenever the queue already held a connection (ListenOverflows +1), which is
/// what made the kill-loop test fail one run in a few. The handshake is held in flight
/// with TCP_DEFER_ACCEPT (the kernel keeps the request until the client's first data), so
/// the window is not a race. The control does the same on a plain listener with
/// `listen(0)`: +1, so the counter the test reads does see this.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_handshake_in_flight_when_its_handler_dies_completes_for_the_next_handler() {
    privileged(Needs::program(), || {
        // At least 1: the client's retransmission of its data overflows again.
        let control = in_flight_overflows_on_a_plain_listener();
        assert!(
            control >= 1,
            "control: listen(0) under a handshake in flight overflows it ({control})"
        );
        // Each handler sleeps 2 s before it accepts: the successor of the killed one leaves
        // the queue alone while the test looks at it.
        let handler = format!(
            "sleep 2; exec {}",
            example("blocking_handler").to_str().unwrap()
        );
        let spawner = group("test-in-flight", HandlerKind::Exec)
            .handlers(2)
            .backlog(8)
            // Stall detection off: the stopped handler's queue is the subject.
            .stopped_handlers_keep_their_share()
            .command(&["/bin/sh", "-c", &handler])
            .start_answering();
        assert!(spawner.wait_until_ready(Duration::from_secs(10)));
        let old = spawner.handler_pid(0);
        let socket = fd_of_process(old, 3).unwrap();
        defer_accept(&socket);
        signal(old, Signal::SIGSTOP);
        // A: queued on slot 0 (its handler stopped); B: a handshake in flight to slot 0.
        let mut queued = connect_to_slot(&spawner, 0);
        queued.write_all(HTTP_REQUEST).unwrap();
        let depth = || {
            kernel::queue_depth(std::os::fd::AsFd::as_fd(&socket))
                .unwrap()
                .depth
        };
        assert!(wait_for(Duration::from_secs(5), || depth() == 1));
        let mut in_flight = connect_to_slot(&spawner, 0);
        assert_eq!(depth(), 1, "the deferred handshake completed early");

        let netstat = NetCounters::read();
        signal(old, Signal::SIGKILL);
        assert!(
            wait_for(Duration::from_secs(5), || {
                let status = spawner.status();
                status.handlers[0].pid.is_some_and(|p| p != old)
                    && status.sockets[0].state == SocketState::Restarting
            }),
            "{}",
            spawner.log()
        );
        in_flight.write_all(HTTP_REQUEST).unwrap();
        assert!(
            wait_for(Duration::from_secs(5), || depth() == 2),
            "the handshake did not complete into the queue; kernel counters: {:?}",
            netstat.delta(&NetCounters::read())
        );
        let delta = netstat.delta(&NetCounters::read());
        assert_eq!(
            (delta.listen_overflows, delta.listen_drops),
            (0, 0),
            "{delta:?}"
        );
        // The next handler serves both once it is ready.
        let successor = spawner.handler_pid(0);
        for stream in [&mut queued, &mut in_flight] {
            let answer = read_answer(stream, Duration::from_secs(10)).unwrap();
            assert!(
                answer.ends_with(&format!("blocking handler pid {successor}\n")),
                "{answer}"
            );
        }
        assert!(spawner.stop().success());
    });
}

/// A connection that the program sent to `slot` (its `selected` counter moved); others are
/// closed and another is tried.
fn connect_to_slot(
    spawner: &parsrv_integration_tests::Spawner,
    slot: usize,
) -> std::net::TcpStream {
    for _ in 0..200 {
        let before = spawner.status().sockets[slot].counters.selected;
        let stream = connect(addr(), Duration::from_secs(2)).unwrap();
        if spawner.status().sockets[slot].counters.selected > before {
            return stream;
        }
    }
    panic!("200 connections and none went to slot {slot}");
}

fn defer_accept(socket: &impl std::os::fd::AsRawFd) {
    let seconds: libc::c_int = 30;
    // SAFETY: an int option of the right length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

/// The control: a plain listener with one queued connection and one deferred handshake,
/// then `listen(0)`, then the handshake's data: the kernel's ListenOverflows delta.
fn in_flight_overflows_on_a_plain_listener() -> u64 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = listener.local_addr().unwrap();
    defer_accept(&listener);
    let mut queued = std::net::TcpStream::connect(at).unwrap();
    queued.write_all(b"x").unwrap();
    let depth = || {
        kernel::queue_depth(std::os::fd::AsFd::as_fd(&listener))
            .unwrap()
            .depth
    };
    assert!(wait_for(Duration::from_secs(5), || depth() == 1));
    let mut in_flight = std::net::TcpStream::connect(at).unwrap();
    let netstat = NetCounters::read();
    // SAFETY: listen(2) on a socket this function owns.
    assert_eq!(
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 0) },
        0
    );
    in_flight.write_all(b"x").unwrap();
    wait_for(Duration::from_secs(2), || {
        netstat.delta(&NetCounters::read()).listen_overflows > 0
    });
    netstat.delta(&NetCounters::read()).listen_overflows
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
        // it: marked, its queue length unchanged (as the kernel reports it), no new
        // connection while slot 1 has room.
        let old = spawner.handler_pid(0);
        let netstat = NetCounters::read();
        signal(old, Signal::SIGKILL);
        assert!(
            wait_for(Duration::from_secs(5), || {
                let status = spawner.status();
                status.handlers[0].pid.is_some_and(|p| p != old)
                    && status.sockets[0].state == SocketState::Restarting
            }),
            "{}",
            spawner.log()
        );
        let status = spawner.status();
        assert!(!status.handlers[0].ready);
        assert_eq!(status.sockets[0].queue.unwrap().capacity, 8);
        assert_eq!(
            kernel::incoming_cpu(std::os::fd::AsFd::as_fd(
                &fd_of_process(spawner.handler_pid(0), 3).unwrap()
            ))
            .unwrap(),
            parsrv_common::reuseport::RESTARTING_MARK
        );
        assert!(status.render().contains("handler 0: restarting"));
        let while_waiting = selected_over(&spawner, 10);
        // All of them within the second before the successor counts as ready.
        assert_eq!(
            spawner.status().sockets[0].state,
            SocketState::Restarting,
            "10 requests took the successor's whole second to be ready: cannot tell"
        );
        assert_eq!(while_waiting, [0, 10], "{}", spawner.log());
        assert_eq!(
            netstat.delta(&NetCounters::read()).listen_overflows,
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

/// When every socket with a ready handler is full, a connection waits in the queue of a slot
/// whose ready handler died and is being started again (`restarting`) instead of being
/// dropped; a slot whose handler has never been ready (`awaiting-handler`) still takes none,
/// and with every place taken the SYN is dropped (the control: the kernel counts it).
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn with_every_served_queue_full_a_restarting_handler_s_queue_takes_the_connection() {
    privileged(Needs::program(), || {
        // Slot 1 never says READY=1; slot 3 does, until the marker exists: its next life
        // never does, so its socket stays `restarting` for the test.
        let marker = std::env::temp_dir().join(format!("parsrv-restarting-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        let script = format!(
            "case $PARSRV_SLOT in 1) exec sleep 60;; 3) [ -e {} ] && exec sleep 60;; esac; exec {}",
            marker.display(),
            example("blocking_handler").display()
        );
        let spawner = group("test-restarting", HandlerKind::Exec)
            .handlers(4)
            .backlog(2)
            .with(|g| g.notify = true)
            // Stall detection off: stopped handlers are how this test fills the queues.
            .stopped_handlers_keep_their_share()
            .command(&["sh", "-c", &script])
            .start_answering();
        let ready = |slots: &[usize]| {
            let handlers = spawner.status().handlers;
            slots.iter().all(|&s| handlers[s].ready)
        };
        assert!(
            wait_for(Duration::from_secs(10), || ready(&[0, 2, 3])),
            "{}",
            spawner.log()
        );
        std::fs::write(&marker, b"").unwrap();
        let old = spawner.handler_pid(3);
        signal(old, Signal::SIGKILL);
        assert!(
            wait_for(Duration::from_secs(5), || {
                let status = spawner.status();
                status.handlers[3].pid.is_some_and(|p| p != old)
                    && status.sockets[3].state == SocketState::Restarting
            }),
            "{}",
            spawner.log()
        );
        let status = spawner.status();
        assert_eq!(status.sockets[1].state, SocketState::AwaitingHandler);
        assert!(status.render().contains("handler 3: restarting"));
        for slot in [0, 2] {
            stop_process(spawner.handler_pid(slot));
        }
        let depths = || {
            spawner
                .status()
                .sockets
                .iter()
                .map(|s| s.queue.unwrap().depth)
                .collect::<Vec<_>>()
        };
        let totals = || {
            let status = spawner.status();
            let sum = |f: fn(&parsrv_common::reuseport::SlotCounters) -> u64| {
                status.sockets.iter().map(|s| f(&s.counters)).sum::<u64>()
            };
            (sum(|c| c.dropped), status.sockets[3].counters.selected)
        };
        let netstat = NetCounters::read();
        let mut held = Vec::new();
        // 2 served sockets x (backlog + 1) places, then slot 3's 3.
        for n in 0..9 {
            held.push(
                connect(addr(), Duration::from_secs(2))
                    .unwrap_or_else(|e| panic!("connection {n}: {e:?}; queues {:?}", depths())),
            );
        }
        assert!(
            wait_for(Duration::from_secs(2), || depths() == [3, 0, 3, 3]),
            "{:?}",
            depths()
        );
        assert_eq!(netstat.delta(&NetCounters::read()).listen_overflows, 0);
        let (dropped, selected_restarting) = totals();
        assert_eq!((dropped, selected_restarting), (0, 3));

        // The control: every place taken but the never-ready slot's. Within 1.5 s the SYN
        // and its retransmission are dropped, and the kernel counts both.
        assert_eq!(
            connect(addr(), Duration::from_millis(1500)).unwrap_err(),
            Outcome::ConnectTimeout
        );
        let kernel = netstat.delta(&NetCounters::read());
        assert!(kernel.listen_overflows >= 2, "{kernel:?}");
        assert_eq!(totals().0, kernel.listen_overflows, "{kernel:?}");
        assert_eq!(depths(), [3, 0, 3, 3]);

        for slot in [0, 2] {
            signal(spawner.handler_pid(slot), Signal::SIGCONT);
        }
        drop(held);
        let _ = std::fs::remove_file(&marker);
        assert!(spawner.stop().success());
    });
}

/// At a group's start no handler is ready, so every socket takes connections (a queue is the
/// best place to wait then). Once one handler is ready, a slot whose handler is still not
/// steps back, marked "no handler", as a slot started later would: its handler may never be
/// ready (here it lives on and never says READY=1; in a crash loop it dies first), and what
/// its socket took would wait for it. Seen in a 6.1 VM: a request queued on a crash-looping
/// slot's socket in its first life waited more than 3 s.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn once_a_handler_is_ready_a_slot_whose_handler_is_not_takes_no_new_connection() {
    privileged(Needs::program(), || {
        let spawner = group_whose_slot_1_is_never_ready("test-never-ready", "exec sleep 60");
        let status = spawner.status();
        assert!(status.handlers[1].pid.is_some() && !status.handlers[1].ready);
        assert_eq!(
            status.sockets[1].state,
            SocketState::AwaitingHandler,
            "{}",
            spawner.log()
        );
        let selected = selected_over(&spawner, 30);
        assert_eq!(selected[1], 0, "{selected:?}");
        assert_eq!(selected[0] + selected[2], 30, "{selected:?}");
        assert!(spawner.stop().success());
    });
}
