//! What a request carries to an admin node, and what a node's answer carries back.
//!
//! The node trusts the identity headers Portcullis sets, so nothing a client sends may
//! look like one: every inbound header in the identity families below is removed, in any
//! spelling (`X_Forwarded_User` is a legal header name that some servlet containers and
//! CGI-style gateways read as `X-Forwarded-User`), before the verified identity is added.

use std::fmt::Write as _;
use std::net::IpAddr;

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::sso::session::COOKIE_PREFIX;

/// The verified user header.
pub const USER: HeaderName = HeaderName::from_static("x-portcullis-user");
/// The verified subject header: unique and stable (`<provider>:<sub>`, `local:<name>`,
/// or a service token's `sub`), where the user header is a login name.
pub const SUBJECT: HeaderName = HeaderName::from_static("x-portcullis-subject");
/// The verified email header (console users whose provider reported one).
pub const EMAIL: HeaderName = HeaderName::from_static("x-portcullis-email");
/// Roles, comma-separated.
pub const ROLES: HeaderName = HeaderName::from_static("x-portcullis-roles");
/// Scopes, space-separated as in OAuth.
pub const SCOPES: HeaderName = HeaderName::from_static("x-portcullis-scopes");
/// W3C Trace Context.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C Trace Context vendor state, kept only with a valid `traceparent`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Name prefixes (normalised: lower case, `_` as `-`) of headers that carry identity.
const IDENTITY_PREFIXES: &[&str] = &[
    // X-Forwarded-User/-Email/-Groups/-Roles/-Scopes/-Access-Token, and For/Host/Proto,
    // which are set again below
    "x-forwarded-",
    "x-auth-request-",
    "x-remote-",
    "remote-",
    "x-portcullis-",
    "x-webauth-",
    // Keycloak Gatekeeper / louketo-proxy: X-Auth-Username, X-Auth-Roles, …
    "x-auth-",
];

/// Whole names (normalised) of headers that carry identity or client addresses, or
/// that frameworks read as another path or method than the request's own.
const IDENTITY_NAMES: &[&str] = &[
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "authorization",
    "x-authenticated-user",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded in either direction.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Who a request is, as verified by Portcullis: the identity headers' values, checked
/// once when the identity is made (a verified token's are made once per token and
/// shared by every request that presents it), so forwarding a request copies none of
/// them.
#[derive(Clone, Default)]
pub struct Identity {
    user: Option<HeaderValue>,
    subject: Option<HeaderValue>,
    email: Option<HeaderValue>,
    roles: Option<HeaderValue>,
    scopes: Option<HeaderValue>,
    /// The `Authorization` value the token came in, for `proxy.forward_token`.
    token: Option<HeaderValue>,
}

impl Identity {
    /// The identity of `user`; a value that cannot be a header (control characters) is
    /// left out, with a warning, and the node does not get that header.
    pub fn new(
        user: &str,
        subject: &str,
        email: Option<&str>,
        roles: &[String],
        scopes: &[String],
    ) -> Self {
        Self {
            user: value(&USER, user.to_owned()),
            subject: value(&SUBJECT, subject.to_owned()),
            email: email.and_then(|e| value(&EMAIL, e.to_owned())),
            roles: value(&ROLES, roles.join(",")),
            scopes: value(&SCOPES, scopes.join(" ")),
            token: None,
        }
    }

    /// The same identity, presented with the bearer token in `authorization` (forwarded
    /// only where `proxy.forward_token` is set).
    #[must_use]
    pub fn with_token(mut self, authorization: Option<&HeaderValue>) -> Self {
        self.token = authorization.cloned();
        self
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("user", &self.user)
            .field("subject", &self.subject)
            .field("roles", &self.roles)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// What the forwarded request says about where it came from.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The client address Portcullis resolved (X-Forwarded-For only from trusted proxies).
    pub client_ip: IpAddr,
    /// The public host (of `server.public_url`).
    pub host: Option<HeaderValue>,
}

/// The name with `_` read as `-` (header names are lower case already); a copy only for
/// a name that has an underscore.
fn normalised(name: &HeaderName) -> std::borrow::Cow<'_, str> {
    let n = name.as_str();
    if n.contains('_') {
        std::borrow::Cow::Owned(n.replace('_', "-"))
    } else {
        std::borrow::Cow::Borrowed(n)
    }
}

fn is_identity(name: &HeaderName) -> bool {
    let n = normalised(name);
    IDENTITY_NAMES.contains(&n.as_ref()) || IDENTITY_PREFIXES.iter().any(|p| n.starts_with(p))
}

/// Whether the (lower-case) header name `name` is `token`, read case-insensitively and
/// with `_` as `-` on both sides.
fn same_name(name: &str, token: &str) -> bool {
    fn norm(b: u8) -> u8 {
        if b == b'_' {
            b'-'
        } else {
            b.to_ascii_lowercase()
        }
    }
    name.len() == token.len()
        && name
            .bytes()
            .zip(token.bytes())
            .all(|(a, b)| norm(a) == norm(b))
}

/// Hop-by-hop: one of [`HOP_BY_HOP`], or a name the message's `Connection` lists.
fn is_hop_by_hop(headers: &HeaderMap, name: &HeaderName) -> bool {
    let name = name.as_str();
    HOP_BY_HOP.iter().any(|h| same_name(name, h))
        || headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| same_name(name, t.trim()))
}

