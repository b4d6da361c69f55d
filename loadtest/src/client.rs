//! The load generator's MQTT client: MQTT 3.1.1 over WebSocket (ws or wss)
//! or straight over TLS (mqtts) for the clients under test, and over plain
//! TCP for the printer side.
//! One client code path for every target, so the relay, the direct broker
//! and the tunnel are measured with the same client. Counts the TCP bytes it
//! reads, to tell how many bytes a path carries.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use relay_proto::mqtt::{
    self, Connect, ConnectReturnCode, Packet, PacketId, ProtocolLevel, Publish, QoS, Subscribe,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Packets larger than this from a server are an error (the biggest thing
/// the scenarios send is a 4.4 KB report).
const MAX_PACKET: usize = 1 << 20;
/// Time allowed for TCP, TLS, the upgrade and CONNACK together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Where clients connect: the relay's edge, Mosquitto's WebSocket listener,
/// or rathole's public port in front of it.
#[derive(Clone)]
pub struct Target {
    /// Short name for reports: `relay`, `direct`, `rathole`.
    pub name: &'static str,
    pub addr: SocketAddr,
    /// Host header and TLS server name.
    pub host: String,
    pub path: String,
    pub tls: Option<TlsConnector>,
    /// How MQTT is carried once TCP (and TLS) are up.
    pub wire: Wire,
    /// `Authorization` headers (the relay's keys), spread over the clients
    /// by client id; empty for the baselines.
    pub authorizations: Vec<String>,
    /// Loopback source addresses (127.0.0.1, .2, …) spread over the
    /// clients by client id: the edge caps sessions per key and per
    /// address, and 10,000 clients are many users, not one.
    pub sources: u8,
}

/// How a target carries MQTT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// WebSocket binary messages at `path`; the key in the `Authorization`
    /// header.
    WebSocket,
    /// MQTT packets straight on the (TLS) stream, as mqtts apps send them;
    /// the key as the CONNECT password (user name `bblp`, as Home
    /// Assistant's Bambu Lab integration sends it).
    Mqtt,
}

impl Target {
    /// The key and the source address of `client_id`.
    fn slot(&self, client_id: &str) -> (Option<&String>, Option<std::net::IpAddr>) {
        let hash = client_id.bytes().fold(0u32, |hash, byte| {
            hash.wrapping_mul(31).wrapping_add(u32::from(byte))
        });
        let authorization = match self.authorizations.len() {
            0 => None,
            keys => self.authorizations.get(hash as usize % keys),
        };
        let source = (self.sources > 0).then(|| {
            std::net::IpAddr::from([127, 0, 0, 1 + (hash % u32::from(self.sources)) as u8])
        });
        (authorization, source)
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The authorization header is a secret: never printed.
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("host", &self.host)
            .field("tls", &self.tls.is_some())
            .field("wire", &self.wire)
            .finish()
    }
}

/// Why a client could not connect, named for the failure tables.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ConnectFailure {
    Tcp,
    Tls,
    Upgrade,
    Refused(u8),
    Closed,
    Timeout,
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectFailure::Tcp => write!(f, "tcp connect"),
            ConnectFailure::Tls => write!(f, "tls handshake"),
            ConnectFailure::Upgrade => write!(f, "websocket upgrade"),
            ConnectFailure::Refused(code) => write!(f, "CONNACK {code}"),
            ConnectFailure::Closed => write!(f, "closed before CONNACK"),
            ConnectFailure::Timeout => write!(f, "timed out"),
        }
    }
}

/// A byte counter shared by many connections.
pub type ByteCounter = Arc<AtomicU64>;

/// A TCP stream that adds what it reads to a counter.
struct Counted {
    inner: TcpStream,
    read: ByteCounter,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.read.fetch_add(read as u64, Ordering::Relaxed);
        result
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum Transport {
    WebSocket(Box<WebSocketStream<Box<dyn Io>>>),
    /// MQTT straight on a byte stream: TCP, or TLS over TCP.
    Stream(Box<dyn Io>),
}

/// One MQTT connection.
pub struct MqttClient {
    transport: Transport,
    buffer: BytesMut,
    next_packet_id: u16,
    /// The WebSocket close code the server sent, once it sent one.
    close_code: Option<u16>,
}

impl std::fmt::Debug for MqttClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttClient").finish_non_exhaustive()
    }
}

