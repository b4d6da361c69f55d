//! HTTP on the public listener: routing by Host and path, the WebSocket
//! upgrade, and JSON answers for everything that is not an upgrade.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use relay_proto::Secret;
use relay_store::RequestCredentials;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::devices::{device_from_name, valid_device_label};
use crate::metrics::decrement_on_drop;
use crate::session::{self, SessionRequest};
use crate::state::{EdgeState, Refusal};

/// The MQTT WebSocket subprotocols, in our order of preference.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Everything a request handler needs.
#[derive(Clone, Debug)]
pub struct RequestContext {
    pub state: Arc<EdgeState>,
    pub peer: SocketAddr,
    pub sessions: TaskTracker,
    pub shutdown: CancellationToken,
}

pub async fn handle(
    mut request: Request<Incoming>,
    context: RequestContext,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let state = &context.state;
    let public = &state.config.public;
    if let Err(problem) = check_host(&request) {
        state
            .metrics
            .upgrades
            .with_label_values(&["bad_request"])
            .inc();
        return Ok(json(StatusCode::BAD_REQUEST, problem));
    }
    if is_base_host(request.headers(), &public.base_domain) {
        let path = request.uri().path();
        if path.starts_with("/api/") {
            return Ok(crate::tenant_api::handle(request, state, context.peer.ip()).await);
        }
        if crate::pairing::is_oauth_path(path) {
            return Ok(crate::pairing::handle(request, state, context.peer.ip()).await);
        }
        if path == "/login/oidc" && request.method() == hyper::Method::GET {
            return Ok(crate::tenant_api::oidc_login(&request, state).await);
        }
        if path == "/login/oidc/callback" && request.method() == hyper::Method::GET {
            return Ok(crate::tenant_api::oidc_callback(&request, state, context.peer.ip()).await);
        }
        if let Some(token) = path.strip_prefix("/login/")
            && request.method() == hyper::Method::GET
        {
            return Ok(crate::tenant_api::login_page(token));
        }
        if path == "/login" && request.method() == hyper::Method::POST {
            return Ok(crate::tenant_api::login(request, state, context.peer.ip()).await);
        }
        // The console, but not an MQTT client's upgrade at the root path.
        if crate::console::is_console_path(path)
            && !(path == "/" && websocket_key(request.headers()).is_some())
        {
            return Ok(crate::console::handle(request, state, context.peer.ip()).await);
        }
    }
    let device_id = match device_of(request.uri().path(), request.headers(), public) {
        Ok(device_id) => device_id,
        Err(status) => {
            state
                .metrics
                .upgrades
                .with_label_values(&["wrong_path"])
                .inc();
            return Ok(json(status, "not found"));
        }
    };
    let Some(accept_key) = websocket_key(request.headers()) else {
        state
            .metrics
            .upgrades
            .with_label_values(&["not_websocket"])
            .inc();
        return Ok(plain_request(&request, device_id, context.peer.ip(), state).await);
    };

    let (authorization, query_token) = credentials(&request);
    let subprotocol = choose_subprotocol(request.headers());
    let upgrade = hyper::upgrade::on(&mut request);
    let session_request = SessionRequest {
        device_id,
        authorization,
        query_token,
        peer_ip: context.peer.ip(),
        device_from_key: false,
        device_from_username: false,
        transport: "wss",
    };
    let span = tracing::info_span!("session", peer = %context.peer, device = session_request.device_id.as_deref().unwrap_or("-"));
    let session_state = state.clone();
    let shutdown = context.shutdown.clone();
    context.sessions.spawn(tracing::Instrument::instrument(
        async move {
            match upgrade.await {
                Ok(upgraded) => {
                    // The HTTP connection's task has handed the socket
                    // over and stopped counting it; the session counts it
                    // while it lives.
                    let open = &session_state.metrics.connections_open;
                    open.inc();
                    let _counted = decrement_on_drop(open.clone());
                    let socket = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(websocket_config(&session_state)),
                    )
                    .await;
                    session::run(socket, session_request, session_state, shutdown).await;
                }
                Err(error) => tracing::debug!(%error, "upgrade failed"),
            }
        },
        span,
    ));
    state
        .metrics
        .upgrades
        .with_label_values(&["accepted"])
        .inc();
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept_key);
    if let Some(subprotocol) = subprotocol {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, subprotocol);
    }
    Ok(response
        .body(Full::new(Bytes::new()))
        .unwrap_or_else(|_| json(StatusCode::INTERNAL_SERVER_ERROR, "internal error")))
}

