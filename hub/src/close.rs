//! Why a session ends: the WebSocket close code (RFC 6455 / IANA registry)
//! and its short reason, the MQTT 5 reason code an MQTT 5 client gets in
//! the DISCONNECT before it, plus the CONNACK sent first when there is one.

use relay_proto::mqtt::{ConnectReturnCode, DecodeError};
use relay_proto::mqtt5::{self, ReasonCode};

/// A WebSocket close code with its reason text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: String,
    /// What an MQTT 5 client's DISCONNECT says (with `reason` as its
    /// reason string).
    pub mqtt5: ReasonCode,
}

impl Close {
    fn new(code: u16, reason: impl Into<String>) -> Close {
        let mqtt5 = match code {
            1000 => ReasonCode::NORMAL_DISCONNECTION,
            1001 => ReasonCode::SERVER_SHUTTING_DOWN,
            1002 | 1003 => ReasonCode::PROTOCOL_ERROR,
            1008 => ReasonCode::NOT_AUTHORIZED,
            1009 => ReasonCode::PACKET_TOO_LARGE,
            1011 => ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR,
            // The device or its printer is gone: DISCONNECT has no
            // "server unavailable"; the reason string says which.
            _ => ReasonCode::UNSPECIFIED_ERROR,
        };
        Close {
            code,
            reason: reason.into(),
            mqtt5,
        }
    }

    fn with_mqtt5(mut self, mqtt5: ReasonCode) -> Close {
        self.mqtt5 = mqtt5;
        self
    }

    /// Bytes that do not decode as MQTT.
    pub fn malformed(reason: impl Into<String>) -> Close {
        Close::new(1002, reason).with_mqtt5(ReasonCode::MALFORMED_PACKET)
    }

    /// The client sent nothing for one and a half keep-alives.
    pub fn keep_alive_timeout() -> Close {
        Close::new(1002, "keep-alive timeout").with_mqtt5(ReasonCode::KEEP_ALIVE_TIMEOUT)
    }

    /// An MQTT 5 client used a topic alias it never set, or over the
    /// maximum.
    pub fn topic_alias_invalid(reason: impl Into<String>) -> Close {
        Close::new(1002, reason).with_mqtt5(ReasonCode::TOPIC_ALIAS_INVALID)
    }

    /// An MQTT 5 client sent more QoS 1 and 2 PUBLISHes at once than the
    /// Receive Maximum the edge gave it.
    pub fn receive_maximum_exceeded(maximum: usize) -> Close {
        Close::new(
            1008,
            format!("limit: more than {maximum} unacknowledged publishes"),
        )
        .with_mqtt5(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED)
    }

    /// The client sent DISCONNECT, or closed.
    pub fn normal() -> Close {
        Close::new(1000, "")
    }

    pub fn draining() -> Close {
        Close::new(1001, "draining")
    }

    /// Malformed MQTT or a protocol violation.
    pub fn protocol(reason: impl Into<String>) -> Close {
        Close::new(1002, reason)
    }

    /// A text frame: MQTT travels in binary frames only.
    pub fn text_frame() -> Close {
        Close::new(1003, "text frames are not supported")
    }

    pub fn unauthorized() -> Close {
        Close::new(1008, "unauthorized")
    }

    /// No device named (an MQTT-over-TLS client without SNI) and a key not
    /// bound to one.
    pub fn no_device() -> Close {
        Close::new(
            1008,
            "no device named: connect by the device's hostname, <device-id>.<base domain>",
        )
    }

    /// The key or device was revoked while the session was open.
    pub fn revoked() -> Close {
        Close::new(1008, "unauthorized: revoked").with_mqtt5(ReasonCode::ADMINISTRATIVE_ACTION)
    }

    /// Another session took this client id.
    pub fn replaced() -> Close {
        Close::new(1008, "replaced: same client id").with_mqtt5(ReasonCode::SESSION_TAKEN_OVER)
    }

    pub fn forbidden(what: &str) -> Close {
        Close::new(1008, format!("forbidden: {what}"))
    }

    pub fn limit(what: &str) -> Close {
        let mqtt5 = if what.contains("faster") || what.contains("churn") {
            ReasonCode::MESSAGE_RATE_TOO_HIGH
        } else {
            ReasonCode::QUOTA_EXCEEDED
        };
        Close::new(1008, format!("limit: {what}")).with_mqtt5(mqtt5)
    }

    pub fn too_large() -> Close {
        Close::new(1009, "packet too large")
    }

    pub fn internal() -> Close {
        Close::new(1011, "internal error")
    }

    pub fn device_offline() -> Close {
        Close::new(1013, "device offline")
    }

    /// The printer refused the agent or cannot be reached.
    pub fn printer_unreachable(what: &str) -> Close {
        Close::new(1014, format!("printer: {what}"))
    }

    pub fn store_unavailable() -> Close {
        Close::new(1013, "try again later").with_mqtt5(ReasonCode::SERVER_BUSY)
    }
}

/// The CONNACK return code for a refusal, as MQTT.js and paho show it.
pub fn connack_code_name(code: ConnectReturnCode) -> &'static str {
    match code {
        ConnectReturnCode::Accepted => "0",
        ConnectReturnCode::UnacceptableProtocolVersion => "1",
        ConnectReturnCode::IdentifierRejected => "2",
        ConnectReturnCode::ServerUnavailable => "3",
        ConnectReturnCode::BadUserNameOrPassword => "4",
        ConnectReturnCode::NotAuthorized => "5",
    }
}

/// The close for a decoding failure: oversize packets get 1009, the rest 1002.
pub fn close_for_decode_error(error: &DecodeError) -> Close {
    match error {
        DecodeError::PacketTooLarge { .. } => Close::too_large(),
        other => Close::malformed(format!("malformed MQTT: {other}")),
    }
}

/// The same for an MQTT 5 client's packets.
pub fn close_for_v5_decode_error(error: &mqtt5::DecodeError) -> Close {
    match error {
        mqtt5::DecodeError::Packet(error) => close_for_decode_error(error),
        other => Close::malformed(format!("malformed MQTT: {other}")),
    }
}
