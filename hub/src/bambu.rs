//! The Bambu Lab profile of a hub: what the hub knows about a Bambu
//! printer's one report stream, so that every app gets the full state at
//! once and `pushall` stops loading the printer.
//!
//! P1 and A1 printers publish small deltas (`"msg":1`) on
//! `device/<serial>/report`, and the full report (`"msg":0`) only when asked
//! with `pushall` on `device/<serial>/request`. The hub keeps the merged
//! state: a full report replaces it, a delta is deep-merged into it (objects
//! merged key by key, scalars and arrays replaced), as Home Assistant's
//! pybambu applies them field by field. X1 printers send the full report
//! every time; it simply replaces the state.
//!
//! Plain data and arithmetic on a passed-in clock, like the rest of the
//! hub's state.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

/// How a hub treats a Bambu printer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BambuProfile {
    pub serial: String,
    /// At most one `pushall` reaches the printer per this interval; the
    /// state counts as fresh while reports came within it.
    pub pushall_interval: Duration,
    /// Largest merged state kept, in bytes of JSON; a report that would
    /// make it larger is passed on but not kept.
    pub max_state_bytes: usize,
    /// While the report is held and no report has come for this long, the
    /// hub asks for `pushall` once (a printer reports about every second
    /// while printing and every few seconds at idle; Bambu Studio waits
    /// 15 s, xtouch 15 s, ha-bambulab 60 s).
    pub report_silence: Duration,
    /// No report this long after that `pushall`: the printer is silent,
    /// and the hub ends its connection (Bambu Studio's 30 s in all).
    pub pushall_answer: Duration,
}

impl BambuProfile {
    pub fn new(serial: &str) -> BambuProfile {
        BambuProfile {
            serial: serial.to_owned(),
            pushall_interval: Duration::from_secs(10),
            max_state_bytes: 64 * 1024,
            report_silence: Duration::from_secs(20),
            pushall_answer: Duration::from_secs(10),
        }
    }
}

/// What to do with a `pushall`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushall {
    /// Answer the asking app from the state; nothing reaches the printer.
    FromState,
    /// Let it reach the printer (the first in its interval).
    Forward,
    /// Another `pushall` is on its way: its answer serves this app too.
    Absorbed,
}

/// Why a report was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReportRefusal {
    #[error("report of {0} bytes is over the state's bound")]
    TooLarge(usize),
    #[error("report is not a JSON object")]
    NotJson,
}

#[derive(Debug)]
pub(crate) struct BambuState {
    profile: BambuProfile,
    report_topic: String,
    request_topic: String,
    /// The last full report with the deltas since merged in.
    state: Option<Value>,
    last_report: Option<Instant>,
    /// When a `pushall` last went to the printer.
    last_pushall: Option<Instant>,
    /// Since when the report watchdog has watched (the upstream came, or
    /// the report was subscribed); `None`: not watching.
    watching_since: Option<Instant>,
    /// When the watchdog asked for `pushall`, with no report since.
    watchdog_asked: Option<Instant>,
}

/// What the report watchdog wants now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Watchdog {
    Quiet,
    /// No report for `report_silence`: ask for `pushall`.
    AskPushall,
    /// No report after that `pushall` either: the printer is silent.
    Silent,
}

impl BambuState {
    pub(crate) fn new(profile: BambuProfile) -> BambuState {
        BambuState {
            report_topic: format!("device/{}/report", profile.serial),
            request_topic: format!("device/{}/request", profile.serial),
            profile,
            state: None,
            last_report: None,
            last_pushall: None,
            watching_since: None,
            watchdog_asked: None,
        }
    }

    /// The report watchdog starts (an upstream holding the report) or
    /// stops (`None`: no upstream, or nobody holds the report).
    pub(crate) fn watch(&mut self, since: Option<Instant>) {
        if since.is_none() || self.watching_since.is_none() {
            self.watching_since = since;
            self.watchdog_asked = None;
        }
    }

