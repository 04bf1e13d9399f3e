//! The request description of `palisade authz check` (YAML or JSON) and of the conformance suite:
//! an owned [`RequestSpec`] that lends itself as a borrowed [`RequestContext`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::eval::{HeaderLookup, HttpAttributes, RequestContext};

/// A request to decide, naming the destination workload in the mesh directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestSpec {
    /// `namespace/name` of a WorkloadEntry.
    pub workload: String,
    /// Destination (workload) port.
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_ip: Option<IpAddr>,
    /// The peer; no principal means a plaintext connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceSpec>,
    /// Original client IP; defaults to `source.ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// Omitted for a TCP connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
    /// Claims of an already validated token; omitted when the request has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    /// `<td>/ns/<ns>/sa/<sa>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSpec {
    #[serde(default = "default_method")]
    pub method: String,
    /// Request target, query included.
    #[serde(default = "default_path")]
    pub path: String,
    /// `:authority` / `Host`, port included if the client sends one.
    #[serde(default)]
    pub host: String,
    /// Header name to one value or a list (a repeated header).
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderValues>,
}

fn default_method() -> String {
    "GET".into()
}
fn default_path() -> String {
    "/".into()
}

/// One header value, or several for a repeated header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderValues {
    One(String),
    Many(Vec<String>),
}

impl HeaderLookup for BTreeMap<String, HeaderValues> {
    fn get_all<'s>(&'s self, name: &str, out: &mut dyn FnMut(&'s str)) {
        for (k, v) in self {
            if k.eq_ignore_ascii_case(name) {
                match v {
                    HeaderValues::One(s) => out(s),
                    HeaderValues::Many(list) => list.iter().for_each(|s| out(s)),
                }
            }
        }
    }
}

/// A request file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RequestSpecError {
    /// Field path, e.g. `http.headers` or `source.ip`.
    pub field: String,
    pub reason: String,
}

impl RequestSpec {
    /// Parses a request from YAML or JSON text and checks it.
    pub fn from_text(text: &str) -> Result<RequestSpec, RequestSpecError> {
        let spec: RequestSpec =
            crate::snapshot::parse_yaml(text).map_err(|f| RequestSpecError {
                field: f.path.unwrap_or_else(|| "(document)".into()),
                reason: match f.line {
                    Some(l) => format!("{} (line {l})", f.reason),
                    None => f.reason,
                },
            })?;
        spec.check()?;
        Ok(spec)
    }

    /// Checks what serde cannot: the workload key and header names.
    pub fn check(&self) -> Result<(), RequestSpecError> {
        match self.workload.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {}
            _ => {
                return Err(RequestSpecError {
                    field: "workload".into(),
                    reason: format!("{:?}: expected namespace/name", self.workload),
                });
            }
        }
        if let Some(h) = &self.http {
            for name in h.headers.keys() {
                if !crate::validate::is_token(name) {
                    return Err(RequestSpecError {
                        field: format!("http.headers[{name}]"),
                        reason: format!(
                            "{name:?} is not a valid header name (the proxy would answer 400)"
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Borrows the request as the engine's context.
    pub fn context(&self) -> RequestContext<'_> {
        let source = self.source.as_ref();
        RequestContext {
            port: self.port,
            destination_ip: self.destination_ip,
            source_ip: source.and_then(|s| s.ip),
            remote_ip: self.remote_ip,
            peer_principal: source.and_then(|s| s.principal.as_deref()),
            sni: self.sni.as_deref(),
            http: self.http.as_ref().map(|h| HttpAttributes {
                method: &h.method,
                path: &h.path,
                host: &h.host,
                headers: &h.headers,
            }),
            jwt: self.jwt.as_ref(),
        }
    }
}
