//! Envoy sidecars over ADS: what istiod does for an Envoy, from the same per-workload config that
//! Palisade's sidecar gets.
//!
//! An Envoy names its workload in its node: metadata `PALISADE_WORKLOAD` (`namespace/name`, as
//! `palisade envoy bootstrap` writes it) or else an Istio-style node id
//! `sidecar~IP~NAME.NAMESPACE~...`; metadata `PALISADE_APP_PORTS` (`PORT=APPPORT,...`) says
//! where its application listens, `PALISADE_OUTBOUND` (`IP:PORT`) where the application's
//! HTTP proxy listener goes and `PALISADE_TCP_UPSTREAMS` (`LISTEN=HOST:PORT,...`) its declared
//! TCP upstreams. Each Envoy stream gets its own [`SnapshotCache`] of
//! listeners and clusters, fed by a task that re-translates ([`palisade_envoy`]) whenever the
//! workload's own config changes in the control plane's cache, so a policy edit reaches exactly
//! the Envoys whose config it changes. An input the translator refuses is logged with the
//! translator's error (resource and field), recorded for `palisade status`, and not pushed: the
//! Envoy keeps its last good config, and no config Envoy would NACK is sent in a loop.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::google::protobuf::{Struct, value};
use envoy_types::util::pack_any;
use palisade_envoy::outbound::{OutboundOptions, TcpUpstream};
use palisade_envoy::{EnvoyResources, json};
use palisade_xds::{Change, Snapshot, SnapshotCache};
use prost::Name as _;
use tokio::sync::watch;

use crate::proxies::StreamStatus;
use crate::wire::WORKLOAD_CONFIG_TYPE_URL;

/// Node metadata key naming the workload (`namespace/name`).
pub const WORKLOAD_METADATA: &str = "PALISADE_WORKLOAD";
/// Node metadata key giving application ports (`PORT=APPPORT,...`).
pub const APP_PORTS_METADATA: &str = "PALISADE_APP_PORTS";
/// Node metadata key giving the outbound HTTP proxy listener (`IP:PORT`).
pub const OUTBOUND_METADATA: &str = "PALISADE_OUTBOUND";
/// Node metadata key giving TCP upstreams (`LISTEN=HOST:PORT,...`).
pub const TCP_UPSTREAMS_METADATA: &str = "PALISADE_TCP_UPSTREAMS";

/// The type URL of Envoy's listeners (LDS).
pub fn listener_type_url() -> String {
    Listener::type_url()
}

/// The type URL of Envoy's clusters (CDS).
pub fn cluster_type_url() -> String {
    Cluster::type_url()
}

/// Whether a first request is for one of the types an Envoy sidecar subscribes to.
pub fn is_envoy_type(type_url: &str) -> bool {
    type_url == listener_type_url() || type_url == cluster_type_url()
}

/// Why an Envoy's node does not name a workload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("the first request carries no node")]
    Missing,
    #[error(
        "node {id:?} names no workload: set metadata {WORKLOAD_METADATA}=namespace/name (palisade envoy bootstrap does) or an Istio node id sidecar~IP~NAME.NAMESPACE~..."
    )]
    NoWorkload { id: String },
    #[error("node metadata {key}: {reason}")]
    Metadata { key: &'static str, reason: String },
}

/// What an Envoy's node says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyNode {
    /// `namespace/name`.
    pub workload: String,
    /// Workload port to application port.
    pub app_ports: BTreeMap<u16, u16>,
    /// The application's side.
    pub outbound: OutboundOptions,
}

fn metadata_string<'a>(meta: Option<&'a Struct>, key: &str) -> Option<&'a str> {
    match meta?.fields.get(key)?.kind.as_ref()? {
        value::Kind::StringValue(s) => Some(s.as_str()),
        _ => None,
    }
}

