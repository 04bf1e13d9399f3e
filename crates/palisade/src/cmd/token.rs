//! `palisade token`: service-account tokens, as the Kubernetes API server would issue them,
//! signed by the control plane's token issuer key in its state directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use palisade_ca::TokenIssuer;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print a signed JWT (ES256) for a namespace and service account.
    Issue(IssueArgs),
}

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// The control plane's state directory (the issuer key is created there if missing).
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    #[arg(long, value_name = "NS")]
    pub namespace: String,
    #[arg(long, value_name = "SA")]
    pub service_account: String,
    /// Lifetime, e.g. 1h, 30m, 90s, 1h30m.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Audience (repeat for several).
    #[arg(long, value_name = "AUD", default_value = palisade_ca::ISTIO_CA_AUDIENCE)]
    pub audience: Vec<String>,
}

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Issue(args) => {
            let issuer = TokenIssuer::load_or_create(&args.state)
                .with_context(|| format!("token issuer in {}", args.state.display()))?;
            let token = issuer.issue(
                &args.namespace,
                &args.service_account,
                &args.audience,
                args.ttl,
            )?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Parses durations like `90s`, `30m`, `1h`, `1h30m`, `90d`, `500ms` (a sum of number+unit
/// parts; units ms, s, m, h, d). A bare number is seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".to_owned());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration {text:?}: expected a number at {rest:?}"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            other => {
                return Err(format!(
                    "invalid duration {text:?}: unknown unit {other:?} (use ms, s, m, h, d)"
                ));
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        let ok = [
            ("90", 90),
            ("90s", 90),
            ("30m", 1800),
            ("1h", 3600),
            ("1h30m", 5400),
            ("90d", 90 * 86_400),
            ("2160h", 2160 * 3600),
        ];
        for (text, secs) in ok {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "h", "1x", "1.5h", "-1h", "1h m"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must fail");
        }
    }
}
