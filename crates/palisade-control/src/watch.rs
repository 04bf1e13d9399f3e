//! The mesh directory watch: reload on change, validate, publish to the ADS snapshot cache.
//!
//! A change is picked up after a short quiet period (editors write in several steps). An
//! invalid directory never replaces the last good snapshot: every error is logged and the
//! status channel carries them, so the control plane keeps pushing the previous config.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use palisade_policy::{LoadErrors, MeshSnapshot};
use palisade_xds::SnapshotCache;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How long the directory must stay quiet before a reload.
const QUIET: Duration = Duration::from_millis(100);

/// Why the watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("mesh directory {dir} is invalid:\n{errors}")]
    Invalid { dir: PathBuf, errors: LoadErrors },
    #[error("cannot watch {dir}: {cause}")]
    Notify { dir: PathBuf, cause: notify::Error },
    #[error("cannot encode workload config: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What the watcher last did.
#[derive(Debug, Clone, Default)]
pub struct ConfigStatus {
    /// Successful loads so far (the first load is 1).
    pub generation: u64,
    /// Workloads in the snapshot being served.
    pub workloads: usize,
    /// Loads rejected so far.
    pub rejected: u64,
    /// The errors of the latest load, when it was rejected (cleared by a good load).
    pub last_error: Option<String>,
}

/// A running watch. Dropping it stops watching.
pub struct ConfigWatcher {
    status: watch::Receiver<Arc<ConfigStatus>>,
    snapshot: watch::Receiver<Arc<MeshSnapshot>>,
    task: JoinHandle<()>,
    /// Republishes when JWKS keys change (see [`crate::jwks`]).
    jwks_task: Option<JoinHandle<()>>,
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for ConfigWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigWatcher").finish_non_exhaustive()
    }
}

struct State {
    dir: PathBuf,
    cache: Arc<SnapshotCache>,
    names: Vec<String>,
    status: watch::Sender<Arc<ConfigStatus>>,
    snapshot: watch::Sender<Arc<MeshSnapshot>>,
    jwks: Option<crate::jwks::JwksResolver>,
}

impl ConfigWatcher {
    /// Loads `dir` (it must be valid now), publishes it into `cache`, and reloads on change.
    pub fn start(dir: &Path, cache: Arc<SnapshotCache>) -> Result<Self, WatchError> {
        Self::start_with_jwks(dir, cache, None)
    }

    /// [`Self::start`], with JWKS keys fetched by `jwks` inlined into the pushed configs.
    pub fn start_with_jwks(
        dir: &Path,
        cache: Arc<SnapshotCache>,
        jwks: Option<crate::jwks::JwksResolver>,
    ) -> Result<Self, WatchError> {
        let first = palisade_policy::load_dir(dir).map_err(|errors| WatchError::Invalid {
            dir: dir.to_owned(),
            errors,
        })?;
        Self::watch_from(dir, cache, jwks, Ok(first))
    }

    /// [`Self::start_with_jwks`], but a directory that does not validate now is not fatal: its
    /// errors are logged and published on the status channel (generation 0), nothing is
    /// published into `cache` (a fresh process has no last good config), and the first valid
    /// state of the directory is loaded and pushed as soon as it is written. Only a directory
    /// that cannot be watched is an error. This is what a long-running control plane wants: its
    /// CA must keep serving while someone fixes a policy file.
    pub fn start_tolerant(
        dir: &Path,
        cache: Arc<SnapshotCache>,
        jwks: Option<crate::jwks::JwksResolver>,
    ) -> Result<Self, WatchError> {
        let first = palisade_policy::load_dir(dir);
        Self::watch_from(dir, cache, jwks, first)
    }

