//! A small HTTP/1.1 client for the few calls relay's binaries make
//! themselves: the agent's pairing (RFC 8628) and the edge's OpenID
//! Connect sign-in (discovery, keys, the code exchange). One request per
//! connection (`Connection: close`), answers read to their end and at most
//! [`MAX_ANSWER_BYTES`], over TLS for `https://` and in the clear for
//! `http://` (the caller decides whether that is allowed).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest answer read.
pub const MAX_ANSWER_BYTES: u64 = 256 * 1024;

/// How long a request may take, connection included.
const PATIENCE: Duration = Duration::from_secs(20);

/// Where requests go: scheme, host and port of a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub tls: bool,
    /// The name in the URL (and on the certificate).
    pub host: String,
    pub port: u16,
    /// Where to connect instead of looking `host` up (split DNS, tests).
    pub connect: Option<String>,
}

/// An answer: its status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("not an http:// or https:// URL with a host: {0}")]
    BadUrl(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("a broken HTTP answer")]
    Broken,
}

impl Origin {
    /// The origin of `url` and the path (with query) after it.
    pub fn of(url: &str) -> Result<(Origin, String), HttpError> {
        let bad = || HttpError::BadUrl(url.to_owned());
        let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            _ => return Err(bad()),
        };
        let at = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(at);
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                (host, port.parse().map_err(|_| bad())?)
            }
            _ => (authority, if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(bad());
        }
        let path = if path.is_empty() {
            "/".to_owned()
        } else if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        Ok((
            Origin {
                tls,
                host: host.to_owned(),
                port,
                connect: None,
            },
            path,
        ))
    }

    fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Sends `method path` with `headers` (whole lines, each ending in
    /// CRLF) and `body`; `tls` is used for `https://`.
    pub async fn request(
        &self,
        tls: Option<&Arc<rustls::ClientConfig>>,
        method: &str,
        path: &str,
        headers: &str,
        body: &str,
    ) -> Result<Answer, HttpError> {
        tokio::time::timeout(PATIENCE, self.exchange(tls, method, path, headers, body))
            .await
            .map_err(|_| HttpError::Unreachable(format!("{} did not answer in time", self.host)))?
    }

    async fn exchange(
        &self,
        tls: Option<&Arc<rustls::ClientConfig>>,
        method: &str,
        path: &str,
        headers: &str,
        body: &str,
    ) -> Result<Answer, HttpError> {
        let unreachable = |error: &dyn std::fmt::Display| HttpError::Unreachable(error.to_string());
        let address = self
            .connect
            .clone()
            .unwrap_or_else(|| format!("{}:{}", self.host, self.port));
        let tcp = tokio::net::TcpStream::connect(&address)
            .await
            .map_err(|error| HttpError::Unreachable(format!("{address}: {error}")))?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.host_header(),
            body.len()
        );
        if !self.tls {
            return send(tcp, &request).await;
        }
        let Some(tls) = tls else {
            return Err(HttpError::Unreachable(
                "no TLS configuration for https".into(),
            ));
        };
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|_| HttpError::BadUrl(self.host.clone()))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|error| unreachable(&error))?;
        send(stream, &request).await
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &str,
) -> Result<Answer, HttpError> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| HttpError::Unreachable(error.to_string()))?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(MAX_ANSWER_BYTES)
        .read_to_end(&mut answer)
        .await
        .map_err(|error| HttpError::Unreachable(error.to_string()))?;
    parse_answer(&answer)
}

/// An HTTP/1.1 answer's status and body: `Content-Length` framed or
/// chunked.
pub fn parse_answer(answer: &[u8]) -> Result<Answer, HttpError> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(HttpError::Broken)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .ok_or(HttpError::Broken)?;
    let chunked = head.lines().any(|line| {
        line.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    let body = if chunked {
        dechunk(body).ok_or(HttpError::Broken)?
    } else {
        body.to_owned()
    };
    Ok(Answer { status, body })
}

fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_scheme_host_port_and_path() {
        let (origin, path) = Origin::of("https://relay.example.com").unwrap();
        assert_eq!(
            (origin.tls, origin.host.as_str(), origin.port),
            (true, "relay.example.com", 443)
        );
        assert_eq!(path, "/");
        let (origin, path) =
            Origin::of("http://127.0.0.1:8080/.well-known/openid-configuration").unwrap();
        assert_eq!((origin.tls, origin.port), (false, 8080));
        assert_eq!(path, "/.well-known/openid-configuration");
        assert!(Origin::of("ftp://x").is_err());
        assert!(Origin::of("https://:443").is_err());
    }

    #[test]
    fn answers_are_read_plain_or_chunked() {
        let answer = parse_answer(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\r\n{\"a\":1}",
        )
        .unwrap();
        assert_eq!((answer.status, answer.body.as_str()), (400, "{\"a\":1}"));
        let answer = parse_answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(answer.body, "{\"a\":1}");
        assert!(parse_answer(b"garbage").is_err());
    }
}
