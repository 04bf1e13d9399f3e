//! Rotation and backoff timing on tokio's paused clock, with real certificates from a test CA.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::test_ca::TestCa;

const ID: &str = "spiffe://cluster.local/ns/demo/sa/client";

#[derive(Debug, Clone, Copy)]
enum Step {
    Issue(Duration),
    Fail,
}

/// A certificate source that follows a script, then fails forever, recording when it was asked.
struct Scripted {
    steps: Mutex<VecDeque<Step>>,
    calls: Arc<Mutex<Vec<Instant>>>,
    ca: Arc<TestCa>,
}

impl Scripted {
    fn new(steps: &[Step]) -> (Self, Arc<Mutex<Vec<Instant>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let source = Self {
            steps: Mutex::new(steps.iter().copied().collect()),
            calls: calls.clone(),
            ca: Arc::new(TestCa::new()),
        };
        (source, calls)
    }
}

impl CertificateSource for Scripted {
    fn fetch(&self) -> impl Future<Output = Result<Issued, FetchError>> + Send {
        self.calls.lock().unwrap().push(Instant::now());
        let step = self.steps.lock().unwrap().pop_front().unwrap_or(Step::Fail);
        let ca = self.ca.clone();
        async move {
            match step {
                Step::Issue(ttl) => Ok(ca.issue(ID, ttl)),
                Step::Fail => Err(FetchError::Connect {
                    addr: "127.0.0.1:1".into(),
                    reason: "connection refused".into(),
                }),
            }
        }
    }
}

fn gaps(calls: &Arc<Mutex<Vec<Instant>>>) -> Vec<Duration> {
    let calls = calls.lock().unwrap();
    calls.windows(2).map(|w| w[1] - w[0]).collect()
}

fn within(d: Duration, lo: f64, hi: f64) -> bool {
    let s = d.as_secs_f64();
    lo <= s && s <= hi
}

fn failures(metrics: &AgentMetrics, reason: &str) -> u64 {
    metrics
        .failures
        .get_or_create(&crate::metrics::ReasonLabel {
            reason: reason.into(),
        })
        .get()
}

#[test]
fn backoff_doubles_to_the_cap() {
    let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(150), 0.1);
    let want = [
        0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 150.0, 150.0,
    ];
    for w in want {
        assert_eq!(b.next_with(0.0).as_secs_f64(), w);
    }
    // Jitter never takes a delay above the cap, and spans +-10% below it.
    assert_eq!(b.next_with(1.0), Duration::from_secs(150));
    assert_eq!(b.next_with(-1.0), Duration::from_secs(135));
    b.reset();
    assert_eq!(b.next_with(1.0), Duration::from_millis(550));
    assert_eq!(b.next_with(-1.0), Duration::from_millis(900));
}

#[test]
fn rotation_delay_table() {
    let day = Duration::from_secs(86_400);
    // (remaining, sample, expected delay in seconds)
    let table = [
        (day, 0.0, 43_200.0),
        (day, 1.0, 86_400.0 * 0.49),
        (day, -1.0, 86_400.0 * 0.51),
        (Duration::from_secs(4), 0.0, 2.0),
        (Duration::ZERO, 0.0, 0.0),
    ];
    for (remaining, sample, want) in table {
        let got = rotation_delay(remaining, 0.5, 0.01, sample).as_secs_f64();
        assert!((got - want).abs() < 1e-6, "{remaining:?} {sample}: {got}");
    }
}

#[tokio::test(start_paused = true)]
async fn rotates_at_half_life_with_one_percent_jitter() {
    let ttl = Duration::from_secs(1000);
    let (source, calls) = Scripted::new(&[Step::Issue(ttl); 4]);
    let metrics = AgentMetrics::default();
    let handle = spawn(source, vec![], ManagerConfig::default(), metrics.clone());
    let mut rx = handle.subscribe();
    rx.wait_for(|s| s.issued == 4).await.unwrap();

    let g = gaps(&calls);
    assert_eq!(g.len(), 3);
    for gap in &g {
        // 50% +- 1% of a lifetime of (999, 1000] s (NotAfter has whole seconds).
        assert!(within(*gap, 489.5, 510.0), "renewal after {gap:?}");
    }
    assert_eq!(metrics.certs_issued.get(), 4);
    assert_eq!(metrics.rotations.get(), 3);
    let state = handle.current();
    assert_eq!(state.status, CertStatus::Active);
    assert_eq!(state.identity().unwrap().to_string(), ID);
    assert!(state.next_attempt.is_some());
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_then_recover() {
    let mut steps = vec![Step::Fail; 6];
    steps.push(Step::Issue(Duration::from_secs(1000)));
    let (source, calls) = Scripted::new(&steps);
    let metrics = AgentMetrics::default();
    let handle = spawn(source, vec![], ManagerConfig::default(), metrics.clone());
    let mut rx = handle.subscribe();

    let pending = rx
        .wait_for(|s| s.consecutive_failures == 3)
        .await
        .unwrap()
        .clone();
    assert_eq!(pending.status, CertStatus::Pending);
    assert!(pending.svid.is_none());
    assert!(
        pending
            .last_error
            .as_deref()
            .unwrap()
            .contains("connection refused")
    );

    let ok = rx.wait_for(|s| s.issued == 1).await.unwrap().clone();
    assert_eq!(ok.status, CertStatus::Active);
    assert_eq!(ok.consecutive_failures, 0);
    assert!(ok.last_error.is_none());

    let g = gaps(&calls);
    let expected = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0];
    assert_eq!(g.len(), expected.len());
    for (gap, want) in g.iter().zip(expected) {
        assert!(
            within(*gap, want * 0.9, want * 1.1),
            "gap {gap:?}, want {want} +-10%"
        );
    }
    assert_eq!(failures(&metrics, "connect"), 6);
}

