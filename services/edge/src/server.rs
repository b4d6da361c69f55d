//! Starting, running and draining an edge: listeners, the admin endpoints,
//! periodic upkeep, and the SIGTERM sequence.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use relay_store::jwt::{JwtConfig, JwtVerifier};
use relay_store::{AuthConfig, Authenticator, RevocationWatcher, Revoked, Store};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::close::Close;
use crate::config::EdgeConfig;
use crate::http::{self, RequestContext};
use crate::hub::Hubs;
use crate::metrics::Metrics;
use crate::state::EdgeState;
use crate::tls::{CertificateSource, TlsError};

pub use crate::start_error::StartError;

/// A running edge. Drop does not stop it: call [`RunningEdge::drain`].
#[derive(Debug)]
pub struct RunningEdge {
    pub public_addr: Option<SocketAddr>,
    pub plain_addr: Option<SocketAddr>,
    /// The mqtts listener (MQTT over TLS without WebSocket), when configured.
    pub mqtts_addr: Option<SocketAddr>,
    /// The plain MQTT-over-TCP development listener, when configured.
    pub mqtt_plain_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// The agents' QUIC (UDP) listener, when configured.
    pub tunnel_addr: Option<SocketAddr>,
    /// The agents' TCP listener (the tunnel where UDP is blocked).
    pub tunnel_tcp_addr: Option<SocketAddr>,
    /// The peer listener for other edge instances, when configured.
    pub peer_addr: Option<SocketAddr>,
    state: Arc<EdgeState>,
    certificates: Option<Arc<CertificateSource>>,
    /// Stops the accept loops.
    accepting: CancellationToken,
    /// Tells sessions to close with 1001.
    sessions_shutdown: CancellationToken,
    /// Sends the agents away once the sessions are gone; their tunnels
    /// serve until each agent is up on another instance.
    tunnels_away: CancellationToken,
    /// The tunnels' accept loops (and agents that came to the public
    /// listener), waited for before `background` stops.
    tunnel_tasks: TaskTracker,
    /// Stops the admin listener, the peer listener, the lease and the
    /// upkeep tasks, last.
    background: CancellationToken,
    connections: TaskTracker,
    sessions: TaskTracker,
    tasks: TaskTracker,
}

impl RunningEdge {
    /// Validates `config`, connects to the store (migrating if told to),
    /// loads certificates and binds every listener; port 0 picks a free port.
    pub async fn start(config: EdgeConfig) -> Result<RunningEdge, StartError> {
        config.validate()?;
        let config = Arc::new(config);
        let store = Store::connect(config.store.database_url.expose()).await?;
        if config.store.migrate {
            let applied = store.migrate().await?;
            if !applied.is_empty() {
                tracing::info!(?applied, "applied migrations");
            }
        }
        let jwt = match &config.jwt {
            Some(section) => Some(Arc::new(JwtVerifier::load(JwtConfig {
                jwks_path: section.jwks_path.clone(),
                issuer: section.issuer.clone(),
                audience: section.audience.clone(),
                leeway_seconds: section.leeway_seconds,
            })?)),
            None => None,
        };
        let authenticator = Authenticator::new(
            store.clone(),
            jwt.clone(),
            AuthConfig {
                success_ttl: Duration::from_secs(config.auth.cache_success_seconds),
                failure_ttl: Duration::from_secs(config.auth.cache_failure_seconds),
                ..AuthConfig::default()
            },
        );
        let state = Arc::new(EdgeState::new(
            config.clone(),
            authenticator,
            Metrics::new(),
        ));

        let certificates = match (
            &config.public.listen,
            &config.public.tls_cert,
            &config.public.tls_key,
        ) {
            (Some(_), Some(cert), Some(key)) => Some(CertificateSource::load(cert, key)?),
            _ => None,
        };
        let edge = RunningEdge {
            public_addr: None,
            plain_addr: None,
            mqtts_addr: None,
            mqtt_plain_addr: None,
            admin_addr: config.admin.listen,
            tunnel_addr: None,
            tunnel_tcp_addr: None,
            peer_addr: None,
            state: state.clone(),
            certificates: certificates.clone(),
            accepting: CancellationToken::new(),
            sessions_shutdown: CancellationToken::new(),
            tunnels_away: CancellationToken::new(),
            tunnel_tasks: TaskTracker::new(),
            background: CancellationToken::new(),
            connections: TaskTracker::new(),
            sessions: TaskTracker::new(),
            tasks: TaskTracker::new(),
        };
        edge.bind_and_serve(certificates, jwt, store).await
    }

