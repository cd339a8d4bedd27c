//! A real OpenID Connect provider (`tests/oidc/provider.mjs`, oidc-provider on Node) and a
//! browser-like driver for its login, consent and logout forms.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use reqwest::Url;
use sha2::Digest as _;

use crate::http::get_status;
use crate::process::{Service, Spec, retry_on_port_clash};
use crate::{HarnessError, Result, find_program, free_port, workspace_root};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The file in the provider's directory with the CAs it trusts (`OIDC_TRUST_CA_FILE`).
const TRUST_CA_FILE: &str = "trust-ca.pem";
/// Redirects and form posts one login may take before the driver gives up.
const MAX_BROWSER_STEPS: usize = 25;

/// A user the test identity provider knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestUser {
    /// Login name; also the `sub` and `preferred_username` claims.
    pub username: &'static str,
    /// Password the login form accepts.
    pub password: &'static str,
    /// The `email` claim (always `email_verified: true`).
    pub email: &'static str,
    /// The `groups` claim (scope `groups`).
    pub groups: &'static [&'static str],
    /// This many more groups in the claim, named `cn=team-<n>,ou=groups,dc=corp,dc=example`
    /// (a user in very many groups, as directory users often are: a large ID token).
    pub extra_groups: usize,
}

/// The users of every [`OidcProvider`]; the provider script gets them from here.
pub const TEST_USERS: &[TestUser] = &[
    TestUser {
        username: "alice",
        password: "alice-correct-horse",
        email: "alice@example.com",
        groups: &["scheduler-admins"],
        extra_groups: 0,
    },
    TestUser {
        username: "bob",
        password: "bob-battery-staple",
        email: "bob@example.com",
        groups: &["scheduler-operators"],
        extra_groups: 0,
    },
    TestUser {
        username: "carol",
        password: "carol-tr0ub4dor",
        email: "carol@contractor.example",
        groups: &[],
        extra_groups: 0,
    },
    // an ID token too large for one browser cookie (over 4096 bytes)
    TestUser {
        username: "dave",
        password: "dave-many-groups-4k",
        email: "dave@example.com",
        groups: &["scheduler-operators"],
        extra_groups: 100,
    },
];

// === impl TestUser ===

impl TestUser {
    /// The `name` claim: the username, capitalised ("Alice").
    pub fn display_name(&self) -> String {
        let mut chars = self.username.chars();
        chars
            .next()
            .map(|first| first.to_uppercase().chain(chars).collect())
            .unwrap_or_default()
    }

    /// The whole `groups` claim: [`TestUser::groups`] and the generated ones.
    pub fn all_groups(&self) -> Vec<String> {
        let extra =
            (1..=self.extra_groups).map(|n| format!("cn=team-{n:04},ou=groups,dc=corp,dc=example"));
        self.groups
            .iter()
            .map(|g| (*g).to_owned())
            .chain(extra)
            .collect()
    }

    /// The user called `username` in [`TEST_USERS`].
    pub fn named(username: &str) -> Option<&'static TestUser> {
        TEST_USERS.iter().find(|u| u.username == username)
    }
}

/// The client registered at the provider.
///
/// Two clients are registered from it: `client_id` (ID tokens signed RS256) and
/// `<client_id>-es256` (ES256), same secret and URIs. Both authenticate with
/// `client_secret_basic` or `client_secret_post`, may use the `authorization_code` and
/// `refresh_token` grants, and must use PKCE (S256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcOptions {
    /// The client id.
    pub client_id: String,
    /// The client secret.
    pub client_secret: String,
    /// Allowed `redirect_uri`s (matched exactly).
    pub redirect_uris: Vec<String>,
    /// Allowed `post_logout_redirect_uri`s.
    pub post_logout_redirect_uris: Vec<String>,
    /// Where the provider posts a logout token when a session of the client ends
    /// (Back-Channel Logout 1.0, with `backchannel_logout_session_required`, so ID tokens
    /// carry `sid`); `None`: no back-channel logout. An HTTPS URI is reached trusting the
    /// CA of [`OidcProvider::trust_ca`].
    pub backchannel_logout_uri: Option<String>,
}

impl Default for OidcOptions {
    fn default() -> OidcOptions {
        OidcOptions {
            client_id: "portcullis".into(),
            client_secret: "portcullis-test-client-secret".into(),
            redirect_uris: vec!["https://127.0.0.1:8443/auth/callback".into()],
            post_logout_redirect_uris: vec!["https://127.0.0.1:8443/".into()],
            backchannel_logout_uri: None,
        }
    }
}

