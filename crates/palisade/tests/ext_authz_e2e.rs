//! CUSTOM authorization with real processes: `palisade ext-authz` (Rego) as gRPC and HTTP
//! authorizer of a `palisade sidecar`, plus a slow authorizer and a dead one. Allow, deny with
//! the authorizer's status/headers/body, timeout with failOpen both ways, authorizer down, two
//! providers on one workload, and the check request read back field by field from the authorizer.
//! CUSTOM on TCP ports (one Check per connection, with an in-test gRPC authorizer), and CUSTOM
//! before DENY over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/mesh.rs"]
mod mesh;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_mesh::{ChildGuard, PALISADE, wait_for};
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue as PbHeaderValue, HeaderValueOption, address, socket_address,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse, DeniedHttpResponse};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use http_body_util::BodyExt as _;
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
                        let (parts, body) = req.into_parts();
                        let headers: serde_json::Map<String, Value> = parts
                            .headers
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.as_str().to_owned(),
                                    Value::String(v.to_str().unwrap_or("").to_owned()),
                                )
                            })
                            .collect();
                        let received = body.collect().await.map(|b| b.to_bytes());
                        let received = match &received {
                            Ok(b) => String::from_utf8_lossy(b).into_owned(),
                            Err(e) => format!("<body error: {e}>"),
                        };
                        let body = json!({
                            "path": parts.uri.path(),
                            "headers": headers,
                            "body": received,
                        })
                        .to_string();
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
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nx-user: alice\r\nx-secret: s3\r\nConnection: close\r\n\r\n"
    );
    exchange(addr, req.as_bytes()).await
}

