//! `relay-agent --config agent.toml`: runs the agent beside one printer.
//! Exits with 64 on a bad configuration, listing every problem.
//! `relay-agent setup` writes that file, asking for what it needs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use relay_agent::config::{AgentConfig, PrinterSection};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "relay-agent",
    version,
    about = "relay's agent: shares one printer connection through the edge",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Flags {
    #[command(subcommand)]
    command: Option<Subcommand>,
    /// TOML configuration file
    #[arg(long, env = "RELAY_AGENT_CONFIG", required = true)]
    config: Option<PathBuf>,
    /// Overrides edge.address
    #[arg(long, env = "RELAY_AGENT_EDGE")]
    edge_address: Option<String>,
    /// Overrides edge.credential (keeps the secret out of the file)
    #[arg(long, env = "RELAY_AGENT_CREDENTIAL", hide_env_values = true)]
    credential: Option<String>,
    /// Overrides printer.access_code of a Bambu printer
    #[arg(long, env = "RELAY_AGENT_ACCESS_CODE", hide_env_values = true)]
    access_code: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
enum Subcommand {
    /// Write the configuration file, asking for what it needs (or from
    /// flags), then try the edge and the printer
    Setup(relay_agent::setup::SetupArgs),
}

fn apply_overrides(config: &mut AgentConfig, flags: &Flags) -> Result<(), Vec<String>> {
    if let Some(address) = &flags.edge_address {
        config.edge.address = address.clone();
    }
    if let Some(credential) = &flags.credential {
        config.edge.credential = credential.as_str().into();
    }
    if let Some(code) = &flags.access_code {
        match &mut config.printer {
            PrinterSection::Bambu { access_code, .. } => *access_code = code.as_str().into(),
            PrinterSection::ElegooCc2 { access_code, .. } => {
                *access_code = Some(code.as_str().into());
            }
            PrinterSection::Mqtt { .. } => {
                return Err(vec![
                    "--access-code is for printer kind \"bambu\"; this printer is \"mqtt\"".into(),
                ]);
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let flags = Flags::parse();
    if let Some(Subcommand::Setup(args)) = flags.command {
        return ExitCode::from(relay_agent::setup::run(args).await);
    }
    // Required by clap unless a subcommand was given.
    let Some(config_path) = flags.config.clone() else {
        eprintln!("relay-agent: --config is required");
        return ExitCode::from(64);
    };
    let text = match std::fs::read_to_string(&config_path) {
        Ok(text) => text,
        Err(error) => {
            eprintln!(
                "relay-agent: cannot read {}: {error}",
                config_path.display()
            );
            return ExitCode::from(64);
        }
    };
    let checked = AgentConfig::from_toml(&text).and_then(|mut config| {
        apply_overrides(&mut config, &flags)?;
        config.validate().map(|printer| (config, printer))
    });
    let (config, printer) = match checked {
        Ok(checked) => checked,
        Err(problems) => {
            eprintln!("relay-agent: invalid configuration:");
            for problem in problems {
                eprintln!("  - {problem}");
            }
            return ExitCode::from(64);
        }
    };
    tracing::info!(edge = %config.edge.address, printer = ?printer, "starting");
    if printer.insecure {
        tracing::warn!(
            "printer.insecure = true: the printer's certificate is not checked; anyone on the LAN could pose as the printer"
        );
    }
    if !config.always_on {
        // The always-on standby reports the printer itself; otherwise say
        // now whether the printer answers, instead of at the first client.
        let printer = printer.clone();
        tokio::spawn(async move {
            match relay_agent::printer::probe(&printer).await {
                Ok(()) => tracing::info!(
                    host = %printer.host,
                    port = printer.port(),
                    "printer reachable: logged in and out again; it will be connected when the first client arrives"
                ),
                Err(failure) => tracing::warn!(
                    reason = ?failure.reason,
                    detail = %failure.detail,
                    "printer not reachable"
                ),
            }
        });
    }
    let stop = CancellationToken::new();
    let agent = tokio::spawn(relay_agent::tunnel::run(config, printer, stop.clone()));
    // SIGINT or SIGTERM (systemd, a container's PID 1): the tunnel closes
    // its QUIC connection with a reason, so the edge knows at once.
    relay_io::shutdown_signal().await;
    tracing::info!("stopping");
    stop.cancel();
    let _ = agent.await;
    ExitCode::SUCCESS
}
