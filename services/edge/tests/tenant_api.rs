//! The tenant API, driven with curl (a client nobody here wrote) against
//! a real edge on Postgres: login links and console sessions with CSRF, API
//! tokens, every endpoint's happy path, bad input that changes nothing,
//! another tenant's ids answered 404, no caller answered 401, the audit
//! log, and the OpenAPI document validated by `openapi-spec-validator`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;

use relay_edge::tenant_api::{Operation, openapi_document};
use relay_testkit::client_tools::client_tools;
use relay_testkit::world::*;
use serde_json::{Value, json};

/// Who calls.
#[derive(Clone)]
enum Caller {
    Nobody,
    Token(String),
    /// A console session's cookie, and the CSRF token its changes send
    /// (`None`: not sent).
    Session(String, Option<String>),
    /// Any other `Authorization` header.
    Header(String),
}

struct Answer {
    status: u16,
    headers: String,
    body: Value,
}

struct Api {
    edge: TestEdge,
    ca: PathBuf,
}

impl Api {
    async fn start() -> Api {
        Api::start_with(|_| {}).await
    }

    async fn start_with(customize: impl FnOnce(&mut relay_edge::config::EdgeConfig)) -> Api {
        let edge = TestEdge::start_with(customize).await;
        let ca = write(&edge.pki.dir, "ca.pem", &edge.pki.ca_pem());
        Api { edge, ca }
    }

    fn store(&self) -> &relay_store::Store {
        &self.edge.database.store
    }

    /// curl to `https://<host>:<port><path>`, with `body` as JSON (or as a
    /// form, for `/login`).
    async fn call_on(
        &self,
        host: &str,
        method: &str,
        path: &str,
        caller: &Caller,
        body: Option<&str>,
        content_type: &str,
    ) -> Answer {
        let port = self.edge.addr.port();
        let headers_file = tempfile_path(&self.edge.pki.dir);
        let mut command = tokio::process::Command::new("curl");
        command
            .args(["-sS", "--max-time", "20", "-o", "-", "-D"])
            .arg(&headers_file)
            .args(["-w", "\n%{http_code}", "--cacert"])
            .arg(&self.ca)
            .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
            .args(["-X", method, &format!("https://{host}:{port}{path}")]);
        match caller {
            Caller::Nobody => {}
            Caller::Token(token) => {
                command.args(["-H", &format!("Authorization: Bearer {token}")]);
            }
            Caller::Session(cookie, csrf) => {
                command.args(["-H", &format!("Cookie: relay_session={cookie}")]);
                if let Some(csrf) = csrf {
                    command.args(["-H", &format!("X-CSRF-Token: {csrf}")]);
                }
            }
            Caller::Header(value) => {
                command.args(["-H", &format!("Authorization: {value}")]);
            }
        }
        if let Some(body) = body {
            command
                .args(["-H", &format!("Content-Type: {content_type}")])
                .args(["--data-binary", body]);
        }
        let output = command.output().await.expect("curl runs");
        assert!(
            output.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).unwrap();
        let (body, status) = text.rsplit_once('\n').unwrap();
        let headers = std::fs::read_to_string(&headers_file).unwrap_or_default();
        let _ = std::fs::remove_file(&headers_file);
        Answer {
            status: status.parse().unwrap(),
            headers,
            body: serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
        }
    }

    async fn call(&self, method: &str, path: &str, caller: &Caller, body: Option<Value>) -> Answer {
        let body = body.map(|body| body.to_string());
        self.call_on(
            BASE_DOMAIN,
            method,
            path,
            caller,
            body.as_deref(),
            "application/json",
        )
        .await
    }

    /// A tenant API token for `tenant`.
    async fn token(&self, tenant: &str) -> Caller {
        let (_, issued) = self
            .store()
            .create_admin_token(tenant, "test")
            .await
            .unwrap();
        Caller::Token(issued.reveal())
    }

