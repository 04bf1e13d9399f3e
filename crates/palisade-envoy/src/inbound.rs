//! The inbound side of an Envoy sidecar, as istiod builds it for each workload port: filter
//! chains by the port's effective PeerAuthentication mode (STRICT: mutual TLS only; PERMISSIVE:
//! `tls_inspector`, a mutual-TLS chain for the mesh ALPNs and a plaintext chain; DISABLE:
//! plaintext), then the HTTP connection manager (RBAC filters, router to the application) on
//! HTTP ports or network RBAC and TCP proxy on the others, and one `inbound|PORT||` cluster per
//! port to the application on loopback.
//!
//! Palisade's listening model: one listener per port on the workload's own address (no
//! iptables capture, so no `virtualInbound` on 15006), the application on `127.0.0.1:APPPORT`.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, SocketAddress, TrafficDirection, address, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::JwtAuthentication;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::{BoolValue, Duration};
use envoy_types::util::pack_any;
use palisade_policy::api::MtlsMode;
use palisade_policy::workload_config::WorkloadConfig;
use palisade_policy::{PathNormalization, PortProtocol};

use crate::TranslateError;
use crate::jwt::JWT_FILTER;
use crate::rbac::{self, HTTP_RBAC_FILTER, NETWORK_RBAC_FILTER};
use crate::tls::inbound_mtls;

/// The annotation that names a port's application port (the same key Palisade's sidecar reads).
pub const APP_PORT_ANNOTATION_PREFIX: &str = "palisade.dev/app-port-";
/// The ALPN values a mesh client offers (istiod's `mtlsHTTPALPNs` / `mtlsTCPALPNs`): a
/// PERMISSIVE port terminates mutual TLS only for these.
pub const MESH_ALPNS: [&str; 5] = [
    "istio-peer-exchange",
    "istio",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
];
/// The ALPN a STRICT or mesh HTTP chain offers (istiod's `ALPNHttp`).
const HTTP_ALPNS: [&str; 2] = ["h2", "http/1.1"];

const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
const TCP_PROXY_FILTER: &str = "envoy.filters.network.tcp_proxy";
const ROUTER_FILTER: &str = "envoy.filters.http.router";
const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";

/// What one Envoy workload gets: listeners and clusters.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvoyResources {
    /// `namespace/name`.
    pub workload: String,
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Cluster>,
}

/// One workload port as the translation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InboundPort {
    name: String,
    port: u16,
    app_port: u16,
    protocol: PortProtocol,
    mode: MtlsMode,
}

