//! What the agent holds, as the admin endpoint's `/certs` JSON and as the table of
//! `palisade proxy-config secret` (the columns of `istioctl proxy-config secret`).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::manager::{CertStatus, SecretState, fmt_time};
use crate::sds::{DEFAULT, ROOTCA};

/// The `/certs` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertsReport {
    /// The served SPIFFE ID, once a certificate exists.
    pub identity: Option<String>,
    /// Where the workload certificate stands.
    pub status: CertStatus,
    /// When the next renewal (or retry) is planned, RFC 3339.
    pub next_rotation: Option<String>,
    /// The latest failure since the last success.
    pub last_error: Option<String>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Certificates obtained since start.
    pub issued: u64,
    /// One entry per served certificate: `default` (leaf) and each `ROOTCA` root.
    pub secrets: Vec<SecretEntry>,
}

/// One row of the secret table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretEntry {
    /// SDS resource name.
    pub resource_name: String,
    /// `Cert Chain` or `CA`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `ACTIVE` when served, `WARMING` while waiting for the first certificate, `EXPIRED`.
    pub status: String,
    /// Whether the certificate is within its validity period now.
    pub valid_cert: bool,
    /// Lowercase hex without leading zero bytes (as Envoy's `/certs` prints it).
    pub serial_number: Option<String>,
    /// RFC 3339.
    pub not_after: Option<String>,
    /// RFC 3339.
    pub not_before: Option<String>,
    /// The certificate's SPIFFE ID (leaf only).
    pub identity: Option<String>,
}

/// A serial number as Envoy prints it: hex of the integer, leading zero bytes dropped.
pub fn envoy_serial(hex: &str) -> String {
    let mut s = hex.to_ascii_lowercase().replace(':', "");
    while s.len() > 2 && s.starts_with("00") {
        s.drain(..2);
    }
    s
}

impl CertsReport {
    /// The report for a manager state at time `now`.
    pub fn from_state(state: &SecretState, now: OffsetDateTime) -> Self {
        let mut secrets = Vec::new();
        match &state.svid {
            Some(svid) => {
                let leaf = svid.leaf_info();
                let valid = leaf.is_valid_at(now);
                secrets.push(SecretEntry {
                    resource_name: DEFAULT.to_owned(),
                    kind: "Cert Chain".to_owned(),
                    status: if valid { "ACTIVE" } else { "EXPIRED" }.to_owned(),
                    valid_cert: valid,
                    serial_number: Some(envoy_serial(&leaf.serial)),
                    not_after: Some(fmt_time(leaf.not_after)),
                    not_before: Some(fmt_time(leaf.not_before)),
                    identity: Some(svid.spiffe_id().to_string()),
                });
            }
            None => secrets.push(SecretEntry {
                resource_name: DEFAULT.to_owned(),
                kind: "Cert Chain".to_owned(),
                status: "WARMING".to_owned(),
                valid_cert: false,
                serial_number: None,
                not_after: None,
                not_before: None,
                identity: None,
            }),
        }
        for root in &state.roots {
            let entry = match palisade_identity::CertInfo::parse(root) {
                Ok(info) => {
                    let valid = info.is_valid_at(now);
                    SecretEntry {
                        resource_name: ROOTCA.to_owned(),
                        kind: "CA".to_owned(),
                        status: if valid { "ACTIVE" } else { "EXPIRED" }.to_owned(),
                        valid_cert: valid,
                        serial_number: Some(envoy_serial(&info.serial)),
                        not_after: Some(fmt_time(info.not_after)),
                        not_before: Some(fmt_time(info.not_before)),
                        identity: None,
                    }
                }
                // Roots were parsed when loaded; an unreadable one is still shown, as invalid.
                Err(_) => SecretEntry {
                    resource_name: ROOTCA.to_owned(),
                    kind: "CA".to_owned(),
                    status: "ACTIVE".to_owned(),
                    valid_cert: false,
                    serial_number: None,
                    not_after: None,
                    not_before: None,
                    identity: None,
                },
            };
            secrets.push(entry);
        }
        Self {
            identity: state.identity().map(ToString::to_string),
            status: state.status,
            next_rotation: state.next_attempt.map(fmt_time),
            last_error: state.last_error.clone(),
            consecutive_failures: state.consecutive_failures,
            issued: state.issued,
            secrets,
        }
    }

