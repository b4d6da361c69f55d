//! From the raw credentials of an HTTP request to a verified principal.
//!
//! [`Authenticator::authenticate`] takes the `Authorization` header or the
//! query-parameter token, and the device being asked for, and returns a
//! [`Principal`] or the specific [`AuthFailure`]. Results are cached (success
//! for a minute, failure for a few seconds by default) so that a reconnect
//! storm of the same keys costs the database almost nothing; revocations
//! evict entries at once ([`Authenticator::forget`]).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use dashmap::DashMap;
use relay_proto::Secret;
use serde::Serialize;

use crate::StoreError;
use crate::clock::Millis;
use crate::credential::{CredentialKind, FormatError, PresentedCredential};
use crate::jwt::{JwtFailure, JwtVerifier};
use crate::store::{Scope, Store};

/// The raw inputs of a request that may carry credentials. Both are secret:
/// never log them.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestCredentials<'a> {
    /// The `Authorization` header's value: `Basic …` or `Bearer …`.
    pub authorization: Option<Secret<&'a str>>,
    /// The `access_token` (or `api_key`) query parameter, for clients that
    /// cannot send headers: base64 of `user:pass`, or a bearer token.
    pub query_token: Option<Secret<&'a str>>,
}

/// What [`Authenticator::precheck`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precheck {
    /// Decided without the store: by the credential's shape, or by a fresh
    /// cache entry.
    Decided(Result<Principal, AuthFailure>),
    /// Only the store can tell; `key_id` is the API key id presented (none
    /// for a JWT).
    Lookup { key_id: Option<String> },
}

/// Who a request acts for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Principal {
    pub tenant_id: String,
    /// The one device the credential is limited to, if any.
    pub device_id: Option<String>,
    pub scope: Scope,
    /// The API key id, or `jwt:<kid>:<subject>` for a JWT.
    pub key_id: String,
    pub expires_at: Option<Millis>,
    pub source: PrincipalSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalSource {
    ApiKey,
    Jwt,
}

/// Why a request was not authenticated. Specific for logs and metrics; what
/// a client is told is coarser (see [`AuthFailure::is_credential_problem`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("no credentials")]
    Missing,
    #[error("malformed credentials: {0}")]
    Malformed(&'static str),
    #[error("unknown key")]
    UnknownKey,
    #[error("wrong secret")]
    WrongSecret,
    #[error("credential expired")]
    Expired,
    #[error("key revoked")]
    Revoked,
    #[error("credential is for another device or tenant")]
    WrongDevice,
    #[error("no such device")]
    UnknownDevice,
    #[error("JWT refused: {0}")]
    Jwt(JwtFailure),
    #[error("JWTs are not enabled")]
    JwtNotEnabled,
    #[error("store unavailable")]
    Unavailable,
}

impl AuthFailure {
    /// Failures that mean "these credentials are no good here". All of them
    /// are reported to a client the same way, so that a key scoped to another
    /// device or tenant, an unknown device and a wrong key are
    /// indistinguishable from outside. Only [`AuthFailure::Unavailable`] is
    /// not: the client should retry later.
    pub fn is_credential_problem(&self) -> bool {
        !matches!(self, AuthFailure::Unavailable)
    }

    /// A short stable name for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed(_) => "malformed",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::WrongSecret => "wrong_secret",
            AuthFailure::Expired => "expired",
            AuthFailure::Revoked => "revoked",
            AuthFailure::WrongDevice => "wrong_device",
            AuthFailure::UnknownDevice => "unknown_device",
            AuthFailure::Jwt(_) => "jwt",
            AuthFailure::JwtNotEnabled => "jwt_not_enabled",
            AuthFailure::Unavailable => "unavailable",
        }
    }
}

