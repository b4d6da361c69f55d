//! What a kind of printer needs beyond MQTT, behind one interface.
//!
//! A printer profile watches what passes through the hub (sessions coming
//! and going, the filters they are granted, PUBLISHes both ways, time) by
//! hooks of [`Profile`], which all default to doing nothing, and answers
//! with [`ProfileAction`]s that the hub carries out: a PUBLISH for one
//! session, a PUBLISH for the printer, or the end of a silent upstream. A
//! profile never reaches into the hub; it only sees what a hook hands it.
//!
//! [`PrinterProfile`] is the one enum of kinds (`Generic`, `Bambu`,
//! `Cc2`), built from [`ProfileConfig`] in one place
//! ([`PrinterProfile::new`]); the hub holds one and has no branch on the
//! kind. A new kind of printer is a new variant and an `impl Profile`.

use std::time::Instant;

use bytes::Bytes;
use relay_proto::mqtt::Publish;
use relay_proto::topic::{filters_overlap, topic_matches};

use crate::bambu::{BambuProfile, BambuState, Pushall, ReportRefusal, Watchdog, is_pushall};
use crate::cc2::{Cc2Action, Cc2Profile, Cc2State};
use crate::state::{HubCounters, SessionId, Silence};

/// Which profile a hub runs, and its settings.
#[derive(Debug, Clone, Default)]
pub enum ProfileConfig {
    /// Any MQTT broker: nothing beyond MQTT.
    #[default]
    Generic,
    /// A Bambu Lab printer: its report state is kept, late joiners get the
    /// full report, `pushall` is absorbed, a silent report is noticed.
    Bambu(BambuProfile),
    /// An Elegoo CC2: apps' registrations and heartbeats are answered
    /// here, their requests go on the agent's registration, paced.
    Cc2(Cc2Profile),
}

/// What a profile asks the hub to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileAction {
    /// Give `session` this QoS 0 message, whatever it holds (an answer to
    /// its own request, or the state it just subscribed to).
    Deliver {
        session: SessionId,
        topic: String,
        payload: Bytes,
    },
    /// Give `session` this QoS 0 message if one of its filters matches
    /// `topic`, as a broker would.
    DeliverIfSubscribed {
        session: SessionId,
        topic: String,
        payload: Bytes,
    },
    /// Publish this to the printer, QoS 0 (the profile paces its own).
    Upstream { topic: String, payload: Bytes },
    /// The printer is silent: end the upstream, to be made again.
    Silent(Silence),
}

/// What a hook may answer with: actions, and what it counted.
#[derive(Debug)]
pub struct ProfileOutput<'a> {
    pub actions: &'a mut Vec<ProfileAction>,
    pub counters: &'a mut HubCounters,
}

/// What became of an app's PUBLISH, by the profile's word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppPublish {
    /// Not one of the profile's topics: the hub's policy decides.
    NotMine,
    /// Answered or queued here; acknowledge it, send nothing on.
    Taken,
    /// Refused: acknowledged and dropped, counted.
    Refused,
    /// Goes to the upstream as it came (over a peer link).
    Forward,
}

/// The filters the upstream holds, as a profile may ask about them.
pub trait HeldFilters {
    /// Whether a held filter matches `topic` (`granted`: one the broker
    /// granted).
    fn holds_matching(&self, topic: &str, granted: bool) -> bool;
}

/// The hooks of a printer profile. Each defaults to nothing.
pub trait Profile {
    /// The upstream filter that serves a session's `filter` which the
    /// policy does not allow as it is (`None`: refused).
    fn upstream_of(&self, _filter: &str) -> Option<String> {
        None
    }

    /// A filter the hub holds upstream for the profile's own sake.
    fn own_filter(&self) -> Option<String> {
        None
    }

    /// The client id the agent connected to the printer with, for the
    /// upstream about to resume (`None` over a peer link).
    fn set_printer_client(&mut self, _client: Option<String>) {}

    fn attach(&mut self, _session: SessionId, _peer: bool) {}

    fn detach(&mut self, _session: SessionId) {}

