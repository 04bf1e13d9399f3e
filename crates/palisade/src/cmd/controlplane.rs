//! `palisade controlplane`: runs the CA (IstioCertificateService over TLS) from a state
//! directory and an optional `mesh.yaml`, and with `--config DIR` watches the mesh directory and
//! pushes each workload's config to its proxy over ADS. Its admin endpoint serves Prometheus
//! metrics on `/metrics` (docs/operations.md).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use palisade_ca::jwks::{IssuerConfig, JwksSource};
use palisade_ca::{CaKeyType, CaOptions, CaServer};
use palisade_identity::TrustDomain;
use palisade_policy::mesh::MeshConfig;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// State directory: CA key, token issuer key, root-cert.pem (created on first start).
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// Mesh config (trustDomain, trustDomainAliases, caTokenIssuers).
    #[arg(long, value_name = "FILE")]
    pub mesh: Option<PathBuf>,
    /// Address of the CA's gRPC port.
    #[arg(long, value_name = "ADDR", default_value = palisade_ca::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Key type of a newly created self-signed root: ecdsa-p256 or rsa-2048.
    #[arg(long, value_name = "TYPE", default_value = "ecdsa-p256", value_parser = parse_key_type)]
    pub ca_key_type: CaKeyType,
    /// Plug-in CA directory (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem): sign as
    /// this intermediate instead of the self-signed root.
    #[arg(long, value_name = "DIR")]
    pub plugin_ca: Option<PathBuf>,
    /// Refuse requests whose ClusterID metadata names another cluster.
    #[arg(long, value_name = "NAME")]
    pub cluster_id: Option<String>,
    /// Mesh directory (mesh.yaml, workloads, policies): watched, validated and pushed to
    /// proxies over ADS on `--xds-listen`. Its mesh.yaml is used when `--mesh` is not given.
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// Address of the ADS port (mutual TLS; proxies authenticate with their SVID).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15010")]
    pub xds_listen: SocketAddr,
    /// Lifetime of the ADS serving certificate, re-issued at half of it (e.g. 30d, 12h).
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_cert_ttl)]
    pub xds_cert_ttl: Duration,
    /// Admin endpoint: Prometheus metrics on /metrics (istiod's monitoring port). Port 0 picks
    /// a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15014")]
    pub admin: SocketAddr,
}

/// A certificate lifetime: whole seconds, at least one (certificates hold no less).
fn parse_cert_ttl(s: &str) -> Result<Duration, String> {
    let d = super::token::parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?}: a certificate lives at least 1s"));
    }
    Ok(d)
}

fn parse_key_type(s: &str) -> Result<CaKeyType, String> {
    s.parse()
        .map_err(|e: palisade_ca::signer::SignerError| e.to_string())
}

pub async fn run(mut args: Args) -> anyhow::Result<ExitCode> {
    if args.mesh.is_none() {
        args.mesh = args
            .config
            .as_ref()
            .map(|d| d.join("mesh.yaml"))
            .filter(|p| p.is_file());
    }
    let mesh = match &args.mesh {
        Some(path) => MeshConfig::load(path)?,
        None => MeshConfig::default(),
    };
    let mesh_dir = args.mesh.as_deref().and_then(Path::parent);
    let mut options = ca_options(&args.state, &mesh, mesh_dir)?;
    options.key_type = args.ca_key_type;
    options.plugin_dir = args.plugin_ca.clone();
    options.cluster_id = args.cluster_id.clone();

    let mut registry = palisade_ca::metrics::Registry::default();
    let server = CaServer::prepare(options, &mut registry)
        .await
        .context("starting the CA")?;
    let metrics = palisade_control::ControlMetrics::register(&mut registry);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, identity = %server.serving_identity(), root = %server.root_cert_path().display(), "CA listening");
    // Tests and scripts read the port from this line.
    println!("palisade controlplane: CA listening on {addr}");

    // Config push: kept alive (the watcher and the ADS tasks) until the CA stops.
    let proxies = palisade_control::ProxyRegistry::new();
    let _config = match &args.config {
        Some(dir) => Some(
            start_config_push(
                dir,
                &server,
                &mesh,
                args.xds_listen,
                args.xds_cert_ttl,
                metrics,
                proxies.clone(),
            )
            .await?,
        ),
        None => None,
    };

    let admin = tokio::net::TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding the admin endpoint {}", args.admin))?;
    let admin_addr = admin.local_addr()?;
    tokio::spawn(
        palisade_control::AdminServer::new(Arc::new(registry))
            .with_proxies(proxies)
            .serve(admin, std::future::pending()),
    );
    tracing::info!(addr = %admin_addr, "admin listening (/metrics, /debug/syncz)");
    println!("palisade controlplane: admin listening on {admin_addr}");

    server.serve(listener, shutdown_signal()).await?;
    tracing::info!("control plane stopped");
    Ok(ExitCode::SUCCESS)
}

