//! CUSTOM authorization with real processes: `palisade ext-authz` (Rego) as gRPC and HTTP
//! authorizer of a `palisade sidecar`, plus a slow authorizer and a dead one. Allow, deny with
//! the authorizer's status/headers/body, timeout with failOpen both ways, authorizer down, two
//! providers on one workload, and the check request read back field by field from the authorizer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/mesh.rs"]
mod mesh;

use std::process::Command;
use std::time::Duration;

use agent_mesh::{ChildGuard, PALISADE, wait_for};
use mesh::{Mesh, Transport};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const POLICY: &str = r#"
package envoy.authz

import rego.v1

default allow := false

http := input.attributes.request.http
last := input.parsed_path[count(input.parsed_path) - 1]
via_http := startswith(http.path, "/authz/")

allow if last == "ok"

allow := {"allowed": true, "headers": {"x-authz-http": "yes"}} if {
    last == "both"
    via_http
}

allow := {"allowed": true, "headers": {"x-authz-grpc": "yes"}} if {
    last == "both"
    not via_http
}

allow := {"allowed": false, "http_status": 418, "body": "no tea for you", "headers": {"x-deny-reason": "teapot"}} if {
    last == "tea"
}

allow := {"allowed": false, "http_status": 418, "body": json.marshal(input)} if last == "echo"
"#;

async fn header_echo() -> (u16, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let headers: serde_json::Map<String, Value> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.as_str().to_owned(),
                                    Value::String(v.to_str().unwrap_or("").to_owned()),
                                )
                            })
                            .collect();
                        let body =
                            json!({"path": req.uri().path(), "headers": headers}).to_string();
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (port, task)
}

/// An authorizer that answers 200 after 2 s.
async fn slow_authorizer() -> (u16, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (port, task)
}

