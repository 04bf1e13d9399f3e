//! The agent with real Envoys: control plane, two agents (`ns/demo/sa/client`,
//! `ns/demo/sa/server`), two Envoys bootstrapped with SDS over the agents' Unix sockets, mutual
//! TLS with SPIFFE SAN checks on both sides, certificate rotation under traffic, and faults
//! (CA down at start, CA down mid-life, token file problems).
//!
//! Needs Envoy: `scripts/install-envoy.sh` (or `PALISADE_ENVOY`). Without it these tests fail
//! and say so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/envoy.rs"]
mod envoy;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_mesh::{
    AgentProc, Backend, ControlPlane, PALISADE, free_port, http_get, issue_token, wait_for,
};
use envoy::{Envoy, client_bootstrap, server_bootstrap};
use palisade_identity::{ServerIdentity, SpiffeId, Svid, TrustBundle, TrustDomain};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";

/// A mesh directory: control plane state, tokens, sockets, logs.
struct Setup {
    dir: tempfile::TempDir,
    state: PathBuf,
    cp_port: u16,
    client_token: PathBuf,
    server_token: PathBuf,
}

impl Setup {
    /// Creates the state (CA root, token issuer) with a short-lived control plane, issues both
    /// tokens, and returns the control plane if `keep_ca` (else it is stopped).
    async fn new(keep_ca: bool) -> (Self, Option<ControlPlane>) {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let cp_port = free_port();
        let cp = ControlPlane::start(dir.path(), &state, cp_port, "controlplane").await;
        let client_token = issue_token(&state, "demo", "client", dir.path());
        let server_token = issue_token(&state, "demo", "server", dir.path());
        let setup = Self {
            dir,
            state,
            cp_port,
            client_token,
            server_token,
        };
        (setup, keep_ca.then_some(cp))
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn ca_addr(&self) -> String {
        format!("127.0.0.1:{}", self.cp_port)
    }

    fn root(&self) -> PathBuf {
        self.state.join("root-cert.pem")
    }

    async fn start_ca(&self, name: &str) -> ControlPlane {
        ControlPlane::start(self.path(), &self.state, self.cp_port, name).await
    }

    async fn agent(&self, name: &str, token: &Path, extra: &[&str]) -> AgentProc {
        AgentProc::start(
            self.path(),
            name,
            &self.ca_addr(),
            &self.root(),
            token,
            extra,
        )
        .await
    }
}

/// Two agents and two Envoys in front of a backend.
struct Pair {
    _backend: Backend,
    client_agent: AgentProc,
    server_agent: AgentProc,
    client_envoy: Envoy,
    server_envoy: Envoy,
    client_port: u16,
    server_port: u16,
}

impl Pair {
    async fn start(setup: &Setup, agent_args: &[&str]) -> Self {
        let backend = Backend::start().await;
        let client_agent = setup
            .agent("agent-client", &setup.client_token, agent_args)
            .await;
        let server_agent = setup
            .agent("agent-server", &setup.server_token, agent_args)
            .await;
        let server_port = free_port();
        let client_port = free_port();
        let server_envoy = Envoy::start(
            setup.path(),
            "envoy-server",
            &server_bootstrap(
                &server_agent.sds,
                server_port,
                CLIENT_ID,
                backend.addr.port(),
            ),
        )
        .await;
        let client_envoy = Envoy::start(
            setup.path(),
            "envoy-client",
            &client_bootstrap(&client_agent.sds, client_port, SERVER_ID, server_port),
        )
        .await;
        Self {
            _backend: backend,
            client_agent,
            server_agent,
            client_envoy,
            server_envoy,
            client_port,
            server_port,
        }
    }

    async fn wait_live(&self) {
        self.server_envoy.wait_live(Duration::from_secs(30)).await;
        self.client_envoy.wait_live(Duration::from_secs(30)).await;
    }

    /// One request: test -> client Envoy -> (mTLS) -> server Envoy -> backend.
    async fn request(&self) -> std::io::Result<(u16, String)> {
        http_get(&format!("127.0.0.1:{}", self.client_port), "/hello").await
    }

    async fn assert_request_ok(&self) -> String {
        let (status, body) = self.request().await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("backend ok"), "{body}");
        body
    }
}

