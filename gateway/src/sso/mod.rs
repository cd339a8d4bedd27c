//! SSO for console users: OpenID Connect login against any standards-compliant provider
//! (authorization code flow with PKCE S256, `state` and `nonce` kept server-side, single
//! use), ID token validation, role mapping, and the console session that follows (cookies
//! carrying a refresh token of the refresh store and a short-lived access token).
//!
//! The HTTP face is [`handlers`]; this module is the flow itself.

pub mod handlers;
pub mod id_token;
pub mod logout_token;
pub mod pending;
pub mod provider;
pub mod redirect;
pub mod roles;
pub mod session;
pub mod settings;

use std::sync::Arc;

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet,
    EndpointSet, ExtraTokenFields, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    StandardRevocableToken, StandardTokenResponse, TokenResponse, TokenUrl,
};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::redis_store::RedisHandle;
use id_token::{Expected, IdClaims, IdTokenError, Trusted};
use logout_token::{Logout, LogoutTokenError};
use pending::{MemoryPendingStore, PendingError, PendingLogin, PendingStore, RedisPendingStore};
use provider::Provider;
use roles::{Identity, Role};
use settings::SsoSettings;

/// Why a login could not start or finish. Mapped to HTTP in `error.rs`.
#[derive(Debug, thiserror::Error)]
pub enum SsoError {
    /// Configuration that only shows at start-up (a secret file, a CA file).
    #[error("sso configuration: {0}")]
    Config(String),
    /// No provider is configured.
    #[error("SSO is not configured")]
    Disabled,
    /// `provider=` names no configured provider (or is missing with several configured).
    #[error("unknown identity provider")]
    UnknownProvider,
    /// `redirect=` is not a same-origin relative path.
    #[error("the post-login redirect must be a relative path on this site")]
    InvalidRedirect,
    /// `state` is missing, unknown, used already, expired, or not this browser's.
    #[error("the login state is invalid, expired or already used")]
    InvalidState,
    /// The provider answered the authorization request with an error (its `error` code
    /// as [`loggable_error_code`] keeps it).
    #[error("the identity provider refused the login: {0}")]
    ProviderDenied(String),
    /// The callback's `iss` is not the provider the login went to, or is missing while
    /// the provider advertises that it always sends it (mix-up, RFC 9207).
    #[error("the callback comes from another issuer")]
    IssuerMismatch,
    /// The callback has no `code`.
    #[error("the callback has no authorization code")]
    MissingCode,
    /// The provider refused the code (replayed, expired, PKCE mismatch, other client); its
    /// `error` code as [`loggable_error_code`] keeps it.
    #[error("the identity provider refused the authorization code: {0}")]
    CodeRejected(String),
    /// The token response carries no ID token.
    #[error("the identity provider sent no ID token")]
    NoIdToken,
    /// The ID token failed validation.
    #[error(transparent)]
    IdToken(#[from] IdTokenError),
    /// The userinfo answer is not about the ID token's subject.
    #[error("userinfo is about another subject")]
    UserinfoMismatch,
    /// The user maps to no role.
    #[error("no console role is granted to this user")]
    NoRole,
    /// The provider could not be reached or answered with a server error.
    #[error("identity provider unavailable: {0}")]
    ProviderUnavailable(String),
    /// The provider answered something unusable (bad discovery, bad JSON).
    #[error("identity provider answered unexpectedly: {0}")]
    ProviderMisconfigured(String),
    /// The pending-login store failed.
    #[error(transparent)]
    Store(#[from] PendingError),
    /// A back-channel logout token was refused.
    #[error(transparent)]
    LogoutToken(#[from] LogoutTokenError),
    /// The provider announced the end of the provider session a login came from (or
    /// logged its user out after it issued the login's ID token) while the login's
    /// callback was running: the session it made was revoked at once.
    #[error("the identity provider ended this session while the login was finishing")]
    ProviderSessionEnded,
    /// A front-channel logout request lacks `iss` or `sid`, or its `sid` cannot be one.
    #[error("{0}")]
    InvalidLogoutRequest(&'static str),
    /// A front-channel logout names an issuer no provider is configured with.
    #[error("the issuer is not a configured identity provider")]
    UnknownIssuer,
    /// Front-channel logout is not turned on for the providers of that issuer.
    #[error("front-channel logout is not enabled for this identity provider")]
    FrontchannelDisabled,
}

impl SsoError {
    /// A short machine-readable reason, for metrics and audit.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Disabled => "disabled",
            Self::UnknownProvider => "unknown_provider",
            Self::InvalidRedirect => "invalid_redirect",
            Self::InvalidState => "invalid_state",
            Self::ProviderDenied(_) => "provider_denied",
            Self::IssuerMismatch => "issuer_mismatch",
            Self::MissingCode => "missing_code",
            Self::CodeRejected(_) => "code_rejected",
            Self::NoIdToken => "no_id_token",
            Self::IdToken(_) => "invalid_id_token",
            Self::UserinfoMismatch => "userinfo_mismatch",
            Self::NoRole => "no_role",
            Self::ProviderUnavailable(_) => "provider_unavailable",
            Self::ProviderMisconfigured(_) => "provider_misconfigured",
            Self::Store(_) => "store_unavailable",
            Self::LogoutToken(_) => "invalid_logout_token",
            Self::ProviderSessionEnded => "provider_session_ended",
            Self::InvalidLogoutRequest(_) => "invalid_request",
            Self::UnknownIssuer => "unknown_issuer",
            Self::FrontchannelDisabled => "frontchannel_logout_disabled",
        }
    }
}

/// The `id_token` of a token response (OpenID Connect Core §3.1.3.3).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdTokenFields {
    /// The ID token, a JWT.
    #[serde(default)]
    pub id_token: Option<String>,
}

impl ExtraTokenFields for IdTokenFields {}

type OidcTokenResponse = StandardTokenResponse<IdTokenFields, BasicTokenType>;

type OidcClient = oauth2::Client<
    BasicErrorResponse,
    OidcTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// A started login: where to send the browser, and the `state` to bind to it. `Debug`
/// shows neither (the URL carries `state` and `nonce`).
pub struct Started {
    /// The provider's authorization URL with every parameter.
    pub authorize_url: String,
    /// The `state` (goes into the login cookie as well).
    pub state: String,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started").finish_non_exhaustive()
    }
}

