//! TLS of our own: the local CA (`pacegate ca init`) and interception of
//! CONNECT tunnels with per-host certificates signed by it.
//!
//! Interception is how pacing reaches HTTPS traffic sent through
//! `HTTPS_PROXY`: without it pacegate only sees opaque bytes. So it is on by
//! default, and a config generation that finds neither CA file creates them
//! ([`provision`]); where they cannot be written (a read-only mount),
//! interception is off, with one warning saying what to do.
//!
//! Each config generation carries its [`Interceptor`] ([`interception`]), so
//! a reload puts a changed CA in force with the rest of the config, at once;
//! a reload whose CA cannot be made or loaded is refused, and the running
//! CA stays.

pub mod ca;
pub mod mitm;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use ca::{Ca, Source, write_new_ca, write_new_pair};
pub use mitm::Interceptor;

use crate::config::Mitm;

/// What a new config generation made of `[mitm]`'s CA files.
#[derive(Debug)]
pub enum Provision {
    /// Interception is off in the config: nothing to do.
    Off,
    /// A file is there: it is loaded as it is (and must be usable).
    Found,
    /// Neither file was there: a new CA was written.
    Created,
    /// Neither file was there and they could not be written: interception
    /// is now off.
    Unwritable(TlsError),
}

/// Neither CA file exists: a start would create them.
pub fn ca_missing(mitm: &Mitm) -> bool {
    !mitm.ca_cert.exists() && !mitm.ca_key.exists()
}

/// Whether a start could write a missing CA: both files' directories exist
/// and this user may create files in them (asked of the kernel, as the
/// write would be; nothing is written). The directory that fails is named.
pub fn can_create(mitm: &Mitm) -> Result<(), TlsError> {
    for file in [&mitm.ca_cert, &mitm.ca_key] {
        let dir = file.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let access = rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK;
        if let Err(error) = rustix::fs::access(dir, access) {
            return Err(TlsError::Io { path: dir.to_path_buf(), source: error.into() });
        }
    }
    Ok(())
}

/// Readies `[mitm]` for a new config generation. With interception on and
/// neither CA file there, writes a new CA there and logs how to trust it;
/// when they cannot be written, turns interception off and warns.
pub fn provision(mitm: &mut Mitm) -> Provision {
    if !mitm.enabled {
        return Provision::Off;
    }
    if !ca_missing(mitm) {
        return Provision::Found;
    }
    match write_new_pair(&mitm.ca_cert, &mitm.ca_key) {
        Ok(()) => {
            log_created(mitm);
            Provision::Created
        }
        Err(error) => {
            tracing::warn!(
                %error,
                "cannot create the CA for HTTPS interception: interception is off, so HTTPS \
                 through CONNECT is not paced; create one with `pacegate ca init --out DIR` \
                 in a writable DIR and set [mitm] ca_cert and ca_key to its files (in a \
                 container: mount a directory you own holding the config on its directory \
                 and run as yourself), or set [mitm] enabled = false to go without"
            );
            mitm.enabled = false;
            Provision::Unwritable(error)
        }
    }
}

fn log_created(mitm: &Mitm) {
    let cert = mitm.ca_cert.display().to_string();
    tracing::info!(
        ca_cert = %cert,
        ca_key = %mitm.ca_key.display(),
        "created a CA for HTTPS interception; trust {cert} in the programs that use \
         pacegate as HTTPS_PROXY (curl --cacert {cert}, SSL_CERT_FILE, \
         REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS); the key never leaves its file"
    );
}

