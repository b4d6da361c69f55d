//! What a hub has refused, cut and answered itself, counted.

/// What a hub has refused or cut, counted; the driver exports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubCounters {
    /// SUBSCRIBE filters answered 0x80 by the policy.
    pub refused_filters: u64,
    /// PUBLISHes (and wills) dropped by the policy.
    pub refused_publishes: u64,
    /// Sessions cut for subscription churn.
    pub churn_cuts: u64,
    /// Sessions cut for not reading.
    pub slow_consumer_cuts: u64,
    /// QoS 0 PUBLISHes dropped over the device's publish rate.
    pub throttled_publishes: u64,
    /// Sessions cut for publishing faster than the rate, past the wait.
    pub rate_cuts: u64,
    /// Bambu reports passed on but not kept (over the state's bound).
    pub oversized_reports: u64,
    /// MQTT 5 PUBLISHes whose Message Expiry passed while they waited at
    /// the edge (for the rate, or for a new upstream): dropped.
    pub expired_publishes: u64,
    /// Upstream packets over `max_upstream_packet`, skipped.
    pub oversized_upstream: u64,
    /// Of those, QoS 1 PUBLISHes acknowledged (from their first bytes).
    pub oversized_acknowledged: u64,
    /// Apps' `pushall`s answered from the state or by another's answer,
    /// instead of reaching the printer.
    pub pushalls_absorbed: u64,
    /// CC2 registrations, heartbeats and full statuses answered by the
    /// edge instead of the printer.
    pub cc2_answered_at_edge: u64,
    /// CC2 requests sent on the agent's registration.
    pub cc2_requests_sent: u64,
    /// CC2 requests answered "busy" (1009): the pacing queue was full.
    pub cc2_queue_overflows: u64,
    /// Filters quarantined: their trial ended the upstream again.
    pub quarantined_filters: u64,
    /// SUBSCRIBE filters answered 0x80 (MQTT 5: 0x87) because they are
    /// quarantined (also counted in `refused_filters`).
    pub quarantine_refusals: u64,
    /// Filters taken from sessions that held them when they were
    /// quarantined.
    pub quarantine_lost_filters: u64,
    /// Publishers whose PUBLISHes ended the upstream twice: refused since.
    pub quarantined_publishers: u64,
    /// Upstreams ended because the printer went silent: no PINGRESP in
    /// time…
    pub silent_pingresp: u64,
    /// …or, on a Bambu printer, no report after the watchdog's `pushall`…
    pub silent_report: u64,
    /// …or, on a CC2, nothing at all (no PONG, no status) for 65 s…
    pub silent_pong: u64,
    /// …or, on a CC2 that apps watch, no status nor after a 1002.
    pub silent_status: u64,
    /// Watchdog 1002s sent to a CC2 whose status went quiet.
    pub watchdog_status_requests: u64,
    /// Watchdog `pushall`s sent to a Bambu printer that stopped reporting.
    pub watchdog_pushalls: u64,
    /// PUBLISHes refused because their publisher is quarantined (also
    /// counted in `refused_publishes`), or dropped instead of being sent a
    /// third time after ending the upstream twice.
    pub quarantine_dropped_publishes: u64,
}
