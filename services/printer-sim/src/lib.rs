//! A stand-in for a Bambu Lab printer's local MQTT broker, built on
//! `relay-proto`, for relay's tests, demo and load tests.
//!
//! Like the real thing it speaks MQTT 3.1.1 over TLS with a certificate whose
//! common name is the printer's serial (and no IP or DNS name), accepts the
//! user `bblp` with the 8-character LAN access code, publishes reports on
//! `device/<serial>/report`, answers requests from `device/<serial>/request`,
//! and accepts only a few clients. Fault switches make it drop everyone,
//! stall its reports, or dawdle in the TLS handshake. Counters tell tests
//! what it saw (connections, SUBSCRIBEs).
//!
//! With [`SimulatorConfig::elegoo_cc2`] it is an Elegoo Centauri Carbon 2
//! instead ([`cc2`]): plain MQTT, user `elegoo`, topics `elegoo/<sn>/…`, a
//! registration per client, limited to a few.
//!
//! It is a test instrument, not a broker: no persistence, QoS 0 and 1 only.

// The full report is one large `json!` literal.
#![recursion_limit = "1024"]

pub mod cc2;
pub mod reports;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use relay_proto::mqtt::{
    self, ConnAck, ConnectReturnCode, Packet, Publish, QoS, SubAck, SubscribeReturnCode,
};
use relay_proto::topic::{filter_covers, filters_overlap, topic_matches};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use reports::Profile;

/// What to do with one client more than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// CONNACK 3 and close.
    Refuse,
    /// CONNACK 0, then nothing at all (what some firmware does).
    AcceptSilently,
    /// Disconnect the oldest client and take the new one.
    DropOldest,
}

#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    pub serial: String,
    /// The LAN access code (8 characters on real printers).
    pub access_code: String,
    pub profile: Profile,
    /// Time between reports (1 s on real printers).
    pub report_interval: Duration,
    pub client_limit: usize,
    pub over_limit: OverLimit,
    /// TLS as on real printers; off for plain-MQTT tests.
    pub tls: bool,
    /// A `pushall` that comes sooner than this after the last one is
    /// answered only after `pushall_penalty` (a printer handles it poorly).
    pub pushall_min_interval: Duration,
    pub pushall_penalty: Duration,
    /// An Elegoo Centauri Carbon 2 instead of a Bambu printer.
    pub cc2: Option<cc2::Cc2Settings>,
}

impl SimulatorConfig {
    pub fn new(serial: &str, access_code: &str) -> SimulatorConfig {
        SimulatorConfig {
            serial: serial.into(),
            access_code: access_code.into(),
            profile: Profile::P1,
            report_interval: Duration::from_secs(1),
            client_limit: 4,
            over_limit: OverLimit::Refuse,
            tls: true,
            pushall_min_interval: Duration::from_secs(5),
            pushall_penalty: Duration::from_secs(2),
            cc2: None,
        }
    }

    /// An Elegoo Centauri Carbon 2: plain MQTT, user `elegoo` with the
    /// access code, status about once a second, at most `limit` registered
    /// clients (connections are not what it limits).
    pub fn elegoo_cc2(serial: &str, access_code: &str) -> SimulatorConfig {
        SimulatorConfig {
            tls: false,
            client_limit: 64,
            cc2: Some(cc2::Cc2Settings::default()),
            ..SimulatorConfig::new(serial, access_code)
        }
    }

    /// The MQTT user the printer accepts.
    pub fn username(&self) -> &'static str {
        if self.cc2.is_some() { "elegoo" } else { "bblp" }
    }

    pub fn report_topic(&self) -> String {
        format!("device/{}/report", self.serial)
    }

    pub fn request_topic(&self) -> String {
        format!("device/{}/request", self.serial)
    }
}

