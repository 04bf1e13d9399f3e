//! `palisade envoy`: running Envoy as a workload's sidecar in a Palisade mesh.
//! `bootstrap` prints the bootstrap that points an Envoy at the control plane (ADS over mutual
//! TLS) and at the workload's agent (SDS); the control plane then pushes what istiod would.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print an Envoy bootstrap (YAML) for the sidecar of workload NS/NAME: listeners and
    /// clusters over ADS from the control plane, certificates over SDS from the agent.
    Bootstrap(BootstrapArgs),
}

#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    /// The WorkloadEntry, `namespace/name`.
    #[arg(long, value_name = "NS/NAME")]
    pub workload: String,
    /// The control plane's ADS address (`palisade controlplane --xds-listen`).
    #[arg(long, value_name = "HOST:PORT")]
    pub xds_address: String,
    /// The SDS socket of the workload's `palisade agent`.
    #[arg(long, value_name = "PATH")]
    pub sds_socket: PathBuf,
    /// Where the application listens for a workload port (repeatable); else the
    /// `palisade.dev/app-port-<PORT>` annotation, else the port itself.
    #[arg(long = "app-port", value_name = "PORT=APPPORT", value_parser = super::proxy_config::parse_app_port)]
    pub app_ports: Vec<(u16, u16)>,
    /// Envoy's admin address.
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:15000")]
    pub admin: String,
    /// The application's outbound HTTP proxy listener (`curl -x`); the control plane routes
    /// by Host to ServiceEntry hosts and workload addresses.
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:15001")]
    pub outbound: std::net::SocketAddr,
    /// A declared outbound TCP upstream: LISTEN_ADDR=HOST:PORT (repeatable).
    #[arg(long = "tcp-upstream", value_name = "LISTEN=HOST:PORT")]
    pub tcp_upstreams: Vec<String>,
    /// Incremental (delta) ADS (`DELTA_GRPC`) instead of state of the world: only what changed
    /// is sent on a push.
    #[arg(long)]
    pub delta: bool,
    /// Print JSON instead of YAML.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Bootstrap(args) => {
            // Checked here, as the control plane will read them: a bad one would only show as
            // a refused ADS stream once Envoy runs.
            for t in &args.tcp_upstreams {
                palisade_control::envoy::parse_tcp_upstreams(t)
                    .map_err(|e| anyhow::anyhow!("--tcp-upstream {t:?}: {e}"))?;
            }
            let app_ports: BTreeMap<u16, u16> = args.app_ports.into_iter().collect();
            let bootstrap = palisade_envoy::bootstrap::bootstrap(
                &palisade_envoy::bootstrap::BootstrapOptions {
                    workload: args.workload,
                    xds_address: args.xds_address,
                    sds_socket: std::path::absolute(&args.sds_socket)
                        .with_context(|| format!("--sds-socket {}", args.sds_socket.display()))?,
                    app_ports,
                    admin: args.admin,
                    outbound: args.outbound.to_string(),
                    tcp_upstreams: args.tcp_upstreams,
                    delta: args.delta,
                },
            )?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&bootstrap)?);
            } else {
                print!(
                    "{}",
                    serde_saphyr::to_string(&bootstrap).context("writing the bootstrap as YAML")?
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
