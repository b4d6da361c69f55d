//! The instance registry, for several edge instances on one store: each
//! instance's lease (renewed every few seconds; nothing is routed to an
//! instance whose lease has expired) and which instance holds each device's
//! agent, with an epoch that grows by one on every claim.

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::clock::Millis;
use crate::credential::{CredentialKind, PresentedCredential};
use crate::{AgentAuthFailure, Store, StoreError};

/// An agent accepted at HELLO: its device, claimed at `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentClaim {
    pub device_id: String,
    pub epoch: u64,
}

/// An edge instance as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    pub id: String,
    /// Where other instances reach its peer listener.
    pub peer_address: String,
    pub started_at: Millis,
    pub lease_until: Millis,
    /// Whether its lease holds at the time of the listing.
    pub live: bool,
}

/// Which instance holds a device's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claim {
    pub device_id: String,
    pub epoch: u64,
    pub instance_id: String,
    pub connected_at: Millis,
    /// When the tunnel ended on its instance; `None` while it stands.
    pub released_at: Option<Millis>,
    /// The instance's peer address and lease, if it is registered.
    pub peer_address: Option<String>,
    pub lease_until: Option<Millis>,
}

impl Claim {
    /// Whether the claim routes to a live instance at `now`: the tunnel
    /// stands and its instance's lease holds.
    pub fn is_live(&self, now: Millis) -> bool {
        self.released_at.is_none() && self.lease_until.is_some_and(|until| until > now)
    }

    /// When the device was last known to be served: now for a live claim,
    /// else when its tunnel ended or its instance's lease ran out.
    pub fn last_served(&self, now: Millis) -> Millis {
        if self.is_live(now) {
            return now;
        }
        match (self.released_at, self.lease_until) {
            (Some(released), Some(until)) => released.min(until),
            (Some(released), None) => released,
            (None, Some(until)) => until,
            (None, None) => self.connected_at,
        }
    }
}

