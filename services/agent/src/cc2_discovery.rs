//! An Elegoo CC2's UDP discovery, answered by the agent as the printer
//! (`[lan] cc2_discovery_listen`, off unless set): apps that find a CC2
//! only by broadcasting `{"id":0,"method":7000}` to port 52700 (the
//! elegoo-homeassistant integration's manual entry among them) then find
//! the agent, whose LAN broker shares the printer's one registration.
//!
//! The answer has the shape the printer's has, as public client code reads
//! it: `{"id": …, "result": {"host_name", "machine_model", "sn",
//! "token_status", "lan_status"}}`, with the app taking the address the
//! answer came from. The printer answers too: an app that lists what it
//! found lists both, and the owner picks the agent's by its name.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// What the discovery request asks for.
const DISCOVERY_METHOD: u64 = 7000;

/// Answers per second at most: the answer is larger than the question, so
/// the agent must not be a UDP amplifier.
const ANSWERS_PER_SECOND: u32 = 20;

/// What the agent says about the printer it stands for.
#[derive(Debug, Clone)]
pub struct DiscoveryIdentity {
    pub name: String,
    pub serial: String,
    /// Whether LAN apps must log in (the answer's `token_status` 1).
    pub login_required: bool,
}

/// The answer to one datagram, or `None` when it is no CC2 discovery
/// request.
pub fn answer(request: &[u8], identity: &DiscoveryIdentity) -> Option<Vec<u8>> {
    let request: Value = serde_json::from_slice(request).ok()?;
    if request.get("method").and_then(Value::as_u64) != Some(DISCOVERY_METHOD) {
        return None;
    }
    let id = request.get("id").cloned().unwrap_or(json!(0));
    let answer = json!({
        "id": id,
        "result": {
            "host_name": identity.name,
            "machine_model": "Centauri Carbon 2",
            "sn": identity.serial,
            "token_status": u8::from(identity.login_required),
            "lan_status": 1,
        }
    });
    serde_json::to_vec(&answer).ok()
}

/// Binds `address` and answers discovery until `stop`; the bound address,
/// or `None` (logged) when it cannot bind.
pub async fn start(
    address: &str,
    identity: DiscoveryIdentity,
    stop: CancellationToken,
) -> Option<SocketAddr> {
    let socket = match UdpSocket::bind(address).await {
        Ok(socket) => socket,
        Err(error) => {
            tracing::error!(%address, %error, "the CC2 discovery answer cannot start");
            return None;
        }
    };
    let _ = socket.set_broadcast(true);
    let bound = socket.local_addr().ok()?;
    tracing::info!(address = %bound, "answering CC2 discovery");
    tokio::spawn(async move {
        let mut datagram = vec![0u8; 1500];
        let mut window = Instant::now();
        let mut answered = 0u32;
        loop {
            let (len, from) = tokio::select! {
                received = socket.recv_from(&mut datagram) => match received {
                    Ok(received) => received,
                    Err(error) => {
                        tracing::debug!(%error, "CC2 discovery: receive failed");
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            let Some(reply) = answer(&datagram[..len], &identity) else {
                continue;
            };
            if window.elapsed() >= Duration::from_secs(1) {
                window = Instant::now();
                answered = 0;
            }
            if answered >= ANSWERS_PER_SECOND {
                continue;
            }
            answered += 1;
            if let Err(error) = socket.send_to(&reply, from).await {
                tracing::debug!(%from, %error, "CC2 discovery: answer not sent");
            }
        }
    });
    Some(bound)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn identity() -> DiscoveryIdentity {
        DiscoveryIdentity {
            name: "Workshop CC2".into(),
            serial: "F01CC2000000007".into(),
            login_required: true,
        }
    }

    #[test]
    fn a_discovery_request_gets_the_printers_shape_with_its_id() {
        let reply = answer(br#"{"id":0,"method":7000}"#, &identity()).unwrap();
        let reply: Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(reply["id"], 0);
        assert_eq!(reply["result"]["sn"], "F01CC2000000007");
        assert_eq!(reply["result"]["host_name"], "Workshop CC2");
        assert_eq!(reply["result"]["machine_model"], "Centauri Carbon 2");
        assert_eq!(reply["result"]["token_status"], 1);
        assert_eq!(reply["result"]["lan_status"], 1);
        let reply = answer(br#"{"id":17,"method":7000}"#, &identity()).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&reply).unwrap()["id"], 17);
    }

    #[test]
    fn anything_else_is_not_answered() {
        for request in [
            &b"M99999"[..],
            br#"{"id":0,"method":1002}"#,
            br#"{"id":0}"#,
            b"\xff\xfe",
            b"",
        ] {
            assert!(answer(request, &identity()).is_none(), "{request:?}");
        }
    }
}
