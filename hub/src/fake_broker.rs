//! A broker for the hub's unit tests that answers as Mosquitto does, so
//! that a test says what the printer holds instead of hand-writing its
//! SUBACKs: SUBSCRIBE is granted at the QoS asked (up to `max_qos`) and
//! followed by the retained messages its filters match, flagged RETAIN
//! (MQTT-3.3.1-8); a PUBLISH is stored when retained (an empty one clears),
//! acknowledged at QoS 1, and routed back to the hub when one of its
//! subscriptions matches (3.1.1 has no No Local); UNSUBSCRIBE gets its
//! UNSUBACK and PINGREQ its PINGRESP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use relay_proto::mqtt::{Packet, PacketId, Publish, QoS, SubAck, SubscribeReturnCode};
use relay_proto::topic::topic_matches;

#[derive(Debug)]
pub(crate) struct FakeBroker {
    /// The hub's subscriptions and their granted QoS.
    subscriptions: BTreeMap<String, QoS>,
    retained: BTreeMap<String, Publish>,
    /// Highest QoS granted (a Bambu printer grants 1, Mosquitto 2).
    pub(crate) max_qos: QoS,
    next_packet_id: u16,
    /// Every packet the hub sent, in order.
    pub(crate) heard: Vec<Packet>,
}

impl FakeBroker {
    pub(crate) fn new() -> FakeBroker {
        FakeBroker {
            subscriptions: BTreeMap::new(),
            retained: BTreeMap::new(),
            max_qos: QoS::ExactlyOnce,
            next_packet_id: 0,
            heard: Vec::new(),
        }
    }

    /// What the broker sends back for one packet from the hub.
    pub(crate) fn answer(&mut self, packet: Packet) -> Vec<Packet> {
        self.heard.push(packet.clone());
        match packet {
            Packet::Subscribe(subscribe) => {
                let mut answers = vec![Packet::SubAck(SubAck {
                    packet_id: subscribe.packet_id,
                    return_codes: subscribe
                        .filters
                        .iter()
                        .map(|(_, qos)| SubscribeReturnCode::Success((*qos).min(self.max_qos)))
                        .collect(),
                })];
                for (filter, qos) in subscribe.filters {
                    let granted = qos.min(self.max_qos);
                    self.subscriptions.insert(filter.clone(), granted);
                    let matching: Vec<Publish> = self
                        .retained
                        .values()
                        .filter(|message| topic_matches(&filter, &message.topic))
                        .cloned()
                        .collect();
                    for message in matching {
                        answers.push(self.deliver(message, granted, true));
                    }
                }
                answers
            }
            Packet::Unsubscribe(unsubscribe) => {
                for filter in &unsubscribe.filters {
                    self.subscriptions.remove(filter);
                }
                vec![Packet::UnsubAck(unsubscribe.packet_id)]
            }
            Packet::Publish(publish) => {
                let mut answers = Vec::new();
                if let (QoS::AtLeastOnce, Some(id)) = (publish.qos, publish.packet_id) {
                    answers.push(Packet::PubAck(id));
                }
                answers.extend(self.publish_from_elsewhere(publish));
                answers
            }
            Packet::PingReq => vec![Packet::PingResp],
            // PUBACKs of the broker's own QoS 1 deliveries, DISCONNECT.
            _ => Vec::new(),
        }
    }

    /// A PUBLISH from any client (the printer itself, or the hub): kept
    /// when retained, and what reaches the hub's subscriptions.
    pub(crate) fn publish_from_elsewhere(&mut self, publish: Publish) -> Vec<Packet> {
        if publish.retain {
            if publish.payload.is_empty() {
                self.retained.remove(&publish.topic);
            } else {
                self.retained.insert(publish.topic.clone(), publish.clone());
            }
        }
        // One copy at the best matching subscription's QoS, as Mosquitto
        // sends with overlapping subscriptions of one client.
        let best = self
            .subscriptions
            .iter()
            .filter(|(filter, _)| topic_matches(filter, &publish.topic))
            .map(|(_, qos)| *qos)
            .max();
        best.map(|qos| self.deliver(publish, qos, false))
            .into_iter()
            .collect()
    }

    fn deliver(&mut self, message: Publish, granted: QoS, retain: bool) -> Packet {
        let qos = message.qos.min(granted);
        let packet_id = (qos != QoS::AtMostOnce).then(|| {
            self.next_packet_id = self.next_packet_id % u16::MAX + 1;
            PacketId::new(self.next_packet_id).unwrap()
        });
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain,
            packet_id,
            ..message
        })
    }
}
