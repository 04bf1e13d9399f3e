//! The validity of the CA's own certificates: the signing certificate (self-signed root or
//! plug-in intermediate) and every certificate above it up to the roots.
//!
//! Three uses: the CA refuses to sign while any certificate of its chain is outside its validity
//! period ([`check_chain`]; a leaf it signed then would not verify anyway); it warns when one is
//! within [`EXPIRY_WARNING_WINDOW`] of its notAfter ([`ExpiryWatch`]: log at start and daily,
//! the gauge `palisade_ca_signing_cert_expiry_seconds`); and `palisade ca status` reports the
//! same states from the chain the control plane wrote to its state directory
//! ([`describe_chain`], [`CertState`], [`ChainCert::attention`]).

use std::fmt;
use std::time::Duration as StdDuration;

use palisade_identity::{CertInfo, CertificateDer};
use time::OffsetDateTime;

use crate::metrics::{CaMetrics, CertLabels};

/// A CA certificate this close to its notAfter is warned about.
pub const EXPIRY_WARNING_WINDOW: time::Duration = time::Duration::days(30);
/// How often the expiry gauge is recomputed: an alert on it is at most this stale.
pub const GAUGE_REFRESH: StdDuration = StdDuration::from_secs(60);
/// How often a standing warning is logged again (a change of state is logged at once).
pub const WARNING_PERIOD: StdDuration = StdDuration::from_secs(24 * 3600);

/// Where a certificate sits in the CA's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertRole {
    /// A trust anchor (from the root bundle).
    Root,
    /// Any CA certificate below a root: the plug-in signing certificate and its parents.
    Intermediate,
}

impl CertRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::Intermediate => "intermediate",
        }
    }
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A time printed as RFC 3339 (what operators compare with `openssl x509 -dates` and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub OffsetDateTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self
            .0
            .format(&time::format_description::well_known::Rfc3339)
        {
            Ok(s) => f.write_str(&s),
            Err(_) => write!(f, "{}", self.0),
        }
    }
}

/// One certificate of the CA's chain, as far as validity goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainCert {
    pub role: CertRole,
    pub subject: String,
    /// Lowercase hex.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// Where a certificate stands at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertState {
    Valid,
    /// Valid, but within [`EXPIRY_WARNING_WINDOW`] of its notAfter.
    Expiring,
    Expired,
    NotYetValid,
}

impl CertState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::Expiring => "expiring",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
        }
    }

    /// Whether the CA can sign with a chain holding this certificate.
    pub fn usable(self) -> bool {
        matches!(self, Self::Valid | Self::Expiring)
    }
}

impl ChainCert {
    pub fn from_info(info: &CertInfo, role: CertRole) -> Self {
        Self {
            role,
            subject: info.subject.clone(),
            serial: info.serial.clone(),
            not_before: info.not_before,
            not_after: info.not_after,
        }
    }

    /// Expired at notAfter itself: a leaf signed then would have no lifetime left.
    pub fn state(&self, now: OffsetDateTime) -> CertState {
        if now < self.not_before {
            CertState::NotYetValid
        } else if now >= self.not_after {
            CertState::Expired
        } else if self.not_after - now <= EXPIRY_WARNING_WINDOW {
            CertState::Expiring
        } else {
            CertState::Valid
        }
    }

    /// Seconds until notAfter (negative once expired): the gauge's value.
    pub fn seconds_left(&self, now: OffsetDateTime) -> i64 {
        (self.not_after - now).whole_seconds()
    }

    /// Whole days until notAfter, rounded down (negative once expired).
    pub fn days_left(&self, now: OffsetDateTime) -> i64 {
        (self.not_after - now).whole_days()
    }

    /// What an operator must hear about this certificate now, if anything.
    pub fn attention(&self, now: OffsetDateTime) -> Option<String> {
        let what = format!(
            "{} certificate {} (serial {})",
            self.role,
            display_subject(&self.subject),
            self.serial
        );
        match self.state(now) {
            CertState::Valid => None,
            CertState::Expiring => Some(format!(
                "{what} expires in {} days, at {} (within {} days): replace it before then",
                self.days_left(now),
                Rfc3339(self.not_after),
                EXPIRY_WARNING_WINDOW.whole_days()
            )),
            CertState::Expired => Some(format!(
                "{what} EXPIRED at {}: the CA refuses to sign",
                Rfc3339(self.not_after)
            )),
            CertState::NotYetValid => Some(format!(
                "{what} is NOT YET VALID (notBefore {}): the CA refuses to sign",
                Rfc3339(self.not_before)
            )),
        }
    }
}

