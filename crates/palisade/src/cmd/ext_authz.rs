//! `palisade ext-authz`: the example external authorizer (Envoy ext_authz over gRPC and HTTP,
//! deciding with a Rego policy). Logic lives in `palisade-ext-authz`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use palisade_ext_authz::RegoAuthorizer;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The Rego policy file.
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    /// The rule that decides: a boolean, or an object {allowed, http_status, headers, body}.
    #[arg(long, value_name = "RULE", default_value = palisade_ext_authz::DEFAULT_DECISION)]
    pub decision: String,
    /// Address of the gRPC `envoy.service.auth.v3.Authorization` server.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9191")]
    pub grpc_listen: SocketAddr,
    /// Address of the HTTP ext_authz server.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8181")]
    pub http_listen: SocketAddr,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let authz = Arc::new(RegoAuthorizer::from_file(&args.policy, &args.decision)?);
    let grpc = tokio::net::TcpListener::bind(args.grpc_listen)
        .await
        .with_context(|| format!("binding {}", args.grpc_listen))?;
    let http = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("binding {}", args.http_listen))?;
    // Tests and scripts read the ports from these lines.
    println!(
        "palisade ext-authz: gRPC listening on {}",
        grpc.local_addr()?
    );
    println!(
        "palisade ext-authz: HTTP listening on {}",
        http.local_addr()?
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let grpc_task = tokio::spawn(palisade_ext_authz::grpc::serve(
        grpc,
        Arc::clone(&authz),
        stopped(stop_rx.clone()),
    ));
    let http_task = tokio::spawn(palisade_ext_authz::http::serve(
        http,
        authz,
        stopped(stop_rx),
    ));
    super::controlplane::shutdown_signal().await;
    let _ = stop_tx.send(true);
    grpc_task.await?.context("gRPC server")?;
    http_task.await?.context("HTTP server")?;
    Ok(ExitCode::SUCCESS)
}
