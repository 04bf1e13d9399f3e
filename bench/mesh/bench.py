#!/usr/bin/env python3
"""Palisade mesh benchmark: the direct path, an Envoy sidecar pair and a Palisade sidecar pair,
measured in one run on loopback. Started by run.sh (which installs the tools and builds
palisade); python3 standard library only.

Topology (every address on 127.0.0.0/8):

    direct:    wrk -> nginx
    envoy:     wrk -> Envoy client sidecar -> mTLS 1.3 -> Envoy server sidecar -> nginx
    palisade:  wrk -> Palisade client sidecar -> mTLS 1.3 -> Palisade server sidecar -> nginx

Both pairs use certificates from one Palisade CA for the same two SPIFFE identities, check the
peer's SAN, and enforce the same ALLOW policy (principal + method + path prefix). Each target is
a function returning a `Target` or raising `Unavailable(reason)`, so a pair that cannot start
is reported as "not available" with the reason while the others are still measured.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRUST_DOMAIN = "cluster.local"
NAMESPACE = "bench"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/client"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/server"
# Palisade workloads get their own loopback addresses (Linux routes 127/8 to lo).
PAL_CLIENT_ADDR = "127.0.88.1"
PAL_SERVER_ADDR = "127.0.88.2"
PAL_PORT = 8080
ALLOWED_PATH = "/api/bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Unavailable(Exception):
    """A target that cannot be measured; the message says why."""


# --------------------------------------------------------------------------------------------
# Processes


class Procs:
    """Every process the harness starts, each in its own session; all stopped by `stop_all`."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        out = open(self.logdir / f"{name}.out", "wb")
        err = open(self.logdir / f"{name}.err", "wb")
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs.append((name, p))
        return p

    def log(self, name: str, stream: str = "err") -> str:
        try:
            return (self.logdir / f"{name}.{stream}").read_text(errors="replace")
        except OSError:
            return ""

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        self.procs.clear()


def wait_until(what: str, timeout: float, check, proc: subprocess.Popen | None = None, log=lambda: ""):
    """Polls `check` (returns a value or None) until it returns a value; bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise Unavailable(f"{what}: process exited with {proc.returncode}: {tail(log())}")
        try:
            v = check()
        except (OSError, ValueError, http.client.HTTPException):
            v = None
        if v is not None:
            return v
        time.sleep(0.1)
    raise Unavailable(f"{what}: not ready after {timeout:.0f}s: {tail(log())}")


def tail(text: str, n: int = 6) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return " | ".join(lines[-n:])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_get(host: str, port: int, path: str, method: str = "GET", host_header: str | None = None):
    c = http.client.HTTPConnection(host, port, timeout=5)
    try:
        headers = {"Host": host_header} if host_header else {}
        c.request(method, path, headers=headers)
        r = c.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        c.close()


# --------------------------------------------------------------------------------------------
# /proc


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of the whole process (all threads, exited ones included), in seconds. The
    kernel keeps their sum exact (scheduler runtime) and splits it by tick samples."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def memory(pid: int) -> dict:
    """VmHWM (peak RSS), VmRSS and RssAnon from status; Private_* from smaps_rollup (MiB)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) / 1024
    try:
        priv = 0
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    priv += int(line.split()[1])
        out["Private"] = priv / 1024
    except OSError:
        pass
    return out


