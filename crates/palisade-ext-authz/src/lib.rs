//! An example external authorizer for CUSTOM AuthorizationPolicies: an Envoy ext_authz server,
//! over gRPC (`envoy.service.auth.v3.Authorization/Check`) and over plain HTTP, that decides with
//! a Rego policy evaluated by `regorus`, the role OPA's Envoy plugin plays.
//!
//! The policy sees the check request as `input`, in the shape OPA's Envoy plugin gives it:
//! `input.attributes` (the protobuf JSON of `AttributeContext`: `source`, `destination`,
//! `request.http.{method,path,host,headers,body,...}`), plus `input.parsed_path` (segments),
//! `input.parsed_query` (name to list of values) and `input.parsed_body` (the body as JSON, when
//! it is JSON). The decision rule (default `data.envoy.authz.allow`) is either a boolean or an
//! object `{allowed, http_status, headers, body, request_headers_to_remove,
//! response_headers_to_add}`; an undefined decision denies.

pub mod grpc;
pub mod http;

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// The rule asked when none is given, as OPA's Envoy plugin does.
pub const DEFAULT_DECISION: &str = "data.envoy.authz.allow";

/// Loading or evaluating the policy failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("cannot load policy {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("policy evaluation failed: {0}")]
    Eval(String),
    #[error("decision {rule} is {value}, expected a boolean or an object with \"allowed\"")]
    Shape { rule: String, value: String },
}

/// What the policy decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Status of a denial (403 when unset).
    pub http_status: Option<u16>,
    /// On allow: headers added to the upstream request; on deny: headers of the denial.
    pub headers: BTreeMap<String, String>,
    /// The denial's body.
    pub body: String,
    pub request_headers_to_remove: Vec<String>,
    pub response_headers_to_add: BTreeMap<String, String>,
}

/// A compiled Rego policy and the rule that decides.
#[derive(Debug, Clone)]
pub struct RegoAuthorizer {
    engine: regorus::Engine,
    decision: String,
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .map(|(k, v)| {
                    let s = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    (k.to_ascii_lowercase(), s)
                })
                .collect()
        })
        .unwrap_or_default()
}

impl RegoAuthorizer {
    /// Compiles `rego` (named `path` in errors); `decision` is a rule path such as
    /// `data.envoy.authz.allow`.
    pub fn from_source(path: &str, rego: &str, decision: &str) -> Result<Self, AuthzError> {
        let mut engine = regorus::Engine::new();
        engine
            .add_policy(path.to_owned(), rego.to_owned())
            .map_err(|e| AuthzError::Load {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            engine,
            decision: decision.to_owned(),
        })
    }

    /// Reads and compiles a policy file.
    pub fn from_file(path: &std::path::Path, decision: &str) -> Result<Self, AuthzError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthzError::Load {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_source(&path.display().to_string(), &text, decision)
    }

    /// Evaluates the decision rule against `input`.
    pub fn decide(&self, input: &Value) -> Result<Decision, AuthzError> {
        let mut engine = self.engine.clone();
        let input = regorus::Value::from_json_str(&input.to_string())
            .map_err(|e| AuthzError::Eval(e.to_string()))?;
        engine.set_input(input);
        // A query, not `eval_rule`: an undefined decision (no rule by that name, or no
        // definition that applies) is an empty result, which denies.
        let results = engine
            .eval_query(self.decision.clone(), false)
            .map_err(|e| AuthzError::Eval(e.to_string()))?;
        let Some(out) = results
            .result
            .into_iter()
            .next()
            .and_then(|r| r.expressions.into_iter().next())
            .map(|e| e.value)
            .filter(|v| *v != regorus::Value::Undefined)
        else {
            return Ok(Decision::default());
        };
        let json = out
            .to_json_str()
            .map_err(|e| AuthzError::Eval(e.to_string()))?;
        let v: Value = serde_json::from_str(&json).map_err(|e| AuthzError::Eval(e.to_string()))?;
        let shape = || AuthzError::Shape {
            rule: self.decision.clone(),
            value: json.clone(),
        };
        match &v {
            Value::Bool(b) => Ok(Decision {
                allowed: *b,
                ..Decision::default()
            }),
            Value::Object(o) => Ok(Decision {
                allowed: o
                    .get("allowed")
                    .and_then(Value::as_bool)
                    .ok_or_else(shape)?,
                http_status: o
                    .get("http_status")
                    .and_then(Value::as_u64)
                    .and_then(|s| u16::try_from(s).ok()),
                headers: string_map(o.get("headers")),
                body: o
                    .get("body")
                    .map(|b| b.as_str().map_or_else(|| b.to_string(), str::to_owned))
                    .unwrap_or_default(),
                request_headers_to_remove: o
                    .get("request_headers_to_remove")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
                response_headers_to_add: string_map(o.get("response_headers_to_add")),
            }),
            _ => Err(shape()),
        }
    }
}

