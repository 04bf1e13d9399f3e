//! `palisade iptables install|uninstall` for real, in network namespaces these tests create and
//! delete (a guard deletes them, and kills what runs in them, even when a test fails).
//!
//! Namespace A is the workload: the rules go there, and `palisade echo` servers stand in for the
//! sidecar's capture ports (15001 outbound, 15006 inbound) and for an application port. B is a
//! peer across a veth pair, with servers of its own. Each connection is an HTTP request made by
//! bash's `/dev/tcp` inside a namespace (as root, or as the sidecar's uid/gid with setpriv), and
//! the echo server that answers names itself: that is where the connection went.
//!
//! Needs root, `ip netns`, iptables (both backends' tools, as Debian's package ships them),
//! setpriv, bash and timeout. Without them each test says why on stderr (past the test
//! harness's capture) and passes without checking anything: it never skips silently.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/netns.rs"]
mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use netns::{Netns, output_text, skip};

const PALISADE: &str = env!("CARGO_BIN_EXE_palisade");

#[derive(Clone, Copy)]
enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    fn arg(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }
    fn iptables(self) -> String {
        format!("iptables-{}", self.arg())
    }
    fn ip6tables(self) -> String {
        format!("ip6tables-{}", self.arg())
    }
}

/// Why these tests cannot run here, if they cannot.
fn missing(backend: Backend) -> Option<String> {
    let tools = [
        "iptables".to_owned(),
        format!("{}-save", backend.iptables()),
        format!("{}-restore", backend.iptables()),
        format!("{}-save", backend.ip6tables()),
        format!("{}-restore", backend.ip6tables()),
        "setpriv".to_owned(),
        "bash".to_owned(),
        "timeout".to_owned(),
    ];
    let tools: Vec<&str> = tools.iter().map(String::as_str).collect();
    netns::missing(
        &tools,
        "bash scripts/install-test-deps.sh installs Debian's iptables",
    )
}

fn new_netns(tag: &str) -> Result<Netns, String> {
    Netns::new("ipt", tag)
}

