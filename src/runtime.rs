//! A config generation: the validated config with its router and upstreams,
//! and how a reloaded generation inherits from the one before.
//!
//! A reload never drops a request: an upstream that keeps its name keeps its
//! dispatcher (queue, in-flight slots, and pacer state when its quotas did
//! not change), and only receives the new settings. An upstream that is gone
//! from the file is simply not carried over: requests that hold it finish,
//! and its dispatcher stops once its queue is empty.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::route::Router;
use crate::upstream::Upstream;

/// One generation of configuration with everything built from it.
#[derive(Debug)]
pub struct Runtime {
    pub config: Arc<Config>,
    pub router: Router,
    /// Upstreams by config index.
    pub upstreams: Vec<Arc<Upstream>>,
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
    /// The first generation: every upstream starts empty.
    pub fn start(config: Config, version: Version, metrics: &Arc<Metrics>) -> Self {
        Self::inherit(config, version, metrics, &HashMap::new())
    }

    /// The next generation, keeping the dispatchers of upstreams that stay.
    pub fn reload(&self, config: Config, version: Version, metrics: &Arc<Metrics>) -> Self {
        let previous = self.upstreams.iter().map(|u| (u.config.name.as_str(), u)).collect();
        Self::inherit(config, version, metrics, &previous)
    }

    fn inherit(
        config: Config,
        version: Version,
        metrics: &Arc<Metrics>,
        previous: &HashMap<&str, &Arc<Upstream>>,
    ) -> Self {
        let router = Router::new(&config);
        let upstreams = config
            .upstreams
            .iter()
            .map(|wanted| match previous.get(wanted.name.as_str()) {
                Some(existing) => Arc::new(existing.reconfigured(wanted.clone())),
                None => Arc::new(Upstream::start(wanted.clone(), metrics.clone())),
            })
            .collect();
        Self { config: Arc::new(config), router, upstreams, version }
    }
}
