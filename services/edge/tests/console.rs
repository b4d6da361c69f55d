//! The web console in a real browser: headless Chromium driven by Selenium
//! (PyPI) against an edge with an agent and the printer simulator. It
//! signs in with a login link, sees the device offline, then online within
//! 2 s of its agent connecting (pushed over the console's WebSocket),
//! creates a device and a key through the forms, copies the key's
//! mosquitto_sub recipe (which this test runs, and which gets a report),
//! sees an app's session on the device page and the printer's reports in
//! its live message view (paused until Watch is pressed), revokes the key (the app's session ends), sees the device go offline
//! when the agent stops, and reads the audit log. Screenshots at desktop
//! and phone widths go to `target/console-screenshots/`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Stdio;

use relay_testkit::client_tools::client_tools;
use relay_testkit::world::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The browser's part; it reports each step as a JSON line and waits for
/// `go` on stdin. `sys.argv`: base URL, login link, device id, screenshot
/// folder.
const BROWSER: &str = r#"
import json, sys, time
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from selenium.common.exceptions import StaleElementReferenceException

base, login, device, shots = sys.argv[1:5]
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--ignore-certificate-errors", "--window-size=1280,900",
                 "--host-resolver-rules=MAP relay.test 127.0.0.1"]:
    options.add_argument(argument)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)

def shot(name):
    for width, height, kind in [(1280, 900, "desktop"), (390, 844, "phone")]:
        driver.set_window_size(width, height)
        driver.save_screenshot(f"{shots}/{name}-{kind}.png")
    driver.set_window_size(1280, 900)

def step(name, **data):
    print(json.dumps({"step": name, **data}), flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit("stopped")

def status():
    # The page's script rewrites the cell as status arrives.
    try:
        return driver.find_element(By.ID, "status-" + device).text
    except StaleElementReferenceException:
        return ""

def live():
    WebDriverWait(driver, 10, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-live") == "1")

def body():
    try:
        return driver.find_element(By.TAG_NAME, "body").text
    except StaleElementReferenceException:
        return ""

try:
    driver.get(login)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "status-" + device))
    live()
    WebDriverWait(driver, 10).until(lambda d: status() == "offline")
    shot("1-devices-offline")
    step("offline")
    started = time.monotonic()
    WebDriverWait(driver, 10, poll_frequency=0.05).until(lambda d: status() == "online")
    online_after = time.monotonic() - started
    shot("2-devices-online")

    driver.find_element(By.NAME, "name").send_keys("garage printer")
    driver.find_element(By.XPATH, "//form[@action='/devices']//button").click()
    WebDriverWait(driver, 10).until(lambda d: "garage printer" in d.title)
    shot("3-new-device")

    driver.get(base + "/devices/" + device)
    driver.find_element(By.NAME, "label").send_keys("browser test")
    driver.find_element(By.XPATH, "//form[@action='/keys']//button").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "secret"))
    key = driver.find_element(By.ID, "secret").text
    recipe = [pre.text for pre in driver.find_elements(By.TAG_NAME, "pre")
              if pre.text.startswith("mosquitto_sub")][0]
    shot("4-key-and-recipes")
    step("key", key=key, recipe=recipe, online_after=online_after)

    # The device page lists the app the test connected, and its live
    # message view, paused until Watch is pressed, shows the reports.
    driver.get(base + "/devices/" + device)
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "apps"))
    apps = driver.find_element(By.ID, "apps").text
    paused = driver.find_element(By.ID, "watch-state").text
    driver.find_element(By.ID, "watch").click()
    WebDriverWait(driver, 10, poll_frequency=0.05).until(
        lambda d: int(d.find_element(By.TAG_NAME, "body").get_attribute("data-messages") or 0) >= 2)
    first = driver.find_element(By.CSS_SELECTOR, "ol.messages li").text
    driver.execute_script("document.getElementById('apps').scrollIntoView()")
    shot("5-device-apps-and-messages")
    driver.find_element(By.ID, "watch").click()
    step("device", apps=apps, paused=paused, message=first,
         watch_state=driver.find_element(By.ID, "watch-state").text)

    driver.get(base + "/keys")
    driver.find_element(By.ID, "revoke-" + key.split("_")[1]).click()
    WebDriverWait(driver, 10).until(lambda d: "revoked" in body())
    shot("6-key-revoked")
    step("revoked")

    driver.get(base + "/")
    live()
    step("watching")
    started = time.monotonic()
    WebDriverWait(driver, 10, poll_frequency=0.05).until(lambda d: status() == "offline")
    offline_after = time.monotonic() - started
    shot("7-devices-offline-again")
    driver.get(base + "/audit")
    shot("8-audit")
    step("done", offline_after=offline_after, audit=body())
finally:
    driver.quit()
"#;

