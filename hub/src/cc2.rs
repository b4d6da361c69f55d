//! The Elegoo Centauri Carbon 2 profile of a hub: every app speaks the
//! CC2's protocol as on the LAN, with a client id of its own, while the
//! printer sees one registration, the agent's.
//!
//! On the LAN each client registers (`elegoo/<sn>/api_register`), sends
//! requests `{"id","method","params"}` on `elegoo/<sn>/<cid>/api_request`,
//! reads the answers on `…/<cid>/api_response`, keeps its registration
//! with a `{"type":"PING"}` heartbeat, and reads status deltas (method
//! 6000) on `elegoo/<sn>/api_status`. The printer keeps about four
//! registrations, and three requests in quick succession start a cooldown
//! during which it drops replies.
//!
//! Here the hub:
//! - answers an app's registration itself ("ok", with the app's client id;
//!   "fail" for the agent's client id or one another app holds, "too many
//!   clients" past [`Cc2Profile::max_registrations_per_session`]) and its
//!   PING with PONG: neither reaches the printer;
//! - sends an app's requests on the agent's registration, with request ids
//!   of its own, and gives each reply to that app only, on its own
//!   `api_response`, with its own id back;
//! - paces requests to the printer ([`Cc2Profile::request_interval`]) in a
//!   bounded queue; an app past its share gets error 1009 (busy) at once;
//! - keeps the full status (a 1002 reply, deltas deep-merged into it) so
//!   that a new subscriber to `api_status` gets it at once and apps' 1002
//!   requests are answered from it while status keeps coming;
//! - refuses what would break the shared registration: publishing on the
//!   agent's topics or another app's, or anything else under the printer's
//!   topics that is not a registration or the app's own request.
//!
//! Over a peer link (no agent client id: the device's agent is on another
//! instance) registrations, heartbeats and fresh 1002s are still answered
//! here, and requests pass on as they came to the owning instance's hub,
//! which remaps and paces them. A peer session there may send requests for
//! any client id but the agent's.
//!
//! Plain data and arithmetic on a passed-in clock, like the rest of the
//! hub's state: it returns [`Cc2Action`]s for the hub to carry out.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::bambu::merge;
use crate::state::SessionId;

/// How a hub treats a CC2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cc2Profile {
    pub serial: String,
    /// The client id the agent registered with; `None` over a peer link.
    pub agent_client: Option<String>,
    /// Requests reach the printer one per this interval at most.
    pub request_interval: Duration,
    /// Requests one app may have waiting for the printer…
    pub max_queued_per_session: usize,
    /// …and all apps together.
    pub max_queued: usize,
    /// Requests sent and not answered, kept for their reply at most this
    /// long (a printer may drop a reply; motion commands answer late).
    pub reply_timeout: Duration,
    /// The status counts as fresh while deltas came within this.
    pub status_fresh_for: Duration,
    /// Largest full status kept, in bytes of JSON.
    pub max_status_bytes: usize,
    /// Client ids one app session may register (a peer session: any).
    pub max_registrations_per_session: usize,
    /// The first request id the hub uses towards the printer (a hub that
    /// moves to a peer link and back must not reuse another hub's ids).
    pub first_request_id: u32,
    /// Nothing from the printer this long (no PONG to the agent's 10 s
    /// heartbeat, no status): it is silent, and its connection is made
    /// again (OctoEverywhere waits 65 s for a PONG).
    pub silence: Duration,
    /// While apps hold the status and no status came for this long, the
    /// hub asks the printer for its full status (1002); no status this
    /// long after that either: the printer is silent.
    pub status_silence: Duration,
}

impl Cc2Profile {
    pub fn new(serial: &str, agent_client: Option<String>) -> Cc2Profile {
        Cc2Profile {
            serial: serial.to_owned(),
            agent_client,
            request_interval: Duration::from_millis(600),
            max_queued_per_session: 16,
            max_queued: 256,
            reply_timeout: Duration::from_secs(60),
            status_fresh_for: Duration::from_secs(5),
            max_status_bytes: 64 * 1024,
            max_registrations_per_session: 8,
            first_request_id: 1,
            silence: Duration::from_secs(65),
            status_silence: Duration::from_secs(20),
        }
    }
}

/// What the hub must do for the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cc2Action {
    /// Give `session` this message, if one of its filters matches `topic`
    /// (as a broker would).
    Deliver {
        session: SessionId,
        topic: String,
        payload: Bytes,
    },
    /// Publish this to the printer (QoS 0).
    Upstream { topic: String, payload: Bytes },
}

