//! Operator-signed JWTs as bearer tokens, checked against a JWKS file.
//!
//! Every key in the file must name its `kid` and its `alg`, and the key type
//! must fit the algorithm; a token is checked only with the key its `kid`
//! names, and only with that key's algorithm. So `none` is impossible, and a
//! token that claims HS256 under an RSA or EC key id (the HMAC-with-public-key
//! trick) is refused before any signature check. Issuer, audience and expiry
//! are required. The file is re-read when asked ([`JwtVerifier::reload_if_changed`]), which is how keys are
//! rotated: publish the new key beside the old, then drop the old.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::store::Scope;

/// Where the keys are and what the tokens must say.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub jwks_path: PathBuf,
    pub issuer: String,
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_seconds: u64,
}

/// Why a JWKS file cannot be used. Raised at start-up and on reload (where
/// the old keys stay in force).
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a JWKS document: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("key #{index} in the JWKS has no kid")]
    MissingKid { index: usize },
    #[error("key {kid:?} does not pin its algorithm (alg)")]
    MissingAlgorithm { kid: String },
    #[error("key {kid:?}: algorithm {alg:?} cannot verify signatures")]
    UnsupportedAlgorithm { kid: String, alg: KeyAlgorithm },
    #[error("key {kid:?}: key type does not fit algorithm {alg:?}")]
    KeyTypeMismatch { kid: String, alg: Algorithm },
    #[error("key {kid:?} appears twice")]
    DuplicateKid { kid: String },
    #[error("key {kid:?} is not usable: {source}")]
    BadKey {
        kid: String,
        source: jsonwebtoken::errors::Error,
    },
}

/// Why a JWT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum JwtFailure {
    #[error("not a JWT")]
    Malformed,
    #[error("no kid in the header")]
    MissingKid,
    #[error("unknown kid")]
    UnknownKid,
    #[error("algorithm differs from the key's")]
    AlgorithmMismatch,
    #[error("bad signature")]
    BadSignature,
    #[error("expired")]
    Expired,
    #[error("not valid yet")]
    NotYetValid,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("wrong audience")]
    WrongAudience,
    #[error("claims missing or malformed")]
    BadClaims,
}

/// The claims relay reads, beyond `iss`, `aud` and `exp`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RelayClaims {
    pub sub: Option<String>,
    /// The tenant id the token acts for.
    pub tenant: String,
    /// The one device the token is limited to, if any.
    pub device: Option<String>,
    /// `read` or `control`.
    pub scope: String,
    /// Seconds since the Unix epoch.
    pub exp: i64,
    pub jti: Option<String>,
}

/// A verified token: who it speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedJwt {
    pub kid: String,
    pub subject: Option<String>,
    pub tenant_id: String,
    pub device_id: Option<String>,
    pub scope: Scope,
    /// Milliseconds since the Unix epoch.
    pub expires_at: i64,
}

struct Keys {
    /// SHA-256 of the file these keys came from.
    content_digest: String,
    by_kid: HashMap<String, (DecodingKey, Algorithm)>,
}

/// Checks JWTs against the keys of a JWKS file.
pub struct JwtVerifier {
    config: JwtConfig,
    keys: RwLock<Keys>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// Loads the JWKS file; every problem in it is an error.
    pub fn load(config: JwtConfig) -> Result<JwtVerifier, JwksError> {
        let keys = read_keys(&config.jwks_path)?;
        Ok(JwtVerifier {
            config,
            keys: RwLock::new(keys),
        })
    }

    /// Re-reads the file and takes its keys if its content changed (file
    /// times are too coarse to tell two quick writes apart). Returns whether
    /// new keys are in force; on error the old ones stay. Call it
    /// periodically, e.g. every few seconds.
    pub fn reload_if_changed(&self) -> Result<bool, JwksError> {
        let keys = read_keys(&self.config.jwks_path)?;
        let unchanged = self
            .keys
            .read()
            .map(|current| current.content_digest == keys.content_digest)
            .unwrap_or(false);
        if unchanged {
            return Ok(false);
        }
        if let Ok(mut slot) = self.keys.write() {
            *slot = keys;
        }
        Ok(true)
    }

