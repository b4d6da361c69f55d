//! Unit tests of the hub's state, packet by packet: a deterministic
//! harness (in the way of quinn-proto's test pair) holds a [`HubState`],
//! a clock it moves by hand, sessions whose sinks record what they got, and
//! the upstream's side, played by each test as a broker would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use relay_proto::mqtt::{
    self, Packet, PacketId, Publish, QoS, SubAck, Subscribe, SubscribeReturnCode, Unsubscribe,
};
use relay_proto::mqtt5;

use super::bambu::BambuProfile;
use super::policy::{ChurnLimit, PublishRate, TopicPolicy};
use super::state::{
    HubConfig, HubCounters, HubEnd, HubState, RetainedReplay, SessionAttach, SessionId, SessionSink,
};
use crate::close::Close;
use crate::fake_broker::FakeBroker;

/// What one session's client has been sent.
#[derive(Debug, Default)]
struct Received {
    budget: usize,
    queued: usize,
    packets: Vec<Packet>,
    /// MQTT 5 refusals of the session's PUBLISHes.
    refusals: Vec<(PacketId, super::state::PublishRefused)>,
    ended: Option<Close>,
    /// Ended with what was queued dropped.
    abandoned: bool,
    /// Deliveries encoded as MQTT 5 by the hub, as given.
    mqtt5_deliveries: Vec<Bytes>,
}

#[derive(Debug, Clone)]
struct RecordingSink(Rc<RefCell<Received>>);

impl SessionSink for RecordingSink {
    fn deliver(&self, bytes: Bytes) -> bool {
        let mut received = self.0.borrow_mut();
        if received.queued + bytes.len() > received.budget {
            return false;
        }
        received.queued += bytes.len();
        let mut buffer = BytesMut::from(&bytes[..]);
        while let Some(packet) = mqtt::decode(&mut buffer, usize::MAX).unwrap() {
            received.packets.push(packet);
        }
        assert!(buffer.is_empty(), "a delivery holds whole packets");
        true
    }

    /// Recorded as the 3.1.1 PUBLISH it stands for.
    fn deliver_mqtt5(&self, bytes: Bytes) -> bool {
        let mut received = self.0.borrow_mut();
        if received.queued + bytes.len() > received.budget {
            return false;
        }
        received.queued += bytes.len();
        received.mqtt5_deliveries.push(bytes.clone());
        let mut buffer = BytesMut::from(&bytes[..]);
        while let Some(packet) = mqtt5::decode(&mut buffer, usize::MAX).unwrap() {
            let mqtt5::Packet::Publish(publish) = packet else {
                panic!("an MQTT 5 delivery holds PUBLISHes only: {packet:?}");
            };
            assert!(publish.properties.is_empty());
            received.packets.push(Packet::Publish(Publish {
                dup: publish.dup,
                qos: publish.qos,
                retain: publish.retain,
                topic: publish.topic,
                packet_id: publish.packet_id,
                payload: publish.payload,
            }));
        }
        assert!(buffer.is_empty(), "a delivery holds whole packets");
        true
    }

    fn end(&self, close: Close) {
        self.0.borrow_mut().ended.get_or_insert(close);
    }

    fn refuse_publish(
        &self,
        packet_id: PacketId,
        _: QoS,
        why: super::state::PublishRefused,
    ) -> bool {
        self.0.borrow_mut().refusals.push((packet_id, why));
        true
    }

    fn abandon(&self, close: Close) {
        let mut received = self.0.borrow_mut();
        received.abandoned = true;
        received.ended.get_or_insert(close);
    }
}

struct Harness {
    hub: HubState<RecordingSink>,
    now: Instant,
    sessions: HashMap<SessionId, Rc<RefCell<Received>>>,
    /// The upstream, for tests that let a broker answer
    /// ([`Harness::settle`]) instead of writing its packets.
    broker: FakeBroker,
}

fn id(value: u16) -> PacketId {
    PacketId::new(value).unwrap()
}

fn config(replay: RetainedReplay) -> HubConfig {
    HubConfig {
        upstream_keep_alive: Duration::from_secs(30),
        linger: None,
        replay_retained: replay,
        ..HubConfig::new(1 << 20)
    }
}

fn publish(topic: &str, qos: QoS, packet_id: Option<u16>, payload: &'static [u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: packet_id.map(id),
        payload: Bytes::from_static(payload),
    }
}

fn retained(topic: &str, payload: &'static [u8]) -> Publish {
    Publish {
        retain: true,
        ..publish(topic, QoS::AtMostOnce, None, payload)
    }
}

fn subscribe(packet_id: u16, filters: &[(&str, QoS)]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: id(packet_id),
        filters: filters.iter().map(|(f, q)| (f.to_string(), *q)).collect(),
    })
}

fn suback(packet_id: u16, codes: &[SubscribeReturnCode]) -> Packet {
    Packet::SubAck(SubAck {
        packet_id: id(packet_id),
        return_codes: codes.to_vec(),
    })
}

fn granted(qos: QoS) -> SubscribeReturnCode {
    SubscribeReturnCode::Success(qos)
}

impl Harness {
    fn new(config: HubConfig) -> Harness {
        let now = crate::test_clock::start();
        Harness {
            hub: HubState::new(config, now),
            now,
            sessions: HashMap::new(),
            broker: FakeBroker::new(),
        }
    }

    /// The broker answers everything the hub sent, and what that makes
    /// the hub send, until the hub has nothing more to say.
    fn settle(&mut self) {
        loop {
            let packets = self.upstream_with_pings();
            if packets.is_empty() {
                return;
            }
            for packet in packets {
                for answer in self.broker.answer(packet) {
                    self.printer(answer);
                }
            }
        }
    }

    /// Another client of the broker (or the printer) publishes.
    fn published_elsewhere(&mut self, publish: Publish) {
        for packet in self.broker.publish_from_elsewhere(publish) {
            self.printer(packet);
        }
        self.settle();
    }

    fn attach_with(&mut self, session: SessionId, client_id: &str, will: Option<Publish>) {
        self.attach_as(session, client_id, will, false);
    }

    /// An MQTT 5 session.
    fn attach_v5(&mut self, session: SessionId) {
        self.attach_as(session, &format!("client-{session}"), None, true);
    }

    fn attach_as(
        &mut self,
        session: SessionId,
        client_id: &str,
        will: Option<Publish>,
        mqtt5: bool,
    ) {
        let received = Rc::new(RefCell::new(Received {
            budget: 1 << 20,
            ..Received::default()
        }));
        self.sessions.insert(session, received.clone());
        self.hub.attach(
            session,
            SessionAttach {
                sink: RecordingSink(received),
                client_id: client_id.into(),
                will,
                max_subscriptions: 3,
                max_unacknowledged: 4,
                peer: false,
                mqtt5,
            },
            self.now,
        );
    }

    fn attach(&mut self, session: SessionId) {
        self.attach_with(session, &format!("client-{session}"), None);
    }

    fn client(&mut self, session: SessionId, packet: Packet) {
        self.hub.handle_client_packet(session, packet, self.now);
    }

    fn printer(&mut self, packet: Packet) {
        self.hub.handle_upstream_packet(packet, self.now);
    }

    /// What the hub wrote upstream since the last call, PINGREQs included.
    fn upstream_with_pings(&mut self) -> Vec<Packet> {
        let mut buffer = BytesMut::from(self.hub.upstream_pending());
        let written = buffer.len();
        self.hub.upstream_written(written);
        let mut packets = Vec::new();
        while let Some(packet) = mqtt::decode(&mut buffer, usize::MAX).unwrap() {
            packets.push(packet);
        }
        packets
    }

    /// What the hub wrote upstream since the last call; PINGREQs are
    /// answered, as a broker would, and left out.
    fn upstream(&mut self) -> Vec<Packet> {
        let packets = self.upstream_with_pings();
        let (pings, others): (Vec<_>, Vec<_>) =
            packets.into_iter().partition(|p| *p == Packet::PingReq);
        for _ in pings {
            self.printer(Packet::PingResp);
        }
        others
    }

    /// The one SUBSCRIBE the hub sent upstream since the last look.
    fn upstream_subscribe(&mut self) -> Subscribe {
        let packets = self.upstream_with_pings();
        let mut subscribes = packets.into_iter().filter_map(|packet| match packet {
            Packet::Subscribe(subscribe) => Some(subscribe),
            _ => None,
        });
        let subscribe = subscribes.next().expect("a SUBSCRIBE upstream");
        assert!(subscribes.next().is_none(), "one SUBSCRIBE upstream");
        subscribe
    }

    fn received(&mut self, session: SessionId) -> Vec<Packet> {
        std::mem::take(&mut self.sessions[&session].borrow_mut().packets)
    }

    fn ended(&self, session: SessionId) -> Option<Close> {
        self.sessions[&session].borrow().ended.clone()
    }

    fn publishes(&mut self, session: SessionId) -> Vec<Publish> {
        self.received(session)
            .into_iter()
            .map(|packet| match packet {
                Packet::Publish(publish) => publish,
                other => panic!("expected PUBLISH, got {other:?}"),
            })
            .collect()
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.hub.handle_timeout(self.now);
    }

    /// Subscribes `session` to `filter` on a fresh filter and grants it.
    fn subscribed(&mut self, session: SessionId, filter: &str, grant: QoS) {
        self.client(session, subscribe(1, &[(filter, QoS::AtLeastOnce)]));
        let upstream = self.upstream_subscribe();
        self.printer(suback(
            upstream.packet_id.get(),
            &vec![granted(grant); upstream.filters.len()],
        ));
        assert!(matches!(
            self.received(session).as_slice(),
            [Packet::SubAck(_)]
        ));
    }
}

#[test]
fn subscriptions_are_reference_counted_upstream() {
    let mut hub = Harness::new(config(RetainedReplay::WhenSeen));
    hub.attach(1);
    hub.attach(2);
    hub.client(1, subscribe(10, &[("device/a/report", QoS::AtLeastOnce)]));
    let upstream = hub.upstream_subscribe();
    assert_eq!(
        upstream.filters,
        vec![("device/a/report".to_owned(), QoS::AtLeastOnce)],
        "upstream subscriptions are QoS 1"
    );
    // The client waits for the printer's grant.
    assert!(hub.received(1).is_empty());
    hub.printer(suback(
        upstream.packet_id.get(),
        &[granted(QoS::AtLeastOnce)],
    ));
    assert_eq!(
        hub.received(1),
        vec![suback(10, &[granted(QoS::AtLeastOnce)])]
    );

    // The second holder is answered at once; the printer hears nothing.
    hub.client(2, subscribe(4, &[("device/a/report", QoS::AtMostOnce)]));
    assert_eq!(hub.upstream(), vec![]);
    assert_eq!(
        hub.received(2),
        vec![suback(4, &[granted(QoS::AtMostOnce)])]
    );

    // UNSUBSCRIBE upstream only when the last holder leaves.
    hub.client(
        1,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: id(11),
            filters: vec!["device/a/report".into()],
        }),
    );
    assert_eq!(hub.received(1), vec![Packet::UnsubAck(id(11))]);
    assert_eq!(hub.upstream(), vec![]);
    hub.detach_abruptly(2);
    let packets = hub.upstream();
    assert!(
        matches!(packets.as_slice(), [Packet::Unsubscribe(u)] if u.filters == vec!["device/a/report".to_owned()]),
        "{packets:?}"
    );
    assert_eq!(hub.hub.upstream_filter_count(), 0);
}

impl Harness {
    fn detach_abruptly(&mut self, session: SessionId) {
        self.hub.detach(session, false, self.now);
    }

    fn disconnect(&mut self, session: SessionId) {
        self.hub.detach(session, true, self.now);
    }
}

#[test]
fn grants_are_the_lower_of_requested_and_upstream() {
    let mut hub = Harness::new(config(RetainedReplay::WhenSeen));
    hub.attach(1);
    hub.client(
        1,
        subscribe(
            2,
            &[
                ("a", QoS::ExactlyOnce),
                ("b", QoS::AtMostOnce),
                ("c", QoS::AtLeastOnce),
            ],
        ),
    );
    let upstream = hub.upstream_subscribe();
    hub.printer(suback(
        upstream.packet_id.get(),
        &[
            granted(QoS::AtLeastOnce),
            granted(QoS::AtLeastOnce),
            SubscribeReturnCode::Failure,
        ],
    ));
    assert_eq!(
        hub.received(1),
        vec![suback(
            2,
            &[
                granted(QoS::AtLeastOnce),
                granted(QoS::AtMostOnce),
                SubscribeReturnCode::Failure
            ]
        )]
    );
    // The refused filter is not held: nothing to UNSUBSCRIBE later, and it
    // does not count against the session's subscriptions.
    assert_eq!(hub.hub.upstream_filter_count(), 2);
    hub.client(1, subscribe(3, &[("d", QoS::AtMostOnce)]));
    assert!(hub.ended(1).is_none());
}

