//! The iptables rules of transparent capture, as data: typed options, the rules palisade wants in
//! one address family's nat table, what it finds there (parsed from `iptables-save`), and the
//! `iptables-restore` document that turns the one into the other. Pure: no process runs here.
//!
//! Palisade owns four chains of the nat table and the two jumps into them:
//!
//! ```text
//! PREROUTING -p tcp -j PALISADE_INBOUND   inbound: excluded ports RETURN, the rest (or only the
//!                                         included ports) go to PALISADE_IN_REDIRECT
//! OUTPUT     -p tcp -j PALISADE_OUTPUT    outbound: the sidecar's own traffic, loopback and
//!                                         exclusions RETURN, the rest goes to PALISADE_REDIRECT
//! PALISADE_IN_REDIRECT                    REDIRECT to the inbound capture port (15006)
//! PALISADE_REDIRECT                       REDIRECT to the outbound capture port (15001)
//! ```
//!
//! With `redirect_dns` (`--redirect-dns`, Istio's flag of the same name), a fifth chain and a
//! third jump send the application's DNS to the sidecar's mesh DNS port (15053):
//!
//! ```text
//! OUTPUT     -p udp -j PALISADE_DNS       UDP: the sidecar's own queries RETURN, port 53 is
//!                                         REDIRECTed to 15053
//! PALISADE_OUTPUT -p tcp --dport 53 -j PALISADE_DNS   TCP, first in PALISADE_OUTPUT (before the
//!                                         loopback RETURNs: a resolver on 127.0.0.53 is captured
//!                                         too); what PALISADE_DNS returns goes on as before
//! ```
//!
//! Nothing else in the table is touched: documents are applied with `--noflush`, declare (and so
//! flush) only palisade's chains, and add or delete only palisade's two jumps. Declaring a chain
//! that exists empties it, which is what makes a second install replace the first instead of
//! adding to it; the jumps, which live in built-in chains, are counted in the current table and
//! only the missing ones added, the extra ones deleted.

use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Inbound TCP, jumped to from `PREROUTING`.
pub const INBOUND_CHAIN: &str = "PALISADE_INBOUND";
/// Redirects to the inbound capture port.
pub const IN_REDIRECT_CHAIN: &str = "PALISADE_IN_REDIRECT";
/// Outbound TCP, jumped to from `OUTPUT`.
pub const OUTPUT_CHAIN: &str = "PALISADE_OUTPUT";
/// Redirects to the outbound capture port.
pub const REDIRECT_CHAIN: &str = "PALISADE_REDIRECT";
/// DNS (UDP and TCP port 53) to the sidecar's mesh DNS port, with `redirect_dns`.
pub const DNS_CHAIN: &str = "PALISADE_DNS";
/// Every chain palisade owns, in the order its documents declare them.
pub const CHAINS: [&str; 5] = [
    INBOUND_CHAIN,
    IN_REDIRECT_CHAIN,
    OUTPUT_CHAIN,
    REDIRECT_CHAIN,
    DNS_CHAIN,
];

/// Where the sidecar accepts redirected inbound connections (Istio's port).
pub const DEFAULT_INBOUND_CAPTURE_PORT: u16 = 15006;
/// Where the sidecar accepts redirected outbound connections (Istio's port).
pub const DEFAULT_OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// Where the sidecar answers redirected DNS (Istio's port).
pub const DEFAULT_DNS_CAPTURE_PORT: u16 = 15053;
/// The uid and gid a sidecar runs as, by Istio's convention (`istio-proxy`, 1337).
pub const DEFAULT_PROXY_ID: u32 = 1337;

/// An address family: `iptables` or `ip6tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The loopback address through which application and sidecar reach each other.
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The source address of the sidecar's inbound passthrough connections to its application
    /// (Istio's convention: 127.0.0.6, and ::6 which the sidecar adds to `lo`). They must reach
    /// the application, not come back to the sidecar.
    fn passthrough_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }

    fn holds(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// Which inbound ports are captured: `*` (all but the excluded ones) or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    All,
    /// Only these (an empty list captures no inbound traffic at all).
    Only(Vec<u16>),
}

