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

    let world = world(ACCESS_CODE).await;
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
        logs.contains("agent connected") && logs.contains("printer link open"),
        "capture saw nothing:\n{logs}"
    );
    for secret_text in [
        token.as_str(),
        secret.as_str(),
        basic.as_str(),
        ACCESS_CODE,
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
