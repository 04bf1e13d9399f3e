//! Prometheus metrics of one proxy. Counters that the request path touches are resolved ahead
//! of time (per config, per policy rule id), so a request only does a hash lookup by `&str` and
//! an atomic increment: no label allocation, no registry lock.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use palisade_policy::CompiledPolicy;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `http` (per request) or `tcp` (per connection).
    pub protocol: &'static str,
    /// `allowed` or `denied`.
    pub decision: &'static str,
    /// The deciding rule id (`ns[..]-policy[..]-rule[..]`) or `none`.
    pub policy: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    pub policy: String,
    /// `allowed` or `denied`: what the dry-run policy would have decided.
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// The port's mTLS mode.
    pub mode: &'static str,
    /// `mtls` (handshake done), `plaintext` (served without TLS), `failed`, `refused_plaintext`.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `http1`, `http2` or `tcp`.
    pub protocol: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelLabels {
    /// `upgrade` (an HTTP/1.1 `Upgrade`, WebSocket say) or `connect`.
    pub kind: &'static str,
}

/// All metric families of a proxy.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub decisions: Family<DecisionLabels, Counter>,
    pub shadow: Family<ShadowLabels, Counter>,
    pub handshakes: Family<HandshakeLabels, Counter>,
    pub connections: Family<ConnLabels, Counter>,
    pub tcp_closed_by_policy: Counter,
    pub tunnels: Family<TunnelLabels, Counter>,
    pub config_updates: Counter,
    pub config_rejected: Counter,
    pub active_connections: Gauge,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "palisade_rbac_decisions",
            "Authorization decisions by protocol, decision and deciding policy rule",
            self.decisions.clone(),
        );
        registry.register(
            "palisade_rbac_shadow",
            "Dry-run (shadow) authorization results by policy",
            self.shadow.clone(),
        );
        registry.register(
            "palisade_tls_handshakes",
            "Inbound connections by mTLS mode and TLS outcome",
            self.handshakes.clone(),
        );
        registry.register(
            "palisade_connections",
            "Connections by direction and protocol",
            self.connections.clone(),
        );
        registry.register(
            "palisade_tcp_connections_closed_by_policy",
            "Open TCP connections closed because a new policy denies them",
            self.tcp_closed_by_policy.clone(),
        );
        registry.register(
            "palisade_tunnels",
            "Tunnels opened (an upgrade or CONNECT the far side accepted), by kind",
            self.tunnels.clone(),
        );
        registry.register(
            "palisade_config_updates",
            "Configs accepted",
            self.config_updates.clone(),
        );
        registry.register(
            "palisade_config_rejected",
            "Configs rejected (NACKed); the previous one stays",
            self.config_rejected.clone(),
        );
        registry.register(
            "palisade_active_connections",
            "Connections open now",
            self.active_connections.clone(),
        );
    }

    /// Counters for every rule id of `policy`, resolved now so that requests never allocate.
    pub fn decision_counters(&self, policy: &CompiledPolicy) -> DecisionCounters {
        let mut by_id = HashMap::new();
        let mut ids: Vec<String> = vec!["none".to_owned()];
        for p in policy.policies() {
            // Policy-level entry: dry-run results that matched no rule.
            ids.push(p.id.clone());
            for i in 0..p.rule_count.max(1) {
                ids.push(format!("{}-rule[{i}]", p.id));
            }
        }
        for id in ids {
            // Each lookup in its own statement: a family's read guard lives until the end of
            // the statement, and a second `get_or_create` in it would wait on itself.
            let decision = |protocol, decision| {
                let c = self.decisions.get_or_create(&DecisionLabels {
                    protocol,
                    decision,
                    policy: id.clone(),
                });
                c.clone()
            };
            let shadow = |result| {
                let c = self.shadow.get_or_create(&ShadowLabels {
                    policy: id.clone(),
                    result,
                });
                c.clone()
            };
            let http_allowed = decision("http", "allowed");
            let http_denied = decision("http", "denied");
            let tcp_allowed = decision("tcp", "allowed");
            let tcp_denied = decision("tcp", "denied");
            let shadow_allowed = shadow("allowed");
            let shadow_denied = shadow("denied");
            let set = RuleCounters {
                http_allowed,
                http_denied,
                tcp_allowed,
                tcp_denied,
                shadow_allowed,
                shadow_denied,
            };
            by_id.insert(id.into_boxed_str(), set);
        }
        DecisionCounters {
            by_id: Arc::new(by_id),
        }
    }

    pub fn handshake(&self, mode: &'static str, outcome: &'static str) {
        self.handshakes
            .get_or_create(&HandshakeLabels { mode, outcome })
            .inc();
    }

    pub fn connection(&self, direction: &'static str, protocol: &'static str) {
        self.connections
            .get_or_create(&ConnLabels {
                direction,
                protocol,
            })
            .inc();
    }
}

/// The counters of one rule id.
#[derive(Debug, Clone, Default)]
pub struct RuleCounters {
    pub http_allowed: Counter,
    pub http_denied: Counter,
    pub tcp_allowed: Counter,
    pub tcp_denied: Counter,
    pub shadow_allowed: Counter,
    pub shadow_denied: Counter,
}

/// Pre-resolved counters of one config.
#[derive(Debug, Clone, Default)]
pub struct DecisionCounters {
    by_id: Arc<HashMap<Box<str>, RuleCounters>>,
}

impl DecisionCounters {
    /// The counters of a rule id (`None` = the `none` entry).
    pub fn get(&self, id: Option<&str>) -> Option<&RuleCounters> {
        self.by_id.get(id.unwrap_or("none"))
    }
}
