//! Mesh DNS end to end, in network namespaces this test creates and deletes (a guard deletes
//! them, and kills what runs in them, even when the test fails).
//!
//! Three namespaces on one bridge (10.240.68.0/24): `hub` holds the bridge, the control plane
//! (10.240.68.1) and the "host's" upstream DNS server (a small Python server on
//! 10.240.68.1:53, UDP and TCP, that knows one name and logs every question it gets); `client`
//! (10.240.68.2) runs `palisade iptables install --redirect-dns` and `palisade sidecar
//! --capture`, with a resolv.conf naming the hub's server (`/etc/netns/NAME/resolv.conf`, which
//! `ip netns exec` mounts over /etc/resolv.conf); `server` (10.240.68.3) is a captured workload
//! that a ServiceEntry without `addresses` selects, so its host gets a 240.240.0.0/16 VIP.
//!
//! Unmodified clients (glibc's resolver through `getent`, curl) in `client`: the mesh names
//! resolve to their VIP or declared address without reaching the upstream server, over UDP and
//! over TCP (`options use-vc`); curl reaches the VIP by name through the sidecars with mutual
//! TLS; a name outside the mesh resolves as the upstream server says, and an unknown one fails
//! as it says.
//!
//! Needs root, `ip netns`, iptables, setpriv, curl, getent and python3. Without them the test
//! says why on stderr (past the test harness's capture) and passes without checking anything:
//! it never skips silently.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/netns.rs"]
mod netns;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use netns::{Netns, output_text, skip};

const PALISADE: &str = env!("CARGO_BIN_EXE_palisade");
const HUB: &str = "10.240.68.1";
const CLIENT: &str = "10.240.68.2";
const SERVER: &str = "10.240.68.3";
/// The declared address of the `pinned` ServiceEntry (routed like a VIP, by capture).
const PINNED: &str = "10.240.68.200";
/// What the upstream server answers for its one name.
const OUTSIDE_NAME: &str = "outside.example.test";
const OUTSIDE_ADDR: &str = "192.0.2.77";
const PROXY_ID: u32 = 1337;

