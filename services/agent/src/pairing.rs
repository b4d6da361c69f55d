//! Pairing by code, the agent's side of RFC 8628's device authorization
//! grant: `relay-agent setup` without a credential asks the relay for a
//! pairing, shows the owner a short code, the URL to enter it at and a QR
//! code of both, then polls at the relay's `interval` (longer after a
//! `slow_down`) until the owner approves (the answer is the device's agent
//! credential), denies, or the code expires.
//!
//! The relay is reached over HTTPS (`relay_io::http_client`), verified
//! with the edge's CA file, as the tunnel is.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// Where the relay's pairing endpoints are.
#[derive(Debug, Clone)]
pub struct PairingServer {
    /// The name in the URL (and on the certificate).
    pub host: String,
    pub port: u16,
    /// Where to connect instead of looking `host` up (split DNS, tests).
    pub connect: Option<String>,
}

/// What a pairing gave.
#[derive(Debug)]
pub struct Paired {
    /// The agent credential, `rla_…`.
    pub credential: String,
    pub device_id: String,
}

/// Why pairing did not give a credential, in words for the owner.
#[derive(Debug, thiserror::Error)]
pub enum PairingError {
    #[error("not an https:// URL with a host: {0}")]
    BadUrl(String),
    #[error("the relay could not be reached: {0}")]
    Unreachable(String),
    #[error("the relay answered {status}: {detail}")]
    Refused { status: u16, detail: String },
    #[error("the owner denied this pairing")]
    Denied,
    #[error("the code expired before the owner entered it: run setup again for a new one")]
    Expired,
}

impl PairingServer {
    /// `https://host[:port][/]`.
    pub fn from_url(url: &str, connect: Option<String>) -> Result<PairingServer, PairingError> {
        match relay_io::http_client::Origin::of(url) {
            Ok((origin, _)) if origin.tls => Ok(PairingServer {
                host: origin.host,
                port: origin.port,
                connect,
            }),
            _ => Err(PairingError::BadUrl(url.to_owned())),
        }
    }

    /// POSTs a form to `path`; the answer's status and JSON body.
    async fn post(
        &self,
        tls: &Arc<rustls::ClientConfig>,
        path: &str,
        form: &str,
    ) -> Result<(u16, Value), PairingError> {
        self.request(tls, path, "application/x-www-form-urlencoded", "", form)
            .await
    }

    /// POSTs `body` of `content_type` to `path`, with `extra_headers`
    /// (whole lines, each ending in CRLF); the answer's status and JSON
    /// body.
    pub async fn request(
        &self,
        tls: &Arc<rustls::ClientConfig>,
        path: &str,
        content_type: &str,
        extra_headers: &str,
        body: &str,
    ) -> Result<(u16, Value), PairingError> {
        let origin = relay_io::http_client::Origin {
            tls: true,
            host: self.host.clone(),
            port: self.port,
            connect: self.connect.clone(),
        };
        let headers =
            format!("Content-Type: {content_type}\r\nAccept: application/json\r\n{extra_headers}");
        let answer = origin
            .request(Some(tls), "POST", path, &headers, body)
            .await
            .map_err(|error| PairingError::Unreachable(error.to_string()))?;
        Ok((
            answer.status,
            serde_json::from_str(&answer.body).unwrap_or(Value::Null),
        ))
    }
}

