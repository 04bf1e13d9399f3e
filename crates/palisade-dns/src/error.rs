//! Errors of the DNS side.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Starting mesh DNS failed, or a query could not be relayed.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot listen for DNS on {addr} ({protocol}): {cause}")]
    Bind {
        addr: SocketAddr,
        protocol: &'static str,
        cause: std::io::Error,
    },
    #[error("cannot read {path}: {cause}")]
    ResolvConf {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("no upstream resolver answered")]
    NoUpstream,
    #[error("upstream resolver {upstream}: {cause}")]
    Upstream {
        upstream: SocketAddr,
        cause: std::io::Error,
    },
    #[error("cannot encode a DNS answer: {0}")]
    Encode(#[from] hickory_proto::ProtoError),
}
