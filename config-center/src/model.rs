//! The domain: environments, applications, keys, values and their formats.
//!
//! Everything that reaches storage is parsed here first: a name that could traverse a
//! path, smuggle a control character or look like another name (non-ASCII confusables) is
//! refused with an error saying which field and why.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Longest accepted environment name, in bytes.
pub const MAX_ENVIRONMENT_LEN: usize = 64;
/// Longest accepted application name, in bytes.
pub const MAX_APP_NAME_LEN: usize = 128;
/// Longest accepted config key, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// Largest accepted value, in bytes (64 KiB).
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Most entries one release may hold.
pub const MAX_ENTRIES: usize = 10_000;

/// Which field of a request a [`ModelError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The environment.
    Environment,
    /// The application.
    Application,
    /// A config key.
    Key,
    /// A value.
    Value,
    /// A value's format.
    Format,
    /// A gray release's selector (instance ids and labels).
    Selector,
    /// A release's message (why it was made).
    Message,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Environment => "environment",
            Field::Application => "application",
            Field::Key => "key",
            Field::Value => "value",
            Field::Format => "format",
            Field::Selector => "gray selector",
            Field::Message => "message",
        })
    }
}

/// Why a name or value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The field is empty.
    #[error("{field} is empty")]
    Empty {
        /// Which field.
        field: Field,
    },
    /// The field is longer than allowed.
    #[error("{field} is {len} bytes long; at most {max} are allowed")]
    TooLong {
        /// Which field.
        field: Field,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The field holds a character outside its alphabet.
    #[error("{field} contains {what} at byte {at}")]
    BadCharacter {
        /// Which field.
        field: Field,
        /// What kind of character (never the value itself: it may be secret).
        what: &'static str,
        /// Its byte offset.
        at: usize,
    },
    /// The field could traverse a path (`..`, `/`, `\`).
    #[error("{field} could be read as a path (`{pattern}` is not allowed)")]
    PathTraversal {
        /// Which field.
        field: Field,
        /// The offending pattern.
        pattern: &'static str,
    },
    /// The environment is not one of the configured set.
    #[error("environment `{name}` is not configured (known: {known})")]
    UnknownEnvironment {
        /// The name given (already checked to be a plain ASCII name).
        name: String,
        /// The configured names, comma-separated.
        known: String,
    },
    /// The format name is not one of `properties`, `yaml`, `json`, `plain`.
    #[error("format `{0}` is unknown (use properties, yaml, json or plain)")]
    UnknownFormat(String),
    /// The value does not parse in its declared format.
    #[error("value of key `{key}` is not valid {format}: {reason}")]
    InvalidValue {
        /// The key whose value it is.
        key: String,
        /// The declared format.
        format: Format,
        /// The parser's reason (positions only, never the value's text).
        reason: String,
    },
    /// The same key appears twice in one release.
    #[error("key `{0}` appears more than once")]
    DuplicateKey(String),
    /// Too many entries in one release.
    #[error("{len} entries in one release; at most {max} are allowed")]
    TooManyEntries {
        /// How many were given.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Checks the rules every name shares: not empty, not too long, printable ASCII only, no
/// path separators or `..`; `extra` says which other characters besides `[A-Za-z0-9]`
/// are allowed.
fn check_name(field: Field, text: &str, max: usize, extra: &[char]) -> Result<(), ModelError> {
    if text.is_empty() {
        return Err(ModelError::Empty { field });
    }
    if text.len() > max {
        return Err(ModelError::TooLong {
            field,
            len: text.len(),
            max,
        });
    }
    for (at, c) in text.char_indices() {
        let what = if c.is_control() {
            "a control character"
        } else if !c.is_ascii() {
            "a non-ASCII character"
        } else if c == '/' {
            return Err(ModelError::PathTraversal {
                field,
                pattern: "/",
            });
        } else if c == '\\' {
            return Err(ModelError::PathTraversal {
                field,
                pattern: "\\",
            });
        } else if c.is_ascii_whitespace() {
            "whitespace"
        } else if c.is_ascii_alphanumeric() || extra.contains(&c) {
            continue;
        } else {
            "a character outside [A-Za-z0-9] and the allowed punctuation"
        };
        return Err(ModelError::BadCharacter { field, what, at });
    }
    if text.contains("..") {
        return Err(ModelError::PathTraversal {
            field,
            pattern: "..",
        });
    }
    if !text.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(ModelError::BadCharacter {
            field,
            what: "a leading punctuation character",
            at: 0,
        });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// An environment name (`dev`, `test`, `prod`, …): lower-case ASCII letters, digits,
    /// `-` and `_`, at most [`MAX_ENVIRONMENT_LEN`] bytes, one of the configured set
    /// ([`Environments`]).
    Environment
);
name_type!(
    /// An application name (`xxl-job-admin`, `executor-orders`): ASCII letters, digits,
    /// `-`, `_` and `.`, at most [`MAX_APP_NAME_LEN`] bytes, never `..`.
    AppName
);
name_type!(
    /// A config key (`db.url`, `spring.datasource.password`): ASCII letters, digits and
    /// `-`, `_`, `.`, `:`, `[`, `]`, at most [`MAX_KEY_LEN`] bytes, never `..`, `/`, `\`.
    ConfigKey
);

impl AppName {
    /// Parses an application name.
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        check_name(Field::Application, text, MAX_APP_NAME_LEN, &['-', '_', '.'])?;
        Ok(Self(text.to_owned()))
    }
}

impl ConfigKey {
    /// Parses a config key.
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        check_name(
            Field::Key,
            text,
            MAX_KEY_LEN,
            &['-', '_', '.', ':', '[', ']'],
        )?;
        Ok(Self(text.to_owned()))
    }
}

