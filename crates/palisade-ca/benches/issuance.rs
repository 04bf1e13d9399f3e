//! Certificates issued per second: in process (CSR check + signing, no network) beside end to end
//! over gRPC + TLS on loopback with concurrent clients (token check, CSR check, signing, HTTP/2),
//! measured in the same run on the same machine. The two are measured in alternating rounds and
//! the best round of each is kept, so background load hits both alike.
//!
//! `cargo bench -p palisade-ca --bench issuance`
//! Knobs (env): BENCH_SECS (per round, 3), BENCH_ROUNDS (3), BENCH_CLIENTS (64),
//! BENCH_CONNECTIONS (8), BENCH_SERVER_THREADS (cores), BENCH_CLIENT_THREADS (1),
//! BENCH_FRESH_TOKENS (80000).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use palisade_ca::metrics::Registry;
use palisade_ca::{Authority, CaClient, CaClientOptions, CaOptions, CaServer, TokenIssuer};
use palisade_identity::{KeyType, SpiffeId, TrustDomain};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let secs = env_or("BENCH_SECS", 3);
    let rounds = env_or("BENCH_ROUNDS", 3).max(1);
    let clients = env_or("BENCH_CLIENTS", 64) as usize;
    let connections = env_or("BENCH_CONNECTIONS", 8).max(1) as usize;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = |name: &str| match env_or(name, 0) as usize {
        0 => cores,
        n => n,
    };
    let duration = Duration::from_secs(secs);

    let state = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let id = SpiffeId::for_service_account(td.clone(), "bench", "client").unwrap();
    // A pool of distinct CSRs, made before any timing starts.
    let csrs: Arc<Vec<String>> = Arc::new(
        (0..64)
            .map(|_| {
                palisade_identity::generate_key_and_csr(&id, KeyType::EcdsaP256)
                    .unwrap()
                    .csr_pem
            })
            .collect(),
    );

    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads("BENCH_SERVER_THREADS"))
        .enable_all()
        .build()
        .unwrap();
    let mut registry = Registry::default();
    let server = server_rt
        .block_on(CaServer::prepare(
            CaOptions::new(state.path(), td.clone()),
            &mut registry,
        ))
        .unwrap();
    let authority = Arc::clone(server.authority());
    let root_pem = std::fs::read(server.root_cert_path()).unwrap();
    let tokens = TokenIssuer::load_or_create(state.path()).unwrap();
    let token = Arc::new(
        tokens
            .issue(
                "bench",
                "client",
                &["istio-ca".to_owned()],
                Duration::from_secs(3600),
            )
            .unwrap(),
    );

    // The cost of each part alone, one thread.
    let mut auth = palisade_ca::TokenAuthenticator::new(td.clone());
    auth.add_issuer(
        tokens.issuer(),
        palisade_ca::token::IssuerKeys::new(tokens.jwks().clone()),
    );
    let token_rate = rate(duration / 3, || {
        std::hint::black_box(auth.authenticate(&token).unwrap());
    });
    let mut k = 0;
    let csr_rate = rate(duration / 3, || {
        k += 1;
        std::hint::black_box(
            palisade_ca::csr::CheckedCsr::parse_pem(&csrs[k % csrs.len()]).unwrap(),
        );
    });
    let single = in_process(&authority, &csrs, &id, 1, duration);

    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = server_rt.spawn(server.serve(listener, async {
        let _ = stop_rx.await;
    }));
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(match env_or("BENCH_CLIENT_THREADS", 1) as usize {
            0 => cores,
            n => n,
        })
        .enable_all()
        .build()
        .unwrap();
    let pool: Vec<CaClient> = client_rt.block_on(async {
        let mut pool = Vec::new();
        for _ in 0..connections {
            let c = CaClient::connect(&addr, &root_pem, CaClientOptions::default())
                .await
                .unwrap();
            // Warm-up: one request per connection.
            c.create_certificate(&csrs[0], Some(&token), None, None)
                .await
                .unwrap();
            pool.push(c);
        }
        pool
    });

    // Distinct tokens, one per request, for the case where every request pays for a token
    // signature check (no cache hit possible).
    let fresh_count = env_or("BENCH_FRESH_TOKENS", 80_000) as usize;
    let fresh: Arc<Vec<String>> = Arc::new(
        (0..fresh_count)
            .map(|i| {
                tokens
                    .issue(
                        "bench",
                        "client",
                        &["istio-ca".to_owned(), format!("n{i}")],
                        Duration::from_secs(3600),
                    )
                    .unwrap()
            })
            .collect(),
    );
    let next_fresh = Arc::new(AtomicU64::new(0));

    let mut best_in_process: f64 = 0.0;
    let mut best_e2e: f64 = 0.0;
    let mut best_fresh: f64 = 0.0;
    let mut errors = 0;
    for _ in 0..rounds {
        best_in_process = best_in_process.max(in_process(&authority, &csrs, &id, cores, duration));
        let (r, e) = client_rt.block_on(end_to_end(
            &pool,
            &csrs,
            &Tokens::Same(Arc::clone(&token)),
            clients,
            duration,
        ));
        best_e2e = best_e2e.max(r);
        errors += e;
        let fresh_tokens = Tokens::Fresh(Arc::clone(&fresh), Arc::clone(&next_fresh));
        let (r, e) = client_rt.block_on(end_to_end(&pool, &csrs, &fresh_tokens, clients, duration));
        best_fresh = best_fresh.max(r);
        errors += e;
    }
    let fresh_used = next_fresh.load(Ordering::Relaxed) as usize;
    let _ = stop_tx.send(());
    server_rt.block_on(serving).unwrap().unwrap();

    println!(
        "palisade-ca issuance ({cores} cores, best of {rounds} rounds of {secs} s, ECDSA P-256 CA and CSRs)"
    );
    println!(
        "  parts, 1 thread          : token check {token_rate:.0}/s, CSR check {csr_rate:.0}/s"
    );
    println!("  in-process sign-CSR, 1 thread        : {single:>8.0} certs/s");
    println!("  in-process sign-CSR, {cores} threads       : {best_in_process:>8.0} certs/s");
    println!(
        "  end-to-end gRPC+TLS, {clients} clients / {connections} conns, one token per client (verified once, then cached):"
    );
    println!(
        "                                         {best_e2e:>8.0} certs/s = {:.2} x in-process",
        best_e2e / best_in_process
    );
    println!(
        "  end-to-end gRPC+TLS, a new token on every request (every token signature verified):"
    );
    println!(
        "                                         {best_fresh:>8.0} certs/s = {:.2} x in-process",
        best_fresh / best_in_process
    );
    println!(
        "  errors: {errors}; fresh tokens used {fresh_used} of {fresh_count}{}",
        if fresh_used > fresh_count {
            " (pool wrapped: raise BENCH_FRESH_TOKENS)"
        } else {
            ""
        }
    );
}