impl Netns {
    /// `palisade iptables ARGS` in this namespace.
    fn palisade(&self, args: &[&str]) -> Output {
        let mut all = vec![PALISADE, "iptables"];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// A `palisade echo` answering as `name` on every address, port `port`.
    fn echo(&self, name: &str, port: u16) -> Server {
        let listen = format!("[::]:{port}");
        let child = self
            .command(&[PALISADE, "echo", "--listen", &listen, "--name", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Server(child);
        let start = Instant::now();
        while self.get(None, "127.0.0.1", port).as_deref() != Ok(name) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "echo {name} on port {port} in {} did not start",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// One HTTP request to host:port from inside this namespace (as `owner`'s uid and gid, or
    /// root): the name of the echo server that answered, or why none did.
    fn get(&self, owner: Option<(u32, u32)>, host: &str, port: u16) -> Result<String, String> {
        let script = format!(
            "exec 3<>/dev/tcp/{host}/{port} && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
        );
        let mut args: Vec<String> = Vec::new();
        if let Some((uid, gid)) = owner {
            args.extend([
                "setpriv".to_owned(),
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".to_owned(),
            ]);
        }
        args.extend(["timeout", "5", "bash", "-c", &script].map(str::to_owned));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.run(&args);
        if !out.status.success() {
            return Err(output_text(&out));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let json: serde_json::Value =
            serde_json::from_str(body).map_err(|e| format!("{e}: {text}"))?;
        json["app"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no app in {text}"))
    }
}

/// A server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `iptables-save` output without what changes by itself: comment lines (timestamps, notes)
/// and packet counters. Everything else, rules and chains and their order, must match.
fn normalized(save: &str) -> String {
    save.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind('[')) {
            (true, Some(at)) => format!("{}[0:0]", &l[..at]),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every table of both families, and the nat tables alone, as iptables-save prints them.
#[derive(Debug, PartialEq, Eq)]
struct Saved {
    v4: String,
    v4_nat: String,
    v6: String,
}

fn saved(ns: &Netns, backend: Backend) -> Saved {
    let v4 = format!("{}-save", backend.iptables());
    let v6 = format!("{}-save", backend.ip6tables());
    Saved {
        v4: normalized(&ns.must(&[&v4])),
        v4_nat: normalized(&ns.must(&[&v4, "-t", "nat"])),
        v6: normalized(&ns.must(&[&v6])),
    }
}

/// Rules of someone else's in A before palisade comes: they must survive everything.
fn seed_foreign_rules(ns: &Netns, backend: Backend) {
    let v4 = backend.iptables();
    let v6 = backend.ip6tables();
    for rule in [
        "-t nat -A PREROUTING -p udp --dport 53 -j RETURN",
        "-t nat -A OUTPUT -p udp --dport 53 -j RETURN",
        "-t nat -N WORKLOAD_OWN",
        "-t nat -A WORKLOAD_OWN -p tcp --dport 7 -j RETURN",
        "-t filter -A INPUT -p tcp --dport 22 -j ACCEPT",
    ] {
        let mut args = vec![v4.as_str()];
        args.extend(rule.split(' '));
        ns.must(&args);
    }
    ns.must(&[
        &v6, "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN",
    ]);
}

fn assert_installed(saved: &Saved) {
    for (family, nat) in [("IPv4", &saved.v4_nat), ("IPv6", &saved.v6)] {
        for chain in [
            "PALISADE_INBOUND",
            "PALISADE_IN_REDIRECT",
            "PALISADE_OUTPUT",
            "PALISADE_REDIRECT",
        ] {
            assert!(
                nat.lines().any(|l| l == format!(":{chain} - [0:0]")),
                "{family}: no chain {chain}:\n{nat}"
            );
        }
        for jump in [
            "-A PREROUTING -p tcp -j PALISADE_INBOUND",
            "-A OUTPUT -p tcp -j PALISADE_OUTPUT",
        ] {
            assert_eq!(
                nat.lines().filter(|l| *l == jump).count(),
                1,
                "{family}: `{jump}` not there exactly once:\n{nat}"
            );
        }
        assert!(
            nat.contains("-j REDIRECT --to-ports 15001")
                && nat.contains("-j REDIRECT --to-ports 15006"),
            "{family}:\n{nat}"
        );
        assert!(
            nat.contains("-A OUTPUT -p udp -m udp --dport 53 -j RETURN"),
            "{family}: someone else's rule is gone:\n{nat}"
        );
    }
}

/// The workload's namespace A and its peer B, joined by a veth pair, with IPv4 and IPv6.
fn workload_and_peer() -> Result<(Netns, Netns), String> {
    let a = new_netns("a")?;
    let b = new_netns("b")?;
    a.must(&[
        "ip", "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b", "netns", &b.name,
    ]);
    a.must(&["ip", "addr", "add", "192.0.2.1/24", "dev", "veth-a"]);
    a.must(&[
        "ip",
        "-6",
        "addr",
        "add",
        "2001:db8::1/64",
        "dev",
        "veth-a",
        "nodad",
    ]);
    a.must(&["ip", "link", "set", "veth-a", "up"]);
    b.must(&["ip", "addr", "add", "192.0.2.2/24", "dev", "veth-b"]);
    b.must(&["ip", "addr", "add", "192.0.2.3/24", "dev", "veth-b"]);
    b.must(&[
        "ip",
        "-6",
        "addr",
        "add",
        "2001:db8::2/64",
        "dev",
        "veth-b",
        "nodad",
    ]);
    b.must(&["ip", "link", "set", "veth-b", "up"]);
    Ok((a, b))
}

const PROXY: Option<(u32, u32)> = Some((1337, 1337));

/// One connection to check: what it shows, from where, as whom, to where, and who must answer.
type Check<'a> = (
    &'static str,
    &'a Netns,
    Option<(u32, u32)>,
    &'static str,
    u16,
    &'static str,
);

fn install_redirects_and_uninstall_restores(test: &str, backend: Backend) {
    if let Some(reason) = missing(backend) {
        return skip(test, &reason);
    }
    let (a, b) = match workload_and_peer() {
        Ok(pair) => pair,
        Err(reason) => return skip(test, &reason),
    };
    let probe = a.run(&[&backend.iptables(), "-t", "nat", "-S"]);
    if !probe.status.success() {
        return skip(
            test,
            &format!(
                "this kernel does not take {} rules: {}",
                backend.arg(),
                output_text(&probe)
            ),
        );
    }
    seed_foreign_rules(&a, backend);
    let before = saved(&a, backend);

    // The sidecar's capture ports and an application port in A; two ports in B.
    let _servers = [
        a.echo("outbound-capture", 15001),
        a.echo("inbound-capture", 15006),
        a.echo("app", 9091),
        b.echo("peer-8080", 8080),
        b.echo("peer-9090", 9090),
    ];

    let install = [
        "install",
        "--backend",
        backend.arg(),
        "--exclude-inbound-ports",
        "9091",
        "--exclude-outbound-ports",
        "9090",
        "--exclude-outbound-cidrs",
        "192.0.2.3",
    ];
    let out = a.palisade(&install);
    assert!(out.status.success(), "install: {}", output_text(&out));
    let installed = saved(&a, backend);
    assert_installed(&installed);

    // What, from which namespace, as whom (root, or uid and gid), to where, and who answers.
    #[rustfmt::skip]
    let checks: [Check; 12] = [
        ("outbound TCP is redirected", &a, None, "192.0.2.2", 8080, "outbound-capture"),
        ("outbound IPv6 TCP is redirected", &a, None, "2001:db8::2", 8080, "outbound-capture"),
        ("an excluded outbound port is not", &a, None, "192.0.2.2", 9090, "peer-9090"),
        ("an excluded destination is not", &a, None, "192.0.2.3", 8080, "peer-8080"),
        ("the sidecar's uid is not", &a, PROXY, "192.0.2.2", 8080, "peer-8080"),
        ("the sidecar's gid is not", &a, Some((4242, 1337)), "192.0.2.2", 8080, "peer-8080"),
        ("the app over 127.0.0.1 is not", &a, None, "127.0.0.1", 9091, "app"),
        ("the app to its own address (over lo) is not", &a, None, "192.0.2.1", 9091, "app"),
        ("the sidecar to its workload's address goes inbound", &a, PROXY, "192.0.2.1", 9091, "inbound-capture"),
        ("inbound TCP is redirected", &b, None, "192.0.2.1", 8080, "inbound-capture"),
        ("inbound IPv6 TCP is redirected", &b, None, "2001:db8::1", 8080, "inbound-capture"),
        ("an excluded inbound port is not", &b, None, "192.0.2.1", 9091, "app"),
    ];
    for (what, from, owner, host, port, expected) in checks {
        assert_eq!(
            from.get(owner, host, port).as_deref(),
            Ok(expected),
            "{what}: {host}:{port} from {} as {owner:?}",
            from.name
        );
    }

    // Idempotent: a second install changes nothing.
    let out = a.palisade(&install);
    assert!(
        out.status.success(),
        "second install: {}",
        output_text(&out)
    );
    assert_eq!(
        saved(&a, backend),
        installed,
        "a second install changed the rules"
    );

    let out = a.palisade(&["uninstall", "--backend", backend.arg()]);
    assert!(out.status.success(), "uninstall: {}", output_text(&out));
    let after = saved(&a, backend);
    assert_eq!(
        after.v4_nat, before.v4_nat,
        "IPv4 nat table differs after uninstall"
    );
    assert_eq!(after.v4, before.v4, "IPv4 tables differ after uninstall");
    assert_eq!(after.v6, before.v6, "IPv6 tables differ after uninstall");
    // Capture is gone: A reaches B's real server, and nothing listens on A's 8080.
    assert_eq!(a.get(None, "192.0.2.2", 8080).as_deref(), Ok("peer-8080"));
    assert!(b.get(None, "192.0.2.1", 8080).is_err());

    let out = a.palisade(&["uninstall", "--backend", backend.arg()]);
    assert!(
        out.status.success(),
        "second uninstall: {}",
        output_text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing of palisade's to remove"),
        "{}",
        output_text(&out)
    );
    assert_eq!(saved(&a, backend), before);
}

#[test]
fn nft_install_redirects_and_uninstall_restores_the_namespace() {
    install_redirects_and_uninstall_restores(
        "nft_install_redirects_and_uninstall_restores_the_namespace",
        Backend::Nft,
    );
}

#[test]
fn legacy_install_redirects_and_uninstall_restores_the_namespace() {
    install_redirects_and_uninstall_restores(
        "legacy_install_redirects_and_uninstall_restores_the_namespace",
        Backend::Legacy,
    );
}

/// A directory whose `ip6tables-nft-restore` checks documents like the real one but refuses to
/// apply them, put first on PATH: IPv4 applies, then IPv6 fails.
fn refusing_ip6tables(dir: &Path) -> PathBuf {
    let real = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join("ip6tables-nft-restore"))
        .find(|p| p.is_file())
        .unwrap();
    let fake = dir.join("ip6tables-nft-restore");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = --test ] && exec {} \"$@\"; done\n\
             cat >/dev/null\necho 'ip6tables-nft-restore: refused by the test' >&2\nexit 4\n",
            real.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = std::env::var_os("PATH").unwrap();
    let mut dirs = vec![dir.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    PathBuf::from(std::env::join_paths(dirs).unwrap())
}

#[test]
fn a_failure_in_one_family_leaves_both_as_they_were() {
    let test = "a_failure_in_one_family_leaves_both_as_they_were";
    if let Some(reason) = missing(Backend::Nft) {
        return skip(test, &reason);
    }
    let a = match new_netns("fail") {
        Ok(ns) => ns,
        Err(reason) => return skip(test, &reason),
    };
    seed_foreign_rules(&a, Backend::Nft);
    let tmp = tempfile::tempdir().unwrap();
    let path = refusing_ip6tables(tmp.path());
    let env_path = format!("PATH={}", path.display());
    let failing_install = |args: &[&str]| {
        let mut all = vec![
            "env",
            env_path.as_str(),
            PALISADE,
            "iptables",
            "install",
            "--backend",
            "nft",
            "--ipv6",
            "on",
        ];
        all.extend_from_slice(args);
        let out = a.run(&all);
        assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            stderr.contains(
                "ip6tables-nft-restore failed (exit status: 4): ip6tables-nft-restore: refused \
                 by the test; the IPv4 rules applied before it were put back as they were"
            ),
            "{stderr}"
        );
    };

    // From nothing: nothing stays.
    let before = saved(&a, Backend::Nft);
    failing_install(&[]);
    assert_eq!(saved(&a, Backend::Nft), before);

    // Over an earlier install: the earlier rules stay, not the new ones.
    let out = a.palisade(&[
        "install",
        "--backend",
        "nft",
        "--include-inbound-ports",
        "80,443",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let installed = saved(&a, Backend::Nft);
    failing_install(&["--exclude-outbound-ports", "22"]);
    assert_eq!(saved(&a, Backend::Nft), installed);

    let out = a.palisade(&["uninstall", "--backend", "nft"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(saved(&a, Backend::Nft), before);
}
