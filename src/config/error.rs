//! Config errors that point at `file:line:col`.
use std::path::{Path, PathBuf};

/// A config problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{col}: {message}", path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl ConfigError {
    /// The file could not be read at all.
    pub fn io(path: &Path, err: &std::io::Error) -> Self {
        Self { path: path.to_path_buf(), line: 1, col: 1, message: format!("cannot read config: {err}") }
    }
}
