//! Config push to 100 Envoys' worth of ADS streams (issue 13): how long after one policy edit
//! the last affected stream has received and ACKed its new listeners.
//!
//! ```text
//! cargo bench -p palisade --bench xds_push
//! ```
//!
//! Starts the real `palisade controlplane` (the `palisade` binary Cargo builds for this bench)
//! on a mesh directory of 100 WorkloadEntries (namespace `scale`, `w000`..`w099`, service
//! account `w`, addresses 127.0.70.1..100, never bound), a STRICT PeerAuthentication and a few
//! AuthorizationPolicies. One client certificate for `scale/w` (`palisade token issue` +
//! `palisade cert request`) may read all of them. Then 100 xDS clients, each on its own mTLS
//! connection (as 100 Envoys would): Envoy's node (metadata `PALISADE_WORKLOAD`), CDS wildcard
//! first, LDS wildcard once the clusters are ACKed, every response ACKed with
//! [`palisade_xds::ClientTypeState`].
//!
//! Measured: for each of `BENCH_EDITS` (10) edits of a namespace-wide AuthorizationPolicy
//! (written atomically: temporary file + rename), the time from the write to the moment the
//! last stream sent its ACK of listeners carrying the edit (the client's clock), checked
//! against the control plane's `/debug/syncz` (every stream's LDS ACKed at the version
//! pushed); then one edit of a policy that selects one workload, and how many streams got a
//! push for it (should be 1). The control plane's CPU time and RSS come from `/proc`.
//!
//! Knobs (environment): `BENCH_STREAMS` (100), `BENCH_EDITS` (10), `BENCH_KEEP_WORK=1` keeps
//! the scratch directory (mesh directory, control plane logs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value};
use hyper_util::rt::TokioIo;
use palisade_identity::{CertSource, ServerIdentity, Svid, TrustBundle, TrustDomain};
use palisade_xds::ClientTypeState;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const PALISADE: &str = env!("CARGO_BIN_EXE_palisade");
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// The SPIFFE path of the control plane's ADS serving certificate.
const CONTROL_PLANE_PATH: &str = "/ns/istio-system/sa/palisade-controlplane";
/// The workload the single-workload edit selects.
const SINGLE: usize = 42;
/// How long one edit may take before the bench gives up on it.
const EDIT_TIMEOUT: Duration = Duration::from_secs(10);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The mesh directory.

fn workloads(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let tier = if i % 2 == 0 { "a" } else { "b" };
        out.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: w{i:03}, namespace: scale}}\nspec:\n  address: 127.0.70.{}\n  serviceAccount: w\n  labels: {{app: w{i:03}, tier: {tier}}}\n  ports: {{http: 8080, tcp: 9000}}\n",
            i + 1
        ));
    }
    out
}

const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: scale}
spec:
  mtls: {mode: STRICT}
";

