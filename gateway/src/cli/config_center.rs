//! `portcullis config …`: the ops CLI of the config center. It is a client of the HTTPS
//! API (`/config/v1/…`), not of the database, so that every change goes through the same
//! scopes, validation, audit trail and change feed as any other writer, and reaches every
//! watching node.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::{EXIT_CONFIG, EXIT_FAILURE, runtime};

/// Where the gateway is and how to authenticate to it.
#[derive(Debug, Args)]
pub struct Target {
    /// Base URL of a Portcullis instance.
    #[arg(long, env = "PORTCULLIS_URL", default_value = "https://localhost:8443")]
    url: String,
    /// A bearer access token with the `config:*` scopes the command needs.
    #[arg(long, env = "PORTCULLIS_TOKEN", hide_env_values = true)]
    token: SecretString,
    /// A PEM file of CAs to trust for the gateway's certificate (e.g. the --dev
    /// `cert.pem`).
    #[arg(long, env = "PORTCULLIS_CACERT")]
    cacert: Option<PathBuf>,
}

/// Which (environment, application), through which gateway: what every subcommand names.
#[derive(Debug, Args)]
pub struct Address {
    #[command(flatten)]
    target: Target,
    /// The environment.
    env: String,
    /// The application.
    app: String,
}

/// The format of an import or export file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FileFormat {
    /// `key=value` lines (Java properties, without line continuations).
    Properties,
    /// A YAML mapping; nested mappings become dotted keys.
    Yaml,
    /// A JSON object; nested objects become dotted keys.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the current release (all keys, or one key's value).
    Get {
        #[command(flatten)]
        at: Address,
        /// Only this key's value.
        key: Option<String>,
    },
    /// Set one key (a new release).
    Set {
        #[command(flatten)]
        at: Address,
        /// The key.
        key: String,
        /// The value (`-` reads it from standard input, which keeps it out of shell
        /// history).
        value: String,
        /// Mask the value in listings, history, diffs and audit.
        #[arg(long)]
        secret: bool,
        /// The value's declared format: plain, properties, yaml, json.
        #[arg(long, default_value = "plain")]
        format: String,
        /// Why (kept with the release).
        #[arg(long, short = 'm', default_value = "")]
        message: String,
    },
    /// Remove keys (a new release).
    Rm {
        #[command(flatten)]
        at: Address,
        /// The keys.
        #[arg(required = true)]
        keys: Vec<String>,
        /// Why.
        #[arg(long, short = 'm', default_value = "")]
        message: String,
    },
    /// Publish a file as the full content of a new release.
    Import {
        #[command(flatten)]
        at: Address,
        /// The file (`-`: standard input).
        file: PathBuf,
        /// Its format (default: from the file name's extension).
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
        /// Keys whose values are secret (repeatable).
        #[arg(long = "secret")]
        secrets: Vec<String>,
        /// Why.
        #[arg(long, short = 'm', default_value = "")]
        message: String,
    },
    /// Print the current release as a file.
    Export {
        #[command(flatten)]
        at: Address,
        /// The output format.
        #[arg(long, value_enum, default_value = "properties")]
        format: FileFormat,
    },
    /// List the releases, newest first.
    History {
        #[command(flatten)]
        at: Address,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show what changed between two releases.
    Diff {
        #[command(flatten)]
        at: Address,
        /// The older release.
        from: u64,
        /// The newer release.
        to: u64,
    },
    /// Republish an earlier release as a new one, after showing the diff.
    Rollback {
        #[command(flatten)]
        at: Address,
        /// The release to restore.
        version: u64,
        /// Do it without asking.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Why.
        #[arg(long, short = 'm', default_value = "")]
        message: String,
    },
    /// Publish a file as a gray release, served only to the selected instances.
    Gray {
        #[command(flatten)]
        at: Address,
        /// The file (`-`: standard input).
        file: PathBuf,
        /// Its format (default: from the file name's extension).
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
        /// Keys whose values are secret (repeatable).
        #[arg(long = "secret")]
        secrets: Vec<String>,
        /// An instance id that receives it (repeatable).
        #[arg(long = "instance")]
        instances: Vec<String>,
        /// A label `k=v` an instance must carry to receive it (repeatable; all must match).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Why.
        #[arg(long, short = 'm', default_value = "")]
        message: String,
    },
    /// Promote the gray release in progress to every instance.
    Promote {
        #[command(flatten)]
        at: Address,
        /// The gray release you looked at (refused if another is in progress).
        #[arg(long)]
        version: Option<u64>,
    },
    /// Abort the gray release in progress: every instance moves to the main content (or,
    /// when there is no main release, is served none).
    Abort {
        #[command(flatten)]
        at: Address,
        /// The gray release you looked at.
        #[arg(long)]
        version: Option<u64>,
    },
    /// Follow releases as they are published (Server-Sent Events), one JSON line each.
    Watch {
        #[command(flatten)]
        at: Address,
        /// The version already held (events start after it).
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{status}: {body}")]
    Refused { status: u16, body: String },
}

impl CliError {
    fn exit(&self) -> ExitCode {
        match self {
            Self::Usage(_) => ExitCode::from(EXIT_CONFIG),
            _ => ExitCode::from(EXIT_FAILURE),
        }
    }
}

/// Runs one `config` subcommand.
pub fn run(cmd: ConfigCommand) -> ExitCode {
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(execute(cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e}");
            e.exit()
        }
    }
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: SecretString,
}