    /// The `istioctl proxy-config secret` table.
    pub fn table(&self) -> String {
        let header = [
            "RESOURCE NAME",
            "TYPE",
            "STATUS",
            "VALID CERT",
            "SERIAL NUMBER",
            "NOT AFTER",
            "NOT BEFORE",
        ];
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
        let rows: Vec<[String; 7]> = self
            .secrets
            .iter()
            .map(|s| {
                [
                    s.resource_name.clone(),
                    s.kind.clone(),
                    s.status.clone(),
                    s.valid_cert.to_string(),
                    dash(&s.serial_number),
                    dash(&s.not_after),
                    dash(&s.not_before),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[&str]| {
            let mut l = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i + 1 == cells.len() {
                    l.push_str(cell);
                } else {
                    l.push_str(&format!("{cell:<w$}     "));
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(&header);
        for row in &rows {
            let cells: Vec<&str> = row.iter().map(String::as_str).collect();
            line(&cells);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::test_ca::TestCa;

    #[test]
    fn serial_like_envoy() {
        let table = [
            ("00ff01", "ff01"),
            ("7f", "7f"),
            ("00", "00"),
            ("0000ab", "ab"),
            ("AB:CD", "abcd"),
        ];
        for (input, want) in table {
            assert_eq!(envoy_serial(input), want, "{input}");
        }
    }

    #[test]
    fn table_has_istio_columns_and_one_row_per_secret() {
        let ca = TestCa::new();
        let issued = ca.issue(
            "spiffe://cluster.local/ns/demo/sa/client",
            Duration::from_secs(3600),
        );
        let serial = envoy_serial(&issued.svid.leaf_info().serial);
        let state = SecretState {
            svid: Some(issued.svid),
            roots: vec![ca.root.clone()],
            status: CertStatus::Active,
            next_attempt: Some(OffsetDateTime::now_utc()),
            last_error: None,
            consecutive_failures: 0,
            issued: 1,
        };
        let report = CertsReport::from_state(&state, OffsetDateTime::now_utc());
        // JSON round trip: what the CLI reads is what the agent wrote.
        let json = serde_json::to_string(&report).unwrap();
        let back: CertsReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);

        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        let header: Vec<&str> = lines[0]
            .split("  ")
            .filter(|s| !s.is_empty())
            .map(str::trim)
            .collect();
        assert_eq!(
            header,
            [
                "RESOURCE NAME",
                "TYPE",
                "STATUS",
                "VALID CERT",
                "SERIAL NUMBER",
                "NOT AFTER",
                "NOT BEFORE"
            ]
        );
        assert!(lines[1].starts_with("default "), "{table}");
        assert!(lines[1].contains("Cert Chain") && lines[1].contains("ACTIVE"));
        assert!(
            lines[1].contains(&serial) && lines[1].contains(" true "),
            "{table}"
        );
        assert!(
            lines[2].starts_with("ROOTCA ") && lines[2].contains(" CA "),
            "{table}"
        );
        // Columns line up: every row's SERIAL column starts where the header's does.
        let col = lines[0].find("SERIAL NUMBER").unwrap();
        assert_eq!(lines[1].find(&serial), Some(col), "{table}");
    }

    #[test]
    fn before_the_first_certificate_default_is_warming() {
        let state = SecretState {
            svid: None,
            roots: vec![],
            status: CertStatus::Pending,
            next_attempt: None,
            last_error: Some("cannot reach the CA".into()),
            consecutive_failures: 2,
            issued: 0,
        };
        let report = CertsReport::from_state(&state, OffsetDateTime::now_utc());
        assert_eq!(report.secrets.len(), 1);
        assert_eq!(report.secrets[0].status, "WARMING");
        assert!(!report.secrets[0].valid_cert);
        assert!(report.table().lines().nth(1).unwrap().contains("WARMING"));
    }
}
