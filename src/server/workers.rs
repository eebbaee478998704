//! Worker threads: the proxy listener is served by one single-threaded tokio
//! runtime per CPU core, the way nginx runs one worker process per core.
//!
//! On one multi-threaded runtime a proxied request hops between threads: the
//! client connection's task, hyper's upstream connection task and their
//! wake-ups may each run on another core, and every hop costs a futex wake or
//! an inter-processor interrupt. A worker keeps a client connection, its
//! requests and the upstream connections they use on one thread (bench:
//! about +40 % requests/s on 2 cores, see BENCHMARKS.md).
//!
//! Each worker accepts on its own socket bound to the listener's address with
//! `SO_REUSEPORT`, and the kernel spreads new connections over them. The first
//! socket is the listener as it was bound, without the option, so a second
//! pacegate started on the same address still fails with "address in use";
//! the option is set on it afterwards, which lets the other workers' sockets
//! join it.
//!
//! Upstream connection pools are per worker too: [`current`] says which.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;

/// Pending connections per worker socket, as `TcpListener::bind` has.
const BACKLOG: u32 = 1024;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The worker running this thread: 0 to `count - 1`; 0 outside workers.
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// Worker threads for `configured` (`None`: one per CPU core).
pub fn count(configured: Option<NonZeroUsize>) -> usize {
    configured.or_else(|| std::thread::available_parallelism().ok()).map_or(1, NonZeroUsize::get)
}

/// Runs `serve` on `workers` threads, each with its own runtime and socket on
/// `listener`'s address. The returned receivers resolve (with an error) once
/// each thread and its runtime have ended, so every task they ran is gone.
pub fn spawn<S, F>(listener: TcpListener, workers: usize, serve: S) -> io::Result<Vec<oneshot::Receiver<()>>>
where
    S: Fn(TcpListener) -> F + Clone + Send + 'static,
    F: Future<Output = ()>,
{
    let sockets = sockets(listener, workers)?;
    let mut ended = Vec::with_capacity(sockets.len());
    for (index, socket) in sockets.into_iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (done, finished) = oneshot::channel::<()>();
        let serve = serve.clone();
        std::thread::Builder::new().name(format!("pacegate-worker-{index}")).spawn(move || {
            CURRENT.with(|current| current.set(index));
            // Registered with this thread's runtime, so its readiness is
            // polled here.
            let listener = {
                let _inside = runtime.enter();
                TcpListener::from_std(socket)
            };
            match listener {
                Ok(listener) => runtime.block_on(serve(listener)),
                Err(error) => tracing::error!(%error, worker = index, "worker cannot use its socket"),
            }
            // Every task of this worker ends here, before `ended` says so.
            drop(runtime);
            drop(done);
        })?;
        ended.push(finished);
    }
    Ok(ended)
}

/// `workers` sockets accepting on `listener`'s address, `listener` first.
fn sockets(listener: TcpListener, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let address = listener.local_addr()?;
    if workers > 1 {
        socket2::SockRef::from(&listener).set_reuse_port(true)?;
    }
    let mut sockets = vec![listener.into_std()?];
    for _ in 1..workers {
        sockets.push(reuse_port(address)?.into_std()?);
    }
    Ok(sockets)
}

/// A listening socket that shares `address` with the others of its group.
fn reuse_port(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(address)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel hands connections to every worker's socket, and a second
    /// server binding the address the usual way is still refused.
    #[tokio::test]
    async fn every_socket_gets_connections_and_the_address_stays_taken() {
        const WORKERS: usize = 3;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let sockets = sockets(listener, WORKERS).unwrap();
        assert_eq!(sockets.len(), WORKERS);
        assert!(std::net::TcpListener::bind(address).is_err(), "a second server could bind {address}");
        // 30 connections: a socket gets none with probability 3 × (2/3)^30.
        let clients: Vec<_> = (0..30).map(|_| std::net::TcpStream::connect(address).unwrap()).collect();
        for (index, socket) in sockets.iter().enumerate() {
            let mut accepted = 0;
            while socket.accept().is_ok() {
                accepted += 1;
            }
            assert!(accepted > 0, "socket {index} got no connection");
        }
        drop(clients);
    }

    /// Each worker thread knows its index, and the threads end once `serve`
    /// returns.
    #[tokio::test]
    async fn workers_run_on_their_own_threads_and_end() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (seen, mut indexes) = tokio::sync::mpsc::unbounded_channel();
        let ended = spawn(listener, 2, move |_listener| {
            let seen = seen.clone();
            async move {
                let _ = seen.send((current(), std::thread::current().name().map(str::to_owned)));
            }
        })
        .unwrap();
        for ended in ended {
            assert!(ended.await.is_err(), "a worker's end is its sender dropped");
        }
        let mut found = Vec::new();
        while let Ok(one) = indexes.try_recv() {
            found.push(one);
        }
        found.sort();
        let expected = (0..2).map(|i| (i, Some(format!("pacegate-worker-{i}")))).collect::<Vec<_>>();
        assert_eq!(found, expected);
    }
}