/// What keeps config push running: the directory watcher, the ADS server and the rotation of
/// its serving certificate.
struct ConfigPush {
    _watcher: palisade_control::ConfigWatcher,
    _ads: tokio::task::JoinHandle<()>,
    _rotation: tokio::task::JoinHandle<()>,
}

/// Watches the mesh directory and serves ADS over mutual TLS with a serving certificate for the
/// control plane's identity, issued by this CA and rotated at half its lifetime.
async fn start_config_push(
    dir: &Path,
    server: &CaServer,
    mesh: &MeshConfig,
    listen: SocketAddr,
    cert_ttl: Duration,
    metrics: palisade_control::ControlMetrics,
    proxies: palisade_control::ProxyRegistry,
) -> anyhow::Result<ConfigPush> {
    let cache = Arc::new(palisade_xds::SnapshotCache::new());
    // JWKS keys of RequestAuthentications are fetched here and pushed inline to proxies, with
    // mesh.yaml's timings (the environment overrides them).
    let jwks = palisade_control::jwks::JwksResolver::with_metrics(
        palisade_control::jwks::JwksOptions::from_mesh(mesh),
        metrics.clone(),
    );
    // A directory that does not validate now is reported and watched, not fatal: the CA must
    // keep issuing certificates while someone fixes it (its first valid state is pushed).
    let watcher = palisade_control::ConfigWatcher::start_tolerant(dir, cache.clone(), Some(jwks))?;
    let (cert, rotation) = palisade_control::serving::start(
        Arc::clone(server.authority()),
        server.serving_identity().clone(),
        cert_ttl,
    )?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let ads = palisade_control::AdsServer::new(cache, watcher.snapshots())
        .with_status(watcher.status())
        .with_metrics(metrics)
        .with_proxies(proxies);
    let bundle = server.trust_bundle().clone();
    let task = tokio::spawn(async move {
        let cert = palisade_identity::CertSource::from(cert);
        if let Err(e) = ads
            .serve(listener, cert, &bundle, std::future::pending())
            .await
        {
            tracing::error!(error = %e, "ADS server stopped");
        }
    });
    tracing::info!(%addr, dir = %dir.display(), "ADS listening");
    println!("palisade controlplane: ADS listening on {addr}");
    Ok(ConfigPush {
        _watcher: watcher,
        _ads: task,
        _rotation: rotation,
    })
}

/// CA options from a mesh config: trust domain, aliases and `caTokenIssuers` (relative
/// `jwksFile` paths are relative to `mesh_dir`).
pub(crate) fn ca_options(
    state: &Path,
    mesh: &MeshConfig,
    mesh_dir: Option<&Path>,
) -> anyhow::Result<CaOptions> {
    let trust_domain = TrustDomain::new(&mesh.trust_domain)
        .with_context(|| format!("trustDomain {:?}", mesh.trust_domain))?;
    let aliases = mesh
        .trust_domain_aliases
        .iter()
        .map(|a| TrustDomain::new(a).with_context(|| format!("trustDomainAliases: {a:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mesh_dir = mesh_dir.unwrap_or(Path::new(""));
    let extra_issuers = mesh
        .ca_token_issuers
        .iter()
        .map(|i| issuer_config(i, mesh_dir))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut options = CaOptions::new(state, trust_domain);
    options.trust_domain_aliases = aliases;
    options.extra_issuers = extra_issuers;
    Ok(options)
}

fn issuer_config(
    issuer: &palisade_policy::mesh::TokenIssuer,
    mesh_dir: &Path,
) -> anyhow::Result<IssuerConfig> {
    let jwks = match (&issuer.jwks_file, &issuer.jwks_uri, &issuer.jwks) {
        (Some(file), None, None) => JwksSource::File(mesh_dir.join(file)),
        (None, Some(uri), None) => JwksSource::Uri(uri.clone()),
        (None, None, Some(inline)) => JwksSource::Inline(inline.clone()),
        _ => anyhow::bail!(
            "caTokenIssuers[{}]: set exactly one of jwksFile, jwksUri, jwks",
            issuer.issuer
        ),
    };
    Ok(IssuerConfig {
        issuer: issuer.issuer.clone(),
        jwks,
    })
}

/// Completes on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}
