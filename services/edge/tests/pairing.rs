//! Agent pairing by code (RFC 8628) through the edge's HTTPS listener, on
//! Postgres: the device authorization and token endpoints, the console's
//! code entry and decision, and the bounds on guessing: 1,000 wrong codes
//! from one address, then 1,000 from 50 addresses, are checked at most
//! the per-address and per-tenant budgets allow, and a real pairing still
//! completes.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};

use relay_edge::tenant_api::csrf_token_for;
use relay_testkit::processes::metric;
use relay_testkit::world::*;
use serde_json::Value;

/// One HTTPS request to the edge's base domain from `source`: the
/// status and the body.
async fn request(
    edge: &TestEdge,
    source: IpAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    form: &str,
) -> (u16, String) {
    let (status, _, body) = edge.https(source, method, path, headers, form).await;
    (status, body)
}

/// A signed-in console session of `tenant`: its cookie and CSRF token.
async fn session(edge: &TestEdge, tenant: &str) -> (String, String) {
    let store = &edge.database.store;
    let (link, _) = store.create_login_link(tenant, 60_000).await.unwrap();
    let opened = store
        .redeem_login_link(&link.reveal())
        .await
        .unwrap()
        .unwrap();
    let cookie = opened.credential.reveal();
    let csrf = csrf_token_for(&cookie);
    (cookie, csrf)
}

/// Enters `code` on the console's pairing page as `tenant`'s owner.
async fn enter(edge: &TestEdge, source: IpAddr, owner: &(String, String), code: &str) -> u16 {
    let (cookie, csrf) = owner;
    request(
        edge,
        source,
        "POST",
        "/pair",
        &[("Cookie", format!("relay_session={cookie}"))],
        &format!("csrf={csrf}&code={code}"),
    )
    .await
    .0
}

async fn start_pairing(edge: &TestEdge) -> Value {
    let (status, body) = request(
        edge,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        "POST",
        "/oauth/device_authorization",
        &[],
        "client_id=relay-agent",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn poll(edge: &TestEdge, device_code: &str) -> (u16, Value) {
    let (status, body) = request(
        edge,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        "POST",
        "/oauth/token",
        &[],
        &format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code&device_code={device_code}"
        ),
    )
    .await;
    (status, serde_json::from_str(&body).unwrap())
}

/// A well-formed code that is not `real`.
fn wrong_code(n: usize, real: &str) -> String {
    const ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
    let mut n = n + 7;
    loop {
        let code: String = (0..8)
            .map(|i| char::from(ALPHABET[(n / 20usize.pow(i % 4) + i as usize) % 20]))
            .collect();
        if code != real.replace('-', "") {
            return code;
        }
        n += 1;
    }
}

#[tokio::test]
async fn guessing_is_bounded_and_a_real_pairing_still_completes() {
    let edge = TestEdge::start().await;
    let store = &edge.database.store;
    let started = start_pairing(&edge).await;
    let user_code = started["user_code"].as_str().unwrap().to_owned();
    let device_code = started["device_code"].as_str().unwrap().to_owned();
    assert_eq!(started["interval"], 5);
    assert_eq!(started["expires_in"], 900);
    assert!(
        started["verification_uri_complete"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/pair?code={user_code}"))
    );
    // The agent polls: pending; at once again: slow_down, 5 s more.
    let (status, pending) = poll(&edge, &device_code).await;
    assert_eq!(
        (status, pending["error"].as_str()),
        (400, Some("authorization_pending"))
    );
    let (_, slow) = poll(&edge, &device_code).await;
    assert_eq!(slow["error"], "slow_down");
    assert_eq!(slow["interval"], 10);

    // 1,000 wrong codes from one address: 10 are checked, the rest 429.
    let attacker = store.create_tenant("attacker").await.unwrap().id;
    let attacker_session = session(&edge, &attacker).await;
    let one = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    let mut statuses = std::collections::BTreeMap::new();
    for n in 0..1_000 {
        let status = enter(&edge, one, &attacker_session, &wrong_code(n, &user_code)).await;
        *statuses.entry(status).or_insert(0) += 1;
    }
    assert_eq!(statuses.get(&404), Some(&10), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&990), "{statuses:?}");
    // 1,000 from 50 addresses, as another tenant: its 20 a minute are
    // checked, the rest 429.
    let other = store.create_tenant("botnet").await.unwrap().id;
    let other_session = session(&edge, &other).await;
    let mut statuses = std::collections::BTreeMap::new();
    for n in 0..1_000 {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 1, (n % 50 + 2) as u8));
        let status = enter(&edge, source, &other_session, &wrong_code(n, &user_code)).await;
        *statuses.entry(status).or_insert(0) += 1;
    }
    assert_eq!(statuses.get(&404), Some(&20), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&980), "{statuses:?}");
    let metrics = edge.admin_get("/metrics").await.1;
    assert_eq!(
        metric(&metrics, "relay_edge_pairing_total{result=\"code_wrong\"}"),
        30.0
    );
    assert_eq!(
        metric(
            &metrics,
            "relay_edge_pairing_total{result=\"code_limited\"}"
        ),
        1_970.0
    );

    // The owner, from another address, enters the real code (as typed:
    // lower case, no dash) and approves it for the device.
    let owner = session(&edge, &edge.tenant).await;
    let home = IpAddr::V4(Ipv4Addr::new(127, 0, 2, 1));
    let typed = user_code.to_lowercase().replace('-', "");
    assert_eq!(enter(&edge, home, &owner, &typed).await, 200);
    let (cookie, csrf) = &owner;
    let (status, page) = request(
        &edge,
        home,
        "POST",
        "/pair/decide",
        &[("Cookie", format!("relay_session={cookie}"))],
        &format!(
            "csrf={csrf}&code={typed}&decision=approve&device_id={}",
            edge.device
        ),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Approved"), "{page}");
    let (status, token) = poll(&edge, &device_code).await;
    assert_eq!(status, 200, "{token}");
    assert_eq!(token["device_id"], edge.device.as_str());
    let credential = token["access_token"].as_str().unwrap();
    assert_eq!(
        store
            .verify_agent_credential(credential)
            .await
            .unwrap()
            .unwrap(),
        edge.device
    );
    // Once: the next poll is told the pairing is used up.
    let (_, again) = poll(&edge, &device_code).await;
    assert_eq!(again["error"], "expired_token");
    // The audit log says who approved and that the agent paired, without
    // a code or the credential.
    let audit = store.audit_log(&edge.tenant, 20).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|entry| entry.action.as_str()).collect();
    assert!(
        actions.contains(&"pairing.approve") && actions.contains(&"agent.paired"),
        "{actions:?}"
    );
    let logged = format!("{audit:?}");
    assert!(!logged.contains(credential) && !logged.contains(&device_code));
    edge.stop().await;
}

