//! The load generator: HTTP/1.1 requests over loopback, closed-loop (each client sends its
//! next request when the last one ends) or open-loop (requests start at a fixed rate
//! whatever happens, and latency counts from when each *should* have started, so a stall is
//! not hidden by clients that stopped sending: no coordinated omission). Connection per
//! request or keep-alive. Connect and request latencies go to HDR histograms (µs).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connections {
    /// A new connection for every request (what the dispatch models differ on).
    PerRequest,
    /// One connection per client, reused.
    KeepAlive,
}

#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub clients: usize,
    pub duration: Duration,
    pub connections: Connections,
    /// Open loop at this many requests per second; `None`: closed loop.
    pub rate: Option<f64>,
    /// Limit for each step (connect, answer).
    pub timeout: Duration,
    /// 0: every request from 127.0.0.1 for `/`. N: requests come from N clients in turn,
    /// client i from its own address ([`client_source`]) asking for `/c/i`, so that a
    /// server can tell clients apart (through a proxy too).
    pub client_addresses: u32,
}

pub fn open_loop(rate: f64, duration: Duration) -> Spec {
    Spec {
        clients: 0,
        duration,
        connections: Connections::PerRequest,
        rate: Some(rate),
        timeout: Duration::from_secs(3),
        client_addresses: 0,
    }
}

pub fn closed(clients: usize, duration: Duration) -> Spec {
    Spec {
        clients,
        duration,
        connections: Connections::PerRequest,
        rate: None,
        timeout: Duration::from_secs(3),
        client_addresses: 0,
    }
}

/// The source address of client `i` of a load with `client_addresses`: 127.3.0.1 onwards.
pub fn client_source(i: u32) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(127, 3, (i / 250) as u8, (i % 250 + 1) as u8).into()
}

/// Which client sends the next request of a load with `client_addresses` (in turn).
static NEXT_CLIENT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// What one load run measured.
pub struct Outcome {
    pub ok: u64,
    pub failed: BTreeMap<&'static str, u64>,
    pub elapsed: Duration,
    /// µs from (intended) start to connected.
    pub connect: Histogram<u64>,
    /// µs from (intended) start to the whole answer.
    pub request: Histogram<u64>,
}