pub use crate::profile::AppPublish;

/// What the profile counted; the hub adds them to its counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cc2Counters {
    /// Registrations, heartbeats and 1002s answered by the edge.
    pub answered_at_edge: u64,
    /// Requests sent to the printer on the agent's registration.
    pub requests_sent: u64,
    /// Requests answered 1009 because the queue was full.
    pub queue_overflows: u64,
}

/// Who a request sent to the printer is for.
#[derive(Debug)]
struct Origin {
    session: SessionId,
    client_id: String,
    /// The app's own id, given back in the reply.
    id: Value,
}

#[derive(Debug)]
struct QueuedRequest {
    /// `None`: the hub's own 1002.
    origin: Option<Origin>,
    method: i64,
    /// The request as the app sent it; its id is replaced when it goes.
    request: Map<String, Value>,
}

#[derive(Debug)]
struct InFlight {
    origin: Option<Origin>,
    method: i64,
    sent_at: Instant,
}

#[derive(Debug, Default)]
struct AppEntry {
    client_ids: Vec<String>,
    queued: usize,
    peer: bool,
}

/// Upstream request ids stay within this (JSON integers every client
/// reads).
const MAX_REQUEST_ID: u32 = i32::MAX as u32;

/// Requests in flight kept at most; past it the oldest is forgotten.
const MAX_IN_FLIGHT: usize = 1_024;

/// Client ids registered by all sessions at most.
const MAX_REGISTRATIONS: usize = 100_000;

/// Sessions waiting for the full status at most.
const MAX_AWAITING_STATUS: usize = 10_000;

/// The full status method, and the status delta method.
const FULL_STATUS: i64 = 1002;
const STATUS_DELTA: i64 = 6000;
/// "busy", as the printer says it.
const BUSY: i64 = 1009;

#[derive(Debug)]
pub(crate) struct Cc2State {
    profile: Cc2Profile,
    prefix: String,
    status_topic: String,
    register_topic: String,
    registrations: HashMap<String, SessionId>,
    apps: HashMap<SessionId, AppEntry>,
    queue: VecDeque<QueuedRequest>,
    next_send: Option<Instant>,
    in_flight: HashMap<u32, InFlight>,
    in_flight_order: VecDeque<u32>,
    next_request_id: u32,
    /// The full status: a 1002 result with the deltas since merged in.
    status: Option<Value>,
    last_status_id: Option<u64>,
    last_status_at: Option<Instant>,
    /// A 1002 of the hub's own is queued or in flight.
    full_status_asked: bool,
    awaiting_status: Vec<SessionId>,
    /// No upstream: nothing is sent until one resumes.
    lost: bool,
    /// When the printer was last heard from on the agent's registration
    /// (its PONGs, replies) or its status: the silence watchdog's start.
    last_heard: Option<Instant>,
    /// While apps hold the status: when a status (a delta or a 1002
    /// reply) last came, or the watch began.
    status_heard: Option<Instant>,
    /// When the status watchdog asked for a 1002, with no status since.
    status_probe: Option<Instant>,
    actions: Vec<Cc2Action>,
    counters: Cc2Counters,
}

impl Cc2State {
    pub(crate) fn new(profile: Cc2Profile) -> Cc2State {
        let prefix = format!("elegoo/{}/", profile.serial);
        Cc2State {
            status_topic: format!("{prefix}api_status"),
            register_topic: format!("{prefix}api_register"),
            prefix,
            next_request_id: profile.first_request_id.clamp(1, MAX_REQUEST_ID),
            profile,
            registrations: HashMap::new(),
            apps: HashMap::new(),
            queue: VecDeque::new(),
            next_send: None,
            in_flight: HashMap::new(),
            in_flight_order: VecDeque::new(),
            status: None,
            last_status_id: None,
            last_status_at: None,
            full_status_asked: false,
            awaiting_status: Vec::new(),
            lost: false,
            last_heard: None,
            status_heard: None,
            status_probe: None,
            actions: Vec::new(),
            counters: Cc2Counters::default(),
        }
    }

    /// What the hub must do now.
    pub(crate) fn take_actions(&mut self) -> Vec<Cc2Action> {
        std::mem::take(&mut self.actions)
    }

    pub(crate) fn take_counters(&mut self) -> Cc2Counters {
        std::mem::take(&mut self.counters)
    }

    /// Every filter under the printer's topics.
    pub(crate) fn all_topics(&self) -> String {
        format!("{}#", self.prefix)
    }