fn epoch_of(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn claim_from_row(row: &AnyRow) -> Result<Claim, StoreError> {
    Ok(Claim {
        device_id: row.try_get("device_id")?,
        epoch: epoch_of(row.try_get("epoch")?),
        instance_id: row.try_get("edge_instance")?,
        connected_at: row.try_get("connected_at")?,
        released_at: row.try_get("released_at")?,
        peer_address: row.try_get("peer_address")?,
        lease_until: row.try_get("lease_until")?,
    })
}

impl Store {
    /// Registers `instance_id` or renews its lease until `now + lease_ms`;
    /// returns the new end of the lease.
    pub async fn renew_instance_lease(
        &self,
        instance_id: &str,
        peer_address: &str,
        lease_ms: Millis,
    ) -> Result<Millis, StoreError> {
        let now = self.now();
        let until = now + lease_ms;
        sqlx::query(
            "INSERT INTO edge_instances (id, peer_address, started_at, lease_until)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET peer_address = excluded.peer_address,
                 lease_until = excluded.lease_until",
        )
        .bind(instance_id)
        .bind(peer_address)
        .bind(now)
        .bind(until)
        .execute(self.pool())
        .await?;
        Ok(until)
    }

    /// Ends the lease of `instance_id` now (it drains): nothing is routed
    /// to it any more, and every claim it still holds is released, in one
    /// transaction (a draining instance with thousands of agents does not
    /// release them one query each).
    pub async fn end_instance_lease(&self, instance_id: &str) -> Result<(), StoreError> {
        let now = self.now();
        let mut transaction = self.pool().begin().await?;
        sqlx::query("UPDATE edge_instances SET lease_until = $2 WHERE id = $1")
            .bind(instance_id)
            .bind(now)
            .execute(&mut *transaction)
            .await?;
        sqlx::query(
            "UPDATE tunnels SET released_at = $2 WHERE edge_instance = $1 AND released_at IS NULL",
        )
        .bind(instance_id)
        .bind(now)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Every registered instance, live ones first, then by id.
    pub async fn list_instances(&self) -> Result<Vec<Instance>, StoreError> {
        let now = self.now();
        let rows = sqlx::query(
            "SELECT id, peer_address, started_at, lease_until FROM edge_instances
             ORDER BY lease_until > $1 DESC, id",
        )
        .bind(now)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                let lease_until: Millis = row.try_get("lease_until")?;
                Ok(Instance {
                    id: row.try_get("id")?,
                    peer_address: row.try_get("peer_address")?,
                    started_at: row.try_get("started_at")?,
                    lease_until,
                    live: lease_until > now,
                })
            })
            .collect()
    }

    /// Claims `device_id` for `instance_id` (an agent's HELLO was accepted
    /// there), in one statement: the epoch grows by one on every claim,
    /// whoever held the device before. Returns the new epoch.
    pub async fn claim_device(
        &self,
        device_id: &str,
        instance_id: &str,
    ) -> Result<u64, StoreError> {
        let epoch: i64 = sqlx::query_scalar(
            "INSERT INTO tunnels (device_id, epoch, edge_instance, connected_at, released_at)
             VALUES ($1, 1, $2, $3, NULL)
             ON CONFLICT (device_id) DO UPDATE SET epoch = tunnels.epoch + 1,
                 edge_instance = excluded.edge_instance,
                 connected_at = excluded.connected_at,
                 released_at = NULL
             RETURNING epoch",
        )
        .bind(device_id)
        .bind(instance_id)
        .bind(self.now())
        .fetch_one(self.pool())
        .await?;
        Ok(epoch_of(epoch))
    }

    /// An agent's HELLO: checks its credential and claims its device for
    /// `instance_id`, in one statement when the credential is good (after
    /// an edge restart every agent comes back at once, and each must cost
    /// the store one query, not a check and a claim). A refused credential
    /// costs a second query, which says why; it claims nothing.
    pub async fn accept_agent(
        &self,
        token: &str,
        instance_id: &str,
    ) -> Result<Result<AgentClaim, AgentAuthFailure>, StoreError> {
        let Ok(presented) = PresentedCredential::parse(CredentialKind::AgentCredential, token)
        else {
            return Ok(Err(AgentAuthFailure::Malformed));
        };
        let row = sqlx::query(
            "INSERT INTO tunnels (device_id, epoch, edge_instance, connected_at, released_at)
             SELECT c.device_id, 1, $3, $4, NULL
             FROM agent_credentials c JOIN devices d ON d.id = c.device_id
             WHERE c.id = $1 AND c.secret_digest = $2
                 AND c.revoked_at IS NULL AND d.deleted_at IS NULL
             ON CONFLICT (device_id) DO UPDATE SET epoch = tunnels.epoch + 1,
                 edge_instance = excluded.edge_instance,
                 connected_at = excluded.connected_at,
                 released_at = NULL
             RETURNING device_id, epoch",
        )
        .bind(presented.id)
        .bind(presented.secret_digest())
        .bind(instance_id)
        .bind(self.now())
        .fetch_optional(self.pool())
        .await?;
        if let Some(row) = row {
            return Ok(Ok(AgentClaim {
                device_id: row.try_get("device_id")?,
                epoch: epoch_of(row.try_get("epoch")?),
            }));
        }
        match self.verify_agent_credential(token).await? {
            Err(failure) => Ok(Err(failure)),
            // Good now, not a moment ago (issued in between): claim it.
            Ok(device_id) => {
                let epoch = self.claim_device(&device_id, instance_id).await?;
                Ok(Ok(AgentClaim { device_id, epoch }))
            }
        }
    }

    /// The tunnel of `epoch` ended on `instance_id`: its claim is released,
    /// if it is still that one. True when it was.
    pub async fn release_device(
        &self,
        device_id: &str,
        instance_id: &str,
        epoch: u64,
    ) -> Result<bool, StoreError> {
        let released = sqlx::query(
            "UPDATE tunnels SET released_at = $4
             WHERE device_id = $1 AND edge_instance = $2 AND epoch = $3 AND released_at IS NULL",
        )
        .bind(device_id)
        .bind(instance_id)
        .bind(i64::try_from(epoch).unwrap_or(i64::MAX))
        .bind(self.now())
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(released == 1)
    }

    /// The claim on `device_id`, with its instance's lease, if any.
    pub async fn device_claim(&self, device_id: &str) -> Result<Option<Claim>, StoreError> {
        let row = sqlx::query(
            "SELECT t.device_id, t.epoch, t.edge_instance, t.connected_at, t.released_at,
                    i.peer_address, i.lease_until
             FROM tunnels t LEFT JOIN edge_instances i ON i.id = t.edge_instance
             WHERE t.device_id = $1",
        )
        .bind(device_id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(claim_from_row).transpose()
    }

    /// The devices `instance_id` holds (unreleased claims), with their
    /// epochs.
    pub async fn claims_of(&self, instance_id: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT device_id, epoch FROM tunnels
             WHERE edge_instance = $1 AND released_at IS NULL",
        )
        .bind(instance_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("device_id")?, epoch_of(row.try_get("epoch")?))))
            .collect()
    }
}

