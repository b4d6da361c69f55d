//! `relay-printer-sim`: runs the printer simulator from the command line and
//! writes its CA certificate where an agent can trust it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use relay_printer_sim::{OverLimit, Profile, RunningSimulator, Silence, SimulatorConfig};

#[derive(Parser, Debug)]
#[command(
    name = "relay-printer-sim",
    version,
    about = "A stand-in for a Bambu Lab printer's MQTT broker"
)]
struct Flags {
    #[arg(long, default_value = "127.0.0.1:8883")]
    listen: SocketAddr,
    #[arg(long, default_value = "01P00A000000001")]
    serial: String,
    /// The LAN access code clients must give as the password of user bblp
    #[arg(
        long,
        env = "RELAY_SIM_ACCESS_CODE",
        hide_env_values = true,
        default_value = "12345678"
    )]
    access_code: String,
    #[arg(long, value_enum, default_value_t = ProfileArg::P1)]
    profile: ProfileArg,
    /// Which printer: a Bambu Lab one, or an Elegoo Centauri Carbon 2
    /// (plain MQTT, user elegoo, registrations; --profile does not apply)
    #[arg(long, value_enum, default_value_t = PrinterArg::Bambu)]
    printer: PrinterArg,
    /// Reports per second
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    #[arg(long, default_value_t = 4)]
    client_limit: usize,
    #[arg(long, value_enum, default_value_t = OverLimitArg::Refuse)]
    over_limit: OverLimitArg,
    /// Plain MQTT instead of TLS
    #[arg(long)]
    no_tls: bool,
    /// Where to write the CA certificate (PEM)
    #[arg(long)]
    write_ca: Option<PathBuf>,
    /// A fault to play: `silent-after=N` (N seconds after start, the
    /// connections open then keep their TCP connection and answer and
    /// report nothing, like firmware 01.04), `half-open-after=N` (they
    /// stop reading altogether). Connections made later work.
    #[arg(long, value_parser = parse_quirk)]
    quirk: Vec<Quirk>,
}

#[derive(Clone, Copy, Debug)]
struct Quirk {
    silence: Silence,
    after: Duration,
}

fn parse_quirk(text: &str) -> Result<Quirk, String> {
    let (name, seconds) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected silent-after=N or half-open-after=N"))?;
    let silence = match name {
        "silent-after" => Silence::Silent,
        "half-open-after" => Silence::HalfOpen,
        other => {
            return Err(format!(
                "unknown quirk {other:?}: silent-after or half-open-after"
            ));
        }
    };
    let seconds: f64 = seconds
        .parse()
        .map_err(|_| format!("{text:?}: N is a number of seconds"))?;
    if !(0.0..=86_400.0).contains(&seconds) {
        return Err(format!("{text:?}: N is between 0 and 86400 seconds"));
    }
    Ok(Quirk {
        silence,
        after: Duration::from_secs_f64(seconds),
    })
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ProfileArg {
    P1,
    X1,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum PrinterArg {
    Bambu,
    Cc2,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum OverLimitArg {
    Refuse,
    Silent,
    DropOldest,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let flags = Flags::parse();
    anyhow::ensure!(
        flags.rate > 0.0 && flags.rate <= 1000.0,
        "--rate must be in (0, 1000]"
    );
    let mut config = SimulatorConfig::new(&flags.serial, &flags.access_code);
    config.profile = match flags.profile {
        ProfileArg::P1 => Profile::P1,
        ProfileArg::X1 => Profile::X1,
    };
    config.report_interval = Duration::from_secs_f64(1.0 / flags.rate);
    config.client_limit = flags.client_limit;
    config.over_limit = match flags.over_limit {
        OverLimitArg::Refuse => OverLimit::Refuse,
        OverLimitArg::Silent => OverLimit::AcceptSilently,
        OverLimitArg::DropOldest => OverLimit::DropOldest,
    };
    config.tls = !flags.no_tls;
    if flags.printer == PrinterArg::Cc2 {
        config = SimulatorConfig {
            report_interval: config.report_interval,
            ..SimulatorConfig::elegoo_cc2(&flags.serial, &flags.access_code)
        };
    }
    let simulator = RunningSimulator::start(config, flags.listen).await?;
    if let Some(path) = &flags.write_ca {
        std::fs::write(path, &simulator.ca_pem)?;
    }
    if flags.printer == PrinterArg::Cc2 {
        println!(
            "Centauri Carbon 2 simulator {} listening on {} (plain MQTT); user elegoo; register on elegoo/{}/api_register, status on elegoo/{}/api_status",
            flags.serial, simulator.addr, flags.serial, flags.serial
        );
    } else {
        println!(
            "printer simulator {} listening on {} ({}); user bblp; reports on device/{}/report",
            flags.serial,
            simulator.addr,
            if flags.no_tls {
                "plain MQTT"
            } else {
                "MQTT over TLS"
            },
            flags.serial
        );
    }
    let simulator = std::sync::Arc::new(simulator);
    for quirk in flags.quirk {
        let simulator = simulator.clone();
        tokio::spawn(async move {
            tokio::time::sleep(quirk.after).await;
            tracing::warn!(silence = ?quirk.silence, "quirk: the connections open now go quiet");
            simulator.go_silent(quirk.silence);
        });
    }
    relay_io::shutdown_signal().await;
    if let Ok(simulator) = std::sync::Arc::try_unwrap(simulator) {
        simulator.stop().await;
    }
    Ok(())
}
