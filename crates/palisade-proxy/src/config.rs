//! A pushed [`WorkloadConfig`] turned into what the data path reads: the compiled policy, the
//! inbound ports with their application ports, and the outbound routing table. Built once per
//! push, then shared read-only through an `ArcSwap`, so requests never lock.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use palisade_identity::{SpiffeId, TrustDomain};
use palisade_policy::{CompiledPolicy, OutboundTrafficMode, PortProtocol};

use palisade_policy::workload_config::WorkloadConfig;

/// The annotation prefix that maps a workload port to the application's local port:
/// `palisade.dev/app-port-<port>: "<app port>"`.
pub const APP_PORT_ANNOTATION_PREFIX: &str = "palisade.dev/app-port-";

/// Why a pushed config is rejected (the proxy NACKs it and keeps the previous one).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config is for workload {got:?}, this proxy serves {want:?}")]
    WrongWorkload { want: String, got: String },
    #[error("invalid policy:\n{0}")]
    Invalid(#[from] palisade_policy::LoadErrors),
    #[error(transparent)]
    Compile(#[from] palisade_policy::CompileError),
    #[error("workload address {0:?} is not an IP address")]
    Address(String),
    #[error("annotation {key}: {reason}")]
    Annotation { key: String, reason: String },
    #[error("trust domain {0:?}: {1}")]
    TrustDomain(String, String),
}

/// One inbound port: the sidecar listens on `listen` and forwards to `app`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundPort {
    pub name: String,
    pub port: u16,
    /// What the port declares (ServiceEntry `protocol`, else the port name): declared HTTP is
    /// parsed as HTTP, declared TCP is never parsed, only `Unknown` is sniffed.
    pub protocol: PortProtocol,
    pub listen: SocketAddr,
    pub app: SocketAddr,
}

/// Where an outbound connection goes and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `namespace/name` of the destination workload.
    pub key: String,
    pub addr: SocketAddr,
    /// `Some(id)`: mutual TLS, and the server must present exactly this SPIFFE ID.
    pub mtls: Option<SpiffeId>,
}

/// A host:port with its endpoints, picked round-robin without locking.
#[derive(Debug)]
pub struct Route {
    pub endpoints: Vec<Upstream>,
    /// What the port declares (the workload port's name, or the ServiceEntry port's
    /// `protocol`): a captured connection to a declared port is not sniffed.
    pub protocol: PortProtocol,
    next: AtomicUsize,
}

impl Route {
    fn new(endpoints: Vec<Upstream>, protocol: PortProtocol) -> Self {
        Self {
            endpoints,
            protocol,
            next: AtomicUsize::new(0),
        }
    }

    /// The next endpoint.
    pub fn pick(&self) -> Option<&Upstream> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }
}

/// Everything the data path reads, for one config version.
#[derive(Debug)]
pub struct ProxyConfig {
    /// The xDS version this came from.
    pub version: String,
    pub wire: WorkloadConfig,
    pub workload: String,
    pub address: IpAddr,
    pub trust_domain: TrustDomain,
    pub trust_domain_aliases: Vec<TrustDomain>,
    pub policy: CompiledPolicy,
    pub inbound: Vec<InboundPort>,
    /// Decision counters resolved for this policy (set by the proxy when it installs the config).
    pub counters: crate::metrics::DecisionCounters,
    /// JWT authentication of the workload's RequestAuthentication rules (keys inline).
    pub jwt: crate::jwt::JwtAuthn,
    /// The CUSTOM authorizers of the mesh's extension providers.
    pub ext_authz: crate::ext_authz::ExtAuthz,
    /// `(lowercase host, port)` to route; hosts are ServiceEntry hosts and addresses, and
    /// workload addresses (IP addresses in their canonical text form).
    routes: HashMap<String, HashMap<u16, Route>>,
    /// Workload address to its index in `wire.destinations`: a captured connection to any port
    /// of a mesh workload is the mesh's (see [`ProxyConfig::captured_outbound`]).
    workload_addrs: HashMap<IpAddr, usize>,
    /// `outboundTrafficPolicy.mode` of the mesh.
    pub outbound_mode: OutboundTrafficMode,
    /// The names mesh DNS answers for this workload (see [`palisade_dns::table`]).
    pub dns: std::sync::Arc<palisade_dns::NameTable>,
}

