//! The CA against the validity of its own chain, across real processes: `palisade controlplane
//! --plug-in-ca` with an intermediate that is expired, that expires while the control plane
//! runs, or that expires in 10 days; `palisade cert request`, `palisade ca status`, `/metrics`
//! and the log. Loopback, port 0 only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_identity::{CertInfo, KeyType, SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;

fn palisade() -> Command {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
}

/// A running `palisade controlplane`, killed on drop; its JSON log is collected.
struct ControlPlane {
    child: Child,
    ca: String,
    admin: String,
    state: PathBuf,
    log: Arc<Mutex<String>>,
}

impl ControlPlane {
    /// Starts it and waits for both ports, or returns its exit status and log when it stops
    /// before listening.
    fn start(state: &Path, extra: &[&str]) -> Result<Self, (ExitStatus, String)> {
        let mut child = palisade()
            .args(["--log-format", "json", "controlplane"])
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--state")
            .arg(state)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        let drain = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut ca, mut admin) = (None, None);
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(a) = line.strip_prefix("palisade controlplane: CA listening on ") {
                ca = Some(a.trim().to_owned());
            }
            if let Some(a) = line.strip_prefix("palisade controlplane: admin listening on ") {
                admin = Some(a.trim().to_owned());
                break;
            }
        }
        match (ca, admin) {
            (Some(ca), Some(admin)) => {
                std::thread::spawn(move || for _ in lines {});
                Ok(Self {
                    child,
                    ca,
                    admin,
                    state: state.to_path_buf(),
                    log,
                })
            }
            _ => {
                let status = child.wait().unwrap();
                let _ = drain.join();
                let text = log.lock().unwrap().clone();
                Err((status, text))
            }
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn wait_for_log(&self, needle: &str) -> bool {
        for _ in 0..250 {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn root(&self) -> PathBuf {
        self.state.join("root-cert.pem")
    }

    /// `GET /metrics` on the admin endpoint.
    fn metrics(&self) -> String {
        let mut conn = std::net::TcpStream::connect(&self.admin).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            conn,
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin
        )
        .unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn issue_token(state: &Path) -> String {
    ok(palisade()
        .args(["token", "issue", "--namespace", "default"])
        .args(["--service-account", "web", "--state"])
        .arg(state))
    .trim()
    .to_owned()
}

fn ca_status(state: &Path, json: bool) -> Output {
    let mut cmd = palisade();
    cmd.args(["ca", "status", "--state"]).arg(state);
    if json {
        cmd.arg("--json");
    }
    cmd.output().unwrap()
}

fn ca_params(
    org: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::OrganizationName, org);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = not_before;
    p.not_after = not_after;
    p
}

/// A plug-in CA directory: a 10-year root and an intermediate valid from `not_before` to
/// `not_after`. Returns the intermediate's facts.
fn plugin_ca(dir: &Path, not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertInfo {
    std::fs::create_dir_all(dir).unwrap();
    let now = OffsetDateTime::now_utc();
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params(
        "Validity Root",
        now - time::Duration::days(1),
        now + time::Duration::days(3650),
    );
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let key = KeyPair::generate().unwrap();
    let mut params = ca_params("Validity Intermediate", not_before, not_after);
    params.use_authority_key_identifier_extension = true;
    let int = params.signed_by(&key, &root_issuer).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), int.pem()).unwrap();
    std::fs::write(dir.join("ca-key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("root-cert.pem"), root.pem()).unwrap();
    std::fs::write(
        dir.join("cert-chain.pem"),
        format!("{}{}", int.pem(), root.pem()),
    )
    .unwrap();
    CertInfo::parse(int.der()).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// (a) An expired intermediate: the control plane does not start (it could sign nothing, not
/// even its own serving certificate) and says which certificate and when; `ca status` shows it
/// EXPIRED and exits 1. A not-yet-valid one the same.
#[test]
fn expired_or_not_yet_valid_intermediate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let cases = [
        (
            "expired",
            now - time::Duration::days(30),
            now - time::Duration::days(1),
            "has expired",
            "EXPIRED: ",
            "expired",
        ),
        (
            "not-yet-valid",
            now + time::Duration::days(1),
            now + time::Duration::days(365),
            "is not yet valid",
            "NOT YET VALID: ",
            "not_yet_valid",
        ),
    ];
    for (name, nb, na, error, label, state_name) in cases {
        let plugin = tmp.path().join(format!("{name}-plugin"));
        let state = tmp.path().join(format!("{name}-state"));
        let int = plugin_ca(&plugin, nb, na);
        let (status, log) = match ControlPlane::start(&state, &["--plugin-ca", p(&plugin)]) {
            Ok(_) => panic!("{name}: the control plane started with an unusable intermediate"),
            Err(e) => e,
        };
        assert_eq!(status.code(), Some(2), "{name}: {log}");
        for part in [
            "the CA cannot sign",
            "intermediate certificate",
            "Validity Intermediate",
            int.serial.as_str(),
            error,
            "notBefore",
            "notAfter",
            "now ",
        ] {
            assert!(
                log.contains(part),
                "{name}: the error lacks {part:?}: {log}"
            );
        }

        let out = ca_status(&state, false);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{name}: {text}");
        assert!(text.contains("[0] intermediate, signs"), "{name}: {text}");
        assert!(text.contains(label), "{name}: {text}");
        assert!(text.contains(&int.serial), "{name}: {text}");
        let out = ca_status(&state, true);
        assert_eq!(out.status.code(), Some(1));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["chain"][0]["state"], state_name, "{json}");
        assert_eq!(json["chain"][1]["role"], "root", "{json}");
        assert_eq!(json["chain"][1]["state"], "valid", "{json}");
    }
}

/// (a) The intermediate expires while the control plane runs: a client already connected (an
/// agent renewing) gets the refusal as gRPC `Internal` with the reason, and it is counted.
/// Until then the certificates it issues end with the intermediate.
#[test]
fn intermediate_expiring_while_running_is_refused_over_grpc() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin = tmp.path().join("plugin");
    let state = tmp.path().join("state");
    let now = OffsetDateTime::now_utc();
    let int = plugin_ca(
        &plugin,
        now - time::Duration::days(1),
        now + time::Duration::seconds(20),
    );
    let cp =
        ControlPlane::start(&state, &["--plugin-ca", p(&plugin)]).unwrap_or_else(|(s, log)| {
            panic!("control plane exited ({s}): {log}");
        });
    let token = issue_token(&state);
    let root_pem = std::fs::read(cp.root()).unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let id = SpiffeId::for_service_account(td, "default", "web").unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = palisade_ca::CaClient::connect(
            &cp.ca,
            &root_pem,
            palisade_ca::CaClientOptions::default(),
        )
        .await
        .unwrap();
        let csr = palisade_identity::generate_key_and_csr(&id, KeyType::EcdsaP256)
            .unwrap()
            .csr_pem;
        let chain = client
            .create_certificate(&csr, Some(&token), None, None)
            .await
            .unwrap();
        let leaf_der = palisade_identity::pem::parse_certs(chain[0].as_bytes()).unwrap();
        let leaf = CertInfo::parse(&leaf_der[0]).unwrap();
        // 24 h asked by default, capped at the intermediate's notAfter.
        assert_eq!(leaf.not_after, int.not_after);

        let wait = int.not_after - OffsetDateTime::now_utc() + time::Duration::seconds(1);
        if wait.is_positive() {
            tokio::time::sleep(wait.unsigned_abs()).await;
        }
        let err = client
            .create_certificate(&csr, Some(&token), None, None)
            .await
            .unwrap_err();
        match &err {
            palisade_ca::CaClientError::Refused { code, message } => {
                assert_eq!(*code, tonic::Code::Internal, "{message}");
                for part in [
                    "the CA cannot sign",
                    "intermediate certificate",
                    "Validity Intermediate",
                    int.serial.as_str(),
                    "has expired",
                ] {
                    assert!(message.contains(part), "{message} lacks {part:?}");
                }
            }
            other => panic!("not a refusal: {other}"),
        }
    });
    let metrics = cp.metrics();
    assert!(
        metrics.contains("palisade_ca_requests_refused_total{reason=\"ca_cert_validity\"} 1"),
        "{metrics}"
    );
    assert!(
        cp.wait_for_log("certificate request refused"),
        "{}",
        cp.log()
    );
    assert!(cp.log().contains("ca_cert_validity"), "{}", cp.log());
}