/// The interceptor of a new config generation: `None` with interception
/// off, else one for the CA `[mitm]` names, provisioned first.
///
/// `running` is the interceptor of the generation in force, if it has one.
/// It is kept while its files hold the same CA (the leaf certificates it
/// made stay valid); a CA at other paths, or other content at the same
/// ones (files deleted and created again by this reload), is loaded anew.
/// With one running, a CA that cannot be created or loaded is an error, so
/// that the reload is refused and the running CA stays, rather than HTTPS
/// going unpaced; at start, an unwritable place turns interception off
/// ([`provision`]).
pub fn interception(
    mitm: &mut Mitm,
    running: Option<&Arc<Interceptor>>,
) -> Result<Option<Arc<Interceptor>>, TlsError> {
    if running.is_some() && mitm.enabled && ca_missing(mitm) {
        write_new_pair(&mitm.ca_cert, &mitm.ca_key)?;
        log_created(mitm);
    } else {
        provision(mitm);
    }
    if !mitm.enabled {
        return Ok(None);
    }
    let ca = Ca::load(&mitm.ca_cert, &mitm.ca_key)?;
    if let Some(running) = running {
        if running.source() == &ca.source {
            return Ok(Some(running.clone()));
        }
        let cert = mitm.ca_cert.display().to_string();
        tracing::info!(
            ca_cert = %cert,
            ca_key = %mitm.ca_key.display(),
            "interception CA changed: new tunnels get certificates signed by {cert}, which \
             clients must trust; the certificates of the old CA are dropped"
        );
    }
    Ok(Some(Arc::new(Interceptor::new(ca))))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mitm_in(dir: &Path) -> Mitm {
        Mitm {
            enabled: true,
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            written_at: Default::default(),
        }
    }

    #[test]
    fn a_missing_ca_is_created_once_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut mitm = mitm_in(dir.path());
        assert!(matches!(provision(&mut mitm), Provision::Created));
        assert!(mitm.enabled);
        assert_eq!(std::fs::metadata(&mitm.ca_key).unwrap().permissions().mode() & 0o777, 0o600);
        let cert = std::fs::read(&mitm.ca_cert).unwrap();
        assert!(Interceptor::load(&mitm).is_ok());
        assert!(matches!(provision(&mut mitm), Provision::Found), "the next start finds it");
        assert_eq!(std::fs::read(&mitm.ca_cert).unwrap(), cert, "and never replaces it");
    }

    #[test]
    fn half_a_ca_is_left_alone_for_loading_to_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let mut mitm = mitm_in(dir.path());
        std::fs::write(&mitm.ca_cert, "someone's certificate").unwrap();
        assert!(matches!(provision(&mut mitm), Provision::Found));
        assert!(!mitm.ca_key.exists(), "no key is made up for a certificate");
        assert!(Interceptor::load(&mitm).is_err());
    }

    #[test]
    fn an_unwritable_place_turns_interception_off() {
        // A file where the directory should be: not writable, even as root.
        let blocker = tempfile::NamedTempFile::new().unwrap();
        let mut mitm = mitm_in(blocker.path());
        assert!(matches!(provision(&mut mitm), Provision::Unwritable(_)));
        assert!(!mitm.enabled);
        assert!(matches!(provision(&mut mitm), Provision::Off), "off stays off");
    }

    #[test]
    fn a_reload_keeps_the_same_ca_and_loads_a_changed_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut mitm = mitm_in(dir.path());
        let first = interception(&mut mitm, None).unwrap().expect("created and loaded");
        let same = interception(&mut mitm, Some(&first)).unwrap().unwrap();
        assert!(Arc::ptr_eq(&first, &same), "the same files keep the interceptor and its leaves");
        std::fs::remove_file(&mitm.ca_cert).unwrap();
        std::fs::remove_file(&mitm.ca_key).unwrap();
        let created = interception(&mut mitm, Some(&first)).unwrap().unwrap();
        assert!(!Arc::ptr_eq(&first, &created), "a CA created again is loaded");
        assert!(mitm.ca_key.exists());
    }

    #[test]
    fn a_reload_refuses_what_would_drop_a_running_ca() {
        let dir = tempfile::tempdir().unwrap();
        let running = interception(&mut mitm_in(dir.path()), None).unwrap();
        let blocker = tempfile::NamedTempFile::new().unwrap();
        let mut unwritable = mitm_in(blocker.path());
        assert!(interception(&mut unwritable, running.as_ref()).is_err(), "not silently off");
        let mut half = mitm_in(dir.path());
        std::fs::remove_file(&half.ca_key).unwrap();
        assert!(interception(&mut half, running.as_ref()).is_err());
        let mut off = Mitm { enabled: false, ..mitm_in(dir.path()) };
        assert!(interception(&mut off, running.as_ref()).unwrap().is_none(), "turned off on purpose");
        // Off since the start (a read-only place): a reload stays off, as the start did.
        assert!(interception(&mut mitm_in(blocker.path()), None).unwrap().is_none());
    }

    #[test]
    fn a_key_is_not_left_behind_without_its_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let mitm =
            Mitm { enabled: true, ca_cert: dir.path().join("no/such/dir/ca.pem"), ..mitm_in(dir.path()) };
        assert!(write_new_pair(&mitm.ca_cert, &mitm.ca_key).is_err());
        assert!(!mitm.ca_key.exists());
    }
}

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

impl TlsError {
    /// The file the error is about, if it is about one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Io { path, .. } | Self::Exists { path } | Self::BadCa { path, .. } => Some(path),
            Self::Generate(_) | Self::Rustls(_) => None,
        }
    }
}
