//! Apps that ask an owner for access (OAuth 2.0 code + PKCE) on both
//! backends: registration rules, a code's exchange for device-bound keys
//! labelled with the app's name, and every refusal: another app, another
//! redirect URI, a wrong verifier, an expired code, and a code presented
//! twice (whose keys are then revoked).

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use relay_store::oauth_apps::{CODE_MILLIS, CodeRefusal, Consent, Exchange, s256_challenge};
use relay_store::testing::TestDatabase;
use relay_store::{ManualClock, Scope, StoreError};

both_backends!(apps_get_device_bound_keys_for_a_code_once,);

const START: i64 = 1_800_000_000_000;
const VERIFIER: &str = "a-verifier-of-forty-three-characters-or-more-0123";

async fn apps_get_device_bound_keys_for_a_code_once(db: &TestDatabase) {
    let clock = ManualClock::starting_at(START);
    let store = db.store.clone().with_clock(clock.clone());
    let tenant = store.create_tenant("acme").await.unwrap().id;
    let p1s = store.create_device(&tenant, "p1s").await.unwrap().id;
    let x1c = store.create_device(&tenant, "x1c").await.unwrap().id;
    assert!(matches!(
        store
            .register_app("Slicer", &["http://app.example/cb".into()], &[Scope::Read])
            .await,
        Err(StoreError::InvalidInput(_))
    ));
    let redirect = "http://127.0.0.1:8765/callback".to_owned();
    let app = store
        .register_app(
            "Print Watch",
            std::slice::from_ref(&redirect),
            &[Scope::Read],
        )
        .await
        .unwrap();
    assert_eq!(store.app(&app.id).await.unwrap().as_ref(), Some(&app));
    assert!(app.redirects_to(&redirect) && !app.redirects_to("http://127.0.0.1:8765/callback/"));
    assert!(app.may_ask(Scope::Read) && !app.may_ask(Scope::Control));

    let devices = vec![p1s.clone(), x1c.clone()];
    let challenge = s256_challenge(VERIFIER);
    let consent = Consent {
        app: &app,
        tenant_id: &tenant,
        device_ids: &devices,
        scope: Scope::Read,
        redirect_uri: &redirect,
        code_challenge: &challenge,
    };
    let exchange = |code: &str, client: &str, uri: &str, verifier: &str| {
        (
            code.to_owned(),
            client.to_owned(),
            uri.to_owned(),
            verifier.to_owned(),
        )
    };
    let redeem = async |(code, client, uri, verifier): (String, String, String, String)| {
        store
            .redeem_authorization_code(Exchange {
                code: &code,
                client_id: &client,
                redirect_uri: &uri,
                code_verifier: &verifier,
            })
            .await
            .unwrap()
    };

    // The code, exchanged: one key per printer, bound to it, read-only,
    // labelled with the app's name, and listed as the app's.
    let code = store
        .create_authorization_code(&consent)
        .await
        .unwrap()
        .reveal();
    let granted = redeem(exchange(&code, &app.id, &redirect, VERIFIER))
        .await
        .unwrap();
    assert_eq!(granted.scope, Scope::Read);
    assert_eq!(granted.keys.len(), 2);
    let keys = store.list_api_keys(Some(&tenant)).await.unwrap();
    for (device, credential) in &granted.keys {
        let key = keys.iter().find(|key| key.id == credential.id).unwrap();
        assert_eq!(key.device_id.as_ref(), Some(device));
        assert_eq!(
            (key.scope, key.label.as_str()),
            (Scope::Read, "Print Watch")
        );
    }
    assert_eq!(store.app_grants(&tenant).await.unwrap().len(), 2);
    // Twice: refused, and the keys it gave are revoked.
    assert_eq!(
        redeem(exchange(&code, &app.id, &redirect, VERIFIER))
            .await
            .unwrap_err(),
        CodeRefusal::Used
    );
    let keys = store.list_api_keys(Some(&tenant)).await.unwrap();
    assert!(keys.iter().all(|key| key.revoked_at.is_some()));

    // Each wrong part refuses, and uses the code up.
    let other = store
        .register_app("Other", std::slice::from_ref(&redirect), &[Scope::Read])
        .await
        .unwrap();
    for (client, uri, verifier, refusal) in [
        (
            other.id.as_str(),
            redirect.as_str(),
            VERIFIER,
            CodeRefusal::OtherClient,
        ),
        (
            app.id.as_str(),
            "http://127.0.0.1:8765/other",
            VERIFIER,
            CodeRefusal::OtherRedirect,
        ),
        (
            app.id.as_str(),
            redirect.as_str(),
            "another-verifier-of-forty-three-characters-or-more",
            CodeRefusal::Verifier,
        ),
    ] {
        let code = store
            .create_authorization_code(&consent)
            .await
            .unwrap()
            .reveal();
        assert_eq!(
            redeem(exchange(&code, client, uri, verifier))
                .await
                .unwrap_err(),
            refusal
        );
        assert_eq!(
            redeem(exchange(&code, &app.id, &redirect, VERIFIER))
                .await
                .unwrap_err(),
            CodeRefusal::Used
        );
    }
    let late = store
        .create_authorization_code(&consent)
        .await
        .unwrap()
        .reveal();
    clock.advance(CODE_MILLIS);
    assert_eq!(
        redeem(exchange(&late, &app.id, &redirect, VERIFIER))
            .await
            .unwrap_err(),
        CodeRefusal::Expired
    );
    assert_eq!(
        redeem(exchange("rlc_nothing", &app.id, &redirect, VERIFIER))
            .await
            .unwrap_err(),
        CodeRefusal::Unknown
    );
}
