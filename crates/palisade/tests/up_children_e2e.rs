//! `palisade up`'s children with real processes:
//!
//! - none outlives `up`, even when `up` is SIGKILLed and so cannot stop them itself (each child
//!   sets Linux's parent-death signal);
//! - the sidecars run the lean `palisade-sidecar` binary when it sits next to `palisade`, and
//!   `palisade sidecar` (saying why) when it does not, as after `cargo run`.
//!
//! Workload addresses: 127.0.63.x.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_mesh::{PALISADE, read_lossy, wait_for};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

/// Copies `examples/bookinfo` to `dst` with the workloads on 127.0.63.x.
fn copy_bookinfo(dst: &Path) {
    fn copy(src: &Path, dst: &Path) {
        std::fs::create_dir_all(dst).unwrap();
        for entry in std::fs::read_dir(src).unwrap() {
            let entry = entry.unwrap();
            let to = dst.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &to);
            } else {
                let text = std::fs::read_to_string(entry.path()).unwrap();
                std::fs::write(to, text.replace("127.0.10.", "127.0.63.")).unwrap();
            }
        }
    }
    copy(&repo_root().join("examples/bookinfo"), dst);
}

/// A process as seen in /proc: its start time tells it apart from a later one with the same
/// pid.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Proc {
    pid: u32,
    start: u64,
    cmdline: String,
}

/// (state, start time) from /proc/PID/stat.
fn stat(pid: u32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ")".
    let (_, rest) = s.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split(' ').collect();
    // Field 3 (state) is rest[0]; field 22 (starttime) is rest[19].
    Some((
        fields.first()?.chars().next()?,
        fields.get(19)?.parse().ok()?,
    ))
}

impl Proc {
    fn of(pid: u32) -> Option<Self> {
        let (_, start) = stat(pid)?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()?
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        Some(Self {
            pid,
            start,
            cmdline,
        })
    }

    /// Still this process, and not a zombie (a zombie is dead for our purposes).
    fn alive(&self) -> bool {
        stat(self.pid).is_some_and(|(state, start)| start == self.start && state != 'Z')
    }

    fn exe(&self) -> PathBuf {
        std::fs::read_link(format!("/proc/{}/exe", self.pid)).unwrap()
    }
}

/// `palisade up` and the children it reported; every one of them is SIGKILLed when dropped,
/// whatever the test did.
struct Up {
    child: Child,
    state: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    children: Vec<Proc>,
}

impl Up {
    /// Starts `exe up dir` and waits until every sidecar is ready (up.json is written).
    async fn start(exe: &Path, dir: &Path, work: &Path) -> Self {
        let state = work.join("state");
        let stdout = work.join("up.out");
        let stderr = work.join("up.err");
        let child = Command::new(exe)
            .arg("up")
            .arg(dir)
            .arg("--state")
            .arg(&state)
            .env_remove("RUST_LOG")
            .env_remove("PALISADE_LOG")
            // Palisade's own children only: Envoy (bookinfo's details asks for one) is not a
            // palisade binary and sets no parent-death signal; `up` then runs Palisade's
            // sidecar in its place.
            .env("PALISADE_ENVOY", "/nonexistent/envoy")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut up = Self {
            child,
            state,
            stdout,
            stderr,
            children: Vec::new(),
        };
        let file = up.state.join("up.json");
        wait_for(
            "up.json (every sidecar ready)",
            Duration::from_secs(90),
            async || {
                assert!(
                    matches!(up.child.try_wait(), Ok(None)),
                    "palisade up exited:\n{}",
                    read_lossy(&up.stderr)
                );
                file.is_file().then_some(())
            },
        )
        .await;
        up.children = up.pids().into_iter().filter_map(Proc::of).collect();
        up
    }

    /// The pids in STATE/run/NAME.pid, by name.
    fn pids_by_name(&self) -> Vec<(String, u32)> {
        std::fs::read_dir(self.state.join("run"))
            .unwrap()
            .filter_map(|e| {
                let p = e.ok()?.path();
                if p.extension()? != "pid" {
                    return None;
                }
                let name = p.file_stem()?.to_string_lossy().into_owned();
                let pid = std::fs::read_to_string(&p).ok()?.trim().parse().ok()?;
                Some((name, pid))
            })
            .collect()
    }

    fn pids(&self) -> Vec<u32> {
        self.pids_by_name().into_iter().map(|(_, p)| p).collect()
    }

    fn sidecars(&self) -> Vec<Proc> {
        self.pids_by_name()
            .into_iter()
            .filter(|(name, _)| name.starts_with("sidecar-"))
            .filter_map(|(_, pid)| Proc::of(pid))
            .collect()
    }

