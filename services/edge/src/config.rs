//! The edge's configuration: a TOML file, overridden by environment
//! variables and flags, validated once with every problem reported together.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use relay_proto::Secret;
use relay_proto::topic::{TopicLimits, validate_topic_filter};
use serde::Deserialize;

use crate::hub::{ChurnLimit, PublishRate, QuarantinePolicy, TopicPolicy};

/// Everything the edge needs to start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    #[serde(default)]
    pub public: PublicConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub jwt: Option<JwtSection>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub tunnel: TunnelConfig,
    /// What apps may ask of each kind of printer.
    #[serde(default)]
    pub printers: PrintersConfig,
    #[serde(default)]
    pub quotas: QuotaConfig,
    /// This instance among several on one store.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// The console's sign-in.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// The threads the edge runs on.
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

/// The threads that run the edge's sessions, hubs, tunnels and listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// 1: everything on one thread, so a message from the printer reaches
    /// its app without waking a second thread (the least CPU per message;
    /// one core per instance, scaled out by instances). More: that many
    /// threads, which share tasks (one instance on several cores). 0: one
    /// per core.
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { worker_threads: 1 }
    }
}

/// The console's sign-in: login links always; the operator's OpenID
/// Connect provider when `[console.oidc]` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    pub oidc: Option<OidcConfig>,
}

/// The operator's OpenID Connect provider (authorization code with PKCE).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The provider's issuer; its discovery document is at
    /// `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    /// Never logged.
    pub client_secret: Secret<String>,
    /// The ID token claim that names the owner's tenant (its id or name).
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// Claim values that name a tenant by another name: value → tenant id
    /// or name. A value not listed names the tenant itself.
    #[serde(default)]
    pub tenants: std::collections::BTreeMap<String, String>,
    /// The CA of the provider's certificate, when it is not one the
    /// system trusts (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// What the sign-in button says: "Sign in with <name>".
    #[serde(default = "default_provider_name")]
    pub name: String,
}

fn default_tenant_claim() -> String {
    "relay_tenant".into()
}

fn default_provider_name() -> String {
    "your organisation".into()
}

/// This instance's identity and lease among the edge instances that share
/// one store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Unique per running instance (on Kubernetes, the pod name). Empty: a
    /// random `edge-…` id per start.
    pub instance_id: String,
    /// Where other instances reach this one's peer listener (on Kubernetes,
    /// the pod IP and the peer port). Empty: the peer listener's bound
    /// address (which must then not be a wildcard).
    pub peer_address: String,
    /// The lease other instances trust; an instance that cannot renew it
    /// for this long fences itself (stops serving its agents' tunnels).
    pub lease_seconds: u64,
    /// How often the lease is renewed and this instance's claims checked.
    pub renew_seconds: u64,
    /// The peer listener (QUIC, ALPN `relay-peer/1`): other instances'
    /// hubs reach the devices whose agents are here. Never the public
    /// address. Off when absent: this instance then serves only the
    /// devices whose agents it holds.
    pub peer_listen: Option<SocketAddr>,
    /// The secret every instance of the cluster shares; peers prove it to
    /// each other. Required with `peer_listen` (env RELAY_CLUSTER_SECRET).
    pub secret: Secret<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            instance_id: String::new(),
            peer_address: String::new(),
            lease_seconds: 10,
            renew_seconds: 3,
            peer_listen: None,
            secret: Secret::new(String::new()),
        }
    }
}

/// Open sessions allowed at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    pub sessions_per_key: u32,
    pub sessions_per_device: u32,
    pub sessions_per_tenant: u32,
    /// Per client IP address (all keys).
    pub sessions_per_address: u32,
}

impl Default for QuotaConfig {
    /// An app holds a session or two; a household a few dozen. These stop
    /// one key or one address from holding thousands, and leave room for
    /// the load test's 10,000 sessions spread over keys and addresses.
    fn default() -> Self {
        QuotaConfig {
            sessions_per_key: 1_000,
            sessions_per_device: 20_000,
            sessions_per_tenant: 100_000,
            sessions_per_address: 1_000,
        }
    }
}

