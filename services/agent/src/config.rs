//! The agent's one configuration file (TOML), with secrets masked in
//! `Debug`. Validated once; every problem is reported together.

use std::path::PathBuf;

use relay_proto::Secret;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub edge: EdgeSection,
    pub printer: PrinterSection,
    /// Refuse to forward any PUBLISH to the printer.
    #[serde(default)]
    pub read_only: bool,
    /// Keep a logged-in printer connection even while no client is there,
    /// so the first client does not wait for the printer's handshake.
    /// Off by default: the agent then connects when the edge asks (first
    /// client) and disconnects when the edge lets the link go (its
    /// `tunnel.linger_seconds` after the last client).
    #[serde(default)]
    pub always_on: bool,
    /// LAN apps served on the agent's one printer connection; absent:
    /// none (the agent then listens on nothing).
    #[serde(default)]
    pub lan: Option<LanSection>,
}

/// `[lan]`: MQTT listeners for apps on the LAN, on the printer's one
/// connection (the agent's local hub), working while the edge is away.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanSection {
    /// `host:port` of plain MQTT (3.1, 3.1.1 and 5), for example
    /// `0.0.0.0:1883`.
    #[serde(default)]
    pub listen: Option<String>,
    /// `host:port` of MQTT over TLS, the "virtual printer" Bambu-native apps
    /// expect, for example `0.0.0.0:8883`.
    #[serde(default)]
    pub tls_listen: Option<String>,
    /// Where the TLS listener's certificate and key are kept (PEM), both
    /// required with `tls_listen`. Made at the first start when neither
    /// exists (common name: the printer's serial; the key with mode 0600)
    /// and kept from then on, so apps that pinned it keep working.
    #[serde(default)]
    pub certificate_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The user name LAN apps log in with. Absent: the printer's own
    /// (`bblp` on a Bambu printer, `elegoo` on a CC2).
    #[serde(default)]
    pub username: Option<String>,
    /// Their password. Absent: the printer's own access code (or password).
    #[serde(default)]
    pub password: Option<Secret<String>>,
    /// Serve apps that send no credentials at all. Off unless set.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// LAN apps connected at once; the next gets CONNACK 3.
    #[serde(default = "default_lan_clients")]
    pub max_clients: usize,
    /// Largest MQTT packet from or to a LAN app, in bytes.
    #[serde(default = "default_lan_packet")]
    pub max_packet: usize,
    /// Largest keep-alive a LAN app may ask for, in seconds (0, "none",
    /// is served as this).
    #[serde(default = "default_lan_keep_alive")]
    pub max_keep_alive_seconds: u16,
    /// Filters one LAN app may hold.
    #[serde(default = "default_lan_subscriptions")]
    pub max_subscriptions: usize,
    /// Bytes queued for one LAN app before it is cut as a slow consumer.
    #[serde(default = "default_lan_outbound")]
    pub max_outbound_bytes: usize,
    /// `host:port` on which to answer an Elegoo CC2's UDP discovery
    /// (`0.0.0.0:52700`), as the printer, with this machine's address, for
    /// apps that find the printer only that way. Off unless set; CC2 only.
    /// The printer still answers too: apps see two.
    #[serde(default)]
    pub cc2_discovery_listen: Option<String>,
    /// The name the discovery answer gives (apps show it as the printer's).
    #[serde(default = "default_cc2_discovery_name")]
    pub cc2_discovery_name: String,
}

fn default_cc2_discovery_name() -> String {
    "Centauri Carbon 2 (relay agent)".into()
}

fn default_lan_clients() -> usize {
    25
}

fn default_lan_packet() -> usize {
    1024 * 1024
}

fn default_lan_keep_alive() -> u16 {
    300
}

fn default_lan_subscriptions() -> usize {
    100
}

