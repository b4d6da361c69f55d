//! Why a session ends: the WebSocket close code (RFC 6455 / IANA registry)
//! and its short reason, plus the CONNACK sent first when there is one.

use relay_proto::mqtt::ConnectReturnCode;

/// A WebSocket close code with its reason text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: String,
}

impl Close {
    fn new(code: u16, reason: impl Into<String>) -> Close {
        Close {
            code,
            reason: reason.into(),
        }
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

    /// The key or device was revoked while the session was open.
    pub fn revoked() -> Close {
        Close::new(1008, "unauthorized: revoked")
    }

    /// Another session took this client id.
    pub fn replaced() -> Close {
        Close::new(1008, "replaced: same client id")
    }

    pub fn forbidden(what: &str) -> Close {
        Close::new(1008, format!("forbidden: {what}"))
    }

    pub fn limit(what: &str) -> Close {
        Close::new(1008, format!("limit: {what}"))
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
        Close::new(1013, "try again later")
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
