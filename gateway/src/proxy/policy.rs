//! Which `[[proxy.routes]]` entry a request falls under, and the path check that makes
//! that decision mean the same thing to the admin node.
//!
//! A route is chosen on the percent-decoded path, because that is what the node (a Java
//! servlet container, typically) routes on: `/%61dmin/` is `/admin/` there, so it must be
//! here. Paths a node could read as another path than we do — dot segments, encoded
//! slashes or backslashes, `;` path parameters (Tomcat drops `;…` per segment, so
//! `/public/..;/admin` is a classic bypass), empty segments — are refused outright.
//!
//! So are methods outside the standard set (GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS)
//! unless a route names them: a route limited to `POST` must not be sidestepped with
//! `post` (a different, extension method to HTTP, but `POST` to a framework that folds
//! case), `TRACE` or an invented method that a node's handler accepts all the same.

use std::sync::Arc;

use axum::http::Method;

use super::settings::{RouteAuth, RouteSettings};

/// One route, ready to match.
#[derive(Debug, Clone)]
pub struct Route {
    /// The configured prefix.
    pub prefix: String,
    /// Only the prefix itself matches, nothing under it.
    pub exact: bool,
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
        if self.exact {
            path == self.prefix
        } else if self.prefix.ends_with('/') {
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
                    exact: r.exact,
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
    /// longest prefix among the routes that apply to the method; on a tie, an exact route
    /// wins over a prefix, and a route that names the method over one for all methods.
    /// A method outside [`STANDARD_METHODS`] is refused unless some route names it.
    pub fn find(&self, method: &Method, path: &str) -> Result<Option<&Arc<Route>>, Unroutable> {
        if !STANDARD_METHODS.contains(method) && !self.names(method) {
            return Err(Unroutable::Method);
        }
        Ok(self
            .routes
            .iter()
            .filter(|r| r.matches_path(path) && r.matches_method(method))
            .max_by_key(|r| (r.prefix.len(), r.exact, r.methods.is_some())))
    }

    /// Whether some route names `method` in its `methods`.
    fn names(&self, method: &Method) -> bool {
        self.routes
            .iter()
            .any(|r| r.methods.as_ref().is_some_and(|ms| ms.contains(method)))
    }
}

/// The methods requests are forwarded with when no route names others. `TRACE` and
/// `CONNECT` are not among them: nothing in an admin console needs them.
pub const STANDARD_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
];

/// Why a request cannot be matched to a route at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unroutable {
    /// The path could mean another path to the node.
    #[error(transparent)]
    Path(#[from] AmbiguousPath),
    /// A method no route names and that is not a standard one.
    #[error("the method is not one that requests are forwarded with")]
    Method,
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
            exact: false,
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
        table().find(&method, path).unwrap().map(|r| r.auth)
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
            exact: false,
            methods: None,
            auth: RouteAuth::Session,
            scopes: vec![],
            roles: vec![],
        }]);
        assert!(t.find(&Method::GET, "/jobinfo/list").unwrap().is_some());
        assert!(t.find(&Method::GET, "/jobinfo").unwrap().is_none());
        assert!(t.find(&Method::GET, "/other").unwrap().is_none());
    }

    #[test]
    fn an_exact_route_matches_its_path_alone_and_wins_the_tie() {
        let route = |prefix: &str, exact, roles: &[&str]| RouteSettings {
            prefix: prefix.to_owned(),
            exact,
            methods: None,
            auth: RouteAuth::Session,
            scopes: vec![],
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        };
        let t = RouteTable::new(&[
            route("/admin/", false, &["operator"]),
            route("/admin/jobinfo", false, &["operator"]),
            route("/admin/jobinfo", true, &[]),
        ]);
        let roles = |path: &str| t.find(&Method::GET, path).unwrap().unwrap().roles.clone();
        assert!(roles("/admin/jobinfo").is_empty());
        assert_eq!(roles("/admin/jobinfo/add"), ["operator"]);
        assert_eq!(roles("/admin/jobinfo/"), ["operator"]);
        assert_eq!(roles("/admin/other"), ["operator"]);
    }

    #[test]
    fn methods_outside_the_standard_set_are_refused_unless_a_route_names_them() {
        let t = table();
        for m in ["post", "Get", "TRACE", "CONNECT", "PROPFIND", "X"] {
            let m = Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(
                t.find(&m, "/jobinfo/x").err(),
                Some(Unroutable::Method),
                "{m}"
            );
        }
        for m in STANDARD_METHODS {
            assert!(t.find(&m, "/jobinfo/x").unwrap().is_some(), "{m}");
        }
        let dav = RouteTable::new(&[RouteSettings {
            prefix: "/dav/".to_owned(),
            exact: false,
            methods: Some(vec!["PROPFIND".to_owned()]),
            auth: RouteAuth::Session,
            scopes: vec![],
            roles: vec![],
        }]);
        let propfind = Method::from_bytes(b"PROPFIND").unwrap();
        assert!(dav.find(&propfind, "/dav/x").unwrap().is_some());
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