/// Cache settings.
#[derive(Debug, Clone, Copy)]
pub struct AuthConfig {
    pub success_ttl: Duration,
    pub failure_ttl: Duration,
    /// Entries at most; past that, expired entries are swept and new results
    /// are not cached until there is room.
    pub max_cached: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            success_ttl: Duration::from_secs(60),
            failure_ttl: Duration::from_secs(5),
            max_cached: 100_000,
        }
    }
}

/// The credential found in a request, before any check against the store.
/// Its shape (and an API key's checksum) is already checked.
enum Credential<'a> {
    ApiKey { id: String, secret: String },
    Jwt(&'a str),
}

struct CacheEntry {
    outcome: Result<Principal, AuthFailure>,
    /// The key id this entry depends on, for eviction on revocation.
    key_id: Option<String>,
    valid_until: Millis,
}

/// Authenticates requests against the store (and JWTs against a JWKS).
pub struct Authenticator {
    store: Store,
    jwt: Option<Arc<JwtVerifier>>,
    config: AuthConfig,
    /// Keyed by a SHA-256 of the credential and the device: the cache holds
    /// no secret.
    cache: DashMap<[u8; 32], CacheEntry>,
    /// Keys used since the last flush, with when.
    last_used: DashMap<String, Millis>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("config", &self.config)
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(store: Store, jwt: Option<Arc<JwtVerifier>>, config: AuthConfig) -> Authenticator {
        Authenticator {
            store,
            jwt,
            config,
            cache: DashMap::new(),
            last_used: DashMap::new(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What can be told about a request without the store: its shape
    /// (and an API key's checksum), and the cache. A rate limiter asks this
    /// first, so that a valid cached key is never limited and only store
    /// lookups are.
    pub fn precheck(&self, device_id: &str, request: RequestCredentials<'_>) -> Precheck {
        let (raw, credential) = match parse_request(request) {
            Ok(parsed) => parsed,
            Err(failure) => return Precheck::Decided(Err(failure)),
        };
        let now = self.store.now();
        if let Some(outcome) = self.cached(&cache_key(raw, device_id), now) {
            return Precheck::Decided(outcome);
        }
        Precheck::Lookup {
            key_id: match credential {
                Credential::ApiKey { id, .. } => Some(id),
                Credential::Jwt(_) => None,
            },
        }
    }

    /// The cached outcome for `cache_key`, if it is fresh.
    fn cached(&self, cache_key: &[u8; 32], now: Millis) -> Option<Result<Principal, AuthFailure>> {
        let entry = self.cache.get(cache_key)?;
        if entry.valid_until <= now {
            return None;
        }
        let outcome = entry.outcome.clone();
        drop(entry);
        Some(match outcome {
            Ok(principal) if principal.expires_at.is_some_and(|at| at <= now) => {
                Err(AuthFailure::Expired)
            }
            Ok(principal) => {
                self.note_use(&principal, now);
                Ok(principal)
            }
            Err(failure) => Err(failure),
        })
    }

    /// The one device the presented API key is bound to, for a client that
    /// named no device (an MQTT-over-TLS client that sent no SNI). `None`:
    /// a tenant-wide key, a JWT, or a key that does not check out (its
    /// secret, revocation and expiry are checked again by
    /// [`Self::authenticate`] with the device found).
    pub async fn bound_device(
        &self,
        request: RequestCredentials<'_>,
    ) -> Result<Option<String>, AuthFailure> {
        let (_, credential) = parse_request(request)?;
        let Credential::ApiKey { id, secret } = credential else {
            return Ok(None);
        };
        let presented = PresentedCredential {
            id: &id,
            secret: Secret::new(&secret),
        };
        let Some(check) = self.store.key_check(&id, "").await.map_err(unavailable)? else {
            return Err(AuthFailure::UnknownKey);
        };
        if !presented.matches_digest(&check.secret_digest) {
            return Err(AuthFailure::WrongSecret);
        }
        Ok(check.device_id)
    }

    /// Authenticates a request for `device_id`.
    pub async fn authenticate(
        &self,
        device_id: &str,
        request: RequestCredentials<'_>,
    ) -> Result<Principal, AuthFailure> {
        let (raw, credential) = parse_request(request)?;
        let now = self.store.now();
        let cache_key = cache_key(raw, device_id);
        if let Some(outcome) = self.cached(&cache_key, now) {
            return outcome;
        }
        let (outcome, key_id) = match credential {
            Credential::ApiKey { id, secret } => {
                let presented = PresentedCredential {
                    id: &id,
                    secret: Secret::new(&secret),
                };
                let outcome = self.check_api_key(&presented, device_id, now).await;
                (outcome, Some(id))
            }
            Credential::Jwt(token) => (self.check_jwt(token, device_id).await, None),
        };
        if let Ok(principal) = &outcome {
            self.note_use(principal, now);
        }
        let ttl = match &outcome {
            Ok(_) => Some(self.config.success_ttl),
            Err(AuthFailure::Unavailable) => None,
            Err(_) => Some(self.config.failure_ttl),
        };
        if let Some(ttl) = ttl {
            self.remember(
                cache_key,
                CacheEntry {
                    outcome: outcome.clone(),
                    key_id,
                    valid_until: now.saturating_add(ttl.as_millis() as Millis),
                },
                now,
            );
        }
        outcome
    }

    async fn check_api_key(
        &self,
        presented: &PresentedCredential<'_>,
        device_id: &str,
        now: Millis,
    ) -> Result<Principal, AuthFailure> {
        let check = self
            .store
            .key_check(presented.id, device_id)
            .await
            .map_err(unavailable)?
            .ok_or(AuthFailure::UnknownKey)?;
        // The secret first: without it, nothing else about the key or the
        // device is revealed.
        if !presented.matches_digest(&check.secret_digest) {
            return Err(AuthFailure::WrongSecret);
        }
        if check.revoked_at.is_some() {
            return Err(AuthFailure::Revoked);
        }
        if check.expires_at.is_some_and(|at| at <= now) {
            return Err(AuthFailure::Expired);
        }
        let Some(device_tenant) = check.target_device_tenant else {
            return Err(AuthFailure::UnknownDevice);
        };
        if device_tenant != check.tenant_id
            || check
                .device_id
                .as_deref()
                .is_some_and(|only| only != device_id)
        {
            return Err(AuthFailure::WrongDevice);
        }
        Ok(Principal {
            tenant_id: check.tenant_id,
            device_id: check.device_id,
            scope: check.scope,
            key_id: presented.id.to_owned(),
            expires_at: check.expires_at,
            source: PrincipalSource::ApiKey,
        })
    }

    async fn check_jwt(&self, token: &str, device_id: &str) -> Result<Principal, AuthFailure> {
        let verifier = self.jwt.as_ref().ok_or(AuthFailure::JwtNotEnabled)?;
        let verified = verifier.verify(token).map_err(AuthFailure::Jwt)?;
        if verified
            .device_id
            .as_deref()
            .is_some_and(|only| only != device_id)
        {
            return Err(AuthFailure::WrongDevice);
        }
        let device_tenant = self
            .store
            .live_device_tenant(device_id)
            .await
            .map_err(unavailable)?
            .ok_or(AuthFailure::UnknownDevice)?;
        if device_tenant != verified.tenant_id {
            return Err(AuthFailure::WrongDevice);
        }
        Ok(Principal {
            key_id: format!(
                "jwt:{}:{}",
                verified.kid,
                verified.subject.as_deref().unwrap_or("-")
            ),
            tenant_id: verified.tenant_id,
            device_id: verified.device_id,
            scope: verified.scope,
            expires_at: Some(verified.expires_at),
            source: PrincipalSource::Jwt,
        })
    }

    fn remember(&self, key: [u8; 32], entry: CacheEntry, now: Millis) {
        if self.cache.len() >= self.config.max_cached {
            self.cache.retain(|_, entry| entry.valid_until > now);
            if self.cache.len() >= self.config.max_cached {
                return;
            }
        }
        self.cache.insert(key, entry);
    }

    fn note_use(&self, principal: &Principal, now: Millis) {
        if principal.source == PrincipalSource::ApiKey
            && (self.last_used.len() < self.config.max_cached
                || self.last_used.contains_key(&principal.key_id))
        {
            self.last_used.insert(principal.key_id.clone(), now);
        }
    }

    /// Drops every cached result that depends on `key_id` (after a
    /// revocation), or everything when `key_id` is `None` (after a device
    /// was deleted, or when revocations may have been missed).
    pub fn forget(&self, key_id: Option<&str>) {
        match key_id {
            Some(key_id) => self
                .cache
                .retain(|_, entry| entry.key_id.as_deref() != Some(key_id)),
            None => self.cache.clear(),
        }
    }

    /// Writes the "last used" times gathered since the last call. Run it
    /// periodically; it costs one UPDATE per key used.
    pub async fn flush_last_used(&self) -> Result<usize, StoreError> {
        let uses: Vec<(String, Millis)> = self
            .last_used
            .iter()
            .map(|entry| (entry.key().clone(), *entry.value()))
            .collect();
        for (key_id, at) in &uses {
            self.last_used.remove_if(key_id, |_, seen| seen == at);
        }
        self.store.record_last_used(&uses).await?;
        Ok(uses.len())
    }

    /// Cached results right now (for metrics and tests).
    pub fn cached_results(&self) -> usize {
        self.cache.len()
    }
}

fn unavailable(error: StoreError) -> AuthFailure {
    tracing::warn!(%error, "credential check could not reach the store");
    AuthFailure::Unavailable
}

fn cache_key(raw: &str, device_id: &str) -> [u8; 32] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(raw.as_bytes());
    context.update(&[0]);
    context.update(device_id.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(context.finish().as_ref());
    key
}

fn format_failure(error: FormatError) -> AuthFailure {
    match error {
        FormatError::BadChecksum => AuthFailure::Malformed("checksum does not match"),
        FormatError::WrongPrefix(_) | FormatError::WrongShape => {
            AuthFailure::Malformed("not a relay key")
        }
    }
}

/// `Basic <base64 user:pass>` or `Bearer <token>`; the scheme is
/// case-insensitive.
/// The raw credential of a request (header first) and what it is.
fn parse_request(request: RequestCredentials<'_>) -> Result<(&str, Credential<'_>), AuthFailure> {
    match (
        request.authorization.map(Secret::into_exposed),
        request.query_token.map(Secret::into_exposed),
    ) {
        (Some(header), _) => Ok((header, parse_authorization(header)?)),
        (None, Some(token)) => Ok((token, parse_query_token(token)?)),
        (None, None) => Err(AuthFailure::Missing),
    }
}

fn parse_authorization(header: &str) -> Result<Credential<'_>, AuthFailure> {
    let (scheme, value) = header
        .trim()
        .split_once(' ')
        .ok_or(AuthFailure::Malformed("no scheme in Authorization"))?;
    let value = value.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        parse_bearer(value)
    } else if scheme.eq_ignore_ascii_case("basic") {
        parse_basic(value)
    } else {
        Err(AuthFailure::Malformed("unsupported Authorization scheme"))
    }
}

/// The query parameter holds a bearer token (an API key or a JWT) or the
/// base64 of `user:pass`.
fn parse_query_token(token: &str) -> Result<Credential<'_>, AuthFailure> {
    let token = token.trim();
    if token.starts_with(CredentialKind::ApiKey.prefix()) || JwtVerifier::looks_like_jwt(token) {
        parse_bearer(token)
    } else {
        parse_basic(token)
    }
}

