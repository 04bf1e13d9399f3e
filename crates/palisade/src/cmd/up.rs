//! `palisade up DIR`: a whole mesh from one directory on this machine, no Kubernetes.
//!
//! It validates the directory (every error at once), then runs and supervises child processes:
//! the control plane (`palisade controlplane --config DIR`, which watches DIR and pushes every
//! change), one sidecar per WorkloadEntry on the workload's own loopback address (the lean
//! `palisade-sidecar` binary when it sits next to this one, else `palisade sidecar`), and a demo
//! application (`palisade echo`) where the WorkloadEntry asks for one with the annotation
//! `palisade.dev/demo-app: echo`. A WorkloadEntry annotated `palisade.dev/proxy: envoy` gets a
//! real Envoy instead of Palisade's sidecar, with `palisade agent` serving it certificates over
//! SDS and the control plane its config over ADS (`palisade envoy bootstrap`); where no Envoy is
//! installed (`scripts/install-envoy.sh`, or `PALISADE_ENVOY`), `up` says so and runs Palisade's
//! sidecar for it, which decides the same.
//!
//! Children are separate processes so that each can fail (or be killed) on its own: a child that
//! exits is restarted with backoff and reported, with the same addresses, so the others never
//! notice more than a reconnect. They run in their own process group: Ctrl-C reaches `up` alone,
//! which then stops every child before it exits. Should `up` die without that (SIGKILL, a
//! crash), the kernel kills them too: each child sets Linux's parent-death signal at start
//! ([`crate::cli::exit_with_parent`]). Their logs go to `STATE/logs/`; `STATE/up.json` tells
//! `palisade status` what is running where.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use palisade_ca::{ISTIO_CA_AUDIENCE, TokenIssuer};
use palisade_identity::{SpiffeId, TrustDomain};
use palisade_policy::MeshSnapshot;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;

/// The WorkloadEntry annotation that asks `up` for a demo application beside the sidecar.
pub const DEMO_APP_ANNOTATION: &str = "palisade.dev/demo-app";
/// The WorkloadEntry annotation that picks the sidecar: `palisade` (default) or `envoy`.
pub const PROXY_ANNOTATION: &str = "palisade.dev/proxy";
/// The agent's admin port beside an Envoy (istio-agent's).
pub const AGENT_ADMIN_PORT: u16 = 15020;
/// Sidecar admin and outbound ports, on the workload's own address.
pub const ADMIN_PORT: u16 = 15000;
pub const OUTBOUND_PORT: u16 = 15001;
/// The file in the state directory that describes the running mesh.
pub const STATE_FILE: &str = "up.json";
/// Lifetime of the service-account tokens `up` hands to its sidecars (re-issued on restart).
const TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long to wait for every sidecar's first certificate and config.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The mesh directory: mesh.yaml, WorkloadEntries, ServiceEntries and security policies.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Control plane state (CA key, token issuer key, root-cert.pem), logs and `up.json`, kept
    /// between runs. Default: a directory named after DIR under the system temporary directory.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Address of the control plane's CA; port 0 picks a free port (kept across restarts).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub ca_listen: SocketAddr,
    /// Address of the control plane's ADS; port 0 picks a free port (kept across restarts).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub xds_listen: SocketAddr,
    /// Address of the control plane's admin endpoint (Prometheus /metrics); port 0 picks a free
    /// port (kept across restarts).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub controlplane_admin: SocketAddr,
    /// Lifetime of the workload certificates (rotated at half-life).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = super::token::parse_duration)]
    pub cert_ttl: Duration,
}

/// `STATE/up.json`: what `palisade status` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpState {
    /// The mesh directory.
    pub dir: PathBuf,
    pub state: PathBuf,
    pub ca: String,
    pub xds: String,
    /// The control plane's admin endpoint (`/metrics`).
    #[serde(default)]
    pub controlplane_admin: Option<String>,
    pub root: PathBuf,
    pub logs: PathBuf,
    /// Process id of `palisade up`.
    pub pid: u32,
    pub workloads: Vec<UpWorkload>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpWorkload {
    /// namespace/name.
    pub workload: String,
    pub identity: String,
    pub address: String,
    /// `name:port/MODE` per port.
    pub ports: Vec<String>,
    pub admin: String,
    pub outbound: String,
    /// The demo application's address, when `up` runs one.
    pub app: Option<String>,
    pub log: PathBuf,
    /// `envoy` when an Envoy is the sidecar (beside `palisade agent`); absent: Palisade's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// The agent's admin endpoint, for an Envoy sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_admin: Option<String>,
}

