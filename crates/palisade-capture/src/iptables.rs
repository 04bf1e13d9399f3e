//! Running iptables for capture: which backend the machine's `iptables` is (nf_tables or legacy,
//! the two Debian ships), reading each family's nat table with that backend's `iptables-save`,
//! and applying [`rules::document`]s with its `iptables-restore --noflush`.
//!
//! Each family's document is one transaction: iptables-restore applies all of it or nothing.
//! Across the two families, [`apply`] first has both documents checked (`--test`), then applies
//! them in turn, and when the second fails, puts the first family's part back as it was. Errors
//! name the binary, its exit status and iptables' own message.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::rules::{self, CaptureOptions, Family, OptionsError, Owned, PlanError, Snapshot};

/// How long iptables-restore waits for the xtables lock that another iptables holds (legacy;
/// nf_tables needs no lock and ignores it).
const LOCK_WAIT_SECONDS: &str = "10";

/// The kernel interface behind `iptables`: nf_tables (`iptables-nft`) or the legacy x_tables
/// (`iptables-legacy`). Rules made with one are invisible to the other's tools, so install and
/// uninstall must use the one the rest of the machine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    /// Reads `iptables --version`'s answer, e.g. `iptables v1.8.9 (nf_tables)`.
    pub fn from_version_output(text: &str) -> Option<Backend> {
        if text.contains("(nf_tables)") {
            Some(Backend::Nft)
        } else if text.contains("(legacy)") {
            Some(Backend::Legacy)
        } else {
            None
        }
    }

    /// The backend the machine's `iptables` command uses.
    pub fn detect() -> Result<Backend, Error> {
        let output = run("iptables", &["--version"], None)?;
        Backend::from_version_output(&output).ok_or(Error::UnknownBackend { output })
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nf_tables",
            Backend::Legacy => "legacy",
        }
    }

    pub fn save_binary(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Nft, Family::V4) => "iptables-nft-save",
            (Backend::Nft, Family::V6) => "ip6tables-nft-save",
            (Backend::Legacy, Family::V4) => "iptables-legacy-save",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy-save",
        }
    }

    pub fn restore_binary(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Nft, Family::V4) => "iptables-nft-restore",
            (Backend::Nft, Family::V6) => "ip6tables-nft-restore",
            (Backend::Legacy, Family::V4) => "iptables-legacy-restore",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy-restore",
        }
    }
}

/// Whether this network namespace has IPv6 (the kernel lists its IPv6 addresses there).
pub fn ipv6_present() -> bool {
    Path::new("/proc/net/if_inet6").exists()
}

/// Why capture could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Options(#[from] OptionsError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("cannot run {binary}: {source}{hint}")]
    Spawn {
        binary: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{binary} failed ({status}): {message}")]
    Failed {
        binary: String,
        status: String,
        message: String,
    },
    #[error(
        "cannot tell the iptables backend from `iptables --version` ({output:?}): expected \
         `(nf_tables)` or `(legacy)`; choose one with --backend"
    )]
    UnknownBackend { output: String },
    #[error("{failed}; the {family} rules applied before it were put back as they were")]
    RolledBack { failed: Box<Error>, family: Family },
    #[error(
        "{failed}; putting the {family} rules applied before it back failed too, so they stay \
         applied: {rollback}"
    )]
    RollbackFailed {
        failed: Box<Error>,
        family: Family,
        rollback: Box<Error>,
    },
}

/// One family's change: what palisade had there, and the document to apply (`None`: nothing to
/// do).
#[derive(Debug, Clone)]
pub struct Plan {
    pub family: Family,
    pub backend: Backend,
    pub before: Snapshot,
    pub document: Option<String>,
}

/// The nat table of `family`, as `iptables-save` prints it.
pub fn save(backend: Backend, family: Family) -> Result<String, Error> {
    run(backend.save_binary(family), &["-t", "nat"], None)
}

/// Applies `document` with `iptables-restore --noflush` (or only checks it, with `test_only`).
pub fn restore(
    backend: Backend,
    family: Family,
    document: &str,
    test_only: bool,
) -> Result<(), Error> {
    let mut args = vec!["--noflush", "-w", LOCK_WAIT_SECONDS];
    if test_only {
        args.push("--test");
    }
    run(backend.restore_binary(family), &args, Some(document)).map(drop)
}

/// Plans an install in each of `families` from their current nat tables.
pub fn plan_install(
    options: &CaptureOptions,
    backend: Backend,
    families: &[Family],
) -> Result<Vec<Plan>, Error> {
    options.validate()?;
    families
        .iter()
        .map(|&family| {
            let before = Snapshot::parse(&save(backend, family)?);
            install_plan(options, backend, family, before)
        })
        .collect()
}

/// The install plan of one family from a snapshot already read (or assumed, for a dry run).
pub fn install_plan(
    options: &CaptureOptions,
    backend: Backend,
    family: Family,
    before: Snapshot,
) -> Result<Plan, Error> {
    let document = rules::document(family, &before, &options.ruleset(family)?)?;
    Ok(Plan {
        family,
        backend,
        before,
        document,
    })
}

/// Plans the removal of palisade's chains and jumps in each of `families`.
pub fn plan_uninstall(backend: Backend, families: &[Family]) -> Result<Vec<Plan>, Error> {
    families
        .iter()
        .map(|&family| {
            let before = Snapshot::parse(&save(backend, family)?);
            uninstall_plan(backend, family, before)
        })
        .collect()
}

