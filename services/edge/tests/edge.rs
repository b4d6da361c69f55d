//! The edge end to end: real TLS with a test CA, real Postgres, a
//! WebSocket client nobody here wrote (tokio-tungstenite) carrying MQTT
//! packets, and the failure of every kind with its CONNACK and close code.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_testkit::edge as support;

use std::time::Duration;

use base64::Engine;
use futures_util::SinkExt;
use relay_proto::mqtt::{Packet, ProtocolLevel};
use relay_store::{NewApiKey, Scope};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

fn basic(user: &str, pass: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

/// Every way of presenting a valid key gets past authentication; with no
/// agent connected the device is offline: CONNACK 3, close 1013.
#[tokio::test]
async fn every_credential_form_authenticates_and_the_device_is_offline() {
    let edge = TestEdge::start().await;
    let (token, key_id, secret) = edge.key.clone();
    let offline = refused(Some(3), 1013, "device offline");

    let bearer = edge.bearer();
    let basic_header = format!("Basic {}", basic(&key_id, &secret));
    for (path, headers) in [
        ("/mqtt".to_owned(), vec![("authorization", bearer.as_str())]),
        (
            "/mqtt".to_owned(),
            vec![("authorization", basic_header.as_str())],
        ),
        (format!("/mqtt?access_token={token}"), vec![]),
        (format!("/?api_key={}", basic(&key_id, &secret)), vec![]),
    ] {
        let mut socket = edge.open_device(&path, &headers).await;
        send_connect(&mut socket, connect_packet("app")).await;
        assert_eq!(refusal(&mut socket).await, offline, "{path}");
    }

    // In CONNECT's user name and password, for clients without headers.
    let mut socket = edge.open_device("/mqtt", &[]).await;
    let mut connect = connect_packet("mqttx");
    connect.username = Some(key_id.clone());
    connect.password = Some(relay_proto::Secret::new(secret.clone().into()));
    send_connect(&mut socket, connect).await;
    assert_eq!(refusal(&mut socket).await, offline);

    assert!(
        edge.admin_get("/metrics")
            .await
            .1
            .contains("relay_edge_connacks_total{code=\"3\"} 5")
    );
    edge.stop().await;
}

#[tokio::test]
async fn a_jwt_authenticates() {
    let pki_dir = std::env::temp_dir().join(format!(
        "relay-jwks-{}",
        relay_store::credential::random_base32(8).unwrap()
    ));
    std::fs::create_dir_all(&pki_dir).unwrap();
    let jwks = pki_dir.join("jwks.json");
    let secret = b"operator signing secret, 32 bytes";
    std::fs::write(
        &jwks,
        serde_json::json!({ "keys": [{
            "kty": "oct", "kid": "k1", "alg": "HS256",
            "k": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        }]})
        .to_string(),
    )
    .unwrap();
    let jwks_path = jwks.clone();
    let edge = TestEdge::start_with(move |config| {
        config.jwt = Some(relay_edge::config::JwtSection {
            jwks_path,
            issuer: "https://issuer.test".into(),
            audience: "relay".into(),
            leeway_seconds: 0,
        });
    })
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k1".into());
    let claims = serde_json::json!({
        "iss": "https://issuer.test", "aud": "relay", "exp": exp,
        "tenant": edge.tenant, "device": edge.device, "scope": "read",
    });
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap();
    let mut socket = edge
        .open_device(&format!("/mqtt?access_token={token}"), &[])
        .await;
    send_connect(&mut socket, connect_packet("jwt")).await;
    assert_eq!(
        refusal(&mut socket).await,
        refused(Some(3), 1013, "device offline")
    );
    edge.stop().await;
    let _ = std::fs::remove_dir_all(pki_dir);
}

#[tokio::test]
async fn bad_credentials_get_connack_4_or_5_and_close_1008() {
    let edge = TestEdge::start().await;
    let (_, key_id, _) = edge.key.clone();
    let store = &edge.database.store;
    let other_tenant = store.create_tenant("other").await.unwrap().id;
    let their_device = store.create_device(&other_tenant, "a1").await.unwrap().id;
    let (_, read_key) = store
        .create_api_key(NewApiKey {
            tenant_id: &edge.tenant,
            device_id: Some(&edge.device),
            scope: Scope::Read,
            label: "",
            expires_at: None,
        })
        .await
        .unwrap();
    let unauthorized = |code| refused(Some(code), 1008, "unauthorized");

    // No credentials at all.
    let mut socket = edge.open_device("/mqtt", &[]).await;
    send_connect(&mut socket, connect_packet("a")).await;
    assert_eq!(refusal(&mut socket).await, unauthorized(5));

    // A wrong secret, a malformed key, a revoked key.
    let wrong = format!("Basic {}", basic(&key_id, "abcdefghijklmnopqrstuvwxyz"));
    let mut socket = edge
        .open_device("/mqtt", &[("authorization", &wrong)])
        .await;
    send_connect(&mut socket, connect_packet("a")).await;
    assert_eq!(refusal(&mut socket).await, unauthorized(4));
    let mut socket = edge
        .open_device("/mqtt?access_token=rly_nonsense", &[])
        .await;
    send_connect(&mut socket, connect_packet("a")).await;
    assert_eq!(refusal(&mut socket).await, unauthorized(4));

    // A valid key of this tenant against another tenant's device: exactly
    // like a wrong key.
    let their_host = format!("{their_device}.{BASE_DOMAIN}");
    let (mut socket, _) = edge
        .open(&their_host, "/mqtt", &[("authorization", &edge.bearer())])
        .await
        .unwrap();
    send_connect(&mut socket, connect_packet("a")).await;
    assert_eq!(refusal(&mut socket).await, unauthorized(4));

    // A host that names no device, and one that names no existing device.
    for host in [
        format!("www.{BASE_DOMAIN}"),
        format!("nosuchdevice1.{BASE_DOMAIN}"),
    ] {
        let (mut socket, _) = edge
            .open(&host, "/mqtt", &[("authorization", &edge.bearer())])
            .await
            .unwrap();
        send_connect(&mut socket, connect_packet("a")).await;
        assert_eq!(refusal(&mut socket).await, unauthorized(4), "{host}");
    }

    // The read-only key authenticates (publishing is refused once sessions
    // reach a device).
    let read_token = read_key.reveal();
    let mut socket = edge
        .open_device(&format!("/mqtt?access_token={read_token}"), &[])
        .await;
    send_connect(&mut socket, connect_packet("a")).await;
    assert_eq!(
        refusal(&mut socket).await,
        refused(Some(3), 1013, "device offline")
    );

    store.revoke_api_key(&key_id).await.unwrap();
    edge.edge.as_ref().unwrap();
    let metrics = edge.admin_get("/metrics").await.1;
    for line in [
        "relay_edge_auth_failures_total{reason=\"missing\"} 1",
        "relay_edge_auth_failures_total{reason=\"wrong_secret\"} 1",
        "relay_edge_auth_failures_total{reason=\"malformed\"} 1",
        "relay_edge_auth_failures_total{reason=\"wrong_device\"} 1",
        "relay_edge_auth_failures_total{reason=\"unknown_device\"} 2",
        "relay_edge_close_codes_total{code=\"1008\"} 6",
        "relay_edge_close_codes_total{code=\"1013\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    edge.stop().await;
}

#[tokio::test]
async fn repeated_failures_from_one_address_are_rate_limited() {
    let edge = TestEdge::start_with(|config| config.auth.failures_per_ip_per_minute = 2).await;
    let wrong = format!("Basic {}", basic(&edge.key.1, "abcdefghijklmnopqrstuvwxyz"));
    for _ in 0..2 {
        let mut socket = edge
            .open_device("/mqtt", &[("authorization", &wrong)])
            .await;
        send_connect(&mut socket, connect_packet("a")).await;
        assert_eq!(refusal(&mut socket).await.connack, Some(4));
    }
    // Now even the right key is turned away without a lookup.
    let mut socket = edge
        .open_device("/mqtt", &[("authorization", &edge.bearer())])
        .await;
    send_connect(&mut socket, connect_packet("a")).await;
    assert_eq!(
        refusal(&mut socket).await,
        refused(Some(5), 1008, "limit: too many failed authentications")
    );
    edge.stop().await;
}

#[tokio::test]
async fn protocol_violations_get_their_close_codes() {
    let edge = TestEdge::start().await;
    let auth = [("authorization", edge.bearer())];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(n, v)| (*n, v.as_str())).collect();

    // A protocol level after MQTT 5: CONNACK 1, then 1002.
    let mut socket = edge.open_device("/mqtt", &auth).await;
    socket
        .send(Message::Binary(
            vec![
                0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 6, 2, 0, 30, 0, 1, b'a', 0,
            ]
            .into(),
        ))
        .await
        .unwrap();
    let answer = refusal(&mut socket).await;
    assert_eq!((answer.connack, answer.close_code), (Some(1), 1002));

    // A text frame.
    let mut socket = edge.open_device("/mqtt", &auth).await;
    socket.send(Message::text("CONNECT")).await.unwrap();
    assert_eq!(
        refusal(&mut socket).await,
        refused(None, 1003, "text frames are not supported")
    );

    // A reserved packet type.
    let mut socket = edge.open_device("/mqtt", &auth).await;
    socket
        .send(Message::Binary(vec![0x00, 0x00].into()))
        .await
        .unwrap();
    assert_eq!(
        refusal(&mut socket).await,
        refused(None, 1002, "malformed MQTT: reserved packet type 0")
    );

    // Something other than CONNECT first.
    let mut socket = edge.open_device("/mqtt", &auth).await;
    socket
        .send(Message::Binary(encode(&Packet::PingReq)))
        .await
        .unwrap();
    assert_eq!(
        refusal(&mut socket).await,
        refused(None, 1002, "expected CONNECT, got PingReq")
    );

    // A packet whose header announces more than the limit, and a WebSocket
    // message larger than any packet may be.
    let mut socket = edge.open_device("/mqtt", &auth).await;
    socket
        .send(Message::Binary(vec![0x10, 0xff, 0xff, 0x7f].into()))
        .await
        .unwrap();
    assert_eq!(
        refusal(&mut socket).await,
        refused(None, 1009, "packet too large")
    );
    let mut socket = edge.open_device("/mqtt", &auth).await;
    let _ = socket
        .send(Message::Binary(vec![0u8; 70 * 1024].into()))
        .await;
    assert_eq!(
        refusal(&mut socket).await,
        refused(None, 1009, "packet too large")
    );
    edge.stop().await;
}

/// MQTT.js splits its CONNECT over many frames; the edge reassembles it.
#[tokio::test]
async fn a_connect_split_into_one_byte_messages_is_reassembled() {
    let edge = TestEdge::start().await;
    let mut socket = edge
        .open_device("/mqtt", &[("authorization", &edge.bearer())])
        .await;
    for byte in encode(&Packet::Connect(connect_packet("split"))).iter() {
        socket
            .send(Message::Binary(vec![*byte].into()))
            .await
            .unwrap();
    }
    assert_eq!(
        refusal(&mut socket).await,
        refused(Some(3), 1013, "device offline")
    );

    // MQTT 3.1 is welcome too.
    let mut socket = edge
        .open_device("/mqtt", &[("authorization", &edge.bearer())])
        .await;
    let mut connect = connect_packet("old");
    connect.protocol = ProtocolLevel::V3_1;
    send_connect(&mut socket, connect).await;
    assert_eq!(refusal(&mut socket).await.connack, Some(3));
    edge.stop().await;
}

#[tokio::test]
async fn client_ids_and_keep_alives_are_bounded() {
    let edge = TestEdge::start().await;
    let bearer = edge.bearer();
    let auth = [("authorization", bearer.as_str())];
    let mut socket = edge.open_device("/mqtt", &auth).await;
    send_connect(&mut socket, connect_packet(&"x".repeat(65))).await;
    assert_eq!(
        refusal(&mut socket).await,
        refused(Some(2), 1008, "limit: client id longer than 64 characters")
    );
    let mut socket = edge.open_device("/mqtt", &auth).await;
    let mut connect = connect_packet("");
    connect.clean_session = false;
    send_connect(&mut socket, connect).await;
    assert_eq!(refusal(&mut socket).await.connack, Some(2));
    let mut socket = edge.open_device("/mqtt", &auth).await;
    let mut connect = connect_packet("slow-pinger");
    connect.keep_alive = 301;
    send_connect(&mut socket, connect).await;
    assert_eq!(
        refusal(&mut socket).await,
        refused(Some(2), 1008, "limit: keep-alive above 300 s")
    );
    edge.stop().await;
}

#[tokio::test]
async fn a_client_that_never_sends_connect_is_closed() {
    let edge = TestEdge::start().await;
    let mut socket = edge.open_device("/mqtt", &[]).await;
    // connect_timeout_seconds = 1 in the test configuration.
    assert_eq!(
        refusal(&mut socket).await,
        refused(None, 1002, "no CONNECT in time")
    );
    edge.stop().await;
}

/// Slowloris: headers that never finish, and a TLS handshake that never
/// starts, are both cut off.
#[tokio::test]
async fn slow_clients_are_cut_off() {
    let edge = TestEdge::start().await;
    let mut tls = edge.tls(&edge.host()).await;
    tls.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(PATIENCE, tls.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "half-sent headers kept the connection open");

    let mut tcp = tokio::net::TcpStream::connect(edge.addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(PATIENCE, tcp.read(&mut byte))
        .await
        .expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)));
    let metrics = edge.admin_get("/metrics").await.1;
    assert!(
        metrics.contains("relay_edge_tls_handshake_failures_total 1"),
        "{metrics}"
    );
    edge.stop().await;
}

