//! The peer listener: another instance's hub reaching a device whose agent
//! is here becomes one session of the local hub, over one stream of the
//! peer connection (the dialling side is [`crate::peer_link`]).

use std::sync::Arc;
use std::time::Duration;

use relay_io::FramedReader;
use relay_proto::mqtt::Packet;
use relay_proto::tunnel::{
    HelloRefused, LinkAccept, LinkDownReason, LinkRefused, Message, PeerStatus, PeerWelcome,
    RefusalReason, close_code,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::close::Close;
use crate::devices::Devices;
use crate::hub::{Hubs, Outbound, SessionAttach, StreamWriter, Unavailable, outbound_queue};
use crate::peer_link::{
    Counted, HANDSHAKE_TIMEOUT, PEER_OUTBOUND_BYTES, PEER_VERSION, Peers, exported, peer_transport,
    proof, proof_bytes, proof_holds, write_message,
};

/// What the peer listener reaches: the handles it is given.
#[derive(Debug, Clone)]
pub struct PeerListener {
    pub peers: Arc<Peers>,
    pub devices: Devices,
    pub hubs: Arc<Hubs>,
    /// Largest packet a peer's hub may send (`[tunnel] max_printer_packet`).
    pub max_packet: usize,
    /// What this instance knows live, for peers' status queries.
    pub live: crate::live_status::LocalStatus,
}

/// The peer listener's server configuration.
pub fn listener_config(
    certificates: &Arc<crate::tls::CertificateSource>,
) -> Result<quinn::ServerConfig, crate::tls::TlsError> {
    let mut server = quinn::ServerConfig::with_crypto(
        certificates.quic_server_config_for(relay_proto::tunnel::PEER_ALPN)?,
    );
    server.transport_config(peer_transport());
    Ok(server)
}

/// Serves the peer listener until `stop`.
pub fn spawn_listener(
    endpoint: quinn::Endpoint,
    state: PeerListener,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let connections = TaskTracker::new();
    tasks.spawn(async move {
        loop {
            let incoming = tokio::select! {
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => return,
                },
                _ = stop.cancelled() => {
                    endpoint.close(quinn::VarInt::from_u32(close_code::GOING_AWAY), b"going away");
                    connections.close();
                    let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
                    return;
                }
            };
            let state = state.clone();
            let stop = stop.clone();
            let remote = incoming.remote_address();
            let span = tracing::info_span!("peer", %remote);
            connections.spawn(
                async move {
                    match incoming.await {
                        Ok(connection) => serve_peer(connection, state, stop).await,
                        Err(error) => {
                            state
                                .peers
                                .metrics
                                .refusals
                                .with_label_values(&["handshake"])
                                .inc();
                            tracing::info!(%error, "peer handshake failed (not a peer, or the wrong protocol)");
                        }
                    }
                }
                .instrument(span),
            );
        }
    });
}

/// One peer connection: its handshake, then one link per stream.
async fn serve_peer(connection: quinn::Connection, state: PeerListener, stop: CancellationToken) {
    let refusals = &state.peers.metrics.refusals;
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, connection.accept_bi()).await;
    let Ok(Ok((mut send, recv))) = first else {
        refusals.with_label_values(&["no_hello"]).inc();
        connection.close(
            quinn::VarInt::from_u32(close_code::PROTOCOL_VIOLATION),
            b"no handshake stream",
        );
        return;
    };
    let mut recv = FramedReader::new(recv);
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, recv.read_message()).await {
        Ok(Ok(Some(Message::PeerHello(hello)))) if hello.version == PEER_VERSION => hello,
        _ => {
            refusals.with_label_values(&["no_hello"]).inc();
            tracing::warn!("peer refused: no PEER_HELLO");
            connection.close(
                quinn::VarInt::from_u32(close_code::PROTOCOL_VIOLATION),
                b"expected PEER_HELLO",
            );
            return;
        }
    };
    let secret = state.peers.secret.expose();
    let material = exported(&connection);
    let proven = !secret.is_empty()
        && material.is_some_and(|material| {
            proof_holds(
                secret,
                "dialer",
                &hello.instance_id,
                &material,
                &hello.proof,
            )
        });
    let Some(material) = material.filter(|_| proven) else {
        refusals.with_label_values(&["bad_secret"]).inc();
        tracing::warn!(claimed = %hello.instance_id, "peer refused: wrong cluster secret");
        let refused = Message::HelloRefused(HelloRefused {
            reason: RefusalReason::BadCredential,
            message: Some("wrong cluster secret".into()),
            retry_after_ms: None,
        });
        write_message(&mut send, &refused).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        connection.close(quinn::VarInt::from_u32(close_code::REFUSED), b"refused");
        return;
    };
    let welcome = Message::PeerWelcome(PeerWelcome {
        instance_id: state.peers.instance_id.clone(),
        proof: proof_bytes(proof(
            secret,
            "listener",
            &state.peers.instance_id,
            &material,
        )),
    });
    if !write_message(&mut send, &welcome).await {
        return;
    }
    tracing::info!(peer = %hello.instance_id, "peer connected");
    let links = TaskTracker::new();
    loop {
        tokio::select! {
            stream = connection.accept_bi() => match stream {
                Ok((send, recv)) => {
                    links.spawn(serve_link(send, recv, state.clone(), stop.clone()));
                }
                Err(error) => {
                    tracing::info!(peer = %hello.instance_id, %error, "peer disconnected");
                    break;
                }
            },
            _ = stop.cancelled() => break,
        }
    }
    links.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), links.wait()).await;
    drop((send, recv));
}

