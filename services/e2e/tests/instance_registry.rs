//! The instance registry at work: edge instances on one Postgres, each with
//! its lease; a claim of a device on one instance fences the stale tunnel
//! on another (by NOTIFY, or by the periodic check when NOTIFY is missed),
//! and an instance cut off from the store fences itself.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use relay_proto::mqtt::Packet;
use relay_testkit::cut::{CuttableLink, target_of, through};
use relay_testkit::world::*;

/// A second edge instance on `world`'s store, with its own tunnel listener.
async fn second_instance(world: &World, instance_id: &str) -> relay_edge::RunningEdge {
    let mut config = world.edge.config.clone();
    config.cluster.instance_id = instance_id.into();
    config.tunnel.listen = Some("127.0.0.1:0".parse().unwrap());
    relay_edge::RunningEdge::start(config).await.unwrap()
}

/// The device's agent, again, on `tunnel`, with the same credential (as
/// the agent itself reconnecting elsewhere; a rotated credential would end
/// the first tunnel by revocation, not by the claim).
async fn another_agent(
    world: &World,
    tunnel: std::net::SocketAddr,
) -> tokio_util::sync::CancellationToken {
    start_agent(agent_config(
        &world.edge,
        tunnel,
        &world.simulator,
        ACCESS_CODE,
        &world.agent_credential,
    ))
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn fenced_count(admin: std::net::SocketAddr) -> u64 {
    metric(
        &http_get(admin, "/metrics").await.1,
        "relay_edge_tunnels_fenced_total",
    )
}

#[tokio::test]
async fn a_claim_on_another_instance_fences_the_stale_tunnel_at_once() {
    // Periodic checks every 30 s: within the test's patience, only NOTIFY
    // can do it.
    let world = world_with(
        ACCESS_CODE,
        |edge| {
            edge.cluster.instance_id = "edge-a".into();
            edge.cluster.lease_seconds = 60;
            edge.cluster.renew_seconds = 30;
        },
        |_| {},
    )
    .await;
    let store = &world.edge.database.store;
    let a = world.edge.edge.as_ref().unwrap();
    let claim = store
        .device_claim(&world.edge.device)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((claim.instance_id.as_str(), claim.epoch), ("edge-a", 1));

    let b = second_instance(&world, "edge-b").await;
    let second = another_agent(&world, b.tunnel_addr.unwrap()).await;
    tokio::time::timeout(PATIENCE, b.wait_online(&world.edge.device))
        .await
        .expect("the second agent reached edge-b");
    tokio::time::timeout(PATIENCE, a.wait_offline(&world.edge.device))
        .await
        .expect("edge-a fenced its stale tunnel");
    assert_eq!(fenced_count(a.admin_addr).await, 1);
    let claim = store
        .device_claim(&world.edge.device)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((claim.instance_id.as_str(), claim.epoch), ("edge-b", 2));
    assert!(claim.is_live(store.now()));
    // Both instances are registered and live.
    let instances = store.list_instances().await.unwrap();
    let live: Vec<&str> = instances
        .iter()
        .filter(|i| i.live)
        .map(|i| i.id.as_str())
        .collect();
    assert_eq!(live, vec!["edge-a", "edge-b"]);
    second.cancel();
    world.agent.cancel();
    b.drain(Duration::from_secs(2)).await;
    // A drained instance ends its lease: nothing routes to it.
    let b_row = store
        .list_instances()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.id == "edge-b")
        .unwrap();
    assert!(!b_row.live);
    world.edge.stop().await;
}

#[tokio::test]
async fn a_missed_announcement_is_caught_by_the_periodic_check() {
    let world = world_with(
        ACCESS_CODE,
        |edge| {
            edge.cluster.lease_seconds = 4;
            edge.cluster.renew_seconds = 1;
        },
        |_| {},
    )
    .await;
    let store = &world.edge.database.store;
    let edge = world.edge.edge.as_ref().unwrap();
    // Another instance claims the device, and its NOTIFY never comes.
    world
        .edge
        .database
        .execute("ALTER TABLE tunnels DISABLE TRIGGER tunnels_claimed")
        .await;
    store
        .renew_instance_lease("edge-elsewhere", "10.9.9.9:7444", 10_000)
        .await
        .unwrap();
    store
        .claim_device(&world.edge.device, "edge-elsewhere")
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .expect("the periodic check fenced the stale tunnel");
    assert_eq!(fenced_count(edge.admin_addr).await, 1);
    world.agent.cancel();
    world.edge.stop().await;
}

#[tokio::test]
async fn an_instance_cut_off_from_the_store_fences_itself() {
    let database_url = {
        // The world's edge reaches Postgres through a link the test cuts.
        let probe = relay_store::testing::TestDatabase::new(relay_store::Backend::Postgres).await;
        let target = target_of(&probe.url);
        probe.cleanup().await;
        target
    };
    let link = CuttableLink::start(database_url).await;
    let world = world_with(
        ACCESS_CODE,
        |edge| {
            let url = through(edge.store.database_url.expose(), link.addr);
            edge.store.database_url = url.as_str().into();
            edge.cluster.lease_seconds = 2;
            edge.cluster.renew_seconds = 1;
        },
        |_| {},
    )
    .await;
    let edge = world.edge.edge.as_ref().unwrap();
    assert_eq!(http_get(edge.admin_addr, "/readyz").await.0, 200);
    link.cut();
    tokio::time::timeout(PATIENCE, edge.wait_fenced(true))
        .await
        .expect("the instance fenced itself");
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .expect("the instance sent its agent away");
    let (status, body) = http_get(edge.admin_addr, "/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "fenced: this instance lost its lease\n")
    );
    let metrics = http_get(edge.admin_addr, "/metrics").await.1;
    assert_eq!(
        metric(
            &metrics,
            "relay_edge_instance_leases_total{result=\"lost\"}"
        ),
        1
    );
    assert!(metric(&metrics, "relay_edge_tunnels_fenced_total") >= 1);
    // Back in touch with the store, it serves again.
    link.restore();
    tokio::time::timeout(PATIENCE, edge.wait_fenced(false))
        .await
        .expect("the lease renewed");
    assert_eq!(http_get(edge.admin_addr, "/readyz").await.0, 200);
    world.agent.cancel();
    world.edge.stop().await;
}

