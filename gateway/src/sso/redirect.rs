//! Where a browser may be sent after login: same-origin relative paths only.

use std::borrow::Cow;

/// `Some(path)` when `raw` (the already query-decoded `redirect` parameter) is a plain
/// absolute path on this origin; `None` for anything a browser could read as another
/// origin: `//host`, `/\host`, schemes, control characters, and the same tricks hidden
/// behind one more layer of percent-encoding in the path (`%2F%2Fevil`).
///
/// Only the path decides where a URL goes: once it starts with one `/` and no second
/// `/` or `\`, nothing after the `?` or `#` can change the origin, so a query or
/// fragment may carry any percent-encoded byte (`%5C`, `%0A`, `%FF`, `%2F%2F`): they stay
/// encoded in `Location`. Raw backslashes, spaces and control characters are refused
/// anywhere. Characters beyond ASCII (`/jobs?q=é`, a typed letter a browser sent as
/// `%C3%A9`) are percent-encoded again as UTF-8, since a `Location` header carries ASCII
/// only.
pub fn safe_redirect(raw: &str) -> Option<String> {
    if !is_safe_path(raw) {
        return None;
    }
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    // a path that decodes to something unsafe would be unsafe for whoever decodes it
    // once more (some frameworks and proxies do)
    let once: Cow<'_, str> = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .ok()?;
    // browsers drop tabs and newlines inside URLs, so `/%09/evil` is `//evil` to them;
    // an encoded space is just a space
    if !(once.starts_with('/')
        && !once.starts_with("//")
        && !once.contains('\\')
        && !once.chars().any(char::is_control))
    {
        return None;
    }
    // control characters are refused above, so this encodes exactly the non-ASCII ones
    Some(percent_encoding::utf8_percent_encode(raw, percent_encoding::CONTROLS).to_string())
}

fn is_safe_path(p: &str) -> bool {
    p.starts_with('/')
        && !p.starts_with("//")
        && !p.contains('\\')
        && p.len() <= 2048
        && !p.chars().any(|c| c.is_control() || c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_pass() {
        for ok in [
            "/",
            "/jobs",
            "/jobs?id=3&x=%20y",
            "/a/b#frag",
            // any encoded byte in a query or fragment: it cannot leave the path
            "/logs?pattern=C%3A%5Cjobs%5Cout.log",
            "/logs?lines=a%0Ab%0D%0Ac",
            "/search?q=%FF%FE",
            "/jobs?next=%2F%2Fevil.example",
            "/jobs?next=//evil.example",
            "/jobs#%5C%0A",
        ] {
            assert_eq!(safe_redirect(ok).as_deref(), Some(ok), "{ok}");
        }
    }

    #[test]
    fn characters_beyond_ascii_are_sent_back_encoded() {
        for (given, sent) in [
            ("/jobs?q=\u{e9}", "/jobs?q=%C3%A9"),
            ("/\u{e9}t\u{e9}", "/%C3%A9t%C3%A9"),
            (
                "/search?q=\u{fffd}#\u{4e2d}",
                "/search?q=%EF%BF%BD#%E4%B8%AD",
            ),
        ] {
            assert_eq!(safe_redirect(given).as_deref(), Some(sent), "{given}");
            assert!(http::HeaderValue::from_str(sent).is_ok());
        }
    }

    #[test]
    fn other_origins_are_refused_however_written() {
        for bad in [
            "//evil.example",
            "https://evil.example",
            "/\\evil.example",
            "\\\\evil.example",
            "%2F%2Fevil.example",
            "/%2F/evil.example",
            "/%5Cevil.example",
            "/%09/evil.example",
            "/\t/evil.example",
            "/%5C%5Cevil.example?q=1",
            "/%0A/evil.example?q=1",
            "/%2F%2Fevil.example#x",
            "/jobs?q=a\\b",
            "/jobs?q=a\nb",
            "/jobs?q=a b",
            "/jobs#a\tb",
            "javascript:alert(1)",
            "evil.example",
            "",
        ] {
            assert_eq!(safe_redirect(bad), None, "{bad:?}");
        }
    }
}