impl EnvoyNode {
    /// Reads the node of an Envoy's first request.
    pub fn from_node(node: Option<&Node>) -> Result<Self, NodeError> {
        let node = node.ok_or(NodeError::Missing)?;
        let meta = node.metadata.as_ref();
        let workload = match metadata_string(meta, WORKLOAD_METADATA) {
            Some(w) => {
                let (ns, name) = w.split_once('/').ok_or_else(|| NodeError::Metadata {
                    key: WORKLOAD_METADATA,
                    reason: format!("{w:?} is not namespace/name"),
                })?;
                if ns.is_empty() || name.is_empty() || name.contains('/') {
                    return Err(NodeError::Metadata {
                        key: WORKLOAD_METADATA,
                        reason: format!("{w:?} is not namespace/name"),
                    });
                }
                w.to_owned()
            }
            None => istio_node_workload(&node.id).ok_or_else(|| NodeError::NoWorkload {
                id: node.id.clone(),
            })?,
        };
        let app_ports = match metadata_string(meta, APP_PORTS_METADATA) {
            Some(s) => parse_app_ports(s).map_err(|reason| NodeError::Metadata {
                key: APP_PORTS_METADATA,
                reason,
            })?,
            None => BTreeMap::new(),
        };
        let http = match metadata_string(meta, OUTBOUND_METADATA).map(str::trim) {
            Some(a) if !a.is_empty() => {
                Some(a.parse::<SocketAddr>().map_err(|e| NodeError::Metadata {
                    key: OUTBOUND_METADATA,
                    reason: format!("{a:?}: {e}"),
                })?)
            }
            _ => None,
        };
        let tcp = match metadata_string(meta, TCP_UPSTREAMS_METADATA) {
            Some(s) => parse_tcp_upstreams(s).map_err(|reason| NodeError::Metadata {
                key: TCP_UPSTREAMS_METADATA,
                reason,
            })?,
            None => Vec::new(),
        };
        Ok(Self {
            workload,
            app_ports,
            outbound: OutboundOptions { http, tcp },
        })
    }
}

/// `sidecar~10.0.0.1~reviews-v1.backend~backend.svc.cluster.local` names `backend/reviews-v1`.
fn istio_node_workload(id: &str) -> Option<String> {
    let mut parts = id.split('~');
    let (kind, _ip, pod) = (parts.next()?, parts.next()?, parts.next()?);
    if kind != "sidecar" {
        return None;
    }
    let (name, ns) = pod.rsplit_once('.')?;
    (!name.is_empty() && !ns.is_empty()).then(|| format!("{ns}/{name}"))
}

/// `9080=19080,9090=19090` (empty: none).
pub fn parse_app_ports(s: &str) -> Result<BTreeMap<u16, u16>, String> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (port, app) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not PORT=APPPORT"))?;
        let parse = |x: &str| {
            x.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{x:?} in {pair:?} is not a port"))
        };
        out.insert(parse(port)?, parse(app)?);
    }
    Ok(out)
}

/// `127.0.0.1:15432=db.apps.svc:5432,...` (empty: none).
pub fn parse_tcp_upstreams(s: &str) -> Result<Vec<TcpUpstream>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (listen, target) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not LISTEN=HOST:PORT"))?;
        let listen: SocketAddr = listen
            .parse()
            .map_err(|e| format!("{listen:?} in {item:?}: {e}"))?;
        let (host, port) = target
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok().filter(|p| *p != 0)?)))
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| format!("{target:?} in {item:?} is not HOST:PORT"))?;
        out.push(TcpUpstream {
            listen,
            host: host.to_ascii_lowercase(),
            port,
        });
    }
    Ok(out)
}

/// The writes that turn `previous` (what the last translation published) into `resources`.
///
/// Resources are compared by content, not by bytes: prost encodes map fields (RBAC's
/// `policies`, metadata) in hash order, also inside the `Any`s of filters, so the same config
/// encodes differently each time, and a byte comparison would push configs that did not change.
/// Content is Envoy's JSON of the resource ([`palisade_envoy::json`], keys sorted; a resource
/// with a part that printer does not know counts as changed) and, for what the printer may not
/// show, the multiset of the encoded bytes (reordering map entries permutes bytes, at any
/// depth, so it leaves that unchanged).
fn changes(resources: &EnvoyResources, previous: Option<&EnvoyResources>) -> Vec<Change> {
    let (lds, cds) = (listener_type_url(), cluster_type_url());
    let mut out = Vec::new();
    let old_listeners: BTreeMap<&str, &Listener> = previous
        .map(|p| p.listeners.iter().map(|l| (l.name.as_str(), l)).collect())
        .unwrap_or_default();
    let old_clusters: BTreeMap<&str, &Cluster> = previous
        .map(|p| p.clusters.iter().map(|c| (c.name.as_str(), c)).collect())
        .unwrap_or_default();
    for l in &resources.listeners {
        let same = old_listeners.get(l.name.as_str()).is_some_and(|old| {
            same_content(&json::listener(old), &json::listener(l)) && same_bytes(*old, l)
        });
        if !same {
            out.push(Change::Set {
                type_url: lds.clone(),
                name: l.name.clone(),
                body: pack_any(l.clone()),
            });
        }
    }
    for c in &resources.clusters {
        let same = old_clusters.get(c.name.as_str()).is_some_and(|old| {
            same_content(&json::cluster(old), &json::cluster(c)) && same_bytes(*old, c)
        });
        if !same {
            out.push(Change::Set {
                type_url: cds.clone(),
                name: c.name.clone(),
                body: pack_any(c.clone()),
            });
        }
    }
    let listeners: BTreeSet<&str> = resources
        .listeners
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    let clusters: BTreeSet<&str> = resources.clusters.iter().map(|c| c.name.as_str()).collect();
    for name in old_listeners.keys().filter(|n| !listeners.contains(*n)) {
        out.push(Change::Remove {
            type_url: lds.clone(),
            name: (*name).to_owned(),
        });
    }
    for name in old_clusters.keys().filter(|n| !clusters.contains(*n)) {
        out.push(Change::Remove {
            type_url: cds.clone(),
            name: (*name).to_owned(),
        });
    }
    out
}

