//! TLS for the public listener: certificates from PEM files, swapped in
//! without a restart when the files change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The ALPN id of MQTT over TLS (IANA registry: `mqtt`).
pub const MQTT_ALPN: &[u8] = b"mqtt";

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate chain {path}: {reason}")]
    Certificates { path: PathBuf, reason: String },
    #[error("cannot read private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC: {0}")]
    Quic(String),
}

struct Loaded {
    key: Arc<CertifiedKey>,
    /// SHA-256 over both files, to notice a change.
    digest: Vec<u8>,
}

/// The certificate in force, and where it comes from.
#[derive(Debug)]
pub struct CertificateSource {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    digest: RwLock<Vec<u8>>,
}

impl CertificateSource {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<CertificateSource>, TlsError> {
        let loaded = read(cert_path, key_path)?;
        Ok(Arc::new(CertificateSource {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: RwLock::new(loaded.key),
            digest: RwLock::new(loaded.digest),
        }))
    }

    /// Reads the files again and takes the new certificate if they changed.
    /// On error the certificate in force stays. Returns whether it changed.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let loaded = read(&self.cert_path, &self.key_path)?;
        let unchanged = self
            .digest
            .read()
            .map(|d| *d == loaded.digest)
            .unwrap_or(false);
        if unchanged {
            return Ok(false);
        }
        if let (Ok(mut current), Ok(mut digest)) = (self.current.write(), self.digest.write()) {
            *current = loaded.key;
            *digest = loaded.digest;
        }
        Ok(true)
    }

    /// A rustls server configuration that always uses the current
    /// certificate: TLS 1.2 and 1.3, ALPN `http/1.1`, and the tunnel's
    /// when `with_tunnel` (agents on the public listener).
    pub fn server_config(
        self: &Arc<Self>,
        with_tunnel: bool,
        with_mqtt: bool,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        if with_tunnel {
            config
                .alpn_protocols
                .push(relay_proto::tunnel::ALPN.to_vec());
        }
        if with_mqtt {
            config.alpn_protocols.push(MQTT_ALPN.to_vec());
        }
        Ok(Arc::new(config))
    }
}

impl CertificateSource {
    /// The TLS configuration for the mqtts listener: TLS 1.3 and 1.2, ALPN
    /// `mqtt` (a client that offers none is served too), the same
    /// certificate.
    pub fn mqtts_server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![MQTT_ALPN.to_vec()];
        Ok(Arc::new(config))
    }

    /// The TLS configuration for the agents' TCP listener (the tunnel where
    /// UDP is blocked): TLS 1.3 and 1.2, ALPN of the tunnel protocol only,
    /// the same certificate.
    pub fn tcp_tunnel_server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![relay_proto::tunnel::ALPN.to_vec()];
        Ok(Arc::new(config))
    }

    /// The QUIC configuration for the agents' listener: TLS 1.3 only (QUIC
    /// requires it), ALPN of the tunnel protocol, the same certificate.
    pub fn quic_server_config(
        self: &Arc<Self>,
    ) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
        self.quic_server_config_for(relay_proto::tunnel::ALPN)
    }

    /// [`Self::quic_server_config`] with another ALPN id (the peer listener).
    pub fn quic_server_config_for(
        self: &Arc<Self>,
        alpn: &[u8],
    ) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![alpn.to_vec()];
        config.max_early_data_size = 0;
        quinn::crypto::rustls::QuicServerConfig::try_from(config)
            .map(Arc::new)
            .map_err(|error| TlsError::Quic(error.to_string()))
    }
}

impl ResolvesServerCert for CertificateSource {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|current| current.clone())
    }
}

fn read(cert_path: &Path, key_path: &Path) -> Result<Loaded, TlsError> {
    let cert_pem = std::fs::read(cert_path).map_err(|error| TlsError::Certificates {
        path: cert_path.to_owned(),
        reason: error.to_string(),
    })?;
    let key_pem = std::fs::read(key_path).map_err(|error| TlsError::Key {
        path: key_path.to_owned(),
        reason: error.to_string(),
    })?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|error| TlsError::Certificates {
            path: cert_path.to_owned(),
            reason: error.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Certificates {
            path: cert_path.to_owned(),
            reason: "no certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| TlsError::Key {
        path: key_path.to_owned(),
        reason: error.to_string(),
    })?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(&cert_pem);
    context.update(&key_pem);
    Ok(Loaded {
        key: Arc::new(CertifiedKey::new(chain, signing_key)),
        digest: context.finish().as_ref().to_vec(),
    })
}

/// The QUIC client configuration for dialing other instances' peer
/// listeners: TLS 1.3, ALPN `relay-peer/1`, and any certificate. A peer is
/// authenticated by its proof of the cluster secret bound to the TLS
/// session (PROTOCOL.md, "Peer links"), not by its certificate: instances
/// are dialled by pod IP, which a public certificate does not name.
pub fn peer_client_config() -> Result<quinn::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![relay_proto::tunnel::PEER_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config)
        .map_err(|error| TlsError::Quic(error.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Accepts any certificate, but still checks that the server holds its key
/// (the handshake signature).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
