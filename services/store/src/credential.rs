//! The format of the secrets relay hands out: API keys for apps and agent
//! credentials for agents.
//!
//! `<prefix>_<id>_<secret>_<checksum>`, all lower-case base32:
//! - prefix `rly` (API key), `rla` (agent credential), `rlt` (a tenant's
//!   API token), `rll` (a login link) or `rls` (a console session), so that a leaked
//!   secret is recognisable by scanners and people alike;
//! - id: 12 characters (60 bits), public, the database lookup key;
//! - secret: 26 characters (130 bits) from the system's secure generator;
//! - checksum: CRC-32 of everything before it, 7 characters. A mistyped or
//!   truncated secret fails the checksum before any database access.
//!
//! Only a SHA-256 digest of the secret is stored; comparisons of digests are
//! constant-time.

use relay_proto::Secret;
use ring::rand::{SecureRandom, SystemRandom};

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
pub const ID_LEN: usize = 12;
pub const SECRET_LEN: usize = 26;
const CHECKSUM_LEN: usize = 7;

/// What a credential is for; its prefix says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    ApiKey,
    AgentCredential,
    /// A tenant's API token for the tenant API (never valid for MQTT).
    AdminToken,
    /// A one-use login link's token.
    LoginLink,
    /// A browser session opened by a login link.
    AdminSession,
    /// An agent's device code while it pairs (RFC 8628).
    PairingCode,
    /// An OAuth authorization code an owner's consent gave an app.
    AuthorizationCode,
}

impl CredentialKind {
    pub fn prefix(self) -> &'static str {
        match self {
            CredentialKind::ApiKey => "rly",
            CredentialKind::AgentCredential => "rla",
            CredentialKind::AdminToken => "rlt",
            CredentialKind::LoginLink => "rll",
            CredentialKind::AdminSession => "rls",
            CredentialKind::PairingCode => "rlp",
            CredentialKind::AuthorizationCode => "rlc",
        }
    }
}

/// Why a string is not a well-formed credential. None of these needs the
/// database to find out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a {0:?} (wrong prefix)")]
    WrongPrefix(CredentialKind),
    #[error("wrong shape")]
    WrongShape,
    #[error("checksum does not match")]
    BadChecksum,
}

/// A full credential as handed out once. `Debug` and `Display` hide the
/// secret; [`IssuedCredential::reveal`] is the one way to get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCredential {
    pub kind: CredentialKind,
    pub id: String,
    secret: Secret<String>,
}

impl IssuedCredential {
    /// Draws a new id and secret from the system's secure generator.
    pub fn generate(kind: CredentialKind) -> Result<IssuedCredential, ring::error::Unspecified> {
        Ok(IssuedCredential {
            kind,
            id: random_base32(ID_LEN)?,
            secret: Secret::new(random_base32(SECRET_LEN)?),
        })
    }

    /// Re-assembles a credential from its parts (no shape check: a
    /// malformed part gives a token that fails to parse).
    pub fn from_parts(kind: CredentialKind, id: String, secret: String) -> IssuedCredential {
        IssuedCredential {
            kind,
            id,
            secret: Secret::new(secret),
        }
    }

    /// The whole token, `<prefix>_<id>_<secret>_<checksum>`: show it once.
    pub fn reveal(&self) -> String {
        let body = format!(
            "{}_{}_{}",
            self.kind.prefix(),
            self.id,
            self.secret.expose()
        );
        let checksum = checksum(&body);
        format!("{body}_{checksum}")
    }

    /// The secret alone (the password half of HTTP Basic).
    pub fn secret(&self) -> &str {
        self.secret.expose()
    }

    /// What the store keeps instead of the secret.
    pub fn digest(&self) -> String {
        digest_hex(self.secret.expose())
    }
}

/// A credential presented by a client, split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedCredential<'a> {
    pub id: &'a str,
    pub secret: Secret<&'a str>,
}

impl<'a> PresentedCredential<'a> {
    /// Parses and checks a whole token (`rly_…` or `rla_…`).
    pub fn parse(kind: CredentialKind, token: &'a str) -> Result<Self, FormatError> {
        let Some(rest) = token
            .strip_prefix(kind.prefix())
            .and_then(|rest| rest.strip_prefix('_'))
        else {
            return Err(FormatError::WrongPrefix(kind));
        };
        let mut parts = rest.split('_');
        let (Some(id), Some(secret), Some(sum), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(FormatError::WrongShape);
        };
        let credential = PresentedCredential::from_parts(id, secret)?;
        if sum.len() != CHECKSUM_LEN || !is_base32(sum) {
            return Err(FormatError::WrongShape);
        }
        let body_len = token.len() - sum.len() - 1;
        if checksum(&token[..body_len]) != sum {
            return Err(FormatError::BadChecksum);
        }
        Ok(credential)
    }

