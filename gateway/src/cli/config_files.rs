//! The files `portcullis config import|gray` read and `portcullis config export` writes.
//!
//! An export imported again gives back exactly the snapshot it came from: every key, every
//! value byte for byte, and each entry's declared format and secret flag. What the
//! config center keeps besides the value travels as a note:
//!
//! - properties: a comment `#@portcullis format=json secret` on the line before the entry
//!   (Java's own reader skips it as a comment);
//! - JSON and YAML: the top-level key `#portcullis`, a mapping from config key to
//!   `{"format": "json", "secret": true}`. No config key can start with `#`, so it never
//!   names an entry.
//!
//! Entries without a note are `plain` and not secret.

use std::collections::BTreeMap;

use clap::ValueEnum;
use config_center::Format;
use serde_json::Value;

/// The comment that carries an entry's format and secret flag in a properties file.
const PROPERTIES_NOTE: &str = "#@portcullis";
/// The top-level key that carries every entry's format and secret flag in JSON and YAML.
const NOTES_KEY: &str = "#portcullis";

/// The format of an import or export file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FileFormat {
    /// Java properties (UTF-8): `key=value`, `\` escapes and line continuations, with
    /// `#@portcullis` notes for format and secret.
    Properties,
    /// A YAML mapping; nested mappings become dotted keys.
    Yaml,
    /// A JSON object; nested objects become dotted keys.
    Json,
}

/// One key of a file: its value and what the config center keeps with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// The value, as text.
    pub value: String,
    /// Its declared format (`plain` unless a note says otherwise).
    pub format: Format,
    /// Whether it is masked in listings.
    pub secret: bool,
}

impl FileEntry {
    /// A plain, non-secret value.
    #[cfg(test)]
    pub fn plain(value: impl Into<String>) -> Self {
        Self {
            value: value.into(),
            format: Format::Plain,
            secret: false,
        }
    }

    fn noted(&self) -> bool {
        self.format != Format::Plain || self.secret
    }
}

/// The entries of a file, by key.
pub type FileEntries = BTreeMap<String, FileEntry>;

/// The format a file's name suggests.
pub fn format_of(path: &std::path::Path) -> Option<FileFormat> {
    match path.extension()?.to_str()? {
        "properties" | "props" => Some(FileFormat::Properties),
        "yaml" | "yml" => Some(FileFormat::Yaml),
        "json" => Some(FileFormat::Json),
        _ => None,
    }
}

/// Reads a file into entries (nested YAML/JSON mappings become dotted keys); every
/// refusal says where and why, never quoting a value.
pub fn parse_file(format: FileFormat, text: &str) -> Result<FileEntries, String> {
    match format {
        FileFormat::Properties => parse_properties(text),
        FileFormat::Json => {
            let v: Value = serde_json::from_str(text).map_err(|e| format!("JSON: {e}"))?;
            let Value::Object(mut top) = v else {
                return Err("the JSON file must be an object".into());
            };
            let notes = top.remove(NOTES_KEY).map(json_notes).transpose()?;
            let mut values = BTreeMap::new();
            flatten_json(&mut values, String::new(), &Value::Object(top))?;
            with_notes(values, notes)
        }
        FileFormat::Yaml => {
            use yaml_rust2::Yaml;
            let docs =
                yaml_rust2::YamlLoader::load_from_str(text).map_err(|e| format!("YAML: {e}"))?;
            let mut doc = docs.into_iter().next().unwrap_or(Yaml::Null);
            let notes = match &mut doc {
                Yaml::Hash(h) => h
                    .remove(&Yaml::String(NOTES_KEY.to_owned()))
                    .map(yaml_notes)
                    .transpose()?,
                _ => None,
            };
            let mut values = BTreeMap::new();
            flatten_yaml(&mut values, String::new(), &doc)?;
            with_notes(values, notes)
        }
    }
}

