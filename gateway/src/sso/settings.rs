//! `[sso]`: the identity providers console users log in with, how their claims map to
//! scheduler roles, and the console session.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::roles::RoleRule;

/// `[sso]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SsoSettings {
    /// `[[sso.providers]]`: the OpenID Connect providers users may log in with.
    pub providers: Vec<ProviderSettings>,
    /// `[[sso.roles]]`: rules from provider claims to scheduler roles.
    pub roles: Vec<RoleRule>,
    /// How long a started login (its `state`, `nonce` and PKCE verifier) stays usable.
    #[serde(with = "humantime_serde")]
    pub login_timeout: Duration,
    /// Lifetime of the console access token (renewed from the refresh cookie).
    #[serde(with = "humantime_serde")]
    pub access_token_lifetime: Duration,
    /// How long a console session lives from its login, however active: past it the
    /// session is not renewed (its family is revoked) and the user logs in again, so the
    /// provider is asked afresh for the account and its groups.
    #[serde(with = "humantime_serde")]
    pub session_max_lifetime: Duration,
    /// The client id console sessions (refresh-token families) are bound to. Not a
    /// registered OAuth client, so its refresh tokens are useless at `/oauth2/token`.
    pub console_client_id: String,
    /// Clock skew tolerated on the ID token's `exp`, `iat` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Timeout of each request to a provider (discovery, JWKS, token, userinfo).
    #[serde(with = "humantime_serde")]
    pub http_timeout: Duration,
    /// A token signed by an unknown `kid` makes the JWKS be fetched again, at most this
    /// often per provider.
    #[serde(with = "humantime_serde")]
    pub jwks_min_refetch: Duration,
    /// Prefix of the Redis keys of pending logins.
    pub key_prefix: String,
    /// Break-glass local accounts (`POST /auth/local`, created by `portcullis users
    /// create`). Off by default.
    pub local_accounts: bool,
}

impl Default for SsoSettings {
    fn default() -> Self {
        Self {
            providers: Vec::new(),
            roles: Vec::new(),
            login_timeout: Duration::from_secs(600),
            access_token_lifetime: Duration::from_secs(300),
            session_max_lifetime: Duration::from_secs(12 * 60 * 60),
            console_client_id: "portcullis-console".to_owned(),
            leeway: Duration::from_secs(60),
            http_timeout: Duration::from_secs(5),
            jwks_min_refetch: Duration::from_secs(10),
            key_prefix: "portcullis:sso:".to_owned(),
            local_accounts: false,
        }
    }
}

/// `[[sso.providers]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// Short name used in `/auth/login?provider=` and in subjects (`<name>:<sub>`).
    pub name: String,
    /// The issuer URL; discovery is `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    /// Our client id at the provider.
    pub client_id: String,
    /// Our client secret at the provider (prefer `client_secret_file`).
    pub client_secret: Option<SecretString>,
    /// A file holding the client secret.
    pub client_secret_file: Option<PathBuf>,
    /// Scopes requested; `openid` is always included.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The callback URL registered at the provider; default `<server.public_url>/auth/callback`.
    pub redirect_uri: Option<String>,
    /// Where the provider sends the browser after logout; default `<server.public_url>/`.
    pub post_logout_redirect_uri: Option<String>,
    /// Algorithms accepted on ID tokens (pinned; never taken from the token).
    #[serde(default = "default_algorithms")]
    pub id_token_algorithms: Vec<String>,
    /// Also call the userinfo endpoint and merge its claims (its `sub` must match).
    #[serde(default)]
    pub userinfo: bool,
    /// The claim holding the user's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// A PEM bundle of CAs trusted for this provider, on top of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Answer the provider's front-channel logouts (`GET /auth/frontchannel-logout`,
    /// OpenID Connect Front-Channel Logout 1.0). Off by default: the request carries no
    /// proof that the provider sent it, so whoever knows a provider session id can end
    /// the console sessions it made; back-channel logout (a signed token) is preferred.
    #[serde(default)]
    pub frontchannel_logout: bool,
}

fn default_scopes() -> Vec<String> {
    ["openid", "email", "profile"].map(str::to_owned).to_vec()
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".to_owned(), "ES256".to_owned()]
}

fn default_groups_claim() -> String {
    "groups".to_owned()
}

/// What is wrong with `[sso]`; the string names the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SsoSettingsError {
    /// Dotted path of the field.
    pub field: String,
    /// Why.
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> SsoSettingsError {
    SsoSettingsError {
        field: field.into(),
        message: message.into(),
    }
}

// === impl SsoSettings ===