/// Refuses anything but a loopback address: the tool loads this machine
/// only.
pub fn ensure_loopback(addr: SocketAddr) -> io::Result<()> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{addr} is not a loopback address; the load test only targets this machine"
        )))
    }
}

/// CONNECT with `password` (and the user name `bblp`) when there is one.
fn connect_packet(client_id: &str, keep_alive: u16, password: Option<&str>) -> Packet {
    Packet::Connect(Connect {
        protocol: ProtocolLevel::V3_1_1,
        bridge_mode: false,
        clean_session: true,
        keep_alive,
        client_id: client_id.to_owned(),
        will: None,
        username: password.map(|_| "bblp".to_owned()),
        password: password.map(|password| Bytes::copy_from_slice(password.as_bytes()).into()),
    })
}

fn encode(packet: &Packet) -> Bytes {
    let mut out = BytesMut::new();
    // Only packets this module builds are encoded; they are all valid.
    let _ = mqtt::encode(packet, &mut out);
    out.freeze()
}

impl MqttClient {
    /// Connects to `target` (over WebSocket or straight over TLS, as its
    /// [`Wire`] says) and completes the MQTT CONNECT.
    pub async fn connect(
        target: &Target,
        client_id: &str,
        bytes_read: ByteCounter,
    ) -> Result<MqttClient, ConnectFailure> {
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            Self::connect_inner(target, client_id, bytes_read),
        )
        .await
        .unwrap_or(Err(ConnectFailure::Timeout))
    }

    async fn connect_inner(
        target: &Target,
        client_id: &str,
        bytes_read: ByteCounter,
    ) -> Result<MqttClient, ConnectFailure> {
        ensure_loopback(target.addr).map_err(|_| ConnectFailure::Tcp)?;
        let (authorization, source) = target.slot(client_id);
        let tcp = match source {
            Some(source) => {
                let socket = tokio::net::TcpSocket::new_v4().map_err(|_| ConnectFailure::Tcp)?;
                socket
                    .bind(SocketAddr::new(source, 0))
                    .map_err(|_| ConnectFailure::Tcp)?;
                socket.connect(target.addr).await
            }
            None => TcpStream::connect(target.addr).await,
        }
        .map_err(|_| ConnectFailure::Tcp)?;
        let _ = tcp.set_nodelay(true);
        let counted = Counted {
            inner: tcp,
            read: bytes_read,
        };
        let (io, scheme): (Box<dyn Io>, &str) = match &target.tls {
            Some(connector) => {
                let name =
                    ServerName::try_from(target.host.clone()).map_err(|_| ConnectFailure::Tls)?;
                let tls = connector
                    .connect(name, counted)
                    .await
                    .map_err(|_| ConnectFailure::Tls)?;
                (Box::new(tls), "wss")
            }
            None => (Box::new(counted), "ws"),
        };
        if target.wire == Wire::Mqtt {
            let password = authorization.map(|header| header.trim_start_matches("Bearer "));
            let mut client = MqttClient {
                transport: Transport::Stream(io),
                buffer: BytesMut::new(),
                next_packet_id: 1,
                close_code: None,
            };
            client.handshake(client_id, password).await?;
            return Ok(client);
        }
        let mut request = format!("{scheme}://{}{}", target.host, target.path)
            .into_client_request()
            .map_err(|_| ConnectFailure::Upgrade)?;
        let headers = request.headers_mut();
        headers.insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        if let Some(authorization) = authorization {
            headers.insert(
                "authorization",
                HeaderValue::from_str(authorization).map_err(|_| ConnectFailure::Upgrade)?,
            );
        }
        // tungstenite's default read buffer is 128 KiB, zeroed on every
        // read: at 1,000 clients that is most of this process's CPU. 8 KiB
        // holds the largest message here (4.4 KB) in one read.
        let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
        let (socket, _) = tokio_tungstenite::client_async_with_config(request, io, Some(config))
            .await
            .map_err(|_| ConnectFailure::Upgrade)?;
        let mut client = MqttClient {
            transport: Transport::WebSocket(Box::new(socket)),
            buffer: BytesMut::new(),
            next_packet_id: 1,
            close_code: None,
        };
        client.handshake(client_id, None).await?;
        Ok(client)
    }

    /// Connects over plain TCP (the printer side: Mosquitto's MQTT port).
    pub async fn connect_tcp(
        addr: SocketAddr,
        client_id: &str,
    ) -> Result<MqttClient, ConnectFailure> {
        ensure_loopback(addr).map_err(|_| ConnectFailure::Tcp)?;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|_| ConnectFailure::Tcp)?;
        let _ = tcp.set_nodelay(true);
        let mut client = MqttClient {
            transport: Transport::Stream(Box::new(tcp)),
            buffer: BytesMut::new(),
            next_packet_id: 1,
            close_code: None,
        };
        client.handshake(client_id, None).await?;
        Ok(client)
    }

    async fn handshake(
        &mut self,
        client_id: &str,
        password: Option<&str>,
    ) -> Result<(), ConnectFailure> {
        // The edge's longest keep-alive (300 s, 450 s before a silent client
        // is dropped): longer than any scenario, so clients send no PINGREQ.
        self.send(&connect_packet(client_id, 300, password))
            .await
            .map_err(|_| ConnectFailure::Closed)?;
        match self.next().await {
            Ok(Some(Packet::ConnAck(connack))) if connack.code == ConnectReturnCode::Accepted => {
                Ok(())
            }
            Ok(Some(Packet::ConnAck(connack))) => Err(ConnectFailure::Refused(connack.code as u8)),
            _ => Err(ConnectFailure::Closed),
        }
    }

    fn packet_id(&mut self) -> PacketId {
        let id = PacketId::new(self.next_packet_id).unwrap_or(PacketId::MIN);
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        id
    }

    /// Subscribes to one filter and waits for the SUBACK (messages that
    /// arrive first are dropped).
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> io::Result<()> {
        let packet_id = self.packet_id();
        self.send(&Packet::Subscribe(Subscribe {
            packet_id,
            filters: vec![(filter.to_owned(), qos)],
        }))
        .await?;
        loop {
            match self.next().await? {
                Some(Packet::SubAck(suback)) if suback.packet_id == packet_id => return Ok(()),
                Some(_) => {}
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    }

    /// Publishes; returns the packet id for QoS 1.
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: QoS,
        payload: Bytes,
    ) -> io::Result<Option<PacketId>> {
        let packet_id = (qos != QoS::AtMostOnce).then(|| self.packet_id());
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.to_owned(),
            packet_id,
            payload,
        }))
        .await?;
        Ok(packet_id)
    }

    pub async fn send(&mut self, packet: &Packet) -> io::Result<()> {
        let bytes = encode(packet);
        match &mut self.transport {
            Transport::WebSocket(socket) => socket
                .send(Message::Binary(bytes))
                .await
                .map_err(io::Error::other),
            Transport::Stream(stream) => stream.write_all(&bytes).await,
        }
    }

    /// The next packet; `None` when the connection closed.
    pub async fn next(&mut self) -> io::Result<Option<Packet>> {
        loop {
            if let Some(packet) =
                mqtt::decode(&mut self.buffer, MAX_PACKET).map_err(io::Error::other)?
            {
                return Ok(Some(packet));
            }
            match &mut self.transport {
                Transport::WebSocket(socket) => match socket.next().await {
                    Some(Ok(Message::Binary(data))) => self.buffer.extend_from_slice(&data),
                    // A close frame: reading on lets the WebSocket layer send
                    // its reply, as browsers and MQTT.js do at once; the
                    // stream ends after that.
                    None => return Ok(None),
                    Some(Ok(Message::Close(frame))) => {
                        self.close_code = frame.map(|frame| u16::from(frame.code));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(io::Error::other(error)),
                },
                Transport::Stream(stream) => {
                    if stream.read_buf(&mut self.buffer).await? == 0 {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// The WebSocket close code the server sent (1001 when it drains).
    pub fn close_code(&self) -> Option<u16> {
        self.close_code
    }

    /// Closes with DISCONNECT and a WebSocket close.
    pub async fn disconnect(mut self) {
        let _ = self.send(&Packet::Disconnect).await;
        match &mut self.transport {
            Transport::WebSocket(socket) => {
                let _ = WebSocketStream::close(socket.as_mut(), None).await;
            }
            Transport::Stream(stream) => {
                let _ = stream.shutdown().await;
            }
        }
    }
}
