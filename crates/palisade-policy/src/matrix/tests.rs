//! Table-driven cases on small meshes, and a property test against the engine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

const MESH: &str = "trustDomain: cluster.local\nextensionProviders:\n- name: ext\n  envoyExtAuthzGrpc: {service: authz.svc, port: 9000}\n";

const WORKLOADS: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web, namespace: prod}
spec: {address: 10.0.0.1, serviceAccount: web, labels: {app: web}, ports: {http: 8080}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: db, namespace: prod}
spec: {address: 10.0.0.2, serviceAccount: db, labels: {app: db}, ports: {tcp-pg: 5432}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: tool, namespace: dev}
spec: {address: 10.0.1.1, serviceAccount: tool, labels: {app: tool}, ports: {http: 8080, admin: 9000}}
"#;

const WEB: &str = "spiffe://cluster.local/ns/prod/sa/web";
const TOOL: &str = "spiffe://cluster.local/ns/dev/sa/tool";
const NONE: &str = "none";

fn snapshot(policies: &str) -> MeshSnapshot {
    MeshSnapshot::from_sources(
        Some(("mesh.yaml", MESH)),
        &[
            ("workloads.yaml".into(), WORKLOADS.into()),
            ("policies.yaml".into(), policies.into()),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Every grant's witness is allowed by `authz check`, from the cell's source.
fn assert_witnesses_allowed(snap: &MeshSnapshot, m: &Matrix) {
    for c in m.cells() {
        for g in &c.outcome.grants {
            let w = Matrix::witness(&c, g);
            let d = snap.check(&w).unwrap();
            assert!(
                d.allowed,
                "witness of {} -> {}:{} ({}) is denied: {}\n{w:?}",
                c.source.id, c.destination.workload, c.destination.port, g.rule, d.reason
            );
        }
    }
}

struct Case {
    name: &'static str,
    policies: &'static str,
    /// (source, workload, port, verdict, substring of the reason)
    expect: &'static [(&'static str, &'static str, u16, Reachability, &'static str)],
}

use Reachability::{Always, Conditional, Denied};

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "no policy allows everything",
            policies: "",
            expect: &[
                (NONE, "prod/web", 8080, Always, "no ALLOW policy applies"),
                (TOOL, "prod/db", 5432, Always, "every connection"),
            ],
        },
        Case {
            name: "STRICT refuses plaintext, PERMISSIVE port admits it",
            policies: concat!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: prod}\nspec: {mtls: {mode: STRICT}}\n",
                "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: web, namespace: prod}\nspec:\n  selector: {matchLabels: {app: web}}\n  portLevelMtls: {8080: {mode: PERMISSIVE}}\n"
            ),
            expect: &[
                (NONE, "prod/db", 5432, Denied, "requires mTLS"),
                (TOOL, "prod/db", 5432, Always, ""),
                (NONE, "prod/web", 8080, Always, ""),
            ],
        },
        Case {
            name: "unconditional DENY by namespace",
            policies: "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-dev, namespace: prod}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {namespaces: [dev]}}]\n",
            expect: &[
                (
                    TOOL,
                    "prod/web",
                    8080,
                    Denied,
                    "DENY prod/deny-dev rule[0] matches every request",
                ),
                (WEB, "prod/web", 8080, Always, ""),
                (NONE, "prod/web", 8080, Always, ""),
            ],
        },
        Case {
            name: "conditional DENY on a method",
            policies: "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-delete, namespace: prod}\nspec:\n  action: DENY\n  rules:\n  - to: [{operation: {methods: [DELETE]}}]\n",
            expect: &[
                (
                    WEB,
                    "prod/web",
                    8080,
                    Conditional,
                    "except what DENY prod/no-delete rule[0] matches",
                ),
                // The TCP variant drops the HTTP-only field: the DENY matches every connection.
                (
                    WEB,
                    "prod/db",
                    5432,
                    Denied,
                    "DENY prod/no-delete rule[0] matches every connection",
                ),
            ],
        },
        Case {
            name: "notPaths ALLOW, DENY covering all an ALLOW admits, DENY covering part",
            policies: concat!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: not-admin, namespace: prod}\nspec:\n  selector: {matchLabels: {app: web}}\n  rules:\n  - to: [{operation: {notPaths: [\"/admin*\"]}}]\n",
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: api, namespace: dev}\nspec:\n  rules:\n  - to: [{operation: {paths: [\"/api/*\"], ports: [\"8080\"]}}]\n",
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-api, namespace: dev}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {notNamespaces: [dev]}}]\n    to: [{operation: {paths: [\"/api*\"]}}]\n  - to: [{operation: {paths: [\"/api/private*\"]}}]\n"
            ),
            expect: &[
                (
                    NONE,
                    "prod/web",
                    8080,
                    Conditional,
                    "to[0].operation.notPaths [\"/admin*\"]",
                ),
                (
                    WEB,
                    "dev/tool",
                    8080,
                    Denied,
                    "denied by DENY dev/no-api rule[0]",
                ),
                (
                    TOOL,
                    "dev/tool",
                    8080,
                    Conditional,
                    "to[0].operation.paths [\"/api/*\"]",
                ),
                (
                    TOOL,
                    "dev/tool",
                    9000,
                    Denied,
                    "no ALLOW rule admits this source",
                ),
            ],
        },
        Case {
            name: "requestPrincipals need a RequestAuthentication",
            policies: concat!(
                "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: prod}\nspec:\n  jwtRules:\n  - issuer: https://issuer.example\n    jwks: '{\"keys\":[]}'\n",
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: jwt, namespace: prod}\nspec:\n  rules:\n  - from: [{source: {requestPrincipals: [\"https://issuer.example/*\"]}}]\n",
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: jwt, namespace: dev}\nspec:\n  rules:\n  - from: [{source: {requestPrincipals: [\"*\"]}}]\n"
            ),
            expect: &[
                (NONE, "prod/web", 8080, Conditional, "requestPrincipals"),
                // No RequestAuthentication in dev: tokens are ignored, no request principal.
                (
                    NONE,
                    "dev/tool",
                    8080,
                    Denied,
                    "no ALLOW rule admits this source",
                ),
                (WEB, "prod/db", 5432, Denied, "HTTP-only fields"),
            ],
        },
        Case {
            name: "namespaces, STRICT",
            policies: concat!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: prod}\nspec: {mtls: {mode: STRICT}}\n",
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: same-ns, namespace: prod}\nspec:\n  rules:\n  - from: [{source: {namespaces: [prod]}}]\n"
            ),
            expect: &[
                (
                    WEB,
                    "prod/web",
                    8080,
                    Always,
                    "every request allowed by ALLOW prod/same-ns rule[0]",
                ),
                (TOOL, "prod/web", 8080, Denied, "no ALLOW rule admits"),
                (NONE, "prod/web", 8080, Denied, "requires mTLS"),
                (
                    "spiffe://cluster.local/ns/prod/sa/extra",
                    "prod/db",
                    5432,
                    Always,
                    "",
                ),
            ],
        },
        Case {
            name: "DISABLE ignores the caller's identity",
            policies: concat!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: tool, namespace: dev}\nspec:\n  selector: {matchLabels: {app: tool}}\n  portLevelMtls: {9000: {mode: DISABLE}}\n",
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-only, namespace: dev}\nspec:\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/prod/sa/web]}}]\n"
            ),
            expect: &[
                (WEB, "dev/tool", 8080, Always, ""),
                (WEB, "dev/tool", 9000, Denied, "port 9000 is DISABLE"),
            ],
        },
        Case {
            name: "ALLOW-nothing",
            policies: "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: prod}\nspec: {}\n",
            expect: &[
                (
                    WEB,
                    "prod/web",
                    8080,
                    Denied,
                    "prod/allow-nothing has no rules",
                ),
                (NONE, "dev/tool", 8080, Always, ""),
            ],
        },
        Case {
            name: "dry run does not decide",
            policies: "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: trial, namespace: prod, annotations: {istio.io/dry-run: \"true\"}}\nspec:\n  action: DENY\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n",
            expect: &[(WEB, "prod/web", 8080, Always, "")],
        },
        Case {
            name: "CUSTOM depends on the external authorizer",
            policies: "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: dev}\nspec:\n  action: CUSTOM\n  provider: {name: ext}\n  rules:\n  - to: [{operation: {paths: [\"/secure*\"]}}]\n",
            expect: &[(
                WEB,
                "dev/tool",
                8080,
                Conditional,
                "external authorizer of CUSTOM dev/ext rule[0]",
            )],
        },
        Case {
            name: "source IPs and headers",
            policies: concat!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: office, namespace: prod}\nspec:\n  selector: {matchLabels: {app: web}}\n  rules:\n  - from: [{source: {ipBlocks: [10.1.0.0/16]}}]\n    when: [{key: \"request.headers[x-team]\", values: [\"ops-*\"]}]\n",
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: not-lab, namespace: prod}\nspec:\n  action: DENY\n  selector: {matchLabels: {app: web}}\n  rules:\n  - from: [{source: {ipBlocks: [10.1.0.0/24]}}]\n"
            ),
            expect: &[(
                NONE,
                "prod/web",
                8080,
                Conditional,
                "from[0].source.ipBlocks [\"10.1.0.0/16\"] and request.headers[x-team] values [\"ops-*\"]",
            )],
        },
    ]
}

