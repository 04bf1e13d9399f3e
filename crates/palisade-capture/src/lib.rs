//! Transparent interception: what makes a workload's TCP go through its sidecar without the
//! application knowing, as `istio-iptables` (or istio-cni) does for Istio.
//!
//! - [`rules`]: the pure half. Typed [`CaptureOptions`] and the current `iptables-save` text in,
//!   an `iptables-restore` document out: palisade's own chains (`PALISADE_*`) in the nat table
//!   and the jumps into them, so that uninstall removes exactly what install added and a second
//!   install replaces its own rules instead of adding more. No I/O; unit-tested.
//! - [`iptables`]: the other half: which backend the machine uses (nf_tables or legacy), reading
//!   the nat table with `iptables-save`, and applying documents with `iptables-restore
//!   --noflush` (and `ip6tables-restore`), each family in one atomic transaction, the families
//!   rolled back together when one fails.
//! - [`original_dst`]: the sidecar's side: where a redirected connection was going
//!   (`SO_ORIGINAL_DST`), and the source address it dials its application from.

pub mod iptables;
pub mod original_dst;
pub mod rules;

pub use ipnet::IpNet;
pub use iptables::{Backend, Error, Plan};
pub use original_dst::{INBOUND_PASSTHROUGH_SOURCE, original_dst, redirected_destination};
pub use rules::{CaptureOptions, Family, InboundPorts, OptionsError, PlanError, Snapshot};
