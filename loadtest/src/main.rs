//! `relay-loadtest`: measures the relay side by side with a direct Mosquitto
//! WebSocket listener and a rathole tunnel to it, in one run on this machine
//! (loopback only). Scenarios: tunnels (thousands of idle agents on one
//! edge, and their return after a restart; first, on a fresh edge),
//! latency, fan-out, publish path, connect storm
//! with an edge restart, idle sessions, abuse (attacks beside a
//! legitimate app), a rolling update of three instances under QoS 1 load,
//! and cross-instance (clients on one edge instance, the
//! agent on another; last, since it kills an instance). Writes one JSON file per scenario,
//! `results.json` and `table.md` to `--out`, and prints a summary of each.
//!
//! `loadtest/run` builds everything in release mode and runs the full set;
//! `--quick` is the small run the test suite uses.

mod abuse;
mod client;
mod cross;
mod fleet;
mod report;
mod rig;
mod rolling;
mod scenarios;
mod stats;
mod tunnels;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};

use crate::report::{LatencyReport, Machine, Results};
use crate::rig::{Binaries, Rig};
use crate::stats::{Percentiles, Progress};

/// Most clients one scenario may hold (each is a socket here and one at the
/// edge; file-descriptor limits are usually 20,000 or more).
const MAX_CLIENTS: usize = 15_000;
const MAX_SECONDS: u32 = 300;
/// Simulated agents are QUIC connections on a few UDP sockets, not file
/// descriptors each.
const MAX_TUNNELS: usize = 50_000;
const MAX_RATE: u32 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Tunnels,
    Latency,
    FanOut,
    Publish,
    Storm,
    Idle,
    Abuse,
    Rolling,
    Fleet,
    Cross,
}

#[derive(Parser, Debug)]
#[command(
    name = "relay-loadtest",
    version,
    about = "Load-tests relay beside a direct broker and a plain tunnel, on loopback"
)]
struct Flags {
    /// Scenarios to run (default: all)
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Small counts and short runs (what the test suite runs)
    #[arg(long)]
    quick: bool,
    /// Where results go
    #[arg(long, default_value = "target/loadtest")]
    out: PathBuf,
    /// relay-edge binary (default: next to this one)
    #[arg(long)]
    edge_bin: Option<PathBuf>,
    /// relay-agent binary (default: next to this one)
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    #[arg(long, default_value = "mosquitto")]
    mosquitto_bin: PathBuf,
    /// rathole binary (default: target/baselines/bin/rathole, from
    /// loadtest/install-baselines)
    #[arg(long)]
    rathole_bin: Option<PathBuf>,
    /// Paths to measure in the latency and fan-out scenarios (default:
    /// all; e.g. `relay` alone while profiling the edge)
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Latency: messages per second
    #[arg(long, default_value_t = 1_000)]
    latency_rate: u32,
    /// Latency: payload bytes
    #[arg(long, default_value_t = 110)]
    latency_size: usize,
    #[arg(long, default_value_t = 10)]
    latency_seconds: u32,
    #[arg(long, default_value_t = 1)]
    latency_subscribers: usize,
    /// Fan-out: subscriber counts
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    fan_out: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    fan_out_seconds: u32,
    #[arg(long, default_value_t = 10)]
    publish_clients: usize,
    /// Publish path: requests per second per client
    #[arg(long, default_value_t = 10)]
    publish_rate: u32,
    #[arg(long, default_value_t = 10)]
    publish_seconds: u32,
    #[arg(long, default_value_t = 10_000)]
    storm_clients: usize,
    /// Connects in flight at once
    #[arg(long, default_value_t = 256)]
    storm_concurrency: usize,
    #[arg(long, default_value_t = 10_000)]
    idle_sessions: usize,
    /// Abuse: sessions one key opens from one address (the default cap is
    /// 1,000)
    #[arg(long, default_value_t = 1_200)]
    abuse_sessions: usize,
    /// Abuse: QoS 0 PUBLISHes of the flood
    #[arg(long, default_value_t = 20_000)]
    abuse_flood: u32,
    /// Tunnels: simulated idle agents on one edge
    #[arg(long, default_value_t = 20_000)]
    tunnels: usize,
    /// Tunnels: the simulated agents' transport (tcp: TLS on TCP, yamux)
    #[arg(long, value_enum, default_value = "quic")]
    tunnels_transport: tunnels::FleetTransport,
    /// Tunnels: how long the idle edge is watched, with the tunnels
    #[arg(long, default_value_t = 60)]
    tunnels_idle_seconds: u32,
    /// Fleet: devices, each with its own simulated agent and printer and
    /// one app
    #[arg(long, default_value_t = 5_000)]
    fleet_printers: usize,
    /// Fleet: bytes of each printer's report (one a second)
    #[arg(long, default_value_t = 1_024)]
    fleet_report_bytes: usize,
    /// Fleet: how long the load is measured
    #[arg(long, default_value_t = 30)]
    fleet_seconds: u32,
    /// The edges' `[runtime] worker_threads` (default: the edge's own)
    #[arg(long)]
    edge_worker_threads: Option<usize>,
    /// Cross-instance: client counts on the other instance
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    cross_clients: Vec<usize>,
    /// Cross-instance: clients on the survivors when the owner is killed
    #[arg(long, default_value_t = 1_000)]
    failover_clients: usize,
    /// Rolling update: devices, each with its own agent process
    #[arg(long, default_value_t = 200)]
    rolling_devices: usize,
    /// Rolling update: clients, spread over the devices and instances
    #[arg(long, default_value_t = 1_000)]
    rolling_clients: usize,
}

