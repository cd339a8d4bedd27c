//! Which client a request comes from. `X-Forwarded-For` is believed only as far as it was
//! written by proxies we trust: the chain is walked from the right (the hop nearest to
//! us), trusted hops are skipped, and the first untrusted address is the client. A peer
//! that is not a trusted proxy is the client, whatever headers it sends.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use ipnet::IpNet;

/// The client address of a request, as [`resolve`] found it. Present in
/// the extensions of every request of the public router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// From CIDRs (a bare address is a /32 or /128).
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self(nets)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client address for a request from `peer` with `headers`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        // every X-Forwarded-For field, in order, is one list (RFC 7230 §3.2.2)
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.iter().rev() {
            match parse_hop(hop) {
                // an entry we cannot read ends what we can believe: the last hop we
                // could is the best we know
                None => return client,
                Some(ip) => {
                    client = ip;
                    if !self.trusts(ip) {
                        return ip;
                    }
                }
            }
        }
        client
    }
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]:443`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    hop.parse::<SocketAddr>().ok().map(|s| canonical(s.ip()))
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, from dual-stack sockets) as IPv4, so one
/// client has one key and CIDRs written as IPv4 apply.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Middleware: puts the [`ClientIp`] in the request's extensions. Without a socket address
/// (a router driven in process), the unspecified address stands in.
pub async fn resolve(trusted: TrustedProxies, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let ip = trusted.client_ip(peer, req.headers());
    req.extensions_mut().insert(ClientIp(ip));
    next.run(req).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::http::HeaderValue;

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted() -> TrustedProxies {
        TrustedProxies::new(vec![
            "10.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ])
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let t = trusted();
        assert_eq!(
            t.client_ip(ip("203.0.113.9"), &xff(&["1.1.1.1"])),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn the_chain_is_walked_from_the_right_past_trusted_hops() {
        let t = trusted();
        // spoofed leftmost entry, then the real client, then an inner proxy
        let h = xff(&["6.6.6.6, 198.51.100.7", "10.1.2.3"]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("198.51.100.7"));
        assert_eq!(
            t.client_ip(ip("::ffff:10.0.0.1"), &xff(&["198.51.100.8:4711"])),
            ip("198.51.100.8")
        );
    }

    #[test]
    fn garbage_or_an_all_trusted_chain_stops_at_the_last_readable_hop() {
        let t = trusted();
        assert_eq!(
            t.client_ip(ip("10.0.0.1"), &xff(&["1.2.3.4, nonsense, 10.9.9.9"])),
            ip("10.9.9.9")
        );
        assert_eq!(
            t.client_ip(ip("10.0.0.1"), &xff(&["10.2.2.2"])),
            ip("10.2.2.2")
        );
        assert_eq!(
            t.client_ip(ip("10.0.0.1"), &HeaderMap::new()),
            ip("10.0.0.1")
        );
    }
}
