//! Peer links between edge instances on one store: the dialling side, the
//! upstream of a hub whose device's agent is on another instance
//! ([`Peers::open_link`]); [`crate::peer_listener`] serves the other end.
//!
//! A client's session always terminates on the instance it reached. When
//! another instance holds the device's agent, the local hub's upstream is a
//! peer link to that instance's hub: one QUIC connection per pair of
//! instances (ALPN `relay-peer/1`, on a listener the public side never
//! reaches), one bidirectional stream per device, speaking MQTT 3.1.1 as it
//! would to a printer. The owner's hub counts the link as one subscriber, so
//! a printer message crosses each peer link once, whatever the number of
//! clients behind it.
//!
//! Both sides prove the cluster secret on the connection's first stream:
//! HMAC-SHA256 over a label, the sender's instance id and keying material
//! exported from the TLS session (PROTOCOL.md, "Peer links").

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dashmap::DashMap;
use relay_io::FramedReader;
use relay_proto::Secret;
use relay_proto::tunnel::{
    self, LinkAccept, LinkDownReason, Message, PEER_PROOF_LEN, PeerHello, PeerLinkOpen,
    PeerStatusQuery, close_code,
};
use relay_store::Claim;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Mutex;

use crate::hub::Unavailable;
use crate::hub::{TunnelProbe, Upstream};

/// The version of the peer handshake.
pub(crate) const PEER_VERSION: u16 = 1;

/// Time for the handshake, and for a link's first frame.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// The exporter label both sides derive their proofs from.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-relay-peer";

/// Bytes queued towards a peer hub before it is cut as a slow consumer:
/// many clients' worth, since it stands for all of them.
pub(crate) const PEER_OUTBOUND_BYTES: usize = 8 * 1024 * 1024;

/// Peer links one connection may hold at once (one per device).
const MAX_LINKS_PER_CONNECTION: u32 = 100_000;

/// How long an owner found in the store is trusted without asking again.
const OWNER_CACHE_TTL: Duration = Duration::from_secs(2);

/// What every peer link counts.
#[derive(Debug, Clone)]
pub struct PeerMetrics {
    /// Peer-link bytes, by direction (in: received by this instance).
    pub bytes: prometheus::IntCounterVec,
    /// Peer hubs this instance serves now (as the owner).
    pub served: prometheus::IntGauge,
    /// Peer connections and links refused, by reason.
    pub refusals: prometheus::IntCounterVec,
    /// Where owners were found: local, cache, store.
    pub lookups: prometheus::IntCounterVec,
}

/// This instance's side of the peer links: its identity, the connections
/// it dialled, and the owners it looked up.
pub struct Peers {
    pub(crate) instance_id: String,
    pub(crate) secret: Secret<String>,
    /// The endpoint dials come from; `None` when this instance cannot dial
    /// (no cluster secret).
    endpoint: Option<quinn::Endpoint>,
    /// Dialled connections by instance, each with its control stream,
    /// which is dropped (and so finished) with its entry.
    connections: DashMap<String, DialledPeer>,
    dialing: DashMap<String, Arc<Mutex<()>>>,
    owners: DashMap<String, (Claim, Instant)>,
    pub(crate) metrics: PeerMetrics,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("instance_id", &self.instance_id)
            .field("connections", &self.connections.len())
            .finish_non_exhaustive()
    }
}

/// The proof of `secret` that `role` (`dialer` or `listener`) named
/// `instance_id` gives on a connection with `exported` keying material.
pub(crate) fn proof(
    secret: &str,
    role: &str,
    instance_id: &str,
    exported: &[u8],
) -> ring::hmac::Tag {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(b"relay-peer ");
    context.update(role.as_bytes());
    context.update(&[0]);
    context.update(instance_id.as_bytes());
    context.update(&[0]);
    context.update(exported);
    context.sign()
}

pub(crate) fn proof_bytes(tag: ring::hmac::Tag) -> [u8; PEER_PROOF_LEN] {
    let mut bytes = [0u8; PEER_PROOF_LEN];
    bytes.copy_from_slice(&tag.as_ref()[..PEER_PROOF_LEN]);
    bytes
}

