//! The OIDC provider: discovery and JWKS, and a full authorization-code + PKCE login
//! driven through its HTML forms like a browser.

use std::collections::HashMap;
use std::sync::OnceLock;

use harness::{OidcOptions, OidcProvider, TEST_USERS, TestUser, browser_client, pkce_s256};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reqwest::Url;
use serde::Deserialize;

const REDIRECT_URI: &str = "http://127.0.0.1:9/auth/callback";
const POST_LOGOUT_URI: &str = "http://127.0.0.1:9/signed-out";

/// One provider for this module's tests (each test logs in with its own cookie jar).
fn provider() -> &'static OidcProvider {
    static PROVIDER: OnceLock<OidcProvider> = OnceLock::new();
    PROVIDER.get_or_init(|| {
        OidcProvider::start(OidcOptions {
            redirect_uris: vec![REDIRECT_URI.into()],
            post_logout_redirect_uris: vec![POST_LOGOUT_URI.into()],
            ..OidcOptions::default()
        })
        .expect("the OIDC provider starts")
    })
}

#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    end_session_endpoint: String,
    code_challenge_methods_supported: Vec<String>,
    id_token_signing_alg_values_supported: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    id_token: String,
    access_token: String,
    refresh_token: Option<String>,
    token_type: String,
}

#[derive(Debug, Deserialize)]
struct IdClaims {
    iss: String,
    sub: String,
    aud: String,
    nonce: String,
    email: String,
    email_verified: bool,
    name: String,
    groups: Vec<String>,
}

async fn discovery(http: &reqwest::Client, idp: &OidcProvider) -> Discovery {
    http.get(idp.discovery_url())
        .send()
        .await
        .expect("discovery request")
        .error_for_status()
        .expect("discovery 200")
        .json()
        .await
        .expect("discovery JSON")
}

async fn jwks(http: &reqwest::Client, uri: &str) -> JwkSet {
    http.get(uri)
        .send()
        .await
        .expect("jwks request")
        .json()
        .await
        .expect("a JWK set")
}

fn authorize_url(disc: &Discovery, client_id: &str, challenge: &str, scope: &str) -> Url {
    Url::parse_with_params(
        &disc.authorization_endpoint,
        &[
            ("client_id", client_id),
            ("response_type", "code"),
            ("scope", scope),
            ("redirect_uri", REDIRECT_URI),
            ("state", "state-123"),
            ("nonce", "nonce-456"),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ],
    )
    .expect("an authorization URL")
}

fn query(url: &Url) -> HashMap<String, String> {
    url.query_pairs().into_owned().collect()
}

/// Logs `user` in and exchanges the code; returns the token response.
async fn log_in(
    idp: &OidcProvider,
    client_id: &str,
    user: &TestUser,
) -> (TokenResponse, Discovery) {
    let browser = browser_client().expect("a browser client");
    let disc = discovery(&browser, idp).await;
    let (verifier, challenge) = pkce_s256();
    let start = authorize_url(&disc, client_id, &challenge, "openid email profile groups");

    let callback = idp
        .browser_login(&browser, start.as_str(), user.username, user.password)
        .await
        .expect("the browser login reaches the redirect_uri");

    assert!(callback.as_str().starts_with(REDIRECT_URI), "{callback}");
    let params = query(&callback);
    assert_eq!(params.get("state").map(String::as_str), Some("state-123"));
    assert_eq!(params.get("iss"), Some(&idp.issuer()));
    let code = params.get("code").expect("a code in the callback");

    let opts = idp.options();
    let tokens: TokenResponse = browser
        .post(&disc.token_endpoint)
        .basic_auth(client_id, Some(&opts.client_secret))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT_URI),
            ("code_verifier", &verifier),
        ])
        .send()
        .await
        .expect("token request")
        .error_for_status()
        .expect("token 200")
        .json()
        .await
        .expect("token JSON");
    (tokens, disc)
}

fn verify_id_token(
    token: &str,
    keys: &JwkSet,
    alg: Algorithm,
    idp: &OidcProvider,
    aud: &str,
) -> IdClaims {
    let header = jsonwebtoken::decode_header(token).expect("a JWT header");
    assert_eq!(header.alg, alg);
    let kid = header.kid.expect("a kid");
    let jwk = keys.find(&kid).expect("the signing key is in the JWKS");
    let mut validation = Validation::new(alg);
    validation.set_issuer(&[idp.issuer()]);
    validation.set_audience(&[aud]);
    jsonwebtoken::decode::<IdClaims>(
        token,
        &DecodingKey::from_jwk(jwk).expect("a decoding key"),
        &validation,
    )
    .expect("the ID token verifies against the JWKS")
    .claims
}

