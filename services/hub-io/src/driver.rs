//! The hub's driver: one task per hub that owns the IO around a
//! [`HubState`]. Reading the upstream, reading the sessions' commands,
//! writing upstream and waking for timers all happen in one `select!`, so a
//! write held by flow control never stops the hub from reading. Every read
//! is into a persistent buffer (cancel-safe), and a write reports what it
//! wrote before another branch runs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_io::FramedReader;
use relay_proto::mqtt::{self, Packet};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::outbound::OutboundSender;
use relay_hub::close::Close;
use relay_hub::state::{
    HubConfig, HubCounters, HubEnd, HubState, PacketExtras, QuarantineEvent, SessionAttach,
    SessionId, Silence,
};

/// Upstream bytes the hub queues before it stops taking commands: sessions
/// then wait on the bounded command queue instead of growing this buffer.
const MAX_UPSTREAM_BACKLOG: usize = 256 * 1024;

/// Tells whether the way to the device (the agent's tunnel) still stands,
/// so that a lost upstream can be told apart: tunnel gone (1013, device
/// offline) or printer gone (1014).
pub type TunnelProbe = Arc<dyn Fn() -> bool + Send + Sync>;

/// Requests from sessions to their hub. Small (the large parts boxed):
/// the hub's command queue allocates its first block of 32 slots when the
/// hub starts, and at 168 bytes a command that block was 5.4 KB of every
/// device's memory.
#[derive(Debug)]
pub(crate) enum Command {
    Attach {
        session: SessionId,
        attach: Box<SessionAttach<OutboundSender>>,
    },
    ClientPacket {
        session: SessionId,
        packet: Box<Packet>,
        /// What an MQTT 5 client's packet adds (boxed: most have none).
        extras: Option<Box<PacketExtras>>,
    },
    Detach {
        session: SessionId,
        graceful: bool,
    },
    /// The device's tunnel moved to `epoch`: an upstream through an older
    /// one is stale, and a new one is to be found.
    UpstreamMoved {
        epoch: u64,
    },
}

/// One upstream MQTT connection, already past CONNECT/CONNACK.
pub struct Upstream {
    pub reader: FramedReader<Box<dyn AsyncRead + Send + Unpin>>,
    pub writer: Box<dyn AsyncWrite + Send + Unpin>,
    /// Tells, when this upstream ends, whether the way to the device went
    /// with it (1013) or only the printer (1014).
    pub tunnel_alive: Option<TunnelProbe>,
    /// The epoch of the tunnel it runs through (0: none).
    pub epoch: u64,
    /// The client id a CC2's agent registered with (its LINK_ACCEPT).
    pub printer_client: Option<String>,
    /// The upstream is another hub (a peer link), not the printer: that
    /// hub judges what ends its printer connection, this one does not.
    pub through_hub: bool,
}

