//! A plain SO_REUSEPORT group without parsrv: the control every comparison needs.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    sync::Arc,
    thread,
    time::Duration,
};

/// A plain SO_REUSEPORT group with no program, for control runs in the same test: `count`
/// sockets on `addr`; the sockets whose index is in `serving` get a thread that answers
/// HTTP like parsrv's http handler; the others never accept. Stops when dropped.
pub struct PlainGroup {
    pub sockets: Vec<Arc<socket2::Socket>>,
    stop: Arc<AtomicBool>,
    servers: Vec<thread::JoinHandle<()>>,
}

impl PlainGroup {
    pub fn start(addr: SocketAddr, count: usize, backlog: i32, serving: &[usize]) -> PlainGroup {
        let sockets: Vec<_> = (0..count)
            .map(|_| {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                )
                .unwrap();
                s.set_reuse_port(true).unwrap();
                // As parsrv's own sockets: without it, the TIME_WAIT connections of this
                // group would keep the next server (parsrv in the same test) off the port.
                s.set_reuse_address(true).unwrap();
                s.bind(&addr.into()).unwrap();
                s.listen(backlog).unwrap();
                s.set_nonblocking(true).unwrap();
                Arc::new(s)
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let servers = serving
            .iter()
            .map(|&i| {
                let (socket, stop) = (sockets[i].clone(), stop.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match socket.accept() {
                            Ok((conn, _)) => {
                                let mut conn: TcpStream = conn.into();
                                conn.set_nonblocking(false).unwrap();
                                thread::spawn(move || answer_http(&mut conn));
                            }
                            Err(_) => thread::sleep(Duration::from_millis(1)),
                        }
                    }
                })
            })
            .collect();
        PlainGroup {
            sockets,
            stop,
            servers,
        }
    }
}

fn answer_http(conn: &mut TcpStream) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let _ =
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nplain\n");
}

impl Drop for PlainGroup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
    }
}

/// parsrv's built-in http handler run alone on a socket of its own (fd 3, as parsrv passes
/// it; its counters page as fd 4), with no spawner: what a server process's death costs
/// without parsrv, the control for spawner deaths. Waits until it answers; kill it by its
/// [`std::process::Child`].
pub fn lone_server(addr: SocketAddr) -> std::process::Child {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(64).unwrap();
    let stats = parsrv::handler::SharedStats::create(0).unwrap();
    let (listen, page) = (socket.as_raw_fd(), stats.fd().as_raw_fd());
    let mut command = std::process::Command::new(crate::parsrv_bin());
    command
        .args([
            "handler",
            "--kind=http",
            "--threads=2",
            "--slot=0",
            "--group=lone",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: fcntl and dup2 only, async-signal-safe. Both are copied above 10 first: either
    // may sit at 3 or 4 already, where dup2 onto itself would keep close-on-exec.
    unsafe {
        command.pre_exec(move || {
            let listen = libc::fcntl(listen, libc::F_DUPFD_CLOEXEC, 10);
            let page = libc::fcntl(page, libc::F_DUPFD_CLOEXEC, 10);
            if listen < 0 || page < 0 || libc::dup2(listen, 3) < 0 || libc::dup2(page, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().unwrap();
    // The server holds both alone now, as a handler without its spawner does.
    drop(socket);
    drop(stats);
    assert!(crate::wait_for(Duration::from_secs(10), || crate::connect(
        addr,
        Duration::from_secs(1)
    )
    .is_ok()));
    child
}