/// The test OpenID Connect provider on `http://127.0.0.1:P`, killed on drop.
///
/// Discovery at `/.well-known/openid-configuration`; endpoints `/auth`, `/token`, `/me`,
/// `/jwks`, `/token/introspection`, `/token/revocation`, `/session/end`. Scopes `openid`,
/// `email`, `profile`, `groups`, `offline_access`; the scope claims are in the ID token.
/// Signing keys persist in its temp dir, so [`OidcProvider::restart`] keeps the JWKS;
/// sessions, codes and tokens are in memory and do not survive it.
#[derive(Debug)]
pub struct OidcProvider {
    service: Service,
    port: u16,
    options: OidcOptions,
}

// === impl OidcProvider ===

impl OidcProvider {
    /// Starts `node tests/oidc/provider.mjs` on a free port and waits for discovery.
    pub fn start(options: OidcOptions) -> Result<OidcProvider> {
        let node = find_program("node", &["/usr/bin", "/usr/local/bin"])?;
        let oidc_dir = workspace_root().join("tests/oidc");
        if !oidc_dir.join("node_modules/oidc-provider").is_dir() {
            return Err(HarnessError::MissingBinary {
                program: "oidc-provider (npm)".into(),
                looked_in: oidc_dir.join("node_modules").display().to_string(),
            });
        }
        let client = serde_json::json!({
            "client_id": options.client_id,
            "client_secret": options.client_secret,
            "redirect_uris": options.redirect_uris,
            "post_logout_redirect_uris": options.post_logout_redirect_uris,
            "backchannel_logout_uri": options.backchannel_logout_uri,
        });
        let users: Vec<serde_json::Value> = TEST_USERS
            .iter()
            .map(|u| {
                serde_json::json!({
                    "username": u.username,
                    "password": u.password,
                    "email": u.email,
                    "name": u.display_name(),
                    "groups": u.all_groups(),
                })
            })
            .collect();
        let users = serde_json::Value::Array(users).to_string();
        // Twice in CI-like load a provider stayed silent after its first log line for the
        // whole READY_TIMEOUT (cause not found; provider.mjs now logs its start-up phases):
        // such a start is given up, its log reported, and made once more on a new port.
        let mut silent = 0;
        loop {
            match Self::start_once(&node, &oidc_dir, &client, &users, &options) {
                Err(HarnessError::NotReady { log, tail, .. }) if silent == 0 => {
                    silent += 1;
                    eprintln!(
                        "harness: oidc-provider did not answer in {READY_TIMEOUT:?}; starting it \
                         again (its log: {}, last line: {tail})",
                        log.display()
                    );
                }
                other => return other,
            }
        }
    }

    fn start_once(
        node: &std::path::Path,
        oidc_dir: &std::path::Path,
        client: &serde_json::Value,
        users: &str,
        options: &OidcOptions,
    ) -> Result<OidcProvider> {
        retry_on_port_clash(|| {
            let port = free_port();
            let mut spec = Spec::new(node)
                .arg(oidc_dir.join("provider.mjs"))
                .env("OIDC_PORT", port.to_string())
                .env("OIDC_CLIENT", client.to_string())
                .env("OIDC_USERS", users.to_owned())
                .env("NODE_ENV", "test");
            spec.grace_secs = 5;
            let service = Service::new("oidc-provider", spec, None)?;
            let state_dir = service.dir().display().to_string();
            let trust = service.dir().join(TRUST_CA_FILE).display().to_string();
            let provider = OidcProvider {
                service: service
                    .with_env("OIDC_STATE_DIR", state_dir)
                    .with_env("OIDC_TRUST_CA_FILE", trust),
                port,
                options: options.clone(),
            };
            provider.service.spawn()?;
            // a provider that never answered is stopped here, not left running
            if let Err(e) = provider.wait_ready() {
                provider.service.stop();
                return Err(e);
            }
            Ok(provider)
        })
    }

    fn wait_ready(&self) -> Result<()> {
        let port = self.port;
        self.service
            .wait_until("discovery answers 200", READY_TIMEOUT, || {
                (get_status(port, "/.well-known/openid-configuration")? == 200).then_some(())
            })
    }