class MemorySampler:
    """Samples memory() of some processes twice a second while a run is going; keeps the max."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.peak: dict[str, dict] = {n: {} for n in pids}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        for name, pid in self.pids.items():
            try:
                m = memory(pid)
            except OSError:
                continue
            for k, v in m.items():
                self.peak[name][k] = max(self.peak[name].get(k, 0), v)

    def _run(self):
        while not self._stop.wait(0.5):
            self._sample()

    def __enter__(self):
        self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=2)
        self._sample()


def cpu_idle_fraction(window: float = 1.0) -> float:
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])  # idle + iowait, total (without guest, counted in user)

    i0, t0 = snap()
    time.sleep(window)
    i1, t1 = snap()
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet(min_idle: float, timeout: float) -> dict:
    """Waits (bounded) until the CPUs are at least `min_idle` idle over one second."""
    start = time.monotonic()
    while True:
        idle = cpu_idle_fraction()
        waited = time.monotonic() - start
        if idle >= min_idle or waited >= timeout:
            load1 = float(open("/proc/loadavg").read().split()[0])
            return {
                "idle": round(idle, 3),
                "load1": load1,
                "waited_s": round(waited, 1),
                "quiet": idle >= min_idle,
            }


# --------------------------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    name: str
    url_host: str  # where wrk connects
    url_port: int
    host_header: str | None  # Host header wrk sends (Palisade routes on it)
    sidecars: dict[str, int] = field(default_factory=dict)  # role -> pid
    tls_server: tuple[str, int] | None = None  # the server sidecar's mTLS port (handshake case)

    def url(self, path: str = ALLOWED_PATH) -> str:
        return f"http://{self.url_host}:{self.url_port}{path}"


@dataclass
class Ctx:
    palisade: Path
    # The sidecar command: `palisade-sidecar` (the lean binary a sidecar ships) or `palisade sidecar`.
    sidecar: list[str]
    envoy: Path
    work: Path
    procs: Procs
    nginx_port: int = 0
    root: Path | None = None
    certs: dict[str, Path] = field(default_factory=dict)  # identity -> dir with cert-chain.pem, key.pem
    cp_ca: str = ""
    cp_xds: str = ""
    mesh_dir: Path | None = None
    state: Path | None = None
    envoy_upstream: str = "h1"


NGINX_BODY = "hello from the benchmark backend\n"


def start_nginx(ctx: Ctx) -> Target:
    d = ctx.work / "nginx"
    d.mkdir()
    port = free_port()
    conf = d / "nginx.conf"
    # One process (no master), so stopping it is one signal; one worker is the same for all.
    conf.write_text(
        f"""daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type text/plain;
            return 200 "{NGINX_BODY.strip()}\\n";
        }}
    }}
}}
"""
    )
    p = ctx.procs.start("nginx", ["nginx", "-p", str(d), "-c", str(conf)])
    wait_until(
        "nginx",
        10,
        lambda: http_get("127.0.0.1", port, ALLOWED_PATH)[0] == 200 or None,
        p,
        lambda: ctx.procs.log("nginx"),
    )
    ctx.nginx_port = port
    return Target("direct", "127.0.0.1", port, None)


def start_mesh(ctx: Ctx) -> None:
    """The Palisade control plane (CA + ADS) on a temp state and mesh directory, and one
    certificate per identity from its CA (`palisade token issue` + `palisade cert request`)."""
    ctx.mesh_dir = ctx.work / "mesh"
    ctx.state = ctx.work / "state"
    ctx.mesh_dir.mkdir()
    (ctx.mesh_dir / "mesh.yaml").write_text(f"trustDomain: {TRUST_DOMAIN}\n")
    (ctx.mesh_dir / "workloads.yaml").write_text(
        f"""apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: client, namespace: {NAMESPACE}}}
spec:
  address: {PAL_CLIENT_ADDR}
  serviceAccount: client
  labels: {{app: client}}
  ports: {{http: {PAL_PORT}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: server, namespace: {NAMESPACE}}}
spec:
  address: {PAL_SERVER_ADDR}
  serviceAccount: server
  labels: {{app: server}}
  ports: {{http: {PAL_PORT}}}
"""
    )
    # The policy both pairs enforce (the Envoy pair gets the same rules as RBAC config).
    (ctx.mesh_dir / "policy.yaml").write_text(
        f"""apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: {NAMESPACE}}}
spec:
  mtls: {{mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-client, namespace: {NAMESPACE}}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/client]}}}}]
    to: [{{operation: {{methods: [GET], paths: ["/api/*"]}}}}]