    /// Checks the shape of an id and a secret given apart (HTTP Basic).
    pub fn from_parts(id: &'a str, secret: &'a str) -> Result<Self, FormatError> {
        if id.len() != ID_LEN || secret.len() != SECRET_LEN || !is_base32(id) || !is_base32(secret)
        {
            return Err(FormatError::WrongShape);
        }
        Ok(PresentedCredential {
            id,
            secret: Secret::new(secret),
        })
    }

    /// The digest of the secret, as stored (to find the credential by it in
    /// one statement: comparing digests leaks nothing usable about the
    /// secret).
    pub(crate) fn secret_digest(&self) -> String {
        digest_hex(self.secret.expose())
    }

    /// Whether the secret matches a stored digest, in constant time.
    pub fn matches_digest(&self, stored_digest_hex: &str) -> bool {
        let presented = digest_hex(self.secret.expose());
        constant_time_eq(presented.as_bytes(), stored_digest_hex.as_bytes())
    }
}

/// Lower-case base32 of `len` random characters (5 bits each).
pub fn random_base32(len: usize) -> Result<String, ring::error::Unspecified> {
    let mut bytes = vec![0u8; len];
    SystemRandom::new().fill(&mut bytes)?;
    Ok(bytes
        .iter()
        .map(|byte| char::from(ALPHABET[usize::from(byte & 31)]))
        .collect())
}

/// Compares without stopping at the first difference. Lengths are not
/// secret (digests are always 64 hex characters).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

fn is_base32(text: &str) -> bool {
    text.bytes().all(|b| ALPHABET.contains(&b))
}

fn digest_hex(secret: &str) -> String {
    sha256_hex(secret.as_bytes())
}

/// SHA-256 as lower-case hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn checksum(text: &str) -> String {
    let crc = crc32(text.as_bytes());
    (0..CHECKSUM_LEN)
        .map(|i| char::from(ALPHABET[((crc >> (5 * i)) & 31) as usize]))
        .collect()
}

/// CRC-32 (IEEE 802.3, reflected), bit by bit: it runs once per presented
/// token, so a table would buy nothing.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn issued_tokens_parse_back_and_match_their_digest() {
        let issued = IssuedCredential::generate(CredentialKind::ApiKey).unwrap();
        let token = issued.reveal();
        assert!(token.starts_with("rly_"));
        assert_eq!(
            token.len(),
            3 + 1 + ID_LEN + 1 + SECRET_LEN + 1 + CHECKSUM_LEN
        );
        let presented = PresentedCredential::parse(CredentialKind::ApiKey, &token).unwrap();
        assert_eq!(presented.id, issued.id);
        assert!(presented.matches_digest(&issued.digest()));
        let other = IssuedCredential::generate(CredentialKind::ApiKey).unwrap();
        assert!(!presented.matches_digest(&other.digest()));
    }

    #[test]
    fn a_tampered_token_fails_its_checksum() {
        let token = IssuedCredential::generate(CredentialKind::ApiKey)
            .unwrap()
            .reveal();
        let position = 3 + 1 + ID_LEN + 1 + 5;
        let mut tampered = token.clone().into_bytes();
        tampered[position] = if tampered[position] == b'a' {
            b'b'
        } else {
            b'a'
        };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(
            PresentedCredential::parse(CredentialKind::ApiKey, &tampered),
            Err(FormatError::BadChecksum)
        );
    }

    #[test]
    fn shapes_and_prefixes_are_checked() {
        let agent = IssuedCredential::generate(CredentialKind::AgentCredential)
            .unwrap()
            .reveal();
        assert_eq!(
            PresentedCredential::parse(CredentialKind::ApiKey, &agent),
            Err(FormatError::WrongPrefix(CredentialKind::ApiKey))
        );
        for bad in [
            "rly_",
            "rly_a_b_c",
            "rly_abc_def_ghi_jkl",
            "rly_AAAAAAAAAAAA_bbbbbbbbbbbbbbbbbbbbbbbbbb_ccccccc",
        ] {
            assert_eq!(
                PresentedCredential::parse(CredentialKind::ApiKey, bad),
                Err(FormatError::WrongShape),
                "{bad}"
            );
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let issued = IssuedCredential::generate(CredentialKind::ApiKey).unwrap();
        assert!(!format!("{issued:?}").contains(issued.secret()));
        let token = issued.reveal();
        let presented = PresentedCredential::parse(CredentialKind::ApiKey, &token).unwrap();
        assert!(!format!("{presented:?}").contains(issued.secret()));
    }
}