    /// `http://127.0.0.1:P` (no trailing slash), exactly the `iss` of its tokens.
    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `<issuer>/.well-known/openid-configuration`
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.issuer())
    }

    /// The provider's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client registered at the provider.
    pub fn options(&self) -> &OidcOptions {
        &self.options
    }

    /// Stops the provider. Idempotent.
    pub fn stop(&self) {
        self.service.stop();
    }

    /// Stops (if running) and starts the provider again on the same port with the same
    /// signing keys; sessions, codes and tokens are gone.
    pub fn restart(&self) -> Result<()> {
        self.service.stop();
        self.service.spawn()?;
        self.wait_ready()
    }

    /// The provider's log file.
    pub fn log_path(&self) -> PathBuf {
        self.service.log_path().to_path_buf()
    }

    /// Trusts the CA certificates of `pem` for the provider's own HTTPS requests (its
    /// back-channel logout calls to a relying party with a test certificate); replaces what
    /// it trusted before. Takes effect at the next request.
    pub fn trust_ca(&self, pem: &str) -> Result<()> {
        let path = self.service.dir().join(TRUST_CA_FILE);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, pem)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))
    }

    /// A JWT signed by the provider's RSA key (RS256, its `kid`), with `header` members
    /// over the default `alg`/`kid` (a member set to `null` is left out) and `claims` as
    /// given: tokens only this provider could have made, with any claim a test wants.
    pub async fn sign(
        &self,
        header: serde_json::Value,
        claims: serde_json::Value,
    ) -> Result<String> {
        let response = reqwest::Client::builder()
            .no_proxy()
            .build()?
            .post(format!("{}/test/sign", self.issuer()))
            .json(&serde_json::json!({ "header": header, "claims": claims }))
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            return Err(HarnessError::Unexpected(format!(
                "the provider refused to sign ({status}): {text}"
            )));
        }
        Ok(text)
    }

    /// Logs in like a browser: starting at `start_url` (an authorization request to this
    /// provider, or a relying party URL that redirects to one), follows redirects, fills
    /// in and posts the login form with `username`/`password`, posts the consent form, and
    /// returns the first redirect that leaves the provider — the relying party's
    /// `redirect_uri` with `code`, `state` and `iss` (or `error`) — without following it.
    ///
    /// `client` must keep cookies and not follow redirects: see [`browser_client`]. A
    /// provider session in its cookie jar skips the login form. A wrong password yields
    /// [`HarnessError::LoginRejected`].
    pub async fn browser_login(
        &self,
        client: &reqwest::Client,
        start_url: &str,
        username: &str,
        password: &str,
    ) -> Result<Url> {
        self.drive(client, start_url, Some((username, password)))
            .await
    }

    /// Logs out like a browser: opens `start_url` (the `end_session_endpoint` with
    /// `id_token_hint`/`post_logout_redirect_uri`/`state`, or a relying party URL that
    /// redirects there), confirms the sign-out form, and returns the first redirect that
    /// leaves the provider (the `post_logout_redirect_uri`), without following it.
    pub async fn browser_logout(&self, client: &reqwest::Client, start_url: &str) -> Result<Url> {
        self.drive(client, start_url, None).await
    }

    async fn drive(
        &self,
        client: &reqwest::Client,
        start_url: &str,
        credentials: Option<(&str, &str)>,
    ) -> Result<Url> {
        let idp = Url::parse(&self.issuer())
            .map_err(|e| HarnessError::Unexpected(format!("issuer URL: {e}")))?;
        let mut next = client.get(start_url);
        let mut seen_idp = false;
        let mut submitted_login = false;
        for _ in 0..MAX_BROWSER_STEPS {
            let response = next.send().await?;
            let url = response.url().clone();
            let on_idp = url.origin() == idp.origin();
            seen_idp |= on_idp;
            if response.status().is_redirection() {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        HarnessError::Unexpected(format!("redirect without Location from {url}"))
                    })?;
                let target = url.join(location).map_err(|e| {
                    HarnessError::Unexpected(format!("bad Location {location:?} from {url}: {e}"))
                })?;
                if seen_idp && target.origin() != idp.origin() {
                    return Ok(target);
                }
                next = client.get(target);
                continue;
            }
            let status = response.status();
            let body = response.text().await?;
            if !on_idp || !status.is_success() {
                return Err(HarnessError::Unexpected(format!(
                    "browser got {status} from {url}: {}",
                    snippet(&body)
                )));
            }
            if let Some(error) = element_text(&body, "id=\"error\"") {
                return Err(if submitted_login {
                    HarnessError::LoginRejected(error)
                } else {
                    HarnessError::Unexpected(format!("provider error page at {url}: {error}"))
                });
            }
            let form = Form::parse(&body).ok_or_else(|| {
                HarnessError::Unexpected(format!("no form at {url}: {}", snippet(&body)))
            })?;
            let mut fields = form.fields;
            if fields.iter().any(|(name, _)| name == "password") {
                let (username, password) = credentials.ok_or_else(|| {
                    HarnessError::Unexpected(format!("{url} asks for a login during logout"))
                })?;
                for (name, value) in &mut fields {
                    match name.as_str() {
                        "username" => *value = username.to_owned(),
                        "password" => *value = password.to_owned(),
                        _ => {}
                    }
                }
                submitted_login = true;
            }
            let action = url.join(&form.action).map_err(|e| {
                HarnessError::Unexpected(format!("bad form action {:?}: {e}", form.action))
            })?;
            next = client.post(action).form(&fields);
        }
        Err(HarnessError::Unexpected(format!(
            "the browser flow from {start_url} took more than {MAX_BROWSER_STEPS} steps"
        )))
    }
}