/// The topic policy and churn budget per printer kind (as the agent reports
/// it in LINK_ACCEPT).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrintersConfig {
    /// Any MQTT broker (agent kind `mqtt`).
    pub mqtt: PrinterPolicyConfig,
    /// A Bambu Lab printer (agent kind `bambu`).
    pub bambu: PrinterPolicyConfig,
    /// An Elegoo Centauri Carbon 2 (agent kind `elegoo_cc2`).
    pub elegoo_cc2: PrinterPolicyConfig,
}

impl Default for PrintersConfig {
    fn default() -> Self {
        PrintersConfig {
            mqtt: PrinterPolicyConfig {
                allow: vec!["#".into()],
                deny: vec!["$SYS/#".into()],
                retain: true,
                ..PrinterPolicyConfig::default()
            },
            // A Bambu printer has two topics of its own, and drops every
            // client when one subscribes to another serial's.
            bambu: PrinterPolicyConfig {
                allow: vec![
                    "device/{serial}/report".into(),
                    "device/{serial}/request".into(),
                ],
                deny: Vec::new(),
                retain: false,
                // A printer is a small computer: apps send it a command
                // now and then.
                publishes_per_second: 10,
                publish_burst: 20,
                ..PrinterPolicyConfig::default()
            },
            // A CC2's topics all start with its serial; the hub answers
            // apps' registrations and heartbeats itself and paces their
            // requests (`request_interval_ms`).
            elegoo_cc2: PrinterPolicyConfig {
                allow: vec!["elegoo/{serial}/#".into()],
                deny: Vec::new(),
                retain: false,
                publishes_per_second: 10,
                publish_burst: 20,
                ..PrinterPolicyConfig::default()
            },
        }
    }
}

/// One printer kind's policy. `{serial}` in a filter stands for the serial
/// the agent reports; an allow filter that needs it allows nothing when the
/// agent reports none, and a deny filter then denies every serial.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrinterPolicyConfig {
    /// Filters apps may subscribe within, and topics they may publish to.
    pub allow: Vec<String>,
    /// Never, even inside `allow`.
    pub deny: Vec<String>,
    /// Whether apps may publish retained messages (and retained wills).
    pub retain: bool,
    /// Upstream SUBSCRIBE/UNSUBSCRIBE packets one session may cause at once…
    pub churn_burst: u32,
    /// …and per minute after that.
    pub churn_per_minute: u32,
    /// PUBLISHes all of a device's apps together may send the printer per
    /// second…
    pub publishes_per_second: u32,
    /// …and at once. Excess QoS 0 is dropped; excess QoS 1 and 2 waits
    /// without its PUBACK, up to 100 per session, past which the session
    /// is cut.
    pub publish_burst: u32,
    /// Bambu only: at most one `pushall` reaches the printer per this many
    /// seconds; apps' others are answered from the hub's state.
    pub pushall_interval_seconds: u64,
    /// CC2 only: apps' requests reach the printer one per this many
    /// milliseconds at most, so that its cooldown (three requests in quick
    /// succession, then about 5 s of dropped replies) never starts.
    pub request_interval_ms: u64,
    /// A filter whose SUBSCRIBE made the printer drop its connection twice
    /// (or a publisher whose PUBLISHes did) is refused for this long
    /// (SUBACK 0x80, MQTT 5 0x87), and never reaches the printer meanwhile.
    pub quarantine_seconds: u64,
    /// Bambu only: while apps hold the report and none has come for this
    /// long, the edge asks the printer for `pushall`…
    pub report_silence_seconds: u64,
    /// …and this long after that without a report the printer is silent:
    /// its connection is made again.
    pub pushall_answer_seconds: u64,
}

impl Default for PrinterPolicyConfig {
    fn default() -> Self {
        let churn = ChurnLimit::default();
        let rate = PublishRate::generic();
        PrinterPolicyConfig {
            allow: Vec::new(),
            deny: Vec::new(),
            retain: true,
            churn_burst: churn.burst,
            churn_per_minute: churn.per_minute,
            publishes_per_second: rate.per_second,
            publish_burst: rate.burst,
            pushall_interval_seconds: 10,
            request_interval_ms: 600,
            quarantine_seconds: 3600,
            report_silence_seconds: 20,
            pushall_answer_seconds: 10,
        }
    }
}

