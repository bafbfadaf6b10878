//! What the kernel's verifier spends on each program, and what a refusal tells the user.
//!
//! The verifier walks every path of a program and gives up after [`VERIFIER_LIMIT`]
//! instructions processed. How close a program comes depends on the kernel build and on the
//! code the compiler emits, so parsrv keeps every program under [`MARGIN_BUDGET`] (a tenfold
//! margin), and measures it: `parsrv kernel` loads each program and reports the figure,
//! `parsrv run` checks the programs its groups need before it creates anything, and the
//! status of a group carries its program's figure. The rules that keep the figure low are in
//! parsrv-ebpf's crate docs ("Verification cost").
//!
//! A refusal is one line ([`Error::VerifierRefused`]) naming the program, the figure, the
//! verifier's own reason, the kernel build and the eBPF toolchain; the whole log goes to a
//! file in the run directory, named in that line.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use aya::{
    programs::{Program as AyaProgram, ProgramError},
    Ebpf,
};
use serde::{Deserialize, Serialize};

use super::{loader::MapSizes, object, Program};
use crate::{
    build_info,
    error::{Error, Result, VerifierRefusal},
    kernel::kernel_build,
};

/// The kernel's budget of instructions processed per program load
/// (BPF_COMPLEXITY_LIMIT_INSNS, for programs loaded with CAP_BPF or CAP_SYS_ADMIN).
pub const VERIFIER_LIMIT: u32 = 1_000_000;

/// What parsrv keeps each program under: a tenth of [`VERIFIER_LIMIT`]. The tests fail above
/// it, on every kernel they run on.
pub const MARGIN_BUDGET: u32 = VERIFIER_LIMIT / 10;

/// A figure for people: "18,435 insns processed of 1,000,000 (1.8%)", or what a kernel
/// without `verified_insns` (before 5.16) allows to say.
pub fn describe(verified_insns: Option<u32>) -> String {
    match verified_insns {
        Some(insns) => format!(
            "{} insns processed of {} ({:.1}%)",
            thousands(insns),
            thousands(VERIFIER_LIMIT),
            insns as f64 * 100.0 / VERIFIER_LIMIT as f64
        ),
        None => "loaded (this kernel does not report verified_insns: Linux 5.16+)".into(),
    }
}

/// Loads `program` from its object, as `parsrv run` would but attaching and pinning nothing,
/// reads what the verifier spent (`bpf_prog_info.verified_insns`; None before Linux 5.16),
/// and unloads it. A refusal is [`Error::VerifierRefused`].
pub fn measure(program: Program) -> Result<Option<u32>> {
    if program == Program::ReuseportAudit {
        return super::audit::Audit::load()?.verified_insns();
    }
    Ok(load_measured(program, MapSizes::default())?.1)
}

/// Loads `program` from its object with maps at `sizes`: the object, its program loaded, and
/// what the verifier spent on it.
fn load_measured(program: Program, sizes: MapSizes) -> Result<(Ebpf, Option<u32>)> {
    let bytes = object(program.object())?;
    let mut ebpf = super::loader::load_fresh(&bytes, sizes)
        .map_err(Error::ebpf("loading the parsrv eBPF object"))?;
    let not_ours = || {
        Error::ebpf("the eBPF object is not this parsrv's")(anyhow::anyhow!(
            "it has no {} of the right type: rebuild it with `cargo xtask build`",
            program.name()
        ))
    };
    let loaded = match ebpf.program_mut(program.name()) {
        Some(AyaProgram::SkReuseport(p)) => p.load(),
        Some(AyaProgram::SkLookup(p)) => p.load(),
        Some(AyaProgram::SchedClassifier(p)) => p.load(),
        _ => return Err(not_ours()),
    };
    loaded.map_err(|e| refusal(program, e))?;
    let info = ebpf
        .program(program.name())
        .ok_or_else(not_ours)?
        .info()
        .map_err(Error::ebpf(format!("reading {}'s info", program.name())))?;
    let verified_insns = info.verified_instruction_count().filter(|&n| n > 0);
    Ok((ebpf, verified_insns))
}

