//! `cargo xtask`: everything that needs more than plain cargo. Every command first runs the
//! set-up it depends on (idempotent, quick when already done).

mod bench;
mod ci;
mod demo;
mod ebpf;
mod fresh;
mod package;
mod phases;
mod setup;
mod soak;
mod vm;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;
use clap::{Parser, Subcommand};

pub(crate) use ebpf::{build, Profile};
pub(crate) use phases::{record_phase, run_step};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the eBPF program needs: apt packages (LLVM 22), the pinned
    /// nightly with rust-src, bpf-linker built against that LLVM.
    Setup,
    /// Build parsrv (its build.rs builds the eBPF programs into target/ebpf and embeds
    /// them), after the set-up: `cargo build -p parsrv [--release]` does the same on a
    /// machine that is set up.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run a demo group in the foreground (as root): 127.0.0.1:8080, 4 http
    /// handlers. Arguments after `--` replace the demo's `parsrv run` arguments.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build, then show a cluster (as root): a router and three hosts in network namespaces,
    /// BIRD and parsrv on each, clients with long-lived connections; prints where the
    /// connections go while a host joins, drains and leaves. Removes everything after.
    ClusterDemo,
    /// cargo fmt --check and cargo clippy -D warnings, for the workspace and the eBPF crate.
    Lint,
    /// Build (release), then run benchmark scenarios (as root; each in its own network
    /// namespace; `parsrv bench --list` names them, from the table in
    /// bench/src/scenarios/mod.rs). Prints tables and writes target/bench/DATE/ (report.md,
    /// CSV, SVG charts).
    Bench {
        /// Scenarios to run (default: all).
        scenarios: Vec<String>,
        /// A few seconds per scenario: checks the harness, not the figures.
        #[arg(long)]
        quick: bool,
    },
    /// Lint, build, then run the unit tests, the privileged integration tests (as root;
    /// each in its own network namespace), a quick run of every benchmark scenario, and the
    /// integration tests again in VMs on Debian's 5.10, 6.1 and 6.12 kernels. With --vm: only
    /// the VM part.
    Test {
        /// Only tests whose name contains this (passed to the test harness).
        filter: Option<String>,
        /// Only the integration tests, in VMs (needs no root): one per --kernel.
        #[arg(long, conflicts_with = "no_vm")]
        vm: bool,
        /// Skip the VM part of the full run.
        #[arg(long)]
        no_vm: bool,
        /// Kernels for the VMs: a Debian series (5.10, 6.1, 6.12), fetched and cached in
        /// target/vm, or a bzImage path. Repeat, or separate with commas [default: 5.10, 6.1,
        /// 6.12].
        #[arg(
            long = "kernel",
            value_name = "5.10|6.1|6.12|PATH",
            value_delimiter = ','
        )]
        kernels: Vec<String>,
        /// qemu accelerator: tcg works everywhere; kvm where /dev/kvm works.
        #[arg(long, value_enum, default_value = "tcg")]
        accel: vm::Accel,
        /// Seconds one VM may run, from boot to power-off, before it is killed as hung. The VMs
        /// run every test their kernel has the features for, the cluster's and Python's too,
        /// under TCG (nextest kills a test hung for 5 minutes by itself).
        #[arg(long, default_value_t = 2400, value_name = "SECONDS")]
        timeout: u64,
        /// With --vm: run each selected test this many times in each VM (nextest's
        /// --stress-count), to soak a test on other kernels; `cargo xtask soak` does it here.
        #[arg(long, value_name = "N", requires = "vm")]
        stress: Option<u32>,
        /// The VMs of the first (newest) kernel: its tests split between this many, by
        /// nextest's --partition, run side by side (a run of one kernel on a machine with CPUs
        /// to spare). A run with a test filter or --stress never splits.
        #[arg(long, default_value_t = 1, value_name = "N")]
        shards: u32,
    },
    /// Build (release) and package parsrv: a Debian package (/usr/sbin/parsrv, the systemd
    /// unit, an example /etc/parsrv/parsrv.toml, man pages, completions, docs) and a tarball
    /// of the same files with checksums, in target/package/. With --test, then installs it
    /// in a clean Debian 12 root (debootstrapped once into target/package/debian-12), runs
    /// the shipped group, upgrades it to a next package under load, and removes it (as
    /// root; the `package::` integration test).
    Package {
        #[arg(long)]
        test: bool,
    },
    /// Run one privileged integration test (or those whose name contains TEST) many times,
    /// as the suite runs it, optionally beside CPU hogs, and keep the whole output of every
    /// failed run under target/soak/ (as root). Finds flakes; never retries them away.
    Soak {
        /// The test's name, or part of it.
        test: String,
        /// Only the test with exactly this name (its path in the binary: `kill_loop::...`
        /// is not needed; the name alone).
        #[arg(long)]
        exact: bool,
        #[arg(long, default_value_t = 30)]
        runs: u32,
        /// Threads that keep CPUs busy for the whole soak.
        #[arg(long, default_value_t = 0)]
        hogs: u32,
    },
}

/// A step failed (a build, a test).
pub const EXIT_FAILED: i32 = 1;
/// Bad input: an option, a kernel path, a missing tool, a kernel parsrv cannot run on.
pub const EXIT_BAD_INPUT: i32 = 2;
/// A VM hung (killed at --timeout) or its kernel panicked.
pub const EXIT_VM_HUNG: i32 = 3;