impl Upstream {
    /// An upstream over a reader that may already hold bytes (those that
    /// came with the printer link's first frame) and a writer.
    pub fn new<R, W>(
        reader: FramedReader<R>,
        writer: W,
        tunnel_alive: Option<TunnelProbe>,
        epoch: u64,
    ) -> Self
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let (reader, buffered) = reader.into_parts();
        let reader: Box<dyn AsyncRead + Send + Unpin> = Box::new(reader);
        Upstream {
            reader: FramedReader::with_buffer(reader, buffered),
            writer: Box::new(writer),
            tunnel_alive,
            epoch,
            printer_client: None,
            through_hub: false,
        }
    }

    /// Marks this upstream as another hub's (a peer link).
    pub fn through_hub(mut self) -> Self {
        self.through_hub = true;
        self
    }

    /// Whether an app's message can have ended this upstream with `end`:
    /// only when it is the printer's own connection, through a tunnel that
    /// is still there, and ended by the printer.
    fn printer_may_have_ended(&self, end: &HubEnd) -> bool {
        let tunnel_gone = self.tunnel_alive.as_ref().is_some_and(|alive| !alive());
        !self.through_hub && !tunnel_gone && !matches!(end, HubEnd::UpstreamMoved)
    }

    /// An upstream over a connection's two halves, through no tunnel.
    pub fn from_halves<R, W>(reader: R, writer: W) -> Self
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        Upstream::new(FramedReader::new(reader), writer, None, 0)
    }

    /// The close a hub's sessions get when this upstream ended with `end`.
    fn close_for(&self, end: &HubEnd) -> Close {
        let tunnel_gone = self.tunnel_alive.as_ref().is_some_and(|alive| !alive());
        end.close(tunnel_gone)
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

/// Why a new upstream could not be had (yet).
#[derive(Debug, Clone)]
pub struct UpstreamFailure {
    /// What the sessions get if the grace ends on this failure.
    pub close: Close,
    /// When to try again.
    pub retry_after: Duration,
}

pub type UpstreamFuture = Pin<Box<dyn Future<Output = Result<Upstream, UpstreamFailure>> + Send>>;

/// Finds a hub a new upstream once its upstream ended: the device's
/// printer link through whichever tunnel now serves it. Told, on the first
/// attempt after a printer was found silent, which watchdog found it.
pub type UpstreamSource = Arc<dyn Fn(Option<Silence>) -> UpstreamFuture + Send + Sync>;

/// The metrics a hub's driver adds to (none where nobody scrapes them).
#[derive(Debug, Clone, Default)]
pub struct HubMetrics {
    /// Upstream bytes, by direction (in, out).
    pub upstream_bytes: Option<prometheus::IntCounterVec>,
    /// What the hub refused or cut, by what.
    pub refusals: Option<prometheus::IntCounterVec>,
    /// Upstreams found again within the grace.
    pub resumes: Option<prometheus::IntCounter>,
    /// Filters quarantined.
    pub quarantines: Option<prometheus::IntCounter>,
    /// Printers found silent, by watchdog.
    pub silences: Option<prometheus::IntCounterVec>,
}

/// What the driver works with besides the state.
pub(crate) struct HubIo {
    pub upstream: Upstream,
    /// Where a new upstream comes from; `None`: the hub ends with its
    /// upstream.
    pub source: Option<UpstreamSource>,
    /// How long sessions wait for a new upstream.
    pub grace: Duration,
    pub commands: mpsc::Receiver<Command>,
    /// Cancelled from outside to end the hub (drain, replaced).
    pub ended: CancellationToken,
    pub metrics: HubMetrics,
    /// The traffic the hub's handles show.
    pub activity: Arc<crate::activity::HubActivity>,
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
        (
            "expired_publish",
            current.expired_publishes,
            exported.expired_publishes,
        ),
        (
            "cc2_answered_at_edge",
            current.cc2_answered_at_edge,
            exported.cc2_answered_at_edge,
        ),
        (
            "cc2_request_sent",
            current.cc2_requests_sent,
            exported.cc2_requests_sent,
        ),
        (
            "cc2_queue_overflow",
            current.cc2_queue_overflows,
            exported.cc2_queue_overflows,
        ),
        (
            "watchdog_status_request",
            current.watchdog_status_requests,
            exported.watchdog_status_requests,
        ),
        (
            "watchdog_pushall",
            current.watchdog_pushalls,
            exported.watchdog_pushalls,
        ),
        (
            "quarantined_filter",
            current.quarantine_refusals,
            exported.quarantine_refusals,
        ),
        (
            "quarantine_lost_filter",
            current.quarantine_lost_filters,
            exported.quarantine_lost_filters,
        ),
        (
            "quarantined_publisher",
            current.quarantine_dropped_publishes,
            exported.quarantine_dropped_publishes,
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

/// What the driver loops share.
struct Context {
    commands: mpsc::Receiver<Command>,
    ended: CancellationToken,
    refusals: Option<prometheus::IntCounterVec>,
    exported: HubCounters,
    quarantines: Option<prometheus::IntCounter>,
    silences: Option<prometheus::IntCounterVec>,
    bytes_in: Option<prometheus::IntCounter>,
    bytes_out: Option<prometheus::IntCounter>,
    activity: Arc<crate::activity::HubActivity>,
}

impl Context {
    /// Exports the counters, logs what the quarantine decided, and takes
    /// the state's end, if it decided one.
    fn settle(&mut self, state: &mut HubState<OutboundSender>) -> Option<HubEnd> {
        self.activity.sample(now());
        let quarantined_before = self.exported.quarantined_filters;
        let current = state.counters();
        if let Some(silences) = &self.silences {
            for (watchdog, now, before) in [
                (
                    "pingresp",
                    current.silent_pingresp,
                    self.exported.silent_pingresp,
                ),
                ("report", current.silent_report, self.exported.silent_report),
                ("pong", current.silent_pong, self.exported.silent_pong),
                ("status", current.silent_status, self.exported.silent_status),
            ] {
                if now > before {
                    silences.with_label_values(&[watchdog]).inc_by(now - before);
                }
            }
        }
        self.exported.silent_pingresp = current.silent_pingresp;
        self.exported.silent_report = current.silent_report;
        self.exported.silent_pong = current.silent_pong;
        self.exported.silent_status = current.silent_status;
        if let Some(quarantines) = &self.quarantines
            && current.quarantined_filters > quarantined_before
        {
            quarantines.inc_by(current.quarantined_filters - quarantined_before);
        }
        if let Some(refusals) = &self.refusals {
            export_counters(refusals, &mut self.exported, current);
        }
        self.exported.quarantined_filters = current.quarantined_filters;
        for event in state.take_quarantine_events() {
            // The hub's span names the device; a client id and a filter
            // are no secrets.
            match event {
                QuarantineEvent::Filter {
                    filter,
                    sessions_lost,
                } => tracing::warn!(
                    %filter,
                    sessions_lost,
                    "quarantined a filter: subscribing to it made the printer drop its connection twice"
                ),
                QuarantineEvent::Publisher { client_id } => tracing::warn!(
                    %client_id,
                    "quarantined a publisher: its messages made the printer drop its connection twice"
                ),
            }
        }
        state.take_end()
    }
}

/// Hands a session's command to the state; `Err` when no handle is left.
fn apply(
    state: &mut HubState<OutboundSender>,
    command: Option<Command>,
    activity: &crate::activity::HubActivity,
) -> Result<(), HubEnd> {
    match command {
        Some(Command::Attach { session, attach }) => state.attach(session, *attach, now()),
        Some(Command::ClientPacket {
            session,
            packet,
            extras,
        }) => {
            if matches!(*packet, Packet::Publish(_)) {
                activity.to_printer();
            }
            state.handle_client_packet_with(session, *packet, extras.as_deref(), now());
        }
        Some(Command::Detach { session, graceful }) => state.detach(session, graceful, now()),
        Some(Command::UpstreamMoved { .. }) => {}
        // Every handle is gone: nobody can reach this hub.
        None => return Err(HubEnd::Ended),
    }
    Ok(())
}

/// How serving one upstream ended.
enum Served {
    /// The hub ends.
    End(HubEnd),
    /// The upstream ended; the hub may find another.
    Lost(HubEnd),
}

/// Runs a hub until it ends: through its upstream, and through the new
/// upstreams its source finds within the grace when one ends. Its
/// sessions are ended with the matching close.
pub(crate) async fn run(config: HubConfig, io: HubIo) -> HubEnd {
    let HubIo {
        upstream,
        source,
        grace,
        commands,
        ended,
        activity,
        metrics:
            HubMetrics {
                upstream_bytes: byte_counter,
                refusals,
                resumes,
                quarantines,
                silences,
            },
    } = io;
    let mut context = Context {
        commands,
        ended,
        refusals,
        exported: HubCounters::default(),
        quarantines,
        silences,
        bytes_in: byte_counter.as_ref().map(|c| c.with_label_values(&["in"])),
        bytes_out: byte_counter.as_ref().map(|c| c.with_label_values(&["out"])),
        activity,
    };
    let max_upstream_packet = config.max_upstream_packet;
    let mut state: HubState<OutboundSender> = HubState::new(config, now());
    let mut upstream = Some(upstream);
    // What the sessions get if the hub ends without an upstream.
    let mut close = Close::device_offline();
    // Why the last upstream ended, when a watchdog found it silent.
    let mut silence: Option<Silence> = None;
    let end = loop {
        let Some(mut current) = upstream.take() else {
            let Some(source) = &source else {
                break HubEnd::NoUpstream;
            };
            match find_upstream(&mut state, source, &mut context, &mut close, silence.take()).await
            {
                Ok(found) => {
                    tracing::info!("the upstream is back: sessions resubscribed");
                    if let Some(resumes) = &resumes {
                        resumes.inc();
                    }
                    state.set_printer_client(found.printer_client.clone(), now());
                    state.upstream_resumed(now());
                    upstream = Some(found);
                    continue;
                }
                Err(end) => break end,
            }
        };
        let served = serve(&mut state, &mut current, &mut context, max_upstream_packet).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), current.writer.shutdown()).await;
        match served {
            Served::End(end) => {
                close = current.close_for(&end);
                break end;
            }
            Served::Lost(end) => {
                close = current.close_for(&end);
                if let HubEnd::UpstreamSilent(found) = &end {
                    silence = Some(*found);
                }
                if source.is_none() || grace.is_zero() {
                    break end;
                }
                tracing::info!(%end, grace_seconds = grace.as_secs_f64(), "upstream lost: sessions wait for a new one");
                if current.printer_may_have_ended(&end) {
                    state.upstream_lost(now() + grace, now());
                } else {
                    state.upstream_lost_blameless(now() + grace, now());
                }
            }
        }
    };
    state.end_all_sessions(&close);
    end
}

/// Serves the state over one upstream until it ends.
async fn serve(
    state: &mut HubState<OutboundSender>,
    upstream: &mut Upstream,
    context: &mut Context,
    max_upstream_packet: usize,
) -> Served {
    let Upstream {
        reader,
        writer,
        epoch,
        ..
    } = upstream;
    // Bytes of an oversized upstream packet still to be thrown away.
    let mut skipping = 0usize;
    // An oversized packet whose packet id (if any) is still to be read,
    // before its bytes are thrown away: its size.
    let mut oversized: Option<usize> = None;
    loop {
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
            if let Some(size) = oversized {
                // A QoS 1 PUBLISH is acknowledged before it is skipped, or
                // the broker would send it again after every reconnect.
                let acknowledge = match mqtt::publish_prefix(reader.buffer_mut()) {
                    Ok(mqtt::PublishPrefix::NeedMore(_)) => break,
                    Ok(mqtt::PublishPrefix::PacketId(qos, id)) => Some((qos, id)),
                    Ok(mqtt::PublishPrefix::NoPacketId) | Err(_) => None,
                };
                state.handle_upstream_oversized(acknowledge);
                oversized = None;
                skipping = size;
                continue;
            }
            match mqtt::decode(reader.buffer_mut(), max_upstream_packet) {
                Ok(Some(packet)) => {
                    if matches!(packet, Packet::Publish(_)) {
                        context.activity.from_printer();
                    }
                    state.handle_upstream_packet(packet, now_at_read);
                }
                Ok(None) => break,
                // One packet over the limit is skipped (its bytes are
                // known from its header), not the end of the link: a
                // printer's oversized report must not cut every app off.
                Err(mqtt::DecodeError::PacketTooLarge { size, max }) => {
                    tracing::warn!(size, max, "skipped an upstream packet over the size limit");
                    oversized = Some(size);
                }
                Err(error) => {
                    state.handle_upstream_error(error);
                    break;
                }
            }
        }
        if let Some(end) = context.settle(state) {
            return match end {
                HubEnd::UpstreamProtocol(_) => Served::Lost(end),
                HubEnd::UpstreamSilent(silence) => {
                    tracing::warn!(%silence, "the printer went silent: ending its connection; the agent makes a new one");
                    Served::Lost(end)
                }
                end => Served::End(end),
            };
        }
        let wake_at = tokio::time::Instant::from_std(state.poll_timeout());
        let writing = !state.upstream_pending().is_empty();
        let taking_commands = state.upstream_pending().len() < MAX_UPSTREAM_BACKLOG;
        tokio::select! {
            read = reader.read_more() => match read {
                Ok(0) => return Served::Lost(HubEnd::UpstreamClosed),
                Ok(read) => {
                    if let Some(counter) = &context.bytes_in {
                        counter.inc_by(read as u64);
                    }
                }
                Err(error) => return Served::Lost(HubEnd::UpstreamIo(error)),
            },
            written = writer.write(state.upstream_pending()), if writing => match written {
                Ok(0) => return Served::Lost(HubEnd::UpstreamClosed),
                Ok(written) => {
                    if let Some(counter) = &context.bytes_out {
                        counter.inc_by(written as u64);
                    }
                    state.upstream_written(written);
                }
                Err(error) => return Served::Lost(HubEnd::UpstreamIo(error)),
            },
            command = context.commands.recv(), if taking_commands => {
                if let Some(Command::UpstreamMoved { epoch: moved_to }) = command {
                    if *epoch < moved_to {
                        return Served::Lost(HubEnd::UpstreamMoved);
                    }
                    continue;
                }
                if let Err(end) = apply(state, command, &context.activity) {
                    return Served::End(end);
                }
            },
            () = tokio::time::sleep_until(wake_at) => state.handle_timeout(now()),
            () = context.ended.cancelled() => return Served::End(HubEnd::Ended),
        }
    }
}

