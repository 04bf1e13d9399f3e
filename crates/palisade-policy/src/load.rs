//! The only I/O in this crate: reading a mesh directory (`mesh.yaml` plus every `*.yaml` / `*.yml`
//! below it, recursively, hidden entries skipped, in sorted order) into a [`MeshSnapshot`].

use std::path::{Path, PathBuf};

use crate::error::{LoadError, LoadErrors};
use crate::snapshot::MeshSnapshot;

/// Name of the MeshConfig file at the top of a mesh directory.
pub const MESH_FILE: &str = "mesh.yaml";

/// Loads and validates a mesh directory; every error is reported.
pub fn load_dir(dir: &Path) -> Result<MeshSnapshot, LoadErrors> {
    let mut errors = Vec::new();
    let meta = std::fs::metadata(dir).map_err(|e| {
        LoadErrors(vec![LoadError::file(
            &dir.display().to_string(),
            format!("cannot read mesh directory: {e}"),
        )])
    })?;
    if !meta.is_dir() {
        return Err(LoadErrors(vec![LoadError::file(
            &dir.display().to_string(),
            "not a directory",
        )]));
    }
    let mesh_path = dir.join(MESH_FILE);
    let mesh_text = match std::fs::read_to_string(&mesh_path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            errors.push(LoadError::file(
                &mesh_path.display().to_string(),
                format!("cannot read: {e}"),
            ));
            None
        }
    };
    let mut paths = Vec::new();
    collect(dir, &mut paths, &mut errors);
    paths.retain(|p| p != &mesh_path);
    paths.sort();
    let mut files = Vec::new();
    for p in paths {
        let name = p.display().to_string();
        match std::fs::read_to_string(&p) {
            Ok(t) => files.push((name, t)),
            Err(e) => errors.push(LoadError::file(&name, format!("cannot read: {e}"))),
        }
    }
    let mesh_name = mesh_path.display().to_string();
    let result = MeshSnapshot::from_sources(
        mesh_text.as_deref().map(|t| (mesh_name.as_str(), t)),
        &files,
    );
    match result {
        Ok(s) if errors.is_empty() => Ok(s),
        Ok(_) => Err(LoadErrors(errors)),
        Err(mut e) => {
            errors.append(&mut e.0);
            Err(LoadErrors(errors))
        }
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>, errors: &mut Vec<LoadError>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(LoadError::file(
                &dir.display().to_string(),
                format!("cannot list: {e}"),
            ));
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if hidden {
            continue;
        }
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            collect(&path, out, errors);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}
