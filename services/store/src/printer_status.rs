//! Each device's printer connection as the edge last heard of it: the
//! agent's link reports (up, down and why) and the edge's own finding that
//! the printer went silent, with reconnects counted by cause. What an owner
//! or an operator reads to tell "the printer is silent" from "the printer
//! refuses the access code".

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::Row;

use crate::clock::Millis;
use crate::{Store, StoreError};

/// A device's printer connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrinterStatus {
    /// `idle`, `connecting`, `up`, `down`, or `silent`.
    pub state: String,
    /// Why it is down or silent (`credentials_refused`, `dropped`, …;
    /// the watchdog for `silent`).
    pub reason: Option<String>,
    /// A human-readable detail, free of secrets.
    pub detail: Option<String>,
    /// Since when the printer has been silent; cleared once it is up.
    pub silent_since: Option<Millis>,
    /// Reconnects by cause (a down report's reason, or `silent_<watchdog>`).
    pub reconnects: BTreeMap<String, u64>,
    pub updated_at: Millis,
}

/// Causes kept per device at most: a cause is one of a few names, so this
/// only bounds what a broken agent could make up.
const MAX_CAUSES: i64 = 32;

/// A cause as stored: letters, digits and `_`, at most 64.
fn cause_name(cause: &str) -> String {
    cause
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect()
}

impl Store {
    /// The printer status of `device_id`, if the edge ever heard of it.
    pub async fn printer_status(
        &self,
        device_id: &str,
    ) -> Result<Option<PrinterStatus>, StoreError> {
        let row = sqlx::query(
            "SELECT state, reason, detail, silent_since, updated_at
             FROM printer_status WHERE device_id = $1",
        )
        .bind(device_id)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let counts =
            sqlx::query("SELECT cause, count FROM printer_reconnects WHERE device_id = $1")
                .bind(device_id)
                .fetch_all(self.pool())
                .await?;
        let mut reconnects = BTreeMap::new();
        for count in &counts {
            let value: i64 = count.try_get("count")?;
            reconnects.insert(count.try_get("cause")?, u64::try_from(value).unwrap_or(0));
        }
        Ok(Some(PrinterStatus {
            state: row.try_get("state")?,
            reason: row.try_get("reason")?,
            detail: row.try_get("detail")?,
            silent_since: row.try_get("silent_since")?,
            reconnects,
            updated_at: row.try_get("updated_at")?,
        }))
    }

    /// Records what the agent reported of `device_id`'s printer link:
    /// `state` with, when down, its `reason`, which also counts as a
    /// reconnect by that cause. A silence stays the news until the link is
    /// `up` again, which ends it. Each write is one statement, so the
    /// agent's reports and the edge's silences never undo each other.
    pub async fn record_printer_link(
        &self,
        device_id: &str,
        state: &str,
        reason: Option<&str>,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO printer_status (device_id, state, reason, detail, silent_since, updated_at)
             VALUES ($1, $2, $3, $4, NULL, $5)
             ON CONFLICT (device_id) DO UPDATE SET
                 state = CASE WHEN printer_status.silent_since IS NOT NULL AND excluded.state <> 'up'
                     THEN printer_status.state ELSE excluded.state END,
                 reason = CASE WHEN printer_status.silent_since IS NOT NULL AND excluded.state <> 'up'
                     THEN printer_status.reason ELSE excluded.reason END,
                 detail = CASE WHEN printer_status.silent_since IS NOT NULL AND excluded.state <> 'up'
                     THEN printer_status.detail ELSE excluded.detail END,
                 silent_since = CASE WHEN excluded.state = 'up'
                     THEN NULL ELSE printer_status.silent_since END,
                 updated_at = excluded.updated_at",
        )
        .bind(device_id)
        .bind(state)
        .bind(reason)
        .bind(detail)
        .bind(self.now())
        .execute(self.pool())
        .await?;
        if state == "down"
            && let Some(reason) = reason
        {
            self.count_reconnect(device_id, &cause_name(reason)).await?;
        }
        Ok(())
    }

    /// Records that the edge found `device_id`'s printer silent (`watchdog`
    /// says which) and ended its connection.
    pub async fn record_printer_silent(
        &self,
        device_id: &str,
        watchdog: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        let now = self.now();
        sqlx::query(
            "INSERT INTO printer_status (device_id, state, reason, detail, silent_since, updated_at)
             VALUES ($1, 'silent', $2, $3, $4, $4)
             ON CONFLICT (device_id) DO UPDATE SET state = 'silent',
                 reason = excluded.reason, detail = excluded.detail,
                 silent_since = COALESCE(printer_status.silent_since, excluded.silent_since),
                 updated_at = excluded.updated_at",
        )
        .bind(device_id)
        .bind(watchdog)
        .bind(detail)
        .bind(now)
        .execute(self.pool())
        .await?;
        self.count_reconnect(device_id, &format!("silent_{}", cause_name(watchdog)))
            .await
    }

    async fn count_reconnect(&self, device_id: &str, cause: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO printer_reconnects (device_id, cause, count)
             SELECT $1, $2, 1
             WHERE EXISTS (SELECT 1 FROM printer_reconnects WHERE device_id = $1 AND cause = $2)
                OR (SELECT COUNT(*) FROM printer_reconnects WHERE device_id = $1) < $3
             ON CONFLICT (device_id, cause) DO UPDATE SET count = printer_reconnects.count + 1",
        )
        .bind(device_id)
        .bind(cause)
        .bind(MAX_CAUSES)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_plain_names() {
        assert_eq!(cause_name("silent_report"), "silent_report");
        assert_eq!(cause_name("a,b=c'; DROP"), "abcDROP");
        assert_eq!(cause_name(&"x".repeat(100)).len(), 64);
    }
}
