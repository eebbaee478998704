//! Reload triggers: SIGHUP and changes of the config file on disk.
//! (`POST /reload` on the admin listener is the third, in [`crate::admin`].)
//!
//! The file's directory is watched, not the file: editors that save by
//! writing a new file and renaming it over the old one replace the inode a
//! file watch would follow. Bursts of events are debounced, and a file whose
//! text did not change is not reloaded again.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::app::App;
use crate::runtime::Version;

/// Quiet time after a file event before reloading: editors write in steps.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Reloads on SIGHUP and on file changes until `stop` resolves.
pub fn watch(app: App, stop: impl Future<Output = ()> + Send + 'static) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (events, mut changed) = mpsc::unbounded_channel();
        // Kept alive for as long as this task runs.
        let _watcher = match file_watcher(&app.state().path, events) {
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
                    if file_changed(&app) {
                        let _ = app.reload("file").await;
                    }
                }
                Some(()) = recv_hangup(&mut hangups) => {
                    let _ = app.reload("sighup").await;
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

/// Whether the file's text differs from the config in force.
fn file_changed(app: &App) -> bool {
    let state = app.state();
    match std::fs::read_to_string(&state.path) {
        Ok(text) => Version::new(0, &text).hash != state.proxy.runtime.load().version.hash,
        Err(_) => true, // let the reload report the error
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
        if event.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == name) {
            let _ = events.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}
