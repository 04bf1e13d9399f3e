//! The outbound side of an Envoy sidecar, in Palisade's listening model (the application uses
//! its sidecar explicitly, no capture): an HTTP proxy listener for the application (absolute-form
//! requests, `curl -x`; the Host header picks the destination) and one listener per declared
//! TCP upstream. One cluster `outbound|PORT||HOST` per destination: a ServiceEntry host and port
//! (the workloads it selects, on the target port) or a workload address and port.
//!
//! Auto mTLS as istiod does it, per endpoint: an endpoint with a sidecar gets mutual TLS with
//! the workload's certificate (`default` over SDS) and must present exactly its own SPIFFE ID
//! (a transport socket match on the endpoint's metadata); one without a sidecar, or on a
//! DISABLE port, gets plaintext. The ALPN says what the connection carries, as Istio's does
//! (`istio-http/1.1`, `istio-h2`, `istio`), so that a Palisade or an Envoy server picks its
//! mesh chain.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{Metadata, TrafficDirection, TransportSocket};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, UpstreamTlsContext,
    common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Duration, Struct, Value, value};
use envoy_types::util::pack_any;
use palisade_policy::MeshConfig;
use palisade_policy::PortProtocol;
use palisade_policy::workload_config::{Destination, WorkloadConfig};

use crate::TranslateError;
use crate::inbound::socket;
use crate::tls::{CERT_SECRET, ROOT_SECRET, TLS_TRANSPORT_SOCKET, sds_secret};

/// The endpoint metadata key that selects a cluster's transport socket match.
const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";
/// The field of that metadata naming the SPIFFE ID the endpoint must present.
const IDENTITY_FIELD: &str = "spiffeId";

/// Where the application reaches its Envoy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundOptions {
    /// The HTTP proxy listener; `None`: no outbound HTTP.
    pub http: Option<SocketAddr>,
    /// `listen -> host:port` TCP upstreams.
    pub tcp: Vec<TcpUpstream>,
}

/// A declared TCP upstream: connections to `listen` go to `host:port` of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpUpstream {
    pub listen: SocketAddr,
    pub host: String,
    pub port: u16,
}

/// One endpoint: its address and, with a sidecar, the identity it must present.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Upstream {
    addr: SocketAddr,
    identity: Option<String>,
}

/// A destination: every name it answers to, its endpoints, what its port declares.
#[derive(Debug, Clone)]
struct Destination_ {
    hosts: Vec<String>,
    port: u16,
    endpoints: Vec<Upstream>,
    protocol: PortProtocol,
}

fn upstream(d: &Destination, port: u16, mesh: &MeshConfig) -> Option<Upstream> {
    let ip: std::net::IpAddr = d.address.parse().ok()?;
    let identity = (d.sidecar && !d.plaintext_ports.contains(&port)).then(|| {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            mesh.trust_domain, d.namespace, d.service_account
        )
    });
    Some(Upstream {
        addr: SocketAddr::new(ip, port),
        identity,
    })
}

/// Every destination, keyed by cluster name (`outbound|PORT||HOST`, the first host).
fn destinations(wire: &WorkloadConfig) -> BTreeMap<String, Destination_> {
    let mut out = BTreeMap::new();
    for d in &wire.destinations {
        for (name, &port) in &d.ports {
            let Ok(port) = u16::try_from(port) else {
                continue;
            };
            if let Some(u) = upstream(d, port, &wire.mesh) {
                out.insert(
                    format!("outbound|{port}||{}", d.address),
                    Destination_ {
                        hosts: vec![d.address.clone()],
                        port,
                        endpoints: vec![u],
                        protocol: PortProtocol::from_port_name(name),
                    },
                );
            }
        }
    }
    let by_key: BTreeMap<&str, &Destination> = wire
        .destinations
        .iter()
        .map(|d| (d.key.as_str(), d))
        .collect();
    for s in &wire.services {
        let Some(first) = s.hosts.first() else {
            continue;
        };
        for p in &s.ports {
            let (Ok(number), Ok(target)) = (
                u16::try_from(p.number),
                u16::try_from(p.target_port.unwrap_or(p.number)),
            ) else {
                continue;
            };
            let endpoints = s
                .endpoints
                .iter()
                .filter_map(|k| by_key.get(k.as_str()))
                .filter_map(|d| upstream(d, target, &wire.mesh))
                .collect();
            out.insert(
                format!("outbound|{number}||{}", first.to_ascii_lowercase()),
                Destination_ {
                    hosts: s.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                    port: number,
                    endpoints,
                    protocol: PortProtocol::parse(&p.protocol).unwrap_or(PortProtocol::Unknown),
                },
            );
        }
    }
    out
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s.to_owned())),
    }
}

