//! CUSTOM on TCP connections: Envoy's network ext_authz filter (`envoy.filters.network.ext_authz`)
//! as Istio configures it.
//!
//! - One `Check` per connection, before the application is connected: the connection is the
//!   unit, so there is nothing else to ask about. (Envoy asks on the connection's first bytes;
//!   Palisade decides TCP connections when they are accepted, so the authorizer is asked then.)
//! - The check request describes the connection only, as Envoy's `createTcpCheck` builds it:
//!   source (peer address, the peer certificate's URI SAN as principal), destination (local
//!   address, this workload's URI SAN, the SNI as service); no request attributes, no TLS session.
//! - A denial, or an error without `failOpen`, closes the connection; the application never sees
//!   it. An allow proceeds to DENY/ALLOW.
//! - Only `envoyExtAuthzGrpc` providers: Istio builds the network filter for gRPC providers only
//!   and ignores a CUSTOM policy with an `envoyExtAuthzHttp` provider on TCP filter chains. The
//!   policy engine leaves such rules out of its TCP rules; [`log_not_on_tcp`] says so when a
//!   config is installed.
//!
//! A new config re-checks open connections ([`ConnectionGate`]): the providers that allowed the
//! connection are not asked again, one a new policy adds is asked once.

use std::net::SocketAddr;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use palisade_policy::CompiledPolicy;

use super::grpc::socket_address;
use super::{Answer, Client, ExtAuthz};
use crate::config::ProxyConfig;
use crate::inbound::ConnInfo;

/// What the check request of one connection is built from.
#[derive(Debug, Clone, Copy)]
pub struct ConnInput<'a> {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// The peer's SPIFFE URI (`spiffe://...`), mTLS only.
    pub source_principal: Option<&'a str>,
    /// This workload's SPIFFE URI, mTLS only (Envoy reads it from the connection's certificate).
    pub destination_principal: Option<&'a str>,
    /// The TLS SNI (Envoy's `requestedServerName`), sent as the destination's service.
    pub sni: Option<&'a str>,
}

/// The `CheckRequest` for one connection.
pub fn check_request(input: &ConnInput<'_>) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(socket_address(input.source)),
                principal: input.source_principal.unwrap_or_default().to_owned(),
                ..Peer::default()
            }),
            destination: Some(Peer {
                address: Some(socket_address(input.destination)),
                principal: input.destination_principal.unwrap_or_default().to_owned(),
                service: input.sni.unwrap_or_default().to_owned(),
                ..Peer::default()
            }),
            ..AttributeContext::default()
        }),
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub provider: String,
    pub reason: String,
}

impl ExtAuthz {
    /// Asks the providers `names`, in order, about one connection: the first denial wins.
    pub async fn check_connection(
        &self,
        names: &[&str],
        input: &ConnInput<'_>,
    ) -> Result<(), Denied> {
        let check = check_request(input);
        for name in names {
            let denied = |reason: String| Denied {
                provider: (*name).to_owned(),
                reason,
            };
            let Some(p) = self.providers.get(*name) else {
                // Validation keeps this from happening; if it does, fail closed.
                return Err(denied("extension provider is not defined".to_owned()));
            };
            let answer = match &p.client {
                Client::Grpc(c) => {
                    match tokio::time::timeout(p.common.timeout, c.send(&p.common, check.clone()))
                        .await
                    {
                        Ok(a) => a,
                        Err(_) => Answer::Error(format!("timed out after {:?}", p.common.timeout)),
                    }
                }
                Client::Http(_) => {
                    // The engine leaves these out of its TCP rules; skip as Istio does.
                    tracing::debug!(provider = %name, "ignored CUSTOM action with HTTP provider on a TCP connection");
                    continue;
                }
                Client::Broken(e) => Answer::Error(e.clone()),
            };
            match answer {
                // Header edits have nothing to apply to on a TCP connection.
                Answer::Allow(_) => {}
                Answer::Deny { reason, .. } => return Err(denied(reason)),
                Answer::Error(e) if p.common.fail_open => {
                    tracing::warn!(provider = %name, error = %e, "ext_authz failed; failOpen allows the TCP connection");
                }
                Answer::Error(e) => {
                    tracing::warn!(provider = %name, error = %e, "ext_authz failed; TCP connection closed");
                    return Err(denied(format!("authorizer error: {e}")));
                }
            }
        }
        Ok(())
    }
}

/// The CUSTOM step of one TCP connection, across config versions.
#[derive(Debug, Default)]
pub struct ConnectionGate {
    /// Providers that allowed this connection.
    allowed: Vec<String>,
}

