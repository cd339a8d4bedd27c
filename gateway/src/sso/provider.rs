//! One configured OpenID Connect provider at run time: its discovery document (fetched on
//! first use, kept once it is good), its JWKS (cached; fetched again when a token names a
//! `kid` we do not know, at most every `jwks_min_refetch`), and the HTTP client that
//! reaches it (no redirects followed, a timeout, our own rustls configuration).

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::JwkSet;
use secrecy::SecretString;
use serde::Deserialize;
use tokio::sync::{Mutex, RwLock};

use super::SsoError;
use super::settings::{ProviderSettings, SsoSettings, parse_algorithm};

/// What discovery says (OpenID Connect Discovery 1.0 §3), as far as we use it.
#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    /// Must equal the configured issuer exactly (Discovery §4.3).
    pub issuer: String,
    /// Where the browser is sent to log in.
    pub authorization_endpoint: String,
    /// Where codes are exchanged.
    pub token_endpoint: String,
    /// The provider's signing keys.
    pub jwks_uri: String,
    /// Userinfo, when the provider has one.
    #[serde(default)]
    pub userinfo_endpoint: Option<String>,
    /// RP-initiated logout, when supported.
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
    /// Client authentication methods at the token endpoint.
    #[serde(default)]
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
    /// The provider puts `iss` on every authorization response (RFC 9207 §3): then a
    /// callback without it is refused like one with another issuer.
    #[serde(default)]
    pub authorization_response_iss_parameter_supported: bool,
}

struct JwksCache {
    set: Option<Arc<JwkSet>>,
    fetched_at: Option<Instant>,
}

/// A provider, ready to use. Cheap to share behind an `Arc`.
pub struct Provider {
    /// As configured.
    pub settings: ProviderSettings,
    /// The client secret.
    pub secret: SecretString,
    /// Our callback URL registered at the provider.
    pub redirect_uri: String,
    /// Where the provider sends the browser after logout.
    pub post_logout_redirect_uri: String,
    /// Accepted ID token algorithms.
    pub algorithms: Vec<Algorithm>,
    /// The client that talks to the provider.
    pub http: reqwest::Client,
    metadata: RwLock<Option<Arc<Metadata>>>,
    jwks: Mutex<JwksCache>,
    jwks_min_refetch: Duration,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.settings.name)
            .field("issuer", &self.settings.issuer)
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// Prepares a provider from validated settings; makes no request.
    pub fn new(
        settings: &ProviderSettings,
        sso: &SsoSettings,
        public_url: &str,
    ) -> Result<Self, SsoError> {
        let base = public_url.trim_end_matches('/');
        let secret = settings.secret().map_err(SsoError::Config)?;
        let algorithms = settings
            .id_token_algorithms
            .iter()
            .map(|a| parse_algorithm(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(SsoError::Config)?;
        Ok(Self {
            redirect_uri: settings
                .redirect_uri
                .clone()
                .unwrap_or_else(|| format!("{base}/auth/callback")),
            post_logout_redirect_uri: settings
                .post_logout_redirect_uri
                .clone()
                .unwrap_or_else(|| format!("{base}/")),
            http: http_client(settings, sso.http_timeout)?,
            settings: settings.clone(),
            secret,
            algorithms,
            metadata: RwLock::new(None),
            jwks: Mutex::new(JwksCache {
                set: None,
                fetched_at: None,
            }),
            jwks_min_refetch: sso.jwks_min_refetch,
        })
    }

    /// The discovery document, fetched on first use.
    pub async fn metadata(&self) -> Result<Arc<Metadata>, SsoError> {
        if let Some(m) = self.metadata.read().await.as_ref() {
            return Ok(m.clone());
        }
        let mut slot = self.metadata.write().await;
        if let Some(m) = slot.as_ref() {
            return Ok(m.clone());
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.settings.issuer.trim_end_matches('/')
        );
        let metadata: Metadata = self.get_json(&url).await?;
        if metadata.issuer != self.settings.issuer {
            return Err(SsoError::ProviderMisconfigured(format!(
                "discovery of {} names issuer {}",
                self.settings.issuer, metadata.issuer
            )));
        }
        let metadata = Arc::new(metadata);
        *slot = Some(metadata.clone());
        Ok(metadata)
    }

    /// The JWKS: cached, or fetched when `refresh` asks for it and the last fetch (or
    /// attempt) is at least `jwks_min_refetch` old (so tokens with made-up `kid`s cannot
    /// make us hammer the provider, nor queue behind its timeouts while it is away).
    pub async fn jwks(&self, refresh: bool) -> Result<Arc<JwkSet>, SsoError> {
        let mut cache = self.jwks.lock().await;
        let fresh_enough = cache
            .fetched_at
            .is_some_and(|at| at.elapsed() < self.jwks_min_refetch);
        if let Some(set) = &cache.set
            && (!refresh || fresh_enough)
        {
            return Ok(set.clone());
        }
        // a refetch counts from when it was tried, not only from when it worked: while the
        // provider is slow or away, made-up `kid`s must not send a request each
        if cache.set.is_some() {
            cache.fetched_at = Some(Instant::now());
        }
        let metadata = self.metadata().await?;
        let set: JwkSet = self.get_json(&metadata.jwks_uri).await?;
        let set = Arc::new(set);
        cache.set = Some(set.clone());
        cache.fetched_at = Some(Instant::now());
        Ok(set)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, SsoError> {
        let response = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| SsoError::ProviderUnavailable(e.to_string()))?;
        if !response.status().is_success() {
            return Err(SsoError::ProviderUnavailable(format!(
                "{url} answered {}",
                response.status()
            )));
        }
        response
            .json::<T>()
            .await
            .map_err(|e| SsoError::ProviderMisconfigured(format!("{url}: {e}")))
    }
}

/// No redirects (a redirect from a provider endpoint is an SSRF vector), a timeout, TLS
/// by our aws-lc-rs rustls with the system roots plus the provider's own CA file.
fn http_client(
    settings: &ProviderSettings,
    timeout: Duration,
) -> Result<reqwest::Client, SsoError> {
    let tls = crate::outbound::tls_config(settings.ca_file.as_deref()).map_err(SsoError::Config)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("portcullis/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| SsoError::Config(e.to_string()))
}
