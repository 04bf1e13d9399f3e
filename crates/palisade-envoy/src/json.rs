//! Envoy's JSON for the resources this crate emits, as Envoy's `/config_dump` prints them
//! (proto3 JSON with the proto field names: defaults omitted, enums by name, durations as
//! `"1s"`, wrappers as plain values, `Any` with its `@type` inline). `envoy-types` carries no
//! serializer, so this maps exactly the messages and fields the translator sets; a field or
//! `Any` type it does not know is printed as an `"@unprinted"` marker (a unit test keeps the
//! translator's output free of them), never silently left out.

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::core::v3::{
    Address, ApiConfigSource, ConfigSource, GrpcService, TransportSocket, address, config_source,
    grpc_service, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, principal,
};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, RouteConfiguration, header_matcher, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    JwtAuthentication, JwtProvider, JwtRequirement, jwt_provider, jwt_requirement, requirement_rule,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, UpstreamTlsContext,
    common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    MetadataMatcher, StringMatcher, ValueMatcher, list_matcher, metadata_matcher, path_matcher,
    string_matcher, value_matcher,
};
use envoy_types::pb::google::protobuf::{Any, Duration};
use prost::{Message, Name};
use serde_json::{Map, Value, json};

use crate::EnvoyResources;

/// The key of everything this module cannot print.
pub const UNPRINTED: &str = "@unprinted";

/// A JSON object that leaves out proto3 defaults.
#[derive(Default)]
struct Obj(Map<String, Value>);

impl Obj {
    fn new() -> Self {
        Obj::default()
    }
    fn typed(url: &str) -> Self {
        let mut o = Obj::new();
        o.0.insert("@type".to_owned(), Value::String(url.to_owned()));
        o
    }
    fn str(mut self, k: &str, v: &str) -> Self {
        if !v.is_empty() {
            self.0.insert(k.to_owned(), Value::String(v.to_owned()));
        }
        self
    }
    fn bool(mut self, k: &str, v: bool) -> Self {
        if v {
            self.0.insert(k.to_owned(), Value::Bool(true));
        }
        self
    }
    fn num(mut self, k: &str, v: u32) -> Self {
        if v != 0 {
            self.0.insert(k.to_owned(), json!(v));
        }
        self
    }
    fn val(mut self, k: &str, v: Value) -> Self {
        self.0.insert(k.to_owned(), v);
        self
    }
    fn opt(mut self, k: &str, v: Option<Value>) -> Self {
        if let Some(v) = v {
            self.0.insert(k.to_owned(), v);
        }
        self
    }
    fn list<T>(mut self, k: &str, items: &[T], f: impl Fn(&T) -> Value) -> Self {
        if !items.is_empty() {
            self.0
                .insert(k.to_owned(), Value::Array(items.iter().map(f).collect()));
        }
        self
    }
    fn enumv(mut self, k: &str, name: Option<&str>, raw: i32) -> Self {
        if raw != 0 {
            let v = match name {
                Some(n) => Value::String(n.to_owned()),
                None => json!(raw),
            };
            self.0.insert(k.to_owned(), v);
        }
        self
    }
    fn done(self) -> Value {
        Value::Object(self.0)
    }
}

fn unprinted(what: &str) -> Value {
    json!({ UNPRINTED: what })
}

/// The resources as two `config_dump` sections (listeners, then clusters).
pub fn config_dump(r: &EnvoyResources) -> Value {
    json!({ "configs": [
        {
            "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "static_listeners": r.listeners.iter().map(|l| json!({ "listener": typed_listener(l) })).collect::<Vec<_>>(),
        },
        {
            "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "static_clusters": r.clusters.iter().map(|c| json!({ "cluster": typed_cluster(c) })).collect::<Vec<_>>(),
        },
    ]})
}

/// Listeners and clusters as plain messages (what a bootstrap's `static_resources` holds).
pub fn resources(r: &EnvoyResources) -> Value {
    json!({
        "listeners": r.listeners.iter().map(listener).collect::<Vec<_>>(),
        "clusters": r.clusters.iter().map(cluster).collect::<Vec<_>>(),
    })
}