impl PrinterPolicyConfig {
    /// The policy for one printer, `{serial}` replaced.
    pub fn policy(&self, serial: Option<&str>) -> TopicPolicy {
        let serial =
            serial.filter(|serial| !serial.is_empty() && !serial.contains(['/', '+', '#', '\0']));
        let expand = |filter: &String, unknown: Option<&str>| -> Option<String> {
            if !filter.contains("{serial}") {
                return Some(filter.clone());
            }
            serial
                .or(unknown)
                .map(|serial| filter.replace("{serial}", serial))
        };
        TopicPolicy {
            allow: self.allow.iter().filter_map(|f| expand(f, None)).collect(),
            deny: self
                .deny
                .iter()
                .filter_map(|f| expand(f, Some("+")))
                .collect(),
            retain: self.retain,
        }
    }

    pub fn publish_rate(&self) -> PublishRate {
        PublishRate {
            per_second: self.publishes_per_second,
            burst: self.publish_burst,
            ..PublishRate::generic()
        }
    }

    pub fn quarantine(&self) -> QuarantinePolicy {
        QuarantinePolicy {
            duration: Duration::from_secs(self.quarantine_seconds),
            ..QuarantinePolicy::default()
        }
    }

    pub fn churn(&self) -> ChurnLimit {
        ChurnLimit {
            burst: self.churn_burst,
            per_minute: self.churn_per_minute,
        }
    }

    fn problems(&self, kind: &str, problems: &mut Vec<String>) {
        let limits = TopicLimits::SPEC;
        for filter in self.allow.iter().chain(&self.deny) {
            let concrete = filter.replace("{serial}", "serial");
            if let Err(error) = validate_topic_filter(&concrete, &limits) {
                problems.push(format!("printers.{kind}: filter {filter:?}: {error}"));
            }
        }
        if self.pushall_interval_seconds == 0 {
            problems.push(format!(
                "printers.{kind}: pushall_interval_seconds must be at least 1"
            ));
        }
        if self.request_interval_ms > 60_000 {
            problems.push(format!(
                "printers.{kind}: request_interval_ms must be at most 60000"
            ));
        }
        if self.publishes_per_second == 0 || self.publish_burst == 0 {
            problems.push(format!(
                "printers.{kind}: publishes_per_second and publish_burst must be at least 1"
            ));
        }
        if self.report_silence_seconds == 0 || self.pushall_answer_seconds == 0 {
            problems.push(format!(
                "printers.{kind}: report_silence_seconds and pushall_answer_seconds must be at least 1"
            ));
        }
        if self.quarantine_seconds == 0 {
            problems.push(format!(
                "printers.{kind}: quarantine_seconds must be at least 1"
            ));
        }
        if self.churn_burst == 0 || self.churn_per_minute == 0 {
            problems.push(format!(
                "printers.{kind}: churn_burst and churn_per_minute must be at least 1"
            ));
        }
    }
}

