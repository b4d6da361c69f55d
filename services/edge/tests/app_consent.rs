//! An app asks the owner for access (OAuth 2.0 authorization code with
//! PKCE), driven by a third-party OAuth client (Python's authlib) and
//! headless Chromium (Selenium) that clicks Allow on the consent page. The
//! key the app gets reaches the printer over wss. Then every refusal: a
//! redirect URI not registered exactly, an unknown app, no PKCE or plain
//! PKCE, scope escalation, a wrong verifier, another app's code, a code
//! used twice (its keys are revoked and the app's session ends), and a
//! denial, each with the app's `state` sent back.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;

use relay_edge::tenant_api::csrf_token_for;
use relay_store::Scope;
use relay_store::oauth_apps::s256_challenge;
use relay_testkit::client_tools::client_tools;
use relay_testkit::world::*;
use serde_json::Value;

/// authlib makes the authorization URL (state, PKCE S256), Chromium signs
/// in and clicks Allow for the device, authlib exchanges the code it was
/// sent back with. `sys.argv`: base URL, login link, client id, redirect
/// URI, device id, CA file, screenshots. Prints the token as JSON.
const APP: &str = r#"
import json, socket, sys
real_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    # No DNS for the test's domain: as Chromium's host resolver rules do.
    return real_getaddrinfo("127.0.0.1" if host == "relay.test" else host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo

from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base, login, client_id, redirect_uri, device, ca, shots = sys.argv[1:8]
app = OAuth2Session(client_id, redirect_uri=redirect_uri, scope="read",
                    code_challenge_method="S256")
verifier = generate_token(48)
url, state = app.create_authorization_url(base + "/authorize", code_verifier=verifier)

options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--ignore-certificate-errors", "--window-size=1280,900",
                 "--host-resolver-rules=MAP relay.test 127.0.0.1"]:
    options.add_argument(argument)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.get(login)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "status-" + device))
    driver.get(url)
    asked = driver.find_element(By.TAG_NAME, "main").text
    driver.find_element(By.ID, "device-" + device).click()
    driver.save_screenshot(f"{shots}/app-consent.png")
    driver.find_element(By.ID, "allow").click()
    try:
        WebDriverWait(driver, 10).until(lambda d: d.current_url.startswith(redirect_uri))
    except Exception:
        sys.exit("not sent back: at " + driver.current_url + ": " + driver.find_element(By.TAG_NAME, "body").text)
    back = driver.current_url
finally:
    driver.quit()
token = app.fetch_token(base + "/oauth/token", authorization_response=back,
                        code_verifier=verifier, verify=ca)
print(json.dumps({"asked": asked, "token": dict(token)}), flush=True)
"#;

const REDIRECT: &str = "http://127.0.0.1:8765/callback";
const VERIFIER: &str = "the-verifier-of-an-app-that-is-long-enough-0123456789";

/// The owner's console session: cookie and CSRF token.
async fn owner_session(edge: &TestEdge) -> (String, String) {
    let store = &edge.database.store;
    let (link, _) = store.create_login_link(&edge.tenant, 60_000).await.unwrap();
    let opened = store
        .redeem_login_link(&link.reveal())
        .await
        .unwrap()
        .unwrap();
    let cookie = opened.credential.reveal();
    let csrf = csrf_token_for(&cookie);
    (cookie, csrf)
}

fn location(head: &str) -> Option<String> {
    head.lines()
        .find_map(|line| {
            line.strip_prefix("location: ")
                .or(line.strip_prefix("Location: "))
        })
        .map(str::to_owned)
}

/// `/authorize` with `query` as the owner: the status and where it sends
/// the owner's browser.
async fn authorize(edge: &TestEdge, cookie: &str, query: &str) -> (u16, Option<String>, String) {
    let (status, head, body) = edge
        .https(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "GET",
            &format!("/authorize?{query}"),
            &[("Cookie", format!("relay_session={cookie}"))],
            "",
        )
        .await;
    (status, location(&head), body)
}

