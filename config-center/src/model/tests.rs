use super::*;

#[test]
fn names_that_could_traverse_a_path_are_refused() {
    for bad in ["..", "a..b", "a/b", "a\\b", "../etc"] {
        let err = AppName::parse(bad).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::PathTraversal {
                    field: Field::Application,
                    ..
                }
            ),
            "{bad}: {err}"
        );
        let err = ConfigKey::parse(bad).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::PathTraversal {
                    field: Field::Key,
                    ..
                }
            ),
            "{bad}: {err}"
        );
    }
}

#[test]
fn control_and_non_ascii_characters_are_refused_with_their_position() {
    assert_eq!(
        ConfigKey::parse("db\u{7}url").unwrap_err(),
        ModelError::BadCharacter {
            field: Field::Key,
            what: "a control character",
            at: 2
        }
    );
    // Cyrillic 'а' looks like Latin 'a'
    assert_eq!(
        AppName::parse("\u{430}dmin").unwrap_err(),
        ModelError::BadCharacter {
            field: Field::Application,
            what: "a non-ASCII character",
            at: 0
        }
    );
    assert!(matches!(
        ConfigKey::parse("db url").unwrap_err(),
        ModelError::BadCharacter {
            what: "whitespace",
            ..
        }
    ));
}

#[test]
fn empty_and_over_long_names_are_refused() {
    assert_eq!(
        ConfigKey::parse("").unwrap_err(),
        ModelError::Empty { field: Field::Key }
    );
    let long = "a".repeat(MAX_KEY_LEN + 1);
    assert_eq!(
        ConfigKey::parse(&long).unwrap_err(),
        ModelError::TooLong {
            field: Field::Key,
            len: MAX_KEY_LEN + 1,
            max: MAX_KEY_LEN
        }
    );
    assert!(ConfigKey::parse(&"a".repeat(MAX_KEY_LEN)).is_ok());
    assert!(matches!(
        AppName::parse(&"b".repeat(MAX_APP_NAME_LEN + 1)).unwrap_err(),
        ModelError::TooLong {
            field: Field::Application,
            ..
        }
    ));
}

#[test]
fn ordinary_names_parse() {
    assert_eq!(
        AppName::parse("executor-orders").unwrap().as_str(),
        "executor-orders"
    );
    assert!(AppName::parse("xxl-job-admin").is_ok());
    assert!(ConfigKey::parse("spring.datasource.url").is_ok());
    assert!(ConfigKey::parse("list[0]:name").is_ok());
    assert!(ConfigKey::parse(".hidden").is_err());
}

#[test]
fn only_configured_environments_parse() {
    let envs = Environments::default();
    assert_eq!(envs.parse("prod").unwrap().as_str(), "prod");
    assert!(matches!(
        envs.parse("staging").unwrap_err(),
        ModelError::UnknownEnvironment { .. }
    ));
    assert!(matches!(
        envs.parse("Prod").unwrap_err(),
        ModelError::BadCharacter { .. }
    ));
    let custom = Environments::new(["staging", "prod"]).unwrap();
    assert!(custom.parse("staging").is_ok());
    assert!(custom.parse("dev").is_err());
    assert!(Environments::new(["ok", "../x"]).is_err());
    assert!(Environments::new(Vec::<String>::new()).is_err());
}

#[test]
fn values_are_validated_for_their_declared_format() {
    let key = ConfigKey::parse("k").unwrap();
    assert!(Value::parse(&key, Format::Json, r#"{"a":[1,2]}"#).is_ok());
    let err = Value::parse(&key, Format::Json, r#"{"a":"#).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::InvalidValue {
                format: Format::Json,
                ..
            }
        ),
        "{err}"
    );
    assert!(Value::parse(&key, Format::Yaml, "a: 1\nb: [x, y]\n").is_ok());
    let err = Value::parse(&key, Format::Yaml, "a: [1, 2\nb: {").unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::InvalidValue {
                format: Format::Yaml,
                ..
            }
        ),
        "{err}"
    );
    assert!(Value::parse(&key, Format::Properties, "# c\na=1\nb : two \\\n  more\n").is_ok());
    assert!(Value::parse(&key, Format::Properties, "=nokey\n").is_err());
    assert!(Value::parse(&key, Format::Properties, "a=\\u12G4\n").is_err());
    assert!(Value::parse(&key, Format::Properties, "a=1 \\\n").is_err());
    assert!(Value::parse(&key, Format::Plain, "anything at all: {").is_ok());
}

#[test]
fn oversized_values_and_nul_are_refused() {
    let key = ConfigKey::parse("k").unwrap();
    let big = "x".repeat(MAX_VALUE_LEN + 1);
    assert!(matches!(
        Value::parse(&key, Format::Plain, &big).unwrap_err(),
        ModelError::TooLong {
            field: Field::Value,
            ..
        }
    ));
    assert!(Value::parse(&key, Format::Plain, &"x".repeat(MAX_VALUE_LEN)).is_ok());
    assert!(matches!(
        Value::parse(&key, Format::Plain, "a\0b").unwrap_err(),
        ModelError::BadCharacter {
            field: Field::Value,
            ..
        }
    ));
}

