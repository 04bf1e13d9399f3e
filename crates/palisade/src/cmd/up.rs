//! `palisade up DIR`: a whole mesh from one directory on this machine, no Kubernetes.
//!
//! Today it validates the directory (every error at once), starts the control plane's CA on
//! loopback, and gives every WorkloadEntry its identity end to end over the real CA API: a
//! service-account token from the control plane's issuer, a fresh key, a CSR over TLS, and a
//! checked chain back. The sidecars that use those identities come with the proxy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use palisade_ca::{CaClient, CaClientOptions, CaServer, TokenIssuer, ISTIO_CA_AUDIENCE};
use palisade_identity::{CertInfo, KeyType, SpiffeId, TrustDomain};
use palisade_policy::MeshSnapshot;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The mesh directory: mesh.yaml, WorkloadEntries and security policies.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Control plane state (CA key, token issuer key, root-cert.pem), kept between runs.
    /// Default: a directory named after DIR under the system temporary directory.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Address of the control plane's CA.
    #[arg(long, value_name = "ADDR", default_value = palisade_ca::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Lifetime of the workload certificates.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = super::token::parse_duration)]
    pub cert_ttl: Duration,
    /// Issue the identities, print the summary and exit instead of serving until Ctrl-C.
    #[arg(long)]
    pub once: bool,
}

/// One workload's identity as issued.
struct Issued {
    key: String,
    id: SpiffeId,
    address: String,
    ports: String,
    serial: String,
    not_after: String,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let dir = &args.dir;
    let snapshot = match palisade_policy::load_dir(dir) {
        Ok(s) => s,
        Err(errors) => {
            eprintln!("{} is not a valid mesh directory:", dir.display());
            eprintln!("{errors}");
            return Ok(ExitCode::from(2));
        }
    };
    for warning in &snapshot.warnings {
        eprintln!("{warning}");
    }
    if snapshot.workload_entries.is_empty() {
        bail!(
            "{}: no WorkloadEntry found: nothing to run (see examples/bookinfo/workloads.yaml)",
            dir.display()
        );
    }

    let state = match &args.state {
        Some(s) => s.clone(),
        None => default_state_dir(dir),
    };
    let mesh_file = dir.join("mesh.yaml");
    let options = super::controlplane::ca_options(&state, &snapshot.mesh, mesh_file.parent())?;
    let trust_domain = options.trust_domain.clone();
    let mut registry = palisade_ca::metrics::Registry::default();
    let server = CaServer::prepare(options, &mut registry)
        .await
        .context("starting the CA")?;
    let root_path = server.root_cert_path().to_path_buf();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the CA to {} (use --listen to pick another)", args.listen))?;
    let ca_addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ca = tokio::spawn(server.serve(listener, async {
        let _ = stop_rx.await;
    }));
    eprintln!("control plane: CA on {ca_addr}, state in {}", state.display());

    let result = issue_all(&snapshot, &state, &root_path, ca_addr, &trust_domain, args.cert_ttl).await;
    let issued = match result {
        Ok(i) => i,
        Err(e) => {
            let _ = stop_tx.send(());
            let _ = ca.await;
            return Err(e);
        }
    };
    print_summary(&snapshot, &issued, dir, ca_addr, &root_path);

