//! The sidecar proxy with real processes on loopback: the control plane pushing a mesh
//! directory over ADS, `palisade sidecar` / `palisade agent` + `palisade proxy`, mutual TLS
//! modes, per-request and per-connection authorization, sidecar pairs over HTTP/1.1, HTTP/2 and
//! TCP, hot reload of policy files, and interop with real Envoy sidecars both ways.
//!
//! Workload addresses are loopback IPs (127.0.1x.y): Linux routes all of 127.0.0.0/8 to `lo`,
//! so every workload has its own address and ports do not collide. Each test uses its own range.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/mesh.rs"]
mod mesh;

use std::time::{Duration, Instant};

use mesh::{Echo, Mesh, TcpEcho, Transport, echo_json, http1, tcp_echo};

const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";

fn server_files(addr: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: server, namespace: demo}}
spec:
  address: {addr}
  serviceAccount: server
  labels: {{app: server}}
  ports: {{http: 8080, http-permissive: 8081, http-plain: 8082, tcp: 9000}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: server, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  mtls: {{mode: STRICT}}
  portLevelMtls:
    "8081": {{mode: PERMISSIVE}}
    "8082": {{mode: DISABLE}}
"#
    )
}

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-allow, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
    to: [{operation: {methods: [GET], paths: ["/api/*"], ports: ["8080"]}}]
  - from: [{source: {namespaces: [ops]}}]
    to: [{operation: {ports: ["8080"]}}]
  - to: [{operation: {ports: ["8081", "8082"], paths: ["/public*"]}}]
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
    to: [{operation: {ports: ["9000"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-deny, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - to: [{operation: {ports: ["8080"], paths: ["/api/secret"]}}]
"#;

/// A client certificate signed by a CA the mesh does not know, with a mesh-looking SPIFFE ID.
fn foreign_cert() -> palisade_identity::Svid {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from("spiffe://cluster.local/ns/demo/sa/client").unwrap(),
    )];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let _ = ca_cert;
    palisade_identity::Svid::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_modes_and_authorization() {
    let addr = "127.0.11.1";
    let workloads = server_files(addr);
    let mesh = Mesh::start(&[("workloads.yaml", &workloads), ("policies.yaml", POLICIES)]).await;
    let app = Echo::start().await;
    let tcp_app = TcpEcho::start().await;
    let app_ports: Vec<String> = [8080, 8081, 8082]
        .iter()
        .flat_map(|p| ["--app-port".to_owned(), format!("{p}={}", app.port())])
        .chain(["--app-port".to_owned(), format!("9000={}", tcp_app.port())])
        .collect();
    let sidecar = mesh
        .sidecar("demo/server", "demo", "server", &app_ports)
        .await;

    let bundle = mesh.bundle();
    let client = Transport::mtls(mesh.cert("demo", "client"), SERVER_ID, bundle.clone());
    let ops = Transport::mtls(mesh.cert("ops", "tool"), SERVER_ID, bundle.clone());
    let intruder = Transport::mtls(mesh.cert("other", "intruder"), SERVER_ID, bundle.clone());
    let foreign = Transport::mtls(foreign_cert(), SERVER_ID, bundle.clone());
    let plain = Transport::Plain;
    let p8080 = format!("{addr}:8080");
    let p8081 = format!("{addr}:8081");
    let p8082 = format!("{addr}:8082");

    // (what, port, transport, method, path, expected status; None = no HTTP response at all)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a Transport,
        &'a str,
        &'a str,
        Option<u16>,
    );
    let table: Vec<Case> = vec![
        (
            "principal + method + path allowed",
            &p8080,
            &client,
            "GET",
            "/api/items",
            Some(200),
        ),
        (
            "method not allowed",
            &p8080,
            &client,
            "POST",
            "/api/items",
            Some(403),
        ),
        (
            "path not allowed",
            &p8080,
            &client,
            "GET",
            "/admin",
            Some(403),
        ),
        (
            "explicit DENY wins over ALLOW",
            &p8080,
            &client,
            "GET",
            "/api/secret",
            Some(403),
        ),
        (
            "namespace allowed (any path, any method)",
            &p8080,
            &ops,
            "DELETE",
            "/anything",
            Some(200),
        ),
        (
            "other principal and namespace",
            &p8080,
            &intruder,
            "GET",
            "/api/items",
            Some(403),
        ),
        (
            "port: the principal's rule is for 8080 only",
            &p8081,
            &client,
            "GET",
            "/api/items",
            Some(403),
        ),
        (
            "STRICT refuses plaintext",
            &p8080,
            &plain,
            "GET",
            "/api/items",
            None,
        ),
        (
            "STRICT refuses a foreign CA",
            &p8080,
            &foreign,
            "GET",
            "/api/items",
            None,
        ),
        (
            "PERMISSIVE (port override) serves plaintext",
            &p8081,
            &plain,
            "GET",
            "/public/a",
            Some(200),
        ),
        (
            "PERMISSIVE serves mTLS",
            &p8081,
            &client,
            "GET",
            "/public/b",
            Some(200),
        ),
        (
            "PERMISSIVE plaintext still authorized",
            &p8081,
            &plain,
            "GET",
            "/private",
            Some(403),
        ),
        (
            "DISABLE serves plaintext",
            &p8082,
            &plain,
            "GET",
            "/public/c",
            Some(200),
        ),
    ];
    let mut failures = Vec::new();
    for (what, port, t, method, path, want) in &table {
        let got = http1(port, t, method, path, &[]).await;
        let status = got.as_ref().ok().map(|(s, _)| *s);
        if status != *want {
            failures.push(format!(
                "{what}: {method} {port}{path}: want {want:?}, got {got:?}"
            ));
        }
        if *want == Some(403) {
            let body = got.map(|(_, b)| b).unwrap_or_default();
            assert_eq!(body, "RBAC: access denied", "{what}");
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n--- sidecar log:\n{}",
        failures.join("\n"),
        sidecar.stderr()
    );

    // The app sees the verified client identity, never what the client claims.
    let (status, body) = http1(
        &p8080,
        &client,
        "GET",
        "/api/x",
        &[(
            "x-forwarded-client-cert",
            "By=evil;URI=spiffe://cluster.local/ns/demo/sa/admin",
        )],
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let echo = echo_json(&body);
    let xfcc = echo["xfcc"].as_array().unwrap();
    assert_eq!(xfcc.len(), 1, "{body}");
    let xfcc = xfcc[0].as_str().unwrap();
    assert!(xfcc.starts_with(&format!("By={SERVER_ID};Hash=")), "{xfcc}");
    assert!(
        xfcc.ends_with(";URI=spiffe://cluster.local/ns/demo/sa/client"),
        "{xfcc}"
    );
    // Plaintext (PERMISSIVE) requests carry no identity; a spoofed header is removed.
    let (_, body) = http1(
        &p8081,
        &plain,
        "GET",
        "/public/x",
        &[(
            "x-forwarded-client-cert",
            "URI=spiffe://cluster.local/ns/demo/sa/admin",
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        echo_json(&body)["xfcc"].as_array().unwrap().len(),
        0,
        "{body}"
    );

    // Opaque TCP: authorized once per connection.
    let p9000 = format!("{addr}:9000");
    let tcp_client = client.clone().without_alpn();
    assert_eq!(
        tcp_echo(&p9000, &tcp_client, b"hello tcp").await.unwrap(),
        b"hello tcp"
    );
    assert!(
        tcp_echo(&p9000, &intruder.clone().without_alpn(), b"hello")
            .await
            .is_err(),
        "denied TCP is closed"
    );
    assert!(
        tcp_echo(&p9000, &plain, b"hello").await.is_err(),
        "STRICT TCP refuses plaintext"
    );

    // Metrics and logs name the deciding policy.
    let deny_id = "ns[demo]-policy[server-deny]-rule[0]";
    assert_eq!(
        sidecar
            .stat(
                "palisade_rbac_decisions_total",
                &["decision=\"denied\"", deny_id]
            )
            .await,
        1.0
    );
    assert!(
        sidecar
            .stat(
                "palisade_rbac_decisions_total",
                &["protocol=\"tcp\"", "decision=\"denied\""]
            )
            .await
            >= 1.0
    );
    assert!(
        sidecar
            .stat(
                "palisade_tls_handshakes_total",
                &["mode=\"STRICT\"", "outcome=\"refused_plaintext\""]
            )
            .await
            >= 2.0
    );
    assert!(
        sidecar
            .stat(
                "palisade_tls_handshakes_total",
                &["mode=\"STRICT\"", "outcome=\"failed\""]
            )
            .await
            >= 1.0
    );
    let log = sidecar.stderr();
    assert!(
        log.contains("enforced denied, matched policy ns[demo]-policy[server-deny]-rule[0]"),
        "{log}"
    );

    // Admin: config dump with the effective mode per port; certs; run-time log level.
    let (_, dump) = sidecar.admin_get("/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let modes: Vec<(u64, &str)> = dump["inbound"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["port"].as_u64().unwrap(), p["mode"].as_str().unwrap()))
        .collect();
    assert_eq!(
        modes,
        [
            (8080, "STRICT"),
            (8081, "PERMISSIVE"),
            (8082, "DISABLE"),
            (9000, "STRICT")
        ]
    );
    let (_, certs) = sidecar.admin_get("/certs").await;
    assert!(certs.contains(SERVER_ID), "{certs}");
    assert_eq!(
        sidecar.admin_get("/ready").await,
        (200, "LIVE\n".to_owned())
    );
    let (status, _) = sidecar.admin_post("/logging?rbac=debug").await;
    assert_eq!(status, 200);
    http1(&p8080, &client, "GET", "/api/debug-me", &[])
        .await
        .unwrap();
    let log = sidecar.stderr();
    assert!(
        log.contains("enforced allowed") && log.contains("/api/debug-me"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_hot_reload_under_traffic() {
    let addr = "127.0.12.1";
    let workloads = server_files(addr);
    let allow_api = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: hot, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - to: [{operation: {paths: ["/api/*", "/slow"]}}]
  - to: [{operation: {ports: ["9000"]}}]
"#;
    let mesh = Mesh::start(&[("workloads.yaml", &workloads), ("policy.yaml", allow_api)]).await;
    let app = Echo::start().await;
    let tcp_app = TcpEcho::start().await;
    let args: Vec<String> = vec![
        "--app-port".into(),
        format!("8080={}", app.port()),
        "--app-port".into(),
        format!("9000={}", tcp_app.port()),
    ];
    let sidecar = mesh.sidecar("demo/server", "demo", "server", &args).await;
    // The sidecar restarted itself in place with one malloc arena (`cli::one_malloc_arena`):
    // the process we started, now with the setting in its environment.
    let environ = std::fs::read(format!("/proc/{}/environ", sidecar.proc.pid())).unwrap();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|kv| kv == b"MALLOC_ARENA_MAX=1"),
        "sidecar environment: {}",
        String::from_utf8_lossy(&environ).replace('\0', " ")
    );
    let client = Transport::mtls(mesh.cert("demo", "client"), SERVER_ID, mesh.bundle());
    let p8080 = format!("{addr}:8080");
    let p9000 = format!("{addr}:9000");
    assert_eq!(
        http1(&p8080, &client, "GET", "/api/a", &[])
            .await
            .unwrap()
            .0,
        200
    );

    // Traffic flows while the policy changes: every request gets a clean 200 or 403.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, client, p8080) = (stop.clone(), client.clone(), p8080.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = http1(&p8080, &client, "GET", "/api/loop", &[]).await;
                seen.push(r.map(|(s, _)| s).map_err(|e| e.to_string()));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        })
    };
    // A slow request in flight across the change, and an open TCP connection.
    let slow = {
        let (client, p8080) = (client.clone(), p8080.clone());
        tokio::spawn(async move { http1(&p8080, &client, "GET", "/slow", &[]).await })
    };
    let mut tcp = mesh::connect(&p9000, &client.clone().without_alpn())
        .await
        .unwrap();
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        tcp.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        tcp.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Deny /api/* now (and TCP): the new decision within one second.
    let deny_api = allow_api
        .replace("\"/api/*\", ", "")
        .replace("  - to: [{operation: {ports: [\"9000\"]}}]\n", "");
    assert_ne!(deny_api, allow_api);
    let edited = Instant::now();
    mesh.write_config("policy.yaml", &deny_api);
    loop {
        let (status, _) = http1(&p8080, &client, "GET", "/api/a", &[]).await.unwrap();
        if status == 403 {
            break;
        }
        assert!(
            edited.elapsed() < Duration::from_secs(1),
            "still {status} one second after the edit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = edited.elapsed();
    eprintln!("new policy enforced {took:?} after the edit");

    // The open TCP connection is closed by the new policy.
    {
        use tokio::io::AsyncReadExt as _;
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "TCP connection not closed: {r:?}"
        );
    }
    // The slow request that was authorized before the change completes.
    let (status, body) = slow.await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");

    // An invalid edit is reported and the previous policy stays enforced.
    let invalid = allow_api.replace("paths:", "pathz:");
    mesh.write_config("policy.yaml", &invalid);
    let reported = Instant::now();
    agent_mesh::wait_for(
        "the control plane to report the invalid edit",
        Duration::from_secs(5),
        async || {
            let err = mesh.cp.stderr_text();
            (err.contains("policy.yaml") && err.contains("pathz")).then_some(())
        },
    )
    .await;
    eprintln!("invalid edit reported after {:?}", reported.elapsed());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        http1(&p8080, &client, "GET", "/api/a", &[])
            .await
            .unwrap()
            .0,
        403,
        "previous policy still enforced"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = traffic.await.unwrap();
    let errors: Vec<_> = seen
        .iter()
        .filter(|r| !matches!(r, Ok(200) | Ok(403)))
        .collect();
    assert!(
        errors.is_empty(),
        "requests failed during reload: {errors:?}"
    );
    assert!(
        seen.iter().any(|r| r == &Ok(200)) && seen.iter().any(|r| r == &Ok(403)),
        "{seen:?}"
    );
    assert!(
        sidecar
            .stat("palisade_tcp_connections_closed_by_policy_total", &[])
            .await
            >= 1.0
    );
}

/// `demo/web` (sidecar) calls `demo/api` (agent + proxy over SDS) through both sidecars.
fn pair_files(web: &str, api: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web, namespace: demo}}
spec: {{address: {web}, serviceAccount: web, labels: {{app: web}}, ports: {{http: 8080}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: api, namespace: demo}}
spec: {{address: {api}, serviceAccount: api, labels: {{app: api}}, ports: {{http: 8080, tcp: 9000}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: demo}}
spec:
  hosts: [api.demo]
  ports: [{{number: 80, targetPort: 8080, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: api}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: demo}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/demo/sa/web]}}}}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_pair_http1_http2_and_tcp() {
    let (web_addr, api_addr) = ("127.0.13.1", "127.0.13.2");
    let files = pair_files(web_addr, api_addr);
    let mesh = Mesh::start(&[("mesh-objects.yaml", &files)]).await;
    let api_app = Echo::start().await;
    let api_tcp = TcpEcho::start().await;
    let api = mesh
        .agent_and_proxy(
            "demo/api",
            "demo",
            "api",
            &[
                "--app-port".into(),
                format!("8080={}", api_app.port()),
                "--app-port".into(),
                format!("9000={}", api_tcp.port()),
            ],
        )
        .await;
    let web = mesh
        .sidecar(
            "demo/web",
            "demo",
            "web",
            &[
                "--tcp-upstream".into(),
                format!("127.0.0.1:0={api_addr}:9000"),
            ],
        )
        .await;

    // HTTP/1.1 from the app, proxy form, by ServiceEntry host.
    let (status, body) = http1(
        &web.outbound,
        &Transport::Plain,
        "GET",
        "http://api.demo/hello",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}\n{}\n{}", web.stderr(), api.stderr());
    let echo = echo_json(&body);
    assert_eq!(echo["path"], "/hello");
    assert_eq!(echo["host"], "api.demo");
    let xfcc = echo["xfcc"][0].as_str().unwrap();
    assert!(
        xfcc.starts_with("By=spiffe://cluster.local/ns/demo/sa/api;Hash=")
            && xfcc.ends_with(";URI=spiffe://cluster.local/ns/demo/sa/web"),
        "{xfcc}"
    );
    // Host header routing to a workload address.
    let (status, _) = http1(
        &web.outbound,
        &Transport::Plain,
        "GET",
        "/by-host",
        &[("x-unused", "1")],
    )
    .await
    .unwrap();
    assert_eq!(
        status, 502,
        "the outbound listener's own address is not a destination"
    );
    let mut s = mesh::connect(&web.outbound, &Transport::Plain)
        .await
        .unwrap();
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let req =
            format!("GET /by-host HTTP/1.1\r\nHost: {api_addr}:8080\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("/by-host"), "{out}");
    }

    // HTTP/2 from the app (prior knowledge), many concurrent requests: between the sidecars
    // they share one multiplexed HTTP/2 connection.
    // So far one upstream connection per destination authority (`api.demo`, `<ip>:8080`) and
    // per data-path worker of `web` (two, see `Mesh::sidecar`) that sent to it.
    let before = api
        .stat(
            "palisade_connections_total",
            &["direction=\"inbound\"", "protocol=\"http2\""],
        )
        .await;
    assert!(
        (2.0..=4.0).contains(&before),
        "HTTP/2 connections between the sidecars: {before}"
    );
    // Four app connections (spread over `web`'s workers as they are accepted), 20 concurrent
    // requests each.
    let mut apps = Vec::new();
    for _ in 0..4 {
        apps.push(mesh::h2_client(&web.outbound).await);
    }
    let mut tasks = Vec::new();
    for (c, app) in apps.iter().enumerate() {
        for i in 0..20 {
            let mut send = app.clone();
            tasks.push(tokio::spawn(async move {
                mesh::h2_get(&mut send, &format!("http://api.demo/h2/{c}/{i}")).await
            }));
        }
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(
            echo_json(&body)["xfcc"][0]
                .as_str()
                .unwrap()
                .ends_with("/sa/web")
        );
    }
    let mut h2 = apps.remove(0);
    let (status, _) = mesh::h2_get(&mut h2, "http://api.demo/last").await;
    assert_eq!(status, 200);
    // `web` knew from earlier requests that `api.demo` speaks HTTP/2, so each of its two
    // workers sent its burst over one connection of its HTTP/2 pool: at most one new connection
    // per worker (the one learning connection before stays in the other pool until idle).
    let after = api
        .stat(
            "palisade_connections_total",
            &["direction=\"inbound\"", "protocol=\"http2\""],
        )
        .await;
    assert!(
        after <= before + 2.0,
        "sidecar-to-sidecar HTTP/2 connections are pooled and multiplexed: {before} before the burst, {after} after"
    );
    let allowed = api
        .stat(
            "palisade_rbac_decisions_total",
            &[
                "protocol=\"http\"",
                "decision=\"allowed\"",
                "ns[demo]-policy[api]-rule[0]",
            ],
        )
        .await;
    assert!(allowed >= 23.0, "{allowed}");

    // Opaque TCP through the pair (declared upstream on the client side).
    assert_eq!(
        tcp_echo(&web.tcp[0], &Transport::Plain, b"tcp through two sidecars")
            .await
            .unwrap(),
        b"tcp through two sidecars"
    );
    assert!(
        api.stat(
            "palisade_rbac_decisions_total",
            &["protocol=\"tcp\"", "decision=\"allowed\""]
        )
        .await
            >= 1.0
    );

    // A caller without the allowed identity is refused by the server sidecar.
    let other = Transport::mtls(
        mesh.cert("demo", "other"),
        "spiffe://cluster.local/ns/demo/sa/api",
        mesh.bundle(),
    );
    let (status, _) = http1(&format!("{api_addr}:8080"), &other, "GET", "/", &[])
        .await
        .unwrap();
    assert_eq!(status, 403);
}

/// Envoy 1.40 sidecars with certificates from Palisade agents over SDS, talking to Palisade
/// sidecars both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_interop_both_ways() {
    let envoy_server_port = agent_mesh::free_port();
    let palisade_server_port = agent_mesh::free_port();
    let files = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: pclient, namespace: demo}}
spec: {{address: 127.0.14.1, serviceAccount: pclient, ports: {{http: 8080}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: eserver, namespace: demo}}
spec: {{address: 127.0.0.1, serviceAccount: eserver, ports: {{http: {envoy_server_port}}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: pserver, namespace: demo}}
spec: {{address: 127.0.0.1, serviceAccount: pserver, labels: {{app: pserver}}, ports: {{http: {palisade_server_port}}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: pserver, namespace: demo}}
spec: {{selector: {{matchLabels: {{app: pserver}}}}, mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: pserver, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: pserver}}}}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/demo/sa/eclient]}}}}]
"#
    );
    let mesh = Mesh::start(&[("objects.yaml", &files)]).await;
    let backend = Echo::start().await;

    // Palisade client sidecar -> Envoy server sidecar.
    let eserver_agent = agent_mesh::AgentProc::start(
        mesh.path(),
        "eserver-agent",
        &mesh.ca,
        &mesh.root(),
        &mesh.token("demo", "eserver"),
        &[],
    )
    .await;
    let eserver = envoy::Envoy::start(
        mesh.path(),
        "envoy-server",
        &envoy::server_bootstrap(
            &eserver_agent.sds,
            envoy_server_port,
            "spiffe://cluster.local/ns/demo/sa/pclient",
            backend.port(),
        ),
    )
    .await;
    eserver.wait_live(Duration::from_secs(30)).await;
    let pclient = mesh.sidecar("demo/pclient", "demo", "pclient", &[]).await;
    let target = format!("http://127.0.0.1:{envoy_server_port}/from-palisade");
    let (status, body) = http1(&pclient.outbound, &Transport::Plain, "GET", &target, &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}\n{}", pclient.stderr());
    let xfcc = echo_json(&body)["xfcc"][0].as_str().unwrap().to_owned();
    assert!(
        xfcc.contains("URI=spiffe://cluster.local/ns/demo/sa/pclient"),
        "Envoy saw the Palisade client: {xfcc}"
    );

    // Envoy client sidecar -> Palisade server sidecar.
    let pserver = mesh
        .sidecar(
            "demo/pserver",
            "demo",
            "pserver",
            &[
                "--app-port".into(),
                format!("{palisade_server_port}={}", backend.port()),
            ],
        )
        .await;
    let eclient_agent = agent_mesh::AgentProc::start(
        mesh.path(),
        "eclient-agent",
        &mesh.ca,
        &mesh.root(),
        &mesh.token("demo", "eclient"),
        &[],
    )
    .await;
    let eclient_port = agent_mesh::free_port();
    let eclient = envoy::Envoy::start(
        mesh.path(),
        "envoy-client",
        &envoy::client_bootstrap(
            &eclient_agent.sds,
            eclient_port,
            "spiffe://cluster.local/ns/demo/sa/pserver",
            palisade_server_port,
        ),
    )
    .await;
    eclient.wait_live(Duration::from_secs(30)).await;
    let (status, body) = agent_mesh::http_get(&format!("127.0.0.1:{eclient_port}"), "/from-envoy")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}\n{}", pserver.stderr());
    let echo = echo_json(&body);
    assert_eq!(echo["path"], "/from-envoy");
    let xfcc = echo["xfcc"][0].as_str().unwrap();
    assert!(
        xfcc.starts_with("By=spiffe://cluster.local/ns/demo/sa/pserver;")
            && xfcc.ends_with("URI=spiffe://cluster.local/ns/demo/sa/eclient"),
        "{xfcc}"
    );
    // The Palisade server enforces policy on Envoy's traffic: the Palisade client is not allowed.
    let (status, _) = http1(
        &pclient.outbound,
        &Transport::Plain,
        "GET",
        &format!("http://127.0.0.1:{palisade_server_port}/x"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 403);
}
