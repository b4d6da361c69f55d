//! One-screen summaries and the Markdown table of docs/benchmarks.md.

use std::fmt::Write;

use serde::Serialize;

use crate::scenarios::{IdleResult, PublishResult, StormResult, StreamResult};
use crate::stats::micros;

/// Everything one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub machine: Machine,
    pub latency: Option<LatencyReport>,
    pub fan_out: Option<Vec<StreamResult>>,
    pub publish: Option<Vec<PublishResult>>,
    pub storm: Option<StormResult>,
    /// Over wss, then over mqtts.
    pub idle: Option<Vec<IdleResult>>,
    pub abuse: Option<crate::abuse::AbuseReport>,
    pub cross: Option<crate::cross::CrossReport>,
    pub rolling: Option<crate::rolling::RollingReport>,
    pub tunnels: Option<crate::tunnels::TunnelsReport>,
    pub fleet: Option<crate::fleet::FleetReport>,
    /// Baselines that were not measured, and why.
    pub skipped: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

impl Machine {
    pub fn read() -> Machine {
        let memory_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("MemTotal:"))
                    .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0.0);
        Machine {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|text| text.trim().to_owned())
                .unwrap_or_default(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LatencyReport {
    pub rate: u32,
    pub size: usize,
    pub runs: Vec<StreamResult>,
    /// relay p50 minus direct p50, in µs.
    pub added_p50_us: Option<f64>,
}

fn p(result: &StreamResult, kind: &str) -> Option<crate::stats::Percentiles> {
    result.latency.get(kind).copied()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

fn find<'a>(
    runs: &'a [StreamResult],
    target: &str,
    subscribers: usize,
) -> Option<&'a StreamResult> {
    runs.iter()
        .find(|run| run.target == target && run.subscribers == subscribers)
}

fn bytes(value: Option<f64>) -> String {
    value.map_or("—".into(), |bytes| format!("{bytes:.0}"))
}

pub fn latency_summary(report: &LatencyReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "latency: printer → client, {} B at {}/s, {} subscriber(s)",
        report.size,
        report.rate,
        report.runs.first().map_or(0, |run| run.subscribers)
    );
    let _ = writeln!(
        out,
        "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>6} {:>10} {:>9}",
        "path", "p50", "p90", "p99", "max", "lost", "msg/s", "edge CPU"
    );
    for run in &report.runs {
        let latency = p(run, "delta").unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>6} {:>10.0} {:>9}",
            run.target,
            micros(latency.p50_us),
            micros(latency.p90_us),
            micros(latency.p99_us),
            micros(latency.max_us),
            run.lost,
            run.delivered_per_second,
            run.edge_cpu_us_per_message
                .map_or("".into(), |cpu| format!("{cpu:.0} µs/msg")),
        );
    }
    for run in &report.runs {
        if let Some(share) = run.direct_write_share {
            let _ = writeln!(
                out,
                "  {}: {:.0} % of the edge's client writes made by the hub's task",
                run.target,
                share * 100.0
            );
        }
    }
    let p50 = |target: &str| {
        report
            .runs
            .iter()
            .find(|run| run.target == target)
            .and_then(|run| p(run, "delta"))
            .map(|latency| latency.p50_us)
    };
    if let Some(added) = report.added_p50_us {
        let _ = writeln!(
            out,
            "  added p50 over direct: {} (target ≤ 60 µs: {})",
            micros(added),
            if added <= 60.0 { "met" } else { "MISSED" }
        );
    }
    let _ = writeln!(
        out,
        "  p50 ratios: relay/direct {}, relay/rathole {}, relay-ws/direct {}, relay-tcp/relay {}, relay-mqtts/relay {}",
        ratio(p50("relay"), p50("direct")),
        ratio(p50("relay"), p50("rathole")),
        ratio(p50("relay-ws"), p50("direct")),
        ratio(p50("relay-tcp"), p50("relay")),
        ratio(p50("relay-mqtts"), p50("relay")),
    );
    out
}

