//! The tunnel where UDP is blocked: the agent's `transport = "auto"` finds
//! no QUIC handshake behind a UDP black hole and comes over TLS on TCP
//! (yamux streams) within seconds, and apps work; when QUIC works again
//! the agent moves back to it and the apps stay connected; a cut TCP
//! connection is dialled again; garbage on the TCP listener is closed; a
//! HELLO flood on one connection costs one HELLO; a stalled printer link
//! does not hold up the control stream; the public listener takes agents
//! by ALPN. (The whole end-to-end suite runs over TCP too:
//! `RELAY_TEST_TRANSPORT=tcp`, run by `scripts/test`.)

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use relay_agent::config::TransportChoice;
use relay_proto::mqtt::Packet;
use relay_testkit::cut::{CuttableLink, UdpGate};
use relay_testkit::world::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A UDP socket that takes every datagram and answers none.
async fn udp_black_hole() -> std::net::SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 2048];
        while socket.recv_from(&mut buffer).await.is_ok() {}
    });
    addr
}

/// The world with its own agent gone: the test starts the one it needs.
async fn world_without_agent() -> World {
    let world = world(ACCESS_CODE).await;
    world.agent.cancel();
    let edge = world.edge.edge.as_ref().unwrap();
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .unwrap();
    world
}

