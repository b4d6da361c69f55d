//! The store's one error type.

/// Why a store operation failed. Messages never carry the database URL (it
/// may hold a password) nor any secret.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database URL must start with postgres://, postgresql:// or sqlite:")]
    InvalidDatabaseUrl,
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("migration {name} changed after it was applied; add a new migration instead")]
    MigrationChanged { name: String },
    #[error("database has migration {name}, which this version does not know; upgrade relay")]
    UnknownMigration { name: String },
    #[error("database holds an unexpected value: {0}")]
    Corrupt(&'static str),
    #[error("the system's random generator failed")]
    Randomness,
    #[error("database error: {0}")]
    Database(sqlx::Error),
}

impl StoreError {
    pub(crate) fn not_found(what: &'static str, id: &str) -> StoreError {
        StoreError::NotFound {
            what,
            id: id.to_owned(),
        }
    }

    /// A unique-constraint violation becomes `Conflict(message)`.
    pub(crate) fn conflict_or(error: sqlx::Error, message: String) -> StoreError {
        match &error {
            sqlx::Error::Database(database_error) if database_error.is_unique_violation() => {
                StoreError::Conflict(message)
            }
            _ => StoreError::from(error),
        }
    }

    /// Errors while connecting: the database is down, or refuses us.
    pub(crate) fn from_connect(error: sqlx::Error) -> StoreError {
        match error {
            sqlx::Error::Configuration(_) => StoreError::InvalidDatabaseUrl,
            other => StoreError::Unavailable(describe(&other)),
        }
    }

    /// Whether the database could not be reached (as opposed to refusing a
    /// request): callers retry later, and the edge answers "unavailable".
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> StoreError {
        match error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => StoreError::Unavailable(describe(&error)),
            other => StoreError::Database(other),
        }
    }
}

impl From<ring::error::Unspecified> for StoreError {
    fn from(_: ring::error::Unspecified) -> StoreError {
        StoreError::Randomness
    }
}

fn describe(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::PoolTimedOut => "timed out waiting for a connection".to_owned(),
        sqlx::Error::PoolClosed => "connection pool closed".to_owned(),
        sqlx::Error::Tls(_) => "TLS failure".to_owned(),
        sqlx::Error::Database(database) => database.message().to_owned(),
        _ => "connection failed".to_owned(),
    }
}