/// Writes entries as a file that [`parse_file`] reads back to the same entries.
pub fn render_file(format: FileFormat, entries: &FileEntries) -> String {
    match format {
        FileFormat::Properties => render_properties(entries),
        FileFormat::Json => {
            let mut obj: serde_json::Map<String, Value> = entries
                .iter()
                .map(|(k, e)| (k.clone(), Value::String(e.value.clone())))
                .collect();
            let notes: serde_json::Map<String, Value> = entries
                .iter()
                .filter(|(_, e)| e.noted())
                .map(|(k, e)| (k.clone(), note_json(e)))
                .collect();
            if !notes.is_empty() {
                obj.insert(NOTES_KEY.to_owned(), Value::Object(notes));
            }
            format!(
                "{}\n",
                serde_json::to_string_pretty(&Value::Object(obj)).unwrap_or_default()
            )
        }
        FileFormat::Yaml => {
            if entries.is_empty() {
                // an empty document is no mapping
                return "{}\n".to_owned();
            }
            let mut out = String::new();
            let noted: Vec<_> = entries.iter().filter(|(_, e)| e.noted()).collect();
            if !noted.is_empty() {
                out.push_str(&format!("{}:\n", yaml_quote(NOTES_KEY)));
                for (k, e) in noted {
                    let mut fields = Vec::new();
                    if e.format != Format::Plain {
                        fields.push(format!("format: {}", yaml_quote(e.format.as_str())));
                    }
                    if e.secret {
                        fields.push("secret: true".to_owned());
                    }
                    out.push_str(&format!("  {}: {{{}}}\n", yaml_quote(k), fields.join(", ")));
                }
            }
            for (k, e) in entries {
                out.push_str(&format!("{}: {}\n", yaml_quote(k), yaml_quote(&e.value)));
            }
            out
        }
    }
}

// === notes (format and secret) ===

/// Format and secret flag of one entry, as a file notes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Note {
    format: Option<Format>,
    secret: bool,
}

fn note_json(e: &FileEntry) -> Value {
    let mut m = serde_json::Map::new();
    if e.format != Format::Plain {
        m.insert("format".into(), Value::String(e.format.as_str().to_owned()));
    }
    if e.secret {
        m.insert("secret".into(), Value::Bool(true));
    }
    Value::Object(m)
}

fn json_notes(v: Value) -> Result<BTreeMap<String, Note>, String> {
    let Value::Object(m) = v else {
        return Err(format!("`{NOTES_KEY}` must map keys to {{format, secret}}"));
    };
    m.into_iter()
        .map(|(key, v)| {
            let Value::Object(fields) = v else {
                return Err(format!("`{NOTES_KEY}.{key}` must be an object"));
            };
            let mut note = Note::default();
            for (field, v) in fields {
                match (field.as_str(), v) {
                    ("format", Value::String(f)) => note.format = Some(note_format(&key, &f)?),
                    ("secret", Value::Bool(b)) => note.secret = b,
                    (other, _) => return Err(bad_note_field(&key, other)),
                }
            }
            Ok((key, note))
        })
        .collect()
}

fn yaml_notes(v: yaml_rust2::Yaml) -> Result<BTreeMap<String, Note>, String> {
    use yaml_rust2::Yaml;
    let Yaml::Hash(h) = v else {
        return Err(format!("`{NOTES_KEY}` must map keys to {{format, secret}}"));
    };
    h.into_iter()
        .map(|(key, v)| {
            let Yaml::String(key) = key else {
                return Err(format!("a key under `{NOTES_KEY}` is not text"));
            };
            let Yaml::Hash(fields) = v else {
                return Err(format!("`{NOTES_KEY}.{key}` must be a mapping"));
            };
            let mut note = Note::default();
            for (field, v) in fields {
                match (field.as_str(), v) {
                    (Some("format"), Yaml::String(f)) => {
                        note.format = Some(note_format(&key, &f)?);
                    }
                    (Some("secret"), Yaml::Boolean(b)) => note.secret = b,
                    (other, _) => return Err(bad_note_field(&key, other.unwrap_or("?"))),
                }
            }
            Ok((key, note))
        })
        .collect()
}

fn note_format(key: &str, name: &str) -> Result<Format, String> {
    Format::parse(name).map_err(|e| format!("`{NOTES_KEY}.{key}`: {e}"))
}

fn bad_note_field(key: &str, field: &str) -> String {
    format!("`{NOTES_KEY}.{key}`: `{field}` is not a note (use format: <name> and secret: true)")
}

/// Puts the notes on the values they name; a note for a key the file does not hold is
/// refused (a typo would otherwise publish a secret unmasked).
fn with_notes(
    values: BTreeMap<String, String>,
    notes: Option<BTreeMap<String, Note>>,
) -> Result<FileEntries, String> {
    let mut notes = notes.unwrap_or_default();
    let entries = values
        .into_iter()
        .map(|(k, value)| {
            let note = notes.remove(&k).unwrap_or_default();
            let entry = FileEntry {
                value,
                format: note.format.unwrap_or(Format::Plain),
                secret: note.secret,
            };
            (k, entry)
        })
        .collect();
    match notes.keys().next() {
        Some(k) => Err(format!(
            "`{NOTES_KEY}` names `{k}`, which the file does not hold"
        )),
        None => Ok(entries),
    }
}

// === properties ===

/// Whitespace in a properties line.
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\x0c')
}

/// Java's natural lines: ended by `\n`, `\r` or `\r\n`.
fn natural_lines(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        match rest.find(['\n', '\r']) {
            Some(at) => {
                lines.push(&rest[..at]);
                let skip = if rest[at..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[at + skip..];
            }
            None => {
                lines.push(rest);
                rest = "";
            }
        }
    }
    lines
}

