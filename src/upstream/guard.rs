//! The private-address guard of pass-through traffic (`allow_private = false`).
//!
//! An open forwarder next to internal services is an SSRF hole: pass-through
//! requests and CONNECT tunnels must not reach loopback, private, link-local
//! or cloud-metadata addresses. The check is made on the addresses actually
//! connected to (resolve, filter, connect to what is left), so a name that
//! resolves differently the second time cannot slip through.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

/// Why a target may not be connected to.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Every (or some) resolved address is guarded.
    #[error("{host} resolves to a guarded address")]
    Forbidden { host: String },
    /// The name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: std::io::Error },
}

/// Whether `ip` is one pass-through traffic must never reach.
pub fn is_guarded(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_guarded(v4),
        IpAddr::V6(v6) => v6_guarded(v6),
    }
}

fn v4_guarded(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16, metadata 169.254.169.254 included
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0 // "this network"
        || a >= 240 // reserved for future use (240/4, the broadcast address included)
        || (a == 100 && (64..128).contains(&b)) // shared address space, Alibaba metadata
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking 198.18/15, used for lab networks
}

fn v6_guarded(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_guarded(v4);
    }
    let segments = ip.segments();
    let first = segments[0];
    // NAT64 (64:ff9b::/96) reaches IPv4 through a translator.
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., a, b, c, d] = ip.octets();
        return v4_guarded(Ipv4Addr::new(a, b, c, d));
    }
    // 6to4 (2002:a.b.c.d::/48) reaches the IPv4 address it embeds.
    if first == 0x2002 {
        let [_, _, a, b, c, d, ..] = ip.octets();
        return v4_guarded(Ipv4Addr::new(a, b, c, d));
    }
    ip.is_loopback()
        // Tunnels and translators whose IPv4 end cannot be told from the
        // address alone: Teredo (2001::/32), local-use NAT64 (64:ff9b:1::/48).
        || segments[..2] == [0x2001, 0]
        || segments[..3] == [0x64, 0xff9b, 1]
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (first & 0xfe00) == 0xfc00 // unique-local fc00::/7, AWS fd00:ec2::254 included
        || (first & 0xffc0) == 0xfec0 // deprecated site-local
        // IPv4-compatible (::a.b.c.d), deprecated but still routable by some stacks.
        || (segments[..6] == [0; 6] && v4_guarded(Ipv4Addr::from_bits(ip.to_bits() as u32)))
}

/// Resolves `host` (a name or an IP literal, brackets allowed).
pub async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, GuardError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let resolve_error = |source| GuardError::Resolve { host: host.to_string(), source };
    let addrs: Vec<SocketAddr> =
        tokio::net::lookup_host((bare, port)).await.map_err(resolve_error)?.collect();
    if addrs.is_empty() {
        return Err(resolve_error(std::io::Error::other("no addresses")));
    }
    Ok(addrs)
}

/// Resolves `host` and refuses it when any of its addresses is guarded.
pub async fn resolve_allowed(host: &str, port: u16) -> Result<Vec<SocketAddr>, GuardError> {
    let addrs = resolve(host, port).await?;
    if addrs.iter().any(|a| is_guarded(a.ip())) {
        return Err(GuardError::Forbidden { host: host.to_string() });
    }
    Ok(addrs)
}

/// DNS for the pooled client: resolves on tokio's blocking pool and, when
/// `guard` is set, drops guarded addresses before the connector sees them.
#[derive(Clone, Copy, Debug)]
pub struct Resolver {
    /// Filter guarded addresses out.
    pub guard: bool,
}

type Resolving = Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, GuardError>> + Send>>;

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = GuardError;
    type Future = Resolving;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let guard = self.guard;
        Box::pin(async move {
            let host = name.as_str();
            let addrs = if guard { resolve_allowed(host, 0).await? } else { resolve(host, 0).await? };
            Ok(addrs.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_addresses() {
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "198.18.0.1",
            "198.19.255.255",
            "240.0.0.1",
            "255.255.255.255",
            "2002:7f00:1::",
            "2002:a00:1::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "64:ff9b:1::a00:1",
        ] {
            assert!(is_guarded(ip.parse().unwrap()), "{ip} should be guarded");
        }
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "172.32.0.1",
            "198.20.0.1",
            "2002:101:101::",
        ] {
            assert!(!is_guarded(ip.parse().unwrap()), "{ip} should be allowed");
        }
    }

    #[tokio::test]
    async fn literals_are_checked_without_dns() {
        assert!(matches!(resolve_allowed("[::1]", 80).await, Err(GuardError::Forbidden { .. })));
        assert!(matches!(resolve_allowed("127.0.0.1", 80).await, Err(GuardError::Forbidden { .. })));
    }
}
