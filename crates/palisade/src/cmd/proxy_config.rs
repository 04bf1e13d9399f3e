//! `palisade proxy-config`: what a running agent or proxy holds, read from its admin endpoint;
//! and what the control plane would configure an Envoy sidecar with, computed offline.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Certificates served over SDS, as `istioctl proxy-config secret` shows them.
    Secret(SecretArgs),
    /// The listeners and clusters the control plane pushes to an Envoy sidecar of workload
    /// NS/NAME (what istiod would generate), translated from the mesh directory and printed as
    /// Envoy's config_dump JSON; nothing runs.
    Envoy(EnvoyArgs),
}

#[derive(Debug, clap::Args)]
pub struct EnvoyArgs {
    /// The WorkloadEntry, `namespace/name`.
    #[arg(value_name = "NS/NAME")]
    pub workload: String,
    /// The mesh directory.
    #[arg(long, value_name = "DIR")]
    pub config: PathBuf,
    /// Where the application listens for a workload port (repeatable); else the
    /// `palisade.dev/app-port-<PORT>` annotation, else the port itself.
    #[arg(long = "app-port", value_name = "PORT=APPPORT", value_parser = parse_app_port)]
    pub app_ports: Vec<(u16, u16)>,
    /// Also the outbound side, with the application's HTTP proxy listener here (as `palisade
    /// envoy bootstrap --outbound`, whose default is 127.0.0.1:15001).
    #[arg(long, value_name = "IP:PORT")]
    pub outbound: Option<std::net::SocketAddr>,
    /// A declared outbound TCP upstream: LISTEN_ADDR=HOST:PORT (repeatable).
    #[arg(long = "tcp-upstream", value_name = "LISTEN=HOST:PORT")]
    pub tcp_upstreams: Vec<String>,
}

pub(crate) fn parse_app_port(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('=').ok_or("expected PORT=APPPORT")?;
    let p = |x: &str| x.trim().parse::<u16>().map_err(|e| format!("{x:?}: {e}"));
    Ok((p(a)?, p(b)?))
}

#[derive(Debug, clap::Args)]
pub struct SecretArgs {
    /// The agent's admin address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15020")]
    pub admin: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Secret(args) => {
            let report = palisade_agent::admin::fetch_report(&args.admin).await?;
            match args.output {
                Output::Table => print!("{}", report.table()),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Envoy(args) => {
            let snapshot =
                palisade_policy::load_dir(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
            let wire =
                palisade_control::workload_config(&snapshot, &args.workload).ok_or_else(|| {
                    anyhow::anyhow!(
                        "workload {:?} is not a WorkloadEntry in {}",
                        args.workload,
                        args.config.display()
                    )
                })?;
            let app_ports: BTreeMap<u16, u16> = args.app_ports.into_iter().collect();
            let mut tcp = Vec::new();
            for t in &args.tcp_upstreams {
                tcp.extend(
                    palisade_control::envoy::parse_tcp_upstreams(t)
                        .map_err(|e| anyhow::anyhow!("--tcp-upstream {t:?}: {e}"))?,
                );
            }
            // What the control plane pushes to an Envoy of this workload: the inbound side, and
            // the outbound side when asked for.
            let mut resources = palisade_envoy::translate_inbound(&wire, &app_ports)?;
            if args.outbound.is_some() || !tcp.is_empty() {
                let (listeners, clusters) = palisade_envoy::outbound::translate_outbound(
                    &wire,
                    &palisade_envoy::outbound::OutboundOptions {
                        http: args.outbound,
                        tcp,
                    },
                )?;
                resources.listeners.extend(listeners);
                resources.clusters.extend(clusters);
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&palisade_envoy::json::config_dump(&resources))?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
