//! Where the shared store's connections come from, in each form of
//! `[redis]`: one server, a Redis Cluster, or the master that the sentinels
//! name.
//!
//! - **Server**: one [`ConnectionManager`], which reconnects by itself.
//! - **Cluster**: the crate's async cluster connection, seeded from the
//!   configured nodes. It learns the slot map, sends each script call to the
//!   master of its first key's slot (every key of one upstream carries the
//!   same `{hash tag}`, so all its keys share that slot), follows `MOVED` and
//!   `ASK` while slots migrate, and loads a script on every node when one
//!   answers `NOSCRIPT` (`SCRIPT LOAD` goes to all nodes).
//! - **Sentinel**: the sentinels are asked which server is the master now,
//!   and that server must say it is one; the connection goes to it.
//!
//! A [`Link`] is one live connection. The store drops it when a call fails,
//! and its probe asks [`Nodes::connect`] for a new one: for Sentinel that is
//! the master's rediscovery after a failover, for a cluster a fresh slot map.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, RedisConnectionInfo,
    RedisFuture, RedisResult, TlsMode, Value,
};

use crate::config::RedisNodes;

/// The servers of one `[redis]` section, and how to reach them.
pub enum Nodes {
    Server {
        manager: ConnectionManager,
        /// The server's address, without credentials.
        address: String,
    },
    Cluster(ClusterClient),
    Sentinel {
        /// Behind a lock: a lookup takes the sentinels' cached connections.
        sentinels: tokio::sync::Mutex<Sentinel>,
        /// The master's name, as the sentinels monitor it.
        master: String,
        /// Scheme (TLS or not), credentials and database for the master:
        /// the first sentinel URL's scheme and database, and
        /// `master_username` / `master_password` (or, without them, that
        /// URL's credentials).
        node: SentinelNodeConnectionInfo,
        /// Timeouts of the connection to the master.
        timeouts: AsyncConnectionConfig,
    },
}

/// One live connection to the store, cheap to clone.
#[derive(Clone)]
pub enum Link {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
    Master(MultiplexedConnection),
}

impl Nodes {
    /// Clients for `config` that wait at most `answer` for an answer and
    /// `patience` for a connection (and the server's reconnections at most
    /// that long apart). Nothing connects yet.
    pub fn new(config: &RedisNodes, answer: Duration, patience: Duration) -> RedisResult<Self> {
        Ok(match config {
            RedisNodes::Server(url) => {
                let manager = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(patience))
                    .set_response_timeout(Some(answer))
                    .set_number_of_retries(1)
                    .set_max_delay(patience);
                let client = redis::Client::open(url.as_str())?;
                let address = client.get_connection_info().addr().to_string();
                Self::Server { manager: ConnectionManager::new_lazy_with_config(client, manager)?, address }
            }
            RedisNodes::Cluster(seeds) => Self::Cluster(
                ClusterClient::builder(seeds.iter().map(String::as_str))
                    .connection_timeout(patience)
                    .response_timeout(answer)
                    .build()?,
            ),
            RedisNodes::Sentinel { sentinels, master, auth } => {
                let first =
                    sentinels.first().map(String::as_str).unwrap_or_default().into_connection_info()?;
                let mut settings = first.redis_settings().clone();
                if let Some(auth) = auth {
                    let own = RedisConnectionInfo::default()
                        .set_db(settings.db())
                        .set_protocol(settings.protocol());
                    let own = auth.username.iter().fold(own, |own, user| own.set_username(user));
                    settings = auth.password.iter().fold(own, |own, password| own.set_password(password));
                }
                let mut node = SentinelNodeConnectionInfo::default().set_redis_connection_info(settings);
                if let ConnectionAddr::TcpTls { insecure, .. } = first.addr() {
                    node = node.set_tls_mode(if *insecure { TlsMode::Insecure } else { TlsMode::Secure });
                }
                Self::Sentinel {
                    sentinels: tokio::sync::Mutex::new(Sentinel::build(sentinels.clone())?),
                    master: master.clone(),
                    node,
                    timeouts: AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(patience))
                        .set_response_timeout(Some(answer)),
                }
            }
        })
    }

    /// A new connection, and the node (or nodes, in a cluster) that take
    /// writes through it, for `/status`.
    pub async fn connect(&self) -> RedisResult<(Link, String)> {
        match self {
            Self::Server { manager, address } => Ok((Link::Server(manager.clone()), address.clone())),
            Self::Cluster(client) => {
                let mut link = Link::Cluster(client.get_async_connection().await?);
                let masters = link.masters().await?.unwrap_or_default();
                Ok((link, masters))
            }
            Self::Sentinel { sentinels, master, node, timeouts } => {
                let client = sentinels.lock().await.async_master_for(master, Some(node)).await?;
                let address = client.get_connection_info().addr().to_string();
                let connection = client.get_multiplexed_async_connection_with_config(timeouts).await?;
                Ok((Link::Master(connection), address))
            }
        }
    }
}

impl Link {
    /// A cluster's masters as the node asked sees them now; `None` for
    /// the other forms, whose master is the one connected to. Asked again
    /// after the connection is made: a failover that no call noticed
    /// (nothing was sent meanwhile, or the cluster client followed the
    /// slot to its new master by itself) leaves the connection as it was.
    pub async fn masters(&mut self) -> RedisResult<Option<String>> {
        let Self::Cluster(connection) = self else { return Ok(None) };
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(connection).await?;
        Ok(Some(masters(&nodes)))
    }
}

/// The masters of a cluster, from `CLUSTER NODES` (`id ip:port@bus flags …`
/// per line), sorted.
fn masters(nodes: &str) -> String {
    let mut masters: Vec<&str> = nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let (address, flags) = (fields.next()?, fields.next()?);
            let master = flags.split(',').any(|f| f == "master") && !flags.contains("fail");
            master.then(|| address.split('@').next().unwrap_or(address))
        })
        .collect();
    masters.sort_unstable();
    masters.join(",")
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Server(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Master(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Server(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Master(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Server(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
            Self::Master(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::masters;

    #[test]
    fn masters_are_read_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7002@17002 master - 0 1 2 connected 5461-10922
b2 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
c3 127.0.0.1:7004@17004 slave b2 0 1 1 connected
d4 127.0.0.1:7003@17003 master,fail - 0 1 3 disconnected
";
        assert_eq!(masters(nodes), "127.0.0.1:7001,127.0.0.1:7002");
    }
}
