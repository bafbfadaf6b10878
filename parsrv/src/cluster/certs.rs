//! `parsrv cluster certs`: a cluster's CA and a key and certificate per host, for the
//! agents' mutual TLS ([`super::tls`]).
//!
//! In DIR: `ca.pem` and `ca.key` (made once; kept, so that a host added later gets a
//! certificate of the same CA), and per host `host-ID.pem` and `host-ID.key`. Keys are
//! 0600, the directory 0700; nothing existing is overwritten. ECDSA P-256 keys; the
//! certificates carry no expiry that matters (rcgen's default, the year 4096): a cluster
//! rotates by making a new directory and restarting its agents one by one with it.

use std::{
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use super::tls::host_name;
use crate::error::{Error, Result};

/// Writes the CA (unless DIR has one) and the files of each of `hosts` into `dir`; returns
/// the files it wrote.
pub fn make(cluster: &str, hosts: &[u16], dir: &Path) -> Result<Vec<PathBuf>> {
    let bad = |why: String| Error::Rejected(format!("parsrv cluster certs: {why}"));
    if let Some(why) = super::spec::invalid_name(cluster) {
        return Err(bad(why));
    }
    if hosts.is_empty() {
        return Err(bad("no host: give --hosts 1,2,3".into()));
    }
    if let Some(host) = hosts
        .iter()
        .find(|&&h| h == 0 || h as u32 > parsrv_common::cluster::MAX_HOSTS)
    {
        return Err(bad(format!(
            "host {host}: a host id is 1 to {}",
            parsrv_common::cluster::MAX_HOSTS
        )));
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta =
                std::fs::metadata(dir).map_err(Error::io(format!("reading {}", dir.display())))?;
            if let Some(why) = crate::kernel::untrusted_because(&meta) {
                return Err(bad(format!("{}: {why}", dir.display())));
            }
        }
        Err(e) => return Err(Error::io(format!("creating {}", dir.display()))(e)),
    }
    for host in hosts {
        for file in [format!("host-{host}.pem"), format!("host-{host}.key")] {
            if dir.join(&file).exists() {
                return Err(bad(format!(
                    "{} exists: remove it to make host {host}'s again, or leave host {host} out",
                    dir.join(file).display()
                )));
            }
        }
    }
    let failed = |what: &str| {
        let what = what.to_owned();
        move |e: rcgen::Error| bad(format!("{what}: {e}"))
    };
    let mut written = Vec::new();
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if ca_pem.exists() != ca_key.exists() {
        return Err(bad(format!(
            "{} has only one of ca.pem and ca.key: restore the other, or use a new directory",
            dir.display()
        )));
    }
    let issuer = if ca_pem.exists() {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(Error::io(format!("reading {}", path.display())))
        };
        let key = KeyPair::from_pem(&read(&ca_key)?).map_err(failed("reading ca.key"))?;
        Issuer::from_ca_cert_pem(&read(&ca_pem)?, key).map_err(failed("reading ca.pem"))?
    } else {
        let key = KeyPair::generate().map_err(failed("making the CA's key"))?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name = common_name(&format!("parsrv cluster {cluster} CA"));
        let certificate = params
            .self_signed(&key)
            .map_err(failed("making the CA's certificate"))?;
        write_new(&ca_key, &key.serialize_pem(), 0o600)?;
        write_new(&ca_pem, &certificate.pem(), 0o644)?;
        written.extend([ca_pem, ca_key]);
        Issuer::new(params, key)
    };
    for &host in hosts {
        let name = host_name(cluster, host);
        let key = KeyPair::generate().map_err(failed("making a host's key"))?;
        let mut params =
            CertificateParams::new(vec![name.clone()]).map_err(failed("a host's name"))?;
        params.distinguished_name = common_name(&name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Each agent is a client (it dials) and a server (it accepts).
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let certificate = params
            .signed_by(&key, &issuer)
            .map_err(failed("signing a host's certificate"))?;
        let (pem, key_file) = (
            dir.join(format!("host-{host}.pem")),
            dir.join(format!("host-{host}.key")),
        );
        write_new(&key_file, &key.serialize_pem(), 0o600)?;
        write_new(&pem, &certificate.pem(), 0o644)?;
        written.extend([pem, key_file]);
    }
    Ok(written)
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// Writes a file that must not exist yet (a link planted there is not followed), with
/// `mode` from the start.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(Error::io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tls::{PeerTls, TlsFiles};

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("parsrv-certs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn files(dir: &Path, host: u16) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("host-{host}.pem")),
            key: dir.join(format!("host-{host}.key")),
        }
    }

    #[test]
    fn each_host_loads_its_own_files_and_not_anothers_and_a_later_host_joins_the_same_ca() {
        let dir = temp_dir("hosts");
        let written = make("web", &[1, 2], &dir).unwrap();
        assert_eq!(written.len(), 6);
        assert!(PeerTls::load(&files(&dir, 1), "web", 1).is_ok());
        // Host 2's certificate is not host 1's, nor is it another cluster's.
        let mut swapped = files(&dir, 2);
        swapped.ca = dir.join("ca.pem");
        let error = PeerTls::load(&swapped, "web", 1).err().unwrap().to_string();
        assert!(error.contains("not host 1's"), "{error}");
        let error = PeerTls::load(&files(&dir, 1), "db", 1)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("not host 1's"), "{error}");
        // Nothing is overwritten; a host added later is signed by the same CA.
        let error = make("web", &[2], &dir).err().unwrap().to_string();
        assert!(error.contains("host-2.pem exists"), "{error}");
        assert_eq!(make("web", &[3], &dir).unwrap().len(), 2);
        assert!(PeerTls::load(&files(&dir, 3), "web", 3).is_ok());
        // Another CA's certificate for the right name is refused.
        let other = temp_dir("other");
        make("web", &[1], &other).unwrap();
        let mut foreign = files(&other, 1);
        foreign.ca = dir.join("ca.pem");
        let error = PeerTls::load(&foreign, "web", 1).err().unwrap().to_string();
        assert!(error.contains("not signed by the cluster's CA"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
    }

    #[test]
    fn a_key_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = temp_dir("modes");
        make("web", &[1], &dir).unwrap();
        let key = dir.join("host-1.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = PeerTls::load(&files(&dir, 1), "web", 1)
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("a private key others may read (mode 644): chmod 600 it"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