fn with_type(url: String, v: Value) -> Value {
    let mut o = Obj::typed(&url);
    if let Value::Object(m) = v {
        o.0.extend(m);
    }
    o.done()
}

fn typed_listener(l: &Listener) -> Value {
    with_type(Listener::type_url(), listener(l))
}

fn typed_cluster(c: &Cluster) -> Value {
    with_type(Cluster::type_url(), cluster(c))
}

pub fn listener(l: &Listener) -> Value {
    let direction =
        envoy_types::pb::envoy::config::core::v3::TrafficDirection::try_from(l.traffic_direction)
            .ok()
            .map(|d| d.as_str_name());
    Obj::new()
        .str("name", &l.name)
        .opt("address", l.address.as_ref().map(address))
        .list("filter_chains", &l.filter_chains, filter_chain)
        .list("listener_filters", &l.listener_filters, listener_filter)
        .enumv("traffic_direction", direction, l.traffic_direction)
        .done()
}

fn address(a: &Address) -> Value {
    match &a.address {
        Some(address::Address::SocketAddress(s)) => {
            let port = match s.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) => p,
                _ => 0,
            };
            json!({ "socket_address": Obj::new().str("address", &s.address).num("port_value", port).done() })
        }
        Some(address::Address::Pipe(p)) => {
            json!({ "pipe": Obj::new().str("path", &p.path).num("mode", p.mode).done() })
        }
        _ => unprinted("Address"),
    }
}

fn filter_chain(c: &FilterChain) -> Value {
    Obj::new()
        .opt(
            "filter_chain_match",
            c.filter_chain_match.as_ref().map(|m| {
                Obj::new()
                    .str("transport_protocol", &m.transport_protocol)
                    .list("application_protocols", &m.application_protocols, |s| {
                        json!(s)
                    })
                    .done()
            }),
        )
        .list("filters", &c.filters, network_filter)
        .opt(
            "transport_socket",
            c.transport_socket.as_ref().map(transport),
        )
        .str("name", &c.name)
        .done()
}

fn network_filter(f: &Filter) -> Value {
    let typed = match &f.config_type {
        Some(filter::ConfigType::TypedConfig(a)) => Some(any(a)),
        Some(_) => Some(unprinted("Filter.config_type")),
        None => None,
    };
    Obj::new()
        .str("name", &f.name)
        .opt("typed_config", typed)
        .done()
}

fn listener_filter(f: &ListenerFilter) -> Value {
    let typed = match &f.config_type {
        Some(listener_filter::ConfigType::TypedConfig(a)) => Some(any(a)),
        Some(_) => Some(unprinted("ListenerFilter.config_type")),
        None => None,
    };
    Obj::new()
        .str("name", &f.name)
        .opt("typed_config", typed)
        .done()
}

fn transport(t: &TransportSocket) -> Value {
    let typed = t
        .config_type
        .as_ref()
        .map(|transport_socket::ConfigType::TypedConfig(a)| any(a));
    Obj::new()
        .str("name", &t.name)
        .opt("typed_config", typed)
        .done()
}

/// An `Any` with its message inline, for the types the translator packs.
pub fn any(a: &Any) -> Value {
    fn decode<T: Message + Default>(a: &Any, f: impl Fn(&T) -> Value) -> Value {
        match T::decode(a.value.as_slice()) {
            Ok(m) => with_type(a.type_url.clone(), f(&m)),
            Err(e) => unprinted(&format!("{}: {e}", a.type_url)),
        }
    }
    let url = a.type_url.as_str();
    if url == DownstreamTlsContext::type_url() {
        decode(a, downstream_tls)
    } else if url == UpstreamTlsContext::type_url() {
        decode(a, upstream_tls)
    } else if url == HttpConnectionManager::type_url() {
        decode(a, hcm)
    } else if url == TcpProxy::type_url() {
        decode(a, tcp)
    } else if url == Router::type_url() {
        decode(a, |_: &Router| json!({}))
    } else if url == TlsInspector::type_url() {
        decode(a, |_: &TlsInspector| json!({}))
    } else if url == JwtAuthentication::type_url() {
        decode(a, jwt_authn)
    } else if url == HttpRbac::type_url() {
        decode(a, http_rbac)
    } else if url == NetworkRbac::type_url() {
        decode(a, network_rbac)
    } else if url == UriTemplateMatchConfig::type_url() {
        decode(a, |m: &UriTemplateMatchConfig| {
            Obj::new().str("path_template", &m.path_template).done()
        })
    } else if url == HttpProtocolOptions::type_url() {
        decode(a, http_protocol)
    } else {
        unprinted(url)
    }
}

