//! A real Envoy 1.40 as a workload's sidecar, configured by `palisade controlplane` over ADS:
//! bootstrapped by `palisade envoy bootstrap`, certificates over SDS from a real `palisade
//! agent`, listeners and clusters pushed by the control plane from the mesh directory.
//!
//! - The same requests through the Envoy and through a Palisade sidecar of the same service
//!   get the same answers, and the answers the policies say.
//! - A policy edit reaches the Envoy (ACKed) within one second and changes its decisions; an
//!   edit that only changes another workload's config pushes nothing to the Envoy.
//! - A config Envoy rejects (a listener on a port that is taken) is a NACK with Envoy's own
//!   detail in `/debug/syncz`, counted and logged; the Envoy keeps serving its last config.
//! - An input the translator refuses is never pushed: the control plane names the resource
//!   and field, and the Envoy keeps serving.
//!
//! Addresses: 127.0.69.1 (Envoy), 127.0.69.2 (Palisade sidecar).
//! Needs Envoy: `scripts/install-envoy.sh` (or `PALISADE_ENVOY`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/mesh.rs"]
mod mesh;

use std::process::Command;
use std::time::{Duration, Instant};

use agent_mesh::{AgentProc, PALISADE, http_get, wait_for};
use envoy::Envoy;
use mesh::{Echo, Mesh, TcpEcho, Transport, http1, tcp_echo};
use serde_json::Value;

const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";
const ENVOY_ADDR: &str = "127.0.69.1";
const PALISADE_ADDR: &str = "127.0.69.2";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

fn entry(name: &str, addr: &str, proxy: &str, extra_ports: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}, namespace: demo}}
spec:
  address: {addr}
  serviceAccount: server
  labels: {{app: server, proxy: {proxy}}}
  ports: {{http: 8080, tcp: 9000{extra_ports}}}
"#
    )
}

const STRICT: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec:
  mtls: {mode: STRICT}
"#;

fn allow_policy(paths: &str) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: server-allow, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/demo/sa/client]}}}}]
    to: [{{operation: {{methods: [GET], paths: [{paths}], ports: ["8080"]}}}}]
  - from: [{{source: {{namespaces: [ops]}}}}]
    to: [{{operation: {{ports: ["8080"], notPaths: ["/private*"]}}}}]
  - from: [{{source: {{principals: [cluster.local/ns/demo/sa/client]}}}}]
    to: [{{operation: {{ports: ["9000"]}}}}]
"#
    )
}

