//! `palisade status [--state DIR | DIR]`: every workload of a mesh that `palisade up` runs, read
//! live from its sidecar's admin endpoint: ready or not, certificate expiry, and whether the
//! config it enforces is the one the mesh directory says now (in sync) or an older one.
//!
//! "In sync" compares the config the sidecar holds with the config computed from the mesh
//! directory as it is on disk, so an edit that the control plane rejected (invalid) shows as
//! the mesh directory being invalid, not as every sidecar being stale.
//!
//! Then the control plane's own view (its admin endpoint's `/debug/syncz`): every proxy with an
//! ADS stream, Palisade's sidecars and Envoys alike, with the version pushed, the version
//! ACKed, the last NACK (Envoy's own words) and any config that could not be generated.
//! `palisade status --control-plane-admin ADDR` shows only that, for a mesh not run by `up`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use palisade_control::{ProxyKind, ProxySync, WorkloadConfig};
use serde_json::Value;

use super::up::{STATE_FILE, UpState, UpWorkload, default_state_dir, print_table};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The mesh directory given to `palisade up` (its state directory is derived from it).
    #[arg(value_name = "DIR", conflicts_with_all = ["state", "control_plane_admin"])]
    pub dir: Option<PathBuf>,
    /// Only the proxies connected to this control plane (its `--admin` address).
    #[arg(long, value_name = "ADDR", conflicts_with = "state")]
    pub control_plane_admin: Option<String>,
    /// The state directory given to `palisade up --state`.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One workload's live status.
#[derive(Debug, serde::Serialize)]
struct Row {
    workload: String,
    admin: String,
    ready: bool,
    identity: Option<String>,
    cert_expires: Option<String>,
    config_version: Option<String>,
    /// `Some(true)`: the sidecar enforces what the directory says; `None`: cannot tell.
    in_sync: Option<bool>,
    error: Option<String>,
}

/// The control plane's `/debug/syncz`.
async fn connected_proxies(admin: &str) -> anyhow::Result<Vec<ProxySync>> {
    let (status, body) = super::echo::http_get(admin, "/debug/syncz")
        .await
        .with_context(|| format!("cannot reach the control plane's admin endpoint {admin}"))?;
    anyhow::ensure!(
        status == 200,
        "{admin}/debug/syncz answered {status}: {body}"
    );
    serde_json::from_str(&body).with_context(|| format!("parsing {admin}/debug/syncz"))
}

