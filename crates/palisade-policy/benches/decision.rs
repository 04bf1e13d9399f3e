//! One authorization decision on a workload with 10, 1,000 and 10,000 policies mixing principal,
//! path, CIDR and port rules (ALLOW and DENY). Goal: under 1 µs median at 1,000 policies and
//! cost growing sublinearly with the number of policies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use palisade_policy::api::*;
use palisade_policy::eval::{HttpAttributes, RequestContext};
use palisade_policy::{CompiledPolicy, MeshConfig, MeshSnapshot};

fn policy(i: usize) -> AuthorizationPolicy {
    let s = |v: &str| vec![v.to_owned()];
    let (action, rule) = match i % 5 {
        // ALLOW by exact peer principal, GET only.
        0 => (
            AuthzAction::Allow,
            Rule {
                from: Some(vec![RuleFrom {
                    source: Some(Source {
                        principals: s(&format!("cluster.local/ns/ns{i}/sa/sa{i}")),
                        ..Default::default()
                    }),
                }]),
                to: Some(vec![RuleTo {
                    operation: Some(Operation {
                        methods: vec!["GET".into(), "HEAD".into()],
                        ..Default::default()
                    }),
                }]),
                when: None,
            },
        ),
        // ALLOW by path prefix and method.
        1 => (
            AuthzAction::Allow,
            Rule {
                from: None,
                to: Some(vec![RuleTo {
                    operation: Some(Operation {
                        paths: vec![format!("/svc{i}/*"), format!("/svc{i}")],
                        methods: s("POST"),
                        ..Default::default()
                    }),
                }]),
                when: None,
            },
        ),
        // ALLOW by source CIDR, with a header condition.
        2 => (
            AuthzAction::Allow,
            Rule {
                from: Some(vec![RuleFrom {
                    source: Some(Source {
                        ip_blocks: s(&format!("10.{}.{}.0/24", (i / 256) % 256, i % 256)),
                        ..Default::default()
                    }),
                }]),
                to: None,
                when: Some(vec![Condition {
                    key: "request.headers[x-tenant]".into(),
                    values: s(&format!("tenant-{i}")),
                    not_values: vec![],
                }]),
            },
        ),
        // DENY an exact admin path.
        3 => (
            AuthzAction::Deny,
            Rule {
                from: None,
                to: Some(vec![RuleTo {
                    operation: Some(Operation {
                        paths: s(&format!("/admin{i}")),
                        ..Default::default()
                    }),
                }]),
                when: None,
            },
        ),
        // DENY a namespace on a port.
        _ => (
            AuthzAction::Deny,
            Rule {
                from: Some(vec![RuleFrom {
                    source: Some(Source {
                        namespaces: s(&format!("blocked{i}")),
                        ..Default::default()
                    }),
                }]),
                to: Some(vec![RuleTo {
                    operation: Some(Operation {
                        ports: s("8080"),
                        ..Default::default()
                    }),
                }]),
                when: None,
            },
        ),
    };
    AuthorizationPolicy {
        api_version: "security.istio.io/v1".into(),
        kind: "AuthorizationPolicy".into(),
        metadata: ObjectMeta {
            name: format!("policy-{i:05}"),
            namespace: Some("foo".into()),
            ..Default::default()
        },
        spec: AuthorizationPolicySpec {
            selector: Some(WorkloadSelector {
                match_labels: BTreeMap::from([("app".to_owned(), "httpbin".to_owned())]),
            }),
            action: Some(action),
            rules: Some(vec![rule]),
            ..Default::default()
        },
    }
}

fn compiled(n: usize) -> CompiledPolicy {
    let mut resources = vec![Resource::WorkloadEntry(WorkloadEntry {
        api_version: "networking.istio.io/v1".into(),
        kind: "WorkloadEntry".into(),
        metadata: ObjectMeta {
            name: "httpbin".into(),
            namespace: Some("foo".into()),
            ..Default::default()
        },
        spec: WorkloadEntrySpec {
            address: "10.0.0.10".into(),
            labels: BTreeMap::from([("app".to_owned(), "httpbin".to_owned())]),
            ..Default::default()
        },
    })];
    resources.extend((0..n).map(|i| Resource::AuthorizationPolicy(policy(i))));
    let snap = MeshSnapshot::from_resources(MeshConfig::default(), resources).unwrap();
    let c = snap.compile_workload("foo/httpbin").unwrap();
    assert_eq!(c.policies().len(), n);
    c
}

fn bench(c: &mut Criterion) {
    let headers: [(&str, &str); 2] = [("x-tenant", "tenant-7"), ("user-agent", "bench")];
    let mut group = c.benchmark_group("decision");
    for n in [10usize, 1_000, 10_000] {
        let policy = compiled(n);
        // A peer allowed by an exact-principal policy in the middle of the set.
        let target = (n / 2) / 5 * 5;
        let principal = format!("cluster.local/ns/ns{target}/sa/sa{target}");
        let allow_principal = RequestContext {
            port: 8000,
            source_ip: Some(IpAddr::from([192, 168, 1, 1])),
            peer_principal: Some(&principal),
            http: Some(HttpAttributes {
                method: "GET",
                path: "/api/items?page=2",
                host: "httpbin.foo.svc.cluster.local",
                headers: &headers,
            }),
            ..Default::default()
        };
        let v = policy.evaluate(&allow_principal).unwrap();
        assert!(v.allowed && v.policy.is_some(), "{v:?}");
        group.bench_with_input(
            BenchmarkId::new("allow_principal", n),
            &allow_principal,
            |b, req| b.iter(|| black_box(policy.evaluate(black_box(req)).unwrap().allowed)),
        );

        // No policy matches: every index is consulted and the request is denied.
        let stranger = "cluster.local/ns/nowhere/sa/nobody";
        let no_match = RequestContext {
            port: 8000,
            source_ip: Some(IpAddr::from([172, 16, 0, 1])),
            peer_principal: Some(stranger),
            http: Some(HttpAttributes {
                method: "DELETE",
                path: "/nothing/here",
                host: "httpbin",
                headers: &headers,
            }),
            ..Default::default()
        };
        let v = policy.evaluate(&no_match).unwrap();
        assert!(!v.allowed && v.policy.is_none(), "{v:?}");
        group.bench_with_input(BenchmarkId::new("deny_no_match", n), &no_match, |b, req| {
            b.iter(|| black_box(policy.evaluate(black_box(req)).unwrap().allowed))
        });

        // A CIDR + header rule allows.
        let cidr = RequestContext {
            port: 8000,
            source_ip: Some(IpAddr::from([10, 0, 7, 9])),
            http: Some(HttpAttributes {
                method: "PUT",
                path: "/data",
                host: "httpbin",
                headers: &headers,
            }),
            ..Default::default()
        };
        if n > 7 {
            let v = policy.evaluate(&cidr).unwrap();
            assert!(v.allowed, "{v:?}");
        }
        group.bench_with_input(BenchmarkId::new("allow_cidr_header", n), &cidr, |b, req| {
            b.iter(|| black_box(policy.evaluate(black_box(req)).unwrap().allowed))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
