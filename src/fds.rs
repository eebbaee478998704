//! The process's open-files limit, raised at start to cover `max_connections`.
//!
//! Every client connection is a file descriptor, and so is the upstream
//! connection its request uses. With the usual soft limit of 1024 and
//! `max_connections = 10_000`, accepts failed long before the cap was
//! reached (1 250 `accept failed` lines a minute). At start the soft limit is
//! raised towards what the config needs, up to the hard limit; when the hard
//! limit is lower, a warning says how many connections it really allows.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors besides connections: listeners, the config watcher, Redis,
/// the CA files, the runtime's own.
const SPARE: u64 = 256;

/// What came of [`raise_for`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raised {
    /// The soft limit already covered it (or is unlimited).
    Enough { soft: u64 },
    /// The soft limit was raised to `soft`.
    To { soft: u64 },
    /// The hard limit is lower than needed: the soft limit is now the hard one.
    Short { soft: u64, wanted: u64 },
}

/// Descriptors `max_connections` needs: one per client connection, one per
/// upstream connection it may use, and some to spare.
pub fn wanted(max_connections: usize) -> u64 {
    (max_connections as u64).saturating_mul(2).saturating_add(SPARE)
}

/// Raises the soft `RLIMIT_NOFILE` to `wanted`, or as far as the hard limit
/// allows; logs what it did (a warning when the hard limit is too low).
pub fn raise_for(max_connections: usize) -> std::io::Result<Raised> {
    let wanted = wanted(max_connections);
    let limit = getrlimit(Resource::Nofile);
    let raised = match (limit.current, limit.maximum) {
        (None, _) => Raised::Enough { soft: u64::MAX },
        (Some(soft), _) if soft >= wanted => Raised::Enough { soft },
        (Some(_), Some(hard)) if hard < wanted => {
            setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: Some(hard) })?;
            Raised::Short { soft: hard, wanted }
        }
        (Some(_), hard) => {
            setrlimit(Resource::Nofile, Rlimit { current: Some(wanted), maximum: hard })?;
            Raised::To { soft: wanted }
        }
    };
    match raised {
        Raised::Enough { .. } => {}
        Raised::To { soft } => tracing::info!(soft, "raised the open-files limit for max_connections"),
        Raised::Short { soft, wanted } => tracing::warn!(
            soft,
            wanted,
            connections = soft.saturating_sub(SPARE) / 2,
            "the hard open-files limit is lower than max_connections needs: raise it (ulimit -Hn, \
             LimitNOFILE=) or lower max_connections"
        ),
    }
    Ok(raised)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_that_covers_the_connections_is_left_alone() {
        let soft = getrlimit(Resource::Nofile).current;
        assert_eq!(raise_for(0).unwrap(), Raised::Enough { soft: soft.unwrap_or(u64::MAX) });
        assert_eq!(getrlimit(Resource::Nofile).current, soft);
        assert_eq!(wanted(10_000), 20_256);
        assert_eq!(wanted(usize::MAX), u64::MAX);
    }
}
