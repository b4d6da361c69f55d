//! The third-party MQTT clients the tests run (paho-mqtt in a Python venv,
//! MQTT.js under node), installed by `scripts/client-tools`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Installs the clients when missing and returns their folder: `venv/`
/// (Python with paho-mqtt) and `node/` (MQTT.js).
pub fn client_tools() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/client-tools");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "scripts/client-tools failed");
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// The JSON objects a client script printed, one per line, by their
/// `"scenario"` field.
pub fn scenarios(printed: &str) -> std::collections::HashMap<String, serde_json::Value> {
    printed
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            (value["scenario"].as_str().unwrap().to_owned(), value)
        })
        .collect()
}

/// Runs a Python client script (paho-mqtt, from [`client_tools`]'s venv)
/// with `args`, within `patience`; the JSON lines it printed by scenario
/// ([`scenarios`]), and all it printed (stdout, then stderr) for failure
/// messages.
pub async fn run_python_client(
    tools: &Path,
    script: &Path,
    args: &[String],
    patience: std::time::Duration,
) -> (std::collections::HashMap<String, serde_json::Value>, String) {
    let output = tokio::time::timeout(
        patience,
        tokio::process::Command::new(tools.join("venv/bin/python"))
            .arg(script)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the client script finished in time")
    .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    let context = format!("{printed}\n{}", String::from_utf8_lossy(&output.stderr));
    (scenarios(&printed), context)
}