impl Api {
    fn new(t: &Target) -> Result<Self, CliError> {
        let tls = crate::outbound::tls_config(t.cacert.as_deref())
            .map_err(|e| CliError::Usage(format!("--cacert: {e}")))?;
        let builder = reqwest::Client::builder().use_preconfigured_tls(tls);
        let http = builder
            .build()
            .map_err(|e| CliError::Usage(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: t.url.trim_end_matches('/').to_owned(),
            token: t.token.clone(),
        })
    }

    fn url(env: &str, app: &str, rest: &str) -> String {
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        format!("/config/v1/{}/{}{rest}", enc(env), enc(app))
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(self.token.expose_secret());
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|source| CliError::Http {
            url: url.clone(),
            source,
        })?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|source| CliError::Http { url, source })?;
        if !(200..300).contains(&status) {
            return Err(CliError::Refused { status, body: text });
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get(&self, path: &str) -> Result<Value, CliError> {
        self.call(reqwest::Method::GET, path, None).await
    }
}

async fn execute(cmd: ConfigCommand) -> Result<(), CliError> {
    match cmd {
        ConfigCommand::Get {
            at: Address { target, env, app },
            key,
        } => {
            let api = Api::new(&target)?;
            let snap = api.get(&Api::url(&env, &app, "")).await?;
            match key {
                Some(k) => {
                    let entry = entries(&snap)
                        .into_iter()
                        .find(|e| e["key"] == k.as_str())
                        .ok_or_else(|| CliError::Usage(format!("no key `{k}` in {env}/{app}")))?;
                    println!("{}", entry["value"].as_str().unwrap_or_default());
                }
                None => print_json(&snap),
            }
        }
        ConfigCommand::Set {
            at: Address { target, env, app },
            key,
            value,
            secret,
            format,
            message,
        } => {
            let value = if value == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .map_err(|e| CliError::Usage(format!("reading the value: {e}")))?;
                s.trim_end_matches(['\n', '\r']).to_owned()
            } else {
                value
            };
            let api = Api::new(&target)?;
            let body = json!({
                "set": [{ "key": key, "value": value, "format": format, "secret": secret }],
                "message": message,
            });
            let out = api
                .call(
                    reqwest::Method::PATCH,
                    &Api::url(&env, &app, ""),
                    Some(body),
                )
                .await?;
            println!("{env}/{app}: release {}", out["version"]);
        }
        ConfigCommand::Rm {
            at: Address { target, env, app },
            keys,
            message,
        } => {
            let api = Api::new(&target)?;
            let body = json!({ "remove": keys, "message": message });
            let out = api
                .call(
                    reqwest::Method::PATCH,
                    &Api::url(&env, &app, ""),
                    Some(body),
                )
                .await?;
            println!("{env}/{app}: release {}", out["version"]);
        }
        ConfigCommand::Import {
            at: Address { target, env, app },
            file,
            format,
            secrets,
            message,
        } => {
            let entries = file_entries(&file, format, &secrets)?;
            let n = entries.len();
            let api = Api::new(&target)?;
            let out = api
                .call(
                    reqwest::Method::PUT,
                    &Api::url(&env, &app, ""),
                    Some(json!({ "entries": entries, "message": message })),
                )
                .await?;
            println!("{env}/{app}: release {} ({n} keys)", out["version"]);
        }
        ConfigCommand::Gray {
            at: Address { target, env, app },
            file,
            format,
            secrets,
            instances,
            labels,
            message,
        } => {
            let entries = file_entries(&file, format, &secrets)?;
            let labels: BTreeMap<String, String> = labels
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| CliError::Usage(format!("--label {l}: expected k=v")))
                })
                .collect::<Result<_, _>>()?;
            let api = Api::new(&target)?;
            let out = api
                .call(
                    reqwest::Method::PUT,
                    &Api::url(&env, &app, "/gray"),
                    Some(json!({
                        "entries": entries,
                        "selector": { "instances": instances, "labels": labels },
                        "message": message,
                    })),
                )
                .await?;
            println!("{env}/{app}: gray release {}", out["version"]);
        }
        ConfigCommand::Promote {
            at: Address { target, env, app },
            version,
        } => {
            let out = gray_step(
                &target,
                &env,
                &app,
                version,
                reqwest::Method::POST,
                "/promote",
            )
            .await?;
            println!("{env}/{app}: release {} promoted", out["version"]);
        }
        ConfigCommand::Abort {
            at: Address { target, env, app },
            version,
        } => {
            let out = gray_step(&target, &env, &app, version, reqwest::Method::DELETE, "").await?;
            match out["version"].as_u64() {
                Some(v) => println!("{env}/{app}: gray release aborted; release {v}"),
                None => println!(
                    "{env}/{app}: gray release {} aborted; there is no main release, so none \
                     is served",
                    out["aborted"]
                ),
            }
        }
        ConfigCommand::Export {
            at: Address { target, env, app },
            format,
        } => {
            let api = Api::new(&target)?;
            let snap = api.get(&Api::url(&env, &app, "")).await?;
            let map: BTreeMap<String, String> = entries(&snap)
                .into_iter()
                .filter_map(|e| {
                    Some((
                        e["key"].as_str()?.to_owned(),
                        e["value"].as_str()?.to_owned(),
                    ))
                })
                .collect();
            print!("{}", render_file(format, &map));
        }
        ConfigCommand::History {
            at: Address { target, env, app },
            limit,
        } => {
            let api = Api::new(&target)?;
            let h = api
                .get(&Api::url(&env, &app, &format!("/releases?limit={limit}")))
                .await?;
            for r in h["releases"].as_array().into_iter().flatten() {
                let rollback = r["rollback_of"]
                    .as_u64()
                    .map(|v| format!(" (rollback to {v})"))
                    .unwrap_or_default();
                println!(
                    "{:>6}  {}  {:<20}  {}{rollback}",
                    r["version"],
                    r["created_at"].as_str().unwrap_or_default(),
                    r["author"].as_str().unwrap_or_default(),
                    r["message"].as_str().unwrap_or_default(),
                );
            }
        }
        ConfigCommand::Diff {
            at: Address { target, env, app },
            from,
            to,
        } => {
            let api = Api::new(&target)?;
            let d = api
                .get(&Api::url(&env, &app, &format!("/diff?from={from}&to={to}")))
                .await?;
            print_diff(&d);
        }
        ConfigCommand::Rollback {
            at: Address { target, env, app },
            version,
            yes,
            message,
        } => {
            let api = Api::new(&target)?;
            let current = api.get(&Api::url(&env, &app, "")).await?["version"]
                .as_u64()
                .ok_or_else(|| CliError::Usage(format!("{env}/{app} has no release")))?;
            let d = api
                .get(&Api::url(
                    &env,
                    &app,
                    &format!("/diff?from={current}&to={version}"),
                ))
                .await?;
            println!(
                "rolling {env}/{app} back from release {current} to the content of {version}:"
            );
            print_diff(&d);
            if !yes && !confirm()? {
                return Err(CliError::Usage("not confirmed; nothing changed".into()));
            }
            let out = api
                .call(
                    reqwest::Method::POST,
                    &Api::url(&env, &app, "/rollback"),
                    Some(json!({ "to": version, "expected_version": current, "message": message })),
                )
                .await?;
            println!("{env}/{app}: release {}", out["version"]);
        }
        ConfigCommand::Watch {
            at: Address { target, env, app },
            from,
        } => {
            let api = Api::new(&target)?;
            watch(&api, &env, &app, from).await?;
        }
    }
    Ok(())
}

