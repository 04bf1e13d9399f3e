//! Per-workload config: what one proxy gets from a validated mesh snapshot, including the
//! virtual IPs of ServiceEntries without `addresses` ([`service_vips`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

use palisade_dns::vip;
use palisade_policy::MeshSnapshot;
use palisade_policy::api::{MtlsMode, WorkloadEntry};
use palisade_xds::Change;

use crate::wire::{Destination, Service, ServicePort, WORKLOAD_CONFIG_TYPE_URL, WorkloadConfig};

/// The annotation that says a workload has no sidecar (Istio's injection switch).
pub const SIDECAR_INJECT_ANNOTATION: &str = "sidecar.istio.io/inject";

/// The config of the WorkloadEntry `namespace/name`, `None` when it does not exist.
pub fn workload_config(snapshot: &MeshSnapshot, key: &str) -> Option<WorkloadConfig> {
    let own = snapshot.workload(key)?;
    let ns = own.resource.metadata.namespace();
    let root = snapshot.mesh.root_namespace.as_str();
    // Resolution only ever looks at the workload's namespace and the root namespace.
    let in_scope = |n: &str| n == ns || n == root;
    Some(WorkloadConfig {
        workload: key.to_owned(),
        mesh: snapshot.mesh.clone(),
        workload_entry: (*own.resource).clone(),
        peer_authentications: snapshot
            .peer_authentications
            .iter()
            .filter(|p| in_scope(p.resource.metadata.namespace()))
            .map(|p| (*p.resource).clone())
            .collect(),
        request_authentications: snapshot
            .request_authentications
            .iter()
            .filter(|p| in_scope(p.resource.metadata.namespace()))
            .map(|p| (*p.resource).clone())
            .collect(),
        authorization_policies: snapshot
            .authorization_policies
            .iter()
            .filter(|p| in_scope(p.resource.metadata.namespace()))
            .map(|p| (*p.resource).clone())
            .collect(),
        destinations: destinations(snapshot),
        services: services(snapshot),
    })
}

fn has_sidecar(w: &WorkloadEntry) -> bool {
    w.metadata
        .annotations
        .get(SIDECAR_INJECT_ANNOTATION)
        .is_none_or(|v| !v.eq_ignore_ascii_case("false"))
}

fn destinations(snapshot: &MeshSnapshot) -> Vec<Destination> {
    snapshot
        .workload_entries
        .iter()
        .map(|w| {
            let we = &w.resource;
            let key = we.key();
            let mut plaintext_ports = Vec::new();
            if let Some(resolved) = snapshot.resolve_workload(&key) {
                for &port in we.spec.ports.values() {
                    let Ok(port) = u16::try_from(port) else {
                        continue;
                    };
                    if resolved.mtls.for_port(port).mode == MtlsMode::Disable {
                        plaintext_ports.push(port);
                    }
                }
            }
            plaintext_ports.sort_unstable();
            plaintext_ports.dedup();
            Destination {
                key,
                namespace: we.metadata.namespace().to_owned(),
                address: we.spec.address.clone(),
                service_account: we.service_account().to_owned(),
                ports: we.spec.ports.clone(),
                sidecar: has_sidecar(we),
                plaintext_ports,
            }
        })
        .collect()
}

/// Whether a ServiceEntry gets virtual IPs: it declares no `addresses` and selects mesh
/// workloads (its endpoints are the mesh's, so a connection to the VIP has somewhere to go). An
/// external ServiceEntry without addresses gets none: its hosts resolve as the world says and
/// its connections pass through, as before.
fn wants_vips(se: &palisade_policy::api::ServiceEntry) -> bool {
    se.spec.addresses.is_empty()
        && se
            .spec
            .workload_selector
            .as_ref()
            .is_some_and(|s| !s.labels.is_empty())
}

/// A host that can have an address of its own (not a wildcard, not an address).
fn nameable(host: &str) -> bool {
    !host.contains('*') && host.parse::<IpAddr>().is_err()
}

/// What this control plane handed out so far, so that adding a ServiceEntry never moves another
/// one's VIP even when their hashes collide (see [`palisade_dns::vip`]). A process that starts
/// (a restart, `palisade status`) allocates from scratch: the same addresses, except where
/// hashes collided and sorted order settles them.
static ALLOCATED: Mutex<BTreeMap<String, Ipv4Addr>> = Mutex::new(BTreeMap::new());