/// A TLS client presenting `svid` to the server Envoy (verifying the server's SPIFFE ID against
/// the mesh root). Returns the HTTP status, or the error that ended the exchange.
async fn mtls_get(port: u16, svid: Svid, mesh_root: &Path) -> Result<u16, String> {
    let bundle = TrustBundle::from_pem(
        TrustDomain::new("cluster.local").unwrap(),
        &std::fs::read(mesh_root).unwrap(),
    )
    .unwrap();
    let expected = ServerIdentity::OneOf(vec![SpiffeId::parse(SERVER_ID).unwrap()]);
    let config = palisade_identity::client_config(Some(svid.into()), &bundle, expected).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("server.demo").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // With TLS 1.3 the server judges the client certificate after the client's handshake is
    // done: a refusal shows up as an alert on the first read.
    tls.write_all(b"GET / HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP response: {text:?}"))
}

/// A certificate from the mesh CA via `palisade cert request` (the CLI, as a user would).
fn mesh_svid(setup: &Setup, token: &Path, name: &str) -> Svid {
    let out_dir = setup.path().join(name);
    let out = Command::new(PALISADE)
        .args([
            "cert",
            "request",
            "--ca-addr",
            &setup.ca_addr(),
            "--ca-root",
        ])
        .arg(setup.root())
        .arg("--token-file")
        .arg(token)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cert request: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Svid::from_pem(
        &std::fs::read(out_dir.join("cert-chain.pem")).unwrap(),
        &std::fs::read(out_dir.join("key.pem")).unwrap(),
    )
    .unwrap()
}