impl UpWorkload {
    /// Whether an Envoy serves this workload.
    pub fn is_envoy(&self) -> bool {
        self.proxy.as_deref() == Some("envoy")
    }
}

/// One workload as `up` runs it.
struct Planned {
    info: UpWorkload,
    namespace: String,
    service_account: String,
    /// workload port -> application port (demo apps only).
    app_ports: BTreeMap<u16, u16>,
}

/// Where Envoy is: `PALISADE_ENVOY`, else `envoy` on the PATH, else what
/// `scripts/install-envoy.sh` installs (`.tools/envoy-venv/bin/envoy`) under the working
/// directory or a directory above the `palisade` binary (`target/release/..`).
pub fn find_envoy(exe: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("PALISADE_ENVOY") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("PALISADE_ENVOY={} is not a file", p.display()))
        };
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|d| d.join("envoy"));
    let installed = std::env::current_dir()
        .into_iter()
        .chain(exe.ancestors().skip(1).map(Path::to_path_buf))
        .map(|d| d.join(".tools/envoy-venv/bin/envoy"));
    on_path
        .chain(installed)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "no envoy binary (run scripts/install-envoy.sh, or set PALISADE_ENVOY)".to_owned()
        })
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("mesh directory {}", args.dir.display()))?;
    let snapshot = match palisade_policy::load_dir(&dir) {
        Ok(s) => s,
        Err(errors) => {
            eprintln!("{} is not a valid mesh directory:", args.dir.display());
            eprintln!("{errors}");
            return Ok(ExitCode::from(2));
        }
    };
    for warning in &snapshot.warnings {
        eprintln!("warning: {warning}");
    }
    if snapshot.workload_entries.is_empty() {
        bail!(
            "{}: no WorkloadEntry found: nothing to run (see examples/bookinfo/workloads.yaml)",
            args.dir.display()
        );
    }
    let state = match &args.state {
        Some(s) => s.clone(),
        None => default_state_dir(&dir),
    };
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let state = state.canonicalize()?;
    let logs = state.join("logs");
    let run_dir = state.join("run");
    let tokens_dir = state.join("tokens");
    for d in [&logs, &run_dir, &tokens_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // The token issuer's key exists before the control plane starts, so both load the same one.
    let tokens = Arc::new(TokenIssuer::load_or_create(&state).context("loading the token issuer")?);
    let trust_domain = TrustDomain::new(&snapshot.mesh.trust_domain)
        .with_context(|| format!("trustDomain {:?}", snapshot.mesh.trust_domain))?;
    let exe = std::env::current_exe().context("locating the palisade binary")?;
    let wants_envoy: Vec<String> = snapshot
        .workload_entries
        .iter()
        .filter(|w| {
            w.resource
                .metadata
                .annotations
                .get(PROXY_ANNOTATION)
                .map(String::as_str)
                == Some("envoy")
        })
        .map(|w| w.resource.key())
        .collect();
    let envoy = if wants_envoy.is_empty() {
        None
    } else {
        match find_envoy(&exe) {
            Ok(p) => Some(p),
            Err(why) => {
                eprintln!(
                    "{} ask for Envoy ({PROXY_ANNOTATION}: envoy), but {why}: Palisade's sidecar runs instead, and decides the same",
                    wants_envoy.join(", ")
                );
                None
            }
        }
    };
    let planned = plan(&snapshot, &trust_domain, &logs, envoy.as_deref())?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut supervisors = Vec::new();

    // The control plane first: the sidecars need its CA and ADS.
    let ca = pick_addr(args.ca_listen)?;
    let xds = pick_addr(args.xds_listen)?;
    let cp_admin = pick_addr(args.controlplane_admin)?;
    let sidecar = SidecarProgram::next_to(&exe);
    if let Some(why) = &sidecar.fallback {
        eprintln!("{why}");
    }
    let cp = ChildSpec {
        name: "control plane".into(),
        exe: exe.clone(),
        args: os_args([
            "controlplane".as_ref(),
            "--state".as_ref(),
            state.as_os_str(),
            "--config".as_ref(),
            dir.as_os_str(),
            "--listen".as_ref(),
            ca.to_string().as_ref(),
            "--xds-listen".as_ref(),
            xds.to_string().as_ref(),
            "--admin".as_ref(),
            cp_admin.to_string().as_ref(),
        ]),
        env: Vec::new(),
        log: logs.join("controlplane.log"),
        pid_file: run_dir.join("controlplane.pid"),
        report: Report::WarnAndError,
        before_start: None,
    };
    supervisors.push(tokio::spawn(supervise(cp, stop_rx.clone())));
    eprintln!(
        "control plane: CA on {ca}, ADS on {xds}, metrics on http://{cp_admin}/metrics, state in {}",
        state.display()
    );
    let root = state.join("root-cert.pem");
    let cp_up = wait_until(Duration::from_secs(30), async || {
        root.is_file()
            && tokio::net::TcpStream::connect(ca).await.is_ok()
            && tokio::net::TcpStream::connect(xds).await.is_ok()
    })
    .await;
    if !cp_up {
        let _ = stop_tx.send(true);
        for s in supervisors {
            let _ = s.await;
        }
        bail!(
            "the control plane did not start within 30 s; see {}",
            logs.join("controlplane.log").display()
        );
    }

    let total = planned.len();
    eprintln!("starting {total} sidecars; each asks the CA for its certificate:");
    let mut refreshers: Vec<Hook> = Vec::new();
    for p in &planned {
        let key = &p.info.workload;
        let file = key.replace('/', "-");
        let ready = run_dir.join(format!("{file}.ready"));
        let token = tokens_dir.join(format!("{file}.jwt"));
        // A fresh token on every (re)start and every day: the sidecar re-reads it before every
        // CA request, so certificate rotation never meets an expired token.
        let refresh: Hook = {
            let tokens = tokens.clone();
            let (ns, sa) = (p.namespace.clone(), p.service_account.clone());
            let token = token.clone();
            Arc::new(move || -> anyhow::Result<()> {
                let jwt = tokens.issue(&ns, &sa, &[ISTIO_CA_AUDIENCE.to_owned()], TOKEN_TTL)?;
                write_private(&token, jwt.as_bytes())
            })
        };
        refreshers.push(Arc::clone(&refresh));
        let issue: Hook = {
            let ready = ready.clone();
            Arc::new(move || -> anyhow::Result<()> {
                let _ = std::fs::remove_file(&ready);
                refresh()
            })
        };
        if let (Some(envoy), true) = (&envoy, p.info.is_envoy()) {
            let sds = run_dir.join(format!("{file}.sds.sock"));
            let bootstrap = palisade_envoy::bootstrap::bootstrap(
                &palisade_envoy::bootstrap::BootstrapOptions {
                    workload: key.clone(),
                    xds_address: xds.to_string(),
                    sds_socket: sds.clone(),
                    app_ports: p.app_ports.clone(),
                    admin: p.info.admin.clone(),
                    outbound: p.info.outbound.clone(),
                    tcp_upstreams: Vec::new(),
                    delta: false,
                },
            )?;
            let bootstrap_file = run_dir.join(format!("{file}-envoy.json"));
            std::fs::write(&bootstrap_file, serde_json::to_vec_pretty(&bootstrap)?)
                .with_context(|| format!("writing {}", bootstrap_file.display()))?;
            let agent = ChildSpec {
                name: format!("agent {key}"),
                exe: exe.clone(),
                args: os_args([
                    "agent".as_ref(),
                    "--ca-addr".as_ref(),
                    ca.to_string().as_ref(),
                    "--ca-root".as_ref(),
                    root.as_os_str(),
                    "--token-file".as_ref(),
                    token.as_os_str(),
                    "--trust-domain".as_ref(),
                    trust_domain.as_str().as_ref(),
                    "--cert-ttl".as_ref(),
                    format!("{}s", args.cert_ttl.as_secs()).as_ref(),
                    "--sds-socket".as_ref(),
                    sds.as_os_str(),
                    "--admin".as_ref(),
                    p.info.agent_admin.clone().unwrap_or_default().as_ref(),
                ]),
                env: Vec::new(),
                log: logs.join(format!("agent-{file}.log")),
                pid_file: run_dir.join(format!("agent-{file}.pid")),
                report: Report::Error,
                before_start: Some(issue),
            };
            supervisors.push(tokio::spawn(supervise(agent, stop_rx.clone())));
            let spec = ChildSpec {
                name: format!("envoy {key}"),
                exe: envoy.clone(),
                args: os_args([
                    "--config-path".as_ref(),
                    bootstrap_file.as_os_str(),
                    // Several Envoys on one machine: no shared memory for hot restart.
                    "--disable-hot-restart".as_ref(),
                    "--concurrency".as_ref(),
                    "1".as_ref(),
                    "--log-level".as_ref(),
                    "warning".as_ref(),
                    "--component-log-level".as_ref(),
                    "rbac:debug".as_ref(),
                ]),
                env: Vec::new(),
                log: p.info.log.clone(),
                pid_file: run_dir.join(format!("sidecar-{file}.pid")),
                report: Report::Error,
                before_start: None,
            };
            supervisors.push(tokio::spawn(supervise(spec, stop_rx.clone())));
            if let Some(app) = &p.info.app {
                supervisors.push(tokio::spawn(supervise(
                    demo_app(&exe, key, app, &p.info.outbound, &logs, &run_dir),
                    stop_rx.clone(),
                )));
            }
            continue;
        }
        let mut sidecar_args: Vec<OsString> = sidecar.prefix.clone();
        sidecar_args.extend(os_args([
            "--workload".as_ref(),
            key.as_ref(),
            "--control-plane".as_ref(),
            ca.to_string().as_ref(),
            "--xds-address".as_ref(),
            xds.to_string().as_ref(),
            "--ca-root".as_ref(),
            root.as_os_str(),
            "--token-file".as_ref(),
            token.as_os_str(),
            "--trust-domain".as_ref(),
            trust_domain.as_str().as_ref(),
            "--cert-ttl".as_ref(),
            format!("{}s", args.cert_ttl.as_secs()).as_ref(),
            "--admin".as_ref(),
            p.info.admin.as_ref(),
            "--outbound".as_ref(),
            p.info.outbound.as_ref(),
            "--ready-file".as_ref(),
            ready.as_os_str(),
        ]));
        for (port, app) in &p.app_ports {
            sidecar_args.push("--app-port".into());
            sidecar_args.push(format!("{port}={app}").into());
        }
        let spec = ChildSpec {
            name: format!("sidecar {key}"),
            exe: sidecar.exe.clone(),
            args: sidecar_args,
            env: Vec::new(),
            log: p.info.log.clone(),
            pid_file: run_dir.join(format!("sidecar-{file}.pid")),
            report: Report::Error,
            before_start: Some(issue),
        };
        supervisors.push(tokio::spawn(supervise(spec, stop_rx.clone())));
        if let Some(app) = &p.info.app {
            supervisors.push(tokio::spawn(supervise(
                demo_app(&exe, key, app, &p.info.outbound, &logs, &run_dir),
                stop_rx.clone(),
            )));
        }
    }

    supervisors.push(tokio::spawn(refresh_tokens(refreshers, stop_rx.clone())));

    // Progress: a sidecar writes its ready file once it holds a certificate and its config and
    // its listeners are open.
    let started = Instant::now();
    let mut pending: Vec<&Planned> = planned.iter().collect();
    let mut done = 0;
    let mut stop = std::pin::pin!(super::controlplane::shutdown_signal());
    while !pending.is_empty() && started.elapsed() < READY_TIMEOUT {
        let mut still = Vec::new();
        for p in pending {
            if sidecar_ready(&p.info, &run_dir).await {
                done += 1;
                let cert = cert_summary(p.info.agent_admin.as_ref().unwrap_or(&p.info.admin)).await;
                eprintln!(
                    "  [{done}/{total}] {:<24} {}  ({:.1}s)",
                    p.info.workload,
                    cert,
                    started.elapsed().as_secs_f32()
                );
            } else {
                still.push(p);
            }
        }
        pending = still;
        tokio::select! {
            () = &mut stop => {
                eprintln!("stopping");
                return shutdown(&stop_tx, supervisors, &state).await;
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    for p in &pending {
        eprintln!(
            "  {} is not ready after {}s; see {}",
            p.info.workload,
            READY_TIMEOUT.as_secs(),
            p.info.log.display()
        );
    }

    let up_state = UpState {
        dir: dir.clone(),
        state: state.clone(),
        ca: ca.to_string(),
        xds: xds.to_string(),
        controlplane_admin: Some(cp_admin.to_string()),
        root: root.clone(),
        logs: logs.clone(),
        pid: std::process::id(),
        workloads: planned.iter().map(|p| p.info.clone()).collect(),
    };
    let state_file = state.join(STATE_FILE);
    std::fs::write(&state_file, serde_json::to_vec_pretty(&up_state)?)
        .with_context(|| format!("writing {}", state_file.display()))?;
    print_summary(&snapshot, &up_state);
    eprintln!(
        "\nserving; policy edits in {} apply live; Ctrl-C stops everything",
        dir.display()
    );
    stop.await;
    eprintln!("stopping");
    shutdown(&stop_tx, supervisors, &state).await
}

/// The demo application of `key`, calling out through `outbound`.
fn demo_app(
    exe: &Path,
    key: &str,
    app: &str,
    outbound: &str,
    logs: &Path,
    run_dir: &Path,
) -> ChildSpec {
    let file = key.replace('/', "-");
    ChildSpec {
        name: format!("demo app {key}"),
        exe: exe.to_path_buf(),
        args: os_args([
            "echo".as_ref(),
            "--listen".as_ref(),
            app.as_ref(),
            "--name".as_ref(),
            key.as_ref(),
            "--outbound".as_ref(),
            outbound.as_ref(),
        ]),
        env: Vec::new(),
        log: logs.join(format!("echo-{file}.log")),
        pid_file: run_dir.join(format!("echo-{file}.pid")),
        report: Report::Error,
        before_start: None,
    }
}

/// Whether a workload's sidecar serves: Palisade's writes its ready file once it holds a
/// certificate and its config with its listeners open; an Envoy says LIVE on its admin
/// endpoint once its listeners got their config and secrets.
async fn sidecar_ready(w: &UpWorkload, run_dir: &Path) -> bool {
    if w.is_envoy() {
        matches!(
            super::echo::http_get(&w.admin, "/ready").await,
            Ok((200, body)) if body.trim() == "LIVE"
        )
    } else {
        let file = w.workload.replace('/', "-");
        run_dir.join(format!("{file}.ready")).is_file()
    }
}

async fn shutdown(
    stop_tx: &watch::Sender<bool>,
    supervisors: Vec<tokio::task::JoinHandle<()>>,
    state: &Path,
) -> anyhow::Result<ExitCode> {
    let _ = stop_tx.send(true);
    for s in supervisors {
        let _ = s.await;
    }
    let _ = std::fs::remove_file(state.join(STATE_FILE));
    eprintln!("all processes stopped");
    Ok(ExitCode::SUCCESS)
}

/// Addresses, ports and demo applications of every workload.
fn plan(
    snapshot: &MeshSnapshot,
    trust_domain: &TrustDomain,
    logs: &Path,
    envoy: Option<&Path>,
) -> anyhow::Result<Vec<Planned>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for entry in &snapshot.workload_entries {
        let w = &entry.resource;
        let key = w.key();
        let ns = w.metadata.namespace().to_owned();
        let sa = w.service_account().to_owned();
        let Ok(ip) = w.spec.address.parse::<IpAddr>() else {
            errors.push(format!(
                "{key}: address {:?} is not an IP address (up runs every workload on its own loopback address)",
                w.spec.address
            ));
            continue;
        };
        if !ip.is_loopback() {
            errors.push(format!(
                "{key}: address {ip} is not a loopback address (use 127.0.0.0/8)"
            ));
            continue;
        }
        let id = match SpiffeId::for_service_account(trust_domain.clone(), &ns, &sa) {
            Ok(id) => id,
            Err(e) => {
                errors.push(format!("{key}: cannot form a SPIFFE ID: {e}"));
                continue;
            }
        };
        let resolved = snapshot.resolve_workload(&key);
        let mut ports = Vec::new();
        let mut numbers = Vec::new();
        for (name, port) in &w.spec.ports {
            let Ok(p) = u16::try_from(*port) else {
                errors.push(format!("{key}: port {name}: {port} is out of range"));
                continue;
            };
            if p == ADMIN_PORT || p == OUTBOUND_PORT {
                errors.push(format!(
                    "{key}: port {name}: {p} is the sidecar's own (admin {ADMIN_PORT}, outbound {OUTBOUND_PORT})"
                ));
            }
            let mode = resolved
                .as_ref()
                .map_or_else(|| "?".to_owned(), |r| r.mtls.for_port(p).mode.to_string());
            ports.push(format!("{name}:{p}/{mode}"));
            numbers.push(p);
        }
        let demo = w.metadata.annotations.get(DEMO_APP_ANNOTATION);
        let (app, app_ports) = match demo.map(String::as_str) {
            None => (None, BTreeMap::new()),
            Some("echo") => {
                let app = pick_addr(SocketAddr::from(([127, 0, 0, 1], 0)))?;
                let map = numbers.iter().map(|&p| (p, app.port())).collect();
                (Some(app.to_string()), map)
            }
            Some(other) => {
                errors.push(format!(
                    "{key}: annotation {DEMO_APP_ANNOTATION}: unknown demo app {other:?} (known: echo)"
                ));
                continue;
            }
        };
        let proxy = match w
            .metadata
            .annotations
            .get(PROXY_ANNOTATION)
            .map(String::as_str)
        {
            None | Some("palisade") => None,
            // Without Envoy, Palisade's sidecar stands in (`run` said so).
            Some("envoy") => envoy.map(|_| "envoy".to_owned()),
            Some(other) => {
                errors.push(format!(
                    "{key}: annotation {PROXY_ANNOTATION}: unknown proxy {other:?} (known: palisade, envoy)"
                ));
                continue;
            }
        };
        let agent_admin = proxy
            .is_some()
            .then(|| SocketAddr::new(ip, AGENT_ADMIN_PORT).to_string());
        let file = key.replace('/', "-");
        out.push(Planned {
            info: UpWorkload {
                workload: key,
                identity: id.to_string(),
                address: ip.to_string(),
                ports,
                admin: SocketAddr::new(ip, ADMIN_PORT).to_string(),
                outbound: SocketAddr::new(ip, OUTBOUND_PORT).to_string(),
                app,
                log: logs.join(format!("sidecar-{file}.log")),
                proxy,
                agent_admin,
            },
            namespace: ns,
            service_account: sa,
            app_ports,
        });
    }
    if !errors.is_empty() {
        bail!("cannot run this mesh:\n  {}", errors.join("\n  "));
    }
    Ok(out)
}

/// The program `up` runs as each sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarProgram {
    pub exe: PathBuf,
    /// Arguments before the sidecar's own (`sidecar` for the `palisade` binary).
    pub prefix: Vec<OsString>,
    /// Why the lean binary is not used, for the user.
    pub fallback: Option<String>,
}

/// The lean sidecar binary's file name.
pub const SIDECAR_BIN: &str = "palisade-sidecar";

impl SidecarProgram {
    /// `palisade-sidecar` next to `exe` (the running `palisade`): less code mapped, less memory
    /// per sidecar. Without it (`cargo run` builds only the `palisade` binary), `exe sidecar`,
    /// which runs the same code.
    pub fn next_to(exe: &Path) -> Self {
        let lean = exe.with_file_name(format!("{SIDECAR_BIN}{}", std::env::consts::EXE_SUFFIX));
        if lean.is_file() {
            return Self {
                exe: lean,
                prefix: Vec::new(),
                fallback: None,
            };
        }
        Self {
            exe: exe.to_path_buf(),
            prefix: vec!["sidecar".into()],
            fallback: Some(format!(
                "sidecars run `{} sidecar`: no {} next to it (`cargo run` builds only the palisade binary; `cargo build --release` builds both)",
                exe.display(),
                lean.display()
            )),
        }
    }
}

/// `addr` itself, or with port 0 a port that is free now (so that restarts reuse it).
fn pick_addr(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    Ok(l.local_addr()?)
}

fn os_args<const N: usize>(args: [&std::ffi::OsStr; N]) -> Vec<OsString> {
    args.iter().map(|a| a.to_os_string()).collect()
}

/// Writes a secret readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

async fn wait_until(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The leaf certificate in a `/certs` document: a Palisade sidecar's (`certificates[0]`) or a
/// `palisade agent`'s (the `default` secret).
pub(crate) fn leaf_of(certs: &serde_json::Value) -> &serde_json::Value {
    match certs["secrets"].as_array() {
        Some(secrets) => secrets
            .iter()
            .find(|s| s["resource_name"] == "default")
            .unwrap_or(&serde_json::Value::Null),
        None => &certs["certificates"][0],
    }
}

/// "serial 1a2b..., expires 2025-..." from a sidecar's or an agent's admin endpoint.
async fn cert_summary(admin: &str) -> String {
    let Ok((200, body)) = super::echo::http_get(admin, "/certs").await else {
        return "ready".into();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let c = leaf_of(&v);
    format!(
        "certificate {} serial {}.., expires {}",
        c["identity"].as_str().unwrap_or("?"),
        c["serial_number"]
            .as_str()
            .unwrap_or("?")
            .chars()
            .take(12)
            .collect::<String>(),
        c["not_after"].as_str().unwrap_or("?")
    )
}

fn print_summary(snapshot: &MeshSnapshot, s: &UpState) {
    println!();
    let rows: Vec<[String; 7]> = s
        .workloads
        .iter()
        .map(|w| {
            [
                w.workload.clone(),
                w.identity.clone(),
                w.address.clone(),
                w.ports.join(" "),
                if w.is_envoy() { "envoy" } else { "palisade" }.to_owned(),
                w.admin.clone(),
                w.app
                    .clone()
                    .map_or_else(|| "-".into(), |a| format!("echo on {a}")),
            ]
        })
        .collect();
    let header = [
        "WORKLOAD",
        "IDENTITY",
        "ADDRESS",
        "PORTS (mTLS)",
        "SIDECAR",
        "SIDECAR ADMIN",
        "APP",
    ];
    print_table(&header, &rows);
    let policies = snapshot.authorization_policies.len()
        + snapshot.peer_authentications.len()
        + snapshot.request_authentications.len();
    println!(
        "\n{policies} security policies from {}; logs in {}",
        s.dir.display(),
        s.logs.display()
    );
    let Some(first) = s.workloads.first() else {
        return;
    };
    let state = s.state.display();
    let demo = s.workloads.iter().find(|w| w.app.is_some());
    println!("Try:");
    if let Some(d) = demo
        && let Some(port) = d.ports.first().and_then(|p| p.split([':', '/']).nth(1))
    {
        println!("  curl -s http://{}:{port}/hello", d.address);
    }
    println!("  palisade status --state {state}");
    println!(
        "  palisade describe workload {} --admin {}",
        first.workload, first.admin
    );
    println!("  curl -s http://{}/stats | grep rbac", first.admin);
    println!(
        "  grep 'enforced denied' {}/sidecar-*.log",
        s.logs.display()
    );
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
pub fn default_state_dir(dir: &Path) -> PathBuf {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let name: String = canonical
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    std::env::temp_dir()
        .join("palisade-up")
        .join(name.trim_matches('-'))
}

// ---------------------------------------------------------------------------------------------
// Supervision

/// Which lines of a child's output `up` repeats on its own stderr (all go to the log file).
#[derive(Debug, Clone, Copy)]
enum Report {
    Error,
    WarnAndError,
}

impl Report {
    fn wants(self, line: &str) -> bool {
        match self {
            Report::Error => line.contains(" ERROR "),
            Report::WarnAndError => line.contains(" ERROR ") || line.contains(" WARN "),
        }
    }
}

type Hook = Arc<dyn Fn() -> anyhow::Result<()> + Send + Sync>;

struct ChildSpec {
    /// For humans: "sidecar backend/ratings".
    name: String,
    exe: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    log: PathBuf,
    pid_file: PathBuf,
    report: Report,
    /// Runs before every start (e.g. a fresh token).
    before_start: Option<Hook>,
}

/// Backoff between restarts: doubles from 200 ms to 5 s; reset after a minute of good health.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Runs `spec` until `stop` turns true, restarting it whenever it exits.
async fn supervise(spec: ChildSpec, mut stop: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    let mut starts = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        if let Some(hook) = &spec.before_start
            && let Err(e) = hook()
        {
            eprintln!("[{}] cannot prepare a start: {e:#}", spec.name);
        }
        let started = Instant::now();
        let mut child = match spawn(&spec).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("[{}] cannot start: {e:#}", spec.name);
                if sleep_or_stop(&mut stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        starts += 1;
        let pid = child.id().unwrap_or(0);
        let _ = std::fs::write(&spec.pid_file, format!("{pid}\n"));
        if starts > 1 {
            eprintln!("[{}] restarted (pid {pid})", spec.name);
        }
        let status = tokio::select! {
            s = child.wait() => s,
            () = stopped(&mut stop) => {
                terminate(&mut child).await;
                let _ = std::fs::remove_file(&spec.pid_file);
                return;
            }
        };
        let _ = std::fs::remove_file(&spec.pid_file);
        if *stop.borrow() {
            return;
        }
        if started.elapsed() > HEALTHY_AFTER {
            backoff = BACKOFF_MIN;
        }
        let how = match status {
            Ok(s) => describe_exit(s),
            Err(e) => e.to_string(),
        };
        eprintln!(
            "[{}] exited ({how}); restarting in {:.1}s (log: {})",
            spec.name,
            backoff.as_secs_f32(),
            spec.log.display()
        );
        if sleep_or_stop(&mut stop, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Re-issues every sidecar's token once a day, well within [`TOKEN_TTL`].
async fn refresh_tokens(refreshers: Vec<Hook>, mut stop: watch::Receiver<bool>) {
    const EVERY: Duration = Duration::from_secs(24 * 3600);
    while !sleep_or_stop(&mut stop, EVERY).await {
        for r in &refreshers {
            if let Err(e) = r() {
                eprintln!("cannot refresh a service-account token: {e:#}");
            }
        }
    }
}

/// Sleeps `d`; true when asked to stop meanwhile.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = stopped(stop) => true,
    }
}

/// Completes once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

fn describe_exit(s: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt as _;
        if let Some(sig) = s.signal() {
            return format!("killed by signal {sig}");
        }
    }
    s.code()
        .map_or_else(|| s.to_string(), |c| format!("exit code {c}"))
}

async fn spawn(spec: &ChildSpec) -> anyhow::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&spec.exe);
    cmd.args(&spec.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A child never outlives the `Child` handle, whatever happens to `up`'s tasks.
        .kill_on_drop(true);
    // Children log at info to their files unless the user chose a level.
    if std::env::var_os("PALISADE_LOG").is_none() && std::env::var_os("RUST_LOG").is_none() {
        cmd.env("PALISADE_LOG", "info");
    }
    // The child dies with `up`, even a SIGKILLed one (see `cli::exit_with_parent`).
    cmd.env(crate::cli::PARENT_PID_ENV, std::process::id().to_string());
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    // Their own process group: a terminal's Ctrl-C reaches `up` only, which stops them in order.
    #[cfg(unix)]
    cmd.process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", spec.exe.display()))?;
    let log = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .await
        .with_context(|| format!("opening {}", spec.log.display()))?;
    let log = Arc::new(tokio::sync::Mutex::new(log));
    if let Some(out) = child.stdout.take() {
        tokio::spawn(tee(out, Arc::clone(&log), spec.name.clone(), None));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(tee(err, log, spec.name.clone(), Some(spec.report)));
    }
    Ok(child)
}

/// Copies a child's output lines into its log file, repeating the ones `report` wants.
async fn tee(
    stream: impl tokio::io::AsyncRead + Unpin,
    log: Arc<tokio::sync::Mutex<tokio::fs::File>>,
    name: String,
    report: Option<Report>,
) {
    let mut lines = tokio::io::BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if report.is_some_and(|r| r.wants(&line)) {
            eprintln!("[{name}] {line}");
        }
        let mut f = log.lock().await;
        let _ = f.write_all(line.as_bytes()).await;
        let _ = f.write_all(b"\n").await;
    }
    let _ = log.lock().await.flush().await;
}

/// Asks a child to stop (SIGTERM via `kill`, so it can close its listeners), then kills it.
async fn terminate(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(3), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn sidecars_run_the_lean_binary_when_it_is_next_to_palisade() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir
            .path()
            .join(format!("palisade{}", std::env::consts::EXE_SUFFIX));
        std::fs::write(&exe, b"").unwrap();

        // Only `palisade` (what `cargo run` builds): its own subcommand, and the reason said.
        let alone = SidecarProgram::next_to(&exe);
        assert_eq!(
            (&alone.exe, &alone.prefix[..]),
            (&exe, &[OsString::from("sidecar")][..])
        );
        let why = alone.fallback.unwrap();
        assert!(
            why.contains("palisade-sidecar") && why.contains("cargo run"),
            "{why}"
        );

        // Both binaries: the lean one, with no subcommand.
        let lean = dir
            .path()
            .join(format!("{SIDECAR_BIN}{}", std::env::consts::EXE_SUFFIX));
        std::fs::write(&lean, b"").unwrap();
        assert_eq!(
            SidecarProgram::next_to(&exe),
            SidecarProgram {
                exe: lean,
                prefix: Vec::new(),
                fallback: None
            }
        );
    }
}
