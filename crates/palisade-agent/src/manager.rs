//! The secret manager: gets the workload certificate, keeps it fresh, and publishes the current
//! state on a `watch` channel that the SDS server, the admin endpoint and an in-process proxy
//! all read.
//!
//! Timing, as istio-agent does it:
//! - Renewal at half of the lifetime, the lifetime counted from when the certificate arrived to
//!   its NotAfter (the CA back-dates NotBefore by minutes, which would otherwise make short-lived
//!   certificates due at once), with +-1% jitter so that many workloads do not renew together.
//! - A failed attempt is retried with exponential backoff (500 ms doubling to 150 s, +-10%
//!   jitter). The current certificate keeps being served meanwhile; a retry is never scheduled
//!   after its expiry, and once it has expired the manager keeps retrying and says so.
//! - Every attempt uses a fresh key (the source's contract).

use std::sync::Arc;
use std::time::Duration;

use palisade_identity::{CertificateDer, SpiffeId, Svid};
use rand::Rng as _;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::metrics::AgentMetrics;
use crate::source::{CertificateSource, FetchError, Issued};

/// Tuning of the rotation and retry schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagerConfig {
    /// Renew when this fraction of the lifetime remains (0.5).
    pub grace_ratio: f64,
    /// Random variation of `grace_ratio`, both ways (0.01).
    pub grace_jitter: f64,
    /// First retry delay after a failure (500 ms).
    pub initial_backoff: Duration,
    /// Longest retry delay (150 s).
    pub max_backoff: Duration,
    /// Random variation of each retry delay, as a fraction both ways (0.1).
    pub backoff_jitter: f64,
    /// How long one attempt may take before it counts as failed (30 s).
    pub fetch_timeout: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            grace_ratio: 0.5,
            grace_jitter: 0.01,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(150),
            backoff_jitter: 0.1,
            fetch_timeout: Duration::from_secs(30),
        }
    }
}

/// Where the workload certificate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertStatus {
    /// No certificate yet; attempts are being made.
    Pending,
    /// A valid certificate is served.
    Active,
    /// The served certificate has expired and renewal keeps failing.
    Expired,
}

/// What the manager publishes: the served certificate and everything needed to explain it.
#[derive(Debug, Clone)]
pub struct SecretState {
    /// The served SVID (chain leaf first, without the root, and its key). Kept while renewal
    /// fails, also past expiry (then `status` is `Expired`).
    pub svid: Option<Svid>,
    /// Trust anchors for peers: the configured roots plus any new root the CA returned.
    pub roots: Vec<CertificateDer<'static>>,
    /// See [`CertStatus`].
    pub status: CertStatus,
    /// When the next attempt is planned (renewal or retry).
    pub next_attempt: Option<OffsetDateTime>,
    /// The latest failure, cleared by the next success.
    pub last_error: Option<String>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Certificates obtained so far.
    pub issued: u64,
}

impl SecretState {
    fn initial(roots: Vec<CertificateDer<'static>>) -> Self {
        Self {
            svid: None,
            roots,
            status: CertStatus::Pending,
            next_attempt: None,
            last_error: None,
            consecutive_failures: 0,
            issued: 0,
        }
    }

    /// The served identity, if any.
    pub fn identity(&self) -> Option<&SpiffeId> {
        self.svid.as_ref().map(Svid::spiffe_id)
    }
}

/// The receiving side of the manager's state.
pub type SecretWatch = watch::Receiver<Arc<SecretState>>;

/// Delay until renewal for a certificate that has `remaining` time to live now: renew when
/// `grace_ratio` (+- `jitter * sample`, `sample` in [-1, 1]) of it is left.
pub fn rotation_delay(remaining: Duration, grace_ratio: f64, jitter: f64, sample: f64) -> Duration {
    let ratio = (grace_ratio + jitter * sample.clamp(-1.0, 1.0)).clamp(0.0, 1.0);
    remaining.mul_f64(1.0 - ratio)
}

