//! The server half of state-of-the-world xDS for one type URL on one stream: classifying each
//! `DiscoveryRequest` (initial, ACK, NACK, stale) and deciding what to send next.
//!
//! The rules, from the xDS protocol:
//! - A request without `response_nonce` opens (or re-opens) a subscription; the client may
//!   carry the `version_info` it had on an earlier stream. The server answers with what it has.
//! - A request whose nonce is not the latest one this stream sent is stale: the client has not
//!   seen our newest response yet, so the request is ignored (its ACK/NACK will come).
//! - With the latest nonce, `error_detail` set means NACK (the client keeps its previous
//!   version; we must not resend the same content), otherwise ACK of `version_info`.
//! - The resource names in any non-stale request replace the subscription; new names mean the
//!   server owes a response even if nothing changed.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use crate::snapshot::Snapshot;

/// What a request meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// First request for this type on the stream (no nonce). `version_info` is what the client
    /// had before (empty on a fresh start).
    Initial {
        /// The version the client says it holds.
        client_version: String,
    },
    /// The client accepted the response with this nonce.
    Ack {
        /// The version it now runs.
        version: String,
    },
    /// The client rejected the response with this nonce.
    Nack {
        /// The version it keeps running (the last it accepted).
        kept_version: String,
        /// The client's reason.
        message: String,
    },
    /// The nonce is not the latest we sent; ignored.
    Stale {
        /// The nonce the client answered.
        nonce: String,
    },
}

/// What the server should do after a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestOutcome {
    /// The classification.
    pub kind: RequestKind,
    /// The subscribed names changed with this request.
    pub names_changed: bool,
}

/// The server's state for one type URL on one stream.
#[derive(Debug, Clone)]
pub struct ServerTypeState {
    type_url: String,
    names: BTreeSet<String>,
    /// True after a request has been received: before that the client wants nothing.
    subscribed: bool,
    /// Nonce of the latest response sent, if any.
    last_nonce: Option<String>,
    /// Version of each resource in the latest response (what the client has or is evaluating).
    sent: BTreeMap<String, u64>,
    /// A response is owed regardless of content changes (initial request, new names).
    owed: bool,
    acked_version: Option<String>,
    last_nack: Option<String>,
}

impl ServerTypeState {
    /// A fresh state: nothing subscribed yet.
    pub fn new(type_url: impl Into<String>) -> Self {
        Self {
            type_url: type_url.into(),
            names: BTreeSet::new(),
            subscribed: false,
            last_nonce: None,
            sent: BTreeMap::new(),
            owed: false,
            acked_version: None,
            last_nack: None,
        }
    }

    /// The type URL this state tracks.
    pub fn type_url(&self) -> &str {
        &self.type_url
    }

    /// The names the client subscribed to (empty means wildcard: everything of the type).
    pub fn names(&self) -> &BTreeSet<String> {
        &self.names
    }

    /// The version the client last ACKed on this stream.
    pub fn acked_version(&self) -> Option<&str> {
        self.acked_version.as_deref()
    }

    /// The client's latest NACK message, cleared by the next ACK.
    pub fn last_nack(&self) -> Option<&str> {
        self.last_nack.as_deref()
    }

    /// Whether the request answers an older response than the latest one sent (and so will
    /// be ignored).
    pub fn is_stale(&self, req: &DiscoveryRequest) -> bool {
        !req.response_nonce.is_empty()
            && self.last_nonce.as_deref() != Some(req.response_nonce.as_str())
    }

    /// Classifies a request and updates the subscription. The caller checks the names are
    /// acceptable beforehand (see [`crate::stream::StreamOptions`]).
    pub fn on_request(&mut self, req: &DiscoveryRequest) -> RequestOutcome {
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let kind = if req.response_nonce.is_empty() {
            RequestKind::Initial {
                client_version: req.version_info.clone(),
            }
        } else if self.is_stale(req) {
            // Stale requests change nothing, not even the names: a newer request follows.
            return RequestOutcome {
                kind: RequestKind::Stale {
                    nonce: req.response_nonce.clone(),
                },
                names_changed: false,
            };
        } else if let Some(err) = &req.error_detail {
            RequestKind::Nack {
                kept_version: req.version_info.clone(),
                message: err.message.clone(),
            }
        } else {
            RequestKind::Ack {
                version: req.version_info.clone(),
            }
        };

        let names_changed = !self.subscribed || names != self.names;
        match &kind {
            RequestKind::Initial { .. } => {
                // A (re)subscription without nonce: answer with the full current state even if
                // an earlier response on this stream carried the same content.
                self.owed = true;
                self.sent.clear();
            }
            RequestKind::Ack { version } => {
                self.acked_version = Some(version.clone());
                self.last_nack = None;
            }
            RequestKind::Nack { message, .. } => {
                self.last_nack = Some(message.clone());
            }
            RequestKind::Stale { .. } => {}
        }
        if names_changed {
            self.owed = true;
        }
        self.subscribed = true;
        self.names = names;
        RequestOutcome {
            kind,
            names_changed,
        }
    }

