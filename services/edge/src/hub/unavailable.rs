//! Why a device cannot serve a client now, whichever upstream failed.

use relay_proto::tunnel::LinkDownReason;

/// Why a device cannot serve a client now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// No agent connected.
    Offline,
    /// The agent is there but the printer refused or cannot be reached.
    Printer {
        reason: LinkDownReason,
        detail: Option<String>,
    },
}

impl Unavailable {
    /// Short text for a close reason: `printer: <this>`.
    pub fn printer_text(reason: LinkDownReason) -> &'static str {
        match reason {
            LinkDownReason::CredentialsRefused => "refused the access code",
            LinkDownReason::TlsFailure => "TLS failure",
            LinkDownReason::Unreachable => "unreachable",
            LinkDownReason::TooManyClients => "too many clients",
            LinkDownReason::Dropped => "connection lost",
            LinkDownReason::ProtocolError => "protocol error",
            LinkDownReason::TimedOut => "timed out",
            LinkDownReason::Policy => "refused by the agent's policy",
            LinkDownReason::NotHere => "moved to another edge instance",
            LinkDownReason::Other(_) => "unavailable",
        }
    }
}
