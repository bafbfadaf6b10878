//! Clients: single connections, bounded steady loads, and how each connection ended.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

/// Waits until `done` holds, for at most `limit`; says whether it did.
pub fn wait_for(limit: Duration, done: impl FnMut() -> bool) -> bool {
    wait_for_every(limit, Duration::from_millis(10), done)
}

/// [`wait_for`], looking every `every`: for a `done` that is costly itself (one that runs a
/// process, which under emulation takes a VM's CPU from what the test waits on).
pub fn wait_for_every(limit: Duration, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        thread::sleep(every);
    }
    done()
}

/// How one client connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Ok,
    /// connect() did not complete in time: SYNs dropped.
    ConnectTimeout,
    /// connect() was answered with a RST.
    Refused,
    /// The connection was reset after it was established.
    Reset,
    /// Connected, but no complete answer in time.
    NoAnswer,
    Other,
}

fn classify(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Outcome::Refused,
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => Outcome::Reset,
        _ => Outcome::Other,
    }
}

/// Connects with a deadline.
pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Outcome> {
    TcpStream::connect_timeout(&addr, timeout).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Outcome::ConnectTimeout,
        _ => classify(&e),
    })
}

pub const HTTP_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: parsrv-test\r\nConnection: close\r\n\r\n";

/// Reads an HTTP answer to the end; returns it if it is a 200.
pub fn read_answer(stream: &mut TcpStream, timeout: Duration) -> Result<String, Outcome> {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut answer = String::new();
    match stream.read_to_string(&mut answer) {
        Ok(_) if answer.starts_with("HTTP/1.1 200 OK") => Ok(answer),
        Ok(_) => Err(Outcome::NoAnswer),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(Outcome::NoAnswer)
        }
        Err(e) => Err(classify(&e)),
    }
}

/// One HTTP request on a new connection, each step within `timeout`.
pub fn http_get(addr: SocketAddr, timeout: Duration) -> Outcome {
    let mut stream = match connect(addr, timeout) {
        Ok(s) => s,
        Err(outcome) => return outcome,
    };
    if let Err(e) = stream.write_all(HTTP_REQUEST) {
        return classify(&e);
    }
    match read_answer(&mut stream, timeout) {
        Ok(_) => Outcome::Ok,
        Err(outcome) => outcome,
    }
}

/// Clients making one HTTP request per connection, back to back, until stopped (and at
/// most `limit`); every outcome is kept.
///
/// The clients run at the lowest priority (nice 19): they take the CPU time that parsrv
/// and its handlers leave, so the test's own steps (a spawner starting, a handler
/// restarting) are not slowed by the load that is only there to be in flight when they
/// happen. Without it, under emulation (one host thread for the VM's CPUs) the four
/// clients took four fifths of the CPU and each of the adoption test's 20 spawner starts
/// took 6.5 s instead of 3.3 s.
pub struct SteadyLoad {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    clients: Vec<thread::JoinHandle<()>>,
}

impl SteadyLoad {
    /// `timeout` bounds each step of a request (connect, answer).
    pub fn start(
        addr: SocketAddr,
        clients: usize,
        limit: Duration,
        timeout: Duration,
    ) -> SteadyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let deadline = Instant::now() + limit;
        let clients = (0..clients)
            .map(|_| {
                let (stop, outcomes) = (stop.clone(), outcomes.clone());
                thread::spawn(move || {
                    lowest_priority();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let outcome = http_get(addr, timeout);
                        outcomes.lock().unwrap().push(outcome);
                    }
                })
            })
            .collect();
        SteadyLoad {
            stop,
            outcomes,
            clients,
        }
    }

    /// How many requests have ended so far (to place a test's steps among the outcomes).
    pub fn so_far(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }

    pub fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.join().unwrap();
        }
        Arc::try_unwrap(self.outcomes)
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

/// Open-loop clients: a new connection with one HTTP request every `1 / per_second`, for
/// `duration`, each on a thread of its own, whatever became of the earlier ones. Closed-loop
/// clients wait for an answer before they ask again, so they slow down with the server and
/// hide what a real crowd meets; these do not. Bounded: `per_second x duration` requests,
/// each ending within about 2 x `timeout`.
pub struct OpenLoad {
    scheduler: thread::JoinHandle<Vec<thread::JoinHandle<Outcome>>>,
}

impl OpenLoad {
    pub fn start(
        addr: SocketAddr,
        per_second: u32,
        duration: Duration,
        timeout: Duration,
    ) -> OpenLoad {
        let requests = (per_second as f64 * duration.as_secs_f64()) as u32;
        let interval = Duration::from_secs(1) / per_second;
        let scheduler = thread::spawn(move || {
            let start = Instant::now();
            (0..requests)
                .map(|n| {
                    // On a fixed schedule: a late start does not delay the next one.
                    let due = start + interval * n;
                    thread::sleep(due.saturating_duration_since(Instant::now()));
                    thread::spawn(move || http_get(addr, timeout))
                })
                .collect()
        });
        OpenLoad { scheduler }
    }

    /// Waits for the schedule to end and every request on it to finish.
    pub fn finish(self) -> Vec<Outcome> {
        let requests = self.scheduler.join().unwrap();
        requests.into_iter().map(|r| r.join().unwrap()).collect()
    }
}

/// Makes the calling thread (only it: Linux's nice is per thread) the last to get a CPU.
fn lowest_priority() {
    // SAFETY: setpriority with the caller's own thread id reads and writes no memory.
    let set = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    assert_eq!(set, 0, "setpriority: {}", io::Error::last_os_error());
}

/// What a bounded load produced.
#[derive(Debug, Default, Clone)]
pub struct LoadResult {
    pub outcomes: Vec<Outcome>,
}

impl LoadResult {
    pub fn count(&self, outcome: Outcome) -> usize {
        self.outcomes.iter().filter(|o| **o == outcome).count()
    }

    pub fn failures(&self) -> usize {
        self.outcomes.len() - self.count(Outcome::Ok)
    }
}

/// `threads` clients each making `per_thread` HTTP requests, one connection each, every
/// step within `timeout`. Bounded: at most threads x per_thread connections, each ending
/// within about 2 x timeout.
pub fn http_load(
    addr: SocketAddr,
    threads: usize,
    per_thread: usize,
    timeout: Duration,
) -> LoadResult {
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(threads * per_thread)));
    let clients: Vec<_> = (0..threads)
        .map(|_| {
            let outcomes = outcomes.clone();
            thread::spawn(move || {
                for _ in 0..per_thread {
                    let outcome = http_get(addr, timeout);
                    outcomes.lock().unwrap().push(outcome);
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    let outcomes = Arc::try_unwrap(outcomes).unwrap().into_inner().unwrap();
    LoadResult { outcomes }
}

/// `GET path` over a fresh connection to `address`, with `timeout` for each step: the status
/// code (0 if the answer has none) and the body.
pub fn get_page(
    address: std::net::SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    get_page_from(None, address, path, timeout)
}

/// [`get_page`] from the local address `source` (a client of its own).
pub fn get_page_from(
    source: Option<std::net::IpAddr>,
    address: std::net::SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(source) = source {
        socket.bind(&std::net::SocketAddr::new(source, 0).into())?;
    }
    socket.connect_timeout(&address.into(), timeout)?;
    let mut conn: std::net::TcpStream = socket.into();
    conn.set_read_timeout(Some(timeout))?;
    // One write, as real clients send a small request: `write!` on the unbuffered stream
    // would send each formatted piece as its own segment.
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: parsrv-test\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    Ok((code, body))
}