/// One peer link, on the instance that holds the device's agent: the
/// dialer's hub becomes one session of the local hub.
async fn serve_link(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    state: PeerListener,
    stop: CancellationToken,
) {
    let metrics = state.peers.metrics.clone();
    let mut recv = FramedReader::new(Counted {
        inner: recv,
        counter: metrics.bytes.with_label_values(&["in"]),
    });
    let open = match tokio::time::timeout(HANDSHAKE_TIMEOUT, recv.read_message()).await {
        Ok(Ok(Some(Message::PeerLinkOpen(open)))) => open,
        Ok(Ok(Some(Message::PeerStatusQuery(query)))) => {
            for (device_id, figures) in crate::live_status::answer(&state.live, &query.device_ids) {
                let status = Message::PeerStatus(PeerStatus { device_id, figures });
                if !write_message(&mut send, &status).await {
                    return;
                }
            }
            let _ = send.finish();
            return;
        }
        _ => {
            metrics.refusals.with_label_values(&["bad_link"]).inc();
            let _ = send.reset(quinn::VarInt::from_u32(close_code::PROTOCOL_VIOLATION));
            return;
        }
    };
    let refuse = |reason: LinkDownReason, detail: Option<String>| {
        Message::LinkRefused(LinkRefused {
            link: 0,
            reason,
            detail,
        })
    };
    let device_id = open.device_id;
    let (hub, printer) = match state.devices.local_hub_for(&device_id).await {
        Ok(found) => found,
        Err(unavailable) => {
            let reply = match unavailable {
                Unavailable::Offline => refuse(LinkDownReason::NotHere, None),
                Unavailable::Printer { reason, detail } => refuse(reason, detail),
            };
            write_message(&mut send, &reply).await;
            let _ = send.finish();
            return;
        }
    };
    let accept = Message::LinkAccept(LinkAccept {
        link: 0,
        printer_kind: printer.kind,
        printer_serial: printer.serial,
        // This instance's hub sends the requests on the agent's
        // registration; the peer's hub passes them on.
        printer_client_id: None,
        through_agent_hub: false,
    });
    if !write_message(&mut send, &accept).await {
        return;
    }
    let max_packet = state.max_packet;
    let session_id = state.hubs.next_session_id();
    let (outbound, mut receiver, ended) = outbound_queue(PEER_OUTBOUND_BYTES);
    let attach = SessionAttach {
        sink: outbound.clone(),
        client_id: String::new(),
        will: None,
        max_subscriptions: 100_000,
        max_unacknowledged: 60_000,
        peer: true,
        mqtt5: false,
    };
    if !hub.attach(session_id, attach).await {
        write_message(&mut send, &refuse(LinkDownReason::NotHere, None)).await;
        let _ = send.finish();
        return;
    }
    metrics.served.inc();
    tracing::info!(device = %device_id, "serving a peer hub");
    // The hub's task writes into the stream itself while the link's
    // writer is idle: a printer message crosses no task here.
    let send = Arc::new(StreamWriter::new(Counted {
        inner: send,
        counter: metrics.bytes.with_label_values(&["out"]),
    }));
    outbound.write_directly_with(send.clone());
    let mut graceful = false;
    {
        let reader = async {
            loop {
                match recv.read_packet(max_packet).await {
                    Ok(Some(Packet::PingReq)) => {
                        outbound.send_packet(&Packet::PingResp);
                    }
                    Ok(Some(Packet::Disconnect)) => {
                        graceful = true;
                        return;
                    }
                    Ok(Some(packet @ (Packet::Connect(_) | Packet::ConnAck(_)))) => {
                        outbound.end(Close::protocol(format!(
                            "unexpected {} on a peer link",
                            packet.packet_type()
                        )));
                        return;
                    }
                    Ok(Some(packet)) => {
                        if !hub.client_packet(session_id, packet).await {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => return,
                }
            }
        };
        let writer = async {
            while let Some(item) = receiver.recv().await {
                match item {
                    Outbound::Bytes(bytes) | Outbound::Direct(bytes) => {
                        if send.write_all(bytes).await.is_err() {
                            return;
                        }
                    }
                    Outbound::Flush => {
                        if send.flush().await.is_err() {
                            return;
                        }
                    }
                    // Only MQTT 5 sessions get these; a peer link is 3.1.1.
                    Outbound::Refusal(_) | Outbound::Publish5(_) => {}
                    Outbound::Close(_) => return,
                }
            }
        };
        tokio::select! {
            () = reader => {}
            () = writer => {}
            () = ended.cancelled() => {}
            () = hub.ended() => {}
            () = stop.cancelled() => {}
        }
    }
    hub.detach(session_id, graceful).await;
    // What is still queued (or was left by a direct write) is dropped, as
    // the link is ending.
    drop(receiver);
    let _ = send.with_stream(|stream| stream.inner.finish());
    metrics.served.dec();
    tracing::info!(device = %device_id, "peer hub gone");
}