/// What the simulator has seen, for tests and load figures.
#[derive(Debug, Default)]
pub struct Observations {
    /// Authenticated MQTT connections accepted, in total.
    pub connections: AtomicUsize,
    /// The most authenticated clients connected at once.
    pub max_concurrent: AtomicUsize,
    /// Connections refused for the access code.
    pub refused_credentials: AtomicUsize,
    /// Connections over the client limit.
    pub over_limit: AtomicUsize,
    /// Every SUBSCRIBE's filters, in arrival order.
    pub subscribes: Mutex<Vec<Vec<String>>>,
    /// PUBLISH packets received from clients.
    pub publishes: AtomicUsize,
    /// SUBSCRIBEs naming another serial's topics; each dropped its client,
    /// as a real printer does.
    pub foreign_subscribes: AtomicUsize,
    /// `pushall` requests received, and how many came too soon (answered
    /// late, with the penalty).
    pub pushalls: AtomicUsize,
    pub penalized_pushalls: AtomicUsize,
    /// CC2: registrations accepted (new or renewed), refused ("too many
    /// clients"), replies dropped by the cooldown, and requests from
    /// clients not registered (unanswered).
    pub cc2_registrations: AtomicUsize,
    pub cc2_refused_registrations: AtomicUsize,
    pub cc2_dropped_replies: AtomicUsize,
    pub cc2_unregistered_requests: AtomicUsize,
    /// Reports sent, counted once per report (not per client).
    pub reports: AtomicU64,
    /// Connections that went silent or half-open ([`RunningSimulator::go_silent`]),
    /// and how many of those have closed since.
    pub silenced: AtomicUsize,
    pub silenced_closed: AtomicUsize,
    /// Woken whenever a connection is accepted or refused, or a SUBSCRIBE
    /// or PUBLISH arrives.
    changed: tokio::sync::Notify,
}

impl Observations {
    /// Returns once `condition` holds; checked after every change to the
    /// connection, refusal, SUBSCRIBE and PUBLISH records.
    pub async fn wait_until(&self, condition: impl Fn(&Observations) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if condition(self) {
                return;
            }
            changed.await;
        }
    }

    fn record(&self) {
        self.changed.notify_waiters();
    }

    pub fn subscribe_log(&self) -> Vec<Vec<String>> {
        self.subscribes
            .lock()
            .map(|log| log.clone())
            .unwrap_or_default()
    }
}

#[derive(Debug, Default)]
struct Faults {
    stall_reports: AtomicBool,
    handshake_delay_millis: AtomicU64,
    drop_all: Mutex<CancellationToken>,
    /// Cancelled: the connections open then go silent (they keep their
    /// TCP connection, read and answer nothing, send no report).
    silence: Mutex<CancellationToken>,
    /// Cancelled: the connections open then stop reading altogether.
    half_open: Mutex<CancellationToken>,
}

/// How a printer goes quiet on its open connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// Reads what clients send and answers nothing: no PINGRESP, no
    /// SUBACK, no report (firmware 01.04's "connected, no data").
    Silent,
    /// Stops reading and writing at all (a wedged broker, a half-open NAT
    /// mapping).
    HalfOpen,
}

/// Cancels the token in `slot` and puts a fresh one there: connections
/// holding the old one are hit, later ones are not.
fn trip(slot: &Mutex<CancellationToken>) {
    if let Ok(mut token) = slot.lock() {
        token.cancel();
        *token = CancellationToken::new();
    }
}

fn current(slot: &Mutex<CancellationToken>) -> CancellationToken {
    slot.lock().map(|token| token.clone()).unwrap_or_default()
}

struct ClientEntry {
    sender: mpsc::Sender<Bytes>,
    filters: Arc<Mutex<Vec<String>>>,
    kick: CancellationToken,
    silent: bool,
}

struct Shared {
    config: SimulatorConfig,
    observations: Arc<Observations>,
    faults: Faults,
    clients: Mutex<Vec<(u64, ClientEntry)>>,
    retained: Mutex<HashMap<String, Bytes>>,
    sequence: AtomicU64,
    next_client: AtomicU64,
    /// When the last `pushall` came.
    last_pushall: Mutex<Option<tokio::time::Instant>>,
    cc2: Option<Mutex<cc2::Cc2Printer>>,
}