fn default_lan_outbound() -> usize {
    4 * 1024 * 1024
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSection {
    /// `host:port` of the edge's QUIC listener.
    pub address: String,
    /// More `host:port`s of edge instances, tried in order after `address`
    /// when it fails, as several DNS records would be: for places with no
    /// load balancer in front of the instances.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The name on the edge's certificate (defaults to the host of `address`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM CA to trust for the edge (required: agents pin their operator's CA).
    pub ca_file: PathBuf,
    /// The agent credential (`rla_…`) from `relayctl agent issue`.
    pub credential: Secret<String>,
    #[serde(default = "default_quic_keep_alive")]
    pub keep_alive_seconds: u64,
    /// How the tunnel reaches the edge: QUIC, TLS over TCP (for networks
    /// that block UDP), or QUIC first and TCP when QUIC has no handshake
    /// within seconds.
    #[serde(default)]
    pub transport: TransportChoice,
    /// `host:port` of the edge's TCP tunnel listener for `address`
    /// (default: `address`, the same host and port over TCP). The
    /// `addresses` are dialled over TCP at their own host and port.
    #[serde(default)]
    pub tcp_address: Option<String>,
    /// With `transport = "auto"`, while the tunnel is on TCP: how often
    /// (jittered, half to all of it) the agent tries a QUIC handshake, and
    /// moves the tunnel back to QUIC once one succeeds.
    #[serde(default = "default_quic_probe")]
    pub quic_probe_seconds: u64,
}

/// The agent's `edge.transport`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// QUIC first; TLS over TCP when QUIC has no handshake in time.
    #[default]
    Auto,
    Quic,
    Tcp,
}

impl EdgeSection {
    /// Where the TCP tunnel listener is: `tcp_address`, or `address` (the
    /// edge serves the tunnel on the same port over UDP and TCP).
    pub fn tcp_address(&self) -> String {
        self.tcp_address_for(&self.address)
    }

    /// Where the TCP tunnel listener is for one of the edge addresses:
    /// `tcp_address` for `address`, the same host and port for the others.
    pub fn tcp_address_for(&self, address: &str) -> String {
        match &self.tcp_address {
            Some(tcp) if address == self.address => tcp.clone(),
            _ => address.to_owned(),
        }
    }
}

/// How often an agent on TCP tries QUIC again.
fn default_quic_probe() -> u64 {
    60
}

/// The edge's default (its idle timeout, 60 s, is more than twice this).
fn default_quic_keep_alive() -> u64 {
    25
}

/// The printer as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum PrinterSection {
    /// A Bambu Lab printer in LAN mode: mqtts 8883, user `bblp`.
    #[serde(rename = "bambu")]
    Bambu {
        host: String,
        serial: String,
        access_code: Secret<String>,
        #[serde(default)]
        port: Option<u16>,
        /// CA that signed the printer's certificate.
        #[serde(default)]
        ca_file: Option<PathBuf>,
        #[serde(default)]
        insecure: bool,
        #[serde(default)]
        max_tls_1_2: bool,
        /// SHA-256 (hex) of the printer's certificate, pinned instead of a CA.
        #[serde(default)]
        fingerprint: Option<String>,
        /// Learn the fingerprint on the first connection and keep it in
        /// `fingerprint_file`; later connections must present the same one.
        #[serde(default)]
        pin_on_first_use: bool,
        #[serde(default)]
        fingerprint_file: Option<PathBuf>,
    },
    /// An Elegoo Centauri Carbon 2: plain MQTT on 1883, user `elegoo`, the
    /// access code as the password (`123456` when the printer shows none).
    /// The agent registers once with a client id of its own and keeps the
    /// registration alive with the printer's JSON heartbeat.
    #[serde(rename = "elegoo_cc2")]
    ElegooCc2 {
        host: String,
        serial: String,
        #[serde(default)]
        access_code: Option<Secret<String>>,
        #[serde(default)]
        port: Option<u16>,
        /// How often the agent sends the heartbeat that keeps its
        /// registration (apps send one every 10 s; the printer forgets a
        /// registration after about 6 minutes without).
        #[serde(default = "cc2_heartbeat_ms")]
        heartbeat_interval_ms: u64,
    },
    /// Any MQTT broker (the option set of the OctoPrint MQTT plugin).
    #[serde(rename = "mqtt")]
    Mqtt {
        host: String,
        #[serde(default)]
        port: Option<u16>,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<Secret<String>>,
        #[serde(default)]
        keep_alive_seconds: Option<u16>,
        #[serde(default)]
        tls: bool,
        #[serde(default)]
        ca_file: Option<PathBuf>,
        #[serde(default)]
        insecure: bool,
        /// "3.1" or "3.1.1" (default).
        #[serde(default)]
        protocol: Option<String>,
        /// PEM client certificate chain and key, for brokers that ask for one.
        #[serde(default)]
        client_cert: Option<PathBuf>,
        #[serde(default)]
        client_key: Option<PathBuf>,
        /// Cipher suites to allow (rustls names, e.g. TLS13_AES_128_GCM_SHA256).
        #[serde(default)]
        ciphers: Option<Vec<String>>,
    },
}