/// Sends one raw HTTP/1.1 request; returns status, lowercase head and body.
async fn exchange(addr: &str, req: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut raw = Vec::new();
    // A server that answers before reading the whole body may reset the connection after its
    // answer: keep what arrived.
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap();
    assert!(read.is_ok() || !raw.is_empty(), "{read:?}");
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

/// `palisade ext-authz --policy FILE` on free ports: the guard and the gRPC and HTTP ports.
async fn start_authorizer(policy: &Path, dir: &Path) -> (ChildGuard, u16, u16) {
    let mut cmd = Command::new(PALISADE);
    cmd.args(["ext-authz", "--policy"]).arg(policy).args([
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    let mut authz = ChildGuard::spawn("ext-authz", cmd, dir);
    let line = |text: &str, marker: &str| {
        text.lines().find_map(|l| {
            let (_, a) = l.split_once(marker)?;
            a.trim().rsplit_once(':')?.1.parse::<u16>().ok()
        })
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
    (authz, grpc, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_authorization_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.rego");
    std::fs::write(&policy, POLICY).unwrap();
    let (_authz, grpc, http) = start_authorizer(&policy, dir.path()).await;
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
        g = grpc,
        h = http,
    );
    let addr = "127.0.32.1";
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

const BODY_POLICY: &str = r#"
package envoy.authz

import rego.v1

http := input.attributes.request.http

# Tell the app what the authorizer saw: the body and whether it was cut.
allow := {"allowed": true, "headers": {
    "x-seen-body": http.body,
    "x-seen-partial": object.get(http.headers, "x-envoy-auth-partial-body", "false"),
}}
"#;

/// What the authorizer saw, as the app was told: the body and the partial flag.
type Seen = Option<(&'static str, &'static str)>;
const SMALL: &str = "hello body";
const BIG: &str = "0123456789abcdefghij";

fn post(addr: &str, path: &str, body: &str, chunked: bool) -> Vec<u8> {
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if chunked {
        // Several chunks, so the body arrives in more than one frame.
        req.push_str("Transfer-Encoding: chunked\r\n\r\n");
        for part in body.as_bytes().chunks(7000) {
            req.push_str(&format!(
                "{:x}\r\n{}\r\n",
                part.len(),
                String::from_utf8_lossy(part)
            ));
        }
        req.push_str("0\r\n\r\n");
    } else {
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    }
    req.into_bytes()
}

/// `includeRequestBodyInCheck`: the authorizers (gRPC and HTTP) get the body up to
/// maxRequestBytes, the app always the whole body; over the limit is 413 unless
/// allowPartialMessage, which sends the first maxRequestBytes marked partial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_in_check() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.rego");
    std::fs::write(&policy, BODY_POLICY).unwrap();
    let (_authz, grpc, http) = start_authorizer(&policy, dir.path()).await;
    let mesh_yaml = format!(
        r#"trustDomain: cluster.local
extensionProviders:
- name: grpc-whole
  envoyExtAuthzGrpc:
    service: 127.0.0.1
    port: {grpc}
    timeout: 5s
    includeRequestBodyInCheck: {{maxRequestBytes: 16}}
- name: grpc-partial
  envoyExtAuthzGrpc:
    service: 127.0.0.1
    port: {grpc}
    timeout: 5s
    includeRequestBodyInCheck: {{maxRequestBytes: 8, allowPartialMessage: true}}
- name: http-whole
  envoyExtAuthzHttp:
    service: 127.0.0.1
    port: {http}
    timeout: 5s
    headersToUpstreamOnAllow: [x-seen-*]
    includeRequestBodyInCheck: {{maxRequestBytes: 16}}
- name: http-partial
  envoyExtAuthzHttp:
    service: 127.0.0.1
    port: {http}
    timeout: 5s
    headersToUpstreamOnAllow: [x-seen-*]
    includeRequestBodyInCheck: {{maxRequestBytes: 8, allowPartialMessage: true}}
"#
    );
    let addr = "127.0.31.1";
    let mut files = format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: api, namespace: body}}\nspec: {{address: {addr}, serviceAccount: api, ports: {{http: 8080}}}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: api, namespace: body}}\nspec: {{mtls: {{mode: PERMISSIVE}}}}\n"
    );
    for (name, prefix) in [
        ("grpc-whole", "/gw/*"),
        ("grpc-partial", "/gp/*"),
        ("http-whole", "/hw/*"),
        ("http-partial", "/hp/*"),
    ] {
        files.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: body}}\nspec:\n  action: CUSTOM\n  provider: {{name: {name}}}\n  rules: [{{to: [{{operation: {{paths: [\"{prefix}\"]}}}}]}}]\n"
        ));
    }
    let mesh = Mesh::start(&[("mesh.yaml", &mesh_yaml), ("workloads.yaml", &files)]).await;
    let (app_port, _app) = header_echo().await;
    let sidecar = mesh
        .sidecar(
            "body/api",
            "body",
            "api",
            &["--app-port".to_owned(), format!("8080={app_port}")],
        )
        .await;
    let target = format!("{addr}:8080");

    let huge: String = (0..40_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    // (what, path, body, chunked, status, what the authorizer saw: body and partial flag)
    let cases: Vec<(&str, &str, &str, bool, u16, Seen)> = vec![
        (
            "gRPC fits",
            "/gw/x",
            SMALL,
            false,
            200,
            Some((SMALL, "false")),
        ),
        ("gRPC over", "/gw/x", BIG, false, 413, None),
        (
            "gRPC over, partial",
            "/gp/x",
            BIG,
            false,
            200,
            Some(("01234567", "true")),
        ),
        (
            "gRPC chunked, partial",
            "/gp/x",
            &huge,
            true,
            200,
            Some(("abcdefgh", "true")),
        ),
        (
            "gRPC chunked, fits",
            "/gw/x",
            SMALL,
            true,
            200,
            Some((SMALL, "false")),
        ),
        ("gRPC no body", "/gw/x", "", false, 200, Some(("", "false"))),
        (
            "HTTP fits",
            "/hw/x",
            SMALL,
            false,
            200,
            Some((SMALL, "false")),
        ),
        ("HTTP over", "/hw/x", BIG, false, 413, None),
        (
            "HTTP over, partial",
            "/hp/x",
            BIG,
            false,
            200,
            Some(("01234567", "true")),
        ),
        ("HTTP chunked, over", "/hw/x", &huge, true, 413, None),
        (
            "no CUSTOM policy: streamed",
            "/other",
            &huge,
            true,
            200,
            None,
        ),
    ];
    let mut failures = Vec::new();
    for (what, path, body, chunked, status, seen) in &cases {
        let (s, _, resp) = exchange(&target, &post(&target, path, body, *chunked)).await;
        if s != *status {
            failures.push(format!("{what}: want {status}, got {s} {resp:?}"));
            continue;
        }
        if *status != 200 {
            continue;
        }
        let echo: Value = serde_json::from_str(&resp).unwrap();
        // The app gets the whole body, whatever the authorizer saw.
        if echo["body"] != *body {
            failures.push(format!(
                "{what}: the app got {} bytes, want {}",
                echo["body"].as_str().map_or(0, str::len),
                body.len()
            ));
        }
        let got = (
            echo["headers"]["x-seen-body"].as_str(),
            echo["headers"]["x-seen-partial"].as_str(),
        );
        let want = seen.map_or((None, None), |(b, p)| (Some(b), Some(p)));
        if got != want {
            failures.push(format!("{what}: the authorizer saw {got:?}, want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n--- sidecar log:\n{}",
        failures.join("\n"),
        sidecar.stderr()
    );
}

/// `examples/ext-authz` as shipped: its policy.rego in a real `palisade ext-authz`, its YAML
/// files in the control plane (only the authorizer's port and the workload address moved), and
/// the README's requests through a real sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_directory() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/ext-authz");
    let dir = tempfile::tempdir().unwrap();
    let (authz, grpc, _) = start_authorizer(&example.join("policy.rego"), dir.path()).await;
    let addr = "127.0.31.2";
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&example).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            let mut text = std::fs::read_to_string(&path).unwrap();
            if name == "mesh.yaml" {
                assert!(text.contains("port: 9191"), "{text}");
                text = text.replace("port: 9191", &format!("port: {grpc}"));
            }
            files.push((name, text.replace("127.0.30.1", addr)));
        }
    }
    assert_eq!(files.len(), 3, "{files:?}");
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let mesh = Mesh::start(&refs).await;
    let (app_port, _app) = header_echo().await;
    let sidecar = mesh
        .sidecar(
            "shop/productpage",
            "shop",
            "productpage",
            &["--app-port".to_owned(), format!("9080={app_port}")],
        )
        .await;
    let target = format!("{addr}:9080");
    let request = |method: &str, path: &str, user: Option<&str>| {
        let user = user.map_or(String::new(), |u| format!("x-user: {u}\r\n"));
        format!("{method} {path} HTTP/1.1\r\nHost: {target}\r\n{user}Connection: close\r\n\r\n")
    };

    // (method, path, x-user, status, body contains)
    let cases = [
        (
            "GET",
            "/productpage",
            Some("alice"),
            200,
            "\"x-ext-authz-user\":\"alice\"",
        ),
        (
            "GET",
            "/productpage",
            Some("bob"),
            200,
            "\"x-ext-authz-user\":\"bob\"",
        ),
        (
            "POST",
            "/productpage",
            Some("alice"),
            200,
            "\"x-ext-authz-user\":\"alice\"",
        ),
        (
            "POST",
            "/productpage",
            Some("bob"),
            403,
            "ext-authz: bob may not POST /productpage",
        ),
        (
            "GET",
            "/productpage",
            Some("mallory"),
            403,
            "ext-authz: mallory may not GET",
        ),
        ("GET", "/productpage", None, 401, "who are you?"),
        ("GET", "/healthz", None, 200, "\"path\":\"/healthz\""),
    ];
    let mut failures = Vec::new();
    for (method, path, user, status, needle) in cases {
        let (s, head, body) = exchange(&target, request(method, path, user).as_bytes()).await;
        let denied_header = head.contains("x-ext-authz: denied");
        if s != status || !body.contains(needle) || denied_header != (status >= 400) {
            failures.push(format!(
                "{method} {path} as {user:?}: want {status} with {needle:?}, got {s} {head} {body:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n--- sidecar log:\n{}",
        failures.join("\n"),
        sidecar.stderr()
    );

    // The authorizer down: statusOnError 503, as the README says.
    drop(authz);
    let (s, _, body) = exchange(
        &target,
        request("GET", "/productpage", Some("alice")).as_bytes(),
    )
    .await;
    assert_eq!(s, 503, "{body}");
    let log = sidecar.stderr();
    assert!(
        log.contains("enforced denied by CUSTOM provider rego-ext-authz"),
        "{log}"
    );
}

// ---- CUSTOM on TCP ports (Envoy's network ext_authz) and CUSTOM before DENY over HTTP ----

/// A gRPC authorizer that keeps every check request. TCP checks (no HTTP request): allows the
/// service accounts `client` and `banned`. HTTP checks: a path ending in `/tea` is denied with
/// 418, a body and a header; anything else is allowed. `deny_all` denies everything.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<CheckRequest>>>,
    deny_all: bool,
}

impl Recorder {
    fn tcp_checks(&self) -> Vec<CheckRequest> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.attributes.as_ref().unwrap().request.is_none())
            .cloned()
            .collect()
    }

    fn http_paths(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|c| c.attributes.as_ref()?.request.as_ref()?.http.as_ref())
            .map(|h| h.path.clone())
            .collect()
    }

    async fn serve(self) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AuthorizationServer::new(self))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        port
    }
}

#[tonic::async_trait]
impl Authorization for Recorder {
    async fn check(
        &self,
        req: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let req = req.into_inner();
        let a = req.attributes.clone().unwrap_or_default();
        self.seen.lock().unwrap().push(req);
        let http = a.request.and_then(|r| r.http);
        let allow = !self.deny_all
            && match &http {
                Some(h) => !h.path.ends_with("/tea"),
                None => {
                    let p = a.source.map(|s| s.principal).unwrap_or_default();
                    p.ends_with("/sa/client") || p.ends_with("/sa/banned")
                }
            };
        let resp = if allow {
            CheckResponse {
                status: Some(RpcStatus::default()),
                ..CheckResponse::default()
            }
        } else {
            CheckResponse {
                status: Some(RpcStatus {
                    code: 7,
                    ..RpcStatus::default()
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus { code: 418 }),
                    headers: vec![HeaderValueOption {
                        header: Some(PbHeaderValue {
                            key: "x-deny-reason".into(),
                            value: "teapot".into(),
                            ..PbHeaderValue::default()
                        }),
                        ..HeaderValueOption::default()
                    }],
                    body: "no tea for you".into(),
                })),
                ..CheckResponse::default()
            }
        };
        Ok(tonic::Response::new(resp))
    }
}