/// Removes every header `doomed` picks. The names are gathered first (a map cannot lose
/// entries while it is read); up to eight are held on the stack, which covers every
/// ordinary message, so the usual case allocates nothing.
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderMap, &HeaderName) -> bool) {
    let mut few: [Option<HeaderName>; 8] = Default::default();
    let mut more = Vec::new();
    let mut held = 0;
    for name in headers.keys().filter(|n| doomed(headers, n)) {
        match few.get_mut(held) {
            Some(slot) => {
                *slot = Some(name.clone());
                held += 1;
            }
            None => more.push(name.clone()),
        }
    }
    for name in few.iter().flatten().chain(&more) {
        headers.remove(name);
    }
}

/// Removes hop-by-hop headers; `upgrade` keeps `Connection: upgrade` and `Upgrade`, which
/// a WebSocket handshake needs end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let upgrade_value = upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    remove_where(headers, is_hop_by_hop);
    if let Some(u) = upgrade_value {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, u);
    }
}

/// Prepares a client's request headers for a node: hop-by-hop and identity headers out,
/// our session cookies out of `Cookie`, then the verified identity, request id, trace
/// context and forwarding headers in.
pub fn to_upstream(
    headers: &mut HeaderMap,
    identity: Option<&Identity>,
    origin: &Origin,
    forward_token: bool,
    upgrade: bool,
) {
    // the request id is ours to send (checked or made at the edge): a client that lists
    // it in `Connection` must not keep it from the node's logs
    let request_id = headers.get(&crate::routes::REQUEST_ID).cloned();
    strip_hop_by_hop(headers, upgrade);
    // the node gets a Host of its own (set from its address by the client)
    remove_where(headers, |_, n| is_identity(n) || *n == header::HOST);
    if let Some(id) = request_id {
        headers.insert(crate::routes::REQUEST_ID, id);
    }
    strip_session_cookies(headers);
    propagate_trace(headers);

    // room for what is added below, in one step rather than a growth per header
    headers.reserve(8);
    if let Some(id) = identity {
        for (name, value) in [
            (USER, &id.user),
            (SUBJECT, &id.subject),
            (EMAIL, &id.email),
            (ROLES, &id.roles),
            (SCOPES, &id.scopes),
        ] {
            if let Some(v) = value {
                headers.insert(name, v.clone());
            }
        }
        if forward_token && let Some(token) = id.token.as_ref().and_then(crate::authn::bearer_token)
        {
            insert(headers, header::AUTHORIZATION, format!("Bearer {token}"));
        }
    }
    let mut client_ip = String::with_capacity(45);
    let _ = write!(client_ip, "{}", origin.client_ip);
    insert(
        headers,
        HeaderName::from_static("x-forwarded-for"),
        client_ip,
    );
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("https"),
    );
    if let Some(host) = &origin.host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
    }
}

