//! The time Portcullis adds to an SSO callback: `GET /auth/callback` end to end (state
//! check and take, the code exchange at the provider, JWKS lookup, ID-token validation,
//! role mapping, a refresh family and a signed access token), against the time the
//! provider's token endpoint alone takes for the same exchange. The difference is
//! Portcullis's share.
//!
//! ```sh
//! cargo bench -p portcullis --bench sso_callback                 # optimised build
//! cargo bench -p portcullis --bench sso_callback --profile dev   # reuses test builds
//! BENCH_LOGINS=200 cargo bench -p portcullis --bench sso_callback
//! ```
//!
//! The provider is the harness's Node oidc-provider on this machine; the login form is
//! driven (untimed) before each timed callback. In-process store (no Redis), SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use harness::{OidcOptions, OidcProvider};

const HASH_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn main() {
    if support::skipped() {
        return;
    }
    let logins = support::env_or("BENCH_LOGINS", 50) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(logins));
}

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        // the instance's self-signed dev certificate, on loopback
        .danger_accept_invalid_certs(true)
        .no_proxy()
        .build()
        .unwrap()
}

fn report(what: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "{what:<40} n={:<4} median {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        samples.len(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.9).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3,
    );
    at(0.5)
}

async fn run(logins: usize) {
    let port = harness::free_port();
    let public = format!("https://localhost:{port}");
    let options = OidcOptions {
        redirect_uris: vec![format!("{public}/auth/callback")],
        post_logout_redirect_uris: vec![format!("{public}/")],
        ..OidcOptions::default()
    };
    let idp = OidcProvider::start(options.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = portcullis::dev::ensure_certificate(dir.path()).unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\n\
         public_url = \"{public}\"\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\n[database]\nurl = \"sqlite://{}/p.db\"\n\
         [tokens]\nhash_key = \"{HASH_KEY}\"\n[log]\nlevel = \"warn\"\n\
         [keys]\nsource = \"file\"\nfile_dir = \"{}\"\n\
         [protection.auth_rate]\nburst = 1000000\nreplenish_every = \"1us\"\n\
         [[sso.providers]]\nname = \"test\"\nissuer = \"{}\"\nclient_id = \"{}\"\n\
         client_secret = \"{}\"\nscopes = [\"openid\", \"email\", \"groups\"]\n\
         [[sso.roles]]\nrole = \"admin\"\ngroups = [\"scheduler-admins\"]\n",
        cert.display(),
        key.display(),
        dir.path().display(),
        dir.path().display(),
        idp.issuer(),
        options.client_id,
        options.client_secret,
    );
    let config =
        portcullis::config::from_table(toml::from_str(&text).unwrap(), support::portcullis_env())
            .unwrap();
    let app = portcullis::app::Application::build(config).await.unwrap();
    let state = app.state().clone();
    let stop = app.shutdown_token();
    tokio::spawn(app.run_until_stopped());
    while !(state.db.is_migrated() && state.keys.readiness().is_ok()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // warm-up: discovery and JWKS are fetched once, then cached
    let mut callbacks = Vec::with_capacity(logins);
    let mut round_trips = Vec::with_capacity(logins);
    for i in 0..=logins {
        let client = browser();
        let round = Instant::now();
        let callback = idp
            .browser_login(
                &client,
                &format!("{public}/auth/login"),
                "alice",
                "alice-correct-horse",
            )
            .await
            .unwrap();
        let started = Instant::now();
        let response = client.get(callback).send().await.unwrap();
        let took = started.elapsed();
        assert_eq!(response.status(), 302);
        if i > 0 {
            callbacks.push(took);
            // /auth/login, the provider's form and consent, the callback
            round_trips.push(round.elapsed());
        }
    }

    // the provider's share: the same code exchange, straight at its token endpoint
    let mut exchanges = Vec::with_capacity(logins);
    let redirect = options.redirect_uris[0].clone();
    for _ in 0..logins {
        let (verifier, challenge) = harness::pkce_s256();
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", &options.client_id)
            .append_pair("response_type", "code")
            .append_pair("scope", "openid email groups")
            .append_pair("redirect_uri", &redirect)
            .append_pair("state", "bench-state-0123")
            .append_pair("nonce", "bench-nonce-0123")
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256")
            .finish();
        let client = harness::browser_client().unwrap();
        let callback = idp
            .browser_login(
                &client,
                &format!("{}/auth?{query}", idp.issuer()),
                "alice",
                "alice-correct-horse",
            )
            .await
            .unwrap();
        let code = callback
            .query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .unwrap();
        let started = Instant::now();
        let response = client
            .post(format!("{}/token", idp.issuer()))
            .basic_auth(&options.client_id, Some(&options.client_secret))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", redirect.as_str()),
                ("code_verifier", verifier.as_str()),
            ])
            .send()
            .await
            .unwrap();
        let _ = response.bytes().await.unwrap();
        exchanges.push(started.elapsed());
    }

    report("full login round trip", round_trips);
    let total = report("GET /auth/callback (end to end)", callbacks);
    let provider = report("provider token endpoint alone", exchanges);
    println!(
        "Portcullis's share of a callback (median difference): {:.2} ms",
        (total.as_secs_f64() - provider.as_secs_f64()) * 1e3
    );
    stop.cancel();
}
