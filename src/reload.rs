//! Reloads: the one way a new config generation replaces the running one,
//! and two of its triggers, SIGHUP and changes of the config file on disk.
//! (`POST /reload` on the admin listener is the third, in [`crate::admin`].)
//!
//! The file's directory is watched, not the file: editors that save by
//! writing a new file and renaming it over the old one replace the inode a
//! file watch would follow. Events about other files of the directory (a
//! log written next to the config) are dropped by name before anything
//! else. Bursts of events are debounced, and the watcher loads neither the
//! text in force nor the text it last rejected again: a broken file is
//! rejected (logged, counted) once per content, however often it is touched,
//! until it changes. SIGHUP and `POST /reload` always load the file, and
//! the `[mitm]` CA files with it: a CA replaced on disk (or deleted, to be
//! created again) is put in force by either.

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
use crate::tls::TlsError;

/// Quiet time after a file event before reloading: editors and scripts
/// write in steps, and a file half written must not come into force.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// The longest a file that keeps changing puts a reload off.
const DEBOUNCE_AT_MOST: Duration = Duration::from_secs(2);

/// Why a reload was refused; the running generation keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The file is valid, but the CA `[mitm]` needs cannot be created or
    /// loaded (not a fault of the text: the next reload reads it again).
    #[error("[mitm]: {0}; the running CA stays in use")]
    Ca(#[from] TlsError),
}

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
    /// Hash of the text last rejected, until a reload succeeds: the
    /// watcher does not load it again.
    rejected: std::sync::Mutex<Option<String>>,
    /// The listeners and workers pacegate started with, which only a
    /// restart changes: a reload is warned about whenever its file differs
    /// from them, not from the last file.
    started: Bound,
}

/// What only a restart changes: (`listen`, `admin_listen`, `workers`).
type Bound = (std::net::SocketAddr, std::net::SocketAddr, Option<std::num::NonZeroUsize>);

fn bound(server: &config::Server) -> Bound {
    (server.listen, server.admin_listen, server.workers)
}

impl Reloader {
    /// Reloads `path` into `proxy`, numbering generations after the one it runs.
    pub fn new(path: PathBuf, proxy: Arc<Proxy>, metrics: Arc<Metrics>) -> Self {
        let runtime = proxy.runtime.load();
        let (generation, started) =
            (AtomicU64::new(runtime.version.generation), bound(&runtime.config.server));
        let (reloading, rejected) = (tokio::sync::Mutex::new(()), std::sync::Mutex::new(None));
        Self { path, proxy, metrics, generation, reloading, rejected, started }
    }

    /// Reloads the config file; on error the old config keeps serving.
    pub async fn reload(&self, trigger: &'static str) -> Result<Version, ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        let text = std::fs::read_to_string(&self.path).map_err(|e| ConfigError::io(&self.path, &e));
        let loaded = text.and_then(|text| match config::parse(&self.path, &text) {
            Ok(config) => Ok((config, text)),
            Err(error) => {
                *self.last_rejected() = Some(Version::new(0, &text).hash);
                Err(error)
            }
        });
        let (config, text) = match loaded {
            Ok(loaded) => loaded,
            Err(error) => return Err(self.rejected(trigger, error.into())),
        };
        let current = self.proxy.runtime.load_full();
        if bound(&config.server) != self.started {
            tracing::warn!(trigger, "listener addresses or workers changed: restart pacegate to apply them");
        }
        // Numbered once it is built: a refused generation takes no number.
        let version = Version::new(self.generation.load(Ordering::Acquire) + 1, &text);
        let next = match current.reload(config, version.clone(), &self.metrics, &self.proxy.retired()) {
            Ok(next) => next,
            Err(error) => return Err(self.rejected(trigger, error.into())),
        };
        self.generation.store(version.generation, Ordering::Release);
        self.proxy.install(Arc::new(next));
        *self.last_rejected() = None;
        self.metrics.count_reload(true);
        tracing::info!(trigger, version = %version, "config_reloaded");
        Ok(version)
    }