fn same_content(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    a == b && !a.to_string().contains(json::UNPRINTED)
}

fn same_bytes<M: prost::Message>(a: &M, b: &M) -> bool {
    let histogram = |m: &M| {
        let mut h = [0u32; 256];
        for byte in m.encode_to_vec() {
            h[usize::from(byte)] += 1;
        }
        h
    };
    histogram(a) == histogram(b)
}

/// Translates `node`'s workload config from `configs` into `out`, now and on every change of
/// that config, until the task is aborted (the stream ended). The first translation happens
/// before this returns, so that the stream's first answer is the real config.
pub fn spawn_translator(
    mut configs: watch::Receiver<Arc<Snapshot>>,
    node: EnvoyNode,
    out: Arc<SnapshotCache>,
    status: Arc<StreamStatus>,
    metrics: crate::ControlMetrics,
) -> tokio::task::JoinHandle<()> {
    let mut translator = Translator {
        node,
        out,
        status,
        metrics,
        version: None,
        published: None,
    };
    let snap = configs.borrow_and_update().clone();
    translator.update(&snap);
    tokio::spawn(async move {
        while configs.changed().await.is_ok() {
            let snap = configs.borrow_and_update().clone();
            translator.update(&snap);
        }
    })
}

struct Translator {
    node: EnvoyNode,
    out: Arc<SnapshotCache>,
    status: Arc<StreamStatus>,
    metrics: crate::ControlMetrics,
    /// The version of the workload config last looked at.
    version: Option<u64>,
    /// What was last published into `out`.
    published: Option<EnvoyResources>,
}