impl FromStr for InboundPorts {
    type Err = OptionsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "*" {
            Ok(InboundPorts::All)
        } else {
            parse_ports(s).map(InboundPorts::Only)
        }
    }
}

impl fmt::Display for InboundPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InboundPorts::All => f.write_str("*"),
            InboundPorts::Only(ports) => {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                f.write_str(&list.join(","))
            }
        }
    }
}

/// A wrong capture option, before anything is run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("{text:?} is not a TCP port (1-65535)")]
    BadPort { text: String },
    #[error("{text:?} is not a CIDR (e.g. 10.0.0.0/8) or an IP address")]
    BadCidr { text: String },
    #[error("the {which} capture port is 0")]
    ZeroCapturePort { which: &'static str },
    #[error(
        "the DNS capture port {0} is also a TCP capture port: DNS over TCP would reach the wrong listener"
    )]
    DnsPortClash(u16),
    #[error(
        "the inbound and outbound capture ports are both {0}: the sidecar could not tell the directions apart"
    )]
    SameCapturePorts(u16),
    #[error(
        "no proxy uid or gid: the sidecar's own connections would be captured again, in a loop"
    )]
    NoProxyOwner,
}

/// One port, 1 to 65535.
pub fn parse_port(text: &str) -> Result<u16, OptionsError> {
    match text.trim().parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(OptionsError::BadPort {
            text: text.to_owned(),
        }),
    }
}

/// A comma-separated port list (`80,443`); empty items are ignored, duplicates dropped.
pub fn parse_ports(text: &str) -> Result<Vec<u16>, OptionsError> {
    let mut ports = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let port = parse_port(item)?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

/// A CIDR, or a bare address meaning just that host; host bits are cleared (`10.1.2.3/8` is
/// `10.0.0.0/8`), as iptables would.
pub fn parse_cidr(text: &str) -> Result<IpNet, OptionsError> {
    let trimmed = text.trim();
    if let Ok(net) = trimmed.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    trimmed
        .parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| OptionsError::BadCidr {
            text: text.to_owned(),
        })
}

/// What to capture, as `istio-iptables`' options say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureOptions {
    pub inbound_capture_port: u16,
    pub outbound_capture_port: u16,
    /// The sidecar's uids: their connections are never captured outbound.
    pub proxy_uids: Vec<u32>,
    /// The sidecar's gids, likewise.
    pub proxy_gids: Vec<u32>,
    pub include_inbound_ports: InboundPorts,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    /// Destinations never captured; each goes to the family it belongs to.
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Also redirect the application's DNS (UDP and TCP port 53, any destination) to
    /// `dns_capture_port`, where the sidecar's mesh DNS answers (off by default, as Istio's
    /// `--redirect-dns`).
    pub redirect_dns: bool,
    pub dns_capture_port: u16,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        Self {
            inbound_capture_port: DEFAULT_INBOUND_CAPTURE_PORT,
            outbound_capture_port: DEFAULT_OUTBOUND_CAPTURE_PORT,
            proxy_uids: vec![DEFAULT_PROXY_ID],
            proxy_gids: vec![DEFAULT_PROXY_ID],
            include_inbound_ports: InboundPorts::All,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            redirect_dns: false,
            dns_capture_port: DEFAULT_DNS_CAPTURE_PORT,
        }
    }
}