/// A reqwest client that behaves like a browser for [`OidcProvider::browser_login`]:
/// keeps cookies, follows no redirects, ignores proxy settings.
pub fn browser_client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// A fresh PKCE pair: `(code_verifier, code_challenge)` for `code_challenge_method=S256`.
pub fn pkce_s256() -> (String, String) {
    let verifier = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let challenge =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&verifier));
    (verifier, challenge)
}

// === HTML forms (only what provider.mjs and oidc-provider render) ===

struct Form {
    action: String,
    fields: Vec<(String, String)>,
}

impl Form {
    fn parse(html: &str) -> Option<Form> {
        let start = html.find("<form")?;
        let rest = &html[start..];
        let end = rest.find("</form>").unwrap_or(rest.len());
        let form = &rest[..end];
        let tag_end = form.find('>')?;
        let action = attribute(&form[..tag_end], "action").unwrap_or_default();
        let fields = form
            .split("<input")
            .skip(1)
            .filter_map(|input| {
                let tag = &input[..input.find('>').unwrap_or(input.len())];
                let name = attribute(tag, "name")?;
                Some((name, attribute(tag, "value").unwrap_or_default()))
            })
            .collect();
        Some(Form { action, fields })
    }
}

/// The value of `name="..."` in a tag's text, entity-decoded.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let end = tag[start..].find('"')? + start;
    Some(unescape(&tag[start..end]))
}

/// The text of the first element whose tag contains `marker`.
fn element_text(html: &str, marker: &str) -> Option<String> {
    let at = html.find(marker)?;
    let rest = &html[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<').map_or(rest.len(), |e| e + start);
    Some(unescape(rest[start..end].trim()))
}

fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn snippet(body: &str) -> String {
    body.chars().take(600).collect()
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_login_form() {
        let html = r#"<p>x</p><form method="post" action="/interaction/abc/login">
<input type="text" name="username" value="" autofocus/>
<input type="password" name="password" value=""/><button>Sign in</button></form>"#;
        let form = Form::parse(html).expect("a form");
        assert_eq!(form.action, "/interaction/abc/login");
        assert_eq!(
            form.fields,
            [
                ("username".to_owned(), String::new()),
                ("password".to_owned(), String::new())
            ]
        );
    }

    #[test]
    fn parses_the_logout_form() {
        let html = r#"<form id="op.logoutForm" method="post" action="http://127.0.0.1:1/session/end/confirm"><input type="hidden" name="xsrf" value="k&amp;y"/><input type="hidden" name="logout" value="yes"/><button type="submit">Sign out</button></form>"#;
        let form = Form::parse(html).expect("a form");
        assert_eq!(form.action, "http://127.0.0.1:1/session/end/confirm");
        assert_eq!(
            form.fields,
            [
                ("xsrf".to_owned(), "k&y".to_owned()),
                ("logout".to_owned(), "yes".to_owned())
            ]
        );
    }

    #[test]
    fn pkce_challenge_is_the_s256_of_the_verifier() {
        // RFC 7636 appendix B.
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            sha2::Sha256::digest("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
        );
        assert_eq!(challenge, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        let (verifier, challenge) = pkce_s256();
        assert_eq!(verifier.len(), 64);
        assert_eq!(challenge.len(), 43);
    }
}
