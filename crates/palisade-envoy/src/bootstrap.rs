//! The bootstrap of an Envoy sidecar in a Palisade mesh (what istio-agent writes for its Envoy):
//! the node names the workload and its application ports in metadata, the listeners and
//! clusters come over ADS from the control plane, reached over mutual TLS with the workload's
//! own certificate, and every certificate comes over SDS from the workload's `palisade agent`
//! on a Unix socket (`default` and `ROOTCA`).
//!
//! A bootstrap is a file the operator keeps, not a pushed resource, so it is built as Envoy's
//! JSON (which Envoy also reads as YAML) rather than as protos.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::tls::{CERT_SECRET, ROOT_SECRET, SDS_CLUSTER};

/// The cluster the ADS stream uses (istio-agent's name).
pub const XDS_CLUSTER: &str = "xds-grpc";
/// The SNI Envoy sends to the control plane (its serving certificate's DNS name, istiod's).
pub const CONTROL_PLANE_SNI: &str = "istiod.istio-system.svc";
/// The path of the control plane's SPIFFE ID (`palisade_ca::server::CONTROL_PLANE_PATH`; a
/// test in `palisade-control` keeps them equal), checked in its certificate; the trust domain
/// is whichever the mesh roots sign.
pub const CONTROL_PLANE_ID_SUFFIX: &str = "/ns/istio-system/sa/palisade-controlplane";

/// What a bootstrap needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapOptions {
    /// `namespace/name` of the WorkloadEntry.
    pub workload: String,
    /// The control plane's ADS address, `host:port`.
    pub xds_address: String,
    /// The agent's SDS socket.
    pub sds_socket: std::path::PathBuf,
    /// Workload port to application port.
    pub app_ports: BTreeMap<u16, u16>,
    /// Envoy's admin address, `ip:port`.
    pub admin: String,
    /// The application's HTTP proxy listener, `ip:port` (empty: none).
    pub outbound: String,
    /// Declared TCP upstreams, `LISTEN=HOST:PORT`.
    pub tcp_upstreams: Vec<String>,
    /// Incremental (delta) ADS instead of state of the world.
    pub delta: bool,
}

/// Why a bootstrap cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    #[error("--workload {0:?}: expected namespace/name")]
    Workload(String),
    #[error("{flag} {value:?}: expected host:port")]
    Address { flag: &'static str, value: String },
    #[error("--sds-socket {0:?}: not valid UTF-8")]
    Socket(String),
}

/// `host:port`; port 0 (any free port) only where `any_port` (Envoy's admin: the test harness
/// reads the port back from `--admin-address-path`).
fn split_host_port(
    flag: &'static str,
    value: &str,
    any_port: bool,
) -> Result<(String, u16), BootstrapError> {
    let bad = || BootstrapError::Address {
        flag,
        value: value.to_owned(),
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || (port == 0 && !any_port) {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

fn socket_address(host: &str, port: u16) -> Value {
    json!({ "socket_address": { "address": host, "port_value": port } })
}

fn http2_options() -> Value {
    json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": { "http2_protocol_options": {} }
        }
    })
}

fn sds_config(name: &str) -> Value {
    json!({
        "name": name,
        "sds_config": {
            "resource_api_version": "V3",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{ "envoy_grpc": { "cluster_name": SDS_CLUSTER } }]
            }
        }
    })
}