/// Which bearer token each request carries.
#[derive(Clone)]
enum Tokens {
    Same(Arc<String>),
    Fresh(Arc<Vec<String>>, Arc<AtomicU64>),
}

impl Tokens {
    fn next(&self) -> &str {
        match self {
            Self::Same(t) => t,
            Self::Fresh(pool, next) => {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                &pool[i % pool.len()]
            }
        }
    }
}

async fn end_to_end(
    pool: &[CaClient],
    csrs: &Arc<Vec<String>>,
    token: &Tokens,
    clients: usize,
    duration: Duration,
) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let client = pool[i % pool.len()].clone();
        let (csrs, token) = (Arc::clone(csrs), token.clone());
        let (done, failed, stop) = (Arc::clone(&done), Arc::clone(&failed), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut n = i;
            while !stop.load(Ordering::Relaxed) {
                let csr = &csrs[n % csrs.len()];
                n += 1;
                match client
                    .create_certificate(csr, Some(token.next()), None, None)
                    .await
                {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    for t in tasks {
        t.await.unwrap();
    }
    (
        done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        failed.load(Ordering::Relaxed),
    )
}

fn rate(duration: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        f();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn in_process(
    authority: &Arc<Authority>,
    csrs: &Arc<Vec<String>>,
    id: &SpiffeId,
    threads: usize,
    duration: Duration,
) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (authority, csrs, id) = (Arc::clone(authority), Arc::clone(csrs), id.clone());
            let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut n = t;
                while !stop.load(Ordering::Relaxed) {
                    let issued = authority.issue(&csrs[n % csrs.len()], &id, 0).unwrap();
                    std::hint::black_box(issued.chain_pem());
                    n += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    for h in handles {
        h.join().unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
}
