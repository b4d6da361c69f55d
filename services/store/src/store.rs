//! The store's records and the operations on them, one SQL dialect for both
//! backends (sqlx's `Any` driver; `$n` placeholders work on both).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::clock::{Clock, Millis, SystemClock};
use crate::credential::{CredentialKind, IssuedCredential, PresentedCredential, random_base32};
use crate::{StoreError, migrate};

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Subscribe only.
    Read,
    /// Subscribe and publish.
    Control,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Control => "control",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "read" => Some(Scope::Read),
            "control" => Some(Scope::Control),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    /// The subdomain label: 13 lower-case base32 characters (65 bits).
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub created_at: Millis,
    pub deleted_at: Option<Millis>,
}

/// An API key as listed: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    pub id: String,
    pub tenant_id: String,
    pub device_id: Option<String>,
    pub scope: Scope,
    pub label: String,
    pub created_at: Millis,
    pub expires_at: Option<Millis>,
    pub last_used_at: Option<Millis>,
    pub revoked_at: Option<Millis>,
}

/// What a new API key is for.
#[derive(Debug, Clone)]
pub struct NewApiKey<'a> {
    pub tenant_id: &'a str,
    pub device_id: Option<&'a str>,
    pub scope: Scope,
    pub label: &'a str,
    pub expires_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentCredential {
    pub id: String,
    pub device_id: String,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
}

/// Why an agent credential was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AgentAuthFailure {
    #[error("malformed credential")]
    Malformed,
    #[error("unknown credential")]
    Unknown,
    #[error("wrong secret")]
    WrongSecret,
    #[error("credential revoked")]
    Revoked,
    #[error("device deleted")]
    DeviceDeleted,
}

/// The row an API-key check needs, with the device it is used against.
#[derive(Debug)]
pub(crate) struct KeyCheck {
    pub tenant_id: String,
    pub device_id: Option<String>,
    pub scope: Scope,
    pub secret_digest: String,
    pub expires_at: Option<Millis>,
    pub revoked_at: Option<Millis>,
    /// The tenant of the device asked for, if that device exists and lives.
    pub target_device_tenant: Option<String>,
}

