//! `relay-agent setup`: a guided first run. It asks (or takes from flags)
//! the edge's address, its CA, the agent credential and the printer, writes
//! the configuration file with mode 0600, then tries the edge and the
//! printer and says in plain words what works and what does not.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use crate::config::AgentConfig;
use crate::{printer, tunnel};

/// What `setup` is told by flags; what is missing is asked for in a
/// terminal, and is an error otherwise.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SetupArgs {
    /// The configuration file to write
    #[arg(long, default_value = "/etc/relay/agent.toml")]
    pub config: PathBuf,
    /// Replace the file if it exists
    #[arg(long)]
    pub force: bool,
    /// Only write the file; do not try the edge and the printer
    #[arg(long)]
    pub no_probe: bool,
    /// The edge's tunnel address, host:port (from your operator)
    #[arg(long)]
    pub edge: Option<String>,
    /// The name on the edge's certificate, when not the address's host
    #[arg(long)]
    pub server_name: Option<String>,
    /// The edge's CA certificate, PEM (from your operator)
    #[arg(long)]
    pub edge_ca: Option<PathBuf>,
    /// The agent credential, rla_… (from your operator); without one, the
    /// agent pairs by a code (--pair)
    #[arg(long, hide_env_values = true)]
    pub credential: Option<String>,
    /// Pair with the relay at this URL (https://…): the agent shows a code
    /// that the printer's owner enters in the relay's console, and gets its
    /// credential when they approve
    #[arg(long, conflicts_with = "credential")]
    pub pair: Option<String>,
    /// With --pair: connect here (host:port) instead of looking the URL's
    /// host up
    #[arg(long, requires = "pair")]
    pub pair_connect: Option<String>,
    /// bambu (a Bambu Lab printer), elegoo_cc2 (an Elegoo Centauri
    /// Carbon 2) or mqtt (any MQTT broker)
    #[arg(long)]
    pub kind: Option<String>,
    /// The printer's address on your network
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub port: Option<u16>,
    /// Bambu and CC2: the printer's serial number
    #[arg(long)]
    pub serial: Option<String>,
    /// Bambu: the LAN access code (8 characters, on the printer's screen);
    /// CC2: its access code, when the printer shows one
    #[arg(long, hide_env_values = true)]
    pub access_code: Option<String>,
    /// Bambu: the CA that signed the printer's certificate; without one, the
    /// certificate is pinned on first use
    #[arg(long)]
    pub printer_ca: Option<PathBuf>,
    /// mqtt: user name and password, if the broker wants them
    #[arg(long)]
    pub username: Option<String>,
    #[arg(long, hide_env_values = true)]
    pub password: Option<String>,
    /// Serve apps on your LAN on the agent's one printer connection, with
    /// plain MQTT on this port (asked in a terminal when not given)
    #[arg(long)]
    pub lan_port: Option<u16>,
    /// With --lan-port: MQTT over TLS for LAN apps on this port too (the
    /// "virtual printer" Bambu-native apps expect, usually 8883)
    #[arg(long)]
    pub lan_tls_port: Option<u16>,
    /// Do not serve LAN apps, and do not ask
    #[arg(long, conflicts_with_all = ["lan_port", "lan_tls_port"])]
    pub no_lan: bool,
}

/// Where `setup` keeps the LAN listener's certificate and key.
const LAN_CERTIFICATE: &str = "/var/lib/relay-agent/lan-certificate.pem";
const LAN_KEY: &str = "/var/lib/relay-agent/lan-key.pem";

/// Asks for what the flags left out, one line each, while stdin is a
/// terminal; otherwise lists what is missing.
struct Asker {
    interactive: bool,
    missing: Vec<&'static str>,
}