    if !args.once {
        eprintln!("\nserving; Ctrl-C stops everything");
        super::controlplane::shutdown_signal().await;
    }
    let _ = stop_tx.send(());
    match ca.await {
        Ok(r) => r.context("CA server")?,
        Err(e) => bail!("CA task failed: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Issues every workload's identity through the CA's gRPC API, as an agent would.
async fn issue_all(
    snapshot: &MeshSnapshot,
    state: &Path,
    root_path: &Path,
    ca_addr: SocketAddr,
    trust_domain: &TrustDomain,
    ttl: Duration,
) -> anyhow::Result<Vec<Issued>> {
    let tokens = TokenIssuer::load_or_create(state).context("loading the token issuer")?;
    let root_pem = std::fs::read(root_path).with_context(|| format!("reading {}", root_path.display()))?;
    let client = CaClient::connect(
        &ca_addr.to_string(),
        &root_pem,
        CaClientOptions {
            trust_domain: Some(trust_domain.clone()),
            ..CaClientOptions::default()
        },
    )
    .await
    .context("connecting to the CA")?;

    let total = snapshot.workload_entries.len();
    let mut issued = Vec::with_capacity(total);
    for (i, entry) in snapshot.workload_entries.iter().enumerate() {
        let w = &entry.resource;
        let key = w.key();
        let ns = w.metadata.namespace();
        let sa = w.service_account();
        eprintln!("[{}/{total}] issuing identity for {key}", i + 1);
        let id = SpiffeId::for_service_account(trust_domain.clone(), ns, sa)
            .with_context(|| format!("WorkloadEntry {key}: cannot form a SPIFFE ID"))?;
        let token = tokens
            .issue(ns, sa, &[ISTIO_CA_AUDIENCE.to_owned()], Duration::from_secs(600))
            .with_context(|| format!("{key}: issuing a service-account token"))?;
        let material = palisade_identity::generate_key_and_csr(&id, KeyType::EcdsaP256)
            .with_context(|| format!("{key}: generating a key and CSR"))?;
        let chain = client
            .create_certificate(&material.csr_pem, Some(&token), Some(ttl), None)
            .await
            .with_context(|| format!("{key}: CSR refused"))?;
        let leaf_pem = chain.first().context("empty chain")?;
        let leaf_der = palisade_identity::pem::parse_certs(leaf_pem.as_bytes())?
            .into_iter()
            .next()
            .context("no certificate in the leaf PEM")?;
        let info = CertInfo::parse(&leaf_der)?;
        let got = info.spiffe_id()?;
        if got != id {
            bail!("{key}: the CA issued {got}, expected {id}");
        }
        let resolved = snapshot.resolve_workload(&key);
        let ports = w
            .spec
            .ports
            .iter()
            .map(|(name, port)| {
                let mode = u16::try_from(*port)
                    .ok()
                    .and_then(|p| resolved.as_ref().map(|r| r.mtls.for_port(p).mode.to_string()))
                    .unwrap_or_else(|| "?".to_owned());
                format!("{name}:{port}/{mode}")
            })
            .collect::<Vec<_>>()
            .join(" ");
        issued.push(Issued {
            key,
            id,
            address: w.spec.address.clone(),
            ports,
            serial: info.serial.clone(),
            not_after: info
                .not_after
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| info.not_after.to_string()),
        });
    }
    eprintln!("{total} identities issued and verified\n");
    Ok(issued)
}

fn print_summary(
    snapshot: &MeshSnapshot,
    issued: &[Issued],
    dir: &Path,
    ca_addr: SocketAddr,
    root: &Path,
) {
    let rows: Vec<[String; 6]> = issued
        .iter()
        .map(|i| {
            [
                i.key.clone(),
                i.id.to_string(),
                i.address.clone(),
                i.ports.clone(),
                i.serial.chars().take(16).collect(),
                i.not_after.clone(),
            ]
        })
        .collect();
    let header = ["WORKLOAD", "IDENTITY", "ADDRESS", "PORTS (mTLS)", "SERIAL", "NOT AFTER"];
    print_table(&header, &rows);
    let policies = snapshot.authorization_policies.len()
        + snapshot.peer_authentications.len()
        + snapshot.request_authentications.len();
    println!("\n{policies} security policies loaded from {}.", dir.display());
    if let Some(first) = issued.first() {
        let d = dir.display();
        let state = root.parent().unwrap_or(Path::new(".")).display();
        let (ns, sa) = first.id.workload().unwrap_or(("default", "default"));
        println!("Try:");
        println!("  palisade describe workload {} --config {d}", first.key);
        println!("  palisade analyze --config {d}");
        println!(
            "  palisade token issue --state {state} --namespace {ns} --service-account {sa} > token"
        );
        println!(
            "  palisade cert request --ca-addr {ca_addr} --ca-root {} --token-file token --out certs",
            root.display()
        );
    }
}

/// Prints rows under a header, columns padded to their widest cell.
pub(crate) fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// A per-directory state path, so that two meshes never share a CA by accident.
fn default_state_dir(dir: &Path) -> PathBuf {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let name: String = canonical
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    std::env::temp_dir().join("palisade-up").join(name.trim_matches('-'))
}