/// Device ids: 13 base32 characters, 65 bits of randomness.
const DEVICE_ID_LEN: usize = 13;
const NAME_MAX_LEN: usize = 128;

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// Queries and transactions issued (a transaction counts once), for
    /// the edge's metrics and the load test.
    queries: Arc<AtomicU64>,
    backend: Backend,
    /// Kept for the Postgres LISTEN connection; never logged.
    database_url: Arc<str>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects to `postgres://…` or `sqlite:…` (a SQLite file is created
    /// when missing), trying for up to 5 seconds.
    pub async fn connect(database_url: &str) -> Result<Store, StoreError> {
        Self::connect_with_timeout(database_url, Duration::from_secs(5)).await
    }

    /// As [`Store::connect`]; `timeout` bounds the first connection and
    /// every later wait for a pooled connection.
    pub async fn connect_with_timeout(
        database_url: &str,
        timeout: Duration,
    ) -> Result<Store, StoreError> {
        let backend = if database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://")
        {
            Backend::Postgres
        } else if database_url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::InvalidDatabaseUrl);
        };
        sqlx::any::install_default_drivers();
        let url = match backend {
            Backend::Sqlite
                if !database_url.contains('?') && !database_url.contains(":memory:") =>
            {
                format!("{database_url}?mode=rwc")
            }
            _ => database_url.to_owned(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 16 })
            .acquire_timeout(timeout)
            .connect(&url)
            .await
            .map_err(StoreError::from_connect)?;
        Ok(Store {
            pool,
            queries: Arc::new(AtomicU64::new(0)),
            backend,
            database_url: url.into(),
            clock: Arc::new(SystemClock),
        })
    }

    /// Replaces the wall clock (tests).
    pub fn with_clock(mut self, clock: impl Clock) -> Store {
        self.clock = Arc::new(clock);
        self
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn now(&self) -> Millis {
        self.clock.now_millis()
    }

    pub(crate) fn database_url(&self) -> &str {
        &self.database_url
    }

    /// The pool, for one query or transaction (counted).
    pub(crate) fn pool(&self) -> &AnyPool {
        self.queries.fetch_add(1, Ordering::Relaxed);
        &self.pool
    }

    /// Queries and transactions this store (and its clones) issued so far;
    /// a transaction counts once.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Applies pending migrations; returns the names applied.
    pub async fn migrate(&self) -> Result<Vec<&'static str>, StoreError> {
        let mut connection = self.pool().acquire().await?;
        migrate::run(&mut connection, self.backend, self.now()).await
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        let name = checked_name("tenant name", name)?;
        let tenant = Tenant {
            id: format!("tn_{}", random_base32(12)?),
            name: name.to_owned(),
            created_at: self.now(),
        };
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&tenant.id)
            .bind(&tenant.name)
            .bind(tenant.created_at)
            .execute(self.pool())
            .await
            .map_err(|error| {
                StoreError::conflict_or(error, format!("a tenant named {name:?} exists"))
            })?;
        Ok(tenant)
    }

    pub async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        let rows = sqlx::query("SELECT id, name, created_at FROM tenants ORDER BY name")
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(tenant_from_row).collect()
    }

    /// A tenant by id or by name.
    pub async fn tenant(&self, id_or_name: &str) -> Result<Tenant, StoreError> {
        let row =
            sqlx::query("SELECT id, name, created_at FROM tenants WHERE id = $1 OR name = $1")
                .bind(id_or_name)
                .fetch_optional(self.pool())
                .await?;
        match row {
            Some(row) => tenant_from_row(&row),
            None => Err(StoreError::not_found("tenant", id_or_name)),
        }
    }

    /// Creates a device with a fresh id. Ids are never reused: deleted
    /// devices keep their row.
    pub async fn create_device(&self, tenant_id: &str, name: &str) -> Result<Device, StoreError> {
        let name = checked_name("device name", name)?;
        let tenant = self.tenant(tenant_id).await?;
        let device = Device {
            id: random_base32(DEVICE_ID_LEN)?,
            tenant_id: tenant.id,
            name: name.to_owned(),
            created_at: self.now(),
            deleted_at: None,
        };
        sqlx::query(
            "INSERT INTO devices (id, tenant_id, name, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&device.id)
        .bind(&device.tenant_id)
        .bind(&device.name)
        .bind(device.created_at)
        .execute(self.pool())
        .await
        .map_err(|error| {
            StoreError::conflict_or(
                error,
                format!("tenant {} has a device named {name:?}", tenant.name),
            )
        })?;
        Ok(device)
    }

    /// Live devices, of one tenant or of all.
    pub async fn list_devices(&self, tenant_id: Option<&str>) -> Result<Vec<Device>, StoreError> {
        let rows = match tenant_id {
            Some(tenant) => {
                let tenant = self.tenant(tenant).await?;
                sqlx::query(
                    "SELECT id, tenant_id, name, created_at, deleted_at FROM devices
                     WHERE tenant_id = $1 AND deleted_at IS NULL ORDER BY name",
                )
                .bind(tenant.id)
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT id, tenant_id, name, created_at, deleted_at FROM devices
                     WHERE deleted_at IS NULL ORDER BY tenant_id, name",
                )
                .fetch_all(self.pool())
                .await?
            }
        };
        rows.iter().map(device_from_row).collect()
    }

    /// A device by id, deleted or not.
    pub async fn device(&self, id: &str) -> Result<Device, StoreError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, name, created_at, deleted_at FROM devices WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        match row {
            Some(row) => device_from_row(&row),
            None => Err(StoreError::not_found("device", id)),
        }
    }

    /// Deletes a device: its id stays taken, its agent credential and the
    /// keys scoped to it are revoked.
    pub async fn delete_device(&self, id: &str) -> Result<(), StoreError> {
        let now = self.now();
        let mut transaction = self.pool().begin().await?;
        let deleted =
            sqlx::query("UPDATE devices SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(&mut *transaction)
                .await?;
        if deleted.rows_affected() == 0 {
            return Err(StoreError::not_found("device", id));
        }
        for table in ["agent_credentials", "api_keys"] {
            revoke_for_device(&mut transaction, table, id, now).await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Creates an API key. The returned credential is the only copy of the
    /// secret: show it once.
    pub async fn create_api_key(
        &self,
        new: NewApiKey<'_>,
    ) -> Result<(ApiKey, IssuedCredential), StoreError> {
        let label = new.label.trim();
        if label.len() > NAME_MAX_LEN {
            return Err(StoreError::InvalidInput(format!(
                "label is longer than {NAME_MAX_LEN} bytes"
            )));
        }
        let tenant = self.tenant(new.tenant_id).await?;
        if let Some(device_id) = new.device_id {
            let device = self.device(device_id).await?;
            if device.tenant_id != tenant.id || device.deleted_at.is_some() {
                return Err(StoreError::not_found("device", device_id));
            }
        }
        let credential = IssuedCredential::generate(CredentialKind::ApiKey)?;
        let key = ApiKey {
            id: credential.id.clone(),
            tenant_id: tenant.id,
            device_id: new.device_id.map(str::to_owned),
            scope: new.scope,
            label: label.to_owned(),
            created_at: self.now(),
            expires_at: new.expires_at,
            last_used_at: None,
            revoked_at: None,
        };
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, device_id, scope, label, secret_digest, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&key.id)
        .bind(&key.tenant_id)
        .bind(&key.device_id)
        .bind(key.scope.as_str())
        .bind(&key.label)
        .bind(credential.digest())
        .bind(key.created_at)
        .bind(key.expires_at)
        .execute(self.pool())
        .await?;
        Ok((key, credential))
    }

    /// API keys (revoked ones included), of one tenant or of all.
    pub async fn list_api_keys(&self, tenant_id: Option<&str>) -> Result<Vec<ApiKey>, StoreError> {
        const COLUMNS: &str = "id, tenant_id, device_id, scope, label, created_at, expires_at, last_used_at, revoked_at";
        let rows = match tenant_id {
            Some(tenant) => {
                let tenant = self.tenant(tenant).await?;
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM api_keys WHERE tenant_id = $1 ORDER BY created_at"
                ))
                .bind(tenant.id)
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM api_keys ORDER BY created_at"
                ))
                .fetch_all(self.pool())
                .await?
            }
        };
        rows.iter().map(api_key_from_row).collect()
    }

    /// Revokes an API key. Revoking a revoked key is a no-op that says so.
    pub async fn revoke_api_key(&self, id: &str) -> Result<bool, StoreError> {
        let result =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(self.now())
                .bind(id)
                .execute(self.pool())
                .await?;
        if result.rows_affected() == 1 {
            return Ok(true);
        }
        let exists = sqlx::query("SELECT id FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        match exists {
            Some(_) => Ok(false),
            None => Err(StoreError::not_found("API key", id)),
        }
    }

    /// Issues the first agent credential of a device. A device has at most
    /// one live credential: use [`Store::rotate_agent_credential`] after that.
    pub async fn issue_agent_credential(
        &self,
        device_id: &str,
    ) -> Result<(AgentCredential, IssuedCredential), StoreError> {
        self.replace_agent_credential(device_id, false).await
    }

    /// Issues a new agent credential and revokes the old one, atomically.
    pub async fn rotate_agent_credential(
        &self,
        device_id: &str,
    ) -> Result<(AgentCredential, IssuedCredential), StoreError> {
        self.replace_agent_credential(device_id, true).await
    }

    async fn replace_agent_credential(
        &self,
        device_id: &str,
        revoke_current: bool,
    ) -> Result<(AgentCredential, IssuedCredential), StoreError> {
        let device = self.device(device_id).await?;
        if device.deleted_at.is_some() {
            return Err(StoreError::not_found("device", device_id));
        }
        let now = self.now();
        let credential = IssuedCredential::generate(CredentialKind::AgentCredential)?;
        let mut transaction = self.pool().begin().await?;
        if revoke_current {
            revoke_for_device(&mut transaction, "agent_credentials", device_id, now).await?;
        }
        sqlx::query(
            "INSERT INTO agent_credentials (id, device_id, secret_digest, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&credential.id)
        .bind(device_id)
        .bind(credential.digest())
        .bind(now)
        .execute(&mut *transaction)
        .await
        .map_err(|error| {
            StoreError::conflict_or(error, format!("device {device_id} has an agent credential; rotate it instead"))
        })?;
        transaction.commit().await?;
        let info = AgentCredential {
            id: credential.id.clone(),
            device_id: device_id.to_owned(),
            created_at: now,
            revoked_at: None,
        };
        Ok((info, credential))
    }

    /// Checks an agent's credential; on success returns its device id.
    pub async fn verify_agent_credential(
        &self,
        token: &str,
    ) -> Result<Result<String, AgentAuthFailure>, StoreError> {
        let Ok(presented) = PresentedCredential::parse(CredentialKind::AgentCredential, token)
        else {
            return Ok(Err(AgentAuthFailure::Malformed));
        };
        let row = sqlx::query(
            "SELECT c.device_id, c.secret_digest, c.revoked_at, d.deleted_at
             FROM agent_credentials c JOIN devices d ON d.id = c.device_id WHERE c.id = $1",
        )
        .bind(presented.id)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            return Ok(Err(AgentAuthFailure::Unknown));
        };
        if !presented.matches_digest(&row.try_get::<String, _>("secret_digest")?) {
            return Ok(Err(AgentAuthFailure::WrongSecret));
        }
        if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
            return Ok(Err(AgentAuthFailure::Revoked));
        }
        if row.try_get::<Option<i64>, _>("deleted_at")?.is_some() {
            return Ok(Err(AgentAuthFailure::DeviceDeleted));
        }
        Ok(Ok(row.try_get("device_id")?))
    }

    /// The key `key_id` and, in the same round trip, the tenant of the live
    /// device `device_id`.
    pub(crate) async fn key_check(
        &self,
        key_id: &str,
        device_id: &str,
    ) -> Result<Option<KeyCheck>, StoreError> {
        let row = sqlx::query(
            "SELECT k.tenant_id, k.device_id, k.scope, k.secret_digest, k.expires_at, k.revoked_at,
                    d.tenant_id AS target_tenant
             FROM api_keys k LEFT JOIN devices d ON d.id = $2 AND d.deleted_at IS NULL
             WHERE k.id = $1",
        )
        .bind(key_id)
        .bind(device_id)
        .fetch_optional(self.pool())
        .await?;
        row.map(|row| {
            Ok(KeyCheck {
                tenant_id: row.try_get("tenant_id")?,
                device_id: row.try_get("device_id")?,
                scope: scope_from_row(&row)?,
                secret_digest: row.try_get("secret_digest")?,
                expires_at: row.try_get("expires_at")?,
                revoked_at: row.try_get("revoked_at")?,
                target_device_tenant: row.try_get("target_tenant")?,
            })
        })
        .transpose()
    }

    /// The tenant of a live device.
    pub(crate) async fn live_device_tenant(
        &self,
        device_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT tenant_id FROM devices WHERE id = $1 AND deleted_at IS NULL")
            .bind(device_id)
            .fetch_optional(self.pool())
            .await?;
        row.map(|row| row.try_get("tenant_id").map_err(StoreError::from))
            .transpose()
    }

    /// Records when keys were last used (batched by the authenticator).
    pub(crate) async fn record_last_used(
        &self,
        uses: &[(String, Millis)],
    ) -> Result<(), StoreError> {
        for (key_id, at) in uses {
            sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $1)")
                .bind(*at)
                .bind(key_id)
                .execute(self.pool())
                .await?;
        }
        Ok(())
    }
}