/// Where a captured outbound connection goes (see [`ProxyConfig::captured_outbound`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapturedOutbound {
    /// A destination of the mesh: this endpoint, with auto mTLS; `protocol` is what the port
    /// declares (HTTP is parsed as HTTP, TCP never sniffed; only `Unknown` is sniffed).
    Mesh {
        up: Upstream,
        protocol: PortProtocol,
    },
    /// Outside the mesh, or a ServiceEntry without workloads: to the original destination as
    /// plain TCP, without policy (Istio's `PassthroughCluster`).
    Passthrough,
    /// Outside the mesh under `REGISTRY_ONLY`: refused (Istio's `BlackHoleCluster`).
    BlackHole,
}

impl ProxyConfig {
    /// Validates and compiles a pushed config. `app_ports` (from the command line) win over
    /// the WorkloadEntry annotations; a port with neither goes to the same port on 127.0.0.1.
    pub fn build(
        version: String,
        wire: WorkloadConfig,
        expected_workload: &str,
        app_ports: &BTreeMap<u16, u16>,
    ) -> Result<Self, ConfigError> {
        if wire.workload != expected_workload {
            return Err(ConfigError::WrongWorkload {
                want: expected_workload.to_owned(),
                got: wire.workload.clone(),
            });
        }
        let snapshot = wire.snapshot()?;
        let policy = snapshot.compile_workload(&wire.workload)?;

        let entry = &wire.workload_entry;
        let address: IpAddr = entry
            .spec
            .address
            .parse()
            .map_err(|_| ConfigError::Address(entry.spec.address.clone()))?;
        let mut inbound = Vec::new();
        for (name, &port) in &entry.spec.ports {
            let Ok(port) = u16::try_from(port) else {
                continue;
            };
            let key = format!("{APP_PORT_ANNOTATION_PREFIX}{port}");
            let app_port = match app_ports.get(&port) {
                Some(&p) => p,
                None => match entry.metadata.annotations.get(&key) {
                    Some(v) => v.parse().map_err(|_| ConfigError::Annotation {
                        key: key.clone(),
                        reason: format!("{v:?} is not a port number"),
                    })?,
                    None => port,
                },
            };
            let app = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), app_port);
            inbound.push(InboundPort {
                name: name.clone(),
                port,
                protocol: declared_protocol(&wire, name, port),
                listen: SocketAddr::new(address, port),
                app,
            });
        }
        inbound.sort_by_key(|p| p.port);

        let td = |s: &str| {
            TrustDomain::new(s).map_err(|e| ConfigError::TrustDomain(s.to_owned(), e.to_string()))
        };
        let trust_domain = td(&wire.mesh.trust_domain)?;
        let trust_domain_aliases = wire
            .mesh
            .trust_domain_aliases
            .iter()
            .map(|a| td(a))
            .collect::<Result<Vec<_>, _>>()?;

        let routes = build_routes(&wire, &trust_domain);
        let workload_addrs = wire
            .destinations
            .iter()
            .enumerate()
            .filter_map(|(i, d)| Some((parse_ip(&d.address)?, i)))
            .collect();
        let outbound_mode = wire.mesh.outbound_traffic_mode();
        let (jwt, jwt_warnings) = crate::jwt::JwtAuthn::build(policy.jwt_rules());
        for w in &jwt_warnings {
            tracing::warn!(workload = %wire.workload, warning = %w, "RequestAuthentication");
        }
        crate::ext_authz::network::log_not_on_tcp(&wire.workload, &policy);
        let wire_mesh = wire.mesh.clone();
        let dns = std::sync::Arc::new(name_table(&wire));
        Ok(Self {
            version,
            workload: wire.workload.clone(),
            wire,
            address,
            trust_domain,
            trust_domain_aliases,
            policy,
            inbound,
            counters: crate::metrics::DecisionCounters::default(),
            jwt,
            ext_authz: crate::ext_authz::ExtAuthz::build(&wire_mesh),
            routes,
            workload_addrs,
            outbound_mode,
            dns,
        })
    }

    /// Where a captured outbound connection whose original destination is `dst` goes: a
    /// ServiceEntry address or workload address with a route for the port takes that route; any
    /// other port of a mesh workload goes to that workload with auto mTLS (its sidecar serves
    /// undeclared ports too); a ServiceEntry without workloads passes through, being
    /// registered; anything else is outside the mesh and `outboundTrafficPolicy` decides.
    pub fn captured_outbound(&self, dst: SocketAddr) -> CapturedOutbound {
        let ip = palisade_capture::original_dst::canonical_ip(dst.ip());
        if let Some(route) = self.route(&ip.to_string(), dst.port()) {
            return match route.pick() {
                Some(up) => CapturedOutbound::Mesh {
                    up: up.clone(),
                    protocol: route.protocol,
                },
                None => CapturedOutbound::Passthrough,
            };
        }
        let workload = self
            .workload_addrs
            .get(&ip)
            .and_then(|&i| self.wire.destinations.get(i))
            .and_then(|d| upstream(d, dst.port(), &self.trust_domain));
        if let Some(up) = workload {
            // A port the workload does not declare: sniffed.
            return CapturedOutbound::Mesh {
                up,
                protocol: PortProtocol::Unknown,
            };
        }
        match self.outbound_mode {
            OutboundTrafficMode::AllowAny => CapturedOutbound::Passthrough,
            OutboundTrafficMode::RegistryOnly => CapturedOutbound::BlackHole,
        }
    }

    /// The route for `host` (a ServiceEntry host or a workload IP, any case) and `port`.
    pub fn route(&self, host: &str, port: u16) -> Option<&Route> {
        let by_port = match self.routes.get(host) {
            Some(r) => r,
            // Hosts are stored lowercase, addresses canonical; only requests that spell them
            // otherwise pay for the conversion.
            None => {
                let key = host_key(host);
                if key == host {
                    return None;
                }
                self.routes.get(&key)?
            }
        };
        by_port.get(&port)
    }

    /// The inbound port `port`.
    pub fn inbound_port(&self, port: u16) -> Option<&InboundPort> {
        self.inbound.iter().find(|p| p.port == port)
    }

    /// Route keys (`host:port`), for the config dump.
    pub fn route_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .routes
            .iter()
            .flat_map(|(h, ports)| ports.keys().map(move |p| format!("{h}:{p}")))
            .collect();
        keys.sort();
        keys
    }
}