#[test]
fn table() {
    for case in cases() {
        let snap = snapshot(case.policies);
        let m = Matrix::compute(
            &snap,
            &MatrixOptions {
                identities: vec!["spiffe://cluster.local/ns/prod/sa/extra".into()],
            },
        )
        .unwrap();
        assert_witnesses_allowed(&snap, &m);
        for (src, wl, port, verdict, reason) in case.expect {
            let c = m
                .find(src, wl, *port)
                .unwrap_or_else(|| panic!("{}: no cell {src} -> {wl}:{port}", case.name));
            assert_eq!(
                c.outcome.reachability, *verdict,
                "{}: {src} -> {wl}:{port}: {}",
                case.name, c.outcome.reason
            );
            assert!(
                c.outcome.reason.contains(reason),
                "{}: {src} -> {wl}:{port}: reason {:?} lacks {reason:?}",
                case.name,
                c.outcome.reason
            );
        }
    }
}

#[test]
fn witnesses_avoid_deny_constants_and_follow_the_rule() {
    let snap = snapshot(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-delete, namespace: prod}\nspec:\n  action: DENY\n  rules:\n  - to: [{operation: {methods: [GET, DELETE]}}]\n",
    );
    let m = Matrix::compute(&snap, &MatrixOptions::default()).unwrap();
    let c = m.find(WEB, "prod/web", 8080).unwrap();
    let w = Matrix::witness(&c, &c.outcome.grants[0]);
    let method = &w.http.as_ref().unwrap().method;
    assert!(method != "GET" && method != "DELETE", "{method}");
    assert_eq!(c.outcome.restrictions[0].rule, "prod/no-delete rule[0]");
    assert_eq!(w.source.as_ref().unwrap().principal.as_deref(), Some(WEB));

    // A JWT witness carries an accepted issuer and a subject the rule names.
    let snap = snapshot(concat!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: prod}\nspec:\n  jwtRules:\n  - issuer: https://issuer.example\n    audiences: [web]\n    jwks: '{\"keys\":[]}'\n",
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: jwt, namespace: prod}\nspec:\n  rules:\n  - from: [{source: {requestPrincipals: [\"https://issuer.example/alice\"]}}]\n    when: [{key: \"request.auth.claims[groups]\", values: [admins]}]\n",
    ));
    let m = Matrix::compute(&snap, &MatrixOptions::default()).unwrap();
    assert_witnesses_allowed(&snap, &m);
    let c = m.find(NONE, "prod/web", 8080).unwrap();
    assert_eq!(c.outcome.reachability, Conditional, "{}", c.outcome.reason);
    let jwt = c.outcome.grants[0].witness.jwt.as_ref().unwrap();
    assert_eq!(jwt["sub"], "alice");
    assert_eq!(jwt["groups"], "admins");
}

#[test]
fn dry_run_and_sniffed_ports_are_reported() {
    let snap = snapshot(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: trial, namespace: dev, annotations: {istio.io/dry-run: \"true\"}}\nspec:\n  action: DENY\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: get-only, namespace: dev}\nspec:\n  rules:\n  - to: [{operation: {methods: [GET, POST]}}]\n",
    );
    let m = Matrix::compute(&snap, &MatrixOptions::default()).unwrap();
    let c = m.find(WEB, "dev/tool", 8080).unwrap();
    assert_eq!(c.outcome.dry_run, ["dev/trial (DENY)"]);
    assert_eq!(c.outcome.reachability, Conditional);
    let g = &c.outcome.grants[0];
    if g.witness.http.as_ref().unwrap().method == "GET" {
        assert_eq!(g.dry_run_would_deny, ["dev/trial"]);
    }
    // Port 9000 is named `admin`: undeclared, sniffed. HTTP requests can be allowed, TCP
    // connections cannot (the ALLOW rule uses methods).
    let c = m.find(WEB, "dev/tool", 9000).unwrap();
    assert_eq!(c.destination.traffic, TrafficClass::Sniffed);
    assert_eq!(c.outcome.reachability, Conditional);
    assert!(
        c.outcome.reason.starts_with("HTTP: "),
        "{}",
        c.outcome.reason
    );
    assert!(
        c.outcome
            .grants
            .iter()
            .all(|g| g.traffic == Some(TrafficClass::Http))
    );
}

#[test]
fn identities_are_checked_and_sources_deduplicated() {
    let snap = snapshot("");
    let err = Matrix::compute(
        &snap,
        &MatrixOptions {
            identities: vec!["cluster.local/ns/a/sa/b".into()],
        },
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("--identity \"cluster.local/ns/a/sa/b\": expected a SPIFFE ID"),
        "{err}"
    );
    let m = Matrix::compute(
        &snap,
        &MatrixOptions {
            identities: vec![WEB.into(), "spiffe://other.td/ns/x/sa/y".into()],
        },
    )
    .unwrap();
    let ids: Vec<&str> = m.sources.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "spiffe://cluster.local/ns/dev/sa/tool",
            "spiffe://cluster.local/ns/prod/sa/db",
            WEB,
            "spiffe://other.td/ns/x/sa/y",
            NONE
        ]
    );
    assert_eq!(m.destinations.len(), 4);
    let dot = m.to_dot();
    assert!(
        dot.contains("\"prod/web\" -> \"dev/tool\" [label=\"8080,9000\"];"),
        "{dot}"
    );
    let table = m.to_table();
    assert!(table.lines().count() == 1 + 5 * 4, "{table}");
}

