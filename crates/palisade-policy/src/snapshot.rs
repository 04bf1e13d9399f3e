//! A validated mesh: `mesh.yaml` plus every resource of a mesh directory, parsed from multi-document
//! YAML, checked with Istio's webhook rules, and indexed for lookups. Building one is pure (text
//! in, snapshot or [`LoadErrors`] out); reading the files is [`crate::load`]'s job.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::api::*;
use crate::error::{LoadError, LoadErrors, Origin};
use crate::mesh::MeshConfig;
use crate::validate::{self, Findings, Severity};

/// A resource with the place it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced<T> {
    pub resource: Arc<T>,
    pub origin: Origin,
}

/// Everything in a mesh directory, validated.
#[derive(Debug, Clone, Default)]
pub struct MeshSnapshot {
    pub mesh: MeshConfig,
    pub peer_authentications: Vec<Sourced<PeerAuthentication>>,
    pub request_authentications: Vec<Sourced<RequestAuthentication>>,
    pub authorization_policies: Vec<Sourced<AuthorizationPolicy>>,
    pub workload_entries: Vec<Sourced<WorkloadEntry>>,
    pub service_entries: Vec<Sourced<ServiceEntry>>,
    /// Webhook warnings (the resources still load).
    pub warnings: Vec<LoadError>,
    workloads_by_key: BTreeMap<String, usize>,
}

/// A YAML parse failure with the field path serde was at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseFailure {
    pub path: Option<String>,
    pub reason: String,
    /// 1-based line within the parsed text.
    pub line: Option<u64>,
}

/// Deserializes YAML text into `T`, tracking the field path of the first error.
pub(crate) fn parse_yaml<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, ParseFailure> {
    let mut path = None;
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        let mut track = serde_path_to_error::Track::new();
        let tracked = serde_path_to_error::Deserializer::new(de, &mut track);
        match T::deserialize(tracked) {
            Ok(v) => Ok(v),
            Err(e) => {
                path = Some(track.path().to_string());
                Err(e)
            }
        }
    });
    result.map_err(|e| {
        let line = e.location().map(|l| l.line());
        let mut reason = e.without_snippet().to_string();
        // The location is reported separately (relative to the file, not the document).
        if let Some(i) = reason.rfind(" at line ") {
            reason.truncate(i);
        }
        if let Some(rest) = reason.strip_prefix("error: ") {
            reason = rest.to_owned();
        }
        if let Some((prefix, rest)) = reason.split_once(": ")
            && prefix.starts_with("line ")
        {
            reason = rest.lines().next().unwrap_or_default().to_owned();
        }
        ParseFailure {
            path: path.filter(|p| !p.is_empty() && p != "."),
            reason,
            line,
        }
    })
}

/// One document of a multi-document YAML file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Document<'a> {
    /// 1-based among non-empty documents.
    pub index: usize,
    /// 1-based line of the document's first line in the file.
    pub start_line: u64,
    pub text: &'a str,
}

/// Splits a YAML stream at `---` / `...` markers, skipping documents with only comments.
pub(crate) fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 1u64;
    let mut offset = 0usize;
    fn push<'t>(text: &'t str, from: usize, to: usize, line: u64, docs: &mut Vec<Document<'t>>) {
        let body = &text[from..to];
        let meaningful = body.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        });
        if meaningful {
            let index = docs.len() + 1;
            docs.push(Document {
                index,
                start_line: line,
                text: body,
            });
        }
    }
    for (line_no, line) in (1u64..).zip(text.split_inclusive('\n')) {
        let content = line.trim_end_matches(['\n', '\r']);
        let marker =
            if content == "---" || content.starts_with("--- ") || content.starts_with("---\t") {
                Some(3)
            } else if content == "..." {
                Some(content.len())
            } else {
                None
            };
        if let Some(len) = marker {
            push(text, start, offset, start_line, &mut docs);
            // The rest of a `--- ` line belongs to the new document.
            start = offset + len;
            start_line = line_no;
        }
        offset += line.len();
    }
    push(text, start, text.len(), start_line, &mut docs);
    docs
}

#[derive(Debug, Deserialize)]
struct Header {
    #[serde(default, rename = "apiVersion")]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    metadata: Option<HeaderMeta>,
}

#[derive(Debug, Deserialize)]
struct HeaderMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

/// Builds snapshots from text, collecting every error.
struct Builder {
    snapshot: MeshSnapshot,
    errors: Vec<LoadError>,
    seen: BTreeMap<(Kind, String, String), Origin>,
}