/// The uninstall plan of one family from a snapshot already read (or assumed, for a dry run).
pub fn uninstall_plan(backend: Backend, family: Family, before: Snapshot) -> Result<Plan, Error> {
    let document = rules::document(family, &before, &Owned::default())?;
    Ok(Plan {
        family,
        backend,
        before,
        document,
    })
}

/// Applies every plan, or none: all documents are checked first; when one fails to apply, the
/// families applied before it are put back as their plans found them.
pub fn apply(plans: &[Plan]) -> Result<(), Error> {
    let pending: Vec<(&Plan, &str)> = plans
        .iter()
        .filter_map(|p| p.document.as_deref().map(|d| (p, d)))
        .collect();
    // A single document is one transaction already; checking it first would only cost time.
    if pending.len() > 1 {
        for (plan, document) in &pending {
            restore(plan.backend, plan.family, document, true)?;
        }
    }
    for (i, (plan, document)) in pending.iter().enumerate() {
        if let Err(failed) = restore(plan.backend, plan.family, document, false) {
            let Some((done, _)) = pending[..i].last() else {
                return Err(failed);
            };
            // At most two families: only the one before can need putting back.
            return Err(match roll_back(done) {
                Ok(()) => Error::RolledBack {
                    failed: Box::new(failed),
                    family: done.family,
                },
                Err(rollback) => Error::RollbackFailed {
                    failed: Box::new(failed),
                    family: done.family,
                    rollback: Box::new(rollback),
                },
            });
        }
    }
    Ok(())
}

/// Puts palisade's part of `plan`'s family back as the plan found it.
fn roll_back(plan: &Plan) -> Result<(), Error> {
    let now = Snapshot::parse(&save(plan.backend, plan.family)?);
    match rules::document(plan.family, &now, &plan.before.owned)? {
        Some(document) => restore(plan.backend, plan.family, &document, false),
        None => Ok(()),
    }
}

/// Runs `binary` with `args` (and `stdin`), returning its stdout; a failure carries the exit
/// status and what the program said, with the document line it points at, if any.
fn run(binary: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let spawned = Command::new(binary)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = spawned.map_err(|source| Error::Spawn {
        binary: binary.to_owned(),
        hint: if source.kind() == std::io::ErrorKind::NotFound {
            " (not installed? On Debian: apt-get install iptables)"
        } else {
            ""
        },
        source,
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A program that exits early closes its end: its exit status tells why, below.
        let _ = pipe.write_all(text.as_bytes());
    }
    let output = child.wait_with_output().map_err(|source| Error::Spawn {
        binary: binary.to_owned(),
        source,
        hint: "",
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut message = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Try `"))
        .collect::<Vec<_>>()
        .join("; ");
    if message.is_empty() {
        message = stdout.trim().to_owned();
    }
    if let Some(line) = stdin.and_then(|doc| failed_line(&stderr, doc)) {
        message.push_str(&format!(" (document line: `{line}`)"));
    }
    Err(Error::Failed {
        binary: binary.to_owned(),
        status: output.status.to_string(),
        message,
    })
}

/// The document line iptables-restore names in `Error occurred at line: N` (1-based).
fn failed_line<'a>(stderr: &str, document: &'a str) -> Option<&'a str> {
    let number: usize = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Error occurred at line:"))?
        .trim()
        .parse()
        .ok()?;
    document.lines().nth(number.checked_sub(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_from_version_output() {
        let cases = [
            ("iptables v1.8.9 (nf_tables)\n", Some(Backend::Nft)),
            ("iptables v1.8.9 (legacy)\n", Some(Backend::Legacy)),
            ("iptables v1.6.1\n", None),
            ("", None),
        ];
        for (text, backend) in cases {
            assert_eq!(Backend::from_version_output(text), backend, "{text:?}");
        }
        assert_eq!(
            Backend::Legacy.restore_binary(Family::V6),
            "ip6tables-legacy-restore"
        );
        assert_eq!(Backend::Nft.save_binary(Family::V4), "iptables-nft-save");
    }

    #[test]
    fn failed_line_points_into_the_document() {
        let doc = "*nat\n:PALISADE_OUTPUT - [0:0]\n-A PALISADE_OUTPUT -j NOPE\nCOMMIT\n";
        let stderr = "iptables-restore v1.8.9 (legacy): Couldn't load target `NOPE'\n\n\
                      Error occurred at line: 3\nTry `iptables-restore -h' for more information.\n";
        assert_eq!(failed_line(stderr, doc), Some("-A PALISADE_OUTPUT -j NOPE"));
        assert_eq!(failed_line("Error occurred at line: 0", doc), None);
        assert_eq!(failed_line("Error occurred at line: 9", doc), None);
        assert_eq!(failed_line("something else", doc), None);
    }

    #[test]
    fn a_missing_binary_is_named_with_a_hint() {
        let err = run("palisade-no-such-iptables-restore", &[], None).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("cannot run palisade-no-such-iptables-restore: ")
                && text.ends_with("(not installed? On Debian: apt-get install iptables)"),
            "{text}"
        );
    }

    #[test]
    fn a_failing_binary_reports_status_message_and_line() {
        let err = run(
            "sh",
            &[
                "-c",
                "cat >/dev/null; echo 'boom: Chain X does not exist' >&2; \
                 echo 'Error occurred at line: 2' >&2; exit 4",
            ],
            Some("*nat\n-A OUTPUT -j X\nCOMMIT\n"),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "sh failed (exit status: 4): boom: Chain X does not exist; Error occurred at line: 2 \
             (document line: `-A OUTPUT -j X`)"
        );
    }
}