/// Whether a line ends with an odd number of backslashes (it continues on the next).
fn continues(line: &str) -> bool {
    line.chars().rev().take_while(|&c| c == '\\').count() % 2 == 1
}

/// Reads properties as `java.util.Properties::load` does (comments, continuations, `=`,
/// `:` or whitespace after the key, `\` escapes), plus `#@portcullis` notes; a line that
/// is only a key, without a separator or value, is refused as a likely mistake.
fn parse_properties(text: &str) -> Result<FileEntries, String> {
    let lines = natural_lines(text);
    let mut out = FileEntries::new();
    let mut pending: Option<(usize, Note)> = None;
    let mut n = 0;
    while n < lines.len() {
        let line_no = n + 1;
        let first = lines[n].trim_start_matches(is_blank);
        n += 1;
        if first.is_empty() {
            continue;
        }
        if let Some(words) = first.strip_prefix(PROPERTIES_NOTE) {
            if pending.is_some() {
                return Err(format!("line {line_no}: two notes for one entry"));
            }
            pending = Some((line_no, properties_note(line_no, words)?));
            continue;
        }
        if first.starts_with(['#', '!']) {
            continue;
        }
        // the logical line: continuations joined, each without its leading whitespace
        let mut logical = first.to_owned();
        while continues(&logical) {
            logical.pop();
            match lines.get(n) {
                Some(next) => {
                    logical.push_str(next.trim_start_matches(is_blank));
                    n += 1;
                }
                None => break,
            }
        }
        let (key, value) = split_property(&logical).map_err(|e| format!("line {line_no}: {e}"))?;
        let key = unescape(key).map_err(|e| format!("line {line_no}: key: {e}"))?;
        let value = unescape(value).map_err(|e| format!("line {line_no}: value: {e}"))?;
        let note = pending.take().map(|(_, note)| note).unwrap_or_default();
        let entry = FileEntry {
            value,
            format: note.format.unwrap_or(Format::Plain),
            secret: note.secret,
        };
        if key.is_empty() {
            return Err(format!("line {line_no}: an empty key"));
        }
        if out.insert(key.clone(), entry).is_some() {
            return Err(format!("line {line_no}: key `{key}` appears twice"));
        }
    }
    match pending {
        Some((line_no, _)) => Err(format!(
            "line {line_no}: a {PROPERTIES_NOTE} note without an entry after it"
        )),
        None => Ok(out),
    }
}

/// `format=<name>` and `secret`, separated by whitespace.
fn properties_note(line_no: usize, words: &str) -> Result<Note, String> {
    if !words.is_empty() && !words.starts_with(is_blank) {
        return Err(format!(
            "line {line_no}: `{PROPERTIES_NOTE}` must be followed by a space"
        ));
    }
    let mut note = Note::default();
    for word in words.split(is_blank).filter(|w| !w.is_empty()) {
        if word == "secret" {
            note.secret = true;
        } else if let Some(name) = word.strip_prefix("format=") {
            note.format = Some(Format::parse(name).map_err(|e| format!("line {line_no}: {e}"))?);
        } else {
            return Err(format!(
                "line {line_no}: `{word}` is not a note (use format=<name> and secret)"
            ));
        }
    }
    Ok(note)
}

/// The raw (still escaped) key and value of a logical line.
fn split_property(line: &str) -> Result<(&str, &str), String> {
    let mut escaped = false;
    let mut key_end = None;
    let mut separator = false;
    for (at, c) in line.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        if c == '\\' {
            escaped = true;
        } else if c == '=' || c == ':' {
            key_end = Some((at, at + 1));
            separator = true;
            break;
        } else if is_blank(c) {
            key_end = Some((at, at + c.len_utf8()));
            break;
        }
    }
    let Some((end, mut value_start)) = key_end else {
        return Err("expected `key=value`".into());
    };
    if end == 0 {
        return Err("a property without a key".into());
    }
    // whitespace, then at most one `=` or `:` (unless one ended the key), then whitespace
    for (at, c) in line[value_start..].char_indices() {
        if is_blank(c) {
            continue;
        }
        if !separator && (c == '=' || c == ':') {
            separator = true;
            continue;
        }
        value_start += at;
        return Ok((&line[..end], &line[value_start..]));
    }
    Ok((&line[..end], ""))
}