fn common_tls(c: &CommonTlsContext) -> Value {
    {
        let validation = match &c.validation_context_type {
            Some(common_tls_context::ValidationContextType::CombinedValidationContext(v)) => {
                let default = v.default_validation_context.as_ref().map(|d| {
                    Obj::new()
                        .list(
                            "match_typed_subject_alt_names",
                            &d.match_typed_subject_alt_names,
                            |m| {
                                let kind = subject_alt_name_matcher::SanType::try_from(m.san_type)
                                    .ok()
                                    .map(|t| t.as_str_name());
                                Obj::new()
                                    .enumv("san_type", kind, m.san_type)
                                    .opt("matcher", m.matcher.as_ref().map(string_matcher))
                                    .done()
                            },
                        )
                        .done()
                });
                Some((
                    "combined_validation_context",
                    Obj::new()
                        .opt("default_validation_context", default)
                        .opt(
                            "validation_context_sds_secret_config",
                            v.validation_context_sds_secret_config.as_ref().map(sds),
                        )
                        .done(),
                ))
            }
            Some(_) => Some((
                "validation_context_type",
                unprinted("ValidationContextType"),
            )),
            None => None,
        };
        let mut o = Obj::new()
            .list(
                "tls_certificate_sds_secret_configs",
                &c.tls_certificate_sds_secret_configs,
                sds,
            )
            .list("alpn_protocols", &c.alpn_protocols, |s| json!(s));
        if let Some((k, v)) = validation {
            o = o.val(k, v);
        }
        o.done()
    }
}

fn downstream_tls(t: &DownstreamTlsContext) -> Value {
    Obj::new()
        .opt(
            "common_tls_context",
            t.common_tls_context.as_ref().map(common_tls),
        )
        .opt(
            "require_client_certificate",
            t.require_client_certificate.map(|b| json!(b.value)),
        )
        .done()
}

fn upstream_tls(t: &UpstreamTlsContext) -> Value {
    Obj::new()
        .opt(
            "common_tls_context",
            t.common_tls_context.as_ref().map(common_tls),
        )
        .str("sni", &t.sni)
        .done()
}

fn sds(s: &SdsSecretConfig) -> Value {
    Obj::new()
        .str("name", &s.name)
        .opt("sds_config", s.sds_config.as_ref().map(config_source))
        .done()
}

fn config_source(c: &ConfigSource) -> Value {
    let api = match &c.config_source_specifier {
        Some(config_source::ConfigSourceSpecifier::ApiConfigSource(a)) => {
            Some(("api_config_source", api_config_source(a)))
        }
        Some(_) => Some((
            "config_source_specifier",
            unprinted("ConfigSourceSpecifier"),
        )),
        None => None,
    };
    let version = |v: i32| {
        envoy_types::pb::envoy::config::core::v3::ApiVersion::try_from(v)
            .ok()
            .map(|x| x.as_str_name())
    };
    let mut o = Obj::new()
        .opt(
            "initial_fetch_timeout",
            c.initial_fetch_timeout.as_ref().map(duration),
        )
        .enumv(
            "resource_api_version",
            version(c.resource_api_version),
            c.resource_api_version,
        );
    if let Some((k, v)) = api {
        o = o.val(k, v);
    }
    o.done()
}

fn api_config_source(a: &ApiConfigSource) -> Value {
    let api_type =
        envoy_types::pb::envoy::config::core::v3::api_config_source::ApiType::try_from(a.api_type)
            .ok()
            .map(|t| t.as_str_name());
    let version =
        envoy_types::pb::envoy::config::core::v3::ApiVersion::try_from(a.transport_api_version)
            .ok()
            .map(|x| x.as_str_name());
    Obj::new()
        .enumv("api_type", api_type, a.api_type)
        .enumv("transport_api_version", version, a.transport_api_version)
        .list("grpc_services", &a.grpc_services, grpc)
        .bool(
            "set_node_on_first_message_only",
            a.set_node_on_first_message_only,
        )
        .done()
}