const BASE_POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: scale}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: [\"/admin*\"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tier-a-readers, namespace: scale}
spec:
  selector: {matchLabels: {tier: a}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/scale/sa/w]}}]
    to: [{operation: {methods: [GET, HEAD], ports: [\"8080\"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tcp-from-namespace, namespace: scale}
spec:
  rules:
  - from: [{source: {namespaces: [scale]}}]
    to: [{operation: {ports: [\"9000\"]}}]
";

/// The namespace-wide policy every measured edit changes: listeners carrying edit `k` contain
/// the path prefix `/edit-{k:04}/`.
fn namespace_policy(k: usize) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: all-workloads, namespace: scale}}
spec:
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/scale/sa/w]}}}}]
    to: [{{operation: {{methods: [GET, POST], paths: [\"/edit-{k:04}/*\", \"/api/*\"], ports: [\"8080\"]}}}}]
"
    )
}

/// The policy of the single-workload edit: selects `w042` only.
fn single_policy(k: usize) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: one-workload, namespace: scale}}
spec:
  selector: {{matchLabels: {{app: w{SINGLE:03}}}}}
  action: DENY
  rules:
  - to: [{{operation: {{paths: [\"/single-{k:04}/*\"]}}}}]
"
    )
}

/// Replaces a mesh-directory file atomically.
fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The control plane.

/// The control plane process, killed when dropped.
struct ControlPlane {
    child: Child,
    ca: String,
    xds: String,
    admin: String,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn line_addr(text: &str, marker: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.split_once(marker).map(|(_, a)| a.trim().to_owned()))
}

fn start_control_plane(work: &Path, config: &Path, state: &Path) -> ControlPlane {
    let out = work.join("controlplane.out");
    let err = work.join("controlplane.err");
    let child = Command::new(PALISADE)
        .args(["controlplane", "--state"])
        .arg(state)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--xds-listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {PALISADE}: {e}"));
    let mut cp = ControlPlane {
        child,
        ca: String::new(),
        xds: String::new(),
        admin: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = cp.child.try_wait() {
            panic!(
                "control plane exited ({status}):\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if let (Some(ca), Some(xds), Some(admin)) = (
            line_addr(&text, "CA listening on"),
            line_addr(&text, "ADS listening on"),
            line_addr(&text, "admin listening on"),
        ) {
            (cp.ca, cp.xds, cp.admin) = (ca, xds, admin);
            return cp;
        }
        assert!(
            Instant::now() < deadline,
            "the control plane did not print its addresses"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A workload certificate for `ns/sa`: `palisade token issue` + `palisade cert request`.
fn request_cert(work: &Path, state: &Path, ca: &str, ns: &str, sa: &str) -> Svid {
    let out = Command::new(PALISADE)
        .args(["token", "issue", "--state"])
        .arg(state)
        .args(["--namespace", ns, "--service-account", sa, "--ttl", "1h"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "token issue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = work.join(format!("{ns}-{sa}.token"));
    std::fs::write(&token, &out.stdout).unwrap();
    let dir = work.join(format!("cert-{ns}-{sa}"));
    let out = Command::new(PALISADE)
        .args(["cert", "request", "--ca-addr", ca, "--ca-root"])
        .arg(state.join("root-cert.pem"))
        .arg("--token-file")
        .arg(&token)
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cert request: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chain = std::fs::read(dir.join("cert-chain.pem")).unwrap();
    let key = std::fs::read(dir.join("key.pem")).unwrap();
    Svid::from_pem(&chain, &key).unwrap()
}

/// CPU time (user + system) and memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy)]
struct Usage {
    cpu: Duration,
    rss_kib: u64,
    hwm_kib: u64,
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn usage(pid: u32, ticks: u64) -> Usage {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields[11].parse().unwrap(), fields[12].parse().unwrap());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Usage {
        cpu: Duration::from_millis((utime + stime) * 1000 / ticks),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    }
}

/// `GET path` on the control plane's admin endpoint: the body.
async fn admin_get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_owned();
    }
    let (mut rest, mut out) = (body, String::new());
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// The Envoy streams of `/debug/syncz`: how many have ACKed the listeners last pushed to
/// them, and the listener pushes summed over streams.
async fn server_lds_acks(admin: &str) -> (usize, u64) {
    let list: Vec<Value> = serde_json::from_str(&admin_get(admin, "/debug/syncz").await).unwrap();
    let mut acked = 0;
    let mut pushes = 0;
    for p in list.iter().filter(|p| p["kind"] == "envoy") {
        let t = &p["types"][LDS];
        pushes += t["pushes"].as_u64().unwrap_or(0);
        if !t["pushed_version"].is_null() && t["pushed_version"] == t["acked_version"] {
            acked += 1;
        }
    }
    (acked, pushes)
}

// ---------------------------------------------------------------------------------------------
// The xDS clients.

/// The TLS connector of one client: one mTLS connection to the ADS port.
#[derive(Clone)]
struct Connector {
    addr: String,
    tls: tokio_rustls::TlsConnector,
}

type Conn = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tonic::codegen::Service<http::Uri> for Connector {
    type Response = Conn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(&this.addr).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from("control-plane.local")
                .map_err(std::io::Error::other)?;
            Ok(TokioIo::new(this.tls.connect(name, tcp).await?))
        })
    }
}

/// What a client reports: one ACK sent.
#[derive(Debug)]
struct Ack {
    stream: usize,
    type_url: String,
    /// The edit number found in the listeners (`/edit-NNNN/`), if any.
    edit: Option<usize>,
    at: Instant,
}

fn envoy_node(i: usize) -> Node {
    let meta = |s: String| PbValue {
        kind: Some(value::Kind::StringValue(s)),
    };
    Node {
        id: format!(
            "sidecar~127.0.70.{}~w{i:03}.scale~scale.svc.cluster.local",
            i + 1
        ),
        cluster: format!("w{i:03}.scale"),
        metadata: Some(Struct {
            fields: [(
                "PALISADE_WORKLOAD".to_owned(),
                meta(format!("scale/w{i:03}")),
            )]
            .into(),
        }),
        ..Default::default()
    }
}

/// The highest `/edit-NNNN/` marker in a response's resources.
fn edit_marker(resp: &DiscoveryResponse) -> Option<usize> {
    const MARK: &[u8] = b"/edit-";
    let mut best = None;
    for any in &resp.resources {
        let b = &any.value;
        let mut i = 0;
        while i + MARK.len() + 4 <= b.len() {
            if &b[i..i + MARK.len()] == MARK {
                let digits = &b[i + MARK.len()..i + MARK.len() + 4];
                if let Some(n) = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse::<usize>().ok())
                {
                    best = best.max(Some(n));
                }
                i += MARK.len();
            } else {
                i += 1;
            }
        }
    }
    best
}

/// One Envoy-like xDS client: CDS wildcard, then LDS wildcard after the first clusters,
/// ACKing everything; reports each ACK on `acks`. Returns when the stream ends.
async fn run_client(
    i: usize,
    connector: Connector,
    acks: mpsc::UnboundedSender<Ack>,
) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_static("http://control-plane.local")
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("stream {i}: connect: {e:?}"))?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut states: BTreeMap<&str, ClientTypeState> = BTreeMap::new();
    states.insert(
        CDS,
        ClientTypeState::new(CDS, Vec::<String>::new()).with_node(envoy_node(i)),
    );
    let (tx, rx) = mpsc::channel(8);
    tx.send(states.get_mut(CDS).unwrap().initial_request())
        .await
        .map_err(|e| e.to_string())?;
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("stream {i}: {e}"))?
        .into_inner();
    while let Some(resp) = responses
        .message()
        .await
        .map_err(|e| format!("stream {i}: {e}"))?
    {
        let key = if resp.type_url == CDS {
            CDS
        } else if resp.type_url == LDS {
            LDS
        } else {
            return Err(format!("stream {i}: unexpected type {}", resp.type_url));
        };
        let state = states.get_mut(key).unwrap();
        state.check(&resp).map_err(|e| e.to_string())?;
        let ack = state.answer(&resp, Ok(()));
        tx.send(ack).await.map_err(|e| e.to_string())?;
        let at = Instant::now();
        let edit = if key == LDS { edit_marker(&resp) } else { None };
        let _ = acks.send(Ack {
            stream: i,
            type_url: key.to_owned(),
            edit,
            at,
        });
        // As Envoy: listeners are requested once the clusters are in.
        if key == CDS && !states.contains_key(LDS) {
            let mut lds = ClientTypeState::new(LDS, Vec::<String>::new());
            tx.send(lds.initial_request())
                .await
                .map_err(|e| e.to_string())?;
            states.insert(LDS, lds);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The measurement.

/// Collects ACKs until every stream has ACKed listeners carrying edit `k`; the last ACK's time.
async fn wait_all_acked(
    acks: &mut mpsc::UnboundedReceiver<Ack>,
    streams: usize,
    k: usize,
    latest: &mut [Option<usize>],
    pushes: &mut [u64],
) -> Result<Instant, usize> {
    let deadline = tokio::time::Instant::now() + EDIT_TIMEOUT;
    let mut last = None;
    loop {
        let done = latest.iter().filter(|e| **e == Some(k)).count();
        if done == streams {
            return last.ok_or(done);
        }
        match tokio::time::timeout_at(deadline, acks.recv()).await {
            Ok(Some(ack)) => {
                pushes[ack.stream] += 1;
                if ack.type_url == LDS && ack.edit.is_some() {
                    latest[ack.stream] = ack.edit;
                    if ack.edit == Some(k) {
                        last = Some(last.map_or(ack.at, |l: Instant| l.max(ack.at)));
                    }
                }
            }
            Ok(None) => panic!("every client ended"),
            Err(_) => return Err(done),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn bench(work: &Path) {
    let streams = env_usize("BENCH_STREAMS", 100).clamp(1, 250);
    let edits = env_usize("BENCH_EDITS", 10).max(1);
    let config = work.join("mesh");
    let state = work.join("state");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("mesh.yaml"), "trustDomain: cluster.local\n").unwrap();
    std::fs::write(config.join("workloads.yaml"), workloads(streams)).unwrap();
    std::fs::write(config.join("peer.yaml"), STRICT).unwrap();
    std::fs::write(config.join("policies.yaml"), BASE_POLICIES).unwrap();
    std::fs::write(config.join("all.yaml"), namespace_policy(0)).unwrap();
    std::fs::write(config.join("one.yaml"), single_policy(0)).unwrap();

    let cp = start_control_plane(work, &config, &state);
    let pid = cp.child.id();
    let ticks = clock_ticks();
    let at_start = usage(pid, ticks);
    let svid = request_cert(work, &state, &cp.ca, "scale", "w");
    let root = std::fs::read(state.join("root-cert.pem")).unwrap();
    let bundle = TrustBundle::from_pem(TrustDomain::new("cluster.local").unwrap(), &root).unwrap();
    let mut tls = palisade_identity::client_config(
        Some(CertSource::from(&svid)),
        &bundle,
        ServerIdentity::Path(CONTROL_PLANE_PATH.to_owned()),
    )
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = Connector {
        addr: cp.xds.clone(),
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
    };

    println!(
        "xds_push: control plane pid {pid}, ADS on {}, {streams} Envoy-like ADS streams, {edits} edits",
        cp.xds
    );
    let (ack_tx, mut acks) = mpsc::unbounded_channel();
    let connect_start = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..streams {
        let (connector, acks) = (connector.clone(), ack_tx.clone());
        clients.spawn(async move {
            if let Err(e) = run_client(i, connector, acks).await {
                eprintln!("xds_push: {e}");
            }
        });
    }
    drop(ack_tx);
    let mut latest = vec![None; streams];
    let mut pushes = vec![0u64; streams];
    match wait_all_acked(&mut acks, streams, 0, &mut latest, &mut pushes).await {
        Ok(last) => println!(
            "initial config: {streams} streams connected (mTLS), CDS + LDS ACKed, in {:.0} ms",
            ms(last - connect_start)
        ),
        Err(done) => panic!("only {done} of {streams} streams got their initial config"),
    }
    // Let the watcher and the streams settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(ack) = acks.try_recv() {
        pushes[ack.stream] += 1;
    }
    let before_edits = usage(pid, ticks);

    let mut times = Vec::new();
    let mut server_ok = 0;
    println!("\nedit  last ACK (ms)  server saw LDS ACKs");
    for k in 1..=edits {
        let t0 = Instant::now();
        write_atomic(&config, "all.yaml", &namespace_policy(k));
        let result = wait_all_acked(&mut acks, streams, k, &mut latest, &mut pushes).await;
        // The control plane's view: every Envoy stream's listeners ACKed at the version pushed.
        let mut seen = (0, 0);
        for _ in 0..40 {
            seen = server_lds_acks(&cp.admin).await;
            if seen.0 == streams {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if seen.0 == streams {
            server_ok += 1;
        }
        match result {
            Ok(last) => {
                let t = last - t0;
                times.push(t);
                println!("{k:>4}  {:>13.1}  {}/{streams}", ms(t), seen.0);
            }
            Err(done) => println!(
                "{k:>4}  timed out: {done}/{streams} streams within {EDIT_TIMEOUT:?}; server {}/{streams}",
                seen.0
            ),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let after_edits = usage(pid, ticks);

    // One edit that changes one workload's config: who gets a push?
    while let Ok(ack) = acks.try_recv() {
        pushes[ack.stream] += 1;
    }
    let before: Vec<u64> = pushes.clone();
    let (_, server_pushes_before) = server_lds_acks(&cp.admin).await;
    let t0 = Instant::now();
    write_atomic(&config, "one.yaml", &single_policy(1));
    let mut single_acked = None;
    let window = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(ack)) = tokio::time::timeout_at(window, acks.recv()).await {
        pushes[ack.stream] += 1;
        if ack.stream == SINGLE && ack.type_url == LDS && single_acked.is_none() {
            single_acked = Some(ack.at - t0);
        }
    }
    let pushed: Vec<usize> = (0..streams).filter(|&i| pushes[i] > before[i]).collect();
    let (_, server_pushes_after) = server_lds_acks(&cp.admin).await;
    let at_end = usage(pid, ticks);

    times.sort();
    println!(
        "\nsummary ({streams} streams, {} of {edits} edits completed)",
        times.len()
    );
    if !times.is_empty() {
        let median = times[times.len() / 2];
        let max = *times.last().unwrap();
        let min = times[0];
        println!(
            "  time from the write to the last stream's ACK: median {:.1} ms, min {:.1} ms, max {:.1} ms",
            ms(median),
            ms(min),
            ms(max)
        );
        println!(
            "  every stream ACKed within one second after every edit: {}",
            times.len() == edits && max < Duration::from_secs(1)
        );
    }
    println!("  control plane saw every LDS ACK after {server_ok} of {edits} edits");
    println!(
        "  single-workload edit (selects w{SINGLE:03}): streams pushed {} {:?}, LDS pushes on the server +{}, w{SINGLE:03} ACKed after {}",
        pushed.len(),
        pushed
            .iter()
            .map(|i| format!("w{i:03}"))
            .collect::<Vec<_>>(),
        server_pushes_after.saturating_sub(server_pushes_before),
        single_acked.map_or("no push".to_owned(), |t| format!("{:.1} ms", ms(t)))
    );
    let cpu_per_edit = (after_edits.cpu.saturating_sub(before_edits.cpu)) / edits as u32;
    println!(
        "  control plane CPU (user+sys): start {:.0} ms, after initial sync {:.0} ms, after the edits {:.0} ms ({:.0} ms per edit of 100 workloads), end {:.0} ms",
        ms(at_start.cpu),
        ms(before_edits.cpu),
        ms(after_edits.cpu),
        ms(cpu_per_edit),
        ms(at_end.cpu)
    );
    println!(
        "  control plane RSS: start {} KiB, after initial sync {} KiB, end {} KiB (peak {} KiB)",
        at_start.rss_kib, before_edits.rss_kib, at_end.rss_kib, at_end.hwm_kib
    );
    clients.abort_all();
    drop(cp);
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported, everything runs.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::Builder::new()
        .prefix("xds-push-")
        .tempdir()
        .unwrap();
    let work: PathBuf = dir.path().to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let outcome =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(300), bench(&work)).await });
    rt.shutdown_timeout(Duration::from_secs(2));
    if std::env::var_os("BENCH_KEEP_WORK").is_some() {
        println!("scratch directory kept: {}", dir.keep().display());
    }
    if outcome.is_err() {
        eprintln!("xds_push: gave up after 300 s");
        std::process::exit(1);
    }
}