#[test]
fn a_message_is_delivered_once_per_session_at_its_best_matching_qos() {
    let mut hub = Harness::new(config(RetainedReplay::WhenSeen));
    hub.attach(1);
    hub.attach(2);
    hub.subscribed(1, "device/+/report", QoS::AtLeastOnce);
    hub.client(
        1,
        subscribe(
            5,
            &[("device/a/report", QoS::AtMostOnce), ("#", QoS::AtMostOnce)],
        ),
    );
    let upstream = hub.upstream_subscribe();
    hub.printer(suback(
        upstream.packet_id.get(),
        &[granted(QoS::AtLeastOnce), granted(QoS::AtLeastOnce)],
    ));
    hub.received(1);
    hub.client(2, subscribe(1, &[("device/a/report", QoS::AtMostOnce)]));
    assert!(matches!(hub.received(2).as_slice(), [Packet::SubAck(_)]));

    hub.printer(Packet::Publish(publish(
        "device/a/report",
        QoS::AtLeastOnce,
        Some(900),
        b"{}",
    )));
    // The hub acknowledges the printer itself.
    assert_eq!(hub.upstream(), vec![Packet::PubAck(id(900))]);
    let first = hub.publishes(1);
    assert_eq!(first.len(), 1, "one copy though three filters match");
    assert_eq!(first[0].qos, QoS::AtLeastOnce);
    assert!(first[0].packet_id.is_some());
    let second = hub.publishes(2);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].qos, QoS::AtMostOnce);
    assert_eq!(second[0].packet_id, None);
}

#[test]
fn packet_ids_are_remapped_and_acknowledged_after_the_printer() {
    let mut hub = Harness::new(config(RetainedReplay::WhenSeen));
    hub.attach(1);
    hub.attach(2);
    hub.client(
        1,
        Packet::Publish(publish("req", QoS::AtLeastOnce, Some(7), b"one")),
    );
    hub.client(
        2,
        Packet::Publish(publish("req", QoS::AtLeastOnce, Some(7), b"two")),
    );
    let upstream: Vec<Publish> = hub
        .upstream()
        .into_iter()
        .map(|packet| match packet {
            Packet::Publish(publish) => publish,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(upstream.len(), 2);
    assert_ne!(
        upstream[0].packet_id, upstream[1].packet_id,
        "the same client id from two sessions gets two upstream ids"
    );
    assert!(hub.received(1).is_empty(), "no PUBACK before the printer's");
    hub.printer(Packet::PubAck(upstream[1].packet_id.unwrap()));
    assert!(hub.received(1).is_empty());
    assert_eq!(hub.received(2), vec![Packet::PubAck(id(7))]);
    hub.printer(Packet::PubAck(upstream[0].packet_id.unwrap()));
    assert_eq!(hub.received(1), vec![Packet::PubAck(id(7))]);
    // A PUBACK the hub did not ask for is ignored.
    hub.printer(Packet::PubAck(id(4242)));
    assert!(hub.received(1).is_empty() && hub.received(2).is_empty());
    assert!(hub.hub.take_end().is_none());
}

#[test]
fn qos2_travels_upstream_as_qos1_and_completes_exactly_once_at_the_edge() {
    let mut hub = Harness::new(config(RetainedReplay::WhenSeen));
    hub.attach(1);
    let mut request = publish("req", QoS::ExactlyOnce, Some(5), b"{}");
    hub.client(1, Packet::Publish(request.clone()));
    let upstream = hub.upstream();
    let [Packet::Publish(forwarded)] = upstream.as_slice() else {
        panic!("{upstream:?}");
    };
    assert_eq!(forwarded.qos, QoS::AtLeastOnce);
    // The client re-sends before the PUBREC: not forwarded again.
    request.dup = true;
    hub.client(1, Packet::Publish(request.clone()));
    assert_eq!(hub.upstream(), vec![]);
    hub.printer(Packet::PubAck(forwarded.packet_id.unwrap()));
    assert_eq!(hub.received(1), vec![Packet::PubRec(id(5))]);
    // Re-sent after the PUBREC: PUBREC again, still not forwarded.
    hub.client(1, Packet::Publish(request));
    assert_eq!(hub.upstream(), vec![]);
    assert_eq!(hub.received(1), vec![Packet::PubRec(id(5))]);
    hub.client(1, Packet::PubRel(id(5)));
    assert_eq!(hub.received(1), vec![Packet::PubComp(id(5))]);
    // After PUBREL the id is free: a new message with it is a new message.
    hub.client(
        1,
        Packet::Publish(publish("req", QoS::ExactlyOnce, Some(5), b"again")),
    );
    assert_eq!(hub.upstream().len(), 1);
}

#[test]
fn a_session_with_too_many_unacknowledged_publishes_is_cut() {
    let mut hub = Harness::new(config(RetainedReplay::WhenSeen));
    hub.attach(1);
    for packet_id in 1..=4 {
        hub.client(
            1,
            Packet::Publish(publish("req", QoS::AtLeastOnce, Some(packet_id), b"")),
        );
    }
    assert!(hub.ended(1).is_none());
    hub.client(
        1,
        Packet::Publish(publish("req", QoS::AtLeastOnce, Some(5), b"")),
    );
    assert_eq!(
        hub.ended(1),
        Some(Close::limit("more than 4 unacknowledged publishes"))
    );
    assert_eq!(hub.upstream().len(), 4, "the fifth never left");
}

/// The issue's three findings, against a broker that behaves as MQTT 3.1.1
/// says: RETAIN=1 only on what a new SUBSCRIBE makes it send, after the
/// SUBACK.
#[test]
fn retained_messages_come_from_the_broker_to_the_session_that_subscribed() {
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach(1);
    hub.attach(2);
    hub.attach(3);
    hub.subscribed(1, "t/#", QoS::AtLeastOnce);

    // Missing message: t/x = v1 was retained while A held t/#; A got it
    // live (RETAIN=0). B subscribes: the SUBSCRIBE goes upstream again and
    // the broker re-sends v1 for it.
    hub.printer(Packet::Publish(publish(
        "t/x",
        QoS::AtMostOnce,
        None,
        b"v1",
    )));
    assert_eq!(hub.publishes(1).len(), 1);
    hub.client(2, subscribe(3, &[("t/#", QoS::AtLeastOnce)]));
    assert_eq!(
        hub.received(2),
        vec![suback(3, &[granted(QoS::AtLeastOnce)])],
        "the grant is known: answered at once"
    );
    let replay = hub.upstream_subscribe();
    assert_eq!(replay.filters, vec![("t/#".to_owned(), QoS::AtLeastOnce)]);
    hub.printer(suback(replay.packet_id.get(), &[granted(QoS::AtLeastOnce)]));
    hub.printer(Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        packet_id: Some(id(31)),
        ..retained("t/x", b"v1")
    }));
    let to_b = hub.publishes(2);
    assert_eq!(to_b.len(), 1);
    assert!(to_b[0].retain);
    assert_eq!(to_b[0].qos, QoS::AtLeastOnce, "at the message's QoS");
    assert_eq!(to_b[0].payload, Bytes::from_static(b"v1"));
    assert!(hub.publishes(1).is_empty(), "A does not get B's copy");

    // Stale message: v2 replaces v1; a later subscriber gets v2 from the
    // broker (nothing is cached at the edge), and nothing once cleared.
    hub.upstream();
    hub.printer(Packet::Publish(publish(
        "t/x",
        QoS::AtMostOnce,
        None,
        b"v2",
    )));
    hub.publishes(1);
    hub.publishes(2);
    hub.client(3, subscribe(1, &[("t/#", QoS::AtMostOnce)]));
    hub.received(3);
    let replay = hub.upstream_subscribe();
    hub.printer(suback(replay.packet_id.get(), &[granted(QoS::AtLeastOnce)]));
    hub.printer(Packet::Publish(retained("t/x", b"v2")));
    let to_c = hub.publishes(3);
    assert_eq!(to_c.len(), 1);
    assert_eq!(to_c[0].payload, Bytes::from_static(b"v2"));
    assert!(hub.publishes(1).is_empty() && hub.publishes(2).is_empty());
    // The broker's retained messages are through once its PINGRESP for the
    // ping after the SUBSCRIBE is back.
    assert!(hub.upstream().is_empty());

    // Cleared: a later subscriber gets nothing (the broker sends nothing).
    hub.attach(4);
    hub.client(4, subscribe(1, &[("t/#", QoS::AtMostOnce)]));
    let replay = hub.upstream_subscribe();
    hub.printer(suback(replay.packet_id.get(), &[granted(QoS::AtLeastOnce)]));
    assert!(matches!(hub.received(4).as_slice(), [Packet::SubAck(_)]));
    assert!(hub.publishes(4).is_empty());
}

#[test]
fn a_new_overlapping_filter_brings_retained_messages_to_its_session_only() {
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach(1);
    hub.attach(2);
    hub.subscribed(1, "d/#", QoS::AtMostOnce);
    // Duplicate: A holds d/#; B subscribes a new overlapping filter d/+.
    hub.client(2, subscribe(8, &[("d/+", QoS::AtMostOnce)]));
    let upstream = hub.upstream_subscribe();
    assert_eq!(upstream.filters, vec![("d/+".to_owned(), QoS::AtLeastOnce)]);
    hub.printer(suback(
        upstream.packet_id.get(),
        &[granted(QoS::AtMostOnce)],
    ));
    assert!(matches!(hub.received(2).as_slice(), [Packet::SubAck(_)]));
    hub.printer(Packet::Publish(retained("d/y", b"on")));
    assert!(hub.publishes(1).is_empty(), "A gets no second copy");
    let to_b = hub.publishes(2);
    assert!(to_b.len() == 1 && to_b[0].retain);
    // Once the broker's PINGRESP is back, the window is closed: a live
    // message reaches both.
    hub.upstream();
    hub.printer(Packet::Publish(publish(
        "d/y",
        QoS::AtMostOnce,
        None,
        b"off",
    )));
    assert_eq!(hub.publishes(1).len(), 1);
    assert_eq!(hub.publishes(2).len(), 1);
}

#[test]
fn a_bambu_hub_subscribes_a_held_filter_again_only_once_it_saw_a_retained_message() {
    let mut hub = Harness::new(config(RetainedReplay::WhenSeen));
    for session in 1..=3 {
        hub.attach(session);
    }
    hub.subscribed(1, "device/s/#", QoS::AtMostOnce);
    hub.client(2, subscribe(1, &[("device/s/#", QoS::AtMostOnce)]));
    assert!(
        hub.upstream().is_empty(),
        "nothing retained seen: no replay"
    );
    // An app leaves a retained message through the hub.
    hub.client(
        2,
        Packet::Publish(Publish {
            retain: true,
            ..publish("device/s/state", QoS::AtMostOnce, None, b"idle")
        }),
    );
    assert_eq!(hub.upstream().len(), 1);
    hub.client(3, subscribe(1, &[("device/s/#", QoS::AtMostOnce)]));
    let replay = hub.upstream_subscribe();
    assert_eq!(replay.filters[0].0, "device/s/#");
}

#[test]
fn a_will_goes_out_at_its_qos_on_an_abrupt_end_only() {
    let mut hub = Harness::new(config(RetainedReplay::WhenSeen));
    let will = Publish {
        retain: true,
        ..publish("apps/phone", QoS::AtLeastOnce, None, b"gone")
    };
    hub.attach_with(1, "polite", Some(will.clone()));
    hub.attach_with(2, "vanishing", Some(will));
    hub.disconnect(1);
    assert!(hub.upstream().is_empty(), "DISCONNECT discards the will");
    hub.detach_abruptly(2);
    let upstream = hub.upstream();
    let [Packet::Publish(sent)] = upstream.as_slice() else {
        panic!("{upstream:?}");
    };
    assert_eq!(sent.topic, "apps/phone");
    assert_eq!(sent.qos, QoS::AtLeastOnce, "a QoS 1 will stays QoS 1");
    assert!(sent.retain);
    assert!(sent.packet_id.is_some());
    // The printer's PUBACK for it has nobody to reach.
    hub.printer(Packet::PubAck(sent.packet_id.unwrap()));
    assert!(hub.hub.take_end().is_none());
}

