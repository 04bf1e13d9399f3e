//! `palisade analyze --config DIR`: configuration that loads but does not do what it seems to.
//! Exit 0 when clean, 1 when it warns, 2 when the directory does not load.

use std::path::PathBuf;
use std::process::ExitCode;

use super::authz::Output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Mesh directory to analyze.
    #[arg(long, value_name = "DIR")]
    pub config: PathBuf,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let snapshot = palisade_policy::load_dir(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let warnings = palisade_policy::analyze::analyze(&snapshot);
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&warnings)?),
        Output::Table => {
            for w in &warnings {
                println!("{w}");
            }
            if warnings.is_empty() {
                println!("no problems found in {}", args.config.display());
            } else {
                println!("{} warning(s)", warnings.len());
            }
        }
    }
    Ok(if warnings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
