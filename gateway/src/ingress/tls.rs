//! TLS for the QUIC endpoint: the server certificate, mutual TLS against the gateway's CAs
//! during the handshake, and the role check after it (a device's certificate must chain to
//! the device CA, an operator's to the operator CA, whatever the handshake accepted); the
//! client configs of a device and of an operator.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::config::IngressConfig;
use crate::pki::{self, PkiError, PkiPaths};
use crate::proto::{ALPN_ADMIN, ALPN_DEVICE};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC: {0}")]
    Quic(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(paths: &[std::path::PathBuf]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for p in paths {
        store.roots.extend(pki::root_store(p)?.roots);
    }
    Ok(Arc::new(store))
}

/// Checks after the handshake that a client certificate belongs to the role of its ALPN.
pub struct RoleCheck {
    device: Arc<dyn ClientCertVerifier>,
    operator: Arc<dyn ClientCertVerifier>,
}

fn chains_to(verifier: &dyn ClientCertVerifier, chain: &[CertificateDer<'static>]) -> bool {
    let Some((leaf, rest)) = chain.split_first() else {
        return false;
    };
    let now = UnixTime::since_unix_epoch(Duration::from_secs(crate::clock::trusted_now_s()));
    verifier.verify_client_cert(leaf, rest, now).is_ok()
}

impl RoleCheck {
    /// Whether `chain` (leaf first) chains to the device CA.
    pub fn is_device(&self, chain: &[CertificateDer<'static>]) -> bool {
        chains_to(&*self.device, chain)
    }

    /// Whether `chain` (leaf first) chains to the operator CA.
    pub fn is_operator(&self, chain: &[CertificateDer<'static>]) -> bool {
        chains_to(&*self.operator, chain)
    }
}

/// The client certificate check, which says at WARN why it refused a certificate, with its
/// issuer and subject (a device given certificates from another data dir's CAs is otherwise
/// only an INFO line), at most once every [`Telling::EVERY`] (a flood of bad certificates
/// does not wear the log).
#[derive(Debug)]
struct Telling {
    inner: Arc<dyn ClientCertVerifier>,
    /// The names of the CAs it trusts, to set beside the refused certificate's issuer.
    trusted: String,
    /// When it last said so, and the refusals it kept quiet about since.
    said: std::sync::Mutex<Said>,
}

/// How often a refusal is said: at most once every [`Said::EVERY`], the next one with the
/// count of those kept quiet meanwhile. Pure (time comes in).
#[derive(Debug, Default)]
struct Said {
    last: Option<std::time::Instant>,
    quiet: u64,
}

impl Said {
    const EVERY: Duration = Duration::from_secs(10);

    /// A refusal at `now`: `Some(refusals kept quiet since the last said)` when this one is
    /// said, `None` when it is kept quiet.
    fn refusal(&mut self, now: std::time::Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            self.quiet += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.quiet))
    }
}

/// `text` from an unverified certificate, for one log line: control characters escaped
/// (no forged lines), at most 200 characters.
fn loggable(text: &str) -> String {
    let escaped: String = text.chars().flat_map(char::escape_default).collect();
    match escaped.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &escaped[..i]),
        None => escaped,
    }
}

impl Telling {
    fn refused(&self, leaf: &CertificateDer<'_>, e: &rustls::Error) {
        let now = std::time::Instant::now();
        let said = self
            .said
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refusal(now);
        let Some(quiet) = said else {
            return;
        };
        let (issuer, subject) = pki::issuer_and_subject(leaf)
            .map(|(i, s)| (loggable(&i), loggable(&s)))
            .unwrap_or_else(|| ("(unreadable)".into(), "(unreadable)".into()));
        let from_other_cas = matches!(
            e,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature
            )
        );
        let hint = match from_other_cas {
            true => format!(
                "; this gateway trusts {}: a certificate from another box's or data dir's CAs? (`tidepool certs device -c CONFIG` prints the CAs it uses)",
                self.trusted
            ),
            false => String::new(),
        };
        tracing::warn!(
            %issuer,
            %subject,
            refused_since_last = quiet,
            "client certificate refused: {e} (issued by `{issuer}`){hint}"
        );
    }
}

