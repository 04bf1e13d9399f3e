//! Property tests: adding a DENY policy never allows more; dry-run policies never change a
//! decision; the rule index never changes a decision; path normalization is idempotent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use palisade_policy::api::*;
use palisade_policy::normalize::{PathNormalization, normalize_path};
use palisade_policy::{MeshConfig, MeshSnapshot, RequestSpec};
use proptest::prelude::*;

const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/a/sa/x",
    "cluster.local/ns/b/sa/y",
    "cluster.local/ns/a/sa/*",
    "*",
    "*/sa/y",
];
const NAMESPACES: &[&str] = &["a", "b", "c*", "*"];
const IPS: &[&str] = &["10.0.0.0/8", "10.1.0.0/16", "192.168.0.1"];
const PATHS: &[&str] = &["/a", "/a/*", "/b", "*/x", "/{*}/x", "*"];
const METHODS: &[&str] = &["GET", "POST", "P*"];
const PORTS: &[&str] = &["80", "90"];
const HOSTS: &[&str] = &["h.com", "*.com", "h.com:80"];

fn pick(list: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    prop::sample::subsequence(list, 1..=2).prop_map(|v| v.into_iter().map(str::to_owned).collect())
}

fn opt_pick(list: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    prop_oneof![3 => Just(Vec::new()), 1 => pick(list)]
}

fn source() -> impl Strategy<Value = Source> {
    (
        opt_pick(PRINCIPALS),
        opt_pick(PRINCIPALS),
        opt_pick(NAMESPACES),
        opt_pick(IPS),
        opt_pick(IPS),
    )
        .prop_map(
            |(principals, not_principals, namespaces, ip_blocks, not_ip_blocks)| Source {
                principals,
                not_principals,
                namespaces,
                ip_blocks,
                not_ip_blocks,
                ..Default::default()
            },
        )
        .prop_filter("a source must not be empty", |s| !s.is_empty())
}

fn operation() -> impl Strategy<Value = Operation> {
    (
        opt_pick(PATHS),
        opt_pick(PATHS),
        opt_pick(METHODS),
        opt_pick(PORTS),
        opt_pick(HOSTS),
    )
        .prop_map(|(paths, not_paths, methods, ports, hosts)| Operation {
            paths,
            not_paths,
            methods,
            ports,
            hosts,
            ..Default::default()
        })
        .prop_filter("an operation must not be empty", |o| !o.is_empty())
}

fn condition() -> impl Strategy<Value = Condition> {
    prop_oneof![
        pick(&["1", "2", "*"]).prop_map(|values| Condition {
            key: "request.headers[x-a]".into(),
            values,
            not_values: vec![],
        }),
        pick(&["a", "b"]).prop_map(|not_values| Condition {
            key: "source.namespace".into(),
            values: vec![],
            not_values,
        }),
        pick(&["80", "90"]).prop_map(|values| Condition {
            key: "destination.port".into(),
            values,
            not_values: vec![],
        }),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::option::of(prop::collection::vec(source(), 1..=2)),
        prop::option::of(prop::collection::vec(operation(), 1..=2)),
        prop::option::of(prop::collection::vec(condition(), 1..=2)),
    )
        .prop_map(|(from, to, when)| Rule {
            from: from.map(|v| {
                v.into_iter()
                    .map(|s| RuleFrom { source: Some(s) })
                    .collect()
            }),
            to: to.map(|v| {
                v.into_iter()
                    .map(|o| RuleTo { operation: Some(o) })
                    .collect()
            }),
            when,
        })
}

fn policy(
    name: String,
    action: AuthzAction,
    dry_run: bool,
) -> impl Strategy<Value = AuthorizationPolicy> {
    let rules = match action {
        // ALLOW may have no rules at all (allow-nothing); DENY must have some.
        AuthzAction::Allow => prop::option::of(prop::collection::vec(rule(), 0..=3)).boxed(),
        _ => prop::collection::vec(rule(), 1..=3).prop_map(Some).boxed(),
    };
    rules.prop_map(move |rules| {
        let mut annotations = BTreeMap::new();
        if dry_run {
            annotations.insert(DRY_RUN_ANNOTATION.to_owned(), "true".to_owned());
        }
        AuthorizationPolicy {
            api_version: "security.istio.io/v1".into(),
            kind: "AuthorizationPolicy".into(),
            metadata: ObjectMeta {
                name: name.clone(),
                namespace: Some("foo".into()),
                annotations,
                ..Default::default()
            },
            spec: AuthorizationPolicySpec {
                action: Some(action),
                rules,
                ..Default::default()
            },
        }
    })
}

fn policies() -> impl Strategy<Value = Vec<AuthorizationPolicy>> {
    prop::collection::vec(any::<bool>(), 0..=4).prop_flat_map(|kinds| {
        kinds
            .into_iter()
            .enumerate()
            .map(|(i, deny)| {
                let action = if deny {
                    AuthzAction::Deny
                } else {
                    AuthzAction::Allow
                };
                policy(format!("p{i}"), action, false)
            })
            .collect::<Vec<_>>()
    })
}

