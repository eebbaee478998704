//! The shared limiter: quotas and cooldowns kept in Redis, so that every
//! replica together stays inside one API quota.
//!
//! Each decision is one atomic Lua script (`acquire.lua`, sent once and then
//! called by hash) that runs GCRA for all the quotas an attempt takes from
//! (its partition's own, and each endpoint limit it matches, weighted by its
//! cost) on the Redis server's clock (`TIME`), consumes from all or none,
//! checks the shared cooldowns, and answers go, wait, or cooling. Once an
//! LLM call's answer says what it used, `adjust.lua` corrects its token
//! quotas' shared schedule as the local pacer's is (back as far as Redis'
//! now, no further). Replicas never compare clocks,
//! and no lock is held across the network. Keys carry a hash tag per upstream
//! (`PREFIX:{name}:…`, `[redis] key_prefix`), so both keys a script touches live in one Redis
//! Cluster slot; they expire once idle.
//!
//! The servers may be one, a Redis Cluster or a master found through
//! Sentinel ([`nodes`]); the calls are the same in every form.
//!
//! Only the dispatcher task asks, once per attempt at the head of its queue,
//! so Redis sees one caller per upstream and replica, never a herd of pollers.
//!
//! When Redis cannot be reached (a call errors or times out), the store is
//! marked down: the transition is logged once and counted, and from then on
//! no dispatcher waits on Redis. They fall back to their in-process pacer
//! (`on_error = "local"`) or refuse (`"deny"`), while one background probe
//! connects anew (after one call's `[redis] timeout`, then twice as long each
//! time up to [`PROBE_EVERY`]), asking the sentinels for the master again or a cluster
//! for its slots, and brings shared mode back once the new connection
//! answers. A cluster's probe pings every master of the new slot map, so
//! shared mode resumes only once every slot has a master that answers.

mod nodes;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::{FromRedisValue, IntoConnectionInfo, RedisError, RedisResult, Script, ScriptInvocation};

pub use crate::admission::Verdict;
use crate::config::{self, RedisOnError};
use crate::limit::pacer::{GUARD, PacedQuota};
use crate::metrics::Metrics;
use nodes::{Link, Nodes};

/// How often a down store checks whether Redis is back, at most.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long making a connection and one check of the probe may take: a
/// connection made anew (asking the sentinels, checking the master they
/// name, connecting to it; or reaching every cluster node and reading the
/// slots) takes several round trips, which a busy replica may not fit in
/// one call's `[redis] timeout`, and no request waits on it.
const PROBE_PATIENCE: Duration = Duration::from_secs(2);

/// Redis could not be asked; the store is down until the probe succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// One quota set's script arguments (a partition's own quotas, or one
/// endpoint limit's), as the local pacer paces them (margins included). The
/// script takes from all or none, one attempt after another, so several
/// quotas and batches never waste each other's slots.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SharedQuotas {
    /// The endpoint limit's name; `None` for the partition's own quotas.
    limit: Option<String>,
    /// Hash field, emission interval (µs) and burst tolerance (µs) per quota.
    quotas: Vec<(String, u64, u64)>,
}

impl SharedQuotas {
    /// A partition's own quotas (hash fields `1`, `2`, …).
    pub fn new(quotas: &[PacedQuota]) -> Self {
        Self::named(None, quotas)
    }

    /// An endpoint limit's quotas (hash fields `limit:NAME:1`, …).
    pub fn limit(name: &str, quotas: &[PacedQuota]) -> Self {
        Self::named(Some(name), quotas)
    }

    /// The endpoint limit's name, if these are a limit's quotas.
    pub fn name(&self) -> Option<&str> {
        self.limit.as_deref()
    }

    fn named(limit: Option<&str>, quotas: &[PacedQuota]) -> Self {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let prefix = limit.map_or_else(String::new, |name| format!("limit:{name}:"));
        let quotas = quotas.iter().enumerate().map(|(i, quota)| {
            let interval = micros(quota.interval).max(1);
            let tolerance = interval.saturating_mul(u64::from(quota.burst.get() - 1));
            (format!("{prefix}{}", i + 1), interval, tolerance)
        });
        Self { limit: limit.map(str::to_owned), quotas: quotas.collect() }
    }
}

/// What one attempt takes: quota sets with their cost in units, and what a
/// wait or cooldown of each set is reported as (an endpoint limit's index,
/// or `None` for the partition's own quotas).
pub type Demand<'a> = [(Option<usize>, &'a SharedQuotas, u32)];

