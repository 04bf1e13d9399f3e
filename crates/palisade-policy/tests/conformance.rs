//! The conformance suite: every YAML file under `tests/conformance/` holds groups of resources and
//! request cases with the decision and policy id Istio would produce.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

#[test]
fn conformance_suite() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut failures = Vec::new();
    let mut cases = 0;
    let mut invalid_groups = 0;
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(f).unwrap();
        for g in common::parse_groups(&name, &text) {
            if !g.expect_load_errors.is_empty() {
                invalid_groups += 1;
            }
            cases += common::run_group(&name, &g, &mut failures);
        }
    }
    println!(
        "conformance: {cases} decision cases, {invalid_groups} invalid-configuration groups in {} files",
        files.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(cases >= 150, "only {cases} decision cases");
}
