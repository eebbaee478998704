//! pacegate: an HTTP proxy that keeps callers inside third-party API quotas.
//!
//! # Layout
//! - [`app`]: wires listeners, the proxy, admin, reloads and shutdown.
//! - [`admin`]: health, metrics, status and reload endpoints, and the task
//!   that samples the dashboard's history.
//! - [`history`]: the last five minutes of every upstream, a sample a second.
//! - [`reload`]: the reload itself and its triggers (SIGHUP, the file on disk).
//! - [`proxy`]: the life of one request: check, route, read body, exchange;
//!   [`proxy::connect`] decides intercept, tunnel or refuse for a CONNECT.
//! - [`runtime`]: a config generation, and what a reload carries over.
//! - [`route`]: which upstream a request belongs to, and its URI there.
//! - [`server`]: client connections for any handler: accept loop, slots,
//!   request heads checked before hyper, header and idle timeouts, panics
//!   caught, graceful shutdown, CONNECT relays.
//! - [`tls`]: the local CA (created beside the config when missing) and
//!   interception of CONNECT tunnels.
//! - [`upstream`]: an upstream at run time: its [`upstream::dispatcher`] (the
//!   admission core behind one lock, shared by callers and one driver task
//!   that carries out its answers), one exchange (attempts and retries), the
//!   pooled rustls [`upstream::client`], and [`upstream::guard`], which keeps
//!   pass-through traffic off private addresses.
//! - [`cache`]: an upstream's response cache: answers kept under RFC 9111
//!   per credential, revalidated when stale, identical GETs in flight
//!   sharing one fetch ([`cache::flight`]); `proxy::cached` uses it.
//! - [`store`]: quotas and cooldowns shared by replicas through Redis: one
//!   server, a Redis Cluster, or the master Sentinel names.
//! - [`admission`]: the admission core: who may leave an upstream's queue,
//!   and when (queues per partition and set of endpoint limits, partitions
//!   with their own quotas, limits and cooldowns, callers round-robin,
//!   priority lanes, concurrency and queue bounds, the circuit breaker,
//!   shutdown). A plain synchronous type, time passed in, unit-tested on a
//!   manual clock.
//! - [`llm`]: LLM API calls: which requests are ones, their token estimate,
//!   the usage answers report (JSON or streamed), token quota headers,
//!   calibration. Pure functions, used by the request path.
//! - [`limit`]: the governor-based pacer, weighted by cost; the ledger that
//!   turns LLM tokens given back late into credit.
//! - [`retry`]: what is retryable, backoff, Retry-After and rate-limit hints, budget.
//! - [`error`]: the error table, the one mapping from errors to answers.
//! - [`body`]: buffered (replayable) and streamed bodies.
//! - [`headers`]: hop-by-hop and pacegate's own headers, stripped both ways.
//! - [`metrics`]: the Prometheus series pacegate exports.
//! - [`workers`]: the worker threads and their runtimes (see below).
//! - [`fds`]: the open-files limit, raised at start for `max_connections`.
//! - [`config`]: the TOML file, parsed then validated into runtime types.
//! - [`fuzz`]: entry points for `fuzz/` (cargo-fuzz) and its smoke test.
//!
//! # Layers
//!
//! A module uses only modules on lines below its own, never one on its own
//! line or above, so there is no import cycle and each module can be read
//! knowing only what lies beneath it:
//!
//! ```text
//! crate     app
//!           admin
//!           reload
//!           fuzz proxy
//!           runtime
//!           route server tls upstream
//!           cache history store
//!           admission metrics
//!           llm
//!           limit retry
//!           error
//!           body fds headers workers
//!           config
//! config    validate
//!           claims limits
//!           raw
//!           authority cache units
//!           error
//! admission breaker closing partition
//!           terms
//!           pacing schedule tokens
//!           needs
//! limit     pacer
//!           adaptive ledger
//! retry     backoff budget hints policy
//!           parse
//! server    connection tunnel
//!           guard woken
//!           activity framing
//!           head
//! llm       request
//!           image tokenizer
//!           sse
//!           calibration endpoint headers refusal usage
//! cache     flight store writes
//!           conditional key
//! tls       mitm
//!           ca
//! upstream  exchange
//!           tokens
//!           dispatcher
//!           driver
//!           client shared
//!           pool
//!           guard
//! ```
//!
//! The first block orders the crate's modules; the others order the
//! submodules of one module where they use each other. A module's own file
//! may use its submodules, and they may use the items it defines. `a+b`
//! marks modules that still use each other, a circle to undo, not to
//! copy. The `server` sits below the `proxy`: it serves HTTP for any
//! handler and knows nothing of proxying, while a CONNECT in the proxy
//! keeps its tunnel in the [`server::Scope`] of the connection that opened it.
//!
//! `tests/layers.rs` reads this block and fails, naming file and line, on a
//! `crate::` or `super::` path outside test code that does not look down,
//! and on a module missing from a block that orders its siblings. A
//! module named here that does not exist yet is ignored.
//!
//! # Threads and runtimes
//!
//! Two kinds of tokio runtime run pacegate, and a `tokio::spawn` lands on the
//! one that runs the code calling it:
//!
//! - **Workers** ([`workers`]): one current-thread runtime per core (or
//!   `server.workers`), on threads named `pacegate-wN`. The proxy listener
//!   hands each client connection to one worker, in turn, and there it
//!   stays with all it starts: its requests (an h2 stream is a task of the
//!   same worker), the tunnels and intercepted TLS sessions its CONNECTs
//!   open, the waits for a queue ticket and between retries, and the
//!   upstream connections its requests use, since each worker has its own
//!   pool ([`upstream::client`]). Admission decisions for a request (leave
//!   now, queue, leave the queue, an answer's feedback) are taken right
//!   there, on its worker, under its upstream's lock.
//! - **Main**: the multi-threaded runtime `main.rs` builds (in tests, the
//!   test's runtime). It runs both accept loops, the admin listener's
//!   connections (served where they are accepted), one driver task per
//!   upstream (started with each config generation, at start-up and on
//!   reload; it hands tickets to queued requests), reloads and their file
//!   and signal watcher, every Redis call (a request's cooldown write is
//!   spawned on the runtime its store was made on) and the probe that waits
//!   for Redis to come back, the task that samples every upstream once a
//!   second for the dashboard's history ([`admin::keep_history`]), and
//!   shutdown.
//!
//! So work that belongs to one connection is spawned from it and stays on its
//! worker; work that serves every worker (an upstream's dispatcher, Redis)
//! starts on the main runtime, at start-up or on reload, and is never spawned
//! from request code, which would tie it to one worker's thread.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod app;
pub mod body;
pub mod cache;
pub mod config;
pub mod error;
pub mod fds;
pub mod fuzz;
pub mod headers;
pub mod history;
pub mod limit;
pub mod llm;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod retry;
pub mod route;
pub mod runtime;
pub mod server;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod workers;
