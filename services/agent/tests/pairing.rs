//! Pairing by code, end to end: a real `relay-agent setup --pair` in a tmux
//! pane (as a person runs it) shows a code and its link; headless Chromium
//! (Selenium) signs in to the console with a login link, follows the link,
//! approves the pairing for the device; setup then writes the credential
//! (mode 0600) and finds the edge working, and the agent started from the
//! written file shows the device online on the console's devices page.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use relay_testkit::client_tools::client_tools;
use relay_testkit::world::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The browser's part: reports each step as a JSON line and waits for
/// `go`. `sys.argv`: login link, pairing link, device id, screenshots.
const BROWSER: &str = r#"
import json, sys
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait, Select
from selenium.common.exceptions import StaleElementReferenceException

login, pair, device, shots = sys.argv[1:5]
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--ignore-certificate-errors", "--window-size=1280,900",
                 "--host-resolver-rules=MAP relay.test 127.0.0.1"]:
    options.add_argument(argument)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)

def step(name, **data):
    print(json.dumps({"step": name, **data}), flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit("stopped")

def status():
    try:
        return driver.find_element(By.ID, "status-" + device).text
    except StaleElementReferenceException:
        return ""

try:
    driver.get(login)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "status-" + device))
    driver.get(pair)
    code = driver.find_element(By.ID, "pair-code").get_attribute("value")
    driver.find_element(By.ID, "pair-find").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "pair-approve"))
    Select(driver.find_element(By.ID, "pair-device")).select_by_value(device)
    driver.save_screenshot(f"{shots}/pair-approve.png")
    driver.find_element(By.ID, "pair-approve").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "pair-done"))
    step("approved", code=code, done=driver.find_element(By.ID, "pair-done").text)
    driver.get(pair.split("/pair")[0] + "/")
    WebDriverWait(driver, 20, poll_frequency=0.1).until(lambda d: status() == "online")
    driver.save_screenshot(f"{shots}/pair-online.png")
    step("online")
finally:
    driver.quit()
"#;

async fn next_step(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> Value {
    let line = tokio::time::timeout(PATIENCE * 6, lines.next_line())
        .await
        .expect("the browser reported in time")
        .unwrap()
        .expect("the browser script ended early (its stderr is above)");
    serde_json::from_str(&line).unwrap()
}

#[tokio::test]
async fn an_agent_pairs_by_a_code_the_owner_enters_in_the_console() {
    use std::os::unix::fs::PermissionsExt;
    let world = world(ACCESS_CODE).await;
    world.agent.cancel();
    let edge = world.edge.edge.as_ref().unwrap();
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .unwrap();
    let port = world.edge.addr.port();
    let dir = &world.edge.pki.dir;
    let file = dir.join("paired/agent.toml");
    let edge_ca = write(dir, "pair-edge-ca.pem", &world.edge.pki.ca_pem());
    let printer_ca = write(dir, "pair-printer-ca.pem", &world.simulator.ca_pem);
    let args: Vec<String> = vec![
        env!("CARGO_BIN_EXE_relay-agent").into(),
        "setup".into(),
        "--config".into(),
        file.display().to_string(),
        "--pair".into(),
        format!("https://{BASE_DOMAIN}:{port}"),
        "--pair-connect".into(),
        world.edge.addr.to_string(),
        "--edge".into(),
        edge.tunnel_addr.unwrap().to_string(),
        "--server-name".into(),
        format!("tunnel.{BASE_DOMAIN}"),
        "--edge-ca".into(),
        edge_ca.display().to_string(),
        "--kind".into(),
        "bambu".into(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        world.simulator.addr.port().to_string(),
        "--serial".into(),
        SERIAL.into(),
        "--access-code".into(),
        ACCESS_CODE.into(),
        "--printer-ca".into(),
        printer_ca.display().to_string(),
        "--no-lan".into(),
    ];
    let command = args
        .iter()
        .map(|arg| format!("'{arg}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let session = format!("relay-pair-{}", std::process::id());
    let tmux = |args: &[&str]| {
        let output = std::process::Command::new("tmux")
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "200",
        "-y",
        "80",
        &format!("{command}; echo setup-exit-$?; sleep 60"),
    ]);
    let screen = || tmux(&["capture-pane", "-p", "-t", &session, "-S", "-80"]);
    let wait_for = |text: &'static str, patience: Duration| {
        let screen = &screen;
        async move {
            tokio::time::timeout(patience, async {
                loop {
                    let shown = screen();
                    if shown.contains(text) {
                        return shown;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("the terminal never showed {text:?}:\n{}", screen()))
        }
    };
    let shown = wait_for("Waiting for the owner", PATIENCE).await;
    let link = shown
        .split_whitespace()
        .find(|word| word.contains("/pair?code="))
        .expect("the pairing link")
        .to_owned();
    let code = link.rsplit_once("code=").unwrap().1.to_owned();
    assert!(
        shown.contains(&format!("    {code}")),
        "the code on its own: {shown}"
    );
    assert!(
        shown.contains('█') || shown.contains('▀'),
        "a QR code: {shown}"
    );

    let (login, _) = world
        .edge
        .database
        .store
        .create_login_link(&world.edge.tenant, 15 * 60_000)
        .await
        .unwrap();
    let login = format!("https://{BASE_DOMAIN}:{port}/login/{}", login.reveal());
    let shots = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let script = write(dir, "pair-browser.py", BROWSER);
    let mut browser = tokio::process::Command::new(client_tools().join("venv/bin/python"))
        .arg(&script)
        .args([&login, &link, &world.edge.device])
        .arg(&shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut to_browser = browser.stdin.take().unwrap();
    let mut lines = BufReader::new(browser.stdout.take().unwrap()).lines();
    let approved = next_step(&mut lines).await;
    assert_eq!(approved["step"], "approved");
    assert_eq!(approved["code"], code.as_str());

    // Setup gets the credential at its next poll (5 s apart), writes it
    // and finds the edge working.
    let shown = wait_for("setup-exit-", PATIENCE * 4).await;
    tmux(&["kill-session", "-t", &session]);
    assert!(shown.contains("setup-exit-0"), "{shown}");
    assert!(
        shown.contains(&format!(
            "paired: this agent is device {}",
            world.edge.device
        )),
        "{shown}"
    );
    assert!(shown.contains("edge: works"), "{shown}");
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(written.contains("rla_"));
    assert!(!shown.contains("rla_"), "the credential is never shown");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The agent, from the written file: the devices page shows it online.
    let config = relay_agent::config::AgentConfig::from_toml(&written).unwrap();
    let agent = start_agent(config);
    to_browser.write_all(b"go\n").await.unwrap();
    assert_eq!(next_step(&mut lines).await["step"], "online");
    to_browser.write_all(b"go\n").await.unwrap();
    assert!(browser.wait().await.unwrap().success());
    agent.cancel();
    world.edge.stop().await;
}
