//! Signing in to the console with the operator's identity provider: a real
//! OpenID provider (the npm package `oidc-provider`, certified) on loopback,
//! and headless Chromium (Selenium) as the owner. An account whose ID
//! token names the tenant gets the devices page; one without the tenant
//! claim is refused in plain words; an edge configured with another
//! issuer name refuses the provider's discovery document.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;

use relay_edge::config::OidcConfig;
use relay_testkit::client_tools::client_tools;
use relay_testkit::world::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const CLIENT_SECRET: &str = "a-client-secret-for-the-test";

/// The provider: listens on a port of its own, prints its issuer, then
/// reads the relay's callback URL and the tenant the `owner` account
/// belongs to. Any password signs in (its development login page); the
/// account `stranger` has no tenant claim.
const PROVIDER: &str = r#"
import http from 'node:http';
import readline from 'node:readline';
import Provider from '__OIDC_PROVIDER__';

const server = http.createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;
console.log(JSON.stringify({ issuer }));
const lines = readline.createInterface({ input: process.stdin });
const [redirectUri, tenant] = (await lines[Symbol.asyncIterator]().next()).value.split(' ');
const provider = new Provider(issuer, {
  clients: [{
    client_id: 'relay',
    client_secret: 'a-client-secret-for-the-test',
    redirect_uris: [redirectUri],
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return id === 'stranger' ? { sub: id } : { sub: id, relay_tenant: tenant };
      },
    };
  },
  claims: { openid: ['sub', 'relay_tenant'] },
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  features: { devInteractions: { enabled: true } },
  cookies: { keys: ['a-cookie-key-for-the-test'] },
});
server.on('request', provider.callback());
console.log(JSON.stringify({ ready: true }));
"#;

/// The owner's browser: opens a console page signed out, signs in
/// through the provider as `account`. `sys.argv`: the console's URL, the
/// page, the account, the device id, the screenshots. Prints what the
/// relay showed at the end.
const BROWSER: &str = r#"
import sys
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base, start, account, device, shots = sys.argv[1:6]
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--ignore-certificate-errors", "--window-size=1280,900",
                 "--host-resolver-rules=MAP relay.test 127.0.0.1"]:
    options.add_argument(argument)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.get(base + start)
    driver.find_element(By.ID, "oidc-sign-in").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.NAME, "login"))
    driver.find_element(By.NAME, "login").send_keys(account)
    driver.find_element(By.NAME, "password").send_keys("any password")
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    # The provider's consent for the relay, then back.
    WebDriverWait(driver, 10).until(
        lambda d: "relay.test" in d.current_url or d.find_elements(By.CSS_SELECTOR, "button[type=submit]"))
    if "relay.test" not in driver.current_url:
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 10).until(lambda d: "relay.test" in d.current_url)
    WebDriverWait(driver, 10).until(
        lambda d: d.find_elements(By.ID, "status-" + device) or d.find_elements(By.ID, "pair-code")
        or "unauthorized" in d.page_source)
    driver.save_screenshot(f"{shots}/oidc-{account}.png")
    codes = [e.get_attribute("value") for e in driver.find_elements(By.ID, "pair-code")]
    print(driver.find_element(By.TAG_NAME, "body").text.replace("\n", " "), codes, flush=True)
finally:
    driver.quit()
"#;

#[tokio::test]
async fn owners_sign_in_with_the_operators_identity_provider() {
    let tools = client_tools();
    let dir = tempfile_dir();
    // An ES module resolves packages from its own folder, not NODE_PATH:
    // the provider is imported by its path.
    let entry = tools.join("node/node_modules/oidc-provider/lib/index.js");
    let provider_script = write(
        &dir,
        "provider.mjs",
        &PROVIDER.replace("__OIDC_PROVIDER__", &entry.display().to_string()),
    );
    let mut provider = tokio::process::Command::new("node")
        .arg(&provider_script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut said = BufReader::new(provider.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(PATIENCE, said.next_line())
        .await
        .unwrap()
        .unwrap()
        .expect("the provider's issuer");
    let issuer = serde_json::from_str::<serde_json::Value>(&first).unwrap()["issuer"]
        .as_str()
        .unwrap()
        .to_owned();
    let oidc = |issuer: &str| OidcConfig {
        issuer: issuer.to_owned(),
        client_id: "relay".into(),
        client_secret: relay_proto::Secret::new(CLIENT_SECRET.into()),
        tenant_claim: "relay_tenant".into(),
        tenants: Default::default(),
        ca_file: None,
        name: "Test IdP".into(),
    };
    let edge = {
        let config = oidc(&issuer);
        TestEdge::start_with(move |edge| edge.console.oidc = Some(config)).await
    };
    let port = edge.addr.port();
    let base = format!("https://{BASE_DOMAIN}:{port}");
    let mut to_provider = provider.stdin.take().unwrap();
    to_provider
        .write_all(format!("{base}/login/oidc/callback {}\n", edge.tenant).as_bytes())
        .await
        .unwrap();
    let ready = tokio::time::timeout(PATIENCE, said.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_default();
    assert!(ready.contains("ready"), "{ready}");

    let shots = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let browser = write(&dir, "oidc-browser.py", BROWSER);
    let sign_in = async |start: &str, account: &str| {
        let output = tokio::process::Command::new(tools.join("venv/bin/python"))
            .arg(&browser)
            .args([&base, start, account, &edge.device])
            .arg(&shots)
            .stderr(Stdio::piped())
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "{account}'s browser: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    // The owner: the devices page of their tenant; and, arriving from an
    // agent's pairing link, back to that page once signed in.
    let shown = sign_in("/", "owner").await;
    assert!(
        shown.contains("Devices") && shown.contains("p1s"),
        "{shown}"
    );
    let shown = sign_in("/pair?code=BCDF-GHJK", "owner").await;
    assert!(
        shown.contains("Pair an agent") && shown.contains("['BCDF-GHJK']"),
        "{shown}"
    );
    let audit = edge
        .database
        .store
        .audit_log(&edge.tenant, 10)
        .await
        .unwrap();
    assert!(
        audit.iter().any(|entry| entry.action == "session.start"
            && entry.detail == "identity provider, subject owner"),
        "{audit:?}"
    );
    // An account whose ID token names no tenant: refused, in words.
    let shown = sign_in("/", "stranger").await;
    assert!(shown.contains("does not say which tenant"), "{shown}");
    let metrics = edge.admin_get("/metrics").await.1;
    assert!(
        metrics.contains("relay_edge_auth_failures_total{reason=\"oidc_no_tenant_claim\"} 1"),
        "{metrics}"
    );

    // An edge told another issuer name refuses the provider's discovery.
    let other = {
        let config = oidc(&issuer.replace("127.0.0.1", "localhost"));
        TestEdge::start_with(move |edge| edge.console.oidc = Some(config)).await
    };
    let (status, _, body) = other
        .https(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "GET",
            "/login/oidc",
            &[],
            "",
        )
        .await;
    assert_eq!(status, 401);
    assert!(body.contains("another issuer"), "{body}");
    other.stop().await;
    edge.stop().await;
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-oidc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