/// Translates the inbound side of `wire.workload`. `app_ports` overrides where the
/// application listens (else the `palisade.dev/app-port-<PORT>` annotation, else the port).
pub fn translate_inbound(
    wire: &WorkloadConfig,
    app_ports: &BTreeMap<u16, u16>,
) -> Result<EnvoyResources, TranslateError> {
    let what = format!("WorkloadEntry {}", wire.workload);
    let snapshot = wire
        .snapshot()
        .map_err(|e| TranslateError::invalid(&what, e.to_string()))?;
    let resolved = snapshot
        .resolve_workload(&wire.workload)
        .ok_or_else(|| TranslateError::invalid(&what, "not in its own config"))?;
    let jwt = crate::jwt::build(&resolved.jwt_rules)?;
    let trust_domains = wire.mesh.trust_domain_bundle();
    let http_rbac = rbac::build(&resolved.authorization, &trust_domains, false)?;
    let tcp_rbac = rbac::build(&resolved.authorization, &trust_domains, true)?;
    let normalization = wire.mesh.path_normalization_mode();
    let address = wire.workload_entry.spec.address.clone();

    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    for p in ports(wire, app_ports, &resolved.mtls)? {
        let cluster_name = format!("inbound|{}||", p.port);
        let stat_prefix = format!("inbound_{address}_{}", p.port);
        let filters = match p.protocol {
            PortProtocol::Http | PortProtocol::Http2 | PortProtocol::Grpc => vec![hcm(
                &p,
                &cluster_name,
                &stat_prefix,
                jwt.as_ref(),
                &http_rbac,
                normalization,
            )],
            PortProtocol::Tcp | PortProtocol::Tls => {
                let mut f: Vec<Filter> = tcp_rbac
                    .iter()
                    .map(|b| Filter {
                        name: NETWORK_RBAC_FILTER.to_owned(),
                        config_type: Some(filter::ConfigType::TypedConfig(pack_any(b.network()))),
                    })
                    .collect();
                f.push(Filter {
                    name: TCP_PROXY_FILTER.to_owned(),
                    config_type: Some(filter::ConfigType::TypedConfig(pack_any(TcpProxy {
                        stat_prefix: cluster_name.clone(),
                        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(
                            cluster_name.clone(),
                        )),
                        ..Default::default()
                    }))),
                });
                f
            }
            other => {
                return Err(TranslateError::not_translated(
                    &what,
                    &format!("spec.ports.{}", p.name),
                    &format!(
                        "{other:?} ports (gRPC-Web, protocol sniffing) are translated in a \
                         later step; declare the port's protocol (http, http2, grpc, tcp)"
                    ),
                ));
            }
        };
        let alpn: &[&str] = if p.protocol.is_http() {
            &HTTP_ALPNS
        } else {
            &[]
        };
        let chain = |name: &str, tls: bool, m: Option<FilterChainMatch>| FilterChain {
            name: format!("{stat_prefix}_{name}"),
            filter_chain_match: m,
            filters: filters.clone(),
            transport_socket: tls.then(|| inbound_mtls(&trust_domains, alpn)),
            ..Default::default()
        };
        let (chains, listener_filters) = match p.mode {
            MtlsMode::Strict => (vec![chain("mtls", true, None)], vec![]),
            MtlsMode::Disable => (vec![chain("plaintext", false, None)], vec![]),
            // UNSET never reaches here (resolution gives an effective mode); PERMISSIVE is the
            // default, so read it as PERMISSIVE rather than fail.
            _ => (
                vec![
                    chain(
                        "mtls",
                        true,
                        Some(FilterChainMatch {
                            transport_protocol: "tls".to_owned(),
                            application_protocols: MESH_ALPNS
                                .iter()
                                .map(|a| (*a).to_owned())
                                .collect(),
                            ..Default::default()
                        }),
                    ),
                    chain("plaintext", false, None),
                ],
                vec![ListenerFilter {
                    name: TLS_INSPECTOR.to_owned(),
                    config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
                        TlsInspector::default(),
                    ))),
                    ..Default::default()
                }],
            ),
        };
        listeners.push(Listener {
            name: format!("{address}_{}", p.port),
            address: Some(socket(&address, p.port)),
            filter_chains: chains,
            listener_filters,
            traffic_direction: TrafficDirection::Inbound as i32,
            ..Default::default()
        });
        let mut cluster = app_cluster(&cluster_name, p.app_port);
        if matches!(p.protocol, PortProtocol::Http2 | PortProtocol::Grpc) {
            // HTTP/2 ports reach the application over h2c, as Palisade's sidecar does.
            cluster
                .typed_extension_protocol_options
                .extend([crate::tls::http2_protocol_options()]);
        }
        clusters.push(cluster);
    }
    Ok(EnvoyResources {
        workload: wire.workload.clone(),
        listeners,
        clusters,
    })
}