/// A plain GET over TLS to the device's name, with `host` as Host header.
async fn plain_get(edge: &TestEdge, host: String, extra_headers: String) -> String {
    let mut tls = edge.tls(&edge.host()).await;
    tls.write_all(
        format!("GET /mqtt HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra_headers}\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn plain_http_requests_get_json_answers() {
    let edge = TestEdge::start().await;
    let response = plain_get(&edge, edge.host(), String::new()).await;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    assert!(response.contains("{\"error\":\"unauthorized\"}"));
    let response = plain_get(
        &edge,
        edge.host(),
        format!("Authorization: {}\r\n", edge.bearer()),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 426"), "{response}");
    // A host that cannot name a device: 404. (A well-formed but unknown
    // device id gets 401 like any other, so nothing tells which exist.)
    let response = plain_get(&edge, BASE_DOMAIN.to_owned(), String::new()).await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    let response = plain_get(&edge, format!("nosuchdevice1.{BASE_DOMAIN}"), String::new()).await;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    edge.stop().await;
}

#[tokio::test]
async fn subprotocols_are_echoed_and_optional() {
    let edge = TestEdge::start().await;
    for (offered, expected) in [
        (Some("mqtt"), Some("mqtt")),
        (Some("mqttv3.1"), Some("mqttv3.1")),
        (None, None),
    ] {
        let headers: Vec<(&str, &str)> = offered
            .map(|o| ("sec-websocket-protocol", o))
            .into_iter()
            .collect();
        let (_, response) = edge.open(&edge.host(), "/mqtt", &headers).await.unwrap();
        let echoed = response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(echoed.as_deref(), expected);
    }
    // Paths other than /mqtt and / are not served.
    assert!(edge.open(&edge.host(), "/elsewhere", &[]).await.is_err());
    edge.stop().await;
}

#[tokio::test]
async fn certificates_reload_without_a_restart() {
    let edge = TestEdge::start().await;
    let peer_certificate = |tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    let before = peer_certificate(&edge.tls(&edge.host()).await);
    let (_, _, renewed) = edge.pki.issue("server", &[&format!("*.{BASE_DOMAIN}")]);
    assert_ne!(before, renewed);
    assert!(edge.edge.as_ref().unwrap().reload_certificates().unwrap());
    assert_eq!(peer_certificate(&edge.tls(&edge.host()).await), renewed);
    // Unchanged files: nothing to do.
    assert!(!edge.edge.as_ref().unwrap().reload_certificates().unwrap());
    edge.stop().await;
}

#[tokio::test]
async fn draining_fails_readiness_refuses_connections_and_closes_sessions() {
    let mut edge = TestEdge::start().await;
    assert_eq!(edge.admin_get("/readyz").await.0, 200);
    assert_eq!(edge.admin_get("/healthz").await.0, 200);
    let mut waiting = edge.open_device("/mqtt", &[]).await;
    let running = edge.edge.take().unwrap();
    running.begin_drain();
    assert_eq!(edge.admin_get("/readyz").await.0, 503);
    assert_eq!(refusal(&mut waiting).await, refused(None, 1001, "draining"));
    // The public listener is closed.
    let connected = tokio::net::TcpStream::connect(edge.addr).await;
    if let Ok(mut stream) = connected {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut byte))
            .await
            .unwrap();
        assert!(matches!(read, Ok(0) | Err(_)));
    }
    running.finish_drain(Duration::from_secs(5)).await;
    edge.database.cleanup().await;
}

/// paho-mqtt (Python) sends its close frame unmasked; the edge takes it as
/// a close, not as a protocol violation.
#[tokio::test]
async fn an_unmasked_close_from_the_client_is_tolerated() {
    let edge = TestEdge::start().await;
    let mut tls = edge.tls(&edge.host()).await;
    let request = format!(
        "GET /mqtt HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n",
        edge.host()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{head}"
    );
    // FIN + close, no mask bit, payload: code 1000.
    tls.write_all(&[0x88, 0x02, 0x03, 0xe8]).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tls.read_to_end(&mut reply)).await;
    // The edge answers with a close frame of its own, not 1002.
    assert!(reply.len() >= 2 && reply[0] == 0x88, "{reply:?}");
    if reply.len() >= 4 {
        let code = u16::from_be_bytes([reply[2], reply[3]]);
        assert_ne!(code, 1002, "treated as a protocol violation");
    }
    edge.stop().await;
}