impl Flags {
    fn apply_quick(&mut self) {
        if self.quick {
            self.latency_seconds = 1;
            self.fan_out = vec![1, 10];
            self.fan_out_seconds = 2;
            self.publish_clients = 2;
            self.publish_seconds = 1;
            self.storm_clients = 100;
            self.storm_concurrency = 32;
            self.idle_sessions = 100;
            self.abuse_sessions = 20;
            self.abuse_flood = 500;
            self.cross_clients = vec![1, 10];
            self.failover_clients = 20;
            self.rolling_devices = 5;
            self.rolling_clients = 50;
            self.tunnels = 50;
            self.tunnels_idle_seconds = 2;
            self.fleet_printers = 20;
            self.fleet_seconds = 2;
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        for (name, clients) in [
            ("--latency-subscribers", self.latency_subscribers),
            ("--publish-clients", self.publish_clients),
            ("--storm-clients", self.storm_clients),
            ("--idle-sessions", self.idle_sessions),
            ("--abuse-sessions", self.abuse_sessions),
            ("--failover-clients", self.failover_clients),
            ("--rolling-clients", self.rolling_clients),
        ]
        .into_iter()
        .chain(self.fan_out.iter().map(|count| ("--fan-out", *count)))
        .chain(
            self.cross_clients
                .iter()
                .map(|count| ("--cross-clients", *count)),
        ) {
            if clients == 0 || clients > MAX_CLIENTS {
                problems.push(format!("{name} must be 1..={MAX_CLIENTS}, not {clients}"));
            }
        }
        for (name, seconds) in [
            ("--latency-seconds", self.latency_seconds),
            ("--fan-out-seconds", self.fan_out_seconds),
            ("--publish-seconds", self.publish_seconds),
        ] {
            if seconds == 0 || seconds > MAX_SECONDS {
                problems.push(format!("{name} must be 1..={MAX_SECONDS}, not {seconds}"));
            }
        }
        for (name, rate) in [
            ("--latency-rate", self.latency_rate),
            ("--publish-rate", self.publish_rate),
        ] {
            if rate == 0 || rate > MAX_RATE {
                problems.push(format!("{name} must be 1..={MAX_RATE}, not {rate}"));
            }
        }
        if !(17..=60_000).contains(&self.latency_size) {
            problems.push(format!(
                "--latency-size must be 17..=60000, not {}",
                self.latency_size
            ));
        }
        if self.tunnels == 0 || self.tunnels > MAX_TUNNELS {
            problems.push(format!("--tunnels must be 1..={MAX_TUNNELS}"));
        }
        if self.tunnels_idle_seconds == 0 || self.tunnels_idle_seconds > MAX_SECONDS {
            problems.push(format!("--tunnels-idle-seconds must be 1..={MAX_SECONDS}"));
        }
        if self.abuse_flood == 0 || self.abuse_flood > 1_000_000 {
            problems.push("--abuse-flood must be 1..=1000000".into());
        }
        if self.rolling_devices == 0
            || self.rolling_devices > 1_000
            || self.rolling_devices > self.rolling_clients
        {
            problems
                .push("--rolling-devices must be 1..=1000 and at most --rolling-clients".into());
        }
        if self.storm_concurrency == 0 {
            problems.push("--storm-concurrency must be at least 1".into());
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("\n"));
        }
        Ok(())
    }

    fn measures(&self, target: &client::Target) -> bool {
        self.paths.is_empty() || self.paths.iter().any(|path| path == target.name)
    }

    fn runs(&self, scenario: Scenario) -> bool {
        self.only.is_empty() || self.only.contains(&scenario)
    }

