//! Everything the edge and the agent log, at every level, while apps,
//! the agent and the printer exchange credentials: no secret and no query
//! string appears.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_testkit::world;

use base64::Engine;
use relay_proto::mqtt::Packet;
use world::*;

#[tokio::test]
async fn no_secret_reaches_the_logs() {
    let capture = Capture::default();
    capture.install();

    const CLUSTER_SECRET: &str = "the cluster secret of this test";
    let mut world = world_with(
        ACCESS_CODE,
        |edge| {
            edge.cluster.peer_listen = Some("127.0.0.1:0".parse().unwrap());
            edge.cluster.secret = CLUSTER_SECRET.into();
        },
        |_| {},
    )
    .await;
    let (token, key_id, secret) = world.edge.key.clone();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{key_id}:{secret}"));
    let mut client = Client::connect(
        &world.edge,
        &format!("Basic {basic}"),
        connect_packet("app"),
    )
    .await;
    client.send(&subscribe_report(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    next_publish(&mut client).await;
    let mut socket = world
        .edge
        .open_device(&format!("/mqtt?access_token={token}"), &[])
        .await;
    send_connect(&mut socket, connect_packet("query")).await;
    drop(socket);
    // A second instance reaches the device through a peer link: both prove
    // the cluster secret, which must not show up either.
    let mut other = world.edge.config.clone();
    other.cluster.instance_id = "edge-other".into();
    other.tunnel.listen = None;
    let other = relay_edge::RunningEdge::start(other).await.unwrap();
    let home = world.edge.addr;
    world.edge.addr = other.public_addr.unwrap();
    let mut far = Client::connect(&world.edge, &world.edge.bearer(), connect_packet("far")).await;
    far.send(&subscribe_report(1)).await;
    assert!(matches!(far.next().await, Some(Packet::SubAck(_))));
    next_publish(&mut far).await;
    world.edge.addr = home;
    other.drain(std::time::Duration::from_secs(2)).await;
    // A fresh agent credential must not show up in any log either.
    let (_, rotated) = world
        .edge
        .database
        .store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    world.agent.cancel();
    world.edge.stop().await;

    let logs = capture.text();
    assert!(
        logs.contains("agent connected")
            && logs.contains("printer link open")
            && logs.contains("peer connection up"),
        "capture saw nothing:\n{logs}"
    );
    for secret_text in [
        token.as_str(),
        secret.as_str(),
        basic.as_str(),
        ACCESS_CODE,
        CLUSTER_SECRET,
        &rotated.reveal(),
    ] {
        assert!(
            !logs.contains(secret_text),
            "a secret reached the logs: {secret_text}"
        );
    }
    for query in ["access_token=", "api_key="] {
        assert!(!logs.contains(query), "a query string reached the logs");
    }
}