/// What kind of printer, with what credentials.
#[derive(Debug, Clone)]
pub enum PrinterKind {
    Bambu {
        serial: String,
        access_code: Secret<String>,
    },
    Mqtt {
        username: Option<String>,
        password: Option<Secret<String>>,
        tls: bool,
    },
    ElegooCc2 {
        serial: String,
        access_code: Secret<String>,
        heartbeat_interval: std::time::Duration,
    },
}

fn cc2_heartbeat_ms() -> u64 {
    10_000
}

/// The password of a CC2 that reports no access code.
pub const CC2_DEFAULT_ACCESS_CODE: &str = "123456";

/// How the printer's certificate is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pinning {
    /// Chain to `ca_file` (and, for Bambu, the serial as common name).
    CertificateAuthority,
    /// This SHA-256 fingerprint (hex, lower case).
    Fingerprint(String),
    /// Learn it on first use, keep it in this file.
    OnFirstUse(PathBuf),
}

/// The printer connection's settings, checked.
#[derive(Debug, Clone)]
pub struct PrinterConfig {
    pub host: String,
    pub port: Option<u16>,
    pub kind: PrinterKind,
    pub ca_file: Option<PathBuf>,
    pub insecure: bool,
    pub max_tls_1_2: bool,
    pub keep_alive_seconds: u16,
    pub mqtt_3_1: bool,
    pub client_id: String,
    pub pinning: Pinning,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub ciphers: Option<Vec<String>>,
}

impl PrinterConfig {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match &self.kind {
            PrinterKind::Bambu { .. } => 8883,
            PrinterKind::Mqtt { tls: true, .. } => 8883,
            PrinterKind::Mqtt { tls: false, .. } | PrinterKind::ElegooCc2 { .. } => 1883,
        })
    }

    /// User name and password for CONNECT.
    pub fn credentials(&self) -> (Option<String>, Option<Secret<String>>) {
        match &self.kind {
            PrinterKind::Bambu { access_code, .. } => {
                (Some("bblp".into()), Some(access_code.clone()))
            }
            PrinterKind::Mqtt {
                username, password, ..
            } => (username.clone(), password.clone()),
            PrinterKind::ElegooCc2 { access_code, .. } => {
                (Some("elegoo".into()), Some(access_code.clone()))
            }
        }
    }
}

impl EdgeSection {
    /// Every edge address, in the order they are tried.
    pub fn all_addresses(&self) -> Vec<&str> {
        std::iter::once(self.address.as_str())
            .chain(self.addresses.iter().map(String::as_str))
            .collect()
    }
}

impl AgentConfig {
    pub fn from_toml(text: &str) -> Result<AgentConfig, Vec<String>> {
        toml::from_str(text).map_err(|error| vec![error.to_string()])
    }

