//! What both binaries share: logging set-up, the async runtime, the exit code, the sidecar's
//! allocator setting.

use std::process::ExitCode;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global tracing subscriber (stderr; colour only on a terminal).
pub fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The main runtime: multi-threaded for the control-plane-side commands; one thread for the
/// proxy commands, whose data path has its own workers. Also installs the one rustls crypto
/// provider of the tree (aws-lc-rs) before any TLS use.
pub fn runtime(multi_thread: bool) -> Result<tokio::runtime::Runtime, ExitCode> {
    // An error only means a provider is installed already, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

/// A command's result as the process exit code: errors print their whole context chain (file,
/// field, reason) and exit 2.
pub fn exit_code(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The environment variable through which `palisade up` asks a child to die with it: `up`'s
/// process id (see [`exit_with_parent`]).
pub const PARENT_PID_ENV: &str = "PALISADE_PARENT_PID";

/// For the children of `palisade up`: when [`PARENT_PID_ENV`] names this process's parent, asks
/// the kernel to SIGKILL it when that parent dies (Linux's parent-death signal). `up` stops its
/// children itself on Ctrl-C or SIGTERM; this covers a SIGKILL or a crash of `up`, after which
/// nobody would. SIGKILL rather than SIGTERM: nobody is left to escalate a stop that stalls.
///
/// The child sets it (setting it between fork and exec needs `pre_exec`, which is unsafe), so
/// `up` may die before: the parent is then no longer the one named, and the child exits at
/// once. A process that merely inherited the variable (a grandchild, while `up` lives) keeps
/// running without the signal. Elsewhere than Linux this only logs that it cannot.
///
/// The kernel sends the signal when the parent *thread* that spawned the child ends; `up`
/// spawns from its runtime's worker threads, which live as long as `up` does.
pub fn exit_with_parent() {
    let Some(raw) = std::env::var_os(PARENT_PID_ENV) else {
        return;
    };
    let Some(expected) = raw.to_str().and_then(|s| s.parse::<i32>().ok()) else {
        tracing::warn!(value = ?raw, "{PARENT_PID_ENV} is not a process id; ignored");
        return;
    };
    die_with(expected);
}

/// What the parent-death signal is worth, given who the parent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentCheck {
    /// The parent is the process named: the signal holds.
    Ours,
    /// The process named lives but is not the parent: the variable was inherited (this is a
    /// grandchild); the signal would watch the wrong process.
    Inherited,
    /// The process named is gone and this one was re-parented: it died before the signal was
    /// set, so no signal will come.
    Gone,
}

/// Compares the parent (`getppid`) with the pid named; `named_alive` is asked only when they
/// differ.
pub fn check_parent(parent: i32, named: i32, named_alive: impl FnOnce() -> bool) -> ParentCheck {
    if parent == named {
        ParentCheck::Ours
    } else if named_alive() {
        ParentCheck::Inherited
    } else {
        ParentCheck::Gone
    }
}

#[cfg(target_os = "linux")]
fn die_with(expected: i32) {
    use rustix::process::{
        Pid, Signal, getppid, set_parent_process_death_signal, test_kill_process,
    };
    if let Err(e) = set_parent_process_death_signal(Some(Signal::KILL)) {
        tracing::warn!(error = %e, "cannot set the parent-death signal: this process may outlive palisade up");
        return;
    }
    // Checked after setting the signal: a parent that dies from now on is covered by it.
    let parent = Pid::as_raw(getppid());
    let named_alive = || {
        Pid::from_raw(expected).is_some_and(|p| match test_kill_process(p) {
            Ok(()) => true,
            // It exists but is not ours to signal.
            Err(e) => e == rustix::io::Errno::PERM,
        })
    };
    match check_parent(parent, expected, named_alive) {
        ParentCheck::Ours => {
            tracing::debug!(parent, "dies with its parent (parent-death signal set)");
        }
        ParentCheck::Inherited => {
            let _ = set_parent_process_death_signal(None);
            tracing::debug!(
                parent,
                expected,
                "{PARENT_PID_ENV} names another process than the parent: inherited, ignored"
            );
        }
        ParentCheck::Gone => {
            tracing::warn!(
                expected,
                "palisade up (pid {expected}) exited before this process started: exiting"
            );
            std::process::exit(1);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with(expected: i32) {
    tracing::info!(
        parent = expected,
        "no parent-death signal on this system: if palisade up is killed with SIGKILL, this process keeps running"
    );
}

/// The environment variable through which glibc's allocator takes its arena limit.
pub const MALLOC_ARENA_MAX: &str = "MALLOC_ARENA_MAX";

/// For the sidecar: runs this same program again, in place (same process id, same arguments),
/// with `MALLOC_ARENA_MAX=1`, unless the environment already sets it (any value; set it to
/// opt out, e.g. `MALLOC_ARENA_MAX=8`). Returns when no restart happened.
///
/// glibc gives each thread that allocates an arena of its own, and an arena keeps the memory
/// its thread once needed. A sidecar's workers take turns at peaks (which one accepts a burst
/// of connections is chance), so with an arena each the process holds the sum of every
/// worker's largest peak: in the mesh benchmark the client sidecar's private memory peaked at
/// 5.2 to 5.8 MiB with glibc's default, 4.4 with one arena, at the same CPU per request. Small
/// allocations do not take the arena's lock (glibc's per-thread cache serves them). The
/// allocator reads the setting only at start, hence the restart; it costs one `exec`.
pub fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        if std::env::var_os(MALLOC_ARENA_MAX).is_some() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let mut cmd = std::process::Command::new(exe);
        if let Some(arg0) = args.next() {
            cmd.arg0(arg0);
        }
        let err = cmd.args(args).env(MALLOC_ARENA_MAX, "1").exec();
        // Only reached when the exec failed; the sidecar works as well without it.
        eprintln!(
            "palisade: could not restart with {MALLOC_ARENA_MAX}=1 ({err}); going on with glibc's default arenas"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_checks() {
        let never = || -> bool { panic!("asked about the named process when it is the parent") };
        assert_eq!(check_parent(42, 42, never), ParentCheck::Ours);
        assert_eq!(check_parent(1, 42, || true), ParentCheck::Inherited);
        assert_eq!(check_parent(1, 42, || false), ParentCheck::Gone);
    }
}
