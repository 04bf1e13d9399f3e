//! `palisade describe workload NS/NAME --config DIR`: the effective mTLS mode per port with the
//! policy that set it, JWT issuers, and authorization policies by action.
//!
//! `palisade describe workload NS/NAME --admin ADDR` reads the same facts live from a running
//! sidecar's admin endpoint (`/config_dump`, `/certs`): what it enforces now, and the certificate
//! it presents.

use std::path::PathBuf;
use std::process::ExitCode;

use super::authz::Output;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Describe one workload of a mesh directory.
    Workload(WorkloadArgs),
}

#[derive(Debug, clap::Args)]
pub struct WorkloadArgs {
    /// The WorkloadEntry, as namespace/name.
    #[arg(value_name = "NS/NAME")]
    pub workload: String,
    /// Mesh directory to read.
    #[arg(long, value_name = "DIR", conflicts_with = "admin")]
    pub config: Option<PathBuf>,
    /// A running sidecar's admin address (e.g. as `palisade up` prints it): describe what it
    /// enforces now.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Workload(args) => match args.admin.clone() {
            Some(admin) => live(&args, &admin).await,
            None => workload(args),
        },
    }
}

fn workload(args: WorkloadArgs) -> anyhow::Result<ExitCode> {
    let Some(dir) = &args.config else {
        anyhow::bail!("--config DIR or --admin ADDR is required");
    };
    let snapshot = palisade_policy::load_dir(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(description) = palisade_policy::describe::describe_workload(&snapshot, &args.workload)
    else {
        let known: Vec<&str> = snapshot.workload_keys().collect();
        anyhow::bail!(
            "workload {:?} is not a WorkloadEntry in {} (known: {})",
            args.workload,
            dir.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&description)?),
        Output::Table => print!("{}", description.to_table()),
    }
    Ok(ExitCode::SUCCESS)
}

/// The live description, from a sidecar's admin endpoint.
async fn live(args: &WorkloadArgs, admin: &str) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    use serde_json::Value;
    let get = async |path: &str| -> anyhow::Result<Value> {
        let (status, body) = super::echo::http_get(admin, path)
            .await
            .with_context(|| format!("no sidecar admin endpoint at {admin}"))?;
        anyhow::ensure!(status == 200, "{admin}{path}: HTTP {status}: {body}");
        serde_json::from_str(&body).with_context(|| format!("{admin}{path}: not JSON"))
    };
    let dump = get("/config_dump").await?;
    let certs = get("/certs").await?;
    let serving = dump["workload"].as_str().unwrap_or("");
    anyhow::ensure!(
        serving == args.workload,
        "the sidecar at {admin} serves {serving:?}, not {:?}",
        args.workload
    );
    let ready = matches!(super::echo::http_get(admin, "/ready").await, Ok((200, _)));
    if args.output == Output::Json {
        let doc = serde_json::json!({
            "workload": serving,
            "ready": ready,
            "configVersion": dump["version"],
            "address": dump["address"],
            "mtls": dump["mtls"],
            "inbound": dump["inbound"],
            "authorizationPolicies": dump["authorizationPolicies"],
            "certificates": certs["certificates"],
            "roots": certs["roots"],
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    println!("workload:       {serving} (live from {admin})");
    println!("ready:          {}", if ready { "yes" } else { "NO" });
    println!("address:        {}", s(&dump["address"]));
    println!("config version: {}", s(&dump["version"]));
    if let Some(c) = dump["capture"].as_object() {
        println!(
            "capture:        inbound port {}, outbound port {}, outboundTrafficPolicy {}",
            s(&c["inboundPort"]),
            s(&c["outboundPort"]),
            s(&c["outboundTrafficPolicy"])
        );
    }
    println!("\nmTLS per port:");
    for p in dump["inbound"].as_array().into_iter().flatten() {
        println!(
            "  {:<6} {:<14} {:<11} -> app {}{}",
            s(&p["port"]),
            s(&p["name"]),
            s(&p["mode"]),
            s(&p["app"]),
            if p["bound"] == Value::Bool(true) {
                ""
            } else {
                "  (not listening)"
            }
        );
    }
    println!("\nauthorization policies (CUSTOM, then DENY, then ALLOW):");
    let policies = dump["authorizationPolicies"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if policies.is_empty() {
        println!("  none: every authenticated request is allowed");
    }
    for action in ["CUSTOM", "DENY", "ALLOW", "AUDIT"] {
        for p in policies
            .iter()
            .filter(|p| p["action"].as_str() == Some(action))
        {
            println!(
                "  {:<6} {}  ({} rules{})",
                action,
                s(&p["id"]),
                s(&p["rules"]),
                if p["dryRun"] == Value::Bool(true) {
                    ", dry run: not enforced"
                } else {
                    ""
                }
            );
        }
    }
    println!("\ncertificate:");
    for c in certs["certificates"].as_array().into_iter().flatten() {
        println!("  identity:   {}", s(&c["identity"]));
        println!("  serial:     {}", s(&c["serial_number"]));
        println!("  valid from: {}", s(&c["not_before"]));
        println!("  valid to:   {}", s(&c["not_after"]));
    }
    for r in certs["roots"].as_array().into_iter().flatten() {
        println!(
            "  root:       {} (serial {})",
            s(&r["subject"]),
            s(&r["serial_number"])
        );
    }
    Ok(ExitCode::SUCCESS)
}
