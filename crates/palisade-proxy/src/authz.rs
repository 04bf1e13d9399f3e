//! One authorization decision on the data path: evaluate with the compiled policy, count it,
//! count dry-run (shadow) results, and log every deny with the deciding policy and the engine's
//! reason. `POST /logging?rbac=debug` also logs allowed decisions.

use std::sync::atomic::{AtomicU8, Ordering};

use palisade_policy::{RequestContext, Verdict};

use crate::config::ProxyConfig;

/// RBAC log levels settable at run time.
pub const RBAC_INFO: u8 = 1;
pub const RBAC_DEBUG: u8 = 2;

/// The run-time RBAC log level.
#[derive(Debug)]
pub struct RbacLog(AtomicU8);

impl Default for RbacLog {
    fn default() -> Self {
        Self(AtomicU8::new(RBAC_INFO))
    }
}

impl RbacLog {
    pub fn set(&self, level: u8) {
        self.0.store(level, Ordering::Relaxed);
    }
    pub fn get(&self) -> u8 {
        self.0.load(Ordering::Relaxed)
    }
    pub fn name(&self) -> &'static str {
        if self.get() >= RBAC_DEBUG {
            "debug"
        } else {
            "info"
        }
    }
}

/// What the data path does with a request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allow,
    Deny,
    /// Malformed before authorization (bad path or method): HTTP 400.
    BadRequest,
}

/// Decides `ctx` under `cfg`; `http` selects the counters.
pub fn authorize(
    cfg: &ProxyConfig,
    ctx: &RequestContext<'_>,
    http: bool,
    log: &RbacLog,
) -> Outcome {
    let verdict = match cfg.policy.evaluate(ctx) {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(target: "palisade::rbac", workload = %cfg.workload, port = ctx.port, error = %e, "request rejected before authorization");
            return Outcome::BadRequest;
        }
    };
    // `allowed` assumes the CUSTOM providers allow: the caller asked them first (HTTP:
    // `ext_authz::gate`; TCP: `ext_authz::network`) and refused what they denied.
    let allowed = verdict.allowed;
    count(cfg, &verdict, allowed, http);
    if !allowed {
        log_deny(cfg, ctx, &verdict);
    } else if log.get() >= RBAC_DEBUG {
        tracing::info!(
            target: "palisade::rbac",
            workload = %cfg.workload,
            protocol = if http { "http" } else { "tcp" },
            port = ctx.port,
            principal = ctx.peer_principal.unwrap_or("-"),
            method = ctx.http.map_or("-", |h| h.method),
            path = ctx.http.map_or("-", |h| h.path),
            policy = verdict.policy.unwrap_or("none"),
            action = verdict.action.as_str(),
            reason = ?verdict.reason,
            "enforced allowed"
        );
    }
    if allowed {
        Outcome::Allow
    } else {
        Outcome::Deny
    }
}

fn count(cfg: &ProxyConfig, v: &Verdict<'_>, allowed: bool, http: bool) {
    if let Some(c) = cfg.counters.get(v.policy) {
        let counter = match (http, allowed) {
            (true, true) => &c.http_allowed,
            (true, false) => &c.http_denied,
            (false, true) => &c.tcp_allowed,
            (false, false) => &c.tcp_denied,
        };
        counter.inc();
    }
    for d in &v.dry_run {
        if let Some(c) = cfg.counters.get(Some(d.rule.unwrap_or(d.policy))) {
            if d.would_allow {
                &c.shadow_allowed
            } else {
                &c.shadow_denied
            }
            .inc();
        }
        tracing::debug!(target: "palisade::rbac", policy = d.policy, rule = d.rule.unwrap_or("none"), would_allow = d.would_allow, "shadow result");
    }
}

fn log_deny(cfg: &ProxyConfig, ctx: &RequestContext<'_>, v: &Verdict<'_>) {
    // The deny path may allocate: ask the engine for its explanation.
    let reason = match cfg.policy.explain(ctx) {
        Ok(d) => d.reason,
        Err(e) => e.to_string(),
    };
    tracing::info!(
        target: "palisade::rbac",
        workload = %cfg.workload,
        protocol = if ctx.http.is_some() { "http" } else { "tcp" },
        port = ctx.port,
        source = ?ctx.source_ip,
        principal = ctx.peer_principal.unwrap_or("-"),
        method = ctx.http.map_or("-", |h| h.method),
        path = ctx.http.map_or("-", |h| h.path),
        policy = v.policy.unwrap_or("none"),
        action = v.action.as_str(),
        %reason,
        "enforced denied, matched policy {}",
        v.policy.unwrap_or("none")
    );
}