/// WebSocket settings: small eager buffers (memory per idle session: the
/// read buffer is kept, zeroed, at its size for the session's life; MQTT
/// packets from clients are mostly far below 1 KiB, larger ones take more
/// reads from TLS's own buffer, not more system calls), no
/// message larger than an MQTT packet may be, and unmasked frames tolerated
/// because paho-mqtt (Python) sends its close frame unmasked.
fn websocket_config(state: &EdgeState) -> WebSocketConfig {
    let max_packet = state.config.limits.max_packet_size;
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(state.config.limits.outbound_buffer_bytes)
        .max_message_size(Some(max_packet))
        .max_frame_size(Some(max_packet))
        .accept_unmasked_frames(true)
}

/// `Sec-WebSocket-Accept` for a well-formed upgrade request, else `None`.
fn websocket_key(headers: &HeaderMap) -> Option<String> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return None;
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return None;
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|key| derive_accept_key(key.as_bytes()))
}

/// The first MQTT subprotocol the client offered, if any. Clients that offer
/// none are served anyway.
fn choose_subprotocol(headers: &HeaderMap) -> Option<&'static str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|offered| {
            SUBPROTOCOLS
                .iter()
                .copied()
                .find(|known| known.eq_ignore_ascii_case(offered.trim()))
        })
}

/// The device a request is for, from `Host: <device-id>.<base_domain>` or,
/// when `device_in_path` is on, from the path `/d/<device-id>/mqtt` (for
/// `localhost` demos and DNS without wildcards). `Ok(None)` is a right path
/// naming no device; `Err` a path that is not ours, or a host and a path
/// naming two different devices.
pub fn device_of(
    path: &str,
    headers: &HeaderMap,
    public: &crate::config::PublicConfig,
) -> Result<Option<String>, StatusCode> {
    let from_host = device_from_host(headers, &public.base_domain);
    let is_endpoint = |rest: &str| rest == public.path || (public.accept_root_path && rest == "/");
    if is_endpoint(path) {
        return Ok(from_host);
    }
    if public.device_in_path
        && let Some(rest) = path.strip_prefix("/d/")
    {
        let (label, endpoint) = rest.find('/').map_or((rest, "/"), |at| rest.split_at(at));
        let label = label.to_ascii_lowercase();
        if is_endpoint(endpoint) && valid_device_label(&label) {
            return match from_host {
                Some(host) if host != label => Err(StatusCode::NOT_FOUND),
                _ => Ok(Some(label)),
            };
        }
    }
    Err(StatusCode::NOT_FOUND)
}

/// HTTP/1.1 wants exactly one Host header (RFC 9112 §3.2: 400 otherwise),
/// and an absolute-form target must name the same host: the device a
/// request reaches is never in doubt.
fn check_host<B>(request: &Request<B>) -> Result<(), &'static str> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return Err("exactly one Host header is required");
    };
    if let Some(authority) = request.uri().authority() {
        let named = host.to_str().unwrap_or("");
        if !authority.as_str().eq_ignore_ascii_case(named) {
            return Err("the request target names another host than Host");
        }
    }
    Ok(())
}

/// Whether `Host` is the base domain itself (any port): where the tenant
/// API and the console live, and never a device's name.
pub fn is_base_host(headers: &HeaderMap, base_domain: &str) -> bool {
    headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .map(|host| {
            host.rsplit_once(':').map_or(host, |(name, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    name
                } else {
                    host
                }
            })
        })
        .is_some_and(|name| name.trim_end_matches('.').eq_ignore_ascii_case(base_domain))
}

/// The device id of `Host: <device-id>.<base_domain>[:port]`, lower-cased;
/// `None` for anything else.
pub fn device_from_host(headers: &HeaderMap, base_domain: &str) -> Option<String> {
    device_from_name(headers.get(header::HOST)?.to_str().ok()?, base_domain)
}

/// The Authorization header and the `access_token` (or `api_key`) query
/// parameter. The query string itself is never logged.
fn credentials<B>(request: &Request<B>) -> (Option<Secret<String>>, Option<Secret<String>>) {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(Secret::from);
    let query_token = request.uri().query().and_then(|query| {
        query.split('&').find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            matches!(name, "access_token" | "api_key").then(|| Secret::new(percent_decode(value)))
        })
    });
    (authorization, query_token)
}

/// Decodes `%XX` escapes and `+` in a query value.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        index += 3;
                    }
                    None => {
                        out.push(b'%');
                        index += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                index += 1;
            }
            byte => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A request that is not a WebSocket upgrade: 404 off a device host, 401
