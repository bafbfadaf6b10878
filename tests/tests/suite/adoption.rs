//! No single point of failure: the spawner dies (SIGKILL) and the group keeps serving; the
//! next `parsrv run` of the group adopts its handlers (same pids); `parsrv upgrade`
//! replaces the spawner's binary under load; `parsrv stop` stops a group whose spawner is
//! gone. Each against a control in the same test and the kernel's counters.

use std::{
    path::Path,
    process::{Command, Stdio},
    thread::sleep,
    time::Duration,
};

use nix::sys::signal::Signal;
use parsrv::dataplane::pins::group_dir as pin_dir;
use parsrv_integration_tests::{
    addr, alive, connect, error_line, fd_of_process, group, kill_spawner, loaded_parsrv_programs,
    lone_server, parsrv_bin, privileged, read_answer, signal, stop_process, wait_for, GroupBuilder,
    HandlerKind, Needs, NetCounters, Outcome, Policy, Spawner, SteadyLoad, HTTP_REQUEST,
};

fn http_group(name: &str) -> GroupBuilder {
    group(name, HandlerKind::Http).handlers(4).threads(2)
}

/// `parsrv run` with `group`'s arguments, to its end: (exit code, stdout, stderr).
fn run_by_hand(group: &GroupBuilder) -> (i32, String, String) {
    let args = group.args();
    let argv: Vec<&str> = ["run"]
        .into_iter()
        .chain(args.iter().map(String::as_str))
        .collect();
    Spawner::parsrv(&argv)
}

fn pids(spawner: &Spawner) -> Vec<Option<u32>> {
    spawner.status().handlers.iter().map(|h| h.pid).collect()
}

fn failed(outcomes: &[Outcome]) -> usize {
    outcomes.iter().filter(|o| **o != Outcome::Ok).count()
}

