//! SSO for console users against the real Node oidc-provider: the whole browser flow,
//! role mapping, the console session and logout, and every way a callback must fail
//! without making a session.

use std::sync::Arc;
use std::time::Duration;

use harness::{OidcOptions, OidcProvider};
use keyrotation::{Clock, ManualClock};
use portcullis::config::Config;
use portcullis::sso::roles::{Role, RoleRule};
use portcullis::sso::settings::{ProviderSettings, SsoSettings};
use reqwest::cookie::{CookieStore, Jar};
use reqwest::{StatusCode, Url, header};
use secrecy::SecretString;

use super::support::*;

/// An instance with one provider (`test`) in front of a fresh oidc-provider.
pub struct SsoFixture {
    pub app: TestApp,
    pub idp: OidcProvider,
    pub clock: Arc<ManualClock>,
    pub jar: Arc<Jar>,
    pub browser: reqwest::Client,
}

pub fn role_rules() -> Vec<RoleRule> {
    let rule = |role, groups: &[&str], domains: &[&str]| RoleRule {
        role,
        provider: None,
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        email_domains: domains.iter().map(|d| (*d).to_owned()).collect(),
        subjects: vec![],
    };
    vec![
        rule(Role::Admin, &["scheduler-admins"], &[]),
        rule(Role::Operator, &["scheduler-operators"], &[]),
        rule(Role::Viewer, &[], &["example.com"]),
    ]
}

pub fn provider_settings(idp_issuer: &str, options: &OidcOptions) -> ProviderSettings {
    ProviderSettings {
        name: "test".to_owned(),
        issuer: idp_issuer.to_owned(),
        client_id: options.client_id.clone(),
        client_secret: Some(SecretString::from(options.client_secret.clone())),
        client_secret_file: None,
        scopes: ["openid", "email", "profile", "groups"]
            .map(str::to_owned)
            .to_vec(),
        redirect_uri: None,
        post_logout_redirect_uri: None,
        id_token_algorithms: vec!["RS256".to_owned(), "ES256".to_owned()],
        userinfo: false,
        groups_claim: "groups".to_owned(),
        ca_file: None,
        frontchannel_logout: false,
    }
}

impl SsoFixture {
    pub async fn start(customize: impl FnOnce(&mut Config)) -> Self {
        let port = harness::free_port();
        let public = format!("https://localhost:{port}");
        let options = OidcOptions {
            redirect_uris: vec![format!("{public}/auth/callback")],
            post_logout_redirect_uris: vec![format!("{public}/")],
            backchannel_logout_uri: Some(format!("{public}/auth/backchannel-logout")),
            ..OidcOptions::default()
        };
        let idp = {
            let options = options.clone();
            tokio::task::spawn_blocking(move || OidcProvider::start(options))
                .await
                .unwrap()
                .unwrap()
        };
        let clock = Arc::new(ManualClock::new(time::OffsetDateTime::now_utc()));
        let issuer = idp.issuer();
        let app = spawn_app_with_clock(clock.clone(), |c| {
            c.server.listen = ([127, 0, 0, 1], port).into();
            c.server.public_url = public.clone();
            c.sso = SsoSettings {
                providers: vec![provider_settings(&issuer, &options)],
                roles: role_rules(),
                ..SsoSettings::default()
            };
            customize(c);
        })
        .await;
        // the provider posts its logout tokens to this instance's certificate
        idp.trust_ca(&app.pki.ca_pem()).unwrap();
        let (jar, browser) = new_browser(&app);
        Self {
            app,
            idp,
            clock,
            jar,
            browser,
        }
    }

    /// Another browser, with cookie jars of its own at this site and at the provider.
    pub fn other_browser(&self) -> (Arc<Jar>, reqwest::Client) {
        new_browser(&self.app)
    }

    /// Drives the provider's login form from `/auth/login?<query>`; returns the callback
    /// URL the provider sent the browser to (not yet followed).
    pub async fn login_at_idp(&self, query: &str, user: &str, password: &str) -> Url {
        let start = self.app.url(&format!("/auth/login{query}"));
        self.idp
            .browser_login(&self.browser, &start, user, password)
            .await
            .unwrap()
    }

    /// The whole login; returns the callback's response.
    pub async fn login(&self, user: &str, password: &str) -> reqwest::Response {
        let callback = self.login_at_idp("?redirect=/jobs", user, password).await;
        self.browser.get(callback).send().await.unwrap()
    }

