//! The built-in handler processes (`echo`, `http`). The spawner starts each one with its own
//! group socket as fd 3 and a shared counters page as fd 4.
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
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use memmap2::MmapMut;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use crate::spec::{Credentials, HandlerKind};

/// The handler's socket (as in systemd socket activation, SD_LISTEN_FDS_START).
pub const LISTEN_FD: RawFd = crate::activation::FIRST_FD;
/// The shared [`HandlerStats`] page of a built-in handler (exec handlers get none).
pub const STATS_FD: RawFd = 4;
/// Exported to exec handlers: `--threads`, the slot, the group name.
pub const THREADS_ENV: &str = "PARSRV_THREADS";
pub const SLOT_ENV: &str = "PARSRV_SLOT";
pub const GROUP_ENV: &str = "PARSRV_GROUP";

/// What a handler process is told by its spawner: the arguments of the hidden `parsrv
/// handler` command. The spawner writes them with [`Launch::to_args`] and the handler parses
/// them with clap, from this one declaration.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct Launch {
    #[arg(long, value_enum)]
    pub kind: HandlerKind,
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    #[arg(long, default_value_t = 0)]
    pub slot: u32,
    #[arg(long, default_value = "")]
    pub group: String,
    /// The spawner's pid: the handler must die with it.
    #[arg(long)]
    pub spawner: u32,
    /// Who to become before serving.
    #[arg(long, value_parser = credentials_value)]
    pub credentials: Option<Credentials>,
    /// For exec handlers: the program and its arguments.
    #[arg(last = true)]
    pub command: Vec<String>,
}

impl Launch {
    /// The arguments after `parsrv handler` that parse back to this launch.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--kind={}", self.kind),
            format!("--threads={}", self.threads),
            format!("--slot={}", self.slot),
            format!("--group={}", self.group),
            format!("--spawner={}", self.spawner),
        ];
        if let Some(Credentials { uid, gid }) = self.credentials {
            args.push(format!("--credentials={uid}:{gid}"));
        }
        if !self.command.is_empty() {
            args.push("--".into());
            args.extend(self.command.iter().cloned());
        }
        args
    }
}

/// `UID:GID`, as [`Launch::to_args`] writes it.
fn credentials_value(value: &str) -> Result<Credentials, String> {
    let (uid, gid) = value.split_once(':').ok_or("expected UID:GID")?;
    Ok(Credentials {
        uid: uid.parse().map_err(|_| "bad uid")?,
        gid: gid.parse().map_err(|_| "bad gid")?,
    })
}

/// Becomes the handler: drops privileges if asked, then runs a built-in handler or execs
/// the command (returning only if that fails).
pub fn launch(launch: Launch) -> anyhow::Result<()> {
    if let Some(credentials) = launch.credentials {
        drop_privileges(credentials, launch.spawner)?;
    }
    match launch.kind {
        HandlerKind::Exec => Err(exec_command(&launch)),
        kind => run(kind, launch.threads, launch.slot),
    }
}

/// Becomes `credentials` for good, with no capabilities left.
fn drop_privileges(credentials: Credentials, spawner: u32) -> anyhow::Result<()> {
    use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
    let gid = Gid::from_raw(credentials.gid);
    setgroups(&[gid])?;
    setgid(gid)?;
    setuid(Uid::from_raw(credentials.uid))?;
    // A change of credentials clears the parent-death signal: arm it again, then make sure
    // the spawner did not die meanwhile.
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error().into());
    }
    if nix::unistd::getppid().as_raw() as u32 != spawner {
        anyhow::bail!("the spawner exited");
    }
    // Leaving uid 0 clears the capability sets (no SECBIT_KEEP_CAPS); check rather than trust.
    let status = std::fs::read_to_string("/proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim);
    if credentials.uid != 0 && effective != Some("0000000000000000") {
        anyhow::bail!(
            "capabilities survived the switch to uid {}",
            credentials.uid
        );
    }
    Ok(())
}

/// Execs the handler's command with the socket-activation variables set for this very
/// process (exec keeps the pid). Returns only on failure.
fn exec_command(launch: &Launch) -> anyhow::Error {
    use crate::activation::{LISTEN_FDNAMES, LISTEN_FDS, LISTEN_PID};
    use std::os::unix::process::CommandExt;
    let program = &launch.command[0];
    // Single-threaded here: setting the environment is safe.
    std::env::set_var(LISTEN_FDS, "1");
    std::env::set_var(LISTEN_PID, std::process::id().to_string());
    std::env::set_var(LISTEN_FDNAMES, &launch.group);
    std::env::set_var(THREADS_ENV, launch.threads.to_string());
    std::env::set_var(SLOT_ENV, launch.slot.to_string());
    std::env::set_var(GROUP_ENV, &launch.group);
    let error = std::process::Command::new(program)
        .args(&launch.command[1..])
        .exec();
    anyhow::anyhow!("cannot run {program}: {error}")
}

