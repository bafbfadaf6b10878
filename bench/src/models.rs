//! The dispatch models the suite compares. In all of them N worker processes serve HTTP
//! with the same code (parsrv's built-in `http` handler: `parsrv handler` processes, or its
//! serving function for `listener`'s workers); only how a connection reaches a worker
//! differs:
//!
//! - `listener`: one acceptor process accepts every connection and hands it to a worker,
//!   round-robin, over a Unix socket (SCM_RIGHTS): Figure 1 of the seeds' description.
//! - `shared`: every worker accepts on one inherited socket with the handler's own accept
//!   loop: poll(), then a non-blocking accept(). Every waiting worker wakes and the losers
//!   get EAGAIN: neither EPOLLEXCLUSIVE nor blocking accept. The handler cannot use
//!   EPOLLEXCLUSIVE: migrated connections may raise no wakeup (see parsrv's handler module).
//! - `reuseport`: one SO_REUSEPORT socket per worker; the kernel's hash picks the socket.
//! - `parsrv`: the real spawner and program (`parsrv run`), policy `redirect` or
//!   `least-loaded`.

use std::{
    io,
    net::SocketAddr,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::process::CommandExt,
    },
    process::{Child, Command, Stdio},
    sync::atomic::Ordering,
};

use parsrv::handler::SharedStats;
use parsrv_integration_tests::{group, parsrv_bin, HandlerKind, Policy, Spawner};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    Listener,
    Shared,
    Reuseport,
    ParsrvRedirect,
    ParsrvLeastLoaded,
    ParsrvTwoChoices,
    /// `redirect` with `--affinity client` (not in [`Model::ALL`]: the `affinity` scenario's).
    ParsrvAffinity,
    /// `redirect` with `--stall-after 0`, parsrv before stall detection (not in
    /// [`Model::ALL`]: the `stall` scenario's control).
    ParsrvNoStallDetection,
}

impl Model {
    pub const ALL: [Model; 6] = [
        Model::Listener,
        Model::Shared,
        Model::Reuseport,
        Model::ParsrvRedirect,
        Model::ParsrvLeastLoaded,
        Model::ParsrvTwoChoices,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Model::Listener => "listener",
            Model::Shared => "shared",
            Model::Reuseport => "reuseport",
            Model::ParsrvRedirect => "parsrv redirect",
            Model::ParsrvLeastLoaded => "parsrv least-loaded",
            Model::ParsrvTwoChoices => "parsrv two-choices",
            Model::ParsrvAffinity => "parsrv affinity client",
            Model::ParsrvNoStallDetection => "parsrv redirect, no stall detection",
        }
    }
}

/// A running model: its workers, and what each accepted.
pub struct Served {
    spawner: Option<Spawner>,
    children: Vec<Child>,
    stats: Vec<SharedStats>,
    /// Worker pids, in order (the one to stall or slow down is the first).
    pub workers: Vec<u32>,
}

impl Served {
    pub fn start(model: Model, workers: usize, backlog: u32, addr: SocketAddr) -> Served {
        Served::start_with_env(model, workers, backlog, addr, &[])
    }

    /// [`Served::start`], with these variables in the spawner's environment.
    pub fn start_with_env(
        model: Model,
        workers: usize,
        backlog: u32,
        addr: SocketAddr,
        envs: &[(&str, &str)],
    ) -> Served {
        match model {
            Model::ParsrvRedirect
            | Model::ParsrvLeastLoaded
            | Model::ParsrvTwoChoices
            | Model::ParsrvAffinity
            | Model::ParsrvNoStallDetection => {
                let policy = match model {
                    Model::ParsrvLeastLoaded => Policy::LeastLoaded,
                    Model::ParsrvTwoChoices => Policy::TwoChoices,
                    _ => Policy::Redirect,
                };
                let spawner = envs
                    .iter()
                    .fold(group("bench", HandlerKind::Http), |g, (k, v)| g.env(k, v))
                    .listen(&addr.to_string())
                    .handlers(workers as u32)
                    .backlog(backlog)
                    .policy(policy)
                    .with(|s| {
                        if model == Model::ParsrvAffinity {
                            s.affinity = parsrv_integration_tests::Affinity::Client;
                        }
                        if model == Model::ParsrvNoStallDetection {
                            s.stall_after = 0.0;
                        }
                    })
                    .start();
                let pids = spawner
                    .status()
                    .handlers
                    .iter()
                    .map(|h| h.pid.unwrap())
                    .collect();
                Served {
                    spawner: Some(spawner),
                    children: Vec::new(),
                    stats: Vec::new(),
                    workers: pids,
                }
            }
            Model::Reuseport | Model::Shared => {
                let sockets: Vec<socket2::Socket> =
                    (0..if model == Model::Shared { 1 } else { workers })
                        .map(|_| listening(addr, backlog, model == Model::Reuseport))
                        .collect();
                let stats: Vec<SharedStats> = (0..workers)
                    .map(|i| SharedStats::create(i as u32).unwrap())
                    .collect();
                let children: Vec<Child> = (0..workers)
                    .map(|i| {
                        let socket = sockets[i % sockets.len()].as_raw_fd();
                        let page = stats[i].fd().as_raw_fd();
                        let mut command = Command::new(parsrv_bin());
                        command.args([
                            "handler",
                            "--kind",
                            "http",
                            "--threads",
                            "1",
                            "--slot",
                            &i.to_string(),
                        ]);
                        command.args(["--group", "bench"]);
                        spawn_with_fds(command, &[socket, page])
                    })
                    .collect();
                let workers = children.iter().map(Child::id).collect();
                // The workers hold the sockets now; ours close when `sockets` drops.
                Served {
                    spawner: None,
                    children,
                    stats,
                    workers,
                }
            }
            Model::Listener => {
                let listener = listening(addr, backlog, false);
                let stats: Vec<SharedStats> = (0..workers)
                    .map(|i| SharedStats::create(i as u32).unwrap())
                    .collect();
                let mut children = Vec::new();
                let mut channels = Vec::new();
                for page in &stats {
                    let (ours, theirs) = nix::sys::socket::socketpair(
                        nix::sys::socket::AddressFamily::Unix,
                        nix::sys::socket::SockType::Stream,
                        None,
                        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                    )
                    .unwrap();
                    let mut command = Command::new(std::env::current_exe().unwrap());
                    command.arg("worker");
                    children.push(spawn_with_fds(
                        command,
                        &[theirs.as_raw_fd(), page.fd().as_raw_fd()],
                    ));
                    channels.push(ours);
                }
                let workers: Vec<u32> = children.iter().map(Child::id).collect();
                let mut fds = vec![listener.as_raw_fd()];
                fds.extend(channels.iter().map(|c| c.as_raw_fd()));
                let mut command = Command::new(std::env::current_exe().unwrap());
                command.args(["acceptor", &channels.len().to_string()]);
                children.push(spawn_with_fds(command, &fds));
                Served {
                    spawner: None,
                    children,
                    stats,
                    workers,
                }
            }
        }
    }

