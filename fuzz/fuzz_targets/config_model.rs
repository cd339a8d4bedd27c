//! The config center's names and values on arbitrary input: environment, application and
//! key names, values in each declared format, gray-release labels and change-feed
//! payloads.
//!
//! Besides not panicking (or exhausting memory), whatever is accepted must keep the
//! promises the rest of the system builds on: no name can climb out of its place in a
//! path, and an accepted JSON value is JSON.
#![no_main]

use config_center::feed::ReleaseEvent;
use config_center::model::{AppName, ConfigEntry, ConfigKey, Environments, Format, GraySelector};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    environment: &'a str,
    application: &'a str,
    key: &'a str,
    value: &'a str,
    format: u8,
    secret: bool,
    labels: &'a str,
    notification: &'a str,
}

/// A name that may appear in a URL path or a file name stays inside its segment.
fn assert_contained(what: &str, name: &str) {
    assert!(!name.is_empty(), "empty {what} accepted");
    assert!(!name.contains(".."), "{what} with `..` accepted: {name:?}");
    assert!(
        !name.contains(['/', '\\']),
        "{what} with a separator accepted: {name:?}"
    );
    assert!(
        name.is_ascii() && !name.chars().any(|c| c.is_ascii_control() || c == ' '),
        "{what} with an odd character accepted: {name:?}"
    );
}

fuzz_target!(|input: Input<'_>| {
    let envs = Environments::default();
    if let Ok(env) = envs.parse(input.environment) {
        assert!(
            ["dev", "test", "prod"].contains(&env.as_str()),
            "unknown environment accepted"
        );
    }
    if let Ok(app) = AppName::parse(input.application) {
        assert_contained("application", app.as_str());
    }
    if let Ok(key) = ConfigKey::parse(input.key) {
        assert_contained("key", key.as_str());
    }
    let format = [
        Format::Properties,
        Format::Yaml,
        Format::Json,
        Format::Plain,
    ][usize::from(input.format % 4)];
    if let Ok(entry) = ConfigEntry::parse(input.key, input.value, format, input.secret) {
        assert!(!entry.value.expose().contains('\0'), "a NUL was accepted");
        if format == Format::Json {
            assert!(serde_json::from_str::<serde_json::Value>(entry.value.expose()).is_ok());
        }
        // a value never shows in its Debug form: where its text does appear there, it
        // appears as well with any other value (a value equal to the key, say)
        let debug = format!("{entry:?}");
        let value = entry.value.expose();
        if !value.is_empty() && debug.contains(value) {
            let twin = ConfigEntry::parse(input.key, "0", format, input.secret)
                .map(|e| format!("{e:?}"))
                .unwrap_or_default();
            assert!(twin.contains(value), "a value reached Debug: {debug}");
        }
    }
    if let Ok(labels) = GraySelector::parse_labels(input.labels) {
        for (k, v) in &labels {
            assert_contained("label name", k);
            assert_contained("label value", v);
        }
        let _ = GraySelector::new(Vec::new(), labels);
    }
    if let Some(event) = ReleaseEvent::parse(input.notification) {
        assert_contained("application", event.application.as_str());
    }
});