fn print_proxies(proxies: &[ProxySync]) {
    let short = |t: &str| t.rsplit('.').next().unwrap_or(t).to_owned();
    let mut table = Vec::new();
    for p in proxies {
        let kind = match p.kind {
            ProxyKind::Palisade => "palisade",
            ProxyKind::Envoy => "envoy",
        };
        let mut sync: Vec<String> = p
            .types
            .iter()
            .map(|(t, s)| {
                format!(
                    "{} pushed {} acked {}",
                    short(t),
                    s.pushed_version.as_deref().unwrap_or("-"),
                    s.acked_version.as_deref().unwrap_or("-")
                )
            })
            .collect();
        if sync.is_empty() {
            sync.push("nothing pushed yet".into());
        }
        let problem = p
            .translate_error
            .as_ref()
            .map(|e| format!("NOT GENERATED: {e}"))
            .or_else(|| {
                p.types.iter().find_map(|(t, s)| {
                    Some(format!("NACK {}: {}", short(t), s.last_nack.as_ref()?))
                })
            })
            .unwrap_or_else(|| {
                if p.in_sync() {
                    "in sync".into()
                } else {
                    "pushing".into()
                }
            });
        table.push([
            p.workload.clone(),
            kind.to_owned(),
            sync.join("; "),
            problem,
            p.remote.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    print_table(&["WORKLOAD", "PROXY", "XDS", "STATE", "FROM"], &table);
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(admin) = &args.control_plane_admin {
        let proxies = connected_proxies(admin).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&proxies)?);
        } else if proxies.is_empty() {
            println!("no proxy is connected to the control plane at {admin}");
        } else {
            print_proxies(&proxies);
        }
        return Ok(if proxies.iter().all(ProxySync::in_sync) {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    let state = match (&args.state, &args.dir) {
        (Some(s), _) => s.clone(),
        (None, Some(d)) => default_state_dir(d),
        (None, None) => {
            anyhow::bail!("give the mesh directory or --state DIR (as given to `palisade up`)")
        }
    };
    let file = state.join(STATE_FILE);
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "no mesh running from {} (cannot read {})",
            state.display(),
            file.display()
        )
    })?;
    let up: UpState =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;

    let snapshot = palisade_policy::load_dir(&up.dir);
    let control_plane_up = tokio::net::TcpStream::connect(&up.ca).await.is_ok()
        && tokio::net::TcpStream::connect(&up.xds).await.is_ok();

    // What the control plane says of every ADS stream (older `up` states have no admin).
    let proxies = match &up.controlplane_admin {
        Some(admin) if control_plane_up => connected_proxies(admin).await.ok(),
        _ => None,
    };
    let mut rows = Vec::new();
    for w in &up.workloads {
        if w.is_envoy() {
            rows.push(envoy_row(w, proxies.as_deref()).await);
            continue;
        }
        let expected = snapshot
            .as_ref()
            .ok()
            .and_then(|s| palisade_control::workload_config(s, &w.workload));
        rows.push(workload_row(&w.workload, &w.admin, expected.as_ref()).await);
    }

    let healthy = control_plane_up
        && snapshot.is_ok()
        && rows.iter().all(|r| r.ready && r.in_sync == Some(true))
        && proxies
            .as_ref()
            .is_none_or(|ps| ps.iter().all(ProxySync::in_sync));
    if args.json {
        let doc = serde_json::json!({
            "dir": up.dir,
            "controlPlane": { "ca": up.ca, "xds": up.xds, "up": control_plane_up },
            "meshDirectoryValid": snapshot.is_ok(),
            "workloads": rows,
            "proxies": proxies,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "control plane: CA {} ADS {} ({})",
            up.ca,
            up.xds,
            if control_plane_up { "up" } else { "DOWN" }
        );
        match &snapshot {
            Ok(_) => println!("mesh directory: {} (valid)", up.dir.display()),
            Err(e) => println!(
                "mesh directory: {} is INVALID; sidecars keep the last good config:\n{e}",
                up.dir.display()
            ),
        }
        println!();
        let table: Vec<[String; 6]> = rows
            .iter()
            .map(|r| {
                [
                    r.workload.clone(),
                    if r.ready { "ready" } else { "NOT READY" }.to_owned(),
                    r.cert_expires.clone().unwrap_or_else(|| "-".into()),
                    r.config_version.clone().unwrap_or_else(|| "-".into()),
                    match (r.in_sync, &r.error) {
                        (_, Some(e)) => e.clone(),
                        (Some(true), None) => "in sync".into(),
                        (Some(false), None) => "STALE".into(),
                        (None, None) => "?".into(),
                    },
                    r.admin.clone(),
                ]
            })
            .collect();
        print_table(
            &[
                "WORKLOAD",
                "SIDECAR",
                "CERT EXPIRES",
                "VERSION",
                "CONFIG",
                "ADMIN",
            ],
            &table,
        );
        if let Some(proxies) = &proxies {
            println!();
            println!("connected to the control plane:");
            print_proxies(proxies);
        }
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// An Envoy workload: ready when Envoy says LIVE, its certificate from its agent, in sync when
/// the control plane saw it ACK everything pushed (what the directory says is what the
/// control plane pushes; a refused edit shows as the directory being invalid).
async fn envoy_row(w: &UpWorkload, proxies: Option<&[ProxySync]>) -> Row {
    let mut row = Row {
        workload: w.workload.clone(),
        admin: w.admin.clone(),
        ready: false,
        identity: None,
        cert_expires: None,
        config_version: None,
        in_sync: None,
        error: None,
    };
    match super::echo::http_get(&w.admin, "/ready").await {
        Ok((status, body)) => row.ready = status == 200 && body.trim() == "LIVE",
        Err(_) => {
            row.error = Some("Envoy unreachable".into());
            return row;
        }
    }
    if let Some(agent) = &w.agent_admin
        && let Ok((200, body)) = super::echo::http_get(agent, "/certs").await
    {
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        let leaf = super::up::leaf_of(&v);
        row.identity = leaf["identity"].as_str().map(str::to_owned);
        row.cert_expires = leaf["not_after"].as_str().map(str::to_owned);
    }
    let stream = proxies.and_then(|ps| {
        ps.iter()
            .find(|p| p.kind == ProxyKind::Envoy && p.workload == w.workload)
    });
    match stream {
        Some(p) => {
            row.config_version = p
                .types
                .get(&palisade_control::envoy::listener_type_url())
                .and_then(|t| t.acked_version.clone());
            row.in_sync = Some(p.in_sync());
            if let Some(e) = &p.translate_error {
                row.error = Some(format!("not generated: {e}"));
            }
        }
        None if proxies.is_some() => row.error = Some("no ADS stream to the control plane".into()),
        None => {}
    }
    row
}

async fn workload_row(workload: &str, admin: &str, expected: Option<&WorkloadConfig>) -> Row {
    let mut row = Row {
        workload: workload.to_owned(),
        admin: admin.to_owned(),
        ready: false,
        identity: None,
        cert_expires: None,
        config_version: None,
        in_sync: None,
        error: None,
    };
    match super::echo::http_get(admin, "/ready").await {
        Ok((status, _)) => row.ready = status == 200,
        Err(_) => {
            row.error = Some("sidecar unreachable".into());
            return row;
        }
    }
    if let Ok((200, body)) = super::echo::http_get(admin, "/certs").await {
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        let c = &v["certificates"][0];
        row.identity = c["identity"].as_str().map(str::to_owned);
        row.cert_expires = c["not_after"].as_str().map(str::to_owned);
    }
    if let Ok((200, body)) = super::echo::http_get(admin, "/config_dump").await {
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        row.config_version = v["version"].as_str().map(str::to_owned);
        let held = serde_json::from_value::<WorkloadConfig>(v["pushed"].clone()).ok();
        row.in_sync = match (held, expected) {
            // The sidecar shows its config with secrets redacted: compare like with like.
            (Some(held), Some(expected)) => Some(same_config(held, expected.redacted())),
            _ => None,
        };
    }
    row
}

/// Equal configs, ignoring the JWKS keys the control plane inlines into RequestAuthentications
/// (fetched at run time, so the directory alone cannot predict them).
fn same_config(mut held: WorkloadConfig, mut expected: WorkloadConfig) -> bool {
    let names = |c: &WorkloadConfig| -> Vec<String> {
        c.request_authentications
            .iter()
            .map(|r| format!("{}/{}", r.metadata.namespace(), r.metadata.name))
            .collect()
    };
    let same_jwt = names(&held) == names(&expected);
    held.request_authentications.clear();
    expected.request_authentications.clear();
    same_jwt && held == expected
}
