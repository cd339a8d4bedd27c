//! `{{NAME}}` placeholders in configuration templates (nginx, gateway configs).

use crate::{HarnessError, Result};

/// Replaces every `{{NAME}}` in `template` with its value from `vars`.
///
/// `NAME` is letters, digits and `_` (spaces inside the braces are allowed). Fails with
/// [`HarnessError::Template`] naming every placeholder that has no value, so a template
/// never reaches a server half-filled. Text like `{{ not a name }}` is left alone.
pub fn render_template(template: &str, vars: &[(&str, String)]) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut missing: Vec<String> = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after_open = &rest[start + 2..];
        let Some(end) = after_open.find("}}") else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let name = after_open[..end].trim();
        let is_name =
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !is_name {
            out.push_str("{{");
            rest = after_open;
            continue;
        }
        match vars.iter().find(|(k, _)| *k == name) {
            Some((_, value)) => out.push_str(value),
            None => {
                if !missing.iter().any(|m| m == name) {
                    missing.push(name.to_owned());
                }
            }
        }
        rest = &after_open[end + 2..];
    }
    out.push_str(rest);
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(HarnessError::Template { missing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_every_placeholder() {
        let out = render_template(
            "listen {{PORT}}; proxy_pass http://127.0.0.1:{{ UPSTREAM }}; again {{PORT}}",
            &[("PORT", "80".into()), ("UPSTREAM", "9000".into())],
        );
        assert_eq!(
            out.ok().as_deref(),
            Some("listen 80; proxy_pass http://127.0.0.1:9000; again 80")
        );
    }

    #[test]
    fn names_unfilled_placeholders() {
        let err = render_template("{{A}} {{B}} {{A}}", &[]);
        match err {
            Err(HarnessError::Template { missing }) => assert_eq!(missing, ["A", "B"]),
            other => panic!("expected a template error, got {other:?}"),
        }
    }

    #[test]
    fn leaves_non_placeholders_alone() {
        let out = render_template("a {{ x y }} b {{", &[]);
        assert_eq!(out.ok().as_deref(), Some("a {{ x y }} b {{"));
    }
}
