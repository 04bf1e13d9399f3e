//! The Palisade sidecar: the data path of one workload.
//!
//! - Inbound ([`inbound`]): one listener per WorkloadEntry port on the workload's address,
//!   forwarding to the application on `127.0.0.1:<app port>`. Per port the effective
//!   PeerAuthentication mode decides the transport: STRICT (mutual TLS, client SPIFFE ID in the
//!   trust domain or an alias), PERMISSIVE (mutual TLS for clients offering a mesh ALPN, other
//!   TLS passed through to the application as TCP, plaintext), DISABLE (plaintext). Then the
//!   port's declared protocol ([`palisade_policy::PortProtocol`]: ServiceEntry `protocol` or the
//!   port name) decides how the bytes are read: HTTP/1.1 or HTTP/2 authorized per request (deny:
//!   403 `RBAC: access denied`; what does not parse: 400), TCP authorized per connection (deny:
//!   closed; also closed later when a new policy denies it); only undeclared ports are sniffed.
//!   The application receives the normalized path that was authorized and
//!   `x-forwarded-client-cert` set by the proxy, never the client's; HTTP/1.1 framing is checked
//!   as strictly as Envoy's codec ([`framing`]), hop-by-hop headers are stripped ([`headers`]).
//! - Limits ([`limits`]): header cap, header-read and idle timeouts, connections per listener.
//! - Outbound ([`outbound`]): an HTTP proxy listener for the application (absolute URI or Host
//!   naming a ServiceEntry host or a workload address) and declared TCP upstreams. Auto mTLS:
//!   mutual TLS to destinations with a sidecar, the server's SPIFFE ID checked against the
//!   destination's service account; plaintext otherwise. Connections are pooled and HTTP/2 is
//!   multiplexed between sidecars.
//! - Capture ([`capture`], `--capture`): instead of the listeners above, the two ports iptables
//!   redirects the workload's TCP to (`palisade iptables install`). Inbound is served as the
//!   original destination's port and forwarded to the application at that destination over
//!   `lo`, from 127.0.0.6; outbound goes to the original destination: mTLS to a mesh workload, else
//!   as the mesh's `outboundTrafficPolicy` says (passthrough, or refused). A ServiceEntry's
//!   virtual IP (declared, or allocated by the control plane) routes to its endpoints.
//! - Mesh DNS (`palisade-dns`, with capture): the application's redirected DNS answered from the
//!   config's ServiceEntry hosts ([`config::ProxyConfig::dns`]), the rest relayed upstream.
//! - Certificates ([`certs`], [`sds`]): from the agent over SDS, or in process
//!   (`palisade sidecar`); rotation applies to new handshakes without restart.
//! - Config ([`ads`], [`config`]): the control plane pushes `palisade.config.v1.WorkloadConfig`
//!   over ADS; the proxy compiles it with `palisade-policy`, NACKs what does not compile, and
//!   swaps configs atomically (`arc-swap`): requests never take a lock.
//! - Admin ([`admin`]): `/stats`, `/config_dump` (secrets redacted), `/certs`, `POST
//!   /logging?rbac=debug`, `/ready`; loopback by default.
//! - Threads ([`workers`]): the data path runs on `concurrency` worker threads, Envoy's model:
//!   each connection, its requests and the upstream pools they use stay on one worker. Admin,
//!   xDS and certificates run on the caller's runtime.

pub mod admin;
pub mod ads;
pub mod app;
pub mod authz;
pub mod body;
pub mod capture;
pub mod certs;
pub mod config;
pub mod ext_authz;
pub mod framing;
pub mod grpc;
pub mod headers;
pub mod inbound;
pub mod io;
pub mod jwt;
pub mod limits;
pub mod metrics;
pub mod outbound;
pub mod sds;
pub mod sniff;
pub mod upgrade;
pub mod workers;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwapOption;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use certs::{CertMaterial, Certs};
pub use config::{ConfigError, ProxyConfig};
pub use palisade_policy::workload_config::{WORKLOAD_CONFIG_TYPE_URL, WorkloadConfig};