/// The QUIC listener agents dial.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    /// UDP address; off when absent. Uses the public certificate, so agents
    /// dial a name it covers (e.g. `tunnel.<base_domain>`).
    pub listen: Option<SocketAddr>,
    /// TCP address for the same tunnel over TLS (ALPN `relay-tunnel/1`),
    /// multiplexed by yamux, for agents whose network blocks UDP; off when
    /// absent. Same certificate. Port 0 with `listen` set: the QUIC
    /// listener's port (agents dial the same `host:port` over TCP).
    pub tcp_listen: Option<SocketAddr>,
    /// Also take the tunnel over TCP on the public TLS listener, told
    /// apart from apps by ALPN (`relay-tunnel/1`; apps offer `http/1.1` or
    /// nothing): for agents on networks where only port 443 gets out.
    pub tcp_on_public_listener: bool,
    /// Time for an agent to open its printer connection.
    pub session_open_timeout_seconds: u64,
    /// How long a printer connection stays up after its last client left.
    pub linger_seconds: u64,
    /// The edge sends the printer a PINGREQ this often, and ends a printer
    /// connection that has not answered one within 1.5 times this (the
    /// printer went silent); the agent then makes a new one.
    pub printer_keep_alive_seconds: u64,
    /// When a device's upstream ends (its agent reconnects, its printer
    /// drops the link), its hub keeps the client sessions this long while
    /// it finds a new one; a client arriving meanwhile waits for the agent.
    /// 0: sessions end with the upstream.
    pub upstream_grace_seconds: u64,
    /// QUIC keep-alive the agents are asked to use (told in HELLO_ACK):
    /// 25 s, below the UDP timeouts of home routers, as WireGuard's
    /// persistent keep-alive. Each keep-alive is a packet in and an ACK
    /// out: this is most of what an idle tunnel costs the edge.
    pub keep_alive_seconds: u32,
    /// An agent not heard from this long is gone (QUIC idle timeout; at
    /// least twice `keep_alive_seconds`, since a lost keep-alive is
    /// retransmitted within a second or so).
    pub idle_timeout_seconds: u32,
    /// Largest packet accepted from a printer.
    pub max_printer_packet: usize,
    /// Receive buffer asked for the tunnel's UDP socket: thousands of
    /// agents' handshakes arrive at once after a restart, and what does not
    /// fit is dropped and retransmitted a second later. The kernel caps it
    /// at `net.core.rmem_max`; the edge logs what it got.
    pub socket_receive_buffer_bytes: usize,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            listen: None,
            tcp_listen: None,
            tcp_on_public_listener: false,
            session_open_timeout_seconds: 20,
            linger_seconds: 30,
            printer_keep_alive_seconds: 30,
            upstream_grace_seconds: 30,
            keep_alive_seconds: 25,
            idle_timeout_seconds: 60,
            max_printer_packet: 256 * 1024,
            socket_receive_buffer_bytes: 4 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublicConfig {
    /// The wss listener.
    pub listen: Option<SocketAddr>,
    /// Optional plain ws:// listener for local development; off by default.
    pub plain_listen: Option<SocketAddr>,
    /// MQTT straight over TLS (mqtts) for apps without WebSocket, on the
    /// same certificate; the device comes from SNI. Off by default;
    /// production serves `0.0.0.0:8883`.
    pub mqtts_listen: Option<SocketAddr>,
    /// Plain MQTT over TCP for local development only (no TLS: the device
    /// comes from a device-bound key, or the user name `<device-id>`). Off
    /// by default.
    pub mqtt_plain_listen: Option<SocketAddr>,
    /// The wss listener also serves MQTT over TLS to clients that ask for
    /// ALPN `mqtt` (networks that allow only 443). Off by default.
    pub mqtt_on_public_listener: bool,
    /// Devices are `<device-id>.<base_domain>`.
    pub base_domain: String,
    /// The WebSocket path; `/` is accepted too unless `accept_root_path` is off.
    pub path: String,
    pub accept_root_path: bool,
    /// Also accept `/d/<device-id><path>` (e.g. `/d/abc/mqtt`), for hosts
    /// without wildcard DNS (`*.localhost` does not resolve with glibc).
    /// Off by default.
    pub device_in_path: bool,
    /// PEM certificate chain (a wildcard `*.<base_domain>` in production).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// How often the certificate files are checked for changes.
    pub tls_reload_seconds: u64,
    pub tls_handshake_timeout_seconds: u64,
    /// Time to receive a request's headers (slowloris).
    pub http_header_timeout_seconds: u64,
}