#[tokio::test]
async fn discovery_points_to_a_jwks_with_rsa_and_ec_signing_keys() {
    let idp = provider();
    let http = browser_client().expect("client");

    let disc = discovery(&http, idp).await;
    assert_eq!(disc.issuer, idp.issuer());
    assert_eq!(disc.code_challenge_methods_supported, ["S256"]);
    assert!(disc.end_session_endpoint.starts_with(&idp.issuer()));
    for alg in ["RS256", "ES256"] {
        assert!(
            disc.id_token_signing_alg_values_supported
                .iter()
                .any(|a| a == alg),
            "{alg}"
        );
    }

    let keys = jwks(&http, &disc.jwks_uri).await;
    let kty: Vec<String> = keys
        .keys
        .iter()
        .map(|k| format!("{:?}", k.algorithm))
        .collect();
    assert_eq!(keys.keys.len(), 2, "{kty:?}");
    assert!(keys.keys.iter().all(|k| k.common.key_id.is_some()));
}

#[tokio::test]
async fn code_flow_with_pkce_yields_a_verified_id_token_with_groups() {
    let idp = provider();
    let alice = TestUser::named("alice").expect("alice");

    let (tokens, disc) = log_in(idp, &idp.options().client_id, alice).await;

    assert_eq!(tokens.token_type, "Bearer");
    assert!(!tokens.access_token.is_empty());
    let keys = jwks(&browser_client().expect("client"), &disc.jwks_uri).await;
    let claims = verify_id_token(
        &tokens.id_token,
        &keys,
        Algorithm::RS256,
        idp,
        &idp.options().client_id,
    );
    assert_eq!(claims.iss, idp.issuer());
    assert_eq!(claims.aud, idp.options().client_id);
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.nonce, "nonce-456");
    assert_eq!(claims.email, "alice@example.com");
    assert!(claims.email_verified);
    assert_eq!(claims.name, "Alice");
    assert_eq!(claims.groups, ["scheduler-admins"]);

    // The refresh token the client is allowed to get works once.
    let refresh = tokens.refresh_token.expect("a refresh token");
    let refreshed: serde_json::Value = reqwest::Client::new()
        .post(&disc.token_endpoint)
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", &idp.options().client_id),
            ("client_secret", &idp.options().client_secret),
        ])
        .send()
        .await
        .expect("refresh request")
        .json()
        .await
        .expect("refresh JSON");
    assert!(refreshed["access_token"].is_string(), "{refreshed}");
}

#[tokio::test]
async fn es256_client_gets_es256_id_tokens_for_users_without_groups() {
    let idp = provider();
    let carol = TestUser::named("carol").expect("carol");
    let client_id = format!("{}-es256", idp.options().client_id);

    let (tokens, disc) = log_in(idp, &client_id, carol).await;

    let keys = jwks(&browser_client().expect("client"), &disc.jwks_uri).await;
    let claims = verify_id_token(&tokens.id_token, &keys, Algorithm::ES256, idp, &client_id);
    assert_eq!(claims.sub, "carol");
    assert_eq!(claims.email, "carol@contractor.example");
    assert!(claims.groups.is_empty());
}

#[tokio::test]
async fn wrong_password_is_rejected_by_the_login_form() {
    let idp = provider();
    let browser = browser_client().expect("client");
    let disc = discovery(&browser, idp).await;
    let (_, challenge) = pkce_s256();
    let start = authorize_url(&disc, &idp.options().client_id, &challenge, "openid");

    let err = idp
        .browser_login(&browser, start.as_str(), "bob", "not-bobs-password")
        .await
        .expect_err("a wrong password must not log in");

    assert!(
        matches!(err, harness::HarnessError::LoginRejected(_)),
        "{err}"
    );
    assert!(
        err.to_string().contains("Invalid username or password"),
        "{err}"
    );
}

