//! Versioned resource snapshots: what a server currently has to offer, per type URL and name.
//!
//! A [`SnapshotCache`] is the single writer; every open stream holds a `watch` receiver and wakes
//! up when the snapshot changes. Each resource carries its own version, bumped only when its
//! bytes change, so a stream can tell whether anything *it* subscribed to changed and skip pushes
//! that would only repeat what the client already has.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use envoy_types::pb::google::protobuf::Any;
use tokio::sync::watch;

/// One resource as served: its body and the version at which it last changed.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionedResource {
    /// Bumped whenever the body changes; unique across the whole cache.
    pub version: u64,
    /// The resource, packed (use `envoy_types::util::pack_any`).
    pub body: Any,
}

/// All resources of one type URL.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeResources {
    /// Bumped whenever any resource of this type is added, changed or removed.
    pub version: u64,
    /// Resources by name.
    pub resources: BTreeMap<String, VersionedResource>,
}

/// An immutable view of everything a server offers, shared by all streams.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    types: BTreeMap<String, TypeResources>,
}

impl Snapshot {
    /// The resources of `type_url`, if any were ever set.
    pub fn get_type(&self, type_url: &str) -> Option<&TypeResources> {
        self.types.get(type_url)
    }

    /// One resource.
    pub fn get(&self, type_url: &str, name: &str) -> Option<&VersionedResource> {
        self.types.get(type_url)?.resources.get(name)
    }

    /// The version string of a type as sent in `version_info` ("0" when the type is unknown).
    pub fn type_version(&self, type_url: &str) -> String {
        self.types
            .get(type_url)
            .map_or(0, |t| t.version)
            .to_string()
    }
}

/// The writer side: applies changes and publishes a new [`Snapshot`] to every subscriber.
#[derive(Debug)]
pub struct SnapshotCache {
    // The mutex serialises writers (version counter + copy-on-write); readers only see `watch`.
    state: Mutex<Writer>,
    tx: watch::Sender<Arc<Snapshot>>,
}

#[derive(Debug, Default)]
struct Writer {
    next_version: u64,
    current: Snapshot,
}

/// A change to one resource, for [`SnapshotCache::apply`].
#[derive(Debug, Clone)]
pub enum Change {
    /// Add or replace a resource.
    Set {
        /// Its type URL.
        type_url: String,
        /// Its name.
        name: String,
        /// Its body.
        body: Any,
    },
    /// Remove a resource (no-op when absent).
    Remove {
        /// Its type URL.
        type_url: String,
        /// Its name.
        name: String,
    },
}

impl Default for SnapshotCache {
    fn default() -> Self {
        Self::new()
    }
}

impl SnapshotCache {
    /// An empty cache.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        Self {
            state: Mutex::new(Writer::default()),
            tx,
        }
    }

    /// A receiver that sees every published snapshot (the current one first).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The snapshot now.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Sets one resource; see [`SnapshotCache::apply`].
    pub fn set(&self, type_url: &str, name: &str, body: Any) -> bool {
        self.apply([Change::Set {
            type_url: type_url.to_owned(),
            name: name.to_owned(),
            body,
        }])
    }

    /// Applies changes atomically: subscribers see all of them or none. Resources whose bytes
    /// do not change keep their version. Returns whether anything changed (and so was published).
    pub fn apply(&self, changes: impl IntoIterator<Item = Change>) -> bool {
        let mut w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = w.current.clone();
        let mut changed = false;
        for change in changes {
            match change {
                Change::Set {
                    type_url,
                    name,
                    body,
                } => {
                    let ty = next.types.entry(type_url).or_default();
                    if ty.resources.get(&name).is_some_and(|r| r.body == body) {
                        continue;
                    }
                    w.next_version += 1;
                    ty.version = w.next_version;
                    ty.resources.insert(
                        name,
                        VersionedResource {
                            version: w.next_version,
                            body,
                        },
                    );
                    changed = true;
                }
                Change::Remove { type_url, name } => {
                    let Some(ty) = next.types.get_mut(&type_url) else {
                        continue;
                    };
                    if ty.resources.remove(&name).is_some() {
                        w.next_version += 1;
                        ty.version = w.next_version;
                        changed = true;
                    }
                }
            }
        }
        if changed {
            w.current = next.clone();
            // `send_replace` publishes even with no receiver alive at the moment.
            self.tx.send_replace(Arc::new(next));
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(v: &[u8]) -> Any {
        Any {
            type_url: "t".into(),
            value: v.to_vec(),
        }
    }

    #[test]
    fn versions_bump_only_on_change() {
        let cache = SnapshotCache::new();
        let mut rx = cache.subscribe();
        assert!(cache.set("t", "a", any(b"1")));
        assert!(rx.has_changed().unwrap());
        let v1 = rx.borrow_and_update().get("t", "a").unwrap().version;

        // Same bytes: nothing published.
        assert!(!cache.set("t", "a", any(b"1")));
        assert!(!rx.has_changed().unwrap());

        // Another resource changes: `a` keeps its version, the type version moves.
        assert!(cache.set("t", "b", any(b"x")));
        let snap = rx.borrow_and_update().clone();
        assert_eq!(snap.get("t", "a").unwrap().version, v1);
        assert!(snap.get_type("t").unwrap().version > v1);

        assert!(cache.set("t", "a", any(b"2")));
        assert!(cache.current().get("t", "a").unwrap().version > v1);
    }

    #[test]
    fn remove_and_atomic_apply() {
        let cache = SnapshotCache::new();
        assert!(cache.apply([
            Change::Set {
                type_url: "t".into(),
                name: "a".into(),
                body: any(b"1"),
            },
            Change::Set {
                type_url: "u".into(),
                name: "b".into(),
                body: any(b"2"),
            },
        ]));
        let before = cache.current();
        assert!(!cache.apply([Change::Remove {
            type_url: "t".into(),
            name: "missing".into(),
        }]));
        assert!(cache.apply([Change::Remove {
            type_url: "t".into(),
            name: "a".into(),
        }]));
        let after = cache.current();
        assert!(after.get("t", "a").is_none());
        assert!(after.get_type("t").unwrap().version > before.get_type("t").unwrap().version);
        assert_eq!(after.type_version("nope"), "0");
    }
}
