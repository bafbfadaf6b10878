//! `cargo xtask run`'s demo, as a new user meets it (the README's first command): the same
//! `parsrv run` arguments start a group, the first request is answered by one of its
//! handlers, `parsrv status` lists them, and Ctrl-C (SIGINT) stops it with exit 0, no error
//! or warning in the log, and nothing left: no pin, no control socket or record, no
//! handler, the port free. On a fresh machine this is what once did nothing at all (the
//! verifier refused the program), so the suite runs it on every kernel.

use std::{
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use nix::sys::signal::Signal;
use parsrv_integration_tests::{
    addr, get_page, parsrv_bin, privileged, processes_mentioning, signal, stdout_of, wait_for,
    Needs,
};

/// The arguments `cargo xtask run` starts parsrv with.
const DEMO_ARGS: &str = include_str!("../../../xtask/src/demo.args");

/// The group name parsrv gives the demo's group (from its address).
const DEMO_GROUP: &str = "127_0_0_1-8080";

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn the_demo_answers_and_stops_cleanly_on_ctrl_c() {
    privileged(Needs::program(), || {
        let args: Vec<&str> = DEMO_ARGS.split_whitespace().collect();
        assert_eq!(args[..3], ["run", "--listen", &addr().to_string()]);
        let log = std::env::temp_dir().join("parsrv-test-demo.log");
        let mut spawner = Command::new(parsrv_bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        let mut first = None;
        let answered = wait_for(Duration::from_secs(30), || {
            first = get_page(addr(), "/", Duration::from_secs(1)).ok();
            first.as_ref().is_some_and(|(code, _)| *code == 200)
        });
        assert!(answered, "no answer: {first:?}\n{}", read_log());
        let (_, body) = first.unwrap();
        // "parsrv handler 2 (pid 4242)", as the README shows.
        let pid: u32 = body
            .trim()
            .strip_prefix("parsrv handler ")
            .and_then(|rest| rest.split_once(" (pid "))
            .and_then(|(_, pid)| pid.strip_suffix(')')?.parse().ok())
            .unwrap_or_else(|| panic!("not a handler's answer: {body:?}"));
        let table = stdout_of(Command::new(parsrv_bin()).args(["status", DEMO_GROUP]));
        assert!(table.contains(&pid.to_string()), "{table}");
        let handlers = processes_mentioning(DEMO_GROUP);
        assert!(handlers.contains(&pid), "{handlers:?}");

        signal(spawner.id(), Signal::SIGINT);
        let stopped = wait_for(Duration::from_secs(20), || {
            spawner.try_wait().unwrap().is_some()
        });
        if !stopped {
            let _ = spawner.kill();
        }
        let status = spawner.wait().unwrap();
        let written = read_log();
        assert!(stopped && status.success(), "{status}\n{written}");
        let complaints: Vec<&str> = written
            .lines()
            .filter(|l| l.contains(" ERROR: ") || l.contains(" WARN: "))
            .collect();
        assert!(complaints.is_empty(), "{complaints:#?}\n{written}");
        assert!(
            written.contains(&format!("group {DEMO_GROUP} stopped")),
            "{written}"
        );
        // Nothing left.
        assert_eq!(processes_mentioning(DEMO_GROUP), Vec::<u32>::new());
        let pins = Path::new("/sys/fs/bpf/parsrv");
        assert!(
            !pins.exists() || std::fs::read_dir(pins).unwrap().next().is_none(),
            "pins left"
        );
        let run_dir = parsrv::run_dir::run_dir();
        for file in [format!("{DEMO_GROUP}.sock"), format!("{DEMO_GROUP}.json")] {
            assert!(!run_dir.join(&file).exists(), "{file} left");
        }
        TcpListener::bind(addr()).expect("the demo's port is free");
    });
}
