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

#[test]
fn jwks_over_plaintext_names_the_rule_and_the_reason() {
    // (jwtRule, the plaintext URL warned about, if any)
    let cases: &[(&str, Option<&str>)] = &[
        (
            r#"{issuer: "https://idp.example", jwksUri: "http://idp.example/keys"}"#,
            Some("http://idp.example/keys"),
        ),
        // No jwksUri: keys come from the issuer's OIDC discovery, here over plaintext.
        (
            r#"{issuer: "http://idp.example/"}"#,
            Some("http://idp.example/.well-known/openid-configuration"),
        ),
        (
            r#"{issuer: "https://idp.example", jwksUri: "https://idp.example/keys"}"#,
            None,
        ),
        (r#"{issuer: "https://idp.example"}"#, None),
        // An https jwksUri wins over an http issuer: discovery is not used.
        (
            r#"{issuer: "http://idp.example", jwksUri: "https://idp.example/keys"}"#,
            None,
        ),
        // Inline keys are not fetched at all.
        (
            r#"{issuer: "http://idp.example", jwks: '{"keys":[]}'}"#,
            None,
        ),
    ];
    for (rule, expected) in cases {
        let snap = load(&format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: foo}}\nspec:\n  jwtRules:\n  - {{issuer: \"https://other\", jwksUri: \"https://other/keys\"}}\n  - {rule}\n"
        ));
        let found: Vec<_> = analyze(&snap)
            .into_iter()
            .filter(|w| w.code == "jwks-over-plaintext")
            .collect();
        match expected {
            None => assert!(found.is_empty(), "{rule}: {found:#?}"),
            Some(url) => {
                assert_eq!(found.len(), 1, "{rule}: {found:#?}");
                let w = &found[0];
                assert_eq!(w.resource, "RequestAuthentication foo/jwt", "{rule}");
                let issuer = rule.split('"').nth(1).unwrap();
                for needle in [
                    "jwtRules[1]",
                    &format!("issuer {issuer:?}"),
                    url,
                    "swap the keys",
                ] {
                    assert!(w.message.contains(needle), "{rule}: {needle:?} not in {w}");
                }
                assert!(w.to_string().contains("policies.yaml"), "{w}");
            }
        }
    }
}

#[test]
fn path_protection_that_depends_on_the_applications_normalization() {
    // (pathNormalization, action, field, path, what the warning names; empty: no warning)
    let cases: &[(&str, &str, &str, &str, &[&str])] = &[
        (
            "BASE",
            "DENY",
            "paths",
            "/admin/*",
            &[
                "paths \"/admin/*\"",
                "BASE",
                "//admin/x or /admin%2Fx",
                "serve it as /admin/x",
                "DECODE_AND_MERGE_SLASHES",
            ],
        ),
        (
            "BASE",
            "DENY",
            "paths",
            "/admin",
            &["//admin is not matched"],
        ),
        (
            "MERGE_SLASHES",
            "DENY",
            "paths",
            "/admin/*",
            &["/admin%2Fx is not matched", "decode %2F"],
        ),
        // Merged slashes leave nothing to the application for an exact one-segment path.
        ("MERGE_SLASHES", "DENY", "paths", "/admin", &[]),
        ("DECODE_AND_MERGE_SLASHES", "DENY", "paths", "/admin/*", &[]),
        ("NONE", "DENY", "paths", "/admin", &["NONE", "/./admin"]),
        (
            "BASE",
            "ALLOW",
            "notPaths",
            "/internal/*",
            &["notPaths \"/internal/*\"", "//internal/x"],
        ),
        // ALLOW on paths fails closed: a path the proxy does not match is denied.
        ("BASE", "ALLOW", "paths", "/public/*", &[]),
        ("BASE", "DENY", "paths", "*.php", &[]),
    ];
    for (mode, action, field, path, needles) in cases {
        let snap = MeshSnapshot::from_sources(
            Some((
                "mesh.yaml",
                &format!("trustDomain: td1\npathNormalization: {{normalization: {mode}}}\n"),
            )),
            &[
                (
                    "workloads.yaml".to_owned(),
                    common::BASE_WORKLOADS.to_owned(),
                ),
                (
                    "policies.yaml".to_owned(),
                    format!(
                        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec:\n  action: {action}\n  rules:\n  - to: [{{operation: {{ports: [\"8000\"], {field}: [\"{path}\"]}}}}]\n"
                    ),
                ),
            ],
        )
        .unwrap();
        let found: Vec<_> = analyze(&snap)
            .into_iter()
            .filter(|w| w.code == "path-normalization")
            .collect();
        let case = format!("{mode} {action} {field} {path}");
        if needles.is_empty() {
            assert!(found.is_empty(), "{case}: {found:#?}");
            continue;
        }
        assert_eq!(found.len(), 1, "{case}: {found:#?}");
        assert_eq!(found[0].resource, "AuthorizationPolicy foo/p");
        for n in *needles {
            assert!(
                found[0].message.contains(n),
                "{case}: {n:?} not in {}",
                found[0]
            );
        }
    }
}

#[test]
fn custom_with_an_http_provider_on_tcp_ports() {
    let load_with = |policy: &str| {
        MeshSnapshot::from_sources(
            Some((
                "mesh.yaml",
                "trustDomain: td1\nextensionProviders:\n- name: http-authz\n  envoyExtAuthzHttp: {service: authz.foo.svc, port: 8000}\n- name: grpc-authz\n  envoyExtAuthzGrpc: {service: authz.foo.svc, port: 9000}\n",
            )),
            &[
                (
                    "workloads.yaml".to_owned(),
                    common::BASE_WORKLOADS.to_owned(),
                ),
                ("policies.yaml".to_owned(), policy.to_owned()),
            ],
        )
        .unwrap()
    };
    // (provider, rule, warned)
    let cases = [
        ("http-authz", "{}", true),
        // Limited to HTTP ports: no TCP connection would have reached it anyway.
        (
            "http-authz",
            r#"{to: [{operation: {ports: ["8000"]}}]}"#,
            false,
        ),
        (
            "http-authz",
            r#"{to: [{operation: {ports: ["9000"]}}]}"#,
            true,
        ),
        ("grpc-authz", "{}", false),
    ];
    for (provider, rule, warned) in cases {
        let snap = load_with(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ext, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  action: CUSTOM\n  provider: {{name: {provider}}}\n  rules: [{rule}]\n"
        ));
        let found: Vec<_> = analyze(&snap)
            .into_iter()
            .filter(|w| w.code == "custom-http-provider-on-tcp")
            .collect();
        if !warned {
            assert!(found.is_empty(), "{provider} {rule}: {found:#?}");
            continue;
        }
        assert_eq!(found.len(), 1, "{provider} {rule}: {found:#?}");
        let w = &found[0];
        assert_eq!(w.resource, "AuthorizationPolicy foo/ext");
        for needle in [
            "\"http-authz\"",
            "foo/httpbin",
            "9000 (tcp-db)",
            "envoyExtAuthzGrpc",
        ] {
            assert!(w.message.contains(needle), "{needle:?} not in {w}");
        }
        assert!(!w.message.contains("8000"), "{w}");
    }
}
