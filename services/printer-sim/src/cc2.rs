//! What an Elegoo Centauri Carbon 2 says and expects over MQTT, as public
//! client code describes it (Elegoo's `elegoo-link` SDK, the
//! elegoo-homeassistant integration's `CC2_PROTOCOL.md`, pycentauri): a
//! per-client registration the printer limits (about four), requests with
//! ids on the client's own topics, a JSON heartbeat that keeps the
//! registration, status deltas about once a second, and the quirks (a
//! cooldown after a burst of requests, slow replies to motion commands,
//! registrations forgotten on reboot).
//!
//! Sans-IO: [`Cc2Printer`] takes a PUBLISH and the time, and answers with
//! what to publish, when; the simulator's broker does the MQTT.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The quirks and limits of the simulated printer.
#[derive(Debug, Clone)]
pub struct Cc2Settings {
    /// Registered client ids the printer keeps at once.
    pub registration_limit: usize,
    /// A registration with no heartbeat for this long is forgotten (about
    /// 6 minutes on the printer).
    pub heartbeat_expiry: Duration,
    /// The cooldown after a burst of requests; `None`: no cooldown.
    pub cooldown: Option<Cooldown>,
    /// How long start, pause, stop and resume take to answer.
    pub motion_delay: Duration,
}

/// `burst` requests within `window` start a cooldown of `length`, during
/// which replies are dropped.
#[derive(Debug, Clone, Copy)]
pub struct Cooldown {
    pub burst: usize,
    pub window: Duration,
    pub length: Duration,
}

impl Default for Cc2Settings {
    fn default() -> Self {
        Cc2Settings {
            registration_limit: 4,
            heartbeat_expiry: Duration::from_secs(360),
            cooldown: Some(Cooldown {
                burst: 3,
                window: Duration::from_millis(1_000),
                length: Duration::from_secs(5),
            }),
            motion_delay: Duration::from_secs(3),
        }
    }
}

/// Something the printer publishes: now, or after `delay`.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Value,
    pub delay: Duration,
}

/// What happened to a message, for the simulator's observations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Noted {
    Registered,
    RegistrationRefused,
    ReplyDropped,
    Unregistered,
}

/// The printer's MQTT-level behaviour.
#[derive(Debug)]
pub struct Cc2Printer {
    serial: String,
    settings: Cc2Settings,
    /// Registered client id → its last heartbeat (or registration).
    registrations: HashMap<String, Instant>,
    recent_requests: VecDeque<Instant>,
    cooling_until: Option<Instant>,
    /// The full status (method 1002) that the deltas keep current.
    status: Value,
    next_status_id: u64,
    printing: bool,
}