/// The bytes one accepted connection sent, filled in as they arrive.
type Received = Arc<Mutex<Vec<u8>>>;

/// A TCP echo application that keeps what each accepted connection sent.
#[derive(Clone, Default)]
struct TcpApp {
    received: Arc<Mutex<Vec<Received>>>,
}

impl TcpApp {
    async fn serve(&self) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::clone(&self.received);
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let got = Arc::new(Mutex::new(Vec::new()));
                received.lock().unwrap().push(Arc::clone(&got));
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                got.lock().unwrap().extend_from_slice(&buf[..n]);
                                if tcp.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        port
    }

    fn connections(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    fn everything(&self) -> String {
        let all = self.received.lock().unwrap();
        all.iter()
            .map(|c| String::from_utf8_lossy(&c.lock().unwrap()).into_owned())
            .collect::<Vec<_>>()
            .join("|")
    }
}

/// Writes `msg` and reads its echo.
async fn round_trip(s: &mut Box<dyn mesh::Io>, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("echo timed out")
        .unwrap();
    buf
}

/// Connects, sends `msg`, and reads: `None` when the proxy closed the connection without a byte,
/// else what came back.
async fn closed_without_answer(addr: &str, t: &Transport, msg: &[u8]) -> Option<Vec<u8>> {
    let Ok(mut s) = mesh::connect(addr, t).await else {
        return None;
    };
    // The proxy may close before or after the write lands: both are a refusal.
    let _ = s.write_all(msg).await;
    let mut buf = vec![0u8; 64];
    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("neither closed nor answered within 10 s")
    {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(buf[..n].to_vec()),
    }
}