/// Adds `parsed_path`, `parsed_query`, `parsed_body` and `version` to an `attributes` object.
pub fn input_from_attributes(attributes: Value) -> Value {
    let http = &attributes["request"]["http"];
    let path = http["path"].as_str().unwrap_or("/");
    let (p, q) = path.split_once('?').unwrap_or((path, ""));
    let parsed_path: Vec<Value> = p
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| Value::String(s.to_owned()))
        .collect();
    let mut parsed_query: Map<String, Value> = Map::new();
    for kv in q.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let list = parsed_query
            .entry(k.to_owned())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = list {
            a.push(Value::String(v.to_owned()));
        }
    }
    let parsed_body = http["body"]
        .as_str()
        .filter(|b| !b.is_empty())
        .and_then(|b| serde_json::from_str::<Value>(b).ok())
        .unwrap_or(Value::Null);
    json!({
        "attributes": attributes,
        "parsed_path": parsed_path,
        "parsed_query": parsed_query,
        "parsed_body": parsed_body,
        "version": {"encoding": "protojson", "ext_authz": "v3"},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
package envoy.authz

import rego.v1

default allow := false

allow if {
    input.attributes.request.http.method == "GET"
    input.parsed_path[0] == "public"
}

allow := {"allowed": false, "http_status": 418, "body": "teapot", "headers": {"x-why": "tea"}} if {
    input.parsed_path[0] == "tea"
}

allow := {"allowed": true, "headers": {"x-user": input.attributes.request.http.headers["x-user"]}} if {
    input.parsed_path[0] == "user"
    input.parsed_query.ok[0] == "1"
}
"#;

    fn input(method: &str, path: &str) -> Value {
        input_from_attributes(json!({
            "request": {"http": {"method": method, "path": path, "headers": {"x-user": "alice"}}}
        }))
    }

    #[test]
    fn decisions() {
        let a = RegoAuthorizer::from_source("p.rego", POLICY, DEFAULT_DECISION).unwrap();
        let cases: Vec<(&str, &str, bool, Option<u16>)> = vec![
            ("GET", "/public/x", true, None),
            ("POST", "/public/x", false, None),
            ("GET", "/private", false, None),
            ("GET", "/tea", false, Some(418)),
            ("GET", "/user?ok=1", true, None),
            ("GET", "/user?ok=2", false, None),
        ];
        for (m, p, allowed, status) in cases {
            let d = a.decide(&input(m, p)).unwrap();
            assert_eq!((d.allowed, d.http_status), (allowed, status), "{m} {p}");
        }
        let d = a.decide(&input("GET", "/tea")).unwrap();
        assert_eq!(
            (d.body.as_str(), d.headers["x-why"].as_str()),
            ("teapot", "tea")
        );
        let d = a.decide(&input("GET", "/user?ok=1")).unwrap();
        assert_eq!(d.headers["x-user"], "alice");
        // An undefined decision denies; a bad policy is a load error.
        let u = RegoAuthorizer::from_source("p.rego", POLICY, "data.envoy.authz.nothing").unwrap();
        assert!(!u.decide(&input("GET", "/public")).unwrap().allowed);
        assert!(
            RegoAuthorizer::from_source("bad.rego", "package x\nallow if {", DEFAULT_DECISION)
                .is_err()
        );
    }

    #[test]
    fn parsed_fields() {
        let i = input_from_attributes(
            json!({"request": {"http": {"path": "/a/b?x=1&x=2&y", "body": "{\"k\": 1}"}}}),
        );
        assert_eq!(i["parsed_path"], json!(["a", "b"]));
        assert_eq!(i["parsed_query"], json!({"x": ["1", "2"], "y": [""]}));
        assert_eq!(i["parsed_body"], json!({"k": 1}));
    }
}
