//! The commands behind the `palisade` binary, and the lean `palisade-sidecar` binary that links
//! only the sidecar (agent + proxy): what a sidecar container ships. Both binaries only parse
//! arguments and wire the library crates together; every decision lives in a crate (DESIGN.md).

pub mod cli;
pub mod cmd;
