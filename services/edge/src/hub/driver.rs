//! The hub's driver: one task per hub that owns the IO around a
//! [`HubState`]. Reading the upstream, reading the sessions' commands,
//! writing upstream and waking for timers all happen in one `select!`, so a
//! write held by flow control never stops the hub from reading. Every read
//! is into a persistent buffer (cancel-safe), and a write reports what it
//! wrote before another branch runs.

use std::time::Instant;

use relay_io::FramedReader;
use relay_proto::mqtt::{self, Packet};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::outbound::OutboundSender;
use super::registry::TunnelProbe;
use super::state::{HubConfig, HubCounters, HubEnd, HubState, SessionAttach, SessionId};

/// Upstream bytes the hub queues before it stops taking commands: sessions
/// then wait on the bounded command queue instead of growing this buffer.
const MAX_UPSTREAM_BACKLOG: usize = 256 * 1024;

/// Requests from sessions to their hub.
#[derive(Debug)]
pub(super) enum Command {
    Attach {
        session: SessionId,
        attach: SessionAttach<OutboundSender>,
    },
    ClientPacket {
        session: SessionId,
        packet: Packet,
    },
    Detach {
        session: SessionId,
        graceful: bool,
    },
}

/// What the driver works with besides the state.
pub(super) struct HubIo<R, W> {
    pub reader: FramedReader<R>,
    pub writer: W,
    pub commands: mpsc::Receiver<Command>,
    /// Cancelled from outside to end the hub (tunnel gone, replaced).
    pub ended: CancellationToken,
    pub byte_counter: Option<prometheus::IntCounterVec>,
    pub refusals: Option<prometheus::IntCounterVec>,
    pub tunnel_alive: Option<TunnelProbe>,
}

/// Adds to the metric what the state counted since the last export.
fn export_counters(
    metric: &prometheus::IntCounterVec,
    exported: &mut HubCounters,
    current: HubCounters,
) {
    if current == *exported {
        return;
    }
    if current.oversized_reports > exported.oversized_reports {
        tracing::warn!(
            "a printer report is over the hub's state bound: passed on, not kept for late joiners"
        );
    }
    for (label, now, before) in [
        ("filter", current.refused_filters, exported.refused_filters),
        (
            "publish",
            current.refused_publishes,
            exported.refused_publishes,
        ),
        ("churn", current.churn_cuts, exported.churn_cuts),
        (
            "slow_consumer",
            current.slow_consumer_cuts,
            exported.slow_consumer_cuts,
        ),
        (
            "throttled",
            current.throttled_publishes,
            exported.throttled_publishes,
        ),
        ("rate", current.rate_cuts, exported.rate_cuts),
        (
            "oversized_report",
            current.oversized_reports,
            exported.oversized_reports,
        ),
        (
            "oversized_upstream",
            current.oversized_upstream,
            exported.oversized_upstream,
        ),
        (
            "pushall_absorbed",
            current.pushalls_absorbed,
            exported.pushalls_absorbed,
        ),
    ] {
        if now > before {
            metric.with_label_values(&[label]).inc_by(now - before);
        }
    }
    *exported = current;
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Runs a hub until its upstream ends or it is told to end; its sessions
/// are ended with the matching close.
pub(super) async fn run<R, W>(config: HubConfig, io: HubIo<R, W>) -> HubEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let HubIo {
        mut reader,
        mut writer,
        mut commands,
        ended,
        byte_counter,
        refusals,
        tunnel_alive,
    } = io;
    let mut exported = HubCounters::default();
    let bytes_in = byte_counter.as_ref().map(|c| c.with_label_values(&["in"]));
    let bytes_out = byte_counter.as_ref().map(|c| c.with_label_values(&["out"]));
    let max_upstream_packet = config.max_upstream_packet;
    let mut state: HubState<OutboundSender> = HubState::new(config, now());
    // Bytes of an oversized upstream packet still to be thrown away.
    let mut skipping = 0usize;
    let end = loop {
        // Packets already buffered: what came with the link's first frame,
        // or the rest of the last read.
        let now_at_read = now();
        loop {
            if skipping > 0 {
                let buffer = reader.buffer_mut();
                let skipped = skipping.min(buffer.len());
                let _ = buffer.split_to(skipped);
                skipping -= skipped;
                if skipping > 0 {
                    break;
                }
            }
            match mqtt::decode(reader.buffer_mut(), max_upstream_packet) {
                Ok(Some(packet)) => state.handle_upstream_packet(packet, now_at_read),
                Ok(None) => break,
                // One packet over the limit is skipped (its bytes are
                // known from its header), not the end of the link: a
                // printer's oversized report must not cut every app off.
                Err(mqtt::DecodeError::PacketTooLarge { size, max }) => {
                    tracing::warn!(size, max, "skipped an upstream packet over the size limit");
                    state.handle_upstream_oversized();
                    skipping = size;
                }
                Err(error) => {
                    state.handle_upstream_error(error);
                    break;
                }
            }
        }
        if let Some(refusals) = &refusals {
            export_counters(refusals, &mut exported, state.counters());
        }
        if let Some(end) = state.take_end() {
            break end;
        }
        let wake_at = tokio::time::Instant::from_std(state.poll_timeout());
        let writing = !state.upstream_pending().is_empty();
        let taking_commands = state.upstream_pending().len() < MAX_UPSTREAM_BACKLOG;
        tokio::select! {
            read = reader.read_more() => match read {
                Ok(0) => break HubEnd::UpstreamClosed,
                Ok(read) => {
                    if let Some(counter) = &bytes_in {
                        counter.inc_by(read as u64);
                    }
                }
                Err(error) => break HubEnd::UpstreamIo(error),
            },
            written = writer.write(state.upstream_pending()), if writing => match written {
                Ok(0) => break HubEnd::UpstreamClosed,
                Ok(written) => {
                    if let Some(counter) = &bytes_out {
                        counter.inc_by(written as u64);
                    }
                    state.upstream_written(written);
                }
                Err(error) => break HubEnd::UpstreamIo(error),
            },
            command = commands.recv(), if taking_commands => match command {
                Some(Command::Attach { session, attach }) => state.attach(session, attach, now()),
                Some(Command::ClientPacket { session, packet }) => {
                    state.handle_client_packet(session, packet, now());
                }
                Some(Command::Detach { session, graceful }) => state.detach(session, graceful, now()),
                // Every handle is gone: nobody can reach this hub.
                None => break HubEnd::Ended,
            },
            () = tokio::time::sleep_until(wake_at) => state.handle_timeout(now()),
            () = ended.cancelled() => break HubEnd::Ended,
        }
    };
    let tunnel_gone = tunnel_alive.as_ref().is_some_and(|alive| !alive());
    state.end_all_sessions(&end.close(tunnel_gone));
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), writer.shutdown()).await;
    end
}
