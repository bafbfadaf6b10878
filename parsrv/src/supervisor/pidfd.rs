//! A handle on one process that pid reuse cannot fool (pidfd, Linux 5.3; taking a copy of
//! one of its fds, 5.6): how a spawner adopts the handlers of one that died or re-executed.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use tokio::io::unix::AsyncFd;

use crate::procfs::process_start_time;

/// An open pidfd of a process this spawner did not (or no longer knows it did) spawn.
pub struct PidFd {
    fd: AsyncFd<OwnedFd>,
    pid: u32,
}

impl PidFd {
    /// Opens `pid`, if it is the process that started at `start_time` (clock ticks after
    /// boot, /proc/PID/stat): a pid reused by an unrelated process is refused. Must run
    /// inside a tokio runtime.
    pub fn open(pid: u32, start_time: u64) -> io::Result<PidFd> {
        // SAFETY: plain syscall; the result is checked and owned below.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd from pidfd_open.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
        // Checked after opening: from now on the pidfd names this very process, so a match
        // now is a match for good.
        if process_start_time(pid) != Some(start_time) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("pid {pid} is another process now"),
            ));
        }
        Ok(PidFd {
            // SAFETY: the pidfd is owned by the AsyncFd for its whole life, never replaced.
            fd: unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)? },
            pid,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A copy of the process's fd `target` (as if passed over a unix socket).
    pub fn get_fd(&self, target: RawFd) -> io::Result<OwnedFd> {
        // SAFETY: plain syscall; the result is checked and owned below.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.fd.as_raw_fd(), target, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd from pidfd_getfd (close-on-exec).
        Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
    }

    /// Sends `signal` to this very process (ESRCH once it has exited).
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> io::Result<()> {
        // SAFETY: plain syscall with a null siginfo.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGKILLs the process and waits, at most `within`, until it has exited (reaped if it
    /// is this spawner's child): a process only dies once the signal is delivered, and what
    /// follows (a dynamic uid checked free, a slot's new handler) must not find it alive.
    /// Says whether it exited in time.
    pub fn kill_and_wait(&self, within: std::time::Duration) -> bool {
        if self.signal(nix::sys::signal::Signal::SIGKILL).is_err() {
            // ESRCH: exited already.
            let _ = self.reap();
            return true;
        }
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = within.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd. A pidfd polls readable once its process has exited.
        let ready = unsafe { libc::poll(&mut poll, 1, timeout) } == 1;
        let _ = self.reap();
        ready
    }

    /// Waits until the process has exited, and says how: reaped if it is this spawner's
    /// child (after a re-exec it is), otherwise its parent's to reap and its status
    /// unknown here.
    pub async fn exited(&self) -> String {
        loop {
            match self.fd.readable().await {
                Ok(mut guard) => {
                    if let Some(how) = self.reap() {
                        return how;
                    }
                    if !super::process::process_alive(self.pid) {
                        return "exited (not this spawner's child: its exit status is its parent's)"
                            .into();
                    }
                    guard.clear_ready();
                }
                Err(e) => return format!("could not be waited for ({e})"),
            }
        }
    }

    /// Reaps the process if it is a child of this one and has exited.
    fn reap(&self) -> Option<String> {
        // SAFETY: an all-zero siginfo_t is valid; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to `info`; P_PIDFD takes the pidfd as the id.
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.fd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        // SAFETY: waitid filled `info` (si_pid 0: nothing to reap yet).
        if rc != 0 || unsafe { info.si_pid() } == 0 {
            return None;
        }
        // SAFETY: as above.
        let status = unsafe { info.si_status() };
        Some(match info.si_code {
            libc::CLD_EXITED => format!("exited with code {status}"),
            _ => format!("was killed by signal {status}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pidfd_refuses_a_reused_pid_and_sees_the_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = process_start_time(pid).unwrap();
        let err = PidFd::open(pid, start + 1).err().expect("wrong start time");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let pidfd = PidFd::open(pid, start).unwrap();
        pidfd.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
        // A child of this process: reaped, with its status.
        assert_eq!(pidfd.exited().await, "was killed by signal 9");
        assert!(
            child.try_wait().is_err(),
            "already reaped through the pidfd"
        );
    }
}