    fn watch_from(
        dir: &Path,
        cache: Arc<SnapshotCache>,
        jwks: Option<crate::jwks::JwksResolver>,
        first: Result<MeshSnapshot, LoadErrors>,
    ) -> Result<Self, WatchError> {
        let (first, names, status) = match first {
            Ok(first) => {
                let (changes, names) = crate::jwks::workload_resources(&first, &[], jwks.as_ref())?;
                cache.apply(changes);
                tracing::info!(dir = %dir.display(), workloads = names.len(), "mesh config loaded");
                for w in &first.warnings {
                    tracing::warn!(warning = %w, "mesh config");
                }
                let status = ConfigStatus {
                    generation: 1,
                    workloads: names.len(),
                    ..ConfigStatus::default()
                };
                (first, names, status)
            }
            Err(errors) => {
                tracing::error!(
                    dir = %dir.display(),
                    errors = errors.len(),
                    "mesh config invalid at start: no workload config is served until the directory is fixed (the CA keeps serving)"
                );
                for e in errors.iter() {
                    tracing::error!(error = %e, "invalid mesh config");
                }
                let status = ConfigStatus {
                    generation: 0,
                    workloads: 0,
                    rejected: 1,
                    last_error: Some(errors.to_string()),
                };
                (MeshSnapshot::default(), Vec::new(), status)
            }
        };
        let (status_tx, status_rx) = watch::channel(Arc::new(status));
        let (snap_tx, snap_rx) = watch::channel(Arc::new(first));

        let (tx, rx) = mpsc::unbounded_channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(e) if e.kind.is_access() => {}
                Ok(_) => {
                    let _ = tx.send(());
                }
                Err(e) => tracing::warn!(error = %e, "mesh directory watch error"),
            })
            .map_err(|cause| WatchError::Notify {
                dir: dir.to_owned(),
                cause,
            })?;
        watcher
            .watch(dir, RecursiveMode::Recursive)
            .map_err(|cause| WatchError::Notify {
                dir: dir.to_owned(),
                cause,
            })?;
        let jwks_task = jwks
            .clone()
            .map(|r| crate::jwks::spawn_republisher(r, cache.clone(), snap_rx.clone()));
        let state = State {
            dir: dir.to_owned(),
            cache,
            names,
            status: status_tx,
            snapshot: snap_tx,
            jwks,
        };
        let task = tokio::spawn(state.run(rx));
        Ok(Self {
            status: status_rx,
            snapshot: snap_rx,
            task,
            jwks_task,
            _watcher: watcher,
        })
    }

    /// The status channel (a new value after every reload attempt).
    pub fn status(&self) -> watch::Receiver<Arc<ConfigStatus>> {
        self.status.clone()
    }

    /// The snapshot being served (the last good one).
    pub fn snapshot(&self) -> Arc<MeshSnapshot> {
        self.snapshot.borrow().clone()
    }

    /// The last good snapshot, as a channel (for [`crate::AdsServer::new`]).
    pub fn snapshots(&self) -> watch::Receiver<Arc<MeshSnapshot>> {
        self.snapshot.clone()
    }
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(t) = &self.jwks_task {
            t.abort();
        }
    }
}