    /// Checks the file's values; returns the printer settings or every problem.
    pub fn validate(&self) -> Result<PrinterConfig, Vec<String>> {
        let mut problems = Vec::new();
        for address in self.edge.all_addresses() {
            if !address.contains(':') {
                problems.push(format!("edge address {address:?} must be host:port"));
            }
        }
        if self.edge.quic_probe_seconds == 0 {
            problems.push("edge.quic_probe_seconds must be at least 1".into());
        }
        if !self.edge.ca_file.is_file() {
            problems.push(format!(
                "edge.ca_file {} is not a readable file",
                self.edge.ca_file.display()
            ));
        }
        if !self.edge.credential.expose().starts_with("rla_") {
            problems.push(
                "edge.credential must be an agent credential (rla_…) from `relayctl agent issue`"
                    .into(),
            );
        }
        let client_id = format!("relay-agent-{}", std::process::id());
        let printer = match &self.printer {
            PrinterSection::Bambu {
                host,
                serial,
                access_code,
                port,
                ca_file,
                insecure,
                max_tls_1_2,
                fingerprint,
                pin_on_first_use,
                fingerprint_file,
            } => {
                if serial.is_empty() {
                    problems.push("printer.serial is required".into());
                }
                if access_code.expose().len() != 8 {
                    problems
                        .push("printer.access_code must be the 8-character LAN access code".into());
                }
                let pinning = match (fingerprint, pin_on_first_use, fingerprint_file) {
                    (Some(fingerprint), _, _) => {
                        let fingerprint = fingerprint.replace(':', "").to_ascii_lowercase();
                        if fingerprint.len() != 64
                            || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit())
                        {
                            problems.push("printer.fingerprint must be a SHA-256 in hex".into());
                        }
                        Pinning::Fingerprint(fingerprint)
                    }
                    (None, true, Some(file)) => Pinning::OnFirstUse(file.clone()),
                    (None, true, None) => {
                        problems
                            .push("printer.pin_on_first_use needs printer.fingerprint_file".into());
                        Pinning::CertificateAuthority
                    }
                    (None, false, _) => {
                        if ca_file.is_none() && !insecure {
                            problems.push(
                                "printer: set ca_file, fingerprint, pin_on_first_use, or insecure = true".into(),
                            );
                        }
                        Pinning::CertificateAuthority
                    }
                };
                PrinterConfig {
                    host: host.clone(),
                    port: *port,
                    kind: PrinterKind::Bambu {
                        serial: serial.clone(),
                        access_code: access_code.clone(),
                    },
                    ca_file: ca_file.clone(),
                    insecure: *insecure,
                    max_tls_1_2: *max_tls_1_2,
                    keep_alive_seconds: 60,
                    mqtt_3_1: false,
                    client_id,
                    pinning,
                    client_cert: None,
                    ciphers: None,
                }
            }
            PrinterSection::ElegooCc2 {
                host,
                serial,
                access_code,
                port,
                heartbeat_interval_ms,
            } => {
                if serial.is_empty() {
                    problems.push("printer.serial is required".into());
                }
                if !(100..=60_000).contains(heartbeat_interval_ms) {
                    problems
                        .push("printer.heartbeat_interval_ms must be between 100 and 60000".into());
                }
                PrinterConfig {
                    host: host.clone(),
                    port: *port,
                    kind: PrinterKind::ElegooCc2 {
                        serial: serial.clone(),
                        access_code: access_code
                            .clone()
                            .unwrap_or_else(|| CC2_DEFAULT_ACCESS_CODE.into()),
                        heartbeat_interval: std::time::Duration::from_millis(
                            *heartbeat_interval_ms,
                        ),
                    },
                    ca_file: None,
                    insecure: false,
                    max_tls_1_2: false,
                    keep_alive_seconds: 60,
                    mqtt_3_1: false,
                    client_id,
                    pinning: Pinning::CertificateAuthority,
                    client_cert: None,
                    ciphers: None,
                }
            }
            PrinterSection::Mqtt {
                host,
                port,
                username,
                password,
                keep_alive_seconds,
                tls,
                ca_file,
                insecure,
                protocol,
                client_cert,
                client_key,
                ciphers,
            } => {
                if password.is_some() && username.is_none() {
                    problems.push("printer.password needs printer.username".into());
                }
                if *tls && ca_file.is_none() && !insecure {
                    problems.push("printer: tls needs ca_file or insecure = true".into());
                }
                let mqtt_3_1 = match protocol.as_deref() {
                    None | Some("3.1.1") => false,
                    Some("3.1") => true,
                    Some(other) => {
                        problems.push(format!("printer.protocol {other:?} must be 3.1 or 3.1.1"));
                        false
                    }
                };
                let client_cert = match (client_cert, client_key) {
                    (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                    (None, None) => None,
                    _ => {
                        problems
                            .push("printer.client_cert and printer.client_key go together".into());
                        None
                    }
                };
                PrinterConfig {
                    host: host.clone(),
                    port: *port,
                    kind: PrinterKind::Mqtt {
                        username: username.clone(),
                        password: password.clone(),
                        tls: *tls,
                    },
                    ca_file: ca_file.clone(),
                    insecure: *insecure,
                    max_tls_1_2: false,
                    keep_alive_seconds: keep_alive_seconds.unwrap_or(60),
                    mqtt_3_1,
                    client_id,
                    pinning: Pinning::CertificateAuthority,
                    client_cert,
                    ciphers: ciphers.clone(),
                }
            }
        };
        if let Some(lan) = &self.lan {
            lan.problems(&mut problems);
            if lan.username.is_none() && printer.credentials().0.is_none() && !lan.allow_anonymous {
                problems.push(
                    "lan: the printer has no user name to check LAN apps against: set lan.username and lan.password (or, knowingly, lan.allow_anonymous = true)"
                        .into(),
                );
            }
            if lan.cc2_discovery_listen.is_some()
                && !matches!(printer.kind, PrinterKind::ElegooCc2 { .. })
            {
                problems.push(
                    "lan.cc2_discovery_listen answers an Elegoo CC2's discovery: the printer is not one"
                        .into(),
                );
            }
            if self.always_on {
                problems.push(
                    "always_on and [lan] do not go together: with [lan] the agent's hub holds the printer connection while apps are there"
                        .into(),
                );
            }
        }
        if problems.is_empty() {
            Ok(printer)
        } else {
            Err(problems)
        }
    }
}