    /// When the watchdog next needs the hub's attention.
    pub(crate) fn watchdog_deadline(&self) -> Option<Instant> {
        let since = self.watching_since?;
        Some(match self.watchdog_asked {
            Some(asked) => asked + self.profile.pushall_answer,
            None => {
                let heard = self.last_report.map_or(since, |at| at.max(since));
                heard + self.profile.report_silence
            }
        })
    }

    /// What the watchdog wants at `now`; `AskPushall` is returned once per
    /// silence, and counts as the `pushall` of its interval.
    pub(crate) fn watchdog(&mut self, now: Instant) -> Watchdog {
        match self.watchdog_deadline() {
            Some(deadline) if now >= deadline => {}
            _ => return Watchdog::Quiet,
        }
        if self.watchdog_asked.is_some() {
            return Watchdog::Silent;
        }
        self.watchdog_asked = Some(now);
        self.last_pushall = Some(now);
        Watchdog::AskPushall
    }

    pub(crate) fn report_topic(&self) -> &str {
        &self.report_topic
    }

    pub(crate) fn request_topic(&self) -> &str {
        &self.request_topic
    }

    /// A report from the printer: kept, merged, or refused (it still goes
    /// to the apps either way).
    pub(crate) fn on_report(&mut self, payload: &[u8], now: Instant) -> Result<(), ReportRefusal> {
        self.last_report = Some(now);
        self.watchdog_asked = None;
        if payload.len() > self.profile.max_state_bytes {
            return Err(ReportRefusal::TooLarge(payload.len()));
        }
        let Ok(report @ Value::Object(_)) = serde_json::from_slice::<Value>(payload) else {
            return Err(ReportRefusal::NotJson);
        };
        // Only `print` reports are the printer's status; answers on the
        // report topic (`info`, `system`, …) pass on without touching it.
        if !report["print"].is_object() {
            return Ok(());
        }
        let full = report["print"]["msg"].as_i64() != Some(1);
        match (&mut self.state, full) {
            (_, true) => self.state = Some(report),
            (Some(state), false) => {
                merge(state, report);
                let size = serde_json::to_vec(state).map_or(usize::MAX, |json| json.len());
                if size > self.profile.max_state_bytes {
                    self.state = None;
                    return Err(ReportRefusal::TooLarge(size));
                }
            }
            // A delta without a full report to merge into says too little.
            (None, false) => {}
        }
        Ok(())
    }

    /// The state as one full report, marked as the printer marks one.
    pub(crate) fn full_report(&self) -> Option<Bytes> {
        let mut state = self.state.clone()?;
        if let Some(print) = state.get_mut("print").and_then(Value::as_object_mut) {
            print.insert("msg".into(), Value::from(0));
        }
        serde_json::to_vec(&state).ok().map(Bytes::from)
    }

    fn is_fresh(&self, now: Instant) -> bool {
        self.state.is_some()
            && self
                .last_report
                .is_some_and(|at| now.saturating_duration_since(at) < self.profile.pushall_interval)
    }

    /// What to do with an app's `pushall`.
    pub(crate) fn on_pushall(&mut self, now: Instant) -> Pushall {
        if self.is_fresh(now) {
            Pushall::FromState
        } else if self.take_pushall_slot(now) {
            Pushall::Forward
        } else {
            Pushall::Absorbed
        }
    }

    /// Whether the hub should ask for the full report itself (an app joined
    /// and there is no state yet), within the one-per-interval rule.
    pub(crate) fn wants_pushall(&mut self, now: Instant) -> bool {
        self.state.is_none() && self.take_pushall_slot(now)
    }

    /// Whether a new upstream should be asked for the full report (the
    /// state may be stale), within the one-per-interval rule.
    pub(crate) fn wants_refresh(&mut self, now: Instant) -> bool {
        self.take_pushall_slot(now)
    }