#[test]
fn a_second_session_with_the_same_client_id_replaces_the_first() {
    let mut hub = Harness::new(config(RetainedReplay::WhenSeen));
    let will = publish("apps/phone", QoS::AtMostOnce, None, b"gone");
    hub.attach_with(1, "phone", Some(will));
    hub.subscribed(1, "device/s/report", QoS::AtMostOnce);
    hub.attach_with(2, "phone", None);
    assert_eq!(hub.ended(1), Some(Close::replaced()));
    // The older session's will goes out, its filter is released.
    let upstream = hub.upstream();
    assert!(
        matches!(upstream.as_slice(), [Packet::Unsubscribe(_), Packet::Publish(p)] if p.topic == "apps/phone"),
        "{upstream:?}"
    );
    assert_eq!(hub.hub.session_count(), 1);
    // The older session's own detach, arriving later, changes nothing.
    hub.detach_abruptly(1);
    assert!(hub.upstream().is_empty());
    assert!(hub.ended(2).is_none());
    // Another client id, or none, takes nothing over.
    hub.attach_with(3, "tablet", None);
    hub.attach_with(4, "", None);
    hub.attach_with(5, "", None);
    assert!(hub.ended(2).is_none() && hub.ended(4).is_none());
    // Once the holder has gone, the id is free.
    hub.disconnect(2);
    hub.attach_with(6, "phone", None);
    assert!(hub.ended(3).is_none());
}

#[test]
fn a_slow_consumer_is_ended_and_its_filters_released() {
    let mut hub = Harness::new(config(RetainedReplay::WhenSeen));
    hub.attach(1);
    hub.attach(2);
    hub.subscribed(1, "r", QoS::AtMostOnce);
    hub.client(2, subscribe(1, &[("r", QoS::AtMostOnce)]));
    hub.received(2);
    hub.sessions[&2].borrow_mut().budget = 100;
    hub.printer(Packet::Publish(publish(
        "r",
        QoS::AtMostOnce,
        None,
        &[0; 60],
    )));
    assert!(hub.ended(2).is_none());
    hub.printer(Packet::Publish(publish(
        "r",
        QoS::AtMostOnce,
        None,
        &[0; 60],
    )));
    assert_eq!(hub.ended(2), Some(Close::limit("slow consumer")));
    assert!(
        hub.sessions[&2].borrow().abandoned,
        "its queue is dropped so that the close goes next"
    );
    assert_eq!(hub.hub.counters().slow_consumer_cuts, 1);
    assert_eq!(hub.hub.session_count(), 1);
    // The other reader got both; the slow one is no longer served.
    assert_eq!(hub.publishes(1).len(), 2);
    hub.printer(Packet::Publish(publish("r", QoS::AtMostOnce, None, b"")));
    assert_eq!(hub.publishes(2).len(), 1);
    assert_eq!(hub.publishes(1).len(), 1);
}

#[test]
fn deliveries_keep_the_printers_order() {
    let mut hub = Harness::new(config(RetainedReplay::WhenSeen));
    hub.attach(1);
    hub.subscribed(1, "#", QoS::AtLeastOnce);
    for index in 0..50u16 {
        let qos = if index % 3 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let payload: &'static [u8] = Box::leak(index.to_be_bytes().to_vec().into_boxed_slice());
        hub.printer(Packet::Publish(publish(
            &format!("t/{}", index % 4),
            qos,
            (qos == QoS::AtLeastOnce).then_some(index + 1),
            payload,
        )));
    }
    let order: Vec<u16> = hub
        .publishes(1)
        .iter()
        .map(|p| u16::from_be_bytes([p.payload[0], p.payload[1]]))
        .collect();
    assert_eq!(order, (0..50).collect::<Vec<_>>());
}

#[test]
fn too_many_subscriptions_end_the_session() {
    let mut hub = Harness::new(config(RetainedReplay::WhenSeen));
    hub.attach(1);
    hub.client(
        1,
        subscribe(1, &[("a", QoS::AtMostOnce), ("b", QoS::AtMostOnce)]),
    );
    hub.client(
        1,
        subscribe(2, &[("a", QoS::AtMostOnce), ("c", QoS::AtMostOnce)]),
    );
    assert!(hub.ended(1).is_none(), "a held filter does not count twice");
    hub.client(1, subscribe(3, &[("d", QoS::AtMostOnce)]));
    assert_eq!(
        hub.ended(1),
        Some(Close::limit("more than 3 subscriptions"))
    );
}

#[test]
fn the_hub_pings_upstream_and_ends_after_lingering_idle() {
    let mut hub = Harness::new(HubConfig {
        linger: Some(Duration::from_secs(60)),
        ..config(RetainedReplay::WhenSeen)
    });
    hub.attach(1);
    assert_eq!(hub.hub.poll_timeout(), hub.now + Duration::from_secs(30));
    hub.advance(Duration::from_secs(30));
    assert_eq!(hub.upstream_with_pings(), vec![Packet::PingReq]);
    hub.printer(Packet::PingResp);
    hub.advance(Duration::from_secs(40));
    assert_eq!(hub.upstream(), vec![], "its PINGREQ answered");
    hub.disconnect(1);
    let left_at = hub.now;
    hub.advance(Duration::from_secs(59));
    assert!(hub.hub.take_end().is_none());
    assert!(hub.hub.poll_timeout() <= left_at + Duration::from_secs(60));
    hub.advance(Duration::from_secs(1));
    assert!(matches!(hub.hub.take_end(), Some(HubEnd::Idle)));
}

#[test]
fn a_printer_that_sends_what_a_server_never_sends_ends_the_hub() {
    let mut hub = Harness::new(config(RetainedReplay::WhenSeen));
    hub.attach(1);
    hub.printer(Packet::PingReq);
    let end = hub.hub.take_end();
    assert!(matches!(end, Some(HubEnd::UpstreamProtocol(_))), "{end:?}");
    hub.hub
        .end_all_sessions(&Close::printer_unreachable("connection lost"));
    assert_eq!(
        hub.ended(1),
        Some(Close::printer_unreachable("connection lost"))
    );
}

fn bambu_like_policy() -> HubConfig {
    HubConfig {
        policy: std::sync::Arc::new(TopicPolicy {
            allow: vec!["device/X1/report".into(), "device/X1/request".into()],
            deny: Vec::new(),
            retain: false,
        }),
        ..config(RetainedReplay::WhenSeen)
    }
}

#[test]
fn refused_filters_get_0x80_and_never_reach_the_printer() {
    let mut hub = Harness::new(bambu_like_policy());
    hub.attach(1);
    hub.client(
        1,
        subscribe(
            7,
            &[
                ("device/X2/report", QoS::AtMostOnce),
                ("device/X1/report", QoS::AtLeastOnce),
                ("#", QoS::AtMostOnce),
            ],
        ),
    );
    let upstream = hub.upstream_subscribe();
    assert_eq!(
        upstream.filters,
        vec![("device/X1/report".to_owned(), QoS::AtLeastOnce)],
        "only the allowed filter goes upstream"
    );
    hub.printer(suback(
        upstream.packet_id.get(),
        &[granted(QoS::AtLeastOnce)],
    ));
    assert_eq!(
        hub.received(1),
        vec![suback(
            7,
            &[
                SubscribeReturnCode::Failure,
                granted(QoS::AtLeastOnce),
                SubscribeReturnCode::Failure
            ]
        )]
    );
    // Wholly refused: answered at once, and the printer sees nothing.
    hub.client(1, subscribe(8, &[("device/+/report", QoS::AtMostOnce)]));
    assert_eq!(hub.upstream(), vec![]);
    assert_eq!(
        hub.received(1),
        vec![suback(8, &[SubscribeReturnCode::Failure])]
    );
    assert_eq!(hub.hub.counters().refused_filters, 3);
    assert_eq!(hub.hub.upstream_filter_count(), 1);
}

#[test]
fn refused_publishes_are_acknowledged_and_dropped() {
    let mut hub = Harness::new(bambu_like_policy());
    hub.attach(1);
    hub.client(
        1,
        Packet::Publish(publish(
            "device/X2/request",
            QoS::AtLeastOnce,
            Some(3),
            b"{}",
        )),
    );
    hub.client(
        1,
        Packet::Publish(Publish {
            retain: true,
            ..publish("device/X1/request", QoS::AtMostOnce, None, b"{}")
        }),
    );
    hub.client(
        1,
        Packet::Publish(publish(
            "device/X2/request",
            QoS::ExactlyOnce,
            Some(4),
            b"{}",
        )),
    );
    assert_eq!(hub.upstream(), vec![], "nothing reached the printer");
    assert_eq!(
        hub.received(1),
        vec![Packet::PubAck(id(3)), Packet::PubRec(id(4))]
    );
    // An allowed one still goes.
    hub.client(
        1,
        Packet::Publish(publish("device/X1/request", QoS::AtMostOnce, None, b"{}")),
    );
    assert_eq!(hub.upstream().len(), 1);
    assert_eq!(
        hub.hub.counters(),
        HubCounters {
            refused_publishes: 3,
            ..HubCounters::default()
        }
    );
}

#[test]
fn a_will_the_policy_refuses_is_not_published() {
    let mut hub = Harness::new(bambu_like_policy());
    hub.attach_with(
        1,
        "a",
        Some(publish("device/X2/request", QoS::AtMostOnce, None, b"gone")),
    );
    hub.attach_with(
        2,
        "b",
        Some(publish("device/X1/request", QoS::AtMostOnce, None, b"gone")),
    );
    hub.hub.detach(1, false, hub.now);
    hub.hub.detach(2, false, hub.now);
    let upstream = hub.upstream();
    assert_eq!(upstream.len(), 1, "{upstream:?}");
    assert!(matches!(&upstream[0], Packet::Publish(p) if p.topic == "device/X1/request"));
    assert_eq!(hub.hub.counters().refused_publishes, 1);
}

#[test]
fn subscription_churn_is_cut_after_its_budget() {
    let mut hub = Harness::new(HubConfig {
        churn: ChurnLimit {
            burst: 4,
            per_minute: 60,
        },
        ..config(RetainedReplay::WhenSeen)
    });
    hub.attach(1);
    let mut packets_upstream = 0;
    for round in 0..10u16 {
        hub.client(1, subscribe(round + 1, &[("t", QoS::AtMostOnce)]));
        hub.client(
            1,
            Packet::Unsubscribe(Unsubscribe {
                packet_id: id(round + 100),
                filters: vec!["t".into()],
            }),
        );
        packets_upstream += hub
            .upstream()
            .iter()
            .filter(|p| matches!(p, Packet::Subscribe(_) | Packet::Unsubscribe(_)))
            .count();
        if hub.ended(1).is_some() {
            break;
        }
    }
    assert_eq!(
        hub.ended(1),
        Some(Close::limit("subscription churn (more than 60 a minute)"))
    );
    assert!(packets_upstream <= 5, "{packets_upstream} packets upstream");
    assert_eq!(hub.hub.counters().churn_cuts, 1);

    // A patient client is never cut: one change a second stays in budget.
    hub.attach(2);
    for round in 0..20u16 {
        hub.advance(Duration::from_secs(2));
        hub.client(2, subscribe(round + 1, &[("u", QoS::AtMostOnce)]));
        hub.client(
            2,
            Packet::Unsubscribe(Unsubscribe {
                packet_id: id(round + 100),
                filters: vec!["u".into()],
            }),
        );
        hub.upstream();
    }
    assert!(hub.ended(2).is_none());
}

fn rate(per_second: u32, burst: u32, max_waiting_per_session: usize) -> HubConfig {
    HubConfig {
        publish_rate: PublishRate {
            per_second,
            burst,
            max_waiting_per_session,
        },
        ..config(RetainedReplay::WhenSeen)
    }
}