/// The Redis keys of one partition of one upstream. The partition is a hash
/// of its key (never the credential itself), identical on every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
    /// The upstream's circuit break (one per upstream, not per partition).
    breaker: String,
    /// Probes taken since the break ended, shared by the replicas.
    probes: String,
}

impl Keys {
    /// The keys under `key_prefix` (`[redis] key_prefix`).
    pub fn new(key_prefix: &str, upstream: &str, partition: u64) -> Self {
        Self {
            prefix: format!("{key_prefix}:{{{upstream}}}:{partition:016x}"),
            breaker: format!("{key_prefix}:{{{upstream}}}:breaker"),
            probes: format!("{key_prefix}:{{{upstream}}}:probes"),
        }
    }

    fn quotas(&self) -> String {
        format!("{}:quotas", self.prefix)
    }

    /// The cooldown of the partition's own quotas, or of one endpoint limit.
    fn cooldown(&self, limit: Option<&str>) -> String {
        match limit {
            None => format!("{}:cooldown", self.prefix),
            Some(name) => format!("{}:limit:{name}:cooldown", self.prefix),
        }
    }
}

/// A connection to the shared Redis and what to do without it.
pub struct Store {
    nodes: Nodes,
    /// The connection in use: made on first use, dropped by a failed call,
    /// made anew by the probe.
    link: tokio::sync::Mutex<Option<Link>>,
    /// The node taking writes (a cluster's masters), for `/status`.
    master: std::sync::Mutex<Shown>,
    /// The `[redis]` section this store was made from, to keep it on reload.
    config: config::Redis,
    /// Server addresses (seeds, sentinels) for logs, without credentials.
    address: String,
    acquire: Script,
    cool_down: Script,
    adjust: Script,
    /// False from a failed call until the probe reaches Redis again.
    up: AtomicBool,
    /// Some call or probe got an answer: a first connection that fails
    /// after that does not say Redis is down.
    reached: AtomicBool,
    /// The keys of the call that marked the store down. The probe reads
    /// them together through the new connection: in a cluster, every
    /// master of the slot map may answer `PING` while their slot still has
    /// none (its master died, no replica took over yet), or is half moved
    /// (`TRYAGAIN` for a call whose keys sit on both sides); resuming then
    /// would only fall back again at the next call.
    failed: std::sync::Mutex<Vec<String>>,
    metrics: Arc<Metrics>,
    /// The runtime the store was made on (the main one): its background
    /// calls run there, even when a worker thread's request asks for them.
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("address", &self.address).field("up", &self.is_up()).finish()
    }
}