impl Default for PublicConfig {
    fn default() -> Self {
        PublicConfig {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 8443))),
            plain_listen: None,
            mqtts_listen: None,
            mqtt_plain_listen: None,
            mqtt_on_public_listener: false,
            base_domain: String::new(),
            path: "/mqtt".into(),
            accept_root_path: true,
            device_in_path: false,
            tls_cert: None,
            tls_key: None,
            tls_reload_seconds: 30,
            tls_handshake_timeout_seconds: 10,
            http_header_timeout_seconds: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://…` or `sqlite:…`. May hold a password.
    pub database_url: Secret<String>,
    /// Apply pending migrations at start-up.
    pub migrate: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    pub jwks_path: PathBuf,
    pub issuer: String,
    pub audience: String,
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
}

fn default_leeway() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_client_id_len: usize,
    pub max_topic_len: usize,
    /// Largest MQTT packet a client may send.
    pub max_packet_size: usize,
    pub max_subscriptions: usize,
    pub keep_alive_min_seconds: u16,
    pub keep_alive_max_seconds: u16,
    /// Time from the upgrade to a complete CONNECT.
    pub connect_timeout_seconds: u64,
    /// Bytes queued for one client before it is dropped as a slow consumer.
    pub outbound_buffer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_client_id_len: 64,
            max_topic_len: 128,
            max_packet_size: 64 * 1024,
            max_subscriptions: 100,
            keep_alive_min_seconds: 1,
            keep_alive_max_seconds: 300,
            connect_timeout_seconds: 10,
            outbound_buffer_bytes: 256 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    pub cache_success_seconds: u64,
    pub cache_failure_seconds: u64,
    /// Failed authentications allowed per client IP (and per API key id)
    /// per minute.
    pub failures_per_ip_per_minute: u32,
    /// Failed agent HELLOs allowed per minute per credential id, and per
    /// source address for credentials that cannot be valid (a valid one
    /// is checked whatever its address did). The name predates the id.
    pub agent_failures_per_ip_per_minute: u32,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            cache_success_seconds: 60,
            cache_failure_seconds: 5,
            failures_per_ip_per_minute: 30,
            agent_failures_per_ip_per_minute: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM, sessions get this long to close before the process exits.
    pub grace_period_seconds: u64,
    /// Once the sessions are gone, each agent is told (GO_AWAY) to move at a
    /// random moment within this window, so that they do not all say HELLO
    /// at once; its tunnel here serves until it is up on another instance.
    pub agent_reconnect_spread_ms: u32,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace_period_seconds: 20,
            agent_reconnect_spread_ms: 5_000,
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug)]
pub struct ConfigProblems(pub Vec<String>);

impl fmt::Display for ConfigProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration:")?;
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigProblems {}

impl EdgeConfig {
    /// Parses a TOML document (no validation).
    pub fn from_toml(text: &str) -> Result<EdgeConfig, ConfigProblems> {
        toml::from_str(text).map_err(|error| ConfigProblems(vec![error.to_string()]))
    }

    /// A configuration with defaults only (for building in code).
    pub fn defaults() -> EdgeConfig {
        EdgeConfig {
            public: PublicConfig::default(),
            admin: AdminConfig::default(),
            store: StoreConfig::default(),
            jwt: None,
            limits: Limits::default(),
            auth: AuthSection::default(),
            shutdown: ShutdownConfig::default(),
            tunnel: TunnelConfig::default(),
            printers: PrintersConfig::default(),
            quotas: QuotaConfig::default(),
            cluster: ClusterConfig::default(),
            console: ConsoleConfig::default(),
            runtime: RuntimeConfig::default(),
        }
    }