#[test]
fn publishes_over_the_rate_wait_without_their_puback_in_order() {
    let mut hub = Harness::new(rate(10, 2, 10));
    hub.attach(1);
    for index in 1..=4u16 {
        hub.client(
            1,
            Packet::Publish(publish("cmd", QoS::AtLeastOnce, Some(index), b"go")),
        );
    }
    // The burst goes at once; the rest waits, and the hub wants to wake.
    assert_eq!(hub.upstream().len(), 2);
    assert_eq!(hub.hub.poll_timeout(), hub.now + Duration::from_millis(100));
    hub.advance(Duration::from_millis(100));
    let mut released = hub.upstream();
    assert_eq!(released.len(), 1);
    hub.advance(Duration::from_millis(100));
    released.extend(hub.upstream());
    assert_eq!(released.len(), 2);
    // In order, and each acknowledged only after the printer's PUBACK.
    let upstream_ids: Vec<PacketId> = released
        .iter()
        .map(|packet| match packet {
            Packet::Publish(publish) => publish.packet_id.unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(hub.received(1).is_empty());
    for upstream_id in upstream_ids {
        hub.printer(Packet::PubAck(upstream_id));
    }
    assert_eq!(
        hub.received(1),
        vec![Packet::PubAck(id(3)), Packet::PubAck(id(4))]
    );
}

#[test]
fn qos0_over_the_rate_is_dropped_and_counted() {
    let mut hub = Harness::new(rate(10, 3, 10));
    hub.attach(1);
    for _ in 0..10 {
        hub.client(
            1,
            Packet::Publish(publish("cmd", QoS::AtMostOnce, None, b"go")),
        );
    }
    assert_eq!(hub.upstream().len(), 3);
    assert_eq!(hub.hub.counters().throttled_publishes, 7);
    hub.advance(Duration::from_secs(1));
    hub.client(
        1,
        Packet::Publish(publish("cmd", QoS::AtMostOnce, None, b"go")),
    );
    assert_eq!(hub.upstream().len(), 1);
}

#[test]
fn a_session_far_over_the_rate_is_cut_and_its_waiting_publishes_dropped() {
    let mut hub = Harness::new(rate(1, 1, 2));
    hub.attach(1);
    hub.attach(2);
    for index in 1..=4u16 {
        hub.client(
            1,
            Packet::Publish(publish("cmd", QoS::AtLeastOnce, Some(index), b"go")),
        );
    }
    assert_eq!(
        hub.ended(1),
        Some(Close::limit(
            "publishing faster than the printer takes (1 a second)"
        ))
    );
    assert_eq!(hub.hub.counters().rate_cuts, 1);
    assert_eq!(hub.upstream().len(), 1, "only the burst went");
    // What it left waiting is gone; another session's publish is next.
    hub.client(
        2,
        Packet::Publish(publish("cmd", QoS::AtLeastOnce, Some(9), b"mine")),
    );
    hub.advance(Duration::from_secs(1));
    let released = hub.upstream();
    assert!(
        matches!(released.as_slice(), [Packet::Publish(p)] if p.payload == Bytes::from_static(b"mine")),
        "{released:?}"
    );
}

fn bambu_hub() -> Harness {
    Harness::new(HubConfig {
        profile: crate::profile::ProfileConfig::Bambu(BambuProfile::new("X1")),
        ..bambu_like_policy()
    })
}

fn report(json: &'static str) -> Packet {
    Packet::Publish(publish(
        "device/X1/report",
        QoS::AtMostOnce,
        None,
        json.as_bytes(),
    ))
}

#[test]
fn a_late_joiner_gets_the_full_state_after_its_suback() {
    let mut hub = bambu_hub();
    hub.attach(1);
    // The first subscriber: no state yet, so the hub asks for it, once.
    hub.client(1, subscribe(1, &[("device/X1/report", QoS::AtMostOnce)]));
    let upstream = hub.upstream_subscribe();
    hub.printer(suback(
        upstream.packet_id.get(),
        &[granted(QoS::AtMostOnce)],
    ));
    let asked = hub.upstream();
    assert!(
        matches!(asked.as_slice(), [Packet::Publish(p)] if p.topic == "device/X1/request" && p.payload.windows(7).any(|w| w == b"pushall")),
        "{asked:?}"
    );
    hub.printer(report(
        r#"{"print":{"msg":0,"nozzle_temper":25,"gcode_state":"IDLE"}}"#,
    ));
    hub.printer(report(r#"{"print":{"msg":1,"nozzle_temper":200}}"#));
    hub.received(1);
    // A later app gets SUBACK, then one full report built from the state.
    hub.attach(2);
    hub.client(2, subscribe(4, &[("device/X1/report", QoS::AtMostOnce)]));
    let received = hub.received(2);
    assert!(
        matches!(received.first(), Some(Packet::SubAck(_))),
        "{received:?}"
    );
    let Some(Packet::Publish(full)) = received.get(1) else {
        panic!("no full report: {received:?}");
    };
    let full: serde_json::Value = serde_json::from_slice(&full.payload).unwrap();
    assert_eq!(
        full,
        serde_json::json!({"print": {"msg": 0, "nozzle_temper": 200, "gcode_state": "IDLE"}})
    );
    assert_eq!(hub.upstream(), vec![], "nothing more reached the printer");
}

#[test]
fn twenty_apps_asking_pushall_cost_the_printer_one() {
    let mut hub = bambu_hub();
    let pushall = || {
        Packet::Publish(publish(
            "device/X1/request",
            QoS::AtLeastOnce,
            Some(5),
            br#"{"pushing":{"sequence_id":"1","command":"pushall"}}"#,
        ))
    };
    for session in 1..=20 {
        hub.attach(session);
        hub.client(session, pushall());
    }
    let upstream = hub.upstream();
    assert_eq!(upstream.len(), 1, "{upstream:?}");
    // The one that went is acknowledged after the printer's PUBACK; the
    // others at once.
    for session in 2..=20 {
        assert_eq!(hub.received(session), vec![Packet::PubAck(id(5))]);
    }
    assert_eq!(hub.hub.counters().pushalls_absorbed, 19);
    // With a fresh state, a pushall is answered from it.
    hub.printer(report(r#"{"print":{"msg":0,"gcode_state":"RUNNING"}}"#));
    hub.attach(21);
    hub.client(21, pushall());
    let received = hub.received(21);
    assert!(
        matches!(received.as_slice(), [Packet::Publish(p), Packet::PubAck(_)] if p.topic == "device/X1/report"),
        "{received:?}"
    );
    assert_eq!(hub.upstream(), vec![]);
}

#[test]
fn wildcards_on_a_bambu_printer_are_served_from_the_report() {
    let mut hub = bambu_hub();
    hub.attach(1);
    hub.client(
        1,
        subscribe(
            3,
            &[("#", QoS::AtMostOnce), ("device/+/report", QoS::AtMostOnce)],
        ),
    );
    let upstream = hub.upstream_subscribe();
    assert_eq!(
        upstream.filters,
        vec![("device/X1/report".to_owned(), QoS::AtLeastOnce)],
        "the printer sees its own report topic only"
    );
    hub.printer(suback(
        upstream.packet_id.get(),
        &[granted(QoS::AtMostOnce)],
    ));
    let received = hub.received(1);
    assert_eq!(
        received.first(),
        Some(&suback(
            3,
            &[granted(QoS::AtMostOnce), granted(QoS::AtMostOnce)]
        ))
    );
    hub.printer(report(r#"{"print":{"msg":1}}"#));
    assert_eq!(hub.publishes(1).len(), 1, "once, though two filters match");
    // Still refused: what cannot match the report.
    hub.client(1, subscribe(4, &[("device/X2/#", QoS::AtMostOnce)]));
    assert_eq!(
        hub.received(1),
        vec![suback(4, &[SubscribeReturnCode::Failure])]
    );
    // Dropping both filters unsubscribes the report upstream once.
    hub.client(
        1,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: id(5),
            filters: vec!["#".into(), "device/+/report".into()],
        }),
    );
    // (The hub's own pushall, asked for at the SUBACK, went before.)
    let after: Vec<Packet> = hub
        .upstream()
        .into_iter()
        .filter(|packet| !matches!(packet, Packet::Publish(_)))
        .collect();
    assert!(
        matches!(after.as_slice(), [Packet::Unsubscribe(u)] if u.filters == vec!["device/X1/report".to_owned()]),
        "{after:?}"
    );
}

/// Upstream continuity: a lost upstream keeps the sessions; a new one gets
/// every held filter again, in one SUBSCRIBE, and what a client subscribed
/// to meanwhile is answered once the new upstream grants it.
#[test]
fn a_new_upstream_gets_every_held_filter_and_waiting_subscribes_are_answered() {
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach(1);
    hub.attach(2);
    hub.subscribed(1, "device/a/report", QoS::AtLeastOnce);
    hub.hub
        .upstream_lost(hub.now + Duration::from_secs(30), hub.now);
    assert!(hub.hub.upstream_is_lost());
    // A subscribe during the grace waits; nothing is written anywhere.
    hub.client(2, subscribe(7, &[("device/b/report", QoS::AtMostOnce)]));
    assert_eq!(hub.upstream_with_pings(), vec![]);
    assert!(hub.received(2).is_empty());
    // No keep-alive while there is no upstream.
    hub.advance(Duration::from_secs(29));
    assert_eq!(hub.upstream_with_pings(), vec![]);
    assert!(hub.hub.take_end().is_none());

    hub.hub.upstream_resumed(hub.now);
    let again = hub.upstream_subscribe();
    assert_eq!(
        again.filters,
        vec![
            ("device/a/report".to_owned(), QoS::AtLeastOnce),
            ("device/b/report".to_owned(), QoS::AtLeastOnce),
        ]
    );
    hub.printer(suback(
        again.packet_id.get(),
        &[granted(QoS::AtLeastOnce), granted(QoS::AtLeastOnce)],
    ));
    assert_eq!(
        hub.received(2),
        vec![suback(7, &[granted(QoS::AtMostOnce)])]
    );
    assert!(
        hub.received(1).is_empty(),
        "the held filter is not answered twice"
    );
    // Both receive from the new upstream.
    hub.printer(Packet::Publish(publish(
        "device/a/report",
        QoS::AtMostOnce,
        None,
        b"1",
    )));
    hub.printer(Packet::Publish(publish(
        "device/b/report",
        QoS::AtMostOnce,
        None,
        b"2",
    )));
    assert_eq!(hub.publishes(1)[0].payload, Bytes::from_static(b"1"));
    assert_eq!(hub.publishes(2)[0].payload, Bytes::from_static(b"2"));
    assert!(hub.ended(1).is_none() && hub.ended(2).is_none());
}

/// A QoS 1 publish the old upstream never acknowledged goes out again on
/// the new one (DUP), after one published during the grace (not DUP), in
/// their order; each client gets its PUBACK only from the new upstream.
#[test]
fn unacknowledged_publishes_are_resent_in_order_on_the_new_upstream() {
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach(1);
    hub.client(
        1,
        Packet::Publish(publish(
            "device/a/request",
            QoS::AtLeastOnce,
            Some(5),
            b"first",
        )),
    );
    let sent = hub.upstream();
    assert!(
        matches!(sent.as_slice(), [Packet::Publish(first)] if !first.dup),
        "{sent:?}"
    );
    hub.hub
        .upstream_lost(hub.now + Duration::from_secs(30), hub.now);
    hub.client(
        1,
        Packet::Publish(publish(
            "device/a/request",
            QoS::AtLeastOnce,
            Some(6),
            b"second",
        )),
    );
    // QoS 0 has nowhere to go: dropped and counted.
    hub.client(
        1,
        Packet::Publish(publish("device/a/request", QoS::AtMostOnce, None, b"lost")),
    );
    assert_eq!(hub.hub.counters().throttled_publishes, 1);
    assert!(
        hub.received(1).is_empty(),
        "nothing acknowledged without the printer"
    );

    hub.hub.upstream_resumed(hub.now);
    let resent: Vec<Publish> = hub
        .upstream()
        .into_iter()
        .map(|packet| match packet {
            Packet::Publish(publish) => publish,
            other => panic!("expected PUBLISH, got {other:?}"),
        })
        .collect();
    assert_eq!(resent.len(), 2, "{resent:?}");
    assert_eq!(resent[0].payload, Bytes::from_static(b"first"));
    assert!(resent[0].dup, "it had gone out before");
    assert_eq!(resent[1].payload, Bytes::from_static(b"second"));
    assert!(!resent[1].dup, "it never went out");
    for publish in &resent {
        hub.printer(Packet::PubAck(publish.packet_id.unwrap()));
    }
    assert_eq!(
        hub.received(1),
        vec![Packet::PubAck(id(5)), Packet::PubAck(id(6))]
    );
}

/// No new upstream within the grace: the hub ends (its sessions then get
/// the last failure's close). A hub whose last session leaves during the
/// grace ends at once.
#[test]
fn the_grace_ends_the_hub_and_so_does_its_last_session_leaving() {
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach(1);
    hub.hub
        .upstream_lost(hub.now + Duration::from_secs(30), hub.now);
    assert_eq!(hub.hub.poll_timeout(), hub.now + Duration::from_secs(30));
    hub.advance(Duration::from_secs(30));
    assert!(matches!(hub.hub.take_end(), Some(HubEnd::NoUpstream)));

    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach(1);
    hub.hub
        .upstream_lost(hub.now + Duration::from_secs(30), hub.now);
    hub.hub.detach(1, true, hub.now);
    assert!(matches!(hub.hub.take_end(), Some(HubEnd::Idle)));
}

// An Elegoo CC2: apps register, ping and send requests as on the LAN; the
// printer sees the agent's registration only.

const CC2_AGENT: &str = "relay-agent-7";

fn cc2_profile() -> super::cc2::Cc2Profile {
    super::cc2::Cc2Profile {
        request_interval: Duration::from_millis(600),
        first_request_id: 100,
        ..super::cc2::Cc2Profile::new("SN", Some(CC2_AGENT.into()))
    }
}

fn cc2_hub_with(profile: super::cc2::Cc2Profile) -> Harness {
    let mut hub = Harness::new(HubConfig {
        policy: std::sync::Arc::new(TopicPolicy {
            allow: vec!["elegoo/SN/#".into()],
            deny: Vec::new(),
            retain: false,
        }),
        profile: crate::profile::ProfileConfig::Cc2(profile),
        ..config(RetainedReplay::WhenSeen)
    });
    // The hub holds the agent's replies for itself.
    let held = hub.upstream_subscribe();
    assert_eq!(
        held.filters,
        vec![(
            format!("elegoo/SN/{CC2_AGENT}/api_response"),
            QoS::AtLeastOnce
        )]
    );
    hub.printer(suback(held.packet_id.get(), &[granted(QoS::AtMostOnce)]));
    hub
}

fn cc2_hub() -> Harness {
    cc2_hub_with(cc2_profile())
}

fn json_publish(topic: &str, payload: serde_json::Value) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        payload: Bytes::from(payload.to_string()),
    })
}

fn json_of(publish: &Publish) -> serde_json::Value {
    serde_json::from_slice(&publish.payload).unwrap()
}

impl Harness {
    /// An app as a CC2 client: subscribes to its answers and registers
    /// as `client_id`; returns the registration's answer.
    fn cc2_app(&mut self, session: SessionId, client_id: &str) -> serde_json::Value {
        self.attach(session);
        let response = format!("elegoo/SN/{client_id}/api_response");
        let registered = format!("elegoo/SN/{client_id}_req/register_response");
        self.client(
            session,
            subscribe(
                1,
                &[
                    (response.as_str(), QoS::AtMostOnce),
                    (registered.as_str(), QoS::AtMostOnce),
                ],
            ),
        );
        let upstream = self.upstream_subscribe();
        self.printer(suback(
            upstream.packet_id.get(),
            &vec![granted(QoS::AtMostOnce); upstream.filters.len()],
        ));
        assert!(matches!(
            self.received(session).as_slice(),
            [Packet::SubAck(_)]
        ));
        self.cc2_register(session, client_id)
    }

    fn cc2_register(&mut self, session: SessionId, client_id: &str) -> serde_json::Value {
        self.client(
            session,
            json_publish(
                "elegoo/SN/api_register",
                serde_json::json!({ "client_id": client_id, "request_id": format!("{client_id}_req") }),
            ),
        );
        let answer = self.publishes(session);
        assert_eq!(answer.len(), 1, "{answer:?}");
        assert_eq!(
            answer[0].topic,
            format!("elegoo/SN/{client_id}_req/register_response")
        );
        json_of(&answer[0])
    }

    fn cc2_request(&mut self, session: SessionId, client_id: &str, request: serde_json::Value) {
        self.client(
            session,
            json_publish(&format!("elegoo/SN/{client_id}/api_request"), request),
        );
    }

    /// Requests that reached the printer since the last look.
    fn cc2_sent(&mut self) -> Vec<serde_json::Value> {
        self.upstream()
            .into_iter()
            .map(|packet| match packet {
                Packet::Publish(publish) => {
                    assert_eq!(publish.topic, format!("elegoo/SN/{CC2_AGENT}/api_request"));
                    json_of(&publish)
                }
                other => panic!("expected a request, got {other:?}"),
            })
            .collect()
    }

    fn cc2_printer_answers(&mut self, answer: serde_json::Value) {
        self.printer(json_publish(
            &format!("elegoo/SN/{CC2_AGENT}/api_response"),
            answer,
        ));
    }
}

#[test]
fn cc2_apps_register_and_ping_at_the_edge_and_request_on_the_agents_registration() {
    let mut hub = cc2_hub();
    for (session, client_id) in [(1, "1_PC_1111"), (2, "1_PC_2222")] {
        let answer = hub.cc2_app(session, client_id);
        assert_eq!(
            answer,
            serde_json::json!({ "client_id": client_id, "error": "ok" })
        );
        hub.cc2_request(session, client_id, serde_json::json!({ "type": "PING" }));
        let pong = hub.publishes(session);
        assert_eq!(pong[0].topic, format!("elegoo/SN/{client_id}/api_response"));
        assert_eq!(json_of(&pong[0]), serde_json::json!({ "type": "PONG" }));
    }
    assert_eq!(hub.upstream(), vec![], "registrations and PINGs stay here");
    // Both use id 7; the second waits for the pace.
    for (session, client_id) in [(1, "1_PC_1111"), (2, "1_PC_2222")] {
        hub.cc2_request(
            session,
            client_id,
            serde_json::json!({ "id": 7, "method": 1001, "params": {} }),
        );
    }
    let first = hub.cc2_sent();
    assert_eq!(first.len(), 1, "{first:?}");
    hub.advance(Duration::from_millis(599));
    assert_eq!(hub.cc2_sent(), Vec::<serde_json::Value>::new());
    hub.advance(Duration::from_millis(1));
    let second = hub.cc2_sent();
    assert_eq!(second.len(), 1);
    let (first_id, second_id) = (first[0]["id"].clone(), second[0]["id"].clone());
    assert_ne!(first_id, second_id);
    assert_eq!(first[0]["method"], 1001);
    // Answers in the other order: each reaches its app only, with its id.
    for (upstream_id, marker) in [(&second_id, "second"), (&first_id, "first")] {
        hub.cc2_printer_answers(serde_json::json!({
            "id": upstream_id, "method": 1001,
            "result": { "error_code": 0, "marker": marker },
        }));
    }
    for (session, client_id, marker) in [(1, "1_PC_1111", "first"), (2, "1_PC_2222", "second")] {
        let replies = hub.publishes(session);
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(
            replies[0].topic,
            format!("elegoo/SN/{client_id}/api_response")
        );
        assert_eq!(
            json_of(&replies[0]),
            serde_json::json!({ "id": 7, "method": 1001, "result": { "error_code": 0, "marker": marker } })
        );
    }
    // The agent's heartbeat's PONG, and a reply nobody waits for, go
    // nowhere.
    hub.cc2_printer_answers(serde_json::json!({ "type": "PONG" }));
    hub.cc2_printer_answers(serde_json::json!({ "id": 5, "method": 1001, "result": {} }));
    assert!(hub.received(1).is_empty() && hub.received(2).is_empty());
    let counters = hub.hub.counters();
    assert_eq!(counters.cc2_answered_at_edge, 4);
    assert_eq!(counters.cc2_requests_sent, 2);
}

#[test]
fn cc2_apps_cannot_take_the_agents_registration_or_each_others() {
    let mut hub = cc2_hub();
    hub.cc2_app(1, "1_PC_1111");
    hub.attach(2);
    hub.client(
        2,
        subscribe(1, &[("elegoo/SN/+/register_response", QoS::AtMostOnce)]),
    );
    let upstream = hub.upstream_subscribe();
    hub.printer(suback(
        upstream.packet_id.get(),
        &[granted(QoS::AtMostOnce)],
    ));
    hub.received(2);
    let answer = hub.cc2_register(2, CC2_AGENT);
    assert!(
        answer["error"].as_str().unwrap().starts_with("fail"),
        "{answer}"
    );
    let answer = hub.cc2_register(2, "1_PC_1111");
    assert!(
        answer["error"].as_str().unwrap().starts_with("fail"),
        "{answer}"
    );
    // Requests as another app, as the agent, or as a client id never
    // registered; publishing on the printer's own topics: all dropped.
    for (topic, payload) in [
        (
            "elegoo/SN/1_PC_1111/api_request",
            r#"{"id":1,"method":1022}"#,
        ),
        (
            &format!("elegoo/SN/{CC2_AGENT}/api_request") as &str,
            r#"{"id":1,"method":1022}"#,
        ),
        (
            "elegoo/SN/1_PC_9999/api_request",
            r#"{"id":1,"method":1022}"#,
        ),
        (
            "elegoo/SN/api_status",
            r#"{"id":1,"method":6000,"result":{}}"#,
        ),
        ("elegoo/SN/1_PC_1111/api_response", r#"{"id":1}"#),
    ] {
        hub.client(
            2,
            Packet::Publish(publish(
                topic,
                QoS::AtLeastOnce,
                Some(9),
                payload.to_owned().leak().as_bytes(),
            )),
        );
        assert_eq!(hub.received(2), vec![Packet::PubAck(id(9))], "{topic}");
    }
    assert_eq!(hub.upstream(), vec![]);
    assert_eq!(hub.hub.counters().refused_publishes, 5);
    // Past its registrations, an app hears "too many clients".
    let mut limited = cc2_profile();
    limited.max_registrations_per_session = 1;
    let mut hub = cc2_hub_with(limited);
    hub.cc2_app(1, "a");
    assert_eq!(hub.cc2_app_again(1, "b")["error"], "too many clients");
}

impl Harness {
    fn cc2_app_again(&mut self, session: SessionId, client_id: &str) -> serde_json::Value {
        let registered = format!("elegoo/SN/{client_id}_req/register_response");
        self.client(
            session,
            subscribe(2, &[(registered.as_str(), QoS::AtMostOnce)]),
        );
        let upstream = self.upstream_subscribe();
        self.printer(suback(
            upstream.packet_id.get(),
            &[granted(QoS::AtMostOnce)],
        ));
        self.received(session);
        self.cc2_register(session, client_id)
    }
}

#[test]
fn cc2_requests_past_an_apps_share_of_the_queue_are_answered_busy() {
    let mut profile = cc2_profile();
    profile.max_queued_per_session = 2;
    let mut hub = cc2_hub_with(profile);
    hub.cc2_app(1, "app");
    for request_id in 1..=4 {
        hub.cc2_request(
            1,
            "app",
            serde_json::json!({ "id": request_id, "method": 1026 }),
        );
    }
    // One went at once, two wait; the fourth is answered busy.
    assert_eq!(hub.cc2_sent().len(), 1);
    let busy = hub.publishes(1);
    assert_eq!(busy.len(), 1);
    let busy = json_of(&busy[0]);
    assert_eq!(busy["id"], 4);
    assert_eq!(busy["result"]["error_code"], 1009);
    assert_eq!(hub.hub.counters().cc2_queue_overflows, 1);
    hub.advance(Duration::from_millis(600));
    assert_eq!(hub.cc2_sent().len(), 1, "one per interval");
    hub.advance(Duration::from_millis(600));
    assert_eq!(hub.cc2_sent().len(), 1);
    hub.advance(Duration::from_millis(600));
    assert_eq!(hub.cc2_sent().len(), 0, "the queue is empty");
    // A session that leaves takes its waiting requests with it.
    hub.cc2_request(1, "app", serde_json::json!({ "id": 5, "method": 1026 }));
    hub.cc2_request(1, "app", serde_json::json!({ "id": 6, "method": 1026 }));
    assert_eq!(hub.cc2_sent().len(), 1);
    hub.detach_abruptly(1);
    hub.advance(Duration::from_millis(600));
    let after = hub.upstream();
    assert!(
        after
            .iter()
            .all(|packet| !matches!(packet, Packet::Publish(_))),
        "{after:?}"
    );
}

#[test]
fn cc2_status_is_merged_for_new_subscribers_and_fresh_1002s() {
    let mut hub = cc2_hub();
    hub.cc2_app(1, "app");
    // The first status subscriber: the hub asks for the full status.
    hub.client(
        1,
        subscribe(3, &[("elegoo/SN/api_status", QoS::AtMostOnce)]),
    );
    let upstream = hub.upstream_subscribe();
    hub.printer(suback(
        upstream.packet_id.get(),
        &[granted(QoS::AtMostOnce)],
    ));
    let asked = hub.cc2_sent();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0]["method"], 1002);
    let status = |id: u64, result: serde_json::Value| {
        json_publish(
            "elegoo/SN/api_status",
            serde_json::json!({ "id": id, "method": 6000, "result": result }),
        )
    };
    hub.printer(status(
        41,
        serde_json::json!({ "extruder": { "temperature": 30 } }),
    ));
    hub.cc2_printer_answers(serde_json::json!({
        "id": asked[0]["id"], "method": 1002,
        "result": { "error_code": 0, "extruder": { "temperature": 30, "target": 0 }, "light": { "on": false } },
    }));
    hub.printer(status(
        42,
        serde_json::json!({ "extruder": { "temperature": 31 } }),
    ));
    let got = hub.received(1);
    // SUBACK, the first delta, the full status once it came, the next delta.
    assert!(matches!(got[0], Packet::SubAck(_)), "{got:?}");
    let Packet::Publish(full) = &got[2] else {
        panic!("{got:?}");
    };
    assert_eq!(
        json_of(full),
        serde_json::json!({ "id": 41, "method": 6000, "result": { "extruder": { "temperature": 30, "target": 0 }, "light": { "on": false } } })
    );
    assert_eq!(got.len(), 4, "{got:?}");
    // A later subscriber gets the merged status at once.
    hub.attach(2);
    hub.client(
        2,
        subscribe(1, &[("elegoo/SN/api_status", QoS::AtMostOnce)]),
    );
    let got = hub.received(2);
    let Some(Packet::Publish(merged)) = got.get(1) else {
        panic!("{got:?}");
    };
    assert_eq!(
        json_of(merged),
        serde_json::json!({ "id": 42, "method": 6000, "result": { "extruder": { "temperature": 31, "target": 0 }, "light": { "on": false } } })
    );
    // A 1002 while the status is fresh: answered here.
    hub.cc2_request(1, "app", serde_json::json!({ "id": 3, "method": 1002 }));
    let answer = hub.publishes(1);
    assert_eq!(
        json_of(&answer[0]),
        serde_json::json!({ "id": 3, "method": 1002, "result": { "error_code": 0, "extruder": { "temperature": 31, "target": 0 }, "light": { "on": false } } })
    );
    assert_eq!(hub.cc2_sent(), Vec::<serde_json::Value>::new());
    // A gap in the deltas: the state is asked for again.
    hub.advance(Duration::from_millis(600));
    hub.printer(status(45, serde_json::json!({ "light": { "on": true } })));
    let asked = hub.cc2_sent();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0]["method"], 1002);
    // Until it comes, apps' 1002s go to the printer.
    hub.advance(Duration::from_millis(600));
    hub.received(1);
    hub.cc2_request(1, "app", serde_json::json!({ "id": 4, "method": 1002 }));
    assert_eq!(hub.cc2_sent().len(), 1);
}