impl Environment {
    /// Checks the shape of an environment name only (not membership of a configured
    /// set): use [`Environments::parse`] at the edge.
    pub(crate) fn parse_shape(text: &str) -> Result<Self, ModelError> {
        check_name(Field::Environment, text, MAX_ENVIRONMENT_LEN, &['-', '_'])?;
        if let Some(at) = text.find(|c: char| c.is_ascii_uppercase()) {
            return Err(ModelError::BadCharacter {
                field: Field::Environment,
                what: "an upper-case letter",
                at,
            });
        }
        Ok(Self(text.to_owned()))
    }
}

impl<'de> Deserialize<'de> for AppName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for ConfigKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Deserialising an [`Environment`] checks its shape only; membership of the configured
/// set is checked by [`Environments::parse`].
impl<'de> Deserialize<'de> for Environment {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse_shape(&text).map_err(serde::de::Error::custom)
    }
}

/// The configured set of environments (`dev`, `test`, `prod` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environments {
    names: BTreeSet<Environment>,
}

impl Default for Environments {
    fn default() -> Self {
        let names = ["dev", "test", "prod"]
            .into_iter()
            .map(|n| Environment(n.to_owned()))
            .collect();
        Self { names }
    }
}

impl Environments {
    /// A set from configured names; each must be a valid environment name.
    pub fn new<I, S>(names: I) -> Result<Self, ModelError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let names = names
            .into_iter()
            .map(|n| Environment::parse_shape(n.as_ref()))
            .collect::<Result<BTreeSet<_>, _>>()?;
        if names.is_empty() {
            return Err(ModelError::Empty {
                field: Field::Environment,
            });
        }
        Ok(Self { names })
    }

    /// Parses `text` as one of the configured environments.
    pub fn parse(&self, text: &str) -> Result<Environment, ModelError> {
        let env = Environment::parse_shape(text)?;
        if self.names.contains(&env) {
            Ok(env)
        } else {
            Err(ModelError::UnknownEnvironment {
                name: env.0,
                known: self
                    .names
                    .iter()
                    .map(Environment::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    }

    /// The configured environments, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &Environment> {
        self.names.iter()
    }
}

/// The declared format of a value; the value must parse in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Java-style `.properties` text.
    Properties,
    /// A YAML document.
    Yaml,
    /// A JSON document.
    Json,
    /// Any UTF-8 text without NUL.
    Plain,
}

impl Format {
    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Properties => "properties",
            Format::Yaml => "yaml",
            Format::Json => "json",
            Format::Plain => "plain",
        }
    }

    /// Parses a wire or storage name.
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        match text {
            "properties" => Ok(Format::Properties),
            "yaml" => Ok(Format::Yaml),
            "json" => Ok(Format::Json),
            "plain" => Ok(Format::Plain),
            other => Err(ModelError::UnknownFormat(
                other.chars().take(32).filter(|c| !c.is_control()).collect(),
            )),
        }
    }

    /// Checks that `value` parses in this format; the reason never quotes the value.
    fn check(self, value: &str) -> Result<(), String> {
        match self {
            Format::Plain => Ok(()),
            // into a Value: serde_json refuses nesting past 128 levels
            Format::Json => serde_json::from_str::<serde_json::Value>(value)
                .map(|_| ())
                .map_err(|e| format!("line {} column {}", e.line(), e.column())),
            Format::Yaml => check_yaml(value),
            Format::Properties => check_properties(value),
        }
    }
}

