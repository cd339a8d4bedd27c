#![allow(clippy::unwrap_used)]
use super::*;

fn plain(pairs: &[(&str, &str)]) -> FileEntries {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), FileEntry::plain(*v)))
        .collect()
}

/// Values that a naive `key=value` writer or reader gets wrong.
fn awkward() -> FileEntries {
    let mut e = plain(&[
        ("path", r"C:\logs\app"),
        ("route:a", "http://a:8080/x?y=1"),
        (
            "tls.cert",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        ),
        ("crlf", "one\r\ntwo\rthree"),
        ("padded", "  both ends \t "),
        ("blank", "   "),
        ("empty", ""),
        ("equals", "=x:y= z"),
        ("hash", "#not a comment"),
        ("bang", "!not a comment"),
        ("trailing.backslash", "ends with \\"),
        ("backslashes", "\\\\server\\share\\"),
        ("unicode", "Grüße, 東京, 🚀"),
        (
            "controls",
            "bell\u{7} nel\u{85} ls\u{2028} ps\u{2029} bom\u{feff} tab\t ff\u{c}",
        ),
        ("quotes", r#"say "hi" and 'bye'"#),
        ("yaml.like", "key: [1, 2] # not yaml"),
        ("unicode.escape.text", r"\u0041 stays six characters"),
    ]);
    e.insert(
        "pool".into(),
        FileEntry {
            value: "{\"size\": 8}".into(),
            format: Format::Json,
            secret: false,
        },
    );
    e.insert(
        "db.password".into(),
        FileEntry {
            value: "pw=with:odd\\chars ".into(),
            format: Format::Plain,
            secret: true,
        },
    );
    e.insert(
        "spring.yaml".into(),
        FileEntry {
            value: "a: 1\nb:\n  - x\n".into(),
            format: Format::Yaml,
            secret: true,
        },
    );
    e
}

const ALL: [FileFormat; 3] = [FileFormat::Properties, FileFormat::Json, FileFormat::Yaml];

#[test]
fn every_format_flattens_to_dotted_keys_and_renders_back() {
    let yaml = "db:\n  url: postgres://x\n  pool: 8\nfeature: true\n";
    let json = r#"{"db": {"url": "postgres://x", "pool": 8}, "feature": true}"#;
    let props = "# comment\ndb.url=postgres://x\ndb.pool = 8\nfeature: true\n";
    let want = plain(&[
        ("db.pool", "8"),
        ("db.url", "postgres://x"),
        ("feature", "true"),
    ]);
    assert_eq!(parse_file(FileFormat::Yaml, yaml).unwrap(), want);
    assert_eq!(parse_file(FileFormat::Json, json).unwrap(), want);
    assert_eq!(parse_file(FileFormat::Properties, props).unwrap(), want);
    for f in ALL {
        assert_eq!(
            parse_file(f, &render_file(f, &want)).unwrap(),
            want,
            "{f:?}"
        );
    }
}

#[test]
fn an_export_reads_back_exactly_in_every_format() {
    let want = awkward();
    for f in ALL {
        let text = render_file(f, &want);
        let got = parse_file(f, &text).unwrap_or_else(|e| panic!("{f:?}: {e}\n{text}"));
        for (k, v) in &want {
            assert_eq!(got.get(k), Some(v), "{f:?} {k}\n{text}");
        }
        assert_eq!(got, want, "{f:?}");
    }
    for f in ALL {
        let empty = FileEntries::new();
        assert_eq!(
            parse_file(f, &render_file(f, &empty)).unwrap(),
            empty,
            "{f:?}"
        );
    }
}

#[test]
fn a_properties_export_is_what_java_properties_reads() {
    let text = render_file(FileFormat::Properties, &awkward());
    // one line per entry (plus its note): no value spills onto the next line
    assert_eq!(text.lines().count(), awkward().len() + 3, "{text}");
    assert!(text.contains("path=C:\\\\logs\\\\app\n"), "{text}");
    assert!(text.contains("route\\:a=http://a:8080/x?y=1\n"), "{text}");
    assert!(
        text.contains("#@portcullis format=json\npool={\"size\": 8}\n"),
        "{text}"
    );
    assert!(
        text.contains("#@portcullis format=yaml secret\nspring.yaml="),
        "{text}"
    );
    assert!(text.contains("#@portcullis secret\ndb.password="), "{text}");
    // trailing whitespace survives an editor that trims lines
    assert!(
        text.contains("padded=\\  both ends\\u0020\\u0009\\u0020\n"),
        "{text}"
    );
    assert!(text.contains("blank=\\u0020\\u0020\\u0020\n"), "{text}");
}

#[test]
fn properties_are_read_with_java_semantics() {
    let text = "! bang comment\n  # indented comment\n\
                a = one\\\n    two\\\n  three\n\
                b:x\n\
                c   spaced value  \n\
                d\\ e\\=f\\:g=h\n\
                u=\\u0041\\uD83D\\uDE80\\q\n\
                e=\r\n\
                f==x\r\
                g\\\\=\\\\\n\
                #@portcullis format=properties\n\
                h=x=1\\n\n";
    let got = parse_file(FileFormat::Properties, text).unwrap();
    let v = |k: &str| got.get(k).map(|e| e.value.as_str());
    assert_eq!(v("a"), Some("onetwothree"));
    assert_eq!(v("b"), Some("x"));
    assert_eq!(v("c"), Some("spaced value  "));
    assert_eq!(v("d e=f:g"), Some("h"));
    assert_eq!(v("u"), Some("A🚀q"));
    assert_eq!(v("e"), Some(""));
    assert_eq!(v("f"), Some("=x"));
    assert_eq!(v("g\\"), Some("\\"));
    assert_eq!(v("h"), Some("x=1\n"));
    assert_eq!(got["h"].format, Format::Properties);
    assert_eq!(got.len(), 9);
}

#[test]
fn malformed_files_are_refused_with_the_reason() {
    let refused = |f: FileFormat, text: &str, why: &str| {
        let e = parse_file(f, text).unwrap_err();
        assert!(e.contains(why), "{text:?}: {e}");
    };
    refused(FileFormat::Json, "[1, 2]", "must be an object");
    refused(FileFormat::Yaml, "- a\n- b\n", "must be a mapping");
    refused(FileFormat::Yaml, "a: [1, 2]\n", "lists and aliases");
    refused(
        FileFormat::Properties,
        "justakey\n",
        "line 1: expected `key=value`",
    );
    refused(
        FileFormat::Properties,
        "a=1\na=2\n",
        "line 2: key `a` appears twice",
    );
    refused(FileFormat::Properties, "=1\n", "without a key");
    refused(
        FileFormat::Properties,
        "a=\\u12\n",
        "line 1: value: malformed \\u escape",
    );
    refused(FileFormat::Properties, "a=\\uD800x\n", "half a character");
    refused(
        FileFormat::Properties,
        "#@portcullis secret\n",
        "without an entry",
    );
    refused(
        FileFormat::Properties,
        "#@portcullis format=xml\na=1\n",
        "format `xml`",
    );
    refused(
        FileFormat::Properties,
        "#@portcullis hidden\na=1\n",
        "`hidden` is not a note",
    );
    refused(
        FileFormat::Json,
        r##"{"a": "1", "#portcullis": {"b": {"secret": true}}}"##,
        "names `b`",
    );
    refused(
        FileFormat::Json,
        r##"{"a": "1", "#portcullis": {"a": {"hidden": true}}}"##,
        "`hidden` is not a note",
    );
    refused(
        FileFormat::Yaml,
        "\"#portcullis\":\n  a: {format: toml}\na: x\n",
        "format `toml`",
    );
}
