//! What the edge's end-to-end tests share: a test CA issuing certificates,
//! an edge on a fresh database with port-0 listeners, and a WebSocket MQTT
//! client (tokio-tungstenite over rustls) that speaks through real sockets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use relay_edge::{EdgeConfig, RunningEdge};
use relay_proto::mqtt::{self, Connect, Packet, ProtocolLevel};
use relay_store::testing::TestDatabase;
use relay_store::{Backend, NewApiKey, Scope};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

pub const BASE_DOMAIN: &str = "relay.test";
/// A guard against hangs; every wait in these tests normally ends in
/// milliseconds (or at a server-side timeout of about a second).
pub const PATIENCE: Duration = Duration::from_secs(15);

pub type Socket = WebSocketStream<TlsStream<TcpStream>>;

/// A throwaway certificate authority and the files it issues.
pub struct TestPki {
    pub dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Default for TestPki {
    fn default() -> TestPki {
        TestPki::new()
    }
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = std::env::temp_dir().join(format!(
            "relay-edge-test-{}",
            relay_store::credential::random_base32(10).unwrap()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "relay test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        TestPki { dir, ca }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// Issues a leaf for `names` into `<name>.crt` / `<name>.key`; returns
    /// the paths and the certificate's DER.
    pub fn issue(
        &self,
        file_name: &str,
        names: &[&str],
    ) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let cert_path = self.dir.join(format!("{file_name}.crt"));
        let key_path = self.dir.join(format!("{file_name}.key"));
        // Write beside, then rename, as an operator's tooling would.
        for (path, text) in [(&cert_path, cert.pem()), (&key_path, key.serialize_pem())] {
            let temporary = path.with_extension("tmp");
            std::fs::write(&temporary, text).unwrap();
            std::fs::rename(&temporary, path).unwrap();
        }
        (cert_path, key_path, cert.der().clone())
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An edge on a fresh Postgres database, with one tenant, one device and
/// keys to use.
pub struct TestEdge {
    pub edge: Option<RunningEdge>,
    pub pki: TestPki,
    pub database: TestDatabase,
    pub tenant: String,
    pub device: String,
    /// A control key for `device`'s tenant: (token, key id, secret).
    pub key: (String, String, String),
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// What the edge was started with (to start another like it).
    pub config: EdgeConfig,
}

impl TestEdge {
    pub async fn start() -> TestEdge {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(customize: impl FnOnce(&mut EdgeConfig)) -> TestEdge {
        let mut edge = Self::prepare_with(customize).await;
        let running = RunningEdge::start(edge.config.clone()).await.unwrap();
        edge.addr = running.public_addr.unwrap();
        edge.admin = running.admin_addr;
        edge.edge = Some(running);
        edge
    }

    /// Everything [`TestEdge::start_with`] makes (the CA, a database with a
    /// tenant, a device and a key, the configuration) but the edge: for
    /// edges run as processes. `addr` and `admin` are unset until a test
    /// points them at one.
    pub async fn prepare_with(customize: impl FnOnce(&mut EdgeConfig)) -> TestEdge {
        let pki = TestPki::new();
        let (cert, key, _) = pki.issue("server", &[&format!("*.{BASE_DOMAIN}"), BASE_DOMAIN]);
        let database = TestDatabase::new(Backend::Postgres).await;
        let (tenant, device, api_key) = provision(&database.store, "test").await;
        let mut config = EdgeConfig::defaults();
        config.public.listen = Some("127.0.0.1:0".parse().unwrap());
        config.public.base_domain = BASE_DOMAIN.into();
        config.public.tls_cert = Some(cert);
        config.public.tls_key = Some(key);
        config.public.tls_handshake_timeout_seconds = 1;
        config.public.http_header_timeout_seconds = 1;
        config.admin.listen = "127.0.0.1:0".parse().unwrap();
        config.store.database_url = database.url.as_str().into();
        config.limits.connect_timeout_seconds = 1;
        // Sessions outlive a lost upstream briefly; tests of the grace
        // itself set their own.
        config.tunnel.upstream_grace_seconds = 1;
        customize(&mut config);
        // The tunnel over TCP beside QUIC, on the same port: agents of
        // `RELAY_TEST_TRANSPORT=tcp` runs dial it.
        if config.tunnel.listen.is_some() && config.tunnel.tcp_listen.is_none() {
            config.tunnel.tcp_listen = Some("127.0.0.1:0".parse().unwrap());
        }
        let unset: SocketAddr = "0.0.0.0:0".parse().unwrap();
        TestEdge {
            addr: unset,
            admin: unset,
            edge: None,
            pki,
            database,
            tenant,
            device,
            key: api_key,
            config,
        }
    }

    /// Starts the device's hub on an in-memory upstream with `config` and
    /// returns the printer's side, played by the test packet by packet.
    pub fn scripted_printer_with(
        &self,
        config: relay_edge::hub::HubConfig,
    ) -> MqttPeer<tokio::io::DuplexStream> {
        let (hub_side, printer_side) = tokio::io::duplex(1 << 20);
        let (reader, writer) = tokio::io::split(hub_side);
        self.edge.as_ref().unwrap().hubs().start(
            self.device.clone(),
            relay_edge::hub::Upstream::from_halves(reader, writer),
            config,
            None,
            Duration::ZERO,
        );
        MqttPeer::new(printer_side)
    }

    /// [`Self::scripted_printer_with`] a hub that replays retained
    /// messages only where it saw one, and pings the printer every 30 s.
    pub fn scripted_printer(&self) -> MqttPeer<tokio::io::DuplexStream> {
        self.scripted_printer_with(relay_edge::hub::HubConfig {
            upstream_keep_alive: Duration::from_secs(30),
            linger: None,
            replay_retained: relay_edge::hub::RetainedReplay::WhenSeen,
            ..relay_edge::hub::HubConfig::new(256 * 1024)
        })
    }

    pub fn host(&self) -> String {
        format!("{}.{BASE_DOMAIN}", self.device)
    }

    /// One HTTPS request to the base domain from `source` (any loopback
    /// address), `Connection: close`: the status, the header block and
    /// the body.
    pub async fn https(
        &self,
        source: std::net::IpAddr,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &str,
    ) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        let tcp = socket.connect(self.addr).await.unwrap();
        let name = ServerName::try_from(BASE_DOMAIN).unwrap();
        let mut tls = self.client_tls().connect(name, tcp).await.unwrap();
        let mut text = format!(
            "{method} {path} HTTP/1.1\r\nHost: {BASE_DOMAIN}:{}\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            self.addr.port(),
            body.len()
        );
        for (name, value) in headers {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        text.push_str("\r\n");
        text.push_str(body);
        tls.write_all(text.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, head.to_owned(), body.to_owned())
    }

    pub fn client_tls(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.pki.ca_der()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsConnector::from(Arc::new(config))
    }

    /// TCP + TLS to the edge with `host` as SNI.
    pub async fn tls(&self, host: &str) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = ServerName::try_from(host.to_owned()).unwrap();
        self.client_tls().connect(name, tcp).await.unwrap()
    }

    /// Opens `wss://<host><path_and_query>` with extra request headers.
    pub async fn open(
        &self,
        host: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<
        (
            Socket,
            tokio_tungstenite::tungstenite::handshake::client::Response,
        ),
        WsError,
    > {
        let tls = self.tls(host).await;
        let mut request = format!("wss://{host}{path_and_query}")
            .into_client_request()
            .unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        tokio_tungstenite::client_async(request, tls).await
    }

    /// Opens `wss://<device host>/mqtt` from the loopback address `source`
    /// (any of 127.0.0.0/8), as a client at another address would.
    pub async fn open_device_from(
        &self,
        source: std::net::IpAddr,
        headers: &[(&str, &str)],
    ) -> Socket {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        let tcp = socket.connect(self.addr).await.unwrap();
        let host = self.host();
        let name = ServerName::try_from(host.clone()).unwrap();
        let tls = self.client_tls().connect(name, tcp).await.unwrap();
        let mut request = format!("wss://{host}/mqtt").into_client_request().unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        tokio_tungstenite::client_async(request, tls)
            .await
            .unwrap()
            .0
    }

    pub async fn open_device(&self, path_and_query: &str, headers: &[(&str, &str)]) -> Socket {
        self.open(&self.host(), path_and_query, headers)
            .await
            .unwrap()
            .0
    }

    /// Asserts the edge counted `times` closes with `code` (for codes a
    /// tungstenite client cannot see, such as 1014).
    pub async fn assert_closes_counted(&self, code: u16, times: u64) {
        let metrics = self.admin_get("/metrics").await.1;
        let line = format!("relay_edge_close_codes_total{{code=\"{code}\"}} {times}");
        assert!(metrics.contains(&line), "{line} missing from\n{metrics}");
    }

    /// A `Bearer` header for a new read-only key of the device's tenant.
    pub async fn read_bearer(&self) -> String {
        self.new_bearer(Scope::Read).await
    }

    /// A `Bearer` header for a new key of the device's tenant.
    pub async fn new_bearer(&self, scope: Scope) -> String {
        let (_, credential) = self
            .database
            .store
            .create_api_key(NewApiKey {
                tenant_id: &self.tenant,
                device_id: None,
                scope,
                label: "another",
                expires_at: None,
            })
            .await
            .unwrap();
        format!("Bearer {}", credential.reveal())
    }

    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.key.0)
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    pub async fn stop(mut self) {
        if let Some(edge) = self.edge.take() {
            edge.drain(Duration::from_secs(5)).await;
        }
        self.database.cleanup().await;
    }
}

/// What every test's database starts with: a tenant, a device, and a
/// tenant-wide control key labelled `label`, as (tenant id, device id,
/// (token, key id, secret)).
pub async fn provision(
    store: &relay_store::Store,
    label: &str,
) -> (String, String, (String, String, String)) {
    let tenant = store.create_tenant("acme").await.unwrap().id;
    let device = store.create_device(&tenant, "p1s").await.unwrap().id;
    let (api_key, credential) = store
        .create_api_key(NewApiKey {
            tenant_id: &tenant,
            device_id: None,
            scope: Scope::Control,
            label,
            expires_at: None,
        })
        .await
        .unwrap();
    let key = (
        credential.reveal(),
        api_key.id,
        credential.secret().to_owned(),
    );
    (tenant, device, key)
}

/// A plain HTTP/1.1 GET over TCP; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split(' ').nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub fn connect_packet(client_id: &str) -> Connect {
    Connect {
        protocol: ProtocolLevel::V3_1_1,
        bridge_mode: false,
        clean_session: true,
        keep_alive: 60,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
    }
}

pub fn encode(packet: &Packet) -> Bytes {
    let mut out = BytesMut::new();
    mqtt::encode(packet, &mut out).unwrap();
    out.freeze()
}

/// Sends CONNECT in one binary message.
pub async fn send_connect(socket: &mut Socket, connect: Connect) {
    socket
        .send(Message::Binary(encode(&Packet::Connect(connect))))
        .await
        .unwrap();
}

/// What the edge answered before closing: the CONNACK code (if a CONNACK
/// came) and the close frame's code and reason.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub connack: Option<u8>,
    pub close_code: u16,
    pub reason: String,
}

pub async fn refusal(socket: &mut Socket) -> Refusal {
    tokio::time::timeout(PATIENCE, async {
        let mut buffer = BytesMut::new();
        let mut connack = None;
        loop {
            match socket.next().await {
                Some(Ok(Message::Binary(bytes))) => {
                    buffer.extend_from_slice(&bytes);
                    if let Some(Packet::ConnAck(ack)) = mqtt::decode(&mut buffer, 1024).unwrap() {
                        connack = Some(ack.code as u8);
                    }
                }
                Some(Ok(Message::Close(Some(frame)))) => {
                    return Refusal {
                        connack,
                        close_code: u16::from(frame.code),
                        reason: frame.reason.to_string(),
                    };
                }
                Some(Ok(other)) => panic!("unexpected message {other:?}"),
                Some(Err(error)) => panic!("socket failed before the close frame: {error}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    })
    .await
    .expect("the edge answered in time")
}

pub fn refused(connack: Option<u8>, close_code: u16, reason: &str) -> Refusal {
    Refusal {
        connack,
        close_code,
        reason: reason.into(),
    }
}

/// An MQTT peer over any byte stream (a scripted printer in tests).
pub struct MqttPeer<T> {
    pub io: T,
    buffer: BytesMut,
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> MqttPeer<T> {
    pub fn new(io: T) -> Self {
        MqttPeer {
            io,
            buffer: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, packet: &Packet) {
        use tokio::io::AsyncWriteExt;
        self.io.write_all(&encode(packet)).await.unwrap();
    }

    /// The next packet, or `None` at the end of the stream. A PINGREQ is
    /// answered with PINGRESP, as a broker does, and not returned: the hub
    /// pings to learn when a SUBSCRIBE's retained messages are all through.
    pub async fn next(&mut self) -> Option<Packet> {
        use tokio::io::AsyncReadExt;
        tokio::time::timeout(PATIENCE, async {
            loop {
                if let Some(packet) = mqtt::decode(&mut self.buffer, 1 << 20).unwrap() {
                    if packet == Packet::PingReq {
                        self.send(&Packet::PingResp).await;
                        continue;
                    }
                    return Some(packet);
                }
                if self.io.read_buf(&mut self.buffer).await.unwrap() == 0 {
                    return None;
                }
            }
        })
        .await
        .expect("the peer answered in time")
    }
}

/// A client session past CONNACK 0.
pub struct Client {
    pub socket: Socket,
    buffer: BytesMut,
    /// The close frame's code and reason, once one came.
    pub closed_with: Option<(u16, String)>,
}

impl Client {
    pub async fn connect(edge: &TestEdge, authorization: &str, connect: Connect) -> Client {
        let mut socket = edge
            .open_device("/mqtt", &[("authorization", authorization)])
            .await;
        send_connect(&mut socket, connect).await;
        let mut client = Client {
            socket,
            buffer: BytesMut::new(),
            closed_with: None,
        };
        match client.next().await {
            Some(Packet::ConnAck(ack)) => assert_eq!(ack.code, mqtt::ConnectReturnCode::Accepted),
            other => panic!("expected CONNACK 0, got {other:?}"),
        }
        client
    }

    pub async fn send(&mut self, packet: &Packet) {
        self.socket
            .send(Message::Binary(encode(packet)))
            .await
            .unwrap();
    }

    /// Reads until the edge closes; returns the close code and reason.
    pub async fn closed(&mut self) -> Option<(u16, String)> {
        while self.next().await.is_some() {}
        self.closed_with.clone()
    }

    /// The next packet; `None` once the edge closed (see [`Client::closed`]).
    pub async fn next(&mut self) -> Option<Packet> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                if let Some(packet) = mqtt::decode(&mut self.buffer, 1 << 20).unwrap() {
                    return Some(packet);
                }
                match self.socket.next().await {
                    Some(Ok(Message::Binary(bytes))) => self.buffer.extend_from_slice(&bytes),
                    Some(Ok(Message::Close(frame))) => {
                        self.closed_with = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                        return None;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await
        .expect("the edge answered in time")
    }
}

/// Collects everything logged, for tests that check what the logs hold.
#[derive(Clone, Default)]
pub struct Capture(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// Installs a global subscriber that logs every level into this capture.
    pub fn install(&self) {
        let writer = self.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .init();
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// An MQTT 5 client over the edge's WebSocket, with the proto crate's MQTT
/// 5 codec: what a v5 library sends, packet by packet.
pub struct V5Client {
    pub socket: Socket,
    buffer: BytesMut,
    /// The close frame's code and reason, once one came.
    pub closed_with: Option<(u16, String)>,
}

impl V5Client {
    /// Opens a session and sends `connect`; returns the client and the
    /// edge's CONNACK (`None`: closed without one).
    pub async fn connect(
        edge: &TestEdge,
        authorization: &str,
        connect: relay_proto::mqtt5::Connect,
    ) -> (V5Client, Option<relay_proto::mqtt5::ConnAck>) {
        // An empty `authorization` sends no header at all.
        let headers = [("authorization", authorization)];
        let headers = if authorization.is_empty() {
            &headers[..0]
        } else {
            &headers[..]
        };
        let socket = edge.open_device("/mqtt", headers).await;
        let mut client = V5Client {
            socket,
            buffer: BytesMut::new(),
            closed_with: None,
        };
        client
            .send(&relay_proto::mqtt5::Packet::Connect(connect))
            .await;
        let connack = match client.next().await {
            Some(relay_proto::mqtt5::Packet::ConnAck(ack)) => Some(ack),
            None => None,
            Some(other) => panic!("expected CONNACK, got {other:?}"),
        };
        (client, connack)
    }

    /// A client over a socket that is already open (its CONNECT sent by
    /// hand).
    pub fn from_socket(socket: Socket) -> V5Client {
        V5Client {
            socket,
            buffer: BytesMut::new(),
            closed_with: None,
        }
    }

    /// A CONNECT as MQTT 5 libraries send by default.
    pub fn connect_packet(client_id: &str) -> relay_proto::mqtt5::Connect {
        relay_proto::mqtt5::Connect {
            clean_start: true,
            keep_alive: 60,
            properties: relay_proto::mqtt5::Properties::new(),
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
        }
    }

    pub async fn send(&mut self, packet: &relay_proto::mqtt5::Packet) {
        let mut bytes = BytesMut::new();
        relay_proto::mqtt5::encode(packet, &mut bytes).unwrap();
        self.socket
            .send(Message::Binary(bytes.freeze()))
            .await
            .unwrap();
    }

    /// The next packet; `None` once the edge closed.
    pub async fn next(&mut self) -> Option<relay_proto::mqtt5::Packet> {
        tokio::time::timeout(PATIENCE, self.next_within())
            .await
            .expect("the edge answered in time")
    }

    /// The next packet if one comes within `wait`; for checking that none
    /// does (a flow-control window that must hold).
    pub async fn next_within_for(
        &mut self,
        wait: std::time::Duration,
    ) -> Option<relay_proto::mqtt5::Packet> {
        tokio::time::timeout(wait, self.next_within())
            .await
            .ok()
            .flatten()
    }

    async fn next_within(&mut self) -> Option<relay_proto::mqtt5::Packet> {
        loop {
            if let Some(packet) = relay_proto::mqtt5::decode(&mut self.buffer, 1 << 20).unwrap() {
                return Some(packet);
            }
            match self.socket.next().await {
                Some(Ok(Message::Binary(bytes))) => self.buffer.extend_from_slice(&bytes),
                Some(Ok(Message::Close(frame))) => {
                    self.closed_with = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    return None;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }
}
