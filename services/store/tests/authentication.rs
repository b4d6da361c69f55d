//! Every authentication outcome for API keys, on both backends, and the
//! cache's contract (a storm costs one query; failures are cached briefly;
//! expiry still bites from the cache).

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use base64::Engine;
use relay_store::testing::TestDatabase;
use relay_store::{
    AuthConfig, AuthFailure, Authenticator, ManualClock, NewApiKey, PrincipalSource,
    RequestCredentials, Scope, Store,
};

both_backends!(
    header_and_query_forms_authenticate,
    read_keys_say_read_only,
    keys_are_confined_to_their_tenant_and_device,
    unknown_and_wrong_credentials_are_told_apart,
    expiry_bites_even_from_the_cache,
    revocation_takes_effect_when_the_cache_forgets,
    a_tampered_checksum_is_refused_without_the_database,
    a_storm_of_the_same_key_costs_one_query,
    failures_are_cached_briefly_and_outages_not_at_all,
    last_use_is_recorded,
);

const START: i64 = 1_800_000_000_000;

struct Fixture {
    store: Store,
    clock: ManualClock,
    tenant: String,
    device: String,
}

async fn fixture(db: &TestDatabase) -> Fixture {
    let clock = ManualClock::starting_at(START);
    let store = db.store.clone().with_clock(clock.clone());
    let tenant = store.create_tenant("acme").await.unwrap().id;
    let device = store.create_device(&tenant, "p1s").await.unwrap().id;
    Fixture {
        store,
        clock,
        tenant,
        device,
    }
}

impl Fixture {
    async fn key(
        &self,
        scope: Scope,
        device: Option<&str>,
        expires_at: Option<i64>,
    ) -> (String, String, String) {
        let (key, credential) = self
            .store
            .create_api_key(NewApiKey {
                tenant_id: &self.tenant,
                device_id: device,
                scope,
                label: "test",
                expires_at,
            })
            .await
            .unwrap();
        (credential.reveal(), key.id, credential.secret().to_owned())
    }

    fn authenticator(&self) -> Authenticator {
        Authenticator::new(self.store.clone(), None, AuthConfig::default())
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn header(value: &str) -> RequestCredentials<'_> {
    RequestCredentials {
        authorization: Some(relay_store::Secret::new(value)),
        query_token: None,
    }
}

fn query(value: &str) -> RequestCredentials<'_> {
    RequestCredentials {
        authorization: None,
        query_token: Some(relay_store::Secret::new(value)),
    }
}

