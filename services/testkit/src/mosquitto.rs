//! A Mosquitto of a test's own: TLS with a CA of its own, a password file,
//! a port picked free, killed on drop. The machine's Mosquitto (started by
//! `scripts/services`) is shared; tests that need to stop or configure a
//! broker start this one.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use relay_agent::config::AgentConfig;

use crate::edge::{BASE_DOMAIN, TestEdge};

pub const USER: &str = "printer-user";
pub const PASSWORD: &str = "s3cret-broker-password";

/// A Mosquitto of the test's own, killed on drop.
pub struct Broker {
    child: Child,
    pub port: u16,
}

impl Broker {
    /// The broker's process id (to stop and resume it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a broker with TLS and user [`USER`]; returns it and its CA's
/// PEM file.
pub fn start_broker(dir: &std::path::Path) -> (Broker, std::path::PathBuf) {
    // The broker's own CA and a certificate for 127.0.0.1.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = params.signed_by(&key, &ca).unwrap();
    let ca_path = dir.join("broker-ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    std::fs::write(dir.join("broker.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("broker.key"), key.serialize_pem()).unwrap();
    let passwords = dir.join("passwd");
    let status = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwords)
        .args([USER, PASSWORD])
        .status()
        .expect("mosquitto_passwd (scripts/services installs mosquitto)");
    assert!(status.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.join("mosquitto.conf");
    std::fs::write(
        &config,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n\
             cafile {}\ncertfile {}\nkeyfile {}\nlog_dest stderr\nlog_type information\npersistence false\n",
            passwords.display(),
            ca_path.display(),
            dir.join("broker.crt").display(),
            dir.join("broker.key").display()
        ),
    )
    .unwrap();
    // Debian installs it in /usr/sbin, which a non-root PATH may lack.
    let mosquitto = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .unwrap_or("mosquitto");
    let mut child = Command::new(mosquitto)
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto");
    // Ready once it says so (stderr is unbuffered): its log line, not a
    // guess at a delay.
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("running") => break,
            Some(Ok(_)) => {}
            _ => panic!("mosquitto did not start"),
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (Broker { child, port }, ca_path)
}

/// An agent of kind `mqtt` for `edge`'s device, logging in to `broker`
/// as [`USER`] with `password` over TLS.
pub fn agent_config(
    edge: &TestEdge,
    broker: &Broker,
    ca: &std::path::Path,
    password: &str,
    credential: &str,
) -> AgentConfig {
    let edge_ca = edge.pki.dir.join("edge-ca.pem");
    std::fs::write(&edge_ca, edge.pki.ca_pem()).unwrap();
    AgentConfig::from_toml(&format!(
        r#"
        [edge]
        address = "{}"
        server_name = "tunnel.{BASE_DOMAIN}"
        ca_file = "{}"
        credential = "{credential}"

        [printer]
        kind = "mqtt"
        host = "127.0.0.1"
        port = {}
        username = "{USER}"
        password = "{password}"
        tls = true
        ca_file = "{}"
        "#,
        edge.edge.as_ref().unwrap().tunnel_addr.unwrap(),
        edge_ca.display(),
        broker.port,
        ca.display()
    ))
    .unwrap()
}
