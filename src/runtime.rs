//! A config generation: the validated config with its router and upstreams,
//! and how a reloaded generation inherits from the one before.
//!
//! A reload never drops a request: an upstream that keeps its name keeps its
//! dispatcher (queue, in-flight slots, and pacer state; changed quotas
//! continue the pacer's schedule at the new rate), and only receives the
//! new settings. An upstream that is gone
//! from the file is simply not carried over: requests that hold it finish,
//! and its dispatcher stops once its queue is empty.
//!
//! The interception CA belongs to the generation too: a reload that changes
//! it (other files, or new ones where the old were) intercepts new tunnels
//! with the new CA from the moment it is installed; one whose CA cannot be
//! used builds no generation at all.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::route::Router;
use crate::store::Store;
use crate::tls::{self, Interceptor, TlsError};
use crate::upstream::{Upstream, UpstreamClient};
use crate::workers;

/// One generation of configuration with everything built from it.
#[derive(Debug)]
pub struct Runtime {
    pub config: Arc<Config>,
    pub router: Router,
    /// Upstreams by config index.
    pub upstreams: Vec<Arc<Upstream>>,
    /// One client per distinct `ca_file`, for the upstreams that name one.
    pub ca_clients: HashMap<PathBuf, UpstreamClient>,
    /// The shared limiter, with `[redis]`.
    pub store: Option<Arc<Store>>,
    /// What intercepts CONNECT tunnels, signing with the CA `[mitm]` names;
    /// `None` when interception is off (in the file, or for want of a CA).
    pub interceptor: Option<Arc<Interceptor>>,
    /// Identifies this generation in logs, `/status` and `/reload`.
    pub version: Version,
}

/// Config version: a reload counter and a short hash of the file's text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Version {
    pub generation: u64,
    pub hash: String,
}

impl Version {
    pub fn new(generation: u64, text: &str) -> Self {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut hasher = DefaultHasher::new();
        text.hash(&mut hasher);
        Self { generation, hash: format!("{:08x}", hasher.finish() as u32) }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.generation, self.hash)
    }
}

impl Runtime {
    /// The first generation: every upstream starts empty. Fails when
    /// interception is on and its CA exists but cannot be loaded.
    pub fn start(mut config: Config, version: Version, metrics: &Arc<Metrics>) -> Result<Self, TlsError> {
        let interceptor = tls::interception(&mut config.mitm, None)?;
        Ok(Self::inherit(config, interceptor, version, metrics, &HashMap::new(), None))
    }

    /// The next generation, keeping the dispatchers of upstreams that stay,
    /// and of `retired` ones (removed earlier, still finishing) that come
    /// back by name, and the interceptor while its CA has not changed.
    /// Fails, before anything starts, when the CA it needs cannot be created
    /// or loaded.
    pub fn reload(
        &self,
        mut config: Config,
        version: Version,
        metrics: &Arc<Metrics>,
        retired: &[Arc<Upstream>],
    ) -> Result<Self, TlsError> {
        let interceptor = tls::interception(&mut config.mitm, self.interceptor.as_ref())?;
        let previous = retired.iter().chain(&self.upstreams).map(|u| (u.config.name.as_str(), u)).collect();
        Ok(Self::inherit(config, interceptor, version, metrics, &previous, self.store.as_ref()))
    }

    fn inherit(
        config: Config,
        interceptor: Option<Arc<Interceptor>>,
        version: Version,
        metrics: &Arc<Metrics>,
        previous: &HashMap<&str, &Arc<Upstream>>,
        previous_store: Option<&Arc<Store>>,
    ) -> Self {
        let router = Router::new(&config);
        let store = config.redis.as_ref().and_then(|redis| match previous_store {
            Some(store) if store.serves(redis) => Some(store.clone()),
            _ => Store::new(redis, metrics.clone())
                .inspect_err(|error| tracing::error!(%error, "redis not usable: quotas stay local"))
                .ok(),
        });
        let upstreams = config
            .upstreams
            .iter()
            .map(|wanted| match previous.get(wanted.name.as_str()) {
                Some(existing) => Arc::new(existing.reconfigured(wanted.clone(), store.clone())),
                None => Arc::new(Upstream::start(wanted.clone(), metrics.clone(), store.clone())),
            })
            .collect();
        let ca_clients = ca_clients(&config);
        Self { config: Arc::new(config), router, upstreams, version, ca_clients, store, interceptor }
    }

    /// Whether this generation has an upstream named `name`.
    pub fn has_upstream(&self, name: &str) -> bool {
        self.upstreams.iter().any(|u| u.config.name == name)
    }

    /// The client an upstream's attempts use: its `ca_file` one, if any.
    pub fn client_for<'a>(&'a self, index: usize, default: &'a UpstreamClient) -> &'a UpstreamClient {
        self.upstreams[index]
            .config
            .ca_file
            .as_ref()
            .and_then(|path| self.ca_clients.get(path))
            .unwrap_or(default)
    }
}

/// Clients for every distinct `ca_file`, read again on every generation so a
/// reload picks up a changed file. A file that cannot be used is logged; its
/// upstream then trusts the default roots only, so verification fails closed.
fn ca_clients(config: &Config) -> HashMap<PathBuf, UpstreamClient> {
    let mut clients = HashMap::new();
    for path in config.upstreams.iter().filter_map(|u| u.ca_file.as_ref()) {
        if clients.contains_key(path) {
            continue;
        }
        match UpstreamClient::with_ca_file(path, workers::count(config.server.workers)) {
            Ok(client) => {
                clients.insert(path.clone(), client);
            }
            Err(error) => tracing::error!(%error, "upstream ca_file not usable"),
        }
    }
    clients
}