/// The control plane's SPIFFE path (any trust domain of the bundle): the ADS server must
/// present it.
pub const CONTROL_PLANE_PATH: &str = "/ns/istio-system/sa/palisade-controlplane";

/// Upstream authorities remembered as HTTP/2 speakers, at most.
const MAX_H2_AUTHORITIES: usize = 4096;

/// A declared outbound TCP upstream: the app connects to `listen`, the proxy to `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpUpstream {
    pub listen: SocketAddr,
    pub host: String,
    pub port: u16,
}

/// How to run one proxy.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// `namespace/name` of the WorkloadEntry.
    pub workload: String,
    /// The control plane's ADS address (`host:port`).
    pub control_plane: String,
    pub admin: SocketAddr,
    /// The outbound HTTP listener.
    pub outbound: SocketAddr,
    /// Workload port to application port (overrides the WorkloadEntry annotations).
    pub app_ports: BTreeMap<u16, u16>,
    pub tcp_upstreams: Vec<TcpUpstream>,
    /// Written (JSON with the bound addresses) once the proxy serves.
    pub ready_file: Option<PathBuf>,
    /// Worker threads of the data path (0: one per CPU, see [`workers`]).
    pub concurrency: usize,
    /// Header cap, timeouts and connection cap of every listener.
    pub limits: limits::Limits,
    /// Capture mode: the ports iptables redirects to. The per-port inbound listeners are not
    /// opened then (the application listens on its ports itself).
    pub capture: Option<capture::CapturePorts>,
    /// Mesh DNS (with capture: what `palisade iptables install --redirect-dns` sends port 53
    /// to): names of the mesh answered from the pushed config, the rest relayed upstream.
    pub dns: Option<palisade_dns::DnsOptions>,
}

/// Starting the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {cause}")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("workload {0:?} must be namespace/name")]
    Workload(String),
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
    #[error(transparent)]
    Dns(#[from] palisade_dns::DnsError),
}

/// State shared by every task of one proxy.
pub struct Shared {
    pub options: ProxyOptions,
    pub config: ArcSwapOption<ProxyConfig>,
    /// Bumped on every installed config (open TCP connections re-check their authorization).
    pub config_gen: watch::Sender<u64>,
    pub certs: Arc<Certs>,
    pub metrics: metrics::Metrics,
    pub registry: prometheus_client::registry::Registry,
    pub rbac_log: authz::RbacLog,
    pub ready: AtomicBool,
    /// The data path's threads.
    pub workers: workers::Workers,
    /// One pool to the application per worker (see [`Shared::app_pool`]).
    app_pools: Vec<app::AppPool>,
    /// One set of HTTP/2 connections to the application per worker (ports declaring gRPC/HTTP/2).
    app_h2_pools: Vec<app::h2::H2Pool>,
    /// One set of pools to other workloads per worker.
    mesh_pools: Vec<outbound::MeshPools>,
    /// Upstream authorities whose connections negotiated HTTP/2 (see [`outbound::MeshPools`]).
    h2_authorities: std::sync::RwLock<std::collections::HashSet<String>>,
    /// Bound addresses of the inbound listeners.
    pub inbound_bound: std::sync::Mutex<Vec<SocketAddr>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("workload", &self.options.workload)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The current worker's pool to the application: its connections live on this worker, so a
    /// request and its upstream connection never wake another thread. Outside the workers
    /// (tests driving a handler directly) the first pool.
    pub fn app_pool(&self) -> &app::AppPool {
        let i = workers::current().unwrap_or(0);
        &self.app_pools[i.min(self.app_pools.len() - 1)]
    }

    /// The current worker's HTTP/2 connections to the application.
    pub fn app_h2_pool(&self) -> &app::h2::H2Pool {
        let i = workers::current().unwrap_or(0);
        &self.app_h2_pools[i.min(self.app_h2_pools.len() - 1)]
    }

