//! `[proxy]`: the admin nodes requests are forwarded to, how long to wait for them, how
//! their health is judged, and `[[proxy.routes]]`, which paths are forwarded under which
//! authentication.

use std::path::PathBuf;
use std::time::Duration;

use axum::http::{Method, Uri};
use serde::Deserialize;

/// Paths Portcullis serves itself; a proxy route under one of them would be confusing at
/// best (some requests answered here, some forwarded) and is refused. Together with `/`
/// they hold every public route, so a request outside them goes to the proxy without
/// passing the router (`routes::Dispatch`).
pub const RESERVED_PREFIXES: &[&str] = &["/oauth2/", "/auth/", "/config/v1/", "/.well-known/"];

/// The longest `proxy.upgrade_session_check_interval` accepted.
pub const MAX_UPGRADE_SESSION_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// `[proxy]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    /// The admin nodes, `http://host:port` each. Empty: nothing is proxied.
    pub upstreams: Vec<String>,
    /// A TCP connection to a node must be established within this time.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A node must send its response head within this time (504 otherwise); shorter
    /// than `server.request_timeout`.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Idle keep-alive connections to a node are closed after this time.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Most idle keep-alive connections kept per node.
    pub pool_max_idle_per_node: usize,
    /// Largest request body forwarded, in bytes (413 above); replaces
    /// `server.max_body_bytes` for proxied requests.
    pub max_body_bytes: usize,
    /// Idempotent requests whose body is at most this many bytes (and declared) are held
    /// in memory so that a retry on another node can send them again; larger ones are
    /// streamed and not retried.
    pub retry_buffer_bytes: usize,
    /// Send the validated access token of bearer routes to the node as
    /// `Authorization: Bearer`. Off: nodes see only the `X-Portcullis-*` identity.
    pub forward_token: bool,
    /// PEM file of CAs trusted, besides the system roots, for `https://` admin nodes (a
    /// private CA).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM certificate (chain) Portcullis presents to `https://` admin nodes that require
    /// client certificates (mTLS); with `tls_client_key`.
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of `tls_client_cert`.
    pub tls_client_key: Option<PathBuf>,
    /// How often an upgraded (WebSocket) connection opened with a console session asks
    /// the refresh store whether the session still lives; it is closed at the first check
    /// that finds it ended (signed out, revoked, expired, past its maximum lifetime).
    #[serde(with = "humantime_serde")]
    pub upgrade_session_check_interval: Duration,
    /// Passive and active health checks.
    pub health: HealthSettings,
    /// `[[proxy.routes]]`: which paths are forwarded, and how they are authenticated.
    pub routes: Vec<RouteSettings>,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(25),
            pool_idle_timeout: Duration::from_secs(15),
            pool_max_idle_per_node: 32,
            max_body_bytes: 16 * 1024 * 1024,
            retry_buffer_bytes: 64 * 1024,
            forward_token: false,
            tls_ca_file: None,
            tls_client_cert: None,
            tls_client_key: None,
            upgrade_session_check_interval: Duration::from_secs(30),
            health: HealthSettings::default(),
            routes: Vec::new(),
        }
    }
}

/// `[proxy.health]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSettings {
    /// Consecutive failures (connect errors, timeouts, 502/503) that mark a node down.
    pub failures: u32,
    /// How long a node marked down by failures gets no traffic; after it, the node gets
    /// requests again and a single failure takes it out at once.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Active checks: `GET <node><check_path>` every `check_interval`; a node that does
    /// not answer 2xx gets no traffic until it does. Unset: passive checks only.
    pub check_path: Option<String>,
    /// How often the active check runs.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// How long one active check may take.
    #[serde(with = "humantime_serde")]
    pub check_timeout: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            failures: 3,
            cooldown: Duration::from_secs(10),
            check_path: None,
            check_interval: Duration::from_secs(5),
            check_timeout: Duration::from_secs(2),
        }
    }
}

/// How a proxy route authenticates its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteAuth {
    /// A console session (the SSO cookies); browsers without one are sent to log in.
    Session,
    /// A bearer access token with the route's scopes (RFC 6750).
    Bearer,
    /// No authentication; identity headers are still stripped.
    Public,
}

impl RouteAuth {
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Bearer => "bearer",
            Self::Public => "public",
        }
    }
}

/// `[[proxy.routes]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// Path prefix: `/api/` matches everything under `/api/`; `/api` matches `/api`
    /// and everything under `/api/` (never `/apix`).
    pub prefix: String,
    /// Match `prefix` only as the whole path, nothing under it (nginx's `location =`):
    /// for a page whose sub-paths need more than it does.
    #[serde(default)]
    pub exact: bool,
    /// Methods this route applies to; absent: every method.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// `session`, `bearer` or `public`.
    pub auth: RouteAuth,
    /// Scopes a bearer token must carry, all of them (`bearer` only).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Roles of which the user must hold at least one (`session` and `bearer`).
    #[serde(default)]
    pub roles: Vec<String>,
}

