//! Palisade's translation for Envoy (`palisade-envoy`) against the real Envoy 1.40: the
//! listeners and clusters the control plane would generate for an Envoy sidecar are loaded into
//! Envoy as static resources (certificates over SDS from a real `palisade agent`), and the same
//! requests go through that Envoy and through a Palisade sidecar configured from the same mesh
//! directory. Both must answer every request the same way, name the same deciding rule
//! (Envoy's `enforced_effective_policy_id` against Palisade's decision counters) and count the
//! same denials and dry-run matches; Envoy must accept every generated config (`--mode
//! validate` on the CLI's JSON and on the typed protos), for these scenarios and for every
//! conformance group and Istio test-data file the translator takes.
//!
//! The two workloads share labels, service account and ports, so every policy selects both;
//! they differ only in their address (127.0.67.1: Envoy, 127.0.67.2: Palisade).
//!
//! Needs Envoy: `scripts/install-envoy.sh` (or `PALISADE_ENVOY`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/mesh.rs"]
mod mesh;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agent_mesh::{AgentProc, PALISADE, wait_for};
use envoy::Envoy;
use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use envoy_types::pb::envoy::config::bootstrap::v3::{Admin, Bootstrap, bootstrap};
use envoy_types::pb::envoy::config::core::v3::{
    Address, Node, SocketAddress, address, socket_address,
};
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, SubstitutionFormatString, data_source, substitution_format_string,
};
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{
    FileAccessLog, file_access_log,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::util::pack_any;
use mesh::{Echo, Mesh, TcpEcho, Transport, http1, tcp_echo};
use prost::{Message as _, Name as _};
use serde_json::{Value, json};

const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";
const ENVOY_ADDR: &str = "127.0.67.1";
const PALISADE_ADDR: &str = "127.0.67.2";

fn workloads() -> String {
    let entry = |name: &str, addr: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}, namespace: demo}}
spec:
  address: {addr}
  serviceAccount: server
  labels: {{app: server}}
  ports: {{http: 8080, http-permissive: 8081, http-plain: 8082, tcp: 9000}}
---
"#
        )
    };
    format!(
        r#"{}{}
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: server, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  mtls: {{mode: STRICT}}
  portLevelMtls:
    "8081": {{mode: PERMISSIVE}}
    "8082": {{mode: DISABLE}}
"#,
        entry("server-envoy", ENVOY_ADDR),
        entry("server-palisade", PALISADE_ADDR)
    )
}

