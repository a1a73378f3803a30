//! The collector's TLS identity and the QUIC server configuration built from it.
//!
//! Why self-signed by default: most fleets run one collector and have no PKI for it.
//! On first start the collector generates a key and certificate, stores them in its
//! state directory (so the identity survives restarts) and prints the certificate's
//! SHA-256 fingerprint; agents pin that fingerprint. Operators with a CA configure a
//! certificate and key file instead, and agents trust the CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use thiserror::Error;

use super::tokens::to_hex;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read the certificate file {path}: {reason}; point `tls.cert_file` at a PEM certificate chain, or remove both tls files from the config to use a generated self-signed identity")]
    Certificate { path: PathBuf, reason: String },
    #[error("cannot read the private key file {path}: {reason}; point `tls.key_file` at a PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    Key { path: PathBuf, reason: String },
    #[error("the certificate file {path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("cannot store the generated identity in {path}: {source}; check that the state directory is writable")]
    Store {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS configuration refused the certificate or key: {0}; check that the key belongs to the certificate")]
    Config(String),
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct TlsIdentity {
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TlsIdentity {
    /// Reads a PEM certificate chain and key.
    pub fn from_pem_files(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        let cert_chain = CertificateDer::pem_file_iter(cert_file)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|error| TlsError::Certificate {
                path: cert_file.to_path_buf(),
                reason: error.to_string(),
            })?;
        if cert_chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: cert_file.to_path_buf(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(|error| TlsError::Key {
            path: key_file.to_path_buf(),
            reason: error.to_string(),
        })?;
        Ok(TlsIdentity { cert_chain, key })
    }

    /// A fresh self-signed identity for the given host names (kept in memory).
    pub fn self_signed(subject_alt_names: &[String]) -> Result<Self, TlsError> {
        let certified = rcgen::generate_simple_self_signed(subject_alt_names.to_vec())
            .map_err(|error| TlsError::Generate(error.to_string()))?;
        Ok(TlsIdentity {
            cert_chain: vec![certified.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                certified.signing_key.serialize_der(),
            )),
        })
    }

    /// Loads `directory/cert.pem` and `directory/key.pem`, generating and storing them
    /// first if they do not exist. Returns the identity and whether it was generated now.
    pub fn load_or_generate(
        directory: &Path,
        subject_alt_names: &[String],
    ) -> Result<(Self, bool), TlsError> {
        let cert_file = directory.join("cert.pem");
        let key_file = directory.join("key.pem");
        if cert_file.exists() && key_file.exists() {
            return Ok((Self::from_pem_files(&cert_file, &key_file)?, false));
        }
        let certified = rcgen::generate_simple_self_signed(subject_alt_names.to_vec())
            .map_err(|error| TlsError::Generate(error.to_string()))?;
        let store_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::Store { path, source }
        };
        std::fs::create_dir_all(directory).map_err(store_error(directory))?;
        write_private(&key_file, certified.signing_key.serialize_pem().as_bytes())
            .map_err(store_error(&key_file))?;
        std::fs::write(&cert_file, certified.cert.pem()).map_err(store_error(&cert_file))?;
        let identity = TlsIdentity {
            cert_chain: vec![certified.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                certified.signing_key.serialize_der(),
            )),
        };
        Ok((identity, true))
    }

    /// SHA-256 of the end-entity certificate, in lower-case hex: what agents pin.
    pub fn fingerprint_hex(&self) -> String {
        self.cert_chain
            .first()
            .map(|cert| certificate_fingerprint_hex(cert))
            .unwrap_or_default()
    }

    /// A rustls server configuration speaking TLS 1.3 with ALPN `tributary/1`.
    pub fn rustls_server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|error| TlsError::Config(error.to_string()))?
            .with_no_client_auth()
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(|error| TlsError::Config(error.to_string()))?;
        config.alpn_protocols = vec![tributary_protocol::session::ALPN.to_vec()];
        Ok(config)
    }
}

/// SHA-256 of a DER certificate in lower-case hex.
pub fn certificate_fingerprint_hex(cert: &CertificateDer<'_>) -> String {
    to_hex(ring::digest::digest(&ring::digest::SHA256, cert.as_ref()).as_ref())
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_identity_is_stored_and_reloaded_with_the_same_fingerprint() {
        let directory = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned()];
        let (first, generated) = TlsIdentity::load_or_generate(directory.path(), &names).unwrap();
        assert!(generated);
        let (second, generated) = TlsIdentity::load_or_generate(directory.path(), &names).unwrap();
        assert!(!generated);
        assert_eq!(first.fingerprint_hex(), second.fingerprint_hex());
        assert_eq!(first.fingerprint_hex().len(), 64);
        second.rustls_server_config().unwrap();
    }

    #[test]
    fn a_missing_certificate_file_is_named() {
        let error = TlsIdentity::from_pem_files(
            Path::new("/nonexistent/cert.pem"),
            Path::new("/nonexistent/key.pem"),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/cert.pem"),
            "{error}"
        );
    }
}
