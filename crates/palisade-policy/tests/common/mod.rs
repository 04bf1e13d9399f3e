//! Shared runner for the table-driven suites: groups of resources with request/expectation cases,
//! written in YAML under `tests/conformance/` (and the Istio test-data cases).

#![allow(dead_code)]

use std::collections::BTreeMap;

use palisade_policy::{MeshSnapshot, RequestSpec};
use serde::Deserialize;
use serde_json::Value;

/// Workloads every group gets, so that cases only write policies.
pub const BASE_WORKLOADS: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: httpbin, namespace: foo}
spec:
  address: 10.0.0.10
  serviceAccount: httpbin
  labels: {app: httpbin, version: v1}
  ports: {http: 8000, tcp-db: 9000, http-admin: 8080}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other, namespace: foo}
spec:
  address: 10.0.0.11
  serviceAccount: other
  labels: {app: other}
  ports: {http: 8000}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web, namespace: bar}
spec:
  address: 10.0.1.10
  serviceAccount: web
  labels: {app: httpbin, version: v1}
  ports: {http: 80}
"#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub group: String,
    /// mesh.yaml text.
    #[serde(default)]
    pub mesh: Option<String>,
    /// A YAML stream of resources.
    #[serde(default)]
    pub resources: String,
    /// Skip the base workloads (when the group defines its own).
    #[serde(default, rename = "noBaseWorkloads")]
    pub no_base_workloads: bool,
    /// For invalid-configuration groups: substrings that must all appear in the load errors.
    #[serde(default, rename = "expectLoadErrors")]
    pub expect_load_errors: Vec<String>,
    #[serde(default)]
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// A request file; `workload` defaults to foo/httpbin and `port` to 8000.
    pub request: Value,
    /// The expected decision: `allowed`, `action` and `policy` (null or an id) are required.
    #[serde(default)]
    pub expect: Option<BTreeMap<String, Value>>,
    /// Instead of a decision: the request is rejected (400) with an error containing this text.
    #[serde(default, rename = "expectRejected")]
    pub expect_rejected: Option<String>,
}

pub fn request(v: &Value) -> RequestSpec {
    let mut v = v.clone();
    if let Value::Object(m) = &mut v {
        m.entry("workload")
            .or_insert_with(|| Value::String("foo/httpbin".into()));
        m.entry("port").or_insert_with(|| Value::from(8000));
    }
    let spec: RequestSpec =
        serde_json::from_value(v).unwrap_or_else(|e| panic!("bad request in case: {e}"));
    spec.check().unwrap();
    spec
}

pub fn snapshot(group: &Group) -> Result<MeshSnapshot, palisade_policy::LoadErrors> {
    let mut files = vec![("resources.yaml".to_string(), group.resources.clone())];
    if !group.no_base_workloads {
        files.push(("workloads.yaml".to_string(), BASE_WORKLOADS.to_string()));
    }
    MeshSnapshot::from_sources(group.mesh.as_deref().map(|m| ("mesh.yaml", m)), &files)
}

/// Runs one group; returns the number of decision cases checked and the failures.
pub fn run_group(file: &str, group: &Group, failures: &mut Vec<String>) -> usize {
    let snap = match snapshot(group) {
        Ok(s) => {
            if !group.expect_load_errors.is_empty() {
                failures.push(format!(
                    "{file} / {}: expected load errors, loaded fine",
                    group.group
                ));
            }
            s
        }
        Err(e) => {
            let text = e.to_string();
            if group.expect_load_errors.is_empty() {
                failures.push(format!("{file} / {}: load failed:\n{text}", group.group));
            }
            for want in &group.expect_load_errors {
                if !text.contains(want.as_str()) {
                    failures.push(format!(
                        "{file} / {}: load errors lack {want:?}:\n{text}",
                        group.group
                    ));
                }
            }
            return 0;
        }
    };
    let mut n = 0;
    for case in &group.cases {
        n += 1;
        let label = format!("{file} / {} / {}", group.group, case.name);
        let spec = request(&case.request);
        let result = snap.check(&spec);
        // The index must never change a decision.
        if let Ok(compiled) = snap.compile_workload(&spec.workload) {
            let ctx = spec.context();
            let fast = compiled.evaluate(&ctx);
            let slow = compiled.evaluate_unindexed(&ctx);
            if fast != slow {
                failures.push(format!("{label}: indexed {fast:?} != unindexed {slow:?}"));
            }
        }
        match (&case.expect, &case.expect_rejected, result) {
            (None, Some(want), Err(e)) => {
                if !e.to_string().contains(want.as_str()) {
                    failures.push(format!("{label}: rejected with {e}, want {want:?}"));
                }
            }
            (None, Some(_), Ok(d)) => failures.push(format!("{label}: want rejection, got {d:?}")),
            (Some(_), _, Err(e)) => failures.push(format!("{label}: error {e}")),
            (Some(_), Some(_), _) => {
                failures.push(format!("{label}: state expect or expectRejected, not both"))
            }
            (Some(exp), None, Ok(d)) => {
                for key in ["allowed", "action", "policy"] {
                    if !exp.contains_key(key) {
                        failures.push(format!("{label}: the case must state `{key}`"));
                    }
                }
                let got = serde_json::to_value(&d).unwrap();
                for (k, want) in exp {
                    match k.as_str() {
                        "reason" => {
                            let want = want.as_str().unwrap_or_default();
                            if !d.reason.contains(want) {
                                failures
                                    .push(format!("{label}: reason {:?} lacks {want:?}", d.reason));
                            }
                        }
                        "trace" => {
                            let want = want.as_str().unwrap_or_default();
                            if !d.trace.iter().any(|t| t.detail.contains(want)) {
                                failures.push(format!(
                                    "{label}: no trace detail contains {want:?}: {}",
                                    serde_json::to_string_pretty(&d.trace).unwrap()
                                ));
                            }
                        }
                        "dryRun" => {
                            // Compare policy and wouldAllow only.
                            let got_dr: Vec<(Value, Value)> = got["dryRun"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|x| (x["policy"].clone(), x["wouldAllow"].clone()))
                                .collect();
                            let want_dr: Vec<(Value, Value)> = want
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|x| (x["policy"].clone(), x["wouldAllow"].clone()))
                                .collect();
                            if got_dr != want_dr {
                                failures
                                    .push(format!("{label}: dryRun {got_dr:?}, want {want_dr:?}"));
                            }
                        }
                        _ => {
                            if got.get(k) != Some(want) {
                                failures.push(format!(
                                    "{label}: {k} = {}, want {want}\n  reason: {}\n  trace: {}",
                                    got.get(k).cloned().unwrap_or(Value::Null),
                                    d.reason,
                                    serde_json::to_string(&d.trace).unwrap()
                                ));
                            }
                        }
                    }
                }
            }
            (None, None, _) => {
                failures.push(format!("{label}: a case needs expect or expectRejected"))
            }
        }
    }
    n
}

pub fn parse_groups(file: &str, text: &str) -> Vec<Group> {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{file}: {e}"))
}
