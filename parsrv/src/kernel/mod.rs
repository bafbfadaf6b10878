//! What parsrv asks of the running kernel: capabilities, bpffs, limits and its build; the
//! kernel's struct offsets from BTF ([`btf`]) and what it says of a socket ([`sockets`]).

mod btf;
mod sockets;

use std::{ffi::CString, io, mem, path::Path};

pub use self::{btf::*, sockets::*};
use crate::{
    error::{Error, Result},
    procfs::effective_capabilities,
};

// Linux capability numbers (include/uapi/linux/capability.h).
const CAP_CHOWN: u32 = 0;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_KILL: u32 = 5;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
pub(crate) const CAP_BPF: u32 = 39;

fn has_capability(caps: u64, cap: u32) -> bool {
    caps & (1 << cap) != 0
}

/// What loading and attaching the programs needs: a name, and the capabilities any one of
/// which serves.
const FOR_THE_PROGRAMS: &[(&str, &[u32])] = &[
    // Loading.
    ("CAP_BPF", &[CAP_BPF]),
    // bpf_probe_read_kernel and the pointer reads in the programs.
    ("CAP_PERFMON", &[CAP_PERFMON]),
    // A group's socket maps (SOCKMAP) and the cluster's tc program. Newer kernels also take
    // CAP_SYS_ADMIN for them (bpf_net_capable()), but 6.1's sock_map_alloc asks for
    // CAP_NET_ADMIN alone: without it the map's creation failed with EPERM after the program
    // had been checked (docs/operations.md, "Capabilities").
    ("CAP_NET_ADMIN", &[CAP_NET_ADMIN]),
];

/// Fails with the list of missing capabilities unless this process may load and attach the
/// programs ([`FOR_THE_PROGRAMS`]).
pub fn check_capabilities() -> Result<()> {
    let caps = effective_capabilities().map_err(Error::io("reading /proc/self/status"))?;
    let missing = missing_capabilities(caps, FOR_THE_PROGRAMS);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingCapabilities {
            missing: missing.join(" and "),
        })
    }
}