/// Reads the browser's next step.
async fn next_step(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> Value {
    let line = tokio::time::timeout(PATIENCE * 6, lines.next_line())
        .await
        .expect("the browser reported in time")
        .unwrap()
        .expect("the browser script ended early (its stderr is above)");
    serde_json::from_str(&line).unwrap()
}

#[tokio::test]
async fn an_owner_signs_in_watches_the_agent_and_manages_keys_in_a_browser() {
    let world = world_with(
        ACCESS_CODE,
        |edge| edge.public.mqtts_listen = Some("127.0.0.1:0".parse().unwrap()),
        |_| {},
    )
    .await;
    let edge = world.edge.edge.as_ref().unwrap();
    let device = world.edge.device.clone();
    // The agent goes first: the browser sees the device offline, then online.
    world.agent.cancel();
    tokio::time::timeout(PATIENCE, edge.wait_offline(&device))
        .await
        .unwrap();

    let store = &world.edge.database.store;
    let (link, _) = store
        .create_login_link(&world.edge.tenant, 15 * 60_000)
        .await
        .unwrap();
    let base = format!("https://{BASE_DOMAIN}:{}", world.edge.addr.port());
    let login = format!("{base}/login/{}", link.reveal());
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let tools = client_tools();
    let script = write(&world.edge.pki.dir, "console-browser.py", BROWSER);
    let mut browser = tokio::process::Command::new(tools.join("venv/bin/python"))
        .arg(&script)
        .args([&base, &login, &device])
        .arg(&shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut to_browser = browser.stdin.take().unwrap();
    let mut lines = BufReader::new(browser.stdout.take().unwrap()).lines();
    let mut go = async || to_browser.write_all(b"go\n").await.unwrap();

    assert_eq!(next_step(&mut lines).await["step"], "offline");
    let tunnel = edge.tunnel_addr.unwrap();
    let agent = start_agent(agent_config(
        &world.edge,
        tunnel,
        &world.simulator,
        ACCESS_CODE,
        &world.agent_credential,
    ));
    go().await;

    let key_step = next_step(&mut lines).await;
    assert_eq!(key_step["step"], "key");
    let online_after = key_step["online_after"].as_f64().unwrap();
    assert!(
        online_after < 2.0,
        "online shown {online_after:.2} s after the agent started"
    );
    let key = key_step["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("rly_"));
    // The recipe, run as shown; only the host (no DNS for relay.test here)
    // and the CA (this test's own) are put in.
    let recipe = key_step["recipe"].as_str().unwrap();
    assert!(
        recipe.contains(&key) && recipe.contains(&device),
        "{recipe}"
    );
    let mqtts = edge.mqtts_addr.unwrap();
    let ca = write(
        &world.edge.pki.dir,
        "console-ca.pem",
        &world.edge.pki.ca_pem(),
    );
    let command = recipe
        .replace(&format!("{device}.{BASE_DOMAIN}"), "127.0.0.1")
        .replace(" -p 8883 ", &format!(" -p {} ", mqtts.port()))
        .replace(
            "--capath /etc/ssl/certs",
            &format!("--cafile {} --insecure", ca.display()),
        );
    let output = tokio::time::timeout(
        PATIENCE * 2,
        tokio::process::Command::new("sh")
            .args(["-c", &command])
            .output(),
    )
    .await
    .expect("the recipe got a report in time")
    .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.starts_with(&report_topic()),
        "{command}: {printed} {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // An app on the key, live while the key is revoked in the browser.
    let mut app = Client::connect(
        &world.edge,
        &format!("Bearer {key}"),
        connect_packet("kept-app"),
    )
    .await;
    go().await;
    let device_step = next_step(&mut lines).await;
    assert_eq!(device_step["step"], "device");
    let apps = device_step["apps"].as_str().unwrap();
    assert!(
        apps.contains("kept-app") && apps.contains("3.1.1") && apps.contains("wss"),
        "{apps}"
    );
    assert!(apps.contains("browser test"), "the key's label: {apps}");
    assert_eq!(device_step["paused"], "Paused");
    let message = device_step["message"].as_str().unwrap();
    assert!(message.contains(&report_topic()), "{message}");
    assert_eq!(device_step["watch_state"], "Paused");
    go().await;
    assert_eq!(next_step(&mut lines).await["step"], "revoked");
    let (code, _) = app.closed().await.expect("the app's session ended");
    assert_eq!(code, 1008);
    go().await;

    assert_eq!(next_step(&mut lines).await["step"], "watching");
    agent.cancel();
    go().await;
    let done = next_step(&mut lines).await;
    assert_eq!(done["step"], "done");
    let offline_after = done["offline_after"].as_f64().unwrap();
    assert!(
        offline_after < 2.0,
        "offline shown {offline_after:.2} s after the agent stopped"
    );
    let audit = done["audit"].as_str().unwrap();
    for action in ["session.start", "device.create", "key.create", "key.revoke"] {
        assert!(audit.contains(action), "{action} in {audit}");
    }
    assert!(!audit.contains(&key), "no secret in the audit log");
    go().await;
    let status = tokio::time::timeout(PATIENCE, browser.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    println!(
        "console: online shown {online_after:.2} s after the agent started, offline {offline_after:.2} s after it stopped; screenshots in {}",
        shots.display()
    );
    world.edge.stop().await;
}
