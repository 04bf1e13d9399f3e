//! `palisade authz matrix` at scale: 1,000 workloads in 50 namespaces (1,100 workload ports),
//! 10,000 AuthorizationPolicy rules (a 9-rule ALLOW policy per workload, a 20-rule DENY policy per
//! namespace), 1,001 sources (every service account and "no identity"): 1.1 million cells.
//! Goal: seconds. The mesh is generated in code; only `Matrix::compute` is measured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_policy::{Matrix, MatrixOptions, MeshSnapshot, Reachability};

const WORKLOADS: usize = 1_000;
const PER_NAMESPACE: usize = 20;

fn ns(i: usize) -> usize {
    i / PER_NAMESPACE
}

fn mesh_text() -> String {
    let namespaces = WORKLOADS / PER_NAMESPACE;
    let mut s = String::new();
    for i in 0..WORKLOADS {
        let ports = if i % 10 == 0 {
            "{http: 8080, tcp-db: 5432}"
        } else {
            "{http: 8080}"
        };
        let _ = write!(
            s,
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: w{i}, namespace: ns{}}}\nspec: {{address: 10.{}.{}.{}, serviceAccount: sa{i}, labels: {{app: app{i}}}, ports: {ports}}}\n",
            ns(i),
            i / 65536,
            (i / 256) % 256,
            i % 256
        );
    }
    // Mesh-wide STRICT, one PERMISSIVE namespace.
    s.push_str("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n");
    s.push_str("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: ns0}\nspec: {mtls: {mode: PERMISSIVE}}\n");
    // Per workload: 8 callers by principal (GET on a path prefix), and a neighbouring namespace
    // by namespace (POST): 9 rules.
    for i in 0..WORKLOADS {
        let _ = write!(
            s,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-w{i}, namespace: ns{}}}\nspec:\n  selector: {{matchLabels: {{app: app{i}}}}}\n  rules:\n",
            ns(i)
        );
        for k in 0..8 {
            let caller = (i + 7 * k + 1) % WORKLOADS;
            let _ = write!(
                s,
                "  - from: [{{source: {{principals: [\"cluster.local/ns/ns{}/sa/sa{caller}\"]}}}}]\n    to: [{{operation: {{methods: [GET], paths: [\"/api/v{k}/*\"]}}}}]\n",
                ns(caller)
            );
        }
        let _ = write!(
            s,
            "  - from: [{{source: {{namespaces: [ns{}]}}}}]\n    to: [{{operation: {{methods: [POST]}}}}]\n",
            (ns(i) + 1) % namespaces
        );
    }
    // Per namespace: 20 DENY rules (admin paths, a blocked namespace, a header).
    for n in 0..namespaces {
        let _ = write!(
            s,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny, namespace: ns{n}}}\nspec:\n  action: DENY\n  rules:\n"
        );
        for j in 0..20 {
            match j % 3 {
                0 => {
                    let _ = writeln!(
                        s,
                        "  - to: [{{operation: {{paths: [\"/api/v{}/admin*\"]}}}}]",
                        j % 8
                    );
                }
                1 => {
                    let _ = writeln!(
                        s,
                        "  - from: [{{source: {{namespaces: [ns{}]}}}}]\n    to: [{{operation: {{methods: [DELETE]}}}}]",
                        (n + j) % namespaces
                    );
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "  - when: [{{key: \"request.headers[x-block-{j}]\", values: [\"*\"]}}]"
                    );
                }
            }
        }
    }
    s
}

fn snapshot() -> MeshSnapshot {
    let text = mesh_text();
    MeshSnapshot::from_sources(
        Some(("mesh.yaml", "trustDomain: cluster.local\n")),
        &[("mesh-1000.yaml".into(), text)],
    )
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let snap = snapshot();
    let rules: usize = snap
        .authorization_policies
        .iter()
        .map(|p| p.resource.spec.rules.as_ref().map_or(0, Vec::len))
        .sum();
    assert_eq!((snap.workload_entries.len(), rules), (WORKLOADS, 10_000));
    let options = MatrixOptions::default();
    // One timed run first, with what it produced.
    let start = Instant::now();
    let m = Matrix::compute(&snap, &options).unwrap();
    let took = start.elapsed();
    let cells = m.sources.len() * m.destinations.len();
    let count = |r: Reachability| m.cells().filter(|c| c.outcome.reachability == r).count();
    eprintln!(
        "matrix: {} sources x {} destinations = {cells} cells, {} distinct outcomes, in {took:.2?} \
         (always {}, conditional {}, denied {})",
        m.sources.len(),
        m.destinations.len(),
        m.outcomes.len(),
        count(Reachability::Always),
        count(Reachability::Conditional),
        count(Reachability::Denied),
    );
    let mut group = c.benchmark_group("matrix");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("1000_workloads_10000_rules", |b| {
        b.iter(|| {
            black_box(
                Matrix::compute(black_box(&snap), &options)
                    .unwrap()
                    .outcomes
                    .len(),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