impl Outcome {
    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }

    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// Request latency at `quantile`, in ms.
    pub fn ms(&self, quantile: f64) -> f64 {
        self.request.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// Connect latency at `quantile`, in ms.
    pub fn connect_ms(&self, quantile: f64) -> f64 {
        self.connect.value_at_quantile(quantile) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.request.max() as f64 / 1000.0
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

struct Shared {
    ok: u64,
    failed: BTreeMap<&'static str, u64>,
    connect: Histogram<u64>,
    request: Histogram<u64>,
}

const REQUEST_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
const REQUEST_KEEP: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

/// Runs `spec` against `addr` (a tokio runtime of its own, two threads) and returns what it
/// measured. Bounded: nothing runs past `duration` plus one `timeout` per step.
pub fn run(addr: SocketAddr, spec: Spec) -> Outcome {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("load runtime");
    runtime.block_on(async move {
        let shared = Arc::new(Mutex::new(Shared {
            ok: 0,
            failed: BTreeMap::new(),
            connect: histogram(),
            request: histogram(),
        }));
        let start = Instant::now();
        let deadline = start + spec.duration;
        let mut tasks = Vec::new();
        match spec.rate {
            None => {
                for _ in 0..spec.clients {
                    let shared = shared.clone();
                    tasks.push(tokio::spawn(closed_client(addr, spec, deadline, shared)));
                }
            }
            Some(rate) => {
                let every = Duration::from_secs_f64(1.0 / rate);
                let mut n: u32 = 0;
                loop {
                    let intended = start + every * n;
                    if intended >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(intended.into()).await;
                    let shared = shared.clone();
                    tasks.push(tokio::spawn(async move {
                        let result = one_request(addr, spec, intended, None).await;
                        record(&shared, result);
                    }));
                    n += 1;
                }
            }
        }
        for task in tasks {
            let _ = task.await;
        }
        let elapsed = start.elapsed().min(spec.duration + spec.timeout * 2);
        let shared = Arc::try_unwrap(shared)
            .ok()
            .expect("all tasks done")
            .into_inner()
            .unwrap();
        Outcome {
            ok: shared.ok,
            failed: shared.failed,
            elapsed: elapsed.max(spec.duration),
            connect: shared.connect,
            request: shared.request,
        }
    })
}

type Measured = Result<(u64, u64, Option<TcpStream>), &'static str>;

/// Records a request's outcome; hands back its connection if it may be reused.
fn record(shared: &Mutex<Shared>, result: Measured) -> Option<TcpStream> {
    let mut shared = shared.lock().unwrap();
    match result {
        Ok((connect, request, stream)) => {
            shared.ok += 1;
            let _ = shared.connect.record(connect.max(1));
            let _ = shared.request.record(request.max(1));
            stream
        }
        Err(kind) => {
            *shared.failed.entry(kind).or_default() += 1;
            None
        }
    }
}

async fn closed_client(
    addr: SocketAddr,
    spec: Spec,
    deadline: Instant,
    shared: Arc<Mutex<Shared>>,
) {
    let mut kept: Option<TcpStream> = None;
    while Instant::now() < deadline {
        let result = one_request(addr, spec, Instant::now(), kept.take()).await;
        kept = record(&shared, result);
    }
}

/// One request; returns (connect µs, request µs, the connection if it may be reused).
async fn one_request(
    addr: SocketAddr,
    spec: Spec,
    started: Instant,
    reuse: Option<TcpStream>,
) -> Measured {
    let timeout = spec.timeout;
    let client = (spec.client_addresses > 0).then(|| {
        NEXT_CLIENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % spec.client_addresses
    });
    let (mut stream, connected) = match reuse {
        Some(stream) => (stream, started),
        None => {
            let stream = match tokio::time::timeout(timeout, connect(addr, client)).await {
                Err(_) => return Err("connect-timeout"),
                Ok(Err(e)) => return Err(classify(&e)),
                Ok(Ok(stream)) => stream,
            };
            (stream, Instant::now())
        }
    };
    let connect_us = connected.duration_since(started).as_micros() as u64;
    let request = match (client, spec.connections) {
        (Some(client), _) => {
            format!("GET /c/{client} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                .into_bytes()
        }
        (None, Connections::KeepAlive) => REQUEST_KEEP.to_vec(),
        (None, Connections::PerRequest) => REQUEST_CLOSE.to_vec(),
    };
    let exchange = async {
        stream.write_all(&request).await?;
        read_answer(&mut stream).await
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err("answer-timeout"),
        Ok(Err(e)) => Err(classify(&e)),
        Ok(Ok(true)) => {
            let request_us = started.elapsed().as_micros() as u64;
            let keep = (spec.connections == Connections::KeepAlive).then_some(stream);
            Ok((connect_us, request_us, keep))
        }
        Ok(Ok(false)) => Err("bad-answer"),
    }
}

/// Connects from client `client`'s address, or from any.
async fn connect(addr: SocketAddr, client: Option<u32>) -> std::io::Result<TcpStream> {
    let Some(client) = client else {
        return TcpStream::connect(addr).await;
    };
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(client_source(client), 0))?;
    socket.connect(addr).await
}

/// Reads one HTTP answer (head and Content-Length body); true for a 200.
async fn read_answer(stream: &mut TcpStream) -> std::io::Result<bool> {
    let mut buffer = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(false);
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buffer.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(false);
                }
                buffer.extend_from_slice(&chunk[..n]);
            }
            return Ok(head.starts_with("http/1.1 200"));
        }
        if buffer.len() > 64 * 1024 {
            return Ok(false);
        }
    }
}

fn classify(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused",
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted => "reset",
        std::io::ErrorKind::TimedOut => "timeout",
        _ => "other",
    }
}
