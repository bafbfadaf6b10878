//! Two spawners started at the same moment for one group name, or for one address, in one
//! network namespace: exactly one serves, with its own pins and control socket; the other
//! refuses with one error line and leaves nothing behind. A spawner holds the namespace's
//! lock (`dataplane::netns`) from its name and address checks to its bound sockets and
//! control socket; without it, the second could pass the checks while the first is still
//! loading, remove the first's freshly published pins as a dead spawner's, and take over
//! its control socket. The winner writes its record before it lets the lock go, so the
//! loser's refusal is the same every round and names the winner: "already running" for
//! one name (exit 1), "overlaps group" for one address (exit 2, as any overlap).

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use parsrv::{
    control::{self, Request, Response},
    dataplane::pins::group_dir,
};
use parsrv_integration_tests::{
    error_line, group, parsrv_bin, privileged, signal, stop_orphan, wait_for, GroupBuilder,
    HandlerKind, Needs,
};

/// Rounds per case: each is a fresh race.
const ROUNDS: usize = 5;

/// Starts `parsrv run` for `group` without waiting for it, its stderr in `log`.
fn launch(group: &GroupBuilder, log: &Path) -> Child {
    Command::new(parsrv_bin())
        .arg("run")
        .args(group.args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("starting parsrv run")
}

/// The test's spawners, stopped with their groups if the test fails before stopping them:
/// SIGTERM (SIGKILL after 20 s), then `parsrv stop` for a group whose handlers outlived
/// their spawner, so that no handler of the test runs on.
struct Stopped {
    children: [Child; 2],
    names: [String; 2],
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for child in &mut self.children {
            if child.try_wait().ok().flatten().is_none() {
                signal(child.id(), Signal::SIGTERM);
                if !wait_for(Duration::from_secs(20), || {
                    child.try_wait().ok().flatten().is_some()
                }) {
                    let _ = child.kill();
                }
                let _ = child.wait();
            }
        }
        for name in &self.names {
            stop_orphan(name);
        }
    }
}

/// Races `first` against `second` and checks that exactly one serves: the group it
/// answers for is its own, the other exits with `exit` and `refusal` in its error line,
/// which names the winner's group and spawner. Then stops the winner and checks that
/// nothing is left.
fn race(first: GroupBuilder, second: GroupBuilder, exit: i32, refusal: &str) {
    let names = [first.spec.name.clone(), second.spec.name.clone()];
    let logs = ["first", "second"].map(|which| {
        std::env::temp_dir().join(format!("parsrv-test-race-{}-{which}.log", names[0]))
    });
    let mut stopped = Stopped {
        children: [launch(&first, &logs[0]), launch(&second, &logs[1])],
        names: names.clone(),
    };
    let children = &mut stopped.children;
    // The loser gives up on its own; the winner runs until stopped.
    let deadline = Instant::now() + Duration::from_secs(30);
    let loser = loop {
        if let Some(i) = (0..2).find(|&i| children[i].try_wait().unwrap().is_some()) {
            break i;
        }
        assert!(Instant::now() < deadline, "neither spawner refused");
        std::thread::sleep(Duration::from_millis(20));
    };
    let winner = 1 - loser;
    let status = children[loser].wait().unwrap();
    let stderr = std::fs::read_to_string(&logs[loser]).unwrap();
    assert_eq!(status.code(), Some(exit), "{stderr}");
    let line = error_line(&stderr);
    let name = &names[winner];
    let pid = children[winner].id();
    assert!(line.contains(refusal), "{stderr}");
    assert!(
        line.contains(&format!("'{name}'")) && line.contains(&format!("spawner {pid}")),
        "the refusal does not name the winner ({name}, spawner {pid}): {line}"
    );

    // The winner serves its own group, under its own pins and control socket.
    assert!(
        wait_for(Duration::from_secs(30), || matches!(
            control::request(name, &Request::Status),
            Ok(Response::Status(status)) if status.spawner_pid == pid
                && status.handlers.iter().all(|h| h.alive)
        )),
        "spawner {pid} does not answer for {name}"
    );
    assert!(
        children[winner].try_wait().unwrap().is_none(),
        "the winner exited"
    );
    assert!(group_dir(name).exists(), "the winner's pins are gone");

    signal(pid, Signal::SIGTERM);
    assert!(children[winner].wait().unwrap().success());
    for name in &names {
        assert!(!group_dir(name).exists(), "pins of {name} left behind");
        assert!(
            !control::socket_path(name).exists(),
            "{name}.sock left behind"
        );
    }
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn two_spawners_at_once_for_one_name_one_serves_and_the_other_refuses() {
    privileged(Needs::program(), || {
        for _ in 0..ROUNDS {
            race(
                group("contested", HandlerKind::Http).handlers(1),
                group("contested", HandlerKind::Http)
                    .handlers(1)
                    .listen("127.0.0.1:8081"),
                1,
                "is already running under spawner",
            );
        }
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn two_spawners_at_once_for_one_address_one_serves_and_the_other_refuses() {
    privileged(Needs::program(), || {
        for _ in 0..ROUNDS {
            race(
                group("first-claim", HandlerKind::Http).handlers(1),
                group("second-claim", HandlerKind::Http).handlers(1),
                // The winner's group, found by its record (written before the winner lets
                // the namespace's lock go): a refusal of the spec, as for any overlap.
                2,
                "overlaps group",
            );
        }
    });
}