fn agents_over(metrics: &str, transport: &str) -> u64 {
    let series = format!("relay_edge_agents_by_transport{{transport=\"{transport}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn a_report_reaches_an_app(world: &World) {
    let mut client =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet("app")).await;
    client.send(&subscribe_report(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    let report = next_publish(&mut client).await;
    assert_eq!(report.topic, report_topic());
}

#[tokio::test]
async fn where_udp_is_blocked_the_agent_comes_over_tcp() {
    let world = world_without_agent().await;
    let edge = world.edge.edge.as_ref().unwrap();
    let black_hole = udp_black_hole().await;
    let mut config = agent_config(
        &world.edge,
        black_hole,
        &world.simulator,
        ACCESS_CODE,
        &world.agent_credential,
    );
    config.edge.transport = TransportChoice::Auto;
    config.edge.tcp_address = Some(edge.tunnel_tcp_addr.unwrap().to_string());
    let started = Instant::now();
    let agent = start_agent(config);
    tokio::time::timeout(
        Duration::from_secs(10),
        edge.wait_online(&world.edge.device),
    )
    .await
    .expect("online over TCP within 10 s");
    println!(
        "online over TCP {:?} after the agent started (QUIC tried first)",
        started.elapsed()
    );
    let metrics = world.edge.admin_get("/metrics").await.1;
    assert_eq!(agents_over(&metrics, "tcp"), 1, "{metrics}");
    assert_eq!(agents_over(&metrics, "quic"), 0, "{metrics}");
    a_report_reaches_an_app(&world).await;
    agent.cancel();
    world.edge.stop().await;
}

#[tokio::test]
async fn when_quic_comes_back_the_agent_moves_to_it_and_apps_stay_connected() {
    let world = world_without_agent().await;
    let edge = world.edge.edge.as_ref().unwrap();
    let gate = UdpGate::start(edge.tunnel_addr.unwrap()).await;
    let mut config = agent_config(
        &world.edge,
        gate.addr,
        &world.simulator,
        ACCESS_CODE,
        &world.agent_credential,
    );
    config.edge.transport = TransportChoice::Auto;
    config.edge.tcp_address = Some(edge.tunnel_tcp_addr.unwrap().to_string());
    config.edge.quic_probe_seconds = 1;
    let agent = start_agent(config);
    let over_tcp = tokio::time::timeout(PATIENCE, edge.wait_online(&world.edge.device))
        .await
        .expect("online over TCP");
    let metrics = world.edge.admin_get("/metrics").await.1;
    assert_eq!(agents_over(&metrics, "tcp"), 1, "{metrics}");

    // An app on the TCP tunnel, subscribed to the reports.
    let mut client =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet("app")).await;
    client.send(&subscribe_report(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    next_publish(&mut client).await;

    gate.open();
    let over_quic = tokio::time::timeout(
        PATIENCE,
        edge.wait_newer_tunnel(&world.edge.device, over_tcp),
    )
    .await
    .expect("the agent moved to QUIC");
    assert!(over_quic > over_tcp);
    let metrics = world.edge.admin_get("/metrics").await.1;
    assert_eq!(agents_over(&metrics, "quic"), 1, "{metrics}");
    assert_eq!(agents_over(&metrics, "tcp"), 0, "{metrics}");

    // The same MQTT connection goes on getting reports, through the new
    // tunnel, and answers a ping: it never saw the move.
    let report = next_publish(&mut client).await;
    assert_eq!(report.topic, report_topic());
    client.send(&Packet::PingReq).await;
    loop {
        match client.next().await {
            Some(Packet::PingResp) => break,
            Some(Packet::Publish(_)) => {}
            other => panic!("the app lost its connection in the move: {other:?}"),
        }
    }
    agent.cancel();
    world.edge.stop().await;
}

#[tokio::test]
async fn a_cut_tcp_connection_is_dialled_again() {
    let world = world_without_agent().await;
    let edge = world.edge.edge.as_ref().unwrap();
    let link = CuttableLink::start(edge.tunnel_tcp_addr.unwrap()).await;
    let tunnel = edge.tunnel_addr.unwrap();
    let mut config = agent_config(
        &world.edge,
        tunnel,
        &world.simulator,
        ACCESS_CODE,
        &world.agent_credential,
    );
    config.edge.transport = TransportChoice::Tcp;
    config.edge.tcp_address = Some(link.addr.to_string());
    let agent = start_agent(config);
    let first = tokio::time::timeout(PATIENCE, edge.wait_online(&world.edge.device))
        .await
        .unwrap();
    link.cut();
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .expect("the edge saw the cut");
    link.restore();
    let second = tokio::time::timeout(PATIENCE, edge.wait_online(&world.edge.device))
        .await
        .expect("the agent dialled again");
    assert!(second > first, "a new tunnel: epoch {first} then {second}");
    a_report_reaches_an_app(&world).await;
    agent.cancel();
    world.edge.stop().await;
}

/// A TLS client of the TCP tunnel listener, with `alpn` offered.
async fn tls_to(
    addr: std::net::SocketAddr,
    world: &World,
    alpn: Option<&[u8]>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    try_tls_to(addr, world, alpn).await.unwrap()
}

/// [`tls_to`], the handshake's failure returned.
async fn try_tls_to(
    addr: std::net::SocketAddr,
    world: &World,
    alpn: Option<&[u8]>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(world.edge.pki.ca_der()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if let Some(alpn) = alpn {
        tls.alpn_protocols = vec![alpn.to_vec()];
    }
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(format!("tunnel.{BASE_DOMAIN}")).unwrap();
    connector.connect(name, tcp).await
}

/// Reads until the edge closes; what came before.
async fn closed_by_the_edge(stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) {
    let mut sink = vec![0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the edge closed the connection");
}

#[tokio::test]
async fn garbage_on_the_tcp_tunnel_listener_is_closed() {
    let world = world(ACCESS_CODE).await;
    let edge = world.edge.edge.as_ref().unwrap();
    let addr = edge.tunnel_tcp_addr.unwrap();
    // Garbage after the tunnel's ALPN: not yamux.
    let mut stream = tls_to(addr, &world, Some(relay_proto::tunnel::ALPN)).await;
    stream.write_all(&[0x42; 64 * 1024]).await.unwrap();
    closed_by_the_edge(&mut stream).await;
    // No ALPN at all: closed after the handshake.
    let mut stream = tls_to(addr, &world, None).await;
    closed_by_the_edge(&mut stream).await;
    // The device's agent (over whichever transport the suite runs) is
    // still served.
    a_report_reaches_an_app(&world).await;
    world.edge.stop().await;
}

fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn frame(message: &relay_proto::tunnel::Message) -> Vec<u8> {
    let mut bytes = bytes::BytesMut::new();
    relay_proto::tunnel::encode(message, &mut bytes).unwrap();
    bytes.to_vec()
}

fn hello(credential: &str) -> Vec<u8> {
    frame(&relay_proto::tunnel::Message::Hello(
        relay_proto::tunnel::Hello {
            version: relay_proto::tunnel::PROTOCOL_VERSION,
            credential: relay_proto::Secret::from(credential.to_owned()),
            agent_version: Some("flood".into()),
        },
    ))
}

/// One TCP tunnel connection that opens hundreds of streams, each with a
/// HELLO: the edge reads the first (the control stream) and resets the
/// rest, so the flood costs one store query and one tunnel. A second HELLO
/// on the control stream ends the tunnel.
#[tokio::test]
async fn a_hello_flood_on_one_tcp_connection_costs_one_hello() {
    use relay_io::FramedReader;
    use relay_io::mux::{Mux, MuxLimits, MuxRole};
    use relay_io::transport::TunnelConnection;
    use relay_proto::tunnel::Message;

    let world = world_without_agent().await;
    let edge = world.edge.edge.as_ref().unwrap();
    let addr = edge.tunnel_tcp_addr.unwrap();
    let queries = "relay_edge_store_queries_total ";
    let accepted = "relay_edge_agent_hellos_total{result=\"accepted\",transport=\"tcp\"} ";
    let before = world.edge.admin_get("/metrics").await.1;

    let stream = tls_to(addr, &world, Some(relay_proto::tunnel::ALPN)).await;
    let mux = Mux::start(stream, MuxRole::Client, MuxLimits::default());
    let connection = TunnelConnection::Tcp { mux, remote: addr };
    let (mut control_send, control_recv) = connection.open_bi().await.unwrap();
    control_send
        .write_all(&hello(&world.agent_credential))
        .await
        .unwrap();
    let mut control = FramedReader::new(control_recv);
    let ack = tokio::time::timeout(PATIENCE, control.read_message())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ack, Some(Message::HelloAck(_))), "{ack:?}");

    // The flood: 200 more streams (yamux allows 256 open), a HELLO on
    // each; none is answered.
    let mut flood = Vec::new();
    for _ in 0..200 {
        let (mut send, recv) = tokio::time::timeout(PATIENCE, connection.open_bi())
            .await
            .expect("a stream opens")
            .unwrap();
        if send
            .write_all(&hello(&world.agent_credential))
            .await
            .is_err()
        {
            continue;
        }
        flood.push((send, recv));
    }
    let mut answered = 0;
    for (_send, recv) in flood {
        let mut reader = FramedReader::new(recv);
        if let Ok(Ok(Some(_))) =
            tokio::time::timeout(Duration::from_millis(200), reader.read_message()).await
        {
            answered += 1;
        }
    }
    assert_eq!(answered, 0, "only the control stream's HELLO is read");
    let after = world.edge.admin_get("/metrics").await.1;
    assert_eq!(
        metric_value(&after, accepted) - metric_value(&before, accepted),
        1.0,
        "{after}"
    );
    let spent = metric_value(&after, queries) - metric_value(&before, queries);
    assert!(spent <= 2.0, "the flood cost {spent} store queries");
    assert!(edge.wait_online(&world.edge.device).await > 0);

    // Another HELLO on the control stream: a protocol error, the tunnel ends.
    control_send
        .write_all(&hello(&world.agent_credential))
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .expect("a second HELLO ends the tunnel");
    world.edge.stop().await;
}

/// With `[tunnel] tcp_on_public_listener`, an agent reaches the edge on
/// the apps' own port (443 in production): the TLS handshake's ALPN tells
/// the tunnel from wss, and both work side by side.
#[tokio::test]
async fn the_tunnel_over_tcp_shares_the_public_listener_by_alpn() {
    let world = world_with(
        ACCESS_CODE,
        |edge| edge.tunnel.tcp_on_public_listener = true,
        |_| {},
    )
    .await;
    world.agent.cancel();
    let edge = world.edge.edge.as_ref().unwrap();
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .unwrap();
    let mut config = agent_config(
        &world.edge,
        edge.tunnel_addr.unwrap(),
        &world.simulator,
        ACCESS_CODE,
        &world.agent_credential,
    );
    config.edge.transport = TransportChoice::Tcp;
    config.edge.tcp_address = Some(world.edge.addr.to_string());
    let agent = start_agent(config);
    tokio::time::timeout(PATIENCE, edge.wait_online(&world.edge.device))
        .await
        .expect("online over the public listener");
    let metrics = world.edge.admin_get("/metrics").await.1;
    assert_eq!(agents_over(&metrics, "tcp"), 1, "{metrics}");
    // Apps on the same port, with http/1.1.
    a_report_reaches_an_app(&world).await;
    // Without the setting, the public listener offers no tunnel ALPN.
    let plain = world_without_agent().await;
    // (rustls ends a handshake whose ALPN it does not speak.)
    let refused = try_tls_to(plain.edge.addr, &plain, Some(relay_proto::tunnel::ALPN)).await;
    assert!(
        refused.is_err(),
        "ALPN {:?}",
        refused.unwrap().get_ref().1.alpn_protocol()
    );
    plain.edge.stop().await;
    agent.cancel();
    world.edge.stop().await;
}

/// Head of line over TCP: a printer link nobody reads (a slow printer)
/// fills its own yamux window and stalls only itself. The edge's GO_AWAY
/// on the control stream of the same TCP connection still arrives, with
/// more than a window of the link's bytes, sent before it, unread.
#[tokio::test]
async fn a_stalled_printer_link_does_not_hold_up_the_control_stream() {
    use relay_io::FramedReader;
    use relay_io::mux::{Mux, MuxLimits, MuxRole};
    use relay_io::transport::TunnelConnection;
    use relay_proto::mqtt::{Publish, QoS};
    use relay_proto::tunnel::{LinkAccept, Message, PrinterKind};

    let mut world = world_without_agent().await;
    let addr = world.edge.edge.as_ref().unwrap().tunnel_tcp_addr.unwrap();
    let stream = tls_to(addr, &world, Some(relay_proto::tunnel::ALPN)).await;
    let mux = Mux::start(stream, MuxRole::Client, MuxLimits::default());
    let connection = TunnelConnection::Tcp { mux, remote: addr };
    let (mut control_send, control_recv) = connection.open_bi().await.unwrap();
    control_send
        .write_all(&hello(&world.agent_credential))
        .await
        .unwrap();
    let mut control = FramedReader::new(control_recv);
    let ack = control.read_message().await.unwrap();
    assert!(matches!(ack, Some(Message::HelloAck(_))), "{ack:?}");

    // An app arrives: the edge opens the printer link; this agent accepts
    // it, then never reads the link again.
    let bearer = world.edge.bearer();
    let connecting = Client::connect(&world.edge, &bearer, connect_packet("app"));
    let link = async {
        let (mut send, recv) = tokio::time::timeout(PATIENCE, connection.accept_bi())
            .await
            .unwrap()
            .unwrap();
        let mut reader = FramedReader::new(recv);
        let Some(Message::LinkOpen(open)) = reader.read_message().await.unwrap() else {
            panic!("expected LINK_OPEN");
        };
        let accept = Message::LinkAccept(LinkAccept {
            link: open.link,
            printer_kind: Some(PrinterKind::GenericMqtt),
            printer_serial: None,
            printer_client_id: None,
            through_agent_hub: false,
        });
        send.write_all(&frame(&accept)).await.unwrap();
        // (The agent made the printer's MQTT connection itself: what
        // follows on the link is the hub's traffic.)
        let (recv, _) = reader.into_parts();
        (send, recv)
    };
    let (mut app, (_link_send, link_recv)) = tokio::join!(connecting, link);

    // The app publishes about 1 MB towards the printer: four times the
    // link's window, so the edge's writes to the link block.
    let payload = bytes::Bytes::from(vec![0x5a; 60_000]);
    for _ in 0..16 {
        app.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "relay/flood".into(),
            packet_id: None,
            payload: payload.clone(),
        }))
        .await;
    }

    // The hub writes to the link until the link's window is used up.
    let written = "relay_edge_printer_bytes_total{direction=\"out\"} ";
    let stalled_at = tokio::time::timeout(PATIENCE, async {
        loop {
            let metrics = world.edge.admin_get("/metrics").await.1;
            let bytes = metric_value(&metrics, written);
            if bytes >= 200.0 * 1024.0 {
                return bytes;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the hub writes to the link");

    // The edge drains: its sessions close, then the tunnel's GO_AWAY goes
    // out on the control stream, past the stalled link.
    let running = world.edge.edge.take().unwrap();
    let link_bytes = running.metrics().printer_bytes.with_label_values(&["out"]);
    let draining = tokio::spawn(running.drain(Duration::from_secs(2)));
    let go_away = tokio::time::timeout(PATIENCE, control.read_message())
        .await
        .expect("GO_AWAY arrives while the link is stalled")
        .unwrap();
    assert!(matches!(go_away, Some(Message::GoAway(_))), "{go_away:?}");
    // The link took no more than about its window of the ~1 MB: it was
    // stalled, not slow, while the control stream went on.
    let written_bytes = link_bytes.get() as f64;
    assert!(
        written_bytes < 512.0 * 1024.0,
        "{written_bytes} bytes went into the link (first seen at {stalled_at})"
    );
    drop(link_recv);
    draining.await.unwrap();
    world.edge.database.cleanup().await;
}
