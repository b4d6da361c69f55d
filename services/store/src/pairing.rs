//! Agent pairing by code, after RFC 8628's device authorization grant.
//!
//! An agent without a credential starts a pairing: it gets a device code
//! (`rlp_…`, its secret while it polls) and a short user code for the
//! owner (8 characters from an alphabet without vowels or look-alikes,
//! shown `XXXX-XXXX`). The owner, signed in to the console, enters the user
//! code and picks the device; the agent's next poll then receives the
//! device's new agent credential, once. A pairing lives 15 minutes. Only
//! digests of both codes are stored.

use ring::rand::{SecureRandom, SystemRandom};
use sqlx::Row;

use crate::clock::Millis;
use crate::credential::{CredentialKind, IssuedCredential, PresentedCredential, sha256_hex};
use crate::{Store, StoreError};

/// How long a pairing lives.
pub const PAIRING_MILLIS: Millis = 15 * 60 * 1000;

/// How often the agent may poll at first (RFC 8628's `interval`).
pub const POLL_INTERVAL_MILLIS: Millis = 5_000;

/// The user code's alphabet: RFC 8628's example, consonants without
/// vowels (no words) and nothing that reads as another character.
pub const USER_CODE_ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";

/// User code characters (shown as two groups of four).
pub const USER_CODE_LEN: usize = 8;

/// A new pairing, as the agent is told it once.
#[derive(Debug)]
pub struct StartedPairing {
    pub id: String,
    /// The agent's secret while it polls.
    pub device_code: IssuedCredential,
    /// `XXXX-XXXX`.
    pub user_code: String,
    pub expires_at: Millis,
    pub interval_ms: Millis,
}

/// A pending pairing the owner found by its user code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingPairing {
    pub id: String,
    pub created_at: Millis,
    pub expires_at: Millis,
    /// The address the agent asked from (for the owner to recognise it).
    pub requested_from: String,
}

/// What the owner decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairingDecision {
    Approve {
        tenant_id: String,
        device_id: String,
    },
    Deny {
        tenant_id: String,
    },
}

/// What an agent's poll finds (RFC 8628 section 3.5).
#[derive(Debug)]
pub enum PollOutcome {
    /// `authorization_pending`.
    Pending,
    /// `slow_down`: polled sooner than its interval, which grows by 5 s.
    SlowDown { interval_ms: Millis },
    /// `access_denied`.
    Denied,
    /// `expired_token`: expired, or already used.
    Expired,
    /// The device code is not one this store gave (`invalid_grant`).
    Unknown,
    /// Approved: the device's new agent credential (the old one, if any,
    /// is revoked).
    Approved {
        device_id: String,
        tenant_id: String,
        credential: IssuedCredential,
    },
}

/// A user code as people type it: upper-cased, without spaces and dashes;
/// `None` when it cannot be one.
pub fn normalize_user_code(typed: &str) -> Option<String> {
    let code: String = typed
        .chars()
        .filter(|c| !matches!(c, '-' | ' ' | '\t'))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    (code.len() == USER_CODE_LEN && code.bytes().all(|b| USER_CODE_ALPHABET.contains(&b)))
        .then_some(code)
}

fn user_code_digest(normalized: &str) -> String {
    sha256_hex(format!("relay-pairing:{normalized}").as_bytes())
}

fn random_user_code() -> Result<String, ring::error::Unspecified> {
    let random = SystemRandom::new();
    let mut code = String::with_capacity(USER_CODE_LEN);
    while code.len() < USER_CODE_LEN {
        let mut byte = [0u8; 1];
        random.fill(&mut byte)?;
        // 240 = 12 × 20: no bias towards the first letters.
        if byte[0] < 240 {
            code.push(char::from(
                USER_CODE_ALPHABET[usize::from(byte[0]) % USER_CODE_ALPHABET.len()],
            ));
        }
    }
    Ok(code)
}

impl Store {
    /// Starts a pairing for an agent asking from `address`.
    pub async fn start_pairing(&self, address: &str) -> Result<StartedPairing, StoreError> {
        let device_code = IssuedCredential::generate(CredentialKind::PairingCode)?;
        let now = self.now();
        let expires_at = now + PAIRING_MILLIS;
        // A user code taken by a live pairing is drawn again (the digest is
        // unique; expired pairings are cleared first).
        sqlx::query("DELETE FROM pairings WHERE expires_at < $1")
            .bind(now - PAIRING_MILLIS)
            .execute(self.pool())
            .await?;
        for _ in 0..8 {
            let user_code = random_user_code()?;
            let inserted = sqlx::query(
                "INSERT INTO pairings (id, secret_digest, user_code_digest, created_at, expires_at,
                                       interval_ms, state, requested_from)
                 VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7)",
            )
            .bind(&device_code.id)
            .bind(device_code.digest())
            .bind(user_code_digest(&user_code))
            .bind(now)
            .bind(expires_at)
            .bind(POLL_INTERVAL_MILLIS)
            .bind(address)
            .execute(self.pool())
            .await;
            match inserted {
                Ok(_) => {
                    return Ok(StartedPairing {
                        id: device_code.id.clone(),
                        device_code,
                        user_code: format!("{}-{}", &user_code[..4], &user_code[4..]),
                        expires_at,
                        interval_ms: POLL_INTERVAL_MILLIS,
                    });
                }
                Err(sqlx::Error::Database(error)) if error.is_unique_violation() => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(StoreError::InvalidInput(
            "no free pairing code: try again".into(),
        ))
    }