impl State {
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<()>) {
        while events.recv().await.is_some() {
            // Wait for the directory to settle: drain events until QUIET passes without one.
            loop {
                match tokio::time::timeout(QUIET, events.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            self.reload();
        }
    }

    fn reload(&mut self) {
        let current = self.status.borrow().clone();
        match palisade_policy::load_dir(&self.dir) {
            Ok(snapshot) => {
                match crate::jwks::workload_resources(&snapshot, &self.names, self.jwks.as_ref()) {
                    Ok((changes, names)) => {
                        let changed = self.cache.apply(changes);
                        for w in &snapshot.warnings {
                            tracing::warn!(warning = %w, "mesh config");
                        }
                        tracing::info!(
                            dir = %self.dir.display(),
                            workloads = names.len(),
                            pushed = changed,
                            "mesh config reloaded"
                        );
                        self.names = names;
                        self.status.send_replace(Arc::new(ConfigStatus {
                            generation: current.generation + 1,
                            workloads: self.names.len(),
                            rejected: current.rejected,
                            last_error: None,
                        }));
                        self.snapshot.send_replace(Arc::new(snapshot));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode workload config; keeping the previous one")
                    }
                }
            }
            Err(errors) => {
                if current.generation == 0 {
                    tracing::error!(
                        dir = %self.dir.display(),
                        errors = errors.len(),
                        "mesh config change rejected; still no valid config to serve"
                    );
                } else {
                    tracing::error!(
                        dir = %self.dir.display(),
                        errors = errors.len(),
                        "mesh config change rejected; the previous config stays in force"
                    );
                }
                for e in errors.iter() {
                    tracing::error!(error = %e, "invalid mesh config");
                }
                self.status.send_replace(Arc::new(ConfigStatus {
                    generation: current.generation,
                    workloads: current.workloads,
                    rejected: current.rejected + 1,
                    last_error: Some(errors.to_string()),
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WORKLOAD_CONFIG_TYPE_URL;

    const WE: &str = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: web, namespace: shop}\nspec: {address: 127.0.10.1, ports: {http: 8080}}\n";
    const AP: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec: {rules: [{to: [{operation: {methods: [GET]}}]}]}\n";

    fn write(dir: &Path, name: &str, text: &str) {
        // Atomic replace, as careful editors and `kubectl`-style tools do.
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }

    async fn next_status(rx: &mut watch::Receiver<Arc<ConfigStatus>>) -> Arc<ConfigStatus> {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("a reload within 5 s")
            .unwrap();
        rx.borrow_and_update().clone()
    }

    fn policies(cache: &SnapshotCache) -> usize {
        let snap = cache.current();
        let body = &snap.get(WORKLOAD_CONFIG_TYPE_URL, "shop/web").unwrap().body;
        crate::wire::from_any(body)
            .unwrap()
            .authorization_policies
            .len()
    }

    #[tokio::test]
    async fn reloads_valid_edits_and_keeps_the_last_good_config() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "workloads.yaml", WE);
        let cache = Arc::new(SnapshotCache::new());
        let w = ConfigWatcher::start(dir.path(), cache.clone()).unwrap();
        let mut status = w.status();
        status.borrow_and_update();
        assert_eq!(policies(&cache), 0);

        write(dir.path(), "policy.yaml", AP);
        let s = next_status(&mut status).await;
        assert_eq!((s.generation, s.rejected), (2, 0));
        assert_eq!(policies(&cache), 1);
        let version = cache.current().type_version(WORKLOAD_CONFIG_TYPE_URL);

        write(dir.path(), "policy.yaml", &AP.replace("methods", "methodz"));
        let s = next_status(&mut status).await;
        assert_eq!((s.generation, s.rejected), (2, 1));
        let err = s.last_error.clone().unwrap();
        assert!(
            err.contains("policy.yaml") && err.contains("methodz"),
            "{err}"
        );
        assert_eq!(policies(&cache), 1, "the previous policy stays");
        assert_eq!(
            cache.current().type_version(WORKLOAD_CONFIG_TYPE_URL),
            version
        );

        std::fs::remove_file(dir.path().join("policy.yaml")).unwrap();
        let s = next_status(&mut status).await;
        assert_eq!((s.generation, s.last_error.is_none()), (3, true));
        assert_eq!(policies(&cache), 0);
    }

    #[tokio::test]
    async fn tolerant_start_on_an_invalid_directory_serves_once_fixed() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "workloads.yaml", WE);
        write(dir.path(), "policy.yaml", &AP.replace("methods", "methodz"));
        let cache = Arc::new(SnapshotCache::new());
        let w = ConfigWatcher::start_tolerant(dir.path(), cache.clone(), None).unwrap();
        let mut status = w.status();
        let s = status.borrow_and_update().clone();
        assert_eq!((s.generation, s.rejected), (0, 1));
        let err = s.last_error.clone().unwrap();
        assert!(
            err.contains("policy.yaml") && err.contains("methodz"),
            "{err}"
        );
        assert!(w.snapshot().workload_entries.is_empty());
        assert!(
            cache
                .current()
                .get(WORKLOAD_CONFIG_TYPE_URL, "shop/web")
                .is_none(),
            "nothing is served from an invalid directory"
        );

        write(dir.path(), "policy.yaml", AP);
        let s = next_status(&mut status).await;
        assert_eq!((s.generation, s.last_error.is_none()), (1, true));
        assert_eq!(policies(&cache), 1);
        assert_eq!(w.snapshot().workload_entries.len(), 1);
    }

    #[test]
    fn an_invalid_directory_does_not_start() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "bad.yaml", "kind: Nope\n");
        let err = ConfigWatcher::start(dir.path(), Arc::new(SnapshotCache::new())).unwrap_err();
        assert!(err.to_string().contains("bad.yaml"), "{err}");
    }
}