/// The protocol of workload port `port` (named `name`): a ServiceEntry that selects this
/// workload and targets the port with a `protocol` decides (as a Kubernetes Service port's
/// protocol does in Istio), else the port name.
fn declared_protocol(wire: &WorkloadConfig, name: &str, port: u16) -> PortProtocol {
    let from_service = wire
        .services
        .iter()
        .filter(|s| s.endpoints.contains(&wire.workload))
        .flat_map(|s| &s.ports)
        .filter(|p| p.target_port.unwrap_or(p.number) == u32::from(port))
        .find_map(|p| PortProtocol::parse(&p.protocol));
    from_service.unwrap_or_else(|| PortProtocol::from_port_name(name))
}

/// The names of the ServiceEntries of `wire` for mesh DNS: each host with the entry's
/// single-address `addresses`, or with the VIP the control plane allocated to it.
fn name_table(wire: &WorkloadConfig) -> palisade_dns::NameTable {
    let mut table = palisade_dns::NameTable::builder(wire.workload_entry.metadata.namespace());
    for s in &wire.services {
        let declared: Vec<IpAddr> = s.addresses.iter().filter_map(|a| parse_ip(a)).collect();
        for host in &s.hosts {
            let auto = s
                .auto_addresses
                .get(&host.to_ascii_lowercase())
                .map(|&a| IpAddr::V4(a));
            if declared.is_empty() {
                table.host(host, auto);
            } else {
                table.host(host, declared.iter().copied());
            }
        }
    }
    table.build()
}

/// An IP address in config text (a bare address or a single-address CIDR), canonical.
fn parse_ip(text: &str) -> Option<IpAddr> {
    let text = text
        .strip_suffix("/32")
        .or_else(|| text.strip_suffix("/128"))
        .unwrap_or(text);
    text.parse()
        .ok()
        .map(palisade_capture::original_dst::canonical_ip)
}

/// The routing key of a host: IP addresses in canonical text (what a captured connection's
/// address prints as), names lowercase.
fn host_key(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(ip) => palisade_capture::original_dst::canonical_ip(ip).to_string(),
        Err(_) => host.to_ascii_lowercase(),
    }
}

fn upstream(
    d: &palisade_policy::workload_config::Destination,
    port: u16,
    td: &TrustDomain,
) -> Option<Upstream> {
    let ip: IpAddr = d.address.parse().ok()?;
    let mtls = if d.sidecar && !d.plaintext_ports.contains(&port) {
        SpiffeId::for_service_account(td.clone(), &d.namespace, &d.service_account).ok()
    } else {
        None
    };
    Some(Upstream {
        key: d.key.clone(),
        addr: SocketAddr::new(ip, port),
        mtls,
    })
}

