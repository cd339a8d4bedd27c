//! OpenID Connect Front-Channel Logout 1.0 (`GET /auth/frontchannel-logout?iss&sid`)
//! against the real oidc-provider's logins and Redis. The test provider renders no
//! front-channel iframes, so each test makes the request the provider's logout page would
//! have the browser make, with a real login's `iss` and `sid`.

use reqwest::{StatusCode, Url, header};
use secrecy::SecretString;

use super::sso::{ACCESS_COOKIE, ID_TOKEN_COOKIE, REFRESH_COOKIE, SsoFixture, error_code, live};
use super::sso_logout::{
    Store, assert_ended_by_the_provider, audited_parts, break_the_logout_mark,
    break_the_session_index_once_marked, family_of, log_in_as_test, on, record_of, sid_of,
    slow_the_part_of, twin_fixture,
};
use super::support::*;

const ALICE: &str = "alice-correct-horse";

/// An instance on Redis whose provider `test` has front-channel logout `enabled`.
async fn fixture(enabled: bool) -> SsoFixture {
    SsoFixture::start(move |c| {
        on(Store::Redis)(c);
        c.sso.providers[0].frontchannel_logout = enabled;
    })
    .await
}

/// `GET /auth/frontchannel-logout` with `query` from `client`, as a browser loads a page.
async fn frontchannel(
    f: &SsoFixture,
    client: &reqwest::Client,
    query: &[(&str, &str)],
) -> reqwest::Response {
    let mut url: Url = f.app.url("/auth/frontchannel-logout").parse().unwrap();
    url.query_pairs_mut().extend_pairs(query);
    client
        .get(url)
        .header(header::ACCEPT, "text/html")
        .send()
        .await
        .unwrap()
}

/// Logs alice in with `f`'s browser; returns her refresh token and provider session.
async fn log_in(f: &SsoFixture) -> (SecretString, String) {
    assert_eq!(f.login("alice", ALICE).await.status(), StatusCode::FOUND);
    let refresh = SecretString::from(f.cookie(REFRESH_COOKIE).unwrap());
    let sid = sid_of(f, &refresh).await;
    (refresh, sid)
}

/// `/auth/me` with only `refresh` as cookie, past the access token's life: whether the
/// session still renews.
async fn renews(f: &SsoFixture, refresh: &SecretString) -> bool {
    use secrecy::ExposeSecret;
    f.clock.advance(time::Duration::minutes(10));
    let me = f
        .cookieless_browser()
        .get(f.app.url("/auth/me"))
        .header(
            header::COOKIE,
            format!("{REFRESH_COOKIE}={}", refresh.expose_secret()),
        )
        .send()
        .await
        .unwrap();
    me.status() == StatusCode::OK
}

/// The provider's logout page frames the request with the `iss` and `sid` of a real
/// login: that login's console session ends (it no longer renews) and the browser's
/// cookies are cleared, while the same user's session of another provider session stays.
/// The page is tiny, never cached, and only the provider's origin may frame it.
#[tokio::test]
async fn a_front_channel_logout_ends_the_console_sessions_of_that_provider_session() {
    let f = fixture(true).await;
    let (here, sid) = log_in(&f).await;
    let family = family_of(&f, &here).await;
    let (other, there) = f.login_elsewhere("", "alice", ALICE).await;
    let success = "portcullis_frontchannel_logouts_total{outcome=\"success\"}";
    let before = f.app.sample(success).await;

    let issuer = f.idp.issuer();
    let done = frontchannel(
        &f,
        &f.browser,
        &[("iss", issuer.as_str()), ("sid", sid.as_str())],
    )
    .await;
    assert_eq!(done.status(), StatusCode::OK);
    let headers = done.headers().clone();
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(
        headers[header::CONTENT_SECURITY_POLICY],
        format!("default-src 'none'; frame-ancestors {issuer}").as_str(),
        "frameable by the provider's origin only"
    );
    assert!(headers.get(header::X_FRAME_OPTIONS).is_none());
    let cleared = cleared_cookies(&done);
    for cookie in [REFRESH_COOKIE, ACCESS_COOKIE, ID_TOKEN_COOKIE] {
        assert!(cleared.iter().any(|c| c == cookie), "{cookie}: {cleared:?}");
    }
    assert!(done.text().await.unwrap().contains("Signed out"));

    assert!(
        !live(&f, &here).await,
        "the provider session's console session lived on"
    );
    assert!(!renews(&f, &here).await, "the ended session renewed");
    assert!(
        live(&f, &there).await,
        "another provider session's was ended"
    );
    let other_me = other.get(f.app.url("/auth/me")).send().await.unwrap();
    assert_eq!(
        other_me.status(),
        StatusCode::OK,
        "the other session renews"
    );

    wait_for_audit_actor(
        &f.app.state,
        std::time::Duration::from_secs(10),
        "logout.frontchannel",
        "provider:test",
    )
    .await;
    let (_, target, detail) = portcullis::audit::recent(&f.app.state.db, "logout.frontchannel", 1)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(target, format!("test session {sid}"));
    let detail: serde_json::Value = serde_json::from_str(&detail).unwrap();
    assert_eq!(detail["sid"], sid.as_str());
    assert_eq!(detail["families_revoked"], serde_json::json!([family]));
    assert!(f.app.sample(success).await >= before + 1.0);
}