/// One fan-out run as table cells: path, subscribers, full-report p50 and
/// p99, delta p99, max, lost, uplink bytes per printer message and that as
/// a multiple of the message, edge CPU and load-generator CPU per message.
fn fan_out_cells(run: &StreamResult) -> [String; 11] {
    let full = p(run, "full").unwrap_or_default();
    let delta = p(run, "delta").unwrap_or_default();
    [
        run.target.clone(),
        run.subscribers.to_string(),
        micros(full.p50_us),
        micros(full.p99_us),
        micros(delta.p99_us),
        micros(full.max_us.max(delta.max_us)),
        run.lost.to_string(),
        bytes(run.uplink_bytes_per_message),
        run.uplink_bytes_per_message.map_or("—".into(), |uplink| {
            format!("{:.1}", uplink / run.printer_bytes_per_message)
        }),
        run.edge_cpu_us_per_message.map_or("".into(), micros),
        micros(run.load_generator_cpu_us_per_message),
    ]
}

pub fn fan_out_summary(runs: &[StreamResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "fan-out: 4.4 KB full report at 1 Hz + 110 B delta at 10 Hz"
    );
    let _ = writeln!(
        out,
        "  {:<8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>7} {:>12} {:>7}",
        "path", "subs", "full p50", "full p99", "delta p99", "max", "lost", "uplink B/msg", "× msg"
    );
    for run in runs {
        let [
            path,
            subs,
            full_p50,
            full_p99,
            delta_p99,
            max,
            lost,
            uplink,
            times,
            ..,
        ] = fan_out_cells(run);
        let _ = writeln!(
            out,
            "  {path:<8} {subs:>6} {full_p50:>9} {full_p99:>9} {delta_p99:>9} {max:>9} {lost:>7} {uplink:>12} {times:>7}",
        );
    }
    for run in runs {
        if let Some(share) = run.direct_write_share {
            let _ = writeln!(
                out,
                "  {} × {}: {:.0} % of the edge's client writes made by the hub's task (the rest by sessions' writers)",
                run.target,
                run.subscribers,
                share * 100.0
            );
        }
    }
    let mut sizes: Vec<usize> = runs.iter().map(|run| run.subscribers).collect();
    sizes.dedup();
    for subscribers in sizes {
        let full_p99 = |target| {
            find(runs, target, subscribers)
                .and_then(|run| p(run, "full"))
                .map(|latency| latency.p99_us)
        };
        let _ = writeln!(
            out,
            "  {subscribers:>5} subscribers, full-report p99 ratios: relay/direct {}, relay/rathole {}",
            ratio(full_p99("relay"), full_p99("direct")),
            ratio(full_p99("relay"), full_p99("rathole")),
        );
    }
    if let Some(run) = runs
        .iter()
        .filter(|run| run.target == "relay")
        .max_by_key(|run| run.subscribers)
        .filter(|run| run.subscribers >= 1_000)
    {
        let full = p(run, "full").unwrap_or_default();
        let met = full.p99_us <= 10_000.0 && run.lost == 0;
        let _ = writeln!(
            out,
            "  target 4.4 KB to {} subscribers, p99 ≤ 10 ms, nothing lost: {}",
            run.subscribers,
            if met { "met" } else { "MISSED" }
        );
    }
    out
}

pub fn publish_summary(runs: &[PublishResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "publish path: QoS 1 requests, PUBACK after the printer's"
    );
    for run in runs {
        let _ = writeln!(
            out,
            "  {:<8} {} clients: sent {}, PUBACKed {}, printer received {}, PUBACK p50 {} p99 {} max {}, failures {}",
            run.target,
            run.clients,
            run.sent,
            run.acknowledged,
            run.printer_received,
            micros(run.puback.p50_us),
            micros(run.puback.p99_us),
            micros(run.puback.max_us),
            run.failures
        );
    }
    out
}

pub fn storm_summary(storm: &StormResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "connect storm: {} clients, {} at a time (TCP + TLS + upgrade + key check + CONNECT + SUBSCRIBE)",
        storm.clients, storm.concurrency
    );
    let _ = writeln!(
        out,
        "  connected {} ({:.0}/s), failures {:?}; per client p50 {} p99 {}; sessions at the edge {}",
        storm.connected,
        storm.handshakes_per_second,
        storm.failures,
        micros(storm.handshake.p50_us),
        micros(storm.handshake.p99_us),
        storm
            .sessions_open_at_edge
            .map_or("?".into(), |open| format!("{open:.0}")),
    );
    let _ = writeln!(
        out,
        "  edge restart: drain {:.2} s, start {:.2} s, all {} back {} (target ≤ 15 s for 10,000: {})",
        storm.drain_seconds,
        storm.start_seconds,
        storm.connected,
        storm
            .all_back_seconds
            .map_or(format!("NOT ALL ({} back)", storm.back), |took| format!(
                "after {took:.2} s"
            )),
        match storm.all_back_seconds {
            Some(took) if took <= 15.0 => "met",
            _ => "MISSED",
        }
    );
    let _ = writeln!(
        out,
        "  refused while reconnecting: {:?}",
        storm.reconnect_refusals
    );
    out
}

