//! A mesh on loopback for proxy tests: the control plane serving a mesh directory over ADS,
//! sidecars (`palisade sidecar`, or `palisade agent` + `palisade proxy`), an echo application,
//! workload certificates for test clients, and small HTTP/TCP clients over plaintext or mTLS.
//!
//! Builds on `agent_mesh.rs` (process guards, tokens, polling).

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_identity::{CertSource, ServerIdentity, SpiffeId, Svid, TrustBundle, TrustDomain};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::agent_mesh::{ChildGuard, PALISADE, http_get, issue_token, wait_for};

pub const MESH_YAML: &str = "trustDomain: cluster.local\n";

/// `palisade controlplane --config DIR` with the CA and ADS on free ports.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state: PathBuf,
    pub ca: String,
    pub xds: String,
    /// The control plane's admin endpoint (`/metrics`).
    pub admin: String,
    pub cp: ChildGuard,
}

fn line_addr(text: &str, marker: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.split_once(marker).map(|(_, a)| a.trim().to_owned()))
}

impl Mesh {
    /// Writes `files` (name, YAML) into a fresh mesh directory and starts the control plane.
    pub async fn start(files: &[(&str, &str)]) -> Self {
        Self::start_with_env(files, &[]).await
    }

    /// As [`Mesh::start`], with extra environment variables for the control plane.
    pub async fn start_with_env(files: &[(&str, &str)], env: &[(&str, &str)]) -> Self {
        Self::start_with(files, env, &[]).await
    }