    async fn bind_and_serve(
        mut self,
        certificates: Option<Arc<CertificateSource>>,
        jwt: Option<Arc<JwtVerifier>>,
        store: Store,
    ) -> Result<RunningEdge, StartError> {
        let config = self.state.config.clone();
        let admin = bind(config.admin.listen).await?;
        self.admin_addr = admin.local_addr().map_err(|source| StartError::Listen {
            address: config.admin.listen,
            source,
        })?;
        if let (Some(address), Some(certificates)) = (config.public.listen, certificates.as_ref()) {
            let listener = bind(address).await?;
            self.public_addr = listener.local_addr().ok();
            let with_tunnel = config.tunnel.tcp_on_public_listener;
            let with_mqtt = config.public.mqtt_on_public_listener;
            let acceptor = TlsAcceptor::from(certificates.server_config(with_tunnel, with_mqtt)?);
            self.spawn_accept_loop(listener, Some(acceptor), Listener::Public { with_tunnel });
        }
        if let Some(address) = config.public.plain_listen {
            let listener = bind(address).await?;
            self.plain_addr = listener.local_addr().ok();
            self.spawn_accept_loop(listener, None, Listener::Public { with_tunnel: false });
        }
        if let (Some(address), Some(certificates)) =
            (config.public.mqtts_listen, certificates.as_ref())
        {
            let listener = bind(address).await?;
            self.mqtts_addr = listener.local_addr().ok();
            let acceptor = TlsAcceptor::from(certificates.mqtts_server_config()?);
            self.spawn_accept_loop(listener, Some(acceptor), Listener::Mqtt);
        }
        if let Some(address) = config.public.mqtt_plain_listen {
            let listener = bind(address).await?;
            self.mqtt_plain_addr = listener.local_addr().ok();
            self.spawn_accept_loop(listener, None, Listener::Mqtt);
        }
        // The tunnel's TCP listener shares the QUIC port when asked for
        // port 0 (agents dial the same host:port over TCP): with both on
        // any port, a pair of free ones is found.
        let mut tcp_listener = None;
        if let (Some(address), Some(certificates)) = (config.tunnel.listen, certificates.as_ref()) {
            let mut endpoint = crate::tunnel::endpoint(
                &config.tunnel,
                address,
                certificates.quic_server_config()?,
            )?;
            if let Some(tcp) = config.tunnel.tcp_listen.filter(|tcp| tcp.port() == 0) {
                for _ in 0..20 {
                    let Ok(quic) = endpoint.local_addr() else {
                        break;
                    };
                    let mut same = tcp;
                    same.set_port(quic.port());
                    if let Ok(listener) = tokio::net::TcpListener::bind(same).await {
                        tcp_listener = Some(listener);
                        break;
                    }
                    if address.port() != 0 {
                        break;
                    }
                    endpoint = crate::tunnel::endpoint(
                        &config.tunnel,
                        address,
                        certificates.quic_server_config()?,
                    )?;
                }
            }
            self.tunnel_addr = endpoint.local_addr().ok();
            // Agents stay connected while sessions drain (their clients get
            // 1001, not "device offline"); they get GO_AWAY once the
            // sessions are gone.
            crate::tunnel::spawn_accept_loop(
                endpoint,
                self.state.clone(),
                self.tunnels_away.clone(),
                self.tunnel_tasks.clone(),
            );
        }
        if let (Some(mut address), Some(certificates)) =
            (config.tunnel.tcp_listen, certificates.as_ref())
        {
            let listener = match tcp_listener.take() {
                Some(listener) => listener,
                None => {
                    if address.port() == 0
                        && let Some(quic) = self.tunnel_addr
                    {
                        address.set_port(quic.port());
                    }
                    match tokio::net::TcpListener::bind(address).await {
                        Ok(listener) => listener,
                        // The QUIC port is taken over TCP: any port, said in the log.
                        Err(error)
                            if config
                                .tunnel
                                .tcp_listen
                                .is_some_and(|asked| asked.port() == 0) =>
                        {
                            tracing::warn!(%error, %address, "the tunnel's TCP listener cannot share the QUIC port");
                            let mut any = address;
                            any.set_port(0);
                            tokio::net::TcpListener::bind(any).await.map_err(|source| {
                                StartError::Listen {
                                    address: any,
                                    source,
                                }
                            })?
                        }
                        Err(source) => return Err(StartError::Listen { address, source }),
                    }
                }
            };
            self.tunnel_tcp_addr = listener.local_addr().ok();
            crate::tunnel::spawn_tcp_accept_loop(
                listener,
                certificates.tcp_tunnel_server_config()?,
                self.state.clone(),
                self.tunnels_away.clone(),
                self.tunnel_tasks.clone(),
            );
        }
        if let (Some(address), Some(certificates)) =
            (config.cluster.peer_listen, certificates.as_ref())
        {
            let server = crate::peer_listener::listener_config(certificates)?;
            let endpoint = quinn::Endpoint::server(server, address)
                .map_err(|source| StartError::Listen { address, source })?;
            self.peer_addr = endpoint.local_addr().ok();
            if let Some(bound) = self.peer_addr {
                self.state.membership.bound_peer_listener(bound);
            }
            crate::peer_listener::spawn_listener(
                endpoint,
                crate::peer_listener::PeerListener {
                    peers: self.state.peers.clone(),
                    devices: self.state.devices.clone(),
                    hubs: self.state.hubs.clone(),
                    max_packet: config.tunnel.max_printer_packet,
                    live: crate::live_status::local(&self.state),
                },
                self.background.clone(),
                self.tasks.clone(),
            );
        }
        // The lease before anything is served, so that the claims of the
        // first agents route here.
        let membership = &self.state.membership;
        match membership.renew(&store).await {
            Ok(_) => {
                tracing::info!(instance = %membership.instance_id, peer_address = %membership.peer_address(), "instance registered")
            }
            Err(error) => tracing::warn!(%error, "cannot register this instance yet; retrying"),
        }
        self.spawn_admin(admin);
        self.spawn_upkeep(certificates, jwt, store);
        tracing::info!(
            public = ?self.public_addr,
            plain = ?self.plain_addr,
            tunnel = ?self.tunnel_addr,
            tunnel_tcp = ?self.tunnel_tcp_addr,
            peer = ?self.peer_addr,
            admin = %self.admin_addr,
            "edge started"
        );
        Ok(self)
    }