impl SsoSettings {
    /// Checks names, URLs, algorithms and secrets before anything starts.
    pub fn validate(&self) -> Result<(), SsoSettingsError> {
        if self.login_timeout.is_zero() {
            return Err(err("sso.login_timeout", "must be greater than 0"));
        }
        if self.access_token_lifetime < Duration::from_secs(1) {
            return Err(err("sso.access_token_lifetime", "must be at least 1s"));
        }
        if self.session_max_lifetime <= self.access_token_lifetime {
            return Err(err(
                "sso.session_max_lifetime",
                format!(
                    "must be longer than sso.access_token_lifetime ({})",
                    humantime::format_duration(self.access_token_lifetime)
                ),
            ));
        }
        if self.console_client_id.trim().is_empty() {
            return Err(err("sso.console_client_id", "must not be empty"));
        }
        if self.console_client_id == crate::clients::ADMIN_CLIENT_ID {
            // no client may have the console's id, and `--dev` registers this one
            return Err(err(
                "sso.console_client_id",
                "must not be `admin`, the id of the bootstrap admin client",
            ));
        }
        if self.http_timeout.is_zero() {
            return Err(err("sso.http_timeout", "must be greater than 0"));
        }
        if self.key_prefix.contains(['{', '}']) {
            return Err(err("sso.key_prefix", "must not contain '{' or '}'"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            let at = |f: &str| format!("sso.providers[{i}].{f}");
            let name_ok = !p.name.is_empty()
                && p.name.len() <= 64
                && p.name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
            if !name_ok {
                return Err(err(at("name"), "use 1-64 letters, digits, '-' or '_'"));
            }
            // subjects are `<provider>:<sub>`, and `local:<name>` is a break-glass account's:
            // a provider of that name could hand out a subject equal to one of them
            if p.name.eq_ignore_ascii_case(super::LOCAL_PROVIDER) {
                return Err(err(
                    at("name"),
                    "`local` names the break-glass accounts' subjects (local:<name>); choose \
                     another name",
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(err(at("name"), format!("`{}` is used twice", p.name)));
            }
            check_idp_url(&at("issuer"), &p.issuer)?;
            if p.client_id.is_empty() {
                return Err(err(at("client_id"), "must not be empty"));
            }
            match (&p.client_secret, &p.client_secret_file) {
                (Some(_), Some(_)) => {
                    return Err(err(
                        at("client_secret"),
                        "set client_secret or client_secret_file, not both",
                    ));
                }
                (None, None) => {
                    return Err(err(
                        at("client_secret_file"),
                        "missing: set client_secret_file (or client_secret)",
                    ));
                }
                _ => {}
            }
            p.secret().map_err(|m| err(at("client_secret_file"), m))?;
            if let Some(uri) = &p.redirect_uri {
                check_idp_url(&at("redirect_uri"), uri)?;
            }
            if let Some(uri) = &p.post_logout_redirect_uri {
                check_idp_url(&at("post_logout_redirect_uri"), uri)?;
            }
            if p.id_token_algorithms.is_empty() {
                return Err(err(at("id_token_algorithms"), "name at least one"));
            }
            for a in &p.id_token_algorithms {
                parse_algorithm(a).map_err(|m| err(at("id_token_algorithms"), m))?;
            }
            if let Some(ca) = &p.ca_file
                && !ca.is_file()
            {
                return Err(err(
                    at("ca_file"),
                    format!("{} is not a file", ca.display()),
                ));
            }
        }
        for (i, rule) in self.roles.iter().enumerate() {
            if let Some(p) = &rule.provider
                && !names.contains(p.as_str())
            {
                return Err(err(
                    format!("sso.roles[{i}].provider"),
                    format!("no provider is named `{p}`"),
                ));
            }
            if rule.is_empty() {
                return Err(err(
                    format!("sso.roles[{i}]"),
                    "a rule needs groups, email_domains or subjects",
                ));
            }
        }
        Ok(())
    }

    /// Whether console sessions can be made at all: a provider, or break-glass accounts.
    pub fn sessions_enabled(&self) -> bool {
        !self.providers.is_empty() || self.local_accounts
    }
}

// === impl ProviderSettings ===

impl ProviderSettings {
    /// The client secret, from the setting or its file.
    pub fn secret(&self) -> Result<SecretString, String> {
        match (&self.client_secret, &self.client_secret_file) {
            (Some(s), _) => Ok(s.clone()),
            (None, Some(file)) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                let secret = text.trim();
                if secret.is_empty() {
                    return Err(format!("{} is empty", file.display()));
                }
                Ok(SecretString::from(secret.to_owned()))
            }
            (None, None) => Err("no client secret".to_owned()),
        }
    }
}

/// An ID-token algorithm name as jsonwebtoken knows it; symmetric ones are refused (the
/// client secret is no signing key we accept).
pub fn parse_algorithm(name: &str) -> Result<jsonwebtoken::Algorithm, String> {
    use jsonwebtoken::Algorithm as A;
    Ok(match name {
        "RS256" => A::RS256,
        "RS384" => A::RS384,
        "RS512" => A::RS512,
        "PS256" => A::PS256,
        "PS384" => A::PS384,
        "PS512" => A::PS512,
        "ES256" => A::ES256,
        "ES384" => A::ES384,
        "EdDSA" => A::EdDSA,
        other => {
            return Err(format!(
                "unsupported ID-token algorithm `{other}`; use RS256, RS384, RS512, PS256, \
                 PS384, PS512, ES256, ES384 or EdDSA"
            ));
        }
    })
}

/// Providers are reached over HTTPS; plain HTTP only on the loopback interface (a
/// provider on the same host, and the test provider).
fn check_idp_url(field: &str, value: &str) -> Result<(), SsoSettingsError> {
    let url = url::Url::parse(value).map_err(|_| err(field, "must be an absolute URL"))?;
    let host = url.host_str().unwrap_or_default();
    match url.scheme() {
        "https" if !host.is_empty() => Ok(()),
        "http" if matches!(host, "127.0.0.1" | "localhost" | "[::1]") => Ok(()),
        _ => Err(err(
            field,
            "must be https:// (http:// only for 127.0.0.1, [::1] or localhost)",
        )),
    }
}
