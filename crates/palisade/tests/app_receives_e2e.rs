//! What the application receives is exactly what was authorized: real sidecars in front of a
//! recording application that keeps every byte the sidecar sends it, probed as an attacker
//! would (issue "Security holes"): ports parsed as declared, never sniffed into TCP; the
//! normalized path forwarded; the application's own TLS passed through on PERMISSIVE ports;
//! hop-by-hop headers and forged identity headers stripped; `X-Forwarded-For` trusted only as
//! far as `numTrustedProxies` says; header caps, timeouts and connection caps on every listener;
//! HTTP/1.1 heads with a repeated or missing `Host` refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/mesh.rs"]
mod mesh;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_mesh::wait_for;
use mesh::{Mesh, Transport};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

// Each test has its own loopback range 127.0.5x (`.1` the server, `.2` the limited workload),
// so tests run in parallel without colliding.
const FORGED: &str = "By=a;URI=spiffe://cluster.local/ns/istio-system/sa/admin";

fn workloads(base: &str) -> String {
    let (server, limited) = (format!("{base}.1"), format!("{base}.2"));
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: server, namespace: demo}}
spec:
  address: {server}
  serviceAccount: server
  labels: {{app: server}}
  ports: {{http-public: 8080, http-strict: 8081, http-open: 8082, http-remote: 8083, tcp: 9000, https: 8443, web: 8090}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: limited, namespace: demo}}
spec:
  address: {limited}
  serviceAccount: limited
  labels: {{app: limited}}
  ports: {{http: 8080, tcp: 9000}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: server, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  mtls: {{mode: PERMISSIVE}}
  portLevelMtls:
    "8081": {{mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: limited, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: limited}}}}
  mtls: {{mode: PERMISSIVE}}
"#
    )
}

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - to: [{operation: {ports: ["8080"], paths: ["/public/*"]}}]
  - to: [{operation: {ports: ["8081", "8082", "9000", "8443", "8090"]}}]
  - from: [{source: {remoteIpBlocks: ["203.0.113.7/32"]}}]
    to: [{operation: {ports: ["8083"]}}]
"#;

