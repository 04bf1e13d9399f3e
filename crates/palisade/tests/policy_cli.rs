//! The policy commands run as a user would: `palisade authz check`, `describe workload` and
//! `analyze` on a mesh directory written to a temporary folder.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

const WORKLOADS: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews, namespace: prod}
spec:
  address: 127.0.0.12
  serviceAccount: reviews
  labels: {app: reviews}
  ports: {http: 9080}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: db, namespace: prod}
spec:
  address: 127.0.0.13
  serviceAccount: db
  labels: {app: db}
  ports: {tcp-postgres: 5432}
"#;

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: prod}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: reviews, namespace: prod}
spec:
  selector: {matchLabels: {app: reviews}}
  portLevelMtls:
    9080: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: prod}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/prod/sa/frontend"]}
    to:
    - operation: {methods: ["GET"], ports: ["9080"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-delete, namespace: prod}
spec:
  action: DENY
  rules:
  - to:
    - operation: {methods: ["DELETE"], ports: ["9080"]}
"#;

const REQUEST: &str = r#"
workload: prod/reviews
port: 9080
source:
  principal: cluster.local/ns/prod/sa/frontend
  ip: 127.0.0.11
http:
  method: GET
  path: /api/v1/items?x=1
  host: reviews:9080
"#;

fn mesh_dir(extra: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), "trustDomain: cluster.local\n").unwrap();
    std::fs::write(dir.path().join("workloads.yaml"), WORKLOADS).unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/security.yaml"), POLICIES).unwrap();
    for (name, text) in extra {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn palisade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run palisade")
}

fn check(dir: &Path, request: &str, output: &str) -> Output {
    // The request lives outside the mesh directory, which is read recursively.
    let req_dir = tempfile::tempdir().unwrap();
    let req = req_dir.path().join("request.yaml");
    std::fs::write(&req, request).unwrap();
    palisade(&[
        "authz",
        "check",
        "--config",
        dir.to_str().unwrap(),
        "--request",
        req.to_str().unwrap(),
        "--output",
        output,
    ])
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn authz_check_json_has_the_documented_shape() {
    let dir = mesh_dir(&[]);
    let out = check(dir.path(), REQUEST, "json");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["allowed"], true);
    assert_eq!(v["action"], "ALLOW");
    assert_eq!(v["policy"], "ns[prod]-policy[reviews-viewer]-rule[0]");
    assert_eq!(v["mtlsMode"], "PERMISSIVE");
    assert_eq!(v["custom"], serde_json::json!([]));
    assert_eq!(v["dryRun"], serde_json::json!([]));
    assert_eq!(v["audit"], false);
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("allowed by ALLOW policy prod/reviews-viewer")
    );
    let trace = v["trace"].as_array().unwrap();
    assert!(
        trace
            .iter()
            .any(|t| t["step"] == "DENY" && t["matched"] == false)
    );
    assert!(trace.iter().any(|t| t["step"] == "ALLOW" && t["rule"] == "ns[prod]-policy[reviews-viewer]-rule[0]"));
}

#[test]
fn authz_check_reports_denials_with_exit_zero() {
    let dir = mesh_dir(&[]);
    let delete = REQUEST.replace("method: GET", "method: DELETE");
    let out = check(dir.path(), &delete, "json");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["allowed"].as_bool(), v["action"].as_str()),
        (Some(false), Some("DENY"))
    );
    assert_eq!(v["policy"], "ns[prod]-policy[deny-delete]-rule[0]");

    // A plaintext TCP connection to the STRICT database port is refused by mTLS.
    let tcp = "workload: prod/db\nport: 5432\nsource: {ip: 127.0.0.11}\n";
    let out = check(dir.path(), tcp, "json");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["allowed"].as_bool(), v["action"].as_str()),
        (Some(false), Some("MTLS"))
    );
    assert_eq!(v["policy"], serde_json::Value::Null);
    assert_eq!(v["mtlsMode"], "STRICT");
}

