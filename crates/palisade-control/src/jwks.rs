//! The JWKS resolver: the control plane fetches the keys of every RequestAuthentication rule that
//! names a `jwksUri` (or only an issuer: OIDC discovery at
//! `<issuer>/.well-known/openid-configuration`), and pushes them to proxies inline, as Istio's
//! istiod does. Proxies never fetch on the request path.
//!
//! - Each source is fetched with the rule's `timeout` (default 5 s), then refreshed every
//!   [`JwksOptions::refresh`] (20 min by default); a failed fetch is retried after
//!   [`JwksOptions::retry_initial`] (1 min), doubling up to [`JwksOptions::retry_max`] (60 min).
//! - The last good document is kept through failures. With none yet, the rule is pushed with an
//!   empty key set marked with [`FETCH_ERROR_MEMBER`]: proxies refuse its tokens with
//!   "Jwks remote fetch is failed" (fail closed, never open).
//! - Symmetric (`oct`) keys are dropped from fetched documents: HMAC needs an inline secret.
//!
//! [`JwksResolver::inline`] rewrites a [`WorkloadConfig`]'s rules (`jwks` set, `jwksUri`
//! cleared); [`JwksResolver::changes`] ticks when a source's keys change, so the watcher
//! republishes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use palisade_policy::MeshSnapshot;
use palisade_policy::api::JwtRule;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::wire::WorkloadConfig;

/// Marker member of an empty key set pushed when a source has never been fetched. The proxy's
/// `jwt` module reads the same name.
pub const FETCH_ERROR_MEMBER: &str = palisade_policy::workload_config::JWKS_FETCH_ERROR_MEMBER;
/// The largest JWKS or discovery document accepted (the proxy has the same limit).
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Istio's default fetch timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Refresh and retry timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwksOptions {
    pub refresh: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl Default for JwksOptions {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(20 * 60),
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(60 * 60),
        }
    }
}

impl JwksOptions {
    /// Defaults, overridden by `PALISADE_JWKS_REFRESH` and `PALISADE_JWKS_RETRY` (durations such
    /// as `2s`; the retry also caps at 60 x its first delay) when set and valid.
    pub fn from_env() -> Self {
        let mut o = Self::default();
        let get = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| palisade_policy::validate::parse_duration(&v).ok())
                .filter(|d| !d.is_zero())
        };
        if let Some(d) = get("PALISADE_JWKS_REFRESH") {
            o.refresh = d;
        }
        if let Some(d) = get("PALISADE_JWKS_RETRY") {
            o.retry_initial = d;
            o.retry_max = d.saturating_mul(60).min(o.retry_max);
        }
        o
    }
}

/// A RequestAuthentication rule whose keys are fetched over plain HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaintextSource {
    /// `namespace/name`.
    pub request_authentication: String,
    pub issuer: String,
    /// The `http://` URL fetched first (the JWKS, or the OIDC discovery document).
    pub uri: String,
}

/// Where a rule's keys come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    Uri(String),
    /// OIDC discovery from the issuer.
    Issuer(String),
}

impl Source {
    /// The source of a rule that needs fetching; `None` for inline keys.
    pub fn of(rule: &JwtRule) -> Option<Source> {
        if !rule.jwks.is_empty() {
            None
        } else if !rule.jwks_uri.is_empty() {
            Some(Source::Uri(rule.jwks_uri.clone()))
        } else if !rule.issuer.is_empty() {
            Some(Source::Issuer(rule.issuer.clone()))
        } else {
            None
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Uri(u) => f.write_str(u),
            Source::Issuer(i) => write!(f, "OIDC discovery of {i}"),
        }
    }
}

#[derive(Debug, Default)]
struct Entry {
    /// The last good document (normalized JSON).
    keys: Option<String>,
    last_error: Option<String>,
    task: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    options: JwksOptions,
    entries: Mutex<HashMap<Source, Entry>>,
    changes: watch::Sender<u64>,
    /// (RequestAuthentication `ns/name`, plaintext URL) pairs already warned about, so that the
    /// warning appears once while the rule stays, not on every reload or key refresh.
    plaintext_warned: Mutex<HashSet<(String, String)>>,
}

/// The resolver; cheap to clone.
#[derive(Debug, Clone)]
pub struct JwksResolver {
    inner: Arc<Inner>,
}

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("{source_name}: {reason}")]
    Failed { source_name: String, reason: String },
}

impl Drop for Inner {
    fn drop(&mut self) {
        let entries = self
            .entries
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for e in entries.values() {
            if let Some(t) = &e.task {
                t.abort();
            }
        }
    }
}

