//! Agent credential checks with a cache, like the API keys': after an edge
//! restart every agent's HELLO is a credential check, and thousands of
//! them at once must not each be a store query when they come back. A
//! success is kept for a short time under the credential's id, with a
//! digest of the whole token (never the token); the revocation path
//! forgets it.

use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::credential::{CredentialKind, PresentedCredential};
use crate::{AgentAuthFailure, Store, StoreError};

/// Where a check's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckedBy {
    Cache,
    Store,
}

#[derive(Debug)]
struct Cached {
    digest: [u8; 32],
    device_id: String,
    until: Instant,
}

/// Most cached credentials; past this, the oldest half is dropped.
const MAX_CACHED: usize = 200_000;

/// Agent credential checks through a short-lived cache of successes.
#[derive(Debug)]
pub struct AgentAuthenticator {
    store: Store,
    ttl: Duration,
    cache: DashMap<String, Cached>,
}

fn digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    out
}

impl AgentAuthenticator {
    pub fn new(store: Store, ttl: Duration) -> AgentAuthenticator {
        AgentAuthenticator {
            store,
            ttl,
            cache: DashMap::new(),
        }
    }

    /// Checks an agent's credential; on success its device id, and where
    /// the answer came from. Failures are never cached.
    pub async fn verify(
        &self,
        token: &str,
    ) -> Result<(Result<String, AgentAuthFailure>, CheckedBy), StoreError> {
        let Ok(presented) = PresentedCredential::parse(CredentialKind::AgentCredential, token)
        else {
            return Ok((Err(AgentAuthFailure::Malformed), CheckedBy::Cache));
        };
        let id = presented.id.to_owned();
        let presented_digest = digest(token);
        let now = Instant::now();
        if let Some(cached) = self.cache.get(&id)
            && cached.until > now
            // Digests, not secrets: comparing them leaks nothing usable.
            && cached.digest == presented_digest
        {
            return Ok((Ok(cached.device_id.clone()), CheckedBy::Cache));
        }
        let checked = self.store.verify_agent_credential(token).await?;
        match &checked {
            Ok(device_id) if !self.ttl.is_zero() => {
                if self.cache.len() >= MAX_CACHED {
                    self.cache.retain(|_, cached| cached.until > now);
                }
                self.cache.insert(
                    id,
                    Cached {
                        digest: presented_digest,
                        device_id: device_id.clone(),
                        until: now + self.ttl,
                    },
                );
            }
            _ => {
                self.cache.remove(&id);
            }
        }
        Ok((checked, CheckedBy::Store))
    }

    /// Forgets the credential `id` (revoked), or every cached one (`None`:
    /// a device was deleted).
    pub fn forget(&self, id: Option<&str>) {
        match id {
            Some(id) => {
                self.cache.remove(id);
            }
            None => self.cache.clear(),
        }
    }
}
