//! `relayctl`: the operator's command line for relay's store. Applies
//! migrations and manages tenants, devices, API keys and agent credentials,
//! on Postgres or on the embedded SQLite store.
//!
//! Output is for people by default and JSON with `--json`. Exit codes: 0 done,
//! 1 refused (unknown id, duplicate name, bad input), 2 bad usage, 3 the
//! database is unreachable or failed.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use relay_store::{Millis, NewApiKey, Scope, Store, StoreError};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "relayctl",
    version,
    about = "Manage relay's tenants, devices, API keys and agent credentials"
)]
struct Cli {
    /// postgres://user@host/db, or sqlite:path/to/relay.db (created if missing)
    #[arg(
        long,
        env = "RELAY_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    database_url: Option<String>,

    /// Print JSON instead of text
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply pending database migrations
    Migrate,
    /// Tenants (accounts)
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Devices (one printer behind one agent)
    #[command(subcommand)]
    Device(DeviceCommand),
    /// API keys for apps
    #[command(subcommand)]
    Key(KeyCommand),
    /// Agent credentials (one live credential per device)
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Edge instances sharing this store
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// Apps that ask printer owners for access (OAuth 2.0 with PKCE)
    #[command(subcommand)]
    App(AppCommand),
}

#[derive(Subcommand, Debug)]
enum AppCommand {
    /// Register an app; prints its client_id
    Register {
        /// The name owners see when it asks for access
        #[arg(long)]
        name: String,
        /// Where owners are sent back (exactly; repeat for several):
        /// https://…, or http:// on the loopback for native apps
        #[arg(long = "redirect-uri", required = true)]
        redirect_uris: Vec<String>,
        /// What it may ask for: read, control (repeat for both)
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
    /// List registered apps
    List,
}

#[derive(Subcommand, Debug)]
enum InstanceCommand {
    /// Every registered edge instance, with its lease
    List,
}

#[derive(Subcommand, Debug)]
enum TenantCommand {
    /// Create a tenant
    Create { name: String },
    /// List tenants
    List,
    /// Print a one-use link that signs a tenant admin in to the tenant API
    /// and console (valid 15 minutes at most)
    LoginLink {
        /// Tenant id or name
        tenant: String,
        /// The edge's public base URL, e.g. https://relay.example.com
        #[arg(long, env = "RELAY_PUBLIC_URL")]
        base_url: String,
        /// Minutes the link stays valid (1 to 15)
        #[arg(long, default_value_t = 15)]
        minutes: i64,
    },
    /// Create an API token for the tenant API (never valid for MQTT);
    /// prints it once
    ApiToken {
        /// Tenant id or name
        tenant: String,
        #[arg(long, default_value = "")]
        label: String,
    },
}

#[derive(Subcommand, Debug)]
enum DeviceCommand {
    /// Create a device; prints its id (its subdomain label)
    Create {
        /// Tenant id or name
        #[arg(long)]
        tenant: String,
        name: String,
    },
    /// List live devices
    List {
        /// Only this tenant's (id or name)
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Show one device, deleted or not
    Show { id: String },
    /// Delete a device: revokes its agent credential and its keys; the id is never reused
    Delete { id: String },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Create an API key; prints the secret once
    Create(KeyCreate),
    /// List API keys (never their secrets)
    List {
        /// Only this tenant's (id or name)
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke an API key; live sessions using it are closed
    Revoke { key_id: String },
}

#[derive(Args, Debug)]
struct KeyCreate {
    /// Tenant id or name
    #[arg(long)]
    tenant: String,
    /// Limit the key to one device
    #[arg(long)]
    device: Option<String>,
    /// read: subscribe only; control: subscribe and publish
    #[arg(long, value_enum, default_value_t = ScopeArg::Read)]
    scope: ScopeArg,
    #[arg(long, default_value = "")]
    label: String,
    /// Lifetime, e.g. 90d, 12h, 30m, 3600s (default: no expiry)
    #[arg(long, value_parser = parse_duration_millis)]
    expires_in: Option<Millis>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ScopeArg {
    Read,
    Control,
}

#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// Issue a device's first agent credential; prints it once
    Issue { device: String },
    /// Replace a device's agent credential; the old one stops working
    Rotate { device: String },
}

/// A failure and the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Failure {
        let code = match error {
            StoreError::NotFound { .. }
            | StoreError::Conflict(_)
            | StoreError::InvalidInput(_)
            | StoreError::InvalidDatabaseUrl => 1,
            _ => 3,
        };
        Failure {
            code,
            message: error.to_string(),
        }
    }
}

fn parse_duration_millis(text: &str) -> Result<Millis, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: Millis = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90d or 12h"))?;
    let unit_millis = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    match number.checked_mul(unit_millis) {
        Some(millis) if millis > 0 => Ok(millis),
        _ => Err(format!("{text:?} is out of range")),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("relayctl: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let Some(url) = cli.database_url.as_deref() else {
        return Err(Failure {
            code: 2,
            message: "no database: pass --database-url or set RELAY_DATABASE_URL".into(),
        });
    };
    // An operator at a prompt wants a dead database reported quickly.
    let store = Store::connect_with_timeout(url, std::time::Duration::from_secs(2)).await?;
    let output = Output { json: cli.json };
    let result = execute(&store, cli.command, &output).await;
    store.close().await;
    result
}

async fn execute(store: &Store, command: Command, output: &Output) -> Result<(), Failure> {
    match command {
        Command::Migrate => {
            let applied = store.migrate().await?;
            output.print(&serde_json::json!({ "applied": applied }), || {
                if applied.is_empty() {
                    "database is up to date".to_owned()
                } else {
                    format!("applied: {}", applied.join(", "))
                }
            });
        }
        Command::App(AppCommand::Register {
            name,
            redirect_uris,
            scopes,
        }) => {
            let scopes = scopes
                .iter()
                .map(|scope| {
                    Scope::parse(scope).ok_or_else(|| Failure {
                        code: 1,
                        message: format!("{scope}: a scope is read or control"),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let app = store.register_app(&name, &redirect_uris, &scopes).await?;
            output.print(&app, || {
                format!("app {} registered: client_id {}", app.name, app.id)
            });
        }
        Command::App(AppCommand::List) => {
            let apps = store.list_apps().await?;
            output.print(&apps, || {
                table(
                    &["CLIENT ID", "NAME", "SCOPES", "REDIRECT URIS"],
                    apps.iter().map(|app| {
                        vec![
                            app.id.clone(),
                            app.name.clone(),
                            app.scopes
                                .iter()
                                .map(|scope| scope.as_str())
                                .collect::<Vec<_>>()
                                .join(" "),
                            app.redirect_uris.join(" "),
                        ]
                    }),
                )
            });
        }
        Command::Tenant(TenantCommand::Create { name }) => {
            let tenant = store.create_tenant(&name).await?;
            output.print(&tenant, || {
                format!("tenant {} created: {}", tenant.name, tenant.id)
            });
        }
        Command::Tenant(TenantCommand::List) => {
            let tenants = store.list_tenants().await?;
            output.print(&tenants, || {
                table(
                    &["ID", "NAME", "CREATED"],
                    tenants
                        .iter()
                        .map(|t| vec![t.id.clone(), t.name.clone(), time(Some(t.created_at))]),
                )
            });
        }
        Command::Tenant(TenantCommand::LoginLink {
            tenant,
            base_url,
            minutes,
        }) => {
            let (link, expires_at) = store.create_login_link(&tenant, minutes * 60_000).await?;
            let url = format!("{}/login/{}", base_url.trim_end_matches('/'), link.reveal());
            output.print(
                &serde_json::json!({ "url": url, "expires_at": expires_at }),
                || format!("{url}\n(one use, valid until {})", time(Some(expires_at))),
            );
        }
        Command::Tenant(TenantCommand::ApiToken { tenant, label }) => {
            let (token, issued) = store.create_admin_token(&tenant, &label).await?;
            output.print(
                &serde_json::json!({ "token": token, "secret": issued.reveal() }),
                || {
                    format!(
                        "API token {} for the tenant API (shown once):\n{}",
                        token.id,
                        issued.reveal()
                    )
                },
            );
        }
        Command::Device(DeviceCommand::Create { tenant, name }) => {
            let device = store.create_device(&tenant, &name).await?;
            output.print(&device, || {
                format!("device {} created: {}", device.name, device.id)
            });
        }
        Command::Device(DeviceCommand::List { tenant }) => {
            let devices = store.list_devices(tenant.as_deref()).await?;
            output.print(&devices, || {
                table(
                    &["ID", "TENANT", "NAME", "CREATED"],
                    devices.iter().map(|d| {
                        vec![
                            d.id.clone(),
                            d.tenant_id.clone(),
                            d.name.clone(),
                            time(Some(d.created_at)),
                        ]
                    }),
                )
            });
        }
        Command::Device(DeviceCommand::Show { id }) => {
            let device = store.device(&id).await?;
            let claim = store.device_claim(&id).await?;
            let printer_status = store.printer_status(&id).await?;
            let now = store.now();
            let printer = match &printer_status {
                None => "never heard of".to_owned(),
                Some(status) => {
                    let mut line = status.state.clone();
                    if let Some(since) = status.silent_since {
                        line.push_str(&format!(" since {}", time(Some(since))));
                    }
                    if let Some(reason) = &status.reason {
                        line.push_str(&format!(" ({reason}"));
                        if let Some(detail) = &status.detail {
                            line.push_str(&format!(": {detail}"));
                        }
                        line.push(')');
                    }
                    line.push_str(&format!(", as of {}", time(Some(status.updated_at))));
                    if !status.reconnects.is_empty() {
                        let causes: Vec<String> = status
                            .reconnects
                            .iter()
                            .map(|(cause, count)| format!("{cause} {count}"))
                            .collect();
                        line.push_str(&format!(
                            "
reconnects: {}",
                            causes.join(", ")
                        ));
                    }
                    line
                }
            };
            let agent = match &claim {
                None => "never connected".to_owned(),
                Some(claim) if claim.is_live(now) => format!(
                    "on instance {} (epoch {}, since {})",
                    claim.instance_id,
                    claim.epoch,
                    time(Some(claim.connected_at))
                ),
                Some(claim) => format!(
                    "not connected (last on instance {}, until {})",
                    claim.instance_id,
                    time(Some(claim.last_served(now)))
                ),
            };
            let mut shown = serde_json::to_value(&device).unwrap_or_default();
            if let Some(fields) = shown.as_object_mut() {
                fields.insert(
                    "tunnel".into(),
                    claim.as_ref().map_or(serde_json::Value::Null, |claim| {
                        serde_json::json!({
                            "instance": claim.instance_id,
                            "epoch": claim.epoch,
                            "connected_at": claim.connected_at,
                            "released_at": claim.released_at,
                            "live": claim.is_live(now),
                        })
                    }),
                );
                fields.insert(
                    "printer".into(),
                    serde_json::to_value(&printer_status).unwrap_or_default(),
                );
            }
            output.print(&shown, || {
                format!(
                    "id:       {}\ntenant:   {}\nname:     {}\ncreated:  {}\ndeleted:  {}\nagent:    {agent}\nprinter:  {printer}",
                    device.id,
                    device.tenant_id,
                    device.name,
                    time(Some(device.created_at)),
                    time(device.deleted_at)
                )
            });
        }
        Command::Instance(InstanceCommand::List) => {
            let instances = store.list_instances().await?;
            output.print(&instances, || {
                table(
                    &["INSTANCE", "PEER ADDRESS", "STARTED", "LEASE UNTIL", "LIVE"],
                    instances.iter().map(|instance| {
                        vec![
                            instance.id.clone(),
                            instance.peer_address.clone(),
                            time(Some(instance.started_at)),
                            time(Some(instance.lease_until)),
                            if instance.live { "yes" } else { "no (expired)" }.to_owned(),
                        ]
                    }),
                )
            });
        }
        Command::Device(DeviceCommand::Delete { id }) => {
            store.delete_device(&id).await?;
            output.print(&serde_json::json!({ "deleted": id }), || {
                format!("device {id} deleted")
            });
        }
        Command::Key(KeyCommand::Create(create)) => {
            let scope = match create.scope {
                ScopeArg::Read => Scope::Read,
                ScopeArg::Control => Scope::Control,
            };
            let (key, credential) = store
                .create_api_key(NewApiKey {
                    tenant_id: &create.tenant,
                    device_id: create.device.as_deref(),
                    scope,
                    label: &create.label,
                    expires_at: create
                        .expires_in
                        .map(|lifetime| store.now().saturating_add(lifetime)),
                })
                .await?;
            let token = credential.reveal();
            #[derive(Serialize)]
            struct Created<'a> {
                key: &'a relay_store::ApiKey,
                token: &'a str,
                basic_username: &'a str,
                basic_password: &'a str,
            }
            let created = Created {
                key: &key,
                token: &token,
                basic_username: &key.id,
                basic_password: credential.secret(),
            };
            output.print(&created, || {
                format!(
                    "API key {} created ({} scope, {}, expires {}).\n\
                     Store it now; it is not shown again.\n\n  {token}\n\n\
                     Bearer: Authorization: Bearer {token}\n\
                     Basic:  user name {}, password {}",
                    key.id,
                    key.scope.as_str(),
                    key.device_id
                        .as_deref()
                        .map_or("all devices".to_owned(), |d| format!("device {d}")),
                    time(key.expires_at),
                    key.id,
                    credential.secret()
                )
            });
        }
        Command::Key(KeyCommand::List { tenant }) => {
            let keys = store.list_api_keys(tenant.as_deref()).await?;
            output.print(&keys, || {
                table(
                    &[
                        "ID",
                        "TENANT",
                        "DEVICE",
                        "SCOPE",
                        "LABEL",
                        "EXPIRES",
                        "LAST USED",
                        "REVOKED",
                    ],
                    keys.iter().map(|k| {
                        vec![
                            k.id.clone(),
                            k.tenant_id.clone(),
                            k.device_id.clone().unwrap_or_else(|| "*".into()),
                            k.scope.as_str().to_owned(),
                            k.label.clone(),
                            time(k.expires_at),
                            time(k.last_used_at),
                            time(k.revoked_at),
                        ]
                    }),
                )
            });
        }
        Command::Key(KeyCommand::Revoke { key_id }) => {
            let newly = store.revoke_api_key(&key_id).await?;
            output.print(
                &serde_json::json!({ "revoked": key_id, "already_revoked": !newly }),
                || {
                    if newly {
                        format!("key {key_id} revoked")
                    } else {
                        format!("key {key_id} was already revoked")
                    }
                },
            );
        }
        Command::Agent(command) => {
            let (credential, issued) = match command {
                AgentCommand::Issue { device } => store.issue_agent_credential(&device).await?,
                AgentCommand::Rotate { device } => store.rotate_agent_credential(&device).await?,
            };
            let token = issued.reveal();
            output.print(
                &serde_json::json!({ "credential": credential, "token": token }),
                || {
                    format!(
                        "agent credential {} issued for device {}.\n\
                     Put it in the agent's config; it is not shown again.\n\n  {token}",
                        credential.id, credential.device_id
                    )
                },
            );
        }
    }
    Ok(())
}

struct Output {
    json: bool,
}

impl Output {
    fn print<T: Serialize>(&self, value: &T, text: impl FnOnce() -> String) {
        if self.json {
            match serde_json::to_string_pretty(value) {
                Ok(json) => println!("{json}"),
                Err(error) => eprintln!("relayctl: cannot print JSON: {error}"),
            }
        } else {
            println!("{}", text());
        }
    }
}

/// Milliseconds since the epoch as UTC `YYYY-MM-DD HH:MM:SS`, or `-`.
fn time(millis: Option<Millis>) -> String {
    let Some(millis) = millis else {
        return "-".to_owned();
    };
    let seconds = millis.div_euclid(1000);
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    if rows.is_empty() {
        return "(none)".to_owned();
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(headers.iter().map(|h| (*h).to_owned()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration_millis("90d"), Ok(90 * 86_400_000));
        assert_eq!(parse_duration_millis("12h"), Ok(12 * 3_600_000));
        assert_eq!(parse_duration_millis("30m"), Ok(1_800_000));
        assert_eq!(parse_duration_millis("3600s"), Ok(3_600_000));
        assert!(parse_duration_millis("12").is_err());
        assert!(parse_duration_millis("0d").is_err());
        assert!(parse_duration_millis("d").is_err());
        assert!(parse_duration_millis("99999999999999999d").is_err());
    }

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(time(Some(0)), "1970-01-01 00:00:00");
        assert_eq!(time(Some(1_795_350_896_000)), "2026-11-22 12:34:56");
        assert_eq!(time(Some(951_782_400_000)), "2000-02-29 00:00:00");
        assert_eq!(time(None), "-");
    }
}