    /// Whether `token` looks like a JWT (three base64url parts), as opposed
    /// to an API key.
    pub fn looks_like_jwt(token: &str) -> bool {
        let mut parts = token.split('.');
        let well_formed = |part: Option<&str>| {
            part.is_some_and(|p| {
                !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
        };
        well_formed(parts.next())
            && well_formed(parts.next())
            && well_formed(parts.next())
            && parts.next().is_none()
    }

    /// Verifies signature, algorithm, issuer, audience, expiry and claims.
    pub fn verify(&self, token: &str) -> Result<VerifiedJwt, JwtFailure> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtFailure::Malformed)?;
        let kid = header.kid.ok_or(JwtFailure::MissingKid)?;
        let keys = self.keys.read().map_err(|_| JwtFailure::UnknownKid)?;
        let (key, algorithm) = keys.by_kid.get(&kid).ok_or(JwtFailure::UnknownKid)?;
        if header.alg != *algorithm {
            return Err(JwtFailure::AlgorithmMismatch);
        }
        let mut validation = Validation::new(*algorithm);
        validation.leeway = self.config.leeway_seconds;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data =
            jsonwebtoken::decode::<RelayClaims>(token, key, &validation).map_err(|error| {
                use jsonwebtoken::errors::ErrorKind;
                match error.kind() {
                    ErrorKind::InvalidSignature => JwtFailure::BadSignature,
                    ErrorKind::ExpiredSignature => JwtFailure::Expired,
                    ErrorKind::ImmatureSignature => JwtFailure::NotYetValid,
                    ErrorKind::InvalidIssuer => JwtFailure::WrongIssuer,
                    ErrorKind::InvalidAudience => JwtFailure::WrongAudience,
                    ErrorKind::InvalidAlgorithm => JwtFailure::AlgorithmMismatch,
                    ErrorKind::MissingRequiredClaim(_) | ErrorKind::Json(_) => {
                        JwtFailure::BadClaims
                    }
                    _ => JwtFailure::Malformed,
                }
            })?;
        let claims = data.claims;
        let scope = Scope::parse(&claims.scope).ok_or(JwtFailure::BadClaims)?;
        if claims.tenant.is_empty() {
            return Err(JwtFailure::BadClaims);
        }
        Ok(VerifiedJwt {
            kid,
            subject: claims.sub.or(claims.jti),
            tenant_id: claims.tenant,
            device_id: claims.device,
            scope,
            expires_at: claims.exp.saturating_mul(1000),
        })
    }
}

fn read_keys(path: &Path) -> Result<Keys, JwksError> {
    let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
        path: path.to_owned(),
        source,
    })?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|source| JwksError::Parse {
        path: path.to_owned(),
        source,
    })?;
    let mut by_kid = HashMap::new();
    for (index, jwk) in set.keys.iter().enumerate() {
        let kid = jwk
            .common
            .key_id
            .clone()
            .ok_or(JwksError::MissingKid { index })?;
        let key_algorithm = jwk
            .common
            .key_algorithm
            .ok_or_else(|| JwksError::MissingAlgorithm { kid: kid.clone() })?;
        let algorithm =
            signing_algorithm(key_algorithm).ok_or_else(|| JwksError::UnsupportedAlgorithm {
                kid: kid.clone(),
                alg: key_algorithm,
            })?;
        let fits = matches!(
            (&jwk.algorithm, algorithm),
            (
                AlgorithmParameters::OctetKey(_),
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
            ) | (
                AlgorithmParameters::EllipticCurve(_),
                Algorithm::ES256 | Algorithm::ES384
            ) | (
                AlgorithmParameters::RSA(_),
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (AlgorithmParameters::OctetKeyPair(_), Algorithm::EdDSA)
        );
        if !fits {
            return Err(JwksError::KeyTypeMismatch {
                kid,
                alg: algorithm,
            });
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|source| JwksError::BadKey {
            kid: kid.clone(),
            source,
        })?;
        if by_kid.insert(kid.clone(), (key, algorithm)).is_some() {
            return Err(JwksError::DuplicateKid { kid });
        }
    }
    Ok(Keys {
        content_digest: crate::credential::sha256_hex(text.as_bytes()),
        by_kid,
    })
}

fn signing_algorithm(algorithm: KeyAlgorithm) -> Option<Algorithm> {
    Some(match algorithm {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}