fn build_routes(wire: &WorkloadConfig, td: &TrustDomain) -> HashMap<String, HashMap<u16, Route>> {
    let mut routes: HashMap<String, HashMap<u16, Route>> = HashMap::new();
    let by_key: HashMap<&str, &palisade_policy::workload_config::Destination> = wire
        .destinations
        .iter()
        .map(|d| (d.key.as_str(), d))
        .collect();
    // Workload addresses: every declared port.
    for d in &wire.destinations {
        for (name, &port) in &d.ports {
            let Ok(port) = u16::try_from(port) else {
                continue;
            };
            if let Some(u) = upstream(d, port, td) {
                let protocol = PortProtocol::from_port_name(name);
                routes
                    .entry(host_key(&d.address))
                    .or_default()
                    .insert(port, Route::new(vec![u], protocol));
            }
        }
    }
    // ServiceEntry hosts: service port -> target port on each selected workload.
    for s in &wire.services {
        for p in &s.ports {
            let (Ok(number), Ok(target)) = (
                u16::try_from(p.number),
                u16::try_from(p.target_port.unwrap_or(p.number)),
            ) else {
                continue;
            };
            let endpoints: Vec<Upstream> = s
                .endpoints
                .iter()
                .filter_map(|k| by_key.get(k.as_str()))
                .filter_map(|d| upstream(d, target, td))
                .collect();
            let protocol = PortProtocol::parse(&p.protocol).unwrap_or(PortProtocol::Unknown);
            // Hosts by name (explicit clients), addresses (captured connections to the VIP,
            // declared or allocated by the control plane).
            let addresses = s
                .addresses
                .iter()
                .filter_map(|a| parse_ip(a))
                .chain(s.auto_addresses.values().map(|&a| IpAddr::V4(a)));
            let keys = s
                .hosts
                .iter()
                .map(|h| host_key(h))
                .chain(addresses.map(|ip| ip.to_string()));
            for key in keys {
                routes
                    .entry(key)
                    .or_default()
                    .insert(number, Route::new(endpoints.clone(), protocol));
            }
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// `apps/client`, with two peers (one with a sidecar, one without, one port DISABLE) and two
    /// ServiceEntries (one with a VIP over the server, one external with no workloads).
    fn config(mode: Option<&str>) -> ProxyConfig {
        let mut mesh = serde_json::json!({"trustDomain": "cluster.local"});
        if let Some(m) = mode {
            mesh["outboundTrafficPolicy"] = serde_json::json!({"mode": m});
        }
        let doc = serde_json::json!({
            "workload": "apps/client",
            "mesh": mesh,
            "workloadEntry": {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                "metadata": {"name": "client", "namespace": "apps"},
                "spec": {"address": "10.0.0.2", "serviceAccount": "client"}},
            "destinations": [
                {"key": "apps/server", "namespace": "apps", "address": "10.0.0.3",
                 "serviceAccount": "server", "ports": {"http": 8080, "tcp-legacy": 8081},
                 "sidecar": true, "plaintextPorts": [8081]},
                {"key": "apps/bare", "namespace": "apps", "address": "2001:db8::4",
                 "serviceAccount": "bare", "ports": {"http": 80}, "sidecar": false},
            ],
            "services": [
                {"name": "apps/server", "hosts": ["server.apps.svc"], "addresses": ["240.240.0.3"],
                 "ports": [{"number": 80, "targetPort": 8080, "protocol": "HTTP"},
                           {"number": 9000, "targetPort": 8081}], "endpoints": ["apps/server"]},
                {"name": "apps/external", "hosts": ["api.example.com"], "addresses": ["192.0.2.50/32"],
                 "ports": [{"number": 443}]},
                {"name": "apps/auto", "hosts": ["auto.apps.svc"],
                 "autoAddresses": {"auto.apps.svc": "240.240.7.7"},
                 "ports": [{"number": 80, "targetPort": 8080, "protocol": "HTTP"}], "endpoints": ["apps/server"]},
            ],
        });
        let wire: WorkloadConfig = serde_json::from_value(doc).unwrap();
        ProxyConfig::build("1".into(), wire, "apps/client", &BTreeMap::new()).unwrap()
    }

    #[test]
    fn captured_destinations_by_address_and_the_passthrough_policy() {
        use PortProtocol::{Http, Tcp, Unknown};
        let id = Some("spiffe://cluster.local/ns/apps/sa/server");
        let mesh = |addr: &str, id: Option<&str>, protocol: PortProtocol| {
            let key = if addr.contains("2001") {
                "apps/bare"
            } else {
                "apps/server"
            };
            Some(CapturedOutbound::Mesh {
                up: Upstream {
                    key: key.into(),
                    addr: addr.parse().unwrap(),
                    mtls: id.map(|i| SpiffeId::parse(i).unwrap()),
                },
                protocol,
            })
        };
        // `None`: outside the mesh, the policy decides (passthrough, or refused).
        #[rustfmt::skip]
        let cases: Vec<(&str, Option<CapturedOutbound>)> = vec![
            // A workload address on a declared port: its route, mTLS with its identity.
            ("10.0.0.3:8080", mesh("10.0.0.3:8080", id, Http)),
            // A TCP port the workload declares DISABLE: auto mTLS sends plaintext.
            ("10.0.0.3:8081", mesh("10.0.0.3:8081", None, Tcp)),
            // A port it does not declare: still the mesh's (its sidecar serves it), sniffed.
            ("10.0.0.3:9999", mesh("10.0.0.3:9999", id, Unknown)),
            // The same workload seen through an IPv4-mapped address.
            ("[::ffff:10.0.0.3]:8080", mesh("10.0.0.3:8080", id, Http)),
            // A ServiceEntry VIP: service port to target port, the service port's protocol.
            ("240.240.0.3:80", mesh("10.0.0.3:8080", id, Http)),
            ("240.240.0.3:9000", mesh("10.0.0.3:8081", None, Unknown)),
            // A VIP the control plane allocated: routed exactly as a declared one.
            ("240.240.7.7:80", mesh("10.0.0.3:8080", id, Http)),
            ("240.240.7.7:81", None),
            // A workload without a sidecar (IPv6): plaintext, but the mesh's.
            ("[2001:db8::4]:80", mesh("[2001:db8::4]:80", None, Http)),
            // A registered external service without workloads: passed through in both modes.
            ("192.0.2.50:443", Some(CapturedOutbound::Passthrough)),
            // Its VIP on a port it does not declare, and anything unknown.
            ("240.240.0.3:81", None),
            ("192.0.2.50:80", None),
            ("198.51.100.7:443", None),
            ("[2001:db8::99]:443", None),
        ];
        for (mode, outside) in [
            (None, CapturedOutbound::Passthrough),
            (Some("ALLOW_ANY"), CapturedOutbound::Passthrough),
            (Some("REGISTRY_ONLY"), CapturedOutbound::BlackHole),
        ] {
            let cfg = config(mode);
            for (dst, want) in &cases {
                let want = want.clone().unwrap_or_else(|| outside.clone());
                let got = cfg.captured_outbound(dst.parse().unwrap());
                assert_eq!(got, want, "{dst} under {mode:?}");
            }
        }
        assert_eq!(
            config(Some("REGISTRY_ONLY")).outbound_mode,
            OutboundTrafficMode::RegistryOnly
        );
    }

    /// Mesh DNS names: declared addresses win, allocated VIPs otherwise, short forms of
    /// `NAME.NAMESPACE.svc` in the workload's own namespace.
    #[test]
    fn dns_names_of_the_config() {
        let cfg = config(None);
        let v4 = |n: &str| {
            cfg.dns
                .lookup(n)
                .map(|a| a.v4.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        assert_eq!(v4("server.apps.svc").unwrap(), ["240.240.0.3"]);
        assert_eq!(v4("auto.apps.svc").unwrap(), ["240.240.7.7"]);
        assert_eq!(v4("auto").unwrap(), ["240.240.7.7"]);
        assert_eq!(v4("api.example.com").unwrap(), ["192.0.2.50"]);
        assert_eq!(v4("other.example.com"), None);
    }

    /// Explicit clients name workloads by address too: the canonical form is what is stored,
    /// and names stay case-insensitive.
    #[test]
    fn routes_by_name_and_by_canonical_address() {
        let cfg = config(None);
        for (host, port, found) in [
            ("10.0.0.3", 8080, true),
            ("SERVER.apps.svc", 80, true),
            ("240.240.0.3", 80, true),
            ("2001:db8::4", 80, true),
            ("2001:DB8:0::4", 80, true),
            ("10.0.0.3", 9999, false),
            ("api.example.com", 443, true),
        ] {
            assert_eq!(cfg.route(host, port).is_some(), found, "{host}:{port}");
        }
    }
}