    /// The current worker's pools to other workloads (see [`Shared::app_pool`]).
    pub fn mesh_pools(&self) -> &outbound::MeshPools {
        let i = workers::current().unwrap_or(0);
        &self.mesh_pools[i.min(self.mesh_pools.len() - 1)]
    }

    /// Whether connections to `authority` negotiated HTTP/2 (learnt by any worker).
    pub fn speaks_h2(&self, authority: &str) -> bool {
        self.h2_authorities
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(authority)
    }

    /// The address the proxy dials its application from: 127.0.0.6 in capture mode (see
    /// [`app::dial`]), any otherwise.
    pub fn app_source(&self) -> Option<std::net::IpAddr> {
        capture::app_source(self.options.capture)
    }

    /// Records what a new connection to `authority` negotiated.
    pub fn learn_h2(&self, authority: &str, h2: bool) {
        if self.speaks_h2(authority) == h2 {
            return;
        }
        let mut set = self
            .h2_authorities
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if h2 {
            // Bounded: past the cap an authority just keeps the ALPN-deciding pool.
            if set.len() < MAX_H2_AUTHORITIES {
                set.insert(authority.to_owned());
            }
        } else {
            set.remove(authority);
        }
    }

    /// Installs a pushed config (compiled already by [`ProxyConfig::build`]).
    pub fn install(&self, mut cfg: ProxyConfig) {
        cfg.counters = self.metrics.decision_counters(&cfg.policy);
        if let Err(e) = self.certs.set_aliases(cfg.trust_domain_aliases.clone()) {
            tracing::error!(error = %e, "cannot rebuild TLS configs for the new trust domain aliases");
        }
        let min_tls = cfg.wire.mesh.min_protocol_version();
        if let Err(e) = self.certs.set_min_protocol_version(min_tls) {
            tracing::error!(error = %e, "cannot rebuild TLS configs for the new minimum TLS version");
        }
        tracing::info!(
            workload = %cfg.workload,
            version = %cfg.version,
            policies = cfg.policy.policies().len(),
            mode = %cfg.policy.mtls().workload.mode.as_str(),
            "config installed"
        );
        self.metrics.config_updates.inc();
        self.config.store(Some(Arc::new(cfg)));
        self.config_gen.send_modify(|g| *g += 1);
    }
}

/// A running proxy. Dropping it stops its tasks.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    admin_addr: SocketAddr,
    outbound_addr: SocketAddr,
    tcp_addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|cause| ProxyError::Bind { addr, cause })
}

/// A listener for the workers (std: each worker registers its own handle to it).
fn bind_std(addr: SocketAddr) -> Result<std::net::TcpListener, ProxyError> {
    std::net::TcpListener::bind(addr).map_err(|cause| ProxyError::Bind { addr, cause })
}

impl Proxy {
    /// Binds the admin, outbound and TCP upstream listeners, then takes certificates from
    /// `certs` and config from the control plane; inbound listeners open with the first config.
    pub async fn start(
        options: ProxyOptions,
        certs: watch::Receiver<Option<Arc<CertMaterial>>>,
    ) -> Result<Self, ProxyError> {
        if options
            .workload
            .split_once('/')
            .is_none_or(|(a, b)| a.is_empty() || b.is_empty() || b.contains('/'))
        {
            return Err(ProxyError::Workload(options.workload.clone()));
        }
        let admin_listener = bind(options.admin).await?;
        let outbound_listener = bind_std(options.outbound)?;
        let mut tcp_listeners = Vec::new();
        for up in &options.tcp_upstreams {
            tcp_listeners.push((bind_std(up.listen)?, up.clone()));
        }
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|cause| ProxyError::Bind {
                addr: options.admin,
                cause,
            })?;
        let local = |l: &std::net::TcpListener, a: SocketAddr| {
            l.local_addr()
                .map_err(|cause| ProxyError::Bind { addr: a, cause })
        };
        let outbound_addr = local(&outbound_listener, options.outbound)?;
        let tcp_addrs = tcp_listeners
            .iter()
            .map(|(l, u)| local(l, u.listen))
            .collect::<Result<Vec<_>, _>>()?;
        let count = match options.concurrency {
            0 => workers::default_count(),
            n => n,
        };
        let workers = workers::Workers::start(count).map_err(ProxyError::Workers)?;

