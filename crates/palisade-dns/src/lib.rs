//! Mesh DNS for the sidecar, as Istio's DNS proxying: the application's DNS queries (UDP and
//! TCP port 53, redirected to the sidecar by `palisade iptables install --redirect-dns`) are
//! answered from the mesh config the sidecar got over ADS when they name a mesh service, and
//! relayed unchanged to the resolvers of the host's `/etc/resolv.conf` otherwise.
//!
//! - [`vip`]: the virtual IPs of ServiceEntries that declare no `addresses`, allocated from
//!   240.240.0.0/16 by the control plane (so that every sidecar agrees): one per host, derived
//!   from a hash of the host name, collisions probed in sorted host order, what was handed out
//!   before kept, never an address the mesh declares.
//! - [`table`]: the names a workload can resolve ([`NameTable`]), pure: every ServiceEntry host
//!   (with its declared addresses, or its VIP), plus the short forms a Kubernetes user types for
//!   hosts of the form `NAME.NAMESPACE.svc[.DOMAIN]` (`NAME.NAMESPACE`, and `NAME` from the same
//!   namespace).
//! - [`answer`]: one query in, a decision out: a mesh answer (A records; an empty answer, not
//!   NXDOMAIN, for AAAA of a name with only IPv4 addresses) or "forward it". Messages are read
//!   and written with `hickory-proto`.
//! - [`resolv`]: the upstream resolvers from `resolv.conf`.
//! - [`server`]: the listeners (127.0.0.1:15053 by default, Istio's port; UDP and TCP) and the
//!   forwarding, with a Prometheus counter ([`DnsMetrics`]).

pub mod answer;
pub mod error;
pub mod metrics;
pub mod resolv;
pub mod server;
pub mod table;
pub mod vip;

pub use answer::{Decision, decide};
pub use error::DnsError;
pub use metrics::DnsMetrics;
pub use server::{DEFAULT_DNS_PORT, DnsOptions, DnsServer, TableSource};
pub use table::{Addresses, NameTable, TableBuilder};
pub use vip::{VIP_NET, allocate};
