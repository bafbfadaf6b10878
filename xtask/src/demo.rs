//! `cargo xtask run` and `cargo xtask cluster-demo`: parsrv shown as a user would run it.

use std::process::Command;

use anyhow::{Context as _, Result};

use crate::{build, run_step, running_as_root, workspace_root, Fatal, Profile, EXIT_BAD_INPUT};

/// The demo's `parsrv` arguments, shared with the test that runs it as a user would
/// (tests/tests/suite/demo.rs).
const DEMO_ARGS: &str = include_str!("demo.args");

pub(crate) fn run_demo(args: Vec<String>) -> Result<()> {
    build(Profile::Release)?;
    let args = if args.is_empty() {
        DEMO_ARGS.split_whitespace().map(String::from).collect()
    } else {
        args
    };
    let parsrv = Profile::Release.parsrv();
    eprintln!(
        "xtask: starting {} {}\n\
         xtask: try, from another terminal:\n  \
           curl http://127.0.0.1:8080/\n  \
           {} status          (or --json)\n\
         xtask: stop with Ctrl-C",
        parsrv.display(),
        args.join(" "),
        parsrv.display()
    );
    // Replace xtask (cargo run already replaced cargo): Ctrl-C then reaches parsrv alone,
    // which stops its handlers in order.
    use std::os::unix::process::CommandExt as _;
    let error = Command::new(&parsrv).args(&args).exec();
    Err(error).with_context(|| format!("running {}", parsrv.display()))
}

pub(crate) fn cluster_demo() -> Result<()> {
    // Set-up (bird2 included) comes with the build.
    build(Profile::Release)?;
    if !running_as_root() {
        return Err(Fatal::error(
            EXIT_BAD_INPUT,
            "the cluster demo needs root (network namespaces, eBPF): run `cargo xtask cluster-demo` as root",
        ));
    }
    let root = workspace_root();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args([
            "run",
            "--quiet",
            "--package",
            "parsrv-bench",
            "--bin",
            "cluster-demo",
        ])
        .args(Profile::Release.cargo_args())
        .env("PARSRV_BIN", Profile::Release.parsrv())
        .current_dir(&root);
    run_step("the cluster demo", &mut cargo)
}