#[test]
fn cc2_over_a_peer_link_requests_pass_on_as_they_came() {
    let mut hub = Harness::new(HubConfig {
        policy: std::sync::Arc::new(TopicPolicy {
            allow: vec!["elegoo/SN/#".into()],
            deny: Vec::new(),
            retain: false,
        }),
        profile: crate::profile::ProfileConfig::Cc2(super::cc2::Cc2Profile::new("SN", None)),
        ..config(RetainedReplay::WhenSeen)
    });
    assert_eq!(hub.upstream(), vec![], "no agent registration to hold");
    hub.cc2_app(1, "app");
    hub.cc2_request(1, "app", serde_json::json!({ "type": "PING" }));
    assert_eq!(hub.publishes(1).len(), 1, "PONG from here");
    hub.cc2_request(1, "app", serde_json::json!({ "id": 8, "method": 1029 }));
    let passed = hub.upstream();
    let [Packet::Publish(request)] = passed.as_slice() else {
        panic!("{passed:?}");
    };
    assert_eq!(request.topic, "elegoo/SN/app/api_request");
    assert_eq!(json_of(request)["id"], 8);
}

// MQTT 5 sessions: what the hub serves of their options, and refusals in
// their PUBACKs.

fn v5_subscribe(
    hub: &mut Harness,
    session: SessionId,
    filter: &str,
    options: super::state::SubscriptionExtras,
) {
    hub.hub.handle_client_packet_with(
        session,
        subscribe(1, &[(filter, QoS::AtMostOnce)]),
        Some(&super::state::PacketExtras {
            subscription: vec![options],
            message_expiry: None,
        }),
        hub.now,
    );
}