/// A finished, validated login. `Debug` leaves the raw ID token out.
#[derive(Clone)]
pub struct LoggedIn {
    /// The provider's name.
    pub provider: String,
    /// The validated ID token's claims (merged with userinfo when configured).
    pub claims: IdClaims,
    /// The raw ID token (for `id_token_hint` at logout).
    pub id_token: String,
    /// Where the browser goes next.
    pub redirect: String,
    /// The groups the provider reported.
    pub groups: Vec<String>,
    /// The mapped roles (possibly none: the caller refuses).
    pub roles: Vec<Role>,
}

impl std::fmt::Debug for LoggedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggedIn")
            .field("provider", &self.provider)
            .field("sub", &self.claims.sub)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

impl LoggedIn {
    /// `<provider>:<sub>`: unique across providers.
    pub fn subject(&self) -> String {
        format!("{}:{}", self.provider, self.claims.sub)
    }
}

/// The SSO service. Cheap to clone.
#[derive(Clone)]
pub struct Sso {
    inner: Arc<Inner>,
}

struct Inner {
    providers: Vec<Arc<Provider>>,
    settings: SsoSettings,
    pending: Arc<dyn PendingStore>,
}

impl std::fmt::Debug for Sso {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sso")
            .field("providers", &self.inner.providers)
            .finish_non_exhaustive()
    }
}