/// Whether `presented` is the proof of `secret` (compared in constant time).
pub(crate) fn proof_holds(
    secret: &str,
    role: &str,
    instance_id: &str,
    exported: &[u8],
    presented: &[u8],
) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut message = Vec::with_capacity(64 + instance_id.len() + exported.len());
    message.extend_from_slice(b"relay-peer ");
    message.extend_from_slice(role.as_bytes());
    message.push(0);
    message.extend_from_slice(instance_id.as_bytes());
    message.push(0);
    message.extend_from_slice(exported);
    ring::hmac::verify(&key, &message, presented).is_ok()
}

pub(crate) fn exported(connection: &quinn::Connection) -> Option<[u8; 32]> {
    let mut material = [0u8; 32];
    connection
        .export_keying_material(&mut material, EXPORTER_LABEL, b"")
        .ok()?;
    Some(material)
}

/// A connection this instance dialled, and the control stream its
/// handshake ran on.
#[derive(Debug)]
struct DialledPeer {
    connection: quinn::Connection,
    _control: (quinn::SendStream, FramedReader<quinn::RecvStream>),
}

/// The QUIC transport of peer connections: kept alive, and a dead peer
/// noticed within seconds (its clients' hubs then look for the device's
/// new owner).
pub(crate) fn peer_transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(4)) {
        transport.max_idle_timeout(Some(idle));
    }
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_LINKS_PER_CONNECTION));
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    Arc::new(transport)
}

pub(crate) async fn write_message(send: &mut quinn::SendStream, message: &Message) -> bool {
    let mut frame = BytesMut::new();
    tunnel::encode(message, &mut frame).is_ok() && send.write_all(&frame).await.is_ok()
}