/// Longest wait between attempts at a new upstream.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Keeps the sessions while the source looks for a new upstream, until
/// the state's grace ends (`Err`). `close` becomes the last failure's.
async fn find_upstream(
    state: &mut HubState<OutboundSender>,
    source: &UpstreamSource,
    context: &mut Context,
    close: &mut Close,
    silence: Option<Silence>,
) -> Result<Upstream, HubEnd> {
    let mut attempt: Option<UpstreamFuture> = Some(source(silence));
    let mut retry_at = tokio::time::Instant::now();
    loop {
        if let Some(end) = context.settle(state) {
            return Err(end);
        }
        let wake_at = tokio::time::Instant::from_std(state.poll_timeout());
        tokio::select! {
            result = async {
                match attempt.as_mut() {
                    Some(opening) => opening.await,
                    None => std::future::pending().await,
                }
            }, if attempt.is_some() => {
                attempt = None;
                match result {
                    Ok(upstream) => return Ok(upstream),
                    Err(failure) => {
                        *close = failure.close;
                        retry_at = tokio::time::Instant::now() + failure.retry_after.min(MAX_RETRY);
                    }
                }
            },
            () = tokio::time::sleep_until(retry_at), if attempt.is_none() => attempt = Some(source(None)),
            command = context.commands.recv() => {
                if matches!(command, Some(Command::UpstreamMoved { .. })) {
                    // The device is somewhere new: look there now, instead
                    // of waiting on an attempt at the old place.
                    attempt = Some(source(None));
                    continue;
                }
                apply(state, command, &context.activity)?;
            }
            () = tokio::time::sleep_until(wake_at) => state.handle_timeout(now()),
            () = context.ended.cancelled() => return Err(HubEnd::Ended),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every hub's task holds its driver's future: it stays within what
    /// was measured (3.2 KB on x86_64, 1.5 KB of which is the state),
    /// with room for growth, and is not held twice (7.8 KiB per hub
    /// before; docs/benchmarks.md).
    #[tokio::test]
    async fn a_hubs_driver_future_stays_small() {
        let (client, _server) = tokio::io::duplex(64);
        let (reader, writer) = tokio::io::split(client);
        let (_handle, driver) = crate::handle::start(
            Upstream::from_halves(reader, writer),
            HubConfig::new(1 << 20),
            None,
            Duration::from_secs(1),
            HubMetrics::default(),
        );
        let size = std::mem::size_of_val(&driver);
        let state = std::mem::size_of::<HubState<OutboundSender>>();
        assert!(
            size < state + 2048,
            "driver future {size} B, state {state} B"
        );
    }

    /// The command queue's first block is 32 commands, allocated when the
    /// hub starts.
    #[test]
    fn a_command_is_small() {
        assert!(std::mem::size_of::<Command>() <= 32);
    }
}
