//! The hub's invariants over random operation sequences: sessions attach
//! and leave, subscribe, unsubscribe and publish; a broker answers (or
//! not), publishes, drops the connection; a new one comes; time passes.
//! After every step:
//!
//! - every filter held upstream counts exactly the sessions holding it, and
//!   the index agrees ([`HubState::invariant_violations`]);
//! - no upstream packet id is used twice while its answer is awaited;
//! - no QoS 1 PUBLISH is acknowledged to its client before the broker
//!   acknowledged it, and none is lost: once the broker has answered
//!   everything, each is acknowledged, refused, or its session is gone;
//! - what the hub keeps stays bounded.
//!
//! `PROPTEST_CASES` sets the number of sequences (CI runs the default).
//! [`run_ops`] runs the same operations decoded from bytes, for the fuzz
//! target in `hub/fuzz` (feature `fuzzing`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use relay_proto::mqtt::{
    self, Packet, PacketId, Publish, QoS, SubAck, Subscribe, SubscribeReturnCode, Unsubscribe,
};

use crate::close::Close;
use crate::state::{
    HubConfig, HubState, PublishRefused, RetainedReplay, SessionAttach, SessionId, SessionSink,
};

#[derive(Debug, Default)]
struct Seen {
    acknowledged: Vec<PacketId>,
    refused: Vec<PacketId>,
    ended: bool,
}

#[derive(Debug, Clone)]
struct Sink(Rc<RefCell<Seen>>);

impl SessionSink for Sink {
    fn deliver(&self, bytes: Bytes) -> bool {
        let mut buffer = BytesMut::from(&bytes[..]);
        while let Some(packet) = mqtt::decode(&mut buffer, usize::MAX).unwrap() {
            if let Packet::PubAck(id) = packet {
                self.0.borrow_mut().acknowledged.push(id);
            }
        }
        true
    }

    fn deliver_mqtt5(&self, _: Bytes) -> bool {
        // QoS 0 deliveries: nothing the invariants count.
        true
    }

    fn end(&self, _: Close) {
        self.0.borrow_mut().ended = true;
    }

    fn refuse_publish(&self, packet_id: PacketId, _: QoS, _: PublishRefused) -> bool {
        self.0.borrow_mut().refused.push(packet_id);
        true
    }
}

#[derive(Debug, Clone)]
enum Op {
    Attach(u8),
    Detach(u8),
    Subscribe(u8, u8),
    Unsubscribe(u8, u8),
    Publish(u8, u8, bool),
    /// The broker answers its oldest awaited packet.
    Answer,
    /// The broker answers everything awaited.
    AnswerAll,
    BrokerPublish(u8),
    Lost,
    Resumed,
    Advance(u16),
}

const FILTERS: [&str; 5] = ["a/b", "a/+", "#", "c/d", "a/b/c"];
const TOPICS: [&str; 4] = ["a/b", "c/d", "a/x", "a/b/c"];

impl Op {
    /// One operation from the front of `data` (two bytes), as the fuzz
    /// target reads them; `None` once `data` is used up.
    fn from_bytes(data: &mut &[u8]) -> Option<Op> {
        let (&kind, &argument) = (data.first()?, data.get(1)?);
        *data = &data[2..];
        let slot = argument % 4;
        let second = (argument >> 2) % 5;
        Some(match kind % 11 {
            0 => Op::Attach(slot),
            1 => Op::Detach(slot),
            2 => Op::Subscribe(slot, second),
            3 => Op::Unsubscribe(slot, second),
            4 => Op::Publish(slot, second % 4, argument & 0x80 != 0),
            5 => Op::Answer,
            6 => Op::AnswerAll,
            7 => Op::BrokerPublish(slot),
            8 => Op::Lost,
            9 => Op::Resumed,
            _ => Op::Advance(u16::from(argument) * 80),
        })
    }
}

