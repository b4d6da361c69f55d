//! Revocations as a stream of events, so that the edge can close the live
//! sessions of a revoked key, credential or deleted device.
//!
//! Two sources feed it. On Postgres, triggers announce every revocation with
//! `NOTIFY relay_revocations` and a LISTEN connection delivers them at once.
//! Notifications sent while that connection is down are lost for good, so
//! the watcher also queries for recent revocations: at a fixed period, and
//! at once whenever the LISTEN connection was lost. On SQLite (one node, but
//! possibly changed by `relayctl` in another process) the periodic query is
//! the only source. An event may arrive twice; acting on it must be
//! idempotent.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::StoreError;
use crate::clock::Millis;
use crate::store::{Backend, Store};

/// The channel the Postgres triggers notify on.
pub const CHANNEL: &str = "relay_revocations";

/// How far back each periodic query looks, beyond its last run: covers clock
/// skew between whoever revoked and this process.
const LOOKBACK: Millis = 60_000;

/// What was revoked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Revoked {
    ApiKey(String),
    AgentCredential(String),
    /// A deleted device: every session on it ends.
    Device(String),
}

impl Revoked {
    fn from_parts(kind: &str, id: &str) -> Option<Revoked> {
        let id = id.to_owned();
        match kind {
            "api_key" => Some(Revoked::ApiKey(id)),
            "agent_credential" => Some(Revoked::AgentCredential(id)),
            "device" => Some(Revoked::Device(id)),
            _ => None,
        }
    }

    /// Parses a notification payload, `<kind>:<id>`.
    fn from_payload(payload: &str) -> Option<Revoked> {
        let (kind, id) = payload.split_once(':')?;
        Revoked::from_parts(kind, id)
    }
}

/// One event of the stream.
pub type RevocationEvent = Revoked;

enum ListenerSignal {
    Notified(Revoked),
    ConnectionLost,
}

/// Aborts the LISTEN task when the watcher goes away.
struct ListenerTask(JoinHandle<()>);

impl Drop for ListenerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Pull revocation events with [`RevocationWatcher::next`].
pub struct RevocationWatcher {
    store: Store,
    poll: tokio::time::Interval,
    /// Revocations at or after this time are looked for by the next query.
    watermark: Millis,
    /// Recently delivered events and when they happened, to drop repeats.
    delivered: HashMap<Revoked, Millis>,
    pending: VecDeque<Revoked>,
    signals: Option<mpsc::Receiver<ListenerSignal>>,
    _listener: Option<ListenerTask>,
}

impl std::fmt::Debug for RevocationWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationWatcher")
            .field("watermark", &self.watermark)
            .field("listening", &self.signals.is_some())
            .finish_non_exhaustive()
    }
}

impl RevocationWatcher {
    /// Starts watching: on Postgres, LISTEN is in place when this returns,
    /// so nothing revoked afterwards is missed.
    pub async fn start(
        store: Store,
        poll_every: Duration,
    ) -> Result<RevocationWatcher, StoreError> {
        let (signals, listener) = match store.backend() {
            Backend::Postgres => {
                let mut listener = PgListener::connect(store.database_url()).await?;
                listener.listen(CHANNEL).await?;
                let (sender, receiver) = mpsc::channel(256);
                let task = tokio::spawn(forward_notifications(listener, sender));
                (Some(receiver), Some(ListenerTask(task)))
            }
            Backend::Sqlite => (None, None),
        };
        let mut poll = tokio::time::interval(poll_every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick completes at once; the watermark already covers it.
        poll.reset();
        let watermark = store.now() - LOOKBACK;
        Ok(RevocationWatcher {
            store,
            poll,
            watermark,
            delivered: HashMap::new(),
            pending: VecDeque::new(),
            signals,
            _listener: listener,
        })
    }

    /// The next revocation. Cancel-safe: an event is never lost by dropping
    /// this future.
    pub async fn next(&mut self) -> Result<Revoked, StoreError> {
        loop {
            if let Some(revoked) = self.pending.pop_front() {
                return Ok(revoked);
            }
            let signal = match self.signals.as_mut() {
                Some(signals) => tokio::select! {
                    signal = signals.recv() => signal,
                    _ = self.poll.tick() => None,
                },
                None => {
                    self.poll.tick().await;
                    None
                }
            };
            match signal {
                Some(ListenerSignal::Notified(revoked)) => {
                    let now = self.store.now();
                    self.deliver(revoked, now);
                }
                // Lost notifications are never replayed: look them up.
                Some(ListenerSignal::ConnectionLost) | None => self.catch_up().await?,
            }
        }
    }

    fn deliver(&mut self, revoked: Revoked, at: Millis) {
        if self.delivered.insert(revoked.clone(), at).is_none() {
            self.pending.push_back(revoked);
        }
    }

    /// Queries for revocations since the watermark.
    async fn catch_up(&mut self) -> Result<(), StoreError> {
        let started = self.store.now();
        let rows = sqlx::query(
            "SELECT 'api_key' AS kind, id, revoked_at AS at FROM api_keys WHERE revoked_at >= $1
             UNION ALL
             SELECT 'agent_credential' AS kind, id, revoked_at AS at FROM agent_credentials WHERE revoked_at >= $1
             UNION ALL
             SELECT 'device' AS kind, id, deleted_at AS at FROM devices WHERE deleted_at >= $1",
        )
        .bind(self.watermark)
        .fetch_all(self.store.pool())
        .await?;
        for row in rows {
            let kind: String = row.try_get("kind")?;
            let id: String = row.try_get("id")?;
            let at: i64 = row.try_get("at")?;
            if let Some(revoked) = Revoked::from_parts(&kind, &id) {
                self.deliver(revoked, at);
            }
        }
        self.watermark = started - LOOKBACK;
        let watermark = self.watermark;
        self.delivered.retain(|_, at| *at >= watermark - LOOKBACK);
        Ok(())
    }
}

/// Runs the LISTEN connection: forwards notifications, and says when the
/// connection was lost (the listener reconnects on its next receive).
async fn forward_notifications(mut listener: PgListener, sender: mpsc::Sender<ListenerSignal>) {
    let mut failures: u32 = 0;
    loop {
        let signal = match listener.try_recv().await {
            Ok(Some(notification)) => {
                failures = 0;
                match Revoked::from_payload(notification.payload()) {
                    Some(revoked) => ListenerSignal::Notified(revoked),
                    None => {
                        tracing::warn!(
                            payload = notification.payload(),
                            "unknown revocation notification"
                        );
                        continue;
                    }
                }
            }
            Ok(None) => ListenerSignal::ConnectionLost,
            Err(error) => {
                // The database is down: back off (not a synchronisation) and
                // let the periodic query cover the gap once it is back.
                failures = failures.saturating_add(1);
                tracing::warn!(%error, "revocation LISTEN connection failed");
                tokio::time::sleep(Duration::from_millis(200) * failures.min(25)).await;
                ListenerSignal::ConnectionLost
            }
        };
        if sender.send(signal).await.is_err() {
            return;
        }
    }
}
