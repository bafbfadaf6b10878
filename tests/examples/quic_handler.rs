//! A QUIC server (quinn) as the handler of a `--udp-mode quic` group: it takes its UDP socket
//! by socket activation and puts the socket's cookie at the start of every connection ID it
//! issues ([`parsrv::quic`]), so that the group's program sends each connection's packets to
//! it. On each bidirectional stream it reads a request (at most 64 bytes) and answers with
//! its process id and a newline: the tests check which handler served each connection. Its
//! application protocol (ALPN) is `parsrv-example`.
//!
//! ```text
//! parsrv run --listen udp://127.0.0.1:4433 --udp-mode quic --handlers 4 \
//!     --handler exec -- quic_handler CERT.der KEY.der
//! ```
//!
//! With `--bind ADDR` instead of a socket from parsrv, it binds ADDR itself with
//! SO_REUSEPORT and issues random connection IDs: the plain SO_REUSEPORT server the tests
//! compare parsrv with.
//!
//! Its stateless resets (RFC 9000, section 10.3) use a key derived from the server's private
//! key, the same in every handler and in a handler restarted on its socket, as nginx's
//! `quic_host_key` is one file every worker reads. parsrv restarts a killed handler on the
//! same socket, so the successor gets the packets of the dead one's connections (their
//! cookie names that socket) and resets them: their clients learn within a round trip that
//! the connection is gone instead of waiting out its idle time-out. `--random-reset-key`
//! gives each process a key of its own (quinn's default), for the tests' control.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{bail, Context as _, Result};
use quinn::{
    crypto::rustls::QuicServerConfig,
    rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
    ConnectionIdGenerator, Endpoint, EndpointConfig, TokioRuntime,
};

/// The application protocol (ALPN) it speaks: QUIC requires one (RFC 9001 section 8.1).
const PROTOCOL: &[u8] = b"parsrv-example";

/// The length of the connection IDs this server issues: the cookie and 8 random bytes.
const CID_LEN: usize = 16;

/// Connection IDs of the cookie and random bytes.
struct CookieIds {
    /// `None` outside parsrv: random IDs.
    cookie: Option<u64>,
}

impl ConnectionIdGenerator for CookieIds {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; CID_LEN];
        provider()
            .secure_random
            .fill(&mut id)
            .expect("the system's random source failed");
        if let Some(cookie) = self.cookie {
            parsrv::quic::write_cookie(cookie, &mut id);
        }
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let random_reset_key = match args.iter().position(|a| a == "--random-reset-key") {
        Some(at) => {
            args.remove(at);
            true
        }
        None => false,
    };
    let (cert, key, bind) = match args.as_slice() {
        [cert, key] => (cert, key, None),
        [cert, key, flag, addr] if flag == "--bind" => (cert, key, Some(addr.parse()?)),
        _ => bail!("usage: quic_handler CERT.der KEY.der [--bind ADDR] [--random-reset-key]"),
    };
    let cert = CertificateDer::from(std::fs::read(cert).with_context(|| cert.clone())?);
    let key_bytes = std::fs::read(key).with_context(|| key.clone())?;
    let reset_key = if random_reset_key {
        let mut secret = [0u8; 32];
        provider()
            .secure_random
            .fill(&mut secret)
            .expect("the system's random source failed");
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret)
    } else {
        // Not the private key itself: a key of its own, derived from it.
        let mut labelled = b"parsrv-example stateless reset key\0".to_vec();
        labelled.extend_from_slice(&key_bytes);
        let secret = ring::digest::digest(&ring::digest::SHA256, &labelled);
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref())
    };
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_bytes));
    let (socket, cookie) = match bind {
        None => {
            let socket = parsrv::activation::udp_socket()?;
            let cookie = parsrv::quic::socket_cookie(&socket)?;
            (socket, Some(cookie))
        }
        Some(addr) => (bind_reusing_port(addr)?, None),
    };
    let provider = Arc::new(provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![PROTOCOL.to_vec()];
    let server = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    let mut config = EndpointConfig::new(Arc::new(reset_key));
    // A stateless reset for every packet of an unknown connection, not one per 20 ms
    // (quinn's default): a successor gets the packets of all the dead handler's connections
    // at once, and in a 6.1 VM one of 7 got no reset before its idle time-out. A reset is
    // smaller than the packet that caused it, so it amplifies nothing.
    config.min_reset_interval(Duration::ZERO);
    config.cid_generator(move || Box::new(CookieIds { cookie }));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        socket.set_nonblocking(true)?;
        let endpoint = Endpoint::new(config, Some(server), socket, Arc::new(TokioRuntime))?;
        // What parsrv's --notify waits for (a no-op without NOTIFY_SOCKET).
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                while let Ok((mut send, mut receive)) = connection.accept_bi().await {
                    tokio::spawn(async move {
                        // Bounded before it is buffered.
                        if receive.read_to_end(64).await.is_err() {
                            return;
                        }
                        let _ = send
                            .write_all(format!("{}\n", std::process::id()).as_bytes())
                            .await;
                        let _ = send.finish();
                    });
                }
            });
        }
        anyhow::Ok(())
    })
}

/// ring, as parsrv's cluster links (see `parsrv::cluster::tls`): rustls deprecates it for
/// having no post-quantum key exchange, which aws-lc-rs would bring with a C build.
#[allow(deprecated)]
fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn bind_reusing_port(addr: SocketAddr) -> Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        None,
    )?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