    fn rejected(&self, trigger: &'static str, error: ReloadError) -> ReloadError {
        self.metrics.count_reload(false);
        tracing::error!(trigger, error = %error, "config_rejected");
        error
    }

    /// Whether the file holds a text the watcher has not judged yet: neither
    /// the config in force nor the text last rejected.
    fn file_changed(&self) -> bool {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                let hash = Version::new(0, &text).hash;
                hash != self.proxy.runtime.load().version.hash && self.last_rejected().as_ref() != Some(&hash)
            }
            Err(_) => true, // let the reload report the error
        }
    }

    fn last_rejected(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // The value is replaced whole: a panic elsewhere cannot leave it half written.
        self.rejected.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Reloads on SIGHUP and on file changes until `stop` resolves. The file is
/// watched before this returns, so no change made after it is missed.
pub fn watch(
    reloader: Arc<Reloader>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let (events, mut changed) = mpsc::unbounded_channel();
    let mut watching = FileWatch::start(&reloader.path, events);
    // Before the task, like the watcher: a SIGHUP right after the
    // `listening` line reloads rather than ends pacegate (its default).
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                Some(()) = changed.recv() => {
                    quiet(&mut changed).await;
                    // A link may now lead elsewhere: watch where it leads.
                    watching.follow(&reloader.path);
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

/// Waits until no change came for [`DEBOUNCE`] (each change starts the
/// wait again), or [`DEBOUNCE_AT_MOST`] passed: one reload for a file
/// written in steps, once it is whole.
async fn quiet(changed: &mut mpsc::UnboundedReceiver<()>) {
    let give_up = tokio::time::Instant::now() + DEBOUNCE_AT_MOST;
    loop {
        let until = (tokio::time::Instant::now() + DEBOUNCE).min(give_up);
        match tokio::time::timeout_at(until, changed.recv()).await {
            Ok(Some(())) if tokio::time::Instant::now() < give_up => {}
            _ => return,
        }
    }
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

/// The watch on the config file, and where it looks.
struct FileWatch {
    /// Kept alive for as long as the file is watched; `None` when even the
    /// config's own directory could not be watched.
    watcher: Option<notify::RecommendedWatcher>,
    watched: Watched,
    events: mpsc::UnboundedSender<()>,
}

impl FileWatch {
    fn start(path: &Path, events: mpsc::UnboundedSender<()>) -> Self {
        let watched = watched(path);
        let watcher = file_watcher(&watched, events.clone())
            .inspect_err(|error| {
                tracing::warn!(%error, "cannot watch the config file; reload with SIGHUP or POST /reload");
            })
            .ok();
        Self { watcher, watched, events }
    }

    /// Watches anew when the links now lead elsewhere (a link re-pointed,
    /// a ConfigMap's version swapped): edits there are seen from now on.
    /// A new watch that cannot be made (the inotify limit, no file
    /// descriptor left) leaves the old one, and the next change tries again.
    fn follow(&mut self, path: &Path) {
        let now = watched(path);
        if now == self.watched || self.watcher.is_none() {
            return;
        }
        match file_watcher(&now, self.events.clone()) {
            Ok(watcher) => (self.watcher, self.watched) = (Some(watcher), now),
            Err(error) => {
                tracing::warn!(%error, "cannot watch where the config's links lead now; still watching where they led")
            }
        }
    }
}

fn file_watcher(
    watched: &Watched,
    events: mpsc::UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    let names = watched.names.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let ours =
            event.paths.iter().any(|p| p.file_name().is_some_and(|name| names.iter().any(|n| n == name)));
        if ours && may_change_content(&event.kind) {
            let _ = events.send(());
        }
    })?;
    let Some((own, others)) = watched.dirs.split_first() else {
        return Err(notify::Error::generic("no directory to watch"));
    };
    watcher.watch(own, RecursiveMode::NonRecursive)?;
    // A directory a link leads to that cannot be watched (permissions,
    // the inotify limit) costs only the edits made there.
    for dir in others {
        if let Err(error) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(%error, dir = %dir.display(), "cannot watch where the config's link leads; edits there need SIGHUP or POST /reload");
        }
    }
    Ok(watcher)
}

/// Where the config file is watched: directories, resolved (the config's
/// own first), and the names there that are the config or lead to it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Watched {
    dirs: Vec<PathBuf>,
    names: Vec<std::ffi::OsString>,
}

