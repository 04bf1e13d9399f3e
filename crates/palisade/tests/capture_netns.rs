//! Transparent capture end to end, in network namespaces these tests create and delete (a guard
//! deletes them, and kills what runs in them, even when a test fails).
//!
//! Three namespaces on one bridge (10.240.67.0/24): `hub` holds the bridge, the control plane
//! (10.240.67.1, which the sidecars reach by that address) and servers outside the mesh;
//! `client` (10.240.67.2) and `server` (10.240.67.3) are workloads of the mesh, each with
//! `palisade iptables install` and a `palisade sidecar --capture`. The applications know
//! nothing of the mesh: curl and bash's `/dev/tcp` call the server's address and port directly,
//! `palisade echo` and a Python TCP echo listen on their own ports.
//!
//! The sidecars run as uid/gid 1337 (setpriv), which the rules exempt, so that their own
//! connections (to the control plane, to peers, to their application) are not captured; the
//! applications and clients run as root, which is captured like any other uid.
//!
//! Needs root, `ip netns`, iptables, setpriv, curl, python3, bash and timeout. Without them the
//! test says why on stderr (past the test harness's capture) and passes without checking
//! anything: it never skips silently.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/netns.rs"]
mod netns;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use netns::{Netns, output_text, skip};

const PALISADE: &str = env!("CARGO_BIN_EXE_palisade");
const HUB: &str = "10.240.67.1";
const CLIENT: &str = "10.240.67.2";
const SERVER: &str = "10.240.67.3";
/// The sidecars' uid and gid (what `palisade iptables install` exempts by default).
const PROXY_ID: u32 = 1337;

/// Why this test cannot run here, if it cannot.
fn missing() -> Option<String> {
    netns::missing(
        &[
            "ss",
            "iptables",
            "iptables-restore",
            "iptables-save",
            "setpriv",
            "curl",
            "python3",
            "bash",
            "timeout",
        ],
        "bash scripts/install-test-deps.sh installs the test tools",
    )
}