    /// Connections each worker accepted so far.
    pub fn accepted(&self) -> Vec<u64> {
        match &self.spawner {
            Some(spawner) => spawner
                .status()
                .handlers
                .iter()
                .map(|h| h.accepted.unwrap_or(0))
                .collect(),
            None => self
                .stats
                .iter()
                .map(|s| s.stats().accepted.load(Ordering::Relaxed))
                .collect(),
        }
    }

    pub fn spawner(&self) -> Option<&Spawner> {
        self.spawner.as_ref()
    }

    pub fn stop(mut self) {
        if let Some(spawner) = self.spawner.take() {
            spawner.stop();
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn listening(addr: SocketAddr, backlog: u32, reuse_port: bool) -> socket2::Socket {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    socket.set_reuse_address(true).unwrap();
    if reuse_port {
        socket.set_reuse_port(true).unwrap();
    }
    socket.bind(&addr.into()).unwrap();
    socket.listen(backlog as i32).unwrap();
    socket.set_nonblocking(true).unwrap();
    socket
}

/// Starts `command` with `fds` at 3, 4, ... and nothing else inherited; it dies with us.
pub(crate) fn spawn_with_fds(mut command: Command, fds: &[RawFd]) -> Child {
    let fds = fds.to_vec();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let high: Vec<RawFd> = fds
                .iter()
                .map(|&fd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100))
                .collect();
            for (i, &fd) in high.iter().enumerate() {
                if fd < 0 || libc::dup2(fd, 3 + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            libc::syscall(libc::SYS_close_range, 3 + high.len() as u32, u32::MAX, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                return Err(io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting a worker")
}

/// `parsrv-bench acceptor N`: the `listener` model's acceptor. Accepts on fd 3, hands each
/// connection to the workers at fds 4..4+N in turn.
pub fn acceptor(workers: usize) -> ! {
    // SAFETY: fds handed over by spawn_with_fds.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(3) };
    listener.set_nonblocking(false).unwrap();
    let channels: Vec<OwnedFd> = (0..workers)
        .map(|i| unsafe { OwnedFd::from_raw_fd(4 + i as RawFd) })
        .collect();
    let mut next = 0;
    loop {
        let Ok((conn, _)) = listener.accept() else {
            continue;
        };
        let fd = [conn.as_raw_fd()];
        let message = [nix::sys::socket::ControlMessage::ScmRights(&fd)];
        let _ = nix::sys::socket::sendmsg::<()>(
            channels[next].as_raw_fd(),
            &[io::IoSlice::new(b"c")],
            &message,
            nix::sys::socket::MsgFlags::empty(),
            None,
        );
        next = (next + 1) % channels.len();
        drop(conn); // the worker has its own copy now
    }
}

/// `parsrv-bench worker`: a `listener` model's worker. Receives connections on fd 3 and
/// serves them with parsrv's built-in HTTP code; counts them in the page at fd 4.
pub fn worker() -> ! {
    // SAFETY: fds handed over by spawn_with_fds.
    let channel = unsafe { OwnedFd::from_raw_fd(3) };
    let stats = SharedStats::map(unsafe { OwnedFd::from_raw_fd(4) }).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let body: std::sync::Arc<str> = format!("worker pid {}\n", std::process::id()).into();
    loop {
        let mut byte = [0u8; 1];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [io::IoSliceMut::new(&mut byte)];
        let Ok(message) = nix::sys::socket::recvmsg::<()>(
            channel.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::empty(),
        ) else {
            std::process::exit(0);
        };
        if message.bytes == 0 {
            std::process::exit(0);
        }
        for cmsg in message.cmsgs().into_iter().flatten() {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = cmsg {
                for fd in fds {
                    stats.stats().accepted.fetch_add(1, Ordering::Relaxed);
                    // SAFETY: a connection passed to us.
                    let conn = unsafe { std::net::TcpStream::from_raw_fd(fd) };
                    conn.set_nonblocking(true).unwrap();
                    let body = body.clone();
                    runtime.spawn(async move {
                        let _ = parsrv::handler::serve_http_connection(conn, &body).await;
                    });
                }
            }
        }
    }
}
