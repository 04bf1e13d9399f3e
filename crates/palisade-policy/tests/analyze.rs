//! `analyze`: each kind of warning on a directory that has it, and none on a clean one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use palisade_policy::MeshSnapshot;
use palisade_policy::analyze::analyze;

fn load(resources: &str) -> MeshSnapshot {
    MeshSnapshot::from_sources(
        Some((
            "mesh.yaml",
            "trustDomain: td1\ntrustDomainAliases: [old-td]\n",
        )),
        &[
            (
                "workloads.yaml".to_owned(),
                common::BASE_WORKLOADS.to_owned(),
            ),
            ("policies.yaml".to_owned(), resources.to_owned()),
        ],
    )
    .unwrap()
}

#[test]
fn clean_directory_has_no_warnings() {
    let snap = load(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reads, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from:
    - source: {principals: ["td1/ns/bar/sa/web"]}
    to:
    - operation: {methods: [GET], ports: ["8000", "8080"]}
  - from:
    - source: {namespaces: [bar]}
    to:
    - operation: {ports: ["9000"]}
"#,
    );
    let w = analyze(&snap);
    assert!(w.is_empty(), "{w:#?}");
}

#[test]
fn every_warning_kind() {
    let snap = load(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: root-selector, namespace: istio-system}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: one, namespace: foo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: two, namespace: foo}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: http-on-tcp, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - to:
    - operation: {paths: ["/api/*"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-http-only, namespace: foo}
spec:
  action: DENY
  rules:
  - to:
    - operation: {methods: [DELETE]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: foreign-td, namespace: foo}
spec:
  rules:
  - from:
    - source: {principals: ["elsewhere/ns/bar/sa/web"], notPrincipals: ["*"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: bar}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-jwt, namespace: bar}
spec:
  rules:
  - from:
    - source: {requestPrincipals: ["*"]}
    to:
    - operation: {ports: ["80"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: nobody, namespace: foo}
spec:
  selector: {matchLabels: {app: ghost}}
  rules: [{}]
"#,
    );
    let warnings = analyze(&snap);
    let text: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
    let has = |code: &str, resource: &str| {
        warnings
            .iter()
            .any(|w| w.code == code && w.resource.contains(resource))
    };
    for (code, resource) in [
        ("root-namespace-selector", "istio-system/root-selector"),
        ("multiple-peer-authentications", "foo/one, foo/two"),
        ("http-fields-on-tcp", "foo/http-on-tcp"),
        ("deny-http-only", "foo/deny-http-only"),
        ("unknown-trust-domain", "foo/foreign-td"),
        ("never-matches", "foo/foreign-td"),
        ("allow-nothing", "bar/allow-nothing"),
        ("never-matches", "bar/no-jwt"),
        ("selects-nothing", "foo/nobody"),
    ] {
        assert!(
            has(code, resource),
            "missing [{code}] {resource} in:\n{}",
            text.join("\n")
        );
    }
    // Every warning says where the resource was read.
    let tcp = warnings
        .iter()
        .find(|w| w.code == "http-fields-on-tcp" && w.resource.contains("http-on-tcp"))
        .unwrap();
    assert!(
        tcp.to_string().contains("policies.yaml: document 4"),
        "{tcp}"
    );
    assert!(tcp.message.contains("9000 (tcp-db)"), "{}", tcp.message);
}
