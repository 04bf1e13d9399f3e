//! `palisade describe workload NS/NAME --config DIR`: the effective mTLS mode per port with the
//! policy that set it, JWT issuers, and authorization policies by action.

use std::path::PathBuf;
use std::process::ExitCode;

use super::authz::Output;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Describe one workload of a mesh directory.
    Workload(WorkloadArgs),
}

#[derive(Debug, clap::Args)]
pub struct WorkloadArgs {
    /// The WorkloadEntry, as namespace/name.
    #[arg(value_name = "NS/NAME")]
    pub workload: String,
    /// Mesh directory to read.
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Workload(args) => workload(args),
    }
}

fn workload(args: WorkloadArgs) -> anyhow::Result<ExitCode> {
    let Some(dir) = &args.config else {
        anyhow::bail!("--config DIR is required");
    };
    let snapshot = palisade_policy::load_dir(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(description) = palisade_policy::describe::describe_workload(&snapshot, &args.workload)
    else {
        let known: Vec<&str> = snapshot.workload_keys().collect();
        anyhow::bail!(
            "workload {:?} is not a WorkloadEntry in {} (known: {})",
            args.workload,
            dir.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&description)?),
        Output::Table => print!("{}", description.to_table()),
    }
    Ok(ExitCode::SUCCESS)
}
