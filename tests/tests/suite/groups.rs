//! Socket groups from a config file: two groups served at once with independent steering,
//! metrics checked with Prometheus's own parser against `status --json`, a round trip of
//! every field through `group show`, `group add`/`remove`, SIGHUP, `check`, and bad input
//! that leaves a running spawner as it was.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use nix::sys::signal::Signal;
use parsrv::config_file;
use parsrv_integration_tests::{
    addr, error_line, http_load, privileged, pyenv, signal, stdout_of, stop_process, wait_for,
    Needs, NetCounters, Spawner,
};

fn write_config(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("parsrv-test-{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

const TWO_GROUPS: &str = r#"
metrics = "127.0.0.1:9100"

[[group]]
name = "cfg-alpha"
listen = "127.0.0.1:8080"
handler = "http"
handlers = 4
backlog = 8
# A stopped handler is how the test fills a queue: stall detection would move it, and
# two-choices (the default) would send its share elsewhere before it filled.
stall_after = 0
policy = "redirect"

[[group]]
name = "cfg-beta"
listen = "127.0.0.1:8081"
handler = "http"
handlers = 2
policy = "least-loaded"
"#;

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn two_groups_steer_independently_and_metrics_match_status() {
    privileged(Needs::program().and_python(), || {
        let config = write_config("two-groups", TWO_GROUPS);
        let spawner = Spawner::start_config("two-groups", &config, &["cfg-alpha", "cfg-beta"], &[]);
        // Stall one handler of alpha and fill its queue: alpha redirects, beta is untouched.
        let alpha: SocketAddr = addr();
        let beta: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        let stalled = spawner.status_of("cfg-alpha").handlers[0].pid.unwrap();
        stop_process(stalled);
        let held = spawner.fill_queue(0, alpha);
        let before = NetCounters::read();
        let on_alpha = http_load(alpha, 10, 20, Duration::from_secs(3));
        let on_beta = http_load(beta, 10, 20, Duration::from_secs(3));
        let kernel = before.delta(&NetCounters::read());
        assert_eq!(on_alpha.failures() + on_beta.failures(), 0);
        assert_eq!(kernel.listen_overflows, 0);
        let alpha_status = spawner.status_of("cfg-alpha");
        let beta_status = spawner.status_of("cfg-beta");
        assert!(alpha_status.sockets[0].counters.redirected_away > 0);
        assert_ne!(
            alpha_status.program.program_id, beta_status.program.program_id,
            "one program each"
        );
        let beta_selected: u64 = beta_status
            .sockets
            .iter()
            .map(|s| s.counters.selected)
            .sum();
        let beta_redirected: u64 = beta_status
            .sockets
            .iter()
            .map(|s| s.counters.redirected_away)
            .sum();
        assert_eq!(
            beta_selected, 200,
            "beta saw exactly its own 200 connections"
        );
        assert_eq!(beta_redirected, 0, "alpha's stall did not reach beta");
        assert_eq!(beta_status.spec.policy.to_string(), "least-loaded");
        signal(stalled, Signal::SIGCONT);
        drop(held);

        // Metrics: scraped, parsed by prometheus_client, compared with status --json.
        let (code, json, err) = Spawner::parsrv(&["status", "--json"]);
        assert_eq!(code, 0, "{err}");
        let statuses: Vec<parsrv::status::GroupStatus> = serde_json::from_str(&json).unwrap();
        assert_eq!(statuses.len(), 2);
        let script = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen("http://127.0.0.1:9100/metrics", timeout=5).read().decode()
out = {}
for family in text_string_to_metric_families(text):
    for sample in family.samples:
        key = sample.name + "|" + sample.labels.get("group", "") + "|" + sample.labels.get("slot", "")
        out[key] = sample.value
print(json.dumps(out))
"#;
        let out = stdout_of(Command::new(pyenv().join("bin/python3")).args(["-c", script]));
        let metrics: std::collections::BTreeMap<String, f64> = serde_json::from_str(&out).unwrap();
        for status in &statuses {
            let metric = |name: &str, slot: &str| -> f64 {
                *metrics
                    .get(&format!("{name}|{}|{slot}", status.spec.name))
                    .unwrap_or_else(|| {
                        panic!("no {name} for {} {slot}: {metrics:?}", status.spec.name)
                    })
            };
            assert_eq!(
                metric("parsrv_group_handlers", ""),
                status.handlers.len() as f64
            );
            for socket in &status.sockets {
                let slot = socket.slot.to_string();
                // Counters do not move while idle: equal to what status said.
                assert_eq!(
                    metric("parsrv_socket_selected_total", &slot),
                    socket.counters.selected as f64
                );
                assert_eq!(
                    metric("parsrv_socket_redirected_away_total", &slot),
                    socket.counters.redirected_away as f64
                );
                assert_eq!(
                    metric("parsrv_socket_migrated_in_total", &slot),
                    socket.counters.migrated_in as f64
                );
                assert_eq!(
                    metric("parsrv_socket_queue_capacity", &slot),
                    socket.queue.unwrap().capacity as f64
                );
            }
        }
        // status --watch: rates per second.
        let (code, out, err) = Spawner::parsrv(&[
            "status",
            "cfg-beta",
            "--watch",
            "--count",
            "2",
            "--interval",
            "0.2",
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("selected/s"), "{out}");
        assert!(spawner.stop().success());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn every_field_round_trips_through_group_show() {
    privileged(Needs::program(), || {
        let text = r#"
[[group]]
name = "cfg-full"
listen = "127.0.0.1:8080"
handler = "exec"
command = ["sleep", "60"]
handlers = "1..3"
autoscale = false
backlog = 16
threads = 3
policy = "least-loaded"
when_full = "refuse"
cpus = "0"
user = "nobody:nogroup"
env = { APP_MODE = "prod", LANG = "C.UTF-8" }
grace = 2.5
ready_timeout = 7.0
drain = true
"#;
        let config = write_config("full", text);
        let expected = config_file::ConfigFile::load(&config).unwrap().groups;
        let spawner = Spawner::start_config("full", &config, &["cfg-full"], &[]);
        let (code, shown, err) = Spawner::parsrv(&["group", "show", "cfg-full"]);
        assert_eq!(code, 0, "{err}");
        let again = config_file::check_text(std::path::Path::new("shown.toml"), &shown);
        assert!(again.problems.is_empty(), "{:?}\n{shown}", again.problems);
        assert_eq!(again.file.unwrap().groups, expected, "{shown}");
        for key in [
            "command",
            "autoscale = false",
            "when_full = \"refuse\"",
            "user = \"nobody:nogroup\"",
            "APP_MODE = \"prod\"",
            "drain = true",
        ] {
            assert!(shown.contains(key), "{key} not shown:\n{shown}");
        }
        assert!(spawner.stop().success());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn groups_come_and_go_with_add_remove_and_sighup_and_bad_commands_change_nothing() {
    privileged(Needs::program(), || {
        let one = r#"
[[group]]
name = "cfg-one"
listen = "127.0.0.1:8080"
handler = "http"
handlers = 2

[[group]]
name = "cfg-two"
listen = "127.0.0.1:8081"
handler = "echo"
handlers = 1
"#;
        let config = write_config("reload", one);
        let spawner = Spawner::start_config("reload", &config, &["cfg-one", "cfg-two"], &[]);
        assert_eq!(Spawner::running_groups(), ["cfg-one", "cfg-two"]);

        // add by flags; a duplicate name, a taken address, a bad value: refused, no change.
        let (code, out, err) = Spawner::parsrv(&[
            "group",
            "add",
            "--name",
            "cfg-three",
            "--listen",
            "127.0.0.1:8082",
            "--handler",
            "http",
            "--handlers",
            "1",
        ]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("started cfg-three"));
        for (args, exit, words) in [
            (
                &[
                    "--name",
                    "cfg-three",
                    "--listen",
                    "127.0.0.1:8083",
                    "--handler",
                    "http",
                ][..],
                1,
                "already running",
            ),
            (
                &[
                    "--name",
                    "cfg-four",
                    "--listen",
                    "127.0.0.1:8080",
                    "--handler",
                    "http",
                ],
                2,
                "already served here",
            ),
            (
                &[
                    "--name",
                    "cfg-four",
                    "--listen",
                    "127.0.0.1:8084",
                    "--handler",
                    "http",
                    "--backlog",
                    "0",
                ],
                2,
                "invalid --backlog",
            ),
        ] {
            let mut argv = vec!["group", "add"];
            argv.extend_from_slice(args);
            let (code, _, err) = Spawner::parsrv(&argv);
            assert_eq!(code, exit, "{args:?}: {err}");
            assert!(error_line(&err).contains(words), "{args:?}: {err}");
            assert_eq!(
                Spawner::running_groups(),
                ["cfg-one", "cfg-three", "cfg-two"],
                "{args:?} changed the spawner"
            );
        }
        // remove: graceful; unknown: an error.
        let (code, out, _) = Spawner::parsrv(&["group", "remove", "cfg-three"]);
        assert_eq!(code, 0);
        assert!(out.contains("drained and stopped"));
        assert!(!parsrv::dataplane::pins::group_dir("cfg-three").exists());
        let (code, _, err) = Spawner::parsrv(&["group", "remove", "cfg-nothing"]);
        assert_eq!(code, 1);
        assert!(
            error_line(&err).contains("no running parsrv group named 'cfg-nothing'"),
            "{err}"
        );

        // SIGHUP: two leaves, five arrives, one changes (reported, not applied).
        let two = r#"
[[group]]
name = "cfg-one"
listen = "127.0.0.1:8080"
handler = "http"
handlers = 2
backlog = 64

[[group]]
name = "cfg-five"
listen = "127.0.0.1:8085"
handler = "echo"
handlers = 1
"#;
        std::fs::write(&config, two).unwrap();
        signal(spawner.pid(), Signal::SIGHUP);
        assert!(
            wait_for(Duration::from_secs(15), || Spawner::running_groups()
                == ["cfg-five", "cfg-one"]),
            "{:?}\n{}",
            Spawner::running_groups(),
            spawner.log()
        );
        assert!(
            spawner.wait_for_log(
                "SIGHUP: group cfg-one changed (backlog)",
                Duration::from_secs(5)
            ),
            "{}",
            spawner.log()
        );
        // An invalid file on SIGHUP changes nothing.
        std::fs::write(&config, "[[group]]\nname = 1\n").unwrap();
        signal(spawner.pid(), Signal::SIGHUP);
        assert!(
            spawner.wait_for_log("nothing changed", Duration::from_secs(5)),
            "{}",
            spawner.log()
        );
        assert_eq!(Spawner::running_groups(), ["cfg-five", "cfg-one"]);
        assert!(spawner.stop().success());

        // No spawner: add says so.
        let (code, _, err) = Spawner::parsrv(&[
            "group",
            "add",
            "--listen",
            "127.0.0.1:8086",
            "--handler",
            "http",
        ]);
        assert_eq!(code, 1, "{err}");
        assert!(
            error_line(&err).contains("no running parsrv spawner"),
            "{err}"
        );
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn check_reports_every_problem_located_and_a_taken_metrics_port_is_refused() {
    let needs = Needs::program().host_only(
        "checks config files and a taken metrics port, refused before parsrv touches the \
         kernel (11 s of a VM for 0.4 s here)",
    );
    privileged(needs, || {
        let good = write_config("check-good", TWO_GROUPS);
        let (code, out, _) = Spawner::parsrv(&["check", "--config", good.to_str().unwrap()]);
        assert_eq!(code, 0);
        assert!(
            out.contains("valid, 2 groups: cfg-alpha, cfg-beta"),
            "{out}"
        );

        let bad = write_config(
            "check-bad",
            "[[group]]\nname = \"x\"\nlisten = \"127.0.0.1:8080\"\nhandler = \"http\"\nbacklog = 0\nthreads = 0\nhandlers = \"9..2\"\n",
        );
        let (code, out, err) = Spawner::parsrv(&["check", "--config", bad.to_str().unwrap()]);
        assert_eq!(code, 2, "{out}{err}");
        let path = bad.display().to_string();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("{path}:5:11: group 'x': invalid backlog '0'"))),
            "{out}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("{path}:6:11: group 'x': invalid threads '0'"))),
            "{out}"
        );
        assert!(lines.iter().any(|l| l.starts_with(&format!("{path}:7:12: group 'x': invalid handlers '9..2'"))), "{out}");
        assert!(error_line(&err).contains("3 problems"), "{err}");
        // run refuses the same file, naming the first problem, and leaves nothing.
        let (code, _, err) = Spawner::parsrv(&["run", "--config", bad.to_str().unwrap()]);
        assert_eq!(code, 2, "{err}");
        let error = error_line(&err);
        assert!(
            error.contains("3 problems") && error.contains("parsrv check --config"),
            "{err}"
        );
        assert!(!parsrv::dataplane::pins::group_dir("x").exists());

        // A metrics port someone holds: refused before any group starts.
        let holder = std::net::TcpListener::bind("127.0.0.1:9100").unwrap();
        let (code, _, err) = Spawner::parsrv(&["run", "--config", good.to_str().unwrap()]);
        assert_eq!(code, 1, "{err}");
        assert!(
            error_line(&err).contains("metrics address 127.0.0.1:9100 is already in use"),
            "{err}"
        );
        assert!(!parsrv::dataplane::pins::group_dir("cfg-alpha").exists());
        assert!(!parsrv::control::socket_path("cfg-alpha").exists());
        drop(holder);
    });
}
