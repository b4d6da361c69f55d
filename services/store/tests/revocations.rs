//! Revocation events reach a watcher: through NOTIFY on Postgres, through
//! the periodic query on SQLite, and through the catch-up query after the
//! LISTEN connection was lost (the notification itself is gone for good).

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use relay_store::testing::TestDatabase;
use relay_store::{Backend, NewApiKey, RevocationWatcher, Revoked, Scope, Store};

both_backends!(deleting_a_device_revokes_everything_on_it);

/// A guard against a hang, not a synchronisation: events normally arrive in
/// milliseconds.
const PATIENCE: Duration = Duration::from_secs(20);

async fn next_event(watcher: &mut RevocationWatcher) -> Revoked {
    tokio::time::timeout(PATIENCE, watcher.next())
        .await
        .expect("no revocation event within the patience window")
        .expect("watcher failed")
}

async fn control_key(store: &Store, tenant: &str, device: Option<&str>) -> String {
    store
        .create_api_key(NewApiKey {
            tenant_id: tenant,
            device_id: device,
            scope: Scope::Control,
            label: "",
            expires_at: None,
        })
        .await
        .unwrap()
        .0
        .id
}

/// How often the watcher queries: on Postgres, so rarely that only NOTIFY
/// (or a catch-up) can explain a prompt event.
fn poll_period(backend: Backend) -> Duration {
    match backend {
        Backend::Postgres => Duration::from_secs(3600),
        Backend::Sqlite => Duration::from_millis(20),
    }
}

async fn deleting_a_device_revokes_everything_on_it(db: &TestDatabase) {
    let store = &db.store;
    let tenant = store.create_tenant("acme").await.unwrap().id;
    let device = store.create_device(&tenant, "p1s").await.unwrap().id;
    let mut watcher = RevocationWatcher::start(store.clone(), poll_period(store.backend()))
        .await
        .unwrap();

    let key = control_key(store, &tenant, None).await;
    store.revoke_api_key(&key).await.unwrap();
    assert_eq!(next_event(&mut watcher).await, Revoked::ApiKey(key));

    let scoped_key = control_key(store, &tenant, Some(&device)).await;
    let (credential, _) = store.issue_agent_credential(&device).await.unwrap();
    store.delete_device(&device).await.unwrap();
    let mut events = HashSet::new();
    for _ in 0..3 {
        events.insert(next_event(&mut watcher).await);
    }
    let expected: HashSet<Revoked> = [
        Revoked::Device(device.clone()),
        Revoked::ApiKey(scoped_key),
        Revoked::AgentCredential(credential.id),
    ]
    .into();
    assert_eq!(events, expected);
}

#[tokio::test]
async fn a_lost_listen_connection_is_followed_by_a_catch_up() {
    let db = TestDatabase::postgres().await;
    let store = &db.store;
    let tenant = store.create_tenant("acme").await.unwrap().id;
    let mut watcher = RevocationWatcher::start(store.clone(), Duration::from_secs(3600))
        .await
        .unwrap();

    let mut admin = sqlx_connection(&db).await;
    // A revocation whose notification never goes out...
    sqlx::raw_sql("ALTER TABLE api_keys DISABLE TRIGGER api_keys_revoked")
        .execute(&mut admin)
        .await
        .unwrap();
    let key = control_key(store, &tenant, None).await;
    store.revoke_api_key(&key).await.unwrap();
    // ...and then the LISTEN connection dies.
    let terminated = sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(terminated.len(), 1, "exactly one LISTEN connection");
    assert_eq!(next_event(&mut watcher).await, Revoked::ApiKey(key));
    drop(watcher);
    drop(admin);
    db.cleanup().await;
}

async fn sqlx_connection(db: &TestDatabase) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(&db.url).await.unwrap()
}