/// The names of `needed` none of whose capabilities is in `caps`.
fn missing_capabilities(caps: u64, needed: &[(&'static str, &[u32])]) -> Vec<&'static str> {
    needed
        .iter()
        .filter(|(_, any_of)| !any_of.iter().any(|&cap| has_capability(caps, cap)))
        .map(|(name, _)| *name)
        .collect()
}

/// What a spawner needs to run handlers as another user (`--user`), beyond the program's
/// capabilities, each found missing by running under a bounding set without it
/// (docs/operations.md, "Capabilities"): a name, and the capabilities any one of which
/// serves. Without one, handlers failed to start, a stop waited for ever (no signal reached
/// them) or an upgrade killed what it could not adopt.
const FOR_HANDLERS_OF_ANOTHER_USER: &[(&str, &[u32])] = &[
    ("CAP_SETUID", &[CAP_SETUID]),
    ("CAP_SETGID", &[CAP_SETGID]),
    // Emptying the handlers' bounding set.
    ("CAP_SETPCAP", &[CAP_SETPCAP]),
    // Giving them their counters page and notify socket.
    ("CAP_CHOWN", &[CAP_CHOWN]),
    // Stopping them.
    ("CAP_KILL", &[CAP_KILL]),
    // Adopting them: their fds (pidfd_getfd) and /proc/PID/environ (mode 0400, theirs).
    ("CAP_SYS_PTRACE", &[CAP_SYS_PTRACE]),
    (
        "CAP_DAC_READ_SEARCH",
        &[CAP_DAC_READ_SEARCH, CAP_DAC_OVERRIDE],
    ),
];

/// Fails naming what is missing if a group runs its handlers as another user and this
/// process lacks a capability that takes: checked before anything is created, rather than
/// found out when a handler will not start or stop.
pub fn check_capabilities_for(groups: &[crate::spec::GroupSpec]) -> Result<()> {
    let Some(group) = groups.iter().find(|g| g.user.is_some()) else {
        return Ok(());
    };
    let caps = effective_capabilities().map_err(Error::io("reading /proc/self/status"))?;
    let missing = missing_capabilities(caps, FOR_HANDLERS_OF_ANOTHER_USER);
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::MissingHandlerCapabilities {
        group: group.name.clone(),
        missing: missing.join(", "),
    })
}

/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Makes sure bpffs is mounted at `path`, mounting it if it is not.
pub fn ensure_bpffs(path: &Path) -> Result<()> {
    if is_bpffs(path) {
        return Ok(());
    }
    let no_bpffs = |source| Error::NoBpffs {
        path: path.to_owned(),
        source,
    };
    if !has_capability(effective_capabilities().unwrap_or(0), CAP_SYS_ADMIN) {
        return Err(no_bpffs(io::Error::from_raw_os_error(libc::EPERM)));
    }
    std::fs::create_dir_all(path).map_err(no_bpffs)?;
    // As systemd mounts it: only root may look in (bpffs defaults to 1777, where a local
    // user could plant a directory parsrv then trusts).
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|e| no_bpffs(e.into()))?;
    log::info!("mounted bpffs at {}", path.display());
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut stat: libc::statfs = unsafe { mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a statfs buffer of the right type.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

/// Why root should not trust what is at a path with these metadata (owned by another
/// user, or writable by group or others), if it should not. As OpenSSH's StrictModes: the
/// owner must be root or the user parsrv runs as (root, but for unit tests and `parsrv
/// check` run by a user).
pub fn untrusted_because(meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if meta.uid() != 0 && meta.uid() != nix::unistd::geteuid().as_raw() {
        Some(format!("owned by uid {}", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "writable by others (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    }
}

/// The soft limit on open files parsrv started with (0: not raised), which handlers get back.
static STARTED_FD_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Raises this process's soft limit on open files to its hard limit, as daemons that hold
/// many sockets do (the hard limit is the administrator's: `LimitNOFILE=` in the unit). A
/// spawner holds every slot's socket, pidfd, pipes and the admin endpoint's connections;
/// with the usual soft limit of 1,024 a busy endpoint alone could exhaust it. Handlers get
/// the old soft limit back ([`restore_fd_limit`]): some servers still use select().
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max
        {
            return;
        }
        let started = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            STARTED_FD_LIMIT.store(started, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Puts back the soft limit parsrv started with. Async-signal-safe: for a forked handler.
pub fn restore_fd_limit() {
    let started = STARTED_FD_LIMIT.load(std::sync::atomic::Ordering::Relaxed);
    if started == 0 {
        return;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = started;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The running kernel's release and build (`uname -r` and `uname -v`): two builds of one
/// release can verify the same program differently.
pub fn kernel_build() -> String {
    nix::sys::utsname::uname()
        .map(|u| {
            format!(
                "{} ({})",
                u.release().to_string_lossy(),
                u.version().to_string_lossy()
            )
        })
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_bits() {
        let caps = (1u64 << CAP_BPF) | (1 << CAP_SYS_ADMIN);
        assert!(has_capability(caps, CAP_BPF));
        assert!(!has_capability(caps, CAP_PERFMON));
    }

    #[test]
    fn the_programs_need_net_admin_for_their_socket_maps_even_with_sys_admin() {
        let loader = (1u64 << CAP_BPF) | (1 << CAP_PERFMON);
        assert_eq!(
            missing_capabilities(loader | (1 << CAP_SYS_ADMIN), FOR_THE_PROGRAMS),
            ["CAP_NET_ADMIN"]
        );
        assert!(missing_capabilities(loader | (1 << CAP_NET_ADMIN), FOR_THE_PROGRAMS).is_empty());
        assert_eq!(
            missing_capabilities(1 << CAP_NET_ADMIN, FOR_THE_PROGRAMS),
            ["CAP_BPF", "CAP_PERFMON"]
        );
    }
}