fn display_subject(subject: &str) -> String {
    if subject.is_empty() {
        "(empty subject)".to_owned()
    } else {
        format!("{subject:?}")
    }
}

/// Why the CA refuses to sign: a certificate of its chain is outside its validity period.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidityError {
    #[error(
        "the CA's {role} certificate (subject {subject:?}, serial {serial}) has expired: \
         notAfter {not_after}, now {now} (notBefore {not_before})"
    )]
    Expired {
        role: CertRole,
        subject: String,
        serial: String,
        not_before: Rfc3339,
        not_after: Rfc3339,
        now: Rfc3339,
    },
    #[error(
        "the CA's {role} certificate (subject {subject:?}, serial {serial}) is not yet valid: \
         notBefore {not_before}, now {now} (notAfter {not_after})"
    )]
    NotYetValid {
        role: CertRole,
        subject: String,
        serial: String,
        not_before: Rfc3339,
        not_after: Rfc3339,
        now: Rfc3339,
    },
}

/// Checks every certificate of `chain` (signing certificate first) against `now`; the first one
/// outside its validity is the error, so an expired intermediate is named before its root.
pub fn check_chain(chain: &[ChainCert], now: OffsetDateTime) -> Result<(), ValidityError> {
    for c in chain {
        let state = c.state(now);
        if state.usable() {
            continue;
        }
        let (role, subject, serial) = (c.role, c.subject.clone(), c.serial.clone());
        let (not_before, not_after, now) =
            (Rfc3339(c.not_before), Rfc3339(c.not_after), Rfc3339(now));
        return Err(if state == CertState::Expired {
            ValidityError::Expired {
                role,
                subject,
                serial,
                not_before,
                not_after,
                now,
            }
        } else {
            ValidityError::NotYetValid {
                role,
                subject,
                serial,
                not_before,
                not_after,
                now,
            }
        });
    }
    Ok(())
}

/// Describes a chain as written to the state directory (signing certificate first): a
/// certificate that is also in `roots` is a root, any other an intermediate.
pub fn describe_chain(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
) -> Result<Vec<ChainCert>, palisade_identity::cert::CertError> {
    chain
        .iter()
        .map(|c| {
            let info = CertInfo::parse(c)?;
            // Without a root bundle to compare with, a self-issued CA is a root.
            let is_root = if roots.is_empty() {
                info.is_ca && info.self_issued
            } else {
                roots.iter().any(|r| r.as_ref() == c.as_ref())
            };
            let role = if is_root {
                CertRole::Root
            } else {
                CertRole::Intermediate
            };
            Ok(ChainCert::from_info(&info, role))
        })
        .collect()
}

/// Keeps the expiry gauge current and warns, at start, daily and on every change of state, about
/// the CA certificates that are expiring, expired or not yet valid.
#[derive(Debug, Clone)]
pub struct ExpiryWatch {
    chain: Vec<ChainCert>,
    metrics: CaMetrics,
}

/// One round of warnings, as logged (for tests and callers that report them elsewhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub cert: ChainCert,
    pub state: CertState,
    pub message: String,
}

impl ExpiryWatch {
    pub fn new(chain: Vec<ChainCert>, metrics: CaMetrics) -> Self {
        Self { chain, metrics }
    }

    pub fn chain(&self) -> &[ChainCert] {
        &self.chain
    }

    /// Sets `palisade_ca_signing_cert_expiry_seconds` for every certificate of the chain.
    pub fn update_gauges(&self, now: OffsetDateTime) {
        for c in &self.chain {
            self.metrics
                .signing_cert_expiry
                .get_or_create(&CertLabels {
                    cert: c.role.as_str().to_owned(),
                    serial: c.serial.clone(),
                })
                .set(c.seconds_left(now));
        }
    }

    /// The certificates that need attention at `now`.
    pub fn warnings(&self, now: OffsetDateTime) -> Vec<Warning> {
        self.chain
            .iter()
            .filter_map(|c| {
                c.attention(now).map(|message| Warning {
                    cert: c.clone(),
                    state: c.state(now),
                    message,
                })
            })
            .collect()
    }

