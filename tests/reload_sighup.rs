//! SIGHUP reloads the config. In its own test binary because the
//! signal goes to the whole process, and would bump the generation of every
//! pacegate running in `reload.rs`.
mod support;

use std::time::Duration;

use support::mock::{Behaviour, MockUpstream};
use support::{Pacegate, client, upstream};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::test]
async fn sighup_reloads() {
    // Our own handler first: from now on SIGHUP cannot terminate the test
    // process, even if pacegate's handler were missing.
    let mut hangups = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mock = MockUpstream::start(Behaviour::new()).await;
    let pg = Pacegate::start(&upstream("api", &mock.url(), "rate = \"100/s\"")).await;
    let before = pg.status().await;
    let start = before["generation"].as_u64().unwrap();

    // The file does not change, so only the signal can start a reload. The
    // signal is sent again (at most 3 times) in case pacegate's handler was
    // not installed yet when the first one arrived.
    let mut reloaded = false;
    for _ in 0..3 {
        let sent = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(2), hangups.recv()).await.expect("SIGHUP delivered");
        reloaded =
            pg.wait_status(Duration::from_secs(1), |s| s["generation"].as_u64().unwrap() > start).await;
        if reloaded {
            break;
        }
    }
    assert!(reloaded, "SIGHUP did not reload");

    let after = pg.status().await;
    let (old_hash, new_hash) = (before["version"].as_str().unwrap(), after["version"].as_str().unwrap());
    assert_eq!(old_hash.split_once('-').unwrap().1, new_hash.split_once('-').unwrap().1, "same file text");
    assert_eq!(client().get(pg.url("/api/x")).send().await.unwrap().status(), 200);
    pg.stop().await.unwrap();
}