/// An error with its own exit code; any other error exits with [`EXIT_FAILED`].
#[derive(Debug)]
pub struct Fatal {
    pub code: i32,
    pub message: String,
}

impl Fatal {
    pub fn error(code: i32, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Fatal {
            code,
            message: message.into(),
        })
    }
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fatal {}

fn main() {
    std::sync::LazyLock::force(&phases::STARTED);
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { EXIT_BAD_INPUT } else { 0 });
    });
    if let Err(e) = run(cli.command) {
        eprintln!("xtask: {e:#}");
        let code = e.downcast_ref::<Fatal>().map_or(EXIT_FAILED, |f| f.code);
        std::process::exit(code);
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::ensure_all()
            .and_then(|()| setup::ensure_python_servers())
            .and_then(|()| setup::ensure_vm_packages()),
        Task::Build { release } => build(if release {
            Profile::Release
        } else {
            Profile::Dev
        }),
        Task::Run { args } => demo::run_demo(args),
        Task::ClusterDemo => demo::cluster_demo(),
        Task::Lint => ci::lint(),
        Task::Package { test } => package::package(test),
        Task::Bench { scenarios, quick } => bench::bench(scenarios, quick),
        Task::Soak {
            test,
            exact,
            runs,
            hogs,
        } => soak::soak(&soak::SoakOptions {
            test,
            exact,
            runs,
            hogs,
        }),
        Task::Test {
            filter,
            vm,
            no_vm,
            kernels,
            accel,
            timeout,
            stress,
            shards,
        } => {
            let vm_options = vm::VmOptions {
                stress,
                shards,
                kernels: if kernels.is_empty() {
                    vm::DEFAULT_KERNELS.iter().map(|k| k.to_string()).collect()
                } else {
                    kernels
                },
                accel,
                timeout: Duration::from_secs(timeout),
                filter: filter.clone(),
                // Beside the native tests, the consoles come after them, not interleaved.
                live_console: vm,
            };
            if !no_vm {
                vm_options.validate()?;
            }
            let result = if vm {
                // Without root, what is missing is reported by the VM runner (exit 2).
                if running_as_root() {
                    setup::ensure_vm_packages()?;
                    // The VMs run the Python servers from it (a fresh clone's
                    // `test --vm` failed every Python test: no venv).
                    setup::ensure_python_servers()?;
                }
                vm::test(&vm_options, Vec::new())
            } else if no_vm {
                let host = ci::lint()
                    .and_then(|()| run_step("unit tests", &mut ci::unit_tests(&filter)))
                    .and_then(|()| ci::native_build())
                    .and_then(|()| ci::native_integration(&filter))?;
                let rows = [host];
                vm::console::print_summary(&rows);
                match rows.iter().all(|r| r.outcome.passed()) {
                    true => Ok(()),
                    false => Err(Fatal::error(
                        EXIT_FAILED,
                        "integration tests failed: the summary above says which",
                    )),
                }
            } else {
                ci::test_everywhere(&filter, &vm_options)
            };
            phases::print_phases();
            result
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

pub(crate) fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod docs_commands {
    use super::*;

    /// Every `cargo xtask ...` the docs show (in backticks or a shell block, up to the closing
    /// backtick or a `#` comment), as words; forms with optional parts (`[--release]`) are
    /// notation, not commands, and are left out.
    fn commands_in_docs() -> Vec<(String, Vec<String>)> {
        let root = workspace_root();
        let mut files = vec![root.join("README.md"), root.join("bench/README.md")];
        let mut docs: Vec<_> = std::fs::read_dir(root.join("docs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "md"))
            .collect();
        docs.sort();
        files.extend(docs);
        let mut found = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (number, line) in (1..).zip(text.lines()) {
                for (at, _) in line.match_indices("cargo xtask") {
                    let rest = &line[at + "cargo xtask".len()..];
                    let command = rest.split(['`', '#', '(', ')']).next().unwrap_or_default();
                    if command.contains('[') {
                        continue;
                    }
                    let place = format!("{}:{number}", file.display());
                    found.push((
                        place,
                        command.split_whitespace().map(str::to_owned).collect(),
                    ));
                }
            }
        }
        found
    }

    #[test]
    fn every_xtask_command_in_the_docs_parses() {
        let commands = commands_in_docs();
        assert!(commands.len() >= 15, "{commands:?}");
        for (place, words) in commands {
            // A verb named in prose (`cargo xtask soak`): it must exist.
            if let [verb] = words.as_slice() {
                use clap::CommandFactory as _;
                let cli = Cli::command();
                assert!(
                    cli.find_subcommand(verb).is_some(),
                    "{place}: no verb {verb}"
                );
                continue;
            }
            let argv = std::iter::once("cargo xtask".to_owned()).chain(words.iter().cloned());
            if let Err(e) = Cli::try_parse_from(argv) {
                panic!("{place}: cargo xtask {}: {e}", words.join(" "));
            }
        }
    }

    #[test]
    fn a_renamed_flag_is_caught() {
        let argv = ["cargo xtask", "soak", "kill_loop", "--run", "30"];
        assert!(Cli::try_parse_from(argv).is_err());
    }
}
