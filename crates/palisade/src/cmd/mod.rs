//! One module per subcommand. Each exposes its clap arguments and an async `run` that returns the
//! process exit code; errors bubble up as `anyhow::Error` and are printed by `main` (exit 2).

pub mod agent;
pub mod analyze;
pub mod authz;
pub mod ca;
pub mod cert;
pub mod controlplane;
pub mod describe;
pub mod echo;
pub mod envoy;
pub mod ext_authz;
pub mod iptables;
pub mod proxy;
pub mod proxy_config;
pub mod sidecar;
pub mod status;
pub mod token;
pub mod up;