/// Without `iss` or `sid`, with an `iss` of no provider, or with a `sid` that cannot be
/// one: 400 with a machine-readable error, no cookie cleared, and the session renews.
/// A well-formed `sid` of no session ends nothing and clears no cookie.
#[tokio::test]
async fn a_front_channel_logout_refused_or_of_another_session_changes_nothing() {
    let f = fixture(true).await;
    let (here, sid) = log_in(&f).await;
    let issuer = f.idp.issuer();
    let slashed = format!("{issuer}/");
    let (iss, sid, slashed) = (issuer.as_str(), sid.as_str(), slashed.as_str());
    let refused: [(&[(&str, &str)], &str); 8] = [
        (&[("iss", slashed), ("sid", sid)], "unknown_issuer"),
        (
            &[("iss", "https://evil.example"), ("sid", sid)],
            "unknown_issuer",
        ),
        (&[("sid", sid)], "invalid_request"),
        (&[("iss", iss)], "invalid_request"),
        (&[("iss", iss), ("sid", "")], "invalid_request"),
        (
            &[("iss", iss), ("sid", sid), ("sid", "x")],
            "invalid_request",
        ),
        (
            &[("iss", iss), ("iss", iss), ("sid", sid)],
            "invalid_request",
        ),
        (&[("iss", iss), ("sid", "a\nb")], "invalid_request"),
    ];
    for (query, code) in refused {
        let response = frontchannel(&f, &f.browser, query).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query:?}");
        assert!(cleared_cookies(&response).is_empty(), "{query:?}");
        assert_eq!(error_code(response).await, code, "{query:?}");
    }
    assert!(live(&f, &here).await);

    let other = frontchannel(&f, &f.browser, &[("iss", iss), ("sid", "made-up")]).await;
    assert_eq!(other.status(), StatusCode::OK);
    assert!(
        cleared_cookies(&other).is_empty(),
        "a made-up sid logged the browser out"
    );
    f.assert_session_lives().await;
}

/// A provider that has not turned front-channel logout on: 403 with a machine-readable
/// error for its real `iss` and `sid`, and the session renews.
#[tokio::test]
async fn front_channel_logout_is_refused_unless_the_provider_turned_it_on() {
    let f = fixture(false).await;
    let (_, sid) = log_in(&f).await;
    let issuer = f.idp.issuer();
    let query = [("iss", issuer.as_str()), ("sid", sid.as_str())];
    let refused = frontchannel(&f, &f.browser, &query).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(cleared_cookies(&refused).is_empty());
    assert_eq!(error_code(refused).await, "frontchannel_logout_disabled");
    f.assert_session_lives().await;
}

/// A front-channel logout, like a back-channel one, also ends a login of that provider
/// session whose callback comes after it.
#[tokio::test]
async fn a_login_finishing_after_a_front_channel_logout_of_its_session_makes_no_session() {
    let f = fixture(true).await;
    let (_, sid) = log_in(&f).await;
    let callback = f.login_at_idp("?redirect=/jobs", "alice", ALICE).await;
    // from the provider's page: no cookie of ours comes along
    let issuer = f.idp.issuer();
    let query = [("iss", issuer.as_str()), ("sid", sid.as_str())];
    let done = frontchannel(&f, &f.cookieless_browser(), &query).await;
    assert_eq!(done.status(), StatusCode::OK);
    let finished = f.browser.get(callback).send().await.unwrap();
    assert_ended_by_the_provider(&f, finished, "test:alice").await;
}

