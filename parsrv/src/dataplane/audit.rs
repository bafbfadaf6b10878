//! The audit iterator's userspace (eBPF side: `parsrv-ebpf/src/bin/reuseport_audit.rs`,
//! shared types: `parsrv_common::audit`): which program the reuseport group of each socket
//! runs, read from the kernel.
//!
//! Any process holding one of a group's sockets can replace or detach the group's program
//! without privilege. Handlers cannot (their seccomp filter refuses the socket options), but a
//! process that took a handler's fd 3 outside the filter can. The watchdog reads the groups'
//! programs with this iterator every few seconds and attaches its own again where a socket's
//! group runs another or none (`spawner::watchdog`).
//!
//! One program per process, loaded on first use (the spawner's start does not wait for it):
//! each [`Audit::programs`] attaches it once more to get a fresh iterator (a link is cheap,
//! the verification was done once), reads it to the end or until every socket asked about
//! was seen, and closes it.

use std::{
    collections::HashMap,
    io::{BufReader, ErrorKind, Read},
    sync::{Mutex, OnceLock},
};

use aya::{programs::Iter, Ebpf};
use parsrv_common::audit::{names, AuditOffsets, AuditRecord};

use super::{object, verification, EbpfObject, Program};
use crate::error::{Error, Result};

/// `PARSRV_AUDIT=off` in the spawner's environment turns the audit off: the watchdog then
/// leaves a detached or replaced program as it is. For measuring the program alone (the
/// benchmarks detach it on purpose), not for production.
pub const AUDIT_ENV: &str = "PARSRV_AUDIT";

/// Whether the spawner's environment turns the audit off ([`AUDIT_ENV`]).
pub fn turned_off() -> bool {
    std::env::var_os(AUDIT_ENV).is_some_and(|v| v == "off")
}

/// This process's audit program, or why it could not be loaded.
static SHARED: OnceLock<std::result::Result<Mutex<Audit>, String>> = OnceLock::new();

/// The loaded iterator program.
pub struct Audit {
    ebpf: Ebpf,
}

impl Audit {
    /// This process's audit program, loaded on the first call (a failure is kept: the same
    /// kernel refuses the same program again).
    pub fn shared() -> std::result::Result<&'static Mutex<Audit>, &'static str> {
        SHARED
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let audit = Audit::load().map(Mutex::new).map_err(|e| e.to_string());
                if audit.is_ok() {
                    log::info!(
                        "the audit iterator is loaded ({} ms): the watchdog checks which \
                         program each group's sockets run",
                        started.elapsed().as_millis()
                    );
                }
                audit
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// This process's audit program if [`Audit::shared`] has loaded it (or failed to): never
    /// blocks.
    pub fn loaded() -> Option<std::result::Result<&'static Mutex<Audit>, &'static str>> {
        SHARED.get().map(|r| r.as_ref().map_err(String::as_str))
    }

    /// Loads the program with the running kernel's offsets. Its verification cost is what
    /// `parsrv kernel` and the verifier test report for [`Program::ReuseportAudit`].
    pub fn load() -> Result<Self> {
        let bytes = object(EbpfObject::ReuseportAudit)?;
        let offsets = offsets()?;
        let mut ebpf = super::loader::load_with_global(
            &bytes,
            Default::default(),
            names::OFFSETS,
            bytemuck::bytes_of(offsets),
        )
        .map_err(Error::ebpf("loading the audit iterator's object"))?;
        let btf = aya::Btf::from_sys_fs().map_err(Error::ebpf("reading the kernel's BTF"))?;
        let program: &mut Iter = ebpf
            .program_mut(names::PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| {
                Error::ebpf("the audit object is not this parsrv's")(anyhow::anyhow!(
                    "it has no {}: rebuild it with `cargo xtask build`",
                    names::PROGRAM
                ))
            })?;
        program
            .load(names::ITERATOR, &btf)
            .map_err(|e| verification::refusal(Program::ReuseportAudit, e))?;
        Ok(Audit { ebpf })
    }

    /// What the verifier spent on it (None before Linux 5.16).
    pub fn verified_insns(&self) -> Result<Option<u32>> {
        let info = self
            .program()
            .info()
            .map_err(Error::ebpf("reading the audit iterator's info"))?;
        Ok(info.verified_instruction_count().filter(|&n| n > 0))
    }

    fn program(&self) -> &Iter {
        self.ebpf
            .program(names::PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Audit::load")
    }

    /// The id of the program the group of each socket in `cookies` runs (0: none or a classic
    /// BPF one; [`parsrv_common::audit::UNREADABLE`]: a read failed), for the sockets of this
    /// process's network namespace the walk met. It stops once it has seen them all: the
    /// kernel walks listeners before established sockets, so a busy host's connections are
    /// not walked.
    pub fn programs(&mut self, cookies: &[u64]) -> Result<HashMap<u64, u32>> {
        let program: &mut Iter = self
            .ebpf
            .program_mut(names::PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Audit::load");
        let failed = |what: &str| format!("{what} the audit iterator");
        let link = program.attach().map_err(Error::ebpf(failed("attaching")))?;
        let file = program
            .take_link(link)
            .map_err(Error::ebpf(failed("taking the link of")))?
            .into_file()
            .map_err(Error::ebpf(failed("opening")))?;
        let mut reader = BufReader::with_capacity(256 * std::mem::size_of::<AuditRecord>(), file);
        let mut found = HashMap::new();
        let mut record = AuditRecord::default();
        while found.len() < cookies.len() {
            match reader.read_exact(bytemuck::bytes_of_mut(&mut record)) {
                Ok(()) if cookies.contains(&record.cookie) => {
                    found.insert(record.cookie, record.program_id);
                }
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(Error::io("reading the audit iterator")(e)),
            }
        }
        Ok(found)
    }
}

/// The offsets the iterator reads at, once per process.
static OFFSETS: OnceLock<std::result::Result<AuditOffsets, String>> = OnceLock::new();

/// Takes the iterator's offsets from `btf`, which the spawner parses at its start anyway: the
/// watchdog's first check then does not parse it again (a second or more under emulation).
pub fn remember_offsets(btf: &crate::kernel::KernelBtf) {
    let _ = OFFSETS.set(offsets_in(btf).map_err(|e| e.to_string()));
}

/// The offsets: those remembered, or read from the running kernel's BTF now.
fn offsets() -> Result<&'static AuditOffsets> {
    OFFSETS
        .get_or_init(|| {
            crate::kernel::vmlinux_btf()
                .and_then(|btf| offsets_in(&btf))
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::ebpf("reading the audit iterator's offsets")(anyhow::anyhow!("{e}")))
}

/// The offsets the iterator reads at, from the running kernel's BTF.
fn offsets_in(btf: &crate::kernel::KernelBtf) -> Result<AuditOffsets> {
    let queue = crate::kernel::offsets_in(btf)?;
    Ok(AuditOffsets {
        sk_reuseport_cb: queue.sk_reuseport_cb,
        skc_cookie: queue.skc_cookie,
        reuseport_prog: crate::kernel::layout(btf, "sock_reuseport", &["prog"], 8)?,
        prog_aux: crate::kernel::layout(btf, "bpf_prog", &["aux"], 8)?,
        aux_id: crate::kernel::layout(btf, "bpf_prog_aux", &["id"], 4)?,
    })
}
