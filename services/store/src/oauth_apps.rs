//! Apps that ask a printer's owner for access, as OctoEverywhere's App
//! Connections do: OAuth 2.0's authorization code grant with PKCE (RFC
//! 6749, RFC 7636), public clients only.
//!
//! An operator registers an app: its name, its redirect URIs (matched
//! exactly), and the scopes it may ask for. An owner's consent gives the
//! app a one-use code (`rlc_…`, 2 minutes); the app exchanges it, with its
//! PKCE verifier, for relay keys: one per printer the owner picked, bound
//! to it, with the scope asked for, labelled with the app's name, and
//! recorded as the app's ([`Store::app_grants`]). Revoking such a key ends
//! the app's sessions as any revocation does. A code presented twice is
//! refused, and the keys it gave are revoked (RFC 6749 section 4.1.2).

use sqlx::Row;

use crate::clock::Millis;
use crate::credential::{CredentialKind, IssuedCredential, PresentedCredential, random_base32};
use crate::{NewApiKey, Scope, Store, StoreError};

/// How long an authorization code lives.
pub const CODE_MILLIS: Millis = 2 * 60 * 1000;

/// A registered app.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OAuthApp {
    /// Its `client_id`.
    pub id: String,
    pub name: String,
    pub redirect_uris: Vec<String>,
    /// The scopes it may ask for.
    pub scopes: Vec<Scope>,
    pub created_at: Millis,
}

impl OAuthApp {
    /// Whether `uri` is one of its redirect URIs: exactly, except that on
    /// the loopback (`http://127.0.0.1`, `http://[::1]`) any port will do,
    /// as a native app listens on whatever port it gets (RFC 8252 section
    /// 7.3).
    pub fn redirects_to(&self, uri: &str) -> bool {
        self.redirect_uris.iter().any(|known| {
            known == uri
                || loopback_without_port(known)
                    .is_some_and(|known| Some(known) == loopback_without_port(uri))
        })
    }

    pub fn may_ask(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// A loopback IP literal redirect URI without its port:
/// `http://127.0.0.1:8765/cb` is `http://127.0.0.1/cb`.
fn loopback_without_port(uri: &str) -> Option<String> {
    for host in ["http://127.0.0.1", "http://[::1]"] {
        let Some(rest) = uri.strip_prefix(host) else {
            continue;
        };
        let path = match rest.strip_prefix(':') {
            Some(port_and_path) => {
                let at = port_and_path.find('/').unwrap_or(port_and_path.len());
                let (port, path) = port_and_path.split_at(at);
                if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                path
            }
            None if rest.is_empty() || rest.starts_with('/') => rest,
            None => return None,
        };
        return Some(format!("{host}{path}"));
    }
    None
}

/// Why a redirect URI cannot be registered.
fn check_redirect_uri(uri: &str) -> Result<(), String> {
    let loopback = ["http://127.0.0.1", "http://[::1]", "http://localhost"]
        .iter()
        .any(|prefix| {
            uri.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/']))
        });
    if !(uri.starts_with("https://") || loopback) {
        return Err(format!(
            "{uri}: a redirect URI is https://, or http:// on this machine's loopback (RFC 8252)"
        ));
    }
    if uri.contains('#') || uri.chars().any(char::is_whitespace) || uri.len() > 2048 {
        return Err(format!("{uri}: no fragment, no spaces, at most 2048 bytes"));
    }
    Ok(())
}

/// What the owner granted, for the code.
#[derive(Debug, Clone)]
pub struct Consent<'a> {
    pub app: &'a OAuthApp,
    pub tenant_id: &'a str,
    pub device_ids: &'a [String],
    pub scope: Scope,
    pub redirect_uri: &'a str,
    /// RFC 7636's S256 `code_challenge`.
    pub code_challenge: &'a str,
}

/// The code exchange's inputs, from the app.
#[derive(Debug, Clone, Copy)]
pub struct Exchange<'a> {
    pub code: &'a str,
    pub client_id: &'a str,
    pub redirect_uri: &'a str,
    pub code_verifier: &'a str,
}

/// Why a code exchange is refused (all RFC 6749's `invalid_grant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodeRefusal {
    #[error("not a code this relay gave")]
    Unknown,
    #[error("the code was used already; the keys it gave are revoked")]
    Used,
    #[error("the code expired")]
    Expired,
    #[error("the code was given to another app")]
    OtherClient,
    #[error("redirect_uri is not the one the code was asked with")]
    OtherRedirect,
    #[error("code_verifier does not match the code_challenge")]
    Verifier,
}

/// The keys an exchanged code gave, one per printer.
#[derive(Debug)]
pub struct Granted {
    pub scope: Scope,
    pub keys: Vec<(String, IssuedCredential)>,
}