/// without valid credentials, else 426.
async fn plain_request<B>(
    request: &Request<B>,
    device_id: Option<String>,
    peer_ip: std::net::IpAddr,
    state: &EdgeState,
) -> Response<Full<Bytes>> {
    let Some(device_id) = device_id else {
        return json(StatusCode::NOT_FOUND, "not found");
    };
    let (authorization, query_token) = credentials(request);
    let credentials = RequestCredentials {
        authorization: authorization.as_ref().map(Secret::as_ref),
        query_token: query_token.as_ref().map(Secret::as_ref),
    };
    // The same gate as the WebSocket path: a plain GET is a guess too.
    match state
        .authenticate(Some(&device_id), credentials, peer_ip)
        .await
    {
        Ok(_) => json(
            StatusCode::UPGRADE_REQUIRED,
            "WebSocket upgrade required (MQTT over WebSocket)",
        ),
        Err(Refusal::RateLimited) => json(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed authentications",
        ),
        Err(Refusal::Auth(relay_store::AuthFailure::Unavailable)) => {
            json(StatusCode::SERVICE_UNAVAILABLE, "try again later")
        }
        Err(Refusal::Auth(_) | Refusal::NoDevice) => {
            let mut response = json(StatusCode::UNAUTHORIZED, "unauthorized");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"relay\", Bearer realm=\"relay\""),
            );
            response
        }
    }
}

pub fn json(status: StatusCode, error: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": error }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn devices_come_from_the_path_when_enabled() {
        let mut public = crate::config::PublicConfig {
            base_domain: "localhost".into(),
            ..Default::default()
        };
        let none = HeaderMap::new();
        assert_eq!(
            device_of("/d/abc234/mqtt", &none, &public),
            Err(StatusCode::NOT_FOUND),
            "off by default"
        );
        public.device_in_path = true;
        assert_eq!(
            device_of("/d/ABC234/mqtt", &none, &public),
            Ok(Some("abc234".into()))
        );
        assert_eq!(
            device_of("/d/abc234", &none, &public),
            Ok(Some("abc234".into()))
        );
        assert_eq!(
            device_of("/d/abc234/mqtt", &host("127.0.0.1:8443"), &public),
            Ok(Some("abc234".into()))
        );
        assert_eq!(
            device_of("/d/abc234/mqtt", &host("abc234.localhost"), &public),
            Ok(Some("abc234".into()))
        );
        assert_eq!(
            device_of("/d/abc234/mqtt", &host("other2.localhost"), &public),
            Err(StatusCode::NOT_FOUND),
            "host and path disagree"
        );
        for wrong in [
            "/d//mqtt",
            "/d/abc234/other",
            "/d/a.b/mqtt",
            "/d/",
            "/x/abc234/mqtt",
        ] {
            assert_eq!(
                device_of(wrong, &none, &public),
                Err(StatusCode::NOT_FOUND),
                "{wrong}"
            );
        }
        assert_eq!(
            device_of("/mqtt", &host("abc234.localhost"), &public),
            Ok(Some("abc234".into()))
        );
        assert_eq!(device_of("/mqtt", &none, &public), Ok(None));
    }

    #[test]
    fn devices_come_from_the_host() {
        let base = "relay.example.com";
        assert_eq!(
            device_from_host(&host("abc234.relay.example.com"), base),
            Some("abc234".into())
        );
        assert_eq!(
            device_from_host(&host("ABC234.Relay.Example.com:443"), base),
            Some("abc234".into())
        );
        assert_eq!(
            device_from_host(&host("abc234.relay.example.com."), base),
            Some("abc234".into())
        );
        assert_eq!(device_from_host(&host("relay.example.com"), base), None);
        assert_eq!(device_from_host(&host("a.b.relay.example.com"), base), None);
        assert_eq!(device_from_host(&host("abc234.evil.com"), base), None);
        assert_eq!(
            device_from_host(&host("abc234xrelay.example.com"), base),
            None
        );
        assert_eq!(device_from_host(&HeaderMap::new(), base), None);
    }

    #[test]
    fn subprotocols_echo_what_the_client_offered() {
        let offer = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(value).unwrap(),
            );
            choose_subprotocol(&headers)
        };
        assert_eq!(offer("mqtt"), Some("mqtt"));
        assert_eq!(offer("mqttv3.1"), Some("mqttv3.1"));
        assert_eq!(offer("chat, mqttv3.1"), Some("mqttv3.1"));
        assert_eq!(offer("chat"), None);
        assert_eq!(choose_subprotocol(&HeaderMap::new()), None);
    }

    #[test]
    fn query_tokens_are_percent_decoded() {
        let request = Request::builder()
            .uri("/mqtt?x=1&access_token=YWJj%3Ad%2Be%3D&other=2")
            .body(())
            .unwrap();
        assert_eq!(
            credentials(&request).1.map(Secret::into_exposed).as_deref(),
            Some("YWJj:d+e=")
        );
        let request = Request::builder()
            .uri("/mqtt?api_key=rly_a_b_c")
            .body(())
            .unwrap();
        assert_eq!(
            credentials(&request).1.map(Secret::into_exposed).as_deref(),
            Some("rly_a_b_c")
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