/// Counters a built-in handler keeps in memory shared with the spawner.
#[repr(C)]
#[derive(Debug, Default)]
pub struct HandlerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// accept() calls that found the queue already emptied by another thread (EAGAIN).
    pub lost_races: AtomicU64,
    /// Connections being served now (by every process of the slot).
    pub active: AtomicU64,
    /// The pid of the last handler process of the slot that started accepting: the spawner
    /// takes a replacement as ready once it shows here.
    pub ready: AtomicU64,
}

/// A [`HandlerStats`] in a memfd: the spawner creates it once per slot (so counts survive
/// handler restarts) and maps it; the handler maps the same page.
pub struct SharedStats {
    map: MmapMut,
    fd: OwnedFd,
}

impl SharedStats {
    pub fn create(slot: u32) -> io::Result<Self> {
        let name = std::ffi::CString::new(format!("parsrv-handler-{slot}")).unwrap();
        // SAFETY: valid name; the returned fd is owned below.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd from memfd_create.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = std::fs::File::from(fd);
        file.set_len(size_of::<HandlerStats>() as u64)?;
        Self::map(file.into())
    }

    /// Maps a page created by [`SharedStats::create`] (in another process).
    pub fn map(fd: OwnedFd) -> io::Result<Self> {
        let file = std::fs::File::from(fd);
        // SAFETY: a memfd only parsrv's spawner and handler map; all access is atomic.
        let map = unsafe { MmapMut::map_mut(&file)? };
        if map.len() < size_of::<HandlerStats>() {
            return Err(io::Error::other("handler stats page too small"));
        }
        Ok(SharedStats {
            map,
            fd: file.into(),
        })
    }

    pub fn stats(&self) -> &HandlerStats {
        // SAFETY: page-aligned mapping of at least size_of::<HandlerStats>() bytes; all
        // fields are atomics, valid for any bit pattern (zero-filled at creation).
        unsafe { &*self.map.as_ptr().cast::<HandlerStats>() }
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

/// Runs a built-in handler on the socket at [`LISTEN_FD`] until SIGTERM or SIGINT.
fn run(kind: HandlerKind, threads: u32, slot: u32) -> anyhow::Result<()> {
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
    Ok(unsafe { OwnedFd::from_raw_fd(LISTEN_FD) })
}

async fn watch_stop_signals(stop: Arc<AtomicBool>) -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
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
        let conn = match accept_counted(&listener, counters) {
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
    /// The socket no longer listens (the spawner shut it down).
    Closed,
}

/// One accept() after poll() said the socket is readable, counted: a connection, or a lost
/// race when another thread took it first (EAGAIN).
fn accept_counted(listener: &OwnedFd, counters: &HandlerStats) -> Accepted {
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
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Accepted::Closed,
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

    #[test]
    fn launch_arguments_parse_back_to_the_same_launch() {
        use clap::{FromArgMatches, Parser};
        #[derive(Parser)]
        struct Handler {
            #[command(flatten)]
            launch: Launch,
        }
        let mut launch = Launch {
            kind: HandlerKind::Exec,
            threads: 3,
            slot: 7,
            group: "web-1".into(),
            spawner: 4242,
            credentials: Some(Credentials {
                uid: 65534,
                gid: 100,
            }),
            command: vec!["sh".into(), "-c".into(), "exec --odd --flags".into()],
        };
        for _ in 0..2 {
            let argv = std::iter::once("handler".to_owned()).chain(launch.to_args());
            let matches = <Handler as clap::CommandFactory>::command().get_matches_from(argv);
            assert_eq!(Handler::from_arg_matches(&matches).unwrap().launch, launch);
            (launch.credentials, launch.command, launch.kind) = (None, vec![], HandlerKind::Http);
        }
    }

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
        // Nothing queued: what a thread sees when a sibling took the connection first.
        assert!(matches!(accept_counted(&fd, &counters), Accepted::Nothing));
        assert_eq!(counters.lost_races.load(Ordering::Relaxed), 1);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let accepted = (0..200).find_map(|_| {
            std::thread::sleep(Duration::from_millis(5));
            match accept_counted(&fd, &counters) {
                Accepted::Connection(conn) => Some(conn),
                _ => None,
            }
        });
        assert!(accepted.is_some());
        assert_eq!(counters.accepted.load(Ordering::Relaxed), 1);
        // Shut down (what the spawner does to a slot it removes): the handler stops.
        nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Read).unwrap();
        assert!(matches!(accept_counted(&fd, &counters), Accepted::Closed));
    }

    #[test]
    fn shared_stats_are_shared() {
        let ours = SharedStats::create(0).unwrap();
        let theirs = SharedStats::map(ours.fd().try_clone().unwrap()).unwrap();
        theirs.stats().accepted.fetch_add(3, Ordering::Relaxed);
        assert_eq!(ours.stats().accepted.load(Ordering::Relaxed), 3);
    }
}
