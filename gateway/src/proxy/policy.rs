//! Which `[[proxy.routes]]` entry a request falls under, and the path check that makes
//! that decision mean the same thing to the admin node.
//!
//! A route is chosen on the percent-decoded path, because that is what the node (a Java
//! servlet container, typically) routes on: `/%61dmin/` is `/admin/` there, so it must be
//! here. Paths a node could read as another path than we do — dot segments, encoded
//! slashes or backslashes, `;` path parameters (Tomcat drops `;…` per segment, so
//! `/public/..;/admin` is a classic bypass), empty segments — are refused outright.

use std::sync::Arc;

use axum::http::Method;

use super::settings::{RouteAuth, RouteSettings};

/// One route, ready to match.
#[derive(Debug, Clone)]
pub struct Route {
    /// The configured prefix.
    pub prefix: String,
    /// Methods it applies to; `None`: all.
    pub methods: Option<Vec<Method>>,
    /// How requests are authenticated.
    pub auth: RouteAuth,
    /// Scopes a bearer token needs, all of them.
    pub scopes: Vec<String>,
    /// Roles of which the user needs one (empty: any user).
    pub roles: Vec<String>,
    /// Its metrics label, `proxy:<prefix>`, built once.
    pub label: Arc<str>,
}

impl Route {
    fn matches_path(&self, path: &str) -> bool {
        if self.prefix.ends_with('/') {
            path.starts_with(&self.prefix)
        } else {
            path == self.prefix
                || path
                    .strip_prefix(self.prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        }
    }

    fn matches_method(&self, method: &Method) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|ms| ms.iter().any(|m| m == method))
    }
}

/// Every configured route.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// From validated settings (entries that do not parse were refused by validation).
    pub fn new(settings: &[RouteSettings]) -> Self {
        let routes = settings
            .iter()
            .map(|r| {
                Arc::new(Route {
                    prefix: r.prefix.clone(),
                    methods: r.methods.as_ref().map(|ms| {
                        ms.iter()
                            .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                            .collect()
                    }),
                    auth: r.auth,
                    scopes: r.scopes.clone(),
                    roles: r.roles.clone(),
                    label: Arc::from(format!("proxy:{}", r.prefix)),
                })
            })
            .collect();
        Self { routes }
    }

    /// The route for `method` on `path` (already decoded by [`decoded_path`]): the
    /// longest prefix among the routes that apply to the method; on a tie, a route that
    /// names the method wins over one for all methods.
    pub fn find(&self, method: &Method, path: &str) -> Option<&Arc<Route>> {
        self.routes
            .iter()
            .filter(|r| r.matches_path(path) && r.matches_method(method))
            .max_by_key(|r| (r.prefix.len(), r.methods.is_some()))
    }
}

/// Why a path is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request path is ambiguous ({0}); write it without it")]
pub struct AmbiguousPath(pub &'static str);

/// The percent-decoded path, or why it is refused. A path with nothing encoded in it (the
/// usual case) is returned as it is, without a copy.
pub fn decoded_path(raw: &str) -> Result<std::borrow::Cow<'_, str>, AmbiguousPath> {
    if !raw.starts_with('/') {
        return Err(AmbiguousPath("not an absolute path"));
    }
    if raw.contains(';') {
        return Err(AmbiguousPath("`;` path parameters"));
    }
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| AmbiguousPath("not UTF-8"))?;
    // what decoding produced must not change the path's structure
    if let std::borrow::Cow::Owned(d) = &decoded
        && d.matches('/').count() != raw.matches('/').count()
    {
        return Err(AmbiguousPath("an encoded `/`"));
    }
    if decoded.contains(['\\', ';']) {
        return Err(AmbiguousPath("a backslash or an encoded `;`"));
    }
    if decoded.chars().any(char::is_control) {
        return Err(AmbiguousPath("control characters"));
    }
    let mut segments = decoded.split('/').skip(1).peekable();
    while let Some(s) = segments.next() {
        if s == "." || s == ".." {
            return Err(AmbiguousPath("a `.` or `..` segment"));
        }
        // `/a//b` is `/a/b` to some servers and not to others; a trailing `/` is fine
        if s.is_empty() && segments.peek().is_some() {
            return Err(AmbiguousPath("an empty segment"));
        }
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn table() -> RouteTable {
        let r = |prefix: &str, methods: Option<&[&str]>, auth| RouteSettings {
            prefix: prefix.to_owned(),
            methods: methods.map(|ms| ms.iter().map(|m| (*m).to_owned()).collect()),
            auth,
            scopes: vec![],
            roles: vec![],
        };
        RouteTable::new(&[
            r("/", None, RouteAuth::Session),
            r("/api", None, RouteAuth::Bearer),
            r("/api/callback", Some(&["POST"]), RouteAuth::Public),
            r("/static/", Some(&["GET", "HEAD"]), RouteAuth::Public),
        ])
    }

    fn auth(method: Method, path: &str) -> Option<RouteAuth> {
        table().find(&method, path).map(|r| r.auth)
    }

    #[test]
    fn the_longest_prefix_for_the_method_wins() {
        assert_eq!(auth(Method::GET, "/jobinfo"), Some(RouteAuth::Session));
        assert_eq!(auth(Method::GET, "/api/registry"), Some(RouteAuth::Bearer));
        assert_eq!(auth(Method::GET, "/api"), Some(RouteAuth::Bearer));
        assert_eq!(auth(Method::GET, "/apix"), Some(RouteAuth::Session));
        assert_eq!(auth(Method::POST, "/api/callback"), Some(RouteAuth::Public));
        assert_eq!(auth(Method::GET, "/api/callback"), Some(RouteAuth::Bearer));
        assert_eq!(auth(Method::GET, "/static/app.js"), Some(RouteAuth::Public));
        assert_eq!(
            auth(Method::POST, "/static/app.js"),
            Some(RouteAuth::Session)
        );
    }

    #[test]
    fn without_a_catch_all_unknown_paths_match_nothing() {
        let t = RouteTable::new(&[RouteSettings {
            prefix: "/jobinfo/".to_owned(),
            methods: None,
            auth: RouteAuth::Session,
            scopes: vec![],
            roles: vec![],
        }]);
        assert!(t.find(&Method::GET, "/jobinfo/list").is_some());
        assert!(t.find(&Method::GET, "/jobinfo").is_none());
        assert!(t.find(&Method::GET, "/other").is_none());
    }

    #[test]
    fn paths_a_node_could_read_differently_are_refused() {
        assert_eq!(decoded_path("/%61dmin/x").unwrap(), "/admin/x");
        assert_eq!(decoded_path("/jobs/").unwrap(), "/jobs/");
        assert_eq!(decoded_path("/").unwrap(), "/");
        // nothing encoded: the path itself, not a copy
        assert!(matches!(
            decoded_path("/api/registry").unwrap(),
            std::borrow::Cow::Borrowed("/api/registry")
        ));
        for bad in [
            "/a/./b",
            "/a/%2E%2E/b",
            "/a\\b",
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/..;/admin",
            "/public/%3b/x",
            "/a%2fb",
            "/a%5cb",
            "/a//b",
            "/./a",
            "/a/%00",
            "/%ff",
        ] {
            assert!(decoded_path(bad).is_err(), "{bad}");
        }
    }
}