    /// The resources this subscription selects in `snapshot` with their versions.
    fn selected<'a>(&self, snapshot: &'a Snapshot) -> BTreeMap<&'a str, u64> {
        let Some(ty) = snapshot.get_type(&self.type_url) else {
            return BTreeMap::new();
        };
        ty.resources
            .iter()
            .filter(|(name, _)| self.names.is_empty() || self.names.contains(name.as_str()))
            .map(|(name, r)| (name.as_str(), r.version))
            .collect()
    }

    /// Builds the response owed for `snapshot`, if any, and records it as sent.
    ///
    /// A response is due when the client asked (initial request, new names) or when the
    /// selected resources differ from the last response. For named subscriptions nothing is
    /// sent while none of the names exist yet: the client keeps waiting (for SDS, Envoy keeps
    /// the listener warming) instead of receiving an empty answer.
    pub fn next_response(
        &mut self,
        snapshot: &Snapshot,
        nonce: String,
    ) -> Option<DiscoveryResponse> {
        if !self.subscribed {
            return None;
        }
        let selected = self.selected(snapshot);
        let changed = selected
            .iter()
            .map(|(n, v)| (*n, *v))
            .ne(self.sent.iter().map(|(n, v)| (n.as_str(), *v)));
        if !(self.owed || changed) {
            return None;
        }
        if selected.is_empty()
            && self.sent.is_empty()
            && (!self.names.is_empty() || snapshot.get_type(&self.type_url).is_none())
        {
            // Nothing of what was asked for exists yet and the client holds nothing of it; for
            // a wildcard subscription, the type was never published (an empty answer would
            // tell the client that it has no resources, and e.g. Envoy would go live empty).
            return None;
        }
        let resources = selected
            .keys()
            .filter_map(|name| snapshot.get(&self.type_url, name))
            .map(|r| r.body.clone())
            .collect();
        self.sent = selected
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v))
            .collect();
        self.owed = false;
        self.last_nonce = Some(nonce.clone());
        Some(DiscoveryResponse {
            version_info: snapshot.type_version(&self.type_url),
            resources,
            type_url: self.type_url.clone(),
            nonce,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::Any;
    use envoy_types::pb::google::rpc::Status;

    use super::*;
    use crate::snapshot::SnapshotCache;

    const T: &str = "type.example/T";

    fn any(v: &[u8]) -> Any {
        Any {
            type_url: T.into(),
            value: v.to_vec(),
        }
    }

    fn req(names: &[&str], version: &str, nonce: &str, nack: Option<&str>) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            type_url: T.into(),
            response_nonce: nonce.into(),
            error_detail: nack.map(|m| Status {
                code: 3,
                message: m.into(),
                details: vec![],
            }),
            ..Default::default()
        }
    }

    fn rq(names: &[&str], version: &str, nonce: &str, nack: Option<&str>) -> Box<DiscoveryRequest> {
        Box::new(req(names, version, nonce, nack))
    }

    /// One step of a conversation: either the client sends a request (and we check its
    /// classification), the server's snapshot changes, or we ask the server for its next
    /// response (and check whether one is sent and which resources it holds).
    enum Step {
        Req(Box<DiscoveryRequest>, RequestKind),
        Set(&'static str, &'static [u8]),
        Remove(&'static str),
        Respond(Option<&'static [&'static str]>),
    }

    fn run(name: &str, steps: Vec<Step>) {
        let cache = SnapshotCache::new();
        let mut st = ServerTypeState::new(T);
        let mut nonce = 0u32;
        for (i, step) in steps.into_iter().enumerate() {
            match step {
                Step::Req(r, want) => {
                    let got = st.on_request(&r).kind;
                    assert_eq!(got, want, "{name}: step {i}");
                }
                Step::Set(n, v) => {
                    cache.set(T, n, any(v));
                }
                Step::Remove(n) => {
                    cache.apply([crate::snapshot::Change::Remove {
                        type_url: T.into(),
                        name: n.into(),
                    }]);
                }
                Step::Respond(want) => {
                    nonce += 1;
                    let resp = st.next_response(&cache.current(), nonce.to_string());
                    match (resp, want) {
                        (None, None) => {}
                        (Some(r), Some(names)) => {
                            assert_eq!(r.nonce, nonce.to_string(), "{name}: step {i}");
                            assert_eq!(r.type_url, T, "{name}: step {i}");
                            assert_eq!(r.version_info, cache.current().type_version(T));
                            let bodies: Vec<Any> = names
                                .iter()
                                .map(|n| cache.current().get(T, n).unwrap().body.clone())
                                .collect();
                            assert_eq!(r.resources, bodies, "{name}: step {i}");
                        }
                        (got, want) => {
                            panic!("{name}: step {i}: got {got:?}, want {want:?}")
                        }
                    }
                }
            }
        }
    }

    fn initial(v: &str) -> RequestKind {
        RequestKind::Initial {
            client_version: v.into(),
        }
    }
    fn ack(v: &str) -> RequestKind {
        RequestKind::Ack { version: v.into() }
    }

    #[test]
    fn conversations() {
        use Step::*;
        let cases: Vec<(&str, Vec<Step>)> = vec![
            (
                "nothing before the first request",
                vec![Set("a", b"1"), Respond(None)],
            ),
            (
                "initial then ack, no repeat",
                vec![
                    Set("a", b"1"),
                    Req(rq(&["a"], "", "", None), initial("")),
                    Respond(Some(&["a"])),
                    Req(rq(&["a"], "1", "1", None), ack("1")),
                    Respond(None),
                ],
            ),
            (
                "named resource not there yet: wait, then send when it appears",
                vec![
                    Req(rq(&["a"], "", "", None), initial("")),
                    Respond(None),
                    Set("other", b"x"),
                    Respond(None),
                    Set("a", b"1"),
                    Respond(Some(&["a"])),
                ],
            ),
            (
                "change pushes only the subscribed names",
                vec![
                    Set("a", b"1"),
                    Set("b", b"1"),
                    Req(rq(&["a"], "", "", None), initial("")),
                    Respond(Some(&["a"])),
                    Req(rq(&["a"], "2", "1", None), ack("2")),
                    Set("b", b"2"),
                    Respond(None),
                    Set("a", b"2"),
                    Respond(Some(&["a"])),
                ],
            ),
            (
                "nack keeps state and does not resend the same content",
                vec![
                    Set("a", b"1"),
                    Req(rq(&["a"], "", "", None), initial("")),
                    Respond(Some(&["a"])),
                    Req(
                        rq(&["a"], "", "1", Some("bad cert")),
                        RequestKind::Nack {
                            kept_version: "".into(),
                            message: "bad cert".into(),
                        },
                    ),
                    Respond(None),
                    Set("a", b"2"),
                    Respond(Some(&["a"])),
                ],
            ),
            (
                "stale nonce is ignored, even with new names",
                vec![
                    Set("a", b"1"),
                    Set("b", b"1"),
                    Req(rq(&["a"], "", "", None), initial("")),
                    Respond(Some(&["a"])),
                    Set("a", b"2"),
                    Respond(Some(&["a"])),
                    // The ACK of the first response arrives late.
                    Req(
                        rq(&["a", "b"], "1", "1", None),
                        RequestKind::Stale { nonce: "1".into() },
                    ),
                    Respond(None),
                    Req(rq(&["a"], "4", "2", None), ack("4")),
                    Respond(None),
                ],
            ),
            (
                "new names with the latest nonce are owed a response",
                vec![
                    Set("a", b"1"),
                    Set("b", b"1"),
                    Req(rq(&["a"], "", "", None), initial("")),
                    Respond(Some(&["a"])),
                    Req(rq(&["a", "b"], "2", "1", None), ack("2")),
                    Respond(Some(&["a", "b"])),
                ],
            ),
            (
                "wildcard subscription sees every resource, and removals",
                vec![
                    Set("a", b"1"),
                    Req(rq(&[], "", "", None), initial("")),
                    Respond(Some(&["a"])),
                    Set("b", b"1"),
                    Respond(Some(&["a", "b"])),
                    Remove("a"),
                    Respond(Some(&["b"])),
                ],
            ),
            (
                "wildcard waits until the type is published, then answers even if empty",
                vec![
                    Req(rq(&[], "", "", None), initial("")),
                    Respond(None),
                    Set("a", b"1"),
                    Remove("a"),
                    Respond(Some(&[])),
                ],
            ),
            (
                "removal of a named resource is pushed as an empty response",
                vec![
                    Set("a", b"1"),
                    Req(rq(&["a"], "", "", None), initial("")),
                    Respond(Some(&["a"])),
                    Remove("a"),
                    Respond(Some(&[])),
                ],
            ),
            (
                "re-initial on the same stream gets a full answer",
                vec![
                    Set("a", b"1"),
                    Req(rq(&["a"], "", "", None), initial("")),
                    Respond(Some(&["a"])),
                    Req(rq(&["a"], "1", "", None), initial("1")),
                    Respond(Some(&["a"])),
                ],
            ),
            (
                "unknown nonce before anything was sent is stale",
                vec![
                    Set("a", b"1"),
                    Req(
                        rq(&["a"], "7", "99", None),
                        RequestKind::Stale { nonce: "99".into() },
                    ),
                    Respond(None),
                ],
            ),
        ];
        for (name, steps) in cases {
            run(name, steps);
        }
    }

    #[test]
    fn ack_and_nack_are_recorded() {
        let cache = SnapshotCache::new();
        cache.set(T, "a", any(b"1"));
        let mut st = ServerTypeState::new(T);
        st.on_request(&req(&["a"], "", "", None));
        let r = st.next_response(&cache.current(), "n1".into()).unwrap();
        st.on_request(&req(&["a"], "", "n1", Some("nope")));
        assert_eq!(st.last_nack(), Some("nope"));
        assert_eq!(st.acked_version(), None);
        cache.set(T, "a", any(b"2"));
        let r2 = st.next_response(&cache.current(), "n2".into()).unwrap();
        assert_ne!(r.version_info, r2.version_info);
        st.on_request(&req(&["a"], &r2.version_info, "n2", None));
        assert_eq!(st.acked_version(), Some(r2.version_info.as_str()));
        assert_eq!(st.last_nack(), None);
    }
}