/// A running simulator; stops when dropped or with [`RunningSimulator::stop`].
pub struct RunningSimulator {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the printer's certificate (when TLS is on).
    pub ca_pem: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for RunningSimulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningSimulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    #[error("cannot listen: {0}")]
    Listen(#[from] std::io::Error),
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// A CA and a leaf whose common name is the serial, with no subject
/// alternative name: how Bambu Lab printers present themselves.
fn printer_certificate(
    serial: &str,
) -> Result<(String, CertificateDer<'static>, PrivateKeyDer<'static>), SimulatorError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "relay printer simulator CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let mut leaf_params = CertificateParams::new(Vec::<String>::new())?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, serial);
    let leaf_key = KeyPair::generate()?;
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    Ok((ca.pem(), leaf.der().clone(), key))
}

impl RunningSimulator {
    /// Starts on `listen` (port 0 picks one).
    pub async fn start(
        config: SimulatorConfig,
        listen: SocketAddr,
    ) -> Result<RunningSimulator, SimulatorError> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (ca_pem, acceptor) = if config.tls {
            let (ca_pem, leaf, key) = printer_certificate(&config.serial)?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let server = rustls::ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                .with_no_client_auth()
                .with_single_cert(vec![leaf], key)?;
            (ca_pem, Some(TlsAcceptor::from(Arc::new(server))))
        } else {
            (String::new(), None)
        };
        let shared = Arc::new(Shared {
            observations: Arc::new(Observations::default()),
            faults: Faults::default(),
            clients: Mutex::new(Vec::new()),
            retained: Mutex::new(HashMap::new()),
            sequence: AtomicU64::new(0),
            next_client: AtomicU64::new(0),
            last_pushall: Mutex::new(None),
            cc2: config
                .cc2
                .clone()
                .map(|settings| Mutex::new(cc2::Cc2Printer::new(&config.serial, settings))),
            config,
        });
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(accept_loop(
            listener,
            acceptor,
            shared.clone(),
            stop.clone(),
            tasks.clone(),
        ));
        tasks.spawn(report_loop(shared.clone(), stop.clone()));
        Ok(RunningSimulator {
            addr,
            ca_pem,
            shared,
            stop,
            tasks,
        })
    }

    pub fn observations(&self) -> Arc<Observations> {
        self.shared.observations.clone()
    }

    pub fn config(&self) -> &SimulatorConfig {
        &self.shared.config
    }

    /// Fault: disconnect every client now.
    pub fn drop_all_clients(&self) {
        trip(&self.shared.faults.drop_all);
    }

    /// Fault: every connection open now goes quiet as `silence` says,
    /// and stays open; connections made later work. Reconnecting is the
    /// cure, as with the firmware bug this mimics.
    pub fn go_silent(&self, silence: Silence) {
        match silence {
            Silence::Silent => trip(&self.shared.faults.silence),
            Silence::HalfOpen => trip(&self.shared.faults.half_open),
        }
    }

    /// Fault: stop (or resume) sending reports.
    pub fn stall_reports(&self, stalled: bool) {
        self.shared
            .faults
            .stall_reports
            .store(stalled, Ordering::SeqCst);
    }

    /// Fault: wait this long before each TLS handshake.
    pub fn delay_handshakes(&self, delay: Duration) {
        self.shared
            .faults
            .handshake_delay_millis
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Publishes a report now, as the periodic task would.
    pub fn publish_report(&self, payload: Bytes) {
        let topic = self.shared.config.report_topic();
        route(&self.shared, &topic, payload, false, None);
    }

    /// Publishes `payload` on `topic` to every subscribed client (QoS 0), as
    /// the printer would; for load tests.
    pub fn publish(&self, topic: &str, payload: Bytes) {
        route(&self.shared, topic, payload, false, None);
    }

    /// A CC2's reboot: every client dropped, every registration forgotten.
    pub fn reboot(&self) {
        if let Some(printer) = &self.shared.cc2
            && let Ok(mut printer) = printer.lock()
        {
            printer.reboot();
        }
        self.drop_all_clients();
    }

    /// A CC2's registered client ids now.
    pub fn cc2_registrations(&self) -> Vec<String> {
        self.shared
            .cc2
            .as_ref()
            .and_then(|printer| {
                printer
                    .lock()
                    .ok()
                    .map(|mut p| p.registered(std::time::Instant::now()))
            })
            .unwrap_or_default()
    }

    /// Clients connected right now.
    pub fn connected_clients(&self) -> usize {
        self.shared.clients.lock().map(|c| c.len()).unwrap_or(0)
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Reports are small: no Nagle delay in front of them.
                    let _ = stream.set_nodelay(true);
                    stream
                }
                Err(_) => continue,
            },
            _ = stop.cancelled() => return,
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let delay = shared.faults.handshake_delay_millis.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            match acceptor {
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        serve_client(tls, shared, stop).await;
                    }
                }
                None => serve_client(stream, shared, stop).await,
            }
        });
    }
}