impl Watched {
    /// Watches `name` in `dir` (resolved, so that a directory reached
    /// through a link that is re-pointed later reads as another one).
    fn add(&mut self, dir: &Path, name: &std::ffi::OsStr) {
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        if !self.dirs.contains(&dir) {
            self.dirs.push(dir);
        }
        if !self.names.iter().any(|known| known == name) {
            self.names.push(name.to_os_string());
        }
    }
}

/// Links followed at most, as the kernel's own bound on a path's links.
const MAX_LINKS: usize = 40;

/// The file's own directory and name, and every symlink met on the way to
/// the file, resolved step by step as the kernel does (a link to the file,
/// to a directory on the way, from the path as written or from where an
/// earlier link led): the link's directory and name. Kubernetes mounts a
/// ConfigMap as `NAME -> ..data/NAME` and swaps the `..data` link; a
/// release directory `current -> releases/v2` is re-pointed; either is an
/// event on a link's name there. Last, the directory and name of the file
/// the links lead to (edits made there). Events on other files in those
/// directories are ignored; one that names the config without changing
/// it only makes the watcher read it again.
fn watched(path: &Path) -> Watched {
    use std::path::Component;
    let dir_of = |path: &Path| match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    let mut found = Watched::default();
    if let Some(name) = path.file_name() {
        found.add(&dir_of(path), name);
    }
    // Walks `pending` from its start; at a link, goes on from where the
    // link leads with the rest of the path, up to MAX_LINKS links.
    let mut pending = path.to_path_buf();
    let mut links = 0;
    'walk: while links < MAX_LINKS {
        let mut at = PathBuf::new();
        let steps: Vec<Component> = pending.components().collect();
        for (index, step) in steps.iter().enumerate() {
            at.push(step);
            let Component::Normal(name) = step else { continue };
            let Ok(link) = std::fs::read_link(&at) else { continue };
            let dir = dir_of(&at);
            found.add(&dir, name);
            links += 1;
            let rest: PathBuf = steps[index + 1..].iter().collect();
            pending = dir.join(link).join(rest);
            continue 'walk;
        }
        break;
    }
    if let Ok(target) = std::fs::canonicalize(path)
        && let Some(name) = target.file_name()
    {
        found.add(&dir_of(&target), name);
    }
    found
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

    /// Every link on the way is watched by its name in its directory,
    /// wherever it is met: in the path as written, where a relative or an
    /// absolute link leads, or as a directory on the way.
    #[test]
    fn every_link_on_the_way_to_the_file_is_watched() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for sub in ["etc", "cm/..v1", "srv/releases/v1"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::write(root.join("cm/..v1/pacegate.toml"), "").unwrap();
        symlink("..v1", root.join("cm/..data")).unwrap();
        symlink(root.join("cm/..data/pacegate.toml"), root.join("srv/releases/v1/pacegate.toml")).unwrap();
        symlink("releases/v1", root.join("srv/current")).unwrap();
        symlink(root.join("srv/current/pacegate.toml"), root.join("etc/link.toml")).unwrap();
        symlink("./link.toml", root.join("etc/pacegate.toml")).unwrap();

        let found = watched(&root.join("etc/pacegate.toml"));
        let dirs: Vec<PathBuf> =
            ["etc", "srv", "srv/releases/v1", "cm", "cm/..v1"].map(|d| root.join(d)).into();
        assert_eq!(found.dirs, dirs);
        let names: Vec<&str> = found.names.iter().filter_map(|n| n.to_str()).collect();
        assert_eq!(names, ["pacegate.toml", "link.toml", "current", "..data"]);
    }
}