impl JwksResolver {
    pub fn new(options: JwksOptions) -> Self {
        let (changes, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                options,
                entries: Mutex::new(HashMap::new()),
                changes,
                plaintext_warned: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// Ticks whenever some source's keys change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Starts fetching every source the snapshot's rules name, and stops those no longer named.
    /// Must run inside a Tokio runtime.
    pub fn sync(&self, snapshot: &MeshSnapshot) {
        for w in self.new_plaintext_sources(snapshot) {
            tracing::warn!(
                request_authentication = %w.request_authentication,
                issuer = %w.issuer,
                uri = %w.uri,
                "JWKS fetched over plain http: anyone on the network path can swap the keys and mint accepted tokens; use https"
            );
        }
        let mut wanted: HashMap<Source, Duration> = HashMap::new();
        for ra in &snapshot.request_authentications {
            for rule in &ra.resource.spec.jwt_rules {
                if let Some(s) = Source::of(rule) {
                    let timeout = rule
                        .timeout
                        .as_deref()
                        .and_then(|t| palisade_policy::validate::parse_duration(t).ok())
                        .unwrap_or(DEFAULT_TIMEOUT);
                    wanted.insert(s, timeout);
                }
            }
        }
        let mut entries = self
            .inner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        entries.retain(|s, e| {
            let keep = wanted.contains_key(s);
            if !keep && let Some(t) = &e.task {
                t.abort();
            }
            keep
        });
        for (source, timeout) in wanted {
            let entry = entries.entry(source.clone()).or_default();
            if entry.task.is_none() {
                let weak = Arc::downgrade(&self.inner);
                entry.task = Some(tokio::spawn(refresh_loop(weak, source, timeout)));
            }
        }
    }

    /// The rules whose keys come over plain `http://` that were not reported yet (Istio accepts
    /// them; they deserve a warning). Forgets rules that are gone, so one that comes back is
    /// reported again.
    pub fn new_plaintext_sources(&self, snapshot: &MeshSnapshot) -> Vec<PlaintextSource> {
        let mut current = HashSet::new();
        let mut found = Vec::new();
        for ra in &snapshot.request_authentications {
            let meta = &ra.resource.metadata;
            let key = format!("{}/{}", meta.namespace(), meta.name);
            for rule in &ra.resource.spec.jwt_rules {
                if let Some(uri) = palisade_policy::analyze::plaintext_jwks_url(rule)
                    && current.insert((key.clone(), uri.clone()))
                {
                    found.push(PlaintextSource {
                        request_authentication: key.clone(),
                        issuer: rule.issuer.clone(),
                        uri,
                    });
                }
            }
        }
        let mut warned = self
            .inner
            .plaintext_warned
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        found.retain(|f| !warned.contains(&(f.request_authentication.clone(), f.uri.clone())));
        *warned = current;
        found
    }

    /// The document pushed for `source`: the last good keys, or an empty set that fails closed.
    pub fn document(&self, source: &Source) -> String {
        let entries = self
            .inner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match entries.get(source) {
            Some(Entry { keys: Some(k), .. }) => k.clone(),
            other => {
                let reason = other
                    .and_then(|e| e.last_error.clone())
                    .unwrap_or_else(|| "not fetched yet".to_owned());
                serde_json::json!({"keys": [], FETCH_ERROR_MEMBER: reason}).to_string()
            }
        }
    }

    /// Rewrites the config's rules that need fetched keys: `jwks` holds the keys, `jwksUri` is
    /// cleared (a rule carries one or the other). Rules without issuer keep their `jwksUri`
    /// (validation needs one of the two) and so fail closed at the proxy.
    pub fn inline(&self, cfg: &mut WorkloadConfig) {
        for ra in &mut cfg.request_authentications {
            for rule in &mut ra.spec.jwt_rules {
                if rule.issuer.is_empty() {
                    continue;
                }
                if let Some(source) = Source::of(rule) {
                    rule.jwks = self.document(&source);
                    rule.jwks_uri.clear();
                }
            }
        }
    }

    fn store(inner: &Inner, source: &Source, result: Result<String, String>) -> bool {
        let mut entries = inner.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = entries.get_mut(source) else {
            return false;
        };
        let changed = match result {
            Ok(doc) => {
                let changed = entry.keys.as_deref() != Some(doc.as_str());
                entry.keys = Some(doc);
                entry.last_error = None;
                changed
            }
            Err(e) => {
                // Only a source without keys changes what is pushed (its error text).
                let changed =
                    entry.keys.is_none() && entry.last_error.as_deref() != Some(e.as_str());
                entry.last_error = Some(e);
                changed
            }
        };
        drop(entries);
        if changed {
            inner.changes.send_modify(|g| *g += 1);
        }
        changed
    }
}

async fn refresh_loop(inner: std::sync::Weak<Inner>, source: Source, timeout: Duration) {
    let mut retry: Option<Duration> = None;
    loop {
        let result = fetch_source(&source, timeout).await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let options = strong.options;
        let delay = match &result {
            Ok(_) => {
                retry = None;
                options.refresh
            }
            Err(e) => {
                let d = retry.map_or(options.retry_initial, |d| {
                    d.saturating_mul(2).min(options.retry_max)
                });
                retry = Some(d);
                tracing::warn!(source = %source, error = %e, retry_in = ?d, "JWKS fetch failed; keeping the last good keys");
                d
            }
        };
        if let Ok(doc) = &result {
            tracing::debug!(source = %source, bytes = doc.len(), "JWKS fetched");
        }
        if JwksResolver::store(&strong, &source, result) {
            tracing::info!(source = %source, "JWKS keys changed; pushing");
        }
        drop(strong);
        tokio::time::sleep(delay).await;
    }
}

/// Fetches and normalizes one source within `timeout`.
pub async fn fetch_source(source: &Source, timeout: Duration) -> Result<String, String> {
    let work = async {
        let uri = match source {
            Source::Uri(u) => u.clone(),
            Source::Issuer(iss) => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    iss.trim_end_matches('/')
                );
                let doc = get(&url).await?;
                let v: Value =
                    serde_json::from_str(&doc).map_err(|e| format!("discovery document: {e}"))?;
                v.get("jwks_uri")
                    .and_then(Value::as_str)
                    .ok_or("discovery document has no jwks_uri")?
                    .to_owned()
            }
        };
        normalize(&get(&uri).await?)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("timed out after {timeout:?}"))?
}