// ---------------------------------------------------------------------------------------------
// Property: the matrix against the engine on random meshes and random requests
// ---------------------------------------------------------------------------------------------

mod property {
    use super::*;
    use proptest::prelude::*;

    const NAMESPACES: [&str; 2] = ["a", "b"];
    const SAS: [&str; 2] = ["x", "y"];
    const METHODS: [&str; 3] = ["GET", "POST", "DELETE"];
    const PATHS: [&str; 5] = ["/p", "/p/q", "/r", "/p*", "*q"];
    const HEADERS: [&str; 2] = ["v1", "v*"];
    const NETS: [&str; 2] = ["10.0.0.0/8", "10.1.0.0/16"];

    #[derive(Debug, Clone)]
    struct RandRule {
        action: u8,
        dry_run: bool,
        selector: Option<usize>,
        namespace: usize,
        principals: Vec<(usize, usize)>,
        not_principals: Vec<(usize, usize)>,
        namespaces: Vec<usize>,
        not_namespaces: Vec<usize>,
        methods: Vec<usize>,
        not_methods: Vec<usize>,
        paths: Vec<usize>,
        not_paths: Vec<usize>,
        ports: Vec<u16>,
        ip_blocks: Vec<usize>,
        not_ip_blocks: Vec<usize>,
        header: Option<(bool, usize)>,
        request_principals: Vec<usize>,
        empty: bool,
    }

