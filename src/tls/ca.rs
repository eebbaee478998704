//! The local certificate authority: created by `pacegate ca init`, or at
//! start-up when `[mitm]` is enabled and neither of its files exists
//! (mitmproxy's convention), then loaded.
//!
//! The key never leaves the machine and is written owner-readable only;
//! existing files are never overwritten, so a CA callers already trust is not
//! replaced by accident.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::TlsError;

/// File name of the CA certificate inside `--out`.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA key inside `--out`.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// How long a new CA is valid.
const CA_VALIDITY: time::Duration = time::Duration::days(3650);

/// A loaded CA: what signs leaf certificates, and its own certificate.
pub struct Ca {
    /// Signs leaf certificates.
    pub issuer: Issuer<'static, KeyPair>,
    /// Sent after the leaf so clients can build the chain.
    pub cert: CertificateDer<'static>,
    /// The files it came from: a reload that finds the same keeps this CA.
    pub source: Source,
}

/// Where a CA was loaded from and what its files held (a SHA-256 of both,
/// not the key itself): files deleted and created again, or rewritten in
/// place, are a different CA at the same paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub cert: PathBuf,
    pub key: PathBuf,
    digest: Vec<u8>,
}

impl Source {
    fn of(cert: &Path, cert_pem: &str, key: &Path, key_pem: &str) -> Self {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        for text in [cert_pem, key_pem] {
            // Lengths first, so no two different pairs hash the same bytes.
            context.update(&(text.len() as u64).to_be_bytes());
            context.update(text.as_bytes());
        }
        let digest = context.finish().as_ref().to_vec();
        Self { cert: cert.to_path_buf(), key: key.to_path_buf(), digest }
    }
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads a CA written by `pacegate ca init` (or any PEM CA with its key).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let bad = |path: &Path, reason: String| TlsError::BadCa { path: path.to_path_buf(), reason };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(key_path, e.to_string()))?;
        let cert =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| bad(cert_path, e.to_string()))?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| bad(cert_path, e.to_string()))?;
        let source = Source::of(cert_path, &cert_pem, key_path, &key_pem);
        Ok(Self { issuer, cert, source })
    }
}

/// Creates a new CA and writes `dir/ca.pem` and `dir/ca-key.pem` (mode 0600);
/// refuses if either exists. Returns both paths.
pub fn write_new_ca(dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io { path: dir.to_path_buf(), source })?;
    write_new_pair(&cert_path, &key_path)?;
    Ok((cert_path, key_path))
}

/// Creates a new CA as `cert_path` and `key_path` (mode 0600); refuses if
/// either exists, and leaves neither behind when one cannot be written.
pub fn write_new_pair(cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
    for path in [cert_path, key_path] {
        if path.exists() {
            return Err(TlsError::Exists { path: path.to_path_buf() });
        }
    }
    let (cert_pem, key_pem) = generate()?;
    write_new(key_path, &key_pem, 0o600)?;
    write_new(cert_path, &cert_pem, 0o644).inspect_err(|_| {
        // Half a CA would stop the next start: take the key back.
        let _ = std::fs::remove_file(key_path);
    })
}

/// A fresh self-signed CA: (certificate PEM, key PEM).
fn generate() -> Result<(String, String), TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "pacegate local CA");
    name.push(DnType::OrganizationName, "pacegate");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + CA_VALIDITY;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path)
        .map_err(|source| TlsError::BadCa { path: path.to_path_buf(), reason: source.to_string() })
}

/// Creates `path` (never truncating an existing file) with `mode`.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    let io = |source| TlsError::Io { path: path.to_path_buf(), source };
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_ca_loads_and_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_new_ca(dir.path()).unwrap();
        assert!(Ca::load(&cert, &key).is_ok());
        assert!(matches!(write_new_ca(dir.path()), Err(TlsError::Exists { .. })));
    }

    #[test]
    fn a_ca_written_again_at_the_same_paths_is_another_source() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_new_ca(dir.path()).unwrap();
        let first = Ca::load(&cert, &key).unwrap().source;
        assert_eq!(Ca::load(&cert, &key).unwrap().source, first, "the same files, the same CA");
        std::fs::remove_file(&cert).unwrap();
        std::fs::remove_file(&key).unwrap();
        write_new_ca(dir.path()).unwrap();
        assert_ne!(Ca::load(&cert, &key).unwrap().source, first);
    }

    #[test]
    fn missing_files_name_the_path() {
        let error = Ca::load(Path::new("/nonexistent/ca.pem"), Path::new("/nonexistent/k.pem")).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
    }
}