/// Prepares a node's response headers for the client: hop-by-hop out, and no node may
/// set (or clear) Portcullis's own session cookies. An event stream (or an upgraded
/// connection) is marked `X-Accel-Buffering: no`, so that a proxy in front (nginx) passes
/// each event on as it comes rather than when its buffer fills, however the request
/// asked for it.
pub fn from_upstream(headers: &mut HeaderMap, upgrade: bool) {
    strip_hop_by_hop(headers, upgrade);
    let event_stream = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"));
    if upgrade || event_stream {
        headers.insert(
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        );
    }
    let keep: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        // the name is read from the bytes: a value that is not UTF-8 elsewhere must not
        // carry one of our cookies past the check
        .filter(|v| {
            let bytes = v.as_bytes();
            let name = bytes.split(|b| *b == b'=').next().unwrap_or(bytes);
            !std::str::from_utf8(name.trim_ascii()).is_ok_and(is_session_cookie)
        })
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in keep {
        headers.append(header::SET_COOKIE, v);
    }
}

/// Ours by name: the session cookies and the pending-login cookies (one per login, so
/// their names vary), and any other a node might invent under our prefix.
fn is_session_cookie(name: &str) -> bool {
    name.starts_with(COOKIE_PREFIX)
}

/// Removes Portcullis's cookies from `Cookie`, keeping the node's own (its session,
/// preferences) in one header.
fn strip_session_cookies(headers: &mut HeaderMap) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .filter(|pair| !is_session_cookie(pair.split('=').next().unwrap_or_default().trim()))
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
}

/// `text` as the value of header `name` (checked, and kept without a copy).
fn value(name: &HeaderName, text: String) -> Option<HeaderValue> {
    match HeaderValue::from_maybe_shared(bytes::Bytes::from(text)) {
        Ok(v) => Some(v),
        // a value with control characters cannot be a header; the node simply does not
        // get it (and never a client's version of it, which is removed before forwarding)
        Err(_) => {
            tracing::warn!(header = %name, "identity value not representable as a header");
            None
        }
    }
}

/// Inserts `text` as the value of `name`, if it can be one.
fn insert(headers: &mut HeaderMap, name: HeaderName, text: String) {
    if let Some(v) = value(&name, text) {
        headers.insert(name, v);
    }
}

