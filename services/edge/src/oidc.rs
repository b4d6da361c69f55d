//! Signing in to the console with the operator's OpenID Connect provider:
//! the authorization code flow with PKCE, `[console.oidc]` in the edge's
//! configuration.
//!
//! - `GET /login/oidc` sends the browser to the provider's authorization
//!   endpoint (from its discovery document) with a fresh `state`, `nonce`
//!   and PKCE challenge. They ride in a short-lived cookie, signed with a
//!   key derived from the client secret, so any instance can finish.
//! - `GET /login/oidc/callback` checks the `state`, exchanges the code
//!   (client secret, HTTP Basic), and checks the ID token: signature with
//!   the provider's JWKS (asymmetric algorithms only; the key its `kid`
//!   names), `iss`, `aud`, `exp`, and a `nonce` that is this sign-in's and
//!   not seen before. The tenant comes from a claim (`tenant_claim`, with
//!   an optional mapping). Then it opens a console session, as a login
//!   link does.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use dashmap::DashMap;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use relay_io::http_client::Origin;
use serde::Deserialize;
use serde_json::Value;

use crate::config::OidcConfig;
use crate::form::Form;

/// The cookie that carries a sign-in's state, nonce and PKCE verifier.
const FLOW_COOKIE: &str = "relay_oidc";
/// How long a sign-in at the provider may take.
const FLOW_SECONDS: u64 = 600;
/// How long a discovery document and its keys are used before fetching
/// again (an unknown `kid` fetches the keys sooner, at most once a minute).
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);
/// Nonces remembered against replay: as long as a flow lives.
const NONCE_MEMORY: Duration = Duration::from_secs(FLOW_SECONDS + 60);
const MAX_NONCES: usize = 100_000;

/// The provider's endpoints, from its discovery document.
#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

#[derive(Debug, Default)]
struct Cached {
    discovery: Option<(Instant, Discovery)>,
    keys: Option<(Instant, JwkSet)>,
}

/// The provider, as this instance knows it.
pub struct Oidc {
    config: OidcConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    cached: RwLock<Cached>,
    /// Nonces of finished sign-ins, against a replayed ID token.
    nonces: DashMap<String, Instant>,
    cookie_key: ring::hmac::Key,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.config.issuer)
            .finish_non_exhaustive()
    }
}

/// Why a sign-in failed: what the person is told (never a secret), and
/// a label for the log and the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignInFailure {
    pub label: &'static str,
    pub message: String,
}

fn failure(label: &'static str, message: impl Into<String>) -> SignInFailure {
    SignInFailure {
        label,
        message: message.into(),
    }
}

/// The claims of an ID token this module reads.
#[derive(Debug, Deserialize)]
struct IdClaims {
    sub: String,
    #[serde(default)]
    nonce: Option<String>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

/// A finished sign-in: the tenant, and who (for the audit log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIn {
    pub tenant: String,
    pub subject: String,
    /// The console page the owner was on when they signed in.
    pub next: String,
}