    pub(crate) fn status_topic(&self) -> &str {
        &self.status_topic
    }

    /// The filter the hub holds upstream for its own sake: the agent's
    /// replies.
    pub(crate) fn agent_response_topic(&self) -> Option<String> {
        self.profile
            .agent_client
            .as_ref()
            .map(|agent| format!("{}{agent}/api_response", self.prefix))
    }

    fn agent_request_topic(&self) -> Option<String> {
        self.profile
            .agent_client
            .as_ref()
            .map(|agent| format!("{}{agent}/api_request", self.prefix))
    }

    fn is_agent(&self, client_id: &str) -> bool {
        self.profile.agent_client.as_deref() == Some(client_id)
    }

    /// A session attached.
    pub(crate) fn attach(&mut self, session: SessionId, peer: bool) {
        self.apps.insert(
            session,
            AppEntry {
                peer,
                ..AppEntry::default()
            },
        );
    }

    /// A session is gone: its registrations, waiting requests and interest
    /// in the status with it (replies on their way are dropped).
    pub(crate) fn detach(&mut self, session: SessionId) {
        let Some(app) = self.apps.remove(&session) else {
            return;
        };
        for client_id in app.client_ids {
            if self.registrations.get(&client_id) == Some(&session) {
                self.registrations.remove(&client_id);
            }
        }
        if app.queued > 0 {
            self.queue.retain(|queued| {
                queued
                    .origin
                    .as_ref()
                    .is_none_or(|origin| origin.session != session)
            });
        }
        self.awaiting_status.retain(|waiting| *waiting != session);
    }

    /// A PUBLISH from an app.
    pub(crate) fn on_app_publish(
        &mut self,
        session: SessionId,
        topic: &str,
        payload: &[u8],
        now: Instant,
    ) -> AppPublish {
        let Some(rest) = topic.strip_prefix(self.prefix.as_str()) else {
            return AppPublish::NotMine;
        };
        if topic == self.register_topic {
            self.on_register(session, payload);
            return AppPublish::Taken;
        }
        let Some(client_id) = rest.strip_suffix("/api_request") else {
            // The printer's own topics (status, responses) and anything
            // else: apps do not publish there.
            return AppPublish::Refused;
        };
        if client_id.contains('/') || !self.may_request_as(session, client_id) {
            return AppPublish::Refused;
        }
        let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(payload) else {
            // The printer ignores what is not a request.
            return AppPublish::Taken;
        };
        if request.get("type").and_then(Value::as_str) == Some("PING") {
            self.counters.answered_at_edge += 1;
            self.reply(session, client_id, json!({ "type": "PONG" }));
            return AppPublish::Taken;
        }
        let (Some(id), Some(method)) = (
            request.get("id").cloned(),
            request.get("method").and_then(Value::as_i64),
        ) else {
            return AppPublish::Taken;
        };
        if method == FULL_STATUS
            && let Some(status) = self.fresh_status(now)
        {
            let mut result = status.clone();
            if let Some(result) = result.as_object_mut() {
                result.insert("error_code".into(), json!(0));
            }
            self.counters.answered_at_edge += 1;
            self.reply(
                session,
                client_id,
                json!({ "id": id, "method": method, "result": result }),
            );
            return AppPublish::Taken;
        }
        if self.profile.agent_client.is_none() {
            return AppPublish::Forward;
        }
        let origin = Origin {
            session,
            client_id: client_id.to_owned(),
            id,
        };
        self.enqueue(origin, method, request, now);
        AppPublish::Taken
    }

    /// Whether `session` may send requests as `client_id`: its own
    /// registration; a peer session, any client id no app of this hub
    /// holds, but never the agent's.
    fn may_request_as(&mut self, session: SessionId, client_id: &str) -> bool {
        if client_id.is_empty() || self.is_agent(client_id) {
            return false;
        }
        match self.registrations.get(client_id) {
            Some(holder) => *holder == session,
            None => {
                let Some(app) = self.apps.get_mut(&session) else {
                    return false;
                };
                if !app.peer || self.registrations.len() >= MAX_REGISTRATIONS {
                    return false;
                }
                app.client_ids.push(client_id.to_owned());
                self.registrations.insert(client_id.to_owned(), session);
                true
            }
        }
    }