        let app_source = capture::app_source(options.capture);
        let capture_listeners = match options.capture {
            Some(ports) => Some(capture::bind(ports)?),
            None => None,
        };
        let metrics = metrics::Metrics::default();
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let dns_metrics = palisade_dns::DnsMetrics::default();
        let dns_server = match &options.dns {
            Some(dns) => {
                dns_metrics.register(&mut registry);
                Some(palisade_dns::DnsServer::bind(dns).await?)
            }
            None => None,
        };
        let cert_store = Arc::new(Certs::default());
        let (config_gen, _) = watch::channel(0u64);
        let shared = Arc::new_cyclic(|weak: &std::sync::Weak<Shared>| Shared {
            options: options.clone(),
            config: ArcSwapOption::empty(),
            config_gen,
            certs: Arc::clone(&cert_store),
            metrics: metrics.clone(),
            registry,
            rbac_log: authz::RbacLog::default(),
            ready: AtomicBool::new(false),
            app_pools: (0..workers.len())
                .map(|_| app::AppPool::from_source(app_source))
                .collect(),
            app_h2_pools: (0..workers.len())
                .map(|_| app::h2::H2Pool::from_source(app_source))
                .collect(),
            mesh_pools: (0..workers.len())
                .map(|_| outbound::MeshPools::new(weak.clone()))
                .collect(),
            h2_authorities: std::sync::RwLock::default(),
            workers,
            inbound_bound: std::sync::Mutex::new(Vec::new()),
        });

        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(admin::serve(
            Arc::clone(&shared),
            admin_listener,
        )));
        let on_workers = |what: SocketAddr, r: std::io::Result<Vec<JoinHandle<()>>>| {
            r.map_err(|cause| ProxyError::Bind { addr: what, cause })
        };
        let s = Arc::clone(&shared);
        let cap = limits::ConnectionCap::new(options.limits.max_connections);
        tasks.extend(on_workers(
            outbound_addr,
            shared.workers.serve(outbound_listener, move |l| {
                outbound::serve_http(Arc::clone(&s), l, cap.clone())
            }),
        )?);
        for (l, up) in tcp_listeners {
            let s = Arc::clone(&shared);
            let listen = up.listen;
            let cap = limits::ConnectionCap::new(options.limits.max_connections);
            tasks.extend(on_workers(
                listen,
                shared.workers.serve(l, move |l| {
                    outbound::serve_tcp(Arc::clone(&s), l, up.clone(), cap.clone())
                }),
            )?);
        }
        let mut capture_addrs = Vec::new();
        if let Some(listeners) = capture_listeners {
            capture_addrs = listeners.addrs();
            tasks.extend(capture::serve(&shared, listeners)?);
        }
        if let Some(dns) = dns_server {
            let weak = Arc::downgrade(&shared);
            let table: palisade_dns::TableSource = Arc::new(move || {
                let cfg = weak.upgrade()?.config.load_full()?;
                Some(Arc::clone(&cfg.dns))
            });
            tasks.extend(dns.serve(table, dns_metrics));
        }
        tasks.push(tokio::spawn(watch_certs(Arc::clone(&shared), certs)));
        tasks.push(tokio::spawn(ads::run(Arc::clone(&shared))));
        tasks.push(tokio::spawn(reconcile_listeners(
            Arc::clone(&shared),
            admin_addr,
            outbound_addr,
            tcp_addrs.clone(),
            capture_addrs,
        )));
        tracing::info!(workload = %options.workload, admin = %admin_addr, outbound = %outbound_addr, "proxy starting");
        Ok(Self {
            shared,
            admin_addr,
            outbound_addr,
            tcp_addrs,
            tasks,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound_addr
    }

    /// Bound addresses of the TCP upstream listeners, in option order.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Completes when the first task ends (it should not): a crash surfaces to the caller.
    pub async fn wait(&mut self) {
        if self.tasks.is_empty() {
            return;
        }
        let (_, _, rest) = futures::future::select_all(self.tasks.drain(..)).await;
        self.tasks = rest;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // The workers' tasks hold the shared state; stopping the workers drops them.
        self.shared.workers.stop();
    }
}

