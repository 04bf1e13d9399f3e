//! The JWKS resolver: the control plane fetches the keys of every RequestAuthentication rule that
//! names a `jwksUri` (or only an issuer: OIDC discovery at
//! `<issuer>/.well-known/openid-configuration`), and pushes them to proxies inline, as Istio's
//! istiod does. Proxies never fetch on the request path.
//!
//! - Each source is fetched with the rule's `timeout` (default 5 s), then refreshed every
//!   [`JwksOptions::refresh`] (20 min by default); a failed fetch is retried after
//!   [`JwksOptions::retry_initial`] (1 min), doubling up to [`JwksOptions::retry_max`] (60 min).
//! - A source no rule names any more stays cached (and refreshed) for
//!   [`JwksOptions::evict_unused_after`] (7 days, as istiod), so that a rule that comes back
//!   (moved between files, an edit undone) has its keys at once instead of failing closed until
//!   a fetch; then it is evicted, so sources named once do not pile up.
//! - The timings come from `mesh.yaml`'s `jwksResolver` ([`JwksOptions::from_mesh`]); the
//!   environment variables `PALISADE_JWKS_REFRESH` and `PALISADE_JWKS_RETRY`, when set, win
//!   over it (a per-process override, as tests and debugging want).
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
use palisade_policy::mesh::{JwksTimings, MeshConfig};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::metrics::ControlMetrics;
use crate::wire::WorkloadConfig;

/// Marker member of an empty key set pushed when a source has never been fetched. The proxy's
/// `jwt` module reads the same name.
pub const FETCH_ERROR_MEMBER: &str = palisade_policy::workload_config::JWKS_FETCH_ERROR_MEMBER;
/// The largest JWKS or discovery document accepted (the proxy has the same limit).
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Istio's default fetch timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The environment variable that overrides `jwksResolver.refreshInterval`.
pub const ENV_REFRESH: &str = "PALISADE_JWKS_REFRESH";
/// The environment variable that overrides `jwksResolver.retryInitialInterval` (and caps the
/// maximum at 60 times it).
pub const ENV_RETRY: &str = "PALISADE_JWKS_RETRY";

/// Refresh, retry and eviction timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwksOptions {
    pub refresh: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How long a source no rule names stays cached.
    pub evict_unused_after: Duration,
}

impl Default for JwksOptions {
    fn default() -> Self {
        JwksTimings::default().into()
    }
}

impl From<JwksTimings> for JwksOptions {
    fn from(t: JwksTimings) -> Self {
        Self {
            refresh: t.refresh,
            retry_initial: t.retry_initial,
            retry_max: t.retry_max,
            evict_unused_after: t.evict_unused_after,
        }
    }
}

impl JwksOptions {
    /// `mesh.yaml`'s `jwksResolver` (defaults for what it leaves out), then the environment.
    pub fn from_mesh(mesh: &MeshConfig) -> Self {
        Self::from(mesh.jwks_timings()).with_env(|k| std::env::var(k).ok())
    }

    /// Defaults and the environment only.
    pub fn from_env() -> Self {
        Self::from_mesh(&MeshConfig::default())
    }