impl Asker {
    fn value(&mut self, given: Option<String>, flag: &'static str, question: &str) -> String {
        if let Some(value) = given {
            return value;
        }
        if !self.interactive {
            self.missing.push(flag);
            return String::new();
        }
        eprint!("{question}: ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        line.trim().to_owned()
    }

    /// A value that may be left out: asked for in a terminal (an empty
    /// answer leaves it out), absent otherwise.
    fn optional(&mut self, given: Option<String>, question: &str) -> Option<String> {
        if given.is_some() || !self.interactive {
            return given;
        }
        eprint!("{question}: ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        Some(line.trim().to_owned()).filter(|answer| !answer.is_empty())
    }
}

fn quote(value: &str) -> String {
    let escaped: String = value
        .chars()
        .flat_map(|c| match c {
            '"' => vec!['\\', '"'],
            '\\' => vec!['\\', '\\'],
            c => vec![c],
        })
        .collect();
    format!("\"{escaped}\"")
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// The configuration file for `args`, or what is missing.
pub fn config_text(args: &SetupArgs, interactive: bool) -> Result<String, Vec<&'static str>> {
    let mut ask = Asker {
        interactive,
        missing: Vec::new(),
    };
    let edge = ask.value(
        args.edge.clone(),
        "--edge",
        "Edge address (host:port, from your operator)",
    );
    let edge_ca = ask.value(
        args.edge_ca
            .as_ref()
            .map(|path| absolute(path).display().to_string()),
        "--edge-ca",
        "Edge CA file (PEM, from your operator)",
    );
    let credential = ask.value(
        args.credential.clone(),
        "--credential",
        "Agent credential (rla_…)",
    );
    let kind = ask.value(
        args.kind.clone(),
        "--kind",
        "Printer kind (bambu, elegoo_cc2 or mqtt)",
    );
    let host = ask.value(
        args.host.clone(),
        "--host",
        "Printer address on your network",
    );
    let mut text = format!(
        "# Written by relay-agent setup. Holds secrets: keep it mode 0600.\n\n[edge]\naddress = {}\nca_file = {}\ncredential = {}\n",
        quote(&edge),
        quote(&edge_ca),
        quote(&credential)
    );
    if let Some(name) = &args.server_name {
        text.push_str(&format!("server_name = {}\n", quote(name)));
    }
    text.push_str(&format!(
        "\n[printer]\nkind = {}\nhost = {}\n",
        quote(&kind),
        quote(&host)
    ));
    if let Some(port) = args.port {
        text.push_str(&format!("port = {port}\n"));
    }
    match kind.as_str() {
        "bambu" => {
            let serial = ask.value(args.serial.clone(), "--serial", "Printer serial number");
            let code = ask.value(
                args.access_code.clone(),
                "--access-code",
                "LAN access code (8 characters, on the printer's screen)",
            );
            text.push_str(&format!(
                "serial = {}\naccess_code = {}\n",
                quote(&serial),
                quote(&code)
            ));
            match &args.printer_ca {
                Some(ca) => text.push_str(&format!(
                    "ca_file = {}\n",
                    quote(&absolute(ca).display().to_string())
                )),
                None => text.push_str(
                    "pin_on_first_use = true\nfingerprint_file = \"/var/lib/relay-agent/printer.fingerprint\"\n",
                ),
            }
        }
        "elegoo_cc2" => {
            let serial = ask.value(
                args.serial.clone(),
                "--serial",
                "Printer serial number (Settings > About on the printer)",
            );
            text.push_str(&format!("serial = {}\n", quote(&serial)));
            let code = ask.optional(
                args.access_code.clone(),
                "Access code (Settings > Network on the printer; empty if it shows none)",
            );
            if let Some(code) = code {
                text.push_str(&format!("access_code = {}\n", quote(&code)));
            }
        }
        _ => {
            if let Some(user) = &args.username {
                text.push_str(&format!("username = {}\n", quote(user)));
            }
            if let Some(password) = &args.password {
                text.push_str(&format!("password = {}\n", quote(password)));
            }
        }
    }
    let (lan_port, lan_tls_port) = lan_ports(args, &mut ask);
    if let Some(port) = lan_port {
        text.push_str(&format!("\n[lan]\nlisten = \"0.0.0.0:{port}\"\n"));
        if let Some(tls) = lan_tls_port {
            text.push_str(&format!(
                "tls_listen = \"0.0.0.0:{tls}\"\ncertificate_file = {}\nkey_file = {}\n",
                quote(LAN_CERTIFICATE),
                quote(LAN_KEY)
            ));
        }
    }
    if ask.missing.is_empty() {
        Ok(text)
    } else {
        Err(ask.missing)
    }
}

/// The LAN ports: from the flags, or asked in a terminal (empty answers:
/// no LAN, no TLS listener).
fn lan_ports(args: &SetupArgs, ask: &mut Asker) -> (Option<u16>, Option<u16>) {
    if args.no_lan || args.lan_port.is_some() || !ask.interactive {
        return (args.lan_port, args.lan_port.and(args.lan_tls_port));
    }
    let port = |answer: Option<String>| answer.and_then(|answer| answer.parse::<u16>().ok());
    let plain = port(ask.optional(
        None,
        "Serve apps on your LAN (Home Assistant, Bambuddy, MQTT tools) on the agent's one printer connection? Plain MQTT port (1883), or empty for no",
    ));
    let tls = plain.and_then(|_| {
        port(ask.optional(
            None,
            "MQTT over TLS port for Bambu-native apps (8883), or empty for none",
        ))
    });
    (plain, tls)
}

/// What to type into LAN apps, for the agent at `address`: never the
/// access code itself.
pub fn lan_recipes(config: &AgentConfig, address: &str) -> Vec<String> {
    let Some(lan) = &config.lan else {
        return Vec::new();
    };
    let port = |listen: &Option<String>| {
        listen
            .as_deref()
            .and_then(|listen| listen.rsplit(':').next())
            .map(str::to_owned)
    };
    let (plain, tls) = (port(&lan.listen), port(&lan.tls_listen));
    let (user, serial, report) = match &config.printer {
        crate::config::PrinterSection::Bambu { serial, .. } => (
            "bblp".to_owned(),
            serial.clone(),
            format!("device/{serial}/report"),
        ),
        crate::config::PrinterSection::ElegooCc2 { serial, .. } => (
            "elegoo".to_owned(),
            serial.clone(),
            format!("elegoo/{serial}/api_status"),
        ),
        crate::config::PrinterSection::Mqtt { username, .. } => (
            username.clone().unwrap_or_else(|| "<user>".into()),
            String::new(),
            "#".into(),
        ),
    };
    let mut lines = vec![format!(
        "LAN apps: point them at {address} instead of the printer, with the printer's login ({user} and its access code):"
    )];
    if let Some(tls) = &tls {
        lines.push(format!(
            "  Home Assistant (Bambu Lab integration, LAN mode): host {address}, serial {serial}, access code: the printer's (TLS on {tls}, certificate not checked)"
        ));
        lines.push(format!(
            "  Bambuddy: printer IP {address}, serial {serial}, access code: the printer's"
        ));
    }
    if let Some(plain) = &plain {
        lines.push(format!(
            "  MQTT tool: mosquitto_sub -h {address} -p {plain} -u {user} -P '<access code>' -t '{report}'"
        ));
    }
    lines
}

/// The address of this machine on the way to `host`: what LAN apps use.
fn address_towards(host: &str, port: u16) -> Option<String> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect((host, port)).ok()?;
    Some(socket.local_addr().ok()?.ip().to_string())
}

/// Writes `text` to `path` with mode 0600 (the directory is made when
/// missing); an existing file is replaced only with `force`.
fn write_private(path: &Path, text: &str, force: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Asks for a credential or a relay to pair with (in a terminal, when the
/// flags gave neither) and pairs: the credential goes into `args`. `Err`
/// is the exit code when pairing did not give one.
async fn pair_if_asked(args: &mut SetupArgs, interactive: bool) -> Result<(), u8> {
    let mut ask = Asker {
        interactive,
        missing: Vec::new(),
    };
    let url = match args.pair.clone() {
        Some(url) => url,
        None if interactive => {
            match ask.optional(
                None,
                "Agent credential (rla_…), or Enter to pair with a code instead",
            ) {
                Some(credential) => {
                    args.credential = Some(credential);
                    return Ok(());
                }
                None => ask.value(
                    None,
                    "--pair",
                    "Your relay's address (https://…, where you sign in)",
                ),
            }
        }
        // config_text says the credential is missing.
        None => return Ok(()),
    };
    let edge_ca = ask.value(
        args.edge_ca
            .as_ref()
            .map(|path| absolute(path).display().to_string()),
        "--edge-ca",
        "Edge CA file (PEM, from your operator)",
    );
    if !ask.missing.is_empty() {
        eprintln!(
            "relay-agent setup: not a terminal, and these are missing: {}",
            ask.missing.join(", ")
        );
        return Err(64);
    }
    args.edge_ca = Some(PathBuf::from(&edge_ca));
    let paired = async {
        let server = crate::pairing::PairingServer::from_url(&url, args.pair_connect.clone())?;
        let tls = crate::pairing::tls_config(Path::new(&edge_ca))?;
        crate::pairing::pair(&server, &tls, &mut |text| println!("{text}")).await
    };
    match paired.await {
        Ok(paired) => {
            println!("paired: this agent is device {}", paired.device_id);
            args.credential = Some(paired.credential);
            Ok(())
        }
        Err(error) => {
            println!("pairing did not work: {error}");
            Err(1)
        }
    }
}

/// Runs `setup`; the process's exit code: 0 when everything works, 1 when
/// the file was written but the edge or the printer did not answer, 64 when
/// nothing usable could be written.
pub async fn run(mut args: SetupArgs) -> u8 {
    let interactive = std::io::stdin().is_terminal();
    if args.credential.is_none()
        && let Err(code) = pair_if_asked(&mut args, interactive).await
    {
        return code;
    }
    let text = match config_text(&args, interactive) {
        Ok(text) => text,
        Err(missing) => {
            eprintln!(
                "relay-agent setup: not a terminal, and these are missing: {}",
                missing.join(", ")
            );
            return 64;
        }
    };
    let checked = AgentConfig::from_toml(&text)
        .and_then(|config| config.validate().map(|printer| (config, printer)));
    let (config, printer) = match checked {
        Ok(checked) => checked,
        Err(problems) => {
            eprintln!("relay-agent setup: these settings cannot work:");
            for problem in problems {
                eprintln!("  - {problem}");
            }
            return 64;
        }
    };
    if let Err(error) = write_private(&args.config, &text, args.force) {
        let hint = if error.kind() == std::io::ErrorKind::AlreadyExists {
            " (it exists: --force replaces it)"
        } else {
            ""
        };
        eprintln!(
            "relay-agent setup: cannot write {}: {error}{hint}",
            args.config.display()
        );
        return 64;
    }
    println!("wrote {} (mode 0600)", args.config.display());
    let here = address_towards(&printer.host, printer.port())
        .unwrap_or_else(|| "<this machine's address>".into());
    for line in lan_recipes(&config, &here) {
        println!("{line}");
    }
    if args.no_probe {
        return 0;
    }
    let mut works = true;
    match tunnel::probe_edge(&config).await {
        Ok(ack) => println!(
            "edge: works: {} accepted this agent, for device {}",
            config.edge.address, ack.device_id
        ),
        Err(end) => {
            works = false;
            println!("edge: does not work: {end}");
        }
    }
    match printer::connect(&printer).await {
        Ok(_) => println!(
            "printer: works: {}:{} accepted the agent's login",
            printer.host,
            printer.port()
        ),
        Err(failure) => {
            works = false;
            println!(
                "printer: does not work: {} ({:?})",
                failure.detail, failure.reason
            );
        }
    }
    if works {
        println!("All set. Start it: sudo systemctl enable --now relay-agent");
        0
    } else {
        println!("Fix what does not work, then run relay-agent setup --force again.");
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cc2_setup_from_flags_is_a_valid_configuration() {
        let args = SetupArgs {
            edge: Some("edge.example.com:7443".into()),
            // Any readable file: validation does not parse it.
            edge_ca: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml").into()),
            credential: Some("rla_abc_def".into()),
            kind: Some("elegoo_cc2".into()),
            host: Some("192.168.1.50".into()),
            serial: Some("F01CC2000000001".into()),
            ..SetupArgs::default()
        };
        let text = config_text(&args, false).unwrap();
        assert!(!text.contains("access_code"), "{text}");
        let config = AgentConfig::from_toml(&text).unwrap();
        let printer = config.validate().unwrap();
        assert_eq!(printer.port(), 1883);
        assert!(matches!(
            printer.kind,
            crate::config::PrinterKind::ElegooCc2 { .. }
        ));
        let without_serial = SetupArgs {
            serial: None,
            ..args
        };
        assert_eq!(config_text(&without_serial, false), Err(vec!["--serial"]));
    }

    #[test]
    fn a_setup_with_lan_ports_serves_the_lan_and_says_what_to_type() {
        let args = SetupArgs {
            edge: Some("edge.example.com:7443".into()),
            edge_ca: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml").into()),
            credential: Some("rla_abc_def".into()),
            kind: Some("bambu".into()),
            host: Some("192.168.1.50".into()),
            serial: Some("01P00A000000001".into()),
            access_code: Some("a1b2c3d4".into()),
            lan_port: Some(1883),
            lan_tls_port: Some(8883),
            ..SetupArgs::default()
        };
        let text = config_text(&args, false).unwrap();
        let config = AgentConfig::from_toml(&text).unwrap();
        config.validate().unwrap();
        let lan = config.lan.as_ref().unwrap();
        assert_eq!(lan.listen.as_deref(), Some("0.0.0.0:1883"));
        assert_eq!(lan.tls_listen.as_deref(), Some("0.0.0.0:8883"));
        let recipes = lan_recipes(&config, "192.168.1.20").join("\n");
        assert!(recipes.contains("Home Assistant"), "{recipes}");
        assert!(recipes.contains("Bambuddy"), "{recipes}");
        assert!(
            recipes.contains("mosquitto_sub -h 192.168.1.20 -p 1883 -u bblp"),
            "{recipes}"
        );
        assert!(!recipes.contains("a1b2c3d4"), "never the access code");
        let without = SetupArgs {
            lan_port: None,
            lan_tls_port: None,
            ..args
        };
        let text = config_text(&without, false).unwrap();
        assert!(!text.contains("[lan]"), "{text}");
    }
}