#[tokio::test]
async fn authorization_without_pkce_is_refused() {
    let idp = provider();
    let browser = browser_client().expect("client");
    let disc = discovery(&browser, idp).await;
    let mut start = Url::parse(&disc.authorization_endpoint).expect("url");
    start
        .query_pairs_mut()
        .append_pair("client_id", &idp.options().client_id)
        .append_pair("response_type", "code")
        .append_pair("scope", "openid")
        .append_pair("redirect_uri", REDIRECT_URI)
        .append_pair("state", "s");

    let response = browser
        .get(start)
        .send()
        .await
        .expect("authorization request");

    assert!(response.status().is_redirection(), "{}", response.status());
    let location = response.headers()["location"].to_str().expect("ascii");
    let location = Url::parse(location).expect("absolute redirect");
    let params = query(&location);
    assert_eq!(
        params.get("error").map(String::as_str),
        Some("invalid_request"),
        "{location}"
    );
    assert!(params["error_description"].contains("PKCE"), "{location}");
}

#[tokio::test]
async fn logout_ends_the_session_and_returns_to_the_client() {
    let idp = provider();
    let bob = TestUser::named("bob").expect("bob");
    let browser = browser_client().expect("client");
    let disc = discovery(&browser, idp).await;
    let (verifier, challenge) = pkce_s256();
    let client_id = idp.options().client_id.clone();
    let callback = idp
        .browser_login(
            &browser,
            authorize_url(&disc, &client_id, &challenge, "openid").as_str(),
            bob.username,
            bob.password,
        )
        .await
        .expect("login");
    let tokens: TokenResponse = browser
        .post(&disc.token_endpoint)
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", &query(&callback)["code"]),
            ("redirect_uri", REDIRECT_URI),
            ("code_verifier", &verifier),
            ("client_id", &client_id),
            ("client_secret", &idp.options().client_secret),
        ])
        .send()
        .await
        .expect("token request")
        .json()
        .await
        .expect("token JSON");

    // While the session lives, a second authorization skips the login form.
    let (_, challenge2) = pkce_s256();
    let again = idp
        .browser_login(
            &browser,
            authorize_url(&disc, &client_id, &challenge2, "openid").as_str(),
            "",
            "",
        )
        .await
        .expect("silent re-authorization");
    assert!(query(&again).contains_key("code"), "{again}");

    let end = Url::parse_with_params(
        &disc.end_session_endpoint,
        &[
            ("id_token_hint", tokens.id_token.as_str()),
            ("post_logout_redirect_uri", POST_LOGOUT_URI),
            ("state", "bye"),
        ],
    )
    .expect("end session URL");
    let back = idp
        .browser_logout(&browser, end.as_str())
        .await
        .expect("logout reaches the post-logout URI");
    assert!(back.as_str().starts_with(POST_LOGOUT_URI), "{back}");
    assert_eq!(query(&back).get("state").map(String::as_str), Some("bye"));

    // After logout the provider asks for credentials again.
    let (_, challenge3) = pkce_s256();
    let err = idp
        .browser_login(
            &browser,
            authorize_url(&disc, &client_id, &challenge3, "openid").as_str(),
            "",
            "",
        )
        .await
        .expect_err("the session is gone, so empty credentials are refused");
    assert!(
        matches!(err, harness::HarnessError::LoginRejected(_)),
        "{err}"
    );
}

#[tokio::test]
async fn restart_keeps_the_signing_keys() {
    let idp = OidcProvider::start(OidcOptions::default()).expect("a provider");
    let http = browser_client().expect("client");
    let before = jwks(&http, &format!("{}/jwks", idp.issuer())).await;

    idp.restart().expect("restart");

    // A new client: the old one's pooled connection died with the old process.
    let http = browser_client().expect("client");
    let after = jwks(&http, &format!("{}/jwks", idp.issuer())).await;
    let kids = |set: &JwkSet| -> Vec<Option<String>> {
        set.keys.iter().map(|k| k.common.key_id.clone()).collect()
    };
    assert_eq!(kids(&before), kids(&after));
}

#[test]
fn test_users_cover_admins_operators_and_outsiders() {
    let groups: Vec<&[&str]> = TEST_USERS.iter().map(|u| u.groups).collect();
    assert!(groups.contains(&&["scheduler-admins"][..]));
    assert!(groups.contains(&&["scheduler-operators"][..]));
    assert!(groups.iter().any(|g| g.is_empty()));
}
