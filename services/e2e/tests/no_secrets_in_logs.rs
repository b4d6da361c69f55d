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
    const OIDC_SECRET: &str = "the oidc client secret of this test";
    let mut world = world_with(
        ACCESS_CODE,
        |edge| {
            edge.cluster.peer_listen = Some("127.0.0.1:0".parse().unwrap());
            edge.cluster.secret = CLUSTER_SECRET.into();
            edge.console.oidc = Some(relay_edge::config::OidcConfig {
                // Nobody listens there: the sign-in fails, and says so.
                issuer: "http://127.0.0.1:1".into(),
                client_id: "relay".into(),
                client_secret: relay_proto::Secret::new(OIDC_SECRET.into()),
                tenant_claim: "relay_tenant".into(),
                tenants: Default::default(),
                ca_file: None,
                name: "Test".into(),
            });
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
    let owned = owner_flows(&world).await;
    world.agent.cancel();
    world.edge.stop().await;

    let logs = capture.text();
    assert!(
        logs.contains("pairing started")
            && logs.contains("agent paired")
            && logs.contains("an app got its keys")
            && logs.contains("sign-in with the identity provider failed"),
        "the owner's flows logged nothing:\n{logs}"
    );
    for secret_text in &owned {
        assert!(
            !logs.contains(secret_text.as_str()),
            "a secret reached the logs: {secret_text}"
        );
    }
    assert!(
        !logs.contains(OIDC_SECRET),
        "the client secret reached the logs"
    );
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

/// An owner's flows through the console and the OAuth endpoints: a login
/// link, an agent pairing by code (approved), an app's consent and code
/// exchange, and a sign-in with the identity provider (which is down).
/// Returns every secret they handled.
async fn owner_flows(world: &World) -> Vec<String> {
    use std::net::{IpAddr, Ipv4Addr};
    let edge = &world.edge;
    let store = &edge.database.store;
    let here = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let json = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap();
    let (link, _) = store.create_login_link(&edge.tenant, 60_000).await.unwrap();
    let opened = store
        .redeem_login_link(&link.reveal())
        .await
        .unwrap()
        .unwrap();
    let cookie = opened.credential.reveal();
    let csrf = relay_edge::tenant_api::csrf_token_for(&cookie);
    let session = [("Cookie", format!("relay_session={cookie}"))];

    let (_, _, started) = edge
        .https(here, "POST", "/oauth/device_authorization", &[], "")
        .await;
    let started = json(&started);
    let device_code = started["device_code"].as_str().unwrap().to_owned();
    let user_code = started["user_code"].as_str().unwrap().to_owned();
    let (status, _, _) = edge
        .https(
            here,
            "POST",
            "/pair/decide",
            &session,
            &format!(
                "csrf={csrf}&code={user_code}&decision=approve&device_id={}",
                edge.device
            ),
        )
        .await;
    assert_eq!(status, 200);
    let (_, _, paired) = edge
        .https(
            here,
            "POST",
            "/oauth/token",
            &[],
            &format!(
                "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code&device_code={device_code}"
            ),
        )
        .await;
    let agent_credential = json(&paired)["access_token"].as_str().unwrap().to_owned();

    let app = store
        .register_app(
            "Logs",
            &["http://127.0.0.1/cb".into()],
            &[relay_store::Scope::Read],
        )
        .await
        .unwrap();
    let verifier = "a-verifier-for-the-logs-test-that-is-long-enough-0123";
    let challenge = relay_store::oauth_apps::s256_challenge(verifier);
    let (status, head, _) = edge
        .https(
            here,
            "POST",
            "/authorize",
            &session,
            &format!(
                "csrf={csrf}&response_type=code&client_id={}&redirect_uri=http%3A%2F%2F127.0.0.1%3A5%2Fcb\
                 &scope=read&state=s&code_challenge={challenge}&code_challenge_method=S256\
                 &decision=allow&device={}",
                app.id, edge.device
            ),
        )
        .await;
    assert_eq!(status, 303, "{head}");
    let code = head
        .split("code=")
        .nth(1)
        .and_then(|rest| rest.split(['&', '\r']).next())
        .unwrap()
        .to_owned();
    let (_, _, granted) = edge
        .https(
            here,
            "POST",
            "/oauth/token",
            &[],
            &format!(
                "grant_type=authorization_code&code={code}&client_id={}\
                 &redirect_uri=http%3A%2F%2F127.0.0.1%3A5%2Fcb&code_verifier={verifier}",
                app.id
            ),
        )
        .await;
    let app_key = json(&granted)["access_token"].as_str().unwrap().to_owned();

    let (status, _, _) = edge.https(here, "GET", "/login/oidc", &[], "").await;
    assert_eq!(status, 401);
    vec![
        link.reveal(),
        cookie,
        device_code,
        user_code,
        agent_credential,
        code,
        verifier.to_owned(),
        app_key,
    ]
}
