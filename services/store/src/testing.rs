//! Fresh databases for tests and benchmarks (feature `testing`): a new
//! Postgres database per test on the machine's server, or a new SQLite file.
//!
//! The Postgres server is found at `RELAY_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); each test gets a database
//! `relay_test_<seconds>_<random>` and drops it in [`TestDatabase::cleanup`].
//! Databases left behind by a failed run are dropped by later runs after an
//! hour.

#![allow(clippy::expect_used)]

use std::path::PathBuf;

use sqlx::{Connection, PgConnection, Row};

use crate::credential::random_base32;
use crate::{Backend, Store};

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const PREFIX: &str = "relay_test_";

/// A migrated store on a database of its own.
#[derive(Debug)]
pub struct TestDatabase {
    pub store: Store,
    pub url: String,
    place: Place,
}

#[derive(Debug)]
enum Place {
    Postgres { admin_url: String, name: String },
    Sqlite { path: PathBuf },
}

fn admin_url() -> String {
    std::env::var("RELAY_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TestDatabase {
    pub async fn new(backend: Backend) -> TestDatabase {
        match backend {
            Backend::Postgres => Self::postgres().await,
            Backend::Sqlite => Self::sqlite().await,
        }
    }

    /// A new, empty database on an existing server, not yet migrated.
    pub async fn postgres_unmigrated() -> TestDatabase {
        let admin_url = admin_url();
        let mut admin = PgConnection::connect(&admin_url).await.expect(
            "Postgres for tests (scripts/services starts it; RELAY_TEST_DATABASE_URL names it)",
        );
        drop_stale(&mut admin).await;
        let name = format!(
            "{PREFIX}{}_{}",
            unix_seconds(),
            random_base32(8).expect("random")
        );
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        admin.close().await.ok();
        let url = match admin_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("RELAY_TEST_DATABASE_URL must name a database"),
        };
        let store = Store::connect(&url)
            .await
            .expect("connect to test database");
        TestDatabase {
            store,
            url,
            place: Place::Postgres { admin_url, name },
        }
    }

    pub async fn postgres() -> TestDatabase {
        let database = Self::postgres_unmigrated().await;
        database.store.migrate().await.expect("migrate");
        database
    }

    pub async fn sqlite() -> TestDatabase {
        let path =
            std::env::temp_dir().join(format!("{PREFIX}{}.db", random_base32(12).expect("random")));
        let url = format!("sqlite:{}", path.display());
        let store = Store::connect(&url).await.expect("create SQLite database");
        store.migrate().await.expect("migrate");
        TestDatabase {
            store,
            url,
            place: Place::Sqlite { path },
        }
    }

    /// Runs one SQL statement on the test database, as an operator would
    /// by hand (tests of what the store's own operations do not reach).
    pub async fn execute(&self, sql: &str) {
        sqlx::query(sql)
            .execute(self.store.pool())
            .await
            .expect("the test's SQL runs");
    }

    /// Closes the store and removes the database.
    pub async fn cleanup(self) {
        self.store.close().await;
        match self.place {
            Place::Postgres { admin_url, name } => {
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            }
            Place::Sqlite { path } => {
                for suffix in ["", "-wal", "-shm", "-journal"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
        }
    }
}

/// Drops test databases older than an hour (left by runs that panicked).
async fn drop_stale(admin: &mut PgConnection) {
    let Ok(rows) =
        sqlx::query("SELECT datname FROM pg_database WHERE datname LIKE 'relay\\_test\\_%'")
            .fetch_all(&mut *admin)
            .await
    else {
        return;
    };
    let cutoff = unix_seconds().saturating_sub(3600);
    for row in rows {
        let Ok(name) = row.try_get::<String, _>("datname") else {
            continue;
        };
        let created = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|seconds| seconds.parse::<u64>().ok());
        if created.is_some_and(|created| created < cutoff) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut *admin)
                .await;
        }
    }
}
