//! The client half of state-of-the-world xDS for one type URL: the requests a client sends
//! (subscribe, ACK, NACK, change names) given the responses it received.
//!
//! An ACK echoes the response's `version_info` and `nonce`. A NACK echoes the nonce but keeps
//! the `version_info` of the last accepted response and carries `error_detail`. Every request
//! repeats the full list of subscribed names.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status;

/// gRPC status code INVALID_ARGUMENT, used in NACKs (what Envoy sends for rejected config).
const INVALID_ARGUMENT: i32 = 3;

/// The client's state for one type URL on one stream.
#[derive(Debug, Clone)]
pub struct ClientTypeState {
    type_url: String,
    names: BTreeSet<String>,
    accepted_version: String,
    last_nonce: String,
    node: Option<Node>,
}

/// Why a response was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseError {
    /// The response is for another type URL than this state handles.
    WrongType {
        /// What we handle.
        expected: String,
        /// What came.
        got: String,
    },
}

impl std::fmt::Display for ResponseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::WrongType { expected, got } => {
                write!(f, "response for type {got} on a {expected} subscription")
            }
        }
    }
}

impl std::error::Error for ResponseError {}

impl ClientTypeState {
    /// A subscription to `names` of `type_url` (empty names: wildcard).
    pub fn new(type_url: impl Into<String>, names: impl IntoIterator<Item = String>) -> Self {
        Self {
            type_url: type_url.into(),
            names: names.into_iter().collect(),
            accepted_version: String::new(),
            last_nonce: String::new(),
            node: None,
        }
    }

    /// Sets the node identification sent in the first request.
    pub fn with_node(mut self, node: Node) -> Self {
        self.node = Some(node);
        self
    }

    /// The version of the last accepted response ("" before any).
    pub fn accepted_version(&self) -> &str {
        &self.accepted_version
    }

    /// The first request on a stream. On a reconnect it carries the version the client still
    /// runs, and no nonce (nonces do not survive streams).
    pub fn initial_request(&mut self) -> DiscoveryRequest {
        self.last_nonce.clear();
        DiscoveryRequest {
            version_info: self.accepted_version.clone(),
            node: self.node.clone(),
            resource_names: self.names.iter().cloned().collect(),
            type_url: self.type_url.clone(),
            ..Default::default()
        }
    }

    /// Checks that a response belongs to this subscription.
    pub fn check(&self, resp: &DiscoveryResponse) -> Result<(), ResponseError> {
        if resp.type_url != self.type_url {
            return Err(ResponseError::WrongType {
                expected: self.type_url.clone(),
                got: resp.type_url.clone(),
            });
        }
        Ok(())
    }

    /// The answer to a response the caller applied (`Ok`) or rejected (`Err(reason)`).
    pub fn answer(
        &mut self,
        resp: &DiscoveryResponse,
        applied: Result<(), String>,
    ) -> DiscoveryRequest {
        self.last_nonce = resp.nonce.clone();
        let error_detail = match applied {
            Ok(()) => {
                self.accepted_version = resp.version_info.clone();
                None
            }
            Err(message) => Some(Status {
                code: INVALID_ARGUMENT,
                message,
                details: vec![],
            }),
        };
        DiscoveryRequest {
            version_info: self.accepted_version.clone(),
            resource_names: self.names.iter().cloned().collect(),
            type_url: self.type_url.clone(),
            response_nonce: self.last_nonce.clone(),
            error_detail,
            ..Default::default()
        }
    }

    /// Changes the subscribed names; the request carries the latest nonce so the server does
    /// not take it for stale.
    pub fn set_names(&mut self, names: impl IntoIterator<Item = String>) -> DiscoveryRequest {
        self.names = names.into_iter().collect();
        DiscoveryRequest {
            version_info: self.accepted_version.clone(),
            resource_names: self.names.iter().cloned().collect(),
            type_url: self.type_url.clone(),
            response_nonce: self.last_nonce.clone(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "type.example/T";

    fn resp(version: &str, nonce: &str) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            type_url: T.into(),
            nonce: nonce.into(),
            ..Default::default()
        }
    }

    /// (response version, nonce, applied?) -> expected (version_info, nonce, nack?) of the answer.
    #[test]
    fn ack_nack_table() {
        let mut c = ClientTypeState::new(T, ["a".to_string()]);
        let first = c.initial_request();
        assert_eq!(first.version_info, "");
        assert_eq!(first.response_nonce, "");
        assert_eq!(first.resource_names, vec!["a"]);

        let table: &[(&str, &str, bool, &str, bool)] = &[
            ("1", "n1", true, "1", false),
            ("2", "n2", false, "1", true),
            ("3", "n3", false, "1", true),
            ("4", "n4", true, "4", false),
        ];
        for &(version, nonce, ok, want_version, want_nack) in table {
            let r = resp(version, nonce);
            c.check(&r).unwrap();
            let applied = if ok { Ok(()) } else { Err("bad".to_string()) };
            let a = c.answer(&r, applied);
            assert_eq!(a.version_info, want_version, "response {version}");
            assert_eq!(a.response_nonce, nonce);
            assert_eq!(a.error_detail.is_some(), want_nack, "response {version}");
            assert_eq!(a.resource_names, vec!["a"]);
        }

        let change = c.set_names(["a".to_string(), "b".to_string()]);
        assert_eq!(change.response_nonce, "n4");
        assert_eq!(change.resource_names, vec!["a", "b"]);

        // Reconnect: version kept, nonce dropped.
        let again = c.initial_request();
        assert_eq!(again.version_info, "4");
        assert_eq!(again.response_nonce, "");
    }

    #[test]
    fn wrong_type_is_reported() {
        let c = ClientTypeState::new(T, []);
        let mut r = resp("1", "n");
        r.type_url = "other".into();
        let err = c.check(&r).unwrap_err();
        assert!(err.to_string().contains("other"), "{err}");
    }
}