/// Undoes properties escapes: `\t`, `\n`, `\r`, `\f`, `\uXXXX` (UTF-16, surrogate pairs
/// joined), and `\` before any other character stands for that character.
fn unescape(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\x0c'),
            Some('u') => {
                let unit = hex4(&mut chars)?;
                let c = if (0xD800..0xDC00).contains(&unit) {
                    let low = match (chars.next(), chars.next()) {
                        (Some('\\'), Some('u')) => hex4(&mut chars)?,
                        _ => return Err("a \\u escape of half a character".into()),
                    };
                    if !(0xDC00..0xE000).contains(&low) {
                        return Err("a \\u escape of half a character".into());
                    }
                    0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                } else {
                    unit
                };
                out.push(char::from_u32(c).ok_or("a \\u escape of half a character")?);
            }
            Some(other) => out.push(other),
            // a final lone backslash (a continuation at the end of the file) stands for
            // nothing
            None => {}
        }
    }
    Ok(out)
}

fn hex4(chars: &mut std::str::Chars<'_>) -> Result<u32, String> {
    let digits: String = chars.by_ref().take(4).collect();
    if digits.len() == 4 && digits.chars().all(|c| c.is_ascii_hexdigit()) {
        u32::from_str_radix(&digits, 16).map_err(|_| "malformed \\u escape".into())
    } else {
        Err("malformed \\u escape (four hex digits expected)".into())
    }
}

/// Characters written as `\uXXXX`: controls, and the ones editors and readers may take
/// for a line break or drop (NEL, line and paragraph separators, byte order mark).
fn needs_unicode_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}')
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        '\t' => out.push_str("\\t"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\x0c' => out.push_str("\\f"),
        c if needs_unicode_escape(c) => {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04X}"));
            }
        }
        c => out.push(c),
    }
}

fn render_properties(entries: &FileEntries) -> String {
    let mut out = String::new();
    for (key, e) in entries {
        if e.noted() {
            out.push_str(PROPERTIES_NOTE);
            if e.format != Format::Plain {
                out.push_str(" format=");
                out.push_str(e.format.as_str());
            }
            if e.secret {
                out.push_str(" secret");
            }
            out.push('\n');
        }
        for c in key.chars() {
            // what would end the key, or start a comment at the head of the line
            if matches!(c, '=' | ':' | ' ' | '#' | '!') {
                out.push('\\');
                out.push(c);
            } else {
                push_escaped(&mut out, c);
            }
        }
        out.push('=');
        // trailing whitespace as \u escapes, so an editor that trims lines keeps it
        let kept = e.value.trim_end_matches(is_blank);
        for (at, c) in kept.char_indices() {
            if at == 0 && c == ' ' {
                // leading whitespace would be skipped as the separator's
                out.push_str("\\ ");
            } else {
                push_escaped(&mut out, c);
            }
        }
        for c in e.value[kept.len()..].chars() {
            out.push_str(&format!("\\u{:04X}", u32::from(c)));
        }
        out.push('\n');
    }
    out
}

// === JSON and YAML ===

fn insert(out: &mut BTreeMap<String, String>, key: &str, value: String) -> Result<(), String> {
    if key.is_empty() {
        return Err("an empty key".into());
    }
    if out.insert(key.to_owned(), value).is_some() {
        return Err(format!("key `{key}` appears twice"));
    }
    Ok(())
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn flatten_json(
    out: &mut BTreeMap<String, String>,
    prefix: String,
    v: &Value,
) -> Result<(), String> {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten_json(out, join(&prefix, k), v)?;
            }
            Ok(())
        }
        _ if prefix.is_empty() => Err("the JSON file must be an object".into()),
        Value::String(s) => insert(out, &prefix, s.clone()),
        Value::Null => insert(out, &prefix, String::new()),
        other => insert(out, &prefix, other.to_string()),
    }
}

fn flatten_yaml(
    out: &mut BTreeMap<String, String>,
    prefix: String,
    v: &yaml_rust2::Yaml,
) -> Result<(), String> {
    use yaml_rust2::Yaml;
    match v {
        Yaml::Hash(h) => {
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    _ => return Err(format!("a key under `{prefix}` is not a scalar")),
                };
                flatten_yaml(out, join(&prefix, &key), v)?;
            }
            Ok(())
        }
        _ if prefix.is_empty() => Err("the YAML file must be a mapping".into()),
        Yaml::String(s) | Yaml::Real(s) => insert(out, &prefix, s.clone()),
        Yaml::Integer(i) => insert(out, &prefix, i.to_string()),
        Yaml::Boolean(b) => insert(out, &prefix, b.to_string()),
        Yaml::Null => insert(out, &prefix, String::new()),
        _ => Err(format!(
            "`{prefix}`: lists and aliases are not config values; quote them as text"
        )),
    }
}

/// A YAML double-quoted scalar holding exactly `text`: `"` and `\` escaped, and every
/// character a YAML reader could fold, drop or take for a line break as `\uXXXX`.
fn yaml_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if needs_unicode_escape(c) => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests;
