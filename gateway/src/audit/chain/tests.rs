#![allow(clippy::unwrap_used)]
use super::*;

/// The published test vector (docs/operations/audit.md): an auditor's own
/// implementation must give the same hash.
#[test]
fn the_version_1_encoding_matches_the_documented_vector() {
    let h = record_hash(
        1,
        GENESIS,
        1_764_460_800_000,
        "client:svc-orders",
        "token.issue",
        "5f0c2f6e-0000-4000-8000-000000000001",
        Some("192.0.2.7"),
        r#"{"grant":"client_credentials","scope":"jobs:run"}"#,
    );
    // computed independently (Python's hashlib, as in the documentation)
    assert_eq!(
        h,
        "897e50b19d1db75a38ef7e016d5883bbd20a30d7fee61c2a196db1329dd91cad"
    );
}

#[test]
fn copy_names_the_columns_in_row_order_and_escapes_what_would_end_a_field() {
    let listed = COPY
        .trim_start_matches("COPY audit_events (")
        .trim_end_matches(") FROM STDIN");
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(words(listed), words(COLUMNS));

    let mut e = event("a\tb");
    e.actor = "x\\y\nz\r".to_owned();
    let rows = chain_after(0, GENESIS.to_owned(), &[e]);
    let text = copy_text(&rows);
    assert_eq!(text.matches('\n').count(), 1, "one line per row: {text:?}");
    let fields: Vec<&str> = text.trim_end_matches('\n').split('\t').collect();
    assert_eq!(fields.len(), 10, "{text:?}");
    assert_eq!(fields[2], "x\\\\y\\nz\\r");
    assert_eq!(fields[3], "a\\tb");
    assert_eq!(fields[5], "\\N", "no source address is NULL");
}

/// [`copy_field`] as it was first written, a character at a time: the reference the
/// run-copying one must match byte for byte.
fn copy_field_by_char(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\t');
}

/// Pieces a field is made of: the four escaped characters, text that looks like an
/// escape already, other control characters, multi-byte UTF-8 of every length,
/// characters whose code point ends in the byte of one of the four (U+015C, U+0109,
/// U+010A, U+0D0D: what a scan of truncated code points would mistake for them),
/// printable ASCII runs, and any character at all.
fn piece() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    prop_oneof![
        4 => proptest::sample::select(vec![
            "\\", "\t", "\n", "\r", "\\N", "\\\\", "\\t", "\r\n", "\0", "\u{b}", "\u{c}",
            "\u{7f}", "é", "ß", "日本", "\u{FFFD}", "\u{85}", "\u{2028}", "\u{10FFFF}",
            "🦀", "\u{15C}", "\u{109}", "\u{10A}", "\u{D0D}", "\"", "a", "{}", " ",
        ])
        .prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
        1 => "[ -~]{0,64}",
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 2_000,
        ..proptest::prelude::ProptestConfig::default()
    })]

    #[test]
    fn a_copy_field_is_byte_for_byte_what_escaping_each_character_gives(
        pieces in proptest::collection::vec(piece(), 0..48),
        before in "[a-z\t]{0,3}",
    ) {
        let value = pieces.concat();
        // appended after what is already in the buffer, as in a row
        let (mut runs, mut chars) = (before.clone(), before);
        copy_field(&mut runs, &value);
        copy_field_by_char(&mut chars, &value);
        proptest::prop_assert_eq!(runs, chars, "{:?}", value);
    }
}

#[test]
fn a_copy_field_escapes_at_its_start_its_end_and_between_multi_byte_characters() {
    for (value, expected) in [
        ("", "\t"),
        ("\\", "\\\\\t"),
        ("\t\n\r", "\\t\\n\\r\t"),
        ("\ra", "\\ra\t"),
        ("a\n", "a\\n\t"),
        ("日\\本🦀\tx", "日\\\\本🦀\\tx\t"),
        ("\\N", "\\\\N\t"),
    ] {
        let mut out = String::new();
        copy_field(&mut out, value);
        assert_eq!(out, expected, "{value:?}");
    }
}

