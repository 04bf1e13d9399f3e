//! Real processes for agent tests: the control plane, agents, tokens, a backend, and a tiny
//! HTTP/1.1 client. Every child is killed when its guard drops; its output is kept in files and
//! printed when a test fails.

#![allow(dead_code)]

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

pub const PALISADE: &str = env!("CARGO_BIN_EXE_palisade");

/// A child process that is killed (and its logs shown on failure) when dropped.
pub struct ChildGuard {
    pub name: String,
    child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout/stderr into `dir/<name>.out` and `.err`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Self {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Self {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stderr_text(&self) -> String {
        read_lossy(&self.stderr)
    }

    pub fn stdout_text(&self) -> String {
        read_lossy(&self.stdout)
    }

    /// Kills the process and waits for it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let tail = |s: String| {
                let lines: Vec<&str> = s.lines().collect();
                lines[lines.len().saturating_sub(40)..].join("\n")
            };
            eprintln!(
                "----- {} stdout -----\n{}\n----- {} stderr (last 40 lines) -----\n{}",
                self.name,
                tail(self.stdout_text()),
                self.name,
                tail(self.stderr_text())
            );
        }
    }
}

pub fn read_lossy(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over a fresh HTTP/1.1 connection; returns status and body.
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    parse_response(&raw)
}

/// Status and body of a raw HTTP/1.1 response (chunked bodies decoded).
pub fn parse_response(raw: &[u8]) -> std::io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let bad =
        |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{m}: {text:?}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A plain HTTP/1.1 backend on loopback. It answers every request with 200 and a body that
/// names the client identity Envoy forwarded (`x-forwarded-client-cert`).
pub struct Backend {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_backend_conn(stream));
            }
        });
        Self { addr, task }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_backend_conn(mut stream: TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Requests without bodies: a head ends with an empty line.
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let xfcc = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("x-forwarded-client-cert")
                    .then(|| v.trim().to_owned())
            })
            .unwrap_or_default();
        let body = format!("backend ok; xfcc={xfcc}\n");
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// `palisade controlplane` on a fixed loopback port (so it can be restarted at the same place).
pub struct ControlPlane {
    pub addr: String,
    pub state: PathBuf,
    pub proc: ChildGuard,
}

impl ControlPlane {
    pub async fn start(dir: &Path, state: &Path, port: u16, name: &str) -> Self {
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(PALISADE);
        cmd.args(["controlplane", "--state"]).arg(state).args([
            "--listen",
            &addr,
            "--admin",
            "127.0.0.1:0",
        ]);
        let mut proc = ChildGuard::spawn(name, cmd, dir);
        wait_for(
            "the control plane to listen",
            Duration::from_secs(30),
            async || {
                assert!(
                    proc.running(),
                    "control plane exited:\n{}",
                    proc.stderr_text()
                );
                proc.stdout_text().contains("CA listening on").then_some(())
            },
        )
        .await;
        Self {
            addr,
            state: state.to_owned(),
            proc,
        }
    }

    pub fn root(&self) -> PathBuf {
        self.state.join("root-cert.pem")
    }
}

/// `palisade token issue` into `dir/<sa>.token`.
pub fn issue_token(state: &Path, namespace: &str, sa: &str, dir: &Path) -> PathBuf {
    let out = Command::new(PALISADE)
        .args(["token", "issue", "--state"])
        .arg(state)
        .args([
            "--namespace",
            namespace,
            "--service-account",
            sa,
            "--ttl",
            "1h",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "token issue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join(format!("{sa}.token"));
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

/// A running `palisade agent`.
pub struct AgentProc {
    pub admin: String,
    pub sds: PathBuf,
    pub proc: ChildGuard,
}

impl AgentProc {
    pub async fn start(
        dir: &Path,
        name: &str,
        ca_addr: &str,
        root: &Path,
        token: &Path,
        extra: &[&str],
    ) -> Self {
        let sds = dir.join(format!("{name}.sock"));
        let ready = dir.join(format!("{name}.ready"));
        let mut cmd = Command::new(PALISADE);
        cmd.args(["agent", "--ca-addr", ca_addr, "--ca-root"])
            .arg(root)
            .arg("--token-file")
            .arg(token)
            .arg("--sds-socket")
            .arg(&sds)
            .args(["--admin", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .args(extra)
            .env("PALISADE_LOG", "info,palisade_agent=debug");
        let mut proc = ChildGuard::spawn(name, cmd, dir);
        let admin = wait_for(
            "the agent's ready file",
            Duration::from_secs(20),
            async || {
                assert!(proc.running(), "agent exited:\n{}", proc.stderr_text());
                let text = std::fs::read_to_string(&ready).ok()?;
                let addr = text.trim().to_owned();
                (!addr.is_empty()).then_some(addr)
            },
        )
        .await;
        Self { admin, sds, proc }
    }

    /// The agent's `/certs` document.
    pub async fn certs(&self) -> serde_json::Value {
        let (status, body) = http_get(&self.admin, "/certs").await.unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The serial of the served leaf, if any.
    pub async fn serial(&self) -> Option<String> {
        let certs = self.certs().await;
        certs["secrets"]
            .as_array()?
            .iter()
            .find(|s| s["resource_name"] == "default")?["serial_number"]
            .as_str()
            .map(str::to_owned)
    }

    /// Waits for the first certificate; returns its serial.
    pub async fn wait_for_cert(&self) -> String {
        wait_for(
            "the agent's first certificate",
            Duration::from_secs(30),
            async || self.serial().await,
        )
        .await
    }

    /// The value of one Prometheus sample line (`name{labels}`), 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (status, body) = http_get(&self.admin, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == sample).then(|| value.parse().ok())?
            })
            .unwrap_or(0.0)
    }
}