/// Promotes (`POST …/gray/promote`) or aborts (`DELETE …/gray`) the gray release, naming
/// the version looked at when given.
async fn gray_step(
    target: &Target,
    env: &str,
    app: &str,
    version: Option<u64>,
    method: reqwest::Method,
    suffix: &str,
) -> Result<Value, CliError> {
    let api = Api::new(target)?;
    let query = version.map(|v| format!("?version={v}")).unwrap_or_default();
    api.call(
        method,
        &Api::url(env, app, &format!("/gray{suffix}{query}")),
        None,
    )
    .await
}

/// Reads an import file into the API's entries.
fn file_entries(
    file: &std::path::Path,
    format: Option<FileFormat>,
    secrets: &[String],
) -> Result<Vec<Value>, CliError> {
    let format = format
        .or_else(|| format_of(file))
        .ok_or_else(|| CliError::Usage("say --format (properties, yaml, json)".into()))?;
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| CliError::Usage(format!("reading standard input: {e}")))?;
        s
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?
    };
    let map = parse_file(format, &text).map_err(CliError::Usage)?;
    Ok(map
        .into_iter()
        .map(|(k, v)| json!({ "key": k, "value": v, "secret": secrets.contains(&k) }))
        .collect())
}

fn entries(snapshot: &Value) -> Vec<Value> {
    snapshot["entries"].as_array().cloned().unwrap_or_default()
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn print_diff(d: &Value) {
    let changes = d["changes"].as_array().cloned().unwrap_or_default();
    if changes.is_empty() {
        println!("  (no differences)");
    }
    for c in changes {
        let show = |side: &Value| side["value"].as_str().unwrap_or_default().to_owned();
        match c["change"].as_str() {
            Some("added") => println!(
                "+ {} = {}",
                c["key"].as_str().unwrap_or_default(),
                show(&c["after"])
            ),
            Some("removed") => println!(
                "- {} = {}",
                c["key"].as_str().unwrap_or_default(),
                show(&c["before"])
            ),
            _ => println!(
                "~ {}: {} -> {}",
                c["key"].as_str().unwrap_or_default(),
                show(&c["before"]),
                show(&c["after"])
            ),
        }
    }
}

fn confirm() -> Result<bool, CliError> {
    print!("proceed? [y/N] ");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::Usage(format!("reading the answer: {e}")))?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

async fn watch(api: &Api, env: &str, app: &str, from: u64) -> Result<(), CliError> {
    let url = format!(
        "{}{}",
        api.base,
        Api::url(env, app, &format!("/watch?version={from}"))
    );
    let mut resp = api
        .http
        .get(&url)
        .bearer_auth(api.token.expose_secret())
        .send()
        .await
        .map_err(|source| CliError::Http {
            url: url.clone(),
            source,
        })?;
    let status = resp.status().as_u16();
    if status != 200 {
        let body = resp.text().await.unwrap_or_default();
        return Err(CliError::Refused { status, body });
    }
    let mut parser = config_center::client::SseParser::default();
    while let Some(chunk) = resp.chunk().await.map_err(|source| CliError::Http {
        url: url.clone(),
        source,
    })? {
        let events = parser
            .feed(&chunk)
            .map_err(|e| CliError::Usage(format!("unreadable event stream: {e}")))?;
        for e in events {
            if e.event == "release" {
                println!("{}", e.data);
            }
        }
    }
    Ok(())
}

// === file formats ===

fn format_of(path: &std::path::Path) -> Option<FileFormat> {
    match path.extension()?.to_str()? {
        "properties" | "props" => Some(FileFormat::Properties),
        "yaml" | "yml" => Some(FileFormat::Yaml),
        "json" => Some(FileFormat::Json),
        _ => None,
    }
}

/// Flattens a file into `key → value` (nested mappings become dotted keys).
pub fn parse_file(format: FileFormat, text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    match format {
        FileFormat::Properties => {
            for (n, line) in text.lines().enumerate() {
                let line = line.trim_start();
                if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                    continue;
                }
                let split = line
                    .find(['=', ':'])
                    .ok_or_else(|| format!("line {}: expected `key=value`", n + 1))?;
                let (k, v) = line.split_at(split);
                insert(&mut out, k.trim(), v[1..].trim().to_owned())?;
            }
        }
        FileFormat::Json => {
            let v: Value = serde_json::from_str(text).map_err(|e| format!("JSON: {e}"))?;
            flatten_json(&mut out, String::new(), &v)?;
        }
        FileFormat::Yaml => {
            let docs =
                yaml_rust2::YamlLoader::load_from_str(text).map_err(|e| format!("YAML: {e}"))?;
            let doc = docs.into_iter().next().unwrap_or(yaml_rust2::Yaml::Null);
            flatten_yaml(&mut out, String::new(), &doc)?;
        }
    }
    Ok(out)
}

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

