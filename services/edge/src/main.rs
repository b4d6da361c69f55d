//! `relay-edge`: runs the edge from a config file, environment variables and
//! flags (flags win, then the environment, then the file). Exits with 64 when
//! the configuration is invalid, listing every problem.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use relay_edge::{EdgeConfig, RunningEdge, StartError};

/// sysexits' EX_CONFIG: the configuration is wrong.
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(name = "relay-edge", version, about = "relay's public wss edge")]
struct Flags {
    /// TOML configuration file
    #[arg(long, env = "RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// Database URL (postgres://… or sqlite:…)
    #[arg(long, env = "RELAY_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Apply pending migrations at start-up
    #[arg(long, env = "RELAY_MIGRATE")]
    migrate: bool,
    /// wss listener address
    #[arg(long, env = "RELAY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Plain ws:// listener for local development
    #[arg(long, env = "RELAY_PLAIN_LISTEN")]
    plain_listen: Option<SocketAddr>,
    /// mqtts listener: MQTT over TLS without WebSocket (production
    /// 0.0.0.0:8883)
    #[arg(long, env = "RELAY_MQTTS_LISTEN")]
    mqtts_listen: Option<SocketAddr>,
    /// Plain MQTT-over-TCP listener for local development
    #[arg(long, env = "RELAY_MQTT_PLAIN_LISTEN")]
    mqtt_plain_listen: Option<SocketAddr>,
    /// QUIC (UDP) listener for agents
    #[arg(long, env = "RELAY_TUNNEL_LISTEN")]
    tunnel_listen: Option<SocketAddr>,
    /// TLS-over-TCP listener for agents whose network blocks UDP (port 0:
    /// the QUIC listener's port)
    #[arg(long, env = "RELAY_TUNNEL_TCP_LISTEN")]
    tunnel_tcp_listen: Option<SocketAddr>,
    /// Admin listener (/metrics, /healthz, /readyz)
    #[arg(long, env = "RELAY_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Devices are <device-id>.<base-domain>
    #[arg(long, env = "RELAY_BASE_DOMAIN")]
    base_domain: Option<String>,
    #[arg(long, env = "RELAY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "RELAY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// This instance's id among several on one store (the pod name)
    #[arg(long, env = "RELAY_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Where other instances reach this one's peer listener (pod IP:port)
    #[arg(long, env = "RELAY_PEER_ADDRESS")]
    peer_address: Option<String>,
    /// Peer listener for other edge instances (QUIC)
    #[arg(long, env = "RELAY_PEER_LISTEN")]
    peer_listen: Option<SocketAddr>,
    /// The cluster secret edge instances share
    #[arg(long, env = "RELAY_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// Threads the edge runs on (1: one thread, the least CPU per
    /// message; 0: one per core)
    #[arg(long, env = "RELAY_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Log as JSON lines
    #[arg(long, env = "RELAY_LOG_JSON")]
    log_json: bool,
    /// Check the configuration (file, environment and flags) and exit: 0
    /// when it is valid, 64 listing every problem. Nothing is started.
    #[arg(long)]
    check_config: bool,
}

fn load(flags: &Flags) -> Result<EdgeConfig, String> {
    let mut config = match &flags.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
            EdgeConfig::from_toml(&text).map_err(|problems| problems.to_string())?
        }
        None => EdgeConfig::defaults(),
    };
    if let Some(url) = &flags.database_url {
        config.store.database_url = url.as_str().into();
    }
    config.store.migrate |= flags.migrate;
    if flags.listen.is_some() {
        config.public.listen = flags.listen;
    }
    if flags.plain_listen.is_some() {
        config.public.plain_listen = flags.plain_listen;
    }
    if flags.mqtts_listen.is_some() {
        config.public.mqtts_listen = flags.mqtts_listen;
    }
    if flags.mqtt_plain_listen.is_some() {
        config.public.mqtt_plain_listen = flags.mqtt_plain_listen;
    }
    if flags.tunnel_listen.is_some() {
        config.tunnel.listen = flags.tunnel_listen;
    }
    if flags.tunnel_tcp_listen.is_some() {
        config.tunnel.tcp_listen = flags.tunnel_tcp_listen;
    }
    if let Some(id) = &flags.instance_id {
        config.cluster.instance_id = id.clone();
    }
    if let Some(address) = &flags.peer_address {
        config.cluster.peer_address = address.clone();
    }
    if flags.peer_listen.is_some() {
        config.cluster.peer_listen = flags.peer_listen;
    }
    if let Some(secret) = &flags.cluster_secret {
        config.cluster.secret = secret.as_str().into();
    }
    if let Some(address) = flags.admin_listen {
        config.admin.listen = address;
    }
    if let Some(domain) = &flags.base_domain {
        config.public.base_domain = domain.clone();
    }
    if flags.tls_cert.is_some() {
        config.public.tls_cert = flags.tls_cert.clone();
    }
    if flags.tls_key.is_some() {
        config.public.tls_key = flags.tls_key.clone();
    }
    if let Some(threads) = flags.worker_threads {
        config.runtime.worker_threads = threads;
    }
    Ok(config)
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    init_logs(flags.log_json);
    let config = match load(&flags) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("relay-edge: {message}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if let Err(problems) = config.validate() {
        eprint!("relay-edge: {problems}");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    if flags.check_config {
        println!("relay-edge: the configuration is valid");
        return ExitCode::SUCCESS;
    }
    let runtime = match runtime(config.runtime.worker_threads) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("relay-edge: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

/// One thread (tokio's current-thread runtime: a task woken by another
/// runs next on the same thread, and no other thread is woken to steal
/// it), or several sharing tasks.
fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        threads => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads);
            builder
        }
    };
    builder.enable_all().build()
}

async fn run(config: EdgeConfig) -> ExitCode {
    let grace = Duration::from_secs(config.shutdown.grace_period_seconds);
    let edge = match RunningEdge::start(config).await {
        Ok(edge) => edge,
        Err(error @ (StartError::Config(_) | StartError::Tls(_) | StartError::Jwks(_))) => {
            eprintln!("relay-edge: {error}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
        Err(error) => {
            eprintln!("relay-edge: {error}");
            return ExitCode::FAILURE;
        }
    };
    relay_io::shutdown_signal().await;
    edge.drain(grace).await;
    ExitCode::SUCCESS
}