/// The virtual IP of every host of a ServiceEntry that [wants one](wants_vips), by lowercase
/// host, from 240.240.0.0/16, never an address (or in a CIDR) the mesh declares.
pub fn service_vips(snapshot: &MeshSnapshot) -> BTreeMap<String, Ipv4Addr> {
    let hosts: Vec<&str> = snapshot
        .service_entries
        .iter()
        .filter(|s| wants_vips(&s.resource))
        .flat_map(|s| s.resource.spec.hosts.iter().map(String::as_str))
        .filter(|h| nameable(h))
        .collect();
    if hosts.is_empty() {
        return BTreeMap::new();
    }
    let declared = snapshot
        .service_entries
        .iter()
        .flat_map(|s| s.resource.spec.addresses.iter())
        .chain(
            snapshot
                .workload_entries
                .iter()
                .map(|w| &w.resource.spec.address),
        );
    let reserved: Vec<ipnet::IpNet> = declared
        .filter_map(|a| {
            a.parse::<ipnet::IpNet>()
                .ok()
                .or_else(|| a.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
        })
        .collect();
    let mut memory = ALLOCATED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let vips = vip::allocate(hosts, &reserved, &memory);
    // Remember what is in use now, and what was before (a host removed and added back gets
    // its address again while nothing else took it); a remembered address now another host's
    // is forgotten, so that the removed host, back, cannot claim it.
    let in_use: std::collections::BTreeSet<Ipv4Addr> = vips.values().copied().collect();
    memory.retain(|h, a| vips.get(h) == Some(a) || !in_use.contains(a));
    memory.extend(vips.iter().map(|(h, a)| (h.clone(), *a)));
    if memory.len() > 4 * vips.len().max(1024) {
        memory.retain(|h, _| vips.contains_key(h));
    }
    vips
}

fn services(snapshot: &MeshSnapshot) -> Vec<Service> {
    let vips = service_vips(snapshot);
    snapshot
        .service_entries
        .iter()
        .map(|s| {
            let se = &s.resource;
            let ns = se.metadata.namespace();
            let endpoints = match &se.spec.workload_selector {
                Some(sel) if !sel.labels.is_empty() => snapshot
                    .workload_entries
                    .iter()
                    .filter(|w| {
                        w.resource.metadata.namespace() == ns
                            && sel
                                .labels
                                .iter()
                                .all(|(k, v)| w.resource.spec.labels.get(k) == Some(v))
                    })
                    .map(|w| w.resource.key())
                    .collect(),
                _ => Vec::new(),
            };
            Service {
                name: format!("{ns}/{}", se.metadata.name),
                hosts: se.spec.hosts.clone(),
                addresses: se.spec.addresses.clone(),
                auto_addresses: if wants_vips(se) {
                    se.spec
                        .hosts
                        .iter()
                        .filter_map(|h| {
                            let h = h.to_ascii_lowercase();
                            vips.get(&h).map(|a| (h, *a))
                        })
                        .collect()
                } else {
                    BTreeMap::new()
                },
                ports: se
                    .spec
                    .ports
                    .iter()
                    .map(|p| ServicePort {
                        number: p.number,
                        target_port: p.target_port,
                        protocol: p.protocol.clone(),
                    })
                    .collect(),
                endpoints,
            }
        })
        .collect()
}

/// The ADS resources of a whole snapshot: one [`WorkloadConfig`] per WorkloadEntry, plus
/// removals for the `previous` names that are gone. Returns the changes and the new names.
pub fn workload_resources(
    snapshot: &MeshSnapshot,
    previous: &[String],
) -> Result<(Vec<Change>, Vec<String>), serde_json::Error> {
    let mut changes = Vec::new();
    let keys: Vec<String> = snapshot.workload_keys().map(str::to_owned).collect();
    for key in &keys {
        if let Some(cfg) = workload_config(snapshot, key) {
            changes.push(Change::Set {
                type_url: WORKLOAD_CONFIG_TYPE_URL.to_owned(),
                name: key.clone(),
                body: crate::wire::to_any(&cfg)?,
            });
        }
    }
    for gone in previous.iter().filter(|k| !keys.contains(k)) {
        changes.push(Change::Remove {
            type_url: WORKLOAD_CONFIG_TYPE_URL.to_owned(),
            name: gone.clone(),
        });
    }
    Ok((changes, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "trustDomain: cluster.local\n";
    const FILES: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web, namespace: shop}
spec: {address: 127.0.10.1, serviceAccount: web, ports: {http: 8080}, labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: db, namespace: data, annotations: {sidecar.istio.io/inject: "false"}}
spec: {address: 127.0.10.2, serviceAccount: db, ports: {tcp: 5432}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: legacy, namespace: shop}
spec: {address: 127.0.10.3, serviceAccount: legacy, ports: {http: 8080, admin: 9090}, labels: {app: legacy}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: legacy, namespace: shop}
spec:
  selector: {matchLabels: {app: legacy}}
  mtls: {mode: STRICT}
  portLevelMtls: {"9090": {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other, namespace: elsewhere}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: shop-allow, namespace: shop}
spec: {rules: [{}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop]
  ports: [{number: 80, targetPort: 8080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: web}}
"#;

    fn snapshot() -> MeshSnapshot {
        MeshSnapshot::from_sources(
            Some(("mesh.yaml", MESH)),
            &[("w.yaml".to_owned(), FILES.to_owned())],
        )
        .unwrap()
    }

    #[test]
    fn config_holds_in_scope_policies_and_destinations() {
        let s = snapshot();
        let cfg = workload_config(&s, "shop/web").unwrap();
        assert_eq!(cfg.workload_entry.spec.address, "127.0.10.1");
        let ap: Vec<_> = cfg
            .authorization_policies
            .iter()
            .map(|p| p.metadata.name.as_str())
            .collect();
        assert_eq!(
            ap,
            ["shop-allow"],
            "policies of other namespaces are not sent"
        );
        let by_key = |k: &str| {
            cfg.destinations
                .iter()
                .find(|d| d.key == k)
                .unwrap()
                .clone()
        };
        assert!(!by_key("data/db").sidecar);
        assert!(by_key("shop/web").sidecar);
        assert_eq!(by_key("shop/legacy").plaintext_ports, vec![9090]);
        assert_eq!(cfg.services[0].endpoints, vec!["shop/web".to_owned()]);
        assert_eq!(cfg.services[0].ports[0].target_port, Some(8080));
        assert!(workload_config(&s, "shop/none").is_none());
    }

    /// ServiceEntries without addresses that select workloads get a VIP per host, in
    /// 240.240.0.0/16; declared addresses and external entries get none; adding an entry keeps
    /// the others' VIPs.
    #[test]
    fn service_entries_without_addresses_get_stable_vips() {
        let extra = |more: &str| {
            MeshSnapshot::from_sources(
                Some(("mesh.yaml", MESH)),
                &[("w.yaml".to_owned(), format!("{FILES}{more}"))],
            )
            .unwrap()
        };
        let declared = "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: shop}
spec:
  hosts: [legacy.shop.svc]
  addresses: [240.240.0.0/17]
  ports: [{number: 80, targetPort: 8080}]
  workloadSelector: {labels: {app: legacy}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external, namespace: shop}
spec:
  hosts: [api.example.com]
  ports: [{number: 443}]
";
        let before = extra(declared);
        let cfg = workload_config(&before, "shop/web").unwrap();
        let by_name = |cfg: &WorkloadConfig, n: &str| {
            cfg.services
                .iter()
                .find(|s| s.name == n)
                .unwrap()
                .auto_addresses
                .clone()
        };
        let web = by_name(&cfg, "shop/web");
        let vip = web["web.shop"];
        assert!(palisade_dns::VIP_NET.contains(&vip));
        // Not inside the declared 240.240.0.0/17.
        assert!(vip.octets()[2] >= 128, "{vip}");
        assert!(by_name(&cfg, "shop/legacy").is_empty());
        assert!(by_name(&cfg, "shop/external").is_empty());
        // Every workload is told the same.
        assert_eq!(
            by_name(&workload_config(&before, "data/db").unwrap(), "shop/web"),
            web
        );

        let added = extra(&format!(
            "{declared}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: more, namespace: shop}}
spec:
  hosts: [a.shop.svc, b.shop.svc, '*.wild.shop']
  ports: [{{number: 80}}]
  workloadSelector: {{labels: {{app: web}}}}
"
        ));
        let after = workload_config(&added, "shop/web").unwrap();
        assert_eq!(by_name(&after, "shop/web"), web);
        let more = by_name(&after, "shop/more");
        assert_eq!(
            more.keys().collect::<Vec<_>>(),
            ["a.shop.svc", "b.shop.svc"]
        );
        assert!(!more.values().any(|a| *a == vip));
    }

    #[test]
    fn resources_round_trip_and_removals() {
        let s = snapshot();
        let (changes, keys) =
            workload_resources(&s, &["gone/x".to_owned(), "shop/web".to_owned()]).unwrap();
        assert_eq!(keys.len(), 3);
        let mut sets = 0;
        let mut removed = Vec::new();
        for c in &changes {
            match c {
                Change::Set { name, body, .. } => {
                    sets += 1;
                    let back = crate::wire::from_any(body).unwrap();
                    assert_eq!(&back.workload, name);
                    assert_eq!(back, workload_config(&s, name).unwrap());
                }
                Change::Remove { name, .. } => removed.push(name.clone()),
            }
        }
        assert_eq!(sets, 3);
        assert_eq!(removed, vec!["gone/x".to_owned()]);
    }
}