/// Turns a failed load of `program` into the error a user reads: the verifier's refusal on
/// one line, its whole log in a file; other failures (EPERM) as they were.
pub fn refusal(program: Program, error: ProgramError) -> Error {
    let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = &error
    else {
        return Error::ebpf(format!("loading {}", program.name()))(error);
    };
    if io_error.raw_os_error() == Some(libc::EPERM) {
        return Error::MissingCapabilities {
            missing: "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (the kernel said EPERM)".into(),
        };
    }
    let bytes = object(program.object()).unwrap_or_default();
    let bytes = bytes.as_ref();
    let log = verifier_log.to_string();
    let path = log_path(program);
    let saved = save_log(&path, program, io_error, &log, bytes);
    let summary = Refusal::of(&log);
    Error::VerifierRefused(Box::new(VerifierRefusal {
        program: program.name(),
        processed: summary.processed.map_or_else(
            || "no count in the log".into(),
            |n| format!("{} insns processed", thousands(n)),
        ),
        limit: thousands(VERIFIER_LIMIT),
        reason: summary.reason.unwrap_or_else(|| io_error.to_string()),
        kernel: kernel_build(),
        toolchain: object_identity(bytes),
        log: match saved {
            Ok(()) => path.display().to_string(),
            Err(e) => format!("not written to {} ({e})", path.display()),
        },
    }))
}

/// The verifier's refusal of a program, as one line: [`Error::VerifierRefused`].
/// Where the verifier's log of a refused `program` goes: the run directory, which only root
/// writes.
pub fn log_path(program: Program) -> PathBuf {
    crate::run_dir::run_dir().join(format!("verifier-{}.log", program.name()))
}

/// Writes the log beside `path` and renames it there, so that a reader sees a whole file
/// and a link planted at `path` is replaced, not followed.
fn save_log(
    path: &Path,
    program: Program,
    io_error: &std::io::Error,
    log: &str,
    bytes: &[u8],
) -> std::io::Result<()> {
    let dir = path.parent().expect("a file in the run directory");
    std::fs::create_dir_all(dir)?;
    let staging = dir.join(format!(
        ".verifier-{}.{}",
        program.name(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staging);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)
        .and_then(|mut file| {
            writeln!(
                file,
                "# the kernel's verifier refused {} ({io_error})\n# kernel {}\n# eBPF {}\n",
                program.name(),
                kernel_build(),
                object_identity(bytes)
            )?;
            file.write_all(log.as_bytes())
        });
    written
        .and_then(|()| std::fs::rename(&staging, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&staging);
        })
}

/// What a verifier log says in short.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refusal {
    /// From its last line, "processed N insns (limit ...)".
    pub processed: Option<u32>,
    /// The verifier's own reason: the last line before its closing statistics.
    pub reason: Option<String>,
}

