//! The handler side of socket activation: how a program started by `parsrv run --handler
//! exec -- CMD` (or by systemd) takes the socket it was given.
//!
//! The protocol is systemd's (sd_listen_fds(3)): the sockets are fds 3, 4, ...;
//! `LISTEN_FDS` says how many, `LISTEN_PID` names the process they are meant for (so a
//! child that inherited the environment does not take them too), `LISTEN_FDNAMES` names
//! them (parsrv: the group name). The functions here validate all three, mark the fds
//! close-on-exec, and clear the variables.
//!
//! ```no_run
//! // A complete parsrv handler: take the group socket, serve it.
//! let listener = parsrv::activation::listener()?;
//! for conn in listener.incoming() {
//!     let _ = std::io::Write::write_all(&mut conn?, b"hello\n");
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{
    env,
    net::{TcpListener, UdpSocket},
    os::fd::{FromRawFd, RawFd},
};

/// The first passed socket (SD_LISTEN_FDS_START).
pub const FIRST_FD: RawFd = 3;
pub const LISTEN_FDS: &str = "LISTEN_FDS";
pub const LISTEN_PID: &str = "LISTEN_PID";
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// What parsrv adds for the handlers it execs: `--threads`, the slot, the group name.
pub const THREADS_ENV: &str = "PARSRV_THREADS";
pub const SLOT_ENV: &str = "PARSRV_SLOT";
pub const GROUP_ENV: &str = "PARSRV_GROUP";

/// Why no socket could be taken; each message says what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivationError {
    #[error(
        "LISTEN_FDS is not set: this program takes its socket from parsrv; start it with \
         `parsrv run --handler exec -- <this program>` (or systemd socket activation)"
    )]
    NotActivated,
    #[error("LISTEN_FDS={0:?} is not a number of sockets: the starter broke the protocol")]
    BadCount(String),
    #[error(
        "LISTEN_PID={listen_pid} is not this process ({own}): the sockets were meant for \
         another process (a wrapper must exec, not fork, the server)"
    )]
    OtherProcess { listen_pid: String, own: u32 },
    #[error("expected exactly one socket, got LISTEN_FDS={0}")]
    NotOne(usize),
    #[error("fd {fd} is not a listening TCP socket: {reason}")]
    NotAListener { fd: RawFd, reason: String },
    #[error("fd {fd} is not a UDP socket (a TCP group's handler? use listener()): {reason}")]
    NotUdp { fd: RawFd, reason: String },
}

/// The passed sockets, in order, with their names (empty when none were given).
pub fn listeners_with_names() -> Result<Vec<(TcpListener, String)>, ActivationError> {
    take_from(FIRST_FD)
}

fn take_from(first_fd: RawFd) -> Result<Vec<(TcpListener, String)>, ActivationError> {
    take_fds(first_fd)?
        .into_iter()
        .map(|(fd, name)| {
            check_listener(fd)?;
            // SAFETY: the fd was handed to this process and checked to be a listening
            // socket; from here on the returned listener owns it.
            Ok((unsafe { TcpListener::from_raw_fd(fd) }, name))
        })
        .collect()
}

