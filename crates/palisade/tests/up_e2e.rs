//! `palisade up` with real processes: the README's bookinfo walkthrough, run command by command
//! from README.md itself, and a mesh that loses a sidecar and its control plane while requests
//! flow and recovers on its own.
//!
//! Each test runs a copy of `examples/bookinfo` with the workload addresses moved from
//! 127.0.10.x to a range of its own, so tests never collide with each other or with a mesh a
//! developer runs by hand.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_mesh::{PALISADE, http_get, read_lossy, wait_for};

const EXAMPLE_PREFIX: &str = "127.0.10.";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

/// Copies `examples/bookinfo` to `dst`, moving the workload addresses to `prefix`.
fn copy_example(dst: &Path, prefix: &str) {
    fn copy(src: &Path, dst: &Path, prefix: &str) {
        std::fs::create_dir_all(dst).unwrap();
        for entry in std::fs::read_dir(src).unwrap() {
            let entry = entry.unwrap();
            let to = dst.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &to, prefix);
            } else {
                let text = std::fs::read_to_string(entry.path()).unwrap();
                std::fs::write(to, text.replace(EXAMPLE_PREFIX, prefix)).unwrap();
            }
        }
    }
    copy(&repo_root().join("examples/bookinfo"), dst, prefix);
}

/// `palisade up DIR`; stopped with SIGTERM (as Ctrl-C would) when dropped.
struct Up {
    child: Child,
    stderr: PathBuf,
    stdout: PathBuf,
    state: PathBuf,
}

impl Up {
    async fn start(dir: &Path, state: Option<&Path>, logs: &Path) -> Self {
        let stdout = logs.join("up.out");
        let stderr = logs.join("up.err");
        let mut cmd = Command::new(PALISADE);
        cmd.arg("up").arg(dir);
        if let Some(s) = state {
            cmd.arg("--state").arg(s);
        }
        let child = cmd
            .env_remove("RUST_LOG")
            .env_remove("PALISADE_LOG")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let state = match state {
            Some(s) => s.to_owned(),
            None => palisade::cmd::up::default_state_dir(dir),
        };
        let mut up = Self {
            child,
            stderr,
            stdout,
            state,
        };
        let file = up.state.join("up.json");
        wait_for(
            "up.json (every sidecar ready)",
            Duration::from_secs(40),
            async || {
                assert!(
                    matches!(up.child.try_wait(), Ok(None)),
                    "palisade up exited:\n{}",
                    up.stderr_text()
                );
                file.is_file().then_some(())
            },
        )
        .await;
        up
    }

    fn stderr_text(&self) -> String {
        read_lossy(&self.stderr)
    }

