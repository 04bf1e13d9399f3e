//! Network namespaces for the tests that need them (iptables rules, transparent capture): the
//! check that says why such a test cannot run here, and a namespace guard that deletes the
//! namespace, and kills what runs in it, even when the test fails.

#![allow(dead_code)]

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Says why a test does not run, where `cargo test` shows it (libtest captures only the
/// `print!` family, not writes to the stderr handle).
pub fn skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

pub fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
        .unwrap_or(false)
}

/// Why a namespace test cannot run here, if it cannot: not root, one of `tools` missing (`hint`
/// says where it comes from), or `ip netns` not working.
pub fn missing(tools: &[&str], hint: &str) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("?");
    if uid != "0" {
        return Some(format!(
            "needs root to create network namespaces (uid is {uid})"
        ));
    }
    if let Some(tool) = std::iter::once(&"ip").chain(tools).find(|t| !on_path(t)) {
        return Some(format!("{tool} not found ({hint})"));
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "`ip netns list` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run `ip netns list`: {e}")),
    }
}

pub fn output_text(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// A network namespace, deleted with everything still running in it when dropped (which also
/// deletes its end of every veth pair, and so the pair).
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A fresh namespace named `palisade-<prefix>-<pid>-<n>-<tag>`, loopback up.
    pub fn new(prefix: &str, tag: &str) -> Result<Netns, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "palisade-{prefix}-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run `ip netns add`: {e}"))?;
        if !out.status.success() {
            return Err(format!("`ip netns add` failed: {}", output_text(&out)));
        }
        let ns = Netns { name };
        ns.must(&["ip", "link", "set", "lo", "up"]);
        Ok(ns)
    }

    /// `args` as a command inside this namespace.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs `args` here, which must succeed; its standard output.
    pub fn must(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "in {}: {args:?}: {}",
            self.name,
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes keep a deleted namespace alive: end them first.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