    /// As [`Mesh::start`], with extra environment variables and arguments for the control plane.
    pub async fn start_with(files: &[(&str, &str)], env: &[(&str, &str)], args: &[&str]) -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("mesh");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::write(config.join("mesh.yaml"), MESH_YAML).unwrap();
        for (name, text) in files {
            std::fs::write(config.join(name), text).unwrap();
        }
        let state = dir.path().join("state");
        let mut cmd = Command::new(PALISADE);
        cmd.args(["controlplane", "--state"])
            .arg(&state)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--xds-listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&config)
            .args(args)
            .envs(env.iter().copied());
        let mut cp = ChildGuard::spawn("controlplane", cmd, dir.path());
        let (ca, xds, admin) = wait_for(
            "the control plane's CA, ADS and admin ports",
            Duration::from_secs(30),
            async || {
                assert!(cp.running(), "control plane exited:\n{}", cp.stderr_text());
                let out = cp.stdout_text();
                Some((
                    line_addr(&out, "CA listening on")?,
                    line_addr(&out, "ADS listening on")?,
                    line_addr(&out, "admin listening on")?,
                ))
            },
        )
        .await;
        Self {
            dir,
            config,
            state,
            ca,
            xds,
            admin,
            cp,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn root(&self) -> PathBuf {
        self.state.join("root-cert.pem")
    }

    pub fn bundle(&self) -> TrustBundle {
        let pem = std::fs::read(self.root()).unwrap();
        TrustBundle::from_pem(TrustDomain::new("cluster.local").unwrap(), &pem).unwrap()
    }

    pub fn token(&self, ns: &str, sa: &str) -> PathBuf {
        let dir = self.dir.path().join(format!("tokens-{ns}"));
        std::fs::create_dir_all(&dir).unwrap();
        issue_token(&self.state, ns, sa, &dir)
    }

    /// Replaces a mesh-directory file atomically (as `kubectl apply`-like tools do).
    pub fn write_config(&self, name: &str, text: &str) {
        let tmp = self.config.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config.join(name)).unwrap();
    }

    /// A workload certificate for `ns/sa` from the CA (`palisade cert request`).
    pub fn cert(&self, ns: &str, sa: &str) -> Svid {
        let token = self.token(ns, sa);
        let out = self.dir.path().join(format!("cert-{ns}-{sa}"));
        let status = Command::new(PALISADE)
            .args(["cert", "request", "--ca-addr", &self.ca, "--ca-root"])
            .arg(self.root())
            .arg("--token-file")
            .arg(&token)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "cert request: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        let chain = std::fs::read(out.join("cert-chain.pem")).unwrap();
        let key = std::fs::read(out.join("key.pem")).unwrap();
        Svid::from_pem(&chain, &key).unwrap()
    }

    /// `palisade sidecar` for `workload` (namespace/name) with the token of `ns/sa`.
    pub async fn sidecar(&self, workload: &str, ns: &str, sa: &str, args: &[String]) -> Sidecar {
        let token = self.token(ns, sa);
        let name = workload.replace('/', "-");
        let ready = self.dir.path().join(format!("{name}.ready"));
        let mut cmd = Command::new(PALISADE);
        cmd.args([
            "sidecar",
            "--workload",
            workload,
            "--control-plane",
            &self.ca,
            "--xds-address",
            &self.xds,
        ])
        .arg("--ca-root")
        .arg(self.root())
        .arg("--token-file")
        .arg(&token)
        .args([
            "--admin",
            "127.0.0.1:0",
            "--outbound",
            "127.0.0.1:0",
            "--ready-file",
        ])
        .arg(&ready)
        .args(args)
        .env("PALISADE_LOG", "info")
        // Two data-path workers whatever the machine: connections spread over both.
        .env("PALISADE_CONCURRENCY", "2")
        // The sidecar's own allocator setting applies (see `cli::one_malloc_arena`).
        .env_remove("MALLOC_ARENA_MAX");
        Sidecar::wait(ChildGuard::spawn(&name, cmd, self.dir.path()), &ready, None).await
    }

    /// `palisade agent` + `palisade proxy` (certificates over the SDS socket).
    pub async fn agent_and_proxy(
        &self,
        workload: &str,
        ns: &str,
        sa: &str,
        args: &[String],
    ) -> Sidecar {
        let token = self.token(ns, sa);
        let name = workload.replace('/', "-");
        let sds = self.dir.path().join(format!("{name}.sock"));
        let agent_ready = self.dir.path().join(format!("{name}-agent.ready"));
        let mut cmd = Command::new(PALISADE);
        cmd.args(["agent", "--ca-addr", &self.ca, "--ca-root"])
            .arg(self.root())
            .arg("--token-file")
            .arg(&token)
            .arg("--sds-socket")
            .arg(&sds)
            .args(["--admin", "127.0.0.1:0", "--ready-file"])
            .arg(&agent_ready);
        let agent = ChildGuard::spawn(&format!("{name}-agent"), cmd, self.dir.path());
        let ready = self.dir.path().join(format!("{name}.ready"));
        let mut cmd = Command::new(PALISADE);
        cmd.args([
            "proxy",
            "--workload",
            workload,
            "--control-plane",
            &self.xds,
            "--ca-root",
        ])
        .arg(self.root())
        .arg("--sds-socket")
        .arg(&sds)
        .args([
            "--admin",
            "127.0.0.1:0",
            "--outbound",
            "127.0.0.1:0",
            "--ready-file",
        ])
        .arg(&ready)
        .args(args)
        .env("PALISADE_LOG", "info")
        // Two data-path workers whatever the machine: connections spread over both.
        .env("PALISADE_CONCURRENCY", "2");
        Sidecar::wait(
            ChildGuard::spawn(&name, cmd, self.dir.path()),
            &ready,
            Some(agent),
        )
        .await
    }
}

/// A running sidecar (or proxy + agent).
pub struct Sidecar {
    pub proc: ChildGuard,
    pub agent: Option<ChildGuard>,
    pub admin: String,
    pub outbound: String,
    pub tcp: Vec<String>,
}

impl Sidecar {
    async fn wait(mut proc: ChildGuard, ready: &Path, agent: Option<ChildGuard>) -> Self {
        let doc: Value = wait_for(
            "the sidecar's ready file",
            Duration::from_secs(30),
            async || {
                assert!(
                    proc.running(),
                    "sidecar {} exited:\n{}",
                    proc.name,
                    proc.stderr_text()
                );
                serde_json::from_str(&std::fs::read_to_string(ready).ok()?).ok()
            },
        )
        .await;
        let s = |v: &Value| v.as_str().unwrap().to_owned();
        Self {
            proc,
            agent,
            admin: s(&doc["admin"]),
            outbound: s(&doc["outbound"]),
            tcp: doc["tcp"].as_array().unwrap().iter().map(s).collect(),
        }
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(&self.admin, path).await.unwrap()
    }

    /// `POST path` on the admin endpoint (what its mutating endpoints, e.g. `/logging`, take).
    pub async fn admin_post(&self, path: &str) -> (u16, String) {
        http1(&self.admin, &Transport::Plain, "POST", path, &[])
            .await
            .unwrap()
    }