    fn on_register(&mut self, session: SessionId, payload: &[u8]) {
        let Ok(registration) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let (Some(client_id), Some(request_id)) = (
            registration["client_id"].as_str(),
            registration["request_id"].as_str(),
        ) else {
            return;
        };
        // Both name topic levels: the answer goes to one, requests to the
        // other.
        if !is_topic_level(client_id) || !is_topic_level(request_id) {
            return;
        }
        let error = if self.is_agent(client_id) {
            "fail: the client id is the relay's own registration"
        } else {
            match self.registrations.get(client_id) {
                Some(holder) if *holder == session => "ok",
                Some(_) => "fail: another app holds this client id",
                None => match self.apps.get_mut(&session) {
                    Some(app)
                        if app.peer
                            || app.client_ids.len()
                                < self.profile.max_registrations_per_session =>
                    {
                        if self.registrations.len() >= MAX_REGISTRATIONS {
                            "too many clients"
                        } else {
                            app.client_ids.push(client_id.to_owned());
                            self.registrations.insert(client_id.to_owned(), session);
                            "ok"
                        }
                    }
                    Some(_) => "too many clients",
                    None => return,
                },
            }
        };
        self.counters.answered_at_edge += 1;
        self.actions.push(Cc2Action::Deliver {
            session,
            topic: format!("{}{request_id}/register_response", self.prefix),
            payload: to_bytes(&json!({ "client_id": client_id, "error": error })),
        });
    }

    fn reply(&mut self, session: SessionId, client_id: &str, message: Value) {
        self.actions.push(Cc2Action::Deliver {
            session,
            topic: format!("{}{client_id}/api_response", self.prefix),
            payload: to_bytes(&message),
        });
    }

    fn enqueue(&mut self, origin: Origin, method: i64, request: Map<String, Value>, now: Instant) {
        let Some(app) = self.apps.get_mut(&origin.session) else {
            return;
        };
        let full = self.queue.len() >= self.profile.max_queued;
        if full || app.queued >= self.profile.max_queued_per_session {
            self.counters.queue_overflows += 1;
            let message = json!({
                "id": origin.id,
                "method": method,
                "result": { "error_code": BUSY, "error": "the relay's request queue for this printer is full" },
            });
            let (session, client_id) = (origin.session, origin.client_id);
            self.reply(session, &client_id, message);
            return;
        }
        app.queued += 1;
        self.queue.push_back(QueuedRequest {
            origin: Some(origin),
            method,
            request,
        });
        self.release(now);
    }

    /// Asks the printer for the full status, once at a time.
    fn ask_full_status(&mut self, now: Instant) {
        if self.full_status_asked || self.profile.agent_client.is_none() {
            return;
        }
        self.full_status_asked = true;
        self.queue.push_back(QueuedRequest {
            origin: None,
            method: FULL_STATUS,
            request: Map::new(),
        });
        self.release(now);
    }