impl MeshSnapshot {
    /// Builds a snapshot from `mesh.yaml` text (`None`: defaults) and resource files given as
    /// `(display name, text)`. Pure; [`crate::load::load_dir`] reads a directory into this.
    pub fn from_sources(
        mesh: Option<(&str, &str)>,
        files: &[(String, String)],
    ) -> Result<MeshSnapshot, LoadErrors> {
        let mut b = Builder {
            snapshot: MeshSnapshot::default(),
            errors: Vec::new(),
            seen: BTreeMap::new(),
        };
        if let Some((name, text)) = mesh {
            match crate::mesh::parse_mesh_config(text) {
                Ok((cfg, issues)) => {
                    for issue in issues {
                        b.errors.push(LoadError {
                            severity: issue.severity,
                            file: name.to_owned(),
                            document: None,
                            line: None,
                            resource: Some("MeshConfig".into()),
                            field: Some(issue.path),
                            reason: issue.reason,
                        });
                    }
                    b.snapshot.mesh = cfg;
                }
                Err(f) => b.errors.push(LoadError {
                    severity: Severity::Error,
                    file: name.to_owned(),
                    document: None,
                    line: f.line,
                    resource: Some("MeshConfig".into()),
                    field: f.path,
                    reason: f.reason,
                }),
            }
        }
        for (name, text) in files {
            b.add_file(name, text);
        }
        b.finish()
    }

    /// A snapshot of resources already in memory (e.g. from a control-plane push); validates them.
    pub fn from_resources(
        mesh: MeshConfig,
        resources: Vec<Resource>,
    ) -> Result<MeshSnapshot, LoadErrors> {
        let mut b = Builder {
            snapshot: MeshSnapshot::default(),
            errors: Vec::new(),
            seen: BTreeMap::new(),
        };
        for issue in validate::mesh_config_issues(&mesh) {
            b.errors.push(LoadError {
                severity: issue.severity,
                file: "<memory>".into(),
                document: None,
                line: None,
                resource: Some("MeshConfig".into()),
                field: Some(issue.path),
                reason: issue.reason,
            });
        }
        b.snapshot.mesh = mesh;
        for (i, r) in resources.into_iter().enumerate() {
            let origin = Origin {
                file: "<memory>".into(),
                document: i + 1,
                line: 1,
            };
            b.add_resource(r, origin);
        }
        b.finish()
    }

    /// The WorkloadEntry `namespace/name`.
    pub fn workload(&self, key: &str) -> Option<&Sourced<WorkloadEntry>> {
        self.workloads_by_key
            .get(key)
            .and_then(|&i| self.workload_entries.get(i))
    }

    /// All WorkloadEntry keys (`namespace/name`), sorted.
    pub fn workload_keys(&self) -> impl Iterator<Item = &str> {
        self.workloads_by_key.keys().map(String::as_str)
    }
}

impl Builder {
    fn add_file(&mut self, file: &str, text: &str) {
        for doc in split_documents(text) {
            self.add_document(file, doc);
        }
    }

    fn add_document(&mut self, file: &str, doc: Document<'_>) {
        let err = |line: Option<u64>,
                   resource: Option<String>,
                   field: Option<String>,
                   reason: String| LoadError {
            severity: Severity::Error,
            file: file.to_owned(),
            document: Some(doc.index),
            line: Some(line.map_or(doc.start_line, |l| doc.start_line + l.saturating_sub(1))),
            resource,
            field,
            reason,
        };
        let header: Header = match parse_yaml(doc.text) {
            Ok(h) => h,
            Err(f) => {
                let reason = if f.reason.contains("invalid type") {
                    format!("a resource must be a YAML mapping ({})", f.reason)
                } else {
                    f.reason
                };
                self.errors.push(err(f.line, None, None, reason));
                return;
            }
        };
        let meta = header.metadata.as_ref();
        let ns = meta
            .and_then(|m| m.namespace.clone())
            .unwrap_or_else(|| "default".into());
        let name = meta.and_then(|m| m.name.clone()).unwrap_or_default();
        let Some(kind_name) = header.kind.clone() else {
            self.errors.push(err(
                None,
                None,
                Some("kind".into()),
                "missing `kind`".into(),
            ));
            return;
        };
        let label = format!("{kind_name} {ns}/{name}");
        let Some(kind) = Kind::from_name(&kind_name) else {
            self.errors.push(err(
                None,
                Some(label),
                Some("kind".into()),
                format!(
                    "unknown kind {kind_name:?}: expected PeerAuthentication, RequestAuthentication, AuthorizationPolicy, WorkloadEntry or ServiceEntry"
                ),
            ));
            return;
        };
        let api = header.api_version.clone().unwrap_or_default();
        if !kind.api_versions().contains(&api.as_str()) {
            self.errors.push(err(
                None,
                Some(label),
                Some("apiVersion".into()),
                format!(
                    "{api:?} is not an apiVersion of {kind}: expected one of {}",
                    kind.api_versions().join(", ")
                ),
            ));
            return;
        }
        let parsed: Result<Resource, ParseFailure> = match kind {
            Kind::PeerAuthentication => parse_yaml(doc.text).map(Resource::PeerAuthentication),
            Kind::RequestAuthentication => {
                parse_yaml(doc.text).map(Resource::RequestAuthentication)
            }
            Kind::AuthorizationPolicy => parse_yaml(doc.text).map(Resource::AuthorizationPolicy),
            Kind::WorkloadEntry => parse_yaml(doc.text).map(Resource::WorkloadEntry),
            Kind::ServiceEntry => parse_yaml(doc.text).map(Resource::ServiceEntry),
        };
        match parsed {
            Ok(r) => self.add_resource(
                r,
                Origin {
                    file: file.to_owned(),
                    document: doc.index,
                    line: doc.start_line,
                },
            ),
            Err(f) => self.errors.push(err(f.line, Some(label), f.path, f.reason)),
        }
    }