impl Sso {
    /// Prepares every provider; makes no request (discovery happens at first login, so
    /// an instance starts while a provider is away).
    pub fn new(
        settings: &SsoSettings,
        public_url: &str,
        redis: Option<RedisHandle>,
    ) -> Result<Self, SsoError> {
        let providers = settings
            .providers
            .iter()
            .map(|p| Provider::new(p, settings, public_url).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let pending: Arc<dyn PendingStore> = match redis {
            Some(r) => Arc::new(RedisPendingStore::new(r, settings.key_prefix.clone())),
            None => Arc::new(MemoryPendingStore::new()),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                providers,
                settings: settings.clone(),
                pending,
            }),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &SsoSettings {
        &self.inner.settings
    }

    /// The provider called `name`; without a name, the only one configured.
    pub fn provider(&self, name: Option<&str>) -> Result<Arc<Provider>, SsoError> {
        let providers = &self.inner.providers;
        if providers.is_empty() {
            return Err(SsoError::Disabled);
        }
        match name {
            Some(n) => providers.iter().find(|p| p.settings.name == n).cloned(),
            None if providers.len() == 1 => providers.first().cloned(),
            None => None,
        }
        .ok_or(SsoError::UnknownProvider)
    }

    /// Starts a login at `provider`, returning to `redirect` (default `/`) afterwards.
    #[tracing::instrument(skip_all, fields(provider = provider.unwrap_or("-")))]
    pub async fn start(
        &self,
        provider: Option<&str>,
        redirect: Option<&str>,
    ) -> Result<Started, SsoError> {
        let redirect = match redirect {
            None | Some("") => "/".to_owned(),
            Some(r) => redirect::safe_redirect(r).ok_or(SsoError::InvalidRedirect)?,
        };
        let provider = self.provider(provider)?;
        let metadata = provider.metadata().await?;
        let client = oauth_client(&provider, &metadata)?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let nonce = CsrfToken::new_random_len(32).secret().clone();
        let mut request = client
            .authorize_url(CsrfToken::new_random)
            .set_pkce_challenge(challenge)
            .add_extra_param("nonce", nonce.clone())
            .add_scope(Scope::new("openid".to_owned()));
        for scope in &provider.settings.scopes {
            if scope != "openid" {
                request = request.add_scope(Scope::new(scope.clone()));
            }
        }
        let (url, state) = request.url();
        let pending = PendingLogin {
            provider: provider.settings.name.clone(),
            pkce_verifier: verifier.secret().clone(),
            nonce,
            redirect,
        };
        self.inner
            .pending
            .put(state.secret(), &pending, self.inner.settings.login_timeout)
            .await?;
        Ok(Started {
            authorize_url: url.to_string(),
            state: state.secret().clone(),
        })
    }

    /// Finishes a login from the callback's parameters: `state` must match the browser's
    /// login cookie and a pending login (which it consumes), the code is exchanged with
    /// the PKCE verifier, and the ID token validated against the login's nonce.
    #[tracing::instrument(skip_all)]
    pub async fn finish(
        &self,
        callback: &Callback,
        state_cookie: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<LoggedIn, SsoError> {
        let state = callback.state.as_deref().unwrap_or_default();
        // the cookie ties the login to the browser that started it (login CSRF): a
        // callback URL made elsewhere fails here, without consuming anything
        let bound = state_cookie.is_some_and(|c| {
            !state.is_empty()
                && c.len() == state.len()
                && aws_lc_rs::constant_time::verify_slices_are_equal(c.as_bytes(), state.as_bytes())
                    .is_ok()
        });
        if !bound {
            return Err(SsoError::InvalidState);
        }
        let pending = self
            .inner
            .pending
            .take(state)
            .await?
            .ok_or(SsoError::InvalidState)?;
        let provider = self.provider(Some(&pending.provider))?;
        let metadata = provider.metadata().await?;
        // RFC 9207 §2.4: `iss` is checked before anything else of the response, error
        // responses included; a provider that says it always sends `iss` must send it
        // (without it, a mix-up attacker would just leave it out)
        match &callback.iss {
            Some(iss) if *iss != metadata.issuer => return Err(SsoError::IssuerMismatch),
            None if metadata.authorization_response_iss_parameter_supported => {
                return Err(SsoError::IssuerMismatch);
            }
            _ => {}
        }
        if let Some(error) = &callback.error {
            return Err(SsoError::ProviderDenied(loggable_error_code(error)));
        }
        let code = callback.code.clone().ok_or(SsoError::MissingCode)?;
        let client = oauth_client(&provider, &metadata)?;
        let response = client
            .exchange_code(AuthorizationCode::new(code))
            .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier.clone()))
            .request_async(&provider.http)
            .await
            .map_err(|e| match e {
                oauth2::RequestTokenError::ServerResponse(r) => {
                    SsoError::CodeRejected(loggable_error_code(r.error().as_ref()))
                }
                oauth2::RequestTokenError::Request(e) => {
                    SsoError::ProviderUnavailable(e.to_string())
                }
                oauth2::RequestTokenError::Parse(e, _) => {
                    SsoError::ProviderMisconfigured(e.to_string())
                }
                oauth2::RequestTokenError::Other(e) => SsoError::ProviderMisconfigured(e),
            })?;
        let id_token = response
            .extra_fields()
            .id_token
            .clone()
            .ok_or(SsoError::NoIdToken)?;
        let expected = Expected {
            trusted: self.trusted(&provider, &metadata, now),
            nonce: &pending.nonce,
        };
        let mut claims = with_provider_keys(&provider, |jwks| {
            id_token::verify(&id_token, jwks, &expected).map_err(SsoError::from)
        })
        .await?;
        if provider.settings.userinfo
            && let Some(endpoint) = &metadata.userinfo_endpoint
        {
            merge_userinfo(
                &provider,
                endpoint,
                response.access_token().secret(),
                &mut claims,
            )
            .await?;
        }
        let groups = groups_of(&claims, &provider.settings.groups_claim);
        let identity = Identity {
            provider: provider.settings.name.clone(),
            subject: claims.sub.clone(),
            verified_email: claims
                .email
                .clone()
                .filter(|_| claims.email_verified == Some(true)),
            groups: groups.clone(),
        };
        let roles = roles::map_roles(&self.inner.settings.roles, &identity);
        Ok(LoggedIn {
            provider: provider.settings.name.clone(),
            claims,
            id_token,
            redirect: pending.redirect,
            groups,
            roles,
        })
    }
}