    /// Logs the warnings at `now` (warn level while the CA can sign, error once it cannot) and
    /// returns them.
    pub fn log_warnings(&self, now: OffsetDateTime) -> Vec<Warning> {
        let warnings = self.warnings(now);
        for w in &warnings {
            let fields = (
                w.cert.role.as_str(),
                w.cert.subject.as_str(),
                w.cert.serial.as_str(),
                Rfc3339(w.cert.not_before).to_string(),
                Rfc3339(w.cert.not_after).to_string(),
                w.cert.seconds_left(now),
            );
            if w.state.usable() {
                tracing::warn!(
                    cert = fields.0,
                    subject = fields.1,
                    serial = fields.2,
                    not_before = %fields.3,
                    not_after = %fields.4,
                    seconds_left = fields.5,
                    "CA certificate expires within 30 days: {}",
                    w.message
                );
            } else {
                tracing::error!(
                    cert = fields.0,
                    subject = fields.1,
                    serial = fields.2,
                    not_before = %fields.3,
                    not_after = %fields.4,
                    seconds_left = fields.5,
                    "CA certificate outside its validity: {}",
                    w.message
                );
            }
        }
        warnings
    }

    fn states(&self, now: OffsetDateTime) -> Vec<CertState> {
        self.chain.iter().map(|c| c.state(now)).collect()
    }

