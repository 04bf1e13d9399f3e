//! `palisade authz check`: decide one request against a mesh directory offline, and explain it.
//! `palisade authz matrix`: who can reach what, every source against every workload port.
//! Exit 0 whatever the decisions; errors (bad directory, bad request file, bad `--identity`) exit 2
//! via `main`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Decide one request (YAML or JSON file) and explain the decision.
    Check(CheckArgs),
    /// Who can reach what: for every caller identity (and "no identity") and every workload port,
    /// whether a request can be allowed, when, and by which policy rules.
    Matrix(MatrixArgs),
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

/// Output format of `authz matrix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MatrixOutput {
    /// One line per cell: source, destination:port, verdict, reason.
    Table,
    /// Sources, destinations and every cell with its grants, witnesses and restrictions.
    Json,
    /// Graphviz: workloads as nodes, edges labelled with the ports that can be reached.
    Dot,
}

#[derive(Debug, clap::Args)]
pub struct MatrixArgs {
    /// Mesh directory (mesh.yaml, workloads and policies).
    #[arg(long, value_name = "DIR")]
    pub config: PathBuf,
    #[arg(long, value_enum, default_value_t = MatrixOutput::Table)]
    pub output: MatrixOutput,
    /// A caller outside the directory (repeatable), e.g. spiffe://cluster.local/ns/dev/sa/ci.
    #[arg(long = "identity", value_name = "SPIFFE_ID")]
    pub identities: Vec<String>,
}

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Check(args) => check(args),
        Command::Matrix(args) => matrix(args),
    }
}

fn matrix(args: MatrixArgs) -> anyhow::Result<ExitCode> {
    let snapshot = palisade_policy::load_dir(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let options = palisade_policy::MatrixOptions {
        identities: args.identities,
    };
    let matrix = palisade_policy::Matrix::compute(&snapshot, &options)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    match args.output {
        MatrixOutput::Json => println!("{}", serde_json::to_string_pretty(&matrix.document())?),
        MatrixOutput::Table => print!("{}", matrix.to_table()),
        MatrixOutput::Dot => print!("{}", matrix.to_dot()),
    }
    Ok(ExitCode::SUCCESS)
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