impl Sso {
    /// What tokens the provider signs for us must satisfy, by its discovery document.
    fn trusted<'a>(
        &'a self,
        provider: &'a Provider,
        metadata: &'a provider::Metadata,
        now: OffsetDateTime,
    ) -> Trusted<'a> {
        Trusted {
            issuer: &metadata.issuer,
            client_id: &provider.settings.client_id,
            algorithms: &provider.algorithms,
            leeway: self.inner.settings.leeway,
            now,
        }
    }

    /// Verifies a back-channel logout token (see [`logout_token`]) by the keys of the
    /// provider configured with its `iss` and client id (its `azp`, else one of its
    /// `aud`). Returns the names of every provider configured with that issuer and client
    /// id (the same provider under several names: each has its own console sessions) and
    /// whose sessions end. Nothing is revoked here, and the token is not yet marked used:
    /// see [`Sso::claim_logout`].
    #[tracing::instrument(skip_all)]
    pub async fn verify_logout_token(
        &self,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<(Vec<String>, Logout), SsoError> {
        if self.inner.providers.is_empty() {
            return Err(SsoError::Disabled);
        }
        let addressed =
            logout_token::addressed(token).ok_or(LogoutTokenError::Jwt(IdTokenError::Malformed))?;
        let named: Vec<&Arc<Provider>> = self
            .inner
            .providers
            .iter()
            .filter(|p| addressed.to(&p.settings.issuer, &p.settings.client_id))
            .collect();
        let provider = named.first().ok_or(LogoutTokenError::UnknownIssuer)?;
        let metadata = provider.metadata().await?;
        let trusted = self.trusted(provider, &metadata, now);
        let logout = with_provider_keys(provider, |jwks| {
            logout_token::verify(token, jwks, &trusted).map_err(SsoError::from)
        })
        .await?;
        // with several audiences and no `azp`, `named` may hold other clients too: the
        // verification above refused such a token, so all of `named` share the client
        let names = named
            .iter()
            .filter(|p| p.settings.client_id == provider.settings.client_id)
            .map(|p| p.settings.name.clone())
            .collect();
        Ok((names, logout))
    }

    /// Marks the logout token `jti` of `provider` used until `logout.valid_until`: `true`
    /// the first time, `false` for a replay. Shared by every instance when Redis is.
    pub async fn claim_logout(
        &self,
        provider: &str,
        logout: &Logout,
        now: OffsetDateTime,
    ) -> Result<bool, SsoError> {
        let ttl = u64::try_from(logout.valid_until.saturating_sub(now.unix_timestamp()))
            .unwrap_or_default()
            .max(1);
        Ok(self
            .inner
            .pending
            .claim(
                &logout_claim_key(provider, &logout.jti),
                std::time::Duration::from_secs(ttl),
            )
            .await?)
    }

    /// Remembers that console session `family` was logged in through the provider session
    /// `sid` of `provider`, for `ttl` (the session's longest life), so that a logout token
    /// naming only that `sid` finds it.
    pub async fn remember_provider_session(
        &self,
        provider: &str,
        sid: &str,
        family: &str,
        ttl: std::time::Duration,
    ) -> Result<(), SsoError> {
        Ok(self
            .inner
            .pending
            .index_add(&session_index_key(provider, sid), family, ttl)
            .await?)
    }

    /// The console sessions (family ids) logged in through the provider session `sid`.
    pub async fn sessions_of_provider_session(
        &self,
        provider: &str,
        sid: &str,
    ) -> Result<Vec<String>, SsoError> {
        Ok(self
            .inner
            .pending
            .index_members(&session_index_key(provider, sid))
            .await?)
    }

    /// Forgets a claim of [`Sso::claim_logout`] whose logout failed, so the provider may
    /// send the token again.
    pub async fn release_logout(&self, provider: &str, logout: &Logout) -> Result<(), SsoError> {
        Ok(self
            .inner
            .pending
            .release(&logout_claim_key(provider, &logout.jti))
            .await?)
    }
}

