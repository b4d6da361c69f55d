//! MQTT 5 clients: the edge and the agent's LAN listener speak 5 with them
//! and 3.1.1 everywhere else.
//!
//! The hub works on one model, MQTT 3.1.1's packets plus what 3.1.1 has
//! no word for ([`PacketExtras`]: subscription options, message expiry);
//! a v5 session translates at its edges, without IO:
//! [`V5Session::inbound`] turns the client's v5 packets into the hub's
//! (resolving topic aliases, stripping properties, counting against the
//! Receive Maximum the server announced), or answers them itself (a
//! read-only key's PUBLISH gets PUBACK 0x87);
//! [`V5Session::outbound`] turns the hub's bytes into v5 packets for the
//! client (SUBACK reason codes, UNSUBACK codes per filter, the client's
//! Receive Maximum and Maximum Packet Size respected). The CONNACK and
//! the DISCONNECT that ends a session come from here too.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use relay_proto::mqtt::{self, PacketId, QoS};
use relay_proto::mqtt5::{
    self, Ack, ConnAck, Disconnect, Properties, Property, ReasonCode, SubAck,
};

use crate::close::Close;
use crate::state::{PacketExtras, SubscriptionExtras};

/// Topic aliases a client may set (announced in CONNACK).
pub const TOPIC_ALIAS_MAXIMUM: u16 = 32;

/// What an MQTT 5 CONNECT asked for that 3.1.1 has no word for.
#[derive(Debug, Clone)]
pub struct V5Connect {
    /// QoS 1 and 2 PUBLISHes the client takes unacknowledged at once.
    pub receive_maximum: u16,
    /// The largest packet the client takes; larger ones are not sent.
    pub maximum_packet_size: Option<u32>,
    /// Whether reason strings may go in packets other than CONNACK and
    /// DISCONNECT (Request Problem Information, default yes).
    pub problem_information: bool,
    /// The client id the server assigned, for a CONNECT without one.
    pub assigned_client_id: Option<String>,
}

/// A v5 CONNECT as the hub's CONNECT, and what only v5 says. An empty
/// client id gets `assign()`'s.
pub fn neutral_connect(
    connect: mqtt5::Connect,
    assign: impl FnOnce() -> String,
) -> (mqtt::Connect, V5Connect) {
    let properties = &connect.properties;
    let assigned_client_id = connect.client_id.is_empty().then(assign);
    let extra = V5Connect {
        receive_maximum: properties.receive_maximum().unwrap_or(u16::MAX),
        maximum_packet_size: properties.maximum_packet_size(),
        problem_information: properties.request_problem_information() != Some(0),
        assigned_client_id: assigned_client_id.clone(),
    };
    let neutral = mqtt::Connect {
        protocol: mqtt::ProtocolLevel::V3_1_1,
        bridge_mode: false,
        // Sessions are not persisted: every session starts clean, and the
        // CONNACK says Session Present 0 with Session Expiry Interval 0.
        clean_session: true,
        keep_alive: connect.keep_alive,
        client_id: assigned_client_id.unwrap_or(connect.client_id),
        // The will's properties (delay, expiry, content type) are dropped:
        // it is published at once, as in 3.1.1.
        will: connect.will.map(|will| mqtt::Will {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
        }),
        username: connect.username,
        password: connect.password,
    };
    (neutral, extra)
}

/// What the server (the edge, or the agent on the LAN) tells an accepted v5 client about itself.
#[derive(Debug, Clone)]
pub struct ServerOffer {
    pub maximum_packet_size: usize,
    pub receive_maximum: u16,
    pub retain_available: bool,
    /// The keep-alive the server holds the client to, when not its own.
    pub server_keep_alive: Option<u16>,
    pub assigned_client_id: Option<String>,
}

/// CONNACK for an accepted v5 client.
pub fn accepted_connack(offer: &ServerOffer) -> mqtt5::Packet {
    let mut properties = Properties::new()
        .with(Property::SessionExpiryInterval(0))
        .with(Property::ReceiveMaximum(offer.receive_maximum))
        .with(Property::MaximumPacketSize(
            u32::try_from(offer.maximum_packet_size).unwrap_or(u32::MAX),
        ))
        .with(Property::TopicAliasMaximum(TOPIC_ALIAS_MAXIMUM))
        .with(Property::RetainAvailable(u8::from(offer.retain_available)))
        .with(Property::WildcardSubscriptionAvailable(1))
        .with(Property::SubscriptionIdentifierAvailable(0))
        .with(Property::SharedSubscriptionAvailable(0));
    if let Some(keep_alive) = offer.server_keep_alive {
        properties.push(Property::ServerKeepAlive(keep_alive));
    }
    if let Some(client_id) = &offer.assigned_client_id {
        properties.push(Property::AssignedClientIdentifier(client_id.clone()));
    }
    mqtt5::Packet::ConnAck(ConnAck {
        session_present: false,
        reason: ReasonCode::SUCCESS,
        properties,
    })
}

