//! A tenant's own administration: one-use login links, the console
//! sessions they open, API tokens for the
//! tenant's tooling, the audit log, and the tenant-scoped operations the
//! tenant API needs (a device, a key, a credential only if it is the
//! caller's tenant's: another tenant's id is "not found", as an unknown one).
//!
//! Login link, session and token secrets use the credential format
//! (`rll_…`, `rls_…`, `rlt_…`); only their digests are stored. None of them
//! is valid for MQTT: the authenticator takes `rly_…` keys and JWTs only.

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::clock::Millis;
use crate::credential::{CredentialKind, IssuedCredential, PresentedCredential, random_base32};
use crate::{Device, Store, StoreError};

/// How long a login link may live, at most.
pub const LOGIN_LINK_MAX_MILLIS: Millis = 15 * 60 * 1000;

/// How long a console session lives.
pub const SESSION_MILLIS: Millis = 12 * 60 * 60 * 1000;

/// Who is calling the tenant API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminCaller {
    pub tenant_id: String,
    /// For the audit log: `session:<id>` or `token:<id>`, never a secret.
    pub actor: String,
}

/// A session a login link opened: its cookie value, shown once.
#[derive(Debug)]
pub struct OpenedSession {
    pub tenant_id: String,
    pub credential: IssuedCredential,
    pub expires_at: Millis,
}

/// Why a tenant API credential was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAuthFailure {
    Malformed,
    Unknown,
    WrongSecret,
    Expired,
    Used,
    Revoked,
}

/// A tenant's API token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminToken {
    pub id: String,
    pub tenant_id: String,
    pub label: String,
    pub created_at: Millis,
    pub last_used_at: Option<Millis>,
    pub revoked_at: Option<Millis>,
}

/// One change, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub id: String,
    pub at: Millis,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub address: String,
    pub detail: String,
}

/// A change to record (the tenant and the time are added).
#[derive(Debug, Clone)]
pub struct AuditRecord<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub address: &'a str,
    pub detail: &'a str,
}

/// A device's agent credential, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentCredentialInfo {
    pub id: String,
    pub created_at: Millis,
}

impl Store {
    /// A login link's token for `tenant` (id or name), valid for `ttl`
    /// (at most 15 minutes) and once.
    pub async fn create_login_link(
        &self,
        tenant: &str,
        ttl: Millis,
    ) -> Result<(IssuedCredential, Millis), StoreError> {
        if ttl <= 0 || ttl > LOGIN_LINK_MAX_MILLIS {
            return Err(StoreError::InvalidInput(
                "a login link lives between 1 ms and 15 minutes".into(),
            ));
        }
        let tenant = self.tenant(tenant).await?;
        let credential = IssuedCredential::generate(CredentialKind::LoginLink)?;
        let now = self.now();
        let expires_at = now + ttl;
        sqlx::query(
            "INSERT INTO login_links (id, tenant_id, secret_digest, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&credential.id)
        .bind(&tenant.id)
        .bind(credential.digest())
        .bind(now)
        .bind(expires_at)
        .execute(self.pool())
        .await?;
        Ok((credential, expires_at))
    }

    /// Redeems a login link (once) for a new console session.
    pub async fn redeem_login_link(
        &self,
        token: &str,
    ) -> Result<Result<OpenedSession, AdminAuthFailure>, StoreError> {
        let Ok(presented) = PresentedCredential::parse(CredentialKind::LoginLink, token) else {
            return Ok(Err(AdminAuthFailure::Malformed));
        };
        let now = self.now();
        let row = sqlx::query(
            "SELECT tenant_id, secret_digest, expires_at, used_at FROM login_links WHERE id = $1",
        )
        .bind(presented.id)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            return Ok(Err(AdminAuthFailure::Unknown));
        };
        if !presented.matches_digest(&row.try_get::<String, _>("secret_digest")?) {
            return Ok(Err(AdminAuthFailure::WrongSecret));
        }
        if row.try_get::<Option<i64>, _>("used_at")?.is_some() {
            return Ok(Err(AdminAuthFailure::Used));
        }
        if row.try_get::<i64, _>("expires_at")? <= now {
            return Ok(Err(AdminAuthFailure::Expired));
        }
        let tenant_id: String = row.try_get("tenant_id")?;
        // Used once: the first to set used_at wins.
        let used =
            sqlx::query("UPDATE login_links SET used_at = $1 WHERE id = $2 AND used_at IS NULL")
                .bind(now)
                .bind(presented.id)
                .execute(self.pool())
                .await?;
        if used.rows_affected() != 1 {
            return Ok(Err(AdminAuthFailure::Used));
        }
        Ok(Ok(self.open_admin_session(&tenant_id).await?))
    }