/// RFC 7636's S256: `BASE64URL(SHA256(verifier))`, unpadded.
pub fn s256_challenge(verifier: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    base64url(digest.as_ref())
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, byte)| n | u32::from(*byte) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Whether `verifier` has RFC 7636's shape: 43 to 128 unreserved
/// characters.
pub fn valid_verifier(verifier: &str) -> bool {
    (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

fn row_app(row: &sqlx::any::AnyRow) -> Result<OAuthApp, StoreError> {
    let uris: String = row.try_get("redirect_uris")?;
    let scopes: String = row.try_get("scopes")?;
    Ok(OAuthApp {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        redirect_uris: uris.lines().map(str::to_owned).collect(),
        scopes: scopes.split(' ').filter_map(Scope::parse).collect(),
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    /// Registers an app (the operator's `relayctl app register`).
    pub async fn register_app(
        &self,
        name: &str,
        redirect_uris: &[String],
        scopes: &[Scope],
    ) -> Result<OAuthApp, StoreError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 128 {
            return Err(StoreError::InvalidInput(
                "an app's name is 1 to 128 bytes".into(),
            ));
        }
        if redirect_uris.is_empty() || scopes.is_empty() {
            return Err(StoreError::InvalidInput(
                "an app needs a redirect URI and a scope".into(),
            ));
        }
        for uri in redirect_uris {
            check_redirect_uri(uri).map_err(StoreError::InvalidInput)?;
        }
        let mut scope_names: Vec<&str> = scopes.iter().map(|scope| scope.as_str()).collect();
        scope_names.sort_unstable();
        scope_names.dedup();
        let app = OAuthApp {
            id: format!("app_{}", random_base32(16)?),
            name: name.to_owned(),
            redirect_uris: redirect_uris.to_vec(),
            scopes: scope_names.iter().filter_map(|s| Scope::parse(s)).collect(),
            created_at: self.now(),
        };
        sqlx::query(
            "INSERT INTO oauth_apps (id, name, redirect_uris, scopes, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&app.id)
        .bind(&app.name)
        .bind(app.redirect_uris.join("\n"))
        .bind(scope_names.join(" "))
        .bind(app.created_at)
        .execute(self.pool())
        .await?;
        Ok(app)
    }

    /// A registered, unrevoked app by its `client_id`.
    pub async fn app(&self, client_id: &str) -> Result<Option<OAuthApp>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, redirect_uris, scopes, created_at FROM oauth_apps
             WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(client_id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(row_app).transpose()
    }

    /// Every registered app.
    pub async fn list_apps(&self) -> Result<Vec<OAuthApp>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, redirect_uris, scopes, created_at FROM oauth_apps
             WHERE revoked_at IS NULL ORDER BY created_at",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(row_app).collect()
    }

    /// A one-use code for what the owner granted (the devices must be the
    /// tenant's: checked by the caller).
    pub async fn create_authorization_code(
        &self,
        consent: &Consent<'_>,
    ) -> Result<IssuedCredential, StoreError> {
        let code = IssuedCredential::generate(CredentialKind::AuthorizationCode)?;
        let now = self.now();
        sqlx::query(
            "INSERT INTO oauth_codes (id, secret_digest, app_id, tenant_id, device_ids, scope,
                                      redirect_uri, code_challenge, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&code.id)
        .bind(code.digest())
        .bind(&consent.app.id)
        .bind(consent.tenant_id)
        .bind(consent.device_ids.join(" "))
        .bind(consent.scope.as_str())
        .bind(consent.redirect_uri)
        .bind(consent.code_challenge)
        .bind(now)
        .bind(now + CODE_MILLIS)
        .execute(self.pool())
        .await?;
        Ok(code)
    }

    /// Exchanges a code for the keys it grants, once.
    pub async fn redeem_authorization_code(
        &self,
        exchange: Exchange<'_>,
    ) -> Result<Result<Granted, CodeRefusal>, StoreError> {
        let Ok(presented) =
            PresentedCredential::parse(CredentialKind::AuthorizationCode, exchange.code)
        else {
            return Ok(Err(CodeRefusal::Unknown));
        };
        let row = sqlx::query(
            "SELECT c.secret_digest, c.app_id, c.tenant_id, c.device_ids, c.scope, c.redirect_uri,
                    c.code_challenge, c.expires_at, c.used_at, a.name
             FROM oauth_codes c JOIN oauth_apps a ON a.id = c.app_id WHERE c.id = $1",
        )
        .bind(presented.id)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            return Ok(Err(CodeRefusal::Unknown));
        };
        let digest: String = row.try_get("secret_digest")?;
        if !presented.matches_digest(&digest) {
            return Ok(Err(CodeRefusal::Unknown));
        }
        let now = self.now();
        let used_at: Option<Millis> = row.try_get("used_at")?;
        if used_at.is_some() {
            self.revoke_grants_of_code(presented.id).await?;
            return Ok(Err(CodeRefusal::Used));
        }
        let app_id: String = row.try_get("app_id")?;
        let expires_at: Millis = row.try_get("expires_at")?;
        let redirect_uri: String = row.try_get("redirect_uri")?;
        let challenge: String = row.try_get("code_challenge")?;
        let refusal = if now >= expires_at {
            Some(CodeRefusal::Expired)
        } else if app_id != exchange.client_id {
            Some(CodeRefusal::OtherClient)
        } else if redirect_uri != exchange.redirect_uri {
            Some(CodeRefusal::OtherRedirect)
        } else if !valid_verifier(exchange.code_verifier)
            || s256_challenge(exchange.code_verifier) != challenge
        {
            Some(CodeRefusal::Verifier)
        } else {
            None
        };
        // Any presentation uses the code up: a wrong verifier is no second
        // chance.
        let taken =
            sqlx::query("UPDATE oauth_codes SET used_at = $1 WHERE id = $2 AND used_at IS NULL")
                .bind(now)
                .bind(presented.id)
                .execute(self.pool())
                .await?;
        if taken.rows_affected() != 1 {
            return Ok(Err(CodeRefusal::Used));
        }
        if let Some(refusal) = refusal {
            return Ok(Err(refusal));
        }
        let tenant_id: String = row.try_get("tenant_id")?;
        let device_ids: String = row.try_get("device_ids")?;
        let scope_name: String = row.try_get("scope")?;
        let app_name: String = row.try_get("name")?;
        let scope = Scope::parse(&scope_name).unwrap_or(Scope::Read);
        let mut keys = Vec::new();
        for device_id in device_ids.split(' ').filter(|id| !id.is_empty()) {
            let (key, credential) = self
                .create_api_key(NewApiKey {
                    tenant_id: &tenant_id,
                    device_id: Some(device_id),
                    scope,
                    label: &app_name,
                    expires_at: None,
                })
                .await?;
            sqlx::query(
                "INSERT INTO oauth_grants (key_id, app_id, code_id, tenant_id, created_at)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&key.id)
            .bind(&app_id)
            .bind(presented.id)
            .bind(&tenant_id)
            .bind(now)
            .execute(self.pool())
            .await?;
            keys.push((device_id.to_owned(), credential));
        }
        Ok(Ok(Granted { scope, keys }))
    }

    /// Revokes the keys a code gave (it was presented again).
    async fn revoke_grants_of_code(&self, code_id: &str) -> Result<(), StoreError> {
        let rows = sqlx::query("SELECT key_id FROM oauth_grants WHERE code_id = $1")
            .bind(code_id)
            .fetch_all(self.pool())
            .await?;
        for row in rows {
            let key_id: String = row.try_get("key_id")?;
            self.revoke_api_key(&key_id).await?;
        }
        Ok(())
    }

    /// The tenant's keys that apps hold: key id and app name.
    pub async fn app_grants(&self, tenant_id: &str) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT g.key_id, a.name FROM oauth_grants g JOIN oauth_apps a ON a.id = g.app_id
             WHERE g.tenant_id = $1 ORDER BY g.created_at",
        )
        .bind(tenant_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("key_id")?, row.try_get("name")?)))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn s256_is_rfc_7636s_example() {
        // RFC 7636 appendix B.
        assert_eq!(
            s256_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert!(valid_verifier(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
        ));
        assert!(!valid_verifier("short"));
        assert!(!valid_verifier(&"a".repeat(129)));
        assert!(!valid_verifier(&format!("{}+", "a".repeat(50))));
    }

    #[test]
    fn a_loopback_redirect_takes_any_port() {
        let app = OAuthApp {
            id: "app_x".into(),
            name: "x".into(),
            redirect_uris: vec![
                "http://127.0.0.1/callback".into(),
                "https://app.example/cb".into(),
            ],
            scopes: vec![Scope::Read],
            created_at: 0,
        };
        assert!(app.redirects_to("http://127.0.0.1:49152/callback"));
        assert!(app.redirects_to("http://127.0.0.1/callback"));
        assert!(!app.redirects_to("http://127.0.0.1:49152/callback/"));
        assert!(!app.redirects_to("http://127.0.0.1:4x/callback"));
        assert!(!app.redirects_to("http://127.0.0.1.evil.example/callback"));
        assert!(!app.redirects_to("https://app.example:444/cb"));
        assert!(app.redirects_to("https://app.example/cb"));
    }

    #[test]
    fn redirect_uris_are_https_or_loopback() {
        assert!(check_redirect_uri("https://app.example/callback").is_ok());
        assert!(check_redirect_uri("http://127.0.0.1:8765/cb").is_ok());
        assert!(check_redirect_uri("http://localhost/cb").is_ok());
        assert!(check_redirect_uri("http://app.example/cb").is_err());
        assert!(check_redirect_uri("http://127.0.0.1.evil.example/cb").is_err());
        assert!(check_redirect_uri("https://app.example/cb#x").is_err());
    }
}
