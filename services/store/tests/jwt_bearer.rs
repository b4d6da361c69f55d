//! Operator-signed JWTs: valid tokens, every way a token is refused, and key
//! rotation through the JWKS file. Keys are made fresh by each run.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use relay_store::jwt::{JwksError, JwtConfig, JwtFailure, JwtVerifier};
use relay_store::testing::TestDatabase;
use relay_store::{
    AuthConfig, AuthFailure, Authenticator, PrincipalSource, RequestCredentials, Scope,
};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};

both_backends!(jwts_authenticate_for_their_tenant_and_device);

const ISSUER: &str = "https://auth.example.com";
const AUDIENCE: &str = "relay";

/// A signing key and its public JWK.
struct SigningKey {
    kid: String,
    algorithm: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    /// The raw public key bytes (for the algorithm-confusion attack).
    public: Vec<u8>,
}

fn ec_key(kid: &str) -> SigningKey {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let public = pair.public_key().as_ref().to_vec();
    SigningKey {
        kid: kid.into(),
        algorithm: Algorithm::ES256,
        encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&public[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&public[33..65]),
        }),
        public,
    }
}

fn ed_key(kid: &str) -> SigningKey {
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let public = pair.public_key().as_ref().to_vec();
    SigningKey {
        kid: kid.into(),
        algorithm: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: json!({
            "kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA",
            "x": URL_SAFE_NO_PAD.encode(&public),
        }),
        public,
    }
}

fn hmac_key(kid: &str, secret: &[u8]) -> SigningKey {
    SigningKey {
        kid: kid.into(),
        algorithm: Algorithm::HS256,
        encoding: EncodingKey::from_secret(secret),
        jwk: json!({ "kty": "oct", "kid": kid, "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(secret) }),
        public: secret.to_vec(),
    }
}

struct JwksFile {
    path: PathBuf,
}

impl JwksFile {
    fn new() -> JwksFile {
        let name = relay_store::credential::random_base32(10).unwrap();
        JwksFile {
            path: std::env::temp_dir().join(format!("relay-jwks-{name}.json")),
        }
    }

    fn publish(&self, keys: &[&SigningKey]) {
        let set = json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() });
        // Write beside, then rename: a reader never sees half a file.
        let temporary = self.path.with_extension("tmp");
        std::fs::write(&temporary, set.to_string()).unwrap();
        std::fs::rename(&temporary, &self.path).unwrap();
    }

    fn config(&self) -> JwtConfig {
        JwtConfig {
            jwks_path: self.path.clone(),
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            leeway_seconds: 0,
        }
    }
}

impl Drop for JwksFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(tenant: &str, device: Option<&str>, scope: &str) -> Value {
    let mut claims = json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "user-42",
        "exp": now_seconds() + 600,
        "tenant": tenant, "scope": scope,
    });
    if let Some(device) = device {
        claims["device"] = json!(device);
    }
    claims
}

fn sign(key: &SigningKey, claims: &Value) -> String {
    let mut header = Header::new(key.algorithm);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

#[test]
fn every_forged_or_wrong_token_is_refused_for_its_reason() {
    let es = ec_key("es-1");
    let ed = ed_key("ed-1");
    let hs = hmac_key("hs-1", b"a shared secret of thirty-two b");
    let jwks = JwksFile::new();
    jwks.publish(&[&es, &ed, &hs]);
    let verifier = JwtVerifier::load(jwks.config()).unwrap();
    let good = claims("tn_a", None, "control");

    for key in [&es, &ed, &hs] {
        let verified = verifier.verify(&sign(key, &good)).unwrap();
        assert_eq!(verified.tenant_id, "tn_a");
        assert_eq!(verified.scope, Scope::Control);
        assert_eq!(verified.kid, key.kid);
    }

    let stranger = ec_key("es-404");
    assert_eq!(
        verifier.verify(&sign(&stranger, &good)),
        Err(JwtFailure::UnknownKid)
    );

    // A key of ours with the wrong key material behind the kid.
    let impostor = SigningKey {
        kid: "es-1".into(),
        ..ec_key("x")
    };
    assert_eq!(
        verifier.verify(&sign(&impostor, &good)),
        Err(JwtFailure::BadSignature)
    );

    let mut wrong_audience = good.clone();
    wrong_audience["aud"] = json!("someone-else");
    assert_eq!(
        verifier.verify(&sign(&es, &wrong_audience)),
        Err(JwtFailure::WrongAudience)
    );
    let mut wrong_issuer = good.clone();
    wrong_issuer["iss"] = json!("https://evil.example.com");
    assert_eq!(
        verifier.verify(&sign(&es, &wrong_issuer)),
        Err(JwtFailure::WrongIssuer)
    );
    let mut expired = good.clone();
    expired["exp"] = json!(now_seconds() - 60);
    assert_eq!(
        verifier.verify(&sign(&es, &expired)),
        Err(JwtFailure::Expired)
    );
    let mut no_expiry = good.clone();
    no_expiry.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        verifier.verify(&sign(&es, &no_expiry)),
        Err(JwtFailure::BadClaims)
    );
    let mut bad_scope = good.clone();
    bad_scope["scope"] = json!("admin");
    assert_eq!(
        verifier.verify(&sign(&es, &bad_scope)),
        Err(JwtFailure::BadClaims)
    );

    // Algorithm confusion: HS256 keyed with a public key, under its kid.
    for (kid, public) in [("es-1", &es.public), ("ed-1", &ed.public)] {
        let confused = hmac_key(kid, public);
        assert_eq!(
            verifier.verify(&sign(&confused, &good)),
            Err(JwtFailure::AlgorithmMismatch)
        );
    }

    // alg "none": an unsigned token.
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"es-1","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(good.to_string())
    );
    assert_eq!(verifier.verify(&unsigned), Err(JwtFailure::Malformed));
    let no_kid = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &good, &es.encoding).unwrap();
    assert_eq!(verifier.verify(&no_kid), Err(JwtFailure::MissingKid));
    assert_eq!(verifier.verify("not.a.jwt"), Err(JwtFailure::Malformed));
}