    fn idx(n: usize, max: usize) -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(0..n, 0..=max)
    }

    fn rule() -> impl Strategy<Value = RandRule> {
        (
            (
                0u8..3,
                prop::bool::weighted(0.15),
                prop::option::of(0usize..2),
                0usize..2,
            ),
            (
                prop::collection::vec((0usize..2, 0usize..2), 0..=1),
                prop::collection::vec((0usize..2, 0usize..2), 0..=1),
                idx(2, 1),
                idx(2, 1),
            ),
            (idx(3, 2), idx(3, 1), idx(5, 2), idx(5, 1)),
            (
                prop::collection::vec(prop::sample::select(vec![80u16, 81]), 0..=1),
                idx(2, 1),
                idx(2, 1),
                prop::option::of((any::<bool>(), 0usize..2)),
                idx(2, 1),
                prop::bool::weighted(0.1),
            ),
        )
            .prop_map(|(a, s, o, m)| RandRule {
                action: a.0,
                dry_run: a.1,
                selector: a.2,
                namespace: a.3,
                principals: s.0,
                not_principals: s.1,
                namespaces: s.2,
                not_namespaces: s.3,
                methods: o.0,
                not_methods: o.1,
                paths: o.2,
                not_paths: o.3,
                ports: m.0,
                ip_blocks: m.1,
                not_ip_blocks: m.2,
                header: m.3,
                request_principals: m.4,
                empty: m.5,
            })
    }

    fn q(v: &str) -> String {
        format!("\"{v}\"")
    }

    fn yaml_list<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
        format!("[{}]", items.iter().map(f).collect::<Vec<_>>().join(", "))
    }

    fn policy_yaml(i: usize, r: &RandRule) -> String {
        let action = ["ALLOW", "DENY", "AUDIT"][r.action as usize];
        let mut s = format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p{i}\n  namespace: {}\n",
            NAMESPACES[r.namespace]
        );
        if r.dry_run && r.action < 2 {
            s.push_str("  annotations: {istio.io/dry-run: \"true\"}\n");
        }
        s.push_str(&format!("spec:\n  action: {action}\n"));
        if let Some(sel) = r.selector {
            s.push_str(&format!("  selector: {{matchLabels: {{app: w{sel}}}}}\n"));
        }
        if r.empty && r.action == 0 {
            return s;
        }
        let mut src = Vec::new();
        let principal = |&(n, a): &(usize, usize)| {
            q(&format!("cluster.local/ns/{}/sa/{}", NAMESPACES[n], SAS[a]))
        };
        if !r.principals.is_empty() {
            src.push(format!(
                "principals: {}",
                yaml_list(&r.principals, principal)
            ));
        }
        if !r.not_principals.is_empty() {
            src.push(format!(
                "notPrincipals: {}",
                yaml_list(&r.not_principals, principal)
            ));
        }
        if !r.namespaces.is_empty() {
            src.push(format!(
                "namespaces: {}",
                yaml_list(&r.namespaces, |n| q(NAMESPACES[*n]))
            ));
        }
        if !r.not_namespaces.is_empty() {
            src.push(format!(
                "notNamespaces: {}",
                yaml_list(&r.not_namespaces, |n| q(NAMESPACES[*n]))
            ));
        }
        if !r.ip_blocks.is_empty() {
            src.push(format!(
                "ipBlocks: {}",
                yaml_list(&r.ip_blocks, |n| q(NETS[*n]))
            ));
        }
        if !r.not_ip_blocks.is_empty() {
            src.push(format!(
                "notIpBlocks: {}",
                yaml_list(&r.not_ip_blocks, |n| q(NETS[*n]))
            ));
        }
        if !r.request_principals.is_empty() {
            let rp = ["https://iss/alice", "*"];
            src.push(format!(
                "requestPrincipals: {}",
                yaml_list(&r.request_principals, |n| q(rp[*n]))
            ));
        }
        let mut op = Vec::new();
        if !r.methods.is_empty() {
            op.push(format!(
                "methods: {}",
                yaml_list(&r.methods, |n| q(METHODS[*n]))
            ));
        }
        if !r.not_methods.is_empty() {
            op.push(format!(
                "notMethods: {}",
                yaml_list(&r.not_methods, |n| q(METHODS[*n]))
            ));
        }
        if !r.paths.is_empty() {
            op.push(format!("paths: {}", yaml_list(&r.paths, |n| q(PATHS[*n]))));
        }
        if !r.not_paths.is_empty() {
            op.push(format!(
                "notPaths: {}",
                yaml_list(&r.not_paths, |n| q(PATHS[*n]))
            ));
        }
        if !r.ports.is_empty() {
            op.push(format!(
                "ports: {}",
                yaml_list(&r.ports, |p| q(&p.to_string()))
            ));
        }
        let mut rule = String::from("  - {");
        let mut parts = Vec::new();
        if !src.is_empty() {
            parts.push(format!("from: [{{source: {{{}}}}}]", src.join(", ")));
        }
        if !op.is_empty() {
            parts.push(format!("to: [{{operation: {{{}}}}}]", op.join(", ")));
        }
        if let Some((neg, h)) = r.header {
            let key = if neg { "notValues" } else { "values" };
            parts.push(format!(
                "when: [{{key: \"request.headers[x-h]\", {key}: [{}]}}]",
                q(HEADERS[h])
            ));
        }
        if parts.is_empty() {
            // DENY/AUDIT rules need something; an empty rule matches everything.
            parts.push("to: [{operation: {ports: [\"80\", \"81\"]}}]".into());
        }
        rule.push_str(&parts.join(", "));
        rule.push_str("}\n");
        s.push_str("  rules:\n");
        s.push_str(&rule);
        s
    }

    #[derive(Debug, Clone)]
    struct RandRequest {
        source: Option<(usize, usize)>,
        workload: usize,
        port: u16,
        method: usize,
        path: &'static str,
        header: Option<&'static str>,
        ip: &'static str,
        jwt_sub: Option<&'static str>,
    }

    fn request() -> impl Strategy<Value = RandRequest> {
        (
            prop::option::of((0usize..2, 0usize..2)),
            0usize..3,
            prop::sample::select(vec![80u16, 81]),
            0usize..3,
            prop::sample::select(vec!["/p", "/p/q", "/r", "/pq", "/x/q", "/"]),
            prop::option::of(prop::sample::select(vec!["v1", "v2", "w"])),
            prop::sample::select(vec!["10.1.2.3", "10.2.0.1", "192.168.0.1"]),
            prop::option::of(prop::sample::select(vec!["alice", "bob"])),
        )
            .prop_map(
                |(source, workload, port, method, path, header, ip, jwt_sub)| RandRequest {
                    source,
                    workload,
                    port,
                    method,
                    path,
                    header,
                    ip,
                    jwt_sub,
                },
            )
    }

    /// Three workloads: w0 (ns a, sa x, http 80 + tcp 81), w1 (ns a, sa y), w2 (ns b, sa x);
    /// a STRICT or PERMISSIVE namespace, a RequestAuthentication in `a`.
    fn mesh_yaml(mode_a: u8, rules: &[RandRule]) -> String {
        let mut s = String::new();
        for (i, (ns, sa)) in [(0, 0), (0, 1), (1, 0)].iter().enumerate() {
            s.push_str(&format!(
                "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: w{i}, namespace: {}}}\nspec: {{address: 10.9.0.{i}, serviceAccount: {}, labels: {{app: w{i}}}, ports: {{http: 80, tcp-x: 81}}}}\n",
                NAMESPACES[*ns], SAS[*sa]
            ));
        }
        if let Some(mode) = ["STRICT", "DISABLE"].get(usize::from(mode_a)) {
            s.push_str(&format!("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: a}}\nspec: {{mtls: {{mode: {mode}}}}}\n"));
        }
        s.push_str("---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: a}\nspec:\n  jwtRules:\n  - issuer: https://iss\n    jwks: '{\"keys\":[]}'\n");
        for (i, r) in rules.iter().enumerate() {
            s.push_str(&policy_yaml(i, r));
        }
        s
    }

    fn spec(r: &RandRequest) -> RequestSpec {
        let http = r.port == 80;
        RequestSpec {
            workload: format!("{}/w{}", NAMESPACES[[0, 0, 1][r.workload]], r.workload),
            port: r.port,
            destination_ip: None,
            source: Some(SourceSpec {
                principal: r.source.map(|(n, a)| {
                    format!("spiffe://cluster.local/ns/{}/sa/{}", NAMESPACES[n], SAS[a])
                }),
                ip: Some(r.ip.parse().unwrap()),
            }),
            remote_ip: None,
            sni: None,
            http: http.then(|| HttpSpec {
                method: METHODS[r.method].into(),
                path: r.path.into(),
                host: "h".into(),
                headers: r
                    .header
                    .map(|v| ("x-h".to_owned(), HeaderValues::One(v.into())))
                    .into_iter()
                    .collect(),
            }),
            jwt: r
                .jwt_sub
                .filter(|_| http)
                .map(|s| serde_json::json!({"iss": "https://iss", "sub": s})),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn matrix_agrees_with_the_engine(
            mode in 0u8..3,
            rules in prop::collection::vec(rule(), 0..6),
            requests in prop::collection::vec(request(), 24),
        ) {
            let text = mesh_yaml(mode, &rules);
            let snap = match MeshSnapshot::from_sources(
                Some(("mesh.yaml", "trustDomain: cluster.local\n")),
                &[("m.yaml".into(), text.clone())],
            ) {
                Ok(s) => s,
                // A random combination the webhook refuses: nothing to compare.
                Err(_) => return Ok(()),
            };
            let identities = NAMESPACES
                .iter()
                .flat_map(|n| SAS.iter().map(move |a| format!("spiffe://cluster.local/ns/{n}/sa/{a}")))
                .collect();
            let m = Matrix::compute(&snap, &MatrixOptions { identities }).unwrap();
            // Every witness is allowed by the engine.
            for c in m.cells() {
                prop_assert_eq!(
                    c.outcome.grants.is_empty(),
                    c.outcome.reachability == Reachability::Denied
                );
                for g in &c.outcome.grants {
                    let d = snap.check(&Matrix::witness(&c, g)).unwrap();
                    prop_assert!(d.allowed, "witness denied: {}\n{}", d.reason, text);
                }
            }
            // A request the engine allows lies in a cell that can be allowed; an `always` cell
            // allows every sampled request.
            for r in &requests {
                let spec = spec(r);
                let d = snap.check(&spec).unwrap();
                let src = spec
                    .source
                    .as_ref()
                    .and_then(|s| s.principal.clone())
                    .unwrap_or_else(|| "none".into());
                let c = m.find(&src, &spec.workload, spec.port).unwrap();
                if d.allowed {
                    prop_assert!(
                        c.outcome.reachability != Reachability::Denied,
                        "engine allows {:?} but the matrix says denied: {}\n{}",
                        spec, c.outcome.reason, text
                    );
                }
                if c.outcome.reachability == Reachability::Always {
                    prop_assert!(d.allowed, "always, yet {:?} is denied: {}\n{}", spec, d.reason, text);
                }
            }
        }
    }
}
