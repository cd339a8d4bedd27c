//! The forwarded-header handling on arbitrary headers: the client address taken from
//! `X-Forwarded-For` behind trusted proxies, and the identity stripping of a request on
//! its way to an admin node.
//!
//! Input: a peer address selector, then `name: value` lines.
//!
//! Promises checked: an untrusted peer is the client whatever it sends; a resolved
//! client is the peer or an address the chain names; after stripping, no header a
//! client sent in an identity family reaches a node, and the forwarding headers are the
//! ones Portcullis wrote.
#![no_main]

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use portcullis::protect::TrustedProxies;
use portcullis::proxy::headers::{Origin, to_upstream};

const PEERS: [&str; 4] = ["10.0.0.1", "203.0.113.9", "::1", "::ffff:10.0.0.2"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let peer: IpAddr = PEERS[usize::from(selector % 4)]
        .parse()
        .unwrap_or(IpAddr::from([0; 4]));
    let mut headers = HeaderMap::new();
    for line in rest.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }

    let trusted = TrustedProxies::new(vec![
        "10.0.0.0/8".parse().unwrap_or_else(|e| panic!("{e}")),
        "::1/128".parse().unwrap_or_else(|e| panic!("{e}")),
    ]);
    let client = trusted.client_ip(peer, &headers);
    let canonical_peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        v4 => v4,
    };
    if canonical_peer == "203.0.113.9".parse::<IpAddr>().unwrap_or(canonical_peer) {
        assert_eq!(
            client, canonical_peer,
            "an untrusted peer's header was believed"
        );
    } else if client != canonical_peer {
        // the client must be an address the chain itself names
        let named = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|hop| {
                let hop = hop.trim();
                let ip = hop
                    .parse::<IpAddr>()
                    .ok()
                    .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()));
                ip.map(|ip| match ip {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                    v4 => v4,
                }) == Some(client)
            });
        assert!(named, "client {client} appears nowhere in the chain");
    }

    let host = headers.get(http::header::HOST).cloned();
    let origin = Origin {
        client_ip: client,
        host: host.clone(),
    };
    let mut out = headers.clone();
    to_upstream(&mut out, None, &origin, false, false);
    for (name, value) in &out {
        let n = name.as_str().replace('_', "-");
        let family = [
            "x-forwarded-",
            "x-auth-request-",
            "x-remote-",
            "remote-",
            "x-portcullis-",
            "x-webauth-",
        ]
        .iter()
        .any(|p| n.starts_with(p))
            || ["forwarded", "x-real-ip", "x-client-ip", "authorization"].contains(&n.as_str());
        if !family {
            continue;
        }
        match n.as_str() {
            "x-forwarded-for" => assert_eq!(value.to_str().ok(), Some(client.to_string().as_str())),
            "x-forwarded-proto" => assert_eq!(value, "https"),
            "x-forwarded-host" => assert_eq!(Some(value), host.as_ref()),
            _ => panic!("{name} reached the node without an identity"),
        }
    }
    assert_eq!(out.get_all("x-forwarded-for").iter().count(), 1);
});