    /// Runs until dropped: refreshes the gauge every [`GAUGE_REFRESH`] and logs the warnings
    /// again every [`WARNING_PERIOD`], or at once when a certificate changes state (enters the
    /// window, expires). `clock` gives the wall-clock time; the periods run on tokio's clock,
    /// so a test with a paused clock drives both. Each logged round that has warnings is also
    /// sent to `reports`, when given.
    pub async fn run(
        self,
        clock: impl Fn() -> OffsetDateTime + Send,
        reports: Option<tokio::sync::mpsc::UnboundedSender<Vec<Warning>>>,
    ) {
        // The caller logged the start-up round; the next is due a period later.
        let mut last_logged = tokio::time::Instant::now();
        let mut last_states = self.states(clock());
        loop {
            tokio::time::sleep(GAUGE_REFRESH).await;
            let now = clock();
            self.update_gauges(now);
            let states = self.states(now);
            if states != last_states || last_logged.elapsed() >= WARNING_PERIOD {
                let warnings = self.log_warnings(now);
                if let Some(tx) = &reports
                    && !warnings.is_empty()
                {
                    let _ = tx.send(warnings);
                }
                last_logged = tokio::time::Instant::now();
                last_states = states;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(
        role: CertRole,
        from_now_before: i64,
        from_now_after: i64,
        now: OffsetDateTime,
    ) -> ChainCert {
        ChainCert {
            role,
            subject: format!("O={role}"),
            serial: "0a".to_owned(),
            not_before: now + time::Duration::seconds(from_now_before),
            not_after: now + time::Duration::seconds(from_now_after),
        }
    }

    const DAY: i64 = 86_400;

    #[test]
    fn states_and_chain_checks() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        // (name, notBefore, notAfter relative to now, state, usable)
        let cases = [
            ("valid", -DAY, 365 * DAY, CertState::Valid),
            (
                "just outside the window",
                -DAY,
                30 * DAY + 1,
                CertState::Valid,
            ),
            ("within 30 days", -DAY, 30 * DAY, CertState::Expiring),
            ("within 10 days", -DAY, 10 * DAY, CertState::Expiring),
            ("last second", -DAY, 1, CertState::Expiring),
            ("expires now", -DAY, 0, CertState::Expired),
            ("expired", -10 * DAY, -DAY, CertState::Expired),
            ("not yet valid", 60, 365 * DAY, CertState::NotYetValid),
            ("valid from now", 0, 365 * DAY, CertState::Valid),
        ];
        for (name, nb, na, want) in cases {
            let c = cert(CertRole::Intermediate, nb, na, now);
            assert_eq!(c.state(now), want, "{name}");
            assert_eq!(c.seconds_left(now), na, "{name}");
            assert_eq!(
                c.attention(now).is_some(),
                want != CertState::Valid,
                "{name}"
            );
            let checked = check_chain(std::slice::from_ref(&c), now);
            assert_eq!(checked.is_ok(), want.usable(), "{name}: {checked:?}");
            if let Err(e) = checked {
                let text = e.to_string();
                for part in [
                    "intermediate",
                    "O=intermediate",
                    "serial 0a",
                    "notBefore",
                    "notAfter",
                    "now ",
                ] {
                    assert!(text.contains(part), "{name}: {text} lacks {part}");
                }
                let word = if want == CertState::Expired {
                    "has expired"
                } else {
                    "is not yet valid"
                };
                assert!(text.contains(word), "{name}: {text}");
            }
        }
    }

    #[test]
    fn the_first_certificate_outside_its_validity_is_named() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let chain = [
            cert(CertRole::Intermediate, -DAY, -1, now),
            cert(CertRole::Root, -DAY, -1, now),
        ];
        let err = check_chain(&chain, now).unwrap_err();
        assert!(
            matches!(
                err,
                ValidityError::Expired {
                    role: CertRole::Intermediate,
                    ..
                }
            ),
            "{err}"
        );
        let chain = [
            cert(CertRole::Intermediate, -DAY, DAY, now),
            cert(CertRole::Root, DAY, 2 * DAY, now),
        ];
        let err = check_chain(&chain, now).unwrap_err();
        assert!(
            matches!(
                err,
                ValidityError::NotYetValid {
                    role: CertRole::Root,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn gauges_hold_seconds_until_not_after() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let metrics = CaMetrics::default();
        let mut root = cert(CertRole::Root, -DAY, 3650 * DAY, now);
        root.serial = "01".to_owned();
        let watch = ExpiryWatch::new(
            vec![cert(CertRole::Intermediate, -DAY, 10 * DAY, now), root],
            metrics.clone(),
        );
        watch.update_gauges(now);
        let get = |cert: &str, serial: &str| {
            metrics
                .signing_cert_expiry
                .get_or_create(&CertLabels {
                    cert: cert.to_owned(),
                    serial: serial.to_owned(),
                })
                .get()
        };
        assert_eq!(get("intermediate", "0a"), 10 * DAY);
        assert_eq!(get("root", "01"), 3650 * DAY);
        let warnings = watch.warnings(now);
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].state, CertState::Expiring);
        assert!(
            warnings[0].message.contains("expires in 10 days"),
            "{}",
            warnings[0].message
        );
        // Once expired the gauge goes negative, so `< 30 * 86400` alerts keep firing.
        watch.update_gauges(now + time::Duration::days(11));
        assert_eq!(get("intermediate", "0a"), -DAY);
    }

    /// The periodic warning on a paused tokio clock: nothing while the intermediate is more than
    /// 30 days from expiry, a warning as it enters the window, again daily, and an error round
    /// the moment it expires.
    #[tokio::test(start_paused = true)]
    async fn periodic_warning_on_a_paused_clock() {
        let start_wall = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let start = tokio::time::Instant::now();
        let clock = move || {
            start_wall + time::Duration::try_from(start.elapsed()).unwrap_or(time::Duration::ZERO)
        };
        let metrics = CaMetrics::default();
        // Enters the 30-day window after 12 hours, expires 30 days later.
        let intermediate = cert(
            CertRole::Intermediate,
            -DAY,
            30 * DAY + 12 * 3600,
            start_wall,
        );
        let watch = ExpiryWatch::new(vec![intermediate], metrics.clone());
        assert!(
            watch.log_warnings(clock()).is_empty(),
            "nothing to say at start"
        );
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(watch.run(clock, Some(tx)));

        tokio::time::sleep(StdDuration::from_secs(11 * 3600)).await;
        assert!(rx.try_recv().is_err(), "still outside the window");

        // Crossing into the window warns at once (within a gauge refresh).
        tokio::time::sleep(StdDuration::from_secs(3600 + 120)).await;
        let round = rx.try_recv().expect("a warning on entering the window");
        assert_eq!(round[0].state, CertState::Expiring);
        assert!(rx.try_recv().is_err());

        // Then once a day, not more.
        tokio::time::sleep(StdDuration::from_secs(23 * 3600)).await;
        assert!(rx.try_recv().is_err(), "not again within the day");
        tokio::time::sleep(StdDuration::from_secs(3600)).await;
        let round = rx.try_recv().expect("the daily warning");
        assert_eq!(round[0].state, CertState::Expiring);
        assert!(
            round[0].message.contains("expires in 29 days"),
            "{}",
            round[0].message
        );

        // Expiry is reported the minute it happens, not at the next daily round.
        tokio::time::sleep(StdDuration::from_secs(29 * DAY as u64 + 3600)).await;
        let mut last = None;
        while let Ok(round) = rx.try_recv() {
            last = Some(round);
        }
        let last = last.expect("warnings until expiry");
        assert_eq!(last[0].state, CertState::Expired);
        assert!(last[0].message.contains("EXPIRED"), "{}", last[0].message);
        let gauge = metrics
            .signing_cert_expiry
            .get_or_create(&CertLabels {
                cert: "intermediate".to_owned(),
                serial: "0a".to_owned(),
            })
            .get();
        assert!(gauge < 0, "{gauge}");
        task.abort();
    }
}