impl Refusal {
    pub fn of(log: &str) -> Refusal {
        let processed = log.lines().rev().find_map(|line| {
            line.strip_prefix("processed ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        });
        // The statistics the verifier prints after its verdict, whatever the verdict.
        let statistics = |line: &str| {
            line.is_empty()
                || line.starts_with("processed ")
                || line.starts_with("verification time ")
                || line.starts_with("stack depth ")
                || line.starts_with("-- END PROG LOAD LOG --")
        };
        let reason = log
            .lines()
            .map(str::trim)
            .rev()
            .find(|line| !statistics(line))
            .map(str::to_owned);
        Refusal { processed, reason }
    }
}

/// The eBPF object as a user can name it: its hash, and the toolchain that built it (the
/// embedded object's) or the file it came from.
pub fn object_identity(bytes: &[u8]) -> String {
    let hash = build_info::short_sha256(bytes);
    match std::env::var_os(super::OBJECT_ENV) {
        Some(path) => format!(
            "object {} (sha256 {hash}, from {})",
            Path::new(&path).display(),
            super::OBJECT_ENV
        ),
        None => format!(
            "object sha256 {hash}, built with {}",
            build_info::EBPF_TOOLCHAIN
        ),
    }
}

/// Loads each of `programs` once, before a command creates anything, so that a refusal
/// leaves nothing behind; logs what each cost (debug: `parsrv status` and `parsrv kernel`
/// show it, and a refused start stays one line).
pub fn check(programs: &[Program]) -> Result<()> {
    for &program in programs {
        let verified_insns = measure(program)?;
        log::debug!("verifier: {} {}", program.name(), describe(verified_insns));
    }
    Ok(())
}

/// [`check`] for a spawner's groups ([`super::verification_loads`]): a program with sizes is
/// loaded at them and kept for the group load that asks for it
/// ([`super::loader::keep_verified`]), so the verifier walks each program once per group
/// instead of once more for the check.
pub fn check_and_keep(loads: &[(Program, Option<MapSizes>)]) -> Result<()> {
    for &(program, sizes) in loads {
        let (ebpf, verified_insns) = match sizes {
            Some(sizes) => {
                let (ebpf, verified_insns) = load_measured(program, sizes)?;
                (Some(ebpf), verified_insns)
            }
            None => (None, measure(program)?),
        };
        log::debug!("verifier: {} {}", program.name(), describe(verified_insns));
        if let (Some(ebpf), Some(sizes)) = (ebpf, sizes) {
            super::loader::keep_verified(&object(program.object())?, sizes, ebpf);
        }
    }
    Ok(())
}

/// One program in `parsrv kernel`'s report: its cost here, or why it was not loaded.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgramReport {
    pub program: String,
    /// What the verifier spent; None when the program was not loaded (see `not_loaded`) or
    /// the kernel does not report it.
    pub verified_insns: Option<u32>,
    pub limit: u32,
    /// [`MARGIN_BUDGET`]: what parsrv's tests keep every program under.
    pub budget: u32,
    /// Why it was not loaded: a missing kernel feature or capability, or the verifier's
    /// refusal (its one line).
    pub not_loaded: Option<String>,
}

impl ProgramReport {
    /// Its figure for people, or why it was not loaded.
    pub fn describe(&self) -> String {
        match &self.not_loaded {
            Some(why) => format!("not loaded: {why}"),
            None => describe(self.verified_insns),
        }
    }
}

/// Loads every program the running kernel can run (with the capabilities to) and reports
/// what each cost; the first refusal comes back as well, for the exit status. `runs_here`
/// says why a program cannot run on this kernel (a missing feature), if it cannot.
pub fn report(runs_here: impl Fn(Program) -> Result<()>) -> (Vec<ProgramReport>, Option<Error>) {
    let mut refused = None;
    let reports = Program::ALL
        .iter()
        .map(|&program| {
            // Its kernel features, then the capabilities to load it, then the load.
            let measured = runs_here(program)
                .and_then(|()| crate::kernel::check_capabilities())
                .and_then(|()| measure(program));
            let (verified_insns, not_loaded) = match measured {
                Ok(verified_insns) => (verified_insns, None),
                Err(e) => {
                    let line = e.to_string();
                    if matches!(e, Error::VerifierRefused(_)) && refused.is_none() {
                        refused = Some(e);
                    }
                    (None, Some(line))
                }
            };
            ProgramReport {
                program: program.name().into(),
                verified_insns,
                limit: VERIFIER_LIMIT,
                budget: MARGIN_BUDGET,
                not_loaded,
            }
        })
        .collect();
    (reports, refused)
}

/// 1234567 as "1,234,567".
pub fn thousands(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end of the refusal a fresh machine met (6.18.44-fc-v1252, the landed program).
    const TOO_LARGE: &str = "\
2962: (6d) if r9 s> r5 goto pc-40     ; frame1: R5=scalar(id=114126)
; scan.most_free = candidate; @ queue.rs:234
2963: (7b) *(u64 *)(r6 +144) = r2
BPF program is too large. Processed 1000001 insn
verification time 7057441 usec
stack depth 328+0+24+24+0
processed 1000001 insns (limit 1000000) max_states_per_insn 37 total_states 31773 peak_states 61250 mark_read 0
";

    #[test]
    fn a_refusal_is_summed_up_by_its_count_and_the_verifiers_reason() {
        assert_eq!(
            Refusal::of(TOO_LARGE),
            Refusal {
                processed: Some(1_000_001),
                reason: Some("BPF program is too large. Processed 1000001 insn".into()),
            }
        );
        let invalid = "0: R1=ctx() R10=fp0\n0: (79) r0 = *(u64 *)(r10 -8)\ninvalid read from stack off -8+0 size 8\nprocessed 1 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0\n";
        assert_eq!(
            Refusal::of(invalid),
            Refusal {
                processed: Some(1),
                reason: Some("invalid read from stack off -8+0 size 8".into()),
            }
        );
        assert_eq!(Refusal::of(""), Refusal::default());
    }

    #[test]
    fn figures_read_with_thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(18_353), "18,353");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(
            describe(Some(18_353)),
            "18,353 insns processed of 1,000,000 (1.8%)"
        );
        let refused = ProgramReport {
            program: "parsrv_select".into(),
            verified_insns: None,
            limit: VERIFIER_LIMIT,
            budget: MARGIN_BUDGET,
            not_loaded: Some("the kernel's verifier refused parsrv_select".into()),
        };
        assert_eq!(
            refused.describe(),
            "not loaded: the kernel's verifier refused parsrv_select"
        );
    }
}