async fn get(uri: &str) -> Result<String, String> {
    let body = palisade_ca::jwks::fetch(uri)
        .await
        .map_err(|e| e.to_string())?;
    if body.len() > MAX_DOCUMENT_BYTES {
        return Err(format!(
            "{uri}: document is {} bytes, more than {MAX_DOCUMENT_BYTES}",
            body.len()
        ));
    }
    Ok(body)
}

/// Checks a fetched JWKS and drops what must not be pushed (symmetric keys).
pub fn normalize(doc: &str) -> Result<String, String> {
    let mut v: Value = serde_json::from_str(doc).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let keys = v
        .get_mut("keys")
        .and_then(Value::as_array_mut)
        .ok_or("JWKS has no \"keys\" array")?;
    keys.retain(|k| k.get("kty").and_then(Value::as_str) != Some("oct"));
    if keys.is_empty() {
        return Err("JWKS has no usable public keys".to_owned());
    }
    Ok(serde_json::json!({"keys": keys}).to_string())
}

/// The ADS resources of a snapshot with keys inlined (see [`crate::workload_resources`]).
pub fn workload_resources(
    snapshot: &MeshSnapshot,
    previous: &[String],
    resolver: Option<&JwksResolver>,
) -> Result<(Vec<palisade_xds::Change>, Vec<String>), serde_json::Error> {
    let Some(resolver) = resolver else {
        return crate::compute::workload_resources(snapshot, previous);
    };
    resolver.sync(snapshot);
    let (mut changes, names) = crate::compute::workload_resources(snapshot, previous)?;
    for c in &mut changes {
        if let palisade_xds::Change::Set { body, .. } = c
            && let Ok(mut cfg) = crate::wire::from_any(body)
            && !cfg.request_authentications.is_empty()
        {
            resolver.inline(&mut cfg);
            *body = crate::wire::to_any(&cfg)?;
        }
    }
    Ok((changes, names))
}

/// Republishes the served snapshot whenever the resolver's keys change. Abort the handle to stop.
pub fn spawn_republisher(
    resolver: JwksResolver,
    cache: Arc<palisade_xds::SnapshotCache>,
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
) -> JoinHandle<()> {
    let mut changes = resolver.changes();
    // Keys fetched between the first publish and this subscription would otherwise never be
    // pushed (a new receiver treats the current value as seen): republish once up front.
    changes.mark_changed();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let snapshot = snapshots.borrow().clone();
            // No removals: the watcher owns the set of names.
            match workload_resources(&snapshot, &[], Some(&resolver)) {
                Ok((c, _)) => {
                    cache.apply(c);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode workload config with JWKS keys")
                }
            }
        }
    })
}

#[cfg(test)]
mod tests;