fn grpc(g: &GrpcService) -> Value {
    match &g.target_specifier {
        Some(grpc_service::TargetSpecifier::EnvoyGrpc(e)) => {
            json!({ "envoy_grpc": Obj::new().str("cluster_name", &e.cluster_name).str("authority", &e.authority).done() })
        }
        _ => unprinted("GrpcService"),
    }
}

fn duration(d: &Duration) -> Value {
    if d.nanos == 0 {
        json!(format!("{}s", d.seconds))
    } else {
        let frac = format!("{:09}", d.nanos);
        json!(format!("{}.{}s", d.seconds, frac.trim_end_matches('0')))
    }
}

fn hcm(h: &HttpConnectionManager) -> Value {
    let route = match &h.route_specifier {
        Some(http_connection_manager::RouteSpecifier::RouteConfig(r)) => Some(route_config(r)),
        Some(_) => Some(unprinted("RouteSpecifier")),
        None => None,
    };
    let fcc =
        http_connection_manager::ForwardClientCertDetails::try_from(h.forward_client_cert_details)
            .ok()
            .map(|x| x.as_str_name());
    let escaped = http_connection_manager::PathWithEscapedSlashesAction::try_from(
        h.path_with_escaped_slashes_action,
    )
    .ok()
    .map(|x| x.as_str_name());
    Obj::new()
        .str("stat_prefix", &h.stat_prefix)
        .opt("route_config", route)
        .list("http_filters", &h.http_filters, http_filter)
        .enumv(
            "forward_client_cert_details",
            fcc,
            h.forward_client_cert_details,
        )
        .opt(
            "set_current_client_cert_details",
            h.set_current_client_cert_details.as_ref().map(|s| {
                Obj::new()
                    .opt("subject", s.subject.map(|b| json!(b.value)))
                    .bool("cert", s.cert)
                    .bool("chain", s.chain)
                    .bool("dns", s.dns)
                    .bool("uri", s.uri)
                    .done()
            }),
        )
        .list("upgrade_configs", &h.upgrade_configs, |u| {
            if u.filters.is_empty() && u.enabled.is_none() {
                Obj::new().str("upgrade_type", &u.upgrade_type).done()
            } else {
                unprinted("UpgradeConfig")
            }
        })
        .opt("normalize_path", h.normalize_path.map(|b| json!(b.value)))
        .bool("merge_slashes", h.merge_slashes)
        .enumv(
            "path_with_escaped_slashes_action",
            escaped,
            h.path_with_escaped_slashes_action,
        )
        .done()
}

fn http_filter(f: &HttpFilter) -> Value {
    let typed = match &f.config_type {
        Some(http_filter::ConfigType::TypedConfig(a)) => Some(any(a)),
        Some(_) => Some(unprinted("HttpFilter.config_type")),
        None => None,
    };
    Obj::new()
        .str("name", &f.name)
        .opt("typed_config", typed)
        .done()
}

fn route_config(r: &RouteConfiguration) -> Value {
    Obj::new()
        .str("name", &r.name)
        .list("virtual_hosts", &r.virtual_hosts, |v| {
            Obj::new()
                .str("name", &v.name)
                .list("domains", &v.domains, |d| json!(d))
                .list("routes", &v.routes, |r| {
                    let m = r.r#match.as_ref().map(|m| match &m.path_specifier {
                        Some(route_match::PathSpecifier::Prefix(p)) => json!({ "prefix": p }),
                        _ => unprinted("RouteMatch"),
                    });
                    let action = match &r.action {
                        Some(route::Action::Route(a)) => {
                            let cluster = match &a.cluster_specifier {
                                Some(route_action::ClusterSpecifier::Cluster(c)) => {
                                    ("cluster", json!(c))
                                }
                                _ => ("cluster_specifier", unprinted("ClusterSpecifier")),
                            };
                            Some(
                                Obj::new()
                                    .val(cluster.0, cluster.1)
                                    .opt("timeout", a.timeout.as_ref().map(duration))
                                    .done(),
                            )
                        }
                        Some(_) => Some(unprinted("Route.action")),
                        None => None,
                    };
                    Obj::new()
                        .str("name", &r.name)
                        .opt("match", m)
                        .opt("route", action)
                        .done()
                })
                .done()
        })
        .done()
}

