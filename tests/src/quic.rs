//! QUIC clients for the quic mode's tests (quinn, as `tests/examples/quic_handler.rs`
//! serves): each client its own endpoint (its own UDP socket and 4-tuple), a handshake, then
//! requests on streams of that connection, each answered with the serving handler's pid.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use quinn::{
    crypto::rustls::QuicClientConfig,
    rustls::{self, pki_types::CertificateDer},
    ClientConfig, Endpoint, TransportConfig,
};

/// A self-signed certificate for `localhost`, written as DER files for the server.
pub struct Certificate {
    pub cert: PathBuf,
    pub key: PathBuf,
    der: Vec<u8>,
}

impl Certificate {
    pub fn new(dir: &Path) -> Certificate {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.join("quic-cert.der");
        let key = dir.join("quic-key.der");
        std::fs::write(&cert, made.cert.der()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_der()).unwrap();
        Certificate {
            cert,
            key,
            der: made.cert.der().to_vec(),
        }
    }

    /// The server's arguments after its program (`quic_handler CERT KEY`).
    pub fn args(&self) -> [&str; 2] {
        [self.cert.to_str().unwrap(), self.key.to_str().unwrap()]
    }
}

/// What one client got: the pid that answered each request, or why the connection failed.
pub type Answers = Result<Vec<u32>, Failure>;

/// Why a client's connection failed, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Before or during the handshake.
    Handshake(String),
    /// Once connected: a request got no answer.
    Request {
        /// Which (from 0).
        request: usize,
        /// What quinn said: "reset by peer" for a stateless reset, "timed out" for silence.
        error: String,
        /// The pid that answered each request before it.
        answered_by: Vec<u32>,
    },
}

/// The example server's application protocol, after 1,500 bytes of others it does not speak:
/// the ClientHello no longer fits one Initial datagram, so each first flight spans two, as a
/// real client's with a post-quantum key share does.
fn protocols() -> Vec<Vec<u8>> {
    let mut offered: Vec<Vec<u8>> = (0..12).map(|i| vec![b'a' + i as u8; 125]).collect();
    offered.push(b"parsrv-example".to_vec());
    offered
}

/// `clients` clients at once, each connecting to `addr` and making `requests` requests
/// `pause` apart; a connection idle for `timeout` (a handshake that gets no answer) fails.
/// With `migrate`, each client moves to a new UDP socket (a new source port: what a NAT
/// rebinding does to a client) after its first request, and goes on from there.
pub fn run_clients(
    addr: SocketAddr,
    certificate: &Certificate,
    clients: usize,
    requests: usize,
    pause: Duration,
    timeout: Duration,
    migrate: bool,
) -> Vec<Answers> {
    run_clients_with(
        addr,
        certificate,
        clients,
        requests,
        pause,
        timeout,
        migrate,
        |_| {},
    )
}

/// [`run_clients`], with `between` run once every client has had its first answer (or
/// failed before), given the pid that gave each first answer, and no client's second
/// request sent before it returns.
#[allow(clippy::too_many_arguments)]
pub fn run_clients_with(
    addr: SocketAddr,
    certificate: &Certificate,
    clients: usize,
    requests: usize,
    pause: Duration,
    timeout: Duration,
    migrate: bool,
    between: impl FnOnce(Vec<u32>) + Send + 'static,
) -> Vec<Answers> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(certificate.der.clone()))
        .unwrap();
    #[allow(deprecated)] // ring, as the server (see quic_handler.rs)
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = protocols();
    let mut transport = TransportConfig::default();
    transport.max_idle_timeout(Some(timeout.try_into().unwrap()));
    // One datagram per send: each is a run of the program (no GSO train).
    transport.enable_segmentation_offload(false);
    let mut config = ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    config.transport_config(Arc::new(transport));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let (first_done, mut firsts) = tokio::sync::mpsc::channel::<Option<u32>>(clients.max(1));
        let (go, went) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut answered_by = Vec::new();
            for _ in 0..clients {
                match firsts.recv().await {
                    Some(first) => answered_by.extend(first),
                    None => break,
                }
            }
            let _ = tokio::task::spawn_blocking(move || between(answered_by)).await;
            let _ = go.send(true);
        });
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let config = config.clone();
                let step = Step {
                    first_done: Some(first_done.clone()),
                    went: went.clone(),
                };
                tokio::spawn(
                    async move { client(addr, config, requests, pause, migrate, step).await },
                )
            })
            .collect();
        drop(first_done);
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(
                task.await
                    .unwrap_or_else(|e| Err(Failure::Handshake(e.to_string()))),
            );
        }
        answers
    })
}

/// A client's part in [`run_clients_with`]'s step between first and second requests.
struct Step {
    /// Told who answered the first request, or nothing when the client failed before (when
    /// it is dropped unused).
    first_done: Option<tokio::sync::mpsc::Sender<Option<u32>>>,
    went: tokio::sync::watch::Receiver<bool>,
}

impl Step {
    async fn first_answered_then_wait(&mut self, by: u32) {
        if let Some(done) = self.first_done.take() {
            let _ = done.send(Some(by)).await;
        }
        let _ = self.went.wait_for(|went| *went).await;
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(done) = self.first_done.take() {
            let _ = done.try_send(None);
        }
    }
}

async fn client(
    addr: SocketAddr,
    config: ClientConfig,
    requests: usize,
    pause: Duration,
    migrate: bool,
    mut step: Step,
) -> Answers {
    let setup = |e: &dyn std::fmt::Display| Failure::Handshake(e.to_string());
    let mut endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| setup(&e))?;
    endpoint.set_default_client_config(config);
    let connection = endpoint
        .connect(addr, "localhost")
        .map_err(|e| setup(&e))?
        .await
        .map_err(|e| setup(&e))?;
    let mut pids = Vec::new();
    for i in 0..requests {
        if i == 1 {
            step.first_answered_then_wait(pids[0]).await;
        }
        let answered_by = pids.clone();
        // A stream's error says only "connection lost"; the connection says why.
        let failed = |e: &dyn std::fmt::Display| Failure::Request {
            request: i,
            error: match connection.close_reason() {
                Some(why) => format!("{e}: {why}"),
                None => e.to_string(),
            },
            answered_by: answered_by.clone(),
        };
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        if migrate && i == 1 {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| failed(&e))?;
            endpoint.rebind(socket).map_err(|e| failed(&e))?;
        }
        let (mut send, mut receive) = connection.open_bi().await.map_err(|e| failed(&e))?;
        send.write_all(b"who\n").await.map_err(|e| failed(&e))?;
        send.finish().map_err(|e| failed(&e))?;
        let answer = receive.read_to_end(32).await.map_err(|e| failed(&e))?;
        let pid = String::from_utf8_lossy(&answer)
            .trim()
            .parse()
            .map_err(|e| failed(&format!("{answer:?}: {e}")))?;
        pids.push(pid);
    }
    // Not waiting out the closing period (three probe time-outs, seconds under emulation):
    // the server learns of the close from this packet, and nothing is asserted after it.
    connection.close(0u32.into(), b"done");
    Ok(pids)
}
