//! `palisade status [--state DIR | DIR]`: every workload of a mesh that `palisade up` runs, read
//! live from its sidecar's admin endpoint: ready or not, certificate expiry, and whether the
//! config it enforces is the one the mesh directory says now (in sync) or an older one.
//!
//! "In sync" compares the config the sidecar holds with the config computed from the mesh
//! directory as it is on disk, so an edit that the control plane rejected (invalid) shows as
//! the mesh directory being invalid, not as every sidecar being stale.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use palisade_control::WorkloadConfig;
use serde_json::Value;

use super::up::{STATE_FILE, UpState, default_state_dir, print_table};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The mesh directory given to `palisade up` (its state directory is derived from it).
    #[arg(value_name = "DIR", conflicts_with = "state")]
    pub dir: Option<PathBuf>,
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

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
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

    let mut rows = Vec::new();
    for w in &up.workloads {
        let expected = snapshot
            .as_ref()
            .ok()
            .and_then(|s| palisade_control::workload_config(s, &w.workload));
        rows.push(workload_row(&w.workload, &w.admin, expected.as_ref()).await);
    }

    let healthy = control_plane_up
        && snapshot.is_ok()
        && rows.iter().all(|r| r.ready && r.in_sync == Some(true));
    if args.json {
        let doc = serde_json::json!({
            "dir": up.dir,
            "controlPlane": { "ca": up.ca, "xds": up.xds, "up": control_plane_up },
            "meshDirectoryValid": snapshot.is_ok(),
            "workloads": rows,
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
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
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