/// A certificate for `id` from a CA the mesh has never heard of.
fn foreign_svid(id: &str) -> Svid {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    Svid::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_get_spiffe_certs_over_sds_and_enforce_mtls() {
    let (setup, _ca) = Setup::new(true).await;
    let pair = Pair::start(&setup, &[]).await;
    pair.wait_live().await;

    // A request crosses both Envoys; the server saw the client's SPIFFE ID.
    let body = pair.assert_request_ok().await;
    assert!(body.contains(&format!("URI={CLIENT_ID}")), "{body}");

    // Envoy serves exactly the certificates the agents hold.
    let client_serial = pair.client_agent.wait_for_cert().await;
    let server_serial = pair.server_agent.wait_for_cert().await;
    assert_eq!(
        pair.client_envoy.leaf_serials().await,
        vec![client_serial.clone()]
    );
    assert_eq!(
        pair.server_envoy.leaf_serials().await,
        vec![server_serial.clone()]
    );
    assert_ne!(client_serial, server_serial);

    // The Istio-style table of the agent.
    let out = Command::new(PALISADE)
        .args([
            "proxy-config",
            "secret",
            "--admin",
            &pair.server_agent.admin,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    for column in [
        "RESOURCE NAME",
        "TYPE",
        "STATUS",
        "VALID CERT",
        "SERIAL NUMBER",
        "NOT AFTER",
        "NOT BEFORE",
    ] {
        assert!(lines[0].contains(column), "{table}");
    }
    let default_row = lines
        .iter()
        .find(|l| l.starts_with("default"))
        .expect("a default row");
    assert!(
        default_row.contains("Cert Chain")
            && default_row.contains("ACTIVE")
            && default_row.contains(&server_serial),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ROOTCA") && l.contains(" CA ")),
        "{table}"
    );

    // Direct clients of the server Envoy: only the right CA *and* the right identity get in.
    let other_token = issue_token(&setup.state, "demo", "other", setup.path());
    let cases: Vec<(&str, Svid, bool)> = vec![
        (
            "mesh CA, client identity",
            mesh_svid(&setup, &setup.client_token, "direct-client"),
            true,
        ),
        (
            "another CA, client identity",
            foreign_svid(CLIENT_ID),
            false,
        ),
        (
            "mesh CA, another identity",
            mesh_svid(&setup, &other_token, "direct-other"),
            false,
        ),
    ];
    for (what, svid, allowed) in cases {
        let got = mtls_get(pair.server_port, svid, &setup.root()).await;
        if allowed {
            assert_eq!(got, Ok(200), "{what}");
        } else {
            assert!(got.is_err(), "{what}: must be refused, got {got:?}");
        }
    }
    let (_, stats) = pair
        .server_envoy
        .admin_get("/stats?filter=ssl.fail_verify")
        .await;
    let stat = |name: &str| -> u64 {
        stats
            .lines()
            .filter(|l| l.starts_with("listener.") && l.contains(name))
            .filter_map(|l| l.rsplit_once(": ")?.1.trim().parse::<u64>().ok())
            .sum()
    };
    assert!(
        stat("ssl.fail_verify_error") >= 1,
        "unknown CA not counted:\n{stats}"
    );
    assert!(
        stat("ssl.fail_verify_san") >= 1,
        "wrong SAN not counted:\n{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_traffic_drops_no_request() {
    let (setup, _ca) = Setup::new(true).await;
    let pair = Pair::start(&setup, &["--cert-ttl", "4s"]).await;
    pair.wait_live().await;

    let started = Instant::now();
    let (mut ok, mut failed) = (0u32, Vec::new());
    let mut seen: [(Vec<String>, BTreeSet<String>); 2] = Default::default();
    let mut issued: BTreeSet<String> = BTreeSet::new();
    let mut last_poll = Instant::now() - Duration::from_secs(1);
    loop {
        match pair.request().await {
            Ok((200, _)) => ok += 1,
            other => failed.push(format!("{:?}: {other:?}", started.elapsed())),
        }
        if last_poll.elapsed() >= Duration::from_millis(150) {
            last_poll = Instant::now();
            let [client_seen, server_seen] = &mut seen;
            for (agent, envoy, (order, all)) in [
                (&pair.client_agent, &pair.client_envoy, client_seen),
                (&pair.server_agent, &pair.server_envoy, server_seen),
            ] {
                if let Some(s) = agent.serial().await {
                    issued.insert(s);
                }
                for s in envoy.leaf_serials().await {
                    if all.insert(s.clone()) {
                        order.push(s);
                    }
                }
            }
            // Three rotations on both sides: four certificates each.
            if seen.iter().all(|(order, _)| order.len() >= 4) {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "fewer than 3 rotations in 60 s: client {:?}, server {:?}",
            seen[0].0,
            seen[1].0
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:#?}",
        failed.len(),
        ok as usize + failed.len()
    );
    assert!(ok >= 50, "only {ok} requests in {:?}", started.elapsed());
    for (order, _) in &seen {
        for serial in order {
            assert!(
                issued.contains(serial),
                "Envoy served {serial}, which the agent never reported"
            );
        }
    }
    // Every request opened its own upstream connection: each one was a TLS handshake with the
    // certificates of that moment.
    let handshakes = pair
        .client_envoy
        .stat("cluster.server-mtls.upstream_cx_total")
        .await;
    assert!(
        handshakes >= u64::from(ok),
        "{handshakes} upstream connections for {ok} requests"
    );
    let rotations = pair
        .server_agent
        .metric("palisade_agent_cert_rotations_total")
        .await;
    assert!(rotations >= 3.0, "agent counted {rotations} rotations");
    eprintln!(
        "{ok} requests, 0 failed, over {:?}; client serials {:?}; server serials {:?}",
        started.elapsed(),
        seen[0].0,
        seen[1].0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_started_before_the_ca_retries_and_envoy_waits_for_the_cert() {
    let (setup, ca) = Setup::new(false).await;
    assert!(ca.is_none());
    let pair = Pair::start(&setup, &[]).await;

    // No CA: the agents retry, Envoy's listeners keep warming, nothing is served.
    wait_for(
        "connection failures to be counted",
        Duration::from_secs(15),
        async || {
            let n = pair
                .server_agent
                .metric("palisade_agent_cert_failures_total{reason=\"connect\"}")
                .await;
            (n >= 2.0).then_some(())
        },
    )
    .await;
    assert!(!pair.server_envoy.live().await);
    assert!(pair.server_envoy.leaf_serials().await.is_empty());
    let certs = pair.server_agent.certs().await;
    assert_eq!(certs["status"], "PENDING", "{certs}");
    assert_eq!(certs["secrets"][0]["status"], "WARMING", "{certs}");
    assert!(
        certs["last_error"]
            .as_str()
            .unwrap()
            .contains(&setup.ca_addr()),
        "{certs}"
    );
    assert!(!matches!(pair.request().await, Ok((200, _))));
    assert!(
        pair.server_agent
            .proc
            .stderr_text()
            .contains("cannot get a workload certificate yet"),
        "the failure is logged"
    );

    // The CA comes up: certificates arrive, Envoy goes live, traffic flows.
    let _ca = setup.start_ca("controlplane-late").await;
    pair.wait_live().await;
    let serial = pair.server_agent.wait_for_cert().await;
    assert_eq!(pair.server_envoy.leaf_serials().await, vec![serial]);
    pair.assert_request_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_outage_mid_life_keeps_the_cert_served_until_renewal_succeeds() {
    let (setup, ca) = Setup::new(true).await;
    let mut ca = ca.unwrap();
    // Renewal due after about 7.5 s; the certificate lasts 15 s.
    let pair = Pair::start(&setup, &["--cert-ttl", "15s"]).await;
    pair.wait_live().await;
    pair.assert_request_ok().await;
    let first = pair.server_agent.wait_for_cert().await;
    ca.proc.stop();

    let failures = "palisade_agent_cert_failures_total{reason=\"connect\"}";
    wait_for("renewal failures", Duration::from_secs(15), async || {
        (pair.server_agent.metric(failures).await >= 2.0).then_some(())
    })
    .await;
    // The CA is down, the certificate still valid: still served, traffic unaffected.
    let certs = pair.server_agent.certs().await;
    assert_eq!(certs["status"], "ACTIVE", "{certs}");
    assert!(certs["last_error"].is_string(), "{certs}");
    assert_eq!(
        pair.server_agent.serial().await.as_deref(),
        Some(first.as_str())
    );
    assert_eq!(pair.server_envoy.leaf_serials().await, vec![first.clone()]);
    for _ in 0..5 {
        pair.assert_request_ok().await;
    }
    assert!(
        pair.server_agent
            .proc
            .stderr_text()
            .contains("cannot renew the workload certificate; the current one is still served"),
        "the failures are logged"
    );

    // The CA returns before the certificate expires: the next retry renews it.
    let _ca = setup.start_ca("controlplane-again").await;
    let renewed = wait_for(
        "renewal after the CA returns",
        Duration::from_secs(10),
        async || pair.server_agent.serial().await.filter(|s| *s != first),
    )
    .await;
    wait_for(
        "Envoy to serve the renewed certificate",
        Duration::from_secs(10),
        async || {
            pair.server_envoy
                .leaf_serials()
                .await
                .contains(&renewed)
                .then_some(())
        },
    )
    .await;
    pair.assert_request_ok().await;
    assert!(pair.server_agent.metric(failures).await >= 2.0);
    assert_eq!(pair.server_agent.certs().await["status"], "ACTIVE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_problems_name_the_file() {
    let (setup, ca) = Setup::new(true).await;
    let _ca = ca.unwrap();

    // At start-up: the agent refuses to start and says which file and why.
    let missing = setup.path().join("no-such-token");
    let garbage = setup.path().join("garbage-token");
    std::fs::write(&garbage, "not a jwt\n").unwrap();
    let a_directory = setup.path().join("token-dir");
    std::fs::create_dir(&a_directory).unwrap();
    let cases: [(&Path, &str); 3] = [
        (&missing, "No such file"),
        (&a_directory, "directory"),
        (&garbage, "does not hold a usable service-account token"),
    ];
    for (token, reason) in cases {
        let out = Command::new(PALISADE)
            .args(["agent", "--ca-addr", &setup.ca_addr(), "--ca-root"])
            .arg(setup.root())
            .arg("--token-file")
            .arg(token)
            .arg("--sds-socket")
            .arg(setup.path().join("unused.sock"))
            .args(["--admin", "127.0.0.1:0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(&token.display().to_string()), "{stderr}");
        assert!(stderr.contains(reason), "{stderr}");
    }

    // Mid-life: the token disappears; renewal fails naming the file, and recovers when the
    // token is back.
    let token = setup.path().join("rotating.token");
    std::fs::copy(&setup.client_token, &token).unwrap();
    let agent = setup
        .agent("agent-token", &token, &["--cert-ttl", "8s"])
        .await;
    let first = agent.wait_for_cert().await;
    let moved = setup.path().join("rotating.token.away");
    std::fs::rename(&token, &moved).unwrap();
    wait_for("a token failure", Duration::from_secs(10), async || {
        (agent
            .metric("palisade_agent_cert_failures_total{reason=\"token\"}")
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    let certs = agent.certs().await;
    let error = certs["last_error"].as_str().unwrap();
    assert!(error.contains(&token.display().to_string()), "{error}");
    assert!(
        agent
            .proc
            .stderr_text()
            .contains(&format!("cannot read token file {}", token.display()))
    );
    std::fs::rename(&moved, &token).unwrap();
    wait_for(
        "renewal with the token back",
        Duration::from_secs(10),
        async || agent.serial().await.filter(|s| *s != first),
    )
    .await;
}