/// Deepest nesting accepted in a YAML value (JSON: serde_json's own limit of 128).
pub const MAX_NESTING: usize = 128;

/// Most nodes a YAML value may stand for once its aliases are expanded (each alias
/// counted as a copy of what it names). Without aliases a value within
/// [`MAX_VALUE_LEN`] has far fewer; with them, ten short lines can stand for billions
/// ("billion laughs"), which any reader that expands aliases — the client library's
/// loader among them — would build in memory.
pub const MAX_YAML_NODES: u64 = 100_000;

/// Checks a YAML value from the parser's events, without building a document: nesting
/// and the expanded size are computed per node, so an alias costs what it names without
/// being copied.
fn check_yaml(value: &str) -> Result<(), String> {
    let mut shape = YamlShape::default();
    let mut parser = yaml_rust2::parser::Parser::new_from_str(value);
    parser.load(&mut shape, true).map_err(|e| {
        let m = e.marker();
        format!(
            "{} at line {} column {}",
            yaml_reason(&e),
            m.line(),
            m.col() + 1
        )
    })?;
    if shape.deepest > MAX_NESTING {
        return Err(format!("nested deeper than {MAX_NESTING} levels"));
    }
    if shape.nodes > MAX_YAML_NODES {
        return Err(format!(
            "expands to more than {MAX_YAML_NODES} nodes through its aliases"
        ));
    }
    Ok(())
}

/// Size and height of YAML nodes, from parser events.
#[derive(Default)]
struct YamlShape {
    /// Open sequences and mappings: (anchor id, nodes so far, tallest child).
    open: Vec<(usize, u64, usize)>,
    /// Anchored nodes: (nodes, height).
    anchors: std::collections::HashMap<usize, (u64, usize)>,
    /// Nodes of every document, aliases expanded.
    nodes: u64,
    /// Height of the tallest document, aliases expanded.
    deepest: usize,
}

impl YamlShape {
    fn add(&mut self, nodes: u64, height: usize) {
        match self.open.last_mut() {
            Some((_, n, tallest)) => {
                *n = n.saturating_add(nodes);
                *tallest = (*tallest).max(height);
            }
            None => {
                self.nodes = self.nodes.saturating_add(nodes);
                self.deepest = self.deepest.max(height);
            }
        }
    }
}

impl yaml_rust2::parser::MarkedEventReceiver for YamlShape {
    fn on_event(&mut self, event: yaml_rust2::parser::Event, _mark: yaml_rust2::scanner::Marker) {
        use yaml_rust2::parser::Event;
        match event {
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                self.open.push((anchor, 1, 0));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, nodes, tallest)) = self.open.pop() {
                    let height = tallest.saturating_add(1);
                    if anchor > 0 {
                        self.anchors.insert(anchor, (nodes, height));
                    }
                    self.add(nodes, height);
                }
            }
            Event::Scalar(_, _, anchor, _) => {
                if anchor > 0 {
                    self.anchors.insert(anchor, (1, 1));
                }
                self.add(1, 1);
            }
            Event::Alias(anchor) => {
                let (nodes, height) = self.anchors.get(&anchor).copied().unwrap_or((1, 1));
                self.add(nodes, height);
            }
            _ => {}
        }
    }
}

/// The YAML scanner's description, which names the problem but not the text.
fn yaml_reason(e: &yaml_rust2::ScanError) -> String {
    e.info().chars().take(120).collect()
}

/// A light `.properties` check: every logical line is blank, a comment, or a non-empty
/// key followed by an optional separator; `\u` escapes are four hex digits; the text does
/// not end inside a line continuation.
fn check_properties(value: &str) -> Result<(), String> {
    let mut continued = false;
    for (n, line) in value.lines().enumerate() {
        let line_no = n + 1;
        let trimmed = line.trim_start_matches([' ', '\t', '\x0c']);
        let starts_logical = !continued;
        // an odd number of trailing backslashes continues the line
        let trailing = trimmed.chars().rev().take_while(|&c| c == '\\').count();
        continued = trailing % 2 == 1;
        if starts_logical {
            if trimmed.is_empty() || trimmed.starts_with(['#', '!']) {
                continued = false;
                continue;
            }
            if trimmed.starts_with(['=', ':']) {
                return Err(format!("line {line_no}: a property without a key"));
            }
        }
        let mut chars = trimmed.chars();
        while let Some(c) = chars.next() {
            if c == '\\' && chars.next() == Some('u') {
                let hex: String = chars.by_ref().take(4).collect();
                if hex.len() != 4 || !hex.chars().all(|h| h.is_ascii_hexdigit()) {
                    return Err(format!("line {line_no}: malformed \\u escape"));
                }
            }
        }
    }
    if continued {
        return Err("the text ends inside a line continuation".into());
    }
    Ok(())
}

