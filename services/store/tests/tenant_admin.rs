//! A tenant's own administration on both backends: login links (once, 15
//! minutes at most), console sessions, API tokens, the audit log, and
//! tenant-scoped lookups that treat another tenant's ids as unknown.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use relay_store::admin::AdminAuthFailure;
use relay_store::testing::TestDatabase;
use relay_store::{AuditRecord, StoreError};

both_backends!(login_links_sessions_tokens_and_the_audit_log,);

async fn login_links_sessions_tokens_and_the_audit_log(db: &TestDatabase) {
    let store = &db.store;
    let tenant = store.create_tenant("acme").await.unwrap();
    let other = store.create_tenant("other").await.unwrap();
    assert!(matches!(
        store.create_login_link(&tenant.id, 15 * 60_000 + 1).await,
        Err(StoreError::InvalidInput(_))
    ));
    let (link, _) = store.create_login_link("acme", 60_000).await.unwrap();
    let opened = store
        .redeem_login_link(&link.reveal())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(opened.tenant_id, tenant.id);
    assert_eq!(
        store
            .redeem_login_link(&link.reveal())
            .await
            .unwrap()
            .unwrap_err(),
        AdminAuthFailure::Used
    );
    assert_eq!(
        store
            .redeem_login_link("rll_nonsense")
            .await
            .unwrap()
            .unwrap_err(),
        AdminAuthFailure::Malformed
    );
    let session = opened.credential.reveal();
    let caller = store.verify_admin_session(&session).await.unwrap().unwrap();
    assert_eq!(caller.tenant_id, tenant.id);
    assert!(caller.actor.starts_with("session:"));
    store.revoke_admin_session(&session).await.unwrap();
    assert_eq!(
        store
            .verify_admin_session(&session)
            .await
            .unwrap()
            .unwrap_err(),
        AdminAuthFailure::Revoked
    );

    let (token, issued) = store.create_admin_token("acme", "ci").await.unwrap();
    let caller = store
        .verify_admin_token(&issued.reveal())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(caller.actor, format!("token:{}", token.id));
    // An API token is no session, and no MQTT key.
    assert_eq!(
        store
            .verify_admin_session(&issued.reveal())
            .await
            .unwrap()
            .unwrap_err(),
        AdminAuthFailure::Malformed
    );

    let device = store.create_device(&tenant.id, "p1s").await.unwrap();
    assert!(matches!(
        store.tenant_device(&other.id, &device.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.rename_device(&other.id, &device.id, "mine now").await,
        Err(StoreError::NotFound { .. })
    ));
    let renamed = store
        .rename_device(&tenant.id, &device.id, "x1c")
        .await
        .unwrap();
    assert_eq!(renamed.name, "x1c");

    for action in ["device.create", "device.rename"] {
        store
            .record_audit(
                &tenant.id,
                AuditRecord {
                    actor: &caller.actor,
                    action,
                    target: &device.id,
                    address: "192.0.2.1",
                    detail: "",
                },
            )
            .await
            .unwrap();
    }
    let log = store.audit_log(&tenant.id, 10).await.unwrap();
    assert_eq!(log.len(), 2);
    assert!(store.audit_log(&other.id, 10).await.unwrap().is_empty());
}