/// The consent form posted: allow for `device`, or deny.
async fn decide(
    edge: &TestEdge,
    (cookie, csrf): &(String, String),
    query: &str,
    decision: &str,
    device: &str,
) -> Option<String> {
    let (status, head, body) = edge
        .https(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "POST",
            "/authorize",
            &[("Cookie", format!("relay_session={cookie}"))],
            &format!("csrf={csrf}&{query}&decision={decision}&device={device}"),
        )
        .await;
    assert_eq!(status, 303, "{body}");
    location(&head)
}

fn query_of(client: &str, scope: &str, challenge: &str, method: &str) -> String {
    format!(
        "response_type=code&client_id={client}&redirect_uri=http%3A%2F%2F127.0.0.1%3A8765%2Fcallback\
         &scope={scope}&state=s-42&code_challenge={challenge}&code_challenge_method={method}"
    )
}

fn code_in(location: &str) -> String {
    let query = location.split_once('?').unwrap().1;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("code="))
        .unwrap()
        .to_owned()
}

async fn exchange(edge: &TestEdge, code: &str, client: &str, verifier: &str) -> (u16, Value) {
    let (status, _, body) = edge
        .https(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "POST",
            "/oauth/token",
            &[],
            &format!(
                "grant_type=authorization_code&code={code}&client_id={client}\
                 &redirect_uri=http%3A%2F%2F127.0.0.1%3A8765%2Fcallback&code_verifier={verifier}"
            ),
        )
        .await;
    (status, serde_json::from_str(&body).unwrap())
}

