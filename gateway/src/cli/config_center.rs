//! `portcullis config …`: the ops CLI of the config center. It is a client of the HTTPS
//! API (`/config/v1/…`), not of the database, so that every change goes through the same
//! scopes, validation, audit trail and change feed as any other writer, and reaches every
//! watching node.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::config_files::{FileEntries, FileEntry, FileFormat, format_of, parse_file, render_file};
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
    /// Publish a file as the full content of a new release (an export imports back to
    /// the same entries, formats and secret flags included).
    Import {
        #[command(flatten)]
        at: Address,
        /// The file (`-`: standard input).
        file: PathBuf,
        /// Its format (default: from the file name's extension).
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
        /// Keys whose values are secret (repeatable), besides those the file marks.
        #[arg(long = "secret")]
        secrets: Vec<String>,
        /// Why.
        #[arg(long, short = 'm', default_value = "")]
        message: String,
    },
    /// Print the current release as a file, each entry's format and secret flag noted
    /// (`#@portcullis` comments in properties, the `#portcullis` key in JSON and YAML).
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
        /// Keys whose values are secret (repeatable), besides those the file marks.
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
            let map = snapshot_entries(&snap)?;
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
                    "{:>6}  {:<7}  {}  {:<20}  {}{rollback}",
                    r["version"],
                    r["status"].as_str().unwrap_or("main"),
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

/// Reads an import file into the API's entries; `--secret` keys are marked secret besides
/// those the file marks.
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
    let map = parse_file(format, &text)
        .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
    if let Some(missing) = secrets.iter().find(|k| !map.contains_key(*k)) {
        return Err(CliError::Usage(format!(
            "--secret {missing}: the file has no such key"
        )));
    }
    Ok(map
        .into_iter()
        .map(|(k, e)| {
            let secret = e.secret || secrets.contains(&k);
            json!({ "key": k, "value": e.value, "format": e.format.as_str(), "secret": secret })
        })
        .collect())
}

/// A snapshot's entries as a file holds them.
fn snapshot_entries(snapshot: &Value) -> Result<FileEntries, CliError> {
    entries(snapshot)
        .into_iter()
        .map(|e| {
            let key = e["key"].as_str();
            let value = e["value"].as_str();
            let (Some(key), Some(value)) = (key, value) else {
                return Err(CliError::Usage(
                    "the snapshot holds an entry without a key or a value".into(),
                ));
            };
            let format = match e["format"].as_str() {
                Some(f) => config_center::Format::parse(f)
                    .map_err(|err| CliError::Usage(format!("entry `{key}`: {err}")))?,
                None => config_center::Format::Plain,
            };
            let entry = FileEntry {
                value: value.to_owned(),
                format,
                secret: e["secret"].as_bool().unwrap_or(false),
            };
            Ok((key.to_owned(), entry))
        })
        .collect()
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