fn identity_struct(id: &str) -> Struct {
    Struct {
        fields: [(IDENTITY_FIELD.to_owned(), string_value(id))].into(),
    }
}

/// Mutual TLS to a server that must be `identity`, offering `alpn`.
fn upstream_mtls(identity: &str, sni: &str, alpn: &[&str]) -> TransportSocket {
    let ctx = UpstreamTlsContext {
        sni: sni.to_owned(),
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds_secret(CERT_SECRET)],
            alpn_protocols: alpn.iter().map(|a| (*a).to_owned()).collect(),
            validation_context_type: Some(
                common_tls_context::ValidationContextType::CombinedValidationContext(
                    common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                                san_type: subject_alt_name_matcher::SanType::Uri as i32,
                                matcher: Some(StringMatcher {
                                    match_pattern: Some(string_matcher::MatchPattern::Exact(
                                        identity.to_owned(),
                                    )),
                                    ignore_case: false,
                                }),
                                ..Default::default()
                            }],
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds_secret(ROOT_SECRET)),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    TransportSocket {
        name: TLS_TRANSPORT_SOCKET.to_owned(),
        config_type: Some(
            envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                pack_any(ctx),
            ),
        ),
    }
}

fn cluster(name: &str, d: &Destination_, http: bool) -> Cluster {
    let h2 = matches!(d.protocol, PortProtocol::Http2 | PortProtocol::Grpc);
    let alpn: &[&str] = match (http, h2) {
        (true, true) => &["istio-h2"],
        (true, false) => &["istio-http/1.1"],
        (false, _) => &["istio"],
    };
    // Istio's SNI for a service (`outbound_.PORT_._.HOST`); none for an address, as SNI may
    // not carry an IP literal (and rustls servers refuse a name that ends like one).
    let host = d.hosts.first().map(String::as_str).unwrap_or_default();
    let sni = if host.parse::<std::net::IpAddr>().is_ok() {
        String::new()
    } else {
        format!("outbound_.{}_._.{host}", d.port)
    };
    let mut identities: Vec<&str> = d
        .endpoints
        .iter()
        .filter_map(|e| e.identity.as_deref())
        .collect();
    identities.sort_unstable();
    identities.dedup();
    let lb_endpoints = d
        .endpoints
        .iter()
        .map(|e| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket(&e.addr.ip().to_string(), e.addr.port())),
                ..Default::default()
            })),
            metadata: e.identity.as_deref().map(|id| Metadata {
                filter_metadata: [(TRANSPORT_SOCKET_MATCH.to_owned(), identity_struct(id))].into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let mut c = Cluster {
        name: name.to_owned(),
        connect_timeout: Some(Duration {
            seconds: 10,
            nanos: 0,
        }),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.to_owned(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints,
                ..Default::default()
            }],
            ..Default::default()
        }),
        // An endpoint with a sidecar matches the entry of its identity; the others fall back
        // to the cluster's own (absent) transport socket: plaintext.
        transport_socket_matches: identities
            .iter()
            .map(|id| cluster::TransportSocketMatch {
                name: format!("mtls {id}"),
                r#match: Some(identity_struct(id)),
                transport_socket: Some(upstream_mtls(id, &sni, alpn)),
            })
            .collect(),
        ..Default::default()
    };
    if http && h2 {
        c.typed_extension_protocol_options
            .extend([crate::tls::http2_protocol_options()]);
    }
    c
}