/// Keeps the trace of a valid incoming `traceparent` with a new span id for our hop (the
/// exported request span's when spans are exported), or starts a trace; `tracestate`
/// survives only with a valid parent.
fn propagate_trace(headers: &mut HeaderMap) {
    // spans exported: the node's parent is our request span, in the caller's trace
    if let Some((trace_id, span_id, flags)) = crate::telemetry::current_trace_context() {
        if headers
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent)
            .is_none()
        {
            headers.remove(&TRACESTATE);
        }
        insert(
            headers,
            TRACEPARENT,
            format!("00-{trace_id}-{span_id}-{flags:02x}"),
        );
        return;
    }
    let incoming = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    // `00-<trace id>-<our span id>-<flags>`, written into one string
    let mut value = String::with_capacity(55);
    value.push_str("00-");
    match &incoming {
        Some((trace, _)) => value.push_str(trace),
        None => {
            headers.remove(&TRACESTATE);
            push_random_hex(&mut value, 16);
        }
    }
    value.push('-');
    push_random_hex(&mut value, 8);
    value.push('-');
    value.push_str(incoming.as_ref().map_or("00", |(_, flags)| flags.as_str()));
    insert(headers, TRACEPARENT, value);
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>` → (trace id, flags), per W3C
/// Trace Context §3.2 (lower-case hex, ids not all zeros).
pub fn parse_traceparent(value: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = value.trim().split('-').collect();
    let [version, trace, parent, flags] = parts.as_slice() else {
        return None;
    };
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = *version == "00"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    ok.then(|| ((*trace).to_owned(), (*flags).to_owned()))
}

/// Appends `bytes` random bytes (at most 16) as lower-case hex. The bytes come from a v4
/// UUID (the thread-local generator behind `uuid`), never all zeros.
fn push_random_hex(out: &mut String, bytes: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let id = uuid::Uuid::new_v4();
    for b in &id.as_bytes()[..bytes.min(16)] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn origin() -> Origin {
        Origin {
            client_ip: "198.51.100.7".parse().unwrap(),
            host: Some(HeaderValue::from_static("portcullis.example")),
        }
    }

    #[test]
    fn identity_headers_in_any_spelling_are_replaced_by_the_verified_ones() {
        let mut h = HeaderMap::new();
        for name in [
            "x-forwarded-user",
            "X_Forwarded_User",
            "x-forwarded-email",
            "x-forwarded-groups",
            "x_forwarded_roles",
            "x-forwarded-scopes",
            "x-auth-request-user",
            "X_Auth_Request_Email",
            "x-remote-user",
            "remote-user",
            "Remote_User",
            "x-portcullis-user",
            "X_Portcullis_Roles",
            "forwarded",
            "authorization",
            "x-auth-username",
            "X_Auth_Roles",
            "x-authenticated-user",
            "true-client-ip",
            "cf-connecting-ip",
            "x-original-url",
            "x-rewrite-url",
            "x-http-method-override",
            "x-method-override",
        ] {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("mallory"),
            );
        }
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        // listing it as hop-by-hop does not take it from the node
        h.insert("connection", HeaderValue::from_static("x-request-id"));
        let id = Identity::new(
            "alice",
            "corp:4a7c",
            None,
            &["admin".to_owned(), "viewer".to_owned()],
            &["console".to_owned()],
        )
        .with_token(Some(&HeaderValue::from_static("Bearer t")));
        to_upstream(&mut h, Some(&id), &origin(), false, false);
        assert!(
            h.values().all(|v| v != "mallory"),
            "a spoofed value survived: {h:?}"
        );
        assert_eq!(h["x-portcullis-user"], "alice");
        assert_eq!(h["x-portcullis-subject"], "corp:4a7c");
        assert_eq!(h["x-portcullis-roles"], "admin,viewer");
        assert_eq!(h["x-portcullis-scopes"], "console");
        assert!(!h.contains_key("x-portcullis-email"));
        assert!(!h.contains_key("authorization"));
        assert_eq!(h["x-forwarded-for"], "198.51.100.7");
        assert_eq!(h["x-forwarded-host"], "portcullis.example");
        assert_eq!(h["x-request-id"], "abc");
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let cases: [&[(&str, &str)]; 2] = [
            &[
                ("connection", "keep-alive, x-secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
            ],
            // listed in any case, with `_` for `-` on either side
            &[
                ("connection", "Close"),
                ("connection", " X_Secret ,, x-other"),
                ("x-secret", "1"),
                ("x_other", "1"),
                ("transfer_encoding", "chunked"),
            ],
        ];
        for case in cases {
            let mut h = HeaderMap::new();
            for (name, value) in case.iter().chain(&[("x-keep", "1")]) {
                h.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_static(value),
                );
            }
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.len(), 1, "{h:?}");
            assert!(h.contains_key("x-keep"));
        }
    }

    #[test]
    fn a_verified_identity_is_forwarded_and_its_token_only_when_asked() {
        let id = Identity::new(
            "svc",
            "svc",
            Some("a@example.com"),
            &[],
            &["jobs:run".to_owned()],
        )
        .with_token(Some(&HeaderValue::from_static("bearer  abc.def ")));
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("bearer  abc.def "),
        );
        to_upstream(&mut h, Some(&id), &origin(), false, false);
        assert_eq!(h["x-portcullis-user"], "svc");
        assert_eq!(h["x-portcullis-email"], "a@example.com");
        assert_eq!(h["x-portcullis-roles"], "");
        assert_eq!(h["x-portcullis-scopes"], "jobs:run");
        assert!(!h.contains_key("authorization"));
        let mut h = HeaderMap::new();
        to_upstream(&mut h, Some(&id), &origin(), true, false);
        assert_eq!(h["authorization"], "Bearer abc.def");
        // a value that cannot be a header is left out, never sent mangled
        let bad = Identity::new("a\nb", "a\nb", None, &[], &[]);
        let mut h = HeaderMap::new();
        to_upstream(&mut h, Some(&bad), &origin(), false, false);
        assert!(!h.contains_key("x-portcullis-user"));
    }

    #[test]
    fn session_cookies_stay_here_and_the_nodes_own_go_on() {
        let mut h = HeaderMap::new();
        h.append(
            "cookie",
            HeaderValue::from_static("__Host-portcullis-at=secret; XXL_JOB_LOGIN_IDENTITY=abc"),
        );
        h.append(
            "cookie",
            HeaderValue::from_static(
                "__Host-portcullis-rt=secret2; __Host-portcullis-login-0123456789abcdef=st",
            ),
        );
        to_upstream(&mut h, None, &origin(), false, false);
        assert_eq!(h["cookie"], "XXL_JOB_LOGIN_IDENTITY=abc");

        let mut r = HeaderMap::new();
        r.append(
            "set-cookie",
            HeaderValue::from_static("__Host-portcullis-at=x; Path=/"),
        );
        r.append(
            "set-cookie",
            HeaderValue::from_static("JSESSIONID=1; Path=/"),
        );
        // bytes that are not UTF-8 later in the value do not hide the name
        r.append(
            "set-cookie",
            HeaderValue::from_bytes(b" __Host-portcullis-rt =x; Path=/; X=\xff").unwrap(),
        );
        r.append(
            "set-cookie",
            HeaderValue::from_static("__Host-portcullis-login-0123456789abcdef=; Max-Age=0"),
        );
        from_upstream(&mut r, false);
        assert_eq!(r.get_all("set-cookie").iter().count(), 1);
        assert_eq!(r["set-cookie"], "JSESSIONID=1; Path=/");
        // an ordinary answer may be buffered by a proxy in front
        assert!(!r.contains_key("x-accel-buffering"));
    }

    #[test]
    fn event_streams_and_upgrades_are_marked_for_a_proxy_in_front_not_to_buffer() {
        for content_type in ["text/event-stream", "Text/Event-Stream; charset=utf-8"] {
            let mut r = HeaderMap::new();
            r.insert("content-type", HeaderValue::from_str(content_type).unwrap());
            from_upstream(&mut r, false);
            assert_eq!(r["x-accel-buffering"], "no", "{content_type}");
        }
        let mut r = HeaderMap::new();
        from_upstream(&mut r, true);
        assert_eq!(r["x-accel-buffering"], "no");
        let mut r = HeaderMap::new();
        r.insert("content-type", HeaderValue::from_static("text/html"));
        // a node's own say is replaced for a stream, and kept otherwise
        r.insert("x-accel-buffering", HeaderValue::from_static("yes"));
        from_upstream(&mut r, false);
        assert_eq!(r["x-accel-buffering"], "yes");
    }

    #[test]
    fn a_valid_trace_is_continued_and_a_bad_one_restarted() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_str(&format!("00-{trace}-00f067aa0ba902b7-01")).unwrap(),
        );
        h.insert("tracestate", HeaderValue::from_static("vendor=1"));
        propagate_trace(&mut h);
        let (t, flags) = parse_traceparent(h["traceparent"].to_str().unwrap()).unwrap();
        assert_eq!((t.as_str(), flags.as_str()), (trace, "01"));
        assert!(
            !h["traceparent"]
                .to_str()
                .unwrap()
                .contains("00f067aa0ba902b7")
        );
        assert!(h.contains_key("tracestate"));

        let mut bad = HeaderMap::new();
        bad.insert(
            "traceparent",
            HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        );
        bad.insert("tracestate", HeaderValue::from_static("vendor=1"));
        propagate_trace(&mut bad);
        assert!(parse_traceparent(bad["traceparent"].to_str().unwrap()).is_some());
        assert!(!bad.contains_key("tracestate"));
    }
}
