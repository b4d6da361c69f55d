//! The edge's connection costs, measured on the real binary in its own
//! process: TLS + WebSocket + CONNECT + authentication handshakes per second
//! (cached key), and resident memory per idle wss session at 1k and 10k.
//!
//! `cargo bench -p relay-edge --bench sessions` (needs the local Postgres).
//! An idle session here is an upgraded wss connection waiting in the edge;
//! until devices can be online (agents), no session gets further.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_testkit::edge as support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_store::testing::TestDatabase;
use relay_store::{Backend, NewApiKey, Scope};
use rustls::pki_types::ServerName;
use support::{BASE_DOMAIN, TestPki, connect_packet, http_get, refusal, send_connect};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn metric(admin: std::net::SocketAddr, name: &str) -> f64 {
    let (_, body) = http_get(admin, "/metrics").await;
    body.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

struct Target {
    addr: std::net::SocketAddr,
    host: String,
    connector: TlsConnector,
    authorization: String,
}

impl Target {
    async fn open(&self) -> support::Socket {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let tls = self
            .connector
            .connect(ServerName::try_from(self.host.clone()).unwrap(), tcp)
            .await
            .unwrap();
        let mut request = format!("wss://{}/mqtt", self.host)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("authorization", self.authorization.parse().unwrap());
        request
            .headers_mut()
            .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
        tokio_tungstenite::client_async(request, tls)
            .await
            .unwrap()
            .0
    }
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let (handshakes, idle_steps): (usize, &[usize]) = if full {
        (5_000, &[1_000, 10_000])
    } else {
        (20, &[20])
    };

    let pki = TestPki::new();
    let (cert, key, _) = pki.issue("server", &[&format!("*.{BASE_DOMAIN}")]);
    let database = TestDatabase::new(Backend::Postgres).await;
    let tenant = database.store.create_tenant("bench").await.unwrap().id;
    let device = database
        .store
        .create_device(&tenant, "p1s")
        .await
        .unwrap()
        .id;
    let (_, credential) = database
        .store
        .create_api_key(NewApiKey {
            tenant_id: &tenant,
            device_id: None,
            scope: Scope::Control,
            label: "bench",
            expires_at: None,
        })
        .await
        .unwrap();
    let public_port = free_port();
    let admin_port = free_port();
    let config_path = pki.dir.join("edge.toml");
    std::fs::write(
        &config_path,
        format!(
            "[public]\nlisten = \"127.0.0.1:{public_port}\"\nbase_domain = \"{BASE_DOMAIN}\"\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
             [store]\ndatabase_url = \"{}\"\n[limits]\nconnect_timeout_seconds = 3600\n",
            cert.display(),
            key.display(),
            database.url
        ),
    )
    .unwrap();
    let mut edge = std::process::Command::new(env!("CARGO_BIN_EXE_relay-edge"))
        .arg("--config")
        .arg(&config_path)
        .env("RELAY_LOG", "warn")
        .spawn()
        .unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let started = Instant::now();
    while TcpStream::connect(admin).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "edge did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let target = Arc::new(Target {
        addr: format!("127.0.0.1:{public_port}").parse().unwrap(),
        host: format!("{device}.{BASE_DOMAIN}"),
        connector: TlsConnector::from(Arc::new(client)),
        authorization: format!("Bearer {}", credential.reveal()),
    });

    // Handshakes: TLS, upgrade, CONNECT, authentication (cached after the
    // first), CONNACK, close; 32 clients at a time.
    let per_worker = handshakes / 32;
    let started = Instant::now();
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let target = target.clone();
            tokio::spawn(async move {
                for _ in 0..per_worker {
                    let mut socket = target.open().await;
                    send_connect(&mut socket, connect_packet("bench")).await;
                    assert_eq!(refusal(&mut socket).await.connack, Some(3));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let elapsed = started.elapsed();
    println!(
        "handshakes (TLS + wss + CONNECT + cached auth + CONNACK): {} in {:.2?} = {:.0}/s",
        per_worker * 32,
        elapsed,
        (per_worker * 32) as f64 / elapsed.as_secs_f64()
    );

    let baseline = rss_kib(edge.id());
    let mut held = Vec::new();
    for &target_count in idle_steps {
        while held.len() < target_count {
            let batch = (target_count - held.len()).min(200);
            let opened: Vec<_> = (0..batch)
                .map(|_| {
                    let target = target.clone();
                    tokio::spawn(async move { target.open().await })
                })
                .collect();
            for socket in opened {
                held.push(socket.await.unwrap());
            }
        }
        let started = Instant::now();
        while metric(admin, "relay_edge_sessions_open").await < target_count as f64 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "sessions did not all open"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rss = rss_kib(edge.id());
        println!(
            "idle wss sessions: {target_count:>6}  edge RSS {:>7} KiB  ({:.1} KiB per session over the {baseline} KiB baseline)",
            rss,
            (rss.saturating_sub(baseline)) as f64 / target_count as f64
        );
    }
    drop(held);
    let _ = edge.kill();
    let _ = edge.wait();
    database.cleanup().await;
}