/// The workload's ports, sorted, with application port, declared protocol and mTLS mode.
fn ports(
    wire: &WorkloadConfig,
    app_ports: &BTreeMap<u16, u16>,
    mtls: &palisade_policy::resolve::MtlsResolution,
) -> Result<Vec<InboundPort>, TranslateError> {
    let entry = &wire.workload_entry;
    let what = format!("WorkloadEntry {}", wire.workload);
    let mut out = Vec::new();
    for (name, &port) in &entry.spec.ports {
        let port = u16::try_from(port)
            .map_err(|_| TranslateError::invalid(&what, format!("port {port} out of range")))?;
        let key = format!("{APP_PORT_ANNOTATION_PREFIX}{port}");
        let app_port = match app_ports.get(&port) {
            Some(&p) => p,
            None => match entry.metadata.annotations.get(&key) {
                Some(v) => v.parse().map_err(|_| {
                    TranslateError::invalid(
                        &what,
                        format!("annotation {key}: {v:?} is not a port number"),
                    )
                })?,
                None => port,
            },
        };
        out.push(InboundPort {
            name: name.clone(),
            port,
            app_port,
            protocol: declared_protocol(wire, name, port),
            mode: mtls.for_port(port).mode,
        });
    }
    out.sort_by_key(|p| p.port);
    Ok(out)
}

/// A ServiceEntry that selects the workload and targets the port with a `protocol` decides,
/// else the port name (the rule Palisade's sidecar follows).
fn declared_protocol(wire: &WorkloadConfig, name: &str, port: u16) -> PortProtocol {
    wire.services
        .iter()
        .filter(|s| s.endpoints.contains(&wire.workload))
        .flat_map(|s| &s.ports)
        .filter(|p| p.target_port.unwrap_or(p.number) == u32::from(port))
        .find_map(|p| PortProtocol::parse(&p.protocol))
        .unwrap_or_else(|| PortProtocol::from_port_name(name))
}

