//! Applies the SQL files of `migrations/`, compiled in, in order: the shared
//! ones everywhere, those under `migrations/postgres/` on Postgres only.

use sqlx::{AnyConnection, Connection, Row};

use crate::credential::sha256_hex;
use crate::{Backend, StoreError};

/// One migration file, and the backends it is for.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
    backends: &'static [Backend],
}

const BOTH: &[Backend] = &[Backend::Postgres, Backend::Sqlite];

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_initial",
        sql: include_str!("../../../migrations/0001_initial.sql"),
        backends: BOTH,
    },
    Migration {
        version: 2,
        name: "0002_revocation_notify",
        sql: include_str!("../../../migrations/postgres/0002_revocation_notify.sql"),
        backends: &[Backend::Postgres],
    },
    Migration {
        version: 3,
        name: "0003_instance_registry",
        sql: include_str!("../../../migrations/0003_instance_registry.sql"),
        backends: BOTH,
    },
    Migration {
        version: 4,
        name: "0004_tunnel_notify",
        sql: include_str!("../../../migrations/postgres/0004_tunnel_notify.sql"),
        backends: &[Backend::Postgres],
    },
    Migration {
        version: 5,
        name: "0005_recent_claims",
        sql: include_str!("../../../migrations/0005_recent_claims.sql"),
        backends: BOTH,
    },
    Migration {
        version: 6,
        name: "0006_printer_status",
        sql: include_str!("../../../migrations/0006_printer_status.sql"),
        backends: BOTH,
    },
    Migration {
        version: 7,
        name: "0007_tenant_admin",
        sql: include_str!("../../../migrations/0007_tenant_admin.sql"),
        backends: BOTH,
    },
    Migration {
        version: 8,
        name: "0008_pairings",
        sql: include_str!("../../../migrations/0008_pairings.sql"),
        backends: BOTH,
    },
    Migration {
        version: 9,
        name: "0009_oauth_apps",
        sql: include_str!("../../../migrations/0009_oauth_apps.sql"),
        backends: BOTH,
    },
];

/// Any constant will do; it only has to be the same in every process.
const POSTGRES_MIGRATION_LOCK: i64 = 0x7265_6c61_7901;

/// Applies every migration not applied yet, in one transaction, and returns
/// the names it applied. Concurrent runs on Postgres (several edge pods
/// starting at once) serialise on an advisory lock.
pub(crate) async fn run(
    connection: &mut AnyConnection,
    backend: Backend,
    now: i64,
) -> Result<Vec<&'static str>, StoreError> {
    let migrations: Vec<&Migration> = MIGRATIONS
        .iter()
        .filter(|m| m.backends.contains(&backend))
        .collect();
    let mut transaction = connection.begin().await?;
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(POSTGRES_MIGRATION_LOCK)
            .execute(&mut *transaction)
            .await?;
    }
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS relay_migrations (
            version BIGINT PRIMARY KEY,
            name TEXT NOT NULL,
            checksum TEXT NOT NULL,
            applied_at BIGINT NOT NULL
        )",
    )
    .execute(&mut *transaction)
    .await?;
    let applied = sqlx::query("SELECT version, name, checksum FROM relay_migrations")
        .fetch_all(&mut *transaction)
        .await?;
    // A database migrated by a newer relay has versions this one lacks.
    let known_versions: Vec<i64> = migrations.iter().map(|m| m.version).collect();
    for row in &applied {
        let version: i64 = row.try_get("version")?;
        if !known_versions.contains(&version) {
            return Err(StoreError::UnknownMigration {
                name: row.try_get("name")?,
            });
        }
    }
    let mut newly_applied = Vec::new();
    for migration in &migrations {
        let checksum = sha256_hex(migration.sql.as_bytes());
        let already = applied
            .iter()
            .find(|row| row.try_get::<i64, _>("version").ok() == Some(migration.version));
        if let Some(row) = already {
            if row.try_get::<String, _>("checksum")? != checksum {
                return Err(StoreError::MigrationChanged {
                    name: migration.name.to_owned(),
                });
            }
            continue;
        }
        sqlx::raw_sql(migration.sql)
            .execute(&mut *transaction)
            .await?;
        sqlx::query("INSERT INTO relay_migrations (version, name, checksum, applied_at) VALUES ($1, $2, $3, $4)")
            .bind(migration.version)
            .bind(migration.name)
            .bind(checksum)
            .bind(now)
            .execute(&mut *transaction)
            .await?;
        newly_applied.push(migration.name);
    }
    transaction.commit().await?;
    Ok(newly_applied)
}