impl ConnectionGate {
    /// Of `names` (the providers the matching CUSTOM policies name), those not asked yet.
    pub fn pending<'n>(&self, names: &[&'n str]) -> Vec<&'n str> {
        names
            .iter()
            .copied()
            .filter(|n| !self.allowed.iter().any(|a| a == n))
            .collect()
    }

    /// Asks the authorizers that `cfg`'s CUSTOM policies send this connection to, except those
    /// that allowed it already. `false`: close the connection.
    pub async fn check(
        &mut self,
        shared: &crate::Shared,
        cfg: &ProxyConfig,
        info: &ConnInfo,
    ) -> bool {
        if cfg.policy.providers().is_empty() {
            return true;
        }
        let Some(names) = custom_providers(cfg, info) else {
            // Not expected for TCP; whatever it is, the connection is not let through.
            tracing::info!(target: "palisade::rbac", port = info.port, source = %info.source, "TCP connection closed: its CUSTOM step could not be evaluated");
            return false;
        };
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let pending = self.pending(&refs);
        if pending.is_empty() {
            return true;
        }
        let source_uri = info.principal.as_ref().map(|p| format!("spiffe://{p}"));
        // Envoy reads the local principal off the connection's certificate: none on plaintext.
        let own = match info.principal {
            Some(_) => shared.certs.tls().map(|s| s.own_id.to_string()),
            None => None,
        };
        let input = ConnInput {
            source: info.source,
            destination: SocketAddr::new(info.local_ip, info.port),
            source_principal: source_uri.as_deref(),
            destination_principal: own.as_deref(),
            sni: info.sni.as_deref(),
        };
        // Boxed: the gRPC call's state is large and rarely needed, and every TCP connection's
        // task holds this future.
        match Box::pin(cfg.ext_authz.check_connection(&pending, &input)).await {
            Ok(()) => {
                self.allowed.extend(pending.iter().map(|n| (*n).to_owned()));
                true
            }
            Err(d) => {
                tracing::info!(
                    target: "palisade::rbac",
                    workload = %cfg.workload,
                    protocol = "tcp",
                    port = info.port,
                    source = %info.source,
                    principal = info.principal.as_deref().unwrap_or("-"),
                    provider = %d.provider,
                    reason = %d.reason,
                    "enforced denied by CUSTOM provider {}: TCP connection closed",
                    d.provider
                );
                false
            }
        }
    }
}

/// The providers of the CUSTOM policies that match the connection, in order; `None` when the
/// connection cannot be evaluated (fail closed, never "no provider applies").
fn custom_providers(cfg: &ProxyConfig, info: &ConnInfo) -> Option<Vec<String>> {
    let ctx = info.tcp_context();
    cfg.policy
        .evaluate(&ctx)
        .ok()
        .map(|v| v.custom.iter().map(|s| (*s).to_owned()).collect())
}