/// A logout a provider announced, by what it names: at least one of `sub` and `sid`.
#[derive(Debug, Clone, Copy)]
pub struct Ended<'a> {
    /// The subject at the provider (a back-channel logout token's `sub`).
    pub sub: Option<&'a str>,
    /// The provider session (`sid`).
    pub sid: Option<&'a str>,
    /// When the provider issued the logout (a logout token's `iat`, by the provider's
    /// clock); none for a front-channel logout, which names only the `sid`.
    pub issued_at: Option<i64>,
}

impl<'a> From<&'a Logout> for Ended<'a> {
    fn from(logout: &'a Logout) -> Self {
        Self {
            sub: logout.sub.as_deref(),
            sid: logout.sid.as_deref(),
            issued_at: Some(logout.issued_at),
        }
    }
}

impl Sso {
    /// Remembers a logout `provider` announced, so that a login whose callback is still
    /// running when the logout comes (its session not yet stored, so not found by the
    /// logout) ends as well: the logout is remembered here *before* the stored sessions
    /// are looked up and ended, and a callback checks it *after* storing its session (and
    /// indexing it under its `sid`), revoking the session when a logout names it.
    /// Whichever of the two comes first, the other sees it: no order leaves a session
    /// alive.
    ///
    /// What is remembered, for [`Sso::logout_memory`]:
    /// - a `sid`: that provider session ended; every login whose ID token names it ends.
    ///   No clock is compared: a provider session that ended issues no more ID tokens;
    /// - a `sub` without a `sid` (the user logged out everywhere): logins of that subject
    ///   whose ID token the provider issued before the logout's `iat` end (the provider's
    ///   clock against the provider's clock, never ours against theirs). Logins after it
    ///   are new sessions and stay, and so does one issued within the logout's own second:
    ///   the two cannot be ordered, and a user who signs in again at once must not be
    ///   refused;
    /// - a `sub` with a `sid`: as above, for logins whose ID token names no `sid` (as the
    ///   back-channel logout ends the stored sessions that recorded none).
    pub async fn remember_logout(&self, provider: &str, ended: Ended<'_>) -> Result<(), SsoError> {
        let ttl = self.logout_memory();
        let pending = &self.inner.pending;
        if let Some(sid) = ended.sid {
            pending
                .mark(&ended_session_key(provider, sid), 1, ttl)
                .await?;
        }
        if let (Some(sub), Some(at)) = (ended.sub, ended.issued_at) {
            let scope = if ended.sid.is_some() {
                LoggedOut::WithoutSid
            } else {
                LoggedOut::Every
            };
            pending
                .mark(&logged_out_key(provider, sub, scope), at, ttl)
                .await?;
        }
        Ok(())
    }