async fn report_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.config.report_interval);
    let mut nozzle = 24.0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if shared.faults.stall_reports.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(printer) = &shared.cc2 {
            let status = printer.lock().ok().map(|mut printer| printer.tick());
            if let Some(status) = status {
                shared.observations.reports.fetch_add(1, Ordering::Relaxed);
                publish_cc2(&shared, status);
            }
            continue;
        }
        let sequence = shared.sequence.fetch_add(1, Ordering::SeqCst);
        nozzle = if nozzle > 220.0 { 24.0 } else { nozzle + 1.5 };
        let payload = match shared.config.profile {
            Profile::P1 => reports::delta_report(sequence, nozzle),
            Profile::X1 => reports::full_report(sequence),
        };
        shared.observations.reports.fetch_add(1, Ordering::Relaxed);
        route(
            &shared,
            &shared.config.report_topic(),
            Bytes::from(payload),
            false,
            None,
        );
    }
}

/// Publishes what a CC2 answered: now, or after its delay.
fn publish_cc2(shared: &Arc<Shared>, outgoing: cc2::Outgoing) {
    let payload = Bytes::from(outgoing.payload.to_string());
    if outgoing.delay.is_zero() {
        route(shared, &outgoing.topic, payload, false, None);
    } else {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(outgoing.delay).await;
            route(&shared, &outgoing.topic, payload, false, None);
        });
    }
}

/// A CC2's answer to a client's PUBLISH, with its observations.
fn handle_cc2_publish(shared: &Arc<Shared>, printer: &Mutex<cc2::Cc2Printer>, publish: &Publish) {
    let answered = printer.lock().ok().map(|mut printer| {
        printer.on_publish(&publish.topic, &publish.payload, std::time::Instant::now())
    });
    let Some((outgoing, noted)) = answered else {
        return;
    };
    let counter = match noted {
        Some(cc2::Noted::Registered) => Some(&shared.observations.cc2_registrations),
        Some(cc2::Noted::RegistrationRefused) => {
            Some(&shared.observations.cc2_refused_registrations)
        }
        Some(cc2::Noted::ReplyDropped) => Some(&shared.observations.cc2_dropped_replies),
        Some(cc2::Noted::Unregistered) => Some(&shared.observations.cc2_unregistered_requests),
        None => None,
    };
    if let Some(counter) = counter {
        counter.fetch_add(1, Ordering::SeqCst);
        shared.observations.record();
    }
    for out in outgoing {
        publish_cc2(shared, out);
    }
}

/// Sends a PUBLISH to every client with a matching filter (QoS 0).
/// Counts a `pushall`; the delay of its answer when it came too soon.
fn pushall_delay(shared: &Shared, payload: &[u8]) -> Option<Duration> {
    let is_pushall = serde_json::from_slice::<serde_json::Value>(payload)
        .is_ok_and(|request| request["pushing"]["command"] == "pushall");
    if !is_pushall {
        return None;
    }
    shared.observations.pushalls.fetch_add(1, Ordering::SeqCst);
    let now = tokio::time::Instant::now();
    let mut last = shared.last_pushall.lock().ok()?;
    let too_soon =
        last.is_some_and(|at| now.duration_since(at) < shared.config.pushall_min_interval);
    *last = Some(now);
    if too_soon {
        shared
            .observations
            .penalized_pushalls
            .fetch_add(1, Ordering::SeqCst);
        Some(shared.config.pushall_penalty)
    } else {
        None
    }
}

fn route(shared: &Shared, topic: &str, payload: Bytes, retain: bool, encoded: Option<Bytes>) {
    let bytes = encoded.unwrap_or_else(|| {
        let mut bytes = BytesMut::new();
        let _ = mqtt::encode(
            &Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain,
                topic: topic.into(),
                packet_id: None,
                payload,
            }),
            &mut bytes,
        );
        bytes.freeze()
    });
    let Ok(clients) = shared.clients.lock() else {
        return;
    };
    for (_, client) in clients.iter() {
        if client.silent {
            continue;
        }
        let matches = client
            .filters
            .lock()
            .map(|filters| filters.iter().any(|filter| topic_matches(filter, topic)))
            .unwrap_or(false);
        // A client that does not keep up loses messages, as on a printer.
        if matches {
            let _ = client.sender.try_send(bytes.clone());
        }
    }
}