/// Revokes the live rows of `table` (agent credentials or API keys) that
/// belong to a device.
async fn revoke_for_device(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    table: &'static str,
    device_id: &str,
    now: Millis,
) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "UPDATE {table} SET revoked_at = $1 WHERE device_id = $2 AND revoked_at IS NULL"
    ))
    .bind(now)
    .bind(device_id)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

fn checked_name<'a>(what: &str, name: &'a str) -> Result<&'a str, StoreError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(StoreError::InvalidInput(format!("{what} is empty")));
    }
    if name.len() > NAME_MAX_LEN {
        return Err(StoreError::InvalidInput(format!(
            "{what} is longer than {NAME_MAX_LEN} bytes"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(StoreError::InvalidInput(format!(
            "{what} contains control characters"
        )));
    }
    Ok(name)
}

fn tenant_from_row(row: &AnyRow) -> Result<Tenant, StoreError> {
    Ok(Tenant {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
    })
}

fn device_from_row(row: &AnyRow) -> Result<Device, StoreError> {
    Ok(Device {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
        deleted_at: row.try_get("deleted_at")?,
    })
}

fn scope_from_row(row: &AnyRow) -> Result<Scope, StoreError> {
    let scope: String = row.try_get("scope")?;
    Scope::parse(&scope).ok_or(StoreError::Corrupt("unknown scope in api_keys"))
}

fn api_key_from_row(row: &AnyRow) -> Result<ApiKey, StoreError> {
    Ok(ApiKey {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        device_id: row.try_get("device_id")?,
        scope: scope_from_row(row)?,
        label: row.try_get("label")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        last_used_at: row.try_get("last_used_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}