/// CONNACK for a refused v5 client, with the reason string.
pub fn refused_connack(reason: ReasonCode, text: &str) -> mqtt5::Packet {
    mqtt5::Packet::ConnAck(ConnAck {
        session_present: false,
        reason,
        properties: reason_string(text),
    })
}

/// The DISCONNECT that ends a v5 session before its WebSocket close.
pub fn disconnect_for(close: &Close) -> mqtt5::Packet {
    mqtt5::Packet::Disconnect(Disconnect {
        reason: close.mqtt5,
        properties: reason_string(&close.reason),
    })
}

fn reason_string(text: &str) -> Properties {
    if text.is_empty() {
        Properties::new()
    } else {
        Properties::new().with(Property::ReasonString(text.to_owned()))
    }
}

pub fn encode(packet: &mqtt5::Packet) -> Bytes {
    let mut bytes = BytesMut::new();
    // Packets the server builds are within MQTT 5's rules.
    let _ = mqtt5::encode(packet, &mut bytes);
    bytes.freeze()
}

/// What a client's v5 packet becomes.
#[derive(Debug)]
pub enum Inbound {
    /// For the hub (or the session's own 3.1.1 handling), as 3.1.1, with
    /// what 3.1.1 has no word for.
    Neutral(mqtt::Packet, Option<Box<PacketExtras>>),
    /// Answered here; nothing goes further.
    Answer(mqtt5::Packet),
    /// Nothing to do.
    Nothing,
    /// DISCONNECT: the session ends; `with_will` when the client asked
    /// for its will anyway (reason 0x04).
    Disconnect { with_will: bool },
}

/// One v5 session's translation state.
#[derive(Debug)]
pub struct V5Session {
    /// Its key may only read: PUBLISHes are answered 0x87 and dropped.
    read_only: bool,
    /// What the client asked for.
    client: V5Connect,
    /// QoS 1 and 2 PUBLISHes the server accepts from it unacknowledged.
    receive_maximum: usize,
    /// Its QoS 1 and 2 PUBLISHes not yet acknowledged by the server.
    unacknowledged: usize,
    /// Client → server topic aliases.
    aliases: HashMap<u16, String>,
    /// Filters per UNSUBSCRIBE on its way: its UNSUBACK has a code for each.
    unsubscribes: HashMap<PacketId, usize>,
    /// QoS 1 deliveries the client has not acknowledged yet.
    pub in_flight: usize,
}

impl V5Session {
    pub fn new(client: V5Connect, read_only: bool, receive_maximum: usize) -> V5Session {
        V5Session {
            read_only,
            client,
            receive_maximum,
            unacknowledged: 0,
            aliases: HashMap::new(),
            unsubscribes: HashMap::new(),
            in_flight: 0,
        }
    }

    /// The server answered one of the client's QoS 1 or 2 PUBLISHes itself
    /// (a refusal in the PUBACK).
    pub fn answered(&mut self) {
        self.unacknowledged = self.unacknowledged.saturating_sub(1);
    }

    /// Whether another QoS 1 delivery may go to the client now.
    pub fn may_deliver(&self) -> bool {
        self.in_flight < usize::from(self.client.receive_maximum)
    }

