//! CUSTOM authorization with real processes: `palisade ext-authz` (Rego) as gRPC and HTTP
//! authorizer of a `palisade sidecar`, plus a slow authorizer and a dead one. Allow, deny with
//! the authorizer's status/headers/body, timeout with failOpen both ways, authorizer down, two
//! providers on one workload, and the check request read back field by field from the authorizer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/mesh.rs"]
mod mesh;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agent_mesh::{ChildGuard, PALISADE, wait_for};
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
