//! Parsing of the whole command-line model: which flags `parsrv run` and `parsrv group` accept,
//! and the group they build.

use super::*;
use crate::spec::{HandlerKind, HandlerRange, Policy, WhenFull};

/// The group `parsrv run` gets from these flags; a parse error as the usage error it is.
fn run_args(extra: &[&str]) -> Result<GroupSpec> {
    let mut argv = vec!["parsrv", "run", "--listen", "127.0.0.1:8080"];
    if !extra.contains(&"--handler") {
        argv.extend(["--handler", "echo"]);
    }
    argv.extend_from_slice(extra);
    let cli = Cli::try_parse_from(argv).map_err(|e| Error::InvalidOption {
        option: "flags",
        value: String::new(),
        reason: e.to_string(),
    })?;
    match cli.command {
        Command::Run(args) => args
            .into_options()
            .map(|o| o.groups.into_iter().next().unwrap()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_config_file_or_a_group_from_flags_never_both() {
    let cli = Cli::try_parse_from(["parsrv", "run", "--config", "x.toml"]).unwrap();
    assert!(matches!(
        cli.command,
        Command::Run(RunArgs { group: None, .. })
    ));
    for argv in [
        &["parsrv", "run", "--config", "x.toml", "--backlog", "3"][..],
        &["parsrv", "run"],
        &["parsrv", "run", "--listen", "127.0.0.1:1"],
    ] {
        assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
    }
}

#[test]
fn defaults_are_sane() {
    let options = run_args(&[]).unwrap();
    assert_eq!(options.handlers, HandlerRange { min: 4, max: 4 });
    assert!(!options.drain);
    assert_eq!(options.ready_timeout, 10.0);
    assert_eq!(options.threads, 1);
    assert_eq!(options.policy, Policy::TwoChoices);
    assert_eq!(options.when_full, WhenFull::Drop);
    assert_eq!(options.name, "127_0_0_1-8080");
    assert_eq!(options.grace, 5.0);
}

#[test]
fn bad_values_are_usage_errors() {
    for extra in [
        &["--handlers", "0"][..],
        &["--handlers", "129"],
        &["--handlers", "4..2"],
        &["--handlers", "1..x"],
        &["--ready-timeout=-1"],
        &["--backlog", "0"],
        &["--threads", "0"],
        &["--grace=-1"],
        &["--name", "../x"],
    ] {
        let err = run_args(extra).unwrap_err();
        assert_eq!(err.exit_code(), EXIT_USAGE, "{extra:?}: {err}");
        assert!(
            err.to_string()
                .contains(extra[0].split('=').next().unwrap()),
            "{extra:?}: {err}"
        );
    }
}

#[test]
fn exec_command_cpus_and_user_parse() {
    let options = run_args(&[
        "--handler",
        "exec",
        "--cpus",
        "0",
        "--user",
        "root",
        "--",
        "sh",
        "-c",
        "exec true",
    ])
    .unwrap();
    assert_eq!(options.handler, HandlerKind::Exec);
    assert_eq!(options.command, ["sh", "-c", "exec true"]);
    assert_eq!(options.cpus.0, [0]);
    assert_eq!(options.user.as_deref(), Some("root"));
    let err = run_args(&["--cpus", "x"]).unwrap_err();
    assert_eq!(err.exit_code(), EXIT_USAGE);
}

#[test]
fn handler_ranges_and_drain_parse() {
    let options = run_args(&["--handlers", "2..6", "--drain"]).unwrap();
    assert_eq!(options.handlers, HandlerRange { min: 2, max: 6 });
    assert!(options.drain && options.autoscaled());
    let cli = Cli::try_parse_from(["parsrv", "group", "resize", "web", "3"]).unwrap();
    assert!(matches!(
        cli.command,
        Command::Group(GroupCommand::Resize { handlers: 3, .. })
    ));
}

#[test]
fn policy_and_when_full_flags_parse() {
    let options = run_args(&["--policy", "least-loaded", "--when-full", "refuse"]).unwrap();
    assert_eq!(options.policy, Policy::LeastLoaded);
    assert_eq!(options.when_full, WhenFull::Refuse);
    assert!(
        Cli::try_parse_from(["parsrv", "run", "--listen", "1.2.3.4:5", "--handler", "ftp"])
            .is_err()
    );
}

#[test]
fn a_watch_interval_must_be_a_number_of_seconds_above_zero() {
    for bad in ["nan", "inf", "0", "-1", "x"] {
        let interval = format!("--interval={bad}");
        let err = Cli::try_parse_from(["parsrv", "status", "--watch", &interval])
            .expect_err(bad)
            .to_string();
        assert!(
            err.contains("expected a number of seconds above 0"),
            "{bad}: {err}"
        );
    }
    assert!(Cli::try_parse_from(["parsrv", "status", "--watch", "--interval", "0.5"]).is_ok());
}