async fn watch_certs(shared: Arc<Shared>, mut certs: watch::Receiver<Option<Arc<CertMaterial>>>) {
    loop {
        let current = certs.borrow_and_update().clone();
        if let Some(m) = current {
            let serial = m.svid.leaf_info().serial.clone();
            match shared.certs.update((*m).clone()) {
                Ok(()) => {
                    tracing::info!(identity = %m.svid.spiffe_id(), %serial, "certificate installed")
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot use the new certificate; keeping the previous one")
                }
            }
        }
        if certs.changed().await.is_err() {
            tracing::warn!("certificate source ended");
            return;
        }
    }
}

/// Opens and closes inbound listeners as configs change; marks the proxy ready after the first.
async fn reconcile_listeners(
    shared: Arc<Shared>,
    admin: SocketAddr,
    outbound: SocketAddr,
    tcp: Vec<SocketAddr>,
    capture: Vec<SocketAddr>,
) {
    let mut generation = shared.config_gen.subscribe();
    let mut running: HashMap<SocketAddr, (u16, Vec<JoinHandle<()>>)> = HashMap::new();
    loop {
        if let Some(cfg) = shared.config.load_full() {
            // In capture mode the application holds its ports; inbound comes through capture.
            let wanted: HashMap<SocketAddr, u16> = if shared.options.capture.is_some() {
                HashMap::new()
            } else {
                cfg.inbound.iter().map(|p| (p.listen, p.port)).collect()
            };
            running.retain(|addr, (port, tasks)| {
                let keep = wanted.get(addr) == Some(port);
                if !keep {
                    tracing::info!(%addr, "inbound listener closed");
                    tasks.iter().for_each(JoinHandle::abort);
                }
                keep
            });
            for (&addr, &port) in &wanted {
                if running.contains_key(&addr) {
                    continue;
                }
                let s = Arc::clone(&shared);
                let cap = limits::ConnectionCap::new(shared.options.limits.max_connections);
                let served = std::net::TcpListener::bind(addr).and_then(|l| {
                    shared.workers.serve(l, move |l| {
                        inbound::serve(Arc::clone(&s), l, port, cap.clone())
                    })
                });
                match served {
                    Ok(tasks) => {
                        tracing::info!(%addr, port, workers = tasks.len(), "inbound listener open");
                        running.insert(addr, (port, tasks));
                    }
                    Err(e) => tracing::error!(%addr, error = %e, "cannot open inbound listener"),
                }
            }
            {
                let mut bound = shared
                    .inbound_bound
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *bound = running.keys().copied().collect();
                bound.sort();
            }
            if shared.certs.tls().is_some() && !shared.ready.swap(true, Ordering::SeqCst) {
                tracing::info!(workload = %cfg.workload, "proxy ready");
                if let Some(path) = &shared.options.ready_file {
                    let doc = serde_json::json!({
                        "admin": admin.to_string(),
                        "outbound": outbound.to_string(),
                        "tcp": tcp.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "inbound": running.keys().map(ToString::to_string).collect::<Vec<_>>(),
                        "capture": capture.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    });
                    let tmp = path.with_extension("tmp");
                    let written = std::fs::write(&tmp, doc.to_string())
                        .and_then(|()| std::fs::rename(&tmp, path));
                    if let Err(e) = written {
                        tracing::error!(path = %path.display(), error = %e, "cannot write the ready file");
                    }
                }
            }
        }
        if generation.changed().await.is_err() {
            return;
        }
    }
}
