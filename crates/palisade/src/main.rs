//! The `palisade` command line. It only parses arguments and wires the library crates together;
//! every decision lives in a crate (see DESIGN.md for the map).

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    /// Run the workload agent: key, certificate rotation, and SDS for the proxy.
    Agent(cmd::agent::Args),
    /// Run the sidecar proxy of one workload (certificates over SDS, config from the control plane).
    Proxy(cmd::proxy::Args),
    /// Run a workload's agent and proxy in one process.
    Sidecar(cmd::sidecar::Args),
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
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Up(_) => "warn",
        _ => "info",
    };
    init_logging(cli.log.as_deref().unwrap_or(default_log), cli.log_format);
    // Exactly one rustls crypto provider in the tree: aws-lc-rs, installed before any TLS use.
    // An error here only means one is installed already, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => cmd::up::run(args).await,
            Command::Controlplane(args) => cmd::controlplane::run(args).await,
            Command::Token(c) => cmd::token::run(c).await,
            Command::Cert(c) => cmd::cert::run(c).await,
            Command::Agent(args) => cmd::agent::run(args).await,
            Command::Proxy(args) => cmd::proxy::run(args).await,
            Command::Sidecar(args) => cmd::sidecar::run(args).await,
            Command::ProxyConfig(c) => cmd::proxy_config::run(c).await,
            Command::Authz(c) => cmd::authz::run(c).await,
            Command::Describe(c) => cmd::describe::run(c).await,
            Command::Analyze(args) => cmd::analyze::run(args).await,
            Command::ExtAuthz(args) => cmd::ext_authz::run(args).await,
            Command::Echo(args) => cmd::echo::run(args).await,
            Command::Status(args) => cmd::status::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` prints the whole context chain: file, field, reason.
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