/// What the group left: its pins, record and handler processes.
fn leftovers(name: &str, handlers: &[u32]) -> Vec<String> {
    let mut left = Vec::new();
    if pin_dir(name).exists() {
        left.push(format!("pins {}", pin_dir(name).display()));
    }
    if parsrv::spawner::record_path(name).exists() {
        left.push("record".into());
    }
    left.extend(
        handlers
            .iter()
            .filter(|p| alive(**p))
            .map(|p| format!("handler {p}")),
    );
    left
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_killed_spawner_loses_no_connection_and_the_next_run_adopts_its_handlers() {
    privileged(Needs::program(), || {
        // Control: the server process dies under the same load, and nothing takes over.
        let mut server = lone_server(addr());
        let load = SteadyLoad::start(addr(), 4, Duration::from_secs(5), Duration::from_secs(1));
        sleep(Duration::from_secs(1));
        server.kill().unwrap();
        server.wait().unwrap();
        // As long as parsrv's group will go without a spawner below.
        sleep(Duration::from_secs(2));
        let control = load.finish();
        eprintln!(
            "control: {} requests, {} failed after the server died",
            control.len(),
            failed(&control)
        );
        assert!(failed(&control) > 0, "the control lost nothing");

        let programs_before = loaded_parsrv_programs();
        let name = "test-adopt";
        let spawner = http_group(name).start();
        let handlers = pids(&spawner);
        let kernel = NetCounters::read();
        let load = SteadyLoad::start(addr(), 4, Duration::from_secs(30), Duration::from_secs(3));
        sleep(Duration::from_secs(1));
        kill_spawner(&spawner);
        // Two seconds with no spawner: the handlers serve on, the program steers.
        sleep(Duration::from_secs(2));
        assert!(handlers.iter().flatten().all(|p| alive(*p)));
        let again = http_group(name).start();
        assert_eq!(pids(&again), handlers, "{}", again.log());
        assert!(
            again.log().contains("adopting its running handlers"),
            "{}",
            again.log()
        );
        assert!(again.status().handlers.iter().all(|h| h.restarts == 0));
        sleep(Duration::from_secs(1));
        let outcomes = load.finish();
        let kernel = kernel.delta(&NetCounters::read());
        eprintln!(
            "parsrv: {} requests, {} failed across the spawner's death and adoption; kernel {kernel:?}",
            outcomes.len(),
            failed(&outcomes)
        );
        assert!(outcomes.len() > 100);
        assert_eq!(failed(&outcomes), 0, "{}", again.log());
        assert_eq!(
            (kernel.listen_overflows, kernel.migrate_req_failure),
            (0, 0)
        );
        drop(spawner);
        assert!(again.stop().success());
        let handlers: Vec<u32> = handlers.into_iter().flatten().collect();
        assert!(wait_for(Duration::from_secs(5), || leftovers(
            name, &handlers
        )
        .is_empty()));
        assert!(wait_for(Duration::from_secs(5), || loaded_parsrv_programs(
        ) == programs_before));
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn twenty_spawner_kills_and_adoptions_under_load_lose_no_connection() {
    privileged(Needs::program(), || {
        let name = "test-adopt-cycles";
        let mut spawner = http_group(name).start();
        let handlers = pids(&spawner);
        let kernel = NetCounters::read();
        let load = SteadyLoad::start(addr(), 4, Duration::from_secs(120), Duration::from_secs(3));
        for cycle in 0..20 {
            kill_spawner(&spawner);
            sleep(Duration::from_millis(100));
            let old = spawner;
            spawner = http_group(name).start();
            drop(old);
            assert_eq!(pids(&spawner), handlers, "cycle {cycle}: {}", spawner.log());
        }
        let outcomes = load.finish();
        let kernel = kernel.delta(&NetCounters::read());
        // How each failed request ended, and what the kernel counted meanwhile: a step that
        // ran out of its 3 s in a starved VM and a connection the kernel dropped or reset
        // are different failures (one failed in CI's 6.1 VM with neither recorded).
        let mut kinds = std::collections::BTreeMap::new();
        for outcome in outcomes.iter().filter(|o| **o != Outcome::Ok) {
            *kinds.entry(format!("{outcome:?}")).or_insert(0) += 1;
        }
        eprintln!(
            "20 kill/adopt cycles: {} requests, {} failed {kinds:?}; kernel {kernel:?}",
            outcomes.len(),
            failed(&outcomes)
        );
        assert_eq!(
            failed(&outcomes),
            0,
            "failed requests by how they ended: {kinds:?}; kernel {kernel:?}\n{}",
            spawner.log()
        );
        assert!(spawner.stop().success());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_handler_that_dies_with_no_spawner_loses_nothing_queued_and_its_slot_starts_anew() {
    privileged(Needs::program(), || {
        let name = "test-adopt-dead";
        // redirect: the stopped handler's queue must fill (two-choices would send its share
        // elsewhere).
        let group = || http_group(name).backlog(16).policy(Policy::Redirect);
        let spawner = group().start();
        let handlers = pids(&spawner);
        kill_spawner(&spawner);
        // Handler 0 stalls with requests in its queue (read through its own fd 3).
        let victim = handlers[0].unwrap();
        stop_process(victim);
        let socket = fd_of_process(victim, 3).unwrap();
        let mut queued = Vec::new();
        assert!(wait_for(Duration::from_secs(10), || {
            let mut conn = connect(addr(), Duration::from_secs(2)).unwrap();
            std::io::Write::write_all(&mut conn, HTTP_REQUEST).unwrap();
            queued.push(conn);
            parsrv::kernel::queue_depth(std::os::fd::AsFd::as_fd(&socket))
                .unwrap()
                .depth
                >= 3
        }));
        drop(socket);
        let kernel = NetCounters::read();
        // It dies: its socket closes (no spawner holds it), the kernel migrates its queue
        // through the program to the others.
        signal(victim, Signal::SIGKILL);
        for conn in &mut queued {
            read_answer(conn, Duration::from_secs(10)).expect("a queued request was lost");
        }
        let kernel = kernel.delta(&NetCounters::read());
        assert!(kernel.migrate_req_success > 0, "{kernel:?}");
        assert_eq!(kernel.migrate_req_failure, 0);

        let again = group().start();
        let now = pids(&again);
        assert_ne!(now[0], handlers[0]);
        assert_eq!(now[1..], handlers[1..], "{}", again.log());
        assert!(again.log().contains("handler 0 (pid"), "{}", again.log());
        drop(spawner);
        assert!(again.stop().success());
    });
}

/// An upgrade executes the new binary with the old arguments; when the new version's
/// default for a setting differs (the policy's did: redirect, then two-choices), those
/// arguments ask for another setting than the group runs with. The new image keeps what the
/// group runs with and says so; a spawner started by hand with those arguments is still
/// refused (the control in the same test).
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn after_an_upgrade_a_group_keeps_the_settings_it_runs_with_where_a_default_changed() {
    privileged(Needs::program(), || {
        let name = "test-adopt-upgraded";
        // The group as the old version's default made it.
        let spawner = http_group(name).policy(Policy::Redirect).start();
        let handlers = pids(&spawner);
        kill_spawner(&spawner);
        // The same arguments under this version's default.
        let this_version = http_group(name);
        assert_ne!(
            this_version.args(),
            http_group(name).policy(Policy::Redirect).args()
        );

        // By hand: refused, naming the setting, nothing touched.
        let (code, _, stderr) = run_by_hand(&this_version);
        assert_eq!(code, 2, "{stderr}");
        assert!(
            error_line(&stderr).contains("policy (running: \"redirect\""),
            "{stderr}"
        );
        assert!(handlers.iter().flatten().all(|p| alive(*p)));

        // As an upgrade's new image: adopted, still redirect, and the log says why.
        let upgraded = this_version.env(parsrv::spawner::UPGRADE_ENV, "1").start();
        assert_eq!(pids(&upgraded), handlers, "{}", upgraded.log());
        assert_eq!(upgraded.status().spec.policy, Policy::Redirect);
        assert!(
            upgraded.log().contains(
                "keeps the settings it runs with, where this version's defaults differ: policy"
            ),
            "{}",
            upgraded.log()
        );
        drop(spawner);
        assert!(upgraded.stop().success());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn adoption_refuses_other_settings_and_a_racing_spawner_and_a_reused_pid() {
    privileged(Needs::program(), || {
        let name = "test-adopt-refuse";
        let spawner = http_group(name).start();
        let handlers = pids(&spawner);
        kill_spawner(&spawner);

        // Other settings: exit 2, the keys named, nothing touched.
        let (code, _, stderr) = run_by_hand(&http_group(name).backlog(7));
        assert_eq!(code, 2, "{stderr}");
        let line = error_line(&stderr);
        assert!(
            line.contains("runs (handlers") && line.contains("backlog (running: "),
            "{line}"
        );
        assert!(handlers.iter().flatten().all(|p| alive(*p)));

        // Two spawners at once: one adopts, the other exits 1 naming the winner.
        let args = http_group(name).args();
        let start = || {
            Command::new(parsrv_bin())
                .arg("run")
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (mut a, mut b) = (start(), start());
        let winner = loop {
            if let Some(status) = a.try_wait().unwrap() {
                break (b, a.id(), status, a.wait_with_output().unwrap().stderr);
            }
            if let Some(status) = b.try_wait().unwrap() {
                break (a, b.id(), status, b.wait_with_output().unwrap().stderr);
            }
            sleep(Duration::from_millis(20));
        };
        let (mut winner, _, loser_status, loser_err) = winner;
        let loser_err = String::from_utf8_lossy(&loser_err).into_owned();
        assert_eq!(loser_status.code(), Some(1), "{loser_err}");
        assert!(
            error_line(&loser_err)
                .contains(&format!("already running under spawner {}", winner.id())),
            "{loser_err}"
        );
        assert!(wait_for(Duration::from_secs(10), || {
            Spawner::parsrv(&["status", name, "--json"]).0 == 0
        }));
        let (_, status, _) = Spawner::parsrv(&["status", name, "--json"]);
        let status: parsrv::status::GroupStatus = serde_json::from_str(&status).unwrap();
        assert_eq!(status.spawner_pid, winner.id());
        assert_eq!(
            status.handlers.iter().map(|h| h.pid).collect::<Vec<_>>(),
            handlers
        );

        // A reused pid: the record names slot 1's pid with another start time (as if the
        // handler had died and its pid gone to another process): not adopted, its slot
        // starts anew, and the process named is not touched.
        signal(winner.id(), Signal::SIGKILL);
        winner.wait().unwrap();
        let path = parsrv::spawner::record_path(name);
        let mut record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let start_time = &mut record["slots"][1]["handler"]["start_time"];
        *start_time = (start_time.as_u64().unwrap() + 1).into();
        std::fs::write(&path, record.to_string()).unwrap();
        let again = http_group(name).start();
        let now = pids(&again);
        assert_ne!(now[1], handlers[1], "{}", again.log());
        assert_eq!(
            (now[0], now[2], now[3]),
            (handlers[0], handlers[2], handlers[3])
        );
        assert!(
            again.log().contains("is another process now"),
            "{}",
            again.log()
        );
        // The process the record named is not parsrv's any more: it was left alone, so it
        // still runs (and is stopped here, as the orphan it is).
        let stranger = handlers[1].unwrap();
        assert!(alive(stranger));
        signal(stranger, Signal::SIGKILL);
        drop(spawner);
        assert!(again.stop().success());
    });
}

/// The scheduler's autogroup of `pid` (`/autogroup-N nice K`), where the kernel has them.
fn autogroup(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/autogroup"))
        .ok()
        .and_then(|s| Some(s.split_whitespace().next()?.to_owned()))
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn handlers_share_the_spawners_session_and_a_stopped_one_outlives_its_death() {
    use nix::unistd::{getpgid, getsid, Pid};
    use std::os::unix::process::CommandExt;
    privileged(Needs::program(), || {
        let name = "test-adopt-session";
        let spawner = group(name, HandlerKind::Http).handlers(2).start();
        let handlers: Vec<u32> = pids(&spawner).into_iter().flatten().collect();
        let session = |pid: u32| getsid(Some(Pid::from_raw(pid as i32))).unwrap();
        // Control: a process in a session of its own is in another autogroup.
        let mut control = Command::new("sleep");
        control.arg("30");
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            control.pre_exec(|| {
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        let mut control = control.spawn().unwrap();
        let control_group = autogroup(control.id());
        signal(control.id(), Signal::SIGKILL);
        control.wait().unwrap();
        for &handler in &handlers {
            assert_eq!(
                session(handler),
                session(spawner.pid()),
                "handler {handler}"
            );
            assert_eq!(
                getpgid(Some(Pid::from_raw(handler as i32)))
                    .unwrap()
                    .as_raw() as u32,
                handler,
                "a process group of its own"
            );
            if let Some(group) = autogroup(handler) {
                assert_eq!(Some(&group), autogroup(spawner.pid()).as_ref());
                assert_ne!(Some(group), control_group, "the control shares it");
            }
        }
        // A handler stopped when its spawner dies: the kernel sends its orphaned process
        // group SIGHUP (built-in handlers ignore it from before exec) then SIGCONT; it is
        // resumed and goes on serving. It is stopped once it serves; a handler stopped while
        // still starting is covered by the same SIG_IGN, set before exec (the CI's VMs
        // once stopped one that had not yet run a line of its own, and SIGHUP killed it).
        assert!(spawner.wait_until_ready(Duration::from_secs(10)));
        let signals = |pid: u32| -> String {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .map(|s| {
                    s.lines()
                        .filter(|l| l.starts_with("Sig") || l.starts_with("State"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_else(|_| "gone".into())
        };
        stop_process(handlers[0]);
        eprintln!("stopped handler: {}", signals(handlers[0]));
        kill_spawner(&spawner);
        let mut seen = Vec::new();
        for _ in 0..50 {
            let state = parsrv::supervisor::process_state(handlers[0]);
            if seen.last() != Some(&state) {
                seen.push(state);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "after the spawner's death: states {seen:?}; {}; alive: {}",
            signals(handlers[0]),
            alive(handlers[0])
        );
        assert!(
            seen.iter().any(|s| *s != Some('T')),
            "never resumed: {seen:?}"
        );
        assert!(alive(handlers[0]), "the resumed handler died: {seen:?}");
        let answered: Vec<Outcome> = (0..20)
            .map(|_| parsrv_integration_tests::http_get(addr(), Duration::from_secs(3)))
            .collect();
        assert!(answered.iter().all(|o| *o == Outcome::Ok), "{answered:?}");
        let (code, _, stderr) = Spawner::parsrv(&["stop", name]);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(leftovers(name, &handlers), Vec::<String>::new());
        drop(spawner);
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn parsrv_stop_stops_a_group_whose_spawner_is_gone_and_leaves_nothing() {
    privileged(Needs::program(), || {
        let programs_before = loaded_parsrv_programs();
        let name = "test-adopt-stop";
        let spawner = http_group(name).start();
        let handlers: Vec<u32> = pids(&spawner).into_iter().flatten().collect();
        kill_spawner(&spawner);
        sleep(Duration::from_millis(200));
        // Still serving.
        assert_eq!(
            parsrv_integration_tests::http_get(addr(), Duration::from_secs(3)),
            Outcome::Ok
        );
        let (code, stdout, stderr) = Spawner::parsrv(&["stop", name]);
        assert_eq!(code, 0, "{stderr}");
        assert!(
            stdout.contains("stopped, program detached, pins removed"),
            "{stdout}"
        );
        assert_eq!(leftovers(name, &handlers), Vec::<String>::new());
        assert!(wait_for(Duration::from_secs(5), || loaded_parsrv_programs(
        ) == programs_before));
        assert_eq!(
            connect(addr(), Duration::from_secs(1)).unwrap_err(),
            Outcome::Refused
        );
        // Nothing left to stop: a one-line error, exit 1.
        let (code, _, stderr) = Spawner::parsrv(&["stop", name]);
        assert_eq!(code, 1, "{stderr}");
        assert!(
            error_line(&stderr).contains("no running parsrv group"),
            "{stderr}"
        );
        drop(spawner);
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn an_upgrade_under_load_loses_no_connection_and_runs_the_new_binary() {
    privileged(Needs::program(), || {
        // The spawner runs from a copy that the test replaces, as a package upgrade does.
        let dir = std::env::temp_dir().join(format!("parsrv-upgrade-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let binary = dir.join("parsrv");
        std::fs::copy(parsrv_bin(), &binary).unwrap();
        let name = "test-upgrade";
        let spawner = http_group(name).start_binary(&binary);
        let before = spawner.status();
        // The built-in handlers set O_NONBLOCK on their socket; the new image must leave it.
        let handler_pids: Vec<u32> = before.handlers.iter().filter_map(|h| h.pid).collect();
        assert!(handler_pids
            .iter()
            .all(|&pid| parsrv_integration_tests::socket_is_nonblocking(pid)));
        let inode =
            |path: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
        let old_inode = inode(&binary);
        let load = SteadyLoad::start(addr(), 4, Duration::from_secs(30), Duration::from_secs(3));
        sleep(Duration::from_secs(1));
        // A path with no executable file: refused, and the spawner carries on as it was.
        use std::os::unix::fs::PermissionsExt;
        let pid = spawner.pid().to_string();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (code, _, stderr) = Spawner::parsrv(&["upgrade", "--spawner", &pid]);
        assert_ne!(code, 0);
        assert!(
            error_line(&stderr).contains("install the new parsrv there first"),
            "{stderr}"
        );
        assert_eq!(
            spawner.status().spawner_started_ms,
            before.spawner_started_ms
        );
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The new binary: another file at the same path (write beside, rename over).
        let staged = dir.join("parsrv.new");
        std::fs::copy(parsrv_bin(), &staged).unwrap();
        std::fs::rename(&staged, &binary).unwrap();
        assert_ne!(inode(&binary), old_inode);
        let (code, stdout, stderr) = Spawner::parsrv(&["upgrade", "--spawner", &pid]);
        assert_eq!(code, 0, "{stdout}{stderr}\n{}", spawner.log());
        assert!(
            stdout.contains(&format!("group {name}: adopted by the new image")),
            "{stdout}"
        );
        let after = spawner.status();
        assert_eq!(after.spawner_pid, before.spawner_pid);
        assert!(after.spawner_started_ms > before.spawner_started_ms);
        assert_eq!(
            after.handlers.iter().map(|h| h.pid).collect::<Vec<_>>(),
            before.handlers.iter().map(|h| h.pid).collect::<Vec<_>>()
        );
        assert!(
            handler_pids
                .iter()
                .all(|&pid| parsrv_integration_tests::socket_is_nonblocking(pid)),
            "the upgrade made a handler's socket blocking"
        );
        // The kernel's word for which file the spawner runs now.
        let running = std::fs::metadata(format!("/proc/{}/exe", spawner.pid())).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&running),
            inode(&binary)
        );
        sleep(Duration::from_secs(1));
        let outcomes = load.finish();
        eprintln!(
            "upgrade under load: {} requests, {} failed",
            outcomes.len(),
            failed(&outcomes)
        );
        assert!(outcomes.len() > 100);
        assert_eq!(failed(&outcomes), 0, "{}", spawner.log());
        assert!(spawner.stop().success());
        std::fs::remove_dir_all(&dir).unwrap();
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn an_adopted_group_resizes_restarts_and_drains_like_its_own() {
    privileged(Needs::program(), || {
        let name = "test-adopt-manage";
        let build = || {
            group(name, HandlerKind::Http)
                .handlers_between(2, 3)
                .no_autoscale()
                .threads(2)
                .drain()
        };
        let spawner = build().start();
        let first: Vec<u32> = pids(&spawner).into_iter().flatten().collect();
        kill_spawner(&spawner);
        let again = build().start();
        assert_eq!(
            pids(&again).into_iter().flatten().collect::<Vec<_>>(),
            first
        );
        let load = SteadyLoad::start(addr(), 4, Duration::from_secs(60), Duration::from_secs(3));
        let group_command = |args: &[&str]| {
            let (code, out, err) = Spawner::parsrv(&[&["group"][..], args].concat());
            assert_eq!(code, 0, "{args:?}: {out}{err}\n{}", again.log());
        };
        group_command(&["resize", name, "3"]);
        assert_eq!(again.status().handlers.len(), 3);
        group_command(&["resize", name, "2"]);
        // The adopted handlers are replaced one at a time (stopped through their pidfds).
        group_command(&["restart", name]);
        let replaced: Vec<u32> = pids(&again).into_iter().flatten().collect();
        assert!(
            replaced.iter().all(|p| !first.contains(p)),
            "{first:?} -> {replaced:?}"
        );
        assert!(first.iter().all(|p| !alive(*p)));
        let outcomes = load.finish();
        // How each failed request ended: a reset, a refusal or a timed-out connect point
        // to different causes (one failed in a 6.1 VM, 2026-12-08, with none of this kept).
        let failures: Vec<&Outcome> = outcomes.iter().filter(|o| **o != Outcome::Ok).collect();
        assert_eq!(
            failed(&outcomes),
            0,
            "{failures:?} of {} requests\n{}",
            outcomes.len(),
            again.log()
        );
        drop(spawner);
        let log = again.log_path();
        assert!(again.stop().success());
        let log = std::fs::read_to_string(log).unwrap();
        assert!(log.contains("draining group"), "{log}");
        assert_eq!(leftovers(name, &replaced), Vec::<String>::new());
    });
}

/// A handler whose socket is not among its fds (it closed it) cannot be adopted: the new
/// image kills it and starts the slot anew. With `--user dynamic` it must be gone first:
/// after a re-exec it was the spawner's unreaped child, its uid looked "in use", and the
/// upgraded spawner refused to start the group and exited.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn an_upgrade_kills_a_handler_without_its_socket_and_its_dynamic_uid_stays_usable() {
    privileged(Needs::program(), || {
        let name = "test-upgrade-closed";
        let spawner = group(name, HandlerKind::Exec)
            .handlers(2)
            .with(|g| g.user = Some("dynamic".into()))
            // Closes its socket, then waits.
            .command(&["/bin/sh", "-c", "exec 3>&-; exec sleep 600"])
            .start();
        let before: Vec<u32> = (0..2).map(|slot| spawner.handler_pid(slot)).collect();
        let pid = spawner.pid().to_string();
        let (code, stdout, stderr) = Spawner::parsrv(&["upgrade", "--spawner", &pid]);
        assert_eq!(code, 0, "{stdout}{stderr}\n{}", spawner.log());
        assert!(
            spawner.log().contains("is not among its fds: killed;"),
            "{}",
            spawner.log()
        );
        assert!(alive(spawner.pid()), "{}", spawner.log());
        assert!(
            wait_for(Duration::from_secs(10), || {
                let status = spawner.status();
                status.handlers.iter().all(|h| h.pid.is_some())
                    && status
                        .handlers
                        .iter()
                        .all(|h| !before.contains(&h.pid.unwrap()))
            }),
            "{}",
            spawner.log()
        );
        for old in before {
            assert!(!alive(old), "handler {old} outlived the upgrade");
        }
        assert!(spawner.stop().success());
    });
}