    /// Whether a logout [`Sso::remember_logout`] kept ends the login of `provider` whose ID
    /// token names `sub` and `sid` and was issued at `issued_at` (its `iat`, by the
    /// provider's clock).
    pub async fn ended_by_logout(
        &self,
        provider: &str,
        sub: &str,
        sid: Option<&str>,
        issued_at: i64,
    ) -> Result<bool, SsoError> {
        let pending = &self.inner.pending;
        let postdates = |logged_out_at: Option<i64>| logged_out_at.is_some_and(|at| issued_at < at);
        let every_key = logged_out_key(provider, sub, LoggedOut::Every);
        let every = pending.mark_of(&every_key);
        Ok(match sid {
            Some(sid) => {
                let session_key = ended_session_key(provider, sid);
                let session = pending.mark_of(&session_key);
                let (every, session) = futures::future::try_join(every, session).await?;
                // a provider session's mark ends every login that names it, whenever
                session.is_some() || postdates(every)
            }
            None => {
                let unsided_key = logged_out_key(provider, sub, LoggedOut::WithoutSid);
                let unsided = pending.mark_of(&unsided_key);
                let (every, unsided) = futures::future::try_join(every, unsided).await?;
                postdates(every) || postdates(unsided)
            }
        })
    }

    /// How long a provider's logout is remembered ([`Sso::remember_logout`]): as long as a
    /// console session made from that provider session could live
    /// (`sso.session_max_lifetime`), and never less than a login may take to finish
    /// (`sso.login_timeout`, plus `sso.leeway` of clock skew on its ID token).
    pub fn logout_memory(&self) -> std::time::Duration {
        let s = &self.inner.settings;
        s.session_max_lifetime
            .max(s.login_timeout.saturating_add(s.leeway))
    }

    /// The providers a front-channel logout from `iss` is for: every one configured with
    /// exactly that issuer and with `frontchannel_logout` on.
    pub fn frontchannel_providers(&self, iss: &str) -> Result<Vec<Arc<Provider>>, SsoError> {
        let providers = &self.inner.providers;
        if providers.is_empty() {
            return Err(SsoError::Disabled);
        }
        let of_issuer: Vec<&Arc<Provider>> = providers
            .iter()
            .filter(|p| p.settings.issuer == iss)
            .collect();
        if of_issuer.is_empty() {
            return Err(SsoError::UnknownIssuer);
        }
        let on: Vec<Arc<Provider>> = of_issuer
            .into_iter()
            .filter(|p| p.settings.frontchannel_logout)
            .cloned()
            .collect();
        if on.is_empty() {
            return Err(SsoError::FrontchannelDisabled);
        }
        Ok(on)
    }
}

/// Which logins of a subject a logout by `sub` ends (see [`Sso::remember_logout`]).
#[derive(Debug, Clone, Copy)]
enum LoggedOut {
    /// All of them (the logout named no `sid`).
    Every,
    /// Those whose ID token named no `sid` (the logout named one).
    WithoutSid,
}

/// The mark of an ended provider session.
fn ended_session_key(provider: &str, sid: &str) -> String {
    format!("ended-session\n{provider}\n{sid}")
}

/// The mark of a logout by subject: the newest such logout's `iat`. The subject comes
/// last: it is the one part that may hold anything.
fn logged_out_key(provider: &str, sub: &str, scope: LoggedOut) -> String {
    let scope = match scope {
        LoggedOut::Every => "every",
        LoggedOut::WithoutSid => "without-sid",
    };
    format!("logged-out\n{scope}\n{provider}\n{sub}")
}

/// The single-use key of a logout token: the provider and its `jti` (§2.6 point 10).
fn logout_claim_key(provider: &str, jti: &str) -> String {
    format!("logout-token\n{provider}\n{jti}")
}

/// The index of the console sessions a provider session's logins made.
fn session_index_key(provider: &str, sid: &str) -> String {
    format!("provider-session\n{provider}\n{sid}")
}

/// Runs `check` with the provider's cached JWKS and, when it names a key that set does not
/// have, once more with a fresh one: the provider may have rotated its keys.
async fn with_provider_keys<T>(
    provider: &Provider,
    check: impl Fn(&jsonwebtoken::jwk::JwkSet) -> Result<T, SsoError>,
) -> Result<T, SsoError> {
    let unknown_key = |e: &SsoError| {
        matches!(
            e,
            SsoError::IdToken(IdTokenError::UnknownKey(_))
                | SsoError::LogoutToken(LogoutTokenError::Jwt(IdTokenError::UnknownKey(_)))
        )
    };
    match check(&*provider.jwks(false).await?) {
        Err(e) if unknown_key(&e) => check(&*provider.jwks(true).await?),
        other => other,
    }
}