impl Peers {
    pub fn new(
        instance_id: String,
        secret: Secret<String>,
        metrics: PeerMetrics,
    ) -> Result<Peers, crate::tls::TlsError> {
        let endpoint = if secret.expose().is_empty() {
            None
        } else {
            let bind: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 0).into();
            let mut endpoint = quinn::Endpoint::client(bind)
                .or_else(|_| quinn::Endpoint::client((std::net::Ipv4Addr::UNSPECIFIED, 0).into()))
                .map_err(|error| crate::tls::TlsError::Quic(error.to_string()))?;
            let mut client = crate::tls::peer_client_config()?;
            client.transport_config(peer_transport());
            endpoint.set_default_client_config(client);
            Some(endpoint)
        };
        Ok(Peers {
            instance_id,
            secret,
            endpoint,
            connections: DashMap::new(),
            dialing: DashMap::new(),
            owners: DashMap::new(),
            metrics,
        })
    }

    pub fn metrics(&self) -> &PeerMetrics {
        &self.metrics
    }

    /// The instance that holds `device_id`'s agent, if another live one
    /// does: from a short cache, else from the store.
    pub async fn owner_of(&self, store: &relay_store::Store, device_id: &str) -> Option<Claim> {
        if let Some(cached) = self.owners.get(device_id)
            && cached.1.elapsed() < OWNER_CACHE_TTL
            && cached.0.is_live(store.now())
        {
            self.metrics.lookups.with_label_values(&["cache"]).inc();
            return Some(cached.0.clone());
        }
        self.metrics.lookups.with_label_values(&["store"]).inc();
        let claim = store.device_claim(device_id).await.ok()??;
        if !claim.is_live(store.now()) || claim.instance_id == self.instance_id {
            self.owners.remove(device_id);
            return None;
        }
        self.owners
            .insert(device_id.to_owned(), (claim.clone(), Instant::now()));
        Some(claim)
    }

    /// Forgets the cached owner of `device_id` (it said "not here").
    pub fn forget_owner(&self, device_id: &str) {
        self.owners.remove(device_id);
    }

    /// The connection to `owner`'s instance, dialling and authenticating
    /// it when there is none.
    async fn connection(&self, owner: &Claim) -> Result<quinn::Connection, String> {
        self.connection_to(&owner.instance_id, owner.peer_address.as_deref())
            .await
    }

    /// The connection to `instance`, at `peer_address`, dialling and
    /// authenticating it when there is none.
    async fn connection_to(
        &self,
        instance: &str,
        peer_address: Option<&str>,
    ) -> Result<quinn::Connection, String> {
        let instance = &instance.to_owned();
        if let Some(peer) = self.connections.get(instance)
            && peer.connection.close_reason().is_none()
        {
            return Ok(peer.connection.clone());
        }
        let lock = self.dialing.entry(instance.clone()).or_default().clone();
        let _dialing = lock.lock().await;
        if let Some(peer) = self.connections.get(instance)
            && peer.connection.close_reason().is_none()
        {
            return Ok(peer.connection.clone());
        }
        let endpoint = self
            .endpoint
            .as_ref()
            .ok_or("no cluster secret: this instance cannot dial peers")?;
        let address: SocketAddr = peer_address
            .unwrap_or_default()
            .parse()
            .map_err(|_| format!("instance {instance} has no peer address"))?;
        let connecting = endpoint
            .connect(address, "relay-peer")
            .map_err(|error| error.to_string())?;
        let connection = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("instance {instance} at {address} did not answer"))?
            .map_err(|error| error.to_string())?;
        let material = exported(&connection).ok_or("no keying material")?;
        let (mut send, recv) = connection
            .open_bi()
            .await
            .map_err(|error| error.to_string())?;
        let hello = Message::PeerHello(PeerHello {
            version: PEER_VERSION,
            instance_id: self.instance_id.clone(),
            proof: proof_bytes(proof(
                self.secret.expose(),
                "dialer",
                &self.instance_id,
                &material,
            )),
        });
        if !write_message(&mut send, &hello).await {
            return Err("the peer closed during the handshake".into());
        }
        let mut recv = FramedReader::new(recv);
        let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT, recv.read_message())
            .await
            .map_err(|_| "the peer did not welcome us".to_owned())?;
        match reply {
            Ok(Some(Message::PeerWelcome(welcome)))
                if welcome.instance_id == *instance
                    && proof_holds(
                        self.secret.expose(),
                        "listener",
                        &welcome.instance_id,
                        &material,
                        &welcome.proof,
                    ) =>
            {
                // The control stream stays open with the connection: both
                // live in the entry, which the next dial replaces once the
                // connection is closed.
                self.connections.insert(
                    instance.clone(),
                    DialledPeer {
                        connection: connection.clone(),
                        _control: (send, recv),
                    },
                );
                tracing::info!(peer = %instance, %address, "peer connection up");
                Ok(connection)
            }
            Ok(Some(Message::HelloRefused(_))) => {
                Err(format!("instance {instance} refused our cluster secret"))
            }
            _ => {
                connection.close(
                    quinn::VarInt::from_u32(close_code::PROTOCOL_VIOLATION),
                    b"bad welcome",
                );
                Err(format!(
                    "instance {instance} did not prove the cluster secret"
                ))
            }
        }
    }

    /// Asks `instance` what it knows live of `device_ids`: each device's
    /// figures, as JSON (read by `live_status`).
    pub async fn ask_status(
        &self,
        instance: &str,
        peer_address: &str,
        device_ids: &[String],
    ) -> Result<Vec<(String, String)>, String> {
        let connection = self.connection_to(instance, Some(peer_address)).await?;
        let mut answers = Vec::new();
        for device_ids in status_query_fields(device_ids) {
            let asked = device_ids.split(',').count();
            let (mut send, recv) = connection
                .open_bi()
                .await
                .map_err(|error| error.to_string())?;
            let query = Message::PeerStatusQuery(PeerStatusQuery { device_ids });
            if !write_message(&mut send, &query).await {
                return Err("the peer closed the stream".into());
            }
            let _ = send.finish();
            let mut recv = FramedReader::new(recv);
            // One answer per device asked about, at most.
            for _ in 0..asked {
                match recv.read_message().await {
                    Ok(Some(Message::PeerStatus(status))) => {
                        answers.push((status.device_id, status.figures));
                    }
                    Ok(None) => break,
                    Ok(Some(other)) => {
                        return Err(format!("unexpected {} for a status query", other.name()));
                    }
                    Err(error) => return Err(error.to_string()),
                }
            }
        }
        Ok(answers)
    }

    /// Opens a peer link to the hub of `device_id` on `owner`'s instance.
    pub async fn open_link(
        &self,
        owner: &Claim,
        device_id: &str,
        max_packet_size: usize,
    ) -> Result<(Upstream, LinkAccept), Unavailable> {
        let connection = self.connection(owner).await.map_err(|error| {
            tracing::warn!(peer = %owner.instance_id, %error, "no peer connection");
            Unavailable::Offline
        })?;
        let (mut send, recv) = connection
            .open_bi()
            .await
            .map_err(|_| Unavailable::Offline)?;
        let open = Message::PeerLinkOpen(PeerLinkOpen {
            device_id: device_id.to_owned(),
            max_packet_size: u32::try_from(max_packet_size).ok(),
        });
        if !write_message(&mut send, &open).await {
            return Err(Unavailable::Offline);
        }
        let mut recv = FramedReader::new(recv);
        let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT * 4, recv.read_message())
            .await
            .map_err(|_| Unavailable::Printer {
                reason: LinkDownReason::TimedOut,
                detail: Some("the owning instance did not answer".into()),
            })?;
        match reply.ok().flatten() {
            Some(Message::LinkAccept(accept)) => {
                let alive: TunnelProbe = {
                    let connection = connection.clone();
                    Arc::new(move || connection.close_reason().is_none())
                };
                let (inner, buffered) = recv.into_parts();
                let reader = FramedReader::with_buffer(
                    Counted {
                        inner,
                        counter: self.metrics.bytes.with_label_values(&["in"]),
                    },
                    buffered,
                );
                let writer = Counted {
                    inner: send,
                    counter: self.metrics.bytes.with_label_values(&["out"]),
                };
                Ok((
                    Upstream::new(reader, writer, Some(alive), owner.epoch).through_hub(),
                    accept,
                ))
            }
            Some(Message::LinkRefused(refused)) if refused.reason == LinkDownReason::NotHere => {
                self.forget_owner(device_id);
                Err(Unavailable::Offline)
            }
            Some(Message::LinkRefused(refused)) => Err(Unavailable::Printer {
                reason: refused.reason,
                detail: refused.detail,
            }),
            _ => Err(Unavailable::Offline),
        }
    }
}