/// (b) An intermediate that expires in 10 days: requests succeed, no certificate outlives the
/// intermediate, the gauge says how long is left, the log warns, `ca status` warns and exits 1.
#[test]
fn intermediate_expiring_in_ten_days_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin = tmp.path().join("plugin");
    let state = tmp.path().join("state");
    let now = OffsetDateTime::now_utc();
    let int = plugin_ca(
        &plugin,
        now - time::Duration::days(1),
        now + time::Duration::days(10),
    );
    let cp =
        ControlPlane::start(&state, &["--plugin-ca", p(&plugin)]).unwrap_or_else(|(s, log)| {
            panic!("control plane exited ({s}): {log}");
        });
    assert!(
        cp.wait_for_log("CA certificate expires within 30 days"),
        "{}",
        cp.log()
    );
    assert!(cp.log().contains(&int.serial), "{}", cp.log());

    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, issue_token(&state)).unwrap();
    for (ttl, capped) in [(None, false), (Some("30d"), true)] {
        let out = tmp.path().join(format!("out-{capped}"));
        let mut cmd = palisade();
        cmd.args(["cert", "request", "--ca-addr", &cp.ca, "--ca-root"])
            .arg(cp.root())
            .arg("--token-file")
            .arg(&token_file)
            .arg("--out")
            .arg(&out);
        if let Some(ttl) = ttl {
            cmd.args(["--ttl", ttl]);
        }
        ok(&mut cmd);
        let chain = palisade_identity::pem::read_certs(&out.join("cert-chain.pem")).unwrap();
        let leaf = CertInfo::parse(&chain[0]).unwrap();
        assert!(leaf.not_after <= int.not_after, "{ttl:?}");
        if capped {
            assert_eq!(
                leaf.not_after, int.not_after,
                "a 30-day leaf ends with the intermediate"
            );
        } else {
            assert_eq!(
                leaf.not_after - leaf.not_before,
                time::Duration::minutes(24 * 60 + 2)
            );
        }
    }

    let metrics = cp.metrics();
    let prefix = format!(
        "palisade_ca_signing_cert_expiry_seconds{{cert=\"intermediate\",serial=\"{}\"}} ",
        int.serial
    );
    let line = metrics
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {prefix}: {metrics}"));
    let secs: i64 = line[prefix.len()..].trim().parse().unwrap();
    assert!((9 * 86_400..=10 * 86_400).contains(&secs), "{line}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("palisade_ca_signing_cert_expiry_seconds{cert=\"root\"")),
        "{metrics}"
    );

    let out = ca_status(&state, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("  WARNING: intermediate certificate"),
        "{text}"
    );
    assert!(text.contains("within 30 days"), "{text}");
    // 10 days less the seconds since the intermediate was made: 9, or 10 within the same second.
    assert!(
        text.contains("days left:  9\n") || text.contains("days left:  10\n"),
        "{text}"
    );
    let out = ca_status(&state, true);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["chain"][0]["state"], "expiring", "{json}");
    assert_eq!(json["chain"][0]["serial"], int.serial.as_str(), "{json}");
    assert_eq!(json["warnings"].as_array().map(Vec::len), Some(1), "{json}");
}

/// The self-signed root (10 years): nothing to warn about, exit 0.
#[test]
fn a_fresh_self_signed_root_is_fine() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let cp = ControlPlane::start(&state, &[]).unwrap_or_else(|(s, log)| {
        panic!("control plane exited ({s}): {log}");
    });
    let out = ca_status(&cp.state, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("[0] root, signs"), "{text}");
    assert!(!text.contains("WARNING"), "{text}");
    assert!(!cp.log().contains("expires within 30 days"), "{}", cp.log());
}