fn parse_bearer(token: &str) -> Result<Credential<'_>, AuthFailure> {
    if JwtVerifier::looks_like_jwt(token) {
        return Ok(Credential::Jwt(token));
    }
    let presented =
        PresentedCredential::parse(CredentialKind::ApiKey, token).map_err(format_failure)?;
    Ok(Credential::ApiKey {
        id: presented.id.to_owned(),
        secret: (*presented.secret.expose()).to_owned(),
    })
}

/// base64 of `key id:secret`.
fn parse_basic(encoded: &str) -> Result<Credential<'static>, AuthFailure> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| AuthFailure::Malformed("basic credentials are not base64"))?;
    let decoded = String::from_utf8(decoded)
        .map_err(|_| AuthFailure::Malformed("basic credentials are not UTF-8"))?;
    let (id, secret) = decoded
        .split_once(':')
        .ok_or(AuthFailure::Malformed("basic credentials have no ':'"))?;
    let presented = PresentedCredential::from_parts(id, secret).map_err(format_failure)?;
    Ok(Credential::ApiKey {
        id: presented.id.to_owned(),
        secret: (*presented.secret.expose()).to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::IssuedCredential;

    fn issued() -> IssuedCredential {
        IssuedCredential::generate(CredentialKind::ApiKey).unwrap()
    }

    fn basic(user: &str, pass: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    }

    #[test]
    fn every_request_form_yields_the_same_key() {
        let key = issued();
        let token = key.reveal();
        let headers = [
            format!("Bearer {token}"),
            format!("bearer  {token} "),
            format!("Basic {}", basic(&key.id, key.secret())),
            format!("BASIC {}", basic(&key.id, key.secret())),
        ];
        let query_tokens = [token.clone(), basic(&key.id, key.secret())];
        let forms = headers
            .iter()
            .map(|header| parse_authorization(header))
            .chain(query_tokens.iter().map(|token| parse_query_token(token)));
        for form in forms {
            match form {
                Ok(Credential::ApiKey { id, secret }) => {
                    assert_eq!(id, key.id);
                    assert_eq!(secret, key.secret());
                }
                Ok(Credential::Jwt(_)) => panic!("read as a JWT"),
                Err(failure) => panic!("refused: {failure}"),
            }
        }
    }

    #[test]
    fn jwts_are_recognised_by_shape() {
        assert!(matches!(
            parse_authorization("Bearer aaa.bbb.ccc"),
            Ok(Credential::Jwt("aaa.bbb.ccc"))
        ));
        assert!(matches!(
            parse_query_token("aaa.bbb.ccc"),
            Ok(Credential::Jwt("aaa.bbb.ccc"))
        ));
    }

    #[test]
    fn malformed_inputs_are_told_apart() {
        let failure = |result: Result<Credential<'_>, AuthFailure>| result.err().map(|f| f.label());
        assert_eq!(
            failure(parse_authorization("Digest abc")),
            Some("malformed")
        );
        assert_eq!(failure(parse_authorization("Bearer")), Some("malformed"));
        assert_eq!(failure(parse_authorization("Basic !!!")), Some("malformed"));
        assert_eq!(
            failure(parse_authorization(&format!(
                "Basic {}",
                basic("short", "x")
            ))),
            Some("malformed")
        );
        assert_eq!(
            failure(parse_query_token("rly_nonsense")),
            Some("malformed")
        );
        let token = issued().reveal();
        let mut tampered = token.clone();
        tampered.replace_range(20..21, if &token[20..21] == "a" { "b" } else { "a" });
        assert_eq!(
            parse_query_token(&tampered).err(),
            Some(AuthFailure::Malformed("checksum does not match"))
        );
    }

    #[test]
    fn debug_hides_request_credentials() {
        let request = RequestCredentials {
            authorization: Some(Secret::new("Bearer rly_secretsecret")),
            query_token: Some(Secret::new("c2VjcmV0")),
        };
        let printed = format!("{request:?}");
        assert!(!printed.contains("secret") || printed.contains("redacted"));
        assert!(!printed.contains("rly_"));
        assert!(!printed.contains("c2VjcmV0"));
    }
}