/// The random values of one sign-in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Flow {
    state: String,
    nonce: String,
    verifier: String,
    expires: u64,
    /// Where to go once signed in: a path on this site.
    next: String,
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Oidc {
    pub fn new(config: OidcConfig) -> Result<Oidc, String> {
        let tls = if config.issuer.starts_with("https://") {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            let Some(path) = &config.ca_file else {
                return Err(
                    "console.oidc.ca_file is needed for an https issuer (this build has no system roots)"
                        .into(),
                );
            };
            let pem = std::fs::read(path)
                .map_err(|error| format!("console.oidc.ca_file {}: {error}", path.display()))?;
            for certificate in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                let certificate = certificate.map_err(|error| error.to_string())?;
                roots.add(certificate).map_err(|error| error.to_string())?;
            }
            let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(Arc::new(tls))
        } else {
            None
        };
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            format!("relay-oidc-flow:{}", config.client_secret.expose()).as_bytes(),
        );
        Ok(Oidc {
            cookie_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, digest.as_ref()),
            config,
            tls,
            cached: RwLock::default(),
            nonces: DashMap::new(),
        })
    }

    /// What the sign-in button says.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    async fn get_json(&self, url: &str) -> Result<Value, SignInFailure> {
        let (origin, path) =
            Origin::of(url).map_err(|error| failure("provider_unreachable", error.to_string()))?;
        let answer = origin
            .request(
                self.tls.as_ref(),
                "GET",
                &path,
                "Accept: application/json\r\n",
                "",
            )
            .await
            .map_err(|error| {
                failure(
                    "provider_unreachable",
                    format!("the sign-in service did not answer: {error}"),
                )
            })?;
        if answer.status != 200 {
            return Err(failure(
                "provider_error",
                format!("the sign-in service answered {}", answer.status),
            ));
        }
        serde_json::from_str(&answer.body)
            .map_err(|_| failure("provider_error", "the sign-in service sent no JSON"))
    }

    async fn discovery(&self) -> Result<Discovery, SignInFailure> {
        if let Ok(cached) = self.cached.read()
            && let Some((at, discovery)) = &cached.discovery
            && at.elapsed() < DISCOVERY_TTL
        {
            return Ok(discovery.clone());
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.config.issuer.trim_end_matches('/')
        );
        let document = self.get_json(&url).await?;
        let discovery: Discovery = serde_json::from_value(document)
            .map_err(|_| failure("provider_error", "the discovery document lacks endpoints"))?;
        // OpenID Connect Discovery 1.0 section 4.3: the issuer must be the
        // one asked for.
        if discovery.issuer.trim_end_matches('/') != self.config.issuer.trim_end_matches('/') {
            return Err(failure(
                "wrong_issuer",
                "the sign-in service names another issuer than configured",
            ));
        }
        if let Ok(mut cached) = self.cached.write() {
            cached.discovery = Some((Instant::now(), discovery.clone()));
        }
        Ok(discovery)
    }

    async fn keys(&self, discovery: &Discovery, refresh: bool) -> Result<JwkSet, SignInFailure> {
        if let Ok(cached) = self.cached.read()
            && let Some((at, keys)) = &cached.keys
            && (at.elapsed() < DISCOVERY_TTL && !refresh || at.elapsed() < Duration::from_secs(60))
        {
            return Ok(keys.clone());
        }
        let keys: JwkSet = serde_json::from_value(self.get_json(&discovery.jwks_uri).await?)
            .map_err(|_| {
                failure(
                    "provider_error",
                    "the sign-in service's keys are not a JWKS",
                )
            })?;
        if let Ok(mut cached) = self.cached.write() {
            cached.keys = Some((Instant::now(), keys.clone()));
        }
        Ok(keys)
    }

    fn sign_flow(&self, flow: &Flow) -> String {
        let payload = URL_SAFE_NO_PAD.encode(
            serde_json::json!({
                "state": flow.state,
                "nonce": flow.nonce,
                "verifier": flow.verifier,
                "expires": flow.expires,
                "next": flow.next,
            })
            .to_string(),
        );
        let tag = ring::hmac::sign(&self.cookie_key, payload.as_bytes());
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    fn read_flow(&self, cookie: &str) -> Option<Flow> {
        let (payload, tag) = cookie.split_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        ring::hmac::verify(&self.cookie_key, payload.as_bytes(), &tag).ok()?;
        let value: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        let flow = Flow {
            state: value["state"].as_str()?.to_owned(),
            nonce: value["nonce"].as_str()?.to_owned(),
            verifier: value["verifier"].as_str()?.to_owned(),
            expires: value["expires"].as_u64()?,
            next: local_path(value["next"].as_str().unwrap_or("/")),
        };
        (flow.expires > unix_now()).then_some(flow)
    }

    /// `GET /login/oidc`: to the provider, with a new flow's cookie.
    pub async fn start(
        &self,
        host: &str,
        next: &str,
    ) -> Result<Response<Full<Bytes>>, SignInFailure> {
        let discovery = self.discovery().await?;
        let flow = Flow {
            next: local_path(next),
            state: random_token(),
            nonce: random_token(),
            verifier: random_token(),
            expires: unix_now() + FLOW_SECONDS,
        };
        let challenge = URL_SAFE_NO_PAD
            .encode(ring::digest::digest(&ring::digest::SHA256, flow.verifier.as_bytes()).as_ref());
        let separator = if discovery.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        let location = format!(
            "{}{separator}response_type=code&client_id={}&redirect_uri={}&scope=openid&state={}&nonce={}&code_challenge={challenge}&code_challenge_method=S256",
            discovery.authorization_endpoint,
            encode(&self.config.client_id),
            encode(&callback_url(host)),
            flow.state,
            flow.nonce,
        );
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::SEE_OTHER;
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&location) {
            headers.insert(header::LOCATION, value);
        }
        // Lax: the provider's redirect back is a cross-site navigation.
        let cookie = format!(
            "{FLOW_COOKIE}={}; Path=/login/oidc; HttpOnly; Secure; SameSite=Lax; Max-Age={FLOW_SECONDS}",
            self.sign_flow(&flow)
        );
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            headers.insert(header::SET_COOKIE, value);
        }
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(response)
    }

    /// `GET /login/oidc/callback`: the flow checked, the code exchanged,
    /// the ID token checked; who signed in, for which tenant (a claim
    /// value: the caller looks the tenant up).
    pub async fn finish(
        &self,
        host: &str,
        query: &Form,
        flow_cookie: Option<&str>,
    ) -> Result<SignedIn, SignInFailure> {
        let field = |name: &str| query.get(name).map(String::as_str).unwrap_or_default();
        if !field("error").is_empty() {
            return Err(failure(
                "provider_refused",
                format!("the sign-in service said: {}", field("error")),
            ));
        }
        let flow = flow_cookie
            .and_then(|cookie| self.read_flow(cookie))
            .ok_or_else(|| {
                failure(
                    "no_flow",
                    "this sign-in expired or was not started here: start again",
                )
            })?;
        if !crate::form::constant_time_eq(field("state").as_bytes(), flow.state.as_bytes()) {
            return Err(failure(
                "wrong_state",
                "this answer is not for this sign-in: start again",
            ));
        }
        let discovery = self.discovery().await?;
        let (origin, path) = Origin::of(&discovery.token_endpoint)
            .map_err(|error| failure("provider_error", error.to_string()))?;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            encode(&self.config.client_id),
            encode(self.config.client_secret.expose())
        ));
        let form = format!(
            "grant_type=authorization_code&code={}&redirect_uri={}&code_verifier={}",
            encode(field("code")),
            encode(&callback_url(host)),
            flow.verifier
        );
        let answer = origin
            .request(
                self.tls.as_ref(),
                "POST",
                &path,
                &format!(
                    "Authorization: Basic {basic}\r\nContent-Type: application/x-www-form-urlencoded\r\nAccept: application/json\r\n"
                ),
                &form,
            )
            .await
            .map_err(|error| failure("provider_unreachable", error.to_string()))?;
        let tokens: Value = serde_json::from_str(&answer.body).unwrap_or(Value::Null);
        if answer.status != 200 {
            return Err(failure(
                "code_refused",
                format!(
                    "the sign-in service refused the code: {}",
                    tokens["error"].as_str().unwrap_or("no reason")
                ),
            ));
        }
        let id_token = tokens["id_token"]
            .as_str()
            .ok_or_else(|| failure("no_id_token", "the sign-in service sent no ID token"))?;
        let claims = self.check_id_token(&discovery, id_token).await?;
        if claims.nonce.as_deref() != Some(flow.nonce.as_str()) {
            return Err(failure(
                "wrong_nonce",
                "the ID token is not for this sign-in",
            ));
        }
        self.remember_nonce(&flow.nonce)?;
        let value = claims
            .other
            .get(&self.config.tenant_claim)
            .and_then(Value::as_str)
            .filter(|value| !value.is_empty())
            .ok_or_else(|| {
                failure(
                    "no_tenant_claim",
                    "your account does not say which tenant it belongs to: ask your operator",
                )
            })?;
        let tenant = self
            .config
            .tenants
            .get(value)
            .cloned()
            .unwrap_or_else(|| value.to_owned());
        Ok(SignedIn {
            tenant,
            subject: claims.sub,
            next: flow.next,
        })
    }

    /// A nonce is good once.
    fn remember_nonce(&self, nonce: &str) -> Result<(), SignInFailure> {
        if self.nonces.len() >= MAX_NONCES {
            self.nonces.retain(|_, at| at.elapsed() < NONCE_MEMORY);
        }
        if self
            .nonces
            .insert(nonce.to_owned(), Instant::now())
            .is_some()
        {
            return Err(failure(
                "replayed_nonce",
                "this sign-in was used already: start again",
            ));
        }
        Ok(())
    }

    async fn check_id_token(
        &self,
        discovery: &Discovery,
        token: &str,
    ) -> Result<IdClaims, SignInFailure> {
        let bad = |label: &'static str, message: &str| failure(label, message.to_owned());
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| bad("bad_id_token", "the ID token is malformed"))?;
        // Asymmetric only: the secret is shared with nobody but the
        // provider, and never a verification key here.
        if !matches!(
            header.alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
                | Algorithm::ES256
                | Algorithm::ES384
                | Algorithm::EdDSA
        ) {
            return Err(bad(
                "bad_id_token",
                "the ID token's algorithm is not accepted",
            ));
        }
        let mut keys = self.keys(discovery, false).await?;
        let find = |keys: &JwkSet| {
            keys.keys
                .iter()
                .find(|jwk| header.kid.is_some() && jwk.common.key_id == header.kid)
                .or_else(|| (keys.keys.len() == 1 && header.kid.is_none()).then(|| &keys.keys[0]))
                .cloned()
        };
        let jwk = match find(&keys) {
            Some(jwk) => jwk,
            None => {
                keys = self.keys(discovery, true).await?;
                find(&keys).ok_or_else(|| bad("bad_id_token", "the ID token's key is unknown"))?
            }
        };
        let fits = matches!(
            (&jwk.algorithm, header.alg),
            (
                AlgorithmParameters::RSA(_),
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (
                AlgorithmParameters::EllipticCurve(_),
                Algorithm::ES256 | Algorithm::ES384
            ) | (AlgorithmParameters::OctetKeyPair(_), Algorithm::EdDSA)
        );
        if !fits {
            return Err(bad(
                "bad_id_token",
                "the ID token's key does not fit its algorithm",
            ));
        }
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|_| bad("bad_id_token", "the ID token's key is unusable"))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = 30;
        validation.set_issuer(&[&self.config.issuer, &discovery.issuer]);
        validation.set_audience(&[&self.config.client_id]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<IdClaims>(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(|error| {
                use jsonwebtoken::errors::ErrorKind;
                match error.kind() {
                    ErrorKind::ExpiredSignature => bad(
                        "expired_id_token",
                        "the ID token has expired: sign in again",
                    ),
                    ErrorKind::InvalidIssuer => {
                        bad("wrong_issuer", "the ID token is from another issuer")
                    }
                    ErrorKind::InvalidAudience => {
                        bad("wrong_audience", "the ID token is for another client")
                    }
                    ErrorKind::InvalidSignature => {
                        bad("bad_signature", "the ID token's signature does not hold")
                    }
                    _ => bad("bad_id_token", "the ID token is not acceptable"),
                }
            })
    }
}