#[test]
fn authz_check_table() {
    let dir = mesh_dir(&[]);
    let out = check(dir.path(), &REQUEST.replace("frontend", "ratings"), "table");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("DECISION:  DEFAULT (denied)"), "{text}");
    assert!(text.contains("matched policy none"), "{text}");
    assert!(
        text.contains(r#"from[0].source.principals: peer principal "cluster.local/ns/prod/sa/ratings" matches none of"#),
        "{text}"
    );
    assert!(text.contains("ns[prod]-policy[reviews-viewer]"), "{text}");
}

#[test]
fn bad_input_exits_2_naming_file_and_field() {
    let broken = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: broken, namespace: prod}\nspec:\n  rules:\n  - from:\n    - source: {principalz: [x]}\n";
    let dir = mesh_dir(&[("broken.yaml", broken)]);
    let out = check(dir.path(), REQUEST, "json");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("broken.yaml: document 1 (line 7): AuthorizationPolicy prod/broken"),
        "{err}"
    );
    assert!(
        err.contains("spec.rules[0].from[0].source.principalz: unknown field `principalz`"),
        "{err}"
    );
    assert!(stdout(&out).is_empty());

    // A bad request file is bad input too.
    let dir = mesh_dir(&[]);
    let out = check(
        dir.path(),
        "workload: prod/reviews\nport: 9080\nhttp: {method: GET, verb: x}\n",
        "json",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("request.yaml: http.verb: unknown field `verb`"),
        "{err}"
    );
}

#[test]
fn describe_workload_json_and_table() {
    let dir = mesh_dir(&[]);
    let out = palisade(&[
        "describe",
        "workload",
        "prod/reviews",
        "--config",
        dir.path().to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mtls"]["mode"], "STRICT");
    assert_eq!(v["mtls"]["policy"], "prod/default");
    let port = &v["mtls"]["ports"][0];
    assert_eq!(
        (
            port["port"].as_u64(),
            port["mode"].as_str(),
            port["policy"].as_str()
        ),
        (Some(9080), Some("PERMISSIVE"), Some("prod/reviews"))
    );
    assert_eq!(
        v["authorization"]["allow"][0]["name"],
        "prod/reviews-viewer"
    );
    assert_eq!(v["authorization"]["deny"][0]["name"], "prod/deny-delete");

    let out = palisade(&[
        "describe",
        "workload",
        "prod/reviews",
        "--config",
        dir.path().to_str().unwrap(),
    ]);
    let text = stdout(&out);
    assert!(
        text.contains("9080    http             PERMISSIVE  port       prod/reviews"),
        "{text}"
    );
    assert!(text.contains("DENY     prod/deny-delete"), "{text}");

    let out = palisade(&[
        "describe",
        "workload",
        "prod/missing",
        "--config",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("known: prod/db, prod/reviews"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn analyze_exit_codes() {
    // Clean: every rule limits itself to the HTTP port.
    let dir = mesh_dir(&[]);
    let out = palisade(&["analyze", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );

    // Warns: an ALLOW policy without rules, and HTTP fields on a TCP port.
    let risky = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: db-readers, namespace: prod}\nspec:\n  selector: {matchLabels: {app: db}}\n  rules:\n  - to:\n    - operation: {methods: [GET]}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: nothing, namespace: prod}\nspec: {}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: prod}\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {ports: [\"8080\"], paths: [\"/admin/*\"]}\n";
    let dir = mesh_dir(&[("risky.yaml", risky)]);
    let out = palisade(&["analyze", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains("[http-fields-on-tcp]") && text.contains("5432 (tcp-postgres)"),
        "{text}"
    );
    assert!(text.contains("[allow-nothing]"), "{text}");
    // A DENY on a path prefix under the default (BASE) normalization.
    assert!(
        text.contains("[path-normalization]") && text.contains("//admin/x or /admin%2Fx"),
        "{text}"
    );

    // Does not load.
    let dir = mesh_dir(&[("bad.yaml", "kind: Nonsense\n")]);
    let out = palisade(&["analyze", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("bad.yaml: document 1 (line 1)"),
        "{}",
        stderr(&out)
    );
}