/// [`twin_fixture`] with front-channel logout on under both names.
async fn frontchannel_twin_fixture() -> SsoFixture {
    twin_fixture(|c| {
        for provider in &mut c.sso.providers {
            provider.frontchannel_logout = true;
        }
    })
    .await
}

/// One provider configured under two names, both with front-channel logout on: a logout
/// whose second name's part fails at its start (the store answers an error for it)
/// answers 503 and clears no cookie; the first name's part, done, ended its session; each
/// part is audited, the failed one too though it ended nothing, every record saying the
/// logout was partial and why.
#[tokio::test]
async fn a_front_channel_logout_failing_part_way_is_audited_part_by_part() {
    let f = frontchannel_twin_fixture().await;
    let (refresh, family, sid) = log_in_as_test(&f, "alice", ALICE).await;
    break_the_logout_mark(&f, "twin", &sid).await;

    let issuer = f.idp.issuer();
    let query = [("iss", issuer.as_str()), ("sid", sid.as_str())];
    let failed = frontchannel(&f, &f.browser, &query).await;
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(cleared_cookies(&failed).is_empty());
    assert!(!live(&f, &refresh).await, "the part done ended the session");
    let records = audited_parts(&f, "logout.frontchannel").await;
    let (_, target, detail) = record_of(&records, "provider:test");
    assert_eq!(target, &format!("test session {sid}"));
    assert_eq!(detail["families_revoked"], serde_json::json!([family]));
    // the part that failed before it ended anything: tried, nothing done, and why
    let (_, twin_target, twin) = record_of(&records, "provider:twin");
    assert_eq!(twin_target, &format!("twin session {sid}"));
    assert_eq!(twin["families_revoked"], serde_json::json!([]), "{twin}");
    for detail in [detail, twin] {
        assert_eq!(detail["sid"], sid.as_str());
        assert_eq!(detail["partial"]["failed_at"], "twin", "{detail}");
        // remembering the logout, where `twin`'s part began
        assert_eq!(detail["partial"]["step"], "remember", "{detail}");
        assert_eq!(
            detail["partial"]["reason"], "login-state store is unavailable; try again shortly",
            "{detail}"
        );
    }
}

/// A front-channel logout whose every part is done, but whose last step, reading whether
/// the browser's own session was one the provider session made (to clear its cookies),
/// fails: 503, no cookie cleared, and every part's record says the logout was partial,
/// at that step; not recorded as a complete logout.
#[tokio::test]
async fn a_front_channel_logout_whose_browser_check_fails_is_audited_as_partial() {
    let f = frontchannel_twin_fixture().await;
    // the browser's own session is of another provider session: after the parts, its
    // cookies are cleared only if a read of the logout's sessions finds it there
    let (own, _, _) = log_in_as_test(&f, "alice", ALICE).await;
    let (_, other) = f
        .login_elsewhere("?provider=test&redirect=/jobs", "alice", ALICE)
        .await;
    let sid = sid_of(&f, &other).await;
    let other_family = family_of(&f, &other).await;
    // once `test`'s part is done (`twin`'s begun), the index it read cannot be read again;
    // `twin`'s part is made long enough for that to happen before the check
    slow_the_part_of(&f, "twin", &sid, 3000).await;
    let breaker = break_the_session_index_once_marked(&f, "test", "twin", &sid);

    let issuer = f.idp.issuer();
    let query = [("iss", issuer.as_str()), ("sid", sid.as_str())];
    let failed = frontchannel(&f, &f.browser, &query).await;
    breaker.await.unwrap();
    assert_eq!(
        failed.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the check read the index before it was broken: make twin's part longer"
    );
    assert!(cleared_cookies(&failed).is_empty());
    assert!(!live(&f, &other).await, "the parts ended the other session");
    assert!(
        live(&f, &own).await,
        "the browser's own session is of another"
    );

    let records = audited_parts(&f, "logout.frontchannel").await;
    let (_, _, test) = record_of(&records, "provider:test");
    assert_eq!(test["families_revoked"], serde_json::json!([other_family]));
    let (_, _, twin) = record_of(&records, "provider:twin");
    assert_eq!(twin["families_revoked"], serde_json::json!([]));
    for detail in [test, twin] {
        assert_eq!(detail["partial"]["failed_at"], "test", "{detail}");
        assert_eq!(detail["partial"]["step"], "browser_session", "{detail}");
        assert_eq!(
            detail["partial"]["reason"], "login-state store is unavailable; try again shortly",
            "{detail}"
        );
    }
}
