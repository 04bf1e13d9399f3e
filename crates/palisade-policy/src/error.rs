//! Load errors: every problem found in a mesh directory, each naming the file, the document, the
//! resource (`Kind ns/name`), the field path and the reason. [`LoadErrors`] carries all of them so
//! that one run shows every mistake.

use std::fmt;

use crate::validate::Severity;

/// Where a resource came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Origin {
    pub file: String,
    /// 1-based index among the non-empty documents of the file.
    pub document: usize,
    /// 1-based line where the document starts.
    pub line: u64,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: document {} (line {})",
            self.file, self.document, self.line
        )
    }
}

/// One problem (or warning) in a mesh directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoadError {
    pub severity: Severity,
    pub file: String,
    /// 1-based document index; `None` for problems with the file itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<usize>,
    /// 1-based line of the problem when known, else of the document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// `Kind ns/name` when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Field path such as `spec.rules[0].from[0].source.principals[1]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub reason: String,
}

impl LoadError {
    pub(crate) fn file(file: &str, reason: impl Into<String>) -> LoadError {
        LoadError {
            severity: Severity::Error,
            file: file.to_owned(),
            document: None,
            line: None,
            resource: None,
            field: None,
            reason: reason.into(),
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        f.write_str(&self.file)?;
        match (self.document, self.line) {
            (Some(d), Some(l)) => write!(f, ": document {d} (line {l})")?,
            (Some(d), None) => write!(f, ": document {d}")?,
            (None, Some(l)) => write!(f, ": line {l}")?,
            (None, None) => {}
        }
        if let Some(r) = &self.resource {
            write!(f, ": {r}")?;
        }
        if let Some(p) = &self.field {
            write!(f, ": {p}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Every error found while loading; `Display` prints one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadErrors(pub Vec<LoadError>);

impl LoadErrors {
    pub fn iter(&self) -> impl Iterator<Item = &LoadError> {
        self.0.iter()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