    /// Serves apps on `listener`: over WebSocket, or MQTT straight over
    /// TLS (or TCP); on the public listener, agents too (those whose TLS
    /// handshake chose the tunnel's ALPN) `with_tunnel`.
    fn spawn_accept_loop(&self, listener: TcpListener, tls: Option<TlsAcceptor>, kind: Listener) {
        let with_tunnel = matches!(kind, Listener::Public { with_tunnel: true });
        let tunnels = with_tunnel.then(|| TunnelHandoff {
            stop: self.tunnels_away.clone(),
            tasks: self.tunnel_tasks.clone(),
        });
        let state = self.state.clone();
        let accepting = self.accepting.clone();
        let connections = self.connections.clone();
        let sessions = self.sessions.clone();
        let shutdown = self.sessions_shutdown.clone();
        self.tasks.spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            // Out of file descriptors and the like: back off
                            // briefly instead of spinning.
                            tracing::warn!(%error, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = accepting.cancelled() => return,
                };
                let context = RequestContext {
                    state: state.clone(),
                    peer,
                    sessions: sessions.clone(),
                    shutdown: shutdown.clone(),
                };
                let tls = tls.clone();
                let tunnels = tunnels.clone();
                let span = tracing::info_span!("connection", %peer);
                connections
                    .spawn(serve_connection(stream, tls, tunnels, kind, context).instrument(span));
            }
        });
    }

    fn spawn_admin(&self, listener: TcpListener) {
        let state = self.state.clone();
        let stop = self.background.clone();
        let tasks = self.tasks.clone();
        self.tasks.spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                    _ = stop.cancelled() => return,
                };
                let state = state.clone();
                tasks.spawn(async move {
                    let service = service_fn(move |request| admin_response(request, state.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }

    /// Certificate and JWKS reloads, last-used flushes, and revocations
    /// evicting cached authentications.
    fn spawn_upkeep(
        &self,
        certificates: Option<Arc<CertificateSource>>,
        jwt: Option<Arc<JwtVerifier>>,
        store: Store,
    ) {
        let stop = self.background.clone();
        let state = self.state.clone();
        let reload_every = Duration::from_secs(self.state.config.public.tls_reload_seconds);
        self.tasks.spawn(async move {
            let mut reload = tokio::time::interval(reload_every);
            let mut flush = tokio::time::interval(Duration::from_secs(30));
            loop {
                tokio::select! {
                    _ = reload.tick() => {
                        if let Some(certificates) = &certificates {
                            match certificates.reload_if_changed() {
                                Ok(true) => tracing::info!("TLS certificate reloaded"),
                                Ok(false) => {}
                                Err(error) => tracing::error!(%error, "TLS certificate reload failed; keeping the current one"),
                            }
                        }
                        if let Some(jwt) = &jwt
                            && let Err(error) = jwt.reload_if_changed()
                        {
                            tracing::error!(%error, "JWKS reload failed; keeping the current keys");
                        }
                    }
                    _ = flush.tick() => {
                        if let Err(error) = state.authenticator.flush_last_used().await {
                            tracing::warn!(%error, "cannot record key use");
                        }
                    }
                    _ = stop.cancelled() => return,
                }
            }
        });
        self.tasks.spawn(crate::cluster::run(
            self.state.clone(),
            store.clone(),
            self.background.clone(),
        ));
        let stop = self.background.clone();
        let state = self.state.clone();
        self.tasks.spawn(async move {
            let mut watcher = loop {
                match RevocationWatcher::start(store.clone(), Duration::from_secs(30)).await {
                    Ok(watcher) => break watcher,
                    Err(error) => {
                        tracing::warn!(%error, "revocation watcher cannot start; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                            _ = stop.cancelled() => return,
                        }
                    }
                }
            };
            loop {
                tokio::select! {
                    event = watcher.next() => match event {
                        Ok(Revoked::ApiKey(key_id)) => {
                            state.authenticator.forget(Some(&key_id));
                            state.end_sessions(|session| session.key_id == key_id, &Close::revoked());
                        }
                        Ok(Revoked::Device(device_id)) => {
                            state.authenticator.forget(None);
                            state.end_sessions(|session| session.device_id == device_id, &Close::revoked());
                        }
                        // Every HELLO asks the store, so nothing is cached;
                        // the agent's running tunnel ends.
                        Ok(Revoked::AgentCredential(credential_id)) => {
                            state.devices.end_revoked(&credential_id);
                        }
                        Err(error) => {
                            tracing::warn!(%error, "revocation check failed");
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                                _ = stop.cancelled() => return,
                            }
                        }
                    },
                    _ = stop.cancelled() => return,
                }
            }
        });
    }

    /// Waits until this instance is fenced (lost its lease, `true`) or
    /// serving (`false`).
    pub async fn wait_fenced(&self, fenced: bool) {
        self.state.membership.wait_fenced(fenced).await;
    }

    /// Waits until `device_id`'s agent is connected; returns the tunnel's
    /// epoch.
    pub async fn wait_online(&self, device_id: &str) -> u64 {
        self.state.devices.wait_online(device_id, 0).await
    }

    /// Waits until `device_id`'s agent is gone.
    pub async fn wait_offline(&self, device_id: &str) {
        self.state.devices.wait_offline(device_id).await
    }

    /// Waits until `device_id` has a tunnel newer than `epoch` (a second
    /// agent fencing the first).
    pub async fn wait_newer_tunnel(&self, device_id: &str, epoch: u64) -> u64 {
        self.state.devices.wait_online(device_id, epoch).await
    }

    /// The online devices; whoever brings a device's upstream connection
    /// (the tunnel acceptor) starts its hub here.
    pub fn hubs(&self) -> Arc<Hubs> {
        self.state.hubs.clone()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    /// Re-reads the certificate files now (they are also checked
    /// periodically). Returns whether the certificate changed.
    pub fn reload_certificates(&self) -> Result<bool, TlsError> {
        match &self.certificates {
            Some(certificates) => certificates.reload_if_changed(),
            None => Ok(false),
        }
    }

    /// The SIGTERM sequence: readiness fails, new connections are refused,
    /// every session is closed with 1001 `draining`, and this returns once
    /// all have ended or `grace` has passed.
    pub async fn drain(self, grace: Duration) {
        self.begin_drain();
        self.finish_drain(grace).await;
    }

    /// The first half of [`RunningEdge::drain`]: readiness fails at once,
    /// the listeners close, and sessions are told to close.
    pub fn begin_drain(&self) {
        tracing::info!("draining");
        self.state.start_draining();
        self.accepting.cancel();
        self.sessions_shutdown.cancel();
    }

    /// The second half: waits for sessions (at most `grace`), then stops the
    /// admin listener and the upkeep tasks.
    pub async fn finish_drain(self, grace: Duration) {
        self.sessions.close();
        self.connections.close();
        let finished = tokio::time::timeout(grace, async {
            self.sessions.wait().await;
            self.connections.wait().await;
        })
        .await;
        if finished.is_err() {
            tracing::warn!("grace period over with sessions still open");
        }
        // Then the agents, each at its own moment within the spread, while
        // this instance still serves their tunnels, its peers' links and
        // its claims: each agent is up on another instance before its
        // tunnel here closes.
        self.tunnels_away.cancel();
        self.tunnel_tasks.close();
        let patience = crate::tunnel::tunnels_drain_patience(&self.state.config.shutdown);
        if tokio::time::timeout(patience, self.tunnel_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("agents still connected after {patience:?}");
        }
        self.background.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        // Tunnels are gone by now; hubs over other upstreams end here.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.state.hubs.end_all()).await;
        self.state.authenticator.store().close().await;
    }
}

/// Connections the kernel may queue before the edge accepts them. After a
/// restart every client comes back within about a second; tokio's default
/// (1,024) overflows then and the overflow waits a second for a SYN retry.
/// The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4_096;

async fn bind(address: SocketAddr) -> Result<TcpListener, StartError> {
    let listen = || {
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(address)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| StartError::Listen { address, source })
}

/// Where an agent that came to the public listener goes: a tunnel task
/// of its own, tracked and stopped with the other tunnels (not with the
/// apps' connections, which a drain waits for).
#[derive(Clone)]
struct TunnelHandoff {
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// What a listener serves.
#[derive(Debug, Clone, Copy)]
enum Listener {
    /// HTTP/1.1 and WebSocket; over TLS, MQTT too for ALPN `mqtt` (when
    /// the configuration offers it), and agents' tunnels `with_tunnel`.
    Public { with_tunnel: bool },
    /// MQTT straight over TLS (mqtts) or TCP.
    Mqtt,
}

/// One TCP connection: TLS (bounded in time), then HTTP/1.1 with a header
/// timeout, with upgrades; or, with `tunnels` and the tunnel's ALPN, an
/// agent's tunnel; or MQTT (an mqtts listener, or ALPN `mqtt`).
async fn serve_connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    tunnels: Option<TunnelHandoff>,
    kind: Listener,
    context: RequestContext,
) {
    let metrics = context.state.metrics.clone();
    metrics.connections.inc();
    metrics.connections_open.inc();
    let _ = stream.set_nodelay(true);
    match tls {
        Some(acceptor) => {
            let timeout =
                Duration::from_secs(context.state.config.public.tls_handshake_timeout_seconds);
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => match tunnels {
                    _ if matches!(kind, Listener::Mqtt)
                        || tls_stream.get_ref().1.alpn_protocol()
                            == Some(crate::tls::MQTT_ALPN) =>
                    {
                        let base_domain = &context.state.config.public.base_domain;
                        let device = crate::mqtt_tcp::device_from_sni(
                            tls_stream.get_ref().1.server_name(),
                            base_domain,
                        );
                        crate::mqtt_tcp::serve(tls_stream, device, true, context);
                    }
                    Some(tunnels)
                        if tls_stream.get_ref().1.alpn_protocol()
                            == Some(relay_proto::tunnel::ALPN) =>
                    {
                        let peer = context.peer;
                        let span = tracing::info_span!("tunnel", %peer, transport = "tcp", listener = "public");
                        tunnels.tasks.spawn(
                            crate::tunnel::serve_tcp_tunnel(
                                tls_stream,
                                peer,
                                context.state,
                                tunnels.stop,
                            )
                            .instrument(span),
                        );
                    }
                    _ => serve_http(tls_stream, context).await,
                },
                Ok(Err(error)) => {
                    metrics.tls_handshake_failures.inc();
                    tracing::debug!(%error, "TLS handshake failed");
                }
                Err(_) => {
                    metrics.tls_handshake_failures.inc();
                    tracing::debug!("TLS handshake timed out");
                }
            }
        }
        None if matches!(kind, Listener::Mqtt) => {
            crate::mqtt_tcp::serve(stream, None, false, context)
        }
        None => serve_http(stream, context).await,
    }
    metrics.connections_open.dec();
}

async fn serve_http<IO>(io: IO, context: RequestContext)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout =
        Duration::from_secs(context.state.config.public.http_header_timeout_seconds);
    let service =
        service_fn(move |request: Request<Incoming>| http::handle(request, context.clone()));
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await;
    if let Err(error) = served {
        tracing::debug!(%error, "HTTP connection ended with an error");
    }
}

async fn admin_response(
    request: Request<Incoming>,
    state: Arc<EdgeState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => {
            state
                .metrics
                .observe_store_queries(state.authenticator.store().queries());
            (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                state.metrics.render(),
            )
        }
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" if state.membership.is_fenced() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "fenced: this instance lost its lease\n".to_owned(),
        ),
        "/readyz" if state.is_draining() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining\n".to_owned(),
        ),
        "/readyz" => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        _ => return Ok(http::json(StatusCode::NOT_FOUND, "not found")),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    Ok(response)
}