impl CaptureOptions {
    pub fn validate(&self) -> Result<(), OptionsError> {
        if self.inbound_capture_port == 0 {
            return Err(OptionsError::ZeroCapturePort { which: "inbound" });
        }
        if self.outbound_capture_port == 0 {
            return Err(OptionsError::ZeroCapturePort { which: "outbound" });
        }
        if self.inbound_capture_port == self.outbound_capture_port {
            return Err(OptionsError::SameCapturePorts(self.inbound_capture_port));
        }
        if self.redirect_dns {
            let dns = self.dns_capture_port;
            if dns == 0 {
                return Err(OptionsError::ZeroCapturePort { which: "DNS" });
            }
            if dns == self.inbound_capture_port || dns == self.outbound_capture_port {
                return Err(OptionsError::DnsPortClash(dns));
            }
        }
        if self.proxy_uids.is_empty() && self.proxy_gids.is_empty() {
            return Err(OptionsError::NoProxyOwner);
        }
        let ports = self
            .exclude_inbound_ports
            .iter()
            .chain(&self.exclude_outbound_ports);
        let included = match &self.include_inbound_ports {
            InboundPorts::All => &[][..],
            InboundPorts::Only(p) => p.as_slice(),
        };
        if let Some(zero) = ports.chain(included).find(|p| **p == 0) {
            return Err(OptionsError::BadPort {
                text: zero.to_string(),
            });
        }
        Ok(())
    }

    /// The chains and jumps these options want in `family`'s nat table.
    pub fn ruleset(&self, family: Family) -> Result<Owned, OptionsError> {
        self.validate()?;
        let inbound = self.inbound_rules();
        let captures_inbound = inbound.iter().any(|r| r.ends_with(IN_REDIRECT_CHAIN));
        let mut jumps = Vec::new();
        if captures_inbound {
            jumps.push(jump_inbound());
        }
        jumps.push(jump_outbound());
        let mut chains = vec![
            (INBOUND_CHAIN.to_owned(), inbound),
            (
                IN_REDIRECT_CHAIN.to_owned(),
                vec![format!(
                    "-p tcp -j REDIRECT --to-ports {}",
                    self.inbound_capture_port
                )],
            ),
            (OUTPUT_CHAIN.to_owned(), self.output_rules(family)),
            (
                REDIRECT_CHAIN.to_owned(),
                vec![format!(
                    "-p tcp -j REDIRECT --to-ports {}",
                    self.outbound_capture_port
                )],
            ),
        ];
        if self.redirect_dns {
            chains.push((DNS_CHAIN.to_owned(), self.dns_rules()));
            jumps.push(jump_dns());
        }
        Ok(Owned { chains, jumps })
    }

    /// The sidecar's uids and gids as `owner` match arguments.
    fn owners(&self) -> Vec<String> {
        self.proxy_uids
            .iter()
            .map(|u| format!("--uid-owner {u}"))
            .chain(self.proxy_gids.iter().map(|g| format!("--gid-owner {g}")))
            .collect()
    }

    /// `PALISADE_DNS`: the sidecar's own queries (to the upstream resolvers) go out as they
    /// are; the application's, to any address, go to the mesh DNS port.
    fn dns_rules(&self) -> Vec<String> {
        let port = self.dns_capture_port;
        self.owners()
            .iter()
            .map(|o| format!("-m owner {o} -j RETURN"))
            .chain(
                ["udp", "tcp"].map(|p| format!("-p {p} --dport 53 -j REDIRECT --to-ports {port}")),
            )
            .collect()
    }

    fn inbound_rules(&self) -> Vec<String> {
        let excluded = &self.exclude_inbound_ports;
        match &self.include_inbound_ports {
            InboundPorts::All => excluded
                .iter()
                .map(|p| format!("-p tcp --dport {p} -j RETURN"))
                .chain([format!("-p tcp -j {IN_REDIRECT_CHAIN}")])
                .collect(),
            // An excluded port wins over an included one.
            InboundPorts::Only(ports) => ports
                .iter()
                .filter(|p| !excluded.contains(p))
                .map(|p| format!("-p tcp --dport {p} -j {IN_REDIRECT_CHAIN}"))
                .collect(),
        }
    }