fn router_filter() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".to_owned(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            Router::default(),
        ))),
        ..Default::default()
    }
}

/// The virtual host of one destination: `host:port` (and `host` alone on port 80, as a client
/// leaves the default port out of Host).
fn virtual_host(name: &str, d: &Destination_) -> VirtualHost {
    let mut domains = Vec::new();
    for h in &d.hosts {
        let host = if h.contains(':') {
            format!("[{h}]")
        } else {
            h.clone()
        };
        domains.push(format!("{host}:{}", d.port));
        if d.port == 80 {
            domains.push(host);
        }
    }
    VirtualHost {
        name: name.to_owned(),
        domains,
        routes: vec![Route {
            name: "default".to_owned(),
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_owned())),
                ..Default::default()
            }),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(name.to_owned())),
                // No route timeout, as Palisade's sidecar: the application decides how long
                // to wait (Envoy's default would cut responses after 15 s).
                timeout: Some(Duration {
                    seconds: 0,
                    nanos: 0,
                }),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The outbound listeners and clusters of `wire.workload`.
pub fn translate_outbound(
    wire: &WorkloadConfig,
    options: &OutboundOptions,
) -> Result<(Vec<Listener>, Vec<Cluster>), TranslateError> {
    let dests = destinations(wire);
    let mut listeners = Vec::new();
    let mut clusters: BTreeMap<String, Cluster> = BTreeMap::new();
    if let Some(listen) = options.http {
        let mut virtual_hosts = Vec::new();
        for (name, d) in &dests {
            // Ports declared TCP are reached through TCP upstreams, never as HTTP.
            if matches!(d.protocol, PortProtocol::Tcp | PortProtocol::Tls) {
                continue;
            }
            virtual_hosts.push(virtual_host(name, d));
            clusters.insert(name.clone(), cluster(name, d, true));
        }
        let hcm = HttpConnectionManager {
            stat_prefix: "outbound_http".to_owned(),
            http_filters: vec![router_filter()],
            route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
                RouteConfiguration {
                    name: "outbound".to_owned(),
                    virtual_hosts,
                    ..Default::default()
                },
            )),
            upgrade_configs: vec![http_connection_manager::UpgradeConfig {
                upgrade_type: "websocket".to_owned(),
                ..Default::default()
            }],
            ..Default::default()
        };
        listeners.push(Listener {
            name: format!("outbound_http_{listen}"),
            address: Some(socket(&listen.ip().to_string(), listen.port())),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.http_connection_manager".to_owned(),
                    config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
                }],
                ..Default::default()
            }],
            traffic_direction: TrafficDirection::Outbound as i32,
            ..Default::default()
        });
    }
    for t in &options.tcp {
        let host = t.host.to_ascii_lowercase();
        let Some((name, d)) = dests
            .iter()
            .find(|(_, d)| d.port == t.port && d.hosts.contains(&host))
        else {
            return Err(TranslateError::invalid(
                &format!("TCP upstream {}", t.listen),
                format!(
                    "{}:{} is neither a ServiceEntry host and port nor a workload address and port of the mesh",
                    t.host, t.port
                ),
            ));
        };
        let cluster_name = format!("{name}|tcp");
        clusters.insert(cluster_name.clone(), cluster(&cluster_name, d, false));
        listeners.push(Listener {
            name: format!("outbound_tcp_{}", t.listen),
            address: Some(socket(&t.listen.ip().to_string(), t.listen.port())),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.tcp_proxy".to_owned(),
                    config_type: Some(filter::ConfigType::TypedConfig(pack_any(TcpProxy {
                        stat_prefix: cluster_name.clone(),
                        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(
                            cluster_name.clone(),
                        )),
                        ..Default::default()
                    }))),
                }],
                ..Default::default()
            }],
            traffic_direction: TrafficDirection::Outbound as i32,
            ..Default::default()
        });
    }
    Ok((listeners, clusters.into_values().collect()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// `apps/client`; `apps/api` has a sidecar, `apps/legacy` none; the ServiceEntry
    /// `api.apps.svc:80` selects both (target port 8080).
    fn wire() -> WorkloadConfig {
        let doc = serde_json::json!({
            "workload": "apps/client",
            "mesh": {"trustDomain": "cluster.local"},
            "workloadEntry": {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                "metadata": {"name": "client", "namespace": "apps"},
                "spec": {"address": "10.0.0.1", "serviceAccount": "client"}},
            "destinations": [
                {"key": "apps/api", "namespace": "apps", "address": "10.0.0.2",
                 "serviceAccount": "api", "ports": {"http": 8080, "tcp-db": 5432},
                 "sidecar": true},
                {"key": "apps/legacy", "namespace": "apps", "address": "10.0.0.3",
                 "serviceAccount": "legacy", "ports": {"http": 8080}, "sidecar": false}
            ],
            "services": [
                {"name": "apps/api", "hosts": ["api.apps.svc"],
                 "ports": [{"number": 80, "targetPort": 8080, "protocol": "HTTP"}],
                 "endpoints": ["apps/api", "apps/legacy"]}
            ]
        });
        WorkloadConfig::from_json(doc.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn services_and_workloads_get_clusters_with_auto_mtls_per_endpoint() {
        let options = OutboundOptions {
            http: Some("127.0.0.1:15001".parse().unwrap()),
            tcp: vec![TcpUpstream {
                listen: "127.0.0.1:15432".parse().unwrap(),
                host: "10.0.0.2".into(),
                port: 5432,
            }],
        };
        let (listeners, clusters) = translate_outbound(&wire(), &options).unwrap();
        assert_eq!(listeners.len(), 2);
        let svc = clusters
            .iter()
            .find(|c| c.name == "outbound|80||api.apps.svc")
            .unwrap();
        let eps = &svc.load_assignment.as_ref().unwrap().endpoints[0].lb_endpoints;
        assert_eq!(eps.len(), 2, "api and legacy");
        // api has a sidecar: mTLS expecting exactly its identity; legacy: plaintext.
        assert_eq!(svc.transport_socket_matches.len(), 1);
        assert_eq!(
            svc.transport_socket_matches[0].name,
            "mtls spiffe://cluster.local/ns/apps/sa/api"
        );
        assert_eq!(eps.iter().filter(|e| e.metadata.is_some()).count(), 1);
        assert!(svc.transport_socket.is_none());
        // The TCP upstream reaches the workload port, with the mesh TCP ALPN.
        assert!(
            clusters
                .iter()
                .any(|c| c.name == "outbound|5432||10.0.0.2|tcp")
        );
        // HTTP virtual hosts: the service on port 80 answers with and without the port.
        let dump = crate::json::listener(&listeners[0]).to_string();
        assert!(dump.contains("\"api.apps.svc:80\"") && dump.contains("\"api.apps.svc\""));
        assert!(
            !dump.contains("5432"),
            "TCP ports are not HTTP routes: {dump}"
        );
        for c in &clusters {
            assert!(
                !crate::json::cluster(c)
                    .to_string()
                    .contains(crate::json::UNPRINTED),
                "{}",
                crate::json::cluster(c)
            );
        }
    }

    #[test]
    fn an_unknown_tcp_upstream_is_refused_by_name() {
        let options = OutboundOptions {
            http: None,
            tcp: vec![TcpUpstream {
                listen: "127.0.0.1:15433".parse().unwrap(),
                host: "db.example".into(),
                port: 5432,
            }],
        };
        let err = translate_outbound(&wire(), &options)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("127.0.0.1:15433") && err.contains("db.example:5432"),
            "{err}"
        );
    }
}
