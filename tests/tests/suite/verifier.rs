//! The verifier's budget, kept with a wide margin on every kernel the suite runs on: every
//! program loads at a tenth of the budget or less, in every configuration a user can choose;
//! a program the verifier refuses is one line and a log file, and leaves nothing behind; a
//! clean stop logs no error.
//!
//! A fresh machine once refused the steering program that passed here (another build of the
//! same kernel release), because its cost had never been measured. These tests measure it on
//! every run and print every figure (`cargo xtask test` lists them after the run, natively
//! and for each VM).

use std::{net::TcpListener, path::Path, process::Command, time::Duration};

use nix::sys::signal::Signal;
use parsrv::{
    dataplane::{
        object,
        verification::{thousands, ProgramReport, MARGIN_BUDGET, VERIFIER_LIMIT},
        EbpfObject, Program, OBJECT_ENV,
    },
    features::{KernelFeatures, KernelVersion},
    kernel::kernel_build,
};
use parsrv_integration_tests::{
    addr, error_line, figure, group, http_get, privileged, wait_for, Feature, HandlerKind, Needs,
    Outcome, Spawner,
};

/// bpf_prog_info.verified_insns came with Linux 5.16: before, a load is all there is to see.
const VERIFIED_INSNS_SINCE: KernelVersion = KernelVersion {
    major: 5,
    minor: 16,
};

fn reports_verified_insns() -> bool {
    KernelFeatures::probe()
        .version
        .is_some_and(|v| v >= VERIFIED_INSNS_SINCE)
}