    fn stderr_text(&self) -> String {
        read_lossy(&self.stderr)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in &self.children {
            if p.alive() {
                let _ = Command::new("kill")
                    .args(["-KILL", &p.pid.to_string()])
                    .status();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "----- up stdout -----\n{}\n----- up stderr -----\n{}",
                read_lossy(&self.stdout),
                self.stderr_text()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_die_with_a_sigkilled_up_and_sidecars_run_the_lean_binary() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("bookinfo");
    copy_bookinfo(&dir);
    let mut up = Up::start(Path::new(PALISADE), &dir, work.path()).await;

    // 5 workloads: the control plane, 5 sidecars, 5 demo apps.
    assert_eq!(up.children.len(), 11, "{:?}", up.children);
    assert!(up.children.iter().all(Proc::alive), "{:?}", up.children);

    // `cargo test` builds both binaries side by side: the sidecars run the lean one.
    let lean = Path::new(PALISADE).with_file_name("palisade-sidecar");
    assert!(lean.is_file(), "{} was not built", lean.display());
    let sidecars = up.sidecars();
    assert_eq!(sidecars.len(), 5, "{sidecars:?}");
    for s in &sidecars {
        assert_eq!(s.exe(), lean.canonicalize().unwrap(), "{s:?}");
        assert!(s.cmdline.contains("--workload"), "{s:?}");
    }
    assert!(
        !up.stderr_text().contains("no palisade-sidecar"),
        "{}",
        up.stderr_text()
    );

    // SIGKILL: `up` gets no chance to stop anything; the kernel must.
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let survivors: Vec<&Proc> = up.children.iter().filter(|p| p.alive()).collect();
        if survivors.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "15 s after `up` was SIGKILLed, its children still run: {survivors:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A binary that is `palisade` and has no `palisade-sidecar` beside it, as `cargo run` leaves
/// it: a hard link in a directory of its own (a copy where links cannot be made). A symbolic
/// link would not do: the kernel resolves it, and `up` would find the real directory.
fn palisade_alone(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let exe = dir.join("palisade");
    if std::fs::hard_link(PALISADE, &exe).is_err() {
        std::fs::copy(PALISADE, &exe).unwrap();
    }
    exe
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_lean_binary_sidecars_run_palisade_sidecar_and_up_says_why() {
    // In the target directory: same file system as the binary, so the hard link works.
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let exe = palisade_alone(&work.path().join("bin"));
    let dir = work.path().join("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mesh.yaml"), "trustDomain: cluster.local\n").unwrap();
    std::fs::write(
        dir.join("workloads.yaml"),
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: web
  namespace: shop
  annotations: {palisade.dev/demo-app: echo}
spec:
  address: 127.0.63.20
  labels: {app: web}
  serviceAccount: web
  ports: {http: 8080}
"#,
    )
    .unwrap();
    let up = Up::start(&exe, &dir, work.path()).await;

    let err = up.stderr_text();
    let line = err
        .lines()
        .find(|l| l.contains("no") && l.contains("palisade-sidecar"))
        .unwrap_or_else(|| panic!("no line saying why:\n{err}"));
    assert!(
        line.contains("sidecar`") && line.contains("cargo run"),
        "{line}"
    );
    let sidecars = up.sidecars();
    assert_eq!(sidecars.len(), 1, "{sidecars:?}");
    let s = &sidecars[0];
    assert_eq!(s.exe(), exe, "{s:?}");
    assert!(
        s.cmdline.split(' ').nth(1) == Some("sidecar"),
        "not `palisade sidecar ...`: {s:?}"
    );
    // It works: ready (up.json was written) and serving its admin endpoint.
    let (status, _) = agent_mesh::http_get("127.0.63.20:15000", "/ready")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

/// Runs `cmd` with `PALISADE_PARENT_PID=named` until it prints `marker` on stdout (`Ok`) or
/// exits (`Err` with its code and stderr), within 20 s.
fn run_as_child_of(
    mut cmd: Command,
    named: u32,
    marker: &str,
) -> Result<(), (Option<i32>, String)> {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .env("PALISADE_PARENT_PID", named.to_string())
        .env_remove("RUST_LOG")
        .env_remove("PALISADE_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if read_lossy(&out).contains(marker) {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(());
        }
        if let Some(status) = child.try_wait().unwrap() {
            return Err((status.code(), read_lossy(&err)));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "neither {marker:?} nor an exit within 20 s:\n{}",
                read_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The race `up` cannot close itself: it dies after spawning a child and before the child set
/// the parent-death signal. The child then finds another parent than the `up` named, which is
/// gone, and exits at once instead of running unsupervised.
#[test]
fn a_child_whose_up_died_before_it_started_exits_at_once() {
    // A process id that was alive a moment ago and is gone now.
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let gone = gone.id();

    let mut echo = Command::new(PALISADE);
    echo.args(["echo", "--listen", "127.0.63.30:0"]);
    let (code, err) = run_as_child_of(echo, gone, "listening on").unwrap_err();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "palisade up (pid {gone}) exited before this process started"
        )),
        "{err}"
    );

    // The lean sidecar binary does the same, before it reads any of its arguments' files.
    let mut sidecar = Command::new(Path::new(PALISADE).with_file_name("palisade-sidecar"));
    sidecar.args([
        "--workload",
        "ns/w",
        "--ca-root",
        "/nonexistent/root.pem",
        "--token-file",
        "/nonexistent/token",
    ]);
    let (code, err) = run_as_child_of(sidecar, gone, "never printed").unwrap_err();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("exited before this process started"), "{err}");
}

/// A process that inherited the variable from a child of `up` (its parent is not the process
/// named, which lives on) is not `up`'s child: it runs normally.
#[test]
fn an_inherited_parent_pid_is_ignored() {
    let mut other = Command::new("sleep").arg("60").spawn().unwrap();
    let mut echo = Command::new(PALISADE);
    echo.args(["echo", "--listen", "127.0.63.31:0"]);
    let result = run_as_child_of(echo, other.id(), "listening on");
    let _ = other.kill();
    let _ = other.wait();
    result.unwrap();
}
