//! What the edge writes where people read it: logs that carry no secret and
//! no query string, and a bad configuration refused with exit code 64 and
//! every problem listed.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_testkit::edge as support;

use std::io::Write;
use std::process::Command;

use base64::Engine;
use support::*;

#[tokio::test]
async fn logs_carry_no_secret_and_no_query_string() {
    let capture = Capture::default();
    capture.install();

    let edge = TestEdge::start().await;
    let (token, key_id, secret) = edge.key.clone();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{key_id}:{secret}"));
    let wrong_secret = "abcdefghijklmnopqrstuvwxyz";
    let wrong_basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{key_id}:{wrong_secret}"));
    for path in [
        format!("/mqtt?access_token={token}"),
        format!("/mqtt?api_key={basic}&x=1"),
        format!("/mqtt?access_token={wrong_basic}"),
    ] {
        let mut socket = edge.open_device(&path, &[]).await;
        send_connect(&mut socket, connect_packet("logged")).await;
        refusal(&mut socket).await;
    }
    let bearer = edge.bearer();
    let mut socket = edge
        .open_device("/mqtt", &[("authorization", &bearer)])
        .await;
    let mut connect = connect_packet("with-password");
    connect.username = Some(key_id.clone());
    connect.password = Some(relay_proto::Secret::new(secret.clone().into()));
    send_connect(&mut socket, connect).await;
    refusal(&mut socket).await;
    edge.stop().await;

    let logs = capture.text();
    assert!(
        logs.contains("closing session"),
        "the capture saw nothing:\n{logs}"
    );
    assert!(logs.contains("authentication failed"));
    for secret_text in [
        token.as_str(),
        secret.as_str(),
        basic.as_str(),
        wrong_secret,
        wrong_basic.as_str(),
    ] {
        assert!(
            !logs.contains(secret_text),
            "a secret reached the logs:\n{logs}"
        );
    }
    for query in ["access_token=", "api_key=", "/mqtt?"] {
        assert!(!logs.contains(query), "{query:?} reached the logs:\n{logs}");
    }
}

#[test]
fn a_bad_configuration_exits_64_listing_every_problem() {
    let dir = std::env::temp_dir().join(format!(
        "relay-edge-config-{}",
        relay_store::credential::random_base32(8).unwrap()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("edge.toml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(b"[public]\nbase_domain = \"not a domain\"\ntls_cert = \"/nonexistent.pem\"\n[limits]\nmax_packet_size = 10\n")
        .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_relay-edge"))
        .arg("--config")
        .arg(&path)
        .env_remove("RELAY_DATABASE_URL")
        // The flag's variable overrides the file (whose default is 1).
        .env("RELAY_WORKER_THREADS", "5000")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    for problem in [
        "public.base_domain",
        "public.tls_cert",
        "public.tls_key",
        "store.database_url",
        "max_packet_size",
        "runtime.worker_threads (5000)",
    ] {
        assert!(
            stderr.contains(problem),
            "{problem} not reported:\n{stderr}"
        );
    }

    std::fs::write(&path, "[public]\nbase_domian = \"typo.example\"\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_relay-edge"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("base_domian"));
    let _ = std::fs::remove_dir_all(dir);
}

/// The book's configuration reference parses, with every key known to
/// this version, and holds the defaults it claims.
#[test]
fn the_books_configuration_reference_parses() {
    let page = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/reference/edge-config.md"
    ))
    .unwrap();
    let block = page
        .split("<!-- snippet-edge-config -->\n```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("the book's edge configuration block");
    let config = relay_edge::EdgeConfig::from_toml(block).unwrap();
    let defaults = relay_edge::EdgeConfig::defaults();
    assert_eq!(
        config.limits.max_packet_size,
        defaults.limits.max_packet_size
    );
    assert_eq!(config.tunnel.linger_seconds, defaults.tunnel.linger_seconds);
    assert_eq!(config.public.device_in_path, defaults.public.device_in_path);
}

/// The book's by-hand certificate steps make what the agent accepts: a CA,
/// and a leaf for `*.relay.localhost` it signed (a one-step self-signed
/// certificate is a CA, which rustls refuses as a server's own).
#[test]
fn the_books_certificate_steps_make_a_certificate_the_agent_accepts() {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let page = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/operators/by-hand.md"
    ))
    .unwrap();
    let block = page
        .split("<!-- snippet-certificate -->\n```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("the book's certificate block");
    let dir = std::env::temp_dir().join(format!(
        "relay-readme-cert-{}",
        relay_store::credential::random_base32(8).unwrap()
    ));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let output = Command::new("bash")
        .args(["-euc", block])
        .current_dir(&dir)
        .output()
        .expect("bash runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ca = CertificateDer::from_pem_file(dir.join("data/ca.crt")).unwrap();
    let leaf = CertificateDer::from_pem_file(dir.join("data/tls.crt")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap();
    for name in ["tunnel.relay.localhost", "abc123.relay.localhost"] {
        let name = ServerName::try_from(name).unwrap();
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
            .unwrap_or_else(|error| panic!("{name:?}: {error}"));
    }
    // The CA itself is no server certificate (the old one-step recipe).
    let as_leaf = verifier.verify_server_cert(
        &ca,
        &[],
        &ServerName::try_from("tunnel.relay.localhost").unwrap(),
        &[],
        UnixTime::now(),
    );
    assert!(as_leaf.is_err());
    let _ = std::fs::remove_dir_all(dir);
}

/// The alerts and the dashboard of deploy/kubernetes use only metrics the
/// edge exports.
#[test]
fn the_kubernetes_alerts_and_dashboard_name_real_metrics() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/kubernetes/components/monitoring"
    );
    let exported = relay_edge::metrics::Metrics::new().names();
    let mut used = Vec::new();
    for file in ["prometheusrule.yaml", "relay-edge.json"] {
        let text = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("relay_edge_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            used.push((file, name));
        }
    }
    assert!(used.len() >= 8, "{used:?}");
    for (file, name) in used {
        assert!(
            exported.contains(&name),
            "{file} uses {name}, which the edge does not export"
        );
    }
}