fn tcp(t: &TcpProxy) -> Value {
    let cluster = match &t.cluster_specifier {
        Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => ("cluster", json!(c)),
        _ => ("cluster_specifier", unprinted("TcpProxy.cluster_specifier")),
    };
    Obj::new()
        .str("stat_prefix", &t.stat_prefix)
        .val(cluster.0, cluster.1)
        .done()
}

pub fn http_rbac(r: &HttpRbac) -> Value {
    Obj::new()
        .opt("rules", r.rules.as_ref().map(rbac))
        .opt("shadow_rules", r.shadow_rules.as_ref().map(rbac))
        .str("shadow_rules_stat_prefix", &r.shadow_rules_stat_prefix)
        .done()
}

pub fn network_rbac(r: &NetworkRbac) -> Value {
    Obj::new()
        .opt("rules", r.rules.as_ref().map(rbac))
        .opt("shadow_rules", r.shadow_rules.as_ref().map(rbac))
        .str("shadow_rules_stat_prefix", &r.shadow_rules_stat_prefix)
        .str("stat_prefix", &r.stat_prefix)
        .done()
}

fn rbac(r: &Rbac) -> Value {
    let action = envoy_types::pb::envoy::config::rbac::v3::rbac::Action::try_from(r.action)
        .ok()
        .map(|a| a.as_str_name());
    // Envoy prints a map in key order; so do we (the map is a HashMap in memory).
    let mut names: Vec<&String> = r.policies.keys().collect();
    names.sort();
    let mut policies = Map::new();
    for n in names {
        if let Some(p) = r.policies.get(n) {
            policies.insert(n.clone(), policy(p));
        }
    }
    let mut o = Obj::new().enumv("action", action, r.action);
    if !policies.is_empty() {
        o = o.val("policies", Value::Object(policies));
    }
    o.done()
}

fn policy(p: &Policy) -> Value {
    Obj::new()
        .list("permissions", &p.permissions, perm)
        .list("principals", &p.principals, princ)
        .done()
}

// Prints the deprecated `Permission.metadata` the translator emits (see `rbac::permission_of`).
#[allow(deprecated)]
fn perm(p: &Permission) -> Value {
    use permission::Rule;
    match &p.rule {
        Some(Rule::AndRules(s)) => {
            json!({ "and_rules": { "rules": s.rules.iter().map(perm).collect::<Vec<_>>() } })
        }
        Some(Rule::OrRules(s)) => {
            json!({ "or_rules": { "rules": s.rules.iter().map(perm).collect::<Vec<_>>() } })
        }
        Some(Rule::Any(b)) => json!({ "any": b }),
        Some(Rule::Header(h)) => json!({ "header": header(h) }),
        Some(Rule::UrlPath(m)) => match &m.rule {
            Some(path_matcher::Rule::Path(s)) => {
                json!({ "url_path": { "path": string_matcher(s) } })
            }
            None => unprinted("PathMatcher"),
        },
        Some(Rule::DestinationIp(c)) => json!({ "destination_ip": cidr(c) }),
        Some(Rule::DestinationPort(p)) => json!({ "destination_port": p }),
        Some(Rule::NotRule(n)) => json!({ "not_rule": perm(n) }),
        Some(Rule::Metadata(m)) => json!({ "metadata": metadata(m) }),
        Some(Rule::RequestedServerName(s)) => json!({ "requested_server_name": string_matcher(s) }),
        Some(Rule::UriTemplate(t)) => json!({ "uri_template": Obj::new()
            .str("name", &t.name)
            .opt("typed_config", t.typed_config.as_ref().map(any))
            .done() }),
        _ => unprinted("Permission"),
    }
}

