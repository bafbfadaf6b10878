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
