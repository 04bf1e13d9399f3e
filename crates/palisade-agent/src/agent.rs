//! The whole agent wired together: secret manager fed by the CA, SDS server on a Unix socket,
//! admin endpoint, optional certificate files. `palisade agent` and `palisade up` start it
//! with [`Agent::start`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::ca::{CaSource, CaSourceConfig};
use crate::manager::{ManagerConfig, SecretHandle, SecretWatch};
use crate::metrics::AgentMetrics;
use crate::sds::{SdsError, SdsServer};
use crate::token::TokenError;

/// Everything the agent needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// CA, token, identity and key settings.
    pub ca: CaSourceConfig,
    /// Where to serve SDS.
    pub sds_socket: PathBuf,
    /// Admin endpoint address (port 0 picks one; see [`Agent::admin_addr`]).
    pub admin_addr: SocketAddr,
    /// Also write the certificate files here (the key included).
    pub write_certs: Option<PathBuf>,
    /// Rotation and retry schedule.
    pub manager: ManagerConfig,
}

/// Starting the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The token is unusable at start-up (later failures are retried instead).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The CA root is unusable.
    #[error("CA root: {0}")]
    Root(String),
    /// The SDS socket could not be served.
    #[error(transparent)]
    Sds(#[from] SdsError),
    /// The admin address could not be bound.
    #[error("cannot listen on admin address {addr}: {cause}")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// Why.
        cause: std::io::Error,
    },
}

/// A running agent. [`Agent::shutdown`] stops it; dropping it aborts its tasks.
#[derive(Debug)]
pub struct Agent {
    secrets: SecretHandle,
    metrics: AgentMetrics,
    admin_addr: SocketAddr,
    sds_socket: PathBuf,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Checks the configuration, binds the SDS socket and the admin address, and starts
    /// getting the first certificate (retrying while the CA is unreachable).
    pub async fn start(config: AgentConfig) -> Result<Self, AgentError> {
        let roots = palisade_identity::pem::parse_certs(&config.ca.ca_root_pem)
            .map_err(|e| AgentError::Root(e.to_string()))?;
        if roots.is_empty() {
            return Err(AgentError::Root(
                "no certificate in the CA root file".to_owned(),
            ));
        }
        // A token that cannot be read now is a configuration mistake: say so at once.
        let (_, identity) = config.ca.token.read_identity(&config.ca.trust_domain)?;

        let metrics = AgentMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);

        let sds = SdsServer::new(metrics.clone());
        let sds_listener = SdsServer::bind(&config.sds_socket)?;
        let admin_listener = TcpListener::bind(config.admin_addr)
            .await
            .map_err(|cause| AgentError::Admin {
                addr: config.admin_addr,
                cause,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|cause| AgentError::Admin {
                addr: config.admin_addr,
                cause,
            })?;

        tracing::info!(
            %identity,
            ca = %config.ca.ca_addr,
            key_type = %config.ca.key_type,
            sds = %config.sds_socket.display(),
            admin = %admin_addr,
            "agent starting"
        );
        let secrets = crate::manager::spawn(
            CaSource::new(config.ca.clone()),
            roots,
            config.manager.clone(),
            metrics.clone(),
        );

        let (stop, stopped) = watch::channel(false);
        let until_stopped = move || {
            let mut rx = stopped.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mut tasks = vec![sds.publish(secrets.subscribe())];
        let serve_sds = sds.clone();
        let sds_stop = until_stopped();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = serve_sds.serve(sds_listener, sds_stop).await {
                tracing::error!(error = %e, "SDS server stopped");
            }
        }));
        tasks.push(tokio::spawn(
            Admin::new(secrets.subscribe(), Arc::new(registry))
                .serve(admin_listener, until_stopped()),
        ));
        if let Some(dir) = &config.write_certs {
            tasks.push(crate::files::spawn_writer(dir.clone(), secrets.subscribe()));
        }
        Ok(Self {
            secrets,
            metrics,
            admin_addr,
            sds_socket: config.sds_socket,
            stop,
            tasks,
        })
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The SDS socket path.
    pub fn sds_socket(&self) -> &std::path::Path {
        &self.sds_socket
    }

    /// The secret state; an in-process proxy reads its certificate from here.
    pub fn secrets(&self) -> SecretWatch {
        self.secrets.subscribe()
    }

    /// The manager, e.g. to force a renewal.
    pub fn secret_handle(&self) -> &SecretHandle {
        &self.secrets
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }

    /// Stops the servers (open SDS streams end) and removes the socket.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            // The publisher and writer only end with the manager: abort them.
            task.abort();
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&self.sds_socket);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
