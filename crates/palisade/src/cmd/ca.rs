//! `palisade ca`: the control plane's certificate authority as an operator sees it.
//!
//! `ca status --state DIR` reads the CA's chain the control plane writes on every start
//! (`DIR/ca-chain.pem`, signing certificate first, roots last; `DIR/root-cert.pem` tells the
//! roots apart) and reports each certificate's validity against the clock: a WARNING within 30
//! days of notAfter, EXPIRED or NOT YET VALID when the CA refuses to sign. Exit 1 when anything
//! needs attention. The JSON form is an object so that later sections (several roots, rotation
//! phases) can be added beside `chain` without breaking readers.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use palisade_ca::validity::{self, ChainCert, Rfc3339};
use palisade_identity::pem as pemio;
use time::OffsetDateTime;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The CA's certificate chain (signing certificate to roots): subject, serial, validity,
    /// days left, and a WARNING within 30 days of expiry. Exits 1 when a warning applies.
    Status(StatusArgs),
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The control plane's state directory (`palisade controlplane --state`).
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Status(args) => status(&args),
    }
}

fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let (path, chain) = read_chain(&args.state)?;
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc());
    let report = Report::new(&path, &chain, now);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        print!("{}", report.text());
    }
    Ok(if report.needs_attention() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The chain from `ca-chain.pem`; a state directory written before that file existed has only
/// the self-signed root, `ca-cert.pem`.
fn read_chain(state: &Path) -> anyhow::Result<(PathBuf, Vec<ChainCert>)> {
    let chain_path = state.join(palisade_ca::CA_CHAIN_FILE);
    let legacy = state.join(palisade_ca::signer::STATE_CA_CERT);
    let path = if chain_path.is_file() {
        chain_path
    } else if legacy.is_file() {
        legacy
    } else {
        anyhow::bail!(
            "{}: no CA chain here ({} is written by `palisade controlplane --state {}` when it \
             starts)",
            state.display(),
            palisade_ca::CA_CHAIN_FILE,
            state.display()
        );
    };
    let certs = pemio::read_certs(&path)?;
    anyhow::ensure!(!certs.is_empty(), "{}: no certificate", path.display());
    let roots_path = state.join(palisade_ca::ROOT_CERT_FILE);
    let roots = if roots_path.is_file() {
        pemio::read_certs(&roots_path)?
    } else {
        Vec::new()
    };
    let chain = validity::describe_chain(&certs, &roots)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok((path, chain))
}

/// What `ca status` shows, computed once for both output forms.
struct Report<'a> {
    path: &'a Path,
    now: OffsetDateTime,
    entries: Vec<Entry<'a>>,
}

struct Entry<'a> {
    cert: &'a ChainCert,
    signing: bool,
    state: validity::CertState,
    attention: Option<String>,
}

impl<'a> Report<'a> {
    fn new(path: &'a Path, chain: &'a [ChainCert], now: OffsetDateTime) -> Self {
        let entries = chain
            .iter()
            .enumerate()
            .map(|(n, cert)| Entry {
                cert,
                signing: n == 0,
                state: cert.state(now),
                attention: cert.attention(now),
            })
            .collect();
        Self { path, now, entries }
    }

    fn needs_attention(&self) -> bool {
        self.entries.iter().any(|e| e.attention.is_some())
    }

    fn text(&self) -> String {
        let mut out = format!(
            "CA chain ({}), now {}:\n",
            self.path.display(),
            Rfc3339(self.now)
        );
        for (n, e) in self.entries.iter().enumerate() {
            let c = e.cert;
            let signs = if e.signing { ", signs" } else { "" };
            out.push_str(&format!("[{n}] {}{signs}\n", c.role));
            out.push_str(&format!("  subject:    {}\n", c.subject));
            out.push_str(&format!("  serial:     {}\n", c.serial));
            out.push_str(&format!("  not before: {}\n", Rfc3339(c.not_before)));
            out.push_str(&format!("  not after:  {}\n", Rfc3339(c.not_after)));
            out.push_str(&format!("  days left:  {}\n", c.days_left(self.now)));
            out.push_str(&format!("  state:      {}\n", e.state.as_str()));
            if let Some(message) = &e.attention {
                let label = match e.state {
                    validity::CertState::Expired => "EXPIRED",
                    validity::CertState::NotYetValid => "NOT YET VALID",
                    _ => "WARNING",
                };
                out.push_str(&format!("  {label}: {message}\n"));
            }
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let chain: Vec<_> = self
            .entries
            .iter()
            .map(|e| {
                let c = e.cert;
                serde_json::json!({
                    "role": c.role,
                    "signing": e.signing,
                    "subject": c.subject,
                    "serial": c.serial,
                    "notBefore": Rfc3339(c.not_before).to_string(),
                    "notAfter": Rfc3339(c.not_after).to_string(),
                    "secondsLeft": c.seconds_left(self.now),
                    "daysLeft": c.days_left(self.now),
                    "state": e.state,
                    "warning": e.attention,
                })
            })
            .collect();
        let warnings: Vec<_> = self
            .entries
            .iter()
            .filter_map(|e| e.attention.clone())
            .collect();
        serde_json::json!({
            "file": self.path.display().to_string(),
            "now": Rfc3339(self.now).to_string(),
            "chain": chain,
            "warnings": warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_ca::validity::CertRole;

    fn cert(role: CertRole, days_left: i64, now: OffsetDateTime) -> ChainCert {
        ChainCert {
            role,
            subject: format!("O={role}"),
            serial: "0a".to_owned(),
            not_before: now - time::Duration::days(1),
            not_after: now + time::Duration::days(days_left),
        }
    }

    #[test]
    fn report_lines_and_attention() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let path = Path::new("state/ca-chain.pem");
        // (intermediate days left, needs attention, expected label)
        let cases = [
            (365, false, None),
            (10, true, Some("WARNING")),
            (-1, true, Some("EXPIRED")),
        ];
        for (days, attention, label) in cases {
            let chain = [
                cert(CertRole::Intermediate, days, now),
                cert(CertRole::Root, 3650, now),
            ];
            let report = Report::new(path, &chain, now);
            assert_eq!(report.needs_attention(), attention, "{days}");
            let text = report.text();
            assert!(text.contains("[0] intermediate, signs"), "{text}");
            assert!(text.contains("[1] root\n"), "{text}");
            assert!(text.contains(&format!("days left:  {days}")), "{text}");
            match label {
                Some(l) => assert!(text.contains(&format!("  {l}: ")), "{text}"),
                None => assert!(
                    !text.contains("WARNING") && !text.contains("EXPIRED"),
                    "{text}"
                ),
            }
            let json = report.json();
            assert_eq!(json["chain"][0]["role"], "intermediate");
            assert_eq!(json["chain"][0]["signing"], true);
            assert_eq!(json["chain"][1]["role"], "root");
            assert_eq!(
                json["warnings"].as_array().map(Vec::len),
                Some(usize::from(attention))
            );
        }
    }
}
