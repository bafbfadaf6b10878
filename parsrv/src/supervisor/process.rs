//! The handler as a process: how it is placed before exec (its fds, process group, CPU),
//! its output forwarded line by line, signals to it and to its process group, and whether
//! it is alive or stopped.
//!
//! A handler does not die with its spawner: it keeps serving its socket, and the next
//! spawner adopts it ([`super::pidfd`]).

use std::{
    io,
    os::fd::{OwnedFd, RawFd},
    process::ExitStatus,
};

use crate::{
    handler::{LISTEN_FD, OUTPUT_FD, STATS_FD},
    procfs::process_state,
};

pub(super) fn describe_exit(exit: io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match exit {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (_, Some(signal)) => format!("was killed by signal {signal}"),
            _ => format!("ended ({status})"),
        },
        Err(e) => format!("could not be waited for ({e})"),
    }
}

/// Signals handler `pid` and its process group; only while `pid` is a child not yet waited
/// for (afterwards the number may be another process's).
///
/// The process itself is signalled, not only the group: until the child's pre_exec step has
/// called setpgid there is no such group. A handler stopped (SIGSTOP) in that window and
/// then retired got neither SIGTERM, SIGCONT nor SIGKILL, and its retirement waited forever
/// (seen under emulation, where the window is wide, on Linux 6.1).
pub(super) fn kill_handler(pid: u32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
    kill_group(pid, signal);
}

/// Signals handler `pid`'s process group (each handler leads one; see place_handler).
pub(super) fn kill_group(pid: u32, signal: nix::sys::signal::Signal) {
    // ESRCH: the group is gone already.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), signal);
}

/// The pipe a handler's stdout and stderr go to: `(read end, write end)`, both
/// close-on-exec. Made as large as the system allows by default (1 MiB), for what a handler
/// writes while no spawner forwards it.
pub(super) fn output_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on an fd owned here; failure only leaves the default size.
    unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    Ok((read, write))
}

/// Copies what a handler writes (the read end of its [`output_pipe`]) to the spawner's
/// stderr, a line at a time, each prefixed with the handler's slot and pid. Ends when
/// every write end is closed (the handler and all it started are gone).
pub(super) fn forward_output(output: OwnedFd, slot: u32, pid: u32) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let stream = match tokio::net::unix::pipe::Receiver::from_owned_fd(output) {
        Ok(stream) => stream,
        Err(e) => {
            log::error!("handler {slot}[{pid}]: its output cannot be forwarded: {e}");
            return;
        }
    };
    tokio::task::spawn_local(async move {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            // Bounded: a handler printing without newlines cannot grow this forever.
            match (&mut reader)
                .take(MAX_LOG_LINE)
                .read_until(b'\n', &mut line)
                .await
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    eprintln!(
                        "{}handler {slot}[{pid}]: {}",
                        crate::output::log_prefix(std::process::id()),
                        text.trim_end_matches(['\n', '\r'])
                    );
                }
            }
        }
    });
}

/// Longest handler output line copied as one line.
const MAX_LOG_LINE: u64 = 16 * 1024;

/// Stopped (SIGSTOP) or traced: not accepting, but not misconfigured either.
pub(crate) fn process_stopped(pid: u32) -> bool {
    process_state(pid).is_some_and(|state| state == 'T' || state == 't')
}

/// In the forked child, before exec: put the handler's socket at fd 3, (built-in handlers)
/// its counters at fd 4 and the read end of its output pipe at fd 5, and close every other
/// fd beside stdio. Pin it to its CPU and give it a process group of its own, so that
/// Ctrl-C reaches only the spawner, which stops handlers in order, and so that the spawner
/// can signal a handler with whatever it started. Nothing ties its life to the spawner's:
/// it keeps serving if the spawner dies.
pub(super) fn place_handler(
    listener: RawFd,
    stats: Option<RawFd>,
    output: RawFd,
    cpus: Option<nix::sched::CpuSet>,
) -> io::Result<()> {
    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }
    crate::kernel::restore_fd_limit();
    // SAFETY: plain fd and process syscalls on values owned by this (forked) process.
    unsafe {
        // Copy the sources out of the way first: any may sit at 3, 4 or 5.
        let listener = check(libc::fcntl(listener, libc::F_DUPFD_CLOEXEC, 10))?;
        let stats = match stats {
            Some(fd) => Some(check(libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10))?),
            None => None,
        };
        let output = check(libc::fcntl(output, libc::F_DUPFD_CLOEXEC, 10))?;
        check(libc::dup2(listener, LISTEN_FD))?;
        libc::close(listener);
        match stats {
            Some(stats) => {
                check(libc::dup2(stats, STATS_FD))?;
                libc::close(stats);
            }
            None => {
                libc::close(STATS_FD);
            }
        }
        check(libc::dup2(output, OUTPUT_FD))?;
        libc::close(output);
        // Whatever parsrv itself inherited without close-on-exec must not reach the handler.
        let first_unused = OUTPUT_FD as u32 + 1;
        if libc::syscall(libc::SYS_close_range, first_unused, u32::MAX, 0) != 0 {
            // Kernels before 5.9: close them one by one.
            for fd in first_unused as RawFd..4096 {
                libc::close(fd);
            }
        }
        if let Some(cpus) = cpus {
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)?;
        }
        // A process group of its own (id = pid), in the spawner's session: a terminal's
        // Ctrl-C and hangup go to the foreground group, the spawner's, not to this one.
        // Not a session of its own: with sched_autogroup (Debian's and Ubuntu's default
        // where no CPU cgroup is set), every new session is a scheduling group of its own,
        // and N handlers would take N shares of the CPU against every other process, the
        // clients of a local benchmark included (`bench overhead`, N=16: parsrv against
        // plain SO_REUSEPORT workers was 0.84x with autogroups and 0.99x without, with
        // handlers in sessions of their own; 0.98x with autogroups since). The cost: when the
        // spawner dies while a handler is stopped (SIGSTOP, a debugger), the kernel sends
        // that orphaned group SIGHUP then SIGCONT. Built-in handlers ignore SIGHUP, from
        // here on (an ignored signal stays ignored across exec): a handler still starting
        // when stopped would otherwise die of it. Exec'd servers keep the default.
        check(libc::setpgid(0, 0))?;
        if stats.is_some() {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
        }
    }
    Ok(())
}

/// Running and not a zombie (a stopped process counts as alive: it still owns its slot).
pub(crate) fn process_alive(pid: u32) -> bool {
    process_state(pid).is_some_and(|state| state != 'Z' && state != 'X')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_alive_reads_proc() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped: a zombie is not alive.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!process_alive(pid));
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    #[test]
    fn describes_exits() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            describe_exit(Ok(ExitStatus::from_raw(3 << 8))),
            "exited with code 3"
        );
        assert_eq!(
            describe_exit(Ok(ExitStatus::from_raw(9))),
            "was killed by signal 9"
        );
    }
}