    /// A packet from the client.
    pub fn inbound(&mut self, packet: mqtt5::Packet) -> Result<Inbound, Close> {
        use mqtt5::Packet as P;
        Ok(match packet {
            P::Publish(publish) => return self.inbound_publish(publish),
            P::PubAck(ack) => {
                self.in_flight = self.in_flight.saturating_sub(1);
                Inbound::Neutral(mqtt::Packet::PubAck(ack.packet_id), None)
            }
            P::PubRel(ack) => Inbound::Neutral(mqtt::Packet::PubRel(ack.packet_id), None),
            // The hub delivers at QoS 1 at most: a client's PUBREC or
            // PUBCOMP answers nothing of ours.
            P::PubRec(_) | P::PubComp(_) => {
                return Err(Close::protocol("PUBREC or PUBCOMP for no QoS 2 delivery"));
            }
            P::Subscribe(subscribe) => {
                // No Local and Retain Handling go to the hub; Retain As
                // Published cannot be served over a 3.1.1 upstream (the
                // broker clears RETAIN on live messages), and subscription
                // identifiers are not offered (CONNACK says so).
                let extras = PacketExtras {
                    subscription: subscribe
                        .filters
                        .iter()
                        .map(|(_, options)| SubscriptionExtras {
                            no_local: options.no_local,
                            retain_handling: options.retain_handling,
                        })
                        .collect(),
                    message_expiry: None,
                };
                Inbound::Neutral(
                    mqtt::Packet::Subscribe(mqtt::Subscribe {
                        packet_id: subscribe.packet_id,
                        filters: subscribe
                            .filters
                            .into_iter()
                            .map(|(filter, options)| (filter, options.qos))
                            .collect(),
                    }),
                    Some(Box::new(extras)),
                )
            }
            P::Unsubscribe(unsubscribe) => {
                self.unsubscribes
                    .insert(unsubscribe.packet_id, unsubscribe.filters.len());
                Inbound::Neutral(
                    mqtt::Packet::Unsubscribe(mqtt::Unsubscribe {
                        packet_id: unsubscribe.packet_id,
                        filters: unsubscribe.filters,
                    }),
                    None,
                )
            }
            P::PingReq => Inbound::Neutral(mqtt::Packet::PingReq, None),
            P::Disconnect(disconnect) => Inbound::Disconnect {
                with_will: disconnect.reason == ReasonCode::DISCONNECT_WITH_WILL,
            },
            P::Auth(_) => {
                return Err(Close::protocol(
                    "AUTH: enhanced authentication is not offered",
                ));
            }
            P::Connect(_) => return Err(Close::protocol("second CONNECT")),
            other => {
                return Err(Close::protocol(format!(
                    "unexpected {} from a client",
                    other.packet_type()
                )));
            }
        })
    }

    fn inbound_publish(&mut self, publish: mqtt5::Publish) -> Result<Inbound, Close> {
        let topic = match publish.properties.topic_alias() {
            Some(alias) if alias > TOPIC_ALIAS_MAXIMUM => {
                return Err(Close::topic_alias_invalid(format!(
                    "topic alias {alias} is above the maximum {TOPIC_ALIAS_MAXIMUM}"
                )));
            }
            Some(alias) if publish.topic.is_empty() => match self.aliases.get(&alias) {
                Some(topic) => topic.clone(),
                None => {
                    return Err(Close::topic_alias_invalid(format!(
                        "topic alias {alias} was never set"
                    )));
                }
            },
            Some(alias) => {
                self.aliases.insert(alias, publish.topic.clone());
                publish.topic
            }
            None => publish.topic,
        };
        if self.read_only {
            // Refused in the PUBACK, as MQTT 5 allows, instead of closing.
            let refused = |packet_id| Ack {
                packet_id,
                reason: ReasonCode::NOT_AUTHORIZED,
                properties: self.problem("read-only key"),
            };
            return Ok(match (publish.qos, publish.packet_id) {
                (QoS::AtLeastOnce, Some(id)) => Inbound::Answer(mqtt5::Packet::PubAck(refused(id))),
                (QoS::ExactlyOnce, Some(id)) => Inbound::Answer(mqtt5::Packet::PubRec(refused(id))),
                _ => Inbound::Nothing,
            });
        }
        if publish.qos != QoS::AtMostOnce {
            if self.unacknowledged >= self.receive_maximum {
                return Err(Close::receive_maximum_exceeded(self.receive_maximum));
            }
            self.unacknowledged += 1;
        }
        // Properties (user properties, content type, response topic…)
        // never reach a printer: 3.1.1 has no place for them. The message
        // expiry stays with the hub, for as long as the message waits there.
        let extras = publish.properties.message_expiry_interval().map(|seconds| {
            Box::new(PacketExtras {
                subscription: Vec::new(),
                message_expiry: Some(std::time::Duration::from_secs(u64::from(seconds))),
            })
        });
        Ok(Inbound::Neutral(
            mqtt::Packet::Publish(mqtt::Publish {
                dup: publish.dup,
                qos: publish.qos,
                retain: publish.retain,
                topic,
                packet_id: publish.packet_id,
                payload: publish.payload,
            }),
            extras,
        ))
    }

