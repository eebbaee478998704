//! Reloads: the one way a new config generation replaces the running one,
//! and two of its triggers, SIGHUP and changes of the config file on disk.
//! (`POST /reload` on the admin listener is the third, in [`crate::admin`].)
//!
//! The file's directory is watched, not the file: editors that save by
//! writing a new file and renaming it over the old one replace the inode a
//! file watch would follow. Bursts of events are debounced, and a file whose
//! text did not change is not reloaded again.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{self, ConfigError};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::runtime::Version;

/// Quiet time after a file event before reloading: editors write in steps.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// What a reload needs, handed to each trigger instead of the whole app.
#[derive(Debug)]
pub struct Reloader {
    /// The config file, read again on every reload.
    path: PathBuf,
    /// Whose config generation a reload replaces.
    proxy: Arc<Proxy>,
    /// Where reloads are counted, and what a new generation registers in.
    metrics: Arc<Metrics>,
    /// Last generation number handed out.
    generation: AtomicU64,
    /// One reload at a time, so generations follow each other.
    reloading: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// Reloads `path` into `proxy`, numbering generations after the one it runs.
    pub fn new(path: PathBuf, proxy: Arc<Proxy>, metrics: Arc<Metrics>) -> Self {
        let generation = AtomicU64::new(proxy.runtime.load().version.generation);
        Self { path, proxy, metrics, generation, reloading: tokio::sync::Mutex::new(()) }
    }

    /// Reloads the config file; on error the old config keeps serving.
    pub async fn reload(&self, trigger: &'static str) -> Result<Version, ConfigError> {
        let _one_at_a_time = self.reloading.lock().await;
        let loaded = std::fs::read_to_string(&self.path)
            .map_err(|e| ConfigError::io(&self.path, &e))
            .and_then(|text| config::parse(&self.path, &text).map(|config| (config, text)));
        let (config, text) = match loaded {
            Ok(loaded) => loaded,
            Err(error) => {
                self.metrics.count_reload(false);
                tracing::error!(trigger, error = %error, "config_rejected");
                return Err(error);
            }
        };
        let current = self.proxy.runtime.load_full();
        let (old, new) = (&current.config.server, &config.server);
        if old.listen != new.listen || old.admin_listen != new.admin_listen || old.workers != new.workers {
            tracing::warn!(trigger, "listener addresses or workers changed: restart pacegate to apply them");
        }
        let version = Version::new(self.generation.fetch_add(1, Ordering::AcqRel) + 1, &text);
        let next = current.reload(config, version.clone(), &self.metrics);
        self.proxy.install(Arc::new(next));
        self.metrics.count_reload(true);
        tracing::info!(trigger, version = %version, "config_reloaded");
        Ok(version)
    }

    /// Whether the file's text differs from the config in force.
    fn file_changed(&self) -> bool {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Version::new(0, &text).hash != self.proxy.runtime.load().version.hash,
            Err(_) => true, // let the reload report the error
        }
    }
}

/// Reloads on SIGHUP and on file changes until `stop` resolves.
pub fn watch(
    reloader: Arc<Reloader>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (events, mut changed) = mpsc::unbounded_channel();
        // Kept alive for as long as this task runs.
        let _watcher = match file_watcher(&reloader.path, events) {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::warn!(%error, "cannot watch the config file; reload with SIGHUP or POST /reload");
                None
            }
        };
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                Some(()) = changed.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while changed.try_recv().is_ok() {}
                    if reloader.file_changed() {
                        let _ = reloader.reload("file").await;
                    }
                }
                Some(()) = recv_hangup(&mut hangups) => {
                    let _ = reloader.reload("sighup").await;
                }
            }
        }
    })
}

async fn recv_hangup(hangups: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hangups {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// Whether an event on the file may have changed what it holds. Reading
/// the file (open, access, a close after reading) does not: reacting to
/// those, a reload's own read of the file would trigger another look at it,
/// five times a second for ever.
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) | EventKind::Access(_) | EventKind::Other => false,
        EventKind::Any | EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
    }
}

fn file_watcher(
    path: &Path,
    events: mpsc::UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    let name = path.file_name().map(|n| n.to_os_string());
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if may_change_content(&event.kind)
            && event.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == name)
        {
            let _ = events.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, MetadataKind, RenameMode};

    #[test]
    fn reads_of_the_file_are_not_changes() {
        for read in [
            EventKind::Access(AccessKind::Open(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)),
        ] {
            assert!(!may_change_content(&read), "{read:?}");
        }
        for change in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Data(DataChange::Content)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Create(CreateKind::File),
        ] {
            assert!(may_change_content(&change), "{change:?}");
        }
    }
}
