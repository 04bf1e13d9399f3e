//! `palisade authz matrix` run as a user would, on `examples/bookinfo`: the cells the bookinfo
//! policies intend (who may read details, reviews and ratings, the DENY on deleting reviews, the
//! STRICT and PERMISSIVE ports, the dry-run policy), each grant's witness decided again by
//! `palisade authz check`, and the table, dot and error outputs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/frontend/sa/bookinfo-productpage";
const REVIEWS: &str = "spiffe://cluster.local/ns/backend/sa/bookinfo-reviews";
const CI: &str = "spiffe://cluster.local/ns/dev/sa/ci";

fn bookinfo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .join("examples/bookinfo")
}

fn palisade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run palisade")
}

fn matrix_json(extra: &[&str]) -> Value {
    let dir = bookinfo();
    let mut args = vec![
        "authz",
        "matrix",
        "--config",
        dir.to_str().unwrap(),
        "--output",
        "json",
    ];
    args.extend(extra);
    let out = palisade(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn cell<'v>(m: &'v Value, source: &str, workload: &str, port: u16) -> &'v Value {
    m["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["source"] == source && c["workload"] == workload && c["port"] == port)
        .unwrap_or_else(|| panic!("no cell {source} -> {workload}:{port}"))
}

fn verdict(c: &Value) -> (&str, &str) {
    (
        c["verdict"].as_str().unwrap(),
        c["reason"].as_str().unwrap(),
    )
}

/// `authz check` on a witness: the engine must allow it.
fn check_allows(witness: &Value) -> Value {
    let req_dir = tempfile::tempdir().unwrap();
    let req = req_dir.path().join("witness.json");
    std::fs::write(&req, serde_json::to_vec(witness).unwrap()).unwrap();
    let dir = bookinfo();
    let out = palisade(&[
        "authz",
        "check",
        "--config",
        dir.to_str().unwrap(),
        "--request",
        req.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        d["allowed"], true,
        "witness {witness} denied: {}",
        d["reason"]
    );
    d
}

#[test]
fn bookinfo_cells_match_the_policies_intent() {
    let m = matrix_json(&["--identity", CI]);
    assert_eq!(
        m["sources"].as_array().unwrap().len(),
        6,
        "4 service accounts, --identity, none"
    );
    assert_eq!(m["destinations"].as_array().unwrap().len(), 6);

    // productpage reads details: GET /details/* only.
    let c = cell(&m, PRODUCTPAGE, "backend/details", 9080);
    assert_eq!(verdict(c).0, "conditional");
    let g = &c["grants"][0];
    assert_eq!(g["rule"], "backend/details-viewer rule[0]");
    assert_eq!(
        g["conditions"],
        serde_json::json!([
            "to[0].operation.methods [\"GET\"]",
            "to[0].operation.paths [\"/details/*\"]"
        ])
    );
    assert_eq!(g["witness"]["source"]["principal"], PRODUCTPAGE);
    let d = check_allows(&g["witness"]);
    assert_eq!(d["policy"], "ns[backend]-policy[details-viewer]-rule[0]");

    // Only reviews reads ratings; productpage is refused by the default deny of `backend`.
    let (v, reason) = verdict(cell(&m, PRODUCTPAGE, "backend/ratings", 9080));
    assert_eq!(v, "denied");
    assert!(
        reason.contains("no ALLOW rule admits this source"),
        "{reason}"
    );
    assert!(reason.contains("backend/allow-nothing"), "{reason}");
    let c = cell(&m, REVIEWS, "backend/ratings", 9080);
    assert_eq!(verdict(c).0, "conditional");
    assert_eq!(c["grants"][0]["rule"], "backend/ratings-viewer rule[0]");
    check_allows(&c["grants"][0]["witness"]);

    // Plaintext: refused on STRICT 9080, admitted from loopback on the PERMISSIVE legacy port.
    let c = cell(&m, "none", "backend/ratings", 9080);
    assert_eq!(verdict(c).0, "denied");
    assert!(verdict(c).1.contains("requires mTLS"), "{}", verdict(c).1);
    assert_eq!(c["policy"], "PeerAuthentication istio-system/default");
    let c = cell(&m, "none", "backend/ratings", 9081);
    assert_eq!(verdict(c).0, "conditional");
    let g = &c["grants"][0];
    assert_eq!(g["rule"], "backend/ratings-viewer rule[1]");
    assert!(
        g["conditions"]
            .as_array()
            .unwrap()
            .contains(&Value::from("from[0].source.ipBlocks [\"127.0.0.0/8\"]")),
        "{g}"
    );
    let ip = g["witness"]["source"]["ip"].as_str().unwrap();
    assert!(ip.starts_with("127."), "{ip}");
    check_allows(&g["witness"]);

    // productpage reads reviews, except what the DENY on DELETE matches.
    for reviews in ["backend/reviews-v1", "backend/reviews-v2"] {
        let c = cell(&m, PRODUCTPAGE, reviews, 9080);
        assert_eq!(verdict(c).0, "conditional");
        assert_eq!(
            c["restrictions"][0]["rule"],
            "backend/reviews-no-delete rule[0]"
        );
        assert_eq!(
            c["restrictions"][0]["conditions"],
            serde_json::json!(["to[0].operation.methods [\"DELETE\"]"])
        );
        let w = &c["grants"][0]["witness"];
        assert_ne!(w["http"]["method"], "DELETE");
        check_allows(w);
    }

    // The front door takes everyone; the dry-run DENY is noted, not enforced.
    for source in [PRODUCTPAGE, REVIEWS, CI, "none"] {
        let c = cell(&m, source, "frontend/productpage", 9080);
        assert_eq!(verdict(c).0, "always", "{source}");
        assert_eq!(
            c["dryRun"],
            serde_json::json!(["frontend/productpage-internal-only (DENY)"])
        );
    }

    // A caller outside the directory reaches nothing in `backend`.
    for (workload, port) in [
        ("backend/details", 9080),
        ("backend/reviews-v1", 9080),
        ("backend/ratings", 9080),
    ] {
        assert_eq!(verdict(cell(&m, CI, workload, port)).0, "denied");
    }
}

#[test]
fn table_and_dot_outputs() {
    let dir = bookinfo();
    let out = palisade(&["authz", "matrix", "--config", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("SOURCE"), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with(PRODUCTPAGE) && l.contains("backend/details:9080"))
        .unwrap();
    assert!(
        line.contains("conditional") && line.contains("backend/details-viewer rule[0]"),
        "{line}"
    );

    let out = palisade(&[
        "authz",
        "matrix",
        "--config",
        dir.to_str().unwrap(),
        "--output",
        "dot",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(dot.starts_with("digraph"), "{dot}");
    assert!(
        dot.contains(
            "\"frontend/productpage\" -> \"backend/details\" [label=\"9080?\", style=dashed];"
        ),
        "{dot}"
    );
    assert!(
        dot.contains("\"none\" -> \"frontend/productpage\" [label=\"9080\"];"),
        "{dot}"
    );
    // Neither 9080 (ratings-viewer admits only reviews there) nor the legacy port 9081, whose
    // rule admits loopback callers without a mesh identity only.
    assert!(
        !dot.contains("\"frontend/productpage\" -> \"backend/ratings\""),
        "{dot}"
    );
    assert!(
        dot.contains("\"none\" -> \"backend/ratings\" [label=\"9081?\", style=dashed];"),
        "{dot}"
    );
}

#[test]
fn errors_exit_2_naming_the_input() {
    let dir = bookinfo();
    let out = palisade(&[
        "authz",
        "matrix",
        "--config",
        dir.to_str().unwrap(),
        "--identity",
        "cluster.local/ns/dev/sa/ci",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--identity \"cluster.local/ns/dev/sa/ci\": expected a SPIFFE ID"),
        "{err}"
    );

    let broken = tempfile::tempdir().unwrap();
    std::fs::write(
        broken.path().join("bad.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: broken, namespace: prod}\nspec:\n  rules:\n  - from:\n    - source: {principalz: [x]}\n",
    )
    .unwrap();
    let out = palisade(&[
        "authz",
        "matrix",
        "--config",
        broken.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml: document 1 (line 7): AuthorizationPolicy prod/broken")
            && err.contains("principalz"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