impl Store {
    /// Claims other instances than `instance_id` made at `since` or later
    /// (by their clocks), as (device, epoch, instance): what the periodic
    /// check asks between full listings.
    pub async fn claims_since(
        &self,
        since: Millis,
        instance_id: &str,
    ) -> Result<Vec<Claimed>, StoreError> {
        let rows = sqlx::query(
            "SELECT device_id, epoch, edge_instance FROM tunnels
             WHERE connected_at >= $1 AND edge_instance <> $2",
        )
        .bind(since)
        .bind(instance_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Claimed {
                    device_id: row.try_get("device_id")?,
                    epoch: epoch_of(row.try_get("epoch")?),
                    instance_id: row.try_get("edge_instance")?,
                })
            })
            .collect()
    }
}

/// A claim announced by Postgres NOTIFY: `instance_id` now holds
/// `device_id` at `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub device_id: String,
    pub epoch: u64,
    pub instance_id: String,
}

impl Claimed {
    /// Parses a `relay_tunnels` payload, `<device> <epoch> <instance>`.
    pub fn parse(payload: &str) -> Option<Claimed> {
        let mut parts = payload.splitn(3, ' ');
        let device_id = parts.next()?.to_owned();
        let epoch = parts.next()?.parse().ok()?;
        let instance_id = parts.next()?.to_owned();
        Some(Claimed {
            device_id,
            epoch,
            instance_id,
        })
    }
}

/// Claims as they happen, on Postgres (LISTEN relay_tunnels). A lost LISTEN
/// connection is an error; the edge's periodic check covers the gap.
pub struct ClaimListener {
    listener: sqlx::postgres::PgListener,
}

impl std::fmt::Debug for ClaimListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimListener").finish_non_exhaustive()
    }
}

const CLAIM_CHANNEL: &str = "relay_tunnels";

impl ClaimListener {
    /// Listens for claims; `None` on SQLite, which has no NOTIFY. LISTEN is
    /// in place when this returns.
    pub async fn start(store: &Store) -> Result<Option<ClaimListener>, StoreError> {
        if store.backend() != crate::Backend::Postgres {
            return Ok(None);
        }
        let mut listener = sqlx::postgres::PgListener::connect(store.database_url()).await?;
        listener.listen(CLAIM_CHANNEL).await?;
        Ok(Some(ClaimListener { listener }))
    }

    /// The next claim; payloads that do not parse are skipped.
    pub async fn next(&mut self) -> Result<Claimed, StoreError> {
        loop {
            let notification = self.listener.recv().await?;
            if let Some(claimed) = Claimed::parse(notification.payload()) {
                return Ok(claimed);
            }
        }
    }
}