/// A validated value. Its text is a secret when the entry is marked secret; `Debug` never
/// shows it either way.
#[derive(Clone)]
pub struct Value(SecretString);

impl Value {
    /// Parses `text` as a value of `format` for `key`: at most [`MAX_VALUE_LEN`] bytes, no
    /// NUL, valid in its format.
    pub fn parse(key: &ConfigKey, format: Format, text: &str) -> Result<Self, ModelError> {
        if text.len() > MAX_VALUE_LEN {
            return Err(ModelError::TooLong {
                field: Field::Value,
                len: text.len(),
                max: MAX_VALUE_LEN,
            });
        }
        if let Some(at) = text.find('\0') {
            return Err(ModelError::BadCharacter {
                field: Field::Value,
                what: "a NUL character",
                at,
            });
        }
        format
            .check(text)
            .map_err(|reason| ModelError::InvalidValue {
                key: key.to_string(),
                format,
                reason,
            })?;
        Ok(Self(SecretString::from(text.to_owned())))
    }

    /// The value's text.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Value(..)")
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for Value {}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One validated entry of a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigEntry {
    /// The key.
    pub key: ConfigKey,
    /// The value, valid in `format`.
    pub value: Value,
    /// Its declared format.
    pub format: Format,
    /// Whether the value is masked for readers without the reveal permission.
    pub secret: bool,
}

impl ConfigEntry {
    /// Parses one entry from its raw parts.
    pub fn parse(key: &str, value: &str, format: Format, secret: bool) -> Result<Self, ModelError> {
        let key = ConfigKey::parse(key)?;
        let value = Value::parse(&key, format, value)?;
        Ok(Self {
            key,
            value,
            format,
            secret,
        })
    }
}

/// Checks a whole set of entries: no duplicate key, not too many. Returns them sorted by
/// key.
pub fn check_entries(mut entries: Vec<ConfigEntry>) -> Result<Vec<ConfigEntry>, ModelError> {
    if entries.len() > MAX_ENTRIES {
        return Err(ModelError::TooManyEntries {
            len: entries.len(),
            max: MAX_ENTRIES,
        });
    }
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    if let Some(pair) = entries.windows(2).find(|w| w[0].key == w[1].key) {
        return Err(ModelError::DuplicateKey(pair[0].key.to_string()));
    }
    Ok(entries)
}

/// Longest accepted instance id, label name or label value, in bytes.
pub const MAX_SELECTOR_ITEM_LEN: usize = 128;

/// Which instances receive a gray release: those whose id is listed, or whose labels
/// include every listed label.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GraySelector {
    /// Instance ids that receive it.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub instances: BTreeSet<String>,
    /// Labels an instance must all carry to receive it (ignored when empty).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn check_selector_item(text: &str) -> Result<(), ModelError> {
    check_name(
        Field::Selector,
        text,
        MAX_SELECTOR_ITEM_LEN,
        &['-', '_', '.', ':'],
    )
}

impl GraySelector {
    /// A selector; refuses one that selects nothing and names outside
    /// `[A-Za-z0-9._:-]`.
    pub fn new(
        instances: impl IntoIterator<Item = String>,
        labels: BTreeMap<String, String>,
    ) -> Result<Self, ModelError> {
        let instances: BTreeSet<String> = instances.into_iter().collect();
        if instances.is_empty() && labels.is_empty() {
            return Err(ModelError::Empty {
                field: Field::Selector,
            });
        }
        for item in instances.iter().chain(labels.keys()).chain(labels.values()) {
            check_selector_item(item)?;
        }
        Ok(Self { instances, labels })
    }

    /// Parses the `labels` query parameter `k1=v1,k2=v2` (empty text: no labels).
    pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, ModelError> {
        let mut labels = BTreeMap::new();
        for pair in text.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or(ModelError::BadCharacter {
                field: Field::Selector,
                what: "a label without `=`",
                at: 0,
            })?;
            check_selector_item(k)?;
            check_selector_item(v)?;
            labels.insert(k.to_owned(), v.to_owned());
        }
        Ok(labels)
    }

    /// Whether an instance with this id and these labels receives the gray release.
    pub fn matches(&self, instance: Option<&str>, labels: &BTreeMap<String, String>) -> bool {
        instance.is_some_and(|i| self.instances.contains(i))
            || (!self.labels.is_empty()
                && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

#[cfg(test)]
mod tests;
