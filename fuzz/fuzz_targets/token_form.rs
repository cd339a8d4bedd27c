//! The token endpoint's request parsing on arbitrary input, everything before a client
//! or a store is consulted: the content type, HTTP Basic credentials, the strict form
//! body, then the `scope` and `resource` parameters.
//!
//! Input layout: `content-type \n authorization \n body` (missing parts are absent).
#![no_main]

use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use portcullis::clients::Audience;
use portcullis::oauth::client_auth;
use portcullis::oauth::form::Form;
use portcullis::oauth::token::{TOKEN_PARAMS, parse_form, requested_scope};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let content_type = parts.next().unwrap_or_default();
    let authorization = parts.next();
    let body = parts.next().unwrap_or_default();

    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(content_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    if let Some(Ok(v)) = authorization.map(HeaderValue::from_bytes) {
        headers.insert(header::AUTHORIZATION, v);
    }

    // the form parser alone: a name it accepts is there once, with a non-empty value,
    // and a name the endpoint does not define is never there
    if let Ok(mut form) = Form::parse(body, TOKEN_PARAMS) {
        assert!(form.get("token").is_none(), "an unknown parameter was kept");
        for name in [
            "grant_type",
            "scope",
            "client_id",
            "client_secret",
            "refresh_token",
        ] {
            if let Some(v) = form.take(name) {
                assert!(!v.is_empty(), "an empty value was kept for {name}");
                assert!(form.get(name).is_none(), "{name} was there twice");
            }
        }
    }

    let body = bytes::Bytes::copy_from_slice(body);
    let Ok(mut form) = parse_form(&headers, &body, TOKEN_PARAMS) else {
        return;
    };
    let _ = form.take("grant_type");
    if let Ok(presented) = client_auth::presented(&headers, &mut form) {
        assert!(
            !presented.client_id.is_empty(),
            "an empty client id was presented"
        );
        assert!(form.get("client_id").is_none() && form.get("client_secret").is_none());
    }
    let _ = requested_scope(&mut form);
    if let Some(resource) = form.take("resource")
        && let Ok(aud) = Audience::parse(&resource)
    {
        assert_eq!(aud.as_str(), resource, "an audience is compared exactly");
    }
});
