//! Streams over one TCP (TLS) connection, multiplexed by yamux, for the
//! tunnel where UDP is blocked: either side opens streams, as over QUIC,
//! and each stream has its own flow-control window, so a stream nobody
//! reads stalls only itself.
//!
//! yamux's `Connection` is driven by polling it; [`Mux::start`] spawns the
//! task that does, and hands out a cloneable [`Mux`] that opens and
//! accepts streams and closes the connection.

use std::io;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

/// One multiplexed stream, with tokio's read and write traits.
pub type MuxStream = Compat<yamux::Stream>;

/// Which end of the connection this is (yamux numbers the streams each
/// side opens apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MuxRole {
    /// The side that dialled (the agent).
    Client,
    /// The side that accepted (the edge).
    Server,
}

/// Limits of one multiplexed connection.
#[derive(Debug, Clone, Copy)]
pub struct MuxLimits {
    /// Streams open at once, both directions together.
    pub max_streams: usize,
    /// Inbound streams waiting to be accepted; more are reset.
    pub max_pending_inbound: usize,
}

impl Default for MuxLimits {
    fn default() -> Self {
        MuxLimits {
            max_streams: 256,
            max_pending_inbound: 8,
        }
    }
}

enum Command {
    Open(oneshot::Sender<io::Result<yamux::Stream>>),
    Close,
}

#[derive(Debug)]
struct Shared {
    commands: mpsc::UnboundedSender<Command>,
    inbound: tokio::sync::Mutex<mpsc::Receiver<yamux::Stream>>,
    /// Cancelled once the connection has ended.
    closed: CancellationToken,
    /// Why it ended.
    reason: Mutex<Option<String>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Open(_) => "Open",
            Command::Close => "Close",
        })
    }
}

/// A handle on a multiplexed connection; clones share it.
#[derive(Debug, Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