#[tokio::test]
async fn a_denied_pairing_is_told_so_and_bad_requests_get_oauth_errors() {
    let edge = TestEdge::start().await;
    let started = start_pairing(&edge).await;
    let user_code = started["user_code"].as_str().unwrap().to_owned();
    let device_code = started["device_code"].as_str().unwrap().to_owned();
    let owner = session(&edge, &edge.tenant).await;
    let home = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (cookie, csrf) = &owner;
    // Without the CSRF token: refused, nothing decided.
    let (status, _) = request(
        &edge,
        home,
        "POST",
        "/pair/decide",
        &[("Cookie", format!("relay_session={cookie}"))],
        &format!("code={user_code}&decision=deny"),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = request(
        &edge,
        home,
        "POST",
        "/pair/decide",
        &[("Cookie", format!("relay_session={cookie}"))],
        &format!("csrf={csrf}&code={user_code}&decision=deny"),
    )
    .await;
    assert_eq!(status, 200);
    let (_, denied) = poll(&edge, &device_code).await;
    assert_eq!(denied["error"], "access_denied");
    // Another tenant's device cannot be the one approved.
    let second = start_pairing(&edge).await;
    let second_code = second["user_code"].as_str().unwrap();
    let stranger = edge
        .database
        .store
        .create_tenant("stranger")
        .await
        .unwrap()
        .id;
    let (stranger_cookie, stranger_csrf) = session(&edge, &stranger).await;
    let (status, _) = request(
        &edge,
        home,
        "POST",
        "/pair/decide",
        &[("Cookie", format!("relay_session={stranger_cookie}"))],
        &format!(
            "csrf={stranger_csrf}&code={second_code}&decision=approve&device_id={}",
            edge.device
        ),
    )
    .await;
    assert_eq!(status, 404);
    let (_, still) = poll(&edge, second["device_code"].as_str().unwrap()).await;
    assert_eq!(still["error"], "authorization_pending");
    // OAuth errors for what is not a device code grant.
    for (form, error) in [
        ("grant_type=password", "unsupported_grant_type"),
        ("", "invalid_request"),
    ] {
        let (status, body) = request(&edge, home, "POST", "/oauth/token", &[], form).await;
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!((status, body["error"].as_str()), (400, Some(error)));
    }
    let (_, unknown) = poll(&edge, "rlp_nothing").await;
    assert_eq!(unknown["error"], "invalid_grant");
    // Pairings per address are limited: 10 a minute.
    let mut limited = 0;
    for _ in 0..12 {
        let (status, _) = request(
            &edge,
            IpAddr::V4(Ipv4Addr::new(127, 0, 3, 1)),
            "POST",
            "/oauth/device_authorization",
            &[],
            "",
        )
        .await;
        if status == 429 {
            limited += 1;
        }
    }
    assert_eq!(limited, 2);
    edge.stop().await;
}