/// `next` when it is a path on this site (`/…`, not `//host`), else `/`:
/// no open redirect.
pub fn local_path(next: &str) -> String {
    let local = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && next.len() <= 2048
        && next.bytes().all(|b| b.is_ascii_graphic());
    if local {
        next.to_owned()
    } else {
        "/".to_owned()
    }
}

/// Where the provider sends the browser back.
pub fn callback_url(host: &str) -> String {
    format!("https://{host}/login/oidc/callback")
}

/// The flow cookie's value in a request's `Cookie` header.
pub fn flow_cookie(headers: &hyper::HeaderMap) -> Option<&str> {
    crate::form::cookie(headers, FLOW_COOKIE)
}

/// The flow cookie, cleared.
pub const CLEAR_FLOW_COOKIE: &str =
    "relay_oidc=; Path=/login/oidc; HttpOnly; Secure; SameSite=Lax; Max-Age=0";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn oidc() -> Oidc {
        Oidc::new(OidcConfig {
            issuer: "http://127.0.0.1:1".into(),
            client_id: "relay".into(),
            client_secret: relay_proto::Secret::new("a secret".into()),
            tenant_claim: "relay_tenant".into(),
            tenants: Default::default(),
            ca_file: None,
            name: "Test".into(),
        })
        .unwrap()
    }

    #[test]
    fn a_flow_cookie_is_read_back_only_as_signed_and_unexpired() {
        let oidc = oidc();
        let flow = Flow {
            state: "s".into(),
            nonce: "n".into(),
            verifier: "v".into(),
            expires: unix_now() + 60,
            next: "/pair?code=BCDF-GHJK".into(),
        };
        let cookie = oidc.sign_flow(&flow);
        assert_eq!(oidc.read_flow(&cookie), Some(flow.clone()));
        let (payload, tag) = cookie.split_once('.').unwrap();
        let forged = format!("{}A.{tag}", payload);
        assert_eq!(oidc.read_flow(&forged), None);
        let old = Flow {
            expires: unix_now() - 1,
            ..flow
        };
        assert_eq!(oidc.read_flow(&oidc.sign_flow(&old)), None);
    }

    /// An ID token signed by a P-256 key of the test's, with `claims`.
    fn signed(key: &rcgen::KeyPair, claims: &Value) -> String {
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        let encoding = jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der());
        jsonwebtoken::encode(&header, claims, &encoding).unwrap()
    }

    fn provider_with_key(key: &rcgen::KeyPair) -> (Oidc, Discovery) {
        let oidc = oidc();
        let raw = key.public_key_raw();
        let jwks: JwkSet = serde_json::from_value(serde_json::json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        }]}))
        .unwrap();
        let discovery = Discovery {
            issuer: "http://127.0.0.1:1".into(),
            authorization_endpoint: "http://127.0.0.1:1/auth".into(),
            token_endpoint: "http://127.0.0.1:1/token".into(),
            jwks_uri: "http://127.0.0.1:1/jwks".into(),
        };
        oidc.cached.write().unwrap().keys = Some((Instant::now(), jwks));
        (oidc, discovery)
    }

    #[tokio::test]
    async fn an_id_token_is_checked_for_signature_issuer_audience_and_expiry() {
        let key = rcgen::KeyPair::generate().unwrap();
        let (oidc, discovery) = provider_with_key(&key);
        let now = unix_now();
        let claims = |iss: &str, aud: &str, exp: u64| {
            serde_json::json!({
                "iss": iss, "aud": aud, "exp": exp, "iat": now, "sub": "owner",
                "nonce": "n", "relay_tenant": "acme",
            })
        };
        let check = async |token: String| oidc.check_id_token(&discovery, &token).await;
        let good = check(signed(
            &key,
            &claims("http://127.0.0.1:1", "relay", now + 300),
        ))
        .await
        .unwrap();
        assert_eq!(
            (good.sub.as_str(), good.nonce.as_deref()),
            ("owner", Some("n"))
        );
        let label = |result: Result<IdClaims, SignInFailure>| result.unwrap_err().label;
        assert_eq!(
            label(
                check(signed(
                    &key,
                    &claims("http://127.0.0.1:1", "relay", now - 120)
                ))
                .await
            ),
            "expired_id_token"
        );
        assert_eq!(
            label(
                check(signed(
                    &key,
                    &claims("http://127.0.0.1:1", "someone-else", now + 300)
                ))
                .await
            ),
            "wrong_audience"
        );
        assert_eq!(
            label(
                check(signed(
                    &key,
                    &claims("https://evil.example", "relay", now + 300)
                ))
                .await
            ),
            "wrong_issuer"
        );
        // Signed by another key under the same kid.
        let other = rcgen::KeyPair::generate().unwrap();
        assert_eq!(
            label(
                check(signed(
                    &other,
                    &claims("http://127.0.0.1:1", "relay", now + 300)
                ))
                .await
            ),
            "bad_signature"
        );
        // HMAC with the client secret is never accepted.
        let hs = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims("http://127.0.0.1:1", "relay", now + 300),
            &jsonwebtoken::EncodingKey::from_secret(b"a secret"),
        )
        .unwrap();
        assert_eq!(label(check(hs).await), "bad_id_token");
    }

    #[test]
    fn only_local_paths_are_where_a_sign_in_leads() {
        assert_eq!(local_path("/pair?code=BCDF-GHJK"), "/pair?code=BCDF-GHJK");
        assert_eq!(local_path("//evil.example/"), "/");
        assert_eq!(local_path("https://evil.example/"), "/");
        assert_eq!(local_path("/\\evil.example"), "/");
        assert_eq!(local_path("/a b"), "/");
    }

    #[test]
    fn a_nonce_is_good_once() {
        let oidc = oidc();
        assert!(oidc.remember_nonce("n1").is_ok());
        assert_eq!(
            oidc.remember_nonce("n1").unwrap_err().label,
            "replayed_nonce"
        );
    }
}
