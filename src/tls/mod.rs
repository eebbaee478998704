//! TLS of our own: the local CA (`pacegate ca init`) and interception of
//! CONNECT tunnels with per-host certificates signed by it.
//!
//! Interception is how pacing reaches HTTPS traffic sent through
//! `HTTPS_PROXY`: without it pacegate only sees opaque bytes.

pub mod ca;
pub mod mitm;

use std::path::PathBuf;

pub use ca::{Ca, write_new_ca};
pub use mitm::Interceptor;

/// Why a CA or a certificate could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} already exists; remove it first or choose another --out", path.display())]
    Exists { path: PathBuf },
    #[error("{}: not a usable CA ({reason}); create one with `pacegate ca init`", path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}