pub fn idle_summary(idle: &IdleResult) -> String {
    let mib = |bytes: u64| bytes as f64 / 1024.0 / 1024.0;
    let per = idle.edge_rss_per_session_bytes / 1024.0;
    format!(
        "idle sessions over {}: {}\n  edge RSS {:.1} MiB → {:.1} MiB: {:.1} KiB per session (target ≤ 10 KiB with the sockets: {}); {:.1} MiB after they closed\n  edge socket buffers (ss -tmn): {:.2} KiB per session\n  agent RSS {:.1} MiB\n",
        idle.target,
        idle.sessions,
        mib(idle.edge_rss_before_bytes),
        mib(idle.edge_rss_with_sessions_bytes),
        per,
        if per + idle.edge_socket_bytes_per_session / 1024.0 <= 10.0 {
            "met"
        } else {
            "MISSED"
        },
        mib(idle.edge_rss_after_close_bytes),
        idle.edge_socket_bytes_per_session / 1024.0,
        mib(idle.agent_rss_bytes),
    )
}

pub fn abuse_summary(abuse: &crate::abuse::AbuseReport) -> String {
    let mib = |bytes: u64| bytes as f64 / 1024.0 / 1024.0;
    let mut out = String::from("abuse: attacks beside one legitimate app\n");
    for attack in &abuse.attacks {
        let _ = writeln!(
            out,
            "  {:<20} sent {}; answered {}; {} bytes to the printer",
            attack.attack, attack.sent, attack.answered, attack.printer_bytes
        );
    }
    let _ = writeln!(
        out,
        "  flood PUBLISHes that reached the printer: {}\n  legitimate app: {} of {} reports, connected throughout: {}\n  edge RSS {:.1} MiB → peak {:.1} MiB → {:.1} MiB",
        abuse.flood_reached_printer,
        abuse.legit_received,
        abuse.legit_sent,
        abuse.legit_stayed_connected,
        mib(abuse.edge_rss_before_bytes),
        mib(abuse.edge_rss_peak_bytes),
        mib(abuse.edge_rss_after_bytes),
    );
    out
}

