//! Tenants, devices, keys and agent credentials on both backends.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use relay_store::credential::{CredentialKind, IssuedCredential};
use relay_store::testing::TestDatabase;
use relay_store::{AgentAuthFailure, NewApiKey, Scope, StoreError};

both_backends!(
    migrations_apply_once,
    tenants_have_unique_names,
    devices_get_unguessable_ids_that_are_never_reused,
    keys_are_listed_without_secrets_and_revoke_once,
    keys_cannot_name_another_tenants_device,
    agent_credentials_rotate_and_die_with_their_device,
);

async fn migrations_apply_once(db: &TestDatabase) {
    assert_eq!(db.store.migrate().await.unwrap(), Vec::<&str>::new());
    // A migration edited after it ran, and one from a newer build, are refused.
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    let original: String =
        sqlx::query_scalar("SELECT checksum FROM relay_migrations WHERE version = 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    sqlx::query("UPDATE relay_migrations SET checksum = 'edited' WHERE version = 1")
        .execute(&pool)
        .await
        .unwrap();
    assert!(matches!(
        db.store.migrate().await,
        Err(StoreError::MigrationChanged { .. })
    ));
    sqlx::query("UPDATE relay_migrations SET checksum = $1 WHERE version = 1")
        .bind(&original)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO relay_migrations (version, name, checksum, applied_at) VALUES (999, '0999_future', 'x', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert!(matches!(
        db.store.migrate().await,
        Err(StoreError::UnknownMigration { .. })
    ));
    pool.close().await;
}

async fn tenants_have_unique_names(db: &TestDatabase) {
    let acme = db.store.create_tenant("acme").await.unwrap();
    assert!(acme.id.starts_with("tn_"));
    let error = db.store.create_tenant(" acme ").await.unwrap_err();
    assert!(matches!(error, StoreError::Conflict(_)), "{error:?}");
    assert!(matches!(
        db.store.create_tenant("  ").await,
        Err(StoreError::InvalidInput(_))
    ));
    db.store.create_tenant("beta").await.unwrap();
    let names: Vec<String> = db
        .store
        .list_tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["acme", "beta"]);
    assert_eq!(db.store.tenant("acme").await.unwrap(), acme);
    assert_eq!(db.store.tenant(&acme.id).await.unwrap(), acme);
    assert!(matches!(
        db.store.tenant("nobody").await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn devices_get_unguessable_ids_that_are_never_reused(db: &TestDatabase) {
    let tenant = db.store.create_tenant("acme").await.unwrap();
    let other = db.store.create_tenant("other").await.unwrap();
    let printer = db
        .store
        .create_device(&tenant.id, "p1s-garage")
        .await
        .unwrap();
    assert_eq!(printer.id.len(), 13);
    assert!(
        printer
            .id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
    );
    let error = db
        .store
        .create_device("acme", "p1s-garage")
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::Conflict(_)), "{error:?}");
    // The same name in another tenant is fine.
    db.store
        .create_device(&other.id, "p1s-garage")
        .await
        .unwrap();
    assert!(matches!(
        db.store.create_device("nobody", "x").await,
        Err(StoreError::NotFound { what: "tenant", .. })
    ));

    db.store.delete_device(&printer.id).await.unwrap();
    assert!(
        db.store
            .list_devices(Some("acme"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        db.store
            .device(&printer.id)
            .await
            .unwrap()
            .deleted_at
            .is_some()
    );
    assert!(matches!(
        db.store.delete_device(&printer.id).await,
        Err(StoreError::NotFound { .. })
    ));
    // The name is free again; the id is not reused.
    let again = db.store.create_device("acme", "p1s-garage").await.unwrap();
    assert_ne!(again.id, printer.id);
    assert_eq!(db.store.list_devices(None).await.unwrap().len(), 2);
}

async fn keys_are_listed_without_secrets_and_revoke_once(db: &TestDatabase) {
    let tenant = db.store.create_tenant("acme").await.unwrap();
    let device = db.store.create_device("acme", "p1s").await.unwrap();
    let (key, credential) = db
        .store
        .create_api_key(NewApiKey {
            tenant_id: "acme",
            device_id: Some(&device.id),
            scope: Scope::Control,
            label: "phone app",
            expires_at: Some(db.store.now() + 86_400_000),
        })
        .await
        .unwrap();
    assert_eq!(key.id, credential.id);
    let listed = db.store.list_api_keys(Some(&tenant.id)).await.unwrap();
    assert_eq!(listed, vec![key.clone()]);
    assert!(!format!("{listed:?}").contains(credential.secret()));
    assert!(db.store.revoke_api_key(&key.id).await.unwrap());
    assert!(!db.store.revoke_api_key(&key.id).await.unwrap());
    assert!(
        db.store.list_api_keys(None).await.unwrap()[0]
            .revoked_at
            .is_some()
    );
    assert!(matches!(
        db.store.revoke_api_key("aaaaaaaaaaaa").await,
        Err(StoreError::NotFound {
            what: "API key",
            ..
        })
    ));
}

async fn keys_cannot_name_another_tenants_device(db: &TestDatabase) {
    db.store.create_tenant("acme").await.unwrap();
    db.store.create_tenant("other").await.unwrap();
    let theirs = db.store.create_device("other", "p1s").await.unwrap();
    let error = db
        .store
        .create_api_key(NewApiKey {
            tenant_id: "acme",
            device_id: Some(&theirs.id),
            scope: Scope::Read,
            label: "",
            expires_at: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(error, StoreError::NotFound { what: "device", .. }),
        "{error:?}"
    );
}

async fn agent_credentials_rotate_and_die_with_their_device(db: &TestDatabase) {
    db.store.create_tenant("acme").await.unwrap();
    let device = db.store.create_device("acme", "p1s").await.unwrap();
    let (_, first) = db.store.issue_agent_credential(&device.id).await.unwrap();
    let first = first.reveal();
    assert!(first.starts_with("rla_"));
    assert_eq!(
        db.store.verify_agent_credential(&first).await.unwrap(),
        Ok(device.id.clone())
    );
    assert!(matches!(
        db.store.issue_agent_credential(&device.id).await,
        Err(StoreError::Conflict(_))
    ));

    let (_, second) = db.store.rotate_agent_credential(&device.id).await.unwrap();
    let second = second.reveal();
    assert_eq!(
        db.store.verify_agent_credential(&first).await.unwrap(),
        Err(AgentAuthFailure::Revoked)
    );
    assert_eq!(
        db.store.verify_agent_credential(&second).await.unwrap(),
        Ok(device.id.clone())
    );

    // A well-formed token with the real id but another secret.
    let real_id = second.split('_').nth(1).unwrap().to_owned();
    let other_secret = IssuedCredential::generate(CredentialKind::AgentCredential).unwrap();
    let forged = IssuedCredential::from_parts(
        CredentialKind::AgentCredential,
        real_id,
        other_secret.secret().to_owned(),
    );
    assert_eq!(
        db.store
            .verify_agent_credential(&forged.reveal())
            .await
            .unwrap(),
        Err(AgentAuthFailure::WrongSecret)
    );
    assert_eq!(
        db.store
            .verify_agent_credential("rla_garbage")
            .await
            .unwrap(),
        Err(AgentAuthFailure::Malformed)
    );
    let stranger = IssuedCredential::generate(CredentialKind::AgentCredential)
        .unwrap()
        .reveal();
    assert_eq!(
        db.store.verify_agent_credential(&stranger).await.unwrap(),
        Err(AgentAuthFailure::Unknown)
    );

    db.store.delete_device(&device.id).await.unwrap();
    assert_eq!(
        db.store.verify_agent_credential(&second).await.unwrap(),
        Err(AgentAuthFailure::Revoked)
    );
    assert!(matches!(
        db.store.rotate_agent_credential(&device.id).await,
        Err(StoreError::NotFound { .. })
    ));
}