async fn serve_client<IO: AsyncRead + AsyncWrite + Unpin>(
    mut io: IO,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut buffer = BytesMut::with_capacity(4096);
    // CONNECT first, within a few seconds.
    let connect = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match mqtt::decode(&mut buffer, 1 << 20) {
                Ok(Some(Packet::Connect(connect))) => return Some(connect),
                Ok(Some(_)) | Err(_) => return None,
                Ok(None) => {}
            }
            match io.read_buf(&mut buffer).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await;
    let Ok(Some(connect)) = connect else {
        return;
    };
    let config = &shared.config;
    let authorised = connect.username.as_deref() == Some(config.username())
        && connect
            .password
            .as_ref()
            .map(|password| password.expose().as_ref())
            == Some(config.access_code.as_bytes());
    if !authorised {
        shared
            .observations
            .refused_credentials
            .fetch_add(1, Ordering::Relaxed);
        shared.observations.record();
        let _ = write_packet(&mut io, &connack(ConnectReturnCode::NotAuthorized)).await;
        return;
    }

    let id = shared.next_client.fetch_add(1, Ordering::SeqCst);
    let (sender, mut outgoing) = mpsc::channel::<Bytes>(1024);
    let filters = Arc::new(Mutex::new(Vec::new()));
    let kick = CancellationToken::new();
    let admitted = {
        let Ok(mut clients) = shared.clients.lock() else {
            return;
        };
        let mut silent = false;
        let mut refuse = false;
        if clients.len() >= config.client_limit {
            shared
                .observations
                .over_limit
                .fetch_add(1, Ordering::Relaxed);
            match config.over_limit {
                OverLimit::Refuse => refuse = true,
                OverLimit::AcceptSilently => silent = true,
                OverLimit::DropOldest => {
                    if !clients.is_empty() {
                        let (_, oldest) = clients.remove(0);
                        oldest.kick.cancel();
                    }
                }
            }
        }
        if !refuse {
            clients.push((
                id,
                ClientEntry {
                    sender,
                    filters: filters.clone(),
                    kick: kick.clone(),
                    silent,
                },
            ));
            if !silent {
                shared
                    .observations
                    .connections
                    .fetch_add(1, Ordering::Relaxed);
                let concurrent = clients.iter().filter(|(_, c)| !c.silent).count();
                shared
                    .observations
                    .max_concurrent
                    .fetch_max(concurrent, Ordering::Relaxed);
            }
        }
        (!refuse).then_some(silent)
    };
    shared.observations.record();
    let Some(silent) = admitted else {
        let _ = write_packet(&mut io, &connack(ConnectReturnCode::ServerUnavailable)).await;
        return;
    };
    let drop_all = current(&shared.faults.drop_all);
    let silenced = current(&shared.faults.silence);
    let half_opened = current(&shared.faults.half_open);
    if write_packet(&mut io, &connack(ConnectReturnCode::Accepted))
        .await
        .is_ok()
    {
        loop {
            let quiet = silenced.is_cancelled() || half_opened.is_cancelled();
            tokio::select! {
                read = io.read_buf(&mut buffer), if !half_opened.is_cancelled() => match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) if quiet => buffer.clear(),
                    Ok(_) => {
                        match handle_packets(&mut buffer, &shared, &filters, silent) {
                            Ok(replies) => {
                                if !replies.is_empty() && io.write_all(&replies).await.is_err() {
                                    break;
                                }
                            }
                            Err(()) => break,
                        }
                    }
                },
                bytes = outgoing.recv() => match bytes {
                    Some(_) if quiet => {}
                    Some(bytes) => {
                        if io.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                () = silenced.cancelled(), if !quiet => {
                    shared.observations.silenced.fetch_add(1, Ordering::SeqCst);
                    shared.observations.record();
                }
                () = half_opened.cancelled(), if !half_opened.is_cancelled() => {
                    if !silenced.is_cancelled() {
                        shared.observations.silenced.fetch_add(1, Ordering::SeqCst);
                        shared.observations.record();
                    }
                }
                _ = kick.cancelled() => break,
                _ = drop_all.cancelled() => break,
                _ = stop.cancelled() => break,
            }
        }
    };
    if let Ok(mut clients) = shared.clients.lock() {
        clients.retain(|(client, _)| *client != id);
    }
    if silenced.is_cancelled() || half_opened.is_cancelled() {
        shared
            .observations
            .silenced_closed
            .fetch_add(1, Ordering::SeqCst);
        shared.observations.record();
    }
    let _ = io.shutdown().await;
}

fn connack(code: ConnectReturnCode) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present: false,
        code,
    })
}

async fn write_packet<IO: AsyncWrite + Unpin>(io: &mut IO, packet: &Packet) -> std::io::Result<()> {
    let mut bytes = BytesMut::new();
    mqtt::encode(packet, &mut bytes).map_err(|error| std::io::Error::other(error.to_string()))?;
    io.write_all(&bytes).await?;
    io.flush().await
}