/// Exponential backoff with multiplicative jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: f64,
    attempt: u32,
}

impl Backoff {
    /// Starts at `initial`, doubles per failure up to `max`, varies each delay by `+-jitter`.
    pub fn new(initial: Duration, max: Duration, jitter: f64) -> Self {
        Self {
            initial,
            max,
            jitter: jitter.clamp(0.0, 1.0),
            attempt: 0,
        }
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The delay before the next retry, given a random `sample` in [-1, 1].
    pub fn next_with(&mut self, sample: f64) -> Duration {
        let factor = 2f64.powi(self.attempt.min(62) as i32);
        let base = self.initial.mul_f64(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        base.mul_f64(1.0 + self.jitter * sample.clamp(-1.0, 1.0))
            .min(self.max)
    }

    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        let sample = rand::rng().random_range(-1.0..=1.0);
        self.next_with(sample)
    }
}

/// A running secret manager. Dropping it stops the renewal task; the state stays readable
/// through receivers obtained before.
#[derive(Debug)]
pub struct SecretHandle {
    rx: SecretWatch,
    renew: Arc<Notify>,
    task: JoinHandle<()>,
}

impl SecretHandle {
    /// A receiver of every state change; in-process consumers (a proxy) hold one.
    pub fn subscribe(&self) -> SecretWatch {
        self.rx.clone()
    }

    /// The state now.
    pub fn current(&self) -> Arc<SecretState> {
        self.rx.borrow().clone()
    }