    /// Opens a console session for a tenant whose admin proved who they
    /// are (a login link, or the operator's identity provider).
    pub async fn open_admin_session(&self, tenant_id: &str) -> Result<OpenedSession, StoreError> {
        let now = self.now();
        let credential = IssuedCredential::generate(CredentialKind::AdminSession)?;
        let expires_at = now + SESSION_MILLIS;
        sqlx::query(
            "INSERT INTO admin_sessions (id, tenant_id, secret_digest, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&credential.id)
        .bind(tenant_id)
        .bind(credential.digest())
        .bind(now)
        .bind(expires_at)
        .execute(self.pool())
        .await?;
        Ok(OpenedSession {
            tenant_id: tenant_id.to_owned(),
            credential,
            expires_at,
        })
    }

    /// The caller behind a console session's cookie value.
    pub async fn verify_admin_session(
        &self,
        token: &str,
    ) -> Result<Result<AdminCaller, AdminAuthFailure>, StoreError> {
        let Ok(presented) = PresentedCredential::parse(CredentialKind::AdminSession, token) else {
            return Ok(Err(AdminAuthFailure::Malformed));
        };
        let row = sqlx::query(
            "SELECT tenant_id, secret_digest, expires_at, revoked_at
             FROM admin_sessions WHERE id = $1",
        )
        .bind(presented.id)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            return Ok(Err(AdminAuthFailure::Unknown));
        };
        if !presented.matches_digest(&row.try_get::<String, _>("secret_digest")?) {
            return Ok(Err(AdminAuthFailure::WrongSecret));
        }
        if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
            return Ok(Err(AdminAuthFailure::Revoked));
        }
        if row.try_get::<i64, _>("expires_at")? <= self.now() {
            return Ok(Err(AdminAuthFailure::Expired));
        }
        Ok(Ok(AdminCaller {
            tenant_id: row.try_get("tenant_id")?,
            actor: format!("session:{}", presented.id),
        }))
    }

    /// Ends a console session (sign out).
    pub async fn revoke_admin_session(&self, token: &str) -> Result<(), StoreError> {
        if let Ok(presented) = PresentedCredential::parse(CredentialKind::AdminSession, token) {
            sqlx::query(
                "UPDATE admin_sessions SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
            )
            .bind(self.now())
            .bind(presented.id)
            .execute(self.pool())
            .await?;
        }
        Ok(())
    }

    /// A new API token for `tenant`'s administration; the credential is
    /// the only copy of its secret.
    pub async fn create_admin_token(
        &self,
        tenant: &str,
        label: &str,
    ) -> Result<(AdminToken, IssuedCredential), StoreError> {
        let label = checked_label(label)?;
        let tenant = self.tenant(tenant).await?;
        let credential = IssuedCredential::generate(CredentialKind::AdminToken)?;
        let token = AdminToken {
            id: credential.id.clone(),
            tenant_id: tenant.id,
            label: label.to_owned(),
            created_at: self.now(),
            last_used_at: None,
            revoked_at: None,
        };
        sqlx::query(
            "INSERT INTO admin_tokens (id, tenant_id, label, secret_digest, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&token.id)
        .bind(&token.tenant_id)
        .bind(&token.label)
        .bind(credential.digest())
        .bind(token.created_at)
        .execute(self.pool())
        .await?;
        Ok((token, credential))
    }

    /// The tenant's API tokens, revoked ones included (never a secret).
    pub async fn list_admin_tokens(&self, tenant_id: &str) -> Result<Vec<AdminToken>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, label, created_at, last_used_at, revoked_at FROM admin_tokens
             WHERE tenant_id = $1 ORDER BY created_at",
        )
        .bind(tenant_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AdminToken {
                    id: row.try_get("id")?,
                    tenant_id: row.try_get("tenant_id")?,
                    label: row.try_get("label")?,
                    created_at: row.try_get("created_at")?,
                    last_used_at: row.try_get("last_used_at")?,
                    revoked_at: row.try_get("revoked_at")?,
                })
            })
            .collect()
    }

    /// Revokes one of the tenant's API tokens; another tenant's id, or an
    /// unknown one, is not found. Revoking twice is no error.
    pub async fn revoke_admin_token(&self, tenant_id: &str, id: &str) -> Result<(), StoreError> {
        let found =
            sqlx::query("SELECT revoked_at FROM admin_tokens WHERE id = $1 AND tenant_id = $2")
                .bind(id)
                .bind(tenant_id)
                .fetch_optional(self.pool())
                .await?;
        if found.is_none() {
            return Err(StoreError::not_found("API token", id));
        }
        sqlx::query("UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(self.now())
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The caller behind an API token (`rlt_…`).
    pub async fn verify_admin_token(
        &self,
        token: &str,
    ) -> Result<Result<AdminCaller, AdminAuthFailure>, StoreError> {
        let Ok(presented) = PresentedCredential::parse(CredentialKind::AdminToken, token) else {
            return Ok(Err(AdminAuthFailure::Malformed));
        };
        let row = sqlx::query(
            "SELECT tenant_id, secret_digest, revoked_at FROM admin_tokens WHERE id = $1",
        )
        .bind(presented.id)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            return Ok(Err(AdminAuthFailure::Unknown));
        };
        if !presented.matches_digest(&row.try_get::<String, _>("secret_digest")?) {
            return Ok(Err(AdminAuthFailure::WrongSecret));
        }
        if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
            return Ok(Err(AdminAuthFailure::Revoked));
        }
        sqlx::query("UPDATE admin_tokens SET last_used_at = $1 WHERE id = $2")
            .bind(self.now())
            .bind(presented.id)
            .execute(self.pool())
            .await?;
        Ok(Ok(AdminCaller {
            tenant_id: row.try_get("tenant_id")?,
            actor: format!("token:{}", presented.id),
        }))
    }

    /// Records one change in `tenant_id`'s audit log.
    pub async fn record_audit(
        &self,
        tenant_id: &str,
        record: AuditRecord<'_>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_log (id, tenant_id, at, actor, action, target, address, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(random_base32(16)?)
        .bind(tenant_id)
        .bind(self.now())
        .bind(record.actor)
        .bind(record.action)
        .bind(record.target)
        .bind(record.address)
        .bind(record.detail)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The newest `limit` entries of `tenant_id`'s audit log, newest first.
    pub async fn audit_log(
        &self,
        tenant_id: &str,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, address, detail FROM audit_log
             WHERE tenant_id = $1 ORDER BY at DESC, id DESC LIMIT $2",
        )
        .bind(tenant_id)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// The live device `device_id` of `tenant_id`: another tenant's, a
    /// deleted or an unknown one is "not found" alike.
    pub async fn tenant_device(
        &self,
        tenant_id: &str,
        device_id: &str,
    ) -> Result<Device, StoreError> {
        match self.device(device_id).await {
            Ok(device) if device.tenant_id == tenant_id && device.deleted_at.is_none() => {
                Ok(device)
            }
            Ok(_) | Err(StoreError::NotFound { .. }) => {
                Err(StoreError::not_found("device", device_id))
            }
            Err(other) => Err(other),
        }
    }

    /// Renames a live device of `tenant_id`.
    pub async fn rename_device(
        &self,
        tenant_id: &str,
        device_id: &str,
        name: &str,
    ) -> Result<Device, StoreError> {
        let mut device = self.tenant_device(tenant_id, device_id).await?;
        let name = name.trim();
        if name.is_empty() || name.len() > 128 {
            return Err(StoreError::InvalidInput(
                "device name must be 1 to 128 bytes".into(),
            ));
        }
        sqlx::query("UPDATE devices SET name = $1 WHERE id = $2 AND deleted_at IS NULL")
            .bind(name)
            .bind(device_id)
            .execute(self.pool())
            .await
            .map_err(|error| {
                StoreError::conflict_or(error, format!("a device is already named {name:?}"))
            })?;
        device.name = name.to_owned();
        Ok(device)
    }

    /// Revokes `tenant_id`'s API key `key_id`; another tenant's is "not
    /// found". Returns whether it was live.
    pub async fn revoke_tenant_api_key(
        &self,
        tenant_id: &str,
        key_id: &str,
    ) -> Result<bool, StoreError> {
        let owner = sqlx::query("SELECT tenant_id FROM api_keys WHERE id = $1")
            .bind(key_id)
            .fetch_optional(self.pool())
            .await?;
        match owner {
            Some(row) if row.try_get::<String, _>("tenant_id")? == tenant_id => {
                self.revoke_api_key(key_id).await
            }
            _ => Err(StoreError::not_found("API key", key_id)),
        }
    }

    /// The live agent credential of a device, if it has one.
    pub async fn agent_credential_of(
        &self,
        device_id: &str,
    ) -> Result<Option<AgentCredentialInfo>, StoreError> {
        let row = sqlx::query(
            "SELECT id, created_at FROM agent_credentials WHERE device_id = $1 AND revoked_at IS NULL",
        )
        .bind(device_id)
        .fetch_optional(self.pool())
        .await?;
        row.map(|row| {
            Ok(AgentCredentialInfo {
                id: row.try_get("id")?,
                created_at: row.try_get("created_at")?,
            })
        })
        .transpose()
    }

    /// Revokes a device's live agent credential; whether there was one.
    pub async fn revoke_agent_credential(&self, device_id: &str) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE agent_credentials SET revoked_at = $1 WHERE device_id = $2 AND revoked_at IS NULL",
        )
        .bind(self.now())
        .bind(device_id)
        .execute(self.pool())
        .await?;
        Ok(result.rows_affected() > 0)
    }
}

fn checked_label(label: &str) -> Result<&str, StoreError> {
    let label = label.trim();
    if label.len() > 128 {
        return Err(StoreError::InvalidInput(
            "label is longer than 128 bytes".into(),
        ));
    }
    Ok(label)
}

fn audit_from_row(row: &AnyRow) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        id: row.try_get("id")?,
        at: row.try_get("at")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        address: row.try_get("address")?,
        detail: row.try_get("detail")?,
    })
}