impl Store {
    /// A store for `[redis]`; connects in the background, so a Redis that
    /// is down at start-up is handled like one that goes away later. Made on the main
    /// runtime (with each config generation), where its background calls run.
    pub fn new(config: &config::Redis, metrics: Arc<Metrics>) -> Result<Arc<Self>, RedisError> {
        let urls = config.nodes.urls();
        if urls.iter().any(|url| url.starts_with("rediss://")) {
            // redis' TLS takes rustls' process default; ours is ring.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let addresses: RedisResult<Vec<String>> = urls
            .iter()
            .map(|url| url.as_str().into_connection_info().map(|info| info.addr().to_string()))
            .collect();
        let address = addresses?.join(",");
        let nodes = Nodes::new(&config.nodes, config.timeout, PROBE_PATIENCE.max(config.timeout))?;
        metrics.redis_up.set(1);
        let store = Arc::new(Self {
            nodes,
            link: tokio::sync::Mutex::new(None),
            master: std::sync::Mutex::new(Shown::default()),
            config: config.clone(),
            address,
            acquire: Script::new(include_str!("acquire.lua")),
            cool_down: Script::new(include_str!("cool_down.lua")),
            adjust: Script::new(include_str!("adjust.lua")),
            up: AtomicBool::new(true),
            reached: AtomicBool::new(false),
            failed: std::sync::Mutex::new(Vec::new()),
            metrics,
            runtime: tokio::runtime::Handle::current(),
        });
        // Connected in the background from the start, so that the first
        // attempts need not make the connection within their
        // `[redis] timeout` (asking the sentinels, or reading a cluster's slot
        // map, may not fit in it on a busy machine, and that would count
        // as a fallback). Nothing waits on it: a Redis that is down now is
        // found so by the first call, as one that goes away later.
        let warm = Arc::downgrade(&store);
        store.runtime.spawn(async move {
            let Some(store) = warm.upgrade() else { return };
            store.warm_up().await;
        });
        Ok(store)
    }

    /// Makes the first connection without holding the connection's lock
    /// (a call that comes meanwhile makes its own, within its timeout, and
    /// never waits for this one), and keeps it unless a call was quicker.
    /// A Redis not reached is down from now, as after a failed call: shown
    /// so at once (`pacegate_redis_up`, `/status`), not at the first call.
    async fn warm_up(self: &Arc<Self>) {
        // Asked, not only connected: a single server's connection is made
        // when first used.
        let connect = async {
            let (mut link, master) = self.nodes.connect().await?;
            redis::cmd("PING").query_async::<String>(&mut link).await?;
            Ok::<_, RedisError>((link, master))
        };
        let (link, master) = match tokio::time::timeout(PROBE_PATIENCE, connect).await {
            Ok(Ok(connected)) => connected,
            // A call that got its answer meanwhile knows better.
            Ok(Err(_)) | Err(_) if self.reached.load(Ordering::Relaxed) => return,
            Ok(Err(error)) => return self.went_down(Vec::new(), &error.to_string()),
            Err(_) => return self.went_down(Vec::new(), &format!("no connection within {PROBE_PATIENCE:?}")),
        };
        let mut current = self.link.lock().await;
        if current.is_none() {
            self.show(Some(master));
            *current = Some(link);
        }
    }

    /// True when this store was made from the same `[redis]` section.
    pub fn serves(&self, config: &config::Redis) -> bool {
        self.config == *config
    }

    /// The keys of `upstream`'s `partition` in this store.
    pub fn keys(&self, upstream: &str, partition: u64) -> Keys {
        Keys::new(&self.config.key_prefix, upstream, partition)
    }

    /// What pacing does while Redis is down.
    pub fn on_error(&self) -> RedisOnError {
        self.config.on_error
    }

    /// Server address (a cluster's seeds, the sentinels), without credentials.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// `server`, `cluster` or `sentinel`: the form of `[redis]`.
    pub fn form(&self) -> &'static str {
        self.config.nodes.form()
    }

    /// The node that takes writes (the master the sentinels named for the
    /// connection in use; a cluster's masters, comma-separated).
    ///
    /// A cluster's may change under a connection that keeps working (a
    /// failover while nothing was sent), so while the store is up, a look
    /// at them more than [`PROBE_EVERY`] after the last reading asks the
    /// cluster again in the background, for the next look: one
    /// `CLUSTER NODES` a second at most, and only while somebody looks.
    pub fn master(self: &Arc<Self>) -> Option<String> {
        let mut shown = self.master.lock().ok()?;
        let now = tokio::time::Instant::now();
        let due = shown.read.is_none_or(|read| now.duration_since(read) >= PROBE_EVERY);
        if due && self.is_up() && matches!(self.config.nodes, config::RedisNodes::Cluster(_)) {
            shown.read = Some(now);
            let store = Arc::downgrade(self);
            self.runtime.spawn(async move {
                let Some(store) = store.upgrade() else { return };
                let Some(mut link) = store.link.lock().await.clone() else { return };
                if let Ok(Ok(Some(masters))) = tokio::time::timeout(store.config.timeout, link.masters()).await
                    && let Ok(mut shown) = store.master.lock()
                    // Not over a newer reading (a probe's, meanwhile).
                    && shown.read == Some(now)
                {
                    shown.master = Some(masters);
                }
            });
        }
        shown.master.clone()
    }

    /// Shows `master` from now on (`None` leaves it as it is).
    fn show(&self, master: Option<String>) {
        if let (Some(master), Ok(mut shown)) = (master, self.master.lock()) {
            *shown = Shown { master: Some(master), read: Some(tokio::time::Instant::now()) };
        }
    }