/// Splits device ids into PEER_STATUS_QUERY fields (each under the
/// framing's 64 KiB for a string).
pub fn status_query_fields(device_ids: &[String]) -> Vec<String> {
    const FIELD_LIMIT: usize = 60_000;
    let mut fields: Vec<String> = Vec::new();
    let mut current = String::new();
    for id in device_ids {
        if !current.is_empty() && current.len() + 1 + id.len() > FIELD_LIMIT {
            fields.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(',');
        }
        current.push_str(id);
    }
    if !current.is_empty() {
        fields.push(current);
    }
    fields
}

/// A stream half that counts its bytes.
pub(crate) struct Counted<T> {
    pub(crate) inner: T,
    pub(crate) counter: prometheus::IntCounter,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.counter.inc_by(read as u64);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = &polled {
            self.counter.inc_by(*written as u64);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_id_lists_are_split_under_the_field_limit() {
        let ids: Vec<String> = (0..10_000).map(|n| format!("device-{n:08}")).collect();
        let fields = status_query_fields(&ids);
        assert!(fields.len() > 1);
        assert!(fields.iter().all(|field| field.len() <= 60_000));
        let back: Vec<&str> = fields.iter().flat_map(|field| field.split(',')).collect();
        assert_eq!(back.len(), ids.len());
        assert!(status_query_fields(&[]).is_empty());
    }
}
