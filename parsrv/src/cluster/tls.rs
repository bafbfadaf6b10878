//! Mutual TLS between cluster agents: a peer is who its certificate says, not whoever
//! speaks from its address.
//!
//! One CA per cluster (`parsrv cluster certs` makes it and a key and certificate per
//! host). A host's certificate names it `host-ID.CLUSTER.parsrv` (a DNS subject alternative
//! name). An agent dials a peer as a TLS 1.3 client that checks the server's certificate is
//! that peer's; it accepts a peer's connection as a server that requires a client
//! certificate from the CA and then checks it is the certificate of the host configured at
//! the connection's source address. Replay needs no sequence numbers of ours: TLS numbers
//! its records and keys each session anew, so a captured message cannot be played back
//! into this session or a later one.
//!
//! The files are root's: a certificate or CA another user may write, or a key another user
//! may read, is refused, as OpenSSH's StrictModes refuses them.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use crate::error::{Error, Result};

/// `tls = { ca = ..., cert = ..., key = ... }` in `[cluster]`: PEM files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster's CA certificate: peers' certificates must be signed by it.
    pub ca: PathBuf,
    /// This host's certificate (`host-ID.CLUSTER.parsrv`), signed by the CA.
    pub cert: PathBuf,
    /// This host's private key; mode 0600 or stricter.
    pub key: PathBuf,
}

/// The name host `host` of `cluster` has in its certificate.
pub fn host_name(cluster: &str, host: u16) -> String {
    format!("host-{host}.{cluster}.parsrv")
}

/// This host's TLS ends, client and server, for one cluster.
pub struct PeerTls {
    cluster: String,
    connector: TlsConnector,
    acceptor: TlsAcceptor,
}

impl PeerTls {
    /// Reads and checks the files: root's, the key private, the certificate this host's
    /// and signed by the CA. Every refusal names the file and the fix.
    pub fn load(files: &TlsFiles, cluster: &str, host: u16) -> Result<PeerTls> {
        let refuse = |path: &Path, why: String| {
            Error::Rejected(format!("[cluster] tls file {}: {why}", path.display()))
        };
        for (path, private) in [(&files.ca, false), (&files.cert, false), (&files.key, true)] {
            let meta = std::fs::metadata(path)
                .map_err(|e| refuse(path, format!("{e}: give the path of a PEM file")))?;
            if let Some(why) = crate::kernel::untrusted_because(&meta) {
                return Err(refuse(path, why));
            }
            if private && meta.mode() & 0o077 != 0 {
                return Err(refuse(
                    path,
                    format!(
                        "a private key others may read (mode {:o}): chmod 600 it",
                        meta.mode() & 0o777
                    ),
                ));
            }
        }
        let unreadable = |path: &Path, e: rustls::pki_types::pem::Error| {
            refuse(path, format!("not a PEM file of the expected kind ({e})"))
        };
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&files.ca).map_err(|e| unreadable(&files.ca, e))? {
            let ca = ca.map_err(|e| unreadable(&files.ca, e))?;
            roots
                .add(ca)
                .map_err(|e| refuse(&files.ca, format!("not a CA certificate ({e})")))?;
        }
        let chain = CertificateDer::pem_file_iter(&files.cert)
            .map_err(|e| unreadable(&files.cert, e))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| unreadable(&files.cert, e))?;
        let Some(own) = chain.first() else {
            return Err(refuse(&files.cert, "no certificate in it".into()));
        };
        let key =
            PrivateKeyDer::from_pem_file(&files.key).map_err(|e| unreadable(&files.key, e))?;
        if let Err(why) = certifies(own, &roots, cluster, host) {
            return Err(refuse(
                &files.cert,
                format!("{why}: give this host's (`parsrv cluster certs` makes them)"),
            ));
        }

        let provider = Arc::new(provider());
        let roots = Arc::new(roots);
        let invalid = |e: rustls::Error| refuse(&files.key, format!("{e}"));
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(invalid)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(invalid)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| refuse(&files.ca, format!("{e}")))?;
        let server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(invalid)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(invalid)?;
        Ok(PeerTls {
            cluster: cluster.to_owned(),
            connector: TlsConnector::from(Arc::new(client)),
            acceptor: TlsAcceptor::from(Arc::new(server)),
        })
    }

    /// Speaks TLS on `stream`, a connection to peer `host`, whose certificate must say so.
    pub async fn connect(
        &self,
        stream: TcpStream,
        host: u16,
    ) -> std::io::Result<client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(host_name(&self.cluster, host))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        self.connector.connect(name, stream).await
    }

    /// Speaks TLS on `stream`, from the address of peer `expected`: its certificate must be
    /// signed by the CA and name that host. The error says why not, for the log.
    pub async fn accept(
        &self,
        stream: TcpStream,
        expected: u16,
    ) -> std::result::Result<server::TlsStream<TcpStream>, String> {
        let stream = self
            .acceptor
            .accept(stream)
            .await
            .map_err(|e| format!("TLS handshake failed ({e})"))?;
        let certificate = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or("no client certificate")?;
        names(certificate, &self.cluster, expected)?;
        Ok(stream)
    }
}

/// ring's algorithms. rustls deprecates them for having no post-quantum key exchange
/// (X25519MLKEM768 is aws-lc-rs's); aws-lc-rs would add a C build of aws-lc to every
/// fresh machine's first build. Peer links carry dispatch entries and load figures, on a
/// network between the cluster's own hosts: classic X25519 is the trade-off made here.
#[allow(deprecated)]
fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Whether `certificate` is valid for host `host` of `cluster`.
fn names(
    certificate: &CertificateDer<'_>,
    cluster: &str,
    host: u16,
) -> std::result::Result<(), String> {
    let name = host_name(cluster, host);
    let subject = ServerName::try_from(name.as_str()).map_err(|e| format!("{name}: {e}"))?;
    webpki::EndEntityCert::try_from(certificate)
        .map_err(|e| format!("an unreadable certificate ({e})"))?
        .verify_is_valid_for_subject_name(&subject)
        .map_err(|_| format!("a certificate that is not host {host}'s (not for {name})"))
}

/// Whether `certificate` is host `host`'s and signed by a CA of `roots`, now.
fn certifies(
    certificate: &CertificateDer<'_>,
    roots: &RootCertStore,
    cluster: &str,
    host: u16,
) -> std::result::Result<(), String> {
    names(certificate, cluster, host)?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots.clone()),
        Arc::new(provider()),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host_name(cluster, host)).map_err(|e| e.to_string())?;
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        verifier.as_ref(),
        certificate,
        &[],
        &name,
        &[],
        rustls::pki_types::UnixTime::now(),
    )
    .map(drop)
    .map_err(|e| format!("not signed by the cluster's CA ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_carry_the_cluster() {
        assert_eq!(host_name("web", 3), "host-3.web.parsrv");
        assert!(ServerName::try_from(host_name("web_2", 16)).is_ok());
    }
}