impl LanSection {
    fn problems(&self, problems: &mut Vec<String>) {
        if self.listen.is_none() && self.tls_listen.is_none() {
            problems.push("lan: set listen, tls_listen or both".into());
        }
        for (name, address) in [
            ("listen", &self.listen),
            ("tls_listen", &self.tls_listen),
            ("cc2_discovery_listen", &self.cc2_discovery_listen),
        ] {
            if let Some(address) = address
                && address.parse::<std::net::SocketAddr>().is_err()
            {
                problems.push(format!("lan.{name} {address:?} must be ip:port"));
            }
        }
        if self.tls_listen.is_some() && (self.certificate_file.is_none() || self.key_file.is_none())
        {
            problems.push(
                "lan.tls_listen needs lan.certificate_file and lan.key_file (made at the first start when missing)"
                    .into(),
            );
        }
        if self.password.is_some() != self.username.is_some() {
            problems.push("lan.username and lan.password go together".into());
        }
        if self.max_clients == 0 {
            problems.push("lan.max_clients must be at least 1".into());
        }
        if self.max_packet < 1024 {
            problems.push("lan.max_packet must be at least 1024".into());
        }
        if self.max_subscriptions == 0 {
            problems.push("lan.max_subscriptions must be at least 1".into());
        }
        if self.max_keep_alive_seconds == 0 {
            problems.push("lan.max_keep_alive_seconds must be at least 1".into());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The problems validation finds with `[lan]` (the rest of this
    /// configuration names files this machine does not have).
    fn problems(printer: &str, lan: &str) -> Vec<String> {
        let text = format!(
            r#"
            [edge]
            address = "127.0.0.1:4433"
            credential = "rla_k1_secret"
            ca_file = "/etc/relay-agent/edge-ca.pem"
            {lan}
            [printer]
            host = "192.168.1.20"
            {printer}
            "#
        );
        AgentConfig::from_toml(&text)
            .and_then(|config| config.validate().map(|_| ()))
            .err()
            .unwrap_or_default()
            .into_iter()
            .filter(|problem| problem.starts_with("lan"))
            .collect()
    }

    const BAMBU: &str = r#"kind = "bambu"
        serial = "01S00A000000000"
        access_code = "12345678""#;
    const CC2: &str = r#"kind = "elegoo_cc2"
        serial = "F01CC2000000007"
        access_code = "654321""#;

    #[test]
    fn a_lan_section_that_serves_nothing_or_badly_is_refused_with_reasons() {
        assert_eq!(
            problems(BAMBU, "[lan]\nlisten = \"0.0.0.0:1883\""),
            Vec::<String>::new()
        );
        let all = problems(
            BAMBU,
            "[lan]\nmax_clients = 0\nusername = \"owner\"\ntls_listen = \"nowhere\"",
        );
        for expected in [
            "lan.tls_listen \"nowhere\" must be ip:port",
            "lan.tls_listen needs lan.certificate_file",
            "lan.username and lan.password go together",
            "lan.max_clients must be at least 1",
        ] {
            assert!(
                all.iter().any(|problem| problem.contains(expected)),
                "{expected}: {all:?}"
            );
        }
        assert!(
            problems(BAMBU, "[lan]\n")
                .iter()
                .any(|problem| problem.contains("set listen, tls_listen or both"))
        );
    }

    #[test]
    fn cc2_discovery_is_for_a_cc2_only() {
        let discovery =
            "[lan]\nlisten = \"0.0.0.0:1883\"\ncc2_discovery_listen = \"0.0.0.0:52700\"";
        assert_eq!(problems(CC2, discovery), Vec::<String>::new());
        assert!(
            problems(BAMBU, discovery)
                .iter()
                .any(|problem| problem.contains("the printer is not one"))
        );
        let bad = "[lan]\nlisten = \"0.0.0.0:1883\"\ncc2_discovery_listen = \"52700\"";
        assert!(
            problems(CC2, bad)
                .iter()
                .any(|problem| problem
                    .contains("lan.cc2_discovery_listen \"52700\" must be ip:port"))
        );
    }
}
