//! relayctl end to end: the real binary against a fresh Postgres database
//! and a fresh SQLite file, and its exits on bad input or a dead database.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::{Command, Output};

use relay_store::testing::TestDatabase;
use relay_store::{AuthConfig, Authenticator, Backend, RequestCredentials, Scope};
use serde_json::Value;

fn relayctl(database_url: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_relayctl"));
    command.env_remove("RELAY_DATABASE_URL");
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    command.args(args).output().expect("run relayctl")
}

fn succeed(url: &str, args: &[&str]) -> String {
    let output = relayctl(Some(url), args);
    assert!(
        output.status.success(),
        "relayctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn json(url: &str, args: &[&str]) -> Value {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    serde_json::from_str(&succeed(url, &with_json)).unwrap()
}

fn fail(url: Option<&str>, args: &[&str], code: i32, message: &str) {
    let output = relayctl(url, args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(code),
        "relayctl {args:?}: {stderr}"
    );
    assert!(
        stderr.contains(message),
        "relayctl {args:?}: {stderr:?} lacks {message:?}"
    );
}

async fn whole_lifecycle(backend: Backend) {
    // An empty database: relayctl migrates it.
    let db = match backend {
        Backend::Postgres => TestDatabase::postgres_unmigrated().await,
        Backend::Sqlite => TestDatabase::sqlite().await,
    };
    let url = db.url.as_str();
    succeed(url, &["migrate"]);
    assert!(succeed(url, &["migrate"]).contains("up to date"));

    let tenant = json(url, &["tenant", "create", "acme"]);
    let tenant_id = tenant["id"].as_str().unwrap();
    fail(Some(url), &["tenant", "create", "acme"], 1, "exists");
    assert!(succeed(url, &["tenant", "list"]).contains("acme"));

    let device = json(url, &["device", "create", "--tenant", "acme", "garage p1s"]);
    let device_id = device["id"].as_str().unwrap();
    assert_eq!(device["tenant_id"].as_str(), Some(tenant_id));
    fail(
        Some(url),
        &["device", "create", "--tenant", "acme", "garage p1s"],
        1,
        "has a device named",
    );
    fail(
        Some(url),
        &["device", "create", "--tenant", "nobody", "x"],
        1,
        "not found",
    );
    assert!(succeed(url, &["device", "list", "--tenant", "acme"]).contains(device_id));

    let created = json(
        url,
        &[
            "key",
            "create",
            "--tenant",
            "acme",
            "--device",
            device_id,
            "--scope",
            "control",
            "--label",
            "phone",
            "--expires-in",
            "30d",
        ],
    );
    let token = created["token"].as_str().unwrap();
    let key_id = created["key"]["id"].as_str().unwrap();
    assert_eq!(created["basic_username"].as_str(), Some(key_id));
    let secret = created["basic_password"].as_str().unwrap();
    assert!(created["key"]["expires_at"].is_i64());

    // The key works against the store, as the edge will use it.
    let auth = Authenticator::new(db.store.clone(), None, AuthConfig::default());
    let principal = auth
        .authenticate(
            device_id,
            RequestCredentials {
                authorization: None,
                query_token: Some(relay_store::Secret::new(token)),
            },
        )
        .await
        .unwrap();
    assert_eq!(principal.scope, Scope::Control);

    let listing = succeed(url, &["key", "list"]);
    assert!(listing.contains(key_id) && !listing.contains(secret));
    assert!(
        !serde_json::to_string(&json(url, &["key", "list"]))
            .unwrap()
            .contains(secret)
    );
    assert!(succeed(url, &["key", "revoke", key_id]).contains("revoked"));
    assert!(succeed(url, &["key", "revoke", key_id]).contains("already"));
    fail(
        Some(url),
        &["key", "revoke", "aaaaaaaaaaaa"],
        1,
        "not found",
    );

    // A tenant admin's login link and API token.
    let link = json(
        url,
        &[
            "tenant",
            "login-link",
            "acme",
            "--base-url",
            "https://relay.example.com/",
        ],
    );
    let link_url = link["url"].as_str().unwrap();
    assert!(
        link_url.starts_with("https://relay.example.com/login/rll_"),
        "{link_url}"
    );
    let token = link_url.rsplit('/').next().unwrap();
    assert!(db.store.redeem_login_link(token).await.unwrap().is_ok());
    fail(
        Some(url),
        &[
            "tenant",
            "login-link",
            "acme",
            "--base-url",
            "https://x",
            "--minutes",
            "16",
        ],
        1,
        "15 minutes",
    );
    let api_token = json(url, &["tenant", "api-token", "acme", "--label", "ci"]);
    let secret = api_token["secret"].as_str().unwrap();
    assert!(secret.starts_with("rlt_"));
    assert!(db.store.verify_admin_token(secret).await.unwrap().is_ok());

    let issued = json(url, &["agent", "issue", device_id]);
    assert!(issued["token"].as_str().unwrap().starts_with("rla_"));
    fail(
        Some(url),
        &["agent", "issue", device_id],
        1,
        "rotate it instead",
    );
    let rotated = json(url, &["agent", "rotate", device_id]);
    let agent_token = rotated["token"].as_str().unwrap();
    assert_eq!(
        db.store.verify_agent_credential(agent_token).await.unwrap(),
        Ok(device_id.to_owned())
    );
    fail(
        Some(url),
        &["agent", "rotate", "nosuchdevice1"],
        1,
        "not found",
    );

    // Which instance holds the agent, as the edges' registry says.
    assert!(succeed(url, &["device", "show", device_id]).contains("agent:    never connected"));
    assert!(succeed(url, &["instance", "list"]).contains("(none)"));
    db.store
        .renew_instance_lease("edge-7f", "10.1.2.3:7444", 60_000)
        .await
        .unwrap();
    db.store.claim_device(device_id, "edge-7f").await.unwrap();
    let shown = succeed(url, &["device", "show", device_id]);
    assert!(shown.contains("on instance edge-7f (epoch 1"), "{shown}");
    assert_eq!(
        json(url, &["device", "show", device_id])["tunnel"]["live"],
        true
    );
    let instances = succeed(url, &["instance", "list"]);
    assert!(
        instances.contains("edge-7f")
            && instances.contains("10.1.2.3:7444")
            && instances.contains("yes"),
        "{instances}"
    );
    db.store.end_instance_lease("edge-7f").await.unwrap();
    assert!(
        succeed(url, &["device", "show", device_id])
            .contains("not connected (last on instance edge-7f")
    );
    assert_eq!(json(url, &["instance", "list"])[0]["live"], false);

    // The printer's connection, as the edge last heard of it.
    assert!(succeed(url, &["device", "show", device_id]).contains("printer:  never heard of"));
    db.store
        .record_printer_link(device_id, "down", Some("dropped"), None)
        .await
        .unwrap();
    db.store
        .record_printer_silent(device_id, "report", "no report, nor after pushall")
        .await
        .unwrap();
    let shown = succeed(url, &["device", "show", device_id]);
    assert!(
        shown.contains("printer:  silent since ")
            && shown.contains("(report: no report, nor after pushall)")
            && shown.contains("reconnects: dropped 1, silent_report 1"),
        "{shown}"
    );
    let shown = json(url, &["device", "show", device_id]);
    assert_eq!(shown["printer"]["state"], "silent");
    assert_eq!(shown["printer"]["reconnects"]["silent_report"], 1);

    succeed(url, &["device", "delete", device_id]);
    assert_ne!(
        json(url, &["device", "show", device_id])["deleted_at"],
        Value::Null
    );
    fail(Some(url), &["device", "delete", device_id], 1, "not found");
    assert!(succeed(url, &["device", "list"]).contains("(none)"));
    db.cleanup().await;
}

#[tokio::test]
async fn whole_lifecycle_on_postgres() {
    whole_lifecycle(Backend::Postgres).await;
}

#[tokio::test]
async fn whole_lifecycle_on_sqlite() {
    whole_lifecycle(Backend::Sqlite).await;
}

#[test]
fn bad_invocations_exit_with_their_own_codes() {
    fail(None, &["tenant", "list"], 2, "no database");
    fail(
        Some("mysql://localhost/relay"),
        &["tenant", "list"],
        1,
        "database URL must start with",
    );
    // A port nothing listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("postgres://postgres@127.0.0.1:{port}/relay");
    fail(Some(&dead), &["tenant", "list"], 3, "database unavailable");
    fail(
        Some("sqlite::memory:"),
        &["key", "create", "--tenant", "x", "--expires-in", "soon"],
        2,
        "not a duration",
    );
}