    fn take_pushall_slot(&mut self, now: Instant) -> bool {
        let free = self
            .last_pushall
            .is_none_or(|at| now.saturating_duration_since(at) >= self.profile.pushall_interval);
        if free {
            self.last_pushall = Some(now);
        }
        free
    }

    /// The `pushall` the hub sends on its own, as a PUBLISH to the
    /// printer's request topic.
    pub(crate) fn pushall_publish(&self) -> relay_proto::mqtt::Publish {
        relay_proto::mqtt::Publish {
            dup: false,
            qos: relay_proto::mqtt::QoS::AtMostOnce,
            retain: false,
            topic: self.request_topic.clone(),
            packet_id: None,
            payload: Self::pushall_request(),
        }
    }

    /// The `pushall` payload.
    pub(crate) fn pushall_request() -> Bytes {
        Bytes::from_static(br#"{"pushing":{"sequence_id":"0","command":"pushall"}}"#)
    }
}

/// Whether a request payload is a `pushall` (`{"pushing":{"command":"pushall"}}`).
pub(crate) fn is_pushall(payload: &[u8]) -> bool {
    // Cheap test first: most requests are not.
    if !payload.windows(7).any(|window| window == b"pushall") {
        return false;
    }
    serde_json::from_slice::<Value>(payload)
        .is_ok_and(|request| request["pushing"]["command"] == "pushall")
}

/// Deep-merges `delta` into `base`: objects key by key, everything else
/// (scalars, arrays) replaced.
pub(crate) fn merge(base: &mut Value, delta: Value) {
    match (base, delta) {
        (Value::Object(base), Value::Object(delta)) => {
            for (key, value) in delta {
                match base.get_mut(&key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        merge(existing, value)
                    }
                    _ => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, delta) => *base = delta,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn state() -> BambuState {
        BambuState::new(BambuProfile::new("X1"))
    }

    fn bytes(value: Value) -> Vec<u8> {
        serde_json::to_vec(&value).unwrap()
    }

    #[test]
    fn deltas_merge_objects_and_replace_scalars_and_arrays() {
        let mut state = state();
        let now = crate::test_clock::start();
        let full = json!({"print": {"msg": 0, "command": "push_status", "nozzle_temper": 25.0,
            "ams": {"ams": [{"id": "0"}, {"id": "1"}], "tray_now": "0"},
            "lights_report": [{"node": "chamber_light", "mode": "on"}]}});
        state.on_report(&bytes(full), now).unwrap();
        let delta = json!({"print": {"msg": 1, "nozzle_temper": 210.5,
            "ams": {"tray_now": "1"}, "lights_report": [{"node": "chamber_light", "mode": "off"}]}});
        state.on_report(&bytes(delta), now).unwrap();
        let merged: Value = serde_json::from_slice(&state.full_report().unwrap()).unwrap();
        assert_eq!(
            merged,
            json!({"print": {"msg": 0, "command": "push_status", "nozzle_temper": 210.5,
                "ams": {"ams": [{"id": "0"}, {"id": "1"}], "tray_now": "1"},
                "lights_report": [{"node": "chamber_light", "mode": "off"}]}})
        );
        // A full report replaces the state; a delta before any is not kept.
        state
            .on_report(
                &bytes(json!({"print": {"msg": 0, "gcode_state": "IDLE"}})),
                now,
            )
            .unwrap();
        let merged: Value = serde_json::from_slice(&state.full_report().unwrap()).unwrap();
        assert_eq!(merged, json!({"print": {"msg": 0, "gcode_state": "IDLE"}}));
        let mut fresh = self::state();
        fresh
            .on_report(&bytes(json!({"print": {"msg": 1, "x": 1}})), now)
            .unwrap();
        assert!(fresh.full_report().is_none());
    }

    /// A real printer's full report and recorded deltas (from pybambu's
    /// test data): each delta lands where pybambu's models would put it,
    /// and nothing else of the report moves.
    #[test]
    fn an_answer_on_the_report_topic_leaves_the_state_alone() {
        let now = crate::test_clock::start();
        let mut state = state();
        let full = json!({"print": {"msg": 0, "command": "push_status", "nozzle_temper": 25.0}});
        state.on_report(&bytes(full), now).unwrap();
        let version = json!({"info": {"command": "get_version", "sequence_id": "1"}});
        state.on_report(&bytes(version), now).unwrap();
        let kept: Value = serde_json::from_slice(&state.full_report().unwrap()).unwrap();
        assert_eq!(kept["print"]["nozzle_temper"], 25.0);
        assert!(kept.get("info").is_none());
    }

    #[test]
    fn recorded_deltas_of_a_real_printer_merge_into_its_full_report() {
        let fixture: Value =
            serde_json::from_str(include_str!("testdata/pybambu-h2d.json")).unwrap();
        let mut state = state();
        let now = crate::test_clock::start();
        let mut full = fixture["push_all"].clone();
        full["msg"] = json!(0);
        state
            .on_report(&bytes(json!({ "print": full })), now)
            .unwrap();
        let mut expected = full.clone();
        for (name, delta) in fixture["deltas"].as_object().unwrap() {
            let mut print = delta.clone();
            print["msg"] = json!(1);
            state
                .on_report(&bytes(json!({ "print": print })), now)
                .unwrap_or_else(|error| panic!("{name}: {error}"));
        }
        // By hand, what each delta changes:
        expected["home_flag"] = json!(-1058546177);
        expected["stat"] = json!("46A58008");
        expected["device"]["extruder"]["state"] = json!(274);
        expected["device"]["nozzle"]["info"] =
            fixture["deltas"]["push_alt_nozzle_info"]["device"]["nozzle"]["info"].clone();
        let merged: Value = serde_json::from_slice(&state.full_report().unwrap()).unwrap();
        assert_eq!(merged, json!({ "print": expected }));
        // The extruder's per-nozzle info (an object's other key) stayed.
        assert_eq!(
            merged["print"]["device"]["extruder"]["info"][0]["temp"],
            14745864
        );
    }

    #[test]
    fn the_state_is_bounded() {
        let mut state = state();
        let now = crate::test_clock::start();
        let big = bytes(json!({"print": {"msg": 0, "blob": "x".repeat(100_000)}}));
        assert!(matches!(
            state.on_report(&big, now),
            Err(ReportRefusal::TooLarge(_))
        ));
        assert!(state.full_report().is_none());
        // Deltas that grow the state past its bound drop it.
        state
            .on_report(&bytes(json!({"print": {"msg": 0}})), now)
            .unwrap();
        let mut refused = false;
        for index in 0..40 {
            let delta = json!({"print": {"msg": 1, format!("k{index}"): "y".repeat(2_000)}});
            refused |= state.on_report(&bytes(delta), now).is_err();
        }
        assert!(refused);
        assert!(state.full_report().is_none());
        assert_eq!(state.on_report(b"[1,2]", now), Err(ReportRefusal::NotJson));
    }

    #[test]
    fn one_pushall_per_interval_and_answers_from_a_fresh_state() {
        let mut state = state();
        let start = crate::test_clock::start();
        assert_eq!(state.on_pushall(start), Pushall::Forward);
        assert_eq!(state.on_pushall(start), Pushall::Absorbed);
        state
            .on_report(&bytes(json!({"print": {"msg": 0}})), start)
            .unwrap();
        assert_eq!(state.on_pushall(start), Pushall::FromState);
        // Stale (no report for an interval): one goes to the printer again.
        let later = start + Duration::from_secs(10);
        assert_eq!(state.on_pushall(later), Pushall::Forward);
        assert_eq!(state.on_pushall(later), Pushall::Absorbed);
        assert!(!state.wants_pushall(later), "there is a state");
        assert!(is_pushall(
            br#"{"pushing": {"sequence_id": "7", "command": "pushall"}}"#
        ));
        assert!(!is_pushall(
            br#"{"print": {"command": "pause", "note": "pushall"}}"#
        ));
    }
}