    /// Sum of the Prometheus samples whose line starts with `prefix` and contains every `needle`.
    pub async fn stat(&self, prefix: &str, needles: &[&str]) -> f64 {
        let (_, body) = self.admin_get("/stats").await;
        body.lines()
            .filter(|l| l.starts_with(prefix) && needles.iter().all(|n| l.contains(n)))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    }

    pub fn stderr(&self) -> String {
        self.proc.stderr_text()
    }
}

/// The echo application: answers every HTTP request with JSON naming what it received
/// (method, path, host, protocol version, every `x-forwarded-client-cert` value). `/slow`
/// answers after 1.5 s.
pub struct Echo {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: http::Request<hyper::body::Incoming>| async move {
                            if req.uri().path() == "/slow" {
                                tokio::time::sleep(Duration::from_millis(1500)).await;
                            }
                            let xfcc: Vec<String> = req
                                .headers()
                                .get_all("x-forwarded-client-cert")
                                .iter()
                                .map(|v| v.to_str().unwrap_or("").to_owned())
                                .collect();
                            let body = serde_json::json!({
                                "method": req.method().as_str(),
                                "path": req.uri().path(),
                                "host": req.headers().get("host").and_then(|h| h.to_str().ok()),
                                "version": format!("{:?}", req.version()),
                                "xfcc": xfcc,
                            });
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                                body.to_string(),
                            ))))
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { addr, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP echo server.
pub struct TcpEcho {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TcpEcho {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Self { addr, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a test client reaches a sidecar's inbound port.
// A handful of values per test: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Transport {
    Plain,
    /// Mutual TLS with this client certificate; the server must be `server`.
    Mtls {
        cert: Svid,
        server: SpiffeId,
        bundle: TrustBundle,
        alpn: Vec<Vec<u8>>,
    },
}

impl Transport {
    pub fn mtls(cert: Svid, server: &str, bundle: TrustBundle) -> Self {
        Transport::Mtls {
            cert,
            server: SpiffeId::parse(server).unwrap(),
            bundle,
            // What a mesh sidecar offers for HTTP/1.1 (Istio's ALPN for mTLS in the mesh).
            alpn: vec![b"istio-http/1.1".to_vec()],
        }
    }

    pub fn without_alpn(self) -> Self {
        match self {
            Transport::Mtls {
                cert,
                server,
                bundle,
                ..
            } => Transport::Mtls {
                cert,
                server,
                bundle,
                alpn: Vec::new(),
            },
            t => t,
        }
    }
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects (and handshakes) to `addr`.
pub async fn connect(addr: &str, t: &Transport) -> std::io::Result<Box<dyn Io>> {
    let tcp = TcpStream::connect(addr).await?;
    match t {
        Transport::Plain => Ok(Box::new(tcp)),
        Transport::Mtls {
            cert,
            server,
            bundle,
            alpn,
        } => {
            let mut cfg = palisade_identity::client_config(
                Some(CertSource::from(cert)),
                bundle,
                ServerIdentity::OneOf(vec![server.clone()]),
            )
            .unwrap();
            cfg.alpn_protocols = alpn.clone();
            let name = rustls::pki_types::ServerName::try_from("workload.local").unwrap();
            let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await?;
            Ok(Box::new(tls))
        }
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`); status and body.
pub async fn http1(
    addr: &str,
    t: &Transport,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(10), connect(addr, t))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("content-length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("response timed out"))??;
    crate::agent_mesh::parse_response(&raw)
}

/// Writes `msg` on a fresh connection and reads the echo; `Err` when the proxy closes it.
pub async fn tcp_echo(addr: &str, t: &Transport, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = connect(addr, t).await?;
    s.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("echo timed out"))??;
    Ok(buf)
}

/// The JSON the echo application answered.
pub fn echo_json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not echo JSON ({e}): {body}"))
}

/// HTTP/2 (prior knowledge) client to `addr`.
pub async fn h2_client(addr: &str) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// Sends one HTTP/2 request; status and body.
pub async fn h2_get(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    uri: &str,
) -> (u16, String) {
    let req = http::Request::get(uri)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An HTTP server on `ip` (any free port) answering `doc` to every request, e.g. a JWKS, and
/// counting the connections it accepted.
pub async fn document_server(
    ip: &str,
    doc: String,
) -> (
    SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else {
                return;
            };
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let doc = doc.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{doc}",
                    doc.len()
                );
                let _ = tcp.write_all(resp.as_bytes()).await;
            });
        }
    });
    (addr, hits, task)
}