/// Runs the operations `data` encodes, two bytes each, checking the
/// invariants after every step; panics on a broken one.
pub fn run_ops(mut data: &[u8]) {
    let mut world = World::new();
    let mut steps = 0;
    while let Some(op) = Op::from_bytes(&mut data) {
        steps += 1;
        if steps > 500 {
            break;
        }
        match world.step(op) {
            Ok(()) => {}
            Err(TestCaseError::Reject(_)) => return,
            Err(TestCaseError::Fail(why)) => panic!("{why}"),
        }
    }
    match world.nothing_lost() {
        Ok(()) | Err(TestCaseError::Reject(_)) => {}
        Err(TestCaseError::Fail(why)) => panic!("{why}"),
    }
}

#[cfg(test)]
fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u8..4).prop_map(Op::Attach),
        1 => (0u8..4).prop_map(Op::Detach),
        3 => (0u8..4, 0u8..5).prop_map(|(s, f)| Op::Subscribe(s, f)),
        2 => (0u8..4, 0u8..5).prop_map(|(s, f)| Op::Unsubscribe(s, f)),
        3 => (0u8..4, 0u8..4, any::<bool>()).prop_map(|(s, t, q)| Op::Publish(s, t, q)),
        4 => Just(Op::Answer),
        1 => Just(Op::AnswerAll),
        2 => (0u8..4).prop_map(Op::BrokerPublish),
        1 => Just(Op::Lost),
        1 => Just(Op::Resumed),
        2 => (0u16..20_000).prop_map(Op::Advance),
    ]
}

/// The broker's side: what the hub sent that awaits an answer, in order.
struct Broker {
    awaited: VecDeque<Packet>,
    awaited_ids: HashSet<PacketId>,
    /// Upstream PUBLISH payloads the broker acknowledged.
    acknowledged_payloads: HashSet<Bytes>,
    /// Payloads by upstream packet id, for its PUBACK.
    payload_of: HashMap<PacketId, Bytes>,
}

struct World {
    hub: HubState<Sink>,
    now: std::time::Instant,
    sessions: HashMap<SessionId, Rc<RefCell<Seen>>>,
    next_session: SessionId,
    by_slot: HashMap<u8, SessionId>,
    /// Client QoS 1 publishes: (session, client id) -> payload.
    published: HashMap<(SessionId, PacketId), Bytes>,
    next_payload: u64,
    broker: Broker,
    lost: bool,
}

impl World {
    fn new() -> World {
        let now = crate::test_clock::start();
        World {
            hub: HubState::new(
                HubConfig {
                    replay_retained: RetainedReplay::Always,
                    ..HubConfig::new(1 << 20)
                },
                now,
            ),
            now,
            sessions: HashMap::new(),
            next_session: 1,
            by_slot: HashMap::new(),
            published: HashMap::new(),
            next_payload: 0,
            broker: Broker {
                awaited: VecDeque::new(),
                awaited_ids: HashSet::new(),
                acknowledged_payloads: HashSet::new(),
                payload_of: HashMap::new(),
            },
            lost: false,
        }
    }

    fn live(&self, slot: u8) -> Option<SessionId> {
        let session = *self.by_slot.get(&slot)?;
        (!self.sessions[&session].borrow().ended).then_some(session)
    }

    /// Reads what the hub wrote upstream; checks packet ids.
    fn drain_upstream(&mut self) -> Result<(), TestCaseError> {
        let mut bytes = BytesMut::from(self.hub.upstream_pending());
        let written = bytes.len();
        self.hub.upstream_written(written);
        if self.lost {
            prop_assert_eq!(written, 0, "written while lost");
            return Ok(());
        }
        while let Some(packet) = mqtt::decode(&mut bytes, usize::MAX).unwrap() {
            let id = match &packet {
                Packet::Subscribe(subscribe) => Some(subscribe.packet_id),
                Packet::Unsubscribe(unsubscribe) => Some(unsubscribe.packet_id),
                Packet::Publish(publish) if publish.qos != QoS::AtMostOnce => {
                    let id = publish.packet_id.unwrap();
                    self.broker.payload_of.insert(id, publish.payload.clone());
                    Some(id)
                }
                Packet::PingReq => None,
                _ => continue,
            };
            if let Some(id) = id {
                prop_assert!(
                    self.broker.awaited_ids.insert(id),
                    "packet id {} used twice while awaited",
                    id.get()
                );
            }
            self.broker.awaited.push_back(packet);
        }
        Ok(())
    }