/// The Markdown tables for docs/benchmarks.md.
pub fn markdown(results: &Results) -> String {
    let mut out = String::new();
    let m = &results.machine;
    let _ = writeln!(
        out,
        "Machine: {} cores, {} GiB, Linux {}.\n",
        m.cores, m.memory_gib, m.kernel
    );
    if let Some(latency) = &results.latency {
        let _ = writeln!(
            out,
            "**Latency**, printer → client, {} B at {}/s:\n\n| path | p50 | p90 | p99 | max | lost | edge CPU per msg |\n|---|---:|---:|---:|---:|---:|---:|",
            latency.size, latency.rate
        );
        for run in &latency.runs {
            let l = p(run, "delta").unwrap_or_default();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                run.target,
                micros(l.p50_us),
                micros(l.p90_us),
                micros(l.p99_us),
                micros(l.max_us),
                run.lost,
                run.edge_cpu_us_per_message
                    .map_or("".into(), |cpu| format!("{cpu:.0} µs")),
            );
        }
        if let Some(added) = latency.added_p50_us {
            let _ = writeln!(out, "\nAdded p50 over direct: **{}**.", micros(added));
        }
        out.push('\n');
    }
    if let Some(runs) = &results.fan_out {
        let _ = writeln!(
            out,
            "**Fan-out**, 4.4 KB full report at 1 Hz + 110 B delta at 10 Hz:\n\n| path | subscribers | full p50 | full p99 | delta p99 | max | lost | uplink bytes per printer message | edge CPU per msg | load generator CPU per msg |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for run in runs {
            let [
                path,
                subs,
                full_p50,
                full_p99,
                delta_p99,
                max,
                lost,
                uplink,
                times,
                edge,
                load,
            ] = fan_out_cells(run);
            let uplink = if times == "—" {
                uplink
            } else {
                format!("{uplink} ({times}×)")
            };
            let _ = writeln!(
                out,
                "| {path} | {subs} | {full_p50} | {full_p99} | {delta_p99} | {max} | {lost} | {uplink} | {edge} | {load} |",
            );
        }
        out.push('\n');
    }
    if let Some(runs) = &results.publish {
        let _ = writeln!(
            out,
            "**Publish path**, QoS 1:\n\n| path | clients | sent | PUBACKed | printer received | PUBACK p50 | p99 | max |\n|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for run in runs {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                run.target,
                run.clients,
                run.sent,
                run.acknowledged,
                run.printer_received,
                micros(run.puback.p50_us),
                micros(run.puback.p99_us),
                micros(run.puback.max_us)
            );
        }
        out.push('\n');
    }
    if let Some(storm) = &results.storm {
        let _ = writeln!(
            out,
            "**Connect storm** through the relay: {} clients, {} at a time: {:.0} connects/s (TCP + TLS + upgrade + key check + CONNECT + SUBSCRIBE), failures {:?}, per-client p50 {} / p99 {}. Edge restart (SIGTERM, drain, start): drain {:.2} s, start {:.2} s, all back after **{}**.\n",
            storm.clients,
            storm.concurrency,
            storm.handshakes_per_second,
            storm.failures,
            micros(storm.handshake.p50_us),
            micros(storm.handshake.p99_us),
            storm.drain_seconds,
            storm.start_seconds,
            storm.all_back_seconds.map_or(
                format!("— ({} of {} back)", storm.back, storm.connected),
                |took| format!("{took:.2} s")
            ),
        );
    }
    if let Some(runs) = &results.idle {
        let _ = writeln!(
            out,
            "**Idle sessions**, each run on a fresh edge:\n\n| path | sessions | edge RSS before | with them | per session | socket buffers per session | agent RSS |\n|---|---:|---:|---:|---:|---:|---:|"
        );
        for idle in runs {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} MiB | {:.1} MiB | **{:.1} KiB** | {:.2} KiB | {:.1} MiB |",
                idle.target,
                idle.sessions,
                idle.edge_rss_before_bytes as f64 / 1048576.0,
                idle.edge_rss_with_sessions_bytes as f64 / 1048576.0,
                idle.edge_rss_per_session_bytes / 1024.0,
                idle.edge_socket_bytes_per_session / 1024.0,
                idle.agent_rss_bytes as f64 / 1048576.0,
            );
        }
        out.push('\n');
    }
    if let Some(fleet) = &results.fleet {
        let _ = writeln!(
            out,
            "**Fleet**: {} printers, each its own simulated agent and one wss app, a {} B report a second, {:.0} s measured:\n\n| sent | lost | p50 | p99 | max | edge CPU (share of one core) | per report | edge RSS | per printer | printers per core | per GiB |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n| {} | {} | {} | {} | {} | **{:.1} %** | {:.1} µs | **{:.0} MiB** | {:.1} KiB | {:.0} | {:.0} |\n",
            fleet.printers,
            fleet.report_bytes,
            fleet.window_seconds,
            fleet.sent,
            fleet.lost,
            micros(fleet.latency.p50_us),
            micros(fleet.latency.p99_us),
            micros(fleet.latency.max_us),
            fleet.edge_cpu_share_of_core * 100.0,
            fleet.edge_cpu_per_report_us,
            fleet.edge_rss_bytes as f64 / 1048576.0,
            fleet.edge_rss_per_printer_bytes / 1024.0,
            fleet.printers_per_core,
            fleet.printers_per_gib,
        );
    }
    if let Some(rolling) = &results.rolling {
        rolling_markdown(&mut out, rolling);
    }
    if let Some(cross) = &results.cross {
        cross_markdown(&mut out, cross);
    }
    if let Some(abuse) = &results.abuse {
        let _ = writeln!(
            out,
            "**Abuse**, attacks beside one legitimate app (printer: Mosquitto as a generic broker, allowed its own device's topics only):\n\n| attack | sent | the edge answered | bytes to the printer |\n|---|---|---|---:|"
        );
        for attack in &abuse.attacks {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} |",
                attack.attack, attack.sent, attack.answered, attack.printer_bytes
            );
        }
        let _ = writeln!(
            out,
            "\nFlood PUBLISHes that reached the printer: {}. The legitimate app got {} of {} reports and stayed connected: {}. Edge RSS {:.1} MiB → peak {:.1} MiB → {:.1} MiB after.\n",
            abuse.flood_reached_printer,
            abuse.legit_received,
            abuse.legit_sent,
            abuse.legit_stayed_connected,
            abuse.edge_rss_before_bytes as f64 / 1048576.0,
            abuse.edge_rss_peak_bytes as f64 / 1048576.0,
            abuse.edge_rss_after_bytes as f64 / 1048576.0,
        );
    }
    for skipped in &results.skipped {
        let _ = writeln!(out, "Not measured: {skipped}.");
    }
    out
}

