//! What a handler may not do with the socket parsrv hands it.
//!
//! A handler runs code parsrv does not control, and it holds one of the group's listening
//! sockets (fd 3). Any holder of a socket of a reuseport group may, unprivileged, detach the
//! group's program (`SO_DETACH_REUSEPORT_BPF`) or replace it (`SO_ATTACH_REUSEPORT_CBPF`,
//! `_EBPF`): the program belongs to the whole group, so one handler would take steering,
//! migration and affinity away from every slot. And `SO_INCOMING_CPU` on a listener is the
//! spawner's "no handler" mark, which the program reads. So, before the handler's own code
//! runs, a seccomp filter makes `setsockopt(SOL_SOCKET, ...)` with these four options fail
//! with EPERM, on any socket (seccomp sees numbers, not which socket; no server needs them
//! on a socket it was handed). It comes with no_new_privs, which the kernel requires for an
//! unprivileged filter and which keeps an exec'd set-uid program from gaining privileges.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// The socket options (level SOL_SOCKET) a handler may not set.
pub const REFUSED_SOCKET_OPTIONS: [(libc::c_int, &str); 4] = [
    (libc::SO_ATTACH_REUSEPORT_CBPF, "SO_ATTACH_REUSEPORT_CBPF"),
    (libc::SO_ATTACH_REUSEPORT_EBPF, "SO_ATTACH_REUSEPORT_EBPF"),
    (libc::SO_DETACH_REUSEPORT_BPF, "SO_DETACH_REUSEPORT_BPF"),
    (libc::SO_INCOMING_CPU, "SO_INCOMING_CPU"),
];

/// The filter, compiled (it allocates: done before anything else of the handler runs).
pub fn filter() -> anyhow::Result<BpfProgram> {
    let condition = |arg, value: libc::c_int| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value as u64)
    };
    let rules = REFUSED_SOCKET_OPTIONS
        .iter()
        .map(|&(option, _)| {
            SeccompRule::new(vec![condition(1, libc::SOL_SOCKET)?, condition(2, option)?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    let filter = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_setsockopt, rules)]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH.try_into()?,
    )?;
    Ok(filter.try_into()?)
}

/// Sets no_new_privs and installs `program` ([`filter`]) on every thread of this process,
/// for good (an exec'd program inherits both). Allocates nothing.
pub fn contain(program: &BpfProgram) -> anyhow::Result<()> {
    seccompiler::apply_filter_all_threads(program)
        .map_err(|e| anyhow::anyhow!("installing the handler's seccomp filter: {e}"))
}

/// Empties the capability bounding set, so that nothing this process execs can get a
/// capability back (a set-uid-root program included). Needs CAP_SETPCAP: call it while
/// still root, before dropping to the handler's user.
pub fn drop_bounding_set() -> anyhow::Result<()> {
    let last = crate::procfs::last_capability()?;
    for capability in 0..=libc::c_ulong::from(last) {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0) } != 0 {
            return Err(anyhow::anyhow!(
                "dropping capability {capability} from the bounding set: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_for_this_architecture() {
        let program = filter().unwrap();
        // Four rules of two comparisons each, plus the architecture check and the actions.
        assert!(program.len() > 8, "{} instructions", program.len());
    }

    /// In a child process (the filter is for good): the refused options fail with EPERM,
    /// another socket option still works.
    #[test]
    fn a_contained_process_cannot_touch_the_groups_program_or_mark() {
        use std::os::fd::AsRawFd;
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = socket.as_raw_fd();
        // Compiled before fork: the child of a threaded process must not allocate.
        let program = filter().unwrap();
        // SAFETY: the child only makes system calls and exits.
        match unsafe { libc::fork() } {
            0 => {
                let code = (|| {
                    contain(&program).ok()?;
                    let set = |option| {
                        let value: libc::c_int = 0;
                        // SAFETY: a valid int for its size.
                        let rc = unsafe {
                            libc::setsockopt(
                                fd,
                                libc::SOL_SOCKET,
                                option,
                                (&value as *const libc::c_int).cast(),
                                std::mem::size_of::<libc::c_int>() as u32,
                            )
                        };
                        (rc == 0, std::io::Error::last_os_error().raw_os_error())
                    };
                    for (option, _) in REFUSED_SOCKET_OPTIONS {
                        if set(option) != (false, Some(libc::EPERM)) {
                            return Some(2);
                        }
                    }
                    // An option servers set every day still works.
                    (set(libc::SO_KEEPALIVE).0).then_some(0)
                })()
                .unwrap_or(1);
                // SAFETY: ends the child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            child => {
                let mut status = 0;
                // SAFETY: waits for our own child.
                unsafe { libc::waitpid(child, &mut status, 0) };
                assert!(libc::WIFEXITED(status));
                assert_eq!(
                    libc::WEXITSTATUS(status),
                    0,
                    "1: no filter, 2: an option passed"
                );
            }
        }
        // Control: this process has no filter, and the kernel lets a socket's holder set it.
        let value: libc::c_int = 0;
        // SAFETY: a valid int for its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_INCOMING_CPU,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }
}