/// The query of `GET /auth/callback`. `Debug` leaves `code` and `state` out.
#[derive(Default)]
pub struct Callback {
    /// The authorization code.
    pub code: Option<String>,
    /// Our `state`, echoed.
    pub state: Option<String>,
    /// The issuer (RFC 9207); required when the provider's discovery advertises
    /// `authorization_response_iss_parameter_supported`.
    pub iss: Option<String>,
    /// An error instead of a code.
    pub error: Option<String>,
    /// Its description (never echoed).
    pub error_description: Option<String>,
}

impl std::fmt::Debug for Callback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callback")
            .field("iss", &self.iss)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

/// The provider name of break-glass local accounts' sessions (subjects `local:<name>`);
/// no configured provider may take it.
pub const LOCAL_PROVIDER: &str = "local";

/// What stands in the log for an `error` code that is not one.
pub const MALFORMED_ERROR_CODE: &str = "(malformed)";

/// A provider's `error` code fit for the log: as sent when it is 1-64 characters of the
/// charset RFC 6749 gives error codes (%x20-21 / %x23-5B / %x5D-7E: printable ASCII
/// without `"` and `\`), else [`MALFORMED_ERROR_CODE`]. Nothing else the provider or a
/// forged callback sends (`error_description`, `error_uri`) is kept: newlines and
/// control characters would forge log lines, and a description is free text.
pub fn loggable_error_code(raw: &str) -> String {
    let valid = (1..=64).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5B | 0x5D..=0x7E));
    if valid {
        raw.to_owned()
    } else {
        MALFORMED_ERROR_CODE.to_owned()
    }
}

fn oauth_client(
    provider: &Provider,
    metadata: &provider::Metadata,
) -> Result<OidcClient, SsoError> {
    let bad = |what: &str| SsoError::ProviderMisconfigured(format!("{what} is not a valid URL"));
    // client_secret_basic unless the provider only takes client_secret_post
    let post_only = metadata
        .token_endpoint_auth_methods_supported
        .as_ref()
        .is_some_and(|m| {
            !m.iter().any(|x| x == "client_secret_basic")
                && m.iter().any(|x| x == "client_secret_post")
        });
    let client = oauth2::Client::new(ClientId::new(provider.settings.client_id.clone()))
        .set_client_secret(ClientSecret::new(
            provider.secret.expose_secret().to_owned(),
        ))
        .set_auth_uri(
            AuthUrl::new(metadata.authorization_endpoint.clone())
                .map_err(|_| bad("authorization_endpoint"))?,
        )
        .set_token_uri(
            TokenUrl::new(metadata.token_endpoint.clone()).map_err(|_| bad("token_endpoint"))?,
        )
        .set_redirect_uri(
            RedirectUrl::new(provider.redirect_uri.clone())
                .map_err(|_| SsoError::Config("redirect_uri is not a valid URL".to_owned()))?,
        )
        .set_auth_type(if post_only {
            AuthType::RequestBody
        } else {
            AuthType::BasicAuth
        });
    Ok(client)
}

/// Userinfo (Core §5.3) with the access token; its `sub` must be the ID token's
/// (§5.3.2), and its email and groups complete or replace the ID token's.
async fn merge_userinfo(
    provider: &Provider,
    endpoint: &str,
    access_token: &str,
    claims: &mut IdClaims,
) -> Result<(), SsoError> {
    let response = provider
        .http
        .get(endpoint)
        .bearer_auth(access_token)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| SsoError::ProviderUnavailable(e.to_string()))?;
    if !response.status().is_success() {
        return Err(SsoError::ProviderUnavailable(format!(
            "userinfo answered {}",
            response.status()
        )));
    }
    let info: serde_json::Map<String, serde_json::Value> = response
        .json()
        .await
        .map_err(|e| SsoError::ProviderMisconfigured(format!("userinfo: {e}")))?;
    if info.get("sub").and_then(|s| s.as_str()) != Some(claims.sub.as_str()) {
        return Err(SsoError::UserinfoMismatch);
    }
    for (name, value) in info {
        match name.as_str() {
            "email" => claims.email = value.as_str().map(str::to_owned),
            "email_verified" => claims.email_verified = value.as_bool(),
            "name" => claims.name = value.as_str().map(str::to_owned),
            "preferred_username" => claims.preferred_username = value.as_str().map(str::to_owned),
            // the ID token's protocol claims are never overridden
            "sub" | "iss" | "aud" | "exp" | "iat" | "nbf" | "nonce" | "azp" => {}
            _ => {
                claims.extra.insert(name, value);
            }
        }
    }
    Ok(())
}