pub fn fleet_summary(report: &crate::fleet::FleetReport) -> String {
    let mut out = String::new();
    let mib = |bytes: u64| bytes as f64 / 1024.0 / 1024.0;
    let _ = writeln!(
        out,
        "fleet: {} printers, each its own agent and one app, a {} B report a second; {:.0} s measured",
        report.printers, report.report_bytes, report.window_seconds
    );
    let _ = writeln!(
        out,
        "  agents up in {:.1} s, apps subscribed in {:.1} s",
        report.agents_seconds, report.apps_seconds
    );
    let _ = writeln!(
        out,
        "  reports: {} sent, {} received, {} lost; latency p50 {} p90 {} p99 {} max {}",
        report.sent,
        report.received,
        report.lost,
        micros(report.latency.p50_us),
        micros(report.latency.p90_us),
        micros(report.latency.p99_us),
        micros(report.latency.max_us)
    );
    let _ = writeln!(
        out,
        "  edge CPU: {:.1} % of one core ({:.1} µs per report); load generator {:.1} % of one core",
        report.edge_cpu_share_of_core * 100.0,
        report.edge_cpu_per_report_us,
        report.generator_cpu_share_of_core * 100.0
    );
    let _ = writeln!(
        out,
        "  edge memory: {:.1} MiB before, {:.1} MiB with the fleet: {:.1} KiB per printer",
        mib(report.edge_rss_before_bytes),
        mib(report.edge_rss_bytes),
        report.edge_rss_per_printer_bytes / 1024.0
    );
    let _ = writeln!(
        out,
        "  at this load: {:.0} printers per core, {:.0} per GiB",
        report.printers_per_core, report.printers_per_gib
    );
    if report.printers >= 5_000 {
        let met = report.edge_cpu_share_of_core <= 0.15
            && report.edge_rss_bytes <= 300 << 20
            && report.latency.p99_us <= 5_000.0
            && report.lost == 0;
        let _ = writeln!(
            out,
            "  target ≤ 15 % of one core, ≤ 300 MiB, p99 ≤ 5 ms, nothing lost: {}",
            if met { "met" } else { "MISSED" }
        );
    }
    out
}