// Prints the deprecated `Principal.metadata` the translator emits (see `rbac::principal_metadata`).
#[allow(deprecated)]
fn princ(p: &Principal) -> Value {
    use principal::Identifier;
    match &p.identifier {
        Some(Identifier::AndIds(s)) => {
            json!({ "and_ids": { "ids": s.ids.iter().map(princ).collect::<Vec<_>>() } })
        }
        Some(Identifier::OrIds(s)) => {
            json!({ "or_ids": { "ids": s.ids.iter().map(princ).collect::<Vec<_>>() } })
        }
        Some(Identifier::Any(b)) => json!({ "any": b }),
        Some(Identifier::Authenticated(a)) => json!({ "authenticated": Obj::new()
            .opt("principal_name", a.principal_name.as_ref().map(string_matcher))
            .done() }),
        Some(Identifier::DirectRemoteIp(c)) => json!({ "direct_remote_ip": cidr(c) }),
        Some(Identifier::RemoteIp(c)) => json!({ "remote_ip": cidr(c) }),
        Some(Identifier::Header(h)) => json!({ "header": header(h) }),
        Some(Identifier::NotId(n)) => json!({ "not_id": princ(n) }),
        Some(Identifier::Metadata(m)) => json!({ "metadata": metadata(m) }),
        _ => unprinted("Principal"),
    }
}

fn metadata(m: &MetadataMatcher) -> Value {
    let path: Vec<Value> = m
        .path
        .iter()
        .map(|p| match &p.segment {
            Some(metadata_matcher::path_segment::Segment::Key(k)) => json!({ "key": k }),
            None => unprinted("PathSegment"),
        })
        .collect();
    let value = m.value.as_ref().map(value_match);
    Obj::new()
        .str("filter", &m.filter)
        .val("path", Value::Array(path))
        .opt("value", value)
        .bool("invert", m.invert)
        .done()
}

fn value_match(v: &ValueMatcher) -> Value {
    match &v.match_pattern {
        Some(value_matcher::MatchPattern::StringMatch(s)) => {
            json!({ "string_match": string_matcher(s) })
        }
        Some(value_matcher::MatchPattern::OrMatch(o)) => json!({ "or_match": {
            "value_matchers": o.value_matchers.iter().map(value_match).collect::<Vec<_>>()
        } }),
        Some(value_matcher::MatchPattern::ListMatch(l)) => match &l.match_pattern {
            Some(list_matcher::MatchPattern::OneOf(one)) => {
                json!({ "list_match": { "one_of": value_match(one) } })
            }
            None => unprinted("ListMatcher"),
        },
        _ => unprinted("ValueMatcher"),
    }
}

fn jwt_authn(j: &JwtAuthentication) -> Value {
    let mut providers: Vec<(&String, &JwtProvider)> = j.providers.iter().collect();
    providers.sort_by_key(|(name, _)| *name);
    let providers: Map<String, Value> = providers
        .into_iter()
        .map(|(name, p)| (name.clone(), jwt_provider(p)))
        .collect();
    Obj::new()
        .val("providers", Value::Object(providers))
        .list("rules", &j.rules, |r| {
            let prefix = match r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()) {
                Some(route_match::PathSpecifier::Prefix(p)) => json!({ "prefix": p }),
                _ => unprinted("RouteMatch"),
            };
            let requires = match &r.requirement_type {
                Some(requirement_rule::RequirementType::Requires(q)) => jwt_requirement(q),
                _ => unprinted("RequirementRule"),
            };
            json!({ "match": prefix, "requires": requires })
        })
        .bool("bypass_cors_preflight", j.bypass_cors_preflight)
        .done()
}

