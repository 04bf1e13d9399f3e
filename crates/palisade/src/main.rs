//! The `palisade` command line. It only parses arguments and wires the library crates together;
//! every decision lives in a crate (see DESIGN.md for the map).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use palisade::cli::{LogFormat, init_logging, runtime};
use palisade::cmd;

/// Palisade: zero-trust security for service-to-service traffic.
#[derive(Debug, Parser)]
#[command(name = "palisade", version, about, propagate_version = true)]
struct Cli {
    /// Log filter in tracing's EnvFilter syntax (RUST_LOG also works). Default: `info`, and
    /// `warn` for `up`, whose own output tells the story.
    #[arg(long, global = true, env = "PALISADE_LOG")]
    log: Option<String>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole mesh from one directory on this machine (control plane, identities, sidecars).
    Up(cmd::up::Args),
    /// Run the control plane: the CA and, with --config, per-workload config push over ADS.
    Controlplane(cmd::controlplane::Args),
    /// Service-account tokens, as the Kubernetes API server would issue them.
    #[command(subcommand)]
    Token(cmd::token::Command),
    /// Request and inspect workload certificates.
    #[command(subcommand)]
    Cert(cmd::cert::Command),
    /// The control plane's CA: its certificate chain and their validity.
    #[command(subcommand)]
    Ca(cmd::ca::Command),
    /// Run the workload agent: key, certificate rotation, and SDS for the proxy.
    Agent(cmd::agent::Args),
    /// Run the sidecar proxy of one workload (certificates over SDS, config from the control plane).
    Proxy(cmd::proxy::Args),
    /// Run a workload's agent and proxy in one process.
    Sidecar(cmd::sidecar::Args),
    /// Envoy as a workload's sidecar: its bootstrap (ADS from the control plane, SDS from the
    /// agent).
    #[command(subcommand)]
    Envoy(cmd::envoy::Command),
    /// Show what a running proxy or agent holds.
    #[command(subcommand, name = "proxy-config")]
    ProxyConfig(cmd::proxy_config::Command),
    /// Authorization tools.
    #[command(subcommand)]
    Authz(cmd::authz::Command),
    /// Describe the effective security configuration of a workload.
    #[command(subcommand)]
    Describe(cmd::describe::Command),
    /// Look for mistakes in a mesh directory; exits 1 when it warns.
    Analyze(cmd::analyze::Args),
    /// Run the example external authorizer (Envoy ext_authz, gRPC and HTTP) with a Rego policy.
    #[command(name = "ext-authz")]
    ExtAuthz(cmd::ext_authz::Args),
    /// The demo application of `palisade up`: echoes requests and the caller identity, and calls
    /// other services through its sidecar.
    Echo(cmd::echo::Args),
    /// Show every workload of a mesh run by `palisade up`: readiness, certificate, config sync.
    Status(cmd::status::Args),
    /// Transparent capture in this network namespace: iptables rules that redirect the
    /// workload's TCP to its sidecar (what istio-iptables does), and their exact removal.
    #[command(subcommand)]
    Iptables(cmd::iptables::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Up(_) => "warn",
        _ => "info",
    };
    init_logging(cli.log.as_deref().unwrap_or(default_log), cli.log_format);
    // A child of `palisade up` dies with it.
    palisade::cli::exit_with_parent();
    // The proxy's data path runs on its own worker threads (palisade_proxy::workers); what is
    // left for the main runtime (xDS, certificates, admin) needs one thread.
    let data_path = matches!(cli.command, Command::Proxy(_) | Command::Sidecar(_));
    if data_path {
        palisade::cli::one_malloc_arena();
    }
    let runtime = match runtime(!data_path) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => cmd::up::run(args).await,
            Command::Controlplane(args) => cmd::controlplane::run(args).await,
            Command::Token(c) => cmd::token::run(c).await,
            Command::Cert(c) => cmd::cert::run(c).await,
            Command::Ca(c) => cmd::ca::run(c).await,
            Command::Agent(args) => cmd::agent::run(args).await,
            Command::Proxy(args) => cmd::proxy::run(args).await,
            Command::Sidecar(args) => cmd::sidecar::run(args).await,
            Command::Envoy(c) => cmd::envoy::run(c).await,
            Command::ProxyConfig(c) => cmd::proxy_config::run(c).await,
            Command::Authz(c) => cmd::authz::run(c).await,
            Command::Describe(c) => cmd::describe::run(c).await,
            Command::Analyze(args) => cmd::analyze::run(args).await,
            Command::ExtAuthz(args) => cmd::ext_authz::run(args).await,
            Command::Echo(args) => cmd::echo::run(args).await,
            Command::Status(args) => cmd::status::run(args).await,
            Command::Iptables(c) => cmd::iptables::run(c).await,
        }
    });
    palisade::cli::exit_code(result)
}
