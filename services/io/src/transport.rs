//! The tunnel's connection, over QUIC or over TCP: one type for the edge
//! and the agent to open and accept streams on, close, and watch, so that
//! HELLO, fencing, GO_AWAY, drain and printer links run the same code on
//! both transports.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

use crate::mux::{Mux, MuxStream};

/// Which transport a tunnel runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Quic,
    Tcp,
}

impl Transport {
    /// The metrics label and the word in logs.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A tunnel connection; clones share it.
#[derive(Debug, Clone)]
pub enum TunnelConnection {
    Quic(quinn::Connection),
    Tcp { mux: Mux, remote: SocketAddr },
}

impl TunnelConnection {
    pub fn transport(&self) -> Transport {
        match self {
            TunnelConnection::Quic(_) => Transport::Quic,
            TunnelConnection::Tcp { .. } => Transport::Tcp,
        }
    }

    /// Opens a bidirectional stream.
    pub async fn open_bi(&self) -> io::Result<(TunnelSend, TunnelRecv)> {
        match self {
            TunnelConnection::Quic(connection) => {
                let (send, recv) = connection.open_bi().await.map_err(io::Error::other)?;
                Ok((TunnelSend::Quic(send), TunnelRecv::Quic(recv)))
            }
            TunnelConnection::Tcp { mux, .. } => Ok(split(mux.open().await?, mux)),
        }
    }

    /// The next bidirectional stream the peer opened.
    pub async fn accept_bi(&self) -> io::Result<(TunnelSend, TunnelRecv)> {
        match self {
            TunnelConnection::Quic(connection) => {
                let (send, recv) = connection.accept_bi().await.map_err(io::Error::other)?;
                Ok((TunnelSend::Quic(send), TunnelRecv::Quic(recv)))
            }
            TunnelConnection::Tcp { mux, .. } => Ok(split(mux.accept().await?, mux)),
        }
    }

    /// Closes the connection; over QUIC the peer sees `code` and `reason`
    /// (over TCP the frames before it said why).
    pub fn close(&self, code: u32, reason: &[u8]) {
        match self {
            TunnelConnection::Quic(connection) => {
                connection.close(quinn::VarInt::from_u32(code), reason)
            }
            TunnelConnection::Tcp { mux, .. } => mux.close(&String::from_utf8_lossy(reason)),
        }
    }

    /// Waits until the connection has ended; why.
    pub async fn closed(&self) -> String {
        match self {
            TunnelConnection::Quic(connection) => connection.closed().await.to_string(),
            TunnelConnection::Tcp { mux, .. } => mux.closed().await,
        }
    }

    /// Whether it has ended.
    pub fn is_closed(&self) -> bool {
        match self {
            TunnelConnection::Quic(connection) => connection.close_reason().is_some(),
            TunnelConnection::Tcp { mux, .. } => mux.close_reason().is_some(),
        }
    }

    /// On a QUIC connection, the frames sent so far that the peer must
    /// acknowledge (all but ACK and CONNECTION_CLOSE), and the UDP
    /// datagrams received; `None` over TCP, where the kernel tracks what
    /// is unanswered.
    pub fn eliciting_sent_and_received(&self) -> Option<(u64, u64)> {
        match self {
            TunnelConnection::Quic(connection) => {
                let stats = connection.stats();
                let f = stats.frame_tx;
                let eliciting = f.ack_frequency
                    + f.crypto
                    + f.data_blocked
                    + f.datagram
                    + f.immediate_ack
                    + f.max_data
                    + f.max_stream_data
                    + f.max_streams_bidi
                    + f.max_streams_uni
                    + f.new_connection_id
                    + f.new_token
                    + f.path_challenge
                    + f.path_response
                    + f.ping
                    + f.reset_stream
                    + f.retire_connection_id
                    + f.stream_data_blocked
                    + f.streams_blocked_bidi
                    + f.streams_blocked_uni
                    + f.stop_sending
                    + f.stream;
                Some((eliciting, stats.udp_rx.datagrams))
            }
            TunnelConnection::Tcp { .. } => None,
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        match self {
            TunnelConnection::Quic(connection) => connection.remote_address(),
            TunnelConnection::Tcp { remote, .. } => *remote,
        }
    }
}

fn split(stream: MuxStream, mux: &Mux) -> (TunnelSend, TunnelRecv) {
    let (read, write) = tokio::io::split(stream);
    (
        TunnelSend::Tcp {
            write,
            ended: mux.ended(),
        },
        TunnelRecv::Tcp(read),
    )
}

/// The sending half of a tunnel stream.
#[derive(Debug)]
pub enum TunnelSend {
    Quic(quinn::SendStream),
    Tcp {
        write: WriteHalf<MuxStream>,
        /// The connection's end, for [`TunnelSend::stopped`].
        ended: CancellationToken,
    },
}

impl TunnelSend {
    /// Ends this half: the peer reads to the end.
    pub async fn finish(&mut self) {
        match self {
            TunnelSend::Quic(send) => {
                let _ = send.finish();
            }
            TunnelSend::Tcp { write, .. } => {
                let _ = tokio::io::AsyncWriteExt::shutdown(write).await;
            }
        }
    }

    /// Waits until the peer has all that was sent and let go (QUIC), or
    /// the connection ended (TCP, where the peer hangs up once it has read).
    pub async fn stopped(&mut self) {
        match self {
            TunnelSend::Quic(send) => {
                let _ = send.stopped().await;
            }
            TunnelSend::Tcp { ended, .. } => ended.cancelled().await,
        }
    }
}

impl AsyncWrite for TunnelSend {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TunnelSend::Quic(send) => Pin::new(send).poll_write(cx, buf).map_err(io::Error::other),
            TunnelSend::Tcp { write, .. } => Pin::new(write).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TunnelSend::Quic(send) => Pin::new(send).poll_flush(cx),
            TunnelSend::Tcp { write, .. } => Pin::new(write).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TunnelSend::Quic(send) => Pin::new(send).poll_shutdown(cx),
            TunnelSend::Tcp { write, .. } => Pin::new(write).poll_shutdown(cx),
        }
    }
}

/// The receiving half of a tunnel stream.
#[derive(Debug)]
pub enum TunnelRecv {
    Quic(quinn::RecvStream),
    Tcp(ReadHalf<MuxStream>),
}

impl AsyncRead for TunnelRecv {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TunnelRecv::Quic(recv) => Pin::new(recv).poll_read(cx, buf),
            TunnelRecv::Tcp(read) => Pin::new(read).poll_read(cx, buf),
        }
    }
}
