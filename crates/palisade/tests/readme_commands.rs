//! The README's first command runs as written: `cargo run --release -- up examples/bookinfo`
//! must pick the `palisade` binary (the package has two), and `up examples/bookinfo` must parse as
//! the CLI's real subcommand. The walkthrough itself runs in `up_e2e.rs` with the built binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

/// The first command of README.md's first fenced code block, comment removed.
fn first_readme_command() -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let mut lines = readme
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("```"));
    lines.next().expect("README.md has a fenced code block");
    let line = lines
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .expect("the first code block has a command");
    line.split('#').next().unwrap().trim().to_owned()
}

/// `cargo run [flags] -- args...` split into the flags and the program's arguments.
fn split_cargo_run(command: &str) -> (Vec<&str>, Vec<&str>) {
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(
        words.get(..2),
        Some(&["cargo", "run"][..]),
        "README's first command is not `cargo run`: {command}"
    );
    let sep = words
        .iter()
        .position(|w| *w == "--")
        .unwrap_or_else(|| panic!("no `--` in {command}"));
    (words[2..sep].to_vec(), words[sep + 1..].to_vec())
}

/// Runs `cmd` to completion within `limit`; stdout, stderr and whether it succeeded.
fn run(mut cmd: Command, limit: Duration) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read both pipes while the child runs: a child that writes more than a pipe holds (cargo
    // metadata's JSON passed 64 KiB) would otherwise block on write and never exit.
    fn drain(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    }
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = child.wait().unwrap();
    (
        status.success(),
        stdout.join().unwrap(),
        stderr.join().unwrap(),
    )
}

#[test]
fn readme_first_command_selects_the_cli_and_a_real_subcommand() {
    let command = first_readme_command();
    assert_eq!(command, "cargo run --release -- up examples/bookinfo");
    let (flags, args) = split_cargo_run(&command);
    assert!(
        flags.iter().all(|f| ["--release", "-q"].contains(f)),
        "flags this test does not mirror: {flags:?}"
    );
    assert!(
        repo_root().join(args[1]).is_dir(),
        "{} is not a directory",
        args[1]
    );

    // Binary selection, as `cargo run` without `--bin` does it: one bin, or `default-run`.
    let cargo = std::env::var("CARGO").expect("cargo sets CARGO for tests");
    let mut meta = Command::new(&cargo);
    meta.args([
        "metadata",
        "--no-deps",
        "--format-version",
        "1",
        "--offline",
    ])
    .current_dir(repo_root());
    let (ok, stdout, stderr) = run(meta, Duration::from_secs(120));
    assert!(ok, "cargo metadata failed: {stderr}");
    let meta: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let bins = |p: &serde_json::Value| -> Vec<String> {
        p["targets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let with_bins: Vec<_> = packages.iter().filter(|p| !bins(p).is_empty()).collect();
    assert_eq!(with_bins.len(), 1, "one workspace package has binaries");
    let pkg = with_bins[0];
    let selected = match (bins(pkg).as_slice(), pkg["default_run"].as_str()) {
        ([only], _) => only.clone(),
        (all, Some(d)) => {
            assert!(
                all.iter().any(|b| b == d),
                "default-run {d:?} is not a bin of {all:?}"
            );
            d.to_owned()
        }
        (all, None) => panic!(
            "`cargo run` cannot choose among {all:?}: set default-run in {}",
            pkg["manifest_path"]
        ),
    };
    assert_eq!(selected, "palisade");

    // The arguments name a real subcommand: the README's own arguments plus `--help`, which
    // clap answers for that subcommand (exit 0) instead of starting the mesh.
    let mut bin = Command::new(env!("CARGO_BIN_EXE_palisade"));
    bin.args(&args).arg("--help").current_dir(repo_root());
    let (ok, stdout, stderr) = run(bin, Duration::from_secs(30));
    assert!(ok, "palisade {args:?} --help failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("Usage: palisade {}", args[0])),
        "{stdout}"
    );

    // And through `cargo run` itself, as the README's reader runs it. A nested cargo does not
    // deadlock: cargo releases the build-directory lock before it runs test binaries (it may
    // wait for someone else's build, hence the generous limit). `--release` becomes the profile
    // these tests were built with (`test`). On a clean checkout the nested run still compiles
    // the workspace crates once more (about four minutes on a 2-core CI machine), because
    // `cargo test --workspace` builds dependencies with the dev-dependencies' features unified
    // in (tokio's `test-util`, ...) and `cargo run` without them; a later run reuses both.
    // `--offline`: the outer build fetched everything.
    let mut nested = Command::new(&cargo);
    nested.args(["run", "-q", "--offline"]);
    if cfg!(debug_assertions) {
        nested.args(["--profile", "test"]);
    } else {
        nested.arg("--release");
    }
    nested
        .arg("--")
        .args(&args)
        .arg("--help")
        .current_dir(repo_root());
    let (ok, stdout, stderr) = run(nested, Duration::from_secs(600));
    assert!(
        ok,
        "cargo run -- {args:?} --help failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("Usage: palisade {}", args[0])),
        "{stdout}"
    );
}