/// Principals, namespaces, methods, paths, ports, notPaths, a header condition, DENY and a
/// dry-run DENY (conformance groups 01, 02, 03, 09, 10).
const SCENARIO_ALLOW_DENY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-allow, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
    to: [{operation: {methods: [GET], paths: ["/api/*"], ports: ["8080"]}}]
  - from: [{source: {namespaces: [ops]}}]
    to: [{operation: {ports: ["8080"], notPaths: ["/private*"]}}]
  - to: [{operation: {ports: ["8081", "8082"], paths: ["/public*"]}}]
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
    to: [{operation: {ports: ["9000"]}}]
  - to: [{operation: {methods: [POST], ports: ["8080"]}}]
    when: [{key: "request.headers[x-token]", values: ["let-me-in"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-deny, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - to: [{operation: {ports: ["8080"], paths: ["/api/secret"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-dry-deny, namespace: demo, annotations: {istio.io/dry-run: "true"}}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/api/items"]}}]
"#;

/// TCP semantics (conformance group 10): the ALLOW rule with an HTTP-only field is skipped on
/// the TCP port, the DENY rule loses its HTTP-only field there; principal prefix and suffix
/// forms and a namespace wildcard (groups 01, 12).
const SCENARIO_TCP_FORMS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: forms-allow, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/cli*"]}}]
  - from: [{source: {principals: ["*/sa/tool"]}}]
    to: [{operation: {methods: [GET]}}]
  - from: [{source: {namespaces: ["oth*"]}}]
    to: [{operation: {paths: ["/open"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: forms-deny, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {namespaces: [ops]}}]
    to: [{operation: {methods: [DELETE]}}]
"#;

/// Service accounts, a path template, hosts, `principals: ["*"]` against plaintext, a
/// `destination.port` condition, DENY on `ipBlocks`, an AUDIT policy and a dry-run ALLOW
/// (conformance groups 01, 02, 03, 09, 11).
const SCENARIO_MORE_FORMS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: more-allow, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from: [{source: {serviceAccounts: [client]}}]
    to: [{operation: {paths: ["/items/{*}/view"]}}]
  - from: [{source: {serviceAccounts: [ops/tool]}}]
    to: [{operation: {hosts: ["*:8080"]}}]
  - from: [{source: {principals: ["*"]}}]
    to: [{operation: {ports: ["8081", "9000"]}}]
  - to: [{operation: {ports: ["8082"], methods: [GET]}}]
    when: [{key: destination.port, values: ["8082"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: more-deny, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {ipBlocks: ["127.0.0.1/32"]}}]
    to: [{operation: {paths: ["/blocked"]}}]
  - from: [{source: {notIpBlocks: ["127.0.0.0/8"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: more-audit, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: AUDIT
  rules:
  - to: [{operation: {paths: ["/audit*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: more-dry-allow, namespace: demo, annotations: {istio.io/dry-run: "true"}}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from: [{source: {namespaces: [nobody]}}]
"#;

/// RequestAuthentication with an inline JWKS (issuer A) and one whose JWKS the control plane
/// could not fetch (issuer B, the fetch-error marker), `requestPrincipals`, `notRequestPrincipals`
/// and `request.auth.claims` conditions on a list claim and a nested claim, a DENY on a
/// principal suffix. `JWKS` is issuer A's key set.
const SCENARIO_JWT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt-allow, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from: [{source: {requestPrincipals: ["https://a.example/alice"]}}]
    to: [{operation: {paths: ["/alice*"]}}]
  - to: [{operation: {paths: ["/admin*"]}}]
    when: [{key: "request.auth.claims[groups]", values: [admins]}]
  - to: [{operation: {paths: ["/team*"]}}]
    when: [{key: "request.auth.claims[org][team]", values: [blue]}]
  - from: [{source: {notRequestPrincipals: ["*"]}}]
    to: [{operation: {paths: ["/anon*"]}}]
  - to: [{operation: {paths: ["/open*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt-deny, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {requestPrincipals: ["*/mallory"]}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  jwtRules:
  - issuer: https://a.example
    audiences: [api]
    jwks: 'JWKS'
  - issuer: https://b.example
    jwks: '{"keys":[],"x-palisade-fetch-error":"connection refused"}'
"#;

/// What one request got: an HTTP status, or no HTTP answer at all; for TCP, whether the echo
/// came back.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Status(u16),
    NoResponse,
    Echoed,
    Closed,
}

/// Method, path and extra headers.
type HttpRequest<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

struct Case<'a> {
    name: &'a str,
    port: u16,
    client: &'a Transport,
    /// `None`: a TCP echo on the port.
    http: Option<HttpRequest<'a>>,
    expect: Outcome,
}

async fn send(addr: &str, case: &Case<'_>, id: &str) -> Outcome {
    let target = format!("{addr}:{}", case.port);
    match case.http {
        Some((method, path, headers)) => {
            // The case id lets Envoy's access log line be found again.
            let mut headers = headers.to_vec();
            headers.push(("x-case", id));
            match http1(&target, case.client, method, path, &headers).await {
                Ok((status, _)) => Outcome::Status(status),
                Err(_) => Outcome::NoResponse,
            }
        }
        None => match tcp_echo(&target, case.client, b"ping").await {
            Ok(echo) if echo == b"ping" => Outcome::Echoed,
            _ => Outcome::Closed,
        },
    }
}

/// Palisade's decision counters by their labels.
async fn palisade_decisions(sidecar: &mesh::Sidecar) -> BTreeMap<String, f64> {
    let (_, body) = sidecar.admin_get("/stats").await;
    body.lines()
        .filter(|l| l.starts_with("palisade_rbac_decisions_total{"))
        .filter_map(|l| {
            let (labels, v) = l.rsplit_once(' ')?;
            Some((labels.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// The deciding policy of the one HTTP decision between two counter snapshots.
fn deciding_policy(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    let changed: Vec<&String> = after
        .iter()
        .filter(|(k, v)| **v > before.get(*k).copied().unwrap_or(0.0))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(changed.len(), 1, "one decision expected: {changed:?}");
    let labels = changed[0];
    labels
        .split("policy=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned()
}

/// Adds a file access log to every HTTP connection manager: the case id and the policy Envoy's
/// RBAC filters reported as deciding (`enforced_effective_policy_id`). Test instrumentation
/// only; istiod's own access log does not print it.
fn with_access_log(listeners: &mut [Listener], log: &Path) {
    let access_log = AccessLog {
        name: "envoy.access_loggers.file".to_owned(),
        config_type: Some(access_log::ConfigType::TypedConfig(pack_any(FileAccessLog {
            path: log.to_str().unwrap().to_owned(),
            access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(
                SubstitutionFormatString {
                    format: Some(substitution_format_string::Format::TextFormatSource(
                        DataSource {
                            specifier: Some(data_source::Specifier::InlineString(
                                "%REQ(X-CASE)% %DYNAMIC_METADATA(envoy.filters.http.rbac:enforced_effective_policy_id)%\n"
                                    .to_owned(),
                            )),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                },
            )),
        }))),
        ..Default::default()
    };
    for l in listeners {
        for chain in &mut l.filter_chains {
            for f in &mut chain.filters {
                let Some(filter::ConfigType::TypedConfig(any)) = &mut f.config_type else {
                    continue;
                };
                if any.type_url != HttpConnectionManager::type_url() {
                    continue;
                }
                let mut hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
                hcm.access_log.push(access_log.clone());
                *any = pack_any(hcm);
            }
        }
    }
}

fn app_port_args(http: u16, tcp: u16) -> Vec<String> {
    [8080, 8081, 8082]
        .iter()
        .flat_map(|p| ["--app-port".to_owned(), format!("{p}={http}")])
        .chain(["--app-port".to_owned(), format!("9000={tcp}")])
        .collect()
}

fn socket(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_owned(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// Writes the Envoy bootstraps for the current mesh directory, validates both with Envoy, and
/// returns the binary one: (1) from `palisade proxy-config envoy` (the CLI's JSON), (2) from the
/// typed protos (`bootstrap.pb`).
fn bootstraps(
    mesh: &Mesh,
    dir: &Path,
    sds: &Path,
    app: (u16, u16),
    tag: &str,
) -> std::path::PathBuf {
    let args = app_port_args(app.0, app.1);
    let out = Command::new(PALISADE)
        .args(["proxy-config", "envoy", "demo/server-envoy", "--config"])
        .arg(&mesh.config)
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "proxy-config envoy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        !dump.to_string().contains(palisade_envoy::json::UNPRINTED),
        "{dump}"
    );
    let strip = |v: &Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("@type");
        v
    };
    let listeners: Vec<Value> = dump["configs"][0]["static_listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| strip(&l["listener"]))
        .collect();
    let mut clusters: Vec<Value> = dump["configs"][1]["static_clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| strip(&c["cluster"]))
        .collect();
    assert_eq!(listeners.len(), 4, "{dump}");
    clusters.push(palisade_envoy::json::cluster(
        &palisade_envoy::tls::sds_cluster(sds.to_str().unwrap()),
    ));
    let node = json!({ "id": "sidecar~127.0.67.1~server-envoy.demo~demo.svc.cluster.local", "cluster": "server-envoy.demo" });
    let json_bootstrap = json!({
        "node": node,
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
        "static_resources": { "listeners": listeners, "clusters": clusters },
    });
    let json_path = dir.join(format!("envoy-{tag}.json"));
    std::fs::write(
        &json_path,
        serde_json::to_vec_pretty(&json_bootstrap).unwrap(),
    )
    .unwrap();
    envoy::validate(&json_path).unwrap_or_else(|e| panic!("Envoy refused the CLI's JSON:\n{e}"));

    // The typed protos, straight from the translator.
    let snapshot = palisade_policy::load_dir(&mesh.config).unwrap();
    let wire = palisade_control::workload_config(&snapshot, "demo/server-envoy").unwrap();
    let ports: BTreeMap<u16, u16> =
        [(8080, app.0), (8081, app.0), (8082, app.0), (9000, app.1)].into();
    let resources = palisade_envoy::translate_inbound(&wire, &ports).unwrap();
    assert_eq!(palisade_envoy::json::config_dump(&resources), dump);
    let mut listeners = resources.listeners;
    with_access_log(&mut listeners, &dir.join(format!("access-{tag}.log")));
    let mut clusters = resources.clusters;
    clusters.push(palisade_envoy::tls::sds_cluster(sds.to_str().unwrap()));
    let typed = Bootstrap {
        node: Some(Node {
            id: "sidecar~127.0.67.1~server-envoy.demo~demo.svc.cluster.local".to_owned(),
            cluster: "server-envoy.demo".to_owned(),
            ..Default::default()
        }),
        admin: Some(Admin {
            address: Some(socket("127.0.0.1", 0)),
            ..Default::default()
        }),
        static_resources: Some(bootstrap::StaticResources {
            listeners,
            clusters,
            ..Default::default()
        }),
        ..Default::default()
    };
    let pb_path = dir.join(format!("envoy-{tag}.pb"));
    std::fs::write(&pb_path, typed.encode_to_vec()).unwrap();
    envoy::validate(&pb_path).unwrap_or_else(|e| panic!("Envoy refused the typed bootstrap:\n{e}"));
    pb_path
}

/// Palisade's counters: HTTP denials, TCP denials, and the dry-run DENY policy's evaluations:
/// matches (labelled with its rule) and non-matches (labelled with the policy).
async fn palisade_counts(sidecar: &mesh::Sidecar) -> [f64; 4] {
    let decisions = "palisade_rbac_decisions_total";
    let shadow = "palisade_rbac_shadow_total";
    [
        sidecar
            .stat(decisions, &["protocol=\"http\"", "decision=\"denied\""])
            .await,
        sidecar
            .stat(decisions, &["protocol=\"tcp\"", "decision=\"denied\""])
            .await,
        sidecar
            .stat(
                shadow,
                &["policy=\"ns[demo]-policy[server-dry-deny]-rule[0]\""],
            )
            .await,
        sidecar
            .stat(shadow, &["policy=\"ns[demo]-policy[server-dry-deny]\""])
            .await,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_palisade_decide_alike() {
    let workloads = workloads();
    let mesh = Mesh::start(&[
        ("workloads.yaml", &workloads),
        ("policies.yaml", SCENARIO_ALLOW_DENY),
    ])
    .await;
    let app = Echo::start().await;
    let tcp_app = TcpEcho::start().await;
    let sidecar = mesh
        .sidecar(
            "demo/server-palisade",
            "demo",
            "server",
            &app_port_args(app.port(), tcp_app.port()),
        )
        .await;
    let token = mesh.token("demo", "server");
    let agent = AgentProc::start(
        mesh.path(),
        "envoy-agent",
        &mesh.ca,
        &mesh.root(),
        &token,
        &[],
    )
    .await;

    let bundle = mesh.bundle();
    let client = Transport::mtls(mesh.cert("demo", "client"), SERVER_ID, bundle.clone());
    let ops = Transport::mtls(mesh.cert("ops", "tool"), SERVER_ID, bundle.clone());
    let other = Transport::mtls(mesh.cert("other", "intruder"), SERVER_ID, bundle.clone());
    let plain = Transport::Plain;
    let get = |p: &'static str| Some(("GET", p, &[][..]));
    use Outcome::*;

    // Issuer A's key, inlined in the RequestAuthentication; tokens minted with it.
    let rsa_kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let rsa = jsonwebtoken::EncodingKey::from_rsa_pem(rsa_kp.serialize_pem().as_bytes()).unwrap();
    let mut jwk =
        jsonwebtoken::jwk::Jwk::from_encoding_key(&rsa, jsonwebtoken::Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let jwt_policies = SCENARIO_JWT.replace("JWKS", &json!({ "keys": [jwk] }).to_string());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let bearer = |iss: &str, extra: Value| {
        let mut c = json!({"iss": iss, "sub": "alice", "aud": "api", "exp": now + 600, "iat": now});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        h.kid = Some("k1".to_owned());
        format!("Bearer {}", jsonwebtoken::encode(&h, &c, &rsa).unwrap())
    };
    let a_valid = bearer("https://a.example", json!({}));
    let a_expired = bearer(
        "https://a.example",
        json!({"exp": now - 600, "iat": now - 1200}),
    );
    let c_issuer = bearer("https://c.example", json!({}));
    let b_issuer = bearer("https://b.example", json!({}));
    let admins = bearer("https://a.example", json!({"groups": ["dev", "admins"]}));
    let team = bearer(
        "https://a.example",
        json!({"sub": "bob", "org": {"team": "blue"}}),
    );
    let mallory = bearer("https://a.example", json!({"sub": "mallory"}));
    fn with(t: &str) -> Vec<(&'static str, &str)> {
        vec![("authorization", t)]
    }
    let (h_valid, h_expired, h_c, h_b, h_admins, h_team, h_mallory) = (
        with(&a_valid),
        with(&a_expired),
        with(&c_issuer),
        with(&b_issuer),
        with(&admins),
        with(&team),
        with(&mallory),
    );

    let scenarios: Vec<(&str, &str, Vec<Case>)> = vec![
        (
            "allow-deny",
            SCENARIO_ALLOW_DENY,
            vec![
                Case {
                    name: "principal + method + path",
                    port: 8080,
                    client: &client,
                    http: get("/api/items"),
                    expect: Status(200),
                },
                Case {
                    name: "method not allowed",
                    port: 8080,
                    client: &client,
                    http: Some(("PUT", "/api/items", &[])),
                    expect: Status(403),
                },
                Case {
                    name: "path not allowed",
                    port: 8080,
                    client: &client,
                    http: get("/admin"),
                    expect: Status(403),
                },
                Case {
                    name: "DENY wins",
                    port: 8080,
                    client: &client,
                    http: get("/api/secret"),
                    expect: Status(403),
                },
                Case {
                    name: "namespace, any method",
                    port: 8080,
                    client: &ops,
                    http: Some(("DELETE", "/anything", &[])),
                    expect: Status(200),
                },
                Case {
                    name: "namespace, notPaths",
                    port: 8080,
                    client: &ops,
                    http: get("/private/x"),
                    expect: Status(403),
                },
                Case {
                    name: "other namespace",
                    port: 8080,
                    client: &other,
                    http: get("/api/items"),
                    expect: Status(403),
                },
                Case {
                    name: "header condition met",
                    port: 8080,
                    client: &other,
                    http: Some(("POST", "/x", &[("x-token", "let-me-in")])),
                    expect: Status(200),
                },
                Case {
                    name: "header condition not met",
                    port: 8080,
                    client: &other,
                    http: Some(("POST", "/x", &[("x-token", "nope")])),
                    expect: Status(403),
                },
                Case {
                    name: "rule for another port",
                    port: 8081,
                    client: &client,
                    http: get("/api/items"),
                    expect: Status(403),
                },
                Case {
                    name: "PERMISSIVE plaintext",
                    port: 8081,
                    client: &plain,
                    http: get("/public/a"),
                    expect: Status(200),
                },
                Case {
                    name: "PERMISSIVE mTLS",
                    port: 8081,
                    client: &other,
                    http: get("/public/a"),
                    expect: Status(200),
                },
                Case {
                    name: "DISABLE plaintext",
                    port: 8082,
                    client: &plain,
                    http: get("/public"),
                    expect: Status(200),
                },
                Case {
                    name: "DISABLE path refused",
                    port: 8082,
                    client: &plain,
                    http: get("/other"),
                    expect: Status(403),
                },
                Case {
                    name: "STRICT refuses plaintext",
                    port: 8080,
                    client: &plain,
                    http: get("/api/items"),
                    expect: NoResponse,
                },
                Case {
                    name: "TCP allowed principal",
                    port: 9000,
                    client: &client,
                    http: None,
                    expect: Echoed,
                },
                Case {
                    name: "TCP other principal",
                    port: 9000,
                    client: &ops,
                    http: None,
                    expect: Closed,
                },
                Case {
                    name: "TCP plaintext on STRICT",
                    port: 9000,
                    client: &plain,
                    http: None,
                    expect: Closed,
                },
            ],
        ),
        (
            "tcp-forms",
            SCENARIO_TCP_FORMS,
            vec![
                Case {
                    name: "principal prefix",
                    port: 8080,
                    client: &client,
                    http: Some(("DELETE", "/x", &[])),
                    expect: Status(200),
                },
                Case {
                    name: "principal suffix GET",
                    port: 8080,
                    client: &ops,
                    http: get("/x"),
                    expect: Status(200),
                },
                Case {
                    name: "principal suffix POST",
                    port: 8080,
                    client: &ops,
                    http: Some(("POST", "/x", &[])),
                    expect: Status(403),
                },
                Case {
                    name: "DENY on method",
                    port: 8080,
                    client: &ops,
                    http: Some(("DELETE", "/x", &[])),
                    expect: Status(403),
                },
                Case {
                    name: "namespace prefix path",
                    port: 8080,
                    client: &other,
                    http: get("/open"),
                    expect: Status(200),
                },
                Case {
                    name: "namespace prefix other path",
                    port: 8080,
                    client: &other,
                    http: get("/closed"),
                    expect: Status(403),
                },
                Case {
                    name: "TCP: rule without HTTP fields",
                    port: 9000,
                    client: &client,
                    http: None,
                    expect: Echoed,
                },
                Case {
                    name: "TCP: DENY without its method",
                    port: 9000,
                    client: &ops,
                    http: None,
                    expect: Closed,
                },
                Case {
                    name: "TCP: ALLOW with paths skipped",
                    port: 9000,
                    client: &other,
                    http: None,
                    expect: Closed,
                },
            ],
        ),
        (
            "more-forms",
            SCENARIO_MORE_FORMS,
            vec![
                Case {
                    name: "service account + path template",
                    port: 8080,
                    client: &client,
                    http: get("/items/7/view"),
                    expect: Status(200),
                },
                Case {
                    name: "path template is one segment",
                    port: 8080,
                    client: &client,
                    http: get("/items/7/8/view"),
                    expect: Status(403),
                },
                Case {
                    name: "service account ns/sa + host suffix",
                    port: 8080,
                    client: &ops,
                    http: get("/anything"),
                    expect: Status(200),
                },
                Case {
                    name: "DENY on ipBlocks + path",
                    port: 8080,
                    client: &ops,
                    http: get("/blocked"),
                    expect: Status(403),
                },
                Case {
                    name: "AUDIT does not decide",
                    port: 8080,
                    client: &ops,
                    http: get("/audit/x"),
                    expect: Status(200),
                },
                Case {
                    name: "no service account matches",
                    port: 8080,
                    client: &other,
                    http: get("/items/7/view"),
                    expect: Status(403),
                },
                Case {
                    name: "any principal, mTLS",
                    port: 8081,
                    client: &other,
                    http: get("/x"),
                    expect: Status(200),
                },
                Case {
                    name: "any principal, plaintext has none",
                    port: 8081,
                    client: &plain,
                    http: get("/x"),
                    expect: Status(403),
                },
                Case {
                    name: "destination.port condition",
                    port: 8082,
                    client: &plain,
                    http: get("/x"),
                    expect: Status(200),
                },
                Case {
                    name: "method outside the rule",
                    port: 8082,
                    client: &plain,
                    http: Some(("POST", "/x", &[])),
                    expect: Status(403),
                },
                Case {
                    name: "TCP: the DENY rule without its path denies every loopback peer",
                    port: 9000,
                    client: &other,
                    http: None,
                    expect: Closed,
                },
            ],
        ),
        (
            "jwt",
            &jwt_policies,
            vec![
                Case {
                    name: "no token, open path",
                    port: 8082,
                    client: &plain,
                    http: get("/open"),
                    expect: Status(200),
                },
                Case {
                    name: "no token, requestPrincipals path",
                    port: 8082,
                    client: &plain,
                    http: get("/alice"),
                    expect: Status(403),
                },
                Case {
                    name: "valid token, requestPrincipals allow",
                    port: 8082,
                    client: &plain,
                    http: Some(("GET", "/alice", &h_valid)),
                    expect: Status(200),
                },
                Case {
                    name: "valid token over mTLS",
                    port: 8080,
                    client: &client,
                    http: Some(("GET", "/alice/x", &h_valid)),
                    expect: Status(200),
                },
                Case {
                    name: "expired token",
                    port: 8082,
                    client: &plain,
                    http: Some(("GET", "/open", &h_expired)),
                    expect: Status(401),
                },
                Case {
                    name: "unknown issuer",
                    port: 8082,
                    client: &plain,
                    http: Some(("GET", "/open", &h_c)),
                    expect: Status(401),
                },
                Case {
                    name: "issuer whose JWKS could not be fetched",
                    port: 8082,
                    client: &plain,
                    http: Some(("GET", "/open", &h_b)),
                    expect: Status(401),
                },
                Case {
                    name: "list claim holds the value",
                    port: 8082,
                    client: &plain,
                    http: Some(("GET", "/admin", &h_admins)),
                    expect: Status(200),
                },
                Case {
                    name: "claim missing",
                    port: 8082,
                    client: &plain,
                    http: Some(("GET", "/admin", &h_valid)),
                    expect: Status(403),
                },
                Case {
                    name: "nested claim",
                    port: 8082,
                    client: &plain,
                    http: Some(("GET", "/team", &h_team)),
                    expect: Status(200),
                },
                Case {
                    name: "other principal, requestPrincipals path",
                    port: 8082,
                    client: &plain,
                    http: Some(("GET", "/alice", &h_team)),
                    expect: Status(403),
                },
                Case {
                    name: "requestPrincipals DENY",
                    port: 8082,
                    client: &plain,
                    http: Some(("GET", "/open", &h_mallory)),
                    expect: Status(403),
                },
                Case {
                    name: "notRequestPrincipals without a token",
                    port: 8082,
                    client: &plain,
                    http: get("/anon"),
                    expect: Status(200),
                },
                Case {
                    name: "notRequestPrincipals with a token",
                    port: 8082,
                    client: &plain,
                    http: Some(("GET", "/anon", &h_valid)),
                    expect: Status(403),
                },
            ],
        ),
    ];

    let mut requests = 0;
    for (tag, policies, cases) in &scenarios {
        mesh.write_config("policies.yaml", policies);
        // The Palisade sidecar takes the push; wait until it holds this scenario's policies.
        let marker = policies
            .lines()
            .find_map(|l| l.strip_prefix("metadata: {name: "))
            .and_then(|l| l.split(',').next())
            .unwrap()
            .to_owned();
        wait_for(
            "the sidecar to take the new policies",
            Duration::from_secs(15),
            async || {
                let (_, body) = sidecar.admin_get("/config_dump").await;
                body.contains(&marker).then_some(())
            },
        )
        .await;
        let pb = bootstraps(
            &mesh,
            mesh.path(),
            &agent.sds,
            (app.port(), tcp_app.port()),
            tag,
        );
        let envoy = Envoy::start_file_with(
            mesh.path(),
            &format!("envoy-{tag}"),
            &pb,
            &["--file-flush-interval-msec", "50"],
        )
        .await;
        envoy.wait_live(Duration::from_secs(30)).await;

        let palisade_before = palisade_counts(&sidecar).await;
        let mut disagreements = Vec::new();
        // Case id -> the policy Palisade reports as deciding (HTTP requests that were decided).
        let mut palisade_policies = BTreeMap::new();
        for (i, case) in cases.iter().enumerate() {
            let id = format!("{tag}-{i}");
            let through_envoy = send(ENVOY_ADDR, case, &id).await;
            let before = palisade_decisions(&sidecar).await;
            let through_palisade = send(PALISADE_ADDR, case, &id).await;
            if through_palisade == Outcome::Status(401) {
                // Refused by authentication, before any RBAC filter (Envoy logs `-`).
                palisade_policies.insert(id.clone(), "none".to_owned());
            } else if case.http.is_some() && matches!(through_palisade, Outcome::Status(_)) {
                let after = palisade_decisions(&sidecar).await;
                palisade_policies.insert(id.clone(), deciding_policy(&before, &after));
            }
            requests += 2;
            if through_envoy != through_palisade || through_envoy != case.expect {
                disagreements.push(format!(
                    "{tag}: {}: Envoy {through_envoy:?}, Palisade {through_palisade:?}, expected {:?}",
                    case.name, case.expect
                ));
            }
        }
        assert!(
            disagreements.is_empty(),
            "{}\nEnvoy stderr:\n{}",
            disagreements.join("\n"),
            envoy.proc.stderr_text()
        );

        // Envoy's RBAC filters name the same deciding rule as Palisade for every HTTP request
        // (`-`: no rule decided, Palisade's `none`).
        let log_path = mesh.path().join(format!("access-{tag}.log"));
        let envoy_policies: BTreeMap<String, String> =
            wait_for("Envoy's access log", Duration::from_secs(10), async || {
                let text = std::fs::read_to_string(&log_path).ok()?;
                let lines: BTreeMap<String, String> = text
                    .lines()
                    .filter_map(|l| l.split_once(' '))
                    .map(|(id, p)| {
                        let p = if p == "-" { "none" } else { p };
                        (id.to_owned(), p.to_owned())
                    })
                    .collect();
                (lines.len() >= palisade_policies.len()).then_some(lines)
            })
            .await;
        assert_eq!(
            envoy_policies, palisade_policies,
            "{tag}: deciding policies"
        );
        assert!(
            palisade_policies.values().filter(|p| *p != "none").count() >= 3,
            "{tag}: {palisade_policies:?}"
        );
        println!("{tag}: deciding policies {palisade_policies:?}");

        // Both count the same denials, HTTP and TCP, and the same dry-run matches: Envoy's
        // shadow stats under Istio's prefix, Palisade's under the dry-run policy's name.
        let (_, stats) = envoy.admin_get("/stats").await;
        let envoy_sum = |pick: &dyn Fn(&str) -> bool| -> f64 {
            stats
                .lines()
                .filter_map(|l| l.split_once(": "))
                .filter(|(name, _)| pick(name))
                .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
                .sum()
        };
        let palisade_now = palisade_counts(&sidecar).await;
        let envoy_counts = [
            envoy_sum(&|n| n.starts_with("http.") && n.ends_with(".rbac.denied")),
            envoy_sum(&|n| n == "tcp.rbac.denied"),
            envoy_sum(&|n| n.ends_with(".rbac.istio_dry_run_deny_.shadow_denied")),
            envoy_sum(&|n| n.ends_with(".rbac.istio_dry_run_deny_.shadow_allowed")),
        ];
        let palisade_delta: Vec<f64> = palisade_now
            .iter()
            .zip(&palisade_before)
            .map(|(a, b)| a - b)
            .collect();
        assert_eq!(
            envoy_counts.to_vec(),
            palisade_delta,
            "{tag}: [HTTP denied, TCP denied, dry-run DENY matches, non-matches], Envoy vs Palisade\n{}\n{}",
            stats
                .lines()
                .filter(|l| l.contains("rbac"))
                .collect::<Vec<_>>()
                .join("\n"),
            sidecar
                .admin_get("/stats")
                .await
                .1
                .lines()
                .filter(|l| l.contains("rbac"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        if *tag == "allow-deny" {
            // GET and PUT /api/items by demo/client, GET by other/intruder.
            assert!(
                stats.contains(
                    "http.inbound_127.0.67.1_8080.rbac.istio_dry_run_deny_.shadow_denied: 3"
                ),
                "{stats}"
            );
        }
        drop(envoy);
    }
    assert!(requests >= 50, "{requests}");
    drop(agent);
}

/// The workloads of the policy engine's conformance suite (`foo/httpbin` is the one decided).
const CONFORMANCE_WORKLOADS: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: httpbin, namespace: foo}
spec:
  address: ADDRESS
  serviceAccount: httpbin
  labels: {app: httpbin, version: v1}
  ports: {http: 8000, tcp-db: 9000, http-admin: 8080}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web, namespace: bar}
spec:
  address: 127.0.67.254
  serviceAccount: web
  labels: {app: httpbin, version: v1}
  ports: {http: 80}
"#;

/// Every conformance group and every file of Istio's own authorization test data, translated for
/// `foo/httpbin`: each either becomes listeners that Envoy 1.40 accepts (all of them validated
/// together, one listener set per input on its own loopback address), or is refused as not
/// translated yet, naming the resource and field; nothing else.
#[test]
fn every_policy_input_translates_to_config_envoy_accepts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut inputs: Vec<(String, Option<String>, String)> = Vec::new();
    let conformance = root.join("crates/palisade-policy/tests/conformance");
    let mut files: Vec<_> = std::fs::read_dir(&conformance)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in files {
        let groups: Vec<Value> =
            serde_saphyr::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        for g in groups {
            if g.get("noBaseWorkloads").is_some() || g.get("expectLoadErrors").is_some() {
                continue;
            }
            inputs.push((
                format!(
                    "{}: {}",
                    file.file_name().unwrap().to_string_lossy(),
                    g["group"].as_str().unwrap()
                ),
                g.get("mesh").and_then(Value::as_str).map(str::to_owned),
                g["resources"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    let istio = root.join("../shared/istio-testdata/authz");
    assert!(
        istio.is_dir(),
        "Istio test data not found at {} (expected shared/istio-testdata next to the workspace)",
        istio.display()
    );
    for sub in ["http", "tcp"] {
        let mut files: Vec<_> = std::fs::read_dir(istio.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in files {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            // The trust-domain alias cases of Istio's README.
            let mesh = match name.as_str() {
                "simple-policy-td-aliases-in.yaml" => {
                    Some("trustDomain: td1\ntrustDomainAliases: [cluster.local]\n")
                }
                "simple-policy-multiple-td-aliases-in.yaml" => {
                    Some("trustDomain: td1\ntrustDomainAliases: [cluster.local, some-td]\n")
                }
                "simple-policy-principal-with-wildcard-in.yaml" => {
                    Some("trustDomain: td1\ntrustDomainAliases: [foobar]\n")
                }
                "td-aliases-source-principal-in.yaml" => {
                    Some("trustDomain: new-td\ntrustDomainAliases: [old-td, some-trustdomain]\n")
                }
                _ => None,
            };
            inputs.push((
                format!("istio {sub}/{name}"),
                mesh.map(str::to_owned),
                std::fs::read_to_string(&file).unwrap(),
            ));
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let mut listeners = Vec::new();
    let mut clusters: BTreeMap<String, envoy_types::pb::envoy::config::cluster::v3::Cluster> =
        BTreeMap::new();
    let mut refused = Vec::new();
    // The JWKS as the control plane pushes them before any fetch answered: each `jwksUri` rule
    // inlined with the fail-closed fetch-error marker (nothing is fetched here).
    let jwks =
        palisade_control::jwks::JwksResolver::new(palisade_control::jwks::JwksOptions::from_env());
    for (i, (name, mesh, resources)) in inputs.iter().enumerate() {
        let address = format!("127.0.67.{}", 10 + i);
        let sources = vec![(
            "input.yaml".to_owned(),
            format!(
                "{}---\n{resources}",
                CONFORMANCE_WORKLOADS.replace("ADDRESS", &address)
            ),
        )];
        let mesh_yaml = mesh.clone().unwrap_or_else(|| mesh::MESH_YAML.to_owned());
        let snapshot =
            palisade_policy::MeshSnapshot::from_sources(Some(("mesh.yaml", &mesh_yaml)), &sources)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut wire = palisade_control::workload_config(&snapshot, "foo/httpbin").unwrap();
        jwks.inline(&mut wire);
        match palisade_envoy::translate_inbound(&wire, &BTreeMap::new()) {
            Ok(r) => {
                listeners.extend(r.listeners);
                for c in r.clusters {
                    clusters.insert(c.name.clone(), c);
                }
            }
            Err(e @ palisade_envoy::TranslateError::NotTranslated { .. }) => {
                refused.push(format!("{name}: {e}"));
            }
            Err(e) => panic!("{name}: {e}"),
        }
    }
    let translated = inputs.len() - refused.len();
    println!(
        "{} inputs: {translated} translated and validated by Envoy, {} refused as not translated yet:\n{}",
        inputs.len(),
        refused.len(),
        refused.join("\n")
    );
    assert!(translated >= 87, "only {translated} inputs translated");
    // RequestAuthentication and `request.auth.*` are translated now; only CUSTOM and trust
    // domains remain.
    assert_eq!(refused.len(), 8, "{refused:#?}");
    assert!(
        !refused
            .iter()
            .any(|r| r.contains("RequestAuthentication") || r.contains("request")),
        "{refused:#?}"
    );
    let mut clusters: Vec<_> = clusters.into_values().collect();
    clusters.push(palisade_envoy::tls::sds_cluster("/nonexistent/sds.sock"));
    // The same resources as `proxy-config envoy` prints them: Envoy must read the JSON too,
    // and nothing may be left unprinted.
    let printed = json!({
        "node": { "id": "sidecar~127.0.67.10~httpbin.foo~foo.svc.cluster.local", "cluster": "httpbin.foo" },
        "static_resources": {
            "listeners": listeners.iter().map(palisade_envoy::json::listener).collect::<Vec<_>>(),
            "clusters": clusters.iter().map(palisade_envoy::json::cluster).collect::<Vec<_>>(),
        },
    });
    assert!(
        !printed
            .to_string()
            .contains(palisade_envoy::json::UNPRINTED)
    );
    let json_path = dir.path().join("all.json");
    std::fs::write(&json_path, printed.to_string()).unwrap();
    envoy::validate(&json_path)
        .unwrap_or_else(|e| panic!("Envoy refused the printed config:\n{e}"));
    let bootstrap = Bootstrap {
        node: Some(Node {
            id: "sidecar~127.0.67.10~httpbin.foo~foo.svc.cluster.local".to_owned(),
            cluster: "httpbin.foo".to_owned(),
            ..Default::default()
        }),
        static_resources: Some(bootstrap::StaticResources {
            listeners,
            clusters,
            ..Default::default()
        }),
        ..Default::default()
    };
    let path = dir.path().join("all.pb");
    std::fs::write(&path, bootstrap.encode_to_vec()).unwrap();
    envoy::validate(&path).unwrap_or_else(|e| panic!("Envoy refused the generated config:\n{e}"));
}

/// What is not translated yet is refused by the command, naming the resource and the field;
/// a workload that does not exist is an error too.
#[test]
fn proxy_config_envoy_refuses_what_it_cannot_translate() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), mesh::MESH_YAML).unwrap();
    let files = format!(
        "{}---\n{}",
        CONFORMANCE_WORKLOADS.replace("ADDRESS", "127.0.67.5"),
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: by-uri, namespace: foo}
spec:
  jwtRules: [{issuer: "https://idp", jwksUri: "https://idp/keys"}]
"#
    );
    std::fs::write(dir.path().join("policies.yaml"), files).unwrap();
    let run = |workload: &str| {
        Command::new(PALISADE)
            .args(["proxy-config", "envoy", workload, "--config"])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let cases = [
        (
            "foo/httpbin",
            // Offline there is no JWKS the control plane resolved, and no remote JWKS is generated.
            "RequestAuthentication foo/by-uri: spec.jwtRules[issuer=https://idp].jwksUri: not translated for Envoy yet",
        ),
        ("foo/none", "\"foo/none\" is not a WorkloadEntry"),
    ];
    for (workload, want) in cases {
        let out = run(workload);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{workload}");
        assert!(out.stdout.is_empty(), "{workload}");
        assert!(stderr.contains(want), "{workload}: {stderr}");
    }
    // bar/web has the same labels in another namespace: the policy does not apply to it.
    let out = run("bar/web");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
