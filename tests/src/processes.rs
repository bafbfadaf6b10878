//! Handler processes seen from outside: signals, process groups, their fds.

use std::{
    fs,
    io::{self},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use crate::*;

pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
        .unwrap_or_else(|e| panic!("kill({pid}, {signal}): {e}"));
}

/// Context switches of every thread of `pid` so far (voluntary and not): each one a wake-up
/// or a preemption. 0 for a process that is gone.
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Stops a process with SIGSTOP and waits until every one of its threads has stopped: kill()
/// returns before they do, and a thread already woken by a connection would still accept it.
pub fn stop_process(pid: u32) {
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let all_stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|task| {
                    std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                        stat.rsplit_once(')')
                            .and_then(|(_, rest)| rest.split_whitespace().next())
                            == Some("T")
                    })
                })
            })
            .unwrap_or(false)
    };
    assert!(
        wait_for(Duration::from_secs(5), all_stopped),
        "process {pid} did not stop"
    );
}

/// Processes whose process group is `pgid` (a handler and its children: parsrv puts each
/// handler in a group of its own).
pub fn group_members(pgid: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // After "comm)": state ppid pgrp ...
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse::<u32>().ok())
                    == Some(pgid)
            })
        })
        .collect()
}

/// Stops a handler and every process it started (its process group), and waits until all
/// their threads have stopped.
pub fn stop_handler_group(pgid: u32) {
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    for pid in group_members(pgid) {
        stop_process(pid);
    }
}

/// Resumes a handler group stopped with [`stop_handler_group`].
pub fn resume_handler_group(pgid: u32) {
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
}

/// A copy of file descriptor `fd` of process `pid` (pidfd_getfd; needs root).
pub fn fd_of_process(pid: u32, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: raw syscalls with plain integer arguments; results checked.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as RawFd);
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if copy < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(copy as RawFd))
    }
}

/// Whether `fd` is a listening socket.
pub fn is_listening(fd: &OwnedFd) -> bool {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && accepting == 1
}

/// IDs of loaded programs named like parsrv's.
pub fn loaded_parsrv_programs() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(parsrv_common::reuseport::names::PROGRAM))
        .map(|p| p.id())
        .collect()
}

/// Whether any process's command line mentions `needle` (to find handlers left behind).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .contains(needle)
            {
                pids.push(pid);
            }
        }
    }
    pids
}

/// IDs of network-namespace links (sk_lookup attachments) in this test's network namespace
/// whose program is parsrv's lookup program. Links of other namespaces are someone else's
/// (another test, a parsrv serving on this host): counted, they failed three `addresses`
/// tests while a parsrv ran in a namespace of its own beside the suite.
pub fn parsrv_lookup_links() -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    // The namespace of this thread: each test runs in namespaces of its own.
    let own = fs::metadata("/proc/thread-self/ns/net")
        .expect("reading this thread's network namespace")
        .ino();
    parsrv_lookup_links_anywhere()
        .into_iter()
        .filter(|&id| netns_of_link(id) == Some(own))
        .collect()
}

/// The inode of the network namespace netns link `id` is attached in, from the kernel's
/// `bpf_link_info` (aya's `LinkInfo` does not give it). None if the link is gone.
fn netns_of_link(id: u32) -> Option<u64> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    // union bpf_attr for BPF_LINK_GET_FD_BY_ID: link_id, next_id, open_flags.
    let mut by_id = [0u32; 3];
    by_id[0] = id;
    // SAFETY: the attr buffer is valid for its length; the kernel zero-checks the rest.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_GET_FD_BY_ID,
            by_id.as_mut_ptr(),
            std::mem::size_of_val(&by_id),
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this fd, owned by no one else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // struct bpf_link_info: type, id, prog_id, then (8-aligned, at byte 16) the union
    // whose netns member is { netns_ino, attach_type }. 64 bytes cover every member.
    let mut info = [0u32; 16];
    // union bpf_attr for BPF_OBJ_GET_INFO_BY_FD: bpf_fd, info_len, info (a u64 pointer).
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: attr points at a buffer of info_len bytes that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoByFd,
            std::mem::size_of::<InfoByFd>(),
        )
    };
    (rc == 0).then_some(u64::from(info[4]))
}

/// [`parsrv_lookup_links`] in every network namespace.
fn parsrv_lookup_links_anywhere() -> Vec<u32> {
    let ours: Vec<u32> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(parsrv_common::lookup::names::PROGRAM))
        .map(|p| p.id())
        .collect();
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter(|l| {
            matches!(l.link_type(), Ok(aya::programs::links::LinkType::Netns))
                && ours.contains(&l.program_id())
        })
        .map(|l| l.id())
        .collect()
}

/// The local addresses (what getsockname gives) of the established TCP connections process
/// `pid` holds open, read from its fds' socket inodes and its namespace's /proc/net/tcp{,6}.
pub fn established_local_addrs(pid: u32) -> Vec<std::net::SocketAddr> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|fd| fs::read_link(fd.path()).ok())
                .filter_map(|link| {
                    let link = link.to_string_lossy().into_owned();
                    Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (10th field); 01 is ESTABLISHED.
            if fields.len() < 10 || fields[3] != "01" || !inodes.iter().any(|i| i == fields[9]) {
                continue;
            }
            let Some((addr, port)) = fields[1].split_once(':') else {
                continue;
            };
            let port = u16::from_str_radix(port, 16).unwrap_or(0);
            // Each 32-bit word of the address (network order in memory) is printed as a
            // number of this host's byte order.
            let bytes: Vec<u8> = (0..addr.len() / 8)
                .filter_map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok())
                .flat_map(u32::to_ne_bytes)
                .collect();
            let ip = match <[u8; 4]>::try_from(bytes.as_slice()) {
                Ok(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
                Err(_) => match <[u8; 16]>::try_from(bytes.as_slice()) {
                    Ok(v6) => IpAddr::V6(Ipv6Addr::from(v6)),
                    Err(_) => continue,
                },
            };
            found.push(SocketAddr::new(ip, port));
        }
    }
    found
}

/// (runs, run time in ns) of the loaded programs named `name`, summed (the figures count
/// while kernel.bpf_stats_enabled is 1).
pub fn program_runs(name: &str) -> (u64, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(name))
        .fold((0, 0), |(runs, ns), p| {
            (runs + p.run_count(), ns + p.run_time().as_nanos() as u64)
        })
}

/// Running, not a zombie waiting for whichever process it was reparented to.
pub fn alive(pid: u32) -> bool {
    parsrv::supervisor::process_state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

/// Kills `spawner` with SIGKILL and waits until it is gone (its handlers are not).
pub fn kill_spawner(spawner: &crate::Spawner) {
    signal(spawner.pid(), nix::sys::signal::Signal::SIGKILL);
    assert!(
        wait_for(Duration::from_secs(5), || !alive(spawner.pid())),
        "spawner {} outlived SIGKILL",
        spawner.pid()
    );
}

/// Whether fd 3 of `pid` (a handler's socket, as parsrv hands it) has O_NONBLOCK, by the
/// kernel's fdinfo: the mode of the open file the handler shares with its spawner.
pub fn socket_is_nonblocking(pid: u32) -> bool {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/3"))
        .unwrap_or_else(|e| panic!("fdinfo of fd 3 of {pid}: {e}"));
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .unwrap_or_else(|| panic!("no flags in fdinfo of fd 3 of {pid}: {info}"));
    flags & libc::O_NONBLOCK as u32 != 0
}