/// Handles every complete packet in `buffer`; returns the bytes to answer
/// with, or `Err` when the client broke the protocol.
fn handle_packets(
    buffer: &mut BytesMut,
    shared: &Arc<Shared>,
    filters: &Mutex<Vec<String>>,
    silent: bool,
) -> Result<BytesMut, ()> {
    let mut replies = BytesMut::new();
    while let Some(packet) = mqtt::decode(buffer, 1 << 20).map_err(|_| ())? {
        if silent {
            continue;
        }
        let reply = match packet {
            Packet::PingReq => Some(Packet::PingResp),
            Packet::Subscribe(subscribe) => {
                let names: Vec<String> = subscribe.filters.iter().map(|(f, _)| f.clone()).collect();
                // A real printer drops a client that subscribes to another
                // serial's topics (or to a filter that could match them).
                let own = format!("device/{}/#", shared.config.serial);
                if shared.cc2.is_none()
                    && names.iter().any(|filter| {
                        filters_overlap(filter, "device/+/#") && !filter_covers(&own, filter)
                    })
                {
                    shared
                        .observations
                        .foreign_subscribes
                        .fetch_add(1, Ordering::SeqCst);
                    shared.observations.record();
                    return Err(());
                }
                if let Ok(mut log) = shared.observations.subscribes.lock() {
                    log.push(names.clone());
                }
                shared.observations.record();
                if let Ok(mut held) = filters.lock() {
                    for name in &names {
                        if !held.contains(name) {
                            held.push(name.clone());
                        }
                    }
                }
                let suback = Packet::SubAck(SubAck {
                    packet_id: subscribe.packet_id,
                    return_codes: subscribe
                        .filters
                        .iter()
                        .map(|(_, qos)| SubscribeReturnCode::Success((*qos).min(QoS::AtLeastOnce)))
                        .collect(),
                });
                let _ = mqtt::encode(&suback, &mut replies);
                // Retained messages for the new filters.
                if let Ok(retained) = shared.retained.lock() {
                    for (topic, encoded) in retained.iter() {
                        if names.iter().any(|filter| topic_matches(filter, topic)) {
                            replies.extend_from_slice(encoded);
                        }
                    }
                }
                None
            }
            Packet::Unsubscribe(unsubscribe) => {
                if let Ok(mut held) = filters.lock() {
                    held.retain(|filter| !unsubscribe.filters.contains(filter));
                }
                Some(Packet::UnsubAck(unsubscribe.packet_id))
            }
            Packet::Publish(publish) => {
                shared
                    .observations
                    .publishes
                    .fetch_add(1, Ordering::Relaxed);
                shared.observations.record();
                if let Some(printer) = &shared.cc2 {
                    handle_cc2_publish(shared, printer, &publish);
                } else if publish.topic == shared.config.request_topic() {
                    let sequence = shared.sequence.fetch_add(1, Ordering::SeqCst);
                    if let Some(answer) = reports::answer(&publish.payload, sequence) {
                        let delay = pushall_delay(shared, &publish.payload);
                        match delay {
                            None => route(
                                shared,
                                &shared.config.report_topic(),
                                Bytes::from(answer),
                                false,
                                None,
                            ),
                            Some(delay) => {
                                let shared = shared.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(delay).await;
                                    route(
                                        &shared,
                                        &shared.config.report_topic(),
                                        Bytes::from(answer),
                                        false,
                                        None,
                                    );
                                });
                            }
                        }
                    }
                } else {
                    let mut encoded = BytesMut::new();
                    let _ = mqtt::encode(
                        &Packet::Publish(Publish {
                            dup: false,
                            qos: QoS::AtMostOnce,
                            retain: publish.retain,
                            topic: publish.topic.clone(),
                            packet_id: None,
                            payload: publish.payload.clone(),
                        }),
                        &mut encoded,
                    );
                    let encoded = encoded.freeze();
                    if publish.retain
                        && let Ok(mut retained) = shared.retained.lock()
                    {
                        if publish.payload.is_empty() {
                            retained.remove(&publish.topic);
                        } else {
                            retained.insert(publish.topic.clone(), encoded.clone());
                        }
                    }
                    // Deliveries to others carry retain = 0; only the stored
                    // copy keeps the flag.
                    route(shared, &publish.topic, publish.payload.clone(), false, None);
                }
                publish.packet_id.map(Packet::PubAck)
            }
            Packet::PubAck(_) => None,
            Packet::Disconnect => return Err(()),
            _ => return Err(()),
        };
        if let Some(reply) = reply {
            let _ = mqtt::encode(&reply, &mut replies);
        }
    }
    Ok(replies)
}