    /// The pending, unexpired pairing with this user code.
    pub async fn pending_pairing(
        &self,
        user_code: &str,
    ) -> Result<Option<PendingPairing>, StoreError> {
        let Some(code) = normalize_user_code(user_code) else {
            return Ok(None);
        };
        let row = sqlx::query(
            "SELECT id, created_at, expires_at, requested_from FROM pairings
             WHERE user_code_digest = $1 AND state = 'pending' AND expires_at > $2",
        )
        .bind(user_code_digest(&code))
        .bind(self.now())
        .fetch_optional(self.pool())
        .await?;
        row.map(|row| {
            Ok(PendingPairing {
                id: row.try_get("id")?,
                created_at: row.try_get("created_at")?,
                expires_at: row.try_get("expires_at")?,
                requested_from: row.try_get("requested_from")?,
            })
        })
        .transpose()
    }

    /// Records the owner's decision on a pending pairing; false when it is
    /// no longer pending (decided, expired). An approved device must be
    /// the tenant's (checked by the caller).
    pub async fn decide_pairing(
        &self,
        pairing_id: &str,
        decision: &PairingDecision,
    ) -> Result<bool, StoreError> {
        let (state, tenant_id, device_id) = match decision {
            PairingDecision::Approve {
                tenant_id,
                device_id,
            } => ("approved", tenant_id, Some(device_id)),
            PairingDecision::Deny { tenant_id } => ("denied", tenant_id, None),
        };
        let now = self.now();
        let updated = sqlx::query(
            "UPDATE pairings SET state = $1, tenant_id = $2, device_id = $3, decided_at = $4
             WHERE id = $5 AND state = 'pending' AND expires_at > $4",
        )
        .bind(state)
        .bind(tenant_id)
        .bind(device_id)
        .bind(now)
        .bind(pairing_id)
        .execute(self.pool())
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// An agent's poll with its device code.
    pub async fn poll_pairing(&self, device_code: &str) -> Result<PollOutcome, StoreError> {
        let Ok(presented) = PresentedCredential::parse(CredentialKind::PairingCode, device_code)
        else {
            return Ok(PollOutcome::Unknown);
        };
        let row = sqlx::query(
            "SELECT secret_digest, expires_at, interval_ms, last_poll_at, state, tenant_id, device_id
             FROM pairings WHERE id = $1",
        )
        .bind(presented.id)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            return Ok(PollOutcome::Unknown);
        };
        let digest: String = row.try_get("secret_digest")?;
        if !presented.matches_digest(&digest) {
            return Ok(PollOutcome::Unknown);
        }
        let now = self.now();
        let expires_at: Millis = row.try_get("expires_at")?;
        let state: String = row.try_get("state")?;
        if now >= expires_at || state == "done" {
            return Ok(PollOutcome::Expired);
        }
        match state.as_str() {
            "denied" => return Ok(PollOutcome::Denied),
            "approved" => {
                let tenant_id: Option<String> = row.try_get("tenant_id")?;
                let device_id: Option<String> = row.try_get("device_id")?;
                let (Some(tenant_id), Some(device_id)) = (tenant_id, device_id) else {
                    return Ok(PollOutcome::Unknown);
                };
                // Once: the poll that moves it to done gets the credential.
                let taken = sqlx::query(
                    "UPDATE pairings SET state = 'done', last_poll_at = $1
                     WHERE id = $2 AND state = 'approved'",
                )
                .bind(now)
                .bind(presented.id)
                .execute(self.pool())
                .await?;
                if taken.rows_affected() != 1 {
                    return Ok(PollOutcome::Expired);
                }
                let (_, credential) = self.rotate_agent_credential(&device_id).await?;
                return Ok(PollOutcome::Approved {
                    device_id,
                    tenant_id,
                    credential,
                });
            }
            _ => {}
        }
        let interval: Millis = row.try_get("interval_ms")?;
        let last_poll: Option<Millis> = row.try_get("last_poll_at")?;
        let too_soon = last_poll.is_some_and(|last| now - last < interval);
        let interval = if too_soon { interval + 5_000 } else { interval };
        sqlx::query("UPDATE pairings SET last_poll_at = $1, interval_ms = $2 WHERE id = $3")
            .bind(now)
            .bind(interval)
            .bind(presented.id)
            .execute(self.pool())
            .await?;
        Ok(if too_soon {
            PollOutcome::SlowDown {
                interval_ms: interval,
            }
        } else {
            PollOutcome::Pending
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn user_codes_are_read_as_people_type_them() {
        assert_eq!(
            normalize_user_code("bcdf-ghjk").as_deref(),
            Some("BCDFGHJK")
        );
        assert_eq!(
            normalize_user_code(" BCDF GHJK ").as_deref(),
            Some("BCDFGHJK")
        );
        // Vowels, digits and look-alikes are never in a code.
        assert_eq!(normalize_user_code("BCDF-GHJ0"), None);
        assert_eq!(normalize_user_code("ABCD-EFGH"), None);
        assert_eq!(normalize_user_code("BCDF-GHJ"), None);
    }

    #[test]
    fn drawn_codes_use_the_alphabet_only() {
        for _ in 0..200 {
            let code = random_user_code().unwrap();
            assert_eq!(code.len(), USER_CODE_LEN);
            assert!(normalize_user_code(&code).is_some(), "{code}");
        }
    }
}