"""
    )
    p = ctx.procs.start(
        "controlplane",
        [str(ctx.palisade), "controlplane", "--state", str(ctx.state), "--listen", "127.0.0.1:0",
         "--xds-listen", "127.0.0.1:0", "--config", str(ctx.mesh_dir)],
        env={"PALISADE_LOG": "warn"},
    )

    def addrs():
        out = ctx.procs.log("controlplane", "out")
        ca = re.search(r"CA listening on (\S+)", out)
        xds = re.search(r"ADS listening on (\S+)", out)
        return (ca.group(1), xds.group(1)) if ca and xds else None

    ctx.cp_ca, ctx.cp_xds = wait_until("palisade controlplane", 60, addrs, p, lambda: ctx.procs.log("controlplane"))
    ctx.root = ctx.state / "root-cert.pem"
    for sa in ("client", "server"):
        token = issue_token(ctx, sa)
        out = ctx.work / f"cert-{sa}"
        r = subprocess.run(
            [str(ctx.palisade), "cert", "request", "--ca-addr", ctx.cp_ca, "--ca-root", str(ctx.root),
             "--token-file", str(token), "--out", str(out)],
            capture_output=True, text=True, timeout=60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"palisade cert request ({sa}): {r.stderr.strip()}")
        ctx.certs[sa] = out


def issue_token(ctx: Ctx, sa: str) -> Path:
    path = ctx.work / f"{sa}.token"
    if not path.exists():
        r = subprocess.run(
            [str(ctx.palisade), "token", "issue", "--state", str(ctx.state), "--namespace", NAMESPACE,
             "--service-account", sa, "--ttl", "24h"],
            capture_output=True, text=True, timeout=30,
        )
        if r.returncode != 0:
            raise RuntimeError(f"palisade token issue ({sa}): {r.stderr.strip()}")
        path.write_text(r.stdout)
    return path


def sock(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def static_cluster(name: str, port: int) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": sock(port)}}]}]},
    }


def tls_context(ctx: Ctx, me: str, peer_san: dict, alpn: list[str]) -> dict:
    c = ctx.certs[me]
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": alpn,
        "tls_certificates": [{
            "certificate_chain": {"filename": str(c / "cert-chain.pem")},
            "private_key": {"filename": str(c / "key.pem")},
        }],
        "validation_context": {
            "trusted_ca": {"filename": str(ctx.root)},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": peer_san}],
        },
    }


def hcm(stat_prefix: str, cluster: str, filters: list[dict], extra: dict) -> dict:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "route_config": {"virtual_hosts": [{
                "name": "all", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
            }]},
            "http_filters": filters + [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
            **extra,
        },
    }


def rbac_filter() -> dict:
    """The AuthorizationPolicy above as Envoy RBAC (what Istio generates for it, minus names)."""
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": {f"ns[{NAMESPACE}]-policy[allow-client]-rule[0]": {
                "permissions": [{"and_rules": {"rules": [
                    {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                    {"url_path": {"path": {"prefix": "/api/"}}},
                ]}}],
                "principals": [{"authenticated": {"principal_name": {"exact": CLIENT_ID}}}],
            }}},
        },
    }


def start_envoy(ctx: Ctx, name: str, config: dict) -> tuple[subprocess.Popen, int]:
    path = ctx.work / f"{name}.json"
    path.write_text(json.dumps(config, indent=1))
    admin_path = ctx.work / f"{name}.admin"
    p = ctx.procs.start(name, [
        str(ctx.envoy), "--config-path", str(path), "--admin-address-path", str(admin_path),
        "--disable-hot-restart", "--concurrency", str(os.cpu_count() or 2), "--log-level", "warn",
    ])

    def admin():
        text = admin_path.read_text().strip() if admin_path.exists() else ""
        if not text:
            return None
        host, port = text.rsplit(":", 1)
        return int(port) if http_get(host, int(port), "/ready")[0] == 200 else None

    port = wait_until(f"Envoy {name}", 30, admin, p, lambda: ctx.procs.log(name))
    return p, port


def start_envoy_pair(ctx: Ctx) -> Target:
    server_port, client_port = free_port(), free_port()
    h2 = ctx.envoy_upstream == "h2"
    server = {
        "node": {"id": "bench-server", "cluster": "bench-server"},
        "admin": {"address": sock(0)},
        "static_resources": {
            "listeners": [{
                "name": "inbound",
                "address": sock(server_port),
                "filter_chains": [{
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": True,
                        # Like Palisade's STRICT: any SPIFFE ID of the trust domain; RBAC checks who.
                        "common_tls_context": tls_context(ctx, "server", {"prefix": f"spiffe://{TRUST_DOMAIN}/"}, ["h2", "http/1.1"]),
                    }},
                    "filters": [hcm("inbound", "app", [rbac_filter()], {
                        "forward_client_cert_details": "SANITIZE_SET",
                        "set_current_client_cert_details": {"uri": True},
                    })],
                }],
            }],
            "clusters": [static_cluster("app", ctx.nginx_port)],
        },
    }
    upstream = static_cluster("server-mtls", server_port)
    upstream["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": tls_context(ctx, "client", {"exact": SERVER_ID}, ["h2"] if h2 else ["http/1.1"]),
    }}
    upstream["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}} if h2 else {"http_protocol_options": {}},
    }}
    client = {
        "node": {"id": "bench-client", "cluster": "bench-client"},
        "admin": {"address": sock(0)},
        "static_resources": {
            "listeners": [{"name": "outbound", "address": sock(client_port),
                           "filter_chains": [{"filters": [hcm("outbound", "server-mtls", [], {})]}]}],
            "clusters": [upstream],
        },
    }
    ps, _ = start_envoy(ctx, "envoy-server", server)
    pc, _ = start_envoy(ctx, "envoy-client", client)
    t = Target("envoy", "127.0.0.1", client_port, None, {"client": pc.pid, "server": ps.pid}, ("127.0.0.1", server_port))
    check_policy(t)
    return t


def start_palisade_pair(ctx: Ctx) -> Target:
    """Two `palisade sidecar` processes (agent + proxy in one process each): certificates from the
    same CA, config (workloads + the policy) pushed by the control plane over ADS."""
    help_ = subprocess.run([*ctx.sidecar, "--help"], capture_output=True, text=True, timeout=30)
    if help_.returncode != 0:
        raise Unavailable(f"`{' '.join(ctx.sidecar)}` is not available: {tail(help_.stderr)}")
    procs = {}
    ready = {}
    for role in ("server", "client"):
        ready_file = ctx.work / f"palisade-{role}.ready"
        p = ctx.procs.start(f"palisade-{role}", [
            *ctx.sidecar, "--workload", f"{NAMESPACE}/{role}",
            "--control-plane", ctx.cp_ca, "--xds-address", ctx.cp_xds,
            "--ca-root", str(ctx.root), "--token-file", str(issue_token(ctx, role)),
            "--admin", "127.0.0.1:0", "--outbound", "127.0.0.1:0",
            "--app-port", f"{PAL_PORT}={ctx.nginx_port}", "--ready-file", str(ready_file),
        ], env={"PALISADE_LOG": "warn"})
        procs[role] = p
        # The ready file appears once the proxy has its certificate and its first config from
        # the control plane (inbound listeners open).
        ready[role] = wait_until(
            f"palisade sidecar ({role}): no ready file (certificate + first ADS config)", 30,
            lambda: json.loads(ready_file.read_text()) if ready_file.exists() and ready_file.stat().st_size else None,
            p, lambda r=role: ctx.procs.log(f"palisade-{r}"),
        )
    out_host, out_port = ready["client"]["outbound"].rsplit(":", 1)
    t = Target(
        "palisade", out_host, int(out_port), f"{PAL_SERVER_ADDR}:{PAL_PORT}",
        {"client": procs["client"].pid, "server": procs["server"].pid}, (PAL_SERVER_ADDR, PAL_PORT),
    )
    check_policy(t)
    return t


def check_policy(t: Target) -> None:
    """The pair answers the allowed request and refuses the others, before any measurement."""
    want = [("GET", ALLOWED_PATH, 200), ("POST", ALLOWED_PATH, 403), ("GET", "/admin", 403)]
    for method, path, status in want:
        got = wait_until(
            f"{t.name}: {method} {path}", 15,
            lambda: http_get(t.url_host, t.url_port, path, method, t.host_header),
        )
        if got[0] != status:
            raise Unavailable(f"{t.name}: {method} {path} answered {got[0]} ({got[1].strip()[:80]!r}), expected {status}")
        if status == 200 and got[1] != NGINX_BODY:
            raise Unavailable(f"{t.name}: unexpected body {got[1][:80]!r}")


# --------------------------------------------------------------------------------------------
# Measurements


def run_wrk(t: Target, conns: int, duration: float, script: str, args: list[str] = (), close: bool = False) -> dict:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout", "5s", "-s", str(HERE / script)]
    if t.host_header:
        argv += ["-H", f"Host: {t.host_header}"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(t.url())
    if args:
        argv += ["--", *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                       env={**os.environ, "BENCH_LUA_DIR": str(HERE)})
    m = re.search(r"^BENCH_JSON (.*)$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stdout[-500:]} {r.stderr[-500:]}")
    res = json.loads(m.group(1))
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["error_count"] = sum(res["errors"].values())
    return res


def run_handshakes(ctx: Ctx, t: Target, duration: float) -> dict:
    """New mutual-TLS 1.3 connections per second against the server sidecar (`openssl s_time
    -new`: full handshake with the client certificate, no resumption, then close)."""
    host, port = t.tls_server
    c = ctx.certs["client"]
    r = subprocess.run(
        ["openssl", "s_time", "-connect", f"{host}:{port}", "-new", "-tls1_3", "-time", str(max(1, round(duration))),
         "-cert", str(c / "cert-chain.pem"), "-key", str(c / "key.pem"), "-CAfile", str(ctx.root)],
        capture_output=True, text=True, timeout=duration + 60,
    )
    m = re.search(r"(\d+) connections in ([\d.]+) real seconds", r.stdout)
    if not m or int(m.group(1)) == 0:
        raise RuntimeError(f"openssl s_time failed: {r.stdout[-400:]} {r.stderr[-400:]}")
    n, secs = int(m.group(1)), float(m.group(2))
    return {"requests": n, "rps": n / secs, "error_count": 0}


@dataclass
class Plan:
    duration: float
    paced_duration: float
    rate: int
    repeats: int
    min_idle: float
    quiet_timeout: float


CASES = [
    # (key, description)
    ("c16", "max throughput, 16 connections (keep-alive)"),
    ("c64", "max throughput, 64 connections (keep-alive)"),
    ("paced", "fixed rate, 16 connections (latency)"),
    ("close", "new connection per request (Connection: close), 16 connections"),
    ("handshake", "new mTLS 1.3 handshakes/s against the server sidecar (openssl s_time)"),
]


def measure(ctx: Ctx, t: Target, case: str, plan: Plan) -> dict:
    before = {role: cpu_times(pid) for role, pid in t.sidecars.items()}
    with MemorySampler({role: pid for role, pid in t.sidecars.items()}) as mem:
        if case == "c16":
            res = run_wrk(t, 16, plan.duration, "wrk-report.lua")
        elif case == "c64":
            res = run_wrk(t, 64, plan.duration, "wrk-report.lua")
        elif case == "paced":
            res = run_wrk(t, 16, plan.paced_duration, "wrk-paced.lua", [str(plan.rate), "1"])
        elif case == "close":
            res = run_wrk(t, 16, plan.duration, "wrk-report.lua", close=True)
        elif case == "handshake":
            res = run_handshakes(ctx, t, plan.duration)
        else:
            raise ValueError(case)
    after = {role: cpu_times(pid) for role, pid in t.sidecars.items()}
    res["sidecars"] = {}
    for role in t.sidecars:
        user = after[role][0] - before[role][0]
        system = after[role][1] - before[role][1]
        cpu = user + system
        res["sidecars"][role] = {
            "cpu_s": round(cpu, 3),
            "cpu_user_s": round(user, 3),
            "cpu_system_s": round(system, 3),
            "cpu_ms_per_1k": round(1000 * cpu / max(1, res["requests"]) * 1000, 4),
            "mem_peak_sampled_mib": {k: round(v, 2) for k, v in mem.peak[role].items()},
        }
    return res


# --------------------------------------------------------------------------------------------
# Summary


def med(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def metric_rows(runs: list[dict], targets: dict) -> list[tuple[str, str, dict]]:
    """(metric key, label, {target: stats}) for the table and the JSON summary."""

    def vals(target, case, f):
        out = []
        for r in runs:
            if r["target"] == target and r["case"] == case and "result" in r:
                try:
                    out.append(f(r["result"]))
                except (KeyError, TypeError):
                    pass
        return out

    rows = []

    def row(key, label, case, f, only_pairs=False):
        stats = {}
        for name in targets:
            if only_pairs and name == "direct":
                continue
            stats[name] = med(vals(name, case, f))
        rows.append((key, label, stats))

    row("rps_c16", "throughput c16 (req/s)", "c16", lambda r: r["rps"])
    row("rps_c64", "throughput c64 (req/s)", "c64", lambda r: r["rps"])
    row("p50_us", "latency p50 @rate (us)", "paced", lambda r: r["latency_us"]["p50"])
    row("p90_us", "latency p90 @rate (us)", "paced", lambda r: r["latency_us"]["p90"])
    row("p99_us", "latency p99 @rate (us)", "paced", lambda r: r["latency_us"]["p99"])
    row("paced_rps", "achieved rate (req/s)", "paced", lambda r: r["rps"])
    row("rps_close", "new conn/request (req/s)", "close", lambda r: r["rps"])
    row("handshakes", "mTLS handshakes/s (server)", "handshake", lambda r: r["rps"], only_pairs=True)
    for role in ("client", "server"):
        row(f"cpu_paced_{role}", f"CPU ms/1k req @rate, {role}", "paced",
            lambda r, ro=role: r["sidecars"][ro]["cpu_ms_per_1k"], only_pairs=True)
        row(f"cpu_c64_{role}", f"CPU ms/1k req c64, {role}", "c64",
            lambda r, ro=role: r["sidecars"][ro]["cpu_ms_per_1k"], only_pairs=True)
    row("cpu_handshake_server", "CPU ms/1k handshakes, server", "handshake",
        lambda r: r["sidecars"]["server"]["cpu_ms_per_1k"], only_pairs=True)
    return rows


def added_latency(rows, target):
    out = {}
    by = {k: s for k, _, s in rows}
    for k in ("p50_us", "p99_us"):
        t, d = (by[k].get(target) or {}), (by[k].get("direct") or {})
        if t and d:
            out[k] = t["median"] - d["median"]
    return out


def fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(s: dict | None) -> str:
    if not s:
        return "-"
    if s["n"] == 1:
        return fmt(s["median"])
    return f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]"


def ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or not b["median"]:
        return "-"
    return f"{a['median'] / b['median']:.2f}"


def print_table(rows, memrows, targets, out=sys.stdout):
    names = ["direct", "envoy", "palisade"]
    header = ["metric", *names, "pal/envoy", "pal/direct"]
    lines = []
    for key, label, stats in rows + memrows:
        lines.append([label, *[("n/a" if not targets.get(n, {}).get("available") else cell(stats.get(n))) if n in stats else "-" for n in names],
                      ratio(stats.get("palisade"), stats.get("envoy")),
                      ratio(stats.get("palisade"), stats.get("direct")) if "direct" in stats else "-"])
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |", file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for r in lines:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |", file=out)


def goals(rows, memrows, targets) -> list[str]:
    if not (targets.get("palisade", {}).get("available") and targets.get("envoy", {}).get("available")):
        return ["goals: not evaluated (the Palisade pair or the Envoy pair is not available)"]
    by = {k: s for k, _, s in rows + memrows}

    def m(k, t):
        s = by.get(k, {}).get(t)
        return s["median"] if s else None

    out = []

    def goal(name, ok, detail):
        out.append(f"  [{'met' if ok else 'NOT met'}] {name}: {detail}")

    pe, ee = m("rps_c64", "palisade"), m("rps_c64", "envoy")
    if pe and ee:
        goal("max throughput >= 2x Envoy", pe >= 2 * ee, f"{pe / ee:.2f}x (c64)")
    ap, ae = added_latency(rows, "palisade"), added_latency(rows, "envoy")
    for k in ("p50_us", "p99_us"):
        if k in ap and k in ae and ae[k] > 0:
            goal(f"added {k[:3]} latency <= 1/2 Envoy's", ap[k] <= ae[k] / 2, f"{ap[k]:.0f} us vs {ae[k]:.0f} us")
    for role in ("client", "server"):
        p, e = m(f"cpu_paced_{role}", "palisade"), m(f"cpu_paced_{role}", "envoy")
        if p is not None and e:
            goal(f"CPU/1k req ({role}, @rate) <= 1/2 Envoy's", p <= e / 2, f"{p / e:.2f}x")
    for role in ("client", "server"):
        for k, label in (("private", "private memory"), ("rss", "peak RSS")):
            p, e = m(f"{k}_{role}", "palisade"), m(f"{k}_{role}", "envoy")
            if p is not None and e:
                goal(f"{label} ({role}) <= 1/4 Envoy's", p <= e / 4, f"{p / e:.2f}x")
    p, e = m("handshakes", "palisade"), m("handshakes", "envoy")
    if p and e:
        goal("new mTLS connections/s >= Envoy's", p >= e, f"{p / e:.2f}x")
    p, e = m("rps_close", "palisade"), m("rps_close", "envoy")
    if p and e:
        goal("new connection per request >= Envoy's", p >= e, f"{p / e:.2f}x")
    return out


# --------------------------------------------------------------------------------------------
# Main


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) // 1024
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_mib": mem, "kernel": os.uname().release,
            "loadavg_start": open("/proc/loadavg").read().split()[:3]}


def version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--palisade", required=True, type=Path)
    ap.add_argument("--envoy", required=True, type=Path)
    ap.add_argument("--sidecar", type=Path,
                    help="the sidecar binary (default: palisade-sidecar beside --palisade, else `palisade sidecar`)")
    ap.add_argument("--work", required=True, type=Path, help="scratch directory (logs, configs, certs)")
    ap.add_argument("--out", required=True, type=Path, help="results JSON")
    ap.add_argument("--quick", action="store_true", help="one repeat, short runs")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--duration", type=float, help="seconds per throughput run")
    ap.add_argument("--rate", type=int, default=1000, help="requests/s of the latency case")
    ap.add_argument("--min-idle", type=float, default=0.8, help="CPU idle fraction that counts as quiet")
    ap.add_argument("--quiet-timeout", type=float, help="longest wait for quiet before a run (s)")
    ap.add_argument("--envoy-upstream", choices=["h1", "h2"], default="h1",
                    help="protocol between the Envoy sidecars (h1: Istio's default)")
    ap.add_argument("--targets", default="direct,envoy,palisade")
    ap.add_argument("--cases", default=",".join(c for c, _ in CASES),
                    help="cases to run (default: all): " + ", ".join(c for c, _ in CASES))
    args = ap.parse_args()

    plan = Plan(
        duration=args.duration or (3 if args.quick else 10),
        paced_duration=(args.duration or (3 if args.quick else 10)) * 1.5,
        rate=args.rate,
        repeats=args.repeats or (1 if args.quick else 3),
        min_idle=args.min_idle,
        quiet_timeout=args.quiet_timeout if args.quiet_timeout is not None else (10 if args.quick else 15),
    )
    args.work.mkdir(parents=True, exist_ok=True)
    procs = Procs(args.work)
    lean = args.sidecar or args.palisade.resolve().parent / "palisade-sidecar"
    sidecar = [str(lean.resolve())] if lean.is_file() else [str(args.palisade.resolve()), "sidecar"]
    ctx = Ctx(palisade=args.palisade.resolve(), sidecar=sidecar, envoy=args.envoy.resolve(), work=args.work,
              procs=procs, envoy_upstream=args.envoy_upstream)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)

    wanted = args.targets.split(",")
    cases = [(c, d) for c, d in CASES if c in args.cases.split(",")]
    if not cases:
        ap.error(f"--cases: none of {args.cases!r} is a case ({', '.join(c for c, _ in CASES)})")
    targets: dict[str, dict] = {}
    live: dict[str, Target] = {}
    runs: list[dict] = []
    started = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "plan": plan.__dict__,
        "envoy_upstream": args.envoy_upstream,
        "versions": {
            "palisade": version([str(ctx.palisade), "--version"]),
            "sidecar_command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(ctx.sidecar)),
            "envoy": version([str(ctx.envoy), "--version"]),
            "nginx": version(["nginx", "-v"]),
            "wrk": version(["wrk", "-v"]),
            "openssl": version(["openssl", "version"]),
        },
        "git": version(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"]),
    }
    try:
        print(f"bench: work dir {args.work}; Palisade sidecars: {meta['versions']['sidecar_command']}", flush=True)
        live["direct"] = start_nginx(ctx)
        targets["direct"] = {"available": True}
        start_mesh(ctx)
        starters = {"envoy": start_envoy_pair, "palisade": start_palisade_pair}
        for name in ("envoy", "palisade"):
            if name not in wanted:
                targets[name] = {"available": False, "reason": "not selected (--targets)"}
                continue
            try:
                live[name] = starters[name](ctx)
                targets[name] = {"available": True}
                print(f"bench: {name} pair up (policy checked: 200 allowed, 403 denied)", flush=True)
            except Unavailable as e:
                targets[name] = {"available": False, "reason": str(e)}
                print(f"bench: {name} pair NOT AVAILABLE: {e}", flush=True)
        if "direct" not in wanted:
            del live["direct"]
            targets["direct"] = {"available": False, "reason": "not selected (--targets)"}

        # Warm-up: connection pools, caches, allocator arenas.
        for t in live.values():
            run_wrk(t, 64, 2, "wrk-report.lua")

        total = plan.repeats * sum(1 for c, _ in cases for t in live.values() if c != "handshake" or t.tls_server)
        i = 0
        # Interleaved: every repeat measures every case on every target, so drift (other
        # work on the machine) spreads over all targets instead of hitting one.
        for rep in range(plan.repeats):
            for case, _ in cases:
                for name, t in live.items():
                    if case == "handshake" and not t.tls_server:
                        continue
                    i += 1
                    quiet = wait_quiet(plan.min_idle, plan.quiet_timeout)
                    entry = {"target": name, "case": case, "rep": rep, "quiet": quiet}
                    try:
                        entry["result"] = measure(ctx, t, case, plan)
                        r = entry["result"]
                        extra = ""
                        if case == "paced":
                            lat = r["latency_us"]
                            extra = f" p50={lat['p50']}us p90={lat['p90']}us p99={lat['p99']}us late={r['paced']['late']}/{r['paced']['slots']}"
                        errs = f" errors={r['error_count']}" if r["error_count"] else ""
                        for role, sc in r["sidecars"].items():
                            extra += f" cpu/1k {role}={sc['cpu_ms_per_1k']:.0f}ms"
                        print(f"bench: [{i}/{total}] rep {rep + 1} {case:9} {name:8} {r['rps']:>10,.0f} req/s{extra}{errs}"
                              f"  (idle {quiet['idle']:.0%}{'' if quiet['quiet'] else ', NOT quiet'})", flush=True)
                    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                        entry["error"] = str(e)
                        print(f"bench: [{i}/{total}] {case} {name} FAILED: {e}", flush=True)
                    runs.append(entry)

        # Memory per sidecar after all runs: VmHWM is the lifetime peak; the private and
        # anonymous figures are the largest sampled during any run.
        memory_final = {}
        for name, t in live.items():
            for role, pid in t.sidecars.items():
                m = memory(pid)
                sampled = {}
                for r in runs:
                    if r["target"] == name and "result" in r:
                        for k, v in r["result"]["sidecars"][role]["mem_peak_sampled_mib"].items():
                            sampled[k] = max(sampled.get(k, 0), v)
                memory_final[f"{name}/{role}"] = {"final": m, "peak_sampled": sampled}
    finally:
        procs.stop_all()

    rows = metric_rows(runs, targets)
    memrows = []
    for role in ("client", "server"):
        for key, label, f in (
            ("rss", f"peak RSS VmHWM (MiB), {role}", lambda mm: mm["final"].get("VmHWM")),
            ("private", f"private mem peak (MiB), {role}", lambda mm: mm["peak_sampled"].get("Private")),
            ("anon", f"RssAnon peak (MiB), {role}", lambda mm: mm["peak_sampled"].get("RssAnon")),
        ):
            stats = {}
            for name in ("envoy", "palisade"):
                mm = memory_final.get(f"{name}/{role}")
                stats[name] = med([f(mm)]) if mm else None
            memrows.append((f"{key}_{role}", label, stats))

    meta["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    quiet_runs = [r["quiet"] for r in runs]
    meta["quiet"] = {
        "runs": len(quiet_runs),
        "not_quiet": sum(1 for q in quiet_runs if not q["quiet"]),
        "median_idle_before_run": statistics.median([q["idle"] for q in quiet_runs]) if quiet_runs else None,
    }
    goal_lines = goals(rows, memrows, targets)
    doc = {
        "meta": meta,
        "targets": targets,
        "cases": dict(CASES),
        "summary": {k: {"label": label, **{n: s for n, s in stats.items()}} for k, label, stats in rows + memrows},
        "added_latency_us": {n: added_latency(rows, n) for n in ("envoy", "palisade") if targets.get(n, {}).get("available")},
        "memory": memory_final,
        "goals": goal_lines,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")

    print()
    m = meta["machine"]
    print(f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_mib']} MiB; load average at start {' '.join(m['loadavg_start'])}, "
          f"at end {' '.join(m['loadavg_end'])}; {meta['quiet']['not_quiet']} of {meta['quiet']['runs']} runs started "
          f"without a quiet machine (median idle before a run {meta['quiet']['median_idle_before_run']:.0%})")
    print(f"Plan: {plan.repeats} repeat(s), {plan.duration:.0f}s per throughput run, {plan.paced_duration:.0f}s at "
          f"{plan.rate} req/s; Envoy upstream {args.envoy_upstream}. Cells: median [min-max].")
    print()
    print_table(rows, memrows, targets)
    print()
    for name, info in targets.items():
        if not info["available"]:
            print(f"{name}: not available: {info['reason']}")
    for name, lat in doc["added_latency_us"].items():
        print(f"added latency over direct ({name}): " + ", ".join(f"{k[:3]} {v:.0f} us" for k, v in lat.items()))
    print("goals (Palisade pair vs Envoy pair):")
    for g in goal_lines:
        print(g)
    print(f"\nresults: {args.out}")
    failed = [r for r in runs if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