impl Translator {
    fn update(&mut self, snap: &Snapshot) {
        let key = &self.node.workload;
        let Some(resource) = snap.get(WORKLOAD_CONFIG_TYPE_URL, key) else {
            if self.version.is_some() {
                // The WorkloadEntry is gone: its Envoy keeps what it has (istiod does the
                // same for a proxy whose pod disappeared), and says so.
                tracing::warn!(workload = %key, "WorkloadEntry removed; its Envoy keeps its last config");
                self.version = None;
            }
            return;
        };
        if self.version == Some(resource.version) {
            return;
        }
        self.version = Some(resource.version);
        let translated = crate::wire::from_any(&resource.body)
            .map_err(|e| format!("workload config of {key}: {e}"))
            .and_then(|config| {
                let mut resources =
                    palisade_envoy::translate_inbound(&config, &self.node.app_ports)
                        .map_err(|e| e.to_string())?;
                let (listeners, clusters) =
                    palisade_envoy::outbound::translate_outbound(&config, &self.node.outbound)
                        .map_err(|e| e.to_string())?;
                resources.listeners.extend(listeners);
                resources.clusters.extend(clusters);
                Ok(resources)
            });
        match translated {
            Ok(resources) => {
                let changes = changes(&resources, self.published.as_ref());
                let pushed = self.out.apply(changes);
                self.published = Some(resources);
                tracing::debug!(workload = %key, pushed, "Envoy config translated");
                self.status.set_translate_error(None);
            }
            Err(error) => {
                self.metrics.envoy_translation_errors.inc();
                tracing::error!(
                    workload = %key, %error,
                    "config for this Envoy cannot be generated; it keeps its last good config"
                );
                self.status.set_translate_error(Some(error));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::Value;

    use super::*;

    fn node(id: &str, meta: &[(&str, &str)]) -> Node {
        Node {
            id: id.to_owned(),
            metadata: Some(Struct {
                fields: meta
                    .iter()
                    .map(|(k, v)| {
                        (
                            (*k).to_owned(),
                            Value {
                                kind: Some(value::Kind::StringValue((*v).to_owned())),
                            },
                        )
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_same_config_translated_again_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            ("mesh.yaml", "trustDomain: cluster.local\n"),
            (
                "w.yaml",
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: web, namespace: demo}\nspec: {address: 127.0.0.9, serviceAccount: web, labels: {app: web}, ports: {http: 8080}}\n",
            ),
            // Several policies, so that RBAC's map of policies has several entries to order.
            (
                "p.yaml",
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: demo}\nspec:\n  rules:\n  - to: [{operation: {paths: [/a]}}]\n  - to: [{operation: {paths: [/b]}}]\n  - to: [{operation: {paths: [/c]}}]\n  - to: [{operation: {paths: [/d]}}]\n",
            ),
        ];
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let snapshot = palisade_policy::load_dir(dir.path()).unwrap();
        let config = crate::workload_config(&snapshot, "demo/web").unwrap();
        let none = BTreeMap::new();
        let first = palisade_envoy::translate_inbound(&config, &none).unwrap();
        assert_eq!(changes(&first, None).len(), 2, "one listener, one cluster");
        for _ in 0..5 {
            let again = palisade_envoy::translate_inbound(&config, &none).unwrap();
            assert!(changes(&again, Some(&first)).is_empty());
        }
        let moved = palisade_envoy::translate_inbound(&config, &[(8080, 18080)].into()).unwrap();
        let c = changes(&moved, Some(&first));
        assert!(
            matches!(&c[..], [Change::Set { type_url, .. }] if *type_url == cluster_type_url()),
            "only the cluster to the application changes: {c:?}"
        );
    }

    #[test]
    fn envoy_bootstraps_check_the_control_planes_identity() {
        assert_eq!(
            palisade_envoy::bootstrap::CONTROL_PLANE_ID_SUFFIX,
            palisade_ca::server::CONTROL_PLANE_PATH
        );
    }

    #[test]
    fn reads_the_workload_and_app_ports_from_the_node() {
        let ok = |n: Node| EnvoyNode::from_node(Some(&n)).map(|e| (e.workload, e.app_ports));
        let outbound = EnvoyNode::from_node(Some(&node(
            "x",
            &[
                (WORKLOAD_METADATA, "demo/web"),
                (OUTBOUND_METADATA, "127.0.0.1:15001"),
                (TCP_UPSTREAMS_METADATA, "127.0.0.1:15432=DB.demo.svc:5432"),
            ],
        )))
        .unwrap()
        .outbound;
        assert_eq!(outbound.http, Some("127.0.0.1:15001".parse().unwrap()));
        assert_eq!(
            outbound.tcp,
            vec![TcpUpstream {
                listen: "127.0.0.1:15432".parse().unwrap(),
                host: "db.demo.svc".into(),
                port: 5432
            }]
        );
        let ports = |v: &[(u16, u16)]| v.iter().copied().collect::<BTreeMap<_, _>>();
        assert_eq!(
            ok(node(
                "x",
                &[
                    (WORKLOAD_METADATA, "demo/web"),
                    (APP_PORTS_METADATA, "8080=18080, 9000=19000")
                ]
            )),
            Ok(("demo/web".into(), ports(&[(8080, 18080), (9000, 19000)])))
        );
        assert_eq!(
            ok(node(
                "sidecar~10.1.2.3~reviews-v1.backend~backend.svc.cluster.local",
                &[]
            )),
            Ok(("backend/reviews-v1".into(), ports(&[])))
        );
        let err = |n: Node| EnvoyNode::from_node(Some(&n)).unwrap_err().to_string();
        assert!(err(node("router~x~y.z~w", &[])).contains("names no workload"));
        assert!(err(node("x", &[(WORKLOAD_METADATA, "web")])).contains("not namespace/name"));
        assert!(
            err(node(
                "x",
                &[(WORKLOAD_METADATA, "a/b"), (APP_PORTS_METADATA, "80=0")]
            ))
            .contains("PALISADE_APP_PORTS")
        );
        assert!(
            err(node(
                "x",
                &[
                    (WORKLOAD_METADATA, "a/b"),
                    (TCP_UPSTREAMS_METADATA, "127.0.0.1:1=db")
                ]
            ))
            .contains("PALISADE_TCP_UPSTREAMS")
        );
        assert!(
            err(node(
                "x",
                &[(WORKLOAD_METADATA, "a/b"), (OUTBOUND_METADATA, "nope")]
            ))
            .contains("PALISADE_OUTBOUND")
        );
        assert_eq!(EnvoyNode::from_node(None), Err(NodeError::Missing));
    }
}
