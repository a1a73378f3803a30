//! How the agent decides it talks to its own collector.
//!
//! Two ways, chosen in the config: pin the SHA-256 fingerprint of the collector's
//! end-entity certificate (the collector prints it on start; no PKI needed, and the
//! usual setup with a self-signed collector), or trust a CA file (normal web PKI
//! validation including the host name). With a pin, the certificate's names and
//! dates are not checked: the pin is a stronger statement than either. The TLS
//! handshake signature is always verified, so only the holder of the pinned
//! certificate's key can complete it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::error::ShipError;

/// Verifies the server by the SHA-256 of its end-entity certificate. Remembers the
/// fingerprint it was shown on a mismatch, so the shipper can say exactly what it got.
#[derive(Debug)]
pub struct PinnedCertVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
    last_mismatch: Mutex<Option<String>>,
}

impl PinnedCertVerifier {
    pub fn new(fingerprint: [u8; 32], provider: Arc<CryptoProvider>) -> Self {
        PinnedCertVerifier {
            fingerprint,
            provider,
            last_mismatch: Mutex::new(None),
        }
    }

    /// The fingerprint of the last certificate refused for not matching the pin.
    pub fn take_mismatch(&self) -> Option<String> {
        self.last_mismatch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if digest.as_ref() == self.fingerprint {
            return Ok(ServerCertVerified::assertion());
        }
        let presented = to_hex(digest.as_ref());
        *self
            .last_mismatch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(presented.clone());
        Err(rustls::Error::General(format!(
            "collector certificate fingerprint {presented} does not match the pinned {}",
            to_hex(&self.fingerprint)
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
            let _ = write!(out, "{byte:02x}");
            out
        })
}

/// 32 bytes from 64 hex digits (either case, `:` separators allowed).
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let digits: Vec<u8> = text.trim().bytes().filter(|byte| *byte != b':').collect();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (slot, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *slot = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// The rustls client configuration: TLS 1.3 only, ALPN `tributary/1`, and either a
/// pinned verifier (returned too, to report mismatches) or CA validation.
pub fn client_config(
    fingerprint: Option<&str>,
    ca_file: Option<&Path>,
) -> Result<(rustls::ClientConfig, Option<Arc<PinnedCertVerifier>>), ShipError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| ShipError::Tls(error.to_string()))?;
    let (mut config, pinned) = match (fingerprint, ca_file) {
        (Some(text), None) => {
            let fingerprint = parse_fingerprint(text).ok_or_else(|| {
                ShipError::Config(format!(
                    "ship.server_fingerprint_sha256 {text:?} is not 64 hex digits; copy the fingerprint the collector prints on start"
                ))
            })?;
            let verifier = Arc::new(PinnedCertVerifier::new(fingerprint, provider));
            let config = builder.dangerous().with_custom_certificate_verifier(verifier.clone()).with_no_client_auth();
            (config, Some(verifier))
        }
        (None, Some(path)) => {
            let mut roots = rustls::RootCertStore::empty();
            let certificates = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|error| ShipError::Config(format!("cannot read ship.ca_file {}: {error}", path.display())))?;
            let (added, _ignored) = roots.add_parsable_certificates(certificates);
            if added == 0 {
                return Err(ShipError::Config(format!("ship.ca_file {} holds no usable CA certificate", path.display())));
            }
            (builder.with_root_certificates(roots).with_no_client_auth(), None)
        }
        _ => {
            return Err(ShipError::Config(
                "set exactly one of ship.server_fingerprint_sha256 (pin the collector's certificate) and ship.ca_file".to_owned(),
            ))
        }
    };
    config.alpn_protocols = vec![tributary_protocol::session::ALPN.to_vec()];
    Ok((config, pinned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_fingerprint(&hex), Some([0xab; 32]));
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&colons), Some([0xab; 32]));
        assert_eq!(parse_fingerprint("abc"), None);
        assert_eq!(parse_fingerprint(&"zz".repeat(32)), None);
    }

    #[test]
    fn exactly_one_trust_source_is_required() {
        assert!(matches!(
            client_config(None, None),
            Err(ShipError::Config(_))
        ));
        assert!(matches!(
            client_config(Some("nope"), None),
            Err(ShipError::Config(_))
        ));
        assert!(client_config(Some(&"00".repeat(32)), None).is_ok());
    }
}
