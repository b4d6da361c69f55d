//! Edge instances as real OS processes (the `relay-edge` binary) on one
//! test database: started with port-0 listeners whose bound addresses are
//! read from the edge's own "edge started" log line, stopped with SIGTERM
//! (the drain) or SIGKILL (a crash).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::edge::{BASE_DOMAIN, PATIENCE, TestEdge, http_get};

/// The cluster secret of the test instances.
pub const CLUSTER_SECRET: &str = "the test cluster's shared secret";

/// One `relay-edge` process.
pub struct EdgeProcess {
    pub instance_id: String,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub tunnel: SocketAddr,
    pub peer: SocketAddr,
    child: Child,
    /// What it logged, for failure messages.
    log: Arc<Mutex<String>>,
}

fn some_address(value: &serde_json::Value) -> Option<SocketAddr> {
    let text = value.as_str()?;
    let inner = text
        .strip_prefix("Some(")
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or(text);
    inner.parse().ok()
}

impl EdgeProcess {
    /// Starts `binary` as instance `instance_id` on `setup`'s database and
    /// certificate; `tunnel` holds extra lines for its `[tunnel]` section.
    pub async fn start(binary: &Path, setup: &TestEdge, instance_id: &str, tunnel: &str) -> Self {
        let config = &setup.config;
        let file = setup.pki.dir.join(format!("{instance_id}.toml"));
        let text = format!(
            r#"
[public]
listen = "127.0.0.1:0"
base_domain = "{BASE_DOMAIN}"
tls_cert = "{cert}"
tls_key = "{key}"
device_in_path = true

[admin]
listen = "127.0.0.1:0"

[store]
database_url = "{database}"

[cluster]
instance_id = "{instance_id}"
peer_listen = "127.0.0.1:0"
secret = "{CLUSTER_SECRET}"

[tunnel]
listen = "127.0.0.1:0"
tcp_listen = "127.0.0.1:0"
{tunnel}
"#,
            cert = config.public.tls_cert.as_ref().unwrap().display(),
            key = config.public.tls_key.as_ref().unwrap().display(),
            database = config.store.database_url.expose(),
        );
        std::fs::write(&file, text).unwrap();
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(&file)
            .arg("--log-json")
            .env("RELAY_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (started, addresses) = tokio::sync::oneshot::channel();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let kept = log.clone();
        tokio::spawn(async move {
            let mut started = Some(started);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(mut log) = kept.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let fields = &entry["fields"];
                if fields["message"] == "edge started"
                    && let Some(started) = started.take()
                {
                    let _ = started.send((
                        some_address(&fields["public"]),
                        some_address(&fields["admin"]),
                        some_address(&fields["tunnel"]),
                        some_address(&fields["peer"]),
                    ));
                }
            }
        });
        let (public, admin, tunnel, peer) = match tokio::time::timeout(PATIENCE, addresses).await {
            Ok(Ok((Some(public), Some(admin), Some(tunnel), Some(peer)))) => {
                (public, admin, tunnel, peer)
            }
            other => panic!(
                "{instance_id} did not start ({other:?}); it logged:\n{}",
                log.lock().unwrap()
            ),
        };
        EdgeProcess {
            instance_id: instance_id.to_owned(),
            public,
            admin,
            tunnel,
            peer,
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").await.1
    }

    /// A crash: SIGKILL, and the process is gone.
    pub async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// SIGTERM (the drain); waits for the exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("the edge exits after its drain")
            .unwrap()
    }
}

/// The value of one metric series in a Prometheus text exposition (0 when
/// absent).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or(0.0)
}