fn socket(p: Option<&envoy_types::pb::envoy::config::core::v3::Address>) -> (String, u32) {
    match p.and_then(|a| a.address.clone()) {
        Some(address::Address::SocketAddress(sa)) => {
            let port = match sa.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) => p,
                _ => 0,
            };
            (sa.address, port)
        }
        other => panic!("not a socket address: {other:?}"),
    }
}

/// Sends one request over `t` and returns status, lowercase head and body.
async fn mtls_get(addr: &str, t: &Transport, path: &str) -> (u16, String, String) {
    let mut s = mesh::connect(addr, t).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// CUSTOM on TCP ports, as Envoy's network ext_authz filter in Istio: one Check per connection
/// carrying the peer's SPIFFE identity and nothing of a request; allowed connections splice,
/// denied ones (or an authorizer error) are closed before the application sees a byte; CUSTOM is
/// asked before DENY; an HTTP provider is not applied to TCP; a new policy's provider is asked
/// once about an open connection. Over HTTP, with a DENY and a CUSTOM policy matching the same
/// request, the authorizer is asked first and its denial (status, headers, body) reaches the
/// client; when it allows, the DENY answers 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_on_tcp_ports_and_before_deny() {
    let recorder = Recorder::default();
    let grpc = recorder.clone().serve().await;
    let late = Recorder {
        deny_all: true,
        ..Recorder::default()
    };
    let late_port = late.clone().serve().await;
    let down = free_port();
    let app = TcpApp::default();
    let tcp_app = app.serve().await;
    let (http_app, _http_app) = header_echo().await;

    let mesh_yaml = format!(
        r#"trustDomain: cluster.local
extensionProviders:
- name: recorder
  envoyExtAuthzGrpc: {{service: 127.0.0.1, port: {grpc}, timeout: 5s}}
- name: late
  envoyExtAuthzGrpc: {{service: 127.0.0.1, port: {late_port}, timeout: 5s}}
- name: down
  envoyExtAuthzGrpc: {{service: 127.0.0.1, port: {down}, timeout: 1s}}
- name: via-http
  envoyExtAuthzHttp: {{service: 127.0.0.1, port: {down}, timeout: 1s}}
"#
    );
    let addr = "127.0.65.1";
    let policy = |name: &str, action: &str, provider: Option<&str>, rules: &str| {
        let provider = provider.map_or(String::new(), |p| format!("  provider: {{name: {p}}}\n"));
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: tcp}}\nspec:\n  action: {action}\n{provider}  rules: {rules}\n"
        )
    };
    let mut files = format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: db, namespace: tcp}}\nspec: {{address: {addr}, serviceAccount: db, ports: {{http: 8080, tcp: 9000, tcp-http-provider: 9001, tcp-down: 9002}}}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: db, namespace: tcp}}\nspec: {{mtls: {{mode: STRICT}}}}\n"
    );
    // The path is HTTP-only: on TCP it is dropped (CUSTOM matches more widely, as Istio
    // translates it), so the rule still applies to every connection on port 9000.
    files.push_str(&policy(
        "tcp-custom",
        "CUSTOM",
        Some("recorder"),
        r#"[{to: [{operation: {ports: ["9000"], paths: ["/only-http"]}}]}]"#,
    ));
    files.push_str(&policy(
        "http-custom",
        "CUSTOM",
        Some("recorder"),
        r#"[{to: [{operation: {ports: ["8080"], paths: ["/both/*"]}}]}]"#,
    ));
    files.push_str(&policy(
        "http-deny",
        "DENY",
        None,
        r#"[{to: [{operation: {ports: ["8080"], paths: ["/both/*"]}}]}]"#,
    ));
    files.push_str(&policy(
        "banned",
        "DENY",
        None,
        r#"[{from: [{source: {principals: ["cluster.local/ns/tcp/sa/banned"]}}]}]"#,
    ));
    files.push_str(&policy(
        "http-provider",
        "CUSTOM",
        Some("via-http"),
        r#"[{to: [{operation: {ports: ["9001"]}}]}]"#,
    ));
    files.push_str(&policy(
        "down",
        "CUSTOM",
        Some("down"),
        r#"[{to: [{operation: {ports: ["9002"]}}]}]"#,
    ));
    let mesh = Mesh::start(&[("mesh.yaml", &mesh_yaml), ("workloads.yaml", &files)]).await;
    let mut args = vec!["--app-port".to_owned(), format!("8080={http_app}")];
    for port in [9000, 9001, 9002] {
        args.extend(["--app-port".to_owned(), format!("{port}={tcp_app}")]);
    }
    let sidecar = mesh.sidecar("tcp/db", "tcp", "db", &args).await;
    let as_sa = |sa: &str| {
        Transport::mtls(
            mesh.cert("tcp", sa),
            "spiffe://cluster.local/ns/tcp/sa/db",
            mesh.bundle(),
        )
    };
    let (client, mallory, banned) = (as_sa("client"), as_sa("mallory"), as_sa("banned"));
    let p9000 = format!("{addr}:9000");
    let log = || sidecar.stderr();

    // Allowed: bytes both ways, several exchanges, and exactly one Check for the connection,
    // with the client's identity and no request attributes.
    let mut conn = mesh::connect(&p9000, &client).await.unwrap();
    assert_eq!(round_trip(&mut conn, b"first").await, b"first");
    assert_eq!(round_trip(&mut conn, b"second").await, b"second");
    let checks = recorder.tcp_checks();
    assert_eq!(checks.len(), 1, "{checks:#?}\n{}", log());
    let a = checks[0].attributes.as_ref().unwrap();
    let (src, dst) = (a.source.as_ref().unwrap(), a.destination.as_ref().unwrap());
    assert_eq!(src.principal, "spiffe://cluster.local/ns/tcp/sa/client");
    assert_eq!(dst.principal, "spiffe://cluster.local/ns/tcp/sa/db");
    assert_eq!(socket(dst.address.as_ref()), (addr.to_owned(), 9000));
    assert_eq!(socket(src.address.as_ref()).0, "127.0.0.1");
    assert!(a.request.is_none() && a.tls_session.is_none(), "{a:#?}");
    drop(conn);
    // A second connection: a second Check.
    let mut conn = mesh::connect(&p9000, &client).await.unwrap();
    assert_eq!(round_trip(&mut conn, b"third").await, b"third");
    assert_eq!(recorder.tcp_checks().len(), 2);
    drop(conn);
    assert_eq!(app.connections(), 2);

    // Denied by the authorizer: closed, and the application never connected.
    let got = closed_without_answer(&p9000, &mallory, b"from-mallory").await;
    assert_eq!(got, None, "mallory got an answer\n{}", log());
    let checks = recorder.tcp_checks();
    assert_eq!(checks.len(), 3);
    let a = checks[2].attributes.as_ref().unwrap();
    assert_eq!(
        a.source.as_ref().unwrap().principal,
        "spiffe://cluster.local/ns/tcp/sa/mallory"
    );

    // Allowed by the authorizer, denied by DENY: CUSTOM was asked first, then DENY closed it.
    let got = closed_without_answer(&p9000, &banned, b"from-banned").await;
    assert_eq!(got, None, "banned got an answer\n{}", log());
    let checks = recorder.tcp_checks();
    assert_eq!(checks.len(), 4, "CUSTOM is asked before DENY");
    assert_eq!(
        checks[3]
            .attributes
            .as_ref()
            .unwrap()
            .source
            .as_ref()
            .unwrap()
            .principal,
        "spiffe://cluster.local/ns/tcp/sa/banned"
    );

    // Authorizer down, failOpen false: closed.
    let got = closed_without_answer(&format!("{addr}:9002"), &client, b"to-down").await;
    assert_eq!(got, None, "the down provider let it through\n{}", log());

    // An HTTP provider is not applied to TCP connections (Istio ignores it on TCP filter
    // chains): the connection is decided by DENY/ALLOW alone, here allowed, although that
    // provider is down.
    let mut conn = mesh::connect(&format!("{addr}:9001"), &client)
        .await
        .unwrap();
    assert_eq!(round_trip(&mut conn, b"via-http").await, b"via-http");
    drop(conn);
    assert_eq!(recorder.tcp_checks().len(), 4);

    // The application saw the allowed connections only.
    assert_eq!(app.connections(), 3, "{}", app.everything());
    let everything = app.everything();
    for refused in ["from-mallory", "from-banned", "to-down"] {
        assert!(!everything.contains(refused), "{refused}: {everything}");
    }
    let log_text = log();
    for needle in [
        "enforced denied by CUSTOM provider recorder: TCP connection closed",
        "enforced denied by CUSTOM provider down: TCP connection closed",
        "is not applied to TCP connections",
    ] {
        assert!(log_text.contains(needle), "{needle:?} not in\n{log_text}");
    }

    // HTTP, DENY and CUSTOM both matching: the authorizer first. Its denial reaches the client
    // as it answered (status, headers, body); when it allows, the DENY answers 403.
    let http = format!("{addr}:8080");
    let (s, head, body) = mtls_get(&http, &client, "/both/tea").await;
    assert_eq!(
        (s, body.as_str()),
        (418, "no tea for you"),
        "{head}\n{}",
        log()
    );
    assert!(head.contains("x-deny-reason: teapot"), "{head}");
    let (s, _, body) = mtls_get(&http, &client, "/both/ok").await;
    assert_eq!((s, body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(recorder.http_paths(), ["/both/tea", "/both/ok"]);
    let (s, _, body) = mtls_get(&http, &client, "/elsewhere").await;
    assert_eq!(s, 200, "{body}");

    // A new policy adds a provider for port 9000: the open connection is asked about once by
    // that provider (which denies, so it is closed), and not again by the one that allowed it.
    let mut conn = mesh::connect(&p9000, &client).await.unwrap();
    assert_eq!(round_trip(&mut conn, b"before").await, b"before");
    assert_eq!(recorder.tcp_checks().len(), 5);
    // Named to sort after `tcp-custom`: providers are asked in policy-id order, so a gate that
    // asked `recorder` again would do it before `late` closes the connection.
    files.push_str(&policy(
        "z-late",
        "CUSTOM",
        Some("late"),
        r#"[{to: [{operation: {ports: ["9000"]}}]}]"#,
    ));
    mesh.write_config("workloads.yaml", &files);
    wait_for(
        "the new provider to be asked about the open connection",
        Duration::from_secs(10),
        async || (!late.tcp_checks().is_empty()).then_some(()),
    )
    .await;
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut b)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "open connection not closed: {r:?}\n{}",
        log()
    );
    assert_eq!(late.tcp_checks().len(), 1);
    assert_eq!(
        recorder.tcp_checks().len(),
        5,
        "asked again about an open connection"
    );
}
