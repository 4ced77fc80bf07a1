//! TLS configurations for both ends, from a folder holding `ca.pem` (the
//! certificate authority both ends trust), `cert.pem` (this end's
//! certificate chain) and `key.pem` (its private key), as
//! `nbd-target pki` writes them. TLS 1.3 only; both ends present
//! certificates signed by the CA; the ALPN protocol names the replication
//! protocol so that a TLS peer of another kind fails at the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// ALPN protocol id of the replication protocol.
pub const ALPN: &[u8] = b"blockship-replication/1";

/// Loading a TLS folder or building a configuration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("TLS file {path}: {reason} (make the folder with `nbd-target pki init` or `nbd-target pki issue`)")]
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// rustls refused the certificates or key.
    #[error("TLS folder {dir}: {source}")]
    Config {
        /// The folder.
        dir: PathBuf,
        /// rustls's reason.
        #[source]
        source: rustls::Error,
    },
    /// The client verifier could not be built.
    #[error("TLS folder {dir}: cannot verify clients with ca.pem: {reason}")]
    Verifier {
        /// The folder.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The contents of a TLS folder.
#[derive(Debug)]
pub struct TlsDir {
    /// The folder.
    pub dir: PathBuf,
    /// Trusted authority certificates (`ca.pem`).
    pub ca: Vec<CertificateDer<'static>>,
    /// This end's certificate chain (`cert.pem`).
    pub chain: Vec<CertificateDer<'static>>,
    /// This end's key (`key.pem`).
    pub key: PrivateKeyDer<'static>,
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::File {
        path: path.to_path_buf(),
        reason,
    };
    let v = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if v.is_empty() {
        return Err(bad("no CERTIFICATE in the file".into()));
    }
    Ok(v)
}

impl TlsDir {
    /// Read `ca.pem`, `cert.pem` and `key.pem` from `dir`. A key readable by
    /// group or others is refused (it is the machine's identity).
    pub fn load(dir: &Path) -> Result<TlsDir, TlsError> {
        let key_path = dir.join("key.pem");
        let meta = std::fs::metadata(&key_path).map_err(|e| TlsError::File {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(TlsError::File {
                path: key_path,
                reason: format!(
                    "mode {:o} lets others read the private key; run chmod 600 on it",
                    meta.permissions().mode() & 0o777
                ),
            });
        }
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::File {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        Ok(TlsDir {
            dir: dir.to_path_buf(),
            ca: certs(&dir.join("ca.pem"))?,
            chain: certs(&dir.join("cert.pem"))?,
            key,
        })
    }

    fn config_err(&self, source: rustls::Error) -> TlsError {
        TlsError::Config {
            dir: self.dir.clone(),
            source,
        }
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(|e| self.config_err(e))?;
        }
        Ok(roots)
    }

    /// The shipper's configuration: trust only the CA, present our certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let mut c = ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| self.config_err(e))?;
        c.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Arc::new(c))
    }

    /// The target's configuration: require a client certificate signed by the CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(self.roots()?))
            .build()
            .map_err(|e| TlsError::Verifier {
                dir: self.dir.clone(),
                reason: e.to_string(),
            })?;
        let mut c = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| self.config_err(e))?;
        c.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Arc::new(c))
    }
}

/// What a verified peer certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerIdentity {
    /// The subject's common name (for logs).
    pub name: String,
    /// Disk ids the certificate enrolls (`urn:blockship:disk:<id>` URIs).
    pub disks: Vec<String>,
}

/// Read the identity from a peer certificate (already verified by rustls).
pub fn peer_identity(cert: &CertificateDer<'_>) -> PeerIdentity {
    let Ok((_, c)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return PeerIdentity::default();
    };
    let name = c
        .subject()
        .iter_common_name()
        .next()
        .and_then(|n| n.as_str().ok())
        .unwrap_or("")
        .to_string();
    let mut disks = Vec::new();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = n {
                if let Some(id) = wire::identity::disk_from_uri(u) {
                    disks.push(id.to_string());
                }
            }
        }
    }
    PeerIdentity { name, disks }
}
