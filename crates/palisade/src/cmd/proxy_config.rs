//! `palisade proxy-config`: what a running agent or proxy holds, read from its admin endpoint.

use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Certificates served over SDS, as `istioctl proxy-config secret` shows them.
    Secret(SecretArgs),
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
    }
}