#[tokio::test]
async fn an_app_gets_a_device_bound_key_with_the_owners_consent() {
    let world = world(ACCESS_CODE).await;
    let edge = &world.edge;
    let store = &edge.database.store;
    let app = store
        .register_app("Print Watch", &[REDIRECT.into()], &[Scope::Read])
        .await
        .unwrap();

    // authlib and Chromium: sign in, Allow, exchange.
    let (link, _) = store
        .create_login_link(&edge.tenant, 15 * 60_000)
        .await
        .unwrap();
    let port = edge.addr.port();
    let base = format!("https://{BASE_DOMAIN}:{port}");
    let ca = write(&edge.pki.dir, "app-ca.pem", &edge.pki.ca_pem());
    let script = write(&edge.pki.dir, "app.py", APP);
    let shots = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let output = tokio::process::Command::new(client_tools().join("venv/bin/python"))
        .arg(&script)
        .args([
            &base,
            &format!("{base}/login/{}", link.reveal()),
            &app.id,
            REDIRECT,
            &edge.device,
        ])
        .arg(&ca)
        .arg(&shots)
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "the app's script failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let said: Value = serde_json::from_slice(&output.stdout).unwrap();
    let asked = said["asked"].as_str().unwrap();
    assert!(
        asked.contains("Print Watch") && asked.contains("(read)"),
        "{asked}"
    );
    let token = &said["token"];
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["scope"], "read");
    assert_eq!(token["device_id"], edge.device.as_str());
    let key = token["access_token"].as_str().unwrap().to_owned();
    assert!(key.starts_with("rly_"));
    // The key: bound to the device, read-only, labelled and listed as the
    // app's, and it reaches the printer over wss.
    let keys = store.list_api_keys(Some(&edge.tenant)).await.unwrap();
    let stored = keys.iter().find(|k| key.contains(&k.id)).unwrap();
    assert_eq!(stored.device_id.as_deref(), Some(edge.device.as_str()));
    assert_eq!(
        (stored.scope, stored.label.as_str()),
        (Scope::Read, "Print Watch")
    );
    assert_eq!(store.app_grants(&edge.tenant).await.unwrap().len(), 1);
    let mut client = Client::connect(edge, &format!("Bearer {key}"), connect_packet("watch")).await;
    client.send(&subscribe_report(1)).await;
    assert_eq!(next_publish(&mut client).await.topic, report_topic());

    let owner = owner_session(edge).await;
    let challenge = s256_challenge(VERIFIER);
    // A redirect URI not registered exactly, or an unknown app: shown to
    // the owner, never redirected to.
    for query in [
        query_of(&app.id, "read", &challenge, "S256").replace("callback", "callback%2F"),
        query_of("app_unknown", "read", &challenge, "S256"),
    ] {
        let (status, location, body) = authorize(edge, &owner.0, &query).await;
        assert_eq!((status, location), (400, None), "{query}");
        assert!(body.contains("authorize-problem"), "{body}");
    }
    // No PKCE, plain PKCE, another response type, scope escalation: back
    // to the app with the error and its state.
    for (query, error) in [
        (query_of(&app.id, "read", "", "S256"), "invalid_request"),
        (
            query_of(&app.id, "read", &challenge, "plain"),
            "invalid_request",
        ),
        (
            query_of(&app.id, "read", &challenge, "S256")
                .replace("response_type=code", "response_type=token"),
            "unsupported_response_type",
        ),
        (
            query_of(&app.id, "control", &challenge, "S256"),
            "invalid_scope",
        ),
        (
            query_of(&app.id, "admin", &challenge, "S256"),
            "invalid_scope",
        ),
    ] {
        let (status, location, _) = authorize(edge, &owner.0, &query).await;
        assert_eq!(status, 303, "{query}");
        let location = location.unwrap();
        assert!(
            location.starts_with(REDIRECT)
                && location.contains(&format!("error={error}"))
                && location.contains("state=s-42"),
            "{query}: {location}"
        );
    }
    // Denied: access_denied and the state.
    let query = query_of(&app.id, "read", &challenge, "S256");
    let denied = decide(edge, &owner, &query, "deny", &edge.device)
        .await
        .unwrap();
    assert!(
        denied.contains("error=access_denied") && denied.contains("state=s-42"),
        "{denied}"
    );

    // A wrong verifier, another app's exchange: invalid_grant, and the
    // code is used up.
    let other = store
        .register_app("Other", &[REDIRECT.into()], &[Scope::Read])
        .await
        .unwrap();
    for (client, verifier) in [
        (
            app.id.as_str(),
            "a-wrong-verifier-that-is-long-enough-0123456789ab",
        ),
        (other.id.as_str(), VERIFIER),
    ] {
        let allowed = decide(edge, &owner, &query, "allow", &edge.device)
            .await
            .unwrap();
        assert!(allowed.contains("state=s-42"), "{allowed}");
        let code = code_in(&allowed);
        let (status, refused) = exchange(edge, &code, client, verifier).await;
        assert_eq!(
            (status, refused["error"].as_str()),
            (400, Some("invalid_grant"))
        );
        let (_, again) = exchange(edge, &code, &app.id, VERIFIER).await;
        assert_eq!(again["error"], "invalid_grant");
    }
    // Used twice: the keys the code gave are revoked, and the session on
    // them ends.
    let allowed = decide(edge, &owner, &query, "allow", &edge.device)
        .await
        .unwrap();
    let code = code_in(&allowed);
    let (status, granted) = exchange(edge, &code, &app.id, VERIFIER).await;
    assert_eq!(status, 200, "{granted}");
    let second_key = granted["access_token"].as_str().unwrap();
    let mut second = Client::connect(
        edge,
        &format!("Bearer {second_key}"),
        connect_packet("second"),
    )
    .await;
    let (status, reused) = exchange(edge, &code, &app.id, VERIFIER).await;
    assert_eq!(
        (status, reused["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let (close, _) = second
        .closed()
        .await
        .expect("the reused code's session ended");
    assert_eq!(close, 1008);
    // The audit log: allowed and denied, no code, no key.
    let audit = store.audit_log(&edge.tenant, 50).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|entry| entry.action.as_str()).collect();
    assert!(
        actions.contains(&"app.allow") && actions.contains(&"app.deny"),
        "{actions:?}"
    );
    let logged = format!("{audit:?}");
    assert!(!logged.contains("rlc_") && !logged.contains(&key));
    world.agent.cancel();
    world.edge.stop().await;
}
