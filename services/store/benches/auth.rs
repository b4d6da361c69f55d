//! Latency of request authentication: from the cache, and uncached against
//! Postgres on loopback (and the embedded SQLite store, for comparison).
//!
//! `cargo bench -p relay-store --bench auth` (needs the machine's Postgres,
//! as the tests do). Prints p50/p99/max per call.

// Benchmark code: a failed setup should stop it with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use relay_store::testing::TestDatabase;
use relay_store::{AuthConfig, Authenticator, Backend, NewApiKey, RequestCredentials, Scope};

async fn measure(auth: &Authenticator, device: &str, token: &str, calls: usize) -> Vec<Duration> {
    let request = RequestCredentials {
        authorization: None,
        query_token: Some(relay_store::Secret::new(token)),
    };
    // Warm-up: connections open, caches filled.
    for _ in 0..calls.min(200) {
        auth.authenticate(device, request)
            .await
            .expect("authenticates");
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let principal = auth.authenticate(device, request).await;
        samples.push(start.elapsed());
        assert!(principal.is_ok());
    }
    samples.sort();
    samples
}

fn report(name: &str, samples: &[Duration]) {
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "{name:<40} p50 {:>9.2?}  p99 {:>9.2?}  max {:>9.2?}  ({} calls)",
        at(0.50),
        at(0.99),
        at(1.0),
        samples.len()
    );
}

async fn bench(backend: Backend, calls_uncached: usize, calls_cached: usize) {
    let db = TestDatabase::new(backend).await;
    let tenant = db.store.create_tenant("bench").await.unwrap().id;
    let device = db.store.create_device(&tenant, "p1s").await.unwrap().id;
    let (_, credential) = db
        .store
        .create_api_key(NewApiKey {
            tenant_id: &tenant,
            device_id: None,
            scope: Scope::Control,
            label: "bench",
            expires_at: None,
        })
        .await
        .unwrap();
    let token = credential.reveal();
    let label = format!("{backend:?}").to_lowercase();

    let cached = Authenticator::new(db.store.clone(), None, AuthConfig::default());
    report(
        &format!("cached ({label})"),
        &measure(&cached, &device, &token, calls_cached).await,
    );

    let uncached = Authenticator::new(
        db.store.clone(),
        None,
        AuthConfig {
            success_ttl: Duration::ZERO,
            ..AuthConfig::default()
        },
    );
    report(
        &format!("uncached ({label}, one query per call)"),
        &measure(&uncached, &device, &token, calls_uncached).await,
    );
    db.cleanup().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --benches` runs this without --bench: keep that quick.
    let full = std::env::args().any(|arg| arg == "--bench");
    let (uncached, cached) = if full { (5_000, 200_000) } else { (20, 100) };
    bench(Backend::Postgres, uncached, cached).await;
    bench(Backend::Sqlite, uncached, cached).await;
}