/// The bootstrap, as Envoy's JSON.
pub fn bootstrap(o: &BootstrapOptions) -> Result<Value, BootstrapError> {
    let (ns, name) = o
        .workload
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| BootstrapError::Workload(o.workload.clone()))?;
    let (xds_host, xds_port) = split_host_port("--xds-address", &o.xds_address, false)?;
    let (admin_host, admin_port) = split_host_port("--admin", &o.admin, true)?;
    let sds = o
        .sds_socket
        .to_str()
        .ok_or_else(|| BootstrapError::Socket(o.sds_socket.display().to_string()))?;
    let app_ports = o
        .app_ports
        .iter()
        .map(|(p, a)| format!("{p}={a}"))
        .collect::<Vec<_>>()
        .join(",");
    // A name resolves through DNS; an IP address needs no resolver.
    let xds_type = if xds_host.parse::<std::net::IpAddr>().is_ok() {
        "STATIC"
    } else {
        "STRICT_DNS"
    };
    Ok(json!({
        "node": {
            // Istio's node id form, so that Istio tools read it; the metadata is what
            // Palisade's control plane reads.
            "id": format!("sidecar~0.0.0.0~{name}.{ns}~{ns}.svc.cluster.local"),
            "cluster": format!("{name}.{ns}"),
            "metadata": {
                "PALISADE_WORKLOAD": o.workload,
                "PALISADE_APP_PORTS": app_ports,
                "PALISADE_OUTBOUND": o.outbound,
                "PALISADE_TCP_UPSTREAMS": o.tcp_upstreams.join(","),
            }
        },
        "admin": { "address": socket_address(&admin_host, admin_port) },
        "dynamic_resources": {
            "ads_config": {
                "api_type": if o.delta { "DELTA_GRPC" } else { "GRPC" },
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{ "envoy_grpc": { "cluster_name": XDS_CLUSTER } }]
            },
            "cds_config": { "ads": {}, "resource_api_version": "V3" },
            "lds_config": { "ads": {}, "resource_api_version": "V3" }
        },
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": xds_type,
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": http2_options(),
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [{ "lb_endpoints": [{ "endpoint": {
                            "address": socket_address(&xds_host, xds_port)
                        } }] }]
                    },
                    "transport_socket": {
                        "name": crate::tls::TLS_TRANSPORT_SOCKET,
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                            "sni": CONTROL_PLANE_SNI,
                            "common_tls_context": {
                                "alpn_protocols": ["h2"],
                                "tls_certificate_sds_secret_configs": [sds_config(CERT_SECRET)],
                                "combined_validation_context": {
                                    "default_validation_context": {
                                        "match_typed_subject_alt_names": [{
                                            "san_type": "URI",
                                            "matcher": { "suffix": CONTROL_PLANE_ID_SUFFIX }
                                        }]
                                    },
                                    "validation_context_sds_secret_config": sds_config(ROOT_SECRET)
                                }
                            }
                        }
                    }
                },
                {
                    "name": SDS_CLUSTER,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": http2_options(),
                    "load_assignment": {
                        "cluster_name": SDS_CLUSTER,
                        "endpoints": [{ "lb_endpoints": [{ "endpoint": {
                            "address": { "pipe": { "path": sds } }
                        } }] }]
                    }
                }
            ]
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> BootstrapOptions {
        BootstrapOptions {
            workload: "demo/web".into(),
            xds_address: "127.0.0.1:15012".into(),
            sds_socket: "/run/web/sds.sock".into(),
            app_ports: [(8080, 18080)].into_iter().collect(),
            admin: "127.0.0.1:15000".into(),
            outbound: "127.0.0.1:15001".into(),
            tcp_upstreams: vec![],
            delta: false,
        }
    }

    #[test]
    fn names_the_workload_and_reaches_the_control_plane_over_mtls() {
        let b = bootstrap(&options()).unwrap();
        assert_eq!(b["node"]["metadata"]["PALISADE_WORKLOAD"], "demo/web");
        assert_eq!(b["node"]["metadata"]["PALISADE_APP_PORTS"], "8080=18080");
        assert_eq!(
            b["node"]["id"],
            "sidecar~0.0.0.0~web.demo~demo.svc.cluster.local"
        );
        let xds = &b["static_resources"]["clusters"][0];
        assert_eq!(xds["type"], "STATIC");
        assert_eq!(b["dynamic_resources"]["ads_config"]["api_type"], "GRPC");
        let delta = BootstrapOptions {
            delta: true,
            ..options()
        };
        assert_eq!(
            bootstrap(&delta).unwrap()["dynamic_resources"]["ads_config"]["api_type"],
            "DELTA_GRPC"
        );
        let tls = &xds["transport_socket"]["typed_config"]["common_tls_context"];
        assert_eq!(
            tls["tls_certificate_sds_secret_configs"][0]["name"],
            "default"
        );
        assert_eq!(
            tls["combined_validation_context"]["validation_context_sds_secret_config"]["name"],
            "ROOTCA"
        );
        let sds = &b["static_resources"]["clusters"][1];
        assert_eq!(
            sds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]
                ["path"],
            "/run/web/sds.sock"
        );
        let named = BootstrapOptions {
            xds_address: "istiod.example:15012".into(),
            ..options()
        };
        assert_eq!(
            bootstrap(&named).unwrap()["static_resources"]["clusters"][0]["type"],
            "STRICT_DNS"
        );
    }

    #[test]
    fn bad_flags_are_named() {
        let table: &[(BootstrapOptions, &str)] = &[
            (
                BootstrapOptions {
                    workload: "web".into(),
                    ..options()
                },
                "--workload",
            ),
            (
                BootstrapOptions {
                    xds_address: "127.0.0.1".into(),
                    ..options()
                },
                "--xds-address",
            ),
            (
                BootstrapOptions {
                    admin: "localhost".into(),
                    ..options()
                },
                "--admin",
            ),
        ];
        for (o, flag) in table {
            let err = bootstrap(o).unwrap_err().to_string();
            assert!(err.contains(flag), "{err}");
        }
    }
}
