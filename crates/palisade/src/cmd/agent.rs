//! `palisade agent`: the workload agent (key, CSR, rotation, SDS for the proxy, admin endpoint).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use palisade_agent::{Agent, AgentConfig, AgentError, CaSourceConfig, ManagerConfig, TokenFile};
use palisade_identity::pem::{FileMode, write_file_atomic};
use palisade_identity::{KeyType, TrustDomain};

use super::token::parse_duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The CA's address.
    #[arg(long, value_name = "ADDR", default_value = palisade_ca::DEFAULT_LISTEN)]
    pub ca_addr: String,
    /// The mesh root certificate(s): the CA must chain to them; also served as ROOTCA.
    #[arg(long, value_name = "FILE")]
    pub ca_root: PathBuf,
    /// File holding the service-account token (re-read before every request).
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// Unix socket to serve SDS on.
    #[arg(long, value_name = "PATH")]
    pub sds_socket: PathBuf,
    /// Workload key type: ecdsa-p256, ecdsa-p384 or rsa-2048.
    #[arg(long, value_name = "TYPE", default_value = "ecdsa-p256",
          value_parser = |s: &str| s.parse::<KeyType>().map_err(|e| e.to_string()))]
    pub key_type: KeyType,
    /// Requested certificate lifetime (e.g. 24h, 30m, 5s); the CA's default when absent.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub cert_ttl: Option<Duration>,
    /// Admin endpoint: /certs, /metrics (/stats), /healthz/ready. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15020")]
    pub admin: SocketAddr,
    /// Trust domain of the workload identity.
    #[arg(long, value_name = "TD", default_value = "cluster.local")]
    pub trust_domain: String,
    /// ClusterID metadata sent to the CA.
    #[arg(long, value_name = "NAME")]
    pub cluster_id: Option<String>,
    /// Write the bound admin address to this file once the agent listens.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// Also write key.pem, cert-chain.pem and root-cert.pem here on every rotation (by default
    /// the key never leaves memory).
    #[arg(long, value_name = "DIR")]
    pub write_certs: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let trust_domain = TrustDomain::new(&args.trust_domain)
        .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?;
    let ca_root_pem = palisade_identity::pem::read_file(&args.ca_root)?;
    let config = AgentConfig {
        ca: CaSourceConfig {
            ca_addr: args.ca_addr,
            ca_root_pem,
            token: TokenFile::new(&args.token_file),
            trust_domain,
            key_type: args.key_type,
            ttl: args.cert_ttl,
            cluster_id: args.cluster_id,
            connect_timeout: Duration::from_secs(5),
        },
        sds_socket: args.sds_socket,
        admin_addr: args.admin,
        write_certs: args.write_certs,
        manager: ManagerConfig::default(),
    };
    let agent = match Agent::start(config).await {
        Ok(agent) => agent,
        Err(AgentError::Root(e)) => anyhow::bail!("CA root {}: {e}", args.ca_root.display()),
        Err(e) => return Err(anyhow::Error::new(e).context("starting the agent")),
    };
    let admin = agent.admin_addr();
    // Tests and scripts read the address from this line or from the ready file.
    println!("palisade agent: admin listening on {admin}");
    if let Some(path) = &args.ready_file {
        write_file_atomic(path, format!("{admin}\n").as_bytes(), FileMode::Public)?;
    }
    super::controlplane::shutdown_signal().await;
    agent.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
