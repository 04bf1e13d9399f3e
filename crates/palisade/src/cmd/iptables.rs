//! `palisade iptables install|uninstall`: transparent capture for the network namespace it runs
//! in (run it in the workload's: `ip netns exec NS palisade iptables install`, or from a pod's
//! init container), as `istio-iptables` does for Istio. The rules, and applying them, live in
//! `palisade-capture`; this module parses arguments, picks the backend and families, and reports.

use std::process::ExitCode;

use anyhow::Context;
use palisade_capture::iptables::{self, Plan};
use palisade_capture::rules::{
    DEFAULT_DNS_CAPTURE_PORT, DEFAULT_INBOUND_CAPTURE_PORT, DEFAULT_OUTBOUND_CAPTURE_PORT,
    DEFAULT_PROXY_ID,
};
use palisade_capture::{Backend, CaptureOptions, Family, InboundPorts, IpNet, Snapshot};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Redirect this network namespace's TCP to the sidecar: inbound to its inbound capture
    /// port, outbound to its outbound capture port. Run again, it replaces its own rules.
    Install(InstallArgs),
    /// Remove what install added (palisade's chains and jumps), and nothing else.
    Uninstall(CommonArgs),
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BackendArg {
    /// What `iptables --version` says (nf_tables or legacy).
    Auto,
    Nft,
    Legacy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6Arg {
    /// When the namespace has IPv6.
    Auto,
    On,
    Off,
}

#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// Which iptables to use; rules made with one backend are invisible to the other.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// Also capture (or remove) IPv6, with ip6tables.
    #[arg(long, value_enum, default_value_t = Ipv6Arg::Auto)]
    pub ipv6: Ipv6Arg,
    /// Print the iptables-restore document for each family instead of applying it.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Where the sidecar accepts redirected inbound connections.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_INBOUND_CAPTURE_PORT)]
    pub inbound_capture_port: u16,
    /// Where the sidecar accepts redirected outbound connections.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_OUTBOUND_CAPTURE_PORT)]
    pub outbound_capture_port: u16,
    /// The sidecar's uid(s): their connections are never captured (comma-separated).
    #[arg(long, value_name = "UID", value_delimiter = ',', default_values_t = [DEFAULT_PROXY_ID])]
    pub proxy_uid: Vec<u32>,
    /// The sidecar's gid(s), likewise.
    #[arg(long, value_name = "GID", value_delimiter = ',', default_values_t = [DEFAULT_PROXY_ID])]
    pub proxy_gid: Vec<u32>,
    /// Inbound ports to capture: `*` for every port but the excluded ones, or a comma-separated
    /// list ('' captures no inbound traffic).
    #[arg(long, value_name = "PORTS", default_value = "*")]
    pub include_inbound_ports: InboundPorts,
    /// Inbound ports never captured (comma-separated).
    #[arg(long, value_name = "PORTS", value_delimiter = ',', value_parser = port)]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports never captured (comma-separated).
    #[arg(long, value_name = "PORTS", value_delimiter = ',', value_parser = port)]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations never captured: CIDRs or addresses, IPv4 or IPv6 (comma-separated).
    #[arg(long, value_name = "CIDRS", value_delimiter = ',', value_parser = cidr)]
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Also redirect the application's DNS (UDP and TCP port 53, to any address) to the
    /// sidecar's mesh DNS (`palisade sidecar --capture` listens on 15053), the proxy's own
    /// uid/gid excepted (Istio's `--redirect-dns`). Off by default: without it DNS is not
    /// touched.
    #[arg(long)]
    pub redirect_dns: bool,
    /// Where the sidecar answers redirected DNS (with --redirect-dns).
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_DNS_CAPTURE_PORT, requires = "redirect_dns")]
    pub dns_capture_port: u16,
}

fn port(text: &str) -> Result<u16, String> {
    palisade_capture::rules::parse_port(text).map_err(|e| e.to_string())
}

fn cidr(text: &str) -> Result<IpNet, String> {
    palisade_capture::rules::parse_cidr(text).map_err(|e| e.to_string())
}

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Install(args) => install(args),
        Command::Uninstall(args) => uninstall(&args),
    }
}