/// Says, once per installed config, which CUSTOM policies TCP connections are not sent to.
pub fn log_not_on_tcp(workload: &str, policy: &CompiledPolicy) {
    for (info, provider) in policy.custom_not_on_tcp() {
        tracing::info!(
            workload,
            policy = %format!("{}/{}", info.namespace, info.name),
            provider,
            "CUSTOM policy with envoyExtAuthzHttp provider {provider:?} is not applied to TCP connections (Istio ignores CUSTOM with an HTTP provider on TCP filter chains); use an envoyExtAuthzGrpc provider to authorize them"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    use palisade_policy::MeshConfig;
    use palisade_policy::mesh::{ExtAuthzGrpcProvider, ExtensionProvider};

    use super::super::tests::{grpc_p, grpc_server, http_p};
    use super::*;

    fn addr_of(p: &Peer) -> (String, u32) {
        let Some(address::Address::SocketAddress(sa)) =
            p.address.as_ref().and_then(|a| a.address.clone())
        else {
            panic!("no socket address: {p:?}")
        };
        let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
            panic!("no port: {sa:?}")
        };
        (sa.address, port)
    }

    fn mtls_input() -> ConnInput<'static> {
        ConnInput {
            source: "127.0.65.9:40000".parse().unwrap(),
            destination: "127.0.65.1:9000".parse().unwrap(),
            source_principal: Some("spiffe://cluster.local/ns/shop/sa/client"),
            destination_principal: Some("spiffe://cluster.local/ns/shop/sa/db"),
            sni: Some("outbound_.9000_._.db.shop.svc.cluster.local"),
        }
    }

    #[test]
    fn check_request_describes_the_connection_only() {
        let req = check_request(&mtls_input());
        let a = req.attributes.unwrap();
        let src = a.source.clone().unwrap();
        assert_eq!(src.principal, "spiffe://cluster.local/ns/shop/sa/client");
        assert_eq!(addr_of(&src), ("127.0.65.9".to_owned(), 40000));
        assert_eq!(src.service, "");
        let dst = a.destination.clone().unwrap();
        assert_eq!(dst.principal, "spiffe://cluster.local/ns/shop/sa/db");
        assert_eq!(addr_of(&dst), ("127.0.65.1".to_owned(), 9000));
        assert_eq!(dst.service, "outbound_.9000_._.db.shop.svc.cluster.local");
        // No HTTP request, no time, no TLS session (Istio does not set include_tls_session),
        // no context extensions or metadata.
        assert_eq!(a.request, None);
        assert_eq!(a.tls_session, None);
        assert!(a.context_extensions.is_empty());
        assert_eq!(a.metadata_context, None);
    }

    #[test]
    fn plaintext_connection_has_no_principals() {
        let input = ConnInput {
            source_principal: None,
            destination_principal: None,
            sni: None,
            ..mtls_input()
        };
        let a = check_request(&input).attributes.unwrap();
        let (src, dst) = (a.source.unwrap(), a.destination.unwrap());
        assert_eq!((src.principal.as_str(), dst.principal.as_str()), ("", ""));
        assert_eq!(dst.service, "");
        assert_eq!(addr_of(&src), ("127.0.65.9".to_owned(), 40000));
    }

    #[test]
    fn pending_skips_providers_that_allowed() {
        let mut gate = ConnectionGate::default();
        assert_eq!(gate.pending(&["a", "b"]), vec!["a", "b"]);
        gate.allowed.push("a".into());
        assert_eq!(gate.pending(&["a", "b"]), vec!["b"]);
        assert!(gate.pending(&["a"]).is_empty());
    }

    fn down_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn grpc_down(name: &str, fail_open: bool) -> ExtensionProvider {
        ExtensionProvider {
            name: name.into(),
            envoy_ext_authz_grpc: Some(ExtAuthzGrpcProvider {
                service: "127.0.0.1".into(),
                port: u32::from(down_port()),
                timeout: Some("1s".into()),
                fail_open,
                status_on_error: None,
                include_request_body_in_check: None,
            }),
            envoy_ext_authz_http: None,
        }
    }

    #[tokio::test]
    async fn one_check_per_call_and_what_closes() {
        let (allow, seen) = grpc_server(false).await;
        let (deny, seen_deny) = grpc_server(true).await;
        let ext = ExtAuthz::build(&MeshConfig {
            extension_providers: vec![
                grpc_p("allow", allow),
                grpc_p("deny", deny),
                grpc_down("down-closed", false),
                grpc_down("down-open", true),
                // An HTTP provider never gets a TCP check (its address is never dialed).
                http_p("http", down_port(), false, None),
            ],
            ..MeshConfig::default()
        });
        let input = mtls_input();
        let ask = |names: &'static [&'static str]| {
            let ext = ext.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), ext.check_connection(names, &input))
                    .await
                    .unwrap()
            }
        };

        assert_eq!(ask(&["allow"]).await, Ok(()));
        {
            let seen = seen.0.lock().unwrap();
            assert_eq!(seen.len(), 1, "one check per connection");
            let a = seen[0].attributes.as_ref().unwrap();
            assert_eq!(
                a.source.as_ref().unwrap().principal,
                "spiffe://cluster.local/ns/shop/sa/client"
            );
            assert!(a.request.is_none());
        }

        let d = ask(&["allow", "deny"]).await.unwrap_err();
        assert_eq!(d.provider, "deny");
        assert!(d.reason.contains("gRPC code 7"), "{d:?}");
        assert_eq!(seen.0.lock().unwrap().len(), 2);
        assert_eq!(seen_deny.0.lock().unwrap().len(), 1);

        // The first denial ends it: later providers are not asked.
        assert!(ask(&["deny", "allow"]).await.is_err());
        assert_eq!(seen.0.lock().unwrap().len(), 2);

        let d = ask(&["down-closed"]).await.unwrap_err();
        assert!(d.reason.starts_with("authorizer error"), "{d:?}");
        assert_eq!(ask(&["down-open"]).await, Ok(()));
        assert_eq!(ask(&["http"]).await, Ok(()));
        let d = ask(&["undefined"]).await.unwrap_err();
        assert_eq!(d.reason, "extension provider is not defined");
    }
}