#[tokio::test]
async fn the_optional_plain_listener_serves_ws() {
    let edge = TestEdge::start_with(|config| {
        config.public.plain_listen = Some("127.0.0.1:0".parse().unwrap())
    })
    .await;
    let plain = edge
        .edge
        .as_ref()
        .unwrap()
        .plain_addr
        .expect("plain listener bound");
    let tcp = tokio::net::TcpStream::connect(plain).await.unwrap();
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/mqtt",
            edge.host()
        ))
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", edge.bearer().parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
    socket
        .send(Message::Binary(encode(&Packet::Connect(connect_packet(
            "dev",
        )))))
        .await
        .unwrap();
    use futures_util::StreamExt;
    let mut connack = None;
    while let Some(Ok(message)) = socket.next().await {
        if let Message::Binary(bytes) = message {
            connack = Some(bytes[3]);
        }
    }
    assert_eq!(connack, Some(3));
    edge.stop().await;
}

/// Bytes sent as they are over TLS to the device's name; the response.
async fn raw_request(edge: &TestEdge, request: &str) -> String {
    let mut tls = edge.tls(&edge.host()).await;
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    response
}

/// HTTP/1.1 wants exactly one Host (RFC 9112 §3.2), and a request must not
/// name one device in its target and another in Host: all get 400.
#[tokio::test]
async fn requests_with_a_doubtful_host_get_400() {
    let edge = TestEdge::start().await;
    let host = edge.host();
    let other = format!("otherdevice1.{BASE_DOMAIN}");
    for request in [
        "GET /mqtt HTTP/1.1\r\nConnection: close\r\n\r\n".to_owned(),
        format!("GET /mqtt HTTP/1.1\r\nHost: {host}\r\nHost: {other}\r\nConnection: close\r\n\r\n"),
        format!("GET https://{other}/mqtt HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    ] {
        let response = raw_request(&edge, &request).await;
        assert!(
            response.starts_with("HTTP/1.1 400"),
            "{request:?}: {response}"
        );
    }
    // The absolute form naming the same host is fine.
    let response = raw_request(
        &edge,
        &format!("GET https://{host}/mqtt HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    edge.stop().await;
}

/// Plain HTTP guesses count against the same limit as WebSocket ones:
/// before, a GET with a key was answered 401 without limit.
#[tokio::test]
async fn plain_http_guesses_are_rate_limited_too() {
    let edge = TestEdge::start_with(|config| config.auth.failures_per_ip_per_minute = 3).await;
    let guess = |attempt| {
        format!(
            "GET /mqtt HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
            edge.host(),
            wrong_guess(&edge, attempt)
        )
    };
    for attempt in 0..3 {
        let response = raw_request(&edge, &guess(attempt)).await;
        assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    }
    let response = raw_request(&edge, &guess(3)).await;
    assert!(response.starts_with("HTTP/1.1 429"), "{response}");
    let wrong = wrong_guess(&edge, 4);
    // And the WebSocket path from the same address is limited as well.
    let mut socket = edge
        .open_device("/mqtt", &[("authorization", &wrong)])
        .await;
    send_connect(&mut socket, connect_packet("a")).await;
    assert_eq!(
        refusal(&mut socket).await,
        refused(Some(5), 1008, "limit: too many failed authentications")
    );
    let metrics = edge.admin_get("/metrics").await.1;
    assert!(
        metrics.contains(r#"relay_edge_auth_failures_total{reason="rate_limited"} 2"#),
        "{metrics}"
    );
    edge.stop().await;
}

/// A wrong secret for the test key, different each time (so that each is a
/// store lookup, not a cached refusal).
fn wrong_guess(edge: &TestEdge, attempt: u8) -> String {
    let secret = format!(
        "abcdefghijklmnopqrstuvwx{}{}",
        (b'a' + attempt / 26) as char,
        (b'a' + attempt % 26) as char
    );
    format!("Basic {}", basic(&edge.key.1, &secret))
}

async fn connack_for(socket: &mut Socket) -> Refusal {
    send_connect(socket, connect_packet("a")).await;
    refusal(socket).await
}

/// One guesser behind a NAT does not lock out everyone behind it: a key
/// the edge has already checked gets in from an address that is over its
/// failure limit (only store lookups are limited).
#[tokio::test]
async fn a_valid_cached_key_gets_in_from_a_busy_address() {
    let edge = TestEdge::start_with(|config| config.auth.failures_per_ip_per_minute = 2).await;
    let bearer = edge.bearer();
    // Authenticated (the device is offline: 3 and 1013, not a refusal).
    let in_but_offline = refused(Some(3), 1013, "device offline");
    let mut socket = edge
        .open_device("/mqtt", &[("authorization", &bearer)])
        .await;
    assert_eq!(connack_for(&mut socket).await, in_but_offline);
    for attempt in 0..3 {
        let wrong = wrong_guess(&edge, attempt);
        let mut socket = edge
            .open_device("/mqtt", &[("authorization", &wrong)])
            .await;
        let answer = connack_for(&mut socket).await;
        if attempt < 2 {
            assert_eq!(answer.connack, Some(4));
        } else {
            assert_eq!(
                answer,
                refused(Some(5), 1008, "limit: too many failed authentications")
            );
        }
    }
    // The owner's key, checked before: in, though the address is busy.
    let mut socket = edge
        .open_device("/mqtt", &[("authorization", &bearer)])
        .await;
    assert_eq!(connack_for(&mut socket).await, in_but_offline);
    edge.stop().await;
}

/// An attacker spreading one key's guesses over many addresses is limited
/// by the key id: before, 100 addresses made 100 times the guesses.
#[tokio::test]
async fn one_keys_guesses_from_many_addresses_are_limited() {
    let edge = TestEdge::start_with(|config| config.auth.failures_per_ip_per_minute = 3).await;
    let mut wrong_secret = 0;
    let mut rate_limited = 0;
    for attempt in 0..12u8 {
        let source = std::net::IpAddr::from([127, 0, 0, 10 + attempt]);
        let wrong = wrong_guess(&edge, attempt);
        let mut socket = edge
            .open_device_from(source, &[("authorization", &wrong)])
            .await;
        match connack_for(&mut socket).await.connack {
            Some(4) => wrong_secret += 1,
            Some(5) => rate_limited += 1,
            other => panic!("unexpected CONNACK {other:?}"),
        }
    }
    assert_eq!((wrong_secret, rate_limited), (3, 9));
    edge.stop().await;
}

/// The limit is exact when guesses arrive at once: each store lookup
/// reserves its place first (before, 30 allowed became 41).
#[tokio::test]
async fn concurrent_guesses_do_not_overshoot_the_limit() {
    let edge = TestEdge::start_with(|config| config.auth.failures_per_ip_per_minute = 5).await;
    let guesses = (0..24u8).map(|attempt| {
        let edge = &edge;
        async move {
            let wrong = wrong_guess(edge, attempt);
            let mut socket = edge
                .open_device("/mqtt", &[("authorization", &wrong)])
                .await;
            connack_for(&mut socket).await.connack
        }
    });
    let answers = futures_util::future::join_all(guesses).await;
    let lookups = answers.iter().filter(|code| **code == Some(4)).count();
    assert_eq!(lookups, 5, "{answers:?}");
    edge.stop().await;
}