    /// False while Redis is known to be unreachable.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Asks how many of the `wanted` next attempts of the partition at
    /// `keys`, each taking `demand`, may leave now: one round trip, however many.
    ///
    /// A half-open breaker's probe passes `probe`: how many probes the
    /// replicas share, and how long one takes at most. Whichever replica
    /// takes one first sends it; the others are told to wait and ask again
    /// within a second, at the latest when that window is over: by then the
    /// prober either reopened the shared break, or it succeeded and cleared
    /// the count ([`Self::close_breaker`]), and the next one probes too. Not
    /// a break of their own, which would hold them for the whole window.
    pub async fn acquire(
        self: &Arc<Self>,
        keys: &Keys,
        demand: &Demand<'_>,
        wanted: usize,
        probe: Option<(u32, Duration)>,
    ) -> Result<Verdict, Unavailable> {
        if !self.is_up() {
            return Err(Unavailable);
        }
        let wanted = wanted.max(1);
        let mut invocation = self.acquire.key(keys.quotas());
        for (_, quotas, _) in demand {
            invocation.key(keys.cooldown(quotas.limit.as_deref()));
        }
        invocation.key(&keys.breaker);
        invocation.arg(wanted).arg(GUARD.as_micros() as u64).arg(demand.len());
        for (_, quotas, cost) in demand {
            invocation.arg(*cost).arg(quotas.quotas.len());
            for (field, interval, tolerance) in &quotas.quotas {
                invocation.arg(field).arg(*interval).arg(*tolerance);
            }
        }
        if let Some((probes, window)) = probe {
            invocation.key(&keys.probes);
            invocation.arg(probes).arg(u64::try_from(window.as_micros()).unwrap_or(u64::MAX));
        }
        let touched = || {
            let cooldowns = demand.iter().map(|(_, quotas, _)| keys.cooldown(quotas.limit.as_deref()));
            let shared = [keys.quotas()].into_iter().chain(cooldowns).chain([keys.breaker.clone()]);
            shared.chain(probe.map(|_| keys.probes.clone())).collect()
        };
        let (status, value, set): (u8, u64, usize) = self.call(touched, &invocation).await?;
        // The set the script names (1-based; 0 for none), as the caller knows it.
        let on = set.checked_sub(1).and_then(|j| demand.get(j)).and_then(|(on, _, _)| *on);
        Ok(match status {
            1 => Verdict::Go(usize::try_from(value).unwrap_or(wanted).clamp(1, wanted)),
            2 => Verdict::Cooling(Duration::from_micros(value), on),
            3 => Verdict::Open(Duration::from_micros(value)),
            4 => Verdict::ProbeOut(Duration::from_micros(value)),
            _ => Verdict::Wait(Duration::from_micros(value), on),
        })
    }

    /// Pauses the partition at `keys` (or one of its endpoint limits) for
    /// every replica, in the background: the local cooldown already holds
    /// this replica back.
    pub fn cool_down(self: &Arc<Self>, keys: Keys, limit: Option<&str>, pause: Duration) {
        self.extend(keys.cooldown(limit), None, pause);
    }

    /// Opens the upstream's breaker at `keys` for every replica for
    /// `pause`, in the background (this replica's own is open already).
    pub fn open_breaker(self: &Arc<Self>, keys: Keys, pause: Duration) {
        // A new break: its half-open probes are counted anew.
        self.extend(keys.breaker, Some(keys.probes), pause);
    }

    /// The upstream's breaker at `keys` closed here: its probe succeeded.
    /// The probes counted since the break are forgotten, so that another
    /// replica, half-open, probes at once instead of being told the break
    /// holds for the rest of this probe's window (the upstream's `timeout`).
    pub fn close_breaker(self: &Arc<Self>, keys: Keys) {
        self.extend(keys.breaker, Some(keys.probes), Duration::ZERO);
    }

    /// Extends the deadline kept at `key` to `pause` from the server's now.
    /// `clear`: a key deleted in the same call (a new break's probe count).
    fn extend(self: &Arc<Self>, key: String, clear: Option<String>, pause: Duration) {
        if !self.is_up() {
            return;
        }
        let store = self.clone();
        self.runtime.spawn(async move {
            let pause = u64::try_from(pause.as_micros()).unwrap_or(u64::MAX);
            let mut invocation = store.cool_down.key(&key);
            if let Some(clear) = &clear {
                invocation.key(clear);
            }
            invocation.arg(pause);
            let _: Result<u8, _> =
                store.call(|| [key.clone()].into_iter().chain(clear.clone()).collect(), &invocation).await;
        });
    }

    /// Corrects what earlier attempts of the partition at `keys` took from
    /// `quotas` by `units` (settling an LLM call's tokens: positive takes
    /// more, negative gives back, never before Redis' now), for every
    /// replica. Only the driver calls it, before its next acquire, so that
    /// Redis still sees one caller per upstream and replica.
    pub async fn adjust(
        self: &Arc<Self>,
        keys: &Keys,
        quotas: &SharedQuotas,
        units: i64,
    ) -> Result<(), Unavailable> {
        if !self.is_up() {
            return Err(Unavailable);
        }
        let mut invocation = self.adjust.key(keys.quotas());
        invocation.arg(units).arg(quotas.quotas.len());
        for (field, interval, _) in &quotas.quotas {
            invocation.arg(field).arg(*interval);
        }
        self.call::<u8>(|| vec![keys.quotas()], &invocation).await.map(drop)
    }