fn basic(user: &str, pass: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

async fn header_and_query_forms_authenticate(db: &TestDatabase) {
    let f = fixture(db).await;
    let (token, key_id, secret) = f.key(Scope::Control, None, None).await;
    let auth = f.authenticator();
    let basic_header = format!("Basic {}", basic(&key_id, &secret));
    let basic_query = basic(&key_id, &secret);
    let bearer_header = bearer(&token);
    for request in [
        header(&bearer_header),
        header(&basic_header),
        query(&token),
        query(&basic_query),
    ] {
        let principal = auth.authenticate(&f.device, request).await.unwrap();
        assert_eq!(principal.tenant_id, f.tenant);
        assert_eq!(principal.scope, Scope::Control);
        assert_eq!(principal.key_id, key_id);
        assert_eq!(principal.device_id, None);
        assert_eq!(principal.source, PrincipalSource::ApiKey);
    }
    // The header wins over the query parameter.
    let both = RequestCredentials {
        authorization: Some(relay_store::Secret::new(bearer_header.as_str())),
        query_token: Some(relay_store::Secret::new("garbage")),
    };
    assert!(auth.authenticate(&f.device, both).await.is_ok());
}

async fn read_keys_say_read_only(db: &TestDatabase) {
    let f = fixture(db).await;
    let (token, _, _) = f.key(Scope::Read, Some(&f.device), None).await;
    let principal = f
        .authenticator()
        .authenticate(&f.device, query(&token))
        .await
        .unwrap();
    assert_eq!(principal.scope, Scope::Read);
    assert_eq!(principal.device_id.as_deref(), Some(f.device.as_str()));
}

async fn keys_are_confined_to_their_tenant_and_device(db: &TestDatabase) {
    let f = fixture(db).await;
    let second_device = f.store.create_device(&f.tenant, "x1c").await.unwrap().id;
    let other_tenant = f.store.create_tenant("other").await.unwrap().id;
    let their_device = f.store.create_device(&other_tenant, "a1").await.unwrap().id;
    let (tenant_wide, _, _) = f.key(Scope::Control, None, None).await;
    let (device_only, _, _) = f.key(Scope::Control, Some(&f.device), None).await;
    let auth = f.authenticator();

    assert!(
        auth.authenticate(&second_device, query(&tenant_wide))
            .await
            .is_ok()
    );
    assert_eq!(
        auth.authenticate(&their_device, query(&tenant_wide)).await,
        Err(AuthFailure::WrongDevice)
    );
    assert_eq!(
        auth.authenticate(&second_device, query(&device_only)).await,
        Err(AuthFailure::WrongDevice)
    );
    assert!(
        auth.authenticate(&f.device, query(&device_only))
            .await
            .is_ok()
    );
    // Every one of these looks the same from outside.
    assert!(AuthFailure::WrongDevice.is_credential_problem());
    assert!(AuthFailure::UnknownDevice.is_credential_problem());
}

async fn unknown_and_wrong_credentials_are_told_apart(db: &TestDatabase) {
    let f = fixture(db).await;
    let (token, key_id, _) = f.key(Scope::Control, None, None).await;
    let auth = f.authenticator();
    assert_eq!(
        auth.authenticate(&f.device, RequestCredentials::default())
            .await,
        Err(AuthFailure::Missing)
    );
    assert_eq!(
        auth.authenticate("nosuchdevice1", query(&token)).await,
        Err(AuthFailure::UnknownDevice)
    );
    let stranger = relay_store::credential::IssuedCredential::generate(
        relay_store::credential::CredentialKind::ApiKey,
    )
    .unwrap()
    .reveal();
    assert_eq!(
        auth.authenticate(&f.device, query(&stranger)).await,
        Err(AuthFailure::UnknownKey)
    );
    let wrong_secret = basic(&key_id, "abcdefghijklmnopqrstuvwxyz");
    assert_eq!(
        auth.authenticate(&f.device, query(&wrong_secret)).await,
        Err(AuthFailure::WrongSecret)
    );
    // A JWT-shaped bearer when no JWKS is configured.
    assert_eq!(
        auth.authenticate(&f.device, header("Bearer aaa.bbb.ccc"))
            .await,
        Err(AuthFailure::JwtNotEnabled)
    );
    assert!(matches!(
        auth.authenticate(&f.device, header("Token abc")).await,
        Err(AuthFailure::Malformed(_))
    ));
}

async fn expiry_bites_even_from_the_cache(db: &TestDatabase) {
    let f = fixture(db).await;
    let (expired, _, _) = f.key(Scope::Control, None, Some(START - 1)).await;
    let (soon, _, _) = f.key(Scope::Control, None, Some(START + 10_000)).await;
    let auth = f.authenticator();
    assert_eq!(
        auth.authenticate(&f.device, query(&expired)).await,
        Err(AuthFailure::Expired)
    );
    let principal = auth.authenticate(&f.device, query(&soon)).await.unwrap();
    assert_eq!(principal.expires_at, Some(START + 10_000));
    // Still inside the cache's lifetime, but past the key's.
    f.clock.advance(10_000);
    assert_eq!(
        auth.authenticate(&f.device, query(&soon)).await,
        Err(AuthFailure::Expired)
    );
}

async fn revocation_takes_effect_when_the_cache_forgets(db: &TestDatabase) {
    let f = fixture(db).await;
    let (token, key_id, _) = f.key(Scope::Control, None, None).await;
    let auth = f.authenticator();
    assert!(auth.authenticate(&f.device, query(&token)).await.is_ok());
    f.store.revoke_api_key(&key_id).await.unwrap();
    // The revocation watcher tells the authenticator; here we do.
    auth.forget(Some(&key_id));
    assert_eq!(
        auth.authenticate(&f.device, query(&token)).await,
        Err(AuthFailure::Revoked)
    );
    // Even without being told, the cached success lasts one TTL at most.
    let (second, second_id, _) = f.key(Scope::Control, None, None).await;
    assert!(auth.authenticate(&f.device, query(&second)).await.is_ok());
    f.store.revoke_api_key(&second_id).await.unwrap();
    f.clock
        .advance(AuthConfig::default().success_ttl.as_millis() as i64 + 1);
    assert_eq!(
        auth.authenticate(&f.device, query(&second)).await,
        Err(AuthFailure::Revoked)
    );
}

async fn a_tampered_checksum_is_refused_without_the_database(db: &TestDatabase) {
    let f = fixture(db).await;
    let (token, _, _) = f.key(Scope::Control, None, None).await;
    let mut tampered = token.into_bytes();
    let position = tampered.len() - 10;
    tampered[position] = if tampered[position] == b'a' {
        b'b'
    } else {
        b'a'
    };
    let tampered = String::from_utf8(tampered).unwrap();
    let auth = f.authenticator();
    f.store.close().await;
    assert_eq!(
        auth.authenticate(&f.device, query(&tampered)).await,
        Err(AuthFailure::Malformed("checksum does not match"))
    );
}

async fn a_storm_of_the_same_key_costs_one_query(db: &TestDatabase) {
    let f = fixture(db).await;
    let (token, _, _) = f.key(Scope::Control, None, None).await;
    let auth = f.authenticator();
    assert!(auth.authenticate(&f.device, query(&token)).await.is_ok());
    // With the database gone, only the cache can answer.
    f.store.close().await;
    for _ in 0..1_000 {
        assert!(auth.authenticate(&f.device, query(&token)).await.is_ok());
    }
    assert_eq!(auth.cached_results(), 1);
}

async fn failures_are_cached_briefly_and_outages_not_at_all(db: &TestDatabase) {
    let f = fixture(db).await;
    let (_, key_id, _) = f.key(Scope::Control, None, None).await;
    let wrong = basic(&key_id, "abcdefghijklmnopqrstuvwxyz");
    let auth = Authenticator::new(
        f.store.clone(),
        None,
        AuthConfig {
            failure_ttl: Duration::from_secs(5),
            ..AuthConfig::default()
        },
    );
    assert_eq!(
        auth.authenticate(&f.device, query(&wrong)).await,
        Err(AuthFailure::WrongSecret)
    );
    f.store.close().await;
    assert_eq!(
        auth.authenticate(&f.device, query(&wrong)).await,
        Err(AuthFailure::WrongSecret)
    );
    f.clock.advance(5_001);
    assert_eq!(
        auth.authenticate(&f.device, query(&wrong)).await,
        Err(AuthFailure::Unavailable)
    );
    assert_eq!(auth.cached_results(), 1, "the outage must not be cached");
}

async fn last_use_is_recorded(db: &TestDatabase) {
    let f = fixture(db).await;
    let (token, key_id, _) = f.key(Scope::Control, None, None).await;
    let auth = f.authenticator();
    assert!(auth.authenticate(&f.device, query(&token)).await.is_ok());
    assert_eq!(auth.flush_last_used().await.unwrap(), 1);
    assert_eq!(auth.flush_last_used().await.unwrap(), 0);
    let keys = f.store.list_api_keys(None).await.unwrap();
    let key = keys.iter().find(|k| k.id == key_id).unwrap();
    assert_eq!(key.last_used_at, Some(START));
}