    /// Every cookie the jar holds for this site, `(name, value)`.
    pub fn cookies(&self) -> Vec<(String, String)> {
        let url: Url = self.app.url("/").parse().unwrap();
        let Some(header) = self.jar.cookies(&url) else {
            return Vec::new();
        };
        header
            .to_str()
            .unwrap()
            .split("; ")
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    pub fn cookie(&self, name: &str) -> Option<String> {
        self.cookies()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// The pending-login cookies in the jar, `(name, value)`.
    pub fn login_cookies(&self) -> Vec<(String, String)> {
        self.cookies()
            .into_iter()
            .filter(|(k, _)| k.starts_with(LOGIN_COOKIE))
            .collect()
    }

    /// The name of the one pending-login cookie the jar gained while `step` ran.
    pub async fn new_login_cookie<T>(
        &self,
        step: impl std::future::Future<Output = T>,
    ) -> (T, String) {
        let before = self.login_cookies();
        let out = step.await;
        let added: Vec<String> = self
            .login_cookies()
            .into_iter()
            .filter(|c| !before.contains(c))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(added.len(), 1, "one login cookie per login: {added:?}");
        (out, added[0].clone())
    }

    /// `GET /auth/login<query>`; returns the authorization URL it redirects to.
    pub async fn start_login(&self, query: &str) -> Url {
        let started = self
            .browser
            .get(self.app.url(&format!("/auth/login{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), StatusCode::FOUND);
        started.headers()[header::LOCATION]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Asserts that the browser's session lives on past its access token: the refresh
    /// family its refresh cookie names is alive in the store, and once the clock is past
    /// the access token (5 minutes and the 30 s leeway), `/auth/me` still answers 200,
    /// renewed from the refresh cookie. (`/auth/me` alone is answered from the access
    /// cookie, without the refresh store.) Advances the clock.
    pub async fn assert_session_lives(&self) {
        let token = SecretString::from(self.cookie(REFRESH_COOKIE).expect("a refresh cookie"));
        let alive = self
            .app
            .state
            .refresh
            .inspect(&token, self.clock.now())
            .await
            .unwrap();
        assert!(alive.is_some(), "the session's refresh family was ended");
        self.clock.advance(time::Duration::minutes(10));
        assert_eq!(
            self.me().await.status(),
            StatusCode::OK,
            "the session ends with its access token"
        );
    }

    /// Asserts that the refresh store holds no session of `subject`.
    pub async fn assert_no_session_of(&self, subject: &str) {
        let sessions = self
            .app
            .state
            .refresh
            .list_sessions(subject, self.clock.now())
            .await
            .unwrap();
        assert!(sessions.is_empty(), "sessions of {subject}: {sessions:?}");
    }

    pub async fn me(&self) -> reqwest::Response {
        self.browser
            .get(self.app.url("/auth/me"))
            .send()
            .await
            .unwrap()
    }

    /// `POST /auth/logout` from a page of this site.
    pub async fn logout(&self) -> reqwest::Response {
        self.browser
            .post(self.app.url("/auth/logout"))
            .header(header::ORIGIN, self.origin())
            .send()
            .await
            .unwrap()
    }

    pub fn origin(&self) -> String {
        format!("https://localhost:{}", self.app.https.port())
    }

    /// Another browser, or this one's request without its cookies (another site's form
    /// post under `SameSite=Lax`): no cookie store, redirects not followed.
    pub fn cookieless_browser(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.app.pki.ca_pem().as_bytes()).unwrap(),
            )
            .resolve("localhost", self.app.https)
            .no_proxy()
            .build()
            .unwrap()
    }
}

/// A browser for `app`: keeps cookies, follows no redirects, trusts `app`'s CA.
fn new_browser(app: &TestApp) -> (Arc<Jar>, reqwest::Client) {
    let jar = Arc::new(Jar::default());
    let browser = reqwest::Client::builder()
        .cookie_provider(jar.clone())
        .redirect(reqwest::redirect::Policy::none())
        .add_root_certificate(reqwest::Certificate::from_pem(app.pki.ca_pem().as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .resolve("localhost", app.https)
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    (jar, browser)
}

pub async fn error_code(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.unwrap();
    body["error"].as_str().unwrap_or_default().to_owned()
}

/// `/auth/login?redirect=<target>` is refused as a way off the site: 400
/// `invalid_redirect`, and no redirect at all.
async fn assert_login_refuses_redirect(f: &SsoFixture, target: &str) {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("redirect", target)
        .finish();
    let response = f
        .browser
        .get(f.app.url(&format!("/auth/login?{query}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{target}");
    assert!(
        response.headers().get(header::LOCATION).is_none(),
        "{target}"
    );
    assert_eq!(error_code(response).await, "invalid_redirect");
}

pub const REFRESH_COOKIE: &str = "__Host-portcullis-rt";
pub const ACCESS_COOKIE: &str = "__Host-portcullis-at";
pub const ID_TOKEN_COOKIE: &str = "__Host-portcullis-idt";
/// The start of every pending-login cookie's name.
const LOGIN_COOKIE: &str = "__Host-portcullis-login";

#[tokio::test]
async fn browser_login_shows_mapped_roles_and_logout_revokes_the_session() {
    let f = SsoFixture::start(|_| {}).await;
    let response = f.login("alice", "alice-correct-horse").await;
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(response.headers()[header::LOCATION], "/jobs");
    let set_cookies: Vec<&str> = response
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    for c in set_cookies.iter().filter(|c| !c.contains("Max-Age=0")) {
        assert!(c.contains("HttpOnly") && c.contains("Secure") && c.contains("SameSite=Lax"));
    }

    let me = f.me().await;
    assert_eq!(me.status(), StatusCode::OK);
    let me: serde_json::Value = me.json().await.unwrap();
    assert_eq!(me["user"], "alice");
    assert_eq!(me["email"], "alice@example.com");
    assert_eq!(me["subject"], "test:alice");
    assert_eq!(me["roles"], serde_json::json!(["admin", "viewer"]));

    let refresh = SecretString::from(f.cookie(REFRESH_COOKIE).unwrap());
    let now = f.clock.now();
    assert!(
        f.app
            .state
            .refresh
            .inspect(&refresh, now)
            .await
            .unwrap()
            .is_some()
    );

    let logout = f.logout().await;
    assert_eq!(logout.status(), StatusCode::SEE_OTHER);
    let location: Url = logout.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(location.as_str().starts_with(&f.idp.issuer()));
    let hint = location
        .query_pairs()
        .any(|(k, v)| k == "id_token_hint" && v.split('.').count() == 3);
    assert!(hint, "end_session carries id_token_hint: {location}");
    let back = f
        .idp
        .browser_logout(&f.browser, location.as_str())
        .await
        .unwrap();
    assert_eq!(back.as_str(), format!("{}/", f.origin()));

    assert!(
        f.app
            .state
            .refresh
            .inspect(&refresh, now)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(f.me().await.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn expired_access_cookie_is_renewed_from_the_refresh_cookie() {
    let f = SsoFixture::start(|_| {}).await;
    assert_eq!(
        f.login("bob", "bob-battery-staple").await.status(),
        StatusCode::FOUND
    );
    let first_refresh = f.cookie(REFRESH_COOKIE).unwrap();
    let first_access = f.cookie(ACCESS_COOKIE).unwrap();
    // past the 5-minute console access token and the 30 s leeway
    f.clock.advance(time::Duration::minutes(10));
    let me = f.me().await;
    assert_eq!(me.status(), StatusCode::OK);
    assert!(me.headers().get_all(header::SET_COOKIE).iter().count() >= 2);
    let body: serde_json::Value = me.json().await.unwrap();
    assert_eq!(body["roles"], serde_json::json!(["operator", "viewer"]));
    assert_ne!(f.cookie(REFRESH_COOKIE).unwrap(), first_refresh);
    assert_ne!(f.cookie(ACCESS_COOKIE).unwrap(), first_access);
}

#[tokio::test]
async fn user_without_a_role_is_refused_and_no_session_is_made() {
    let f = SsoFixture::start(|_| {}).await;
    let response = f.login("carol", "carol-tr0ub4dor").await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(response).await, "no_role");
    assert!(f.cookie(REFRESH_COOKIE).is_none());
    assert_eq!(f.me().await.status(), StatusCode::UNAUTHORIZED);
    let sessions = f
        .app
        .state
        .refresh
        .list_sessions("test:carol", f.clock.now())
        .await
        .unwrap();
    assert!(sessions.is_empty());
}

#[tokio::test]
async fn a_browser_without_a_role_gets_a_clear_403_page() {
    let f = SsoFixture::start(|_| {}).await;
    let callback = f.login_at_idp("", "carol", "carol-tr0ub4dor").await;
    let response = f
        .browser
        .get(callback)
        .header(header::ACCEPT, "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(
        response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = response.text().await.unwrap();
    assert!(page.contains("data-code=\"no_role\""), "{page}");
    assert!(page.contains("no role in the scheduler console"), "{page}");
    assert!(f.cookie(REFRESH_COOKIE).is_none());
}

fn with_param(url: &Url, name: &str, value: &str) -> Url {
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            if k == name {
                (k.into_owned(), value.to_owned())
            } else {
                (k.into_owned(), v.into_owned())
            }
        })
        .collect();
    let mut out = url.clone();
    out.query_pairs_mut().clear().extend_pairs(pairs);
    out
}

fn without_param(url: &Url, name: &str) -> Url {
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != name)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut out = url.clone();
    out.query_pairs_mut().clear().extend_pairs(pairs);
    out
}

fn param(url: &Url, name: &str) -> String {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap()
}

#[tokio::test]
async fn tampered_state_is_refused_and_no_session_is_made() {
    let f = SsoFixture::start(|_| {}).await;
    let callback = f.login_at_idp("", "alice", "alice-correct-horse").await;
    let mut state = param(&callback, "state");
    state.replace_range(0..2, if state.starts_with("AA") { "BB" } else { "AA" });
    let response = f
        .browser
        .get(with_param(&callback, "state", &state))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(response).await, "invalid_state");
    assert!(f.cookie(REFRESH_COOKIE).is_none());
    assert_eq!(f.me().await.status(), StatusCode::UNAUTHORIZED);
    f.assert_no_session_of("test:alice").await;
}

#[tokio::test]
async fn replayed_state_is_refused_and_no_session_is_made() {
    let f = SsoFixture::start(|_| {}).await;
    let callback = f.login_at_idp("", "alice", "alice-correct-horse").await;
    let (name, value) = f.login_cookies().pop().unwrap();
    let login_cookie = format!("{name}={value}");
    // an eavesdropper replays the same callback, login cookie and all, in a browser of
    // its own after the user has finished
    assert_eq!(
        f.browser
            .get(callback.clone())
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::FOUND
    );
    let other = f.cookieless_browser();
    let replay = other
        .get(callback)
        .header(header::COOKIE, login_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::BAD_REQUEST);
    assert!(
        replay
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .all(|c| { !c.to_str().unwrap().starts_with(REFRESH_COOKIE) })
    );
    assert_eq!(error_code(replay).await, "invalid_state");
    // the user's own login made the one session there is; the replay made none
    let sessions = f
        .app
        .state
        .refresh
        .list_sessions("test:alice", f.clock.now())
        .await
        .unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
}

#[tokio::test]
async fn logins_started_in_two_tabs_at_once_both_finish() {
    let f = SsoFixture::start(|_| {}).await;
    // both tabs go to the provider before either comes back
    let (tab_a, cookie_a) = f
        .new_login_cookie(f.login_at_idp("?redirect=/jobs", "alice", "alice-correct-horse"))
        .await;
    let (tab_b, cookie_b) = f
        .new_login_cookie(f.login_at_idp("?redirect=/logs", "alice", "alice-correct-horse"))
        .await;

    let a = f.browser.get(tab_a).send().await.unwrap();
    assert_eq!(a.status(), StatusCode::FOUND);
    assert_eq!(a.headers()[header::LOCATION], "/jobs");
    // each callback clears its own login's cookie, and only that
    let cleared = cleared_cookies(&a);
    assert!(cleared.contains(&cookie_a), "{cleared:?}");
    assert!(!cleared.contains(&cookie_b), "{cleared:?}");

    let b = f.browser.get(tab_b).send().await.unwrap();
    assert_eq!(b.status(), StatusCode::FOUND);
    assert_eq!(b.headers()[header::LOCATION], "/logs");
    assert!(cleared_cookies(&b).contains(&cookie_b));
    assert!(f.login_cookies().is_empty());
    assert_eq!(f.me().await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_login_given_up_in_one_tab_does_not_spoil_another() {
    let f = SsoFixture::start(|_| {}).await;
    let (authorize_a, cookie_a) = f.new_login_cookie(f.start_login("?redirect=/jobs")).await;
    let (tab_b, cookie_b) = f
        .new_login_cookie(f.login_at_idp("?redirect=/logs", "bob", "bob-battery-staple"))
        .await;
    // tab A's user presses "Deny" at the provider
    let mut denied: Url = f.app.url("/auth/callback").parse().unwrap();
    denied
        .query_pairs_mut()
        .append_pair("error", "access_denied")
        .append_pair("state", &param(&authorize_a, "state"))
        .append_pair("iss", &f.idp.issuer());
    let a = f.browser.get(denied).send().await.unwrap();
    assert_eq!(a.status(), StatusCode::FORBIDDEN);
    let cleared = cleared_cookies(&a);
    assert_eq!(cleared, vec![cookie_a]);
    assert_eq!(error_code(a).await, "login_failed");

    let b = f.browser.get(tab_b).send().await.unwrap();
    assert_eq!(b.status(), StatusCode::FOUND);
    assert_eq!(b.headers()[header::LOCATION], "/logs");
    assert!(cleared_cookies(&b).contains(&cookie_b));
    let me: serde_json::Value = f.me().await.json().await.unwrap();
    assert_eq!(me["subject"], "test:bob");
}

#[tokio::test]
async fn a_stale_callback_in_a_logged_in_browser_goes_on_to_the_console() {
    let f = SsoFixture::start(|_| {}).await;
    let callback = f
        .login_at_idp("?redirect=/jobs", "alice", "alice-correct-horse")
        .await;
    let first = f.browser.get(callback.clone()).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::FOUND);
    let refresh = f.cookie(REFRESH_COOKIE).unwrap();

    // the user reloads the callback page, or comes back to it with the back button
    for _ in 0..2 {
        let again = f.browser.get(callback.clone()).send().await.unwrap();
        assert_eq!(again.status(), StatusCode::FOUND);
        assert_eq!(again.headers()[header::LOCATION], "/");
        // no new session: the browser keeps the one it has
        assert!(again.headers().get_all(header::SET_COOKIE).iter().all(|c| {
            !c.to_str().unwrap().starts_with(REFRESH_COOKIE)
                && !c.to_str().unwrap().starts_with(ACCESS_COOKIE)
        }));
        assert_eq!(f.cookie(REFRESH_COOKIE).unwrap(), refresh);
        // the second time with an expired access cookie: the refresh cookie counts
        f.clock.advance(time::Duration::minutes(10));
    }
    assert_eq!(f.me().await.status(), StatusCode::OK);
    // once logged out, the same stale callback is an error again
    f.logout().await;
    let after = f.browser.get(callback).send().await.unwrap();
    assert_eq!(after.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(after).await, "invalid_state");
}

#[tokio::test]
async fn a_browser_holds_a_bounded_number_of_pending_logins() {
    let f = SsoFixture::start(|_| {}).await;
    // a browser that sends its cookies oldest first, as RFC 6265 §5.4 has browsers do
    // (the test's cookie jar sends them in no set order), and its own cookies at the
    // provider
    let mut browser = OrderedCookies::new(f.cookieless_browser());
    let at_idp = harness::browser_client().unwrap();
    let login = f.app.url("/auth/login");
    // the oldest login gets as far as its callback, then nine more are started
    let first = browser.start_login(&login).await;
    let oldest = f
        .idp
        .browser_login(&at_idp, first.as_str(), "alice", "alice-correct-horse")
        .await
        .unwrap();
    let mut newest = first;
    for _ in 0..9 {
        newest = browser.start_login(&login).await;
    }
    let held: Vec<&(String, String)> = browser
        .cookies
        .iter()
        .filter(|(k, _)| k.starts_with(LOGIN_COOKIE))
        .collect();
    assert_eq!(held.len(), 8, "{held:?}");
    let last_state = param(&newest, "state");
    assert!(held.iter().any(|(_, v)| *v == last_state));
    // the oldest's cookie made room: its callback is refused
    let refused = browser.get(oldest.as_str()).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(refused).await, "invalid_state");
    // the newest still finishes
    let callback = f
        .idp
        .browser_login(&at_idp, newest.as_str(), "alice", "alice-correct-horse")
        .await
        .unwrap();
    assert_eq!(param(&callback, "state"), last_state);
    let done = browser.get(callback.as_str()).await;
    assert_eq!(done.status(), StatusCode::FOUND);
    assert!(browser.cookies.iter().any(|(k, _)| k == REFRESH_COOKIE));
}

/// A browser's cookies at one site, kept in the order they were made and sent in that
/// order; a cookie set again keeps its place, one set with `Max-Age=0` goes.
struct OrderedCookies {
    client: reqwest::Client,
    cookies: Vec<(String, String)>,
}

impl OrderedCookies {
    fn new(client: reqwest::Client) -> Self {
        Self {
            client,
            cookies: Vec::new(),
        }
    }

    /// `GET /auth/login` at `url`: the authorization URL it redirects to.
    async fn start_login(&mut self, url: &str) -> Url {
        let r = self.get(url).await;
        assert_eq!(r.status(), StatusCode::FOUND);
        Url::parse(r.headers()[header::LOCATION].to_str().unwrap()).unwrap()
    }

    async fn get(&mut self, url: &str) -> reqwest::Response {
        let mut request = self.client.get(url);
        if !self.cookies.is_empty() {
            let header: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            request = request.header(header::COOKIE, header.join("; "));
        }
        let response = request.send().await.unwrap();
        for set in response.headers().get_all(header::SET_COOKIE) {
            let set = set.to_str().unwrap();
            let (name, value) = set.split(';').next().unwrap().split_once('=').unwrap();
            let gone = set.contains("Max-Age=0") || value.is_empty();
            match self.cookies.iter().position(|(k, _)| k == name) {
                Some(i) if gone => {
                    self.cookies.remove(i);
                }
                Some(i) => self.cookies[i].1 = value.to_owned(),
                None if gone => {}
                None => self.cookies.push((name.to_owned(), value.to_owned())),
            }
        }
        response
    }
}

#[tokio::test]
async fn replayed_code_is_refused_and_no_session_is_made() {
    let f = SsoFixture::start(|_| {}).await;
    let first = f.login_at_idp("", "bob", "bob-battery-staple").await;
    assert_eq!(
        f.browser.get(first.clone()).send().await.unwrap().status(),
        StatusCode::FOUND
    );
    // log out locally, then start a fresh login and feed it the old code
    f.logout().await;
    let started = f
        .browser
        .get(f.app.url("/auth/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::FOUND);
    let authorize: Url = started.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let replay = with_param(&first, "state", &param(&authorize, "state"));
    let response = f.browser.get(replay).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(response).await, "login_failed");
    assert!(f.cookie(REFRESH_COOKIE).is_none());
    f.assert_no_session_of("test:bob").await;
}

/// Starts a login, rewrites one parameter of the authorization request the browser is
/// sent to, and drives the provider's login with it.
async fn login_with_rewritten_request(f: &SsoFixture, name: &str, value: &str) -> Url {
    let started = f
        .browser
        .get(f.app.url("/auth/login"))
        .send()
        .await
        .unwrap();
    let authorize: Url = started.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let rewritten = with_param(&authorize, name, value);
    f.idp
        .browser_login(
            &f.browser,
            rewritten.as_str(),
            "alice",
            "alice-correct-horse",
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn id_token_with_another_nonce_is_refused_and_no_session_is_made() {
    let f = SsoFixture::start(|_| {}).await;
    let callback = login_with_rewritten_request(&f, "nonce", "attacker-chosen-nonce").await;
    let response = f.browser.get(callback).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_id_token");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("nonce")
    );
    assert!(f.cookie(REFRESH_COOKIE).is_none());
    f.assert_no_session_of("test:alice").await;
}

#[tokio::test]
async fn code_issued_to_another_client_is_refused_and_no_session_is_made() {
    let f = SsoFixture::start(|_| {}).await;
    // the provider's second client shares our secret and redirect URI
    let callback = login_with_rewritten_request(&f, "client_id", "portcullis-es256").await;
    let response = f.browser.get(callback).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(response).await, "login_failed");
    assert!(f.cookie(REFRESH_COOKIE).is_none());
    f.assert_no_session_of("test:alice").await;
}

#[tokio::test]
async fn expired_id_token_is_refused_and_no_session_is_made() {
    let f = SsoFixture::start(|_| {}).await;
    let callback = f.login_at_idp("", "alice", "alice-correct-horse").await;
    // the provider's ID tokens live an hour; our clock is two ahead (beyond leeway)
    f.clock.advance(time::Duration::hours(2));
    let response = f.browser.get(callback).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_id_token");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    assert!(f.cookie(REFRESH_COOKIE).is_none());
    f.assert_no_session_of("test:alice").await;
}

#[tokio::test]
async fn unreachable_provider_is_refused_with_503_and_no_login_starts() {
    let f = SsoFixture::start(|_| {}).await;
    f.idp.stop();
    let response = f
        .browser
        .get(f.app.url("/auth/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().get(header::SET_COOKIE).is_none());
    assert_eq!(error_code(response).await, "temporarily_unavailable");
}

#[tokio::test]
async fn provider_lost_between_login_and_callback_makes_no_session() {
    let f = SsoFixture::start(|_| {}).await;
    let callback = f.login_at_idp("", "alice", "alice-correct-horse").await;
    f.idp.stop();
    let response = f.browser.get(callback).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(f.cookie(REFRESH_COOKIE).is_none());
    f.assert_no_session_of("test:alice").await;
}

#[tokio::test]
async fn open_redirects_are_refused() {
    let f = SsoFixture::start(|_| {}).await;
    for evil in [
        "//evil.example",
        "https://evil.example",
        "/\\evil.example",
        "%2F%2Fevil.example",
        "/%2F/evil.example",
        "%5C%5Cevil.example",
    ] {
        assert_login_refuses_redirect(&f, evil).await;
    }
}

#[tokio::test]
async fn a_callback_without_the_advertised_iss_or_with_another_is_refused() {
    let f = SsoFixture::start(|_| {}).await;
    let discovery: serde_json::Value = reqwest::get(f.idp.discovery_url())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        discovery["authorization_response_iss_parameter_supported"],
        true
    );
    let issuer = f.idp.issuer();
    let rewrites: [(&str, Option<String>); 4] = [
        ("left out", None),
        ("another provider", Some("http://127.0.0.1:1".to_owned())),
        ("a trailing slash", Some(format!("{issuer}/"))),
        ("empty", Some(String::new())),
    ];
    for (what, iss) in rewrites {
        let (callback, cookie) = f
            .new_login_cookie(f.login_at_idp("", "alice", "alice-correct-horse"))
            .await;
        assert_eq!(param(&callback, "iss"), issuer);
        let forged = match &iss {
            None => without_param(&callback, "iss"),
            Some(other) => with_param(&callback, "iss", other),
        };
        let response = f.browser.get(forged).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "iss {what}");
        assert!(cleared_cookies(&response).contains(&cookie), "iss {what}");
        assert_eq!(error_code(response).await, "login_failed", "iss {what}");
        assert!(f.cookie(REFRESH_COOKIE).is_none(), "iss {what}");
        // the refused callback spent its state: the genuine one cannot follow
        let genuine = f.browser.get(callback).send().await.unwrap();
        assert_eq!(genuine.status(), StatusCode::BAD_REQUEST, "iss {what}");
    }
    assert_eq!(f.me().await.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_provider_error_is_answered_without_echoing_it() {
    let f = SsoFixture::start(|_| {}).await;
    let injected = "access_denied<script>alert(1)</script>\nforged";
    let state = param(&f.start_login("").await, "state");
    let mut callback: Url = f.app.url("/auth/callback").parse().unwrap();
    callback
        .query_pairs_mut()
        .append_pair("error", injected)
        .append_pair("error_description", "<img src=x onerror=alert(2)>")
        .append_pair("state", &state)
        .append_pair("iss", &f.idp.issuer());
    let response = f
        .browser
        .get(callback)
        .header(header::ACCEPT, "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let page = response.text().await.unwrap();
    assert!(page.contains("data-code=\"login_failed\""), "{page}");
    for echoed in ["<script>", "alert(", "onerror", "forged"] {
        assert!(!page.contains(echoed), "{echoed} in {page}");
    }
    assert!(f.cookie(REFRESH_COOKIE).is_none());
}

#[tokio::test]
async fn a_return_url_with_any_encoded_byte_in_its_query_is_kept() {
    let f = SsoFixture::start(|_| {}).await;
    // a log search for a Windows path, a multi-line pattern and a Latin-1 byte
    let target = "/logs?path=C%3A%5Cjobs%5Cout.log&pattern=a%0Ab&q=%FF";
    let response = log_in_returning_to(&f, target).await;
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(response.headers()[header::LOCATION], target);
    // the same bytes in the path still count as a way off the site
    for evil in ["/%5Cevil.example?q=%5C", "/%0A/evil.example?q=1"] {
        assert_login_refuses_redirect(&f, evil).await;
    }
}

/// alice logs in with `redirect` as the return URL: the callback's answer.
async fn log_in_returning_to(f: &SsoFixture, redirect: &str) -> reqwest::Response {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("redirect", redirect)
        .finish();
    let callback = f
        .login_at_idp(&format!("?{query}"), "alice", "alice-correct-horse")
        .await;
    f.browser.get(callback).send().await.unwrap()
}

/// A return URL with letters beyond ASCII (a search typed into the console) comes back
/// percent-encoded, and the login completes: a `Location` header carries ASCII only.
#[tokio::test]
async fn a_return_url_with_letters_beyond_ascii_comes_back_encoded() {
    let f = SsoFixture::start(|_| {}).await;
    let response = log_in_returning_to(&f, "/jobs/\u{e9}t\u{e9}?q=caf\u{e9}").await;
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(
        response.headers()[header::LOCATION],
        "/jobs/%C3%A9t%C3%A9?q=caf%C3%A9"
    );
    assert_eq!(f.me().await.status(), StatusCode::OK);
}

#[tokio::test]
async fn logout_ends_the_provider_session_when_the_id_token_is_too_large_for_a_cookie() {
    let f = SsoFixture::start(|_| {}).await;
    // dave is in a hundred groups: his ID token is larger than a browser keeps in a cookie
    let response = f.login("dave", "dave-many-groups-4k").await;
    assert_eq!(response.status(), StatusCode::FOUND);
    for c in response.headers().get_all(header::SET_COOKIE) {
        assert!(
            c.len() <= 4096,
            "a {}-byte cookie would be dropped",
            c.len()
        );
    }
    assert!(f.cookie(ID_TOKEN_COOKIE).is_none());
    assert_eq!(f.me().await.status(), StatusCode::OK);

    let logout = f.logout().await;
    assert_eq!(logout.status(), StatusCode::SEE_OTHER);
    let location: Url = logout.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(location.as_str().starts_with(&f.idp.issuer()), "{location}");
    assert_eq!(param(&location, "client_id"), f.idp.options().client_id);
    assert_eq!(
        param(&location, "post_logout_redirect_uri"),
        format!("{}/", f.origin())
    );
    assert!(!location.query_pairs().any(|(k, _)| k == "id_token_hint"));
    let back = f
        .idp
        .browser_logout(&f.browser, location.as_str())
        .await
        .unwrap();
    assert_eq!(back.as_str(), format!("{}/", f.origin()));
    // the provider's session is over: the next login asks for the password again
    let again = f
        .idp
        .browser_login(
            &f.browser,
            &f.app.url("/auth/login"),
            "dave",
            "not-his-password",
        )
        .await;
    assert!(
        matches!(again, Err(harness::HarnessError::LoginRejected(_))),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_repeated_state_or_redirect_is_refused() {
    let f = SsoFixture::start(|_| {}).await;
    let login = f
        .browser
        .get(f.app.url("/auth/login?redirect=/a&redirect=//evil.example"))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(login).await, "invalid_request");
    let callback = f.login_at_idp("", "alice", "alice-correct-horse").await;
    let doubled = format!("{callback}&state=other");
    let response = f.browser.get(doubled).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(f.cookie(REFRESH_COOKIE).is_none());
}

#[tokio::test]
async fn logout_page_offers_a_form_and_never_ends_the_session_by_itself() {
    let f = SsoFixture::start(|_| {}).await;
    let anonymous = f
        .browser
        .get(f.app.url("/auth/logout"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        f.login("bob", "bob-battery-staple").await.status(),
        StatusCode::FOUND
    );
    let page = f
        .browser
        .get(f.app.url("/auth/logout"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    // a one-button page: never shown inside another site's frame, where a click could be
    // taken from the user
    assert_eq!(page.headers()[header::X_FRAME_OPTIONS], "DENY");
    assert_eq!(
        page.headers()[header::CONTENT_SECURITY_POLICY],
        "frame-ancestors 'none'"
    );
    assert!(
        page.text()
            .await
            .unwrap()
            .contains("method=\"post\" action=\"/auth/logout\"")
    );
    assert_eq!(f.me().await.status(), StatusCode::OK);
    f.assert_session_lives().await;
}

#[tokio::test]
async fn cross_site_logout_is_refused() {
    let f = SsoFixture::start(|_| {}).await;
    assert_eq!(
        f.login("alice", "alice-correct-horse").await.status(),
        StatusCode::FOUND
    );
    for origin in [Some("https://evil.example"), None] {
        let mut request = f.browser.post(f.app.url("/auth/logout"));
        if let Some(o) = origin {
            request = request.header(header::ORIGIN, o);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(error_code(response).await, "csrf_rejected");
    }
    // A real browser sends no `SameSite=Lax` cookie with another site's form post, but
    // would apply the clearing `Set-Cookie`s of its answer: refused all the same, and
    // nothing is cleared
    let cookieless = f.cookieless_browser();
    let response = cookieless
        .post(f.app.url("/auth/logout"))
        .header(header::ORIGIN, "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(
        response.headers().get(header::SET_COOKIE).is_none(),
        "{:?}",
        response.headers()
    );
    assert_eq!(error_code(response).await, "csrf_rejected");
    assert_eq!(f.me().await.status(), StatusCode::OK);
    f.assert_session_lives().await;
}

/// A real ID token from the provider, issued to `portcullis-es256` with `nonce`.
async fn real_id_token(idp: &OidcProvider, nonce: &str) -> String {
    let (verifier, challenge) = harness::pkce_s256();
    let client_id = format!("{}-es256", idp.options().client_id);
    let redirect = idp.options().redirect_uris[0].clone();
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("client_id", &client_id)
        .append_pair("response_type", "code")
        .append_pair("scope", "openid email groups")
        .append_pair("redirect_uri", &redirect)
        .append_pair("state", "s-0123456789")
        .append_pair("nonce", nonce)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256")
        .finish();
    let browser = harness::browser_client().unwrap();
    let callback = idp
        .browser_login(
            &browser,
            &format!("{}/auth?{query}", idp.issuer()),
            "alice",
            "alice-correct-horse",
        )
        .await
        .unwrap();
    let token: serde_json::Value = browser
        .post(format!("{}/token", idp.issuer()))
        .basic_auth(&client_id, Some(&idp.options().client_secret))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", param(&callback, "code").as_str()),
            ("redirect_uri", redirect.as_str()),
            ("code_verifier", verifier.as_str()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    token["id_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_verifier_refuses_real_id_tokens_for_another_client_issuer_time_or_nonce() {
    use jsonwebtoken::Algorithm;
    use portcullis::sso::id_token::{Expected, IdTokenError, Trusted, verify};

    let idp = tokio::task::spawn_blocking(|| OidcProvider::start(OidcOptions::default()))
        .await
        .unwrap()
        .unwrap();
    let id_token = real_id_token(&idp, "n-expected-0123").await;
    let jwks: jsonwebtoken::jwk::JwkSet = reqwest::get(format!("{}/jwks", idp.issuer()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let issuer = idp.issuer();
    let good = Expected {
        trusted: Trusted {
            issuer: &issuer,
            client_id: "portcullis-es256",
            algorithms: &[Algorithm::ES256, Algorithm::RS256],
            leeway: Duration::from_secs(60),
            now: time::OffsetDateTime::now_utc(),
        },
        nonce: "n-expected-0123",
    };
    let with = |trusted| Expected {
        trusted,
        ..good.clone()
    };
    let claims = verify(&id_token, &jwks, &good).unwrap();
    assert_eq!(claims.sub, "alice");

    let refused = |expected: Expected<'_>| verify(&id_token, &jwks, &expected).unwrap_err();
    assert_eq!(
        refused(with(Trusted {
            client_id: "portcullis",
            ..good.trusted.clone()
        })),
        IdTokenError::Audience
    );
    assert_eq!(
        refused(with(Trusted {
            issuer: "http://127.0.0.1:1",
            ..good.trusted.clone()
        })),
        IdTokenError::Issuer
    );
    assert_eq!(
        refused(with(Trusted {
            now: good.trusted.now + time::Duration::hours(2),
            ..good.trusted.clone()
        })),
        IdTokenError::Expired
    );
    assert_eq!(
        refused(with(Trusted {
            now: good.trusted.now - time::Duration::hours(1),
            ..good.trusted.clone()
        })),
        IdTokenError::NotYetValid
    );
    assert_eq!(
        refused(Expected {
            nonce: "n-other-0123456",
            ..good.clone()
        }),
        IdTokenError::Nonce
    );
    assert_eq!(
        refused(with(Trusted {
            algorithms: &[Algorithm::RS256],
            ..good.trusted.clone()
        })),
        IdTokenError::Algorithm(Algorithm::ES256)
    );
    let empty = jsonwebtoken::jwk::JwkSet { keys: vec![] };
    assert!(matches!(
        verify(&id_token, &empty, &good),
        Err(IdTokenError::UnknownKey(_))
    ));
    // a payload changed after signing
    let mut parts: Vec<String> = id_token.split('.').map(str::to_owned).collect();
    let mut payload = parts[1].clone().into_bytes();
    payload[10] = if payload[10] == b'A' { b'B' } else { b'A' };
    parts[1] = String::from_utf8(payload).unwrap();
    assert!(matches!(
        verify(&parts.join("."), &jwks, &good),
        Err(IdTokenError::Signature | IdTokenError::Malformed)
    ));
}

#[tokio::test]
async fn a_login_started_on_one_instance_finishes_on_another_sharing_redis() {
    let redis_url = harness::Redis::shared().url();
    let prefix = format!("test-{}:", uuid::Uuid::new_v4());
    let shared = {
        let prefix = prefix.clone();
        let redis_url = redis_url.clone();
        move |c: &mut Config| {
            c.redis = Some(toml::from_str(&format!("url = \"{redis_url}\"\n")).unwrap());
            c.sso.key_prefix = format!("{prefix}sso:");
            c.refresh.key_prefix = format!("{prefix}rt:");
        }
    };
    let f = SsoFixture::start(shared.clone()).await;
    // the second instance sits behind the same public URL, with the same provider
    let public = f.origin();
    let sso = f.app.state.config.sso.clone();
    let other = spawn_app(move |c| {
        c.server.public_url = public;
        c.sso = sso;
        shared(c);
    })
    .await;

    let callback = f.login_at_idp("", "alice", "alice-correct-horse").await;
    let (name, value) = f.login_cookies().pop().unwrap();
    let login_cookie = format!("{name}={value}");
    // the balancer sends the callback to the other instance; the browser's cookies go along
    let to_other = reqwest::Client::builder()
        .cookie_provider(f.jar.clone())
        .redirect(reqwest::redirect::Policy::none())
        .add_root_certificate(
            reqwest::Certificate::from_pem(other.pki.ca_pem().as_bytes()).unwrap(),
        )
        .tls_built_in_root_certs(false)
        .resolve("localhost", other.https)
        .no_proxy()
        .build()
        .unwrap();
    let mut url = callback.clone();
    url.set_port(Some(other.https.port())).unwrap();
    let response = to_other.get(url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let me: serde_json::Value = to_other
        .get(other.url("/auth/me"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["roles"], serde_json::json!(["admin", "viewer"]));
    // and the state is spent for the first instance too, login cookie and all
    let replay = f
        .app
        .https_client()
        .get(callback.as_str())
        .header(header::COOKIE, login_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(replay).await, "invalid_state");
}

/// Collects every log line of the test's thread.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs [`logs_capture`] alone in a process of its own: tracing's interest cache and max
/// level are process-global, and with the other tests of this binary starting and
/// finishing on other threads a capture was seen (in CI) to miss events.
#[test]
fn no_code_state_token_cookie_or_secret_reaches_the_logs() {
    harness::run_alone("sso::logs_capture");
}

#[tokio::test]
#[ignore = "run in a process of its own by no_code_state_token_cookie_or_secret_reaches_the_logs"]
async fn logs_capture() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_writer(move || writer.clone())
        .finish();
    // alone in its process: the process-wide default catches every thread's events
    tracing::subscriber::set_global_default(subscriber)
        .expect("the only subscriber of this process");

    let f = SsoFixture::start(|_| {}).await;
    let callback = f
        .login_at_idp("?redirect=/jobs", "alice", "alice-correct-horse")
        .await;
    let code = param(&callback, "code");
    let state = param(&callback, "state");
    assert_eq!(
        f.browser
            .get(callback.clone())
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::FOUND
    );
    // a refused replay logs its reason, not its parameters
    f.browser.get(callback).send().await.unwrap();
    // a provider error (or a forged one) logs a code of RFC 6749's charset, nothing else
    let denied_state = param(&f.start_login("").await, "state");
    let mut denied: Url = f.app.url("/auth/callback").parse().unwrap();
    denied
        .query_pairs_mut()
        .append_pair("error", "access_denied\nINFO forged-log-line admin=true")
        .append_pair("error_description", "forged-description")
        .append_pair("state", &denied_state)
        .append_pair("iss", &f.idp.issuer());
    assert_eq!(
        f.browser.get(denied).send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    f.clock.advance(time::Duration::minutes(10));
    assert_eq!(f.me().await.status(), StatusCode::OK);
    let secrets = [
        code,
        state,
        f.cookie(REFRESH_COOKIE).unwrap(),
        f.cookie(ACCESS_COOKIE).unwrap(),
        f.cookie("__Host-portcullis-idt").unwrap(),
        f.idp.options().client_secret.clone(),
        "alice-correct-horse".to_owned(),
    ];
    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(logs.contains("SSO login refused"), "nothing was captured");
    assert!(
        logs.contains("refused the login: (malformed)"),
        "the malformed error code is logged as a marker"
    );
    for forged in ["forged-log-line", "forged-description"] {
        assert!(!logs.contains(forged), "provider text reached the logs");
    }
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "a secret reached the logs");
    }
}

#[tokio::test]
async fn with_userinfo_configured_the_login_still_maps_the_providers_claims() {
    let f = SsoFixture::start(|c| {
        c.sso.providers[0].userinfo = true;
        // the groups come from userinfo only when the ID token lacks them; the test
        // provider puts them in both, so this checks the call and the sub match
    })
    .await;
    assert_eq!(
        f.login("bob", "bob-battery-staple").await.status(),
        StatusCode::FOUND
    );
    let me: serde_json::Value = f.me().await.json().await.unwrap();
    assert_eq!(me["email"], "bob@example.com");
    assert_eq!(me["roles"], serde_json::json!(["operator", "viewer"]));
}

#[tokio::test]
async fn with_several_providers_the_login_names_one_and_es256_id_tokens_verify() {
    let f = SsoFixture::start(|c| {
        let mut es = c.sso.providers[0].clone();
        es.name = "test-es".to_owned();
        es.client_id = format!("{}-es256", es.client_id);
        es.id_token_algorithms = vec!["ES256".to_owned()];
        c.sso.providers.push(es);
    })
    .await;
    let ambiguous = f
        .browser
        .get(f.app.url("/auth/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(ambiguous.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(ambiguous).await, "unknown_provider");
    let unknown = f
        .browser
        .get(f.app.url("/auth/login?provider=nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(unknown).await, "unknown_provider");

    let callback = f
        .login_at_idp("?provider=test-es", "alice", "alice-correct-horse")
        .await;
    assert_eq!(
        f.browser.get(callback).send().await.unwrap().status(),
        StatusCode::FOUND
    );
    let me: serde_json::Value = f.me().await.json().await.unwrap();
    assert_eq!(me["provider"], "test-es");
    assert_eq!(me["subject"], "test-es:alice");
    assert_eq!(me["roles"], serde_json::json!(["admin", "viewer"]));
}

#[tokio::test]
async fn an_id_token_signed_with_an_algorithm_not_pinned_is_refused() {
    // the provider signs this client's ID tokens RS256; we accept only ES256
    let f = SsoFixture::start(|c| {
        c.sso.providers[0].id_token_algorithms = vec!["ES256".to_owned()];
    })
    .await;
    let response = f.login("alice", "alice-correct-horse").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_id_token");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("RS256")
    );
    assert!(f.cookie(REFRESH_COOKIE).is_none());
    f.assert_no_session_of("test:alice").await;
}

impl SsoFixture {
    /// Logs `user` in from another browser (its own cookies here and at the provider, so
    /// another provider session) through `/auth/login<query>`; returns that browser and
    /// its refresh token.
    pub async fn login_elsewhere(
        &self,
        query: &str,
        user: &str,
        password: &str,
    ) -> (reqwest::Client, SecretString) {
        let (jar, browser) = self.other_browser();
        let callback = self
            .idp
            .browser_login(
                &browser,
                &self.app.url(&format!("/auth/login{query}")),
                user,
                password,
            )
            .await
            .unwrap();
        assert_eq!(
            browser.get(callback).send().await.unwrap().status(),
            StatusCode::FOUND
        );
        let refresh = SecretString::from(jar_cookie(&jar, &self.app, REFRESH_COOKIE).unwrap());
        (browser, refresh)
    }

    /// A logout token the provider signed (`typ: logout+jwt`) for our client, about
    /// `subject` claims (`sub` and/or `sid`), issued now, with a fresh `jti`.
    pub async fn logout_token(&self, subject: serde_json::Value) -> String {
        let iat = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut claims = serde_json::json!({
            "iss": self.idp.issuer(),
            "aud": self.idp.options().client_id,
            "iat": iat,
            "exp": iat + 120,
            "jti": uuid::Uuid::new_v4().to_string(),
            "events": { BACKCHANNEL_LOGOUT_EVENT: {} },
        });
        for (k, v) in subject.as_object().unwrap() {
            claims[k] = v.clone();
        }
        self.idp
            .sign(serde_json::json!({ "typ": "logout+jwt" }), claims)
            .await
            .unwrap()
    }

    /// The target and detail of the newest `logout.backchannel` record, once the
    /// provider `test`'s has been stored.
    pub async fn last_backchannel_logout(&self) -> (String, serde_json::Value) {
        wait_for_audit_actor(
            &self.app.state,
            Duration::from_secs(10),
            "logout.backchannel",
            "provider:test",
        )
        .await;
        let (_, target, detail) =
            portcullis::audit::recent(&self.app.state.db, "logout.backchannel", 1)
                .await
                .unwrap()
                .remove(0);
        (target, serde_json::from_str(&detail).unwrap())
    }

    /// Posts `token` to `/auth/backchannel-logout`, as the provider does.
    pub async fn post_logout_token(&self, token: &str) -> reqwest::Response {
        self.app
            .https_client()
            .post(self.app.url("/auth/backchannel-logout"))
            .form(&[("logout_token", token)])
            .send()
            .await
            .unwrap()
    }
}

/// The value of cookie `name` in `jar` for `app`'s site.
pub fn jar_cookie(jar: &Jar, app: &TestApp, name: &str) -> Option<String> {
    let url: Url = app.url("/").parse().unwrap();
    let header = jar.cookies(&url)?;
    header
        .to_str()
        .unwrap()
        .split("; ")
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// Back-Channel Logout 1.0 with the real provider: the user signs out at the provider,
/// not through Portcullis (as from another application). The provider posts a logout
/// token naming its session, and the console session that session logged in ends; the
/// same user's console session from another browser (another provider session, another
/// `sid`) stays. Run alone in a process of its own (the logout counter it reads is
/// process-wide, and other tests of this binary post logout tokens).
#[test]
fn a_sign_out_at_the_provider_ends_the_console_session_of_that_provider_session_only() {
    harness::run_alone("sso::provider_sign_out_alone");
}

#[tokio::test]
#[ignore = "run in a process of its own by a_sign_out_at_the_provider_ends_the_console_session_of_that_provider_session_only"]
async fn provider_sign_out_alone() {
    let f = SsoFixture::start(|_| {}).await;
    let before = f
        .app
        .sample("portcullis_backchannel_logouts_total{outcome=\"success\"}")
        .await;
    assert_eq!(
        f.login("alice", "alice-correct-horse").await.status(),
        StatusCode::FOUND
    );
    let (other, there) = f.login_elsewhere("", "alice", "alice-correct-horse").await;
    let here = SecretString::from(f.cookie(REFRESH_COOKIE).unwrap());
    let session = |token: &SecretString| {
        let token = token.clone();
        let state = f.app.state.clone();
        let now = f.clock.now();
        async move { state.refresh.inspect(&token, now).await.unwrap() }
    };
    let (here_session, there_session) = (
        session(&here).await.unwrap(),
        session(&there).await.unwrap(),
    );
    let sid = |s: &portcullis::refresh::Session| s.session["idp_sid"].as_str().unwrap().to_owned();
    assert_ne!(
        sid(&here_session),
        sid(&there_session),
        "each login records its own provider session"
    );

    let end = Url::parse_with_params(
        &format!("{}/session/end", f.idp.issuer()),
        [
            ("client_id", f.idp.options().client_id.clone()),
            ("post_logout_redirect_uri", format!("{}/", f.origin())),
        ],
    )
    .unwrap();
    let back = f
        .idp
        .browser_logout(&f.browser, end.as_str())
        .await
        .unwrap();
    assert_eq!(back.as_str(), format!("{}/", f.origin()));

    // the provider has delivered its logout token by the time it sends the browser back
    assert!(session(&here).await.is_none(), "this session ended");
    assert!(
        session(&there).await.is_some(),
        "the other browser's did not"
    );
    let (target, detail) = f.last_backchannel_logout().await;
    assert_eq!(target, "test:alice");
    assert_eq!(detail["sid"], sid(&here_session));
    assert_eq!(
        detail["families_revoked"],
        serde_json::json!([here_session.family.to_string()])
    );
    // counted once, as one success (alone in its process: no other test's logouts)
    assert_eq!(
        f.app
            .sample("portcullis_backchannel_logouts_total{outcome=\"success\"}")
            .await,
        before + 1.0
    );

    // the access cookie already minted lives out its lifetime (documented); past it and
    // the leeway, the browser is logged out, while the other renews
    assert_eq!(f.me().await.status(), StatusCode::OK);
    f.clock.advance(time::Duration::minutes(10));
    assert_eq!(f.me().await.status(), StatusCode::UNAUTHORIZED);
    let other_me = other.get(f.app.url("/auth/me")).send().await.unwrap();
    assert_eq!(other_me.status(), StatusCode::OK);
}

/// A logout token is checked like an ID token of the provider and used once; each refusal
/// is a 400 `invalid_request` that says why and ends no session. A token without `sid`
/// ends every console session of its subject from that provider.
#[tokio::test]
async fn a_logout_token_is_verified_and_used_once_and_a_refused_one_ends_nothing() {
    let f = SsoFixture::start(|_| {}).await;
    assert_eq!(
        f.login("bob", "bob-battery-staple").await.status(),
        StatusCode::FOUND
    );
    let refresh = SecretString::from(f.cookie(REFRESH_COOKIE).unwrap());
    let alive = || {
        let state = f.app.state.clone();
        let refresh = refresh.clone();
        let now = f.clock.now();
        async move {
            state
                .refresh
                .inspect(&refresh, now)
                .await
                .unwrap()
                .is_some()
        }
    };
    let iat = time::OffsetDateTime::now_utc().unix_timestamp();
    let good = serde_json::json!({
        "iss": f.idp.issuer(),
        "aud": f.idp.options().client_id,
        "iat": iat,
        "exp": iat + 120,
        "jti": uuid::Uuid::new_v4().to_string(),
        "sub": "bob",
        "events": { BACKCHANNEL_LOGOUT_EVENT: {} },
    });
    let with = |change: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut claims = good.clone();
        change(claims.as_object_mut().unwrap());
        claims
    };
    let typed = serde_json::json!({ "typ": "logout+jwt" });
    let signed = |header: serde_json::Value, claims: serde_json::Value| async {
        f.idp.sign(header, claims).await.unwrap()
    };
    let client = f.app.https_client();
    let post = |content_type: &'static str, body: String| {
        client
            .post(f.app.url("/auth/backchannel-logout"))
            .header(header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
    };
    let form = |token: &str| format!("logout_token={}", urlencoding(token));
    const FORM: &str = "application/x-www-form-urlencoded";

    // each a good token with one claim changed
    type Change = fn(&mut serde_json::Map<String, serde_json::Value>);
    let changed: [(&str, &str, Change); 6] = [
        ("with a nonce", "nonce", |c| {
            c.insert("nonce".into(), "n-1".into());
        }),
        ("a nonce of null", "nonce", |c| {
            c.insert("nonce".into(), serde_json::Value::Null);
        }),
        ("no event", "event", |c| {
            c.remove("events");
        }),
        ("for another client", "no configured provider", |c| {
            c.insert("aud".into(), "someone-else".into());
        }),
        ("neither sub nor sid", "neither sub nor sid", |c| {
            c.remove("sub");
        }),
        ("expired", "expired", |c| {
            let iat = c["iat"].as_i64().unwrap();
            c.insert("iat".into(), (iat - 200).into());
            c.insert("exp".into(), (iat - 100).into());
        }),
    ];
    let mut cases: Vec<(&str, &str, String)> = vec![
        ("JSON", "application/x-www-form-urlencoded", String::new()),
        ("no token", "logout_token is required", String::new()),
        (
            "twice",
            "repeated",
            format!("{}&{}", form("a.b.c"), form("a.b.c")),
        ),
        ("not a JWT", "malformed", form("not-a-jwt")),
        (
            "an access token's type",
            "typ",
            form(&signed(serde_json::json!({ "typ": "at+jwt" }), good.clone()).await),
        ),
        (
            "signed by a key the provider does not publish",
            "kid",
            form(&f.app.sign_with_typ(Some("logout+jwt"), &good)),
        ),
        (
            "the login's own ID token",
            "event",
            form(&f.cookie(ID_TOKEN_COOKIE).unwrap()),
        ),
    ];
    for (what, says, change) in changed {
        cases.push((
            what,
            says,
            form(&signed(typed.clone(), with(&change)).await),
        ));
    }
    for (what, says, body) in cases {
        let content_type = if what == "JSON" {
            "application/json"
        } else {
            FORM
        };
        let sent: Vec<String> = url::form_urlencoded::parse(body.as_bytes())
            .filter(|(k, _)| k == "logout_token")
            .map(|(_, v)| v.into_owned())
            .collect();
        let response = post(content_type, body).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{what}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request", "{what}: {body}");
        let description = body["error_description"].as_str().unwrap();
        assert!(description.contains(says), "{what}: {description}");
        assert_eq!(
            quoted_token(description, &sent),
            None,
            "{what}: {description}"
        );
        assert!(alive().await, "{what} ended the session");
    }

    // a token naming another provider session leaves this one, whose login recorded its
    // own sid, and ends one of the same user whose login recorded none
    let unrecorded = super::proxy::session_cookie(&f.app, "bob", &["operator"]).await;
    let unrecorded = SecretString::from(
        unrecorded
            .split("; ")
            .find_map(|c| c.strip_prefix("__Host-portcullis-rt="))
            .unwrap()
            .to_owned(),
    );
    assert!(live(&f, &unrecorded).await);
    let other_session = with(&|c| {
        c.insert("sid".into(), "another-provider-session".into());
        c.insert("jti".into(), uuid::Uuid::new_v4().to_string().into());
    });
    let r = post(FORM, form(&signed(typed.clone(), other_session).await))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(alive().await, "a session of another sid was ended");
    assert!(
        !live(&f, &unrecorded).await,
        "a session without a sid survived"
    );

    let token = signed(typed.clone(), good.clone()).await;
    let done = post(FORM, form(&token)).await.unwrap();
    assert_eq!(done.status(), StatusCode::OK);
    assert_eq!(done.headers()[header::CACHE_CONTROL], "no-store");
    assert!(done.bytes().await.unwrap().is_empty());
    assert!(
        !alive().await,
        "a token without sid ends the subject's sessions"
    );

    // the same token again (a provider's retry, or someone who saw it): 200, and it ends
    // nothing, not the session the user has logged in to since
    assert_eq!(
        f.login("bob", "bob-battery-staple").await.status(),
        StatusCode::FOUND
    );
    let fresh = SecretString::from(f.cookie(REFRESH_COOKIE).unwrap());
    let replayed = post(FORM, form(&token)).await.unwrap();
    assert_eq!(replayed.status(), StatusCode::OK);
    assert!(live(&f, &fresh).await, "a replay ended a later session");

    // a user with no session: nothing to end, and that is a success
    let nobody = with(&|c| {
        c.insert("sub".into(), "carol".into());
        c.insert("jti".into(), uuid::Uuid::new_v4().to_string().into());
    });
    let none_left = post(FORM, form(&signed(typed.clone(), nobody).await))
        .await
        .unwrap();
    assert_eq!(none_left.status(), StatusCode::OK);
    assert!(live(&f, &fresh).await);
}

/// The part of a logout token in `tokens` that `description` quotes, if any: 12
/// characters of the token as sent, the `kid` it names, or a string claim of 6 characters
/// or more (a refusal says what is wrong, never what the token said).
fn quoted_token(description: &str, tokens: &[String]) -> Option<String> {
    for token in tokens {
        let chars: Vec<char> = token.chars().collect();
        for window in chars.windows(12) {
            let window: String = window.iter().collect();
            if description.contains(&window) {
                return Some(window);
            }
        }
        let part = |i: usize| -> serde_json::Value {
            token
                .split('.')
                .nth(i)
                .and_then(|p| {
                    base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, p)
                        .ok()
                })
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default()
        };
        let (head, claims) = (part(0), part(1));
        let mut quoted: Vec<String> = head["kid"]
            .as_str()
            .map(str::to_owned)
            .into_iter()
            .collect();
        if let Some(claims) = claims.as_object() {
            quoted.extend(
                claims
                    .values()
                    .filter_map(|v| v.as_str())
                    .filter(|v| v.len() >= 6)
                    .map(str::to_owned),
            );
        }
        if let Some(q) = quoted
            .into_iter()
            .find(|q| description.contains(q.as_str()))
        {
            return Some(q);
        }
    }
    None
}

/// A provider of discovery and JWKS only, at `url` (plain HTTP on 127.0.0.1, as the
/// settings allow), serving the test provider's keys and counting the JWKS fetches.
struct CountingJwks {
    url: String,
    fetches: Arc<std::sync::atomic::AtomicUsize>,
    upstream: Arc<std::sync::OnceLock<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingJwks {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let upstream: Arc<std::sync::OnceLock<String>> = Arc::default();
        let discovery = serde_json::json!({
            "issuer": url,
            "authorization_endpoint": format!("{url}/auth"),
            "token_endpoint": format!("{url}/token"),
            "jwks_uri": format!("{url}/jwks"),
        });
        let (count, from) = (fetches.clone(), upstream.clone());
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || async move { axum::Json(discovery) }),
            )
            .route(
                "/jwks",
                axum::routing::get(move || async move {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let keys: serde_json::Value = reqwest::get(from.get().unwrap().as_str())
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    axum::Json(keys)
                }),
            );
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url,
            fetches,
            upstream,
            task,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CountingJwks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Logout tokens naming keys the provider does not publish make it refetch its JWKS at
/// most once per `jwks_min_refetch` (the provider may have rotated; a stream of made-up
/// `kid`s must not become a stream of fetches), and are refused without quoting the token.
#[tokio::test]
async fn logout_tokens_with_unknown_kids_refetch_the_jwks_at_most_once_per_window() {
    const WINDOW: Duration = Duration::from_secs(2);
    let counted = CountingJwks::start().await;
    let issuer = counted.url.clone();
    let f = SsoFixture::start(|c| {
        let mut other = c.sso.providers[0].clone();
        other.name = "counted".to_owned();
        other.issuer = issuer;
        other.client_id = "counted-client".to_owned();
        c.sso.providers.push(other);
        c.sso.jwks_min_refetch = WINDOW;
    })
    .await;
    counted
        .upstream
        .set(format!("{}/jwks", f.idp.issuer()))
        .unwrap();
    let token = |kid: Option<&str>| {
        let iat = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({
            "iss": counted.url,
            "aud": "counted-client",
            "iat": iat,
            "exp": iat + 120,
            "jti": uuid::Uuid::new_v4().to_string(),
            "sub": "nobody-logged-in",
            "events": { BACKCHANNEL_LOGOUT_EVENT: {} },
        });
        let mut header = serde_json::json!({ "typ": "logout+jwt" });
        if let Some(kid) = kid {
            header["kid"] = kid.into();
        }
        let idp = &f.idp;
        async move { idp.sign(header, claims).await.unwrap() }
    };
    let refused = |token: String| {
        let f = &f;
        async move {
            let r = f.post_logout_token(&token).await;
            assert_eq!(r.status(), StatusCode::BAD_REQUEST);
            let body: serde_json::Value = r.json().await.unwrap();
            let description = body["error_description"].as_str().unwrap().to_owned();
            assert!(description.contains("kid"), "{body}");
            assert_eq!(
                quoted_token(&description, std::slice::from_ref(&token)),
                None,
                "{description}"
            );
        }
    };

    // a genuine token loads the keys: one fetch
    let r = f.post_logout_token(&token(None).await).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(counted.fetches(), 1);
    // within the window, made-up kids are refused with the keys held
    refused(token(Some("made-up-1")).await).await;
    refused(token(Some("made-up-2")).await).await;
    assert_eq!(
        counted.fetches(),
        1,
        "a made-up kid refetched within the window"
    );
    // past it, the next one refetches (the provider may have rotated) and the one after
    // does not. The window runs on the monotonic clock, not the instance's injectable
    // one: time has to pass
    tokio::time::sleep(WINDOW + Duration::from_millis(200)).await;
    refused(token(Some("made-up-3")).await).await;
    assert_eq!(counted.fetches(), 2, "no refetch past the window");
    refused(token(Some("made-up-4")).await).await;
    assert_eq!(counted.fetches(), 2, "two refetches in one window");
}

/// The live family of which `refresh` is the current token at `f`'s instance, if any.
pub async fn session_of(
    f: &SsoFixture,
    refresh: &SecretString,
) -> Option<portcullis::refresh::Session> {
    f.app
        .state
        .refresh
        .inspect(refresh, f.clock.now())
        .await
        .unwrap()
}

/// Whether `refresh` is the current token of a live family at `f`'s instance.
pub async fn live(f: &SsoFixture, refresh: &SecretString) -> bool {
    session_of(f, refresh).await.is_some()
}

/// One provider configured under two names (as for two role mappings): its logout token
/// ends the console sessions of both, as each login made its own subject.
#[tokio::test]
async fn a_logout_token_ends_the_sessions_of_every_name_its_provider_is_configured_under() {
    let f = SsoFixture::start(|c| {
        let mut twin = c.sso.providers[0].clone();
        twin.name = "twin".to_owned();
        c.sso.providers.push(twin);
    })
    .await;
    let callback = f
        .login_at_idp("?provider=twin&redirect=/jobs", "bob", "bob-battery-staple")
        .await;
    assert_eq!(
        f.browser.get(callback).send().await.unwrap().status(),
        StatusCode::FOUND
    );
    assert_eq!(
        f.me().await.json::<serde_json::Value>().await.unwrap()["subject"],
        "twin:bob"
    );
    let twin = SecretString::from(f.cookie(REFRESH_COOKIE).unwrap());
    let (_, test) = f
        .login_elsewhere("?provider=test", "bob", "bob-battery-staple")
        .await;
    assert!(live(&f, &twin).await && live(&f, &test).await);

    let token = f.logout_token(serde_json::json!({ "sub": "bob" })).await;
    let done = f.post_logout_token(&token).await;
    assert_eq!(done.status(), StatusCode::OK);
    assert!(!live(&f, &twin).await, "the session under `twin` survived");
    assert!(!live(&f, &test).await, "the session under `test` survived");
}

fn urlencoding(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// A logout token may name only the provider session (`sid`, no `sub`): the console
/// sessions its logins made end, found through the index each login adds to, and the
/// same user's session of another provider session stays.
#[tokio::test]
async fn a_logout_token_naming_only_the_provider_session_ends_the_sessions_it_made() {
    let f = SsoFixture::start(|_| {}).await;
    assert_eq!(
        f.login("alice", "alice-correct-horse").await.status(),
        StatusCode::FOUND
    );
    let here = SecretString::from(f.cookie(REFRESH_COOKIE).unwrap());
    let (_, there) = f.login_elsewhere("", "alice", "alice-correct-horse").await;
    let session = session_of(&f, &here).await.unwrap();
    let sid = session.session["idp_sid"].as_str().unwrap().to_owned();

    let token = f.logout_token(serde_json::json!({ "sid": sid })).await;
    let done = f.post_logout_token(&token).await;
    assert_eq!(done.status(), StatusCode::OK);
    assert!(
        !live(&f, &here).await,
        "the provider session's console session survived"
    );
    assert!(
        live(&f, &there).await,
        "another provider session's was ended"
    );
    let (target, detail) = f.last_backchannel_logout().await;
    assert_eq!(target, format!("test session {sid}"));
    assert_eq!(
        detail["families_revoked"],
        serde_json::json!([session.family.to_string()])
    );
}