/// A field of `[proxy]` that is not acceptable, and why.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ProxySettingsError {
    /// Dotted path of the field.
    pub field: String,
    /// Why.
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ProxySettingsError {
    ProxySettingsError {
        field: field.into(),
        message: message.into(),
    }
}

impl ProxySettings {
    /// Whether anything is forwarded at all.
    pub fn enabled(&self) -> bool {
        !self.upstreams.is_empty()
    }

    /// Checks nodes, timeouts and routes; `request_timeout` is `server.request_timeout`,
    /// which must outlast a node's answer.
    pub fn validate(&self, request_timeout: Duration) -> Result<(), ProxySettingsError> {
        check_upstreams(&self.upstreams)
            .map_err(|(i, m)| err(format!("proxy.upstreams[{i}]"), m))?;
        for (name, d) in [
            ("proxy.connect_timeout", self.connect_timeout),
            ("proxy.read_timeout", self.read_timeout),
            ("proxy.health.cooldown", self.health.cooldown),
            ("proxy.health.check_interval", self.health.check_interval),
            ("proxy.health.check_timeout", self.health.check_timeout),
            (
                "proxy.upgrade_session_check_interval",
                self.upgrade_session_check_interval,
            ),
        ] {
            if d.is_zero() {
                return Err(err(name, "must be greater than 0"));
            }
        }
        if self.upgrade_session_check_interval > MAX_UPGRADE_SESSION_CHECK_INTERVAL {
            return Err(err(
                "proxy.upgrade_session_check_interval",
                format!(
                    "must be at most {}: a WebSocket would outlive its ended session by that \
                     much",
                    humantime::format_duration(MAX_UPGRADE_SESSION_CHECK_INTERVAL)
                ),
            ));
        }
        if self.read_timeout >= request_timeout {
            return Err(err(
                "proxy.read_timeout",
                "must be shorter than server.request_timeout, or clients get 408 before a \
                 slow node's 504",
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(err("proxy.max_body_bytes", "must be greater than 0"));
        }
        if self.health.failures == 0 {
            return Err(err("proxy.health.failures", "must be at least 1"));
        }
        if let Some(path) = &self.health.check_path
            && (!path.starts_with('/') || path.parse::<Uri>().is_err())
        {
            return Err(err(
                "proxy.health.check_path",
                "must be an absolute path such as /health",
            ));
        }
        if self.tls_client_cert.is_some() != self.tls_client_key.is_some() {
            return Err(err(
                "proxy.tls_client_cert",
                "tls_client_cert and tls_client_key go together",
            ));
        }
        if let Some(ca) = &self.tls_ca_file {
            crate::outbound::pem_certs(ca).map_err(|m| err("proxy.tls_ca_file", m))?;
        }
        if let (Some(cert), Some(key)) = (&self.tls_client_cert, &self.tls_client_key) {
            crate::outbound::client_identity(cert, key)
                .map_err(|m| err("proxy.tls_client_cert", m))?;
        }
        if !self.routes.is_empty() && self.upstreams.is_empty() {
            return Err(err(
                "proxy.upstreams",
                "routes are configured but no admin node to forward them to",
            ));
        }
        for (i, r) in self.routes.iter().enumerate() {
            r.validate(&format!("proxy.routes[{i}]"))?;
        }
        Ok(())
    }
}

impl RouteSettings {
    fn validate(&self, at: &str) -> Result<(), ProxySettingsError> {
        let p = &self.prefix;
        let clean = p.starts_with('/')
            && !p.contains("//")
            && !p.contains(['\\', ';', '%', '?', '#'])
            && !p.chars().any(|c| c.is_control() || c.is_whitespace())
            && !p.split('/').any(|s| s == "." || s == "..");
        if !clean {
            return Err(err(
                format!("{at}.prefix"),
                "must be a plain absolute path such as /jobinfo/ (no `..`, `;`, `%`, `//`)",
            ));
        }
        let with_slash = if p.ends_with('/') {
            p.clone()
        } else {
            format!("{p}/")
        };
        if let Some(reserved) = RESERVED_PREFIXES.iter().find(|r| {
            with_slash.starts_with(**r) || (r.starts_with(with_slash.as_str()) && p != "/")
        }) {
            return Err(err(
                format!("{at}.prefix"),
                format!("overlaps {reserved}, which Portcullis serves itself"),
            ));
        }
        if let Some(methods) = &self.methods {
            if methods.is_empty() {
                return Err(err(
                    format!("{at}.methods"),
                    "must name at least one method, or be left out for all",
                ));
            }
            for m in methods {
                let ok = !m.is_empty()
                    && m.bytes().all(|b| b.is_ascii_uppercase())
                    && Method::from_bytes(m.as_bytes()).is_ok();
                if !ok {
                    return Err(err(
                        format!("{at}.methods"),
                        format!("`{m}` is not an upper-case HTTP method"),
                    ));
                }
            }
        }
        if !self.scopes.is_empty() && self.auth != RouteAuth::Bearer {
            return Err(err(
                format!("{at}.scopes"),
                "only bearer routes check scopes",
            ));
        }
        if !self.roles.is_empty() && self.auth == RouteAuth::Public {
            return Err(err(
                format!("{at}.roles"),
                "a public route has no user whose roles could be checked",
            ));
        }
        for s in self.scopes.iter().chain(&self.roles) {
            if s.is_empty() || s.contains(char::is_whitespace) || s.contains(',') {
                return Err(err(
                    at.to_owned(),
                    format!("`{s}` is not a valid scope or role name"),
                ));
            }
        }
        Ok(())
    }
}

/// `http://host:port` or `https://host:port` → (scheme, `host:port`); anything else
/// (another scheme, a path, credentials, a query) is refused with the reason.
/// A list of admin nodes as the file and the runtime settings both take it: each node
/// parses ([`parse_upstream`]) and none is listed twice (`http://a:80` and `http://a:80/`
/// are one); the error names the index of the first node refused.
pub fn check_upstreams(list: &[String]) -> Result<(), (usize, String)> {
    let mut seen = std::collections::HashSet::new();
    for (i, u) in list.iter().enumerate() {
        parse_upstream(u).map_err(|m| (i, m))?;
        if !seen.insert(u.trim_end_matches('/')) {
            return Err((i, format!("`{u}` is listed twice")));
        }
    }
    Ok(())
}

pub fn parse_upstream(text: &str) -> Result<(&'static str, String), String> {
    let uri: Uri = text.parse().map_err(|_| format!("`{text}` is not a URL"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => "http",
        Some("https") => "https",
        Some(other) => {
            return Err(format!(
                "scheme `{other}` is not supported; admin nodes are reached over http:// or \
                 https://"
            ));
        }
        None => {
            return Err(format!(
                "`{text}` needs the scheme, e.g. http://10.0.0.5:8080"
            ));
        }
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{text}` has no host"))?;
    if authority.as_str().contains('@') {
        return Err("credentials in an upstream URL are not supported".to_owned());
    }
    if authority.host().is_empty() {
        return Err(format!("`{text}` has no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "`{text}` must not have a path or query: paths are forwarded as requested"
        ));
    }
    Ok((scheme, authority.as_str().to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn route(prefix: &str) -> RouteSettings {
        RouteSettings {
            prefix: prefix.to_owned(),
            exact: false,
            methods: None,
            auth: RouteAuth::Session,
            scopes: vec![],
            roles: vec![],
        }
    }

    #[test]
    fn upstreams_are_plain_http_origins() {
        assert_eq!(
            parse_upstream("http://10.0.0.5:8080").unwrap().1,
            "10.0.0.5:8080"
        );
        assert!(parse_upstream("http://10.0.0.5:8080/").is_ok());
        assert_eq!(
            parse_upstream("https://10.0.0.5:8443").unwrap(),
            ("https", "10.0.0.5:8443".to_owned())
        );
        assert!(parse_upstream("ftp://10.0.0.5").is_err());
        assert!(parse_upstream("10.0.0.5:8080").is_err());
        assert!(parse_upstream("http://a:b@10.0.0.5").is_err());
        assert!(parse_upstream("http://10.0.0.5/xxl-job-admin").is_err());
    }

    #[test]
    fn prefixes_must_be_plain_and_outside_our_own_paths() {
        assert!(route("/jobinfo/").validate("r").is_ok());
        assert!(route("/").validate("r").is_ok());
        assert!(route("/api").validate("r").is_ok());
        for bad in [
            "jobs",
            "/a/../b",
            "/a;x",
            "/a%2e",
            "//x",
            "/auth/",
            "/auth",
            "/oauth2/x",
        ] {
            assert!(route(bad).validate("r").is_err(), "{bad}");
        }
    }

    #[test]
    fn scopes_belong_to_bearer_routes_and_roles_to_authenticated_ones() {
        let mut r = route("/api/");
        r.scopes = vec!["scheduler:executor".to_owned()];
        assert!(r.validate("r").is_err());
        r.auth = RouteAuth::Bearer;
        assert!(r.validate("r").is_ok());
        let mut p = route("/public/");
        p.auth = RouteAuth::Public;
        p.roles = vec!["admin".to_owned()];
        assert!(p.validate("r").is_err());
        let mut m = route("/x/");
        m.methods = Some(vec!["get".to_owned()]);
        assert!(m.validate("r").is_err());
    }
}
