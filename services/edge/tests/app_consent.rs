//! An app asks the owner for access (OAuth 2.0 authorization code with
//! PKCE): the README's example (Python's authlib, a loopback redirect,
//! paho over wss), run as it stands, with headless Chromium (Selenium) as
//! the owner who clicks Allow on the consent page. The key the app gets
//! reaches the printer over wss. Then every refusal: a
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
use tokio::io::AsyncBufReadExt;

/// The owner, in headless Chromium: signs in with a login link, opens the
/// link the app printed, ticks the device, presses Allow, and waits for
/// the app's loopback page. `sys.argv`: login link, the app's link,
/// device id, screenshots.
const OWNER: &str = r#"
import sys
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

login, url, device, shots = sys.argv[1:5]
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
    print(driver.find_element(By.TAG_NAME, "main").text.replace("\n", " "), flush=True)
    driver.find_element(By.ID, "device-" + device).click()
    driver.save_screenshot(f"{shots}/app-consent.png")
    driver.find_element(By.ID, "allow").click()
    WebDriverWait(driver, 10).until(
        lambda d: d.current_url.startswith("http://127.0.0.1:") and "Done" in d.page_source)
finally:
    driver.quit()
"#;

/// What the test puts before the README's block: the test's domain has no
/// DNS, and its edge is not on 443 (Chromium has `--host-resolver-rules`
/// for the same).
const SHIM: &str = r#"
import os, socket
_edge_port = int(os.environ["TEST_EDGE_PORT"])
_getaddrinfo = socket.getaddrinfo
def _test_getaddrinfo(host, port, *args, **kwargs):
    if isinstance(host, str) and (host == "relay.test" or host.endswith(".relay.test")):
        host, port = "127.0.0.1", (_edge_port if port in (443, "443", None) else port)
    return _getaddrinfo(host, port, *args, **kwargs)
socket.getaddrinfo = _test_getaddrinfo
"#;

/// The README's "Ask the owner for access" example, as it stands.
fn readme_example() -> String {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"),
    )
    .unwrap();
    let section = readme
        .split_once("### Ask the owner for access")
        .expect("the README's section")
        .1;
    let block = section
        .split_once("```python\n")
        .expect("its Python block")
        .1;
    block.split_once("```").unwrap().0.to_owned()
}

const REDIRECT: &str = "http://127.0.0.1:8765/callback";
/// What the app registered: any loopback port will do (RFC 8252).
const REGISTERED: &str = "http://127.0.0.1/callback";
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
        .register_app("Print Watch", &[REGISTERED.into()], &[Scope::Read])
        .await
        .unwrap();

    // The README's example, as the app: it prints its link, the owner
    // (Chromium) allows, and the app gets its key and a report over wss.
    let (link, _) = store
        .create_login_link(&edge.tenant, 15 * 60_000)
        .await
        .unwrap();
    let port = edge.addr.port();
    let base = format!("https://{BASE_DOMAIN}:{port}");
    let ca = write(&edge.pki.dir, "app-ca.pem", &edge.pki.ca_pem());
    let example = write(
        &edge.pki.dir,
        "readme-app.py",
        &format!("{SHIM}\n{}", readme_example()),
    );
    let python = client_tools().join("venv/bin/python");
    let mut app_process = tokio::process::Command::new(&python)
        .arg(&example)
        .env("RELAY_URL", &base)
        .env("RELAY_CLIENT_ID", &app.id)
        .env("TEST_EDGE_PORT", port.to_string())
        .env("REQUESTS_CA_BUNDLE", &ca)
        .env("SSL_CERT_FILE", &ca)
        .env("BROWSER", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut said = tokio::io::BufReader::new(app_process.stdout.take().unwrap()).lines();
    let next_line = async |said: &mut tokio::io::Lines<_>| {
        tokio::time::timeout(PATIENCE * 2, said.next_line())
            .await
            .expect("the app said something in time")
            .unwrap()
            .unwrap_or_default()
    };
    let first: String = next_line(&mut said).await;
    let url = first
        .strip_prefix("Open this link to allow access: ")
        .unwrap_or_else(|| panic!("the app's link: {first}"))
        .to_owned();
    assert!(url.starts_with(&format!("{base}/authorize?")), "{url}");
    let shots = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let owner_script = write(&edge.pki.dir, "owner.py", OWNER);
    let owner = tokio::process::Command::new(&python)
        .arg(&owner_script)
        .args([
            &format!("{base}/login/{}", link.reveal()),
            &url,
            &edge.device,
        ])
        .arg(&shots)
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert!(
        owner.status.success(),
        "the owner's browser: {}",
        String::from_utf8_lossy(&owner.stderr)
    );
    let asked = String::from_utf8_lossy(&owner.stdout);
    assert!(
        asked.contains("Print Watch") && asked.contains("(read)"),
        "{asked}"
    );
    let allowed: String = next_line(&mut said).await;
    assert_eq!(allowed, format!("allowed for {}", edge.device));
    let report: String = next_line(&mut said).await;
    assert_eq!(report, format!("report on {}", report_topic()));
    let exit = tokio::time::timeout(PATIENCE, app_process.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());
    let key = store
        .list_api_keys(Some(&edge.tenant))
        .await
        .unwrap()
        .into_iter()
        .find(|key| key.label == "Print Watch")
        .expect("the app's key");

    // The key: bound to the device, read-only, labelled and listed as the
    // app's.
    assert_eq!(key.device_id.as_deref(), Some(edge.device.as_str()));
    assert_eq!(key.scope, Scope::Read);
    assert_eq!(store.app_grants(&edge.tenant).await.unwrap().len(), 1);

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
        .register_app("Other", &[REGISTERED.into()], &[Scope::Read])
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
    assert!(!logged.contains("rlc_") && !logged.contains(second_key));
    world.agent.cancel();
    world.edge.stop().await;
}