impl Netns {
    /// A long-running process in this namespace, its output in `logs/<name>.log`.
    fn spawn(&self, logs: &Path, name: &str, args: &[&str]) -> Proc {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .command(args)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    /// `curl` from this namespace: the status code and the body.
    fn curl(&self, url: &str) -> (String, String) {
        self.curl_with(&[], url)
    }

    /// `curl` with extra options.
    fn curl_with(&self, options: &[&str], url: &str) -> (String, String) {
        let mut args = vec!["curl", "-s", "-m", "10", "-w", "\n%{http_code}"];
        args.extend_from_slice(options);
        args.push(url);
        let out = self.run(&args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match text.rsplit_once('\n') {
            Some((body, code)) => (code.to_owned(), body.to_owned()),
            None => (text, String::new()),
        }
    }

    /// One line over TCP from this namespace with bash's `/dev/tcp`: what came back (empty
    /// when the connection was closed without an answer).
    fn tcp_line(&self, host: &str, port: u16, line: &str) -> String {
        let script = format!(
            "exec 3<>/dev/tcp/{host}/{port} && printf '{line}\\n' >&3 && read -r -t 5 answer <&3; \
             printf '%s' \"$answer\""
        );
        let out = self.run(&["timeout", "10", "bash", "-c", &script]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A process, killed when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns `Some`, for at most `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The hub with its bridge, and the two workload namespaces plugged into it.
fn topology() -> Result<(Netns, Netns, Netns), String> {
    let hub = Netns::new("cap", "hub")?;
    let client = Netns::new("cap", "client")?;
    let server = Netns::new("cap", "server")?;
    hub.must(&["ip", "link", "add", "br0", "type", "bridge"]);
    hub.must(&["ip", "addr", "add", &format!("{HUB}/24"), "dev", "br0"]);
    hub.must(&["ip", "link", "set", "br0", "up"]);
    for (ns, addr, port) in [(&client, CLIENT, "vc"), (&server, SERVER, "vs")] {
        hub.must(&[
            "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        hub.must(&["ip", "link", "set", port, "master", "br0"]);
        hub.must(&["ip", "link", "set", port, "up"]);
        ns.must(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ns.must(&["ip", "link", "set", "eth0", "up"]);
    }
    Ok((hub, client, server))
}

const MESH_YAML: &str = "trustDomain: cluster.local\n";

const WORKLOADS: &str = "\
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: client, namespace: apps}
spec:
  address: 10.240.67.2
  labels: {app: client}
  serviceAccount: client
  ports: {http: 8080}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: server, namespace: apps}
spec:
  address: 10.240.67.3
  labels: {app: server}
  serviceAccount: server
  ports: {http: 8080, tcp-echo: 9000}
";
// (The server's second HTTP application, on 8081, is not declared: capture still serves it.)

/// STRICT everywhere; the server takes `GET /allowed/*` and TCP on 9000 from the client only.
const POLICIES: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-allow, namespace: apps}
spec:
  selector:
    matchLabels: {app: server}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/apps/sa/client]
    to:
    - operation:
        methods: [GET]
        paths: [/allowed/*]
  - from:
    - source:
        principals: [cluster.local/ns/apps/sa/client]
    to:
    - operation:
        ports: ['9000']
";

/// A line-echo server in Python, on every address of its namespace.
fn tcp_echo_script(port: u16) -> String {
    format!(
        "import socketserver\n\
         class H(socketserver.StreamRequestHandler):\n\
         \x20   def handle(self):\n\
         \x20       for line in self.rfile:\n\
         \x20           self.wfile.write(line)\n\
         socketserver.ThreadingTCPServer.allow_reuse_address = True\n\
         socketserver.ThreadingTCPServer(('0.0.0.0', {port}), H).serve_forever()\n"
    )
}

/// A packet sniffer in Python (an `AF_PACKET` socket on every interface of its namespace): it
/// prints `ready`, then appends each of the comma-separated markers to the file the first time
/// a frame carries it in the clear.
fn sniffer_script(markers: &str, out: &Path) -> String {
    format!(
        "import socket\n\
         markers = [m.encode() for m in {markers:?}.split(',')]\n\
         s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))\n\
         print('ready', flush=True)\n\
         seen = set()\n\
         while True:\n\
         \x20   data = s.recv(65535)\n\
         \x20   for m in markers:\n\
         \x20       if m in data and m not in seen:\n\
         \x20           seen.add(m)\n\
         \x20           with open({out:?}, 'a') as f:\n\
         \x20               f.write(m.decode() + '\\n')\n",
        out = out.display().to_string(),
    )
}

/// Everything a test needs, dropped in an order that stops processes before namespaces go.
struct World {
    _procs: Vec<Proc>,
    hub: Netns,
    client: Netns,
    server: Netns,
    dir: tempfile::TempDir,
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A sidecar's own directory, owned by its uid: its token, the mesh root, its ready file.
fn sidecar_dir(dir: &Path, state: &Path, name: &str, sa: &str) -> PathBuf {
    let own = dir.join(name);
    std::fs::create_dir_all(&own).unwrap();
    let token = Command::new(PALISADE)
        .args(["token", "issue", "--state"])
        .arg(state)
        .args([
            "--namespace",
            "apps",
            "--service-account",
            sa,
            "--ttl",
            "1h",
        ])
        .output()
        .unwrap();
    assert!(
        token.status.success(),
        "token issue: {}",
        output_text(&token)
    );
    std::fs::write(own.join("token"), &token.stdout).unwrap();
    std::fs::copy(state.join("root-cert.pem"), own.join("root-cert.pem")).unwrap();
    for entry in [own.clone(), own.join("token"), own.join("root-cert.pem")] {
        std::os::unix::fs::chown(&entry, Some(PROXY_ID), Some(PROXY_ID)).unwrap();
    }
    own
}

fn start(test: &str) -> Option<World> {
    if let Some(reason) = missing() {
        skip(test, &reason);
        return None;
    }
    let (hub, client, server) = match topology() {
        Ok(t) => t,
        Err(reason) => {
            skip(test, &reason);
            return None;
        }
    };
    let probe = client.run(&["iptables", "-t", "nat", "-S"]);
    if !probe.status.success() {
        skip(
            test,
            &format!(
                "this kernel does not take nat rules: {}",
                output_text(&probe)
            ),
        );
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    // The sidecars (uid 1337) reach their own directories inside.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let logs = dir.path().join("logs");
    let config = dir.path().join("mesh");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("mesh.yaml"), MESH_YAML).unwrap();
    std::fs::write(config.join("workloads.yaml"), WORKLOADS).unwrap();
    std::fs::write(config.join("policies.yaml"), POLICIES).unwrap();

    let mut procs = Vec::new();
    let ca = format!("{HUB}:15012");
    let xds = format!("{HUB}:15010");
    let mut cp = hub.spawn(
        &logs,
        "controlplane",
        &[
            PALISADE,
            "controlplane",
            "--state",
            state.to_str().unwrap(),
            "--listen",
            &ca,
            "--xds-listen",
            &xds,
            "--admin",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    wait_for("the control plane", Duration::from_secs(30), || {
        assert!(cp.running(), "control plane exited:\n{}", cp.log());
        let log = cp.log();
        (log.contains("CA listening on") && log.contains("ADS listening on")).then_some(())
    });
    procs.push(cp);

    // Outside the mesh: an HTTP server and a TCP echo on the hub.
    procs.push(hub.spawn(
        &logs,
        "outside-http",
        &[
            PALISADE,
            "echo",
            "--listen",
            &format!("{HUB}:8088"),
            "--name",
            "outside",
        ],
    ));
    procs.push(hub.spawn(
        &logs,
        "outside-tcp",
        &["python3", "-c", &tcp_echo_script(9009)],
    ));

    // The server's applications, on their own ports, as if no mesh existed.
    procs.push(server.spawn(
        &logs,
        "server-http",
        &[
            PALISADE,
            "echo",
            "--listen",
            "0.0.0.0:8080",
            "--name",
            "server",
        ],
    ));
    procs.push(server.spawn(
        &logs,
        "server-undeclared",
        &[
            PALISADE,
            "echo",
            "--listen",
            "0.0.0.0:8081",
            "--name",
            "undeclared",
        ],
    ));
    procs.push(server.spawn(
        &logs,
        "server-tcp",
        &["python3", "-c", &tcp_echo_script(9000)],
    ));

    for (ns, name, workload, sa) in [
        (&client, "client", "apps/client", "client"),
        (&server, "server", "apps/server", "server"),
    ] {
        let out = ns.run(&[PALISADE, "iptables", "install"]);
        assert!(
            out.status.success(),
            "iptables install in {name}: {}",
            output_text(&out)
        );
        let own = sidecar_dir(dir.path(), &state, &format!("sidecar-{name}"), sa);
        let ready = own.join("ready.json");
        let id = PROXY_ID.to_string();
        let mut sidecar = ns.spawn(
            &logs,
            &format!("sidecar-{name}"),
            &[
                "env",
                "PALISADE_LOG=info",
                "setpriv",
                &format!("--reuid={id}"),
                &format!("--regid={id}"),
                "--clear-groups",
                PALISADE,
                "sidecar",
                "--workload",
                workload,
                "--control-plane",
                &ca,
                "--xds-address",
                &xds,
                "--ca-root",
                own.join("root-cert.pem").to_str().unwrap(),
                "--token-file",
                own.join("token").to_str().unwrap(),
                "--admin",
                "127.0.0.1:15000",
                "--concurrency",
                "2",
                "--capture",
                "--ready-file",
                ready.to_str().unwrap(),
            ],
        );
        wait_for(
            &format!("the {name} sidecar to be ready"),
            Duration::from_secs(60),
            || {
                assert!(
                    sidecar.running(),
                    "sidecar {name} exited:\n{}",
                    sidecar.log()
                );
                ready.exists().then_some(())
            },
        );
        procs.push(sidecar);
    }
    // The applications answer on loopback (never captured).
    wait_for("the server's applications", Duration::from_secs(20), || {
        let (code, _) = server.curl("http://127.0.0.1:8080/");
        let (undeclared, _) = server.curl("http://127.0.0.1:8081/");
        (code == "200" && undeclared == "200" && server.tcp_line("127.0.0.1", 9000, "up") == "up")
            .then_some(())
    });
    wait_for("the outside servers", Duration::from_secs(20), || {
        let (code, _) = hub.curl(&format!("http://{HUB}:8088/"));
        (code == "200" && hub.tcp_line(HUB, 9009, "up") == "up").then_some(())
    });
    Some(World {
        _procs: procs,
        hub,
        client,
        server,
        dir,
    })
}

impl World {
    fn logs(&self) -> String {
        let mut all = String::new();
        for name in ["sidecar-client", "sidecar-server", "controlplane"] {
            let text = std::fs::read_to_string(self.dir.path().join(format!("logs/{name}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            all.push_str(&format!("--- {name} (last lines)\n"));
            for l in tail.into_iter().rev() {
                all.push_str(l);
                all.push('\n');
            }
        }
        all
    }

    fn set_outbound_policy(&self, mode: &str) {
        write_atomically(
            &self.dir.path().join("mesh/mesh.yaml"),
            &format!("{MESH_YAML}outboundTrafficPolicy: {{mode: {mode}}}\n"),
        );
    }
}

#[test]
fn captured_traffic_is_mutual_tls_authorized_and_passthrough_follows_the_mesh_policy() {
    let test = "captured_traffic_is_mutual_tls_authorized_and_passthrough_follows_the_mesh_policy";
    let Some(w) = start(test) else {
        return;
    };

    // An unmodified client calls the server's address: its sidecar sends it over mTLS, the
    // server's sidecar authorizes it, and the server app sees the caller's identity.
    let url = format!("http://{SERVER}:8080/allowed/one");
    let (code, body) = w.client.curl(&url);
    assert_eq!(code, "200", "{url}: {body}\n{}", w.logs());
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["app"], "server", "{body}");
    assert_eq!(
        json["caller"], "spiffe://cluster.local/ns/apps/sa/client",
        "{body}"
    );
    let xfcc = json["headers"]["x-forwarded-client-cert"].to_string();
    assert!(
        xfcc.contains("URI=spiffe://cluster.local/ns/apps/sa/client"),
        "{body}"
    );

    // What the policy does not allow is refused by the server's sidecar, as Envoy does.
    for (path, want) in [("/denied", "403"), ("/allowed/two", "200")] {
        let (code, body) = w.client.curl(&format!("http://{SERVER}:8080{path}"));
        assert_eq!(code, want, "{path}: {body}\n{}", w.logs());
        if want == "403" {
            assert_eq!(body, "RBAC: access denied");
        }
    }

    // HTTP/2 (prior knowledge, as gRPC clients speak it) is detected on captured connections too.
    let (code, body) = w.client.curl_with(
        &["--http2-prior-knowledge", "-H", "host: server.example"],
        &format!("http://{SERVER}:8080/allowed/h2"),
    );
    assert_eq!(code, "200", "{body}\n{}", w.logs());
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["caller"], "spiffe://cluster.local/ns/apps/sa/client");
    assert_eq!(
        json["headers"]["host"], "server.example",
        "the Host the application wrote: {body}"
    );

    // The server is STRICT: a plaintext client without a sidecar (the hub) is refused.
    let (code, _) = w.hub.curl(&format!("http://{SERVER}:8080/allowed/one"));
    assert_eq!(code, "000", "a plaintext caller reached a STRICT port");

    // TCP through capture, authorized by the caller's identity on port 9000.
    assert_eq!(
        w.client.tcp_line(SERVER, 9000, "hello over mtls"),
        "hello over mtls",
        "{}",
        w.logs()
    );

    // On the wire (every port of the bridge, in the hub) nothing of the mesh's traffic is in the
    // clear, while the passthrough to the hub is: the sniffer sees what is there to see.
    let sniffed = w.dir.path().join("sniffed");
    let mut sniffer = w.hub.spawn(
        &w.dir.path().join("logs"),
        "sniffer",
        &[
            "python3",
            "-c",
            &sniffer_script("CANARYMTLS,CANARYTCP,CANARYPLAIN", &sniffed),
        ],
    );
    wait_for("the sniffer", Duration::from_secs(10), || {
        assert!(sniffer.running(), "sniffer exited:\n{}", sniffer.log());
        sniffer.log().contains("ready").then_some(())
    });
    let (code, body) = w
        .client
        .curl(&format!("http://{SERVER}:8080/allowed/CANARYMTLS"));
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("CANARYMTLS"), "{body}");
    assert_eq!(w.client.tcp_line(SERVER, 9000, "CANARYTCP"), "CANARYTCP");
    let (code, body) = w.client.curl(&format!("http://{HUB}:8088/CANARYPLAIN"));
    assert_eq!(code, "200", "{body}");
    let seen = wait_for(
        "the sniffer to see the plaintext",
        Duration::from_secs(10),
        || {
            let seen = std::fs::read_to_string(&sniffed).unwrap_or_default();
            seen.contains("CANARYPLAIN").then_some(seen)
        },
    );
    assert!(
        !seen.contains("CANARYMTLS") && !seen.contains("CANARYTCP"),
        "mesh traffic in the clear on the wire: {seen}"
    );
    drop(sniffer);

    // Outside the mesh, ALLOW_ANY (the default): passed through as it is.
    let (code, body) = w.client.curl(&format!("http://{HUB}:8088/out"));
    assert_eq!(code, "200", "{body}\n{}", w.logs());
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["app"], "outside");
    assert_eq!(json["caller"], serde_json::Value::Null, "{body}");
    assert_eq!(w.client.tcp_line(HUB, 9009, "plain"), "plain");

    // REGISTRY_ONLY: refused once the sidecar has the new mesh config (HTTP gets 502, as from
    // Envoy's BlackHoleCluster; TCP is closed). The mesh still works.
    w.set_outbound_policy("REGISTRY_ONLY");
    wait_for("REGISTRY_ONLY to apply", Duration::from_secs(30), || {
        let (code, _) = w.client.curl(&format!("http://{HUB}:8088/out"));
        (code == "502").then_some(())
    });
    assert_eq!(w.client.tcp_line(HUB, 9009, "plain"), "");
    let (code, body) = w
        .client
        .curl(&format!("http://{SERVER}:8080/allowed/three"));
    assert_eq!(code, "200", "{body}\n{}", w.logs());

    // Back to ALLOW_ANY.
    w.set_outbound_policy("ALLOW_ANY");
    wait_for("ALLOW_ANY to apply", Duration::from_secs(30), || {
        let (code, _) = w.client.curl(&format!("http://{HUB}:8088/out"));
        (code == "200").then_some(())
    });

    // A port the server does not declare: served all the same, under the workload's STRICT
    // mode and its policy (the rule for paths has no port).
    let (code, body) = w.client.curl(&format!("http://{SERVER}:8081/allowed/x"));
    assert_eq!(code, "200", "{body}\n{}", w.logs());
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["app"], "undeclared", "{body}");
    assert_eq!(json["caller"], "spiffe://cluster.local/ns/apps/sa/client");
    let (code, _) = w.client.curl(&format!("http://{SERVER}:8081/denied"));
    assert_eq!(code, "403");
    let (code, _) = w.hub.curl(&format!("http://{SERVER}:8081/allowed/x"));
    assert_eq!(
        code, "000",
        "a plaintext caller reached an undeclared STRICT port"
    );

    // Something listening on 127.0.0.1 only (here the server sidecar's admin port) stays private:
    // the application is dialed at the original destination, as Istio does since 1.10.
    let (code, body) = w
        .client
        .curl(&format!("http://{SERVER}:15000/allowed/stats"));
    assert_eq!(code, "503", "a loopback-only port was reached: {body}");

    // The server's sidecar dials its application from 127.0.0.6, at the workload's address
    // (pooled connections stay open).
    let app = format!("{SERVER}:8080");
    let sockets = w
        .server
        .must(&["ss", "-Htn", "state", "established", "dst", &app]);
    assert!(
        !sockets.is_empty() && sockets.lines().all(|l| l.contains("127.0.0.6:")),
        "{sockets}"
    );

    // What the sidecar says of itself.
    let described = w.server.must(&[
        PALISADE,
        "describe",
        "workload",
        "apps/server",
        "--admin",
        "127.0.0.1:15000",
    ]);
    assert!(
        described.contains(
            "capture:        inbound port 15006, outbound port 15001, outboundTrafficPolicy ALLOW_ANY"
        ) && !described.contains("not listening"),
        "{described}"
    );

    // What the client's sidecar counted; and nothing of the sidecars' own came back to them.
    let (_, stats) = w.client.curl("http://127.0.0.1:15000/stats");
    for needle in [
        "protocol=\"passthrough\"",
        "protocol=\"blackhole\"",
        "protocol=\"captured_tcp\"",
    ] {
        assert!(
            stats
                .lines()
                .any(|l| l.starts_with("palisade_connections_total") && l.contains(needle)),
            "{needle} not counted:\n{stats}"
        );
    }
    for name in ["sidecar-client", "sidecar-server"] {
        let log = std::fs::read_to_string(w.dir.path().join(format!("logs/{name}.log"))).unwrap();
        assert!(
            !log.contains("own connection was captured"),
            "{name}:\n{log}"
        );
    }
}