    /// When the profile next wants [`Profile::handle_timeout`] or
    /// [`Profile::watch`] while the upstream is up.
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// Time passed, the upstream up: the profile's own timers.
    fn handle_timeout(&mut self, _now: Instant, _out: &mut ProfileOutput<'_>) {}

    /// Time passed, the upstream up and its PINGRESPs in time: the
    /// profile's watchdogs (a [`ProfileAction::Silent`] ends the upstream).
    fn watch(&mut self, _held: &dyn HeldFilters, _now: Instant, _out: &mut ProfileOutput<'_>) {}

    fn upstream_lost(&mut self) {}

    /// A new upstream serves the hub; its filters are being subscribed.
    fn upstream_resumed(
        &mut self,
        _held: &dyn HeldFilters,
        _now: Instant,
        _out: &mut ProfileOutput<'_>,
    ) {
    }

    /// `session` was just granted `filters` (its SUBACK has gone out).
    /// `upstream_up`: whether a PUBLISH for the printer would go out now.
    fn joined(
        &mut self,
        _session: SessionId,
        _filters: &[&str],
        _upstream_up: bool,
        _now: Instant,
        _out: &mut ProfileOutput<'_>,
    ) {
    }

    /// A PUBLISH from an app, past the policy.
    fn on_app_publish(
        &mut self,
        _session: SessionId,
        _publish: &Publish,
        _now: Instant,
        _out: &mut ProfileOutput<'_>,
    ) -> AppPublish {
        AppPublish::NotMine
    }

    /// A PUBLISH from the printer; true when it is the profile's alone and
    /// is not fanned out.
    fn on_upstream_publish(
        &mut self,
        _publish: &Publish,
        _now: Instant,
        _out: &mut ProfileOutput<'_>,
    ) -> bool {
        false
    }
}

/// A broker with nothing beyond MQTT.
#[derive(Debug, Default)]
pub struct Generic;

impl Profile for Generic {}

/// The profile a hub runs.
#[derive(Debug)]
pub(crate) enum PrinterProfile {
    Generic(Generic),
    Bambu(Box<BambuState>),
    Cc2(Box<Cc2State>),
}

impl PrinterProfile {
    /// The one place a printer's kind becomes its profile.
    pub(crate) fn new(config: ProfileConfig, now: Instant) -> PrinterProfile {
        match config {
            ProfileConfig::Generic => PrinterProfile::Generic(Generic),
            ProfileConfig::Bambu(profile) => {
                PrinterProfile::Bambu(Box::new(BambuState::new(profile)))
            }
            ProfileConfig::Cc2(profile) => {
                let mut state = Cc2State::new(profile);
                state.watch_from(now);
                PrinterProfile::Cc2(Box::new(state))
            }
        }
    }

    pub(crate) fn hooks(&self) -> &dyn Profile {
        match self {
            PrinterProfile::Generic(generic) => generic,
            PrinterProfile::Bambu(bambu) => bambu.as_ref(),
            PrinterProfile::Cc2(cc2) => cc2.as_ref(),
        }
    }

    pub(crate) fn hooks_mut(&mut self) -> &mut dyn Profile {
        match self {
            PrinterProfile::Generic(generic) => generic,
            PrinterProfile::Bambu(bambu) => bambu.as_mut(),
            PrinterProfile::Cc2(cc2) => cc2.as_mut(),
        }
    }
}

/// The full report from the state, for `session`, when there is one.
fn report_from_state(bambu: &BambuState, session: SessionId, out: &mut ProfileOutput<'_>) {
    if let Some(full) = bambu.full_report() {
        out.actions.push(ProfileAction::Deliver {
            session,
            topic: bambu.report_topic().to_owned(),
            payload: full,
        });
    }
}

fn ask_pushall(bambu: &BambuState, out: &mut ProfileOutput<'_>) {
    let request = bambu.pushall_publish();
    out.actions.push(ProfileAction::Upstream {
        topic: request.topic,
        payload: request.payload,
    });
}

impl Profile for BambuState {
    /// The report topic, for any filter that can match it (`#`,
    /// `device/+/report`: MQTT Explorer's default is `#`), since that is
    /// all the printer may be asked for.
    fn upstream_of(&self, filter: &str) -> Option<String> {
        filters_overlap(filter, self.report_topic()).then(|| self.report_topic().to_owned())
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.watchdog_deadline()
    }

    fn watch(&mut self, held: &dyn HeldFilters, now: Instant, out: &mut ProfileOutput<'_>) {
        if !held.holds_matching(self.report_topic(), true) {
            BambuState::watch(self, None);
            return;
        }
        match self.watchdog(now) {
            Watchdog::Quiet => {}
            Watchdog::AskPushall => {
                out.counters.watchdog_pushalls += 1;
                ask_pushall(self, out);
            }
            Watchdog::Silent => {
                out.counters.silent_report += 1;
                out.actions.push(ProfileAction::Silent(Silence::NoReport));
            }
        }
    }

    fn upstream_lost(&mut self) {
        BambuState::watch(self, None);
    }

    fn upstream_resumed(
        &mut self,
        held: &dyn HeldFilters,
        now: Instant,
        out: &mut ProfileOutput<'_>,
    ) {
        if !held.holds_matching(self.report_topic(), false) {
            return;
        }
        BambuState::watch(self, Some(now));
        if self.wants_refresh(now) {
            ask_pushall(self, out);
        }
    }

    /// A session just subscribed to the report: it gets the full state
    /// now, or, with none yet, the printer is asked for it.
    fn joined(
        &mut self,
        session: SessionId,
        filters: &[&str],
        upstream_up: bool,
        now: Instant,
        out: &mut ProfileOutput<'_>,
    ) {
        if !filters
            .iter()
            .any(|filter| topic_matches(filter, self.report_topic()))
        {
            return;
        }
        BambuState::watch(self, Some(now));
        if self.full_report().is_some() {
            report_from_state(self, session, out);
        } else if upstream_up && self.wants_pushall(now) {
            ask_pushall(self, out);
        }
    }

    /// An app's `pushall`: answered from the state, or by a `pushall`
    /// already on its way.
    fn on_app_publish(
        &mut self,
        session: SessionId,
        publish: &Publish,
        now: Instant,
        out: &mut ProfileOutput<'_>,
    ) -> AppPublish {
        if publish.topic != self.request_topic() || !is_pushall(&publish.payload) {
            return AppPublish::NotMine;
        }
        match self.on_pushall(now) {
            Pushall::Forward => return AppPublish::NotMine,
            Pushall::FromState => report_from_state(self, session, out),
            Pushall::Absorbed => {}
        }
        out.counters.pushalls_absorbed += 1;
        AppPublish::Taken
    }

    fn on_upstream_publish(
        &mut self,
        publish: &Publish,
        now: Instant,
        out: &mut ProfileOutput<'_>,
    ) -> bool {
        if publish.topic == self.report_topic()
            && let Err(ReportRefusal::TooLarge(_)) = self.on_report(&publish.payload, now)
        {
            out.counters.oversized_reports += 1;
        }
        false
    }
}

impl Cc2State {
    /// Hands what the CC2 state decided to the hub.
    fn drain_into(&mut self, out: &mut ProfileOutput<'_>) {
        let counted = self.take_counters();
        out.counters.cc2_answered_at_edge += counted.answered_at_edge;
        out.counters.cc2_requests_sent += counted.requests_sent;
        out.counters.cc2_queue_overflows += counted.queue_overflows;
        out.actions
            .extend(self.take_actions().into_iter().map(|action| match action {
                Cc2Action::Deliver {
                    session,
                    topic,
                    payload,
                } => ProfileAction::DeliverIfSubscribed {
                    session,
                    topic,
                    payload,
                },
                Cc2Action::Upstream { topic, payload } => {
                    ProfileAction::Upstream { topic, payload }
                }
            }));
    }
}

impl Profile for Cc2State {
    /// Every filter under the printer's topics, for any filter that can
    /// match one of them.
    fn upstream_of(&self, filter: &str) -> Option<String> {
        let all = self.all_topics();
        filters_overlap(filter, &all).then_some(all)
    }

    /// The agent's replies.
    fn own_filter(&self) -> Option<String> {
        self.agent_response_topic()
    }

    fn set_printer_client(&mut self, client: Option<String>) {
        self.set_agent_client(client);
    }

    fn attach(&mut self, session: SessionId, peer: bool) {
        Cc2State::attach(self, session, peer);
    }

    fn detach(&mut self, session: SessionId) {
        Cc2State::detach(self, session);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        [
            Cc2State::poll_timeout(self),
            self.silence_deadline(),
            self.status_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn handle_timeout(&mut self, now: Instant, out: &mut ProfileOutput<'_>) {
        Cc2State::handle_timeout(self, now);
        self.drain_into(out);
    }

    /// Nothing at all for 65 s ends the upstream; a status held by apps
    /// and quiet for 20 s is asked for once, and its silence 20 s later
    /// ends the upstream.
    fn watch(&mut self, held: &dyn HeldFilters, now: Instant, out: &mut ProfileOutput<'_>) {
        if self
            .silence_deadline()
            .is_some_and(|deadline| now >= deadline)
        {
            out.counters.silent_pong += 1;
            out.actions.push(ProfileAction::Silent(Silence::NoPong));
            return;
        }
        let status_held = held.holds_matching(self.status_topic(), true);
        self.watch_status(status_held, now);
        match self.status_watchdog(now) {
            Ok(false) => {}
            Ok(true) => {
                out.counters.watchdog_status_requests += 1;
                self.drain_into(out);
            }
            Err(()) => {
                out.counters.silent_status += 1;
                out.actions.push(ProfileAction::Silent(Silence::NoStatus));
            }
        }
    }

    fn upstream_lost(&mut self) {
        Cc2State::upstream_lost(self);
    }

    fn upstream_resumed(&mut self, _: &dyn HeldFilters, now: Instant, out: &mut ProfileOutput<'_>) {
        Cc2State::upstream_resumed(self, now);
        self.drain_into(out);
    }

    fn joined(
        &mut self,
        session: SessionId,
        filters: &[&str],
        _: bool,
        now: Instant,
        out: &mut ProfileOutput<'_>,
    ) {
        if filters
            .iter()
            .any(|filter| topic_matches(filter, self.status_topic()))
        {
            self.joined_status(session, now);
            self.drain_into(out);
        }
    }

    fn on_app_publish(
        &mut self,
        session: SessionId,
        publish: &Publish,
        now: Instant,
        out: &mut ProfileOutput<'_>,
    ) -> AppPublish {
        let taken = Cc2State::on_app_publish(self, session, &publish.topic, &publish.payload, now);
        self.drain_into(out);
        taken
    }

    fn on_upstream_publish(
        &mut self,
        publish: &Publish,
        now: Instant,
        out: &mut ProfileOutput<'_>,
    ) -> bool {
        let taken = Cc2State::on_upstream_publish(self, &publish.topic, &publish.payload, now);
        self.drain_into(out);
        taken
    }
}