    fn binaries(&self) -> anyhow::Result<(Binaries, Option<String>)> {
        let here = std::env::current_exe()?;
        let dir = here.parent().context("no directory for this binary")?;
        let beside = |name: &str| dir.join(name);
        let edge = self
            .edge_bin
            .clone()
            .unwrap_or_else(|| beside("relay-edge"));
        let agent = self
            .agent_bin
            .clone()
            .unwrap_or_else(|| beside("relay-agent"));
        for binary in [&edge, &agent] {
            if !binary.is_file() {
                bail!(
                    "{} is missing: build it first (cargo build --release -p relay-edge -p relay-agent, or run loadtest/run)",
                    binary.display()
                );
            }
        }
        let rathole = self
            .rathole_bin
            .clone()
            .unwrap_or_else(|| dir.join("../baselines/bin/rathole"));
        let (rathole, skipped) = if rathole.is_file() {
            (Some(rathole), None)
        } else {
            (
                None,
                Some(format!(
                    "rathole baseline ({} missing; loadtest/install-baselines installs it)",
                    rathole.display()
                )),
            )
        };
        let mosquitto = which(&self.mosquitto_bin)
            .context("mosquitto is not installed (loadtest/install-baselines installs it)")?;
        Ok((
            Binaries {
                edge,
                agent,
                mosquitto,
                rathole,
                edge_worker_threads: self.edge_worker_threads,
            },
            skipped,
        ))
    }
}

