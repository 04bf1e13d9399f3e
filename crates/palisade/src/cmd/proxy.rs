//! `palisade proxy`: the sidecar proxy of one workload, with certificates from an agent over
//! SDS and config from the control plane over ADS.
//!
//! The application's port: `--app-port PORT=APPPORT` (repeatable), else the WorkloadEntry
//! annotation `palisade.dev/app-port-<PORT>: "<APPPORT>"`, else the same port; the application
//! listens on 127.0.0.1. With `--capture` the application listens on its own ports (on the
//! workload's address or every address) and the proxy takes what iptables redirects to it (see
//! `palisade_proxy::capture`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use palisade_proxy::{CertMaterial, Proxy, ProxyOptions, TcpUpstream};
use tokio::sync::watch;

/// What the proxy and the sidecar share.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// The WorkloadEntry this proxy serves, as NAMESPACE/NAME.
    #[arg(long, value_name = "NS/NAME")]
    pub workload: String,
    /// Admin endpoint (/stats, /config_dump, /certs, /logging, /ready). Port 0 picks one.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// The application's outbound HTTP proxy listener. Port 0 picks one. Default
    /// 127.0.0.1:15001; with --capture, a free loopback port (15001 is the capture port).
    #[arg(long, value_name = "ADDR")]
    pub outbound: Option<SocketAddr>,
    /// Transparent capture (after `palisade iptables install` in the workload's network
    /// namespace): accept the redirected connections on the capture ports instead of opening a
    /// listener per workload port; the application listens on its own ports (no --app-port),
    /// and its outbound connections go to their original destinations. Run the sidecar as the
    /// uid or gid the rules exempt (1337 by default).
    #[arg(long)]
    pub capture: bool,
    /// Where iptables redirects inbound connections (with --capture).
    #[arg(long, value_name = "PORT", default_value_t = palisade_proxy::capture::CapturePorts::default().inbound, requires = "capture")]
    pub capture_inbound_port: u16,
    /// Where iptables redirects outbound connections (with --capture).
    #[arg(long, value_name = "PORT", default_value_t = palisade_proxy::capture::CapturePorts::default().outbound, requires = "capture")]
    pub capture_outbound_port: u16,
    /// With --capture, mesh DNS listens on 127.0.0.1 (and [::1]) on this port, UDP and TCP:
    /// `palisade iptables install --redirect-dns` sends the application's port-53 queries
    /// there. Mesh names are answered from the pushed config; the rest go to the nameservers of
    /// /etc/resolv.conf as it reads at start.
    #[arg(long, value_name = "PORT", default_value_t = palisade_dns::DEFAULT_DNS_PORT, requires = "capture")]
    pub dns_port: u16,
    /// With --capture, do not serve mesh DNS.
    #[arg(long, requires = "capture")]
    pub no_dns: bool,
    /// Application port for a workload port: PORT=APPPORT (repeatable).
    #[arg(long = "app-port", value_name = "PORT=APPPORT", value_parser = parse_app_port)]
    pub app_ports: Vec<(u16, u16)>,
    /// A declared outbound TCP upstream: LISTEN_ADDR=HOST:PORT (repeatable); the application
    /// connects to LISTEN_ADDR, the proxy to HOST:PORT (a ServiceEntry host or workload address).
    #[arg(long = "tcp-upstream", value_name = "LISTEN=HOST:PORT", value_parser = parse_tcp_upstream)]
    pub tcp_upstreams: Vec<TcpUpstream>,
    /// Write the bound addresses here (JSON) once the proxy is ready.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// Worker threads of the data path, as Envoy's `--concurrency` (Istio's proxy
    /// `concurrency`): each connection stays on one worker. 0: one per CPU.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        env = "PALISADE_CONCURRENCY"
    )]
    pub concurrency: usize,
    /// Largest request header block accepted, in KiB (Envoy's `max_request_headers_kb`);
    /// larger requests get 431.
    #[arg(long, value_name = "KIB", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=8192))]
    pub max_request_headers_kb: u32,
    /// How long a client may take to send a request's headers (also the longest pause before
    /// the next request on a kept-alive HTTP/1.1 connection).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = super::token::parse_duration)]
    pub header_read_timeout: std::time::Duration,
    /// A connection (HTTP or TCP, any listener) with no traffic for this long is closed.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = super::token::parse_duration)]
    pub idle_timeout: std::time::Duration,
    /// Concurrent downstream connections per listener; more are closed as they arrive.
    #[arg(long, value_name = "N", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub proxy: ProxyArgs,
    /// The control plane's ADS address (mutual TLS).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15010")]
    pub control_plane: String,
    /// Extra mesh root certificate(s), trusted besides the agent's ROOTCA.
    #[arg(long, value_name = "FILE")]
    pub ca_root: Option<PathBuf>,
    /// The agent's SDS socket.
    #[arg(long, value_name = "PATH")]
    pub sds_socket: PathBuf,
}