/// Merges `delta` into `into`: objects merged key by key, everything else
/// replaced (how clients keep the full status from the deltas).
pub fn merge(into: &mut Value, delta: &Value) {
    match (into, delta) {
        (Value::Object(into), Value::Object(delta)) => {
            for (key, value) in delta {
                match into.get_mut(key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        merge(existing, value)
                    }
                    _ => {
                        into.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (into, delta) => *into = delta.clone(),
    }
}

impl Cc2Printer {
    pub fn new(serial: &str, settings: Cc2Settings) -> Cc2Printer {
        Cc2Printer {
            serial: serial.to_owned(),
            settings,
            registrations: HashMap::new(),
            recent_requests: VecDeque::new(),
            cooling_until: None,
            status: json!({
                "machine_model": "Centauri Carbon 2",
                "sn": serial,
                "print_status": { "state": "idle", "progress": 0, "filename": "" },
                "extruder": { "temperature": 24.0, "target": 0 },
                "heater_bed": { "temperature": 23.0, "target": 0 },
                "fans": { "model": 0, "aux": 0 },
                "light": { "on": false },
                "speed_mode": 1,
            }),
            next_status_id: 1,
            printing: false,
        }
    }

    fn topic(&self, rest: &str) -> String {
        format!("elegoo/{}/{rest}", self.serial)
    }

    /// The status topic every client subscribes to.
    pub fn status_topic(&self) -> String {
        self.topic("api_status")
    }

    /// The full status now.
    pub fn full_status(&self) -> &Value {
        &self.status
    }

    fn prune(&mut self, now: Instant) {
        let expiry = self.settings.heartbeat_expiry;
        self.registrations
            .retain(|_, last| now.saturating_duration_since(*last) < expiry);
    }

    /// Client ids registered now.
    pub fn registered(&mut self, now: Instant) -> Vec<String> {
        self.prune(now);
        let mut ids: Vec<String> = self.registrations.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// A reboot: every registration is forgotten.
    pub fn reboot(&mut self) {
        self.registrations.clear();
        self.recent_requests.clear();
        self.cooling_until = None;
        self.printing = false;
    }

    /// The status delta of one tick (`method` 6000 on `api_status`), also
    /// merged into the full status.
    pub fn tick(&mut self) -> Outgoing {
        let id = self.next_status_id;
        self.next_status_id += 1;
        let nozzle = 24.0 + (id % 200) as f64;
        let mut delta = json!({ "extruder": { "temperature": nozzle } });
        if self.printing {
            let progress = id % 100;
            delta["print_status"] = json!({ "progress": progress });
        }
        merge(&mut self.status, &delta);
        Outgoing {
            topic: self.status_topic(),
            payload: json!({ "id": id, "method": 6000, "result": delta }),
            delay: Duration::ZERO,
        }
    }

    /// A PUBLISH from a client on `topic`; what the printer answers, and
    /// what it noted.
    pub fn on_publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
    ) -> (Vec<Outgoing>, Option<Noted>) {
        let Some(rest) = topic
            .strip_prefix("elegoo/")
            .and_then(|rest| rest.strip_prefix(self.serial.as_str()))
            .and_then(|rest| rest.strip_prefix('/'))
        else {
            return (Vec::new(), None);
        };
        let Ok(message) = serde_json::from_slice::<Value>(payload) else {
            return (Vec::new(), None);
        };
        if rest == "api_register" {
            return self.register(&message, now);
        }
        let Some(client_id) = rest.strip_suffix("/api_request") else {
            return (Vec::new(), None);
        };
        self.prune(now);
        if !self.registrations.contains_key(client_id) {
            // Unregistered (or expired): the connection stays up, requests
            // go unanswered.
            return (Vec::new(), Some(Noted::Unregistered));
        }
        let reply_topic = self.topic(&format!("{client_id}/api_response"));
        if message["type"] == "PING" {
            self.registrations.insert(client_id.to_owned(), now);
            return (
                vec![Outgoing {
                    topic: reply_topic,
                    payload: json!({ "type": "PONG" }),
                    delay: Duration::ZERO,
                }],
                None,
            );
        }
        let (Some(id), Some(method)) = (message["id"].as_i64(), message["method"].as_i64()) else {
            return (Vec::new(), None);
        };
        if self.cooling(now) {
            return (Vec::new(), Some(Noted::ReplyDropped));
        }
        let (result, delay) = self.answer(method, &message["params"]);
        let mut result = result;
        if let Some(object) = result.as_object_mut() {
            object.entry("error_code").or_insert(json!(0));
        }
        (
            vec![Outgoing {
                topic: reply_topic,
                payload: json!({ "id": id, "method": method, "result": result }),
                delay,
            }],
            None,
        )
    }

    /// Counts a request towards the cooldown; true when its reply is
    /// dropped.
    fn cooling(&mut self, now: Instant) -> bool {
        let Some(cooldown) = self.settings.cooldown else {
            return false;
        };
        if self.cooling_until.is_some_and(|until| now < until) {
            return true;
        }
        self.recent_requests.push_back(now);
        while self
            .recent_requests
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) > cooldown.window)
        {
            self.recent_requests.pop_front();
        }
        if self.recent_requests.len() >= cooldown.burst {
            self.recent_requests.clear();
            self.cooling_until = Some(now + cooldown.length);
            return true;
        }
        false
    }

    fn register(&mut self, message: &Value, now: Instant) -> (Vec<Outgoing>, Option<Noted>) {
        let (Some(client_id), Some(request_id)) = (
            message["client_id"].as_str(),
            message["request_id"].as_str(),
        ) else {
            return (Vec::new(), None);
        };
        self.prune(now);
        let known = self.registrations.contains_key(client_id);
        let (error, noted) = if known || self.registrations.len() < self.settings.registration_limit
        {
            self.registrations.insert(client_id.to_owned(), now);
            ("ok", Noted::Registered)
        } else {
            ("too many clients", Noted::RegistrationRefused)
        };
        (
            vec![Outgoing {
                topic: self.topic(&format!("{request_id}/register_response")),
                payload: json!({ "client_id": client_id, "error": error }),
                delay: Duration::ZERO,
            }],
            Some(noted),
        )
    }

    /// A method's result and how long it takes.
    fn answer(&mut self, method: i64, params: &Value) -> (Value, Duration) {
        let now = Duration::ZERO;
        match method {
            1001 => (
                json!({
                    "attributes": {
                        "machine_model": "Centauri Carbon 2",
                        "sn": self.serial,
                        "firmware": "1.0.0-sim",
                    }
                }),
                now,
            ),
            1002 => (self.status.clone(), now),
            1020 => {
                self.printing = true;
                merge(
                    &mut self.status,
                    &json!({ "print_status": { "state": "printing", "filename": params["filename"].clone() } }),
                );
                (json!({}), self.settings.motion_delay)
            }
            1021..=1023 => {
                if !self.printing && method != 1023 {
                    return (json!({ "error_code": 1010 }), now);
                }
                let state = match method {
                    1021 => "paused",
                    1022 => "idle",
                    _ => "printing",
                };
                self.printing = method != 1022;
                merge(
                    &mut self.status,
                    &json!({ "print_status": { "state": state } }),
                );
                (json!({}), self.settings.motion_delay)
            }
            1026 | 1028 | 1031 => (json!({}), now),
            1029 => {
                let on = params["on"].as_bool().unwrap_or(false);
                merge(&mut self.status, &json!({ "light": { "on": on } }));
                (json!({}), now)
            }
            1036 => (json!({ "history": [] }), now),
            1044 => (
                json!({ "files": [{ "name": "benchy.gcode", "size": 1_234_567 }] }),
                now,
            ),
            _ => (json!({ "error_code": 1003 }), now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(printer: &mut Cc2Printer, client: &str, now: Instant) -> Value {
        let payload = json!({ "client_id": client, "request_id": format!("{client}_req") });
        let (out, _) = printer.on_publish(
            "elegoo/SN1/api_register",
            payload.to_string().as_bytes(),
            now,
        );
        assert_eq!(
            out[0].topic,
            format!("elegoo/SN1/{client}_req/register_response")
        );
        out[0].payload.clone()
    }

    #[test]
    fn the_fifth_registration_is_refused_and_expired_ones_make_room() {
        let settings = Cc2Settings {
            heartbeat_expiry: Duration::from_secs(60),
            ..Cc2Settings::default()
        };
        let mut printer = Cc2Printer::new("SN1", settings);
        let start = Instant::now();
        for client in ["a", "b", "c", "d"] {
            assert_eq!(register(&mut printer, client, start)["error"], "ok");
        }
        assert_eq!(
            register(&mut printer, "e", start)["error"],
            "too many clients"
        );
        // A known client registers again.
        assert_eq!(register(&mut printer, "a", start)["error"], "ok");
        // "a" keeps its heartbeat; the others expire.
        let later = start + Duration::from_secs(45);
        let (out, _) = printer.on_publish("elegoo/SN1/a/api_request", br#"{"type":"PING"}"#, later);
        assert_eq!(out[0].payload, json!({ "type": "PONG" }));
        let expired = start + Duration::from_secs(61);
        assert_eq!(printer.registered(expired), vec!["a".to_owned()]);
        assert_eq!(register(&mut printer, "e", expired)["error"], "ok");
        // Unregistered requests go unanswered.
        let (out, noted) = printer.on_publish(
            "elegoo/SN1/b/api_request",
            br#"{"id":1,"method":1002}"#,
            expired,
        );
        assert!(out.is_empty());
        assert_eq!(noted, Some(Noted::Unregistered));
        printer.reboot();
        assert!(printer.registered(expired).is_empty());
    }

    #[test]
    fn a_burst_of_requests_starts_a_cooldown_that_drops_replies() {
        let mut printer = Cc2Printer::new("SN1", Cc2Settings::default());
        let now = Instant::now();
        register(&mut printer, "a", now);
        let request = |printer: &mut Cc2Printer, id: i64, at: Instant| {
            printer.on_publish(
                "elegoo/SN1/a/api_request",
                json!({ "id": id, "method": 1002 }).to_string().as_bytes(),
                at,
            )
        };
        assert_eq!(request(&mut printer, 1, now).0.len(), 1);
        assert_eq!(request(&mut printer, 2, now).0.len(), 1);
        let (out, noted) = request(&mut printer, 3, now);
        assert!(out.is_empty());
        assert_eq!(noted, Some(Noted::ReplyDropped));
        assert!(
            request(&mut printer, 4, now + Duration::from_secs(4))
                .0
                .is_empty()
        );
        let (out, _) = request(&mut printer, 5, now + Duration::from_secs(6));
        assert_eq!(out[0].payload["id"], 5);
        assert_eq!(out[0].payload["result"]["error_code"], 0);
    }

    #[test]
    fn deltas_merge_into_the_full_status_and_unknown_methods_get_an_error() {
        let mut printer = Cc2Printer::new("SN1", Cc2Settings::default());
        let delta = printer.tick();
        assert_eq!(delta.topic, "elegoo/SN1/api_status");
        assert_eq!(delta.payload["method"], 6000);
        let temperature = delta.payload["result"]["extruder"]["temperature"].clone();
        assert_eq!(
            printer.full_status()["extruder"]["temperature"],
            temperature
        );
        assert_eq!(printer.full_status()["heater_bed"]["temperature"], 23.0);
        assert_eq!(printer.tick().payload["id"], 2);
        let now = Instant::now();
        register(&mut printer, "a", now);
        let (out, _) = printer.on_publish(
            "elegoo/SN1/a/api_request",
            br#"{"id":9,"method":4242}"#,
            now,
        );
        assert_eq!(out[0].payload["result"]["error_code"], 1003);
        let (out, _) = printer.on_publish(
            "elegoo/SN1/a/api_request",
            br#"{"id":10,"method":1020,"params":{"filename":"benchy.gcode"}}"#,
            now + Duration::from_secs(2),
        );
        assert_eq!(out[0].delay, Cc2Settings::default().motion_delay);
        assert_eq!(printer.full_status()["print_status"]["state"], "printing");
    }
}