/// A DENY that selects only the Palisade-served workload.
const PALISADE_ONLY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: palisade-only, namespace: demo}
spec:
  selector: {matchLabels: {proxy: palisade}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/palisade-only"]}}]
"#;

async fn syncz(mesh: &Mesh) -> Vec<Value> {
    let (status, body) = http_get(&mesh.admin, "/debug/syncz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The `/debug/syncz` entry of the proxy serving `workload`.
async fn proxy(mesh: &Mesh, workload: &str) -> Option<Value> {
    syncz(mesh)
        .await
        .into_iter()
        .find(|p| p["workload"] == workload)
}

fn lds(p: &Value) -> &Value {
    &p["types"][LDS]
}

async fn metric(mesh: &Mesh, name: &str) -> f64 {
    let (_, body) = http_get(&mesh.admin, "/metrics").await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// One request: an HTTP status, or for TCP whether the echo came back (`200`/`0`).
async fn ask(addr: &str, client: &Transport, port: u16, path: Option<&str>) -> u16 {
    let target = format!("{addr}:{port}");
    match path {
        Some(path) => http1(&target, client, "GET", path, &[])
            .await
            .map_or(0, |(s, _)| s),
        None => match tcp_echo(&target, client, b"ping").await {
            Ok(e) if e == b"ping" => 200,
            _ => 0,
        },
    }
}

/// A real Envoy as the sidecar of `workload` (service account `sa`, namespace demo): its
/// `palisade agent`, then the bootstrap from `palisade envoy bootstrap` (validated by Envoy
/// itself) with the application's ports and `extra` flags.
async fn start_envoy(
    mesh: &Mesh,
    workload: &str,
    sa: &str,
    app: (u16, u16),
    extra: &[String],
) -> (AgentProc, Envoy) {
    let name = workload.replace('/', "-");
    let token = mesh.token("demo", sa);
    let agent = AgentProc::start(
        mesh.path(),
        &format!("{name}-agent"),
        &mesh.ca,
        &mesh.root(),
        &token,
        &[],
    )
    .await;
    let out = Command::new(PALISADE)
        .args(["envoy", "bootstrap", "--workload", workload])
        .args(["--xds-address", &mesh.xds, "--sds-socket"])
        .arg(&agent.sds)
        .args(["--app-port", &format!("8080={}", app.0)])
        .args(["--app-port", &format!("9000={}", app.1)])
        .args(["--admin", "127.0.0.1:0"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "envoy bootstrap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = mesh.path().join(format!("{name}.yaml"));
    std::fs::write(&path, &out.stdout).unwrap();
    envoy::validate(&path).unwrap();
    let envoy = Envoy::start_file(mesh.path(), &name, &path).await;
    (agent, envoy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sidecar_follows_the_control_plane() {
    let files = [
        (
            "workloads.yaml",
            format!(
                "{}---\n{}",
                entry("server-envoy", ENVOY_ADDR, "envoy", ""),
                entry("server-palisade", PALISADE_ADDR, "palisade", "")
            ),
        ),
        ("peer.yaml", STRICT.to_owned()),
        ("allow.yaml", allow_policy("\"/api/*\"")),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let mesh = Mesh::start(&files).await;
    let echo = Echo::start().await;
    let tcp = TcpEcho::start().await;

    let (agent, envoy) = start_envoy(
        &mesh,
        "demo/server-envoy",
        "server",
        (echo.port(), tcp.port()),
        &[],
    )
    .await;

    let app_args: Vec<String> = [
        format!("8080={}", echo.port()),
        format!("9000={}", tcp.port()),
    ]
    .into_iter()
    .flat_map(|a| ["--app-port".to_owned(), a])
    .collect();
    let palisade = mesh
        .sidecar("demo/server-palisade", "demo", "server", &app_args)
        .await;

    let bundle = mesh.bundle();
    let client = Transport::mtls(mesh.cert("demo", "client"), SERVER_ID, bundle.clone());
    let ops = Transport::mtls(mesh.cert("ops", "tool"), SERVER_ID, bundle.clone());
    let other = Transport::mtls(mesh.cert("demo", "other"), SERVER_ID, bundle);

    // Both serve: the Envoy once its listeners came over ADS and its secrets over SDS.
    for addr in [ENVOY_ADDR, PALISADE_ADDR] {
        wait_for(
            "the sidecar to allow a request",
            Duration::from_secs(30),
            async || (ask(addr, &client, 8080, Some("/api/1")).await == 200).then_some(()),
        )
        .await;
    }
    envoy.wait_live(Duration::from_secs(10)).await;

    let cases: Vec<(&str, &Transport, u16, Option<&str>, u16)> = vec![
        ("client GET /api", &client, 8080, Some("/api/1"), 200),
        ("client GET elsewhere", &client, 8080, Some("/other"), 403),
        ("ops anywhere but /private", &ops, 8080, Some("/other"), 200),
        ("ops /private", &ops, 8080, Some("/private/x"), 403),
        ("other identity", &other, 8080, Some("/api/1"), 403),
        (
            "plaintext under STRICT",
            &Transport::Plain,
            8080,
            Some("/api/1"),
            0,
        ),
        ("client TCP", &client, 9000, None, 200),
        ("other identity TCP", &other, 9000, None, 0),
    ];
    let check = async |cases: &[(&str, &Transport, u16, Option<&str>, u16)]| {
        for (name, t, port, path, want) in cases {
            let via_envoy = ask(ENVOY_ADDR, t, *port, *path).await;
            let via_palisade = ask(PALISADE_ADDR, t, *port, *path).await;
            assert_eq!(
                (via_envoy, via_palisade),
                (*want, *want),
                "{name}: (Envoy, Palisade)"
            );
        }
    };
    check(&cases).await;

    let before = proxy(&mesh, "demo/server-envoy").await.unwrap();
    assert_eq!(before["kind"], "envoy");
    assert!(
        before["identity"]
            .as_str()
            .unwrap()
            .ends_with("/ns/demo/sa/server")
    );
    let acked = lds(&before)["acked_version"].clone();
    assert!(acked.is_string(), "{before}");

    // A policy edit: ACKed by the Envoy within one second, and enforced.
    let edited = Instant::now();
    mesh.write_config("allow.yaml", &allow_policy("\"/api/*\", \"/other\""));
    let took = wait_for(
        "the Envoy to ACK the edited policy",
        Duration::from_secs(10),
        async || {
            let p = proxy(&mesh, "demo/server-envoy").await?;
            (lds(&p)["acked_version"] != acked).then(|| edited.elapsed())
        },
    )
    .await;
    println!("policy edit to Envoy ACK: {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "the edit took {took:?} to reach the Envoy"
    );
    wait_for(
        "the edited policy to allow /other",
        Duration::from_secs(5),
        async || (ask(ENVOY_ADDR, &client, 8080, Some("/other")).await == 200).then_some(()),
    )
    .await;
    let mut cases = cases;
    cases[1].4 = 200;
    wait_for(
        "the Palisade sidecar to take the edit",
        Duration::from_secs(5),
        async || (ask(PALISADE_ADDR, &client, 8080, Some("/other")).await == 200).then_some(()),
    )
    .await;
    check(&cases).await;

    // An edit that changes only the Palisade-served workload: the Palisade sidecar gets a
    // push (seen in its stream's count), the Envoy none.
    let envoy_pushes = lds(&proxy(&mesh, "demo/server-envoy").await.unwrap())["pushes"].clone();
    let palisade_pushes = proxy(&mesh, "demo/server-palisade").await.unwrap()["types"]
        .as_object()
        .unwrap()
        .values()
        .map(|t| t["pushes"].as_u64().unwrap())
        .sum::<u64>();
    mesh.write_config("palisade-only.yaml", PALISADE_ONLY);
    wait_for(
        "the Palisade sidecar's push",
        Duration::from_secs(10),
        async || {
            let p = proxy(&mesh, "demo/server-palisade").await?;
            let n: u64 = p["types"]
                .as_object()?
                .values()
                .filter_map(|t| t["pushes"].as_u64())
                .sum();
            (n > palisade_pushes).then_some(())
        },
    )
    .await;
    assert_eq!(
        (ask(PALISADE_ADDR, &ops, 8080, Some("/palisade-only")).await,),
        (403,)
    );
    assert_eq!(
        ask(ENVOY_ADDR, &ops, 8080, Some("/palisade-only")).await,
        200
    );
    let p = proxy(&mesh, "demo/server-envoy").await.unwrap();
    assert_eq!(lds(&p)["pushes"], envoy_pushes, "no push to the Envoy: {p}");

    // A listener Envoy cannot bind: NACK, with Envoy's detail, counted; the old config serves.
    let taken = tokio::net::TcpListener::bind((ENVOY_ADDR, 8085))
        .await
        .unwrap();
    let nacks_before = metric(&mesh, "palisade_control_config_nacks_total").await;
    let workloads = |envoy_extra: &str| {
        format!(
            "{}---\n{}",
            entry("server-envoy", ENVOY_ADDR, "envoy", envoy_extra),
            entry("server-palisade", PALISADE_ADDR, "palisade", "")
        )
    };
    mesh.write_config("workloads.yaml", &workloads(", http-extra: 8085"));
    let nack = wait_for("the Envoy's NACK", Duration::from_secs(10), async || {
        let p = proxy(&mesh, "demo/server-envoy").await?;
        lds(&p)["last_nack"].as_str().map(str::to_owned)
    })
    .await;
    assert!(nack.contains("8085"), "Envoy's detail: {nack}");
    assert!(metric(&mesh, "palisade_control_config_nacks_total").await > nacks_before);
    assert!(
        mesh.cp.stderr_text().contains("rejected its config (NACK)"),
        "{}",
        mesh.cp.stderr_text()
    );
    assert_eq!(ask(ENVOY_ADDR, &client, 8080, Some("/api/1")).await, 200);
    let status = Command::new(PALISADE)
        .args(["status", "--control-plane-admin", &mesh.admin])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(1), "not in sync: {text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("demo/server-envoy"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.contains("envoy") && row.contains("NACK Listener"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("demo/server-palisade") && l.contains("in sync")),
        "{text}"
    );
    // The port freed and the edit reverted: ACKed again, the NACK cleared.
    drop(taken);
    mesh.write_config("workloads.yaml", &workloads(""));
    wait_for("the NACK to clear", Duration::from_secs(10), async || {
        let p = proxy(&mesh, "demo/server-envoy").await?;
        lds(&p)["last_nack"].is_null().then_some(())
    })
    .await;

    // An input the translator refuses (a gRPC-Web port): never pushed, named, counted.
    let pushes = lds(&proxy(&mesh, "demo/server-envoy").await.unwrap())["pushes"].clone();
    mesh.write_config("workloads.yaml", &workloads(", grpc-web: 8086"));
    let error = wait_for(
        "the translation error",
        Duration::from_secs(10),
        async || {
            let p = proxy(&mesh, "demo/server-envoy").await?;
            p["translate_error"].as_str().map(str::to_owned)
        },
    )
    .await;
    assert!(
        error.contains("WorkloadEntry demo/server-envoy") && error.contains("spec.ports.grpc-web"),
        "{error}"
    );
    assert_eq!(
        metric(&mesh, "palisade_control_envoy_translation_errors_total").await,
        1.0
    );
    let p = proxy(&mesh, "demo/server-envoy").await.unwrap();
    assert_eq!(lds(&p)["pushes"], pushes, "nothing pushed: {p}");
    assert_eq!(ask(ENVOY_ADDR, &client, 8080, Some("/api/1")).await, 200);
    mesh.write_config("workloads.yaml", &workloads(""));
    wait_for("the error to clear", Duration::from_secs(10), async || {
        let p = proxy(&mesh, "demo/server-envoy").await?;
        p["translate_error"].is_null().then_some(())
    })
    .await;

    let status = Command::new(PALISADE)
        .args(["status", "--control-plane-admin", &mesh.admin])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );

    // No NACK from the Envoy other than the one provoked.
    assert_eq!(
        lds(&proxy(&mesh, "demo/server-envoy").await.unwrap())["nacks"],
        1
    );
    drop(palisade);
    drop(envoy);
    drop(agent);
}

/// Envoy client -> Palisade server and Palisade client -> Envoy server, over the outbound side
/// the control plane generates for the Envoy (HTTP proxy listener, a TCP upstream): each policy
/// is enforced by the proxy that serves the destination, and each server sees the client's
/// identity. Addresses 127.0.69.11 to .14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_pair_in_both_directions() {
    let workload = |name: &str, addr: &str, sa: &str, labels: &str| {
        format!(
            r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}, namespace: demo}}
spec:
  address: {addr}
  serviceAccount: {sa}
  labels: {{{labels}}}
  ports: {{http: 8080, tcp: 9000}}
---
"#
        )
    };
    let service = |name: &str, proxy: &str| {
        format!(
            r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: demo}}
spec:
  hosts: [{name}.demo.svc]
  ports: [{{number: 80, targetPort: 8080, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: server, proxy: {proxy}}}}}
---
"#
        )
    };
    let workloads = [
        workload(
            "server-envoy",
            "127.0.69.11",
            "server",
            "app: server, proxy: envoy",
        ),
        workload(
            "server-palisade",
            "127.0.69.12",
            "server",
            "app: server, proxy: palisade",
        ),
        workload("client-envoy", "127.0.69.13", "client", "app: client"),
        workload("client-palisade", "127.0.69.14", "client", "app: client"),
        service("envoy-server", "envoy"),
        service("palisade-server", "palisade"),
    ]
    .concat();
    let files = [
        ("workloads.yaml", workloads.as_str()),
        ("peer.yaml", STRICT),
        ("allow.yaml", &allow_policy("\"/api/*\"")),
    ];
    let mesh = Mesh::start(&files).await;
    let echo = Echo::start().await;
    let tcp = TcpEcho::start().await;
    let app = |extra: &[String]| -> Vec<String> {
        [
            format!("8080={}", echo.port()),
            format!("9000={}", tcp.port()),
        ]
        .into_iter()
        .flat_map(|a| ["--app-port".to_owned(), a])
        .chain(extra.iter().cloned())
        .collect()
    };

    let envoy_outbound = format!("127.0.0.1:{}", agent_mesh::free_port());
    let envoy_tcp = format!("127.0.0.1:{}", agent_mesh::free_port());
    let palisade_tcp = format!("127.0.0.1:{}", agent_mesh::free_port());
    let ports = (echo.port(), tcp.port());
    let _server_envoy = start_envoy(&mesh, "demo/server-envoy", "server", ports, &[]).await;
    let _client_envoy = start_envoy(
        &mesh,
        "demo/client-envoy",
        "client",
        ports,
        &[
            "--outbound".to_owned(),
            envoy_outbound.clone(),
            "--tcp-upstream".to_owned(),
            format!("{envoy_tcp}=127.0.69.12:9000"),
        ],
    )
    .await;
    let _server_palisade = mesh
        .sidecar("demo/server-palisade", "demo", "server", &app(&[]))
        .await;
    let client_palisade = mesh
        .sidecar(
            "demo/client-palisade",
            "demo",
            "client",
            &app(&[
                "--tcp-upstream".to_owned(),
                format!("{palisade_tcp}=127.0.69.11:9000"),
            ]),
        )
        .await;

    // (via, URL, status wanted): the server's proxy decides.
    let via_envoy = envoy_outbound.as_str();
    let via_palisade = client_palisade.outbound.as_str();
    let cases = [
        (via_envoy, "http://palisade-server.demo.svc/api/1", 200),
        (via_envoy, "http://palisade-server.demo.svc/private", 403),
        (via_envoy, "http://127.0.69.12:8080/api/2", 200),
        (via_palisade, "http://envoy-server.demo.svc/api/1", 200),
        (via_palisade, "http://envoy-server.demo.svc/private", 403),
        (via_palisade, "http://127.0.69.11:8080/api/2", 200),
    ];
    // The first request waits for both sides' config and certificates.
    for (via, url, _) in &cases[..1] {
        wait_for(
            "the mixed pair to serve",
            Duration::from_secs(30),
            async || {
                let r = http1(via, &Transport::Plain, "GET", url, &[]).await.ok()?;
                (r.0 == 200).then_some(())
            },
        )
        .await;
    }
    wait_for(
        "the Palisade client to serve",
        Duration::from_secs(30),
        async || {
            let url = cases[3].1;
            let r = http1(via_palisade, &Transport::Plain, "GET", url, &[])
                .await
                .ok()?;
            (r.0 == 200).then_some(())
        },
    )
    .await;
    for (via, url, want) in cases {
        let (status, body) = http1(via, &Transport::Plain, "GET", url, &[])
            .await
            .unwrap();
        assert_eq!(status, want, "{url} via {via}: {body}");
        if status == 200 {
            // The server's proxy saw the client's certificate and says so to the application.
            assert!(
                body.contains("spiffe://cluster.local/ns/demo/sa/client"),
                "{url} via {via}: {body}"
            );
        }
    }
    // TCP both ways, through declared upstreams: the client identity is allowed on 9000.
    for addr in [&envoy_tcp, &palisade_tcp] {
        let echoed = wait_for("a TCP echo", Duration::from_secs(10), async || {
            tcp_echo(addr, &Transport::Plain, b"ping").await.ok()
        })
        .await;
        assert_eq!(echoed, b"ping");
    }
    // Neither Envoy rejected anything.
    for p in syncz(&mesh).await {
        assert!(
            p["types"]
                .as_object()
                .unwrap()
                .values()
                .all(|t| t["nacks"] == 0),
            "{p}"
        );
    }
}

