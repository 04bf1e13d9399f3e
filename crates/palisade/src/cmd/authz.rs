//! `palisade authz check`: decide one request against a mesh directory offline, and explain it.
//! Exit 0 whatever the decision; errors (bad directory, bad request file) exit 2 via `main`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Decide one request (YAML or JSON file) and explain the decision.
    Check(CheckArgs),
}

/// Output format shared by the policy commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Json,
    Table,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Mesh directory (mesh.yaml, workloads and policies).
    #[arg(long, value_name = "DIR")]
    pub config: PathBuf,
    /// Request description: workload, port, source, http, jwt (YAML or JSON).
    #[arg(long, value_name = "FILE")]
    pub request: PathBuf,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Check(args) => check(args),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.request)
        .with_context(|| format!("cannot read request file {}", args.request.display()))?;
    let spec = palisade_policy::RequestSpec::from_text(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.request.display()))?;
    let snapshot = palisade_policy::load_dir(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let decision = snapshot
        .check(&spec)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.request.display()))?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&decision)?),
        Output::Table => print!("{}", decision.to_table()),
    }
    Ok(ExitCode::SUCCESS)
}