    /// When [`Self::handle_timeout`] should next run.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let release = if self.queue.is_empty() || self.lost {
            None
        } else {
            self.next_send
        };
        let expiry = self
            .in_flight_order
            .front()
            .and_then(|id| self.in_flight.get(id))
            .map(|oldest| oldest.sent_at + self.profile.reply_timeout);
        match (release, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        while let Some(oldest) = self.in_flight_order.front() {
            let expired = self
                .in_flight
                .get(oldest)
                .is_none_or(|entry| now >= entry.sent_at + self.profile.reply_timeout);
            if !expired {
                break;
            }
            if let Some(entry) = self.in_flight.remove(oldest)
                && entry.origin.is_none()
            {
                self.full_status_asked = false;
            }
            self.in_flight_order.pop_front();
        }
        self.release(now);
    }

    /// Sends what the pace allows now.
    fn release(&mut self, now: Instant) {
        if self.lost {
            return;
        }
        let Some(topic) = self.agent_request_topic() else {
            return;
        };
        while self.next_send.is_none_or(|at| now >= at) {
            let Some(mut queued) = self.queue.pop_front() else {
                break;
            };
            if let Some(origin) = &queued.origin
                && let Some(app) = self.apps.get_mut(&origin.session)
            {
                app.queued = app.queued.saturating_sub(1);
            }
            let id = self.allocate_request_id();
            queued.request.insert("id".into(), json!(id));
            queued.request.insert("method".into(), json!(queued.method));
            self.actions.push(Cc2Action::Upstream {
                topic: topic.clone(),
                payload: to_bytes(&Value::Object(queued.request)),
            });
            self.counters.requests_sent += 1;
            if self.in_flight.len() >= MAX_IN_FLIGHT
                && let Some(oldest) = self.in_flight_order.pop_front()
                && let Some(entry) = self.in_flight.remove(&oldest)
                && entry.origin.is_none()
            {
                self.full_status_asked = false;
            }
            self.in_flight.insert(
                id,
                InFlight {
                    origin: queued.origin,
                    method: queued.method,
                    sent_at: now,
                },
            );
            self.in_flight_order.push_back(id);
            self.next_send = Some(now + self.profile.request_interval);
        }
    }

    fn allocate_request_id(&mut self) -> u32 {
        loop {
            let id = self.next_request_id;
            self.next_request_id = if id >= MAX_REQUEST_ID { 1 } else { id + 1 };
            if !self.in_flight.contains_key(&id) {
                return id;
            }
        }
    }

    /// A PUBLISH from the printer; true when it was the agent's reply,
    /// which goes to the app that asked (or nowhere), never fanned out.
    pub(crate) fn on_upstream_publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
    ) -> bool {
        if topic == self.status_topic {
            self.last_heard = Some(now);
            self.heard_status(now);
            self.on_status(payload, now);
            return false;
        }
        if self.agent_response_topic().as_deref() == Some(topic) {
            self.last_heard = Some(now);
        }
        if self.agent_response_topic().as_deref() != Some(topic) {
            // The agent's own request (echoed to a `#` subscriber) is not
            // for apps either.
            return self.agent_request_topic().as_deref() == Some(topic);
        }
        let Ok(Value::Object(mut reply)) = serde_json::from_slice::<Value>(payload) else {
            return true;
        };
        // The agent's heartbeat's PONG, and anything without our id.
        let Some(id) = reply
            .get("id")
            .and_then(Value::as_u64)
            .and_then(|id| u32::try_from(id).ok())
        else {
            return true;
        };
        let Some(sent) = self.in_flight.remove(&id) else {
            return true;
        };
        self.in_flight_order.retain(|waiting| *waiting != id);
        if sent.method == FULL_STATUS
            && let Some(result) = reply.get("result")
            && result["error_code"].as_i64().unwrap_or(0) == 0
        {
            self.heard_status(now);
            let mut status = result.clone();
            if let Some(status) = status.as_object_mut() {
                status.remove("error_code");
            }
            self.keep_status(status, now);
        }
        if sent.origin.is_none() {
            self.full_status_asked = false;
        }
        let Some(origin) = sent.origin else {
            return true;
        };
        reply.insert("id".into(), origin.id);
        self.reply(origin.session, &origin.client_id, Value::Object(reply));
        true
    }

    fn keep_status(&mut self, status: Value, now: Instant) {
        let size = serde_json::to_vec(&status).map_or(usize::MAX, |json| json.len());
        if !status.is_object() || size > self.profile.max_status_bytes {
            self.status = None;
            return;
        }
        self.status = Some(status);
        self.last_status_at = Some(now);
        for session in std::mem::take(&mut self.awaiting_status) {
            self.give_status(session);
        }
    }

    fn on_status(&mut self, payload: &[u8], now: Instant) {
        let Ok(mut message) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        if message["method"].as_i64() != Some(STATUS_DELTA) {
            return;
        }
        let id = message["id"].as_u64();
        let gap = match (self.last_status_id, id) {
            (Some(last), Some(id)) => id != last.wrapping_add(1),
            _ => false,
        };
        self.last_status_id = id;
        if gap && self.status.is_some() {
            // Deltas were missed (or the printer restarted): ask again.
            self.status = None;
            self.ask_full_status(now);
            return;
        }
        let Some(status) = &mut self.status else {
            return;
        };
        merge(status, message["result"].take());
        self.last_status_at = Some(now);
        let size = serde_json::to_vec(status).map_or(usize::MAX, |json| json.len());
        if size > self.profile.max_status_bytes {
            self.status = None;
        }
    }

    fn fresh_status(&self, now: Instant) -> Option<&Value> {
        let fresh = self
            .last_status_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.profile.status_fresh_for);
        self.status.as_ref().filter(|_| fresh)
    }

    /// `session` just subscribed to the status: it gets the full status
    /// now, or once the printer sent it.
    pub(crate) fn joined_status(&mut self, session: SessionId, now: Instant) {
        if self.fresh_status(now).is_some() {
            self.give_status(session);
            return;
        }
        if self.awaiting_status.len() < MAX_AWAITING_STATUS
            && !self.awaiting_status.contains(&session)
        {
            self.awaiting_status.push(session);
        }
        self.ask_full_status(now);
    }

    fn give_status(&mut self, session: SessionId) {
        let Some(status) = &self.status else {
            return;
        };
        // As a delta with the latest id: merged, it is the full status,
        // and the next delta follows without a gap.
        let message = json!({
            "id": self.last_status_id.unwrap_or(0),
            "method": STATUS_DELTA,
            "result": status,
        });
        self.counters.answered_at_edge += 1;
        self.actions.push(Cc2Action::Deliver {
            session,
            topic: self.status_topic.clone(),
            payload: to_bytes(&message),
        });
    }

    fn heard_status(&mut self, now: Instant) {
        // Watching from the first status; the hub stops the watch at its
        // next look if no app holds the status.
        self.status_heard = Some(now);
        self.status_probe = None;
    }

    /// The status watchdog watches while apps hold the status topic over
    /// the agent's own connection.
    pub(crate) fn watch_status(&mut self, held: bool, now: Instant) {
        if !held || self.lost || self.profile.agent_client.is_none() {
            self.status_heard = None;
            self.status_probe = None;
        } else if self.status_heard.is_none() {
            self.status_heard = Some(now);
        }
    }

    /// When the status watchdog next needs the hub.
    pub(crate) fn status_deadline(&self) -> Option<Instant> {
        let heard = self.status_heard?;
        Some(match self.status_probe {
            Some(asked) => asked + self.profile.status_silence,
            None => heard + self.profile.status_silence,
        })
    }

    /// The status watchdog at `now`: asks for a 1002 once after
    /// `status_silence` without a status (true: asked), and says the
    /// printer is silent (`Err`) when that brought none either.
    pub(crate) fn status_watchdog(&mut self, now: Instant) -> Result<bool, ()> {
        match self.status_deadline() {
            Some(deadline) if now >= deadline => {}
            _ => return Ok(false),
        }
        if self.status_probe.is_some() {
            return Err(());
        }
        self.status_probe = Some(now);
        self.full_status_asked = false;
        self.ask_full_status(now);
        Ok(true)
    }

    /// The silence watchdog starts (the hub's first upstream).
    pub(crate) fn watch_from(&mut self, now: Instant) {
        self.last_heard.get_or_insert(now);
    }

    /// When the printer counts as silent if nothing comes before: only
    /// over the agent's own connection (a peer link's owner watches).
    pub(crate) fn silence_deadline(&self) -> Option<Instant> {
        if self.lost || self.profile.agent_client.is_none() {
            return None;
        }
        Some(self.last_heard? + self.profile.silence)
    }

    /// The upstream is gone: replies in flight will not come, and the
    /// printer may have restarted.
    pub(crate) fn upstream_lost(&mut self) {
        self.lost = true;
        self.status_heard = None;
        self.status_probe = None;
        self.in_flight.clear();
        self.in_flight_order.clear();
        self.full_status_asked = self.queue.iter().any(|queued| queued.origin.is_none());
        self.status = None;
        self.last_status_id = None;
    }

    /// The client id the agent connected to the printer with, for the
    /// upstream about to resume (`None`: a peer link). Kept here only.
    pub(crate) fn set_agent_client(&mut self, agent_client: Option<String>) {
        self.profile.agent_client = agent_client;
    }

    /// A new upstream, with the agent's client id on it
    /// ([`Self::set_agent_client`]). Waiting requests go on; they pass on
    /// as they came over a peer link.
    pub(crate) fn upstream_resumed(&mut self, now: Instant) {
        self.lost = false;
        self.last_heard = Some(now);
        if self.profile.agent_client.is_none() {
            let queued: Vec<QueuedRequest> = self.queue.drain(..).collect();
            self.full_status_asked = false;
            for queued in queued {
                let Some(origin) = queued.origin else {
                    continue;
                };
                if let Some(app) = self.apps.get_mut(&origin.session) {
                    app.queued = app.queued.saturating_sub(1);
                }
                let mut request = queued.request;
                request.insert("id".into(), origin.id);
                request.insert("method".into(), json!(queued.method));
                self.actions.push(Cc2Action::Upstream {
                    topic: format!("{}{}/api_request", self.prefix, origin.client_id),
                    payload: to_bytes(&Value::Object(request)),
                });
            }
            return;
        }
        self.next_send = None;
        if !self.awaiting_status.is_empty() {
            self.ask_full_status(now);
        }
        self.release(now);
    }
}

/// Whether `level` can stand as one topic level.
fn is_topic_level(level: &str) -> bool {
    !level.is_empty() && level.len() <= 256 && !level.contains(['/', '+', '#', '\0'])
}

fn to_bytes(value: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}
