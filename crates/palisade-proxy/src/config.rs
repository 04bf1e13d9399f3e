//! A pushed [`WorkloadConfig`] turned into what the data path reads: the compiled policy, the
//! inbound ports with their application ports, and the outbound routing table. Built once per
//! push, then shared read-only through an `ArcSwap`, so requests never lock.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use palisade_identity::{SpiffeId, TrustDomain};
use palisade_policy::api::Resource;
use palisade_policy::{CompiledPolicy, MeshSnapshot, PortProtocol};

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
    next: AtomicUsize,
}

impl Route {
    fn new(endpoints: Vec<Upstream>) -> Self {
        Self {
            endpoints,
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
    /// `(lowercase host, port)` to route; hosts are ServiceEntry hosts and workload addresses.
    routes: HashMap<String, HashMap<u16, Route>>,
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
        let mut resources = Vec::with_capacity(
            1 + wire.peer_authentications.len()
                + wire.request_authentications.len()
                + wire.authorization_policies.len(),
        );
        resources.push(Resource::WorkloadEntry(wire.workload_entry.clone()));
        resources.extend(
            wire.peer_authentications
                .iter()
                .cloned()
                .map(Resource::PeerAuthentication),
        );
        resources.extend(
            wire.request_authentications
                .iter()
                .cloned()
                .map(Resource::RequestAuthentication),
        );
        resources.extend(
            wire.authorization_policies
                .iter()
                .cloned()
                .map(Resource::AuthorizationPolicy),
        );
        let snapshot = MeshSnapshot::from_resources(wire.mesh.clone(), resources)?;
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
        let (jwt, jwt_warnings) = crate::jwt::JwtAuthn::build(policy.jwt_rules());
        for w in &jwt_warnings {
            tracing::warn!(workload = %wire.workload, warning = %w, "RequestAuthentication");
        }
        crate::ext_authz::network::log_not_on_tcp(&wire.workload, &policy);
        let wire_mesh = wire.mesh.clone();
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
        })
    }

    /// The route for `host` (a ServiceEntry host or a workload IP, any case) and `port`.
    pub fn route(&self, host: &str, port: u16) -> Option<&Route> {
        let by_port = match self.routes.get(host) {
            Some(r) => r,
            // Hosts are stored lowercase; only mixed-case requests pay for lowercasing.
            None if host.bytes().any(|b| b.is_ascii_uppercase()) => {
                self.routes.get(&host.to_ascii_lowercase())?
            }
            None => return None,
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
        for &port in d.ports.values() {
            let Ok(port) = u16::try_from(port) else {
                continue;
            };
            if let Some(u) = upstream(d, port, td) {
                routes
                    .entry(d.address.to_ascii_lowercase())
                    .or_default()
                    .insert(port, Route::new(vec![u]));
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
            for h in &s.hosts {
                routes
                    .entry(h.to_ascii_lowercase())
                    .or_default()
                    .insert(number, Route::new(endpoints.clone()));
            }
        }
    }
    routes
}