    /// Checks everything that can be checked without starting; returns all
    /// problems at once.
    pub fn validate(&self) -> Result<(), ConfigProblems> {
        let mut problems = Vec::new();
        if self.runtime.worker_threads > 1024 {
            problems.push(format!(
                "runtime.worker_threads ({}) must be at most 1024 (0: one per core)",
                self.runtime.worker_threads
            ));
        }
        let tunnel = &self.tunnel;
        if tunnel.keep_alive_seconds == 0
            || tunnel.idle_timeout_seconds < tunnel.keep_alive_seconds.saturating_mul(2)
        {
            problems.push(format!(
                "tunnel.keep_alive_seconds ({}) must be at least 1, and tunnel.idle_timeout_seconds ({}) at least twice it",
                tunnel.keep_alive_seconds, tunnel.idle_timeout_seconds
            ));
        }
        if !(1..=3600).contains(&tunnel.printer_keep_alive_seconds) {
            problems.push(format!(
                "tunnel.printer_keep_alive_seconds ({}) must be between 1 and 3600",
                tunnel.printer_keep_alive_seconds
            ));
        }
        let cluster = &self.cluster;
        if cluster.renew_seconds == 0 || cluster.renew_seconds * 2 > cluster.lease_seconds {
            problems.push(format!(
                "cluster.renew_seconds ({}) must be at least 1 and at most half of cluster.lease_seconds ({})",
                cluster.renew_seconds, cluster.lease_seconds
            ));
        }
        if !cluster
            .instance_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            || cluster.instance_id.len() > 253
        {
            problems.push(format!(
                "cluster.instance_id {:?} may hold letters, digits, '-', '_' and '.' only",
                cluster.instance_id
            ));
        }
        if cluster.peer_listen.is_some() {
            if cluster.secret.expose().len() < 16 {
                problems.push("cluster.secret (or RELAY_CLUSTER_SECRET) of at least 16 characters is required with cluster.peer_listen".into());
            }
            if let Some(oidc) = &self.console.oidc {
                let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                    .iter()
                    .any(|prefix| oidc.issuer.starts_with(prefix));
                if !(oidc.issuer.starts_with("https://") || loopback) {
                    problems.push("console.oidc.issuer must be https:// (http:// only on this machine's loopback)".into());
                }
                if oidc.client_id.is_empty() || oidc.client_secret.expose().is_empty() {
                    problems.push("console.oidc needs client_id and client_secret".into());
                }
                if oidc.tenant_claim.is_empty() {
                    problems.push(
                        "console.oidc.tenant_claim names the claim that names the tenant".into(),
                    );
                }
            }
            let unspecified = cluster
                .peer_listen
                .is_some_and(|listen| listen.ip().is_unspecified());
            if cluster.peer_address.is_empty() && unspecified {
                problems.push("cluster.peer_address (or RELAY_PEER_ADDRESS) is required when cluster.peer_listen is a wildcard address: other instances dial it".into());
            } else if !cluster.peer_address.is_empty()
                && cluster.peer_address.parse::<SocketAddr>().is_err()
            {
                problems.push(format!(
                    "cluster.peer_address {:?} must be an IP address and port",
                    cluster.peer_address
                ));
            }
            if self.public.tls_cert.is_none() {
                problems.push("cluster.peer_listen needs public.tls_cert and public.tls_key (its TLS certificate)".into());
            }
        }
        let public = &self.public;
        if public.base_domain.is_empty() {
            problems.push(
                "public.base_domain is required (devices are <device-id>.<base_domain>)".into(),
            );
        } else if !valid_domain(&public.base_domain) {
            problems.push(format!(
                "public.base_domain {:?} is not a DNS name",
                public.base_domain
            ));
        }
        if !public.path.starts_with('/') || public.path.contains(['?', '#', ' ']) {
            problems.push(format!(
                "public.path {:?} must be an absolute path",
                public.path
            ));
        }
        if public.listen.is_none() && public.plain_listen.is_none() {
            problems.push(
                "neither public.listen nor public.plain_listen is set: nothing to serve".into(),
            );
        }
        if public.listen.is_some() {
            for (name, value) in [
                ("public.tls_cert", &public.tls_cert),
                ("public.tls_key", &public.tls_key),
            ] {
                match value {
                    None => problems.push(format!("{name} is required when public.listen is set")),
                    Some(path) if !path.is_file() => {
                        problems.push(format!("{name}: {} is not a readable file", path.display()));
                    }
                    Some(_) => {}
                }
            }
        }
        for (name, seconds) in [
            ("public.tls_reload_seconds", public.tls_reload_seconds),
            (
                "public.tls_handshake_timeout_seconds",
                public.tls_handshake_timeout_seconds,
            ),
            (
                "public.http_header_timeout_seconds",
                public.http_header_timeout_seconds,
            ),
            (
                "limits.connect_timeout_seconds",
                self.limits.connect_timeout_seconds,
            ),
        ] {
            if seconds == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        if self.store.database_url.expose().is_empty() {
            problems.push(
                "store.database_url is required (or RELAY_DATABASE_URL, or --database-url)".into(),
            );
        } else if !["postgres://", "postgresql://", "sqlite:"]
            .iter()
            .any(|scheme| self.store.database_url.expose().starts_with(scheme))
        {
            problems.push(
                "store.database_url must start with postgres://, postgresql:// or sqlite:".into(),
            );
        }
        let limits = &self.limits;
        if limits.keep_alive_min_seconds == 0
            || limits.keep_alive_min_seconds > limits.keep_alive_max_seconds
        {
            problems
                .push("limits: need 1 <= keep_alive_min_seconds <= keep_alive_max_seconds".into());
        }
        if limits.max_packet_size < 128 {
            problems.push("limits.max_packet_size must be at least 128 bytes".into());
        }
        if limits.max_topic_len == 0
            || limits.max_client_id_len == 0
            || limits.max_subscriptions == 0
        {
            problems.push(
                "limits: max_topic_len, max_client_id_len and max_subscriptions must be positive"
                    .into(),
            );
        }
        self.printers.mqtt.problems("mqtt", &mut problems);
        self.printers.bambu.problems("bambu", &mut problems);
        self.printers
            .elegoo_cc2
            .problems("elegoo_cc2", &mut problems);
        if limits.outbound_buffer_bytes < limits.max_packet_size {
            problems.push(
                "limits.outbound_buffer_bytes must hold at least one max_packet_size packet".into(),
            );
        }
        if self.tunnel.listen.is_some() && (public.tls_cert.is_none() || public.tls_key.is_none()) {
            problems.push(
                "tunnel.listen needs public.tls_cert and public.tls_key (QUIC is always TLS)"
                    .into(),
            );
        }
        if self.tunnel.tcp_listen.is_some()
            && (public.tls_cert.is_none() || public.tls_key.is_none())
        {
            problems.push(
                "tunnel.tcp_listen needs public.tls_cert and public.tls_key (the tunnel is always TLS)"
                    .into(),
            );
        }
        if self.tunnel.tcp_on_public_listener
            && (public.listen.is_none() || public.tls_cert.is_none() || public.tls_key.is_none())
        {
            problems.push(
                "tunnel.tcp_on_public_listener needs the public TLS listener (public.listen, tls_cert, tls_key)"
                    .into(),
            );
        }
        if let Some(jwt) = &self.jwt {
            if !jwt.jwks_path.is_file() {
                problems.push(format!(
                    "jwt.jwks_path: {} is not a readable file",
                    jwt.jwks_path.display()
                ));
            }
            if jwt.issuer.is_empty() || jwt.audience.is_empty() {
                problems.push("jwt.issuer and jwt.audience are required".into());
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigProblems(problems))
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.connect_timeout_seconds)
    }
}

fn valid_domain(domain: &str) -> bool {
    domain.len() <= 253
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_at_once() {
        let config = EdgeConfig::from_toml(
            r#"
            [public]
            base_domain = "bad domain"
            path = "mqtt"
            tls_cert = "/nonexistent/cert.pem"
            [limits]
            keep_alive_min_seconds = 10
            keep_alive_max_seconds = 5
            "#,
        )
        .unwrap();
        let problems = config.validate().unwrap_err().0;
        let text = problems.join("\n");
        for expected in [
            "base_domain",
            "public.path",
            "public.tls_cert",
            "public.tls_key is required",
            "database_url is required",
            "keep_alive_min_seconds",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
        assert_eq!(problems.len(), 6, "{text}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = EdgeConfig::from_toml("[public]\nbase_domian = \"x\"\n").unwrap_err();
        assert!(error.to_string().contains("base_domian"), "{error}");
    }

    #[test]
    fn the_database_url_never_prints() {
        let mut config = EdgeConfig::defaults();
        config.store.database_url = "postgres://relay:hunter2@db/relay".into();
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