    /// Signs in with a fresh login link: the session's cookie and CSRF
    /// token.
    async fn sign_in(&self, tenant: &str) -> (String, String) {
        let (link, _) = self
            .store()
            .create_login_link(tenant, 15 * 60_000)
            .await
            .unwrap();
        let token = link.reveal();
        let page = self
            .call_on(
                BASE_DOMAIN,
                "GET",
                &format!("/login/{token}"),
                &Caller::Nobody,
                None,
                "",
            )
            .await;
        assert_eq!(page.status, 200);
        assert!(
            page.body.as_str().unwrap().contains(&token),
            "the page posts the token"
        );
        let signed_in = self
            .call_on(
                BASE_DOMAIN,
                "POST",
                "/login",
                &Caller::Nobody,
                Some(&format!("token={token}")),
                "application/x-www-form-urlencoded",
            )
            .await;
        assert_eq!(signed_in.status, 303, "{:?}", signed_in.body);
        let cookie_line = signed_in
            .headers
            .lines()
            .find(|line| line.to_ascii_lowercase().starts_with("set-cookie:"))
            .expect("a session cookie")
            .to_owned();
        for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(cookie_line.contains(attribute), "{cookie_line}");
        }
        let cookie = cookie_line
            .split_once("relay_session=")
            .unwrap()
            .1
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let session = self
            .call(
                "GET",
                "/api/v1/session",
                &Caller::Session(cookie.clone(), None),
                None,
            )
            .await;
        assert_eq!(session.status, 200, "{:?}", session.body);
        assert_eq!(session.body["tenant_id"], tenant);
        let csrf = session.body["csrf_token"].as_str().unwrap().to_owned();
        (cookie, csrf)
    }

    async fn audit(&self, caller: &Caller) -> Vec<Value> {
        let audit = self.call("GET", "/api/v1/audit", caller, None).await;
        assert_eq!(audit.status, 200, "{:?}", audit.body);
        audit.body.as_array().unwrap().clone()
    }
}