impl ClientCertVerifier for Telling {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| self.refused(end_entity, e))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// The QUIC server config and the role check for a data dir's PKI.
pub fn server_config(
    paths: &PkiPaths,
    ingress: &IngressConfig,
) -> Result<(quinn::ServerConfig, RoleCheck), TlsError> {
    let p = provider();
    let all = roots(&[paths.cert(pki::DEVICE_CA), paths.cert(pki::OPERATOR_CA)])?;
    let mut trusted = Vec::new();
    for ca in [pki::DEVICE_CA, pki::OPERATOR_CA] {
        for c in pki::read_certs(&paths.cert(ca))? {
            trusted.extend(pki::issuer_and_subject(&c).map(|(_, subject)| format!("`{subject}`")));
        }
    }
    let trusted = trusted.join(" and ");
    let verifier = Arc::new(Telling {
        inner: WebPkiClientVerifier::builder_with_provider(all, p.clone()).build()?,
        trusted,
        said: Default::default(),
    });
    let only = |ca: &str| {
        WebPkiClientVerifier::builder_with_provider(roots(&[paths.cert(ca)])?, p.clone())
            .build()
            .map_err(TlsError::from)
    };
    let (device, operator) = (only(pki::DEVICE_CA)?, only(pki::OPERATOR_CA)?);
    let chain = pki::read_certs(&paths.cert(pki::SERVER))?;
    let key = pki::read_key(&paths.key(pki::SERVER))?;
    let mut tls = rustls::ServerConfig::builder_with_details(p, Arc::new(crate::clock::FloorTime))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    // Devices first: a client offering both is a device (the server's order wins).
    tls.alpn_protocols = vec![ALPN_DEVICE.to_vec(), ALPN_ADMIN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(ingress.max_streams_per_connection.into())
        .max_concurrent_uni_streams(0u8.into())
        .datagram_receive_buffer_size(Some(65536))
        .max_idle_timeout(Some(
            Duration::from_millis(ingress.idle_timeout_ms)
                .try_into()
                .map_err(|_| TlsError::Quic("idle_timeout_ms too large".into()))?,
        ));
    server.transport_config(Arc::new(transport));
    Ok((server, RoleCheck { device, operator }))
}

/// A device-side QUIC client config (for `tidepool send`, the tier uplink, tests and the load
/// generator). The gateway never opens a stream or sends a datagram to a device, so a device
/// accepts none: a hostile upstream (for the tier uplink) cannot make it buffer streams it
/// never reads (quinn's defaults: 100 of each kind, 1.25 MB each), and keeps at most 2 KiB of
/// datagrams (quinn's default: 1.25 MB).
pub fn client_config(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<quinn::ClientConfig, TlsError> {
    client_config_for(ALPN_DEVICE, ca, cert, key)
}

/// An operator's client config for the admin channel (`tidepool deploy --gateway`, …): the
/// admin ALPN, and the same limits as a device's (the gateway opens no stream to a client).
pub fn admin_client_config(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<quinn::ClientConfig, TlsError> {
    client_config_for(ALPN_ADMIN, ca, cert, key)
}

fn client_config_for(
    alpn: &[u8],
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<quinn::ClientConfig, TlsError> {
    let roots = roots(&[ca.to_path_buf()])?;
    let mut tls =
        rustls::ClientConfig::builder_with_details(provider(), Arc::new(crate::clock::FloorTime))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(pki::read_certs(cert)?, pki::read_key(key)?)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into())
        // Not None: quinn would then refuse to *send* datagrams too.
        .datagram_receive_buffer_size(Some(2048));
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_said_at_most_every_10_s_with_the_count_kept_quiet() {
        let t0 = std::time::Instant::now();
        let mut said = Said::default();
        assert_eq!(said.refusal(t0), Some(0));
        assert_eq!(said.refusal(t0 + Duration::from_secs(1)), None);
        assert_eq!(said.refusal(t0 + Duration::from_secs(9)), None);
        assert_eq!(said.refusal(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(said.refusal(t0 + Duration::from_secs(30)), Some(0));
    }

    #[test]
    fn text_from_a_certificate_cannot_forge_a_log_line() {
        assert_eq!(loggable("CN=a\nWARN forged"), "CN=a\\nWARN forged");
        assert_eq!(loggable(&"x".repeat(300)).chars().count(), 201);
    }
}