fn missing() -> Option<String> {
    netns::missing(
        &[
            "iptables",
            "iptables-restore",
            "iptables-save",
            "setpriv",
            "curl",
            "getent",
            "python3",
        ],
        "bash scripts/install-test-deps.sh installs the test tools",
    )
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

fn spawn(ns: &Netns, logs: &Path, name: &str, args: &[&str]) -> Proc {
    let log = logs.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let child = ns
        .command(args)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    Proc { child, log }
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

/// `/etc/netns/NAME/`, whose files `ip netns exec NAME` mounts over `/etc`'s; removed on drop.
struct EtcNetns(PathBuf);

impl EtcNetns {
    fn new(ns: &Netns) -> Self {
        let dir = Path::new("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn resolv_conf(&self, text: &str) {
        std::fs::write(self.0.join("resolv.conf"), text).unwrap();
    }
}

impl Drop for EtcNetns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const MESH_YAML: &str = "trustDomain: cluster.local\n";

const CONFIG: &str = "\
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: client, namespace: apps}
spec: {address: 10.240.68.2, labels: {app: client}, serviceAccount: client, ports: {http: 8080}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: server, namespace: apps}
spec: {address: 10.240.68.3, labels: {app: server}, serviceAccount: server, ports: {http: 8080}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: server, namespace: apps}
spec:
  hosts: [server.apps.svc]
  ports: [{number: 80, targetPort: 8080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: server}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pinned, namespace: apps}
spec:
  hosts: [pinned.apps.svc]
  addresses: [10.240.68.200]
  ports: [{number: 80, targetPort: 8080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: server}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
";

/// The host's resolver: UDP and TCP on port 53 of `addr`. It answers A for `OUTSIDE_NAME`
/// (NODATA for its other types), NXDOMAIN for everything else, and appends every question's
/// name to `log`.
fn upstream_dns_script(addr: &str, log: &Path) -> String {
    format!(
        r#"import socket, struct, threading
LOG = {log:?}
def answer(q):
    if len(q) < 17:
        return None
    qid, flags = struct.unpack('>HH', q[:4])
    i, labels = 12, []
    while i < len(q) and q[i] != 0:
        n = q[i]
        labels.append(q[i + 1:i + 1 + n].decode('ascii', 'replace'))
        i += 1 + n
    qtype, = struct.unpack('>H', q[i + 1:i + 3])
    question = q[12:i + 5]
    name = '.'.join(labels).lower()
    with open(LOG, 'a') as f:
        f.write(name + '\n')
    ans, rcode = b'', 3
    if name == {OUTSIDE_NAME:?}:
        rcode = 0
        if qtype == 1:
            ans = b'\xc0\x0c' + struct.pack('>HHIH', 1, 1, 60, 4) + socket.inet_aton({OUTSIDE_ADDR:?})
    header = struct.pack('>HHHHHH', qid, 0x8080 | (flags & 0x0100) | rcode, 1, 1 if ans else 0, 0, 0)
    return header + question + ans
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(({addr:?}, 53))
    while True:
        q, peer = s.recvfrom(4096)
        a = answer(q)
        if a:
            s.sendto(a, peer)
def tcp_client(c):
    with c:
        while True:
            head = c.recv(2, socket.MSG_WAITALL)
            if len(head) < 2:
                return
            q = c.recv(struct.unpack('>H', head)[0], socket.MSG_WAITALL)
            a = answer(q)
            if not a:
                return
            c.sendall(struct.pack('>H', len(a)) + a)
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(({addr:?}, 53))
t.listen(16)
threading.Thread(target=udp, daemon=True).start()
print('ready', flush=True)
while True:
    c, _ = t.accept()
    threading.Thread(target=tcp_client, args=(c,), daemon=True).start()
"#,
        log = log.display().to_string(),
    )
}

/// Both families' tables as `iptables-save` prints them, without what changes by itself
/// (comment lines, packet counters).
fn saved(ns: &Netns) -> String {
    let mut all = String::new();
    for save in ["iptables-save", "ip6tables-save"] {
        let out = ns.run(&[save]);
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if l.starts_with('#') {
                continue;
            }
            match (l.starts_with(':'), l.rfind('[')) {
                (true, Some(at)) => all.push_str(&format!("{}[0:0]", &l[..at])),
                _ => all.push_str(l),
            }
            all.push('\n');
        }
    }
    all
}

/// Everything the test needs, dropped in an order that stops processes before namespaces go.
struct World {
    procs: Vec<Proc>,
    etc: EtcNetns,
    /// The client's tables before `palisade iptables install --redirect-dns`.
    client_tables: String,
    _hub: Netns,
    client: Netns,
    _server: Netns,
    dir: tempfile::TempDir,
}

impl World {
    fn logs(&self) -> String {
        let mut all = String::new();
        for p in &self.procs {
            let text = p.log();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            all.push_str(&format!("--- {} (last lines)\n", p.log.display()));
            for l in tail.into_iter().rev() {
                all.push_str(l);
                all.push('\n');
            }
        }
        all
    }

    /// What the upstream server was asked, one name a line.
    fn upstream_questions(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("upstream-questions.log")).unwrap_or_default()
    }

    /// The IPv4 addresses glibc's resolver gives `name` in the client namespace, `None` when it
    /// does not resolve.
    fn resolve(&self, name: &str) -> Option<Vec<String>> {
        let out = self.client.run(&["getent", "ahostsv4", name]);
        if !out.status.success() {
            return None;
        }
        let mut addrs: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        addrs.dedup();
        Some(addrs)
    }
}

fn start(test: &str) -> Option<World> {
    if let Some(reason) = missing() {
        skip(test, &reason);
        return None;
    }
    let made = (|| -> Result<_, String> {
        Ok((
            Netns::new("dns", "hub")?,
            Netns::new("dns", "client")?,
            Netns::new("dns", "server")?,
        ))
    })();
    let (hub, client, server) = match made {
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
        // The VIP range and the declared address are reached through the default route (as
        // a pod reaches a ClusterIP): capture takes them before they leave.
        ns.must(&["ip", "route", "add", "default", "via", HUB]);
    }
    // The client's resolver: the hub's DNS server, nothing else (no search domains).
    let etc = EtcNetns::new(&client);
    etc.resolv_conf(&format!("nameserver {HUB}\n"));

    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let logs = dir.path().join("logs");
    let config = dir.path().join("mesh");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("mesh.yaml"), MESH_YAML).unwrap();
    std::fs::write(config.join("config.yaml"), CONFIG).unwrap();

    let mut procs = Vec::new();
    let mut upstream = spawn(
        &hub,
        &logs,
        "upstream-dns",
        &[
            "python3",
            "-c",
            &upstream_dns_script(HUB, &dir.path().join("upstream-questions.log")),
        ],
    );
    wait_for("the upstream DNS server", Duration::from_secs(20), || {
        assert!(
            upstream.running(),
            "upstream DNS exited:\n{}",
            upstream.log()
        );
        upstream.log().contains("ready").then_some(())
    });
    procs.push(upstream);

    let ca = format!("{HUB}:15012");
    let xds = format!("{HUB}:15010");
    let mut cp = spawn(
        &hub,
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

    procs.push(spawn(
        &server,
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

    // Someone else's rule in each nat table (which also makes the tables exist before
    // install: uninstall must leave them exactly so).
    let foreign = [
        "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "RETURN",
    ];
    client.must(&[&["iptables"][..], &foreign].concat());
    // IPv6 only where the namespace has it (install then leaves IPv6 alone too).
    let _ = client.run(&[&["ip6tables"][..], &foreign].concat());
    let client_tables = saved(&client);
    for (ns, name, sa, dns) in [
        (&client, "client", "client", true),
        (&server, "server", "server", false),
    ] {
        let mut install = vec![PALISADE, "iptables", "install"];
        if dns {
            install.push("--redirect-dns");
        }
        let out = ns.run(&install);
        assert!(
            out.status.success(),
            "iptables install in {name}: {}",
            output_text(&out)
        );
        if dns {
            // Installed as iptables prints it back: a second install changes nothing.
            let once = saved(ns);
            assert!(once.contains("-A OUTPUT -p udp -j PALISADE_DNS"), "{once}");
            let out = ns.run(&install);
            assert!(out.status.success(), "{}", output_text(&out));
            assert_eq!(saved(ns), once);
        }
        let own = dir.path().join(format!("sidecar-{name}"));
        std::fs::create_dir_all(&own).unwrap();
        let token = Command::new(PALISADE)
            .args(["token", "issue", "--state"])
            .arg(&state)
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
        let ready = own.join("ready.json");
        let id = PROXY_ID.to_string();
        let mut sidecar = spawn(
            ns,
            &logs,
            &format!("sidecar-{name}"),
            &[
                "env",
                "PALISADE_LOG=info,palisade_dns=debug",
                "setpriv",
                &format!("--reuid={id}"),
                &format!("--regid={id}"),
                "--clear-groups",
                PALISADE,
                "sidecar",
                "--workload",
                &format!("apps/{name}"),
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
                "1",
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
    Some(World {
        procs,
        etc,
        client_tables,
        _hub: hub,
        client,
        _server: server,
        dir,
    })
}

/// The VIP the control plane gives `server.apps.svc`: the only host without addresses, so
/// what the allocator gives it from scratch, whatever it remembers.
fn expected_vip() -> Ipv4Addr {
    let declared: Vec<palisade_capture::IpNet> = [CLIENT, SERVER, PINNED]
        .iter()
        .map(|a| palisade_capture::IpNet::from(a.parse::<IpAddr>().unwrap()))
        .collect();
    let vips = palisade_dns::allocate(["server.apps.svc"], &declared, &Default::default());
    vips["server.apps.svc"]
}

/// The sidecar's DNS counter, by `protocol` and `result`, from its admin endpoint.
fn dns_count(w: &World, protocol: &str, result: &str) -> u64 {
    let out = w
        .client
        .run(&["curl", "-s", "-m", "5", "http://127.0.0.1:15000/stats"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let labels = format!("protocol=\"{protocol}\",result=\"{result}\"");
    text.lines()
        .filter(|l| l.starts_with("palisade_dns_requests_total{") && l.contains(&labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn mesh_names_resolve_to_vips_and_the_rest_as_upstream_says() {
    let test = "mesh_names_resolve_to_vips_and_the_rest_as_upstream_says";
    let Some(w) = start(test) else {
        return;
    };
    let vip = expected_vip();
    assert!(palisade_dns::VIP_NET.contains(&vip), "{vip}");
    let vip = vip.to_string();

    // The first config may still be on its way: poll until the mesh name resolves.
    let got = wait_for(
        "server.apps.svc to resolve",
        Duration::from_secs(30),
        || w.resolve("server.apps.svc"),
    );
    assert_eq!(got, [vip.as_str()], "{}", w.logs());
    // The short form of a NAME.NAMESPACE.svc host, from the same namespace; any case.
    assert_eq!(w.resolve("server").unwrap(), [vip.as_str()]);
    assert_eq!(w.resolve("Server.Apps").unwrap(), [vip.as_str()]);
    // AAAA of a name with only a VIP: no address, but the name exists (NODATA, which glibc
    // reports as EAI_NODATA), not NXDOMAIN (EAI_NONAME) as for a name the upstream does not know.
    let v6 = |name: &str| {
        let script = format!(
            "import socket\ntry:\n    socket.getaddrinfo({name:?}, None, socket.AF_INET6)\n    print('found')\n\
             except socket.gaierror as e:\n    print('nodata' if e.errno == socket.EAI_NODATA else 'noname' if e.errno == socket.EAI_NONAME else e)\n"
        );
        w.client.must(&["python3", "-c", &script]).trim().to_owned()
    };
    assert_eq!(v6("server.apps.svc"), "nodata", "{}", w.logs());
    assert_eq!(v6("nothere.apps.svc"), "noname");
    // The sidecar's config dump says what it answers and where the rest goes.
    let dump = w.client.must(&[
        "curl",
        "-s",
        "-m",
        "5",
        "http://127.0.0.1:15000/config_dump",
    ]);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(
        dump["dns"]["names"]["server.apps.svc"][0],
        vip.as_str(),
        "{dump}"
    );
    assert_eq!(dump["dns"]["upstreams"][0], format!("{HUB}:53"), "{dump}");
    // A declared address is answered as declared.
    assert_eq!(w.resolve("pinned.apps.svc").unwrap(), [PINNED]);

    // An unmodified client reaches the VIP, and the declared address, by name: the client's
    // sidecar routes them to the server workload over mutual TLS.
    for url in [
        "http://server.apps.svc/by-vip",
        "http://pinned.apps.svc/by-address",
    ] {
        let out = w
            .client
            .run(&["curl", "-s", "-m", "10", "-w", "\n%{http_code}", url]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        assert_eq!(code, "200", "{url}: {text}\n{}", w.logs());
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["app"], "server", "{body}");
        assert_eq!(
            json["caller"], "spiffe://cluster.local/ns/apps/sa/client",
            "{body}"
        );
    }

    // Outside the mesh: as the upstream resolver says, its answer and its NXDOMAIN.
    assert_eq!(
        w.resolve(OUTSIDE_NAME).unwrap(),
        [OUTSIDE_ADDR],
        "{}",
        w.logs()
    );
    assert_eq!(w.resolve("nothere.apps.svc"), None);

    // Over TCP (glibc's `use-vc`): the same answers, through the same listener port.
    let udp_mesh = dns_count(&w, "udp", "mesh");
    let udp_forwarded = dns_count(&w, "udp", "forwarded");
    assert!(
        udp_mesh > 0 && udp_forwarded > 0,
        "{udp_mesh} {udp_forwarded}\n{}",
        w.logs()
    );
    w.etc
        .resolv_conf(&format!("nameserver {HUB}\noptions use-vc\n"));
    assert_eq!(
        w.resolve("server.apps.svc").unwrap(),
        [vip.as_str()],
        "{}",
        w.logs()
    );
    assert_eq!(w.resolve(OUTSIDE_NAME).unwrap(), [OUTSIDE_ADDR]);
    assert_eq!(w.resolve("nothere.apps.svc"), None);
    assert!(dns_count(&w, "tcp", "mesh") > 0, "{}", w.logs());
    assert!(dns_count(&w, "tcp", "forwarded") > 0, "{}", w.logs());

    // The mesh names never reached the upstream server; the others did, relayed by the sidecar
    // (whose own queries the rules let through).
    let asked = w.upstream_questions();
    for name in [
        "server.apps.svc",
        "server",
        "server.apps",
        "pinned.apps.svc",
    ] {
        assert!(
            !asked.lines().any(|l| l == name),
            "{name} was forwarded:\n{asked}"
        );
    }
    assert!(asked.lines().any(|l| l == OUTSIDE_NAME), "{asked}");
    assert!(asked.lines().any(|l| l == "nothere.apps.svc"), "{asked}");

    // Without the redirect, the application's DNS goes straight to the upstream server (the
    // sidecar is not in the way): uninstall, and the mesh name is the upstream's NXDOMAIN.
    let out = w.client.run(&[PALISADE, "iptables", "uninstall"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        saved(&w.client),
        w.client_tables,
        "uninstall left something behind"
    );
    assert_eq!(w.resolve("server.apps.svc"), None);
}