/// The one socket a handler of a UDP group is given (blocking, for std code; a tokio
/// server makes it non-blocking and takes it with `tokio::net::UdpSocket::from_std`). For a
/// QUIC server in a `--udp-mode quic` group, see [`crate::quic`].
pub fn udp_socket() -> Result<UdpSocket, ActivationError> {
    let mut all = take_fds(FIRST_FD)?;
    if all.len() != 1 {
        return Err(ActivationError::NotOne(all.len()));
    }
    let (fd, _) = all.remove(0);
    let not = |reason: String| ActivationError::NotUdp { fd, reason };
    if socket_option(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(not)? != libc::SOCK_DGRAM {
        return Err(not("not a datagram socket".into()));
    }
    close_on_exec(fd).map_err(not)?;
    // SAFETY: the fd was handed to this process and checked to be a datagram socket; from
    // here on the returned socket owns it.
    Ok(unsafe { UdpSocket::from_raw_fd(fd) })
}

/// The passed fds and their names, after checking the protocol's variables, which are then
/// cleared.
fn take_fds(first_fd: RawFd) -> Result<Vec<(RawFd, String)>, ActivationError> {
    let count = env::var(LISTEN_FDS).map_err(|_| ActivationError::NotActivated)?;
    let count: usize = count
        .parse()
        .map_err(|_| ActivationError::BadCount(count.clone()))?;
    let own = std::process::id();
    match env::var(LISTEN_PID) {
        Ok(pid) if pid == own.to_string() => {}
        Ok(pid) => {
            return Err(ActivationError::OtherProcess {
                listen_pid: pid,
                own,
            })
        }
        Err(_) => {
            return Err(ActivationError::OtherProcess {
                listen_pid: "(unset)".into(),
                own,
            })
        }
    }
    let names: Vec<String> = env::var(LISTEN_FDNAMES)
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    // Taken: a child of ours must not see them.
    env::remove_var(LISTEN_FDS);
    env::remove_var(LISTEN_PID);
    env::remove_var(LISTEN_FDNAMES);
    Ok((0..count)
        .map(|i| {
            (
                first_fd + i as RawFd,
                names.get(i).cloned().unwrap_or_default(),
            )
        })
        .collect())
}

/// The passed sockets, in order.
pub fn listeners() -> Result<Vec<TcpListener>, ActivationError> {
    Ok(listeners_with_names()?
        .into_iter()
        .map(|(l, _)| l)
        .collect())
}

/// The one socket a parsrv handler is given (blocking, for std code).
pub fn listener() -> Result<TcpListener, ActivationError> {
    let mut all = listeners()?;
    if all.len() != 1 {
        return Err(ActivationError::NotOne(all.len()));
    }
    Ok(all.remove(0))
}

/// The one socket, as a tokio listener (call inside a tokio runtime).
pub fn tokio_listener() -> Result<tokio::net::TcpListener, ActivationError> {
    let listener = listener()?;
    let not_a_listener = |e: std::io::Error| ActivationError::NotAListener {
        fd: FIRST_FD,
        reason: e.to_string(),
    };
    listener.set_nonblocking(true).map_err(not_a_listener)?;
    tokio::net::TcpListener::from_std(listener).map_err(not_a_listener)
}

/// The number of threads parsrv asks each handler to accept with (`--threads`), for
/// servers that can take it; 1 when not started by parsrv.
pub fn threads() -> usize {
    env::var(THREADS_ENV)
        .ok()
        .and_then(|t| t.parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(1)
}

fn check_listener(fd: RawFd) -> Result<(), ActivationError> {
    let not = |reason: String| ActivationError::NotAListener { fd, reason };
    if socket_option(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(not)? != libc::SOCK_STREAM {
        return Err(not("not a stream socket".into()));
    }
    if socket_option(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).map_err(not)? == 0 {
        return Err(not("not listening".into()));
    }
    close_on_exec(fd).map_err(not)
}

/// An int socket option of `fd`; the error as text.
fn socket_option(fd: RawFd, level: libc::c_int, name: libc::c_int) -> Result<libc::c_int, String> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int on a plain fd number.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(value)
}

fn close_on_exec(fd: RawFd) -> Result<(), String> {
    // SAFETY: setting FD_CLOEXEC on an fd we own now.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // The environment is process-wide: these cases run in one test, in order.
    #[test]
    fn validates_the_protocol_and_clears_it() {
        env::remove_var(LISTEN_FDS);
        assert_eq!(listener().unwrap_err(), ActivationError::NotActivated);
        assert!(listener()
            .unwrap_err()
            .to_string()
            .contains("parsrv run --handler exec"));

        env::set_var(LISTEN_FDS, "x");
        assert_eq!(
            listener().unwrap_err(),
            ActivationError::BadCount("x".into())
        );

        env::set_var(LISTEN_FDS, "1");
        env::set_var(LISTEN_PID, "1");
        assert!(matches!(
            listener(),
            Err(ActivationError::OtherProcess { .. })
        ));

        // A real listening socket, passed at a high fd (fd 3 may belong to another test).
        const FD: RawFd = 900;
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        assert_eq!(
            unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&socket), FD) },
            FD
        );
        drop(socket);
        env::set_var(LISTEN_PID, std::process::id().to_string());
        env::set_var(LISTEN_FDNAMES, "web");
        let taken = take_from(FD).unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].0.local_addr().unwrap(), addr);
        assert_eq!(taken[0].1, "web");
        assert!(env::var(LISTEN_FDS).is_err() && env::var(LISTEN_PID).is_err());
        let flags = unsafe { libc::fcntl(FD, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        drop(taken); // closes fd 900

        // Two sockets where one is wanted; and an fd that is not a listener.
        env::set_var(LISTEN_FDS, "0");
        env::set_var(LISTEN_PID, std::process::id().to_string());
        assert_eq!(listener().unwrap_err(), ActivationError::NotOne(0));
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let err = check_listener(fd).unwrap_err();
        assert!(matches!(err, ActivationError::NotAListener { .. }), "{err}");
    }
}