/// The application: records every byte it is sent and answers each request head with a 200
/// whose body is that head, plus a hop-by-hop header of its own (`Connection: x-resp-secret`).
struct Recorder {
    port: u16,
    seen: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        log.lock().unwrap().extend_from_slice(&chunk[..n]);
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = buf.drain(..end + 4).collect();
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\nconnection: x-resp-secret\r\nx-resp-secret: 1\r\ncontent-length: {}\r\n\r\n",
                                head.len()
                            );
                            let mut out = resp.into_bytes();
                            out.extend_from_slice(&head);
                            if tcp.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Self { port, seen, task }
    }

    fn seen(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An application that serves its own TLS (certificate for `app.local`) and says hello.
async fn tls_app() -> (
    u16,
    rustls::pki_types::CertificateDer<'static>,
    tokio::task::JoinHandle<()>,
) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["app.local".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = cert.der().clone();
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![der.clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"hello from the app's own TLS").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    (port, der, task)
}

/// Sends `raw` on a fresh connection and reads until the sidecar closes it: status and body,
/// or `None` when it closed without an HTTP response.
async fn exchange(addr: &str, t: &Transport, raw: &[u8]) -> Option<(u16, String)> {
    let mut s = mesh::connect(addr, t).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the sidecar kept the connection open");
    if let Err(e) = read {
        eprintln!(
            "reading the answer to {:?}: {e}",
            String::from_utf8_lossy(raw)
        );
    }
    agent_mesh::parse_response(&out).ok()
}

/// One `GET` with `Connection: close` and extra header lines; status and body (the head the
/// application received).
async fn get(addr: &str, t: &Transport, target: &str, extra: &str) -> (u16, String) {
    let raw = format!("GET {target} HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n{extra}\r\n");
    exchange(addr, t, raw.as_bytes())
        .await
        .expect("an HTTP response")
}

/// The request line the application received.
fn request_line(head: &str) -> &str {
    head.lines().next().unwrap_or_default()
}

struct Setup {
    /// The server's address and the limited workload's.
    addr: String,
    limited_addr: String,
    mesh: Mesh,
    app: Recorder,
    client: Transport,
    server: mesh::Sidecar,
    limited: Option<mesh::Sidecar>,
    _tls_task: tokio::task::JoinHandle<()>,
    tls_cert: rustls::pki_types::CertificateDer<'static>,
}

/// The mesh, the recording application, the server's sidecar and, with `limited`, the
/// limited workload's sidecar (1 s header-read timeout, 3 s idle timeout, 3 connections).
async fn setup(base: &str, limited: bool) -> Setup {
    let workloads = workloads(base);
    let mesh = Mesh::start(&[("workloads.yaml", &workloads), ("policy.yaml", POLICY)]).await;
    let app = Recorder::start().await;
    let (tls_port, tls_cert, tls_task) = tls_app().await;
    let mut args: Vec<String> = [8080, 8081, 8082, 8083, 9000, 8090]
        .iter()
        .flat_map(|p| ["--app-port".to_owned(), format!("{p}={}", app.port)])
        .collect();
    args.extend(["--app-port".to_owned(), format!("8443={tls_port}")]);
    let server = mesh.sidecar("demo/server", "demo", "server", &args).await;
    let limited_args: Vec<String> = [
        "--app-port",
        &format!("8080={}", app.port),
        "--app-port",
        &format!("9000={}", app.port),
        "--header-read-timeout",
        "1s",
        "--idle-timeout",
        "3s",
        "--max-connections",
        "3",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let limited = if limited {
        Some(
            mesh.sidecar("demo/limited", "demo", "limited", &limited_args)
                .await,
        )
    } else {
        None
    };
    let client = Transport::mtls(
        mesh.cert("demo", "client"),
        "spiffe://cluster.local/ns/demo/sa/server",
        mesh.bundle(),
    );
    Setup {
        addr: format!("{base}.1"),
        limited_addr: format!("{base}.2"),
        mesh,
        app,
        client,
        server,
        limited,
        _tls_task: tls_task,
        tls_cert,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item0_declared_ports_are_parsed_as_declared() {
    let s = setup("127.0.51", false).await;
    let addr = s.addr.as_str();
    let plain = Transport::Plain;
    let open = format!("{addr}:8082");
    // 0. A declared HTTP port is parsed as HTTP whatever the first bytes: an empty line before
    // the request line (RFC 9112 section 2.2) no longer turns the stream into opaque TCP that
    // carries the client's own identity header to the application.
    let forged = format!(
        "\r\nGET /w HTTP/1.1\r\nHost: o\r\nConnection: close\r\nX-Forwarded-Client-Cert: {FORGED}\r\n\r\n"
    );
    let (status, head) = exchange(&open, &plain, forged.as_bytes()).await.unwrap();
    assert_eq!(status, 200, "{head}");
    assert!(head.starts_with("GET /w HTTP/1.1"), "{head}");
    assert!(
        !head.contains("istio-system"),
        "forged XFCC reached the app: {head}"
    );
    // Over mTLS without ALPN (a mesh peer that does not say HTTP) on the STRICT port: the
    // application sees the proxy's XFCC for the real peer, never the forged one.
    let no_alpn = s.client.clone().without_alpn();
    let (status, head) = exchange(&format!("{addr}:8081"), &no_alpn, forged.as_bytes())
        .await
        .unwrap();
    assert_eq!(status, 200, "{head}");
    assert!(!head.contains("istio-system"), "{head}");
    assert!(
        head.contains("URI=spiffe://cluster.local/ns/demo/sa/client"),
        "{head}"
    );
    // A lowercase method is refused (400), on a declared port and on a sniffed one alike, and
    // garbage on a declared HTTP port is a 400, not bytes piped to the application.
    for port in [8082, 8090] {
        let addr = format!("{addr}:{port}");
        let raw = format!(
            "get /lower-{port} HTTP/1.1\r\nHost: o\r\nConnection: close\r\nX-Forwarded-Client-Cert: {FORGED}\r\n\r\n"
        );
        let (status, _) = exchange(&addr, &plain, raw.as_bytes()).await.unwrap();
        assert_eq!(status, 400, "port {port}");
    }
    let (status, _) = exchange(&open, &plain, b"hello there\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(status, 400);
    // The sniffed (undeclared) port also tolerates the leading empty line as HTTP.
    let (status, head) = exchange(&format!("{addr}:8090"), &plain, forged.as_bytes())
        .await
        .unwrap();
    assert_eq!(status, 200, "{head}");
    assert!(!head.contains("istio-system"), "{head}");
    let seen = s.app.seen();
    assert!(
        !seen.contains("istio-system"),
        "forged identity reached the app:\n{seen}"
    );
    assert!(
        !seen.contains("/lower-") && !seen.contains("hello there"),
        "{seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_the_authorized_path_is_forwarded() {
    let s = setup("127.0.55", false).await;
    let addr = s.addr.as_str();
    let plain = Transport::Plain;
    // 1. The application gets the path that was authorized, with the query as sent.
    let public = format!("{addr}:8080");
    let (status, head) = get(&public, &plain, "/admin/%2e%2e/public/x?q=%2e%2e", "").await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(request_line(&head), "GET /public/x?q=%2e%2e HTTP/1.1");
    let (status, _) = get(&public, &plain, "/public/%2e%2e/admin", "").await;
    assert_eq!(status, 403);
    let (status, head) = get(&public, &plain, "/public/./a/%7euser", "").await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(request_line(&head), "GET /public/a/~user HTTP/1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_hop_by_hop_headers_do_not_cross() {
    let s = setup("127.0.56", false).await;
    let addr = s.addr.as_str();
    let plain = Transport::Plain;
    let open = format!("{addr}:8082");
    // 5. Hop-by-hop headers do not cross the proxy, either way.
    let raw = "GET /h HTTP/1.1\r\nHost: svc\r\nConnection: close, x-secret\r\nX-Secret: 1\r\nTE: gzip\r\nTrailer: x-t\r\nKeep-Alive: 5\r\nX-Kept: yes\r\n\r\n";
    let mut conn = mesh::connect(&open, &plain).await.unwrap();
    conn.write_all(raw.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    conn.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    let (resp_head, app_head) = text.split_once("\r\n\r\n").unwrap();
    assert!(app_head.contains("x-kept: yes"), "{app_head}");
    for h in ["x-secret", "\nte:", "trailer", "keep-alive"] {
        assert!(!app_head.contains(h), "{h} reached the app: {app_head}");
    }
    assert!(!resp_head.contains("x-resp-secret"), "{resp_head}");
    let (status, head) = get(&open, &plain, "/te", "TE: trailers\r\n").await;
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("te: trailers"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item9_http1_framing_is_as_strict_as_envoys() {
    let s = setup("127.0.57", false).await;
    let addr = s.addr.as_str();
    let plain = Transport::Plain;
    let open = format!("{addr}:8082");
    // 9. Exactly one Host on HTTP/1.1: two (a policy would see one, the app both) or none is 400.
    let (status, _) = exchange(
        &open,
        &plain,
        b"GET /two-hosts HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status, 400);
    let (status, _) = exchange(
        &open,
        &plain,
        b"GET /no-host HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status, 400);
    // ... and framing that hyper would resolve silently is refused as Envoy's codec refuses
    // it, before the application sees any of the request (plaintext and mTLS alike).
    let framing: [(&str, u16); 5] = [
        (
            "POST /cl-te HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "POST /te-cl HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "POST /two-cl HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
            400,
        ),
        (
            "POST /gzip HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
        ),
        (
            "POST /bad-chunk HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            400,
        ),
    ];
    for t in [&plain, &s.client] {
        for (raw, want) in framing {
            let (status, _) = exchange(&open, t, raw.as_bytes())
                .await
                .unwrap_or_else(|| panic!("no HTTP response to {raw:?}\n{}", s.server.stderr()));
            assert_eq!(status, want, "{raw:?}");
        }
    }
    let seen = s.app.seen();
    for marker in ["/cl-te", "/te-cl", "/two-cl", "/gzip", "/bad-chunk"] {
        assert!(!seen.contains(marker), "{marker} reached the app: {seen}");
    }
    assert!(
        !seen.contains("/two-hosts") && !seen.contains("/no-host"),
        "{seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_permissive_passes_the_applications_own_tls_through() {
    let s = setup("127.0.58", false).await;
    let addr = s.addr.as_str();
    let open = format!("{addr}:8082");
    // 3. PERMISSIVE: TLS without a mesh ALPN is the application's own and passes through.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(s.tls_cert.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(format!("{addr}:8443")).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("app.local").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("the application's own TLS handshake through the sidecar");
    let mut hello = String::new();
    tls.read_to_string(&mut hello).await.unwrap();
    assert_eq!(hello, "hello from the app's own TLS");
    // A mesh client on the same PERMISSIVE port still gets mutual TLS with the sidecar.
    assert!(
        s.server
            .stat(
                "palisade_tls_handshakes",
                &["PERMISSIVE", "tls_passthrough"]
            )
            .await
            >= 1.0
    );
    let (status, head) = get(&open, &s.client, "/mesh", "").await;
    assert_eq!(status, 200);
    assert!(
        head.contains("URI=spiffe://cluster.local/ns/demo/sa/client"),
        "{head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item6_forwarded_for_is_trusted_only_as_configured() {
    let s = setup("127.0.59", false).await;
    let addr = s.addr.as_str();
    let plain = Transport::Plain;
    // 6. X-Forwarded-For names the client only past the trusted hops: none by default.
    let remote = format!("{addr}:8083");
    let xff = "X-Forwarded-For: 203.0.113.7\r\n";
    assert_eq!(get(&remote, &plain, "/r", xff).await.0, 403);
    s.mesh.write_config(
        "mesh.yaml",
        "trustDomain: cluster.local\ndefaultConfig: {gatewayTopology: {numTrustedProxies: 1}}\n",
    );
    wait_for(
        "numTrustedProxies: 1 to reach the sidecar",
        Duration::from_secs(15),
        async || (get(&remote, &plain, "/r", xff).await.0 == 200).then_some(()),
    )
    .await;
    // The trusted hop appended its peer last: a client-written entry before it counts for nothing.
    let spoof = "X-Forwarded-For: 203.0.113.7, 198.51.100.1\r\n";
    assert_eq!(get(&remote, &plain, "/r", spoof).await.0, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarded_path_follows_the_normalization_mode() {
    let s = setup("127.0.52", false).await;
    let addr = s.addr.as_str();
    let plain = Transport::Plain;
    let public = format!("{addr}:8080");
    // (pathNormalization, request target, what the application must receive)
    let table = [
        ("BASE", "/public//x/%2e/y?a=b", "/public//x/y?a=b"),
        ("MERGE_SLASHES", "/public//x/%2e/y?a=b", "/public/x/y?a=b"),
        (
            "DECODE_AND_MERGE_SLASHES",
            "/public%2Fx%2F%2Fy",
            "/public/x/y",
        ),
        ("NONE", "/public/x/%2e%2e/y", "/public/x/%2e%2e/y"),
    ];
    for (mode, target, want) in table {
        s.mesh.write_config(
            "mesh.yaml",
            &format!("trustDomain: cluster.local\npathNormalization: {{normalization: {mode}}}\n"),
        );
        let want_line = format!("GET {want} HTTP/1.1");
        wait_for(
            &format!("{mode}: the application to receive {want}"),
            Duration::from_secs(15),
            async || {
                let (status, head) = get(&public, &plain, target, "").await;
                (status == 200 && request_line(&head) == want_line).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_cap_headers_time_out_and_limit_connections() {
    let s = setup("127.0.53", true).await;
    let limited = s.limited_addr.as_str();
    let limited_sidecar = s.limited.as_ref().unwrap();
    let plain = Transport::Plain;
    let http = format!("{limited}:8080");

    // Request headers: Envoy's 60 KiB default.
    let big = |n: usize| format!("X-Big: {}\r\n", "a".repeat(n));
    assert_eq!(get(&http, &plain, "/small", &big(50 * 1024)).await.0, 200);
    assert_eq!(get(&http, &plain, "/big", &big(61 * 1024)).await.0, 431);

    // A half-sent request is closed after the header-read timeout (1 s here), on the inbound
    // listener and on the outbound one alike.
    for addr in [http.clone(), limited_sidecar.outbound.clone()] {
        let mut conn = TcpStream::connect(&addr).await.unwrap();
        conn.write_all(b"GET /half HTTP/1.1\r\nHost: svc\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{addr}: a half-sent request held the connection"))
            .ok();
        assert!(started.elapsed() >= Duration::from_millis(800), "{addr}");
    }

    // TCP pass-through: closed once idle for the idle timeout (3 s here), not before.
    let mut conn = TcpStream::connect(format!("{limited}:9000")).await.unwrap();
    conn.write_all(b"ping").await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), conn.read_to_end(&mut buf))
        .await
        .expect("an idle TCP connection was never closed")
        .ok();
    let idle = started.elapsed();
    assert!(idle >= Duration::from_millis(2500), "closed after {idle:?}");

    // At most 3 connections per listener: a fourth is closed as it arrives, and counted.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(format!("{limited}:9000")).await.unwrap();
        c.write_all(b"hold").await.unwrap();
        held.push(c);
    }
    wait_for(
        "the three held connections to reach the application",
        Duration::from_secs(10),
        async || (s.app.seen().matches("hold").count() >= 3).then_some(()),
    )
    .await;
    let mut fourth = TcpStream::connect(format!("{limited}:9000")).await.unwrap();
    let _ = fourth.write_all(b"over").await;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), fourth.read_to_end(&mut buf))
        .await
        .expect("the connection over the limit was not closed")
        .ok();
    assert!(buf.is_empty());
    assert!(
        limited_sidecar
            .stat("palisade_connections", &["inbound", "over_limit"])
            .await
            >= 1.0
    );
    assert!(!s.app.seen().contains("over"));
    drop(held);
}

/// Envoy 1.40 as Istio configures a sidecar's inbound HTTP connection manager under the default
/// (BASE) path normalization, in front of its own recording application.
async fn istio_like_envoy(dir: &std::path::Path, app_port: u16) -> (envoy::Envoy, String) {
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = envoy::http_filters_bootstrap(port, app_port, Vec::new());
    let hcm = &mut config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    hcm["normalize_path"] = serde_json::json!(true);
    hcm["merge_slashes"] = serde_json::json!(false);
    hcm["path_with_escaped_slashes_action"] = serde_json::json!("KEEP_UNCHANGED");
    let proxy = envoy::Envoy::start(dir, "envoy-inbound", &config).await;
    let addr = format!("127.0.0.1:{port}");
    wait_for(
        "Envoy's inbound listener",
        Duration::from_secs(30),
        async || TcpStream::connect(&addr).await.ok().map(|_| ()),
    )
    .await;
    (proxy, addr)
}

/// The same raw requests to a real Envoy and to a Palisade sidecar, each in front of its own
/// recording application: the same status for every request, and for those forwarded, the same
/// request line at the application (the path Envoy forwards is the normalized one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_palisade_frame_and_forward_alike() {
    let s = setup("127.0.54", false).await;
    let envoy_app = Recorder::start().await;
    let (_envoy, envoy_addr) = istio_like_envoy(s.mesh.path(), envoy_app.port).await;
    let palisade_addr = format!("{}:8082", s.addr);
    let big = "a".repeat(61 * 1024);
    let close = "Connection: close\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "dot-dot",
            format!("GET /a/%2e%2e/b HTTP/1.1\r\nHost: svc\r\n{close}\r\n"),
        ),
        (
            "dot",
            format!("GET /a/./b HTTP/1.1\r\nHost: svc\r\n{close}\r\n"),
        ),
        (
            "double slash kept",
            format!("GET /a//b HTTP/1.1\r\nHost: svc\r\n{close}\r\n"),
        ),
        (
            "encoded slash kept",
            format!("GET /a%2Fb HTTP/1.1\r\nHost: svc\r\n{close}\r\n"),
        ),
        (
            "query as sent",
            format!("GET /a/../b?x=%2e%2e&y=/../ HTTP/1.1\r\nHost: svc\r\n{close}\r\n"),
        ),
        (
            "unreserved escapes",
            format!("GET /%7euser/%41b%2d HTTP/1.1\r\nHost: svc\r\n{close}\r\n"),
        ),
        (
            "lowercase method",
            format!("get /lower HTTP/1.1\r\nHost: svc\r\n{close}\r\n"),
        ),
        (
            "leading empty line",
            format!("\r\nGET /lead HTTP/1.1\r\nHost: svc\r\n{close}\r\n"),
        ),
        (
            "two hosts",
            format!("GET /h HTTP/1.1\r\nHost: a\r\nHost: b\r\n{close}\r\n"),
        ),
        ("no host", format!("GET /h HTTP/1.1\r\n{close}\r\n")),
        (
            "CL and TE",
            format!(
                "POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n{close}\r\n0\r\n\r\n"
            ),
        ),
        (
            "two equal CL",
            format!(
                "POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n{close}\r\nab"
            ),
        ),
        (
            "unknown coding",
            format!("POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n{close}\r\n"),
        ),
        (
            "bad chunk size",
            format!(
                "POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n{close}\r\nzz\r\nhello\r\n0\r\n\r\n"
            ),
        ),
        (
            "headers over 60 KiB",
            format!("GET /big HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n{close}\r\n"),
        ),
    ];
    // Where Palisade is deliberately stricter than Envoy: (case, Envoy's answer, Palisade's).
    // Envoy 1.40 forwards a request with two Host headers; a policy on hosts would then see one
    // value while the application may read the other, so Palisade refuses it (RFC 9112 section
    // 3.2: exactly one Host).
    let stricter = [("two hosts", "200 GET /h HTTP/1.1", "400")];
    let plain = Transport::Plain;
    let mut differences = Vec::new();
    for (what, raw) in &cases {
        let e = exchange(&envoy_addr, &plain, raw.as_bytes()).await;
        let p = exchange(&palisade_addr, &plain, raw.as_bytes()).await;
        let line = |r: &Option<(u16, String)>| match r {
            Some((200, body)) => format!("200 {}", request_line(body)),
            Some((status, _)) => status.to_string(),
            None => "no response".to_owned(),
        };
        let (e, p) = (line(&e), line(&p));
        if let Some((_, want_e, want_p)) = stricter.iter().find(|k| k.0 == *what) {
            assert_eq!((e.as_str(), p.as_str()), (*want_e, *want_p), "{what}");
            continue;
        }
        if e != p {
            differences.push(format!("{what}: envoy {e:?}, palisade {p:?}"));
        }
    }
    assert!(
        differences.is_empty(),
        "Envoy and Palisade differ:\n{}",
        differences.join("\n")
    );
}