/// Renders `key → value` as a file.
pub fn render_file(format: FileFormat, map: &BTreeMap<String, String>) -> String {
    match format {
        FileFormat::Properties => map
            .iter()
            .map(|(k, v)| format!("{k}={}\n", v.replace('\\', "\\\\").replace('\n', "\\n")))
            .collect(),
        FileFormat::Json => {
            let obj: serde_json::Map<String, Value> = map
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            format!(
                "{}\n",
                serde_json::to_string_pretty(&Value::Object(obj)).unwrap_or_default()
            )
        }
        FileFormat::Yaml => map
            .iter()
            .map(|(k, v)| {
                // JSON strings are valid YAML scalars: quoting keeps every value text
                format!(
                    "{}: {}\n",
                    serde_json::to_string(k).unwrap_or_default(),
                    serde_json::to_string(v).unwrap_or_default()
                )
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_format_flattens_to_dotted_keys_and_renders_back() {
        let yaml = "db:\n  url: postgres://x\n  pool: 8\nfeature: true\n";
        let json = r#"{"db": {"url": "postgres://x", "pool": 8}, "feature": true}"#;
        let props = "# comment\ndb.url=postgres://x\ndb.pool = 8\nfeature: true\n";
        let want: BTreeMap<String, String> = [
            ("db.pool", "8"),
            ("db.url", "postgres://x"),
            ("feature", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(parse_file(FileFormat::Yaml, yaml).unwrap(), want);
        assert_eq!(parse_file(FileFormat::Json, json).unwrap(), want);
        assert_eq!(parse_file(FileFormat::Properties, props).unwrap(), want);
        for f in [FileFormat::Yaml, FileFormat::Json, FileFormat::Properties] {
            assert_eq!(
                parse_file(f, &render_file(f, &want)).unwrap(),
                want,
                "{f:?}"
            );
        }
    }

    #[test]
    fn malformed_files_are_refused_with_the_reason() {
        assert!(parse_file(FileFormat::Json, "[1, 2]").is_err());
        assert!(parse_file(FileFormat::Yaml, "- a\n- b\n").is_err());
        assert!(parse_file(FileFormat::Yaml, "a: [1, 2]\n").is_err());
        assert!(parse_file(FileFormat::Properties, "no separator here\n").is_err());
        assert!(parse_file(FileFormat::Properties, "a=1\na=2\n").is_err());
    }
}