fn parse_app_port(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('=').ok_or("expected PORT=APPPORT")?;
    let p = |x: &str| x.trim().parse::<u16>().map_err(|e| format!("{x:?}: {e}"));
    Ok((p(a)?, p(b)?))
}

fn parse_tcp_upstream(s: &str) -> Result<TcpUpstream, String> {
    let (listen, target) = s.split_once('=').ok_or("expected LISTEN_ADDR=HOST:PORT")?;
    let listen: SocketAddr = listen.parse().map_err(|e| format!("{listen:?}: {e}"))?;
    let (host, port) = palisade_proxy::outbound::split_host_port(target, 0)
        .filter(|(h, p)| !h.is_empty() && *p != 0)
        .ok_or_else(|| format!("{target:?}: expected HOST:PORT"))?;
    Ok(TcpUpstream {
        listen,
        host: host.to_ascii_lowercase(),
        port,
    })
}

impl ProxyArgs {
    pub fn options(&self, control_plane: String) -> ProxyOptions {
        ProxyOptions {
            workload: self.workload.clone(),
            control_plane,
            admin: self.admin,
            outbound: self.outbound.unwrap_or_else(|| {
                let port = if self.capture { 0 } else { 15001 };
                SocketAddr::from(([127, 0, 0, 1], port))
            }),
            app_ports: self.app_ports.iter().copied().collect::<BTreeMap<_, _>>(),
            tcp_upstreams: self.tcp_upstreams.clone(),
            ready_file: self.ready_file.clone(),
            concurrency: self.concurrency,
            limits: palisade_proxy::limits::Limits {
                max_request_headers: self.max_request_headers_kb as usize * 1024,
                header_read_timeout: self.header_read_timeout,
                idle_timeout: self.idle_timeout,
                max_connections: self.max_connections as usize,
            },
            capture: self
                .capture
                .then_some(palisade_proxy::capture::CapturePorts {
                    inbound: self.capture_inbound_port,
                    outbound: self.capture_outbound_port,
                }),
            dns: (self.capture && !self.no_dns).then(|| {
                let path = std::path::Path::new(palisade_dns::resolv::RESOLV_CONF);
                let upstreams = palisade_dns::resolv::read(path).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "mesh DNS has no upstream resolver");
                    Vec::new()
                });
                palisade_dns::DnsOptions::loopback(self.dns_port, upstreams)
            }),
        }
    }
}

/// Starts the proxy, prints its addresses, and runs until a signal.
pub async fn run_proxy(
    options: ProxyOptions,
    certs: watch::Receiver<Option<Arc<CertMaterial>>>,
) -> anyhow::Result<ExitCode> {
    let mut proxy = Proxy::start(options, certs)
        .await
        .context("starting the proxy")?;
    // Tests and scripts read the addresses from this line or from the ready file.
    println!(
        "palisade proxy: admin listening on {}, outbound on {}",
        proxy.admin_addr(),
        proxy.outbound_addr()
    );
    tokio::select! {
        () = super::controlplane::shutdown_signal() => {}
        () = proxy.wait() => anyhow::bail!("a proxy task stopped unexpectedly"),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let extra_roots = match &args.ca_root {
        Some(path) => palisade_identity::pem::read_certs(path)
            .with_context(|| format!("--ca-root {}", path.display()))?,
        None => Vec::new(),
    };
    let sds = palisade_proxy::sds::stream_certificates(args.sds_socket.clone());
    let certs = with_extra_roots(sds, extra_roots);
    run_proxy(args.proxy.options(args.control_plane.clone()), certs).await
}

/// Adds `extra` to the roots of every material `source` publishes.
pub fn with_extra_roots(
    mut source: watch::Receiver<Option<Arc<CertMaterial>>>,
    extra: Vec<palisade_identity::CertificateDer<'static>>,
) -> watch::Receiver<Option<Arc<CertMaterial>>> {
    if extra.is_empty() {
        return source;
    }
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        loop {
            let current = source.borrow_and_update().clone();
            if let Some(m) = current {
                let mut m = (*m).clone();
                for r in &extra {
                    if !m.roots.contains(r) {
                        m.roots.push(r.clone());
                    }
                }
                tx.send_replace(Some(Arc::new(m)));
            }
            if source.changed().await.is_err() {
                return;
            }
        }
    });
    rx
}