async fn get(addr: &str, target: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nx-user: alice\r\nx-secret: s3\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_authorization_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.rego");
    std::fs::write(&policy, POLICY).unwrap();
    let mut cmd = Command::new(PALISADE);
    cmd.args(["ext-authz", "--policy"]).arg(&policy).args([
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    let mut authz = ChildGuard::spawn("ext-authz", cmd, dir.path());
    let line = |text: &str, marker: &str| {
        text.lines()
            .find_map(|l| l.split_once(marker).map(|(_, a)| a.trim().to_owned()))
    };
    let (grpc, http) = wait_for(
        "the authorizer's ports",
        Duration::from_secs(30),
        async || {
            assert!(
                authz.running(),
                "ext-authz exited:\n{}",
                authz.stderr_text()
            );
            let out = authz.stdout_text();
            Some((
                line(&out, "gRPC listening on")?,
                line(&out, "HTTP listening on")?,
            ))
        },
    )
    .await;
    let port_of = |a: &str| a.rsplit_once(':').unwrap().1.to_owned();
    let (slow, _slow_task) = slow_authorizer().await;
    let down = free_port();

    let mesh_yaml = format!(
        r#"trustDomain: cluster.local
extensionProviders:
- name: rego-grpc
  envoyExtAuthzGrpc: {{service: 127.0.0.1, port: {g}, timeout: 2s}}
- name: rego-http
  envoyExtAuthzHttp:
    service: 127.0.0.1
    port: {h}
    pathPrefix: /authz
    timeout: 2s
    includeRequestHeadersInCheck: [x-user]
    headersToUpstreamOnAllow: [x-authz-*]
    headersToDownstreamOnDeny: [x-deny-reason]
- name: slow-closed
  envoyExtAuthzHttp: {{service: 127.0.0.1, port: {slow}, timeout: 300ms}}
- name: slow-open
  envoyExtAuthzHttp: {{service: 127.0.0.1, port: {slow}, timeout: 300ms, failOpen: true}}
- name: down
  envoyExtAuthzGrpc: {{service: 127.0.0.1, port: {down}, timeout: 1s, statusOnError: "503"}}
"#,
        g = port_of(&grpc),
        h = port_of(&http),
    );
    let addr = "127.0.22.1";
    let custom = |name: &str, provider: &str, paths: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: authz}}\nspec:\n  action: CUSTOM\n  provider: {{name: {provider}}}\n  rules: [{{to: [{{operation: {{paths: {paths}}}}}]}}]\n"
        )
    };
    let files = format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: api, namespace: authz}}\nspec: {{address: {addr}, serviceAccount: api, ports: {{http: 8080}}}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: api, namespace: authz}}\nspec: {{mtls: {{mode: PERMISSIVE}}}}\n{}{}{}{}{}{}",
        custom("grpc", "rego-grpc", r#"["/g/*"]"#),
        custom("http", "rego-http", r#"["/h/*", "/g/both"]"#),
        custom("slow-closed", "slow-closed", r#"["/slow-closed"]"#),
        custom("slow-open", "slow-open", r#"["/slow-open"]"#),
        custom("down", "down", r#"["/down"]"#),
        "",
    );
    let mesh = Mesh::start(&[("mesh.yaml", &mesh_yaml), ("workloads.yaml", &files)]).await;
    let (app_port, _app) = header_echo().await;
    let sidecar = mesh
        .sidecar(
            "authz/api",
            "authz",
            "api",
            &["--app-port".to_owned(), format!("8080={app_port}")],
        )
        .await;
    let target = format!("{addr}:8080");

    // (what, path, status, body contains)
    let cases: Vec<(&str, &str, u16, &str)> = vec![
        ("gRPC allow", "/g/ok", 200, "\"path\":\"/g/ok\""),
        ("HTTP allow", "/h/ok", 200, "\"path\":\"/h/ok\""),
        (
            "gRPC deny with custom status and body",
            "/g/tea",
            418,
            "no tea for you",
        ),
        (
            "HTTP deny with custom status and body",
            "/h/tea",
            418,
            "no tea for you",
        ),
        ("gRPC default deny", "/g/nope", 403, ""),
        ("timeout, failOpen false", "/slow-closed", 403, ""),
        (
            "timeout, failOpen true",
            "/slow-open",
            200,
            "\"path\":\"/slow-open\"",
        ),
        ("authorizer down: statusOnError", "/down", 503, ""),
        (
            "no CUSTOM policy applies",
            "/other",
            200,
            "\"path\":\"/other\"",
        ),
    ];
    let mut failures = Vec::new();
    for (what, path, status, needle) in &cases {
        let (s, _, body) = get(&target, path).await;
        if s != *status
            || !body.contains(needle)
            || (needle.is_empty() && !body.is_empty() && *status != 200)
        {
            failures.push(format!(
                "{what}: {path}: want {status} with {needle:?}, got {s} {body:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n--- sidecar log:\n{}",
        failures.join("\n"),
        sidecar.stderr()
    );

    // Denial headers: the gRPC denial's headers all reach the client; the HTTP provider only
    // passes headersToDownstreamOnDeny.
    let (_, head, _) = get(&target, "/g/tea").await;
    assert!(head.contains("x-deny-reason: teapot"), "{head}");
    let (_, head, _) = get(&target, "/h/tea").await;
    assert!(head.contains("x-deny-reason: teapot"), "{head}");

    // Two providers on one workload: both asked, both allow, both header edits reach the app.
    let (s, _, body) = get(&target, "/g/both").await;
    assert_eq!(s, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["headers"]["x-authz-grpc"], "yes", "{body}");
    assert_eq!(echo["headers"]["x-authz-http"], "yes", "{body}");

    // The check request, field by field, as the authorizer saw it (echoed in its denial).
    let client = Transport::mtls(
        mesh.cert("authz", "client"),
        "spiffe://cluster.local/ns/authz/sa/api",
        mesh.bundle(),
    );
    let (s, body) = mesh::http1(
        &target,
        &client,
        "GET",
        "/g/echo?q=1",
        &[("x-user", "alice")],
    )
    .await
    .unwrap();
    assert_eq!(s, 418, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    let a = &seen["attributes"];
    assert_eq!(
        a["source"]["principal"],
        "spiffe://cluster.local/ns/authz/sa/client"
    );
    assert_eq!(
        a["destination"]["principal"],
        "spiffe://cluster.local/ns/authz/sa/api"
    );
    assert_eq!(
        a["destination"]["address"]["socketAddress"]["address"],
        addr
    );
    assert_eq!(
        a["destination"]["address"]["socketAddress"]["portValue"],
        8080
    );
    assert_eq!(
        a["source"]["address"]["socketAddress"]["address"],
        "127.0.0.1"
    );
    let h = &a["request"]["http"];
    assert_eq!(h["method"], "GET");
    assert_eq!(h["path"], "/g/echo?q=1");
    assert_eq!(h["host"], target);
    assert_eq!(h["protocol"], "HTTP/1.1");
    assert_eq!(h["headers"]["x-user"], "alice");
    assert_eq!(h["headers"][":path"], "/g/echo?q=1");
    assert_eq!(seen["parsed_path"], json!(["g", "echo"]));
    assert_eq!(seen["parsed_query"], json!({"q": ["1"]}));

    // The HTTP provider sends only Host and the included headers.
    let (s, _, body) = get(&target, "/h/echo").await;
    assert_eq!(s, 418);
    let seen: Value = serde_json::from_str(&body).unwrap();
    let h = &seen["attributes"]["request"]["http"];
    assert_eq!(h["path"], "/authz/h/echo");
    assert_eq!(h["headers"]["x-user"], "alice");
    assert!(h["headers"].get("x-secret").is_none(), "{body}");
    assert_eq!(h["headers"]["host"], target);

    let log = sidecar.stderr();
    assert!(
        log.contains("enforced denied by CUSTOM provider rego-grpc"),
        "{log}"
    );
}