fn tempfile_path(dir: &std::path::Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(
        "curl-headers-{}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn error_code(answer: &Answer) -> &str {
    answer.body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn a_login_link_opens_one_session_whose_changes_need_its_csrf_token() {
    let api = Api::start().await;
    let tenant = api.edge.tenant.clone();
    let (cookie, csrf) = api.sign_in(&tenant).await;

    // A change without the CSRF token, or with another one: 403, nothing made.
    let new = json!({ "name": "from the console" });
    for wrong in [None, Some("0".repeat(64))] {
        let refused = api
            .call(
                "POST",
                "/api/v1/devices",
                &Caller::Session(cookie.clone(), wrong),
                Some(new.clone()),
            )
            .await;
        assert_eq!(refused.status, 403, "{:?}", refused.body);
        assert_eq!(error_code(&refused), "csrf");
    }
    assert_eq!(
        api.store().list_devices(Some(&tenant)).await.unwrap().len(),
        1
    );
    let session = Caller::Session(cookie.clone(), Some(csrf));
    let made = api
        .call("POST", "/api/v1/devices", &session, Some(new))
        .await;
    assert_eq!(made.status, 201, "{:?}", made.body);

    // The link was used: a second sign-in with it is refused.
    let (link, expires_at) = api.store().create_login_link(&tenant, 1).await.unwrap();
    while api.store().now() <= expires_at {
        tokio::task::yield_now().await;
    }
    let expired = api
        .call_on(
            BASE_DOMAIN,
            "POST",
            "/login",
            &Caller::Nobody,
            Some(&format!("token={}", link.reveal())),
            "application/x-www-form-urlencoded",
        )
        .await;
    assert_eq!(expired.status, 401);
    assert!(
        expired.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    let (link, _) = api
        .store()
        .create_login_link(&tenant, 60_000)
        .await
        .unwrap();
    let form = format!("token={}", link.reveal());
    for expected in [303, 401] {
        let answer = api
            .call_on(
                BASE_DOMAIN,
                "POST",
                "/login",
                &Caller::Nobody,
                Some(&form),
                "application/x-www-form-urlencoded",
            )
            .await;
        assert_eq!(answer.status, expected);
    }
    assert!(
        api.store()
            .create_login_link(&tenant, 16 * 60_000)
            .await
            .is_err(),
        "15 minutes at most"
    );

    // Signing out ends the session.
    let out = api.call("DELETE", "/api/v1/session", &session, None).await;
    assert_eq!(out.status, 204);
    let after = api.call("GET", "/api/v1/devices", &session, None).await;
    assert_eq!(after.status, 401);

    // The audit log has the sign-in, the device and the sign-out, with the
    // address, and no secret.
    let token = api.token(&tenant).await;
    let audit = api.audit(&token).await;
    let actions: Vec<&str> = audit
        .iter()
        .map(|entry| entry["action"].as_str().unwrap())
        .collect();
    for action in ["session.start", "device.create", "session.end"] {
        assert!(actions.contains(&action), "{actions:?}");
    }
    assert!(audit.iter().all(|entry| entry["address"] == "127.0.0.1"));
    let text = serde_json::to_string(&audit).unwrap();
    assert!(!text.contains(&cookie) && !text.contains("rll_") && !text.contains("rls_"));
    api.edge.stop().await;
}

#[tokio::test]
async fn every_endpoint_does_its_change_and_the_audit_log_records_it() {
    let api = Api::start().await;
    let tenant = api.edge.tenant.clone();
    let token = api.token(&tenant).await;

    let made = api
        .call(
            "POST",
            "/api/v1/devices",
            &token,
            Some(json!({ "name": "x1c" })),
        )
        .await;
    assert_eq!(made.status, 201, "{:?}", made.body);
    let device = made.body["id"].as_str().unwrap().to_owned();
    assert_eq!(made.body["status"]["online"], false);

    let list = api.call("GET", "/api/v1/devices", &token, None).await;
    assert_eq!(list.status, 200);
    assert_eq!(list.body.as_array().unwrap().len(), 2);
    // The test edge's own device has its agent connected? Not here: no
    // agent runs in this test, so every device is offline.
    let one = api
        .call("GET", &format!("/api/v1/devices/{device}"), &token, None)
        .await;
    assert_eq!(one.body["name"], "x1c");
    let renamed = api
        .call(
            "PATCH",
            &format!("/api/v1/devices/{device}"),
            &token,
            Some(json!({ "name": "x1c carbon" })),
        )
        .await;
    assert_eq!(renamed.status, 200, "{:?}", renamed.body);
    assert_eq!(renamed.body["name"], "x1c carbon");

    let key = api
        .call(
            "POST",
            "/api/v1/keys",
            &token,
            Some(json!({ "label": "home assistant", "scope": "read", "device_id": device, "expires_in_seconds": 3600 })),
        )
        .await;
    assert_eq!(key.status, 201, "{:?}", key.body);
    let key_token = key.body["token"].as_str().unwrap().to_owned();
    assert!(key_token.starts_with("rly_"));
    let key_id = key.body["key"]["id"].as_str().unwrap().to_owned();
    assert_eq!(key.body["key"]["device_id"], device.as_str());
    let keys = api.call("GET", "/api/v1/keys", &token, None).await;
    assert!(
        keys.body
            .as_array()
            .unwrap()
            .iter()
            .any(|key| key["id"] == key_id.as_str())
    );
    assert!(
        !keys.body.to_string().contains(&key_token),
        "secrets are shown once"
    );

    let issued = api
        .call(
            "POST",
            &format!("/api/v1/devices/{device}/agent-credential"),
            &token,
            None,
        )
        .await;
    assert_eq!(issued.status, 201, "{:?}", issued.body);
    let first = issued.body["token"].as_str().unwrap().to_owned();
    assert!(first.starts_with("rla_"));
    let rotated = api
        .call(
            "POST",
            &format!("/api/v1/devices/{device}/agent-credential"),
            &token,
            None,
        )
        .await;
    assert_eq!(rotated.status, 201);
    assert!(
        api.store()
            .verify_agent_credential(&first)
            .await
            .unwrap()
            .is_err(),
        "the old one stops working"
    );
    let second = rotated.body["token"].as_str().unwrap().to_owned();
    assert_eq!(
        api.store()
            .verify_agent_credential(&second)
            .await
            .unwrap()
            .unwrap(),
        device
    );
    let revoked = api
        .call(
            "DELETE",
            &format!("/api/v1/devices/{device}/agent-credential"),
            &token,
            None,
        )
        .await;
    assert_eq!(revoked.status, 204);
    assert!(
        api.store()
            .verify_agent_credential(&second)
            .await
            .unwrap()
            .is_err()
    );
    let again = api
        .call(
            "DELETE",
            &format!("/api/v1/devices/{device}/agent-credential"),
            &token,
            None,
        )
        .await;
    assert_eq!(again.status, 404);

    // API tokens: made (shown once), listed, revoked (refused from then on).
    let made = api
        .call(
            "POST",
            "/api/v1/tokens",
            &token,
            Some(json!({ "label": "ci" })),
        )
        .await;
    assert_eq!(made.status, 201, "{:?}", made.body);
    let secret = made.body["secret"].as_str().unwrap().to_owned();
    let token_id = made.body["token"]["id"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("rlt_"));
    let made_caller = Caller::Token(secret.clone());
    assert_eq!(
        api.call("GET", "/api/v1/devices", &made_caller, None)
            .await
            .status,
        200
    );
    let tokens = api.call("GET", "/api/v1/tokens", &token, None).await;
    assert!(
        tokens
            .body
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == token_id.as_str()
                && t["label"] == "ci"
                && t.get("secret").is_none()),
        "{:?}",
        tokens.body
    );
    let revoked = api
        .call(
            "DELETE",
            &format!("/api/v1/tokens/{token_id}"),
            &token,
            None,
        )
        .await;
    assert_eq!(revoked.status, 204);
    assert_eq!(
        api.call("GET", "/api/v1/devices", &made_caller, None)
            .await
            .status,
        401
    );

    let revoked = api
        .call("DELETE", &format!("/api/v1/keys/{key_id}"), &token, None)
        .await;
    assert_eq!(revoked.status, 204);
    let deleted = api
        .call("DELETE", &format!("/api/v1/devices/{device}"), &token, None)
        .await;
    assert_eq!(deleted.status, 204);
    let gone = api
        .call("GET", &format!("/api/v1/devices/{device}"), &token, None)
        .await;
    assert_eq!(gone.status, 404);

    let audit = api.audit(&token).await;
    let actions: Vec<&str> = audit
        .iter()
        .map(|entry| entry["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "device.delete",
            "key.revoke",
            "token.revoke",
            "token.create",
            "agent_credential.revoke",
            "agent_credential.rotate",
            "agent_credential.issue",
            "key.create",
            "device.rename",
            "device.create",
        ]
    );
    let text = serde_json::to_string(&audit).unwrap();
    for secret in [&key_token, &first, &second, &secret] {
        assert!(
            !text.contains(secret.as_str()),
            "no secret in the audit log"
        );
    }
    assert!(
        audit
            .iter()
            .all(|entry| entry["actor"].as_str().unwrap().starts_with("token:"))
    );
    api.edge.stop().await;
}

#[tokio::test]
async fn a_revoked_key_ends_its_live_session() {
    let api = Api::start().await;
    let tenant = api.edge.tenant.clone();
    let token = api.token(&tenant).await;
    let key = api
        .call(
            "POST",
            "/api/v1/keys",
            &token,
            Some(json!({ "scope": "read", "device_id": api.edge.device })),
        )
        .await;
    let key_token = key.body["token"].as_str().unwrap().to_owned();
    let key_id = key.body["key"]["id"].as_str().unwrap().to_owned();
    let mut printer = api.edge.scripted_printer();
    let mut client = Client::connect(
        &api.edge,
        &format!("Bearer {key_token}"),
        connect_packet("app"),
    )
    .await;
    let _ = &mut printer;
    // The device's page lists the session: client id, MQTT version, how
    // it came, from where, and its key's label.
    let device = api
        .call(
            "GET",
            &format!("/api/v1/devices/{}", api.edge.device),
            &token,
            None,
        )
        .await;
    let status = &device.body["status"];
    assert_eq!(status["apps_connected"], 1, "{status}");
    let app = &status["apps"][0];
    assert_eq!(app["client_id"], "app", "{app}");
    assert_eq!(app["mqtt_version"], "3.1.1");
    assert_eq!(app["transport"], "wss");
    assert_eq!(app["address"], "127.0.0.1");
    assert_eq!(app["key_id"], key_id.as_str());
    assert_eq!(app["key_label"], key.body["key"]["label"]);
    assert!(app["since"].as_i64().unwrap() > 0);
    let revoked = api
        .call("DELETE", &format!("/api/v1/keys/{key_id}"), &token, None)
        .await;
    assert_eq!(revoked.status, 204);
    let (code, _) = client.closed().await.expect("the session was closed");
    assert_eq!(code, 1008);
    let after = api
        .call(
            "GET",
            &format!("/api/v1/devices/{}", api.edge.device),
            &token,
            None,
        )
        .await;
    assert_eq!(after.body["status"]["apps"], json!([]));
    api.edge.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let api = Api::start().await;
    let tenant = api.edge.tenant.clone();
    let token = api.token(&tenant).await;
    let device = api.edge.device.clone();
    let before_devices = api.store().list_devices(Some(&tenant)).await.unwrap();
    let before_keys = api
        .store()
        .list_api_keys(Some(&tenant))
        .await
        .unwrap()
        .len();
    let long_garbage = "x".repeat(200);
    let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        (
            "POST",
            "/api/v1/devices".into(),
            Some("{not json"),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/devices".into(),
            Some(r#"{"name": ""}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/devices".into(),
            Some(r#"{"name": "a", "owner": "b"}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/devices".into(),
            Some(r#"{"name": "p1s"}"#),
            409,
            "conflict",
        ),
        (
            "PATCH",
            format!("/api/v1/devices/{device}"),
            Some(r#"{"name": 7}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/keys".into(),
            Some(r#"{"scope": "admin"}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/keys".into(),
            Some(r#"{"scope": "read", "expires_in_seconds": 0}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/keys".into(),
            Some(r#"{"scope": "read", "device_id": "nosuchdevice"}"#),
            404,
            "not_found",
        ),
        (
            "POST",
            "/api/v1/keys".into(),
            Some(&long_garbage),
            400,
            "invalid_request",
        ),
        (
            "PUT",
            "/api/v1/devices".into(),
            None,
            405,
            "method_not_allowed",
        ),
        ("GET", "/api/v1/printers".into(), None, 404, "not_found"),
    ];
    for (method, path, body, status, code) in cases {
        let answer = api
            .call_on(BASE_DOMAIN, method, &path, &token, body, "application/json")
            .await;
        assert_eq!(answer.status, status, "{method} {path}: {:?}", answer.body);
        assert_eq!(error_code(&answer), code, "{method} {path}");
        assert!(
            answer.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Over 16 KiB: 413.
    let big = json!({ "name": "x".repeat(20_000) }).to_string();
    let answer = api
        .call_on(
            BASE_DOMAIN,
            "POST",
            "/api/v1/devices",
            &token,
            Some(&big),
            "application/json",
        )
        .await;
    assert_eq!(answer.status, 413);
    assert_eq!(error_code(&answer), "too_large");
    assert_eq!(
        api.store().list_devices(Some(&tenant)).await.unwrap(),
        before_devices
    );
    assert_eq!(
        api.store()
            .list_api_keys(Some(&tenant))
            .await
            .unwrap()
            .len(),
        before_keys
    );
    assert!(
        api.audit(&token).await.is_empty(),
        "nothing was changed, nothing audited"
    );
    api.edge.stop().await;
}

#[tokio::test]
async fn another_tenants_ids_are_not_found_and_nothing_of_theirs_changes() {
    let api = Api::start().await;
    let owner = api.edge.tenant.clone();
    let owner_token = api.token(&owner).await;
    let device = api.edge.device.clone();
    let key_id = api.edge.key.1.clone();
    api.call(
        "POST",
        &format!("/api/v1/devices/{device}/agent-credential"),
        &owner_token,
        None,
    )
    .await;
    let owner_token_id = api.store().list_admin_tokens(&owner).await.unwrap()[0]
        .id
        .clone();
    let other = api.store().create_tenant("someone else").await.unwrap().id;
    let intruder = api.token(&other).await;
    let (cookie, csrf) = api.sign_in(&other).await;
    let session = Caller::Session(cookie, Some(csrf));
    for caller in [&intruder, &session] {
        for operation in Operation::ALL {
            let path = operation.path();
            if !path.contains('{') {
                continue;
            }
            let path = path
                .replace("{device_id}", &device)
                .replace("{key_id}", &key_id)
                .replace("{token_id}", &owner_token_id);
            let body = match operation {
                Operation::RenameDevice => Some(json!({ "name": "taken over" })),
                _ => None,
            };
            let answer = api
                .call(operation.method().as_str(), &path, caller, body)
                .await;
            assert_eq!(
                answer.status,
                404,
                "{} {path}: {:?}",
                operation.method(),
                answer.body
            );
            assert_eq!(error_code(&answer), "not_found");
            assert!(!answer.body.to_string().contains("p1s"), "nothing leaked");
        }
        // Binding a key to their device: not found either.
        let answer = api
            .call(
                "POST",
                "/api/v1/keys",
                caller,
                Some(json!({ "scope": "control", "device_id": device })),
            )
            .await;
        assert_eq!(answer.status, 404);
        // Lists hold only the caller's own.
        let devices = api.call("GET", "/api/v1/devices", caller, None).await;
        assert_eq!(devices.body, json!([]));
        let keys = api.call("GET", "/api/v1/keys", caller, None).await;
        assert_eq!(keys.body, json!([]));
    }
    let still = api.store().tenant_device(&owner, &device).await.unwrap();
    assert_eq!(still.name, "p1s");
    assert!(
        api.store()
            .agent_credential_of(&device)
            .await
            .unwrap()
            .is_some()
    );
    let keys = api.store().list_api_keys(Some(&owner)).await.unwrap();
    assert!(keys.iter().all(|key| key.revoked_at.is_none()));
    let audit = api.audit(&owner_token).await;
    assert_eq!(audit.len(), 1, "only the owner's own change: {audit:?}");
    api.edge.stop().await;
}

#[tokio::test]
async fn no_caller_or_the_wrong_credential_is_401_and_an_api_token_is_no_mqtt_key() {
    // Room for the 52 failures below (4 callers that present a token or a
    // session, 13 routes; no credential and Basic are not guesses); the
    // limit itself is checked after.
    let api = Api::start_with(|config| config.auth.failures_per_ip_per_minute = 100).await;
    let tenant = api.edge.tenant.clone();
    let app_key = api.edge.key.0.clone();
    let agent = api
        .store()
        .issue_agent_credential(&api.edge.device)
        .await
        .unwrap()
        .1
        .reveal();
    let (revoked_token, issued) = api
        .store()
        .create_admin_token(&tenant, "old")
        .await
        .unwrap();
    let _ = revoked_token;
    let callers = [
        Caller::Nobody,
        Caller::Header(format!("Bearer {app_key}")),
        Caller::Header(format!("Bearer {agent}")),
        Caller::Header("Bearer rlt_aaaaaaaaaaaa_aaaaaaaaaaaaaaaaaaaaaaaaaa_aaaaaaa".into()),
        Caller::Header("Basic YTpi".into()),
        Caller::Session("rls_not_a_session".into(), None),
    ];
    for caller in &callers {
        for operation in Operation::ALL {
            if operation == Operation::OpenApi {
                continue;
            }
            let path = operation
                .path()
                .replace("{device_id}", &api.edge.device)
                .replace("{key_id}", &api.edge.key.1);
            let answer = api
                .call(operation.method().as_str(), &path, caller, None)
                .await;
            assert_eq!(answer.status, 401, "{} {path}", operation.method());
            assert_eq!(error_code(&answer), "unauthorized");
        }
    }
    // Past the per-address limit of failed sign-ins: 429, even with a
    // good token, until the minute is over.
    let mut limited = None;
    for attempt in 0..50 {
        let answer = api.call("GET", "/api/v1/devices", &callers[3], None).await;
        if answer.status == 429 {
            limited = Some(attempt);
            assert_eq!(error_code(&answer), "rate_limited");
            break;
        }
        assert_eq!(answer.status, 401);
    }
    // 100 failures a minute: those above (every route but the document's,
    // for each caller that presented a credential of the wrong kind or an
    // unknown one; no credential and HTTP Basic are no sign-in attempt),
    // then the rest.
    let above = 4 * (Operation::ALL.len() - 1);
    assert_eq!(limited, Some(100 - above), "{above} failures above");
    let good = Caller::Token(issued.reveal());
    assert_eq!(
        api.call("GET", "/api/v1/devices", &good, None).await.status,
        429
    );

    // A tenant API token opens no MQTT session.
    let socket = api
        .edge
        .open(
            &api.edge.host(),
            "/mqtt",
            &[("Authorization", &format!("Bearer {}", issued.reveal()))],
        )
        .await;
    match socket {
        // Refused at the upgrade, or at CONNECT: either way, no session.
        Err(error) => assert!(error.to_string().contains("401"), "{error}"),
        Ok((mut socket, _)) => {
            send_connect(&mut socket, connect_packet("with-an-api-token")).await;
            let refused = refusal(&mut socket).await;
            assert!(matches!(refused.connack, Some(4 | 5)), "{refused:?}");
        }
    }
    api.edge.stop().await;
}

#[tokio::test]
async fn the_api_lives_on_the_base_domain_only_and_its_document_validates() {
    let api = Api::start().await;
    let tenant = api.edge.tenant.clone();
    let token = api.token(&tenant).await;
    // On a device's host name, /api/v1 is not there.
    let host = api.edge.host();
    let answer = api
        .call_on(&host, "GET", "/api/v1/devices", &token, None, "")
        .await;
    assert_eq!(answer.status, 404, "{:?}", answer.body);
    assert!(answer.body.get(0).is_none());
    let answer = api
        .call_on(
            &host,
            "GET",
            "/api/v1/openapi.json",
            &Caller::Nobody,
            None,
            "",
        )
        .await;
    assert_eq!(answer.status, 404);

    // The document the server serves is the one the code makes, and it
    // validates.
    let served = api
        .call("GET", "/api/v1/openapi.json", &Caller::Nobody, None)
        .await;
    assert_eq!(served.status, 200);
    assert_eq!(served.body, openapi_document());
    let file = write(&api.edge.pki.dir, "openapi.json", &served.body.to_string());
    let tools = client_tools();
    let python = tools.join("venv/bin/python");
    let output = tokio::process::Command::new(python)
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    api.edge.stop().await;
}

#[tokio::test]
async fn the_consoles_forms_need_the_csrf_token_and_its_pages_the_callers_tenant() {
    let api = Api::start().await;
    let owner = api.edge.tenant.clone();
    let other = api.store().create_tenant("someone else").await.unwrap().id;
    let (cookie, csrf) = api.sign_in(&other).await;
    let form = "application/x-www-form-urlencoded";
    let session = Caller::Session(cookie.clone(), None);
    // Signed out: the sign-in page.
    let page = api
        .call_on(BASE_DOMAIN, "GET", "/", &Caller::Nobody, None, "")
        .await;
    assert_eq!(page.status, 401);
    // A form without the token, or with another session's: 403, nothing made.
    for body in [
        "name=sneaky".to_owned(),
        format!("name=sneaky&csrf={}", "0".repeat(64)),
    ] {
        let refused = api
            .call_on(BASE_DOMAIN, "POST", "/devices", &session, Some(&body), form)
            .await;
        assert_eq!(refused.status, 403);
    }
    assert!(
        api.store()
            .list_devices(Some(&other))
            .await
            .unwrap()
            .is_empty()
    );
    let made = api
        .call_on(
            BASE_DOMAIN,
            "POST",
            "/devices",
            &session,
            Some(&format!("name=mine&csrf={csrf}")),
            form,
        )
        .await;
    assert_eq!(made.status, 303);
    assert_eq!(
        api.store().list_devices(Some(&other)).await.unwrap().len(),
        1
    );
    // Another tenant's device and key: not found, and nothing of theirs shown.
    let page = api
        .call_on(
            BASE_DOMAIN,
            "GET",
            &format!("/devices/{}", api.edge.device),
            &session,
            None,
            "",
        )
        .await;
    assert_eq!(page.status, 404);
    assert!(!page.body.to_string().contains("p1s"));
    let revoke = api
        .call_on(
            BASE_DOMAIN,
            "POST",
            &format!("/keys/{}/revoke", api.edge.key.1),
            &session,
            Some(&format!("csrf={csrf}")),
            form,
        )
        .await;
    assert_eq!(revoke.status, 404);
    let keys = api.store().list_api_keys(Some(&owner)).await.unwrap();
    assert!(keys.iter().all(|key| key.revoked_at.is_none()));
    // Agent credentials: issued, listed, revoked through the forms, for
    // the caller's own device; another tenant's cannot be revoked.
    let mine = api.store().list_devices(Some(&other)).await.unwrap()[0]
        .id
        .clone();
    let issued = api
        .call_on(
            BASE_DOMAIN,
            "POST",
            &format!("/devices/{mine}/agent-credential"),
            &session,
            Some(&format!("csrf={csrf}")),
            form,
        )
        .await;
    assert_eq!(issued.status, 200);
    assert!(issued.body.to_string().contains("rla_"), "shown once");
    let credential = api
        .store()
        .agent_credential_of(&mine)
        .await
        .unwrap()
        .expect("issued");
    let agents = api
        .call_on(BASE_DOMAIN, "GET", "/agents", &session, None, "")
        .await;
    assert_eq!(agents.status, 200);
    assert!(agents.body.to_string().contains(&credential.id));
    assert!(!agents.body.to_string().contains(&api.edge.device));
    for (device, expected) in [(api.edge.device.clone(), 404), (mine.clone(), 303)] {
        let revoked = api
            .call_on(
                BASE_DOMAIN,
                "POST",
                &format!("/devices/{device}/agent-credential/revoke"),
                &session,
                Some(&format!("csrf={csrf}")),
                form,
            )
            .await;
        assert_eq!(revoked.status, expected, "{device}");
    }
    assert!(
        api.store()
            .agent_credential_of(&mine)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        api.audit(&Caller::Session(cookie.clone(), None))
            .await
            .iter()
            .any(|entry| entry["action"] == "agent_credential.revoke")
    );
    // The live status socket: same origin only.
    let cross = api
        .call_on(BASE_DOMAIN, "GET", "/console/live", &session, None, "")
        .await;
    assert_eq!(cross.status, 403);
    api.edge.stop().await;
}

/// Opens the console's message view of `device` as a browser would
/// (tungstenite over TLS, the session's cookie, `origin`); the handshake's
/// HTTP status when it is refused.
async fn message_view(
    api: &Api,
    cookie: &str,
    origin: &str,
    device: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    u16,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tcp = tokio::net::TcpStream::connect(api.edge.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(BASE_DOMAIN).unwrap();
    let tls = api.edge.client_tls().connect(name, tcp).await.unwrap();
    let mut request = format!("wss://{BASE_DOMAIN}/console/messages/{device}")
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert("Cookie", format!("relay_session={cookie}").parse().unwrap());
    headers.insert("Origin", origin.parse().unwrap());
    match tokio_tungstenite::client_async(request, tls).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(error) => panic!("handshake: {error}"),
    }
}

/// The console's live message view: the caller's own devices only, same
/// origin only, at most eight per tenant, and it shows the printer's
/// messages, each cut to 2048 bytes.
#[tokio::test]
async fn the_message_view_shows_the_printers_messages_to_its_owner_only() {
    use futures_util::StreamExt;
    use relay_proto::mqtt::{Packet, Publish, QoS, SubAck, SubscribeReturnCode};
    use tokio_tungstenite::tungstenite::Message;

    let api = Api::start().await;
    let owner = api.edge.tenant.clone();
    let other = api.store().create_tenant("someone else").await.unwrap().id;
    let (cookie, _) = api.sign_in(&owner).await;
    let (other_cookie, _) = api.sign_in(&other).await;
    let origin = format!("https://{BASE_DOMAIN}:{}", api.edge.addr.port());
    let device = api.edge.device.clone();
    // Another tenant's device is not found; another site's page is refused;
    // no session is 401.
    assert_eq!(
        message_view(&api, &other_cookie, &origin, &device)
            .await
            .err(),
        Some(404)
    );
    assert_eq!(
        message_view(&api, &cookie, "https://evil.example", &device)
            .await
            .err(),
        Some(403)
    );
    assert_eq!(
        message_view(&api, "nonsense", &origin, &device).await.err(),
        Some(401)
    );

    let mut printer = api.edge.scripted_printer();
    let mut view = message_view(&api, &cookie, &origin, &device)
        .await
        .expect("the owner's view opens");
    // The view subscribes like an app; the printer grants it.
    let Some(Packet::Subscribe(subscribe)) = printer.next().await else {
        panic!("the view's SUBSCRIBE reaches the printer");
    };
    printer
        .send(&Packet::SubAck(SubAck {
            packet_id: subscribe.packet_id,
            return_codes: vec![SubscribeReturnCode::Success(QoS::AtMostOnce)],
        }))
        .await;
    let next_event = async |view: &mut tokio_tungstenite::WebSocketStream<_>| -> Value {
        loop {
            match tokio::time::timeout(PATIENCE, view.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => return serde_json::from_str(&text).unwrap(),
                Ok(Some(Ok(_))) => {}
                other => panic!("the view ended: {other:?}"),
            }
        }
    };
    assert_eq!(next_event(&mut view).await["event"], "watching");
    let big = "x".repeat(5000);
    printer
        .send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "printer/status".into(),
            packet_id: None,
            payload: bytes::Bytes::from(big.clone()),
        }))
        .await;
    let shown = next_event(&mut view).await;
    assert_eq!(shown["event"], "message", "{shown}");
    assert_eq!(shown["topic"], "printer/status");
    assert_eq!(shown["size"], 5000);
    assert_eq!(shown["cut"], true);
    assert_eq!(shown["payload"].as_str().unwrap().len(), 2048);
    // A tenant holds at most eight views at once.
    let mut more = Vec::new();
    for _ in 0..7 {
        more.push(
            message_view(&api, &cookie, &origin, &device)
                .await
                .expect("up to eight views"),
        );
    }
    assert_eq!(
        message_view(&api, &cookie, &origin, &device).await.err(),
        Some(429)
    );
    api.edge.stop().await;
}