pub(crate) fn socket(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_owned(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// The HTTP connection manager of an inbound HTTP port, with istiod's inbound settings:
/// `x-forwarded-client-cert` sanitized then set to the peer URI, path normalization from
/// MeshConfig, WebSocket upgrades, no route timeout.
fn hcm(
    p: &InboundPort,
    cluster: &str,
    stat_prefix: &str,
    jwt: Option<&JwtAuthentication>,
    rbac: &[rbac::BuiltRules],
    normalization: PathNormalization,
) -> Filter {
    // istiod: jwt_authn first, so the RBAC filters read its payload metadata.
    let mut http_filters: Vec<HttpFilter> = jwt
        .map(|j| HttpFilter {
            name: JWT_FILTER.to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(j.clone()))),
            ..Default::default()
        })
        .into_iter()
        .collect();
    http_filters.extend(rbac.iter().map(|b| HttpFilter {
        name: HTTP_RBAC_FILTER.to_owned(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(b.http()))),
        ..Default::default()
    }));
    http_filters.push(HttpFilter {
        name: ROUTER_FILTER.to_owned(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            Router::default(),
        ))),
        ..Default::default()
    });
    let route_config = RouteConfiguration {
        name: cluster.to_owned(),
        virtual_hosts: vec![VirtualHost {
            name: format!("inbound|http|{}", p.port),
            domains: vec!["*".to_owned()],
            routes: vec![Route {
                name: "default".to_owned(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_owned())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        cluster.to_owned(),
                    )),
                    timeout: Some(Duration {
                        seconds: 0,
                        nanos: 0,
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let (normalize, merge, escaped) = match normalization {
        PathNormalization::None => (false, false, 0),
        PathNormalization::Base => (true, false, 0),
        PathNormalization::MergeSlashes => (true, true, 0),
        PathNormalization::DecodeAndMergeSlashes => (
            true,
            true,
            http_connection_manager::PathWithEscapedSlashesAction::UnescapeAndForward as i32,
        ),
    };
    let hcm = HttpConnectionManager {
        stat_prefix: stat_prefix.to_owned(),
        http_filters,
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            route_config,
        )),
        forward_client_cert_details: http_connection_manager::ForwardClientCertDetails::SanitizeSet
            as i32,
        set_current_client_cert_details: Some(
            http_connection_manager::SetCurrentClientCertDetails {
                uri: true,
                ..Default::default()
            },
        ),
        // istiod allows WebSocket upgrades on every HTTP connection manager.
        upgrade_configs: vec![http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".to_owned(),
            ..Default::default()
        }],
        normalize_path: Some(BoolValue { value: normalize }),
        merge_slashes: merge,
        path_with_escaped_slashes_action: escaped,
        ..Default::default()
    };
    Filter {
        name: HCM_FILTER.to_owned(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
    }
}

/// `inbound|PORT||`: the application on loopback.
fn app_cluster(name: &str, app_port: u16) -> Cluster {
    Cluster {
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
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket("127.0.0.1", app_port)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use palisade_policy::MeshSnapshot;

    fn wire(yaml: &str) -> WorkloadConfig {
        let s = MeshSnapshot::from_sources(
            Some((
                "mesh.yaml",
                "trustDomain: cluster.local\ntrustDomainAliases: [old.td]\n",
            )),
            &[("w.yaml".to_owned(), yaml.to_owned())],
        )
        .unwrap();
        let own = s.workload("demo/server").unwrap();
        WorkloadConfig {
            workload: "demo/server".to_owned(),
            mesh: s.mesh.clone(),
            workload_entry: (*own.resource).clone(),
            peer_authentications: s
                .peer_authentications
                .iter()
                .map(|p| (*p.resource).clone())
                .collect(),
            request_authentications: s
                .request_authentications
                .iter()
                .map(|p| (*p.resource).clone())
                .collect(),
            authorization_policies: s
                .authorization_policies
                .iter()
                .map(|p| (*p.resource).clone())
                .collect(),
            destinations: vec![],
            services: vec![],
        }
    }

    const SERVER: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: server, namespace: demo, annotations: {palisade.dev/app-port-9000: "19000"}}
spec:
  address: 127.0.67.1
  labels: {app: server}
  ports: {http: 8080, http-permissive: 8081, http-plain: 8082, tcp: 9000}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: server, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  mtls: {mode: STRICT}
  portLevelMtls: {"8081": {mode: PERMISSIVE}, "8082": {mode: DISABLE}}
"#;

    #[test]
    fn chains_follow_the_port_mode_and_protocol() {
        let out = translate_inbound(&wire(SERVER), &[(8080, 18080)].into()).unwrap();
        let doc = crate::json::resources(&out);
        // (listener, chain names, has tls_inspector, first filter, cluster endpoint port)
        let cases = [
            (
                "127.0.67.1_8080",
                vec!["inbound_127.0.67.1_8080_mtls"],
                false,
                HCM_FILTER,
                18080,
            ),
            (
                "127.0.67.1_8081",
                vec![
                    "inbound_127.0.67.1_8081_mtls",
                    "inbound_127.0.67.1_8081_plaintext",
                ],
                true,
                HCM_FILTER,
                8081,
            ),
            (
                "127.0.67.1_8082",
                vec!["inbound_127.0.67.1_8082_plaintext"],
                false,
                HCM_FILTER,
                8082,
            ),
            (
                "127.0.67.1_9000",
                vec!["inbound_127.0.67.1_9000_mtls"],
                false,
                TCP_PROXY_FILTER,
                19000,
            ),
        ];
        let listeners = doc["listeners"].as_array().unwrap();
        assert_eq!(listeners.len(), cases.len());
        for ((name, chains, inspector, filter, app), l) in cases.iter().zip(listeners) {
            assert_eq!(l["name"], *name);
            let got: Vec<&str> = l["filter_chains"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap())
                .collect();
            assert_eq!(&got, chains, "{name}");
            assert_eq!(l.get("listener_filters").is_some(), *inspector, "{name}");
            assert_eq!(
                l["filter_chains"][0]["filters"][0]["name"], *filter,
                "{name}"
            );
            let port: u16 = name.rsplit('_').next().unwrap().parse().unwrap();
            let c = doc["clusters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == format!("inbound|{port}||"))
                .unwrap();
            assert_eq!(
                c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                    ["port_value"],
                *app,
                "{name}"
            );
        }
        let strict = &listeners[0]["filter_chains"][0];
        let tls = &strict["transport_socket"]["typed_config"];
        assert_eq!(tls["require_client_certificate"], true);
        let sans = &tls["common_tls_context"]["combined_validation_context"]["default_validation_context"]
            ["match_typed_subject_alt_names"];
        assert_eq!(sans[0]["matcher"]["prefix"], "spiffe://cluster.local/");
        assert_eq!(sans[1]["matcher"]["prefix"], "spiffe://old.td/");
        let hcm = &strict["filters"][0]["typed_config"];
        assert_eq!(hcm["forward_client_cert_details"], "SANITIZE_SET");
        assert_eq!(hcm["set_current_client_cert_details"]["uri"], true);
        assert_eq!(hcm["upgrade_configs"][0]["upgrade_type"], "websocket");
        assert_eq!(hcm["normalize_path"], true);
        let permissive = &listeners[1]["filter_chains"][0]["filter_chain_match"];
        assert_eq!(permissive["transport_protocol"], "tls");
        assert_eq!(permissive["application_protocols"][3], "istio-http/1.1");
    }

    #[test]
    fn http2_and_grpc_ports_reach_the_application_over_h2c() {
        let yaml = SERVER.replace("tcp: 9000", "grpc: 9000, http2-api: 9001");
        let out = translate_inbound(&wire(&yaml), &BTreeMap::new()).unwrap();
        let doc = crate::json::resources(&out);
        for (cluster, h2) in [
            ("inbound|8080||", false),
            ("inbound|9000||", true),
            ("inbound|9001||", true),
        ] {
            let c = doc["clusters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == cluster)
                .unwrap();
            assert_eq!(
                c.get("typed_extension_protocol_options").is_some(),
                h2,
                "{cluster}"
            );
        }
        let grpc = &doc["listeners"][3]["filter_chains"][0]["filters"][0]["name"];
        assert_eq!(grpc, HCM_FILTER);
    }

    /// istiod's HTTP filter order: jwt_authn, then the RBAC filters (they read its payload),
    /// then the router; TCP chains get no jwt_authn.
    #[test]
    fn jwt_authn_precedes_rbac_on_http_chains() {
        let yaml = format!(
            "{SERVER}---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: demo}}\nspec: {{jwtRules: [{{issuer: a, jwks: '{{\"keys\":[]}}'}}]}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: demo}}\nspec: {{rules: [{{from: [{{source: {{requestPrincipals: [\"a/b\"]}}}}]}}]}}\n"
        );
        let out = translate_inbound(&wire(&yaml), &BTreeMap::new()).unwrap();
        let doc = crate::json::resources(&out);
        let filters = |l: usize| -> Vec<String> {
            let f = &doc["listeners"][l]["filter_chains"][0]["filters"];
            let hcm = &f[0]["typed_config"]["http_filters"];
            match hcm.as_array() {
                Some(h) => h
                    .iter()
                    .map(|x| x["name"].as_str().unwrap().to_owned())
                    .collect(),
                None => f
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["name"].as_str().unwrap().to_owned())
                    .collect(),
            }
        };
        assert_eq!(
            filters(0),
            [JWT_FILTER, rbac::HTTP_RBAC_FILTER, ROUTER_FILTER]
        );
        assert_eq!(filters(3), [NETWORK_RBAC_FILTER, TCP_PROXY_FILTER]);
        assert!(!doc.to_string().contains(crate::json::UNPRINTED));
    }

    #[test]
    fn untranslated_inputs_are_refused() {
        let cases = [
            (
                "RequestAuthentication",
                "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: demo}\nspec: {jwtRules: [{issuer: a, jwksUri: 'https://a/keys'}]}\n",
                "RequestAuthentication demo/jwt: spec.jwtRules[issuer=a].jwksUri",
            ),
            ("grpc-web port", "", "spec.ports.grpc"),
        ];
        for (name, extra, want) in cases {
            let mut yaml = format!("{SERVER}{extra}");
            if name == "grpc-web port" {
                yaml = yaml.replace("tcp: 9000", "grpc-web: 9000");
            }
            let err = translate_inbound(&wire(&yaml), &BTreeMap::new())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(want) && err.contains("not translated"),
                "{name}: {err}"
            );
        }
    }
}
