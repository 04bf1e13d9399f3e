//! `palisade sidecar`: a workload's agent (key, CSR, rotation) and proxy in one process; the
//! certificate goes from the agent's secret manager to the proxy in memory (no SDS socket).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use palisade_agent::{AgentMetrics, CaSource, CaSourceConfig, ManagerConfig, TokenFile};
use palisade_identity::{KeyType, TrustDomain};
use palisade_proxy::CertMaterial;
use tokio::sync::watch;

use super::proxy::ProxyArgs;
use super::token::parse_duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub proxy: ProxyArgs,
    /// The control plane's CA address.
    #[arg(long, value_name = "ADDR", default_value = palisade_ca::DEFAULT_LISTEN)]
    pub control_plane: String,
    /// The control plane's ADS address; default: the control plane's host, port 15010.
    #[arg(long, value_name = "ADDR")]
    pub xds_address: Option<String>,
    /// The mesh root certificate(s).
    #[arg(long, value_name = "FILE")]
    pub ca_root: PathBuf,
    /// File holding the service-account token (re-read before every CA request).
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// Workload key type: ecdsa-p256, ecdsa-p384 or rsa-2048.
    #[arg(long, value_name = "TYPE", default_value = "ecdsa-p256",
          value_parser = |s: &str| s.parse::<KeyType>().map_err(|e| e.to_string()))]
    pub key_type: KeyType,
    /// Requested certificate lifetime (e.g. 24h, 30m); the CA's default when absent.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub cert_ttl: Option<Duration>,
    /// Trust domain of the workload identity.
    #[arg(long, value_name = "TD", default_value = "cluster.local")]
    pub trust_domain: String,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let trust_domain = TrustDomain::new(&args.trust_domain)
        .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?;
    let ca_root_pem = palisade_identity::pem::read_file(&args.ca_root)?;
    let roots = palisade_identity::pem::parse_certs(&ca_root_pem)
        .with_context(|| format!("--ca-root {}", args.ca_root.display()))?;
    anyhow::ensure!(
        !roots.is_empty(),
        "--ca-root {}: no certificate",
        args.ca_root.display()
    );
    let token = TokenFile::new(&args.token_file);
    // A token that cannot be read now is a configuration mistake: say so at once.
    let (_, identity) = token.read_identity(&trust_domain)?;
    let xds = match &args.xds_address {
        Some(a) => a.clone(),
        None => {
            let host = args
                .control_plane
                .rsplit_once(':')
                .map_or(args.control_plane.as_str(), |(h, _)| h);
            format!("{host}:15010")
        }
    };
    tracing::info!(%identity, ca = %args.control_plane, %xds, "sidecar starting");
    let source = CaSource::new(CaSourceConfig {
        ca_addr: args.control_plane.clone(),
        ca_root_pem,
        token,
        trust_domain,
        key_type: args.key_type,
        ttl: args.cert_ttl,
        cluster_id: None,
        connect_timeout: Duration::from_secs(5),
    });
    let secrets = palisade_agent::manager::spawn(
        source,
        roots,
        ManagerConfig::default(),
        AgentMetrics::default(),
    );
    let mut state = secrets.subscribe();
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        // Keep the manager alive as long as we forward its state.
        let _secrets = secrets;
        loop {
            let current = state.borrow_and_update().clone();
            if let Some(svid) = &current.svid {
                tx.send_replace(Some(Arc::new(CertMaterial {
                    svid: svid.clone(),
                    roots: current.roots.clone(),
                })));
            }
            if state.changed().await.is_err() {
                return;
            }
        }
    });
    super::proxy::run_proxy(args.proxy.options(xds), rx).await
}