    fn output_rules(&self, family: Family) -> Vec<String> {
        let loopback = family.loopback();
        // DNS over TCP first: to any address, loopback included (a local stub resolver).
        let dns = self
            .redirect_dns
            .then(|| format!("-p tcp --dport 53 -j {DNS_CHAIN}"));
        let mut rules: Vec<String> = dns
            .into_iter()
            .chain(
                self.exclude_outbound_ports
                    .iter()
                    .map(|p| format!("-p tcp --dport {p} -j RETURN")),
            )
            .collect();
        // The sidecar's inbound passthrough to its application (from 127.0.0.6 over lo).
        rules.push(format!(
            "-o lo -s {} -j RETURN",
            family.passthrough_source()
        ));
        let owners = self.owners();
        // The sidecar calling its own workload by a non-loopback address (the pod IP, over lo)
        // goes through inbound capture, so that inbound policy applies to it.
        for owner in &owners {
            rules.push(format!(
                "-o lo ! -d {loopback} -m owner {owner} -j {IN_REDIRECT_CHAIN}"
            ));
        }
        // Anyone else over lo is the application talking to itself: not captured. One rule with
        // every owner negated: "none of the sidecar's uids and gids" (Istio writes one such rule
        // per owner, which lets a second uid's traffic return before its own rule).
        let not_proxy: Vec<String> = owners.iter().map(|o| format!("-m owner ! {o}")).collect();
        rules.push(format!("-o lo {} -j RETURN", not_proxy.join(" ")));
        // The sidecar's own outbound connections: capturing them would loop.
        for owner in &owners {
            rules.push(format!("-m owner {owner} -j RETURN"));
        }
        rules.push(format!("-d {loopback} -j RETURN"));
        for net in self
            .exclude_outbound_cidrs
            .iter()
            .filter(|n| family.holds(n))
        {
            rules.push(format!("-d {net} -j RETURN"));
        }
        rules.push(format!("-j {REDIRECT_CHAIN}"));
        rules
    }
}

/// One rule: the chain it is in and its specification (what follows `-A CHAIN`), whitespace
/// normalized so that rules compare by their words.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub chain: String,
    pub spec: String,
}

impl Rule {
    pub fn new(chain: &str, spec: &str) -> Self {
        Self {
            chain: chain.to_owned(),
            spec: spec.split_whitespace().collect::<Vec<_>>().join(" "),
        }
    }

    /// The chain this rule jumps or goes to, if any.
    pub fn target(&self) -> Option<&str> {
        let words: Vec<&str> = self.spec.split_whitespace().collect();
        words.windows(2).find_map(|w| match w {
            ["-j" | "--jump" | "-g" | "--goto", target] => Some(*target),
            _ => None,
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {} {}", self.chain, self.spec)
    }
}

fn jump_inbound() -> Rule {
    Rule::new("PREROUTING", &format!("-p tcp -j {INBOUND_CHAIN}"))
}

fn jump_outbound() -> Rule {
    Rule::new("OUTPUT", &format!("-p tcp -j {OUTPUT_CHAIN}"))
}

fn jump_dns() -> Rule {
    Rule::new("OUTPUT", &format!("-p udp -j {DNS_CHAIN}"))
}

/// The only rules palisade ever adds outside its own chains (the last only with
/// `redirect_dns`).
pub fn jumps() -> [Rule; 3] {
    [jump_inbound(), jump_outbound(), jump_dns()]
}

/// What palisade owns (or wants) in one family's nat table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    /// Palisade's chains, each with its rules' specifications, in order.
    pub chains: Vec<(String, Vec<String>)>,
    /// Palisade's jumps from the built-in chains (some of [`jumps`]), as many as there are.
    pub jumps: Vec<Rule>,
}

impl Owned {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }
}

/// One family's nat table as palisade sees it: its own part, and what else touches it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub owned: Owned,
    /// Rules palisade did not add, outside its chains, that jump into its chains.
    pub foreign_refs: Vec<Rule>,
    /// iptables' own warnings in the save output (e.g. rules of the other backend present).
    pub warnings: Vec<String>,
}