fn install(args: InstallArgs) -> anyhow::Result<ExitCode> {
    let options = CaptureOptions {
        inbound_capture_port: args.inbound_capture_port,
        outbound_capture_port: args.outbound_capture_port,
        proxy_uids: args.proxy_uid,
        proxy_gids: args.proxy_gid,
        include_inbound_ports: args.include_inbound_ports,
        exclude_inbound_ports: args.exclude_inbound_ports,
        exclude_outbound_ports: args.exclude_outbound_ports,
        exclude_outbound_cidrs: args.exclude_outbound_cidrs,
        redirect_dns: args.redirect_dns,
        dns_capture_port: args.dns_capture_port,
    };
    options.validate()?;
    let common = &args.common;
    let families = families(common.ipv6);
    if common.dry_run {
        let backend = dry_run_backend(common.backend);
        let plans = families
            .iter()
            .map(|&family| {
                let before = dry_run_snapshot(backend, family);
                iptables::install_plan(&options, backend, family, before)
            })
            .collect::<Result<Vec<_>, _>>()?;
        print_documents(&plans);
        return Ok(ExitCode::SUCCESS);
    }
    let backend = backend(common.backend)?;
    let plans = iptables::plan_install(&options, backend, &families)?;
    warn_about(&plans);
    iptables::apply(&plans)?;
    let owners: Vec<String> = options
        .proxy_uids
        .iter()
        .map(|u| format!("uid {u}"))
        .chain(options.proxy_gids.iter().map(|g| format!("gid {g}")))
        .collect();
    println!(
        "palisade iptables: capture installed ({}, {}): inbound TCP ports {} -> {}, outbound TCP -> \
         {}{}; not captured: {}, loopback{}{}{}",
        backend.name(),
        names(&families),
        options.include_inbound_ports,
        options.inbound_capture_port,
        options.outbound_capture_port,
        if options.redirect_dns {
            format!(
                ", DNS (UDP and TCP port 53) -> {}",
                options.dns_capture_port
            )
        } else {
            String::new()
        },
        owners.join(", "),
        list(", inbound ports ", &options.exclude_inbound_ports),
        list(", outbound ports ", &options.exclude_outbound_ports),
        list(", destinations ", &options.exclude_outbound_cidrs),
    );
    Ok(ExitCode::SUCCESS)
}

fn uninstall(common: &CommonArgs) -> anyhow::Result<ExitCode> {
    let families = families(common.ipv6);
    if common.dry_run {
        let backend = dry_run_backend(common.backend);
        let plans = families
            .iter()
            .map(|&family| {
                iptables::uninstall_plan(backend, family, dry_run_snapshot(backend, family))
            })
            .collect::<Result<Vec<_>, _>>()?;
        print_documents(&plans);
        return Ok(ExitCode::SUCCESS);
    }
    let backend = backend(common.backend)?;
    let plans = iptables::plan_uninstall(backend, &families)?;
    warn_about(&plans);
    iptables::apply(&plans)?;
    let removed: Vec<Family> = plans
        .iter()
        .filter(|p| p.document.is_some())
        .map(|p| p.family)
        .collect();
    if removed.is_empty() {
        println!(
            "palisade iptables: nothing of palisade's to remove ({}, {})",
            backend.name(),
            names(&families)
        );
    } else {
        println!(
            "palisade iptables: capture removed ({}, {})",
            backend.name(),
            names(&removed)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn families(ipv6: Ipv6Arg) -> Vec<Family> {
    let v6 = match ipv6 {
        Ipv6Arg::On => true,
        Ipv6Arg::Off => false,
        Ipv6Arg::Auto => iptables::ipv6_present(),
    };
    if v6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

fn backend(arg: BackendArg) -> anyhow::Result<Backend> {
    Ok(match arg {
        BackendArg::Nft => Backend::Nft,
        BackendArg::Legacy => Backend::Legacy,
        BackendArg::Auto => Backend::detect().context("choosing the iptables backend")?,
    })
}

/// A dry run shows the document even where iptables cannot be asked (not installed, not root):
/// then it assumes nf_tables and a table without palisade's rules, and says so.
fn dry_run_backend(arg: BackendArg) -> Backend {
    backend(arg).unwrap_or_else(|e| {
        eprintln!("# {e:#}; assuming nf_tables");
        Backend::Nft
    })
}

fn dry_run_snapshot(backend: Backend, family: Family) -> Snapshot {
    match iptables::save(backend, family) {
        Ok(text) => Snapshot::parse(&text),
        Err(e) => {
            eprintln!(
                "# {family}: cannot read the nat table ({e}); assuming none of palisade's rules"
            );
            Snapshot::default()
        }
    }
}

fn print_documents(plans: &[Plan]) {
    for plan in plans {
        let binary = plan.backend.restore_binary(plan.family);
        match &plan.document {
            Some(document) => print!("# apply with: {binary} --noflush\n{document}"),
            None => println!("# {}: nothing of palisade's to change", plan.family),
        }
    }
}

/// iptables' own warnings, e.g. rules of the other backend present: capture made with this one
/// would not see them.
fn warn_about(plans: &[Plan]) {
    for plan in plans {
        for warning in &plan.before.warnings {
            tracing::warn!("{}: {warning}", plan.backend.save_binary(plan.family));
        }
    }
}

fn names(families: &[Family]) -> String {
    families
        .iter()
        .map(Family::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}

fn list<T: std::fmt::Display>(label: &str, items: &[T]) -> String {
    if items.is_empty() {
        return String::new();
    }
    let items: Vec<String> = items.iter().map(T::to_string).collect();
    format!("{label}{}", items.join(","))
}