fn request() -> impl Strategy<Value = RequestSpec> {
    (
        prop::option::of(prop::sample::select(vec![
            "cluster.local/ns/a/sa/x",
            "cluster.local/ns/b/sa/y",
            "other/ns/c1/sa/z",
        ])),
        prop::sample::select(vec!["10.1.2.3", "10.9.9.9", "192.168.0.1", "172.16.0.1"]),
        prop::sample::select(vec![80u16, 90, 100]),
        prop::option::of((
            prop::sample::select(vec!["GET", "POST", "PUT"]),
            prop::sample::select(vec!["/a", "/a/b", "/b", "/q/x", "/a/../b", "//a"]),
            prop::sample::select(vec!["h.com", "x.com", "h.com:80"]),
            prop::option::of(prop::sample::select(vec!["1", "2", "3"])),
        )),
    )
        .prop_map(|(principal, ip, port, http)| {
            let mut v = serde_json::json!({
                "workload": "foo/httpbin",
                "port": port,
                "source": {"ip": ip},
            });
            if let Some(p) = principal {
                v["source"]["principal"] = p.into();
            }
            if let Some((method, path, host, header)) = http {
                v["http"] = serde_json::json!({"method": method, "path": path, "host": host});
                if let Some(h) = header {
                    v["http"]["headers"] = serde_json::json!({"x-a": h});
                }
            }
            serde_json::from_value(v).unwrap()
        })
}

fn workload() -> Resource {
    Resource::WorkloadEntry(WorkloadEntry {
        api_version: "networking.istio.io/v1".into(),
        kind: "WorkloadEntry".into(),
        metadata: ObjectMeta {
            name: "httpbin".into(),
            namespace: Some("foo".into()),
            ..Default::default()
        },
        spec: WorkloadEntrySpec {
            address: "10.0.0.10".into(),
            labels: [("app".to_owned(), "httpbin".to_owned())].into(),
            ..Default::default()
        },
    })
}

fn snapshot(policies: &[AuthorizationPolicy]) -> MeshSnapshot {
    let mut resources = vec![workload()];
    resources.extend(policies.iter().cloned().map(Resource::AuthorizationPolicy));
    MeshSnapshot::from_resources(MeshConfig::default(), resources).unwrap()
}

/// (allowed, action, policy) of a decision.
fn decide(snap: &MeshSnapshot, req: &RequestSpec) -> (bool, String, Option<String>) {
    let compiled = snap.compile_workload(&req.workload).unwrap();
    let ctx = req.context();
    let fast = compiled.evaluate(&ctx).unwrap();
    let slow = compiled.evaluate_unindexed(&ctx).unwrap();
    assert_eq!(fast, slow, "the index changed a decision");
    let d = snap.check(req).unwrap();
    assert_eq!(
        (d.allowed, d.policy.as_deref()),
        (fast.allowed, fast.policy)
    );
    (d.allowed, d.action.as_str().to_owned(), d.policy)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn adding_a_deny_never_allows_more(base in policies(), extra in policy("zz-extra".into(), AuthzAction::Deny, false), req in request()) {
        let before = decide(&snapshot(&base), &req);
        let mut with = base.clone();
        with.push(extra);
        let after = decide(&snapshot(&with), &req);
        prop_assert!(!after.0 || before.0, "a DENY policy allowed more: {before:?} -> {after:?}");
        if before.0 && !after.0 {
            prop_assert_eq!(after.1, "DENY");
        }
    }

    #[test]
    fn dry_run_policies_never_change_a_decision(
        base in policies(),
        dry in prop_oneof![
            policy("dry".into(), AuthzAction::Deny, true),
            policy("dry".into(), AuthzAction::Allow, true),
        ],
        req in request(),
    ) {
        let before = decide(&snapshot(&base), &req);
        let mut with = base.clone();
        with.push(dry);
        let after = decide(&snapshot(&with), &req);
        prop_assert_eq!(before, after);
    }

    #[test]
    fn normalization_is_idempotent(
        parts in prop::collection::vec(
            prop::sample::select(vec!["/", "a", "b", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", "%41", "%25", "//", "?q=/..", "~", "%7e"]),
            0..12,
        ),
        mode in prop::sample::select(vec![
            PathNormalization::None,
            PathNormalization::Base,
            PathNormalization::MergeSlashes,
            PathNormalization::DecodeAndMergeSlashes,
        ]),
    ) {
        let path = format!("/{}", parts.concat());
        if let Ok(once) = normalize_path(&path, mode) {
            let twice = normalize_path(&once, mode).unwrap();
            prop_assert_eq!(&twice, &once, "{} -> {} -> {}", path, once, twice);
            if mode != PathNormalization::None {
                prop_assert!(!once.contains("/./") && !once.contains("/../"), "{}", once);
            }
        }
    }

    #[test]
    fn hostile_paths_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let s = String::from_utf8_lossy(&bytes);
        for mode in [PathNormalization::None, PathNormalization::Base, PathNormalization::MergeSlashes, PathNormalization::DecodeAndMergeSlashes] {
            let _ = normalize_path(&s, mode);
            let _ = normalize_path(&format!("/{s}"), mode);
        }
    }
}