    fn add_resource(&mut self, r: Resource, origin: Origin) {
        let mut f = Findings::default();
        let (kind, meta) = match &r {
            Resource::PeerAuthentication(p) => {
                validate::validate_peer_authentication(p, &mut f);
                (Kind::PeerAuthentication, &p.metadata)
            }
            Resource::RequestAuthentication(p) => {
                validate::validate_request_authentication(p, &mut f);
                (Kind::RequestAuthentication, &p.metadata)
            }
            Resource::AuthorizationPolicy(p) => {
                validate::validate_authorization_policy(p, &self.snapshot.mesh, &mut f);
                (Kind::AuthorizationPolicy, &p.metadata)
            }
            Resource::WorkloadEntry(w) => {
                validate::validate_workload_entry(w, &mut f);
                (Kind::WorkloadEntry, &w.metadata)
            }
            Resource::ServiceEntry(s) => {
                validate::validate_service_entry(s, &mut f);
                (Kind::ServiceEntry, &s.metadata)
            }
        };
        let ns = meta.namespace().to_owned();
        let name = meta.name.clone();
        let label = format!("{kind} {ns}/{name}");
        let mut failed = false;
        for issue in f.issues {
            failed |= issue.severity == Severity::Error;
            let e = LoadError {
                severity: issue.severity,
                file: origin.file.clone(),
                document: Some(origin.document),
                line: Some(origin.line),
                resource: Some(label.clone()),
                field: Some(issue.path),
                reason: issue.reason,
            };
            if e.is_error() {
                self.errors.push(e);
            } else {
                self.snapshot.warnings.push(e);
            }
        }
        if let Some(first) = self.seen.get(&(kind, ns.clone(), name.clone())) {
            self.errors.push(LoadError {
                severity: Severity::Error,
                file: origin.file.clone(),
                document: Some(origin.document),
                line: Some(origin.line),
                resource: Some(label),
                field: Some("metadata.name".into()),
                reason: format!("duplicate resource: already defined at {first}"),
            });
            return;
        }
        self.seen.insert((kind, ns, name), origin.clone());
        if failed {
            return;
        }
        let s = &mut self.snapshot;
        match r {
            Resource::PeerAuthentication(p) => s.peer_authentications.push(Sourced {
                resource: Arc::new(p),
                origin,
            }),
            Resource::RequestAuthentication(p) => s.request_authentications.push(Sourced {
                resource: Arc::new(p),
                origin,
            }),
            Resource::AuthorizationPolicy(p) => s.authorization_policies.push(Sourced {
                resource: Arc::new(p),
                origin,
            }),
            Resource::WorkloadEntry(w) => {
                s.workloads_by_key.insert(w.key(), s.workload_entries.len());
                s.workload_entries.push(Sourced {
                    resource: Arc::new(w),
                    origin,
                });
            }
            Resource::ServiceEntry(e) => s.service_entries.push(Sourced {
                resource: Arc::new(e),
                origin,
            }),
        }
    }

    fn finish(self) -> Result<MeshSnapshot, LoadErrors> {
        let errors: Vec<LoadError> = self
            .errors
            .into_iter()
            .filter(LoadError::is_error)
            .collect();
        if errors.is_empty() {
            Ok(self.snapshot)
        } else {
            Err(LoadErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_with_lines() {
        let text = "# c\n---\na: 1\n---\n\n---\n# only comment\n---\nb: 2\n...\n";
        let docs = split_documents(text);
        assert_eq!(docs.len(), 2);
        assert_eq!((docs[0].index, docs[0].start_line), (1, 2));
        assert_eq!((docs[1].index, docs[1].start_line), (2, 8));
        assert!(docs[1].text.contains("b: 2"));
    }

    #[test]
    fn reports_every_error_with_location() {
        let files = vec![(
            "p.yaml".to_string(),
            r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a, namespace: foo}
spec:
  action: DENY
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b, namespace: foo}
spec:
  rules:
  - from:
    - source:
        principalz: ["x"]
---
apiVersion: security.istio.io/v1
kind: Bogus
metadata: {name: c}
"#
            .to_string(),
        )];
        let err = MeshSnapshot::from_sources(None, &files).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.len(), 3, "{text}");
        assert!(text.contains("p.yaml: document 1 (line 1): AuthorizationPolicy foo/a: spec.rules: DENY action without rules"), "{text}");
        assert!(text.contains("p.yaml: document 2 (line 14): AuthorizationPolicy foo/b: spec.rules[0].from[0].source.principalz: unknown field `principalz`"), "{text}");
        assert!(
            text.contains("p.yaml: document 3 (line 15): Bogus default/c: kind: unknown kind"),
            "{text}"
        );
    }
}