    fn answer_one(&mut self) -> Result<bool, TestCaseError> {
        if self.lost {
            return Ok(false);
        }
        let Some(packet) = self.broker.awaited.pop_front() else {
            return Ok(false);
        };
        let answer = match packet {
            Packet::Subscribe(subscribe) => {
                self.broker.awaited_ids.remove(&subscribe.packet_id);
                Packet::SubAck(SubAck {
                    packet_id: subscribe.packet_id,
                    return_codes: subscribe
                        .filters
                        .iter()
                        .map(|_| SubscribeReturnCode::Success(QoS::AtLeastOnce))
                        .collect(),
                })
            }
            Packet::Unsubscribe(Unsubscribe { packet_id, .. }) => {
                self.broker.awaited_ids.remove(&packet_id);
                Packet::UnsubAck(packet_id)
            }
            Packet::Publish(publish) => {
                let id = publish.packet_id.unwrap();
                self.broker.awaited_ids.remove(&id);
                if let Some(payload) = self.broker.payload_of.remove(&id) {
                    self.broker.acknowledged_payloads.insert(payload);
                }
                Packet::PubAck(id)
            }
            _ => Packet::PingResp,
        };
        self.hub.handle_upstream_packet(answer, self.now);
        self.drain_upstream()?;
        Ok(true)
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Attach(slot) => {
                if self.live(slot).is_none() {
                    let session = self.next_session;
                    self.next_session += 1;
                    let seen = Rc::new(RefCell::new(Seen::default()));
                    self.sessions.insert(session, seen.clone());
                    self.by_slot.insert(slot, session);
                    self.hub.attach(
                        session,
                        SessionAttach {
                            sink: Sink(seen),
                            client_id: format!("app-{slot}"),
                            will: None,
                            max_subscriptions: 4,
                            max_unacknowledged: 8,
                            peer: false,
                            mqtt5: true,
                        },
                        self.now,
                    );
                }
            }
            Op::Detach(slot) => {
                if let Some(session) = self.live(slot) {
                    self.hub.detach(session, true, self.now);
                    self.sessions[&session].borrow_mut().ended = true;
                }
            }
            Op::Subscribe(slot, filter) => {
                if let Some(session) = self.live(slot) {
                    let packet = Packet::Subscribe(Subscribe {
                        packet_id: PacketId::new(u16::from(filter) + 1).unwrap(),
                        filters: vec![(FILTERS[usize::from(filter)].into(), QoS::AtLeastOnce)],
                    });
                    self.hub.handle_client_packet(session, packet, self.now);
                }
            }
            Op::Unsubscribe(slot, filter) => {
                if let Some(session) = self.live(slot) {
                    let packet = Packet::Unsubscribe(Unsubscribe {
                        packet_id: PacketId::new(u16::from(filter) + 10).unwrap(),
                        filters: vec![FILTERS[usize::from(filter)].into()],
                    });
                    self.hub.handle_client_packet(session, packet, self.now);
                }
            }
            Op::Publish(slot, topic, qos1) => {
                if let Some(session) = self.live(slot) {
                    self.next_payload += 1;
                    let payload = Bytes::from(self.next_payload.to_string());
                    let id = PacketId::new((self.next_payload % 60_000) as u16 + 1).unwrap();
                    if qos1 {
                        if self.published.contains_key(&(session, id)) {
                            return Ok(());
                        }
                        self.published.insert((session, id), payload.clone());
                    }
                    let packet = Packet::Publish(Publish {
                        dup: false,
                        qos: if qos1 {
                            QoS::AtLeastOnce
                        } else {
                            QoS::AtMostOnce
                        },
                        retain: false,
                        topic: TOPICS[usize::from(topic)].into(),
                        packet_id: qos1.then_some(id),
                        payload,
                    });
                    self.hub.handle_client_packet(session, packet, self.now);
                }
            }
            Op::Answer => {
                self.answer_one()?;
            }
            Op::AnswerAll => while self.answer_one()? {},
            Op::BrokerPublish(topic) => {
                if !self.lost {
                    let packet = Packet::Publish(Publish {
                        dup: false,
                        qos: QoS::AtMostOnce,
                        retain: false,
                        topic: TOPICS[usize::from(topic)].into(),
                        packet_id: None,
                        payload: Bytes::from_static(b"report"),
                    });
                    self.hub.handle_upstream_packet(packet, self.now);
                }
            }
            Op::Lost => {
                if !self.lost {
                    self.hub
                        .upstream_lost(self.now + Duration::from_secs(3600), self.now);
                    self.lost = true;
                    self.broker.awaited.clear();
                    self.broker.awaited_ids.clear();
                    self.broker.payload_of.clear();
                }
            }
            Op::Resumed => {
                if self.lost {
                    self.lost = false;
                    self.hub.upstream_resumed(self.now);
                }
            }
            Op::Advance(millis) => {
                self.now += Duration::from_millis(u64::from(millis));
                if self.hub.poll_timeout() <= self.now {
                    self.hub.handle_timeout(self.now);
                }
            }
        }
        // The hub may have ended (idle with no session): start over.
        if self.hub.take_end().is_some() {
            return Err(TestCaseError::reject("the hub ended"));
        }
        self.drain_upstream()?;
        self.check()
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let broken = self.hub.invariant_violations();
        prop_assert!(broken.is_empty(), "{:?}", broken);
        // Acknowledged only what the broker acknowledged.
        for (session, seen) in &self.sessions {
            for id in &seen.borrow().acknowledged {
                if let Some(payload) = self.published.get(&(*session, *id)) {
                    prop_assert!(
                        self.broker.acknowledged_payloads.contains(payload),
                        "session {} got PUBACK {} before the broker's",
                        session,
                        id.get()
                    );
                }
            }
        }
        Ok(())
    }

    /// Once a live upstream has answered everything, every QoS 1 publish
    /// of a live session is acknowledged or refused.
    fn nothing_lost(&mut self) -> Result<(), TestCaseError> {
        if self.lost {
            self.step(Op::Resumed)?;
        }
        // Long enough for the rate and any watchdog to settle.
        for _ in 0..50 {
            while self.answer_one()? {}
            self.step(Op::Advance(1_000))?;
        }
        while self.answer_one()? {}
        for (session, id) in self.published.keys() {
            let seen = self.sessions[session].borrow();
            if seen.ended {
                continue;
            }
            prop_assert!(
                seen.acknowledged.contains(id) || seen.refused.contains(id),
                "session {}'s publish {} was neither acknowledged nor refused",
                session,
                id.get()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2_000),
        max_global_rejects: 100_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_hub_keeps_its_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        let mut world = World::new();
        for op in ops {
            world.step(op)?;
        }
        world.nothing_lost()?;
    }
}

#[cfg(test)]
#[test]
fn the_fuzz_entry_runs_what_bytes_say() {
    // Attach, subscribe, publish QoS 1, lose and resume, answer all.
    run_ops(&[0, 0, 2, 0, 4, 0x80, 8, 0, 9, 0, 6, 0, 10, 255]);
    run_ops(&[]);
    run_ops(&[7]);
}