fn jwt_provider(p: &JwtProvider) -> Value {
    let jwks = match &p.jwks_source_specifier {
        Some(jwt_provider::JwksSourceSpecifier::LocalJwks(DataSource {
            specifier: Some(data_source::Specifier::InlineString(s)),
            ..
        })) => json!({ "inline_string": s }),
        _ => unprinted("JwksSourceSpecifier"),
    };
    Obj::new()
        .str("issuer", &p.issuer)
        .list("audiences", &p.audiences, |a| json!(a))
        .bool("forward", p.forward)
        .list("from_headers", &p.from_headers, |h| {
            Obj::new()
                .str("name", &h.name)
                .str("value_prefix", &h.value_prefix)
                .done()
        })
        .list("from_params", &p.from_params, |a| json!(a))
        .list("from_cookies", &p.from_cookies, |a| json!(a))
        .str("forward_payload_header", &p.forward_payload_header)
        .str("payload_in_metadata", &p.payload_in_metadata)
        .opt(
            "normalize_payload_in_metadata",
            p.normalize_payload_in_metadata.as_ref().map(|n| {
                Obj::new()
                    .list("space_delimited_claims", &n.space_delimited_claims, |c| {
                        json!(c)
                    })
                    .done()
            }),
        )
        .list("claim_to_headers", &p.claim_to_headers, |c| {
            Obj::new()
                .str("header_name", &c.header_name)
                .str("claim_name", &c.claim_name)
                .done()
        })
        .val("local_jwks", jwks)
        .done()
}

fn jwt_requirement(r: &JwtRequirement) -> Value {
    match &r.requires_type {
        Some(jwt_requirement::RequiresType::ProviderName(n)) => json!({ "provider_name": n }),
        Some(jwt_requirement::RequiresType::AllowMissing(_)) => json!({ "allow_missing": {} }),
        Some(jwt_requirement::RequiresType::RequiresAny(o)) => json!({ "requires_any": {
            "requirements": o.requirements.iter().map(jwt_requirement).collect::<Vec<_>>()
        } }),
        Some(jwt_requirement::RequiresType::RequiresAll(a)) => json!({ "requires_all": {
            "requirements": a.requirements.iter().map(jwt_requirement).collect::<Vec<_>>()
        } }),
        _ => unprinted("JwtRequirement"),
    }
}

fn cidr(c: &CidrRange) -> Value {
    Obj::new()
        .str("address_prefix", &c.address_prefix)
        .opt("prefix_len", c.prefix_len.map(|p| json!(p.value)))
        .done()
}

fn header(h: &HeaderMatcher) -> Value {
    let o = Obj::new().str("name", &h.name);
    let o = match &h.header_match_specifier {
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(s)) => {
            o.val("string_match", string_matcher(s))
        }
        Some(header_matcher::HeaderMatchSpecifier::PresentMatch(b)) => {
            o.val("present_match", json!(b))
        }
        Some(_) => o.val("header_match_specifier", unprinted("HeaderMatchSpecifier")),
        None => o,
    };
    o.bool("invert_match", h.invert_match).done()
}

pub fn string_matcher(s: &StringMatcher) -> Value {
    use string_matcher::MatchPattern;
    let o = match &s.match_pattern {
        Some(MatchPattern::Exact(v)) => Obj::new().val("exact", json!(v)),
        Some(MatchPattern::Prefix(v)) => Obj::new().val("prefix", json!(v)),
        Some(MatchPattern::Suffix(v)) => Obj::new().val("suffix", json!(v)),
        Some(MatchPattern::Contains(v)) => Obj::new().val("contains", json!(v)),
        Some(MatchPattern::SafeRegex(r)) => {
            let o = Obj::new().str("regex", &r.regex);
            let o = if r.engine_type.is_some() {
                o.val("google_re2", json!({}))
            } else {
                o
            };
            Obj::new().val("safe_regex", o.done())
        }
        _ => Obj::new().val("match_pattern", unprinted("StringMatcher")),
    };
    o.bool("ignore_case", s.ignore_case).done()
}