impl Mux {
    /// Starts multiplexing over `io` (already past TLS).
    pub fn start<T>(io: T, role: MuxRole, limits: MuxLimits) -> Mux
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let mut config = yamux::Config::default();
        config.set_max_num_streams(limits.max_streams);
        let mode = match role {
            MuxRole::Client => yamux::Mode::Client,
            MuxRole::Server => yamux::Mode::Server,
        };
        let connection = yamux::Connection::new(io.compat(), config, mode);
        let (commands, command_queue) = mpsc::unbounded_channel();
        let (inbound_sender, inbound) = mpsc::channel(limits.max_pending_inbound.max(1));
        let shared = Arc::new(Shared {
            commands,
            inbound: tokio::sync::Mutex::new(inbound),
            closed: CancellationToken::new(),
            reason: Mutex::new(None),
        });
        tokio::spawn(drive(
            connection,
            command_queue,
            inbound_sender,
            shared.clone(),
        ));
        Mux { shared }
    }

    /// Opens a stream; it reaches the peer with its first bytes.
    pub async fn open(&self) -> io::Result<MuxStream> {
        let (reply, answer) = oneshot::channel();
        self.shared
            .commands
            .send(Command::Open(reply))
            .map_err(|_| gone())?;
        answer
            .await
            .map_err(|_| gone())?
            .map(FuturesAsyncReadCompatExt::compat)
    }

    /// The next stream the peer opened; an error once the connection ended.
    pub async fn accept(&self) -> io::Result<MuxStream> {
        let mut inbound = self.shared.inbound.lock().await;
        tokio::select! {
            stream = inbound.recv() => stream.map(FuturesAsyncReadCompatExt::compat).ok_or_else(gone),
            () = self.shared.closed.cancelled() => Err(gone()),
        }
    }

    /// Closes the connection (its streams with it), with `reason` for the
    /// logs of this side.
    pub fn close(&self, reason: &str) {
        self.set_reason(reason);
        let _ = self.shared.commands.send(Command::Close);
    }

    /// Waits until the connection has ended; why.
    pub async fn closed(&self) -> String {
        self.shared.closed.cancelled().await;
        self.close_reason().unwrap_or_else(|| "closed".into())
    }

    /// Why it ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        if !self.shared.closed.is_cancelled() {
            return None;
        }
        Some(self.reason().clone().unwrap_or_else(|| "closed".to_owned()))
    }

    /// A token cancelled when the connection ends.
    pub fn ended(&self) -> CancellationToken {
        self.shared.closed.clone()
    }

    fn reason(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.shared
            .reason
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_reason(&self, reason: &str) {
        let mut current = self.reason();
        if current.is_none() {
            *current = Some(reason.to_owned());
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the tunnel connection ended")
}

/// Polls the connection: opens what is asked for, hands over what the
/// peer opens, until it ends.
async fn drive<T>(
    mut connection: yamux::Connection<Compat<T>>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    inbound: mpsc::Sender<yamux::Stream>,
    shared: Arc<Shared>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut opening: std::collections::VecDeque<oneshot::Sender<io::Result<yamux::Stream>>> =
        std::collections::VecDeque::new();
    let mut closing = false;
    let end = std::future::poll_fn(|cx| {
        use std::task::Poll;
        while let Poll::Ready(command) = commands.poll_recv(cx) {
            match command {
                Some(Command::Open(reply)) => opening.push_back(reply),
                // Every handle is gone, or one asked: close.
                Some(Command::Close) | None => closing = true,
            }
            if closing {
                break;
            }
        }
        if closing {
            return connection.poll_close(cx).map(|result| {
                result
                    .err()
                    .map_or_else(|| "closed".to_owned(), |e| e.to_string())
            });
        }
        while !opening.is_empty() {
            match connection.poll_new_outbound(cx) {
                Poll::Ready(Ok(stream)) => {
                    if let Some(reply) = opening.pop_front() {
                        let _ = reply.send(Ok(stream));
                    }
                }
                Poll::Ready(Err(error)) => {
                    if let Some(reply) = opening.pop_front() {
                        let _ = reply.send(Err(io::Error::other(error.to_string())));
                    }
                }
                Poll::Pending => break,
            }
        }
        loop {
            match connection.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    // Past what waits to be accepted, a stream is dropped
                    // (reset): the peer opens no more than the protocol says.
                    if inbound.try_send(stream).is_err() {
                        tracing::debug!("an inbound tunnel stream past the limit was reset");
                    }
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(error.to_string()),
                Poll::Ready(None) => return Poll::Ready("closed by the peer".to_owned()),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    {
        let mut reason = shared
            .reason
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if reason.is_none() {
            *reason = Some(end);
        }
    }
    for reply in opening {
        let _ = reply.send(Err(gone()));
    }
    shared.closed.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair() -> (Mux, Mux) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        (
            Mux::start(a, MuxRole::Client, MuxLimits::default()),
            Mux::start(b, MuxRole::Server, MuxLimits::default()),
        )
    }

    #[tokio::test]
    async fn either_side_opens_streams() {
        let (client, server) = pair();
        let mut opened = client.open().await.unwrap();
        opened.write_all(b"hello").await.unwrap();
        let mut accepted = server.accept().await.unwrap();
        let mut buffer = [0u8; 5];
        accepted.read_exact(&mut buffer).await.unwrap();
        assert_eq!(&buffer, b"hello");
        // And the other way, as the edge opens printer links.
        let mut link = server.open().await.unwrap();
        link.write_all(b"link").await.unwrap();
        let mut from_edge = client.accept().await.unwrap();
        let mut buffer = [0u8; 4];
        from_edge.read_exact(&mut buffer).await.unwrap();
        assert_eq!(&buffer, b"link");
    }

    #[tokio::test]
    async fn a_stream_nobody_reads_does_not_stall_another() {
        let (client, server) = pair();
        let mut stalled = server.open().await.unwrap();
        let mut flowing = server.open().await.unwrap();
        stalled.write_all(b"s").await.unwrap();
        flowing.write_all(b"f").await.unwrap();
        let _stalled_at_client = client.accept().await.unwrap();
        let mut flowing_at_client = client.accept().await.unwrap();
        let mut one = [0u8; 1];
        flowing_at_client.read_exact(&mut one).await.unwrap();
        // Fill the stalled stream's window: its writer waits, nothing more.
        let filler = tokio::spawn(async move {
            let chunk = vec![0u8; 16 * 1024];
            loop {
                if stalled.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        // Meanwhile a megabyte goes through the other stream.
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            for _ in 0..16 {
                flowing.write_all(&chunk).await.unwrap();
            }
            flowing.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        flowing_at_client.read_to_end(&mut received).await.unwrap();
        assert_eq!(received.len(), 1 << 20);
        writer.await.unwrap();
        filler.abort();
    }

    #[tokio::test]
    async fn the_end_of_the_connection_is_seen_by_both_sides() {
        let (client, server) = pair();
        let stream = client.open().await.unwrap();
        drop(stream);
        server.close("edge going away");
        assert_eq!(server.closed().await, "edge going away");
        let reason = client.closed().await;
        assert!(!reason.is_empty());
        assert!(client.open().await.is_err());
        assert!(client.accept().await.is_err());
    }

    #[tokio::test]
    async fn garbage_ends_the_connection() {
        let (mut raw, other) = tokio::io::duplex(4096);
        let server = Mux::start(other, MuxRole::Server, MuxLimits::default());
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let reason = server.closed().await;
        assert!(!reason.is_empty());
    }
}
