//! Runs each test body once on a fresh Postgres database and once on a fresh
//! SQLite file.

/// `both_backends!(name, ...)` makes, for each `async fn name(store: &Store)`
/// in scope, a `postgres::name` and a `sqlite::name` test.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let database = relay_store::testing::TestDatabase::new(relay_store::Backend::Postgres).await;
                    super::$name(&database).await;
                    database.cleanup().await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let database = relay_store::testing::TestDatabase::new(relay_store::Backend::Sqlite).await;
                    super::$name(&database).await;
                    database.cleanup().await;
                }
            )*
        }
    };
}