    /// A reason string, if the client wants them outside CONNACK and
    /// DISCONNECT.
    fn problem(&self, text: &str) -> Properties {
        if self.client.problem_information {
            reason_string(text)
        } else {
            Properties::new()
        }
    }

    /// Whether a packet of `len` bytes may go to the client (its Maximum
    /// Packet Size; over it a PUBLISH is dropped, as MQTT 5 says).
    pub fn fits(&self, len: usize) -> bool {
        self.client
            .maximum_packet_size
            .is_none_or(|max| len <= max as usize)
    }

    /// One packet the hub sent this session, as v5; `None` when it is not
    /// sent (over the client's Maximum Packet Size: dropped, as MQTT 5
    /// says).
    pub fn outbound(&mut self, packet: mqtt::Packet) -> Option<mqtt5::Packet> {
        use mqtt::Packet as P;
        let packet = match packet {
            P::Publish(publish) => mqtt5::Packet::Publish(mqtt5::Publish {
                dup: publish.dup,
                qos: publish.qos,
                retain: publish.retain,
                topic: publish.topic,
                packet_id: publish.packet_id,
                properties: Properties::new(),
                payload: publish.payload,
            }),
            P::PubAck(id) => {
                self.unacknowledged = self.unacknowledged.saturating_sub(1);
                mqtt5::Packet::PubAck(Ack::success(id))
            }
            P::PubRec(id) => {
                self.unacknowledged = self.unacknowledged.saturating_sub(1);
                mqtt5::Packet::PubRec(Ack::success(id))
            }
            P::PubComp(id) => mqtt5::Packet::PubComp(Ack::success(id)),
            P::PubRel(id) => mqtt5::Packet::PubRel(Ack::success(id)),
            P::SubAck(suback) => mqtt5::Packet::SubAck(SubAck {
                packet_id: suback.packet_id,
                properties: Properties::new(),
                reasons: suback
                    .return_codes
                    .into_iter()
                    .map(|code| match code {
                        mqtt::SubscribeReturnCode::Success(qos) => ReasonCode(qos as u8),
                        // The device's policy refused the filter.
                        mqtt::SubscribeReturnCode::Failure => ReasonCode::NOT_AUTHORIZED,
                    })
                    .collect(),
            }),
            P::UnsubAck(id) => {
                let filters = self.unsubscribes.remove(&id).unwrap_or(1).max(1);
                mqtt5::Packet::UnsubAck(SubAck {
                    packet_id: id,
                    properties: Properties::new(),
                    reasons: vec![ReasonCode::SUCCESS; filters],
                })
            }
            P::PingResp => mqtt5::Packet::PingResp,
            // The hub sends a session nothing else (CONNACK comes from
            // the session itself).
            _ => return None,
        };
        if let mqtt5::Packet::Publish(_) = &packet
            && mqtt5::encoded_len(&packet).is_ok_and(|len| !self.fits(len))
        {
            return None;
        }
        if let mqtt5::Packet::Publish(publish) = &packet
            && publish.qos != QoS::AtMostOnce
        {
            self.in_flight += 1;
        }
        Some(packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(read_only: bool) -> V5Session {
        V5Session::new(
            V5Connect {
                receive_maximum: 2,
                maximum_packet_size: Some(64),
                problem_information: true,
                assigned_client_id: None,
            },
            read_only,
            3,
        )
    }

    fn publish(topic: &str, alias: Option<u16>, qos: QoS, id: Option<u16>) -> mqtt5::Packet {
        let mut properties = Properties::new();
        if let Some(alias) = alias {
            properties.push(Property::TopicAlias(alias));
        }
        mqtt5::Packet::Publish(mqtt5::Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id: id.and_then(PacketId::new),
            properties: properties.with(Property::UserProperty("k".into(), "v".into())),
            payload: Bytes::from_static(b"x"),
        })
    }

    fn topic_of(inbound: Inbound) -> String {
        match inbound {
            Inbound::Neutral(mqtt::Packet::Publish(publish), _) => publish.topic,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn topic_aliases_are_set_resolved_and_checked() {
        let mut session = session(false);
        let set = session
            .inbound(publish("a/b", Some(1), QoS::AtMostOnce, None))
            .unwrap();
        assert_eq!(topic_of(set), "a/b");
        let used = session
            .inbound(publish("", Some(1), QoS::AtMostOnce, None))
            .unwrap();
        assert_eq!(topic_of(used), "a/b");
        // Changed, then used again.
        session
            .inbound(publish("c", Some(1), QoS::AtMostOnce, None))
            .unwrap();
        let used = session
            .inbound(publish("", Some(1), QoS::AtMostOnce, None))
            .unwrap();
        assert_eq!(topic_of(used), "c");
        let unknown = session
            .inbound(publish("", Some(2), QoS::AtMostOnce, None))
            .unwrap_err();
        assert_eq!(unknown.mqtt5, ReasonCode::TOPIC_ALIAS_INVALID);
        let over = session
            .inbound(publish(
                "x",
                Some(TOPIC_ALIAS_MAXIMUM + 1),
                QoS::AtMostOnce,
                None,
            ))
            .unwrap_err();
        assert_eq!(over.mqtt5, ReasonCode::TOPIC_ALIAS_INVALID);
    }

    #[test]
    fn a_read_only_key_gets_puback_0x87_and_nothing_goes_on() {
        let mut session = session(true);
        let Inbound::Answer(mqtt5::Packet::PubAck(ack)) = session
            .inbound(publish("a", None, QoS::AtLeastOnce, Some(4)))
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(ack.reason, ReasonCode::NOT_AUTHORIZED);
        assert_eq!(
            ack.properties.reason_string().as_deref(),
            Some("read-only key")
        );
        assert!(matches!(
            session.inbound(publish("a", None, QoS::AtMostOnce, None)),
            Ok(Inbound::Nothing)
        ));
    }

    #[test]
    fn receive_maximum_both_ways() {
        let mut session = session(false);
        // The server's: three unacknowledged from the client at most.
        for id in 1..=3 {
            session
                .inbound(publish("a", None, QoS::AtLeastOnce, Some(id)))
                .unwrap();
        }
        let over = session
            .inbound(publish("a", None, QoS::AtLeastOnce, Some(4)))
            .unwrap_err();
        assert_eq!(over.mqtt5, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
        // The client's: two deliveries in flight, then the next waits for
        // an acknowledgement.
        let delivery = |id| {
            mqtt::Packet::Publish(mqtt::Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: "t".into(),
                packet_id: PacketId::new(id),
                payload: Bytes::from_static(b"1"),
            })
        };
        assert!(session.may_deliver());
        session.outbound(delivery(1)).unwrap();
        session.outbound(delivery(2)).unwrap();
        assert!(!session.may_deliver());
        session
            .inbound(mqtt5::Packet::PubAck(Ack::success(
                PacketId::new(1).unwrap(),
            )))
            .unwrap();
        assert!(session.may_deliver());
        // Over the client's Maximum Packet Size: not sent.
        let big = mqtt::Packet::Publish(mqtt::Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "t".into(),
            packet_id: None,
            payload: Bytes::from(vec![0; 100]),
        });
        assert!(session.outbound(big).is_none());
    }

    #[test]
    fn acknowledgements_carry_reason_codes_per_filter() {
        let mut session = session(false);
        session
            .inbound(mqtt5::Packet::Unsubscribe(mqtt5::Unsubscribe {
                packet_id: PacketId::new(9).unwrap(),
                properties: Properties::new(),
                filters: vec!["a".into(), "b".into()],
            }))
            .unwrap();
        let Some(mqtt5::Packet::UnsubAck(unsuback)) =
            session.outbound(mqtt::Packet::UnsubAck(PacketId::new(9).unwrap()))
        else {
            panic!()
        };
        assert_eq!(unsuback.reasons, vec![ReasonCode::SUCCESS; 2]);
        let Some(mqtt5::Packet::SubAck(suback)) =
            session.outbound(mqtt::Packet::SubAck(mqtt::SubAck {
                packet_id: PacketId::new(3).unwrap(),
                return_codes: vec![
                    mqtt::SubscribeReturnCode::Success(QoS::AtLeastOnce),
                    mqtt::SubscribeReturnCode::Failure,
                ],
            }))
        else {
            panic!()
        };
        assert_eq!(
            suback.reasons,
            vec![ReasonCode::GRANTED_QOS_1, ReasonCode::NOT_AUTHORIZED]
        );
    }
}
