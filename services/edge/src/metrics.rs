//! Prometheus metrics of the edge. No per-device or per-tenant labels: their
//! number is unbounded.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Every metric the edge exports, registered in its own registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub connections: IntCounter,
    pub connections_open: IntGauge,
    /// Sessions over MQTT-over-TLS (or TCP) instead of WebSocket.
    pub mqtt_connections: IntCounter,
    pub tls_handshake_failures: IntCounter,
    /// By result: accepted, not_websocket, wrong_path, bad_request.
    pub upgrades: IntCounterVec,
    /// By reason (`AuthFailure::label`, plus rate_limited).
    pub auth_failures: IntCounterVec,
    /// Agent pairings: started, polls and owners' code entries, by result.
    pub pairing: IntCounterVec,
    /// Apps' authorization codes exchanged, by result.
    pub app_grants: IntCounterVec,
    pub sessions_open: IntGauge,
    /// By direction: in (from clients), out (to clients).
    pub bytes: IntCounterVec,
    /// MQTT packets, by direction.
    pub messages: IntCounterVec,
    /// Writes of MQTT bytes to clients, by path: `direct` (by the task
    /// that had them, the session idle and its socket writable) or
    /// `queued` (by the session's writer).
    pub client_writes: IntCounterVec,
    /// WebSocket close codes sent, by code.
    pub close_codes: IntCounterVec,
    /// CONNACK return codes sent, by code.
    pub connacks: IntCounterVec,
    /// Bytes between device hubs and printers (the tunnel's payload), by
    /// direction: in (from printers), out (to printers).
    pub printer_bytes: IntCounterVec,
    /// Devices whose agent is connected.
    pub agents_connected: IntGauge,
    /// The same, by transport (quic, tcp).
    pub agents_by_transport: prometheus::IntGaugeVec,
    /// What device hubs refused or cut, by what: filter (SUBACK 0x80 by
    /// the topic policy), publish (dropped by the policy), churn (session
    /// cut for subscription churn), slow_consumer (session cut).
    pub hub_refusals: IntCounterVec,
    /// Hubs that found a new upstream within the grace, their sessions
    /// kept.
    pub hub_upstream_resumes: IntCounter,
    /// Filters quarantined by a device hub: subscribing to them made the
    /// printer drop its connection twice.
    pub hub_quarantined_filters: IntCounter,
    /// Printer connections the agents reported down, by reason (refused,
    /// dropped, unreachable, …): each is a reconnect the agent will make.
    pub printer_link_downs: IntCounterVec,
    /// Printers found silent (connected, answering nothing), by watchdog:
    /// pingresp (no PINGRESP in 1.5 × the keep-alive), report (a Bambu
    /// printer with no report, nor after a pushall).
    pub printer_silences: IntCounterVec,
    /// This instance's lease, by result: renewed, failed, lost.
    pub leases: IntCounterVec,
    /// Local tunnels sent away because another instance claimed their
    /// device, or this one lost its lease.
    pub tunnels_fenced: IntCounter,
    /// Peer-link bytes, by direction (in: received by this instance).
    pub peer_bytes: IntCounterVec,
    /// Peer hubs served by this instance (as the device's owner).
    pub peer_links_served: IntGauge,
    /// Peer connections and links refused, by reason.
    pub peer_refusals: IntCounterVec,
    /// Owner lookups of devices, by where the answer came from: local,
    /// cache, store.
    pub owner_lookups: IntCounterVec,
    /// Agent HELLOs, by result: accepted, bad_credential, rate_limited,
    /// fenced, store_error, unsupported_version.
    pub agent_hellos: IntCounterVec,
    /// Queries the store issued, read from the store at each scrape.
    pub store_queries: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric =
        IntCounter::new(name, help).unwrap_or_else(|error| unreachable_metric(name, error));
    register(registry, name, metric)
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), &[label])
        .unwrap_or_else(|error| unreachable_metric(name, error));
    register(registry, name, metric)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).unwrap_or_else(|error| unreachable_metric(name, error));
    register(registry, name, metric)
}

fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    name: &str,
    metric: M,
) -> M {
    if let Err(error) = registry.register(Box::new(metric.clone())) {
        unreachable_metric(name, error);
    }
    metric
}

// Names and labels are constants of this file and the registry is fresh:
// failing here is a programming error caught by every test run.
#[allow(clippy::panic)]
fn unreachable_metric(name: &str, error: prometheus::Error) -> ! {
    panic!("metric {name} cannot be created: {error}")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        Metrics {
            connections: counter(
                &registry,
                "relay_edge_connections_total",
                "TCP connections accepted",
            ),
            connections_open: gauge(
                &registry,
                "relay_edge_connections_open",
                "TCP connections open",
            ),
            mqtt_connections: counter(
                &registry,
                "relay_edge_mqtt_connections_total",
                "Sessions over MQTT straight over TLS or TCP (mqtts, port 8883), not WebSocket",
            ),
            tls_handshake_failures: counter(
                &registry,
                "relay_edge_tls_handshake_failures_total",
                "TLS handshakes that failed or timed out",
            ),
            upgrades: counter_vec(
                &registry,
                "relay_edge_upgrades_total",
                "HTTP requests by upgrade result",
                "result",
            ),
            auth_failures: counter_vec(
                &registry,
                "relay_edge_auth_failures_total",
                "failed authentications by reason",
                "reason",
            ),
            pairing: counter_vec(
                &registry,
                "relay_edge_pairing_total",
                "agent pairing requests, polls and code entries, by result",
                "result",
            ),
            app_grants: counter_vec(
                &registry,
                "relay_edge_app_grants_total",
                "apps' authorization codes exchanged for keys, by result",
                "result",
            ),
            sessions_open: gauge(&registry, "relay_edge_sessions_open", "MQTT sessions open"),
            bytes: counter_vec(
                &registry,
                "relay_edge_bytes_total",
                "WebSocket payload bytes",
                "direction",
            ),
            messages: counter_vec(
                &registry,
                "relay_edge_messages_total",
                "MQTT packets",
                "direction",
            ),
            client_writes: counter_vec(
                &registry,
                "relay_edge_client_writes_total",
                "writes of MQTT bytes to clients: direct (by the task that had them) or queued (by the session's writer)",
                "path",
            ),
            close_codes: counter_vec(
                &registry,
                "relay_edge_close_codes_total",
                "WebSocket close codes sent",
                "code",
            ),
            connacks: counter_vec(
                &registry,
                "relay_edge_connacks_total",
                "CONNACK return codes sent",
                "code",
            ),
            printer_bytes: counter_vec(
                &registry,
                "relay_edge_printer_bytes_total",
                "MQTT bytes between device hubs and printers",
                "direction",
            ),
            agents_connected: gauge(
                &registry,
                "relay_edge_agents_connected",
                "devices whose agent is connected",
            ),
            hub_refusals: counter_vec(
                &registry,
                "relay_edge_hub_refusals_total",
                "what device hubs refused or cut, by what",
                "what",
            ),
            hub_upstream_resumes: counter(
                &registry,
                "relay_edge_hub_upstream_resumes_total",
                "device hubs that found a new upstream within the grace, keeping their sessions",
            ),
            hub_quarantined_filters: counter(
                &registry,
                "relay_edge_hub_quarantined_filters_total",
                "filters device hubs quarantined: subscribing to them made the printer drop its connection twice",
            ),
            printer_link_downs: counter_vec(
                &registry,
                "relay_edge_printer_link_downs_total",
                "printer connections the agents reported down, by reason",
                "reason",
            ),
            printer_silences: counter_vec(
                &registry,
                "relay_edge_printer_silences_total",
                "printers found silent (connected, answering nothing) and reconnected, by watchdog",
                "watchdog",
            ),
            leases: counter_vec(
                &registry,
                "relay_edge_instance_leases_total",
                "this instance's lease renewals by result (renewed, failed, lost)",
                "result",
            ),
            tunnels_fenced: counter(
                &registry,
                "relay_edge_tunnels_fenced_total",
                "local tunnels sent away: their device claimed elsewhere, or the lease lost",
            ),
            peer_bytes: counter_vec(
                &registry,
                "relay_edge_peer_bytes_total",
                "bytes over peer links between edge instances, by direction",
                "direction",
            ),
            peer_links_served: gauge(
                &registry,
                "relay_edge_peer_links_served",
                "other instances' hubs served by this one through peer links",
            ),
            peer_refusals: counter_vec(
                &registry,
                "relay_edge_peer_refusals_total",
                "peer connections and links refused, by reason",
                "reason",
            ),
            owner_lookups: counter_vec(
                &registry,
                "relay_edge_owner_lookups_total",
                "where the instance holding a device was found: local, cache, store",
                "source",
            ),
            agent_hellos: {
                let name = "relay_edge_agent_hellos_total";
                let metric = IntCounterVec::new(
                    Opts::new(
                        name,
                        "agent HELLOs by result (accepted, bad_credential, rate_limited, fenced, store_error, unsupported_version) and transport (quic, tcp)",
                    ),
                    &["result", "transport"],
                )
                .unwrap_or_else(|error| unreachable_metric(name, error));
                register(&registry, name, metric)
            },
            agents_by_transport: {
                let name = "relay_edge_agents_by_transport";
                let metric = prometheus::IntGaugeVec::new(
                    Opts::new(name, "agents connected, by tunnel transport: quic, tcp"),
                    &["transport"],
                )
                .unwrap_or_else(|error| unreachable_metric(name, error));
                register(&registry, name, metric)
            },
            store_queries: counter(
                &registry,
                "relay_edge_store_queries_total",
                "queries and transactions this instance issued to the store (a transaction counts once)",
            ),
            registry,
        }
    }

    /// The name of every metric this edge exports (series of a labelled
    /// metric appear in `/metrics` only once they have a value; the names
    /// are known from the start), for checking dashboards and alerts.
    pub fn names(&self) -> Vec<String> {
        use prometheus::core::Collector;
        let collectors: [&dyn Collector; 30] = [
            &self.connections,
            &self.connections_open,
            &self.mqtt_connections,
            &self.tls_handshake_failures,
            &self.upgrades,
            &self.auth_failures,
            &self.pairing,
            &self.app_grants,
            &self.sessions_open,
            &self.bytes,
            &self.messages,
            &self.client_writes,
            &self.close_codes,
            &self.connacks,
            &self.printer_bytes,
            &self.agents_connected,
            &self.agents_by_transport,
            &self.hub_refusals,
            &self.hub_upstream_resumes,
            &self.hub_quarantined_filters,
            &self.printer_link_downs,
            &self.printer_silences,
            &self.leases,
            &self.tunnels_fenced,
            &self.peer_bytes,
            &self.peer_links_served,
            &self.peer_refusals,
            &self.owner_lookups,
            &self.agent_hellos,
            &self.store_queries,
        ];
        let mut names: Vec<String> = collectors
            .iter()
            .flat_map(|collector| collector.desc())
            .map(|desc| desc.fq_name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Brings `relay_edge_store_queries_total` up to the store's own count.
    pub fn observe_store_queries(&self, total: u64) {
        let counted = self.store_queries.get();
        if total > counted {
            self.store_queries.inc_by(total - counted);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%error, "cannot encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Decrements `gauge` when dropped.
pub(crate) fn decrement_on_drop(gauge: prometheus::IntGauge) -> impl Drop {
    struct Decrement(prometheus::IntGauge);
    impl Drop for Decrement {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    Decrement(gauge)
}

#[cfg(test)]
mod tests {
    /// `names` lists every metric this file registers.
    #[test]
    fn names_cover_every_registered_metric() {
        let source = include_str!("metrics.rs");
        let mut registered: Vec<String> = source
            .split('"')
            .filter(|part| {
                part.len() > "relay_edge_".len()
                    && part.starts_with("relay_edge_")
                    && part.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            })
            .map(str::to_owned)
            .collect();
        registered.sort();
        registered.dedup();
        assert_eq!(super::Metrics::new().names(), registered);
    }
}