    /// Overrides from `PALISADE_JWKS_REFRESH` and `PALISADE_JWKS_RETRY` (durations such as
    /// `2s`; the retry also caps the maximum at 60 x its first delay), read with `get`. A value
    /// that is not a duration greater than zero is ignored with a warning.
    pub fn with_env(mut self, get: impl Fn(&str) -> Option<String>) -> Self {
        let read = |k: &str| {
            let v = get(k)?;
            match palisade_policy::validate::parse_duration(&v) {
                Ok(d) if !d.is_zero() => Some(d),
                Ok(_) => {
                    tracing::warn!(variable = k, value = %v, "ignored: must be greater than 0");
                    None
                }
                Err(e) => {
                    tracing::warn!(variable = k, value = %v, error = %e, "ignored");
                    None
                }
            }
        };
        if let Some(d) = read(ENV_REFRESH) {
            self.refresh = d;
        }
        if let Some(d) = read(ENV_RETRY) {
            self.retry_initial = d;
            // Never below the first delay: the backoff only grows.
            self.retry_max = d.saturating_mul(60).min(self.retry_max).max(d);
        }
        self
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

#[derive(Debug)]
struct Entry {
    /// The last good document (normalized JSON).
    keys: Option<String>,
    last_error: Option<String>,
    task: Option<JoinHandle<()>>,
    /// Since when no rule names the source (`None`: in use). A channel, so that the refresh
    /// task sleeps until the eviction time as soon as it is set.
    unused_since: watch::Sender<Option<Instant>>,
}

impl Entry {
    fn new() -> Self {
        Self {
            keys: None,
            last_error: None,
            task: None,
            unused_since: watch::Sender::new(None),
        }
    }

    fn evictable(&self, now: Instant, after: Duration) -> bool {
        self.unused_since
            .borrow()
            .is_some_and(|since| now.saturating_duration_since(since) >= after)
    }
}

#[derive(Debug)]
struct Inner {
    options: JwksOptions,
    metrics: ControlMetrics,
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
        Self::with_metrics(options, ControlMetrics::default())
    }

    /// As [`Self::new`], counting fetches in `metrics`.
    pub fn with_metrics(options: JwksOptions, metrics: ControlMetrics) -> Self {
        let (changes, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                options,
                metrics,
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

    /// Starts fetching every source the snapshot's rules name; those no longer named are marked
    /// unused (evicted once unused for [`JwksOptions::evict_unused_after`]). Must run inside a
    /// Tokio runtime.
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
        let now = Instant::now();
        let evict_after = self.inner.options.evict_unused_after;
        entries.retain(|s, e| {
            if wanted.contains_key(s) {
                e.unused_since.send_if_modified(|u| u.take().is_some());
                return true;
            }
            e.unused_since.send_if_modified(|u| {
                let newly = u.is_none();
                if newly {
                    *u = Some(now);
                }
                newly
            });
            // The refresh task evicts on time; this catches an entry whose task is not running.
            let evict = e.evictable(now, evict_after);
            if evict {
                if let Some(t) = &e.task {
                    t.abort();
                }
                tracing::info!(source = %s, unused_for = ?evict_after, "JWKS source evicted: no rule names it");
            }
            !evict
        });
        for (source, timeout) in wanted {
            let entry = entries.entry(source.clone()).or_insert_with(Entry::new);
            if entry.task.is_none() {
                let weak = Arc::downgrade(&self.inner);
                let unused = entry.unused_since.subscribe();
                entry.task = Some(tokio::spawn(refresh_loop(weak, source, timeout, unused)));
            }
        }
    }

    /// The sources cached now, in use or not.
    pub fn cached_sources(&self) -> Vec<Source> {
        let entries = self
            .inner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        entries.keys().cloned().collect()
    }

    /// Removes `source` if it has been unused for long enough; true when it did.
    fn evict_if_unused(inner: &Inner, source: &Source) -> bool {
        let mut entries = inner.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let after = inner.options.evict_unused_after;
        if !entries
            .get(source)
            .is_some_and(|e| e.evictable(Instant::now(), after))
        {
            return false;
        }
        entries.remove(source);
        tracing::info!(source = %source, unused_for = ?after, "JWKS source evicted: no rule names it");
        true
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

/// Fetches `source` now and after every refresh or retry delay, until the entry is evicted
/// (unused for long enough, see [`Entry::unused_since`]) or removed.
async fn refresh_loop(
    inner: std::sync::Weak<Inner>,
    source: Source,
    timeout: Duration,
    mut unused: watch::Receiver<Option<Instant>>,
) {
    let mut retry: Option<Duration> = None;
    loop {
        let result = fetch_source(&source, timeout).await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let options = strong.options;
        strong.metrics.jwks_fetched(result.is_ok());
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
                // Keys no rule uses are not pushed: their failures are no operator's concern.
                if unused.borrow().is_none() {
                    tracing::warn!(source = %source, error = %e, retry_in = ?d, "JWKS fetch failed; keeping the last good keys");
                } else {
                    tracing::debug!(source = %source, error = %e, retry_in = ?d, "JWKS fetch failed for an unused source");
                }
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
        let next_fetch = Instant::now() + delay;
        // The unused-since time already checked for eviction, so a refused eviction is not
        // tried again (in a loop) until the state changes.
        let mut checked: Option<Instant> = None;
        loop {
            let since = *unused.borrow_and_update();
            let evict_at = since
                .filter(|s| checked != Some(*s))
                .map(|s| s + options.evict_unused_after);
            tokio::select! {
                () = tokio::time::sleep_until(next_fetch) => break,
                () = sleep_until_some(evict_at) => {
                    let Some(strong) = inner.upgrade() else {
                        return;
                    };
                    if JwksResolver::evict_if_unused(&strong, &source) {
                        return;
                    }
                    // In use again meanwhile: the next turn reads the new state.
                    checked = since;
                }
                changed = unused.changed() => {
                    if changed.is_err() {
                        // The entry is gone.
                        return;
                    }
                }
            }
        }
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
