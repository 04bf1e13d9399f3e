//! `palisade-sidecar`: the same as `palisade sidecar` (a workload's agent and proxy in one
//! process), in a binary that links nothing else. It is what a sidecar container ships: every
//! sidecar maps the binary's code, so less code linked is less memory per workload.

use std::process::ExitCode;

use clap::Parser;
use palisade::cli::{LogFormat, exit_code, init_logging, runtime};
use palisade::cmd;

/// A workload's Palisade sidecar: agent (key, certificate rotation) and proxy in one process.
#[derive(Debug, Parser)]
#[command(name = "palisade-sidecar", version, about)]
struct Cli {
    /// Log filter in tracing's EnvFilter syntax (RUST_LOG also works).
    #[arg(long, env = "PALISADE_LOG", default_value = "info")]
    log: String,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    args: cmd::sidecar::Args,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    palisade::cli::one_malloc_arena();
    init_logging(&cli.log, cli.log_format);
    // A child of `palisade up` dies with it.
    palisade::cli::exit_with_parent();
    let runtime = match runtime(false) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    exit_code(runtime.block_on(cmd::sidecar::run(cli.args)))
}