/// A quick look at a peer link in one process: the client on edge-a, the
/// agent on edge-b.
#[tokio::test]
async fn a_client_on_one_instance_reaches_the_agent_on_another() {
    const SECRET: &str = "a cluster secret of some length";
    let mut world = world_with(
        ACCESS_CODE,
        |edge| {
            edge.cluster.instance_id = "edge-b".into();
            edge.cluster.peer_listen = Some("127.0.0.1:0".parse().unwrap());
            edge.cluster.secret = SECRET.into();
        },
        |_| {},
    )
    .await;
    let mut config = world.edge.config.clone();
    config.cluster.instance_id = "edge-a".into();
    config.tunnel.listen = None;
    let a = relay_edge::RunningEdge::start(config).await.unwrap();
    // The clients dial edge-a.
    world.edge.addr = a.public_addr.unwrap();
    let mut client = Client::connect(
        &world.edge,
        &world.edge.bearer(),
        connect_packet("app-on-a"),
    )
    .await;
    client.send(&subscribe_report(1)).await;
    assert!(
        matches!(client.next().await, Some(Packet::SubAck(_))),
        "{:?}",
        client.closed_with
    );
    next_publish(&mut client).await;
    let metrics = http_get(a.admin_addr, "/metrics").await.1;
    assert!(
        metric(&metrics, "relay_edge_peer_bytes_total{direction=\"in\"}") > 0,
        "{metrics}"
    );
    world.agent.cancel();
    a.drain(Duration::from_secs(2)).await;
    world.edge.stop().await;
}

/// A draining lone instance (no cluster: nowhere to move to) tells its
/// agents to come back after a random delay within
/// `[shutdown] agent_reconnect_spread_ms`, so that they do not all say HELLO
/// to the next process at once, and releases its claims as it ends its
/// lease; every HELLO is accepted with one store query. (Instances of a
/// cluster move their agents make-before-break instead:
/// `several_instances.rs` in the edge's tests.)
#[tokio::test]
async fn a_drain_spreads_the_agents_return_and_releases_its_claims() {
    let mut world = world_with(
        ACCESS_CODE,
        |edge| edge.shutdown.agent_reconnect_spread_ms = 1_500,
        |_| {},
    )
    .await;
    let edge = world.edge.edge.take().unwrap();
    world.agent.cancel();
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .unwrap();
    let (_, credential) = world
        .edge
        .database
        .store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    let config = agent_config(
        &world.edge,
        edge.tunnel_addr.unwrap(),
        &world.simulator,
        ACCESS_CODE,
        &credential.reveal(),
    );
    let printer = std::sync::Arc::new(config.validate().unwrap());
    // Two HELLOs, each accepted with one store query (asserted in the
    // store's tests; here the edge counts them).
    for _ in 0..2 {
        let stop = tokio_util::sync::CancellationToken::new();
        let once = tokio::spawn({
            let config = config.clone();
            let printer = printer.clone();
            let stop = stop.clone();
            async move { relay_agent::tunnel::run_once(&config, printer, None, stop).await }
        });
        tokio::time::timeout(PATIENCE, edge.wait_online(&world.edge.device))
            .await
            .unwrap();
        stop.cancel();
        once.await.unwrap();
        tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
            .await
            .unwrap();
    }
    let metrics = http_get(edge.admin_addr, "/metrics").await.1;
    assert_eq!(
        metric(
            &metrics,
            &format!(
                "relay_edge_agent_hellos_total{{result=\"accepted\",transport=\"{}\"}}",
                test_transport()
            )
        ),
        3,
        "the world's agent and these two; {metrics}"
    );
    let once = tokio::spawn({
        let config = config.clone();
        async move {
            relay_agent::tunnel::run_once(
                &config,
                printer,
                None,
                tokio_util::sync::CancellationToken::new(),
            )
            .await
        }
    });
    tokio::time::timeout(PATIENCE, edge.wait_online(&world.edge.device))
        .await
        .unwrap();
    edge.drain(Duration::from_secs(2)).await;
    let end = once.await.unwrap();
    match end {
        relay_agent::tunnel::TunnelEnd::GoAway { after } => {
            assert!(after <= Duration::from_millis(1_500), "{after:?}")
        }
        other => panic!("expected GO_AWAY, got {other}"),
    }
    // The drained instance released the claim (with its lease, in one
    // transaction).
    let claim = world
        .edge
        .database
        .store
        .device_claim(&world.edge.device)
        .await
        .unwrap()
        .unwrap();
    assert!(claim.released_at.is_some(), "{claim:?}");
    world.edge.database.cleanup().await;
}