pub fn tunnels_summary(report: &crate::tunnels::TunnelsReport) -> String {
    let mut out = String::new();
    let mib = |bytes: u64| bytes as f64 / 1024.0 / 1024.0;
    let _ = writeln!(
        out,
        "tunnels: {} idle agents on one edge, over {}",
        report.tunnels,
        match report.transport {
            crate::tunnels::FleetTransport::Quic => "QUIC",
            crate::tunnels::FleetTransport::Tcp => "TLS on TCP (yamux)",
        }
    );
    let _ = writeln!(
        out,
        "  connected in {:.1} s: {:.0} HELLOs/s, {:.2} store queries per HELLO",
        report.connect_seconds, report.hellos_per_second, report.store_queries_per_hello
    );
    let _ = writeln!(
        out,
        "  edge memory: {:.1} MiB before, {:.1} MiB connected, {:.1} MiB after {:.0} s idle: {:.1} KiB per tunnel",
        mib(report.edge_rss_before_bytes),
        mib(report.edge_rss_connected_bytes),
        mib(report.edge_rss_idle_bytes),
        report.idle_window_seconds,
        report.edge_rss_per_tunnel_bytes / 1024.0
    );
    let _ = writeln!(
        out,
        "  edge CPU: {:.0} ms/min without them, {:.0} ms/min with them: {:.3} ms per tunnel per minute ({} dropped while idle)",
        report.edge_cpu_baseline_ms_per_minute,
        report.edge_cpu_idle_ms_per_minute,
        report.edge_cpu_per_tunnel_ms_per_minute,
        report.dropped_while_idle
    );
    for (label, run) in [
        ("alone", &report.latency_alone),
        ("beside them", &report.latency_beside),
    ] {
        let latency = p(run, "delta").unwrap_or_default();
        let _ = writeln!(
            out,
            "  a client {label}: p50 {}, p99 {}, lost {}",
            micros(latency.p50_us),
            micros(latency.p99_us),
            run.lost
        );
    }
    let r = &report.restart;
    let seconds = |value: Option<f64>| value.map_or("—".to_owned(), |s| format!("{s:.1} s"));
    let _ = writeln!(
        out,
        "  edge restart: {} of {} back ({} read the GO_AWAY), all after {} ({} after ready); {:.0} store queries ({:.2} per agent), {:.0} HELLOs accepted, {:.0} refused",
        r.back,
        report.tunnels,
        r.go_aways_received,
        seconds(r.all_back_seconds),
        seconds(r.after_ready_seconds),
        r.store_queries,
        r.store_queries_per_agent,
        r.hellos_accepted,
        r.hellos_refused
    );
    out
}

pub fn cross_summary(report: &crate::cross::CrossReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cross-instance: the client on one instance, the agent on another"
    );
    for run in &report.latency {
        let latency = p(run, "delta").unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<12} p50 {:>9}  p99 {:>9}  lost {}",
            run.target,
            micros(latency.p50_us),
            micros(latency.p99_us),
            run.lost
        );
    }
    if let (Some(p50), Some(p99)) = (report.added_p50_us, report.added_p99_us) {
        let _ = writeln!(
            out,
            "  added by the peer link: p50 {}, p99 {}",
            micros(p50),
            micros(p99)
        );
    }
    for run in &report.fan_out {
        let _ = writeln!(
            out,
            "  {} clients on the other instance: {:.1} peer-link bytes per printer message ({:.1} printer bytes), lost {}",
            run.subscribers,
            run.peer_bytes_per_message.unwrap_or(0.0),
            run.printer_bytes_per_message,
            run.lost
        );
    }
    let f = &report.failover;
    let _ = writeln!(
        out,
        "  SIGKILL of the owner, {} clients on the survivors (agent keep-alive {} s): {} received again, p50 {:.2} s, max {:.2} s, {} disconnected",
        f.clients,
        f.agent_keep_alive_seconds,
        f.resumed,
        f.resume_us.p50_us / 1e6,
        f.resume_us.max_us / 1e6,
        f.disconnected
    );
    out
}

fn cross_markdown(out: &mut String, report: &crate::cross::CrossReport) {
    let _ = writeln!(
        out,
        "**Cross-instance**, the client on one edge instance and the agent on another (peer link over QUIC on loopback):\n\n| path | p50 | p99 | lost |\n|---|---:|---:|---:|"
    );
    for run in &report.latency {
        let latency = p(run, "delta").unwrap_or_default();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            run.target,
            micros(latency.p50_us),
            micros(latency.p99_us),
            run.lost
        );
    }
    if let (Some(p50), Some(p99)) = (report.added_p50_us, report.added_p99_us) {
        let _ = writeln!(
            out,
            "\nAdded by the peer link: p50 **{}**, p99 {}.\n",
            micros(p50),
            micros(p99)
        );
    }
    let _ = writeln!(
        out,
        "| clients on the other instance | peer-link bytes per printer message | printer bytes per message | full p99 | lost |\n|---:|---:|---:|---:|---:|"
    );
    for run in &report.fan_out {
        let full = p(run, "full").unwrap_or_default();
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {} | {} |",
            run.subscribers,
            run.peer_bytes_per_message.unwrap_or(0.0),
            run.printer_bytes_per_message,
            micros(full.p99_us),
            run.lost
        );
    }
    let f = &report.failover;
    let _ = writeln!(
        out,
        "\nSIGKILL of the instance holding the agent, {} clients on the two survivors, agent keep-alive {} s: {} received again, p50 {:.2} s, p99 {:.2} s, max **{:.2} s**; {} disconnected.\n",
        f.clients,
        f.agent_keep_alive_seconds,
        f.resumed,
        f.resume_us.p50_us / 1e6,
        f.resume_us.p99_us / 1e6,
        f.resume_us.max_us / 1e6,
        f.disconnected
    );
}