/// An Envoy on incremental ADS (`palisade envoy bootstrap --delta`): configured, enforcing, and
/// following a policy edit, which reaches it as only the listener that changed. Address
/// 127.0.69.21.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_ads_configures_envoy() {
    let files = [
        (
            "workloads.yaml",
            entry("server-envoy", "127.0.69.21", "envoy", ""),
        ),
        ("peer.yaml", STRICT.to_owned()),
        ("allow.yaml", allow_policy("\"/api/*\"")),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let mesh = Mesh::start(&files).await;
    let echo = Echo::start().await;
    let tcp = TcpEcho::start().await;
    let (agent, envoy) = start_envoy(
        &mesh,
        "demo/server-envoy",
        "server",
        (echo.port(), tcp.port()),
        &["--delta".to_owned()],
    )
    .await;
    let bootstrap = std::fs::read_to_string(mesh.path().join("demo-server-envoy.yaml")).unwrap();
    assert!(bootstrap.contains("DELTA_GRPC"), "{bootstrap}");

    let bundle = mesh.bundle();
    let client = Transport::mtls(mesh.cert("demo", "client"), SERVER_ID, bundle.clone());
    let addr = "127.0.69.21";
    wait_for(
        "the delta Envoy to serve",
        Duration::from_secs(30),
        async || (ask(addr, &client, 8080, Some("/api/1")).await == 200).then_some(()),
    )
    .await;
    assert_eq!(ask(addr, &client, 8080, Some("/other")).await, 403);
    assert_eq!(ask(addr, &client, 9000, None).await, 200);

    mesh.write_config("allow.yaml", &allow_policy("\"/api/*\", \"/other\""));
    wait_for(
        "the edit to reach the delta Envoy",
        Duration::from_secs(10),
        async || (ask(addr, &client, 8080, Some("/other")).await == 200).then_some(()),
    )
    .await;
    // Envoy counts what it received: the edit changed the listener of port 8080 only (the TCP
    // port's network RBAC has no HTTP rule to change), so the update carried one listener.
    let p = proxy(&mesh, "demo/server-envoy").await.unwrap();
    assert!(lds(&p)["acked_version"].is_string(), "{p}");
    assert_eq!(lds(&p)["nacks"], 0, "{p}");
    assert!(envoy.stat("listener_manager.lds.update_success").await >= 2);
    assert_eq!(envoy.stat("listener_manager.listener_modified").await, 1);
    drop(envoy);
    drop(agent);
}
