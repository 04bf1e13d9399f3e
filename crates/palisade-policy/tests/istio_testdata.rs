//! Istio's own AuthorizationPolicy builder inputs (`shared/istio-testdata/authz`, copied unchanged
//! from istio/istio): every file must load, and the requests in `istio-testdata-cases.yaml` must get
//! the decision Istio's generated RBAC configuration makes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

const TESTDATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/istio-testdata"
);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCases {
    file: String,
    #[serde(default)]
    mesh: Option<String>,
    cases: Vec<common::Case>,
}

fn authz_files(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for sub in ["http", "tcp"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in entries {
            let p: PathBuf = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                out.insert(format!(
                    "{sub}/{}",
                    p.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    out
}

#[test]
fn istio_authz_testdata() {
    let dir = Path::new(TESTDATA).join("authz");
    assert!(
        dir.is_dir(),
        "Istio test data not found at {} (expected shared/istio-testdata next to the workspace)",
        dir.display()
    );
    let files = authz_files(&dir);
    assert!(!files.is_empty(), "no test inputs under {}", dir.display());
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/istio-testdata-cases.yaml"),
    )
    .unwrap();
    let entries: Vec<FileCases> = serde_saphyr::from_str(&text).unwrap();
    let covered: BTreeSet<String> = entries.iter().map(|e| e.file.clone()).collect();
    let missing: Vec<&String> = files.difference(&covered).collect();
    assert!(missing.is_empty(), "inputs without cases: {missing:?}");

    let mut failures = Vec::new();
    let mut n = 0;
    for e in entries {
        let resources = std::fs::read_to_string(dir.join(&e.file)).unwrap();
        let group = common::Group {
            group: e.file.clone(),
            mesh: e.mesh,
            resources,
            no_base_workloads: false,
            expect_load_errors: Vec::new(),
            cases: e.cases,
        };
        n += common::run_group(&e.file, &group, &mut failures);
    }
    println!("istio testdata: {} files, {n} decision cases", files.len());
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
