//! The CA end to end across real processes: `palisade controlplane`, `palisade token issue`,
//! `palisade cert request` / `inspect`, checked with openssl; refusals with their precise errors;
//! garbage on the CA port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const OPENSSL: &str = "openssl";

fn palisade() -> Command {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
}

/// A running `palisade controlplane`; killed on drop. Its JSON log lines are collected.
struct ControlPlane {
    child: Child,
    addr: String,
    state: PathBuf,
    log: Arc<Mutex<String>>,
}

impl ControlPlane {
    fn start(state: &Path, extra: &[&str]) -> Self {
        let mut child = palisade()
            .args([
                "--log-format",
                "json",
                "controlplane",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ])
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
        std::thread::spawn(move || {
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
        let mut addr = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(a) = line.strip_prefix("palisade controlplane: CA listening on ") {
                addr = Some(a.trim().to_owned());
                break;
            }
        }
        let mut cp = Self {
            child,
            addr: String::new(),
            state: state.to_path_buf(),
            log,
        };
        match addr {
            Some(a) => cp.addr = a,
            None => {
                std::thread::sleep(Duration::from_millis(200));
                panic!("control plane did not start: {}", cp.log());
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        cp
    }

    fn root(&self) -> PathBuf {
        self.state.join("root-cert.pem")
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle` (log lines arrive through a pipe).
    fn wait_for_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn issue_token(state: &Path, ns: &str, sa: &str, extra: &[&str]) -> String {
    ok(palisade()
        .args(["token", "issue", "--namespace", ns, "--service-account", sa])
        .arg("--state")
        .arg(state)
        .args(extra))
    .trim()
    .to_owned()
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> PathBuf {
    std::fs::write(path, contents).unwrap();
    path.to_path_buf()
}

/// `palisade cert request` against `cp` with the token in a file.
fn cert_request(cp: &ControlPlane, token: &str, out: &Path, extra: &[&str]) -> Output {
    let token_file = write(&out.with_extension("token"), token);
    run(palisade()
        .args(["cert", "request", "--ca-addr", &cp.addr])
        .arg("--ca-root")
        .arg(cp.root())
        .arg("--token-file")
        .arg(&token_file)
        .arg("--out")
        .arg(out)
        .args(extra))
}

fn openssl(args: &[&str]) -> String {
    let out = run(Command::new(OPENSSL).args(args));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Checks an issued directory with openssl: the chain verifies to root-cert.pem, the SAN is
/// exactly `id`, both EKUs are present. Returns the number of certificates in cert-chain.pem.
fn check_with_openssl(dir: &Path, root: &Path, id: &str) -> usize {
    let chain = dir.join("cert-chain.pem");
    // The leaf is the first certificate of cert-chain.pem; the rest are intermediates.
    let text = std::fs::read_to_string(&chain).unwrap();
    let count = text.matches("BEGIN CERTIFICATE").count();
    let leaf_end = text.find("-----END CERTIFICATE-----").unwrap() + 25;
    let leaf = write(&dir.join("leaf.pem"), &text[..leaf_end]);
    let verify = openssl(&[
        "verify",
        "-CAfile",
        p(root),
        "-untrusted",
        p(&chain),
        p(&leaf),
    ]);
    assert!(verify.trim().ends_with(": OK"), "{verify}");
    // root-cert.pem written by `cert request` is the same root.
    assert_eq!(
        std::fs::read(dir.join("root-cert.pem")).unwrap(),
        std::fs::read(root).unwrap()
    );
    let san = openssl(&["x509", "-in", p(&leaf), "-noout", "-ext", "subjectAltName"]);
    let san_lines: Vec<&str> = san.lines().map(str::trim).collect();
    assert_eq!(
        san_lines,
        [
            "X509v3 Subject Alternative Name: critical",
            &format!("URI:{id}")
        ],
        "SAN must be exactly the token identity"
    );
    let eku = openssl(&[
        "x509",
        "-in",
        p(&leaf),
        "-noout",
        "-ext",
        "extendedKeyUsage",
    ]);
    assert!(eku.contains("TLS Web Server Authentication"), "{eku}");
    assert!(eku.contains("TLS Web Client Authentication"), "{eku}");
    let basics = openssl(&[
        "x509",
        "-in",
        p(&leaf),
        "-noout",
        "-ext",
        "basicConstraints,keyUsage",
    ]);
    assert!(basics.contains("CA:FALSE"), "{basics}");
    assert!(
        basics.contains("Digital Signature, Key Encipherment"),
        "{basics}"
    );
    let subject = openssl(&["x509", "-in", p(&leaf), "-noout", "-subject"]);
    assert_eq!(subject.trim(), "subject=", "empty subject");
    count
}

#[test]
fn token_then_certificate_verified_by_openssl() {
    let tmp = tempfile::tempdir().unwrap();
    // (CA key type, workload key type, expected key in `cert inspect`)
    let cases = [
        ("ecdsa-p256", "ecdsa-p256", "ECDSA P-256"),
        ("rsa-2048", "rsa-2048", "RSA 2048"),
    ];
    for (ca_key, key, key_text) in cases {
        let state = tmp.path().join(format!("state-{ca_key}"));
        let cp = ControlPlane::start(&state, &["--ca-key-type", ca_key]);
        let token = issue_token(&state, "default", "web", &[]);
        let out = tmp.path().join(format!("out-{ca_key}"));
        let res = cert_request(&cp, &token, &out, &["--key-type", key]);
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        let id = "spiffe://cluster.local/ns/default/sa/web";
        assert_eq!(
            check_with_openssl(&out, &cp.root(), id),
            1,
            "self-signed: leaf only"
        );
        // The key is private and matches the certificate.
        let mode = std::fs::metadata(out.join("key.pem")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        }
        let _ = mode;
        let key_pub = openssl(&["pkey", "-in", p(&out.join("key.pem")), "-pubout"]);
        let cert_pub = openssl(&[
            "x509",
            "-in",
            p(&out.join("cert-chain.pem")),
            "-noout",
            "-pubkey",
        ]);
        assert_eq!(key_pub, cert_pub);

        let inspect = ok(palisade()
            .args(["cert", "inspect", "--json"])
            .arg(out.join("cert-chain.pem")));
        let json: serde_json::Value = serde_json::from_str(&inspect).unwrap();
        assert_eq!(json[0]["identity"], id);
        assert_eq!(json[0]["key"], key_text);
        assert_eq!(json[0]["serverAuth"], true);
        assert_eq!(json[0]["clientAuth"], true);
        let serial = openssl(&["x509", "-in", p(&out.join("leaf.pem")), "-noout", "-serial"]);
        assert_eq!(
            serial
                .trim()
                .trim_start_matches("serial=")
                .trim_start_matches('0')
                .to_lowercase(),
            json[0]["serial"].as_str().unwrap().trim_start_matches('0')
        );
        let text = ok(palisade().args(["cert", "inspect"]).arg(cp.root()));
        assert!(
            text.contains("root") && text.contains("O=cluster.local"),
            "{text}"
        );
        assert!(cp.wait_for_log("certificate issued"), "{}", cp.log());
    }
}

#[test]
fn root_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let first_root = {
        let cp = ControlPlane::start(&state, &[]);
        let token = issue_token(&state, "default", "web", &[]);
        let res = cert_request(&cp, &token, &tmp.path().join("a"), &[]);
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        std::fs::read(cp.root()).unwrap()
    };
    // Restarted (even asking for another key type): same root, same token issuer key.
    let cp = ControlPlane::start(&state, &["--ca-key-type", "rsa-2048"]);
    assert_eq!(std::fs::read(cp.root()).unwrap(), first_root);
    let token = issue_token(&state, "default", "web", &[]);
    let out = tmp.path().join("b");
    let res = cert_request(&cp, &token, &out, &[]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    check_with_openssl(&out, &cp.root(), "spiffe://cluster.local/ns/default/sa/web");
    // The certificate issued before the restart still verifies against the same root.
    check_with_openssl(
        &tmp.path().join("a"),
        &cp.root(),
        "spiffe://cluster.local/ns/default/sa/web",
    );
}

/// A plug-in CA directory made by openssl: an ECDSA root and an RSA intermediate.
fn openssl_plugin_ca(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let f = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let ext = write(
        &dir.join("ext.cnf"),
        "[v3_int]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n",
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &f("root-key.pem"),
        "-out",
        &f("root-cert.pem"),
        "-days",
        "3650",
        "-subj",
        "/O=Example Corp/CN=Example Root CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &f("ca-key.pem"),
        "-out",
        &f("ca.csr"),
        "-subj",
        "/O=Example Corp/CN=Palisade Intermediate CA",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &f("ca.csr"),
        "-CA",
        &f("root-cert.pem"),
        "-CAkey",
        &f("root-key.pem"),
        "-CAcreateserial",
        "-out",
        &f("ca-cert.pem"),
        "-days",
        "365",
        "-extfile",
        p(&ext),
        "-extensions",
        "v3_int",
    ]);
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap(),
        std::fs::read_to_string(dir.join("root-cert.pem")).unwrap()
    );
    write(&dir.join("cert-chain.pem"), chain);
}

#[test]
fn plugin_intermediate_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin = tmp.path().join("plugin");
    openssl_plugin_ca(&plugin);
    let state = tmp.path().join("state");
    let cp = ControlPlane::start(&state, &["--plugin-ca", p(&plugin)]);
    // The mesh root is the plug-in root.
    assert_eq!(
        std::fs::read(cp.root()).unwrap(),
        std::fs::read(plugin.join("root-cert.pem")).unwrap()
    );
    let token = issue_token(&state, "payments", "api", &[]);
    let out = tmp.path().join("out");
    // This also verifies the CA's own serving chain (leaf -> openssl-made intermediate -> root)
    // with rustls on the client side.
    let res = cert_request(&cp, &token, &out, &[]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let count = check_with_openssl(
        &out,
        &cp.root(),
        "spiffe://cluster.local/ns/payments/sa/api",
    );
    assert_eq!(count, 2, "leaf and intermediate");
    let issuer = openssl(&["x509", "-in", p(&out.join("leaf.pem")), "-noout", "-issuer"]);
    assert!(issuer.contains("Palisade Intermediate CA"), "{issuer}");
    // Without -untrusted the leaf alone does not verify: the intermediate is really needed.
    let alone = run(Command::new(OPENSSL).args([
        "verify",
        "-CAfile",
        p(&cp.root()),
        p(&out.join("leaf.pem")),
    ]));
    assert!(!alone.status.success());
}

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn refusals_are_precise_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut cp = ControlPlane::start(&state, &[]);
    let id = "spiffe://cluster.local/ns/default/sa/web";
    let good = issue_token(&state, "default", "web", &[]);

    // Tokens the CA must refuse.
    let foreign = issue_token(&tmp.path().join("other-state"), "default", "web", &[]);
    let issuer = palisade_ca::TokenIssuer::load_or_create(&state).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let expired = issuer
        .issue_at(
            "default",
            "web",
            &["istio-ca".to_owned()],
            now - 7200,
            Duration::from_secs(3600),
        )
        .unwrap();
    let wrong_aud = issue_token(&state, "default", "web", &["--audience", "other"]);
    let payload = good.split('.').nth(1).unwrap();
    let alg_none = format!("{}.{payload}.", b64url(br#"{"alg":"none","typ":"JWT"}"#));
    let other_ns = issue_token(&state, "other", "web", &[]);

    // CSRs the CA must refuse.
    let web = palisade_identity::SpiffeId::parse(id).unwrap();
    let good_csr =
        palisade_identity::generate_key_and_csr(&web, palisade_identity::KeyType::EcdsaP256)
            .unwrap();
    let csr_path = |name: &str, pem: &str| write(&tmp.path().join(name), pem);
    let mut der = palisade_identity::pem::parse_csr(good_csr.csr_pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let bad_sig = csr_path(
        "badsig.csr",
        &palisade_identity::pem::encode("CERTIFICATE REQUEST", &der),
    );
    let dns = tmp.path().join("dns.csr");
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "/dev/null",
        "-subj",
        "/",
        "-out",
        p(&dns),
        "-addext",
        &format!("subjectAltName=URI:{id},DNS:web.default.svc"),
    ]);
    let rsa1024 = tmp.path().join("rsa1024.csr");
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "rsa:1024",
        "-nodes",
        "-keyout",
        "/dev/null",
        "-subj",
        "/",
        "-out",
        p(&rsa1024),
        "-addext",
        &format!("subjectAltName=URI:{id}"),
    ]);
    let random = write(
        &tmp.path().join("random.csr"),
        (0..2000u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<u8>>(),
    );

    let unauth = "CA refused the request: Unauthenticated: request authenticate failure";
    // (name, token, extra args, client error, server log reason)
    let cases: Vec<(&str, String, Vec<String>, String, &str)> = vec![
        ("token signed by another key", foreign, vec![], unauth.to_owned(), "token_signature"),
        ("expired token", expired, vec![], unauth.to_owned(), "token_time"),
        ("wrong audience", wrong_aud, vec![], unauth.to_owned(), "token_audience"),
        ("alg none", alg_none, vec![], unauth.to_owned(), "token_algorithm"),
        (
            "namespace A token, namespace B CSR",
            other_ns,
            vec!["--csr".into(), p(&csr_path("default.csr", &good_csr.csr_pem)).into()],
            format!("CA refused the request: InvalidArgument: CSR asks for identity {id} but the caller is spiffe://cluster.local/ns/other/sa/web"),
            "csr_identity_mismatch",
        ),
        (
            "CSR with a bad signature",
            good.clone(),
            vec!["--csr".into(), p(&bad_sig).into()],
            "CA refused the request: InvalidArgument: CSR signature is invalid".to_owned(),
            "csr_signature",
        ),
        (
            "CSR with an extra DNS SAN",
            good.clone(),
            vec!["--csr".into(), p(&dns).into()],
            "CA refused the request: InvalidArgument: CSR asks for a DNS name (web.default.svc)".to_owned(),
            "csr_extra_san",
        ),
        (
            "RSA-1024 key",
            good.clone(),
            vec!["--csr".into(), p(&rsa1024).into()],
            "CA refused the request: InvalidArgument: CSR key RSA 1024 is not allowed".to_owned(),
            "csr_key",
        ),
        (
            "TTL above 90 days",
            good.clone(),
            vec!["--ttl".into(), "91d".into()],
            "CA refused the request: InvalidArgument: requested TTL 7862400s is greater than the max allowed TTL 7776000s".to_owned(),
            "\"reason\":\"ttl\"",
        ),
        (
            "random bytes as CSR",
            good.clone(),
            vec!["--csr".into(), p(&random).into()],
            "CA refused the request: InvalidArgument: CSR is not PEM".to_owned(),
            "csr_malformed",
        ),
    ];
    for (i, (name, token, extra, client_error, reason)) in cases.into_iter().enumerate() {
        let out = tmp.path().join(format!("refused-{i}"));
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let res = cert_request(&cp, &token, &out, &extra);
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains(&client_error),
            "{name}: {stderr:?} lacks {client_error:?}"
        );
        assert!(
            !out.join("cert-chain.pem").exists() && !out.join("key.pem").exists(),
            "{name}: nothing may be written"
        );
        let needle = if reason.starts_with('"') {
            reason.to_owned()
        } else {
            format!("\"reason\":\"{reason}\"")
        };
        assert!(
            cp.wait_for_log(&needle),
            "{name}: no refusal log with {needle}:\n{}",
            cp.log()
        );
    }

    // A stream of garbage on the gRPC port: the server shrugs it off and keeps serving.
    for n in 0..3u32 {
        let mut s = std::net::TcpStream::connect(&cp.addr).unwrap();
        let junk: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(n) >> 13) as u8)
            .collect();
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    let out = tmp.path().join("after-garbage");
    let res = cert_request(&cp, &good, &out, &[]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    check_with_openssl(&out, &cp.root(), id);
    assert!(cp.is_running());
}