    /// Runs one script under `[redis] timeout`; a failure marks the store
    /// down, and the probe then checks the `keys` the script touches.
    async fn call<T: FromRedisValue>(
        self: &Arc<Self>,
        keys: impl FnOnce() -> Vec<String>,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        let call = async { invocation.invoke_async(&mut self.link().await?).await };
        let error = match self.timed(self.config.timeout, call).await {
            Ok(value) => {
                self.reached.store(true, Ordering::Relaxed);
                return Ok(value);
            }
            Err(error) => error,
        };
        self.went_down(keys(), &error);
        Err(Unavailable)
    }

    /// A call (touching `keys`) or the first connection failed: counted,
    /// and if the store was up, it is down from now on, logged once, and
    /// probed until it answers again.
    fn went_down(self: &Arc<Self>, keys: Vec<String>, error: &str) {
        self.metrics.redis_errors.inc();
        if self.up.swap(false, Ordering::AcqRel) {
            if let Ok(mut failed) = self.failed.lock() {
                *failed = keys;
            }
            self.metrics.redis_up.set(0);
            self.metrics.redis_fallbacks.inc();
            let fallback = match self.on_error() {
                RedisOnError::Local => "in-process limiter per replica",
                RedisOnError::Deny => "refusing with 503 rate_limit_store",
            };
            tracing::error!(redis = %self.address, %error, fallback, "redis unreachable");
            self.runtime.spawn(probe(Arc::downgrade(self)));
        }
    }

    /// Runs `call` for at most `patience`; on failure the connection is
    /// dropped, so that the next one is made anew (and a Sentinel master
    /// found again).
    async fn timed<T>(
        &self,
        patience: Duration,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, String> {
        let error = match tokio::time::timeout(patience, call).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {patience:?}"),
        };
        *self.link.lock().await = None;
        Err(error)
    }

    /// The connection in use, made first if there is none.
    async fn link(&self) -> RedisResult<Link> {
        let mut current = self.link.lock().await;
        if let Some(link) = current.as_ref() {
            return Ok(link.clone());
        }
        let (link, master) = self.nodes.connect().await?;
        self.show(Some(master));
        *current = Some(link.clone());
        Ok(link)
    }
}

/// What `/status` shows of the node taking writes, and when it was read.
#[derive(Debug, Default)]
struct Shown {
    master: Option<String>,
    read: Option<tokio::time::Instant>,
}

/// Connects a down store anew and pings through the new connection until
/// it answers, then brings shared mode back. Ends early if the store is
/// dropped (a reload changed `[redis]`).
async fn probe(store: Weak<Store>) {
    // The first check comes after one call's timeout: a slow answer on a
    // busy machine often passes, and every moment in fallback lets this
    // replica pace alone next to the others (the quota's overshoot grows
    // with it). Not sooner, so that every call made through the failed
    // connection has ended before a new one is made: a late failure of one
    // cannot drop the probe's new connection or count a second fallback.
    let Some(first) = store.upgrade().map(|store| store.config.timeout) else { return };
    let mut pause = first;
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(PROBE_EVERY.max(first));
        let Some(store) = store.upgrade() else { return };
        let failed = store.failed.lock().map(|failed| failed.clone()).unwrap_or_default();
        let ping = async {
            let mut link = store.link().await?;
            redis::cmd("PING").query_async::<String>(&mut link).await?;
            // Routed to the failed keys' slot (in a cluster, its master now).
            if !failed.is_empty() {
                redis::cmd("EXISTS").arg(&failed).query_async::<u64>(&mut link).await?;
            }
            // A cluster's, read again: the connection's slot map may have
            // been read before the failed slot's replica took over. Not a
            // condition of resuming: the node asked may be the dead one.
            if let Ok(masters) = link.masters().await {
                store.show(masters);
            }
            Ok(())
        };
        match store.timed(PROBE_PATIENCE.max(store.config.timeout), ping).await {
            Ok(_) => {
                store.reached.store(true, Ordering::Relaxed);
                store.up.store(true, Ordering::Release);
                store.metrics.redis_up.set(1);
                let master = store.master().unwrap_or_default();
                tracing::info!(redis = %store.address, %master, "redis reachable again: quotas shared again");
                return;
            }
            Err(error) => tracing::debug!(redis = %store.address, %error, "redis still unreachable"),
        }
    }
}