pub fn cluster(c: &Cluster) -> Value {
    let kind = match c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => {
            let name = cluster::DiscoveryType::try_from(t)
                .ok()
                .map(|x| x.as_str_name());
            // STATIC is 0: proto3 JSON leaves it out, but say it (Envoy's dump does too).
            Some(json!(name.unwrap_or("STATIC")))
        }
        Some(_) => Some(unprinted("ClusterDiscoveryType")),
        None => None,
    };
    let mut options: Vec<(&String, &Any)> = c.typed_extension_protocol_options.iter().collect();
    options.sort_by_key(|(k, _)| *k);
    let options: Map<String, Value> = options
        .into_iter()
        .map(|(k, v)| (k.clone(), any(v)))
        .collect();
    let mut o = Obj::new()
        .str("name", &c.name)
        .opt("type", kind)
        .opt("connect_timeout", c.connect_timeout.as_ref().map(duration))
        .opt(
            "load_assignment",
            c.load_assignment.as_ref().map(load_assignment),
        );
    if !options.is_empty() {
        o = o.val("typed_extension_protocol_options", Value::Object(options));
    }
    o.opt(
        "transport_socket",
        c.transport_socket.as_ref().map(transport),
    )
    .list(
        "transport_socket_matches",
        &c.transport_socket_matches,
        |m| {
            Obj::new()
                .str("name", &m.name)
                .opt("match", m.r#match.as_ref().map(proto_struct))
                .opt(
                    "transport_socket",
                    m.transport_socket.as_ref().map(transport),
                )
                .done()
        },
    )
    .done()
}

/// A `google.protobuf.Struct` as the JSON object it stands for (keys sorted).
fn proto_struct(s: &envoy_types::pb::google::protobuf::Struct) -> Value {
    use envoy_types::pb::google::protobuf::value::Kind;
    fn val(v: &envoy_types::pb::google::protobuf::Value) -> Value {
        match &v.kind {
            Some(Kind::StringValue(s)) => json!(s),
            Some(Kind::BoolValue(b)) => json!(b),
            Some(Kind::NumberValue(n)) => json!(n),
            Some(Kind::NullValue(_)) | None => Value::Null,
            Some(Kind::StructValue(s)) => proto_struct(s),
            Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(val).collect()),
        }
    }
    Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), val(v))).collect())
}

fn load_assignment(l: &ClusterLoadAssignment) -> Value {
    Obj::new()
        .str("cluster_name", &l.cluster_name)
        .list("endpoints", &l.endpoints, |e| {
            Obj::new()
                .list("lb_endpoints", &e.lb_endpoints, |lb| {
                    match &lb.host_identifier {
                        Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => Obj::new()
                            .val(
                                "endpoint",
                                Obj::new()
                                    .opt("address", ep.address.as_ref().map(address))
                                    .done(),
                            )
                            .opt(
                                "metadata",
                                lb.metadata.as_ref().map(|m| {
                                    json!({ "filter_metadata": m
                                    .filter_metadata
                                    .iter()
                                    .map(|(k, v)| (k.clone(), proto_struct(v)))
                                    .collect::<Map<String, Value>>() })
                                }),
                            )
                            .done(),
                        _ => unprinted("LbEndpoint"),
                    }
                })
                .done()
        })
        .done()
}

fn http_protocol(h: &HttpProtocolOptions) -> Value {
    match &h.upstream_protocol_options {
        Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(e)) => {
            match &e.protocol_config {
                Some(
                    http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_),
                ) => json!({ "explicit_http_config": { "http2_protocol_options": {} } }),
                _ => unprinted("ExplicitHttpConfig"),
            }
        }
        _ => unprinted("HttpProtocolOptions"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn scalars_follow_proto3_json() {
        let cases = [
            (
                Duration {
                    seconds: 0,
                    nanos: 0,
                },
                "0s",
            ),
            (
                Duration {
                    seconds: 10,
                    nanos: 0,
                },
                "10s",
            ),
            (
                Duration {
                    seconds: 1,
                    nanos: 500_000_000,
                },
                "1.5s",
            ),
        ];
        for (d, want) in cases {
            assert_eq!(duration(&d), json!(want));
        }
        let unknown = Any {
            type_url: "type.googleapis.com/x.Y".to_owned(),
            value: vec![],
        };
        assert_eq!(
            any(&unknown),
            json!({ UNPRINTED: "type.googleapis.com/x.Y" })
        );
        let sds = crate::tls::sds_cluster("/tmp/sock");
        let v = cluster(&sds);
        assert_eq!(v["type"], "STATIC");
        assert_eq!(
            v["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
                ["explicit_http_config"],
            json!({"http2_protocol_options": {}})
        );
        assert!(!v.to_string().contains(UNPRINTED));
    }
}
