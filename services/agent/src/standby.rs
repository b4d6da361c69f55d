//! The always-on printer connection (`always_on = true`): the agent keeps a
//! logged-in printer connection while no client is there, pings it, remakes
//! it when the printer drops it, and hands it to the next session so the
//! first client does not wait for the printer's TLS handshake.
//!
//! A connection serves one session only: when that session ends, its
//! connection closes (with whatever it subscribed to) and the standby makes
//! a fresh one. The standby never holds a connection while a session is
//! running, so the agent uses one printer client slot, never two.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use relay_proto::mqtt::{self, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::PrinterConfig;
use crate::pacing::PrinterDialler;
use crate::printer::PrinterStream;
use relay_proto::tunnel::LinkDownReason;

/// A printer connection past CONNACK, with any bytes read after it.
pub type Connected = (Box<dyn PrinterStream>, BytesMut);

type Request = oneshot::Sender<Option<Connected>>;

/// Keeps the printer connection warm; stops when dropped.
pub struct Standby {
    requests: mpsc::Sender<Request>,
    sessions: watch::Sender<usize>,
    task: tokio::task::JoinHandle<()>,
}

/// A session's claim on the printer: while any lease lives, the standby
/// holds no connection of its own.
pub struct Lease {
    /// The warm connection, when there was one; otherwise the session
    /// connects itself.
    pub connection: Option<Connected>,
    sessions: watch::Sender<usize>,
}

impl std::fmt::Debug for Standby {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standby")
            .field("sessions", &*self.sessions.borrow())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("warm", &self.connection.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.sessions
            .send_modify(|count| *count = count.saturating_sub(1));
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Standby {
    pub fn start(printer: Arc<PrinterConfig>, dialler: Arc<PrinterDialler>) -> Standby {
        let (requests, queue) = mpsc::channel(16);
        let (sessions, active) = watch::channel(0usize);
        let task = tokio::spawn(keep_warm(printer, dialler, queue, active));
        Standby {
            requests,
            sessions,
            task,
        }
    }

    /// Claims the printer for one session; waits for a connection attempt
    /// in progress rather than racing it.
    pub async fn lease(&self) -> Lease {
        self.sessions.send_modify(|count| *count += 1);
        let (answer, answered) = oneshot::channel();
        let connection = if self.requests.send(answer).await.is_ok() {
            answered.await.ok().flatten()
        } else {
            None
        };
        Lease {
            connection,
            sessions: self.sessions.clone(),
        }
    }
}

async fn keep_warm(
    printer: Arc<PrinterConfig>,
    dialler: Arc<PrinterDialler>,
    mut requests: mpsc::Receiver<Request>,
    mut sessions: watch::Receiver<usize>,
) {
    const FIRST_RETRY: Duration = Duration::from_secs(1);
    const MAX_RETRY: Duration = Duration::from_secs(60);
    let mut retry = FIRST_RETRY;
    // The first outcome is logged, then only changes.
    let mut reported: Option<bool> = None;
    loop {
        // No connection of our own while a session has the printer.
        loop {
            tokio::select! {
                idle = sessions.wait_for(|count| *count == 0) => {
                    if idle.is_err() {
                        return;
                    }
                    break;
                }
                request = requests.recv() => match request {
                    Some(request) => {
                        let _ = request.send(None);
                    }
                    None => return,
                },
            }
        }
        let mut waiting: Vec<Request> = Vec::new();
        // In turn with the printer links (the dialler's pacing).
        let attempt = dialler.dial(&printer, Duration::MAX);
        let dialled_at = tokio::time::Instant::now();
        tokio::pin!(attempt);
        let outcome = loop {
            tokio::select! {
                outcome = &mut attempt => break outcome,
                request = requests.recv() => match request {
                    Some(request) => waiting.push(request),
                    None => return,
                },
            }
        };
        let connected = match outcome {
            Ok(connected) => {
                retry = FIRST_RETRY;
                if reported != Some(true) {
                    tracing::info!(host = %printer.host, port = printer.port(), "printer reachable: logged in, holding the connection (always on)");
                    reported = Some(true);
                }
                connected
            }
            Err(crate::pacing::DialError { failure, .. }) => {
                if reported != Some(false) {
                    tracing::warn!(reason = ?failure.reason, detail = %failure.detail, retry_in = ?retry, "printer not reachable (always on)");
                    reported = Some(false);
                }
                for request in waiting {
                    let _ = request.send(None);
                }
                let pause = tokio::time::sleep(retry);
                tokio::pin!(pause);
                retry = (retry * 2).min(MAX_RETRY);
                loop {
                    tokio::select! {
                        () = &mut pause => break,
                        request = requests.recv() => match request {
                            Some(request) => {
                                let _ = request.send(None);
                            }
                            None => return,
                        },
                    }
                }
                continue;
            }
        };
        let mut waiting = waiting.into_iter();
        if let Some(first) = waiting.next() {
            hand_over(first, connected);
            for request in waiting {
                let _ = request.send(None);
            }
            continue;
        }
        match hold(&printer, connected, &mut requests).await {
            Held::HandedOver => {}
            Held::Dropped(detail) => {
                tracing::info!(%detail, "printer closed the idle connection; reconnecting");
                dialler.ended(dialled_at.elapsed(), Some(LinkDownReason::Dropped));
            }
            Held::Stopped => return,
        }
    }
}

fn hand_over(request: Request, connected: Connected) {
    if let Err(Some((mut stream, _))) = request.send(Some(connected)) {
        // The session gave up waiting: close politely.
        tokio::spawn(async move {
            let _ = stream.shutdown().await;
        });
    }
}

enum Held {
    HandedOver,
    Dropped(String),
    Stopped,
}

/// Keeps an idle connection alive with PINGREQs until a session asks for it.
async fn hold(
    printer: &PrinterConfig,
    (mut stream, mut buffer): Connected,
    requests: &mut mpsc::Receiver<Request>,
) -> Held {
    let period = Duration::from_secs(u64::from(printer.keep_alive_seconds.max(2)) / 2);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut ping_bytes = BytesMut::new();
    if mqtt::encode(&Packet::PingReq, &mut ping_bytes).is_err() {
        return Held::Dropped("cannot encode PINGREQ".into());
    }
    loop {
        tokio::select! {
            request = requests.recv() => match request {
                Some(request) => {
                    hand_over(request, (stream, buffer));
                    return Held::HandedOver;
                }
                None => return Held::Stopped,
            },
            _ = ping.tick() => {
                if let Err(error) = stream.write_all(&ping_bytes).await {
                    return Held::Dropped(error.to_string());
                }
            }
            read = stream.read_buf(&mut buffer) => match read {
                Ok(0) => return Held::Dropped("closed".into()),
                Err(error) => return Held::Dropped(error.to_string()),
                Ok(_) => loop {
                    // Nothing is subscribed: only PINGRESPs are expected;
                    // anything else is dropped.
                    match mqtt::decode(&mut buffer, 1 << 20) {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(error) => return Held::Dropped(error.to_string()),
                    }
                },
            },
        }
    }
}
