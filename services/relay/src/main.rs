//! `relay`: the project in one command. `relay demo` runs an edge, an agent
//! and a printer simulator on this machine, on the embedded SQLite store,
//! with a self-signed certificate, and prints how to connect a real MQTT
//! client. The production pieces are the separate `relay-edge`,
//! `relay-agent` and `relayctl` binaries.

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "relay",
    version,
    about = "relay: remote MQTT access to printers"
)]
struct Flags {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run an edge, an agent and a printer simulator here, ready for a real
    /// MQTT client; Ctrl-C stops them all.
    Demo {
        /// Where the database, certificates and demo keys live; a second
        /// run reuses them.
        #[arg(long, default_value = "data/demo")]
        data_dir: PathBuf,
        /// The wss port on 127.0.0.1 (0: any free port; a taken port falls
        /// back to a free one).
        #[arg(long, default_value_t = 8443)]
        port: u16,
        /// Edge instances, each its own process, sharing the store (peer
        /// links between them); the agent connects to the first. Kill the
        /// one holding the agent to see the failover.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
        edges: u16,
        /// The simulated printer: a Bambu Lab printer, or an Elegoo
        /// Centauri Carbon 2.
        #[arg(long, value_enum, default_value_t = demo::DemoPrinter::Bambu)]
        printer: demo::DemoPrinter,
        /// How the agent reaches the edge: QUIC, or TLS over TCP (as where
        /// UDP is blocked).
        #[arg(long, value_enum, default_value_t = demo::DemoTunnel::Quic)]
        tunnel: demo::DemoTunnel,
        /// The mqtts port on 127.0.0.1, for apps without WebSocket (Home
        /// Assistant's Bambu Lab integration dials 8883; 0: any free port;
        /// a taken port falls back to a free one).
        #[arg(long, default_value_t = 8883)]
        mqtts_port: u16,
    },
    /// One edge instance of `relay demo --edges N` (started by the demo).
    #[command(hide = true)]
    DemoEdge {
        #[arg(long)]
        config: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let flags = Flags::parse();
    // Components log warnings only, so the demo's own lines stay readable;
    // RELAY_LOG=info shows everything.
    let filter = tracing_subscriber::EnvFilter::try_from_env("RELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match flags.command {
        Command::Demo {
            data_dir,
            port,
            edges,
            printer,
            tunnel,
            mqtts_port,
        } => match demo::run(
            &data_dir,
            port,
            edges,
            demo::DemoSetup {
                printer,
                tunnel,
                mqtts_port,
            },
        )
        .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("relay demo: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::DemoEdge { config } => match demo::run_edge_process(&config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("relay demo edge: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}