    /// Asks for a renewal now instead of at the planned time.
    pub fn renew_now(&self) {
        self.renew.notify_one();
    }
}

impl Drop for SecretHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the manager on the current runtime. `roots` are the configured trust anchors (served
/// as `ROOTCA` from the start, before any certificate exists).
pub fn spawn<S: CertificateSource>(
    source: S,
    roots: Vec<CertificateDer<'static>>,
    config: ManagerConfig,
    metrics: AgentMetrics,
) -> SecretHandle {
    let (tx, rx) = watch::channel(Arc::new(SecretState::initial(roots)));
    let renew = Arc::new(Notify::new());
    let worker = Worker {
        backoff: Backoff::new(
            config.initial_backoff,
            config.max_backoff,
            config.backoff_jitter,
        ),
        source,
        config,
        metrics,
        tx,
        renew: renew.clone(),
        expires_at: None,
    };
    let task = tokio::spawn(worker.run());
    SecretHandle { rx, renew, task }
}

struct Worker<S> {
    source: S,
    config: ManagerConfig,
    metrics: AgentMetrics,
    tx: watch::Sender<Arc<SecretState>>,
    renew: Arc<Notify>,
    backoff: Backoff,
    /// When the served certificate expires, on the runtime's clock.
    expires_at: Option<Instant>,
}

impl<S: CertificateSource> Worker<S> {
    async fn run(mut self) {
        loop {
            let attempt =
                tokio::time::timeout(self.config.fetch_timeout, self.source.fetch()).await;
            let result = attempt.unwrap_or(Err(FetchError::Timeout(self.config.fetch_timeout)));
            let delay = match result.and_then(check_fresh) {
                Ok((issued, remaining)) => self.on_success(issued, remaining),
                Err(e) => self.on_failure(&e),
            };
            // Sleep until the next attempt, or until someone asks for one now.
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.renew.notified() => {
                    tracing::info!("renewal requested");
                }
            }
        }
    }

    fn on_success(&mut self, issued: Issued, remaining: Duration) -> Duration {
        self.backoff.reset();
        let sample = rand::rng().random_range(-1.0..=1.0);
        // A floor keeps a CA that hands out nearly expired certificates from being hammered.
        let delay = rotation_delay(
            remaining,
            self.config.grace_ratio,
            self.config.grace_jitter,
            sample,
        )
        .max(self.config.initial_backoff.min(remaining));
        self.expires_at = Some(Instant::now() + remaining);
        let now = OffsetDateTime::now_utc();
        let next = now + delay;
        let leaf = issued.svid.leaf_info();
        tracing::info!(
            identity = %issued.svid.spiffe_id(),
            serial = %crate::report::envoy_serial(&leaf.serial),
            not_after = %fmt_time(leaf.not_after),
            next_rotation = %fmt_time(next),
            "workload certificate issued"
        );
        self.metrics
            .cert_expiry_timestamp
            .set(unix_seconds(leaf.not_after));
        self.metrics.next_rotation_timestamp.set(unix_seconds(next));
        self.metrics.certs_issued.inc();
        self.tx.send_modify(|state| {
            let mut s = (**state).clone();
            if s.svid.is_some() {
                self.metrics.rotations.inc();
            }
            for root in issued.roots {
                if !s.roots.contains(&root) {
                    tracing::info!("the CA returned a root not yet in the trust bundle; adding it");
                    s.roots.push(root);
                }
            }
            s.svid = Some(issued.svid);
            s.status = CertStatus::Active;
            s.next_attempt = Some(next);
            s.last_error = None;
            s.consecutive_failures = 0;
            s.issued += 1;
            *state = Arc::new(s);
        });
        delay
    }

    fn on_failure(&mut self, error: &FetchError) -> Duration {
        self.metrics.failure(error.reason());
        let now = Instant::now();
        let mut delay = self.backoff.next_delay();
        let status = match self.expires_at {
            None => CertStatus::Pending,
            Some(t) if now >= t => CertStatus::Expired,
            Some(t) => {
                // One more try right at expiry rather than a long sleep past it.
                delay = delay.min(t - now);
                CertStatus::Active
            }
        };
        let next = OffsetDateTime::now_utc() + delay;
        match status {
            CertStatus::Active => tracing::warn!(
                reason = error.reason(), %error, retry_in = ?delay,
                "cannot renew the workload certificate; the current one is still served"
            ),
            CertStatus::Pending => tracing::warn!(
                reason = error.reason(), %error, retry_in = ?delay,
                "cannot get a workload certificate yet; the proxy waits for it"
            ),
            CertStatus::Expired => tracing::error!(
                reason = error.reason(), %error, retry_in = ?delay,
                "the workload certificate has expired and renewal keeps failing"
            ),
        }
        self.metrics.next_rotation_timestamp.set(unix_seconds(next));
        let message = error.to_string();
        self.tx.send_modify(|state| {
            let mut s = (**state).clone();
            s.status = status;
            s.next_attempt = Some(next);
            s.last_error = Some(message);
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
            *state = Arc::new(s);
        });
        delay
    }
}

/// Refuses certificates that are already expired on arrival; returns the time left.
fn check_fresh(issued: Issued) -> Result<(Issued, Duration), FetchError> {
    let now = OffsetDateTime::now_utc();
    let leaf = issued.svid.leaf_info();
    if leaf.not_before > now {
        // Clock skew with the CA beyond its back-dating. Refusing would only loop (every new
        // certificate would start in the future too); peers with the CA's clock accept it.
        tracing::warn!(
            not_before = %fmt_time(leaf.not_before),
            "the new certificate is not valid yet by this machine's clock; check clock sync"
        );
    }
    let remaining = Duration::try_from(leaf.not_after - now).unwrap_or(Duration::ZERO);
    if remaining.is_zero() {
        return Err(FetchError::BadResponse(format!(
            "the certificate expired at {}",
            fmt_time(leaf.not_after)
        )));
    }
    Ok((issued, remaining))
}

/// RFC 3339, as in logs and the admin endpoint.
pub fn fmt_time(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn unix_seconds(t: OffsetDateTime) -> f64 {
    t.unix_timestamp_nanos() as f64 / 1e9
}

#[cfg(test)]
mod tests;