/// TLS towards the relay, verified with the edge's CA file.
pub fn tls_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, PairingError> {
    use rustls::pki_types::pem::PemObject;
    let bad = |detail: String| PairingError::Unreachable(detail);
    let pem = std::fs::read(ca_file)
        .map_err(|error| bad(format!("cannot read {}: {error}", ca_file.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        let certificate =
            certificate.map_err(|error| bad(format!("{}: {error}", ca_file.display())))?;
        roots
            .add(certificate)
            .map_err(|error| bad(error.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| bad(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// A QR code of `text` for a terminal: two rows of modules per line.
pub fn qr_code(text: &str) -> Option<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .build(),
    )
}

fn description(body: &Value) -> String {
    body["error_description"]
        .as_str()
        .or(body["error"].as_str())
        .unwrap_or("no detail")
        .to_owned()
}

/// A pairing the relay started, as the agent was told it.
#[derive(Debug, Clone)]
pub struct Started {
    device_code: String,
    /// `XXXX-XXXX`, for the owner.
    pub user_code: String,
    pub verification_uri: String,
    /// The URL with the code in it (the QR code's).
    pub verification_uri_complete: String,
    pub expires_in: Duration,
    pub interval: Duration,
}

/// Asks the relay for a pairing.
pub async fn start(
    server: &PairingServer,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Started, PairingError> {
    let (status, started) = server
        .post(tls, "/oauth/device_authorization", "client_id=relay-agent")
        .await?;
    if status != 200 {
        return Err(PairingError::Refused {
            status,
            detail: description(&started),
        });
    }
    let field = |name: &str| started[name].as_str().unwrap_or_default().to_owned();
    Ok(Started {
        device_code: field("device_code"),
        user_code: field("user_code"),
        verification_uri: field("verification_uri"),
        verification_uri_complete: field("verification_uri_complete"),
        expires_in: Duration::from_secs(started["expires_in"].as_u64().unwrap_or(900)),
        interval: Duration::from_secs(started["interval"].as_u64().unwrap_or(5).max(1)),
    })
}

/// What the owner is shown: the code, where to enter it, and a QR code of
/// the link with the code in it.
pub fn announce(started: &Started, say: &mut dyn FnMut(&str)) {
    say(&format!(
        "To pair this agent, sign in to your relay's console and enter the code\n\n    {}\n\nat {}\nor open {}",
        started.user_code, started.verification_uri, started.verification_uri_complete,
    ));
    if let Some(qr) = qr_code(&started.verification_uri_complete) {
        say(&qr);
    }
    say(&format!(
        "Waiting for the owner (the code lives {} minutes)…",
        started.expires_in.as_secs().div_ceil(60)
    ));
}

/// Polls at the relay's interval until the owner decides or the code
/// expires.
pub async fn wait(
    server: &PairingServer,
    tls: &Arc<rustls::ClientConfig>,
    started: &Started,
    say: &mut dyn FnMut(&str),
) -> Result<Paired, PairingError> {
    let mut interval = started.interval;
    let form = format!(
        "grant_type={}&device_code={}&client_id=relay-agent",
        "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code", started.device_code
    );
    loop {
        tokio::time::sleep(interval).await;
        let (status, body) = match server.post(tls, "/oauth/token", &form).await {
            Ok(answer) => answer,
            // A moment without the relay is no reason to give up a code.
            Err(PairingError::Unreachable(detail)) => {
                say(&format!(
                    "the relay did not answer ({detail}); trying again"
                ));
                continue;
            }
            Err(error) => return Err(error),
        };
        if status == 200 {
            return Ok(Paired {
                credential: body["access_token"].as_str().unwrap_or_default().to_owned(),
                device_id: body["device_id"].as_str().unwrap_or_default().to_owned(),
            });
        }
        match body["error"].as_str() {
            Some("authorization_pending") => {}
            Some("slow_down") => {
                // RFC 8628: 5 s more from now on (or what the relay says).
                interval = body["interval"]
                    .as_u64()
                    .map(Duration::from_secs)
                    .unwrap_or(interval + Duration::from_secs(5));
            }
            Some("access_denied") => return Err(PairingError::Denied),
            Some("expired_token") => return Err(PairingError::Expired),
            _ => {
                return Err(PairingError::Refused {
                    status,
                    detail: description(&body),
                });
            }
        }
    }
}

/// Pairs: [`start`], [`announce`] to `say`, then [`wait`].
pub async fn pair(
    server: &PairingServer,
    tls: &Arc<rustls::ClientConfig>,
    say: &mut dyn FnMut(&str),
) -> Result<Paired, PairingError> {
    let started = start(server, tls).await?;
    announce(&started, say);
    wait(server, tls, &started, say).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_host_and_port() {
        let server = PairingServer::from_url("https://relay.example.com", None).unwrap();
        assert_eq!(
            (server.host.as_str(), server.port),
            ("relay.example.com", 443)
        );
        let server = PairingServer::from_url("https://relay.test:8443/pair", None).unwrap();
        assert_eq!((server.host.as_str(), server.port), ("relay.test", 8443));
        assert!(PairingServer::from_url("http://relay.test", None).is_err());
        assert!(PairingServer::from_url("https://:443", None).is_err());
    }

    #[test]
    fn the_qr_code_is_text_for_a_terminal() {
        let qr = qr_code("https://relay.example.com/pair?code=BCDF-GHJK").unwrap();
        assert!(qr.lines().count() > 10);
    }
}