    fn pid_of(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.state.join("run").join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Every child process `up` reports running now.
    fn child_pids(&self) -> Vec<u32> {
        std::fs::read_dir(self.state.join("run"))
            .unwrap()
            .filter_map(|e| {
                let p = e.ok()?.path();
                if p.extension()? != "pid" {
                    return None;
                }
                std::fs::read_to_string(p).ok()?.trim().parse().ok()
            })
            .collect()
    }

    /// SIGTERM, as a service manager (or Ctrl-C) would; returns whether `up` exited in time.
    fn stop(&mut self) -> bool {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return true;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let pids = self.child_pids();
        if !self.stop() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Never leave a child behind, even when `up` failed to stop them.
        for pid in pids {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
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

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purposes; /proc/PID/stat says so in field 3.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// One walkthrough command and what the README says it gives.
#[derive(Debug)]
struct Step {
    command: String,
    expect: Expect,
}

#[derive(Debug)]
enum Expect {
    /// The last line of the output is this HTTP status (`curl -w '%{http_code}'`).
    Status(String),
    /// The command succeeds and its output contains this text.
    Contains(String),
}

/// The `curl` and `palisade` commands of README.md's walkthrough, with their `# => ...` results.
fn walkthrough() -> (String, Vec<Step>) {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let begin = readme
        .find("<!-- walkthrough:begin -->")
        .expect("begin marker");
    let end = readme.find("<!-- walkthrough:end -->").expect("end marker");
    let section = &readme[begin..end];
    let mut steps = Vec::new();
    let mut in_code = false;
    let mut first = None;
    for line in section.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if !in_code || t.starts_with('#') || t.is_empty() {
            continue;
        }
        if first.is_none() {
            first = Some(t.to_owned());
        }
        if !(t.starts_with("curl ") || t.starts_with("palisade ")) {
            continue;
        }
        let (command, expect) = t
            .split_once("# =>")
            .unwrap_or_else(|| panic!("README command without a documented result: {t}"));
        let expect = expect.trim();
        let expect = if let Some(text) = expect.strip_prefix('"').and_then(|e| e.strip_suffix('"'))
        {
            Expect::Contains(text.replace("\\\"", "\""))
        } else {
            assert!(
                expect.len() == 3 && expect.chars().all(|c| c.is_ascii_digit()),
                "{t}: expected a status or a quoted text"
            );
            Expect::Status(expect.to_owned())
        };
        steps.push(Step {
            command: command.trim().to_owned(),
            expect,
        });
    }
    (first.expect("a first command"), steps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_gives_the_documented_results() {
    let (first, steps) = walkthrough();
    assert_eq!(
        first, "cargo run --release -- up examples/bookinfo",
        "the walkthrough starts with the example"
    );
    assert!(steps.len() >= 10, "{steps:?}");
    let statuses: Vec<&str> = steps
        .iter()
        .filter_map(|s| match &s.expect {
            Expect::Status(s) => Some(s.as_str()),
            Expect::Contains(_) => None,
        })
        .collect();
    assert!(
        statuses.contains(&"200") && statuses.contains(&"403"),
        "{statuses:?}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let prefix = "127.0.20.";
    let dir = tmp.path().join("bookinfo");
    copy_example(&dir, prefix);
    // The default state directory, as the README's users get it (removed at the end).
    let state = palisade::cmd::up::default_state_dir(&dir);
    let _ = std::fs::remove_dir_all(&state);
    let up = Up::start(&dir, None, tmp.path()).await;

    let palisade_prefix = format!("{PALISADE} ");
    for step in &steps {
        let command = step
            .command
            .replace(EXAMPLE_PREFIX, prefix)
            .replace("examples/bookinfo", dir.to_str().unwrap());
        let command = match command.strip_prefix("palisade ") {
            Some(rest) => format!("{palisade_prefix}{rest}"),
            None => command,
        };
        let out = Command::new("sh")
            .args(["-c", &command])
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let context = || {
            format!(
                "README step: {}\nran: {command}\nexit: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
                step.command,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        };
        match &step.expect {
            Expect::Status(want) => {
                let got = stdout.lines().rev().find(|l| !l.trim().is_empty());
                assert_eq!(got, Some(want.as_str()), "{}", context());
            }
            Expect::Contains(text) => {
                assert!(out.status.success(), "{}", context());
                assert!(stdout.contains(text.as_str()), "{}", context());
            }
        }
    }

    // The README's claims beyond the status codes: who the callee saw, and the deny log.
    let (status, body) = http_get(
        &format!("{prefix}1:9080"),
        "/call?url=http://reviews.backend.svc:9080/reviews/1",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        echo["caller"],
        "spiffe://cluster.local/ns/frontend/sa/bookinfo-productpage"
    );
    assert!(
        echo["app"]
            .as_str()
            .unwrap()
            .starts_with("backend/reviews-v")
    );
    let log = read_lossy(&state.join("logs/sidecar-backend-ratings.log"));
    assert!(
        log.lines()
            .any(|l| l.contains("enforced denied") && l.contains("bookinfo-productpage")),
        "{log}"
    );

    // details is served by a real Envoy (the example asks for one, and the test machine has
    // it: scripts/install-envoy.sh), beside its agent; the walkthrough above went through it.
    let up_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("up.json")).unwrap()).unwrap();
    let details = up_json["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workload"] == "backend/details")
        .unwrap();
    assert_eq!(details["proxy"], "envoy", "{details}");
    let (status, ready) = http_get(&format!("{prefix}2:15000"), "/ready")
        .await
        .unwrap();
    assert_eq!(
        (status, ready.trim()),
        (200, "LIVE"),
        "Envoy's admin answers"
    );

    // Ctrl-C/SIGTERM stops every process `up` started.
    let mut up = up;
    let pids = up.child_pids();
    assert_eq!(
        pids.len(),
        1 + 5 + 1 + 5,
        "control plane, 5 sidecars (one an Envoy), the Envoy's agent, 5 demo apps"
    );
    assert!(up.stop(), "up did not stop within 10 s");
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived `palisade up`");
    }
    assert!(!state.join("up.json").exists());
    drop(up);
    let _ = std::fs::remove_dir_all(&state);
}

/// One request through productpage to reviews; `None` when it got no HTTP answer at all.
async fn productpage_to_reviews(prefix: &str) -> Option<u16> {
    let addr = format!("{prefix}1:9080");
    let fut = http_get(&addr, "/call?url=http://reviews.backend.svc:9080/reviews/1");
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(Ok((status, _))) => Some(status),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_sidecar_and_the_control_plane_dying_under_traffic() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = "127.0.21.";
    let dir = tmp.path().join("bookinfo");
    copy_example(&dir, prefix);
    let state = tmp.path().join("state");
    let mut up = Up::start(&dir, Some(&state), tmp.path()).await;

    // Requests flow all along: (time, status).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Option<u16>)>();
    let load = tokio::spawn({
        let prefix = prefix.to_owned();
        async move {
            loop {
                let s = productpage_to_reviews(&prefix).await;
                if tx.send((Instant::now(), s)).is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let mut seen: Vec<(Instant, Option<u16>)> = Vec::new();
    let drain = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<_>, seen: &mut Vec<_>| {
        while let Ok(x) = rx.try_recv() {
            seen.push(x);
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. The control plane dies: established traffic does not notice; `up` restarts it.
    let cp = up.pid_of("controlplane").unwrap();
    let cp_killed = Instant::now();
    Command::new("kill")
        .args(["-KILL", &cp.to_string()])
        .status()
        .unwrap();
    let new_cp = wait_for("a new control plane", Duration::from_secs(15), async || {
        up.pid_of("controlplane").filter(|p| *p != cp)
    })
    .await;
    assert!(alive(new_cp));
    tokio::time::sleep(Duration::from_millis(500)).await;
    drain(&mut rx, &mut seen);
    let during_cp_restart: Vec<_> = seen.iter().filter(|(t, _)| *t > cp_killed).collect();
    assert!(during_cp_restart.len() >= 5, "{during_cp_restart:?}");
    assert!(
        during_cp_restart.iter().all(|(_, s)| *s == Some(200)),
        "traffic failed while the control plane restarted: {during_cp_restart:?}"
    );

    // 2. A destination sidecar dies: `up` restarts it (new certificate from the restarted CA,
    // config from the restarted control plane) and traffic recovers without anyone acting.
    let sidecar = up.pid_of("sidecar-backend-reviews-v1").unwrap();
    let ready = state.join("run/backend-reviews-v1.ready");
    assert!(ready.is_file());
    Command::new("kill")
        .args(["-KILL", &sidecar.to_string()])
        .status()
        .unwrap();
    let new_sidecar = wait_for(
        "a new reviews-v1 sidecar",
        Duration::from_secs(15),
        async || {
            up.pid_of("sidecar-backend-reviews-v1")
                .filter(|p| *p != sidecar)
        },
    )
    .await;
    wait_for(
        "the new sidecar ready",
        Duration::from_secs(20),
        async || ready.is_file().then_some(()),
    )
    .await;
    assert!(alive(new_sidecar));
    let admin = format!("{prefix}3:15000");
    let (status, certs) = http_get(&admin, "/certs").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        certs.contains("spiffe://cluster.local/ns/backend/sa/bookinfo-reviews"),
        "{certs}"
    );

    // After recovery every request succeeds, on both versions.
    let recovered = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    drain(&mut rx, &mut seen);
    let after: Vec<_> = seen.iter().filter(|(t, _)| *t > recovered).collect();
    assert!(after.len() >= 20, "{after:?}");
    assert!(
        after.iter().all(|(_, s)| *s == Some(200)),
        "requests failed after recovery: {after:?}"
    );
    // No allowed request was ever denied, before, during or after the failures.
    assert!(
        seen.iter().all(|(_, s)| *s != Some(403)),
        "an allowed request was denied: {seen:?}"
    );
    let (_, stats) = http_get(&admin, "/stats").await.unwrap();
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("palisade_rbac_decisions_total") && l.contains("allowed")),
        "the restarted reviews-v1 serves requests again:\n{stats}"
    );

    // 3. A broken policy edit is reported by `up` and ignored: decisions stay as they were.
    std::fs::write(
        dir.join("broken.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: broken, namespace: backend}\nspec: {action: MAYBE}\n",
    )
    .unwrap();
    wait_for(
        "up to report the rejected edit",
        Duration::from_secs(10),
        async || {
            let err = up.stderr_text();
            (err.contains("[control plane]") && err.contains("rejected")).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(productpage_to_reviews(prefix).await, Some(200));
    let (status, _) = http_get(
        &format!("{prefix}1:9080"),
        "/call?url=http://ratings.backend.svc:9080/ratings/1",
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "the last good policy stays in force");

    let err = up.stderr_text();
    for needle in [
        "[control plane] exited (killed by signal 9)",
        "[control plane] restarted",
        "[sidecar backend/reviews-v1] exited (killed by signal 9)",
        "[sidecar backend/reviews-v1] restarted",
    ] {
        assert!(err.contains(needle), "up did not report {needle:?}:\n{err}");
    }
    load.abort();
    let pids = up.child_pids();
    assert!(up.stop());
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived `palisade up`");
    }
}

#[test]
fn an_invalid_directory_reports_every_error_and_starts_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bookinfo");
    copy_example(&dir, "127.0.22.");
    // Two mistakes in two files: both are reported, in one run.
    std::fs::write(
        dir.join("bad-1.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad-action, namespace: backend}\nspec: {action: MAYBE}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("bad-2.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: bad-mode, namespace: backend}\nspec: {mtls: {mode: SOMETIMES}}\n",
    )
    .unwrap();
    let state = tmp.path().join("state");
    let out = Command::new(PALISADE)
        .arg("up")
        .arg(&dir)
        .arg("--state")
        .arg(&state)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for needle in ["bad-1.yaml", "MAYBE", "bad-2.yaml", "SOMETIMES"] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
    assert!(!state.join("run").exists(), "nothing was started");
}