#[test]
fn a_nul_in_any_field_is_stored_and_hashed_as_a_replacement_character() {
    let mut e = event("act\0ion");
    e.actor = "user:local:\0".to_owned();
    e.target = "a\0b\0".to_owned();
    e.source_ip = Some("\0".to_owned());
    e.detail = serde_json::json!({ "k\0": ["\0", "x\0y"] }).into();
    let rows = chain_after(0, GENESIS.to_owned(), &[e]);
    let r = &rows[0];
    assert_eq!(r.actor, "user:local:\u{FFFD}");
    assert_eq!(r.action, "act\u{FFFD}ion");
    assert_eq!(r.target, "a\u{FFFD}b\u{FFFD}");
    assert_eq!(r.source_ip.as_deref(), Some("\u{FFFD}"));
    assert_eq!(r.detail, "{\"k\u{FFFD}\":[\"\u{FFFD}\",\"x\u{FFFD}y\"]}");
    assert_eq!(r.expected_hash(), r.hash, "hashed as stored");
    assert!(!copy_text(&rows).contains('\0'));
}

#[test]
fn a_nul_in_a_detail_is_replaced_and_the_detail_stays_canonical() {
    for value in [
        serde_json::json!({ "a": "\0", "b": "\\u0000", "c": "\\\0", "d": "\u{1}\"\\" }),
        serde_json::json!(["\\\\u0000\0", { "\0": null }, "plain", 1]),
        serde_json::json!({ "nothing": "to do", "grüße": "日本" }),
        // a replaced key sorts after "b" now
        serde_json::json!({ "\0": 1, "b": { "\0x": 2, "a": 3 } }),
    ] {
        let text = serde_json::to_string(&value).unwrap();
        // the canonical text of the value with U+FFFD for each NUL
        let expected = serde_json::to_string(&with_nul_replaced(value)).unwrap();
        assert_eq!(storable_json(&text), expected, "{text}");
    }
    // nothing to replace: borrowed, not copied
    assert!(matches!(
        storable_json(r#"{"a":"\\u0000"}"#),
        Cow::Borrowed(_)
    ));
    assert!(matches!(storable_json("{}"), Cow::Borrowed(_)));
}

/// `value` with every NUL in its strings and keys replaced by U+FFFD.
fn with_nul_replaced(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(s.replace('\0', "\u{FFFD}")),
        Value::Array(a) => Value::Array(a.into_iter().map(with_nul_replaced).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (k.replace('\0', "\u{FFFD}"), with_nul_replaced(v)))
                .collect(),
        ),
        other => other,
    }
}

fn event(action: &str) -> AuditEvent {
    AuditEvent {
        at: time::OffsetDateTime::from_unix_timestamp(1_764_460_800).unwrap(),
        actor: "operator:test".to_owned(),
        action: action.to_owned(),
        target: "t".to_owned(),
        source_ip: None,
        detail: serde_json::json!({ "b": 1, "a": [true] }).into(),
    }
}

#[test]
fn a_chained_batch_verifies_and_each_kind_of_damage_is_named() {
    let rows = chain_after(0, GENESIS.to_owned(), &[event("a"), event("b"), event("c")]);
    let walk = |rows: &[Row]| {
        let mut w = Walk::new();
        for r in rows {
            w.step(r)?;
        }
        w.finish(3, &rows[2].hash)
    };
    assert_eq!(walk(&rows), Ok(()));
    assert_eq!(
        rows[0].detail, r#"{"a":[true],"b":1}"#,
        "keys sorted, compact"
    );

    let mut altered = rows.clone();
    altered[1].detail = r#"{"a":[false],"b":1}"#.to_owned();
    assert_eq!(walk(&altered), Err(ChainBreak::HashMismatch { seq: 2 }));

    let mut relinked = rows.clone();
    relinked[1].prev_hash = GENESIS.to_owned();
    relinked[1].hash = relinked[1].expected_hash();
    assert_eq!(walk(&relinked), Err(ChainBreak::PrevMismatch { seq: 2 }));

    let deleted = [rows[0].clone(), rows[2].clone()];
    assert_eq!(walk(&deleted), Err(ChainBreak::Gap { seq: 2, next: 3 }));

    let mut w = Walk::new();
    w.step(&rows[0]).unwrap();
    w.step(&rows[1]).unwrap();
    assert_eq!(
        w.finish(3, &rows[2].hash),
        Err(ChainBreak::Truncated { head: 3, last: 2 })
    );
    assert_eq!(ChainBreak::Truncated { head: 3, last: 2 }.seq(), Some(3));
}
