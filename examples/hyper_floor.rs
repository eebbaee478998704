//! The floor under any proxy built on hyper 1: the least a request can cost
//! when both sides are hyper, measured next to pacegate and nginx by
//! `bench/bench.py overhead` ("hyper floor").
//!
//! ```text
//! cargo run --release --example hyper_floor -- 127.0.0.1:8080 127.0.0.1:9000 2
//! ```
//! Listens on the first address (port 0: one the system picks) with one
//! single-threaded runtime per worker (the last argument; each its own
//! `SO_REUSEPORT` listener on that port, as pacegate's workers), and sends
//! every request as it came to the second address, on
//! one upstream HTTP/1.1 connection per client connection: no routing, no
//! header rewriting, no admission, no pool, no timeouts. Prints `listening
//! ADDR` once bound, and ends on SIGTERM as a program ends on its own (exit
//! handlers run), so that a build instrumented for profile-guided
//! optimisation writes its profile (`scripts/build-pgo.sh`). Not a proxy to
//! use: it exists to say how much of pacegate's cost per request is hyper's
//! and tokio's own.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};

use hyper::Request;
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::signal::unix::{SignalKind, signal};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, workers] = args.as_slice() else {
        return Err("usage: hyper_floor LISTEN UPSTREAM WORKERS".into());
    };
    let (listen, upstream): (SocketAddr, SocketAddr) = (listen.parse()?, upstream.parse()?);
    let workers: usize = workers.parse()?;
    // The first of these ends the program: a worker's error, or SIGTERM.
    let (ended, first_end) = std::sync::mpsc::channel::<Result<(), Error>>();
    let signals = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut terminate = signals.block_on(async { signal(SignalKind::terminate()) })?;
    let terminated = ended.clone();
    std::thread::spawn(move || {
        signals.block_on(terminate.recv());
        let _ = terminated.send(Ok(()));
    });
    // Bound here, so that the others take the port the first one got.
    let first = bound(listen)?;
    let listen = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..workers {
        sockets.push(bound(listen)?);
    }
    let (listening, listeners) = std::sync::mpsc::channel();
    for socket in sockets {
        let (listening, ended) = (listening.clone(), ended.clone());
        std::thread::spawn(move || {
            let run = AssertUnwindSafe(|| worker(socket, upstream, listening));
            let _ = ended.send(catch_unwind(run).unwrap_or_else(|_| Err("a worker panicked".into())));
        });
    }
    drop(listening);
    if listeners.iter().take(workers).count() == workers {
        println!("listening {listen}");
    }
    first_end.recv()?
}

/// A socket bound to `address` that other workers may bind too.
fn bound(address: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseport(true)?;
    socket.bind(address)?;
    Ok(socket)
}

/// One worker: its runtime, its listener (says so on `listening`), its
/// connections.
fn worker(socket: TcpSocket, upstream: SocketAddr, listening: Sender<()>) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = socket.listen(1024)?;
        let _ = listening.send(());
        serve(listener, upstream).await
    })
}

async fn serve(listener: TcpListener, upstream: SocketAddr) -> Result<(), Error> {
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(error) = relay(stream, upstream).await {
                eprintln!("connection ended: {error}");
            }
        });
    }
}

/// Serves one client connection over its own upstream connection.
async fn relay(stream: TcpStream, upstream: SocketAddr) -> Result<(), Error> {
    stream.set_nodelay(true)?;
    let to_upstream = TcpStream::connect(upstream).await?;
    to_upstream.set_nodelay(true)?;
    let (sender, connection) =
        client::Builder::new().writev(false).handshake(TokioIo::new(to_upstream)).await?;
    tokio::spawn(connection);
    let sender = Arc::new(Mutex::new(sender));
    // One request at a time on an HTTP/1.1 connection: never contended.
    let service = service_fn(move |request: Request<Incoming>| {
        sender.lock().unwrap_or_else(PoisonError::into_inner).send_request(request)
    });
    server::Builder::new().writev(false).serve_connection(TokioIo::new(stream), service).await?;
    Ok(())
}