fn options(
    no_local: bool,
    retain_handling: super::state::RetainHandling,
) -> super::state::SubscriptionExtras {
    super::state::SubscriptionExtras {
        no_local,
        retain_handling,
    }
}

#[test]
fn retain_handling_2_gets_no_retained_messages_and_1_only_for_a_new_filter() {
    use super::state::RetainHandling;
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach_v5(1);
    v5_subscribe(
        &mut hub,
        1,
        "s/#",
        options(false, RetainHandling::DoNotSend),
    );
    let upstream = hub.upstream_subscribe();
    hub.printer(suback(
        upstream.packet_id.get(),
        &[granted(QoS::AtMostOnce)],
    ));
    // The broker answers the SUBSCRIBE with its retained message.
    hub.printer(Packet::Publish(retained("s/a", b"old")));
    hub.printer(Packet::Publish(publish(
        "s/a",
        QoS::AtMostOnce,
        None,
        b"live",
    )));
    let received = hub.received(1);
    assert!(matches!(received[0], Packet::SubAck(_)), "{received:?}");
    let payloads: Vec<&[u8]> = received[1..]
        .iter()
        .map(|packet| match packet {
            Packet::Publish(publish) => &publish.payload[..],
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(payloads, vec![&b"live"[..]], "no retained copy");
    // Retain Handling 1 for a filter the session already holds: none again
    // (no new upstream SUBSCRIBE); a session new to it gets them.
    v5_subscribe(
        &mut hub,
        1,
        "s/#",
        options(false, RetainHandling::SendIfNew),
    );
    assert!(hub.upstream().is_empty(), "no replay for a held filter");
    hub.attach_v5(2);
    v5_subscribe(
        &mut hub,
        2,
        "s/#",
        options(false, RetainHandling::SendIfNew),
    );
    let replay = hub.upstream_subscribe();
    assert_eq!(replay.filters[0].0, "s/#");
}

#[test]
fn no_local_skips_the_brokers_echo_of_the_sessions_own_publish() {
    use super::state::RetainHandling;
    let mut hub = Harness::new(config(RetainedReplay::WhenSeen));
    hub.attach_v5(1);
    hub.attach(2);
    v5_subscribe(
        &mut hub,
        1,
        "chat/#",
        options(true, RetainHandling::SendAtSubscribe),
    );
    let upstream = hub.upstream_subscribe();
    hub.printer(suback(
        upstream.packet_id.get(),
        &[granted(QoS::AtMostOnce)],
    ));
    hub.subscribed_again(2, "chat/#");
    hub.received(1);
    hub.client(
        1,
        Packet::Publish(publish("chat/x", QoS::AtMostOnce, None, b"mine")),
    );
    assert_eq!(hub.upstream().len(), 1);
    // The broker echoes it to the hub's subscription: session 2 gets it,
    // session 1 (No Local) does not; another message reaches both.
    hub.printer(Packet::Publish(publish(
        "chat/x",
        QoS::AtMostOnce,
        None,
        b"mine",
    )));
    hub.printer(Packet::Publish(publish(
        "chat/x",
        QoS::AtMostOnce,
        None,
        b"theirs",
    )));
    let first: Vec<Bytes> = hub.publishes(1).into_iter().map(|p| p.payload).collect();
    let second: Vec<Bytes> = hub.publishes(2).into_iter().map(|p| p.payload).collect();
    assert_eq!(first, vec![Bytes::from_static(b"theirs")]);
    assert_eq!(
        second,
        vec![Bytes::from_static(b"mine"), Bytes::from_static(b"theirs")]
    );
}

impl Harness {
    /// Subscribes `session` to a filter the upstream already holds.
    fn subscribed_again(&mut self, session: SessionId, filter: &str) {
        self.client(session, subscribe(1, &[(filter, QoS::AtMostOnce)]));
        let _ = self.upstream();
        assert!(matches!(
            self.received(session).as_slice(),
            [Packet::SubAck(_)]
        ));
    }

    fn refusals(&mut self, session: SessionId) -> Vec<(PacketId, super::state::PublishRefused)> {
        std::mem::take(&mut self.sessions[&session].borrow_mut().refusals)
    }
}

#[test]
fn mqtt5_sessions_hear_refusals_in_their_puback() {
    use super::state::PublishRefused;
    // The policy: 0x87, where a 3.1.1 session gets a plain PUBACK.
    let mut hub = Harness::new(bambu_like_policy());
    hub.attach_v5(1);
    hub.attach(2);
    for session in [1, 2] {
        hub.client(
            session,
            Packet::Publish(publish(
                "device/OTHER/request",
                QoS::AtLeastOnce,
                Some(5),
                b"x",
            )),
        );
    }
    assert_eq!(
        hub.refusals(1),
        vec![(id(5), PublishRefused::NotAuthorized)]
    );
    assert!(hub.received(1).is_empty());
    assert_eq!(hub.received(2), vec![Packet::PubAck(id(5))]);
    // Over the rate past the session's wait: 0x97, and the session stays.
    let mut hub = Harness::new(rate(10, 1, 1));
    hub.attach_v5(1);
    for index in 1..=3u16 {
        hub.client(
            1,
            Packet::Publish(publish("cmd", QoS::AtLeastOnce, Some(index), b"go")),
        );
    }
    assert_eq!(hub.upstream().len(), 1);
    assert_eq!(
        hub.refusals(1),
        vec![(id(3), PublishRefused::QuotaExceeded)]
    );
    assert_eq!(hub.ended(1), None);
}

#[test]
fn an_expired_publish_waiting_for_the_rate_is_dropped() {
    let mut hub = Harness::new(rate(1, 1, 10));
    hub.attach_v5(1);
    let expiring =
        |index: u16| Packet::Publish(publish("cmd", QoS::AtLeastOnce, Some(index), b"go"));
    for index in 1..=2u16 {
        hub.hub.handle_client_packet_with(
            1,
            expiring(index),
            Some(&super::state::PacketExtras {
                subscription: Vec::new(),
                message_expiry: Some(Duration::from_millis(500)),
            }),
            hub.now,
        );
    }
    assert_eq!(hub.upstream().len(), 1);
    // Its turn comes after a second; it expired after half of one.
    hub.advance(Duration::from_secs(1));
    assert!(hub.upstream().is_empty(), "expired: not sent");
    assert_eq!(hub.received(1), vec![Packet::PubAck(id(2))]);
    assert_eq!(hub.hub.counters().expired_publishes, 1);
}

// The quarantine: a filter or a publisher that gets the upstream dropped
// (a broker with ACLs drops a client that subscribes where it may not read)
// is tried alone, then kept away from the printer.

fn lose_upstream(hub: &mut Harness) {
    hub.hub
        .upstream_lost(hub.now + Duration::from_secs(30), hub.now);
}

/// The SUBSCRIBEs the hub wrote upstream since the last look, as lists of
/// filters (PINGREQs answered).
fn upstream_subscribes(hub: &mut Harness) -> Vec<Vec<String>> {
    hub.upstream()
        .into_iter()
        .filter_map(|packet| match packet {
            Packet::Subscribe(subscribe) => Some(
                subscribe
                    .filters
                    .into_iter()
                    .map(|(filter, _)| filter)
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Grants the one SUBSCRIBE the hub sent since the last look; returns its
/// filters.
fn grant_subscribe(hub: &mut Harness) -> Vec<String> {
    let subscribe = hub.upstream_subscribe();
    hub.printer(suback(
        subscribe.packet_id.get(),
        &vec![granted(QoS::AtLeastOnce); subscribe.filters.len()],
    ));
    subscribe.filters.into_iter().map(|(f, _)| f).collect()
}

#[test]
fn a_filter_that_ends_the_upstream_twice_is_quarantined_and_nobody_else_notices() {
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach(1);
    hub.attach(2);
    hub.subscribed(1, "device/mine/report", QoS::AtMostOnce);
    // The attacker's SUBSCRIBE goes out; the broker drops the connection.
    hub.client(2, subscribe(5, &[("device/other/report", QoS::AtMostOnce)]));
    assert_eq!(
        upstream_subscribes(&mut hub),
        vec![vec!["device/other/report".to_owned()]]
    );
    lose_upstream(&mut hub);

    // The next upstream gets the innocent filter first, and the suspect
    // alone once that is granted.
    hub.hub.upstream_resumed(hub.now);
    assert_eq!(grant_subscribe(&mut hub), vec!["device/mine/report"]);
    assert_eq!(
        upstream_subscribes(&mut hub),
        vec![vec!["device/other/report".to_owned()]],
        "the suspect on its own"
    );
    assert!(hub.received(2).is_empty(), "still waiting for its trial");
    // It ends that upstream too: quarantined.
    lose_upstream(&mut hub);
    assert_eq!(
        hub.received(2),
        vec![suback(5, &[SubscribeReturnCode::Failure])]
    );
    assert_eq!(hub.hub.counters().quarantined_filters, 1);
    assert_eq!(
        hub.hub.take_quarantine_events(),
        vec![super::state::QuarantineEvent::Filter {
            filter: "device/other/report".into(),
            sessions_lost: 0
        }]
    );

    // The third upstream never hears of it.
    hub.hub.upstream_resumed(hub.now);
    assert_eq!(grant_subscribe(&mut hub), vec!["device/mine/report"]);
    assert_eq!(upstream_subscribes(&mut hub), Vec::<Vec<String>>::new());
    // Asking again, from any session, is refused at once.
    hub.attach(3);
    hub.client(
        3,
        subscribe(9, &[("device/other/report", QoS::AtLeastOnce)]),
    );
    assert_eq!(
        hub.received(3),
        vec![suback(9, &[SubscribeReturnCode::Failure])]
    );
    assert_eq!(upstream_subscribes(&mut hub), Vec::<Vec<String>>::new());
    assert_eq!(hub.hub.counters().quarantine_refusals, 1);
    // The legitimate session kept its subscription all along.
    hub.printer(Packet::Publish(publish(
        "device/mine/report",
        QoS::AtMostOnce,
        None,
        b"1",
    )));
    assert_eq!(hub.publishes(1).len(), 1);
    assert!(hub.ended(1).is_none() && hub.ended(2).is_none());
}

#[test]
fn a_suspect_that_passes_its_trial_is_granted() {
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach(1);
    hub.subscribed(1, "a/held", QoS::AtMostOnce);
    hub.client(
        1,
        subscribe(2, &[("b/new", QoS::AtMostOnce), ("c/new", QoS::AtMostOnce)]),
    );
    assert_eq!(upstream_subscribes(&mut hub).len(), 1);
    // The printer restarts for reasons of its own.
    lose_upstream(&mut hub);
    hub.hub.upstream_resumed(hub.now);
    assert_eq!(grant_subscribe(&mut hub), vec!["a/held"]);
    // One suspect at a time.
    assert_eq!(grant_subscribe(&mut hub), vec!["b/new"]);
    assert!(hub.received(1).is_empty(), "c/new still waits");
    assert_eq!(grant_subscribe(&mut hub), vec!["c/new"]);
    assert_eq!(
        hub.received(1),
        vec![suback(
            2,
            &[granted(QoS::AtMostOnce), granted(QoS::AtMostOnce)]
        )]
    );
    assert_eq!(hub.hub.counters().quarantined_filters, 0);
    // Cleared: a later loss resubscribes everything together.
    hub.advance(Duration::from_secs(10));
    lose_upstream(&mut hub);
    hub.hub.upstream_resumed(hub.now);
    assert_eq!(grant_subscribe(&mut hub), vec!["a/held", "b/new", "c/new"]);
}

#[test]
fn an_upstream_that_ends_long_after_a_subscribe_suspects_nobody() {
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach(1);
    hub.client(1, subscribe(2, &[("b/new", QoS::AtMostOnce)]));
    assert_eq!(upstream_subscribes(&mut hub).len(), 1);
    hub.advance(Duration::from_secs(6));
    lose_upstream(&mut hub);
    hub.hub.upstream_resumed(hub.now);
    assert_eq!(grant_subscribe(&mut hub), vec!["b/new"]);
    assert_eq!(
        hub.received(1),
        vec![suback(2, &[granted(QoS::AtMostOnce)])]
    );
}

#[test]
fn a_quarantined_filter_is_taken_from_its_holders_and_ends_after_its_time() {
    let mut hub = Harness::new(HubConfig {
        quarantine: super::QuarantinePolicy {
            duration: Duration::from_secs(60),
            ..super::QuarantinePolicy::default()
        },
        ..config(RetainedReplay::Always)
    });
    hub.attach(1);
    hub.attach(2);
    // A filter the broker granted once, then (its ACL changed) drops
    // the connection for: session 2's join makes the hub subscribe again.
    hub.subscribed(1, "x/acl", QoS::AtMostOnce);
    hub.client(2, subscribe(3, &[("x/acl", QoS::AtMostOnce)]));
    // Granted at once (the upstream holds it), its retained messages asked
    // for again.
    assert_eq!(
        hub.received(2),
        vec![suback(3, &[granted(QoS::AtMostOnce)])]
    );
    assert_eq!(
        upstream_subscribes(&mut hub),
        vec![vec!["x/acl".to_owned()]]
    );
    lose_upstream(&mut hub);
    hub.hub.upstream_resumed(hub.now);
    assert_eq!(
        upstream_subscribes(&mut hub),
        vec![vec!["x/acl".to_owned()]]
    );
    lose_upstream(&mut hub);
    // Both holders lose it; nothing else is said to them.
    assert!(hub.received(1).is_empty() && hub.received(2).is_empty());
    assert_eq!(hub.hub.counters().quarantine_lost_filters, 2);
    assert_eq!(
        hub.hub.take_quarantine_events(),
        vec![super::state::QuarantineEvent::Filter {
            filter: "x/acl".into(),
            sessions_lost: 2
        }]
    );
    assert_eq!(hub.hub.upstream_filter_count(), 0);
    hub.hub.upstream_resumed(hub.now);
    assert_eq!(upstream_subscribes(&mut hub), Vec::<Vec<String>>::new());
    hub.printer(Packet::Publish(publish(
        "x/acl",
        QoS::AtMostOnce,
        None,
        b"1",
    )));
    assert!(hub.received(1).is_empty(), "no longer subscribed");
    assert!(hub.ended(1).is_none());

    // An hour later (here: a minute) it may be tried again.
    hub.advance(Duration::from_secs(59));
    hub.client(1, subscribe(4, &[("x/acl", QoS::AtMostOnce)]));
    assert_eq!(
        hub.received(1),
        vec![suback(4, &[SubscribeReturnCode::Failure])]
    );
    hub.advance(Duration::from_secs(1));
    hub.client(1, subscribe(5, &[("x/acl", QoS::AtMostOnce)]));
    assert_eq!(grant_subscribe(&mut hub), vec!["x/acl"]);
    assert_eq!(
        hub.received(1),
        vec![suback(5, &[granted(QoS::AtMostOnce)])]
    );
}

#[test]
fn a_publish_that_ends_the_upstream_twice_is_dropped_and_its_publisher_refused() {
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach_v5(1);
    hub.attach(2);
    hub.client(
        1,
        Packet::Publish(publish("cmd", QoS::AtLeastOnce, Some(3), b"x")),
    );
    assert_eq!(hub.upstream().len(), 1);
    lose_upstream(&mut hub);
    // Sent once more on the next upstream…
    hub.hub.upstream_resumed(hub.now);
    assert!(matches!(
        hub.upstream().as_slice(),
        [Packet::Publish(again)] if again.dup
    ));
    // …and dropped when that one ends too: the client hears 0x87.
    lose_upstream(&mut hub);
    assert_eq!(
        hub.refusals(1),
        vec![(id(3), super::state::PublishRefused::NotAuthorized)]
    );
    hub.hub.upstream_resumed(hub.now);
    assert_eq!(hub.upstream(), vec![]);
    assert_eq!(hub.hub.counters().quarantined_publishers, 1);
    // Its next PUBLISH is refused at once; another client is not.
    hub.client(
        1,
        Packet::Publish(publish("cmd", QoS::AtLeastOnce, Some(4), b"y")),
    );
    assert_eq!(
        hub.refusals(1),
        vec![(id(4), super::state::PublishRefused::NotAuthorized)]
    );
    hub.client(
        2,
        Packet::Publish(publish("cmd", QoS::AtLeastOnce, Some(4), b"z")),
    );
    assert_eq!(hub.upstream().len(), 1);
}

#[test]
fn a_qos0_publisher_that_ends_the_upstream_twice_is_refused_and_a_3_1_1_client_acknowledged() {
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach(1);
    for _ in 0..2 {
        hub.client(
            1,
            Packet::Publish(publish("cmd", QoS::AtMostOnce, None, b"x")),
        );
        assert_eq!(hub.upstream().len(), 1);
        lose_upstream(&mut hub);
        hub.hub.upstream_resumed(hub.now);
    }
    hub.client(
        1,
        Packet::Publish(publish("cmd", QoS::AtMostOnce, None, b"x")),
    );
    assert_eq!(hub.upstream(), vec![], "dropped");
    // A 3.1.1 client's QoS 1 is acknowledged and dropped, as by an ACL.
    hub.client(
        1,
        Packet::Publish(publish("cmd", QoS::AtLeastOnce, Some(7), b"x")),
    );
    assert_eq!(hub.received(1), vec![Packet::PubAck(id(7))]);
    assert_eq!(hub.upstream(), vec![]);
}

// Silent printers: connected, answering nothing. The watchdogs end the
// upstream so that the agent makes a new connection; a printer that answers
// is never taken for silent.

fn is_pushall_request(packet: &Packet) -> bool {
    matches!(packet, Packet::Publish(p) if p.topic == "device/X1/request" && p.payload.windows(7).any(|w| w == b"pushall"))
}

#[test]
fn no_pingresp_within_one_and_a_half_keep_alives_ends_the_upstream_as_silent() {
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach(1);
    hub.advance(Duration::from_secs(30));
    assert_eq!(hub.upstream_with_pings(), vec![Packet::PingReq]);
    hub.advance(Duration::from_secs(30));
    assert_eq!(hub.upstream_with_pings(), vec![Packet::PingReq]);
    // The first went out at 30 s: its deadline is 75 s.
    hub.advance(Duration::from_secs(14));
    assert!(hub.hub.take_end().is_none());
    assert_eq!(
        hub.hub.poll_timeout(),
        hub.now + Duration::from_secs(1),
        "woken at the deadline"
    );
    hub.advance(Duration::from_secs(1));
    assert!(matches!(
        hub.hub.take_end(),
        Some(HubEnd::UpstreamSilent(super::state::Silence::NoPingResp))
    ));
    assert_eq!(hub.hub.counters().silent_pingresp, 1);
    // Pings in flight stay bounded however long nobody answers.
    let mut quiet = Harness::new(HubConfig {
        pingresp_deadline: Some(Duration::from_secs(3600)),
        ..config(RetainedReplay::Always)
    });
    quiet.attach(1);
    let mut pings = 0;
    for _ in 0..100 {
        quiet.advance(Duration::from_secs(30));
        pings += quiet.upstream_with_pings().len();
    }
    assert_eq!(pings, 16);
}

#[test]
fn a_printer_that_answers_pings_but_reports_rarely_is_never_taken_for_silent() {
    // A compressed idle hour: a Bambu printer at idle reports every few
    // seconds; a generic broker publishes nothing at all.
    let mut bambu = bambu_hub();
    bambu.attach(1);
    bambu.client(1, subscribe(1, &[("device/X1/report", QoS::AtMostOnce)]));
    let upstream = bambu.upstream_subscribe();
    bambu.printer(suback(
        upstream.packet_id.get(),
        &[granted(QoS::AtMostOnce)],
    ));
    bambu.upstream();
    let mut generic = Harness::new(config(RetainedReplay::Always));
    generic.attach(1);
    generic.subscribed(1, "a/b", QoS::AtMostOnce);
    for second in (0..3600).step_by(5) {
        bambu.advance(Duration::from_secs(5));
        generic.advance(Duration::from_secs(5));
        if second % 15 == 0 {
            bambu.printer(report(r#"{"print":{"msg":1,"wifi_signal":"-40dBm"}}"#));
        }
        let sent = bambu.upstream();
        assert!(
            !sent.iter().any(is_pushall_request),
            "at {second} s: {sent:?}"
        );
        generic.upstream();
        assert!(bambu.hub.take_end().is_none() && generic.hub.take_end().is_none());
    }
    assert_eq!(bambu.hub.counters().watchdog_pushalls, 0);
}

#[test]
fn a_bambu_printer_without_reports_is_asked_for_pushall_then_found_silent() {
    let mut hub = bambu_hub();
    hub.attach(1);
    hub.client(1, subscribe(1, &[("device/X1/report", QoS::AtMostOnce)]));
    let upstream = hub.upstream_subscribe();
    hub.printer(suback(
        upstream.packet_id.get(),
        &[granted(QoS::AtMostOnce)],
    ));
    // The PINGREQ after the SUBSCRIBE, answered.
    hub.printer(Packet::PingResp);
    hub.upstream();
    hub.printer(report(r#"{"print":{"msg":0,"gcode_state":"IDLE"}}"#));
    // 19 s without a report: nothing yet.
    hub.advance(Duration::from_secs(19));
    assert!(!hub.upstream().iter().any(is_pushall_request));
    hub.advance(Duration::from_secs(1));
    assert!(
        hub.upstream().iter().any(is_pushall_request),
        "asked at 20 s"
    );
    // Its answer resets the watch.
    hub.advance(Duration::from_secs(9));
    hub.printer(report(r#"{"print":{"msg":0,"gcode_state":"IDLE"}}"#));
    hub.advance(Duration::from_secs(19));
    assert!(hub.hub.take_end().is_none());
    assert!(!hub.upstream().iter().any(is_pushall_request));
    hub.advance(Duration::from_secs(1));
    assert!(hub.upstream().iter().any(is_pushall_request));
    // No answer in 10 s: silent.
    hub.advance(Duration::from_secs(9));
    assert!(hub.hub.take_end().is_none());
    hub.advance(Duration::from_secs(1));
    assert!(matches!(
        hub.hub.take_end(),
        Some(HubEnd::UpstreamSilent(super::state::Silence::NoReport))
    ));
    assert_eq!(hub.hub.counters().watchdog_pushalls, 2);
    assert_eq!(hub.hub.counters().silent_report, 1);
}

#[test]
fn nobody_holding_the_report_means_no_report_watchdog() {
    let mut hub = bambu_hub();
    hub.attach(1);
    hub.client(1, subscribe(1, &[("device/X1/report", QoS::AtMostOnce)]));
    let upstream = hub.upstream_subscribe();
    hub.printer(suback(
        upstream.packet_id.get(),
        &[granted(QoS::AtMostOnce)],
    ));
    hub.upstream();
    hub.client(
        1,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: id(2),
            filters: vec!["device/X1/report".into()],
        }),
    );
    hub.upstream();
    for _ in 0..10 {
        hub.advance(Duration::from_secs(10));
        assert!(!hub.upstream().iter().any(is_pushall_request));
    }
    assert!(hub.hub.take_end().is_none());
}

#[test]
fn an_oversized_qos1_publish_from_the_printer_is_acknowledged() {
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach(1);
    hub.hub
        .handle_upstream_oversized(Some((QoS::AtLeastOnce, id(77))));
    hub.hub.handle_upstream_oversized(None);
    assert_eq!(hub.upstream(), vec![Packet::PubAck(id(77))]);
    let counters = hub.hub.counters();
    assert_eq!(
        (counters.oversized_upstream, counters.oversized_acknowledged),
        (2, 1)
    );
}

#[test]
fn a_cc2_that_answers_no_heartbeat_for_65_s_is_silent_and_one_that_pongs_is_not() {
    let pong = || {
        json_publish(
            &format!("elegoo/SN/{CC2_AGENT}/api_response"),
            serde_json::json!({"type": "PONG"}),
        )
    };
    let mut answering = cc2_hub();
    let mut silent = cc2_hub();
    for hub in [&mut answering, &mut silent] {
        hub.attach(1);
    }
    // A compressed idle hour: the agent's heartbeat every 10 s, PONGs.
    for _ in 0..360 {
        answering.advance(Duration::from_secs(10));
        answering.printer(pong());
        answering.upstream();
        assert!(answering.hub.take_end().is_none());
    }
    // Pings answered, but nothing on the registration: 65 s.
    for _ in 0..6 {
        silent.advance(Duration::from_secs(10));
        silent.upstream();
    }
    assert!(silent.hub.take_end().is_none(), "60 s");
    silent.advance(Duration::from_secs(5));
    assert!(matches!(
        silent.hub.take_end(),
        Some(HubEnd::UpstreamSilent(super::state::Silence::NoPong))
    ));
    assert_eq!(silent.hub.counters().silent_pong, 1);
}

#[test]
fn a_cc2_whose_status_goes_quiet_is_asked_for_1002_then_found_silent() {
    let pong = || {
        json_publish(
            &format!("elegoo/SN/{CC2_AGENT}/api_response"),
            serde_json::json!({"type": "PONG"}),
        )
    };
    let mut hub = cc2_hub();
    hub.cc2_app(1, "app");
    hub.client(
        1,
        subscribe(3, &[("elegoo/SN/api_status", QoS::AtMostOnce)]),
    );
    let upstream = hub.upstream_subscribe();
    hub.printer(suback(
        upstream.packet_id.get(),
        &[granted(QoS::AtMostOnce)],
    ));
    hub.printer(Packet::PingResp);
    let asked = hub.cc2_sent();
    hub.cc2_printer_answers(serde_json::json!({
        "id": asked[0]["id"], "method": 1002, "result": { "error_code": 0 },
    }));
    // PONGs keep coming (the heartbeat watchdog is content); the status
    // does not.
    hub.advance(Duration::from_secs(10));
    hub.printer(pong());
    hub.upstream();
    hub.advance(Duration::from_secs(10));
    let asked = hub.cc2_sent();
    assert_eq!(asked.len(), 1, "a 1002 after 20 s without status");
    assert_eq!(asked[0]["method"], 1002);
    hub.printer(pong());
    hub.advance(Duration::from_secs(10));
    hub.printer(pong());
    hub.upstream();
    assert!(hub.hub.take_end().is_none());
    hub.advance(Duration::from_secs(10));
    assert!(matches!(
        hub.hub.take_end(),
        Some(HubEnd::UpstreamSilent(crate::state::Silence::NoStatus))
    ));
    assert_eq!(hub.hub.counters().watchdog_status_requests, 1);
}

#[test]
fn through_the_hub_each_client_sees_what_mosquitto_would_show_it() {
    // Three apps on one broker connection; the broker keeps retained
    // messages and answers as Mosquitto does.
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.published_elsewhere(retained("home/lamp", b"on"));
    for session in 1..=3 {
        hub.attach(session);
    }

    // Each subscriber gets the retained message once, flagged RETAIN, at
    // the lower of its QoS and the message's; the broker hears one
    // SUBSCRIBE per joining filter, never a second connection.
    hub.client(1, subscribe(1, &[("home/#", QoS::AtLeastOnce)]));
    hub.settle();
    hub.client(2, subscribe(1, &[("home/lamp", QoS::AtMostOnce)]));
    hub.settle();
    for session in [1, 2] {
        let packets = hub.received(session);
        assert!(matches!(packets[0], Packet::SubAck(_)), "{packets:?}");
        let retained: Vec<&Publish> = packets[1..]
            .iter()
            .map(|packet| match packet {
                Packet::Publish(publish) => publish,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(retained.len(), 1, "session {session}: {packets:?}");
        assert!(retained[0].retain);
        assert_eq!(retained[0].payload, Bytes::from_static(b"on"));
    }
    assert!(hub.received(3).is_empty(), "not subscribed: nothing");

    // A live message reaches both subscribers once, RETAIN 0.
    hub.published_elsewhere(publish("home/lamp", QoS::AtLeastOnce, Some(7), b"off"));
    for session in [1, 2] {
        let live = hub.publishes(session);
        assert_eq!(live.len(), 1, "session {session}");
        assert!(!live[0].retain);
        assert_eq!(live[0].payload, Bytes::from_static(b"off"));
    }
    assert_eq!(hub.publishes(1)[..], [], "once");

    // An app's QoS 1 PUBLISH is acknowledged after the broker's PUBACK,
    // and reaches the other subscriber as the broker routes it.
    hub.client(
        3,
        Packet::Publish(publish("home/lamp", QoS::AtLeastOnce, Some(9), b"dim")),
    );
    assert!(hub.received(3).is_empty(), "no PUBACK before the broker's");
    hub.settle();
    assert_eq!(hub.received(3), vec![Packet::PubAck(id(9))]);
    assert_eq!(hub.publishes(2)[0].payload, Bytes::from_static(b"dim"));
    assert_eq!(hub.publishes(1)[0].payload, Bytes::from_static(b"dim"));

    // A retained message cleared by another client: a later subscriber
    // gets nothing, as on Mosquitto.
    hub.published_elsewhere(retained("home/lamp", b""));
    hub.received(1);
    hub.received(2);
    hub.attach(4);
    hub.client(4, subscribe(2, &[("home/+", QoS::AtLeastOnce)]));
    hub.settle();
    assert!(matches!(hub.received(4).as_slice(), [Packet::SubAck(_)]));
    let subscribes = hub
        .broker
        .heard
        .iter()
        .filter(|packet| matches!(packet, Packet::Subscribe(_)))
        .count();
    assert_eq!(subscribes, 3, "one SUBSCRIBE per joining filter");
}

#[test]
fn a_qos0_message_is_encoded_once_per_protocol_version_and_shared() {
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach_v5(1);
    hub.attach_v5(2);
    hub.attach(3);
    hub.subscribed(1, "r/#", QoS::AtMostOnce);
    for session in [2, 3] {
        hub.client(session, subscribe(1, &[("r/#", QoS::AtMostOnce)]));
        assert!(matches!(
            hub.received(session).as_slice(),
            [Packet::SubAck(_)]
        ));
    }
    hub.printer(Packet::Publish(publish(
        "r/x",
        QoS::AtMostOnce,
        None,
        b"state",
    )));
    let first = hub.sessions[&1].borrow().mqtt5_deliveries.clone();
    let second = hub.sessions[&2].borrow().mqtt5_deliveries.clone();
    assert_eq!((first.len(), second.len()), (1, 1));
    assert_eq!(
        first[0].as_ptr(),
        second[0].as_ptr(),
        "both MQTT 5 sessions hold the same bytes, not a copy each"
    );
    assert!(hub.sessions[&3].borrow().mqtt5_deliveries.is_empty());
    for session in 1..=3 {
        let got = hub.publishes(session);
        assert_eq!(got.len(), 1, "session {session}");
        assert_eq!(got[0].payload, Bytes::from_static(b"state"));
    }
}

/// An upstream that ends in a way no app can cause (the device's tunnel
/// moved, the way to it went, or it was another hub) blames nobody: a
/// PUBLISH in flight each time is sent again, never dropped, and its
/// publisher is not refused.
#[test]
fn an_upstream_lost_blamelessly_never_quarantines_what_was_in_flight() {
    let mut hub = Harness::new(config(RetainedReplay::Always));
    hub.attach_v5(1);
    hub.client(
        1,
        Packet::Publish(publish("cmd", QoS::AtLeastOnce, Some(3), b"x")),
    );
    assert_eq!(hub.upstream().len(), 1);
    for _ in 0..3 {
        hub.hub
            .upstream_lost_blameless(hub.now + Duration::from_secs(30), hub.now);
        hub.hub.upstream_resumed(hub.now);
        assert!(matches!(
            hub.upstream().as_slice(),
            [Packet::Publish(again)] if again.dup && again.payload == Bytes::from_static(b"x")
        ));
    }
    assert!(hub.refusals(1).is_empty());
    assert_eq!(hub.hub.counters().quarantined_publishers, 0);
    // The printer acknowledges it at last: so does the hub.
    hub.printer(Packet::PubAck(id(1)));
    assert_eq!(hub.received(1), vec![Packet::PubAck(id(3))]);
}