#[tokio::test(start_paused = true)]
async fn keeps_serving_and_retrying_until_expiry_then_says_expired() {
    let ttl = Duration::from_secs(10);
    let (source, calls) = Scripted::new(&[Step::Issue(ttl)]);
    let metrics = AgentMetrics::default();
    let handle = spawn(source, vec![], ManagerConfig::default(), metrics.clone());
    let mut rx = handle.subscribe();
    let first = rx.wait_for(|s| s.issued == 1).await.unwrap().clone();
    let start = *calls.lock().unwrap().first().unwrap();
    let serial = first.svid.as_ref().unwrap().leaf_info().serial.clone();

    // While the certificate is valid, failures keep it served and the status active.
    let failing = rx
        .wait_for(|s| s.consecutive_failures >= 2)
        .await
        .unwrap()
        .clone();
    assert_eq!(failing.status, CertStatus::Active);
    assert_eq!(failing.svid.as_ref().unwrap().leaf_info().serial, serial);

    let expired = rx
        .wait_for(|s| s.status == CertStatus::Expired)
        .await
        .unwrap()
        .clone();
    assert_eq!(expired.svid.as_ref().unwrap().leaf_info().serial, serial);
    let at = calls.lock().unwrap().clone();
    let offsets: Vec<f64> = at.iter().map(|t| (*t - start).as_secs_f64()).collect();
    // Renewal at half of the (9, 10] s left, retries at +0.5, +1, +2, then one capped at the
    // expiry instead of the 4 s backoff that would overshoot it.
    assert!(within(at[1] - start, 4.4, 5.1), "{offsets:?}");
    let last = *at.last().unwrap() - start;
    assert!(
        within(last, 9.0, 10.01),
        "expiry attempt at {last:?}: {offsets:?}"
    );
    assert!(offsets.iter().all(|o| *o <= 10.01), "{offsets:?}");

    // And it keeps trying after expiry.
    let n = at.len();
    rx.wait_for(|s| s.consecutive_failures as usize > n)
        .await
        .unwrap();
    assert!(failures(&metrics, "connect") as usize >= n);
}

#[tokio::test(start_paused = true)]
async fn renew_now_skips_the_wait() {
    let (source, calls) = Scripted::new(&[Step::Issue(Duration::from_secs(1000)); 2]);
    let handle = spawn(
        source,
        vec![],
        ManagerConfig::default(),
        AgentMetrics::default(),
    );
    let mut rx = handle.subscribe();
    rx.wait_for(|s| s.issued == 1).await.unwrap();
    handle.renew_now();
    rx.wait_for(|s| s.issued == 2).await.unwrap();
    assert!(gaps(&calls)[0] < Duration::from_secs(1));
}

/// A source that never answers: the attempt times out and counts as a failure.
struct Silent;

impl CertificateSource for Silent {
    fn fetch(&self) -> impl Future<Output = Result<Issued, FetchError>> + Send {
        std::future::pending()
    }
}

#[tokio::test(start_paused = true)]
async fn a_hanging_ca_call_times_out() {
    let metrics = AgentMetrics::default();
    let config = ManagerConfig {
        fetch_timeout: Duration::from_secs(5),
        ..ManagerConfig::default()
    };
    let before = Instant::now();
    let handle = spawn(Silent, vec![], config, metrics.clone());
    let mut rx = handle.subscribe();
    let s = rx
        .wait_for(|s| s.consecutive_failures == 1)
        .await
        .unwrap()
        .clone();
    assert!(Instant::now() - before >= Duration::from_secs(5));
    assert!(s.last_error.as_deref().unwrap().contains("no answer"));
    assert_eq!(failures(&metrics, "timeout"), 1);
}

#[tokio::test(start_paused = true)]
async fn roots_from_the_ca_join_the_configured_ones() {
    let (source, _) = Scripted::new(&[Step::Issue(Duration::from_secs(1000))]);
    let ca_root = source.ca.root.clone();
    let configured = TestCa::new().root;
    let handle = spawn(
        source,
        vec![configured.clone()],
        ManagerConfig::default(),
        AgentMetrics::default(),
    );
    assert_eq!(handle.current().roots, vec![configured.clone()]);
    let mut rx = handle.subscribe();
    let s = rx.wait_for(|s| s.issued == 1).await.unwrap().clone();
    assert_eq!(s.roots, vec![configured, ca_root]);
}