impl Snapshot {
    /// Reads the nat table out of `iptables-save` output (other tables are ignored; no nat
    /// table means nothing of palisade's is there).
    pub fn parse(save: &str) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let mut in_nat = false;
        for line in save.lines().map(str::trim) {
            if let Some(warning) = line.strip_prefix("# Warning:") {
                snapshot.warnings.push(warning.trim().to_owned());
                continue;
            }
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table.trim() == "nat";
                continue;
            }
            if line == "COMMIT" {
                in_nat = false;
                continue;
            }
            if !in_nat {
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                if CHAINS.contains(&name) {
                    snapshot.owned_chain(name);
                }
                continue;
            }
            let Some(rest) = line.strip_prefix("-A ") else {
                continue;
            };
            let (chain, spec) = rest.trim().split_once(' ').unwrap_or((rest.trim(), ""));
            let rule = Rule::new(chain, spec);
            if CHAINS.contains(&chain) {
                snapshot.owned_chain(chain).push(rule.spec);
            } else if rule.target().is_some_and(|t| CHAINS.contains(&t)) {
                if jumps().contains(&rule) {
                    snapshot.owned.jumps.push(rule);
                } else {
                    snapshot.foreign_refs.push(rule);
                }
            }
        }
        snapshot
    }

    fn owned_chain(&mut self, name: &str) -> &mut Vec<String> {
        let chains = &mut self.owned.chains;
        let index = match chains.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                chains.push((name.to_owned(), Vec::new()));
                chains.len() - 1
            }
        };
        &mut chains[index].1
    }
}

/// Why a document cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "{family}: chain {chain} is referenced by a rule palisade did not add (`{rule}`); remove that rule first"
    )]
    ForeignReference {
        family: Family,
        chain: String,
        rule: Rule,
    },
}

/// The `iptables-restore --noflush` document that turns palisade's part of `current` into
/// `desired` (install: the options' ruleset; uninstall: nothing; rollback: what was there), or
/// `None` when there is nothing of palisade's before or after.
pub fn document(
    family: Family,
    current: &Snapshot,
    desired: &Owned,
) -> Result<Option<String>, PlanError> {
    if current.owned.is_empty() && desired.is_empty() {
        return Ok(None);
    }
    let wanted = |name: &str| desired.chains.iter().any(|(n, _)| n == name);
    let stale: Vec<&str> = current
        .owned
        .chains
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !wanted(n))
        .collect();
    // Deleting a chain that someone else's rule jumps to would fail: say so before trying.
    if let Some(rule) = current
        .foreign_refs
        .iter()
        .find(|r| r.target().is_some_and(|t| stale.contains(&t)))
    {
        return Err(PlanError::ForeignReference {
            family,
            chain: rule.target().unwrap_or_default().to_owned(),
            rule: rule.clone(),
        });
    }

    let mut doc = String::new();
    let what = if desired.is_empty() {
        "remove palisade's chains and jumps"
    } else {
        "palisade's chains, replaced whole, and jumps"
    };
    // Writing to a String cannot fail.
    let _ = writeln!(
        doc,
        "# palisade iptables: {family} nat table, {what} (applied with --noflush: nothing else changes)"
    );
    doc.push_str("*nat\n");
    // Declaring a chain creates it, or empties it when it exists (with --noflush too).
    for (name, _) in &desired.chains {
        let _ = writeln!(doc, ":{name} - [0:0]");
    }
    for name in &stale {
        let _ = writeln!(doc, ":{name} - [0:0]");
    }
    let mut add_jumps = Vec::new();
    for jump in jumps() {
        let have = current.owned.jumps.iter().filter(|j| **j == jump).count();
        let want = desired.jumps.iter().filter(|j| **j == jump).count();
        for _ in want..have {
            let _ = writeln!(doc, "-D {} {}", jump.chain, jump.spec);
        }
        for _ in have..want {
            add_jumps.push(jump.clone());
        }
    }
    for (name, rules) in &desired.chains {
        for spec in rules {
            let _ = writeln!(doc, "-A {name} {spec}");
        }
    }
    for jump in add_jumps {
        let _ = writeln!(doc, "{jump}");
    }
    for name in &stale {
        let _ = writeln!(doc, "-X {name}");
    }
    doc.push_str("COMMIT\n");
    Ok(Some(doc))
}

#[cfg(test)]
mod tests;