pub fn rolling_summary(report: &crate::rolling::RollingReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rolling update: {} instances drained and restarted in turn, {} clients, {} agents, QoS 1 both ways",
        report.instances, report.clients, report.devices
    );
    for step in &report.steps {
        let _ = writeln!(
            out,
            "  {:<11} at {:.1} s drained in {:.2} s, ready again in {:.2} s: {} clients told 1001, {} agents moved ({} more than once), {} reports lost in session",
            step.instance,
            step.at_s,
            step.drain_ms / 1e3,
            step.start_ms / 1e3,
            step.clients_told_1001,
            step.agents_moved,
            step.agents_more_than_once,
            step.lost_in_session
        );
    }
    for gap in &report.longest_gaps {
        let _ = writeln!(
            out,
            "  gap of {:.2} s for client {} ending at {:.1} s{}",
            gap.gap_ms / 1e3,
            gap.client,
            gap.ended_at_s,
            if gap.across_reconnect {
                " (across a reconnect)"
            } else {
                ""
            }
        );
    }
    let a = &report.app_to_printer;
    let p = &report.printer_to_app;
    let _ = writeln!(
        out,
        "  longest gap {:.2} s (per-client p50 {:.2} s, p99 {:.2} s); other closes {}\n  app → printer: {} sent, {} acknowledged, {} lost, {} never acknowledged, {} duplicates\n  printer → app: {} published, {} delivered, {} lost in session, {} missed while reconnecting\n  agents reconnecting more than once in a step: {}",
        report.longest_gap_ms / 1e3,
        report.gaps_us.p50_us / 1e6,
        report.gaps_us.p99_us / 1e6,
        report.other_closes,
        a.sent,
        a.acknowledged,
        a.lost,
        a.unacknowledged,
        a.duplicates,
        p.published,
        p.deliveries,
        p.lost_in_session,
        p.missed_while_reconnecting,
        report.agents_reconnected_more_than_once
    );
    out
}

fn rolling_markdown(out: &mut String, report: &crate::rolling::RollingReport) {
    let _ = writeln!(
        out,
        "**Rolling update**, {} instances drained (SIGTERM) and started again in turn under {} clients and {} agents (one process each), the printer publishing {} QoS 1 reports a second to every device and each client a QoS 1 request every {} ms:\n\n| instance | drain | ready again | clients told 1001 | agents moved | more than once |\n|---|---:|---:|---:|---:|---:|",
        report.instances,
        report.clients,
        report.devices,
        report.printer_per_second,
        report.app_publish_interval_ms
    );
    for step in &report.steps {
        let _ = writeln!(
            out,
            "| {} | {:.2} s | {:.2} s | {} | {} | {} |",
            step.instance,
            step.drain_ms / 1e3,
            step.start_ms / 1e3,
            step.clients_told_1001,
            step.agents_moved,
            step.agents_more_than_once
        );
    }
    let a = &report.app_to_printer;
    let p = &report.printer_to_app;
    let _ = writeln!(
        out,
        "\nLongest gap any client saw: **{:.2} s** (each client's longest: p50 {:.2} s, p99 {:.2} s). App → printer: {} sent, {} acknowledged, **{} lost**, {} never acknowledged, {} received twice. Printer → app: {} published, **{} lost in a session**, {} missed while a client reconnected. Other closes: {}.\n",
        report.longest_gap_ms / 1e3,
        report.gaps_us.p50_us / 1e6,
        report.gaps_us.p99_us / 1e6,
        a.sent,
        a.acknowledged,
        a.lost,
        a.unacknowledged,
        a.duplicates,
        p.published,
        p.lost_in_session,
        p.missed_while_reconnecting,
        report.other_closes
    );
}