/// A program's path: as given when it has a slash, else from PATH (and
/// /usr/sbin, where Debian puts mosquitto).
fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_owned());
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn write_json(dir: &Path, name: &str, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

async fn run(mut flags: Flags) -> anyhow::Result<Results> {
    flags.apply_quick();
    flags.check()?;
    let (binaries, skipped) = flags.binaries()?;
    std::fs::create_dir_all(&flags.out)?;
    let out = flags.out.canonicalize()?;
    let progress = Progress::start();
    let mut results = Results {
        machine: Machine::read(),
        skipped: skipped.into_iter().collect(),
        ..Results::default()
    };
    println!(
        "relay-loadtest: {} cores, {} GiB; processes and logs in {}",
        results.machine.cores,
        results.machine.memory_gib,
        out.join("run").display()
    );
    let mut rig = Rig::start(&binaries, &out.join("run")).await?;
    let outcome = scenarios(&flags, &mut rig, &mut results, &out, &progress).await;
    rig.stop().await;
    outcome?;
    write_json(&out, "results", &results)?;
    let table = report::markdown(&results);
    std::fs::write(out.join("table.md"), &table)?;
    println!(
        "results: {}/results.json, table: {}/table.md",
        out.display(),
        out.display()
    );
    Ok(results)
}

async fn scenarios(
    flags: &Flags,
    rig: &mut Rig,
    results: &mut Results,
    out: &Path,
    progress: &Progress,
) -> anyhow::Result<()> {
    if flags.runs(Scenario::Tunnels) {
        let idle = Duration::from_secs(u64::from(flags.tunnels_idle_seconds));
        let size = tunnels::TunnelsSize {
            tunnels: flags.tunnels,
            transport: flags.tunnels_transport,
            idle_window: idle,
            baseline_window: (idle / 2).max(Duration::from_secs(1)),
            patience: Duration::from_secs(180),
        };
        let plan = scenarios::steady(
            flags.latency_rate,
            flags.latency_size,
            flags.latency_seconds,
        );
        let report = tunnels::tunnels(rig, size, &plan, progress).await?;
        println!("{}", report::tunnels_summary(&report));
        write_json(out, "tunnels", &report)?;
        results.tunnels = Some(report);
    }
    if flags.runs(Scenario::Latency) {
        let plan = scenarios::steady(
            flags.latency_rate,
            flags.latency_size,
            flags.latency_seconds,
        );
        let mut runs = Vec::new();
        for target in [
            Some(rig.direct.clone()),
            Some(rig.relay.clone()),
            Some(rig.relay_mqtts.clone()),
            Some(rig.relay_tcp.clone()),
            Some(rig.relay_ws.clone()),
            rig.rathole.clone(),
        ]
        .into_iter()
        .flatten()
        .filter(|target| flags.measures(target))
        {
            runs.push(
                scenarios::stream(rig, &target, flags.latency_subscribers, &plan, progress).await?,
            );
        }
        let p50 = |target: &str| {
            runs.iter()
                .find(|run| run.target == target)
                .and_then(|run| run.latency.get("delta"))
                .map(|latency: &Percentiles| latency.p50_us)
        };
        let added_p50_us = p50("relay")
            .zip(p50("direct"))
            .map(|(relay, direct)| relay - direct);
        let report = LatencyReport {
            rate: flags.latency_rate,
            size: flags.latency_size,
            runs,
            added_p50_us,
        };
        println!("{}", report::latency_summary(&report));
        write_json(out, "latency", &report)?;
        results.latency = Some(report);
    }
    if flags.runs(Scenario::FanOut) {
        let plan = scenarios::printer_mix(flags.fan_out_seconds);
        let mut runs = Vec::new();
        for &subscribers in &flags.fan_out {
            for target in [
                Some(rig.direct.clone()),
                Some(rig.relay.clone()),
                Some(rig.relay_tcp.clone()),
                rig.rathole.clone(),
            ]
            .into_iter()
            .flatten()
            .filter(|target| flags.measures(target))
            {
                runs.push(scenarios::stream(rig, &target, subscribers, &plan, progress).await?);
            }
        }
        println!("{}", report::fan_out_summary(&runs));
        write_json(out, "fan-out", &runs)?;
        results.fan_out = Some(runs);
    }
    if flags.runs(Scenario::Publish) {
        let mut runs = Vec::new();
        for target in [rig.direct.clone(), rig.relay.clone()] {
            runs.push(
                scenarios::publish_path(
                    rig,
                    &target,
                    flags.publish_clients,
                    flags.publish_rate,
                    flags.publish_seconds,
                    progress,
                )
                .await?,
            );
        }
        println!("{}", report::publish_summary(&runs));
        write_json(out, "publish", &runs)?;
        results.publish = Some(runs);
    }
    if flags.runs(Scenario::Storm) {
        let storm = scenarios::connect_storm(
            rig,
            flags.storm_clients,
            flags.storm_concurrency,
            Duration::from_secs(120),
            progress,
        )
        .await?;
        println!("{}", report::storm_summary(&storm));
        write_json(out, "storm", &storm)?;
        results.storm = Some(storm);
    }
    if flags.runs(Scenario::Idle) {
        let mut runs = Vec::new();
        for target in [rig.relay.clone(), rig.relay_mqtts.clone()] {
            let idle =
                scenarios::idle_sessions(rig, &target, flags.idle_sessions, progress).await?;
            println!("{}", report::idle_summary(&idle));
            runs.push(idle);
        }
        write_json(out, "idle", &runs)?;
        results.idle = Some(runs);
    }
    if flags.runs(Scenario::Abuse) {
        let size = abuse::AbuseSize {
            foreign_subscribes: if flags.quick { 9 } else { 300 },
            churn_rounds: if flags.quick { 2 } else { 50 },
            flood_publishes: flags.abuse_flood,
            sessions: flags.abuse_sessions,
            guesses: if flags.quick { 35 } else { 200 },
        };
        let report = abuse::abuse(rig, size, progress).await?;
        println!("{}", report::abuse_summary(&report));
        write_json(out, "abuse", &report)?;
        results.abuse = Some(report);
    }
    if flags.runs(Scenario::Rolling) {
        let size = rolling::RollingSize {
            devices: flags.rolling_devices,
            clients: flags.rolling_clients,
            printer_per_second: 5,
            app_interval: Duration::from_secs(1),
            settle: Duration::from_secs(if flags.quick { 2 } else { 5 }),
        };
        let report = rolling::rolling_update(rig, size, progress).await?;
        println!("{}", report::rolling_summary(&report));
        write_json(out, "rolling", &report)?;
        results.rolling = Some(report);
    }
    if flags.runs(Scenario::Fleet) {
        let size = fleet::FleetSize {
            printers: flags.fleet_printers,
            report_bytes: flags.fleet_report_bytes,
            window: Duration::from_secs(u64::from(flags.fleet_seconds)),
            patience: Duration::from_secs(180),
        };
        let report = fleet::fleet(rig, size, flags.tunnels_transport, progress).await?;
        println!("{}", report::fleet_summary(&report));
        write_json(out, "fleet", &report)?;
        results.fleet = Some(report);
    }
    if flags.runs(Scenario::Cross) {
        let plan = scenarios::steady(
            flags.latency_rate,
            flags.latency_size,
            flags.latency_seconds,
        );
        let report = cross::cross_instance(
            rig,
            &plan,
            &flags.cross_clients,
            flags.fan_out_seconds,
            flags.failover_clients,
            progress,
        )
        .await?;
        println!("{}", report::cross_summary(&report));
        write_json(out, "cross", &report)?;
        results.cross = Some(report);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Flags::parse()).await {
        Ok(results) => {
            for skipped in &results.skipped {
                eprintln!("relay-loadtest: not measured: {skipped}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("relay-loadtest: {error:#}");
            ExitCode::FAILURE
        }
    }
}
