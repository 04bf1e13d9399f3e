//! Certificates over SDS as istiod references them: `default` (the workload's certificate) and
//! `ROOTCA` (the mesh roots), both from the `sds-grpc` cluster, which the bootstrap points at
//! the agent's Unix socket (istio-agent's `./var/run/secrets/workload-spiffe-uds/socket`).

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::Http2ProtocolOptions;
use envoy_types::pb::envoy::config::core::v3::{
    Address, ApiConfigSource, ApiVersion, ConfigSource, GrpcService, Pipe, TransportSocket,
    address, api_config_source, config_source, grpc_service, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{BoolValue, Duration};
use envoy_types::util::pack_any;

/// The cluster SDS secrets come from (istiod's `SDSClusterName`).
pub const SDS_CLUSTER: &str = "sds-grpc";
/// The workload certificate's SDS name.
pub const CERT_SECRET: &str = "default";
/// The mesh roots' SDS name.
pub const ROOT_SECRET: &str = "ROOTCA";
/// Envoy's TLS transport socket.
pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";

/// An SDS reference as istiod's `ConstructSdsSecretConfig` builds it: gRPC to `sds-grpc`, node
/// on the first message only, and an initial fetch timeout of zero so that listeners keep
/// warming until the secret arrives instead of serving without it.
pub fn sds_secret(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_owned(),
        sds_config: Some(ConfigSource {
            initial_fetch_timeout: Some(Duration {
                seconds: 0,
                nanos: 0,
            }),
            resource_api_version: ApiVersion::V3 as i32,
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    api_type: api_config_source::ApiType::Grpc as i32,
                    transport_api_version: ApiVersion::V3 as i32,
                    set_node_on_first_message_only: true,
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                            grpc_service::EnvoyGrpc {
                                cluster_name: SDS_CLUSTER.to_owned(),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
    }
}

/// Server-side mutual TLS: the workload's certificate, a client certificate required and
/// verified against `ROOTCA`, its URI SAN in the trust domain or one of its aliases.
pub fn inbound_mtls(trust_domains: &[String], alpn: &[&str]) -> TransportSocket {
    let sans = trust_domains
        .iter()
        .map(|td| SubjectAltNameMatcher {
            san_type: subject_alt_name_matcher::SanType::Uri as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Prefix(format!(
                    "spiffe://{td}/"
                ))),
                ignore_case: false,
            }),
            ..Default::default()
        })
        .collect();
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds_secret(CERT_SECRET)],
            alpn_protocols: alpn.iter().map(|a| (*a).to_owned()).collect(),
            validation_context_type: Some(
                common_tls_context::ValidationContextType::CombinedValidationContext(
                    common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_typed_subject_alt_names: sans,
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds_secret(ROOT_SECRET)),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    TransportSocket {
        name: TLS_TRANSPORT_SOCKET.to_owned(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(ctx))),
    }
}

/// A cluster's `typed_extension_protocol_options` entry for HTTP/2 upstream (h2c without TLS).
pub(crate) fn http2_protocol_options() -> (String, envoy_types::pb::google::protobuf::Any) {
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Http2ProtocolOptions::default(),
                        ),
                    ),
                },
            ),
        ),
        ..Default::default()
    };
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_owned(),
        pack_any(options),
    )
}

/// The bootstrap's `sds-grpc` cluster: HTTP/2 to the agent's SDS socket at `socket_path`.
pub fn sds_cluster(socket_path: &str) -> Cluster {
    Cluster {
        name: SDS_CLUSTER.to_owned(),
        connect_timeout: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        typed_extension_protocol_options: [http2_protocol_options()].into(),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: SDS_CLUSTER.to_owned(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::Pipe(Pipe {
                                path: socket_path.to_owned(),
                                mode: 0,
                            })),
                        }),
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