/// The groups claim: an array of strings, or one string.
fn groups_of(claims: &IdClaims, claim: &str) -> Vec<String> {
    match claims.extra.get(claim) {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(serde_json::Value::String(one)) => vec![one.clone()],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Without providers and Redis: the in-process store, no network.
    fn sso() -> Sso {
        Sso::new(&SsoSettings::default(), "https://portcullis.example", None).unwrap()
    }

    async fn ended(sso: &Sso, sub: &str, sid: Option<&str>, iat: i64) -> bool {
        sso.ended_by_logout("corp", sub, sid, iat).await.unwrap()
    }

    async fn remember(sso: &Sso, provider: &str, ended: Ended<'_>) {
        sso.remember_logout(provider, ended).await.unwrap();
    }

    #[tokio::test]
    async fn an_ended_provider_session_ends_every_login_that_names_it_whatever_its_time() {
        let sso = sso();
        assert!(!ended(&sso, "alice", Some("s-1"), 100).await);
        let front = Ended {
            sub: None,
            sid: Some("s-1"),
            issued_at: None,
        };
        remember(&sso, "corp", front).await;
        assert!(ended(&sso, "alice", Some("s-1"), 100).await);
        assert!(ended(&sso, "bob", Some("s-1"), i64::MAX).await);
        assert!(!ended(&sso, "alice", Some("s-2"), 100).await, "another sid");
        assert!(!ended(&sso, "alice", None, 100).await, "no sid");
        assert!(
            !sso.ended_by_logout("other", "alice", Some("s-1"), 100)
                .await
                .unwrap(),
            "another provider"
        );
    }

    #[tokio::test]
    async fn a_logout_by_subject_ends_the_logins_whose_id_token_it_postdates() {
        let sso = sso();
        let everywhere = Ended {
            sub: Some("alice"),
            sid: None,
            issued_at: Some(1_000),
        };
        remember(&sso, "corp", everywhere).await;
        // the provider's clock on both sides; within the logout's second, the login stays
        assert!(ended(&sso, "alice", Some("s-1"), 999).await);
        assert!(ended(&sso, "alice", None, 999).await);
        assert!(
            !ended(&sso, "alice", Some("s-1"), 1_000).await,
            "the same second"
        );
        assert!(
            !ended(&sso, "alice", Some("s-1"), 1_001).await,
            "a later login"
        );
        assert!(
            !ended(&sso, "bob", Some("s-1"), 999).await,
            "another subject"
        );
        // an older logout does not move the line back
        let older = Ended {
            issued_at: Some(10),
            ..everywhere
        };
        remember(&sso, "corp", older).await;
        assert!(ended(&sso, "alice", Some("s-1"), 999).await);
    }

    #[tokio::test]
    async fn a_logout_by_subject_and_session_ends_only_that_session_and_the_logins_without_one() {
        let sso = sso();
        let one = Ended {
            sub: Some("alice"),
            sid: Some("s-1"),
            issued_at: Some(1_000),
        };
        remember(&sso, "corp", one).await;
        assert!(ended(&sso, "alice", Some("s-1"), 5_000).await);
        assert!(
            !ended(&sso, "alice", Some("s-2"), 999).await,
            "another session"
        );
        assert!(
            ended(&sso, "alice", None, 999).await,
            "a login that named none"
        );
        assert!(!ended(&sso, "alice", None, 1_000).await, "a later one");
    }

    #[test]
    fn error_codes_of_the_rfc_charset_are_logged_as_sent() {
        for code in [
            "access_denied",
            "invalid_scope",
            "temporarily_unavailable",
            "a b!~[]",
        ] {
            assert_eq!(loggable_error_code(code), code);
        }
    }

    #[test]
    fn anything_else_is_logged_as_a_fixed_marker() {
        for bad in [
            "",
            "access_denied\nINFO forged line",
            "access_denied\r\n",
            "tab\there",
            "quote\"d",
            "back\\slash",
            "caf\u{e9}",
            "nul\0",
            "\u{1b}[31mred",
            &"x".repeat(65),
        ] {
            assert_eq!(loggable_error_code(bad), MALFORMED_ERROR_CODE, "{bad:?}");
        }
    }
}
