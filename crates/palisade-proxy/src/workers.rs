//! The data path's threads, on Envoy's worker model: a fixed number of worker threads, each
//! running its own single-threaded Tokio runtime. Every listener is served by every worker (each
//! accepts on its own handle to the same socket), and a connection stays on the worker that
//! accepted it for its whole life, together with its requests and the pooled upstream
//! connections they use (one pool per worker).
//!
//! Why not one multi-threaded runtime: with work stealing, a request that arrives while both
//! workers sleep wakes both of them (the one that reads the socket, and the one it notifies to
//! steal the tasks it spawns), and the request's hops (client connection, HTTP/2 stream, pooled
//! upstream connection) are tasks that may run on different threads. At a moderate rate that
//! wake-up traffic, not the proxying, was most of the sidecar's CPU (docs/benchmarks.md).
//! Pinning trades it for Envoy's trade-off: a long TLS handshake delays only the connections of
//! its own worker.
//!
//! Control work (xDS, certificates, admin) stays on the caller's runtime.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::thread::JoinHandle as ThreadHandle;

use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

thread_local! {
    /// The index of the worker this thread is, if it is one.
    static WORKER_INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the current thread's worker, or `None` outside the workers.
pub fn current() -> Option<usize> {
    WORKER_INDEX.with(Cell::get)
}

/// How many workers to run when the operator does not say: one per CPU the process may use
/// (Envoy's `--concurrency` default).
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The worker threads of one proxy. [`Workers::stop`] (or dropping) ends them, and with them
/// every task they run.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    stop: watch::Sender<bool>,
    threads: std::sync::Mutex<Vec<ThreadHandle<()>>>,
}

impl Workers {
    /// Starts `count` workers (at least one).
    pub fn start(count: usize) -> io::Result<Self> {
        let (stop, _) = watch::channel(false);
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let mut stopped = stop.subscribe();
            let thread = std::thread::Builder::new()
                .name(format!("palisade-worker-{index}"))
                .spawn(move || {
                    WORKER_INDEX.with(|w| w.set(Some(index)));
                    // Tasks run only while this thread drives the runtime, until stopped (or
                    // the proxy is gone and the sender with it).
                    runtime.block_on(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    });
                    // Dropping the runtime here drops every task left on this worker.
                    drop(runtime);
                })?;
            threads.push(thread);
        }
        Ok(Self {
            handles,
            stop,
            threads: std::sync::Mutex::new(threads),
        })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Serves `listener` on every worker: `serve` gets that worker's handle to the socket.
    /// Returns one task per worker; aborting all of them closes the listener.
    pub fn serve<F, Fut>(
        &self,
        listener: std::net::TcpListener,
        serve: F,
    ) -> io::Result<Vec<JoinHandle<()>>>
    where
        F: Fn(tokio::net::TcpListener) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr().ok();
        let mut tasks = Vec::new();
        for handle in &self.handles {
            let own = listener.try_clone()?;
            let serve = serve.clone();
            // Registered inside the task, so with that worker's reactor.
            tasks.push(handle.spawn(async move {
                match tokio::net::TcpListener::from_std(own) {
                    Ok(l) => serve(l).await,
                    Err(e) => {
                        tracing::error!(addr = ?addr, error = %e, "worker cannot use listener")
                    }
                }
            }));
        }
        Ok(tasks)
    }

    /// Ends every worker (idempotent). Their tasks are dropped.
    pub fn stop(&self) {
        self.stop.send_replace(true);
        let threads = std::mem::take(
            &mut *self
                .threads
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        // Joined only when that cannot block an async runtime's thread for long: the workers
        // exit as soon as they see the signal, but a task's Drop may take a moment.
        if Handle::try_current().is_err() {
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Every connection is served on a worker thread; stopping the workers closes the listener.
    #[test]
    fn listener_served_on_workers_until_stopped() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(workers.len(), 2);
        assert_eq!(current(), None, "the test thread is not a worker");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_by_workers = Arc::clone(&seen);
        let tasks = workers
            .serve(listener, move |l| {
                let seen = Arc::clone(&seen_by_workers);
                async move {
                    while let Ok((mut s, _)) = l.accept().await {
                        seen.lock().unwrap().push(current());
                        let _ = s.write_all(b"ok").await;
                    }
                }
            })
            .unwrap();
        assert_eq!(tasks.len(), 2, "one accept loop per worker");
        for _ in 0..20 {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            assert_eq!(out, "ok");
        }
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 20);
        assert!(seen.iter().all(|w| matches!(w, Some(0 | 1))), "{seen:?}");

        workers.stop();
        let refused = std::net::TcpStream::connect(addr)
            .and_then(|mut c| c.write_all(b"x").and_then(|()| c.read(&mut [0u8; 2])));
        assert!(
            matches!(refused, Err(_) | Ok(0)),
            "the listener is closed once the workers stopped: {refused:?}"
        );
    }
}