#[test]
fn invalid_value_errors_and_debug_never_show_the_value() {
    let key = ConfigKey::parse("db.password").unwrap();
    let err = Value::parse(&key, Format::Json, "{hunter2").unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    let entry = ConfigEntry::parse("db.password", "hunter2", Format::Plain, true).unwrap();
    assert!(!format!("{entry:?}").contains("hunter2"));
}

#[test]
fn unknown_formats_and_duplicate_keys_are_refused() {
    assert_eq!(Format::parse("yaml").unwrap(), Format::Yaml);
    assert!(matches!(
        Format::parse("toml").unwrap_err(),
        ModelError::UnknownFormat(_)
    ));
    let a = ConfigEntry::parse("a", "1", Format::Plain, false).unwrap();
    let err = check_entries(vec![a.clone(), a]).unwrap_err();
    assert_eq!(err, ModelError::DuplicateKey("a".into()));
}

#[test]
fn gray_selectors_match_listed_instances_or_all_their_labels() {
    let labels = GraySelector::parse_labels("zone=a,tier=canary").unwrap();
    let by_labels = GraySelector::new([], labels.clone()).unwrap();
    assert!(by_labels.matches(None, &labels));
    let only_zone = GraySelector::parse_labels("zone=a").unwrap();
    assert!(
        !by_labels.matches(Some("n1"), &only_zone),
        "every label must match"
    );
    let by_id = GraySelector::new(["n1".to_owned()], BTreeMap::new()).unwrap();
    assert!(by_id.matches(Some("n1"), &BTreeMap::new()));
    assert!(!by_id.matches(Some("n2"), &labels));
    assert!(!by_id.matches(None, &labels));
    assert!(GraySelector::new([], BTreeMap::new()).is_err());
    assert!(GraySelector::parse_labels("zone").is_err());
    assert!(GraySelector::parse_labels("zone=a/b").is_err());
    assert!(GraySelector::parse_labels("").unwrap().is_empty());
}

#[test]
fn deeply_nested_documents_are_handled_without_overflowing_the_stack() {
    let key = ConfigKey::parse("k").unwrap();
    let depth = 30_000;
    let json = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    assert!(
        Value::parse(&key, Format::Json, &json).is_err(),
        "serde_json's recursion limit"
    );
    let yaml = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    assert!(Value::parse(&key, Format::Yaml, &yaml).is_err());
    let yaml_block: String = (0..2_000)
        .map(|i| format!("{}-\n", " ".repeat(i * 2)))
        .collect();
    assert!(Value::parse(&key, Format::Yaml, &yaml_block).is_err());
    let fine = format!("{}{}", "[".repeat(20), "]".repeat(20));
    assert!(Value::parse(&key, Format::Yaml, &fine).is_ok());
    assert!(Value::parse(&key, Format::Json, &fine).is_ok());
}

/// A "billion laughs" document: each level names the one before nine times, so ten
/// short lines stand for 9^10 nodes. Checking it must not build them.
fn alias_bomb(levels: usize) -> String {
    let mut text = String::from("l0: &l0 [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..levels {
        let p = i - 1;
        text.push_str(&format!(
            "l{i}: &l{i} [*l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}]\n"
        ));
    }
    text
}

#[test]
fn a_yaml_alias_bomb_is_refused_without_expanding_it() {
    let key = ConfigKey::parse("k").unwrap();
    let bomb = alias_bomb(10);
    assert!(bomb.len() < 1024, "small enough to pass every size limit");
    let started = std::time::Instant::now();
    let err = Value::parse(&key, Format::Yaml, &bomb).unwrap_err();
    assert!(
        err.to_string().contains("expands to more than"),
        "refused for its expansion: {err}"
    );
    // not a wall-clock limit on the check: a guard that the bomb was not expanded at all
    // (expanding it takes minutes and gigabytes)
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // a few aliases, as hand-written configuration uses them, stay valid
    let anchors = "defaults: &d {pool: 10, timeout: 5s}\nprod: *d\ntest: *d\n";
    assert!(Value::parse(&key, Format::Yaml, anchors).is_ok());
    assert!(Value::parse(&key, Format::Yaml, &alias_bomb(3)).is_ok());
}

#[test]
fn an_alias_does_not_hide_nesting_past_the_limit() {
    let key = ConfigKey::parse("k").unwrap();
    // 100 levels under an anchor, used 100 levels deep: 200 levels once expanded
    let deep = format!("{}x{}", "[".repeat(100), "]".repeat(100));
    let text = format!("- &a {deep}\n- {}*a{}\n", "[".repeat(100), "]".repeat(100));
    assert!(Value::parse(&key, Format::Yaml, &text).is_err());
    let shallow = format!("- &a {deep}\n- [*a]\n");
    assert!(Value::parse(&key, Format::Yaml, &shallow).is_ok());
}
