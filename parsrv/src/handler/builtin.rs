//! The built-in handlers (`echo`, `http`): each process gets its group socket as fd 3 and a
//! shared counters page as fd 4.
//!
//! `--threads T` threads accept in parallel on that one socket: each waits in poll(), and
//! when a connection arrives every waiting thread wakes; one accept() wins, the others get
//! EAGAIN, count a lost race and go back to waiting.
//!
//! Why poll() and not epoll with EPOLLEXCLUSIVE (one waiter woken per connection): when the
//! kernel migrates queued connections into a socket (another socket of the group was
//! removed), inet_csk_listen_stop() queues them without calling sk_data_ready(), as far as
//! the kernel source reads. poll() looks at the queue again at every timeout and finds them
//! anyway; epoll reports only sockets whose wakeup it saw. (Read from the source, not
//! isolated by a measurement.) Accepted connections are served by a
//! tokio runtime, so a slow client never holds an accepting thread.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use super::{HandlerStats, SharedStats, LISTEN_FD, STATS_FD};
use crate::spec::HandlerKind;

/// Runs a built-in handler on the socket at [`LISTEN_FD`] until SIGTERM or SIGINT.
pub(super) fn run(kind: HandlerKind, threads: u32, slot: u32) -> anyhow::Result<()> {
    if socket_type(LISTEN_FD) == Some(libc::SOCK_DGRAM) {
        return run_datagrams(kind, threads);
    }
    let listener = inherited_listener()?;
    // SAFETY: fd 4 is ours, handed over by the spawner (checked by mapping it).
    let stats = Arc::new(SharedStats::map(unsafe { OwnedFd::from_raw_fd(STATS_FD) })?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads as usize)
        .thread_name("parsrv-serve")
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    runtime.block_on(watch_stop_signals(stop.clone()))?;

    let body: Arc<str> = format!("parsrv handler {slot} (pid {})\n", std::process::id()).into();
    // This process's own connections, which it waits for when stopping; the shared count
    // is the whole slot's (a replacement may be serving beside it).
    let own_active = Arc::new(AtomicU64::new(0));
    let acceptors: Vec<_> = (0..threads)
        .map(|i| {
            let listener = listener.try_clone()?;
            let (stop, stats, body, runtime, own_active) = (
                stop.clone(),
                stats.clone(),
                body.clone(),
                runtime.handle().clone(),
                own_active.clone(),
            );
            std::thread::Builder::new()
                .name(format!("parsrv-accept-{i}"))
                .spawn(move || {
                    accept_loop(listener, kind, &stop, &stats, &own_active, &body, &runtime)
                })
        })
        .collect::<io::Result<_>>()?;
    stats
        .stats()
        .ready
        .store(std::process::id() as u64, Ordering::Relaxed);
    for acceptor in acceptors {
        acceptor.join().expect("accept thread panicked");
    }
    // Stopped: let connections in flight finish their current request; the spawner's grace
    // period bounds this with SIGKILL.
    while own_active.load(Ordering::Relaxed) > 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// SO_TYPE of `fd`, if it is a socket.
fn socket_type(fd: libc::c_int) -> Option<libc::c_int> {
    let mut kind: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on a plain fd number; fails harmlessly if it is not a socket.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(kind)
}

/// The built-in handler of a UDP group (`echo`: each datagram sent back to its sender),
/// `threads` threads receiving on the one socket, until SIGTERM or SIGINT. The counters
/// page's `accepted` counts datagrams answered.
fn run_datagrams(kind: HandlerKind, threads: u32) -> anyhow::Result<()> {
    if kind != HandlerKind::Echo {
        anyhow::bail!("--handler {kind} has no UDP form: a UDP group runs echo or exec");
    }
    // SAFETY: fd 3 is a datagram socket (checked by the caller) handed to us by the
    // spawner; fd 4 is ours, handed over by the spawner (checked by mapping it).
    let socket = unsafe { std::net::UdpSocket::from_raw_fd(LISTEN_FD) };
    let stats = Arc::new(SharedStats::map(unsafe { OwnedFd::from_raw_fd(STATS_FD) })?);
    socket.set_nonblocking(true)?;
    // A worker thread of its own runs the signal watcher after block_on returns.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    runtime.block_on(watch_stop_signals(stop.clone()))?;
    let receivers: Vec<_> = (0..threads)
        .map(|i| {
            let (socket, stop, stats) = (socket.try_clone()?, stop.clone(), stats.clone());
            std::thread::Builder::new()
                .name(format!("parsrv-recv-{i}"))
                .spawn(move || echo_datagrams(&socket, &stop, stats.stats()))
        })
        .collect::<io::Result<_>>()?;
    stats
        .stats()
        .ready
        .store(std::process::id() as u64, Ordering::Relaxed);
    for receiver in receivers {
        receiver.join().expect("receive thread panicked")?;
    }
    Ok(())
}

/// Sends each datagram back to where it came from, until `stop`. A datagram larger than
/// the buffer is cut to it (UDP's own rule); a send that fails (the sender's port closed,
/// its buffer full) is dropped, as UDP does.
fn echo_datagrams(
    socket: &std::net::UdpSocket,
    stop: &AtomicBool,
    counters: &HandlerStats,
) -> io::Result<()> {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((len, from)) => {
                let _ = socket.send_to(&buf[..len], from);
                counters.accepted.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let fd = socket.as_fd();
                let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(STOP_POLL_MS)) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn inherited_listener() -> anyhow::Result<OwnedFd> {
    let mut accepting: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on a plain fd number; fails harmlessly if it is not a socket.
    let rc = unsafe {
        libc::getsockopt(
            LISTEN_FD,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || accepting == 0 {
        anyhow::bail!(
            "fd {LISTEN_FD} is not a listening socket: `parsrv handler` is started by \
             `parsrv run`, not by hand"
        );
    }
    // SAFETY: checked above to be an open listening socket, handed to us by the spawner.
    let listener = unsafe { OwnedFd::from_raw_fd(LISTEN_FD) };
    // Threads poll and then accept: a thread that loses the race must get EAGAIN, not
    // block. fd 3 comes blocking unless the group says otherwise (as systemd passes it).
    let flags = nix::fcntl::fcntl(&listener, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&listener, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(listener)
}

async fn watch_stop_signals(stop: Arc<AtomicBool>) -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // (SIGHUP is ignored already: the spawner set it before exec, see
    // supervisor::process::place_handler.)
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stop.store(true, Ordering::Relaxed);
    });
    Ok(())
}

/// How often a waiting thread looks at the stop flag and at the queue.
const STOP_POLL_MS: u8 = 200;

fn accept_loop(
    listener: OwnedFd,
    kind: HandlerKind,
    stop: &Arc<AtomicBool>,
    stats: &Arc<SharedStats>,
    own_active: &Arc<AtomicU64>,
    body: &Arc<str>,
    runtime: &tokio::runtime::Handle,
) {
    let counters = stats.stats();
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(STOP_POLL_MS)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                log::error!("poll on the handler socket failed: {e}");
                return;
            }
        }
        let conn = match accept_counted(&listener, counters, stop) {
            Accepted::Connection(conn) => conn,
            Accepted::Nothing => continue,
            Accepted::Closed => {
                // The spawner shut the socket down (the slot is being removed): its queue
                // migrated to the others; finish what this process has and leave.
                stop.store(true, Ordering::Relaxed);
                return;
            }
        };
        counters.active.fetch_add(1, Ordering::Relaxed);
        own_active.fetch_add(1, Ordering::Relaxed);
        let (stop, stats, body, own_active) = (
            stop.clone(),
            stats.clone(),
            body.clone(),
            own_active.clone(),
        );
        runtime.spawn(async move {
            if let Err(e) = serve(conn, kind, &stop, &body).await {
                log::debug!("connection ended with {e}");
            }
            stats.stats().active.fetch_sub(1, Ordering::Relaxed);
            own_active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// What one accept() gave.
enum Accepted {
    Connection(std::net::TcpStream),
    /// Nothing to take now: another thread was first (counted), or the client gave up.
    Nothing,
    /// The socket no longer listens (the spawner shut it down for good).
    Closed,
}

/// How long a thread whose accept() found its socket not listening waits for it to listen
/// again before it takes the socket for closed for good.
///
/// "Again at once" is two syscalls and a few map updates apart in the spawner, but a
/// spawner preempted on an overcommitted CPU (an emulated VM with 60 runnable threads on
/// one CPU) was seen to take longer than the 10 ms this once waited: the handler then
/// stopped accepting while its socket listened again, and connections queued behind it
/// until their clients gave up. A removal needs no haste here: the spawner's SIGTERM
/// follows it and ends the wait.
const RELISTEN_WAIT: Duration = Duration::from_secs(2);

fn relisten_or_closed(listener: &OwnedFd, stop: &AtomicBool, wait: Duration) -> Accepted {
    let deadline = std::time::Instant::now() + wait;
    loop {
        std::thread::sleep(Duration::from_millis(10));
        if crate::kernel::tcp_state(listener.as_fd()).ok() == Some(crate::kernel::TCP_LISTEN) {
            return Accepted::Nothing;
        }
        if stop.load(Ordering::Relaxed) || std::time::Instant::now() >= deadline {
            return Accepted::Closed;
        }
    }
}

/// One accept() after poll() said the socket is readable, counted: a connection, or a lost
/// race when another thread took it first (EAGAIN).
fn accept_counted(listener: &OwnedFd, counters: &HandlerStats, stop: &AtomicBool) -> Accepted {
    match accept(listener) {
        Ok(conn) => {
            counters.accepted.fetch_add(1, Ordering::Relaxed);
            Accepted::Connection(conn)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            counters.lost_races.fetch_add(1, Ordering::Relaxed);
            Accepted::Nothing
        }
        // The client gave up between the handshake and accept(), or a signal: retry.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO)
            ) =>
        {
            Accepted::Nothing
        }
        // The socket does not listen: the spawner removed the slot for good (and sends
        // SIGTERM next), or it shut the socket down to move a stalled queue and listens
        // again at once (spawner/stalls.rs), and this accept() fell between the two.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            relisten_or_closed(listener, stop, RELISTEN_WAIT)
        }
        Err(e) => {
            // EMFILE and friends: back off instead of spinning on a readable socket.
            log::error!("accept failed: {e}");
            std::thread::sleep(Duration::from_millis(50));
            Accepted::Nothing
        }
    }
}

fn accept(listener: &OwnedFd) -> io::Result<std::net::TcpStream> {
    // SAFETY: accept4 on our listening fd; NULL address buffers are allowed.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh connected socket from accept4.
    Ok(unsafe { std::net::TcpStream::from_raw_fd(fd) })
}

/// Serves one accepted connection the way the built-in `http` handler does (the benchmark
/// suite's dispatch models run exactly this code).
pub async fn serve_http_connection(conn: std::net::TcpStream, body: &str) -> io::Result<()> {
    serve(conn, HandlerKind::Http, &AtomicBool::new(false), body).await
}

async fn serve(
    conn: std::net::TcpStream,
    kind: HandlerKind,
    stop: &AtomicBool,
    body: &str,
) -> io::Result<()> {
    let mut stream = TcpStream::from_std(conn)?;
    match kind {
        HandlerKind::Echo => {
            let (mut reader, mut writer) = stream.split();
            tokio::io::copy(&mut reader, &mut writer).await?;
            writer.shutdown().await
        }
        HandlerKind::Http => serve_http(stream, stop, body).await,
        HandlerKind::Exec => unreachable!("exec handlers run their own program"),
    }
}

/// Longest request line or header line accepted.
const MAX_LINE: u64 = 8 * 1024;
/// Most header lines accepted in one request.
const MAX_HEADERS: usize = 100;

/// A small HTTP/1.1 server: every request gets `200 OK` with `body`; keep-alive unless the
/// client asks to close (or speaks HTTP/1.0 without keep-alive) or the handler is stopping.
async fn serve_http(stream: TcpStream, stop: &AtomicBool, body: &str) -> io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    loop {
        let Some(request) = read_request_head(&mut reader, &mut line).await? else {
            return Ok(()); // the client closed between requests
        };
        let Ok(head) = request else {
            writer
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await?;
            return writer.shutdown().await;
        };
        // Discard a request body: the response does not depend on it.
        tokio::io::copy(
            &mut (&mut reader).take(head.content_length),
            &mut tokio::io::sink(),
        )
        .await?;
        let close = head.close || stop.load(Ordering::Relaxed);
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" },
        );
        writer.write_all(response.as_bytes()).await?;
        if close {
            return writer.shutdown().await;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct RequestHead {
    content_length: u64,
    close: bool,
}

/// Reads one request head. `None` at a clean EOF before any byte; `Some(Err(()))` for a
/// request this server will not parse.
async fn read_request_head<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut String,
) -> io::Result<Option<Result<RequestHead, ()>>> {
    line.clear();
    if (&mut *reader).take(MAX_LINE).read_line(line).await? == 0 {
        return Ok(None);
    }
    let Some(version) = line.split_whitespace().nth(2) else {
        return Ok(Some(Err(())));
    };
    let mut head = RequestHead {
        content_length: 0,
        close: version != "HTTP/1.1",
    };
    for _ in 0..MAX_HEADERS {
        line.clear();
        if (&mut *reader).take(MAX_LINE).read_line(line).await? == 0 {
            return Ok(Some(Err(())));
        }
        let header = line.trim_end();
        if header.is_empty() {
            return Ok(Some(Ok(head)));
        }
        let Some((name, value)) = header.split_once(':') else {
            return Ok(Some(Err(())));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse() {
                Ok(length) => head.content_length = length,
                Err(_) => return Ok(Some(Err(()))),
            }
        } else if name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                head.close = true;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                head.close = false;
            }
        }
    }
    Ok(Some(Err(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn head(raw: &str) -> Option<Result<RequestHead, ()>> {
        let mut reader = BufReader::new(raw.as_bytes());
        read_request_head(&mut reader, &mut String::new())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn parses_request_heads() {
        assert_eq!(head("").await, None);
        assert_eq!(
            head("GET / HTTP/1.1\r\nHost: x\r\n\r\n").await,
            Some(Ok(RequestHead {
                content_length: 0,
                close: false
            }))
        );
        assert_eq!(
            head("POST / HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n").await,
            Some(Ok(RequestHead {
                content_length: 5,
                close: true
            }))
        );
        assert_eq!(
            head("GET / HTTP/1.0\r\n\r\n").await,
            Some(Ok(RequestHead {
                content_length: 0,
                close: true
            }))
        );
        assert_eq!(
            head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").await,
            Some(Ok(RequestHead {
                content_length: 0,
                close: false
            }))
        );
        assert_eq!(head("garbage\r\n\r\n").await, Some(Err(())));
        assert_eq!(
            head("GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n").await,
            Some(Err(()))
        );
        assert_eq!(head("GET / HTTP/1.1\r\nHost: x\r\n").await, Some(Err(())));
    }

    #[tokio::test]
    async fn serves_keep_alive_then_close() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            serve_http(conn, &AtomicBool::new(false), "hi\n").await
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).await.unwrap();
        server.await.unwrap().unwrap();
        assert_eq!(reply.matches("HTTP/1.1 200 OK").count(), 2, "{reply}");
        assert_eq!(reply.matches("hi\n").count(), 2);
        assert!(
            reply.contains("Connection: keep-alive")
                && reply.ends_with("Connection: close\r\n\r\nhi\n")
        );
    }

    #[test]
    fn accepts_count_connections_and_lost_races() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let fd = OwnedFd::from(listener);
        let counters = HandlerStats::default();
        let no_stop = AtomicBool::new(false);
        // Nothing queued: what a thread sees when a sibling took the connection first.
        assert!(matches!(
            accept_counted(&fd, &counters, &no_stop),
            Accepted::Nothing
        ));
        assert_eq!(counters.lost_races.load(Ordering::Relaxed), 1);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let accepted = (0..200).find_map(|_| {
            std::thread::sleep(Duration::from_millis(5));
            match accept_counted(&fd, &counters, &no_stop) {
                Accepted::Connection(conn) => Some(conn),
                _ => None,
            }
        });
        assert!(accepted.is_some());
        assert_eq!(counters.accepted.load(Ordering::Relaxed), 1);
        // Shut down (what the spawner does to a slot it removes): the handler stops.
        // Shut down and listening again within the wait (a stalled queue moved): go on.
        nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Read).unwrap();
        let relisten = {
            let fd = fd.try_clone().unwrap();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(8).unwrap())
            })
        };
        assert!(matches!(
            accept_counted(&fd, &counters, &no_stop),
            Accepted::Nothing
        ));
        relisten.join().unwrap().unwrap();
        assert_eq!(
            crate::kernel::tcp_state(fd.as_fd()).unwrap(),
            crate::kernel::TCP_LISTEN
        );
        // Shut down for good (a removed slot), then SIGTERM: the handler stops.
        nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Read).unwrap();
        let stopped = AtomicBool::new(true);
        assert!(matches!(
            accept_counted(&fd, &counters, &stopped),
            Accepted::Closed
        ));
        // No SIGTERM: the socket is taken for closed once the wait is over.
        assert!(matches!(
            relisten_or_closed(&fd, &no_stop, Duration::from_millis(30)),
            Accepted::Closed
        ));
    }
}