#[test]
fn keys_rotate_through_the_jwks_file() {
    let old = ec_key("2026-10");
    let new = ec_key("2026-11");
    let jwks = JwksFile::new();
    jwks.publish(&[&old]);
    let verifier = JwtVerifier::load(jwks.config()).unwrap();
    let good = claims("tn_a", None, "read");
    let old_token = sign(&old, &good);
    let new_token = sign(&new, &good);
    assert!(verifier.verify(&old_token).is_ok());
    assert_eq!(verifier.verify(&new_token), Err(JwtFailure::UnknownKid));

    jwks.publish(&[&old, &new]);
    assert!(verifier.reload_if_changed().unwrap());
    assert!(verifier.verify(&old_token).is_ok());
    assert!(verifier.verify(&new_token).is_ok());

    jwks.publish(&[&new]);
    assert!(verifier.reload_if_changed().unwrap());
    assert_eq!(verifier.verify(&old_token), Err(JwtFailure::UnknownKid));
    assert!(verifier.verify(&new_token).is_ok());

    // A broken file is refused and the keys in force stay.
    std::fs::write(&jwks.path, "{ not json").unwrap();
    assert!(matches!(
        verifier.reload_if_changed(),
        Err(JwksError::Parse { .. })
    ));
    assert!(verifier.verify(&new_token).is_ok());
}

#[test]
fn a_jwks_that_does_not_pin_algorithms_is_refused() {
    let jwks = JwksFile::new();
    let mut key = ec_key("no-alg");
    key.jwk.as_object_mut().unwrap().remove("alg");
    jwks.publish(&[&key]);
    assert!(matches!(
        JwtVerifier::load(jwks.config()),
        Err(JwksError::MissingAlgorithm { .. })
    ));

    let mut mismatched = hmac_key("oct-as-es", b"secret");
    mismatched.jwk["alg"] = json!("ES256");
    jwks.publish(&[&mismatched]);
    assert!(matches!(
        JwtVerifier::load(jwks.config()),
        Err(JwksError::KeyTypeMismatch { .. })
    ));

    let mut no_kid = ec_key("x");
    no_kid.jwk.as_object_mut().unwrap().remove("kid");
    jwks.publish(&[&no_kid]);
    assert!(matches!(
        JwtVerifier::load(jwks.config()),
        Err(JwksError::MissingKid { index: 0 })
    ));

    let twice = ec_key("twice");
    jwks.publish(&[&twice, &twice]);
    assert!(matches!(
        JwtVerifier::load(jwks.config()),
        Err(JwksError::DuplicateKid { .. })
    ));
}

async fn jwts_authenticate_for_their_tenant_and_device(db: &TestDatabase) {
    let store = &db.store;
    let tenant = store.create_tenant("acme").await.unwrap().id;
    let device = store.create_device(&tenant, "p1s").await.unwrap().id;
    let other_device = store.create_device(&tenant, "x1c").await.unwrap().id;
    let other_tenant = store.create_tenant("other").await.unwrap().id;
    let their_device = store.create_device(&other_tenant, "a1").await.unwrap().id;

    let key = ed_key("ed-1");
    let jwks = JwksFile::new();
    jwks.publish(&[&key]);
    let verifier = Arc::new(JwtVerifier::load(jwks.config()).unwrap());
    let auth = Authenticator::new(store.clone(), Some(verifier), AuthConfig::default());
    let request = |token: &str| format!("Bearer {token}");

    let device_token = sign(&key, &claims(&tenant, Some(&device), "read"));
    let header = request(&device_token);
    let creds = RequestCredentials {
        authorization: Some(relay_store::Secret::new(header.as_str())),
        query_token: None,
    };
    let principal = auth.authenticate(&device, creds).await.unwrap();
    assert_eq!(principal.source, PrincipalSource::Jwt);
    assert_eq!(principal.scope, Scope::Read);
    assert_eq!(principal.tenant_id, tenant);
    assert_eq!(principal.key_id, "jwt:ed-1:user-42");
    assert_eq!(
        auth.authenticate(&other_device, creds).await,
        Err(AuthFailure::WrongDevice)
    );

    // A tenant-wide token: any device of its tenant, none of another's.
    let tenant_token = sign(&key, &claims(&tenant, None, "control"));
    let query = RequestCredentials {
        authorization: None,
        query_token: Some(relay_store::Secret::new(tenant_token.as_str())),
    };
    assert_eq!(
        auth.authenticate(&other_device, query).await.unwrap().scope,
        Scope::Control
    );
    assert_eq!(
        auth.authenticate(&their_device, query).await,
        Err(AuthFailure::WrongDevice)
    );
    assert_eq!(
        auth.authenticate("nosuchdevice1", query).await,
        Err(AuthFailure::UnknownDevice)
    );

    let mut wrong_audience = claims(&tenant, None, "control");
    wrong_audience["aud"] = json!("elsewhere");
    let token = sign(&key, &wrong_audience);
    let query = RequestCredentials {
        authorization: None,
        query_token: Some(relay_store::Secret::new(token.as_str())),
    };
    assert_eq!(
        auth.authenticate(&device, query).await,
        Err(AuthFailure::Jwt(JwtFailure::WrongAudience))
    );
}
