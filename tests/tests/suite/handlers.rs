//! Any server as a handler: socket activation (fd 3, LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES),
//! the Rust example, real third-party servers, privilege drop, CPU placement, supervision.

use std::{path::Path, process::Command, time::Duration};

use parsrv::{
    dataplane::{pins::group_dir as pin_dir, Program},
    kernel,
    spec::{usable_cpus, UdpMode},
};
use parsrv_integration_tests::{
    addr, apps_dir, example, fd_of_process, group, http_get, http_load, privileged, pyenv,
    read_answer, resume_handler_group, stop_handler_group, wait_for, HandlerKind, Needs,
    NetCounters, Outcome, HTTP_REQUEST,
};

/// How many processes have exactly this argv.
fn exact_processes(argv: &[&str]) -> usize {
    let wanted: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == wanted))
        .count()
}

fn proc_status(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn environ(pid: u32) -> Vec<String> {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .split('\0')
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn exec_handler_gets_exactly_its_socket_by_socket_activation() {
    privileged(Needs::program(), || {
        let spawner = group("test-exec-fds", HandlerKind::Exec)
            .handlers(2)
            .threads(3)
            .command(&["sleep", "60"])
            .start();
        let status = spawner.status();
        // Each handler starts as parsrv and execs `sleep`; look once `sleep` itself runs:
        // blocked in its clock_nanosleep (x86_64 syscall 230). Right after exec the dynamic
        // loader still holds the files it maps at the lowest free fd, 4 (seen in a 6.12
        // VM), and before the kernel lays out the new environment /proc/PID/environ reads
        // empty (seen once in a slow VM).
        assert!(wait_for(Duration::from_secs(10), || status
            .handlers
            .iter()
            .all(|h| {
                let pid = h.pid.unwrap();
                std::fs::read_to_string(format!("/proc/{pid}/syscall"))
                    .is_ok_and(|call| call.split(' ').next() == Some("230"))
                    && environ(pid).iter().any(|v| !v.is_empty())
            })));
        for handler in &status.handlers {
            let pid = handler.pid.unwrap();
            // The protocol, for this very process (exec kept the pid).
            let env = environ(pid);
            for expected in [
                "LISTEN_FDS=1".to_string(),
                format!("LISTEN_PID={pid}"),
                "LISTEN_FDNAMES=test-exec-fds".to_string(),
                "PARSRV_THREADS=3".to_string(),
                format!("PARSRV_SLOT={}", handler.slot),
            ] {
                assert!(
                    env.contains(&expected),
                    "handler {}: no {expected} in {env:?}",
                    handler.slot
                );
            }
            // Stdio, fd 3 and fd 5, nothing else; fd 3 is this slot's socket, fd 5 the read
            // end of the pipe its stdout and stderr go to (held so that its writes never
            // fail while no spawner reads: handlers outlive their spawner).
            let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().parse().unwrap())
                .collect();
            fds.sort();
            assert_eq!(fds, [0, 1, 2, 3, 5], "handler {}", handler.slot);
            let link = |fd: i32| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
            assert!(
                link(5).to_string_lossy().starts_with("pipe:"),
                "{:?}",
                link(5)
            );
            assert_eq!((link(1), link(2)), (link(5), link(5)));
            let socket = fd_of_process(pid, 3).unwrap();
            let cookie = kernel::socket_cookie(std::os::fd::AsFd::as_fd(&socket)).unwrap();
            assert_eq!(cookie, status.sockets[handler.slot as usize].cookie);
            // Exec handlers keep their own counters: status does not make them up.
            assert_eq!(handler.accepted, None);
        }
        // `sleep` never accepts: connections wait, the queue never shrinks, parsrv says so.
        let _waiting: Vec<_> = (0..2)
            .map(|_| std::net::TcpStream::connect(addr()).unwrap())
            .collect();
        assert!(
            spawner.wait_for_log(
                "has not taken a connection from its socket",
                Duration::from_secs(20)
            ),
            "{}",
            spawner.log()
        );
        assert!(spawner.stop().success());
    });
}

/// One of 4 handlers stopped (with all its processes) and its queue full: every request is
/// still served, and the kernel drops nothing.
fn stalled_handler_loses_nothing(name: &str, command: &[&str], answer_prefix: &str) {
    let spawner = group(name, HandlerKind::Exec)
        .handlers(4)
        .backlog(16)
        .command(command)
        // The full-queue guarantee alone: stall detection would move the queue.
        .stopped_handlers_keep_their_share()
        .start();
    // Until each server answers, connections just queue: wait for all four.
    assert!(
        wait_for(Duration::from_secs(30), || (0..12).all(|_| http_get(
            addr(),
            Duration::from_secs(3)
        )
            == Outcome::Ok)),
        "{name} never served:\n{}",
        spawner.log()
    );
    let stalled = spawner.handler_pid(0);
    stop_handler_group(stalled);
    let held = spawner.fill_queue(0, addr());

    let before = NetCounters::read();
    let result = http_load(addr(), 10, 20, Duration::from_secs(3));
    let kernel = before.delta(&NetCounters::read());
    let redirected = spawner.status().sockets[0].counters.redirected_away;
    eprintln!(
        "{name}: {} of {} requests failed, ListenOverflows +{}, {redirected} redirected away from the stalled handler",
        result.failures(),
        result.outcomes.len(),
        kernel.listen_overflows
    );
    assert_eq!(
        result.failures(),
        0,
        "{name}: {:?}\n{}",
        result.outcomes,
        spawner.log()
    );
    assert_eq!(kernel.listen_overflows, 0, "{name}: {kernel:?}");
    assert!(
        redirected > 0,
        "{name}: the stalled socket was never the hash choice"
    );
    // A request really reaches the application.
    let mut conn = std::net::TcpStream::connect(addr()).unwrap();
    std::io::Write::write_all(&mut conn, HTTP_REQUEST).unwrap();
    let answer = read_answer(&mut conn, Duration::from_secs(3)).unwrap();
    assert!(answer.contains(answer_prefix), "{name}: {answer}");
    // No server died on the way (a server that cannot take fd 3 as given exits at once).
    let restarts: Vec<u32> = spawner
        .status()
        .handlers
        .iter()
        .map(|h| h.restarts)
        .collect();
    assert_eq!(restarts, [0; 4], "{name}: restarted\n{}", spawner.log());
    resume_handler_group(stalled);
    drop(held);
    assert!(spawner.stop().success());
}

/// Whether fd `fd` of process `pid` has O_NONBLOCK (its open file's flags, from fdinfo).
fn nonblocking(pid: u32, fd: i32) -> bool {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
        .unwrap();
    flags & libc::O_NONBLOCK as u32 != 0
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn blocking_accept_handler_as_written_for_systemd_survives_a_stalled_one() {
    privileged(Needs::program(), || {
        let blocking = example("blocking_handler");
        stalled_handler_loses_nothing(
            "test-exec-blocking",
            &[blocking.to_str().unwrap()],
            "blocking handler pid",
        );
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn fd_3_is_blocking_as_systemd_passes_it_unless_nonblocking_is_asked() {
    privileged(Needs::program(), || {
        // By default: blocking, for an exec'd program.
        let spawner = group("test-fd-mode", HandlerKind::Exec)
            .handlers(1)
            .command(&["sleep", "60"])
            .start();
        let pid = spawner.handler_pid(0);
        assert!(
            !nonblocking(pid, 3),
            "fd 3 of an exec handler is non-blocking"
        );
        assert!(spawner.stop().success());

        // --nonblocking: O_NONBLOCK, as systemd's NonBlocking=yes. A server written for a
        // blocking socket then fails its first accept() and exits, over and over: what the
        // default spares it.
        let spawner = group("test-fd-mode", HandlerKind::Exec)
            .handlers(1)
            .with(|g| g.nonblocking = true)
            .command(&[example("blocking_handler").to_str().unwrap()])
            .start_answering();
        assert!(
            spawner.wait_for_log("blocking_handler: accept:", Duration::from_secs(10)),
            "{}",
            spawner.log()
        );
        assert!(wait_for(Duration::from_secs(10), || spawner
            .status()
            .handlers[0]
            .restarts
            > 0));
        assert!(spawner.stop().success());

        // Built-in handlers poll and accept with several threads: they make it non-blocking
        // themselves, whatever the group says.
        let spawner = group("test-fd-mode", HandlerKind::Http)
            .handlers(1)
            .threads(2)
            .start();
        // Once it serves it has set the mode (a process is alive before it gets there).
        assert!(http_get(addr(), Duration::from_secs(3)) == Outcome::Ok);
        assert!(nonblocking(spawner.handler_pid(0), 3));
        assert!(spawner.stop().success());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn rust_example_outside_parsrv_says_how_to_start_it() {
    privileged(Needs::nothing(), || {
        let out = Command::new(example("hello_handler")).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("LISTEN_FDS is not set"), "{stderr}");
        assert!(
            stderr.contains("parsrv run --handler exec -- <this program>"),
            "{stderr}"
        );
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn rust_example_handler_survives_a_stalled_one() {
    privileged(Needs::program(), || {
        let hello = example("hello_handler");
        stalled_handler_loses_nothing(
            "test-exec-rust",
            &[hello.to_str().unwrap()],
            "hello from pid",
        );
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn gunicorn_and_uvicorn_as_handlers_survive_a_stalled_one() {
    privileged(Needs::program().and_python(), || {
        let apps = apps_dir();
        let gunicorn = pyenv().join("bin/gunicorn");
        let uvicorn = pyenv().join("bin/uvicorn");
        // gunicorn reads LISTEN_FDS itself: no --bind at all.
        stalled_handler_loses_nothing(
            "test-exec-gunicorn",
            &[
                gunicorn.to_str().unwrap(),
                "--workers",
                "1",
                "--chdir",
                apps.to_str().unwrap(),
                "wsgi_app:app",
            ],
            "gunicorn pid",
        );
        stalled_handler_loses_nothing(
            "test-exec-uvicorn",
            // uvicorn calls listen() again with its own backlog (2048 by default): give it ours.
            &[
                uvicorn.to_str().unwrap(),
                "--fd",
                "3",
                "--backlog",
                "16",
                "--app-dir",
                apps.to_str().unwrap(),
                "asgi_app:app",
            ],
            "uvicorn pid",
        );
    });
}

/// Tries to open a pinned map (BPF_OBJ_GET) and prints the result, then stays up. Run as a
/// handler, it shows what the handler itself can reach.
const MAP_PROBE: &str = r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
path = ctypes.create_string_buffer(sys.argv[1].encode())
attr = (ctypes.c_uint64 * 4)(ctypes.addressof(path), 0, 0, 0)
fd = libc.syscall(321, 7, ctypes.byref(attr), 32)  # x86_64 SYS_bpf, BPF_OBJ_GET
print(f"probe obj_get={fd} errno={ctypes.get_errno()}", flush=True)
if len(sys.argv) > 2:
    time.sleep(60)
"#;

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn handlers_run_as_the_user_without_capabilities_and_cannot_reach_the_maps() {
    privileged(
        Needs::program().and_program(Program::UdpFlow).and_python(),
        || {
            // A TCP group's CONFIG, and a UDP group's flow table (which a handler could
            // otherwise fill with entries that move other handlers' flows).
            probe_the_maps_as_nobody("test-user", None, parsrv_common::reuseport::names::CONFIG);
            probe_the_maps_as_nobody(
                "test-user-udp",
                Some(UdpMode::Flow),
                parsrv_common::udp::names::FLOWS,
            );
        },
    );
}

/// A group (UDP in `udp_mode` if given) whose 2 handlers run as nobody and try to open the
/// pinned map `map_name`: refused, where root's same probe opens it; every pin is root's
/// alone.
fn probe_the_maps_as_nobody(name: &str, udp_mode: Option<UdpMode>, map_name: &str) {
    let map = pin_dir(name).join(map_name);
    let map_arg = map.to_str().unwrap();
    let mut builder = group(name, HandlerKind::Exec)
        .handlers(2)
        .with(|g| g.user = Some("nobody:nogroup".into()));
    if let Some(mode) = udp_mode {
        builder = builder
            .listen("udp://127.0.0.1:8080")
            .with(move |g| g.udp_mode = mode);
    }
    let spawner = builder
        .command(&[
            // /usr/bin: a root-only interpreter (under /root) would be refused upfront.
            "/usr/bin/python3",
            "-c",
            MAP_PROBE,
            map_arg,
            "stay",
        ])
        .start();
    // The handlers' own attempt to open the pinned map, as they logged it: once both
    // have, both have exec'd, so all that parsrv does before exec is done. (It sets the
    // user, then no_new_privs and the seccomp filter: read any earlier, a handler may
    // show uid 65534 and NoNewPrivs 0, as one did in a 6.1 VM.)
    assert!(wait_for(Duration::from_secs(10), || spawner
        .log()
        .matches("probe obj_get=")
        .count()
        == 2));
    for handler in spawner.status().handlers {
        let pid = handler.pid.unwrap();
        assert_eq!(proc_status(pid, "Uid"), "65534\t65534\t65534\t65534");
        assert_eq!(proc_status(pid, "Gid"), "65534\t65534\t65534\t65534");
        assert_eq!(proc_status(pid, "CapEff"), "0000000000000000");
        assert_eq!(proc_status(pid, "CapPrm"), "0000000000000000");
        // Nothing it execs gets a capability back, set-uid root programs included.
        assert_eq!(proc_status(pid, "CapBnd"), "0000000000000000");
        assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    }
    let log = spawner.log();
    for line in log.lines().filter(|l| l.contains("probe obj_get=")) {
        assert!(
            line.ends_with("probe obj_get=-1 errno=13")
                || line.ends_with("probe obj_get=-1 errno=1"),
            "a handler of {name} reached {map_name}: {line}"
        );
    }
    // Control: the same probe as root opens it, so the probe can tell.
    let out = Command::new("python3")
        .args(["-c", MAP_PROBE, map_arg])
        .output()
        .unwrap();
    let root = String::from_utf8_lossy(&out.stdout);
    assert!(
        root.starts_with("probe obj_get=") && !root.contains("obj_get=-1"),
        "{name}: {root}"
    );
    // The pins are root's alone: the directory and every map and program in it.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = std::fs::metadata(pin_dir(name)).unwrap();
    assert_eq!((dir.uid(), dir.permissions().mode() & 0o777), (0, 0o700));
    for entry in std::fs::read_dir(pin_dir(name)).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        assert_eq!(
            (meta.uid(), meta.permissions().mode() & 0o777),
            (0, 0o600),
            "{name}: {:?}",
            entry.path()
        );
    }
    assert!(spawner.stop().success());
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn cpus_place_handlers_round_robin() {
    privileged(Needs::program(), || {
        let cpus = usable_cpus();
        let list = cpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let spawner = group("test-cpus", HandlerKind::Echo)
            .handlers(3)
            .with(|g| g.cpus = list.parse().unwrap())
            .start();
        // Ready, not only alive: a handler is placed on its CPU in the forked child before
        // exec, and a child that the spawner forked a moment ago may still run with the
        // spawner's CPUs (seen once in CI's native run, beside two VMs: "0-1" for "0").
        assert!(
            spawner.wait_until_ready(Duration::from_secs(30)),
            "the handlers never got ready: {:?}",
            spawner.status().handlers
        );
        for handler in spawner.status().handlers {
            let expected = cpus[handler.slot as usize % cpus.len()];
            assert_eq!(handler.cpu, Some(expected));
            let pid = handler.pid.unwrap();
            // Every thread of the handler (its accept threads and runtime) stays there.
            for task in std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .flatten()
            {
                let status = std::fs::read_to_string(task.path().join("status")).unwrap();
                let allowed = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                    .unwrap();
                assert_eq!(
                    allowed.trim(),
                    expected.to_string(),
                    "handler {}",
                    handler.slot
                );
            }
        }
        assert!(spawner.stop().success());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn crash_loop_backs_off_output_is_prefixed_and_stubborn_handlers_are_killed() {
    privileged(Needs::program(), || {
        // A handler that prints and exits at once, forever. With --notify it is never
        // ready (it never says READY=1), so each exit is a crash before ready whatever the
        // machine's speed: without it, an exec handler counts as ready once it has run a
        // second, and in a 6.1 VM beside two others the 0.2-s handler did, and was
        // restarted at once each time, as a ready handler is.
        let spawner = group("test-crash", HandlerKind::Exec)
            .handlers(1)
            .with(|g| g.notify = true)
            .command(&[
                "sh",
                "-c",
                "sleep 300 & echo crashing in slot $PARSRV_SLOT; sleep 0.2; exit 3",
            ])
            .start_answering();
        // The backoff as the spawner says it: the first exit restarts at once, each next
        // waits twice as long (0.1 s, 0.2, 0.4, ..., at most 5 s). Read from its log, not
        // from a count of restarts in a span of time, which a slow machine changes.
        let backed_off = || {
            spawner
                .log()
                .lines()
                .filter_map(|l| {
                    l.split_once("keeps exiting: next start in ")
                        .map(|(_, d)| d)
                })
                .map(|rest| rest.split(';').next().unwrap_or_default().to_owned())
                .collect::<Vec<String>>()
        };
        assert!(
            wait_for(Duration::from_secs(60), || backed_off().len() >= 4),
            "fewer than 4 backed-off starts in 60 s:\n{}",
            spawner.log()
        );
        assert_eq!(
            backed_off()[..4],
            ["100ms", "200ms", "400ms", "800ms"],
            "{}",
            spawner.log()
        );
        let status = spawner.status();
        let handler = &status.handlers[0];
        eprintln!(
            "after 4 backed-off starts: {} restarts, {:?}",
            handler.restarts, handler.last_exit
        );
        assert!(handler.restarts >= 4, "{} restarts", handler.restarts);
        assert_eq!(handler.last_exit.as_deref(), Some("exited with code 3"));
        let log = spawner.log();
        let prefixed = log
            .lines()
            .filter(|l| l.contains("]: crashing in slot 0") && l.contains(" handler 0["))
            .count();
        assert!(prefixed >= 2, "{log}");
        // What each incarnation left running was killed with it: at most the current
        // one's `sleep 300` is alive, not one per restart.
        let leftovers = exact_processes(&["sleep", "300"]);
        assert!(
            leftovers <= 1,
            "{leftovers} background processes outlived their handler"
        );
        assert!(spawner.stop().success());

        // A handler that ignores SIGTERM is killed after --grace.
        let spawner = group("test-grace", HandlerKind::Exec)
            .handlers(1)
            .grace(1.0)
            .command(&["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"])
            .start();
        let pid = spawner.handler_pid(0);
        // Stop only once the handler ignores SIGTERM (its trap is set: SigIgn bit 15).
        let ignores_term = || {
            u64::from_str_radix(&proc_status(pid, "SigIgn"), 16)
                .is_ok_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
        };
        assert!(wait_for(Duration::from_secs(10), ignores_term));
        let log = spawner.log_path();
        assert!(spawner.stop().success());
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        let log = std::fs::read_to_string(log).unwrap();
        assert!(
            log.contains("did not exit within 1s of SIGTERM: killed"),
            "{log}"
        );
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_handler_that_binds_its_own_port_or_changes_the_backlog_is_reported() {
    privileged(Needs::program().and_python(), || {
        let spawner = group("test-own-port", HandlerKind::Exec)
            .handlers(1)
            .command(&[
                "python3",
                "-c",
                "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',9999))\ns.listen()\ntime.sleep(60)",
            ])
            .start();
        assert!(
            spawner.wait_for_log("listens on 127.0.0.1:9999 itself", Duration::from_secs(10)),
            "{}",
            spawner.log()
        );
        assert!(spawner.log().contains("make it use fd 3"));
        assert!(spawner.stop().success());

        // uvicorn's default backlog replaces parsrv's: reported.
        let uvicorn = pyenv().join("bin/uvicorn");
        let apps = apps_dir();
        let spawner = group("test-relisten", HandlerKind::Exec)
            .handlers(1)
            .backlog(16)
            .command(&[
                uvicorn.to_str().unwrap(),
                "--fd",
                "3",
                "--app-dir",
                apps.to_str().unwrap(),
                "asgi_app:app",
            ])
            .start();
        assert!(
            spawner.wait_for_log(
                "accept-queue length from 16 to 2048",
                Duration::from_secs(15)
            ),
            "{}",
            spawner.log()
        );
        assert_eq!(spawner.status().sockets[0].queue.unwrap().capacity, 2048);
        assert!(spawner.stop().success());
    });
}