/// `parsrv kernel --json` with `envs`: its exit code, its programs' part, and its stderr;
/// checks that it names this kernel's build.
fn kernel_report(envs: &[(&str, &Path)]) -> (i32, Vec<ProgramReport>, String) {
    let report = parsrv_integration_tests::kernel_report(envs);
    assert_eq!(report.build, kernel_build(), "{report:?}");
    (report.code, report.programs, report.stderr)
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn every_program_verifies_at_a_tenth_of_the_budget_or_less() {
    privileged(Needs::nothing(), || {
        let (code, programs, stderr) = kernel_report(&[]);
        let probed = KernelFeatures::probe();
        assert_eq!(
            programs
                .iter()
                .map(|p| p.program.as_str())
                .collect::<Vec<_>>(),
            Program::ALL.map(Program::name),
            "every program is reported, in order"
        );
        for (program, report) in Program::ALL.into_iter().zip(&programs) {
            assert_eq!(
                (report.limit, report.budget),
                (VERIFIER_LIMIT, MARGIN_BUDGET)
            );
            match probed.require_for(&[program]) {
                Ok(()) => {
                    assert_eq!(report.not_loaded, None, "{} was not loaded", report.program);
                    if !reports_verified_insns() {
                        figure(&format!(
                            "{}: loaded (no verified_insns before 5.16)",
                            report.program
                        ));
                        continue;
                    }
                    let insns = report
                        .verified_insns
                        .unwrap_or_else(|| panic!("{} has no verified_insns", report.program));
                    figure(&format!(
                        "{} {} insns processed of {} on {}",
                        report.program,
                        thousands(insns),
                        thousands(VERIFIER_LIMIT),
                        kernel_build()
                    ));
                    assert!(
                        insns <= MARGIN_BUDGET,
                        "{} took {insns} insns: over a tenth of the verifier's budget",
                        report.program
                    );
                }
                // An older kernel (the 5.10 VM): the program is not offered to it, and the
                // report says which feature it lacks.
                Err(missing) => {
                    assert_eq!(report.not_loaded, Some(missing.to_string()));
                    assert_eq!(report.verified_insns, None);
                    figure(&format!("{}: not loaded here ({missing})", report.program));
                }
            }
        }
        let runs_groups = probed.require_all().is_ok();
        assert_eq!(code, if runs_groups { 0 } else { 1 }, "{stderr}");
    });
}

/// One group per policy, when-full mode and affinity setting, and one on two addresses.
fn every_configuration() -> (String, Vec<String>) {
    let mut config = String::new();
    let mut names = Vec::new();
    let mut port = 8100;
    for policy in ["redirect", "least-loaded", "two-choices"] {
        for when_full in ["drop", "refuse"] {
            for affinity in ["none", "client"] {
                let name = format!("cost-{policy}-{when_full}-{affinity}");
                config.push_str(&format!(
                    "[[group]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\n\
                     handler = \"echo\"\nhandlers = 1\npolicy = \"{policy}\"\n\
                     when_full = \"{when_full}\"\naffinity = \"{affinity}\"\n\n"
                ));
                names.push(name);
                port += 1;
            }
        }
    }
    config.push_str(
        "[[group]]\nname = \"cost-two-addresses\"\nlisten = [\"127.0.0.1:8200\", \"127.0.0.2:8200\"]\n\
         handler = \"echo\"\nhandlers = 2\n",
    );
    names.push("cost-two-addresses".into());
    (config, names)
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn groups_in_every_configuration_load_at_the_measured_cost() {
    privileged(Needs::program().and(Feature::SkLookup), || {
        let (_, programs, _) = kernel_report(&[]);
        let select = programs
            .iter()
            .find(|p| p.program == Program::ReuseportSelect.name())
            .unwrap()
            .verified_insns;
        let (text, names) = every_configuration();
        let config = std::env::temp_dir().join("parsrv-test-every-configuration.toml");
        std::fs::write(&config, text).unwrap();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let spawner = Spawner::start_config("every-configuration", &config, &names, &[]);
        for name in &names {
            let status = spawner.status_of(name);
            // The configuration is data the program reads at run time (CONFIG): the verifier
            // walks every path whatever it says, so every group costs what `kernel` measured.
            assert_eq!(status.program.verified_insns, select, "{name}");
            if let Some(insns) = status.program.verified_insns {
                assert!(insns <= MARGIN_BUDGET, "{name}: {insns} insns");
            }
        }
        figure(&format!(
            "{} groups (3 policies x 2 when-full x 2 affinity, 2 addresses): parsrv_select {}",
            names.len(),
            select.map_or("loaded".into(), thousands)
        ));
        assert!(spawner.stop().success());
    });
}

/// The embedded object with `program`'s first instruction replaced by `r0 = r5`: a read of
/// a register the program never set, which the verifier refuses at once ("R5 !read_ok").
fn refused_variant(program: Program) -> Vec<u8> {
    use object::{Object, ObjectSection, ObjectSymbol};
    let mut bytes = object(EbpfObject::Parsrv)
        .expect("an embedded object")
        .into_owned();
    let file = object::File::parse(&*bytes).expect("an ELF object");
    let symbol = file
        .symbols()
        .find(|s| s.name() == Ok(program.name()))
        .expect("the program's symbol");
    let section = file
        .section_by_index(symbol.section_index().expect("in a section"))
        .unwrap();
    // Not an instruction a relocation rewrites (the loader would then fail, not the verifier).
    assert!(
        section
            .relocations()
            .all(|(offset, _)| offset != symbol.address()),
        "the first instruction of {} is relocated",
        program.name()
    );
    let (start, _) = section.file_range().unwrap();
    let at = (start + symbol.address()) as usize;
    drop(file);
    // BPF_ALU64 | BPF_MOV | BPF_X, dst r0, src r5.
    bytes[at..at + 8].copy_from_slice(&[0xbf, 0x50, 0, 0, 0, 0, 0, 0]);
    bytes
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_refused_program_is_one_line_and_a_log_file_and_leaves_nothing_behind() {
    privileged(Needs::program(), || {
        let variant = std::env::temp_dir().join("parsrv-test-refused.o");
        std::fs::write(&variant, refused_variant(Program::ReuseportSelect)).unwrap();
        let log = parsrv::dataplane::verification::log_path(Program::ReuseportSelect);
        // A link planted where the log goes is replaced, not followed.
        let victim = std::env::temp_dir().join("parsrv-test-refused-victim");
        std::fs::write(&victim, "untouched").unwrap();
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&victim, &log).unwrap();
        let out = Command::new(parsrv_integration_tests::parsrv_bin())
            .args(["run", "--listen", &addr().to_string(), "--handler", "echo"])
            .args(["--name", "test-refused"])
            .env(OBJECT_ENV, &variant)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let line = error_line(&stderr);
        let expected = format!(
            "parsrv: the kernel's verifier refused parsrv_select (1 insns processed, limit \
             1,000,000): R5 !read_ok; kernel {}; eBPF object {} (sha256 ",
            kernel_build(),
            variant.display()
        );
        assert!(line.starts_with(&expected), "{line}\nexpected: {expected}");
        assert!(
            line.ends_with(&format!("full log: {}", log.display())),
            "{line}"
        );
        assert!(std::fs::symlink_metadata(&log).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        let written = std::fs::read_to_string(&log).expect("the verifier's log");
        assert!(written.contains("R5 !read_ok"), "{written}");
        assert!(written.contains(&kernel_build()), "{written}");
        // Nothing else: no pins, no run directory entry but the log, no socket, no handler.
        let pins = Path::new("/sys/fs/bpf/parsrv");
        assert!(
            !pins.exists() || std::fs::read_dir(pins).unwrap().next().is_none(),
            "pins left: {:?}",
            std::fs::read_dir(pins).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        );
        let run_dir: Vec<_> = std::fs::read_dir(parsrv::run_dir::run_dir())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(run_dir, vec![log.clone()]);
        TcpListener::bind(addr()).expect("the address is free: no socket or handler left");

        // `parsrv kernel` refuses the same way, and reports the other programs as loaded.
        let (code, programs, stderr) = kernel_report(&[(OBJECT_ENV, &variant)]);
        assert_eq!(code, 1, "{stderr}");
        assert!(error_line(&stderr).starts_with(&expected), "{stderr}");
        let select = &programs[0];
        assert_eq!(select.program, Program::ReuseportSelect.name());
        assert!(
            select
                .not_loaded
                .as_deref()
                .is_some_and(|n| n.contains("R5 !read_ok")),
            "{select:?}"
        );
        assert_eq!(select.verified_insns, None);
        assert!(programs[1].not_loaded.is_none(), "{:?}", programs[1]);
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_clean_stop_logs_no_error() {
    privileged(Needs::program(), || {
        for (signal, name) in [
            (Signal::SIGINT, "test-sigint"),
            (Signal::SIGTERM, "test-sigterm"),
        ] {
            let spawner = group(name, HandlerKind::Http).handlers(2).start();
            // Steered by the program, so that the stop has a program to detach.
            for _ in 0..10 {
                let outcome = http_get(addr(), Duration::from_secs(3));
                assert_eq!(outcome, Outcome::Ok, "{}", spawner.log());
            }
            assert!(
                spawner
                    .status()
                    .sockets
                    .iter()
                    .map(|s| s.counters.selected)
                    .sum::<u64>()
                    >= 10
            );
            let log = spawner.log_path();
            let status = spawner.stop_with(signal);
            let written = std::fs::read_to_string(&log).unwrap();
            assert!(status.success(), "{signal}: {status}\n{written}");
            assert!(
                wait_for(Duration::from_secs(1), || written
                    .contains(&format!("group {name} stopped"))),
                "{signal}: no clean stop in the log:\n{written}"
            );
            let errors: Vec<&str> = written
                .lines()
                .filter(|l| l.contains(" ERROR: ") || l.contains(" WARN: "))
                .collect();
            assert!(errors.is_empty(), "{signal}: {errors:#?}\n{written}");
        }
    });
}
