//! `portcullis clients …`: OAuth clients, straight against the database (and, for disable
//! and delete, the Redis refresh-token store), without a running instance.
//!
//! Input goes through the admin API's parser ([`crate::admin::clients::parse_new_client`]),
//! so the CLI and the API accept and refuse exactly the same things, and output uses the
//! API's [`ClientView`]. Every change is audited as `operator:cli:<user>`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use secrecy::SecretString;
use serde_json::{Map, Value, json};

use super::{EXIT_CONFIG, EXIT_FAILURE, instant, runtime};
use crate::admin::clients::{
    ClientView, Rotated, WithSecret, format_duration, overlap_end, parse_id, parse_new_client,
    parse_overlap, settings_detail,
};
use crate::clients::{ClientError, ClientId, ClientRules, ClientStore};
use crate::config::{self, Config};
use crate::db::Database;
use crate::dev;
use crate::redis_store::RedisHandle;
use crate::refresh::{LazyRedisRefreshStore, RefreshStore};
use crate::server_key::ServerKey;

/// `portcullis clients …`
#[derive(Debug, Subcommand)]
pub(super) enum ClientsCommand {
    /// Register a client. Its secret is printed once and never again.
    Create {
        #[command(flatten)]
        target: Target,
        /// Its client_id (3–64 of a-z 0-9 . _ -); default: generated.
        #[arg(long)]
        id: Option<String>,
        /// A human name.
        #[arg(long)]
        name: String,
        /// A grant type it may use (repeat for several); default client_credentials.
        #[arg(long = "grant-type", value_name = "GRANT")]
        grant_types: Vec<String>,
        /// A scope it may be granted (repeat, or separate by spaces).
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// An audience it may have tokens for (repeat; the first is its default).
        #[arg(long = "audience", value_name = "AUDIENCE")]
        audiences: Vec<String>,
        /// Its own access-token lifetime, e.g. 15m; default tokens.access_token_lifetime.
        #[arg(long, value_name = "DURATION")]
        access_token_lifetime: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List every client (no secrets).
    List {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one client (no secrets).
    Show {
        #[command(flatten)]
        target: Target,
        /// The client_id.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Give a client a new secret, printed once; the old one keeps working for --overlap.
    RotateSecret {
        #[command(flatten)]
        target: Target,
        /// The client_id.
        id: String,
        /// How long the old secret keeps working (0s: stops at once; at most 30d).
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        overlap: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Refuse a client from now on and revoke its refresh tokens.
    Disable {
        #[command(flatten)]
        target: Target,
        /// The client_id.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Let a disabled client authenticate again.
    Enable {
        #[command(flatten)]
        target: Target,
        /// The client_id.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Cut off every access token issued to a client until now; the client stays enabled
    /// (the running instances apply it within 2 s).
    RevokeTokens {
        #[command(flatten)]
        target: Target,
        /// The client_id.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a client for good (it is disabled and its refresh tokens revoked first).
    Delete {
        #[command(flatten)]
        target: Target,
        /// The client_id.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Which instances' database (and Redis) to act on.
#[derive(Debug, Args)]
pub(super) struct Target {
    /// Configuration file of the instances whose clients to manage [default:
    /// PORTCULLIS_CONFIG, unless --dev].
    #[arg(long, short = 'c', conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// Use the database of a `serve --dev` data directory.
    #[arg(long)]
    pub(super) dev: bool,
    /// Data directory of --dev.
    #[arg(long, default_value = dev::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
}

/// Why a command failed: bad input (exit 64) or anything else (exit 1).
enum Failure {
    Usage(String),
    Other(String),
}

/// What the commands work with.
struct Ctx {
    config: Config,
    dev: bool,
    db: Database,
    clients: ClientStore,
    /// The server key, read once for the whole command (see [`shared_refresh_store`]).
    key: ServerKey,
}

// === impl ClientsCommand ===

impl ClientsCommand {
    fn target(&self) -> &Target {
        match self {
            Self::Create { target, .. }
            | Self::List { target, .. }
            | Self::Show { target, .. }
            | Self::RotateSecret { target, .. }
            | Self::Disable { target, .. }
            | Self::Enable { target, .. }
            | Self::RevokeTokens { target, .. }
            | Self::Delete { target, .. } => target,
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Invalid(..) | ClientError::ReservedId(_) => Self::Usage(e.to_string()),
            e @ ClientError::AlreadyExists => Self::Other(e.to_string()),
            e => Self::Other(crate::error::chain(&e)),
        }
    }
}

/// Runs `portcullis clients …`.
pub(super) fn run(cmd: ClientsCommand) -> ExitCode {
    let target = cmd.target();
    let config = match load_config(target) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let dev = target.dev;
    super::quiet_logging();
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let outcome = async {
            let ctx = connect(config, dev).await?;
            let outcome = execute(cmd, &ctx).await;
            ctx.db.close().await;
            outcome
        };
        match outcome.await {
            Ok(()) => ExitCode::SUCCESS,
            Err(Failure::Usage(e)) => {
                eprintln!("portcullis: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
            Err(Failure::Other(e)) => {
                eprintln!("portcullis: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}

pub(super) fn load_config(target: &Target) -> Result<Config, String> {
    if target.dev {
        let admin = config::ServerConfig::default().admin_listen;
        dev::dev_config(&target.data_dir, dev::DEFAULT_LISTEN, admin).map_err(|e| e.to_string())
    } else {
        let file = super::config_file(target.config.as_ref(), false)
            .ok_or("pass --config FILE (or PORTCULLIS_CONFIG), or --dev")?;
        config::load(&file, std::env::vars()).map_err(|e| e.to_string())
    }
}

async fn connect(config: Config, dev: bool) -> Result<Ctx, Failure> {
    let key = config
        .server_key()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let db = Database::connect_lazy(&config.database)
        .map_err(|e| Failure::Other(format!("database: {e}")))?;
    db.migrate()
        .await
        .map_err(|e| Failure::Other(format!("database: {e}")))?;
    let clients =
        ClientStore::new(db.clone(), key.clone()).with_rules(ClientRules::from_config(&config));
    Ok(Ctx {
        config,
        dev,
        db,
        clients,
        key,
    })
}

async fn execute(cmd: ClientsCommand, ctx: &Ctx) -> Result<(), Failure> {
    let now = time::OffsetDateTime::now_utc();
    match cmd {
        ClientsCommand::Create {
            id,
            name,
            grant_types,
            scopes,
            audiences,
            access_token_lifetime,
            json,
            ..
        } => {
            let mut body = Map::new();
            body.insert("id".to_owned(), json!(id));
            body.insert("name".to_owned(), json!(name));
            if !grant_types.is_empty() {
                body.insert("grant_types".to_owned(), json!(split(&grant_types)));
            }
            body.insert("scopes".to_owned(), json!(split(&scopes)));
            body.insert("audiences".to_owned(), json!(audiences));
            body.insert(
                "access_token_lifetime".to_owned(),
                json!(access_token_lifetime),
            );
            let new = parse_new_client(body)?;
            let (client, secret) = ctx.clients.create(new, now).await?;
            let view = ClientView::new(&client, now);
            audit(ctx, "client.create", &view.id, settings_detail(&view)).await;
            if json {
                print_json(&WithSecret::new(&view, &secret));
            } else {
                print_client(&view);
                print_secret(&secret);
            }
            shown_once();
        }
        ClientsCommand::List { json, .. } => {
            let views: Vec<ClientView> = ctx
                .clients
                .list()
                .await?
                .iter()
                .map(|c| ClientView::new(c, now))
                .collect();
            if json {
                print_json(&json!({ "clients": views }));
            } else {
                print_table(&views);
            }
        }
        ClientsCommand::Show { id, json, .. } => {
            let client = ctx.clients.get(&id_of(&id)?).await?;
            let view = ClientView::new(&client, now);
            if json {
                print_json(&view);
            } else {
                print_client(&view);
            }
        }
        ClientsCommand::RotateSecret {
            id, overlap, json, ..
        } => {
            let id = id_of(&id)?;
            let overlap = parse_overlap(&Value::String(overlap))?;
            let secret = ctx.clients.rotate_secret(&id, overlap, now).await?;
            let until = overlap_end(now, overlap);
            audit(
                ctx,
                "client.rotate_secret",
                id.as_str(),
                json!({ "overlap": format_duration(overlap),
                        "previous_secret_expires_at": until.map(instant) }),
            )
            .await;
            if json {
                let rotated = Rotated {
                    id: id.to_string(),
                    previous_secret_expires_at: until,
                };
                print_json(&WithSecret::new(rotated, &secret));
            } else {
                println!("client_id      {id}");
                print_secret(&secret);
                match until {
                    Some(t) => println!("old secret     works until {}", instant(t)),
                    None => println!("old secret     stopped working now"),
                }
            }
            shown_once();
        }
        ClientsCommand::Disable { id, json, .. } => {
            let id = id_of(&id)?;
            ctx.clients.disable(&id, now).await?;
            cut_after_disable(ctx, &id, now).await?;
            let revoked = revoke_refresh_tokens(ctx, &id).await;
            audit(
                ctx,
                "client.disable",
                id.as_str(),
                json!({ "sessions_revoked": revoked.as_ref().ok().copied().flatten() }),
            )
            .await;
            let revoked = revoked?;
            report(json, &id, json!({ "enabled": false }), revoked);
        }
        ClientsCommand::Enable { id, json, .. } => {
            let id = id_of(&id)?;
            ctx.clients.enable(&id, now).await?;
            audit(ctx, "client.enable", id.as_str(), json!({})).await;
            if json {
                print_json(&json!({ "id": id.as_str(), "enabled": true }));
            } else {
                println!("{id}: enabled");
            }
        }
        ClientsCommand::RevokeTokens { id, json, .. } => {
            let id = id_of(&id)?;
            ctx.clients.get(&id).await?;
            let first = instant(cut_access_tokens(ctx, &id, now).await?);
            audit(
                ctx,
                "client.revoke_tokens",
                id.as_str(),
                json!({ "tokens_issued_before": first }),
            )
            .await;
            if json {
                print_json(&json!({ "id": id.as_str(), "tokens_issued_before": first }));
            } else {
                println!("{id}: access tokens issued before {first} are refused");
            }
        }
        ClientsCommand::Delete { id, json, .. } => {
            let id = id_of(&id)?;
            // disabled first, so that no token is issued to it while the rest happens
            ctx.clients.disable(&id, now).await?;
            cut_after_disable(ctx, &id, now).await?;
            let revoked = revoke_refresh_tokens(ctx, &id).await;
            if revoked.is_err() {
                audit(
                    ctx,
                    "client.disable",
                    id.as_str(),
                    json!({ "for": "client.delete", "sessions_revoked": null }),
                )
                .await;
            }
            let revoked = revoked?;
            if let Err(e) = ctx.clients.delete(&id).await {
                audit(
                    ctx,
                    "client.disable",
                    id.as_str(),
                    json!({ "for": "client.delete", "sessions_revoked": revoked }),
                )
                .await;
                return Err(e.into());
            }
            audit(
                ctx,
                "client.delete",
                id.as_str(),
                json!({ "sessions_revoked": revoked }),
            )
            .await;
            report(json, &id, json!({ "deleted": true }), revoked);
        }
    }
    Ok(())
}

/// Cuts off the access tokens issued to `id` until `until` ([`crate::cutoff`]); returns
/// the first instant whose tokens are accepted. The running instances read the cutoff
/// from the database within seconds.
async fn cut_access_tokens(
    ctx: &Ctx,
    id: &ClientId,
    until: time::OffsetDateTime,
) -> Result<time::OffsetDateTime, Failure> {
    crate::cutoff::Cutoffs::new()
        .cut(
            &ctx.db,
            id.as_str(),
            until,
            crate::cutoff::longest_lifetime(&ctx.config),
        )
        .await
        .map_err(|e| Failure::Other(crate::error::chain(&e)))
}

/// [`cut_access_tokens`] for a disable at `now`: the instances serve the client from their
/// cached record for a few seconds more ([`crate::cutoff::after_disable`]).
async fn cut_after_disable(
    ctx: &Ctx,
    id: &ClientId,
    now: time::OffsetDateTime,
) -> Result<(), Failure> {
    cut_access_tokens(ctx, id, now + crate::cutoff::after_disable(&ctx.config))
        .await
        .map(|_| ())
}

/// The shared refresh-token store of `config`'s instances (a single Redis or a Cluster,
/// as they reach it; connected on first use): `None` when there is none to reach
/// (`--dev`, or no `[redis]`: the tokens live in the running instance's memory).
///
/// `key` is the server key the command read when it began (a failure to read it exits 64
/// there, as any configuration failure does): it is not read again here, where a key file
/// changed or removed in the meantime would fail the command with another exit status, or
/// have it work with two keys.
pub(super) fn shared_refresh_store(
    config: &Config,
    dev: bool,
    key: &ServerKey,
) -> Option<Result<LazyRedisRefreshStore, String>> {
    let redis = config.redis.as_ref().filter(|_| !dev)?;
    Some(
        RedisHandle::new(redis)
            .map(|handle| LazyRedisRefreshStore::new(handle, key.clone(), config.refresh.clone()))
            .map_err(|e| e.to_string()),
    )
}

/// Revokes the refresh tokens of `id` in the shared Redis store: `Ok(Some(n))` when done,
/// `Ok(None)` when there is no shared store to reach (said on stderr), `Err` when Redis
/// failed (the client stays disabled; running the command again finishes the job).
async fn revoke_refresh_tokens(ctx: &Ctx, id: &ClientId) -> Result<Option<usize>, Failure> {
    let failed = |e: String| {
        Failure::Other(format!(
            "{id} is disabled, but its refresh tokens could not be revoked ({e}); run the \
             command again when Redis is back"
        ))
    };
    let Some(store) = shared_refresh_store(&ctx.config, ctx.dev, &ctx.key) else {
        eprintln!(
            "portcullis: note: {}: refresh tokens live in the memory of the running instance, \
             out of this command's reach. To revoke them at once, use the admin API \
             (POST /admin/clients/{id}/disable on the admin listener) or restart the instance \
             (which drops them all). The client itself is refused from now on.",
            if ctx.dev {
                "--dev has no shared refresh-token store"
            } else {
                "no [redis] is configured"
            }
        );
        return Ok(None);
    };
    let n = store
        .map_err(failed)?
        .revoke_client(id.as_str())
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok(Some(n))
}

fn id_of(text: &str) -> Result<ClientId, Failure> {
    Ok(parse_id(text)?)
}

/// Values that may each hold several space-separated items.
fn split(values: &[String]) -> Vec<&str> {
    values.iter().flat_map(|v| v.split_whitespace()).collect()
}

async fn audit(ctx: &Ctx, action: &str, target: &str, detail: Value) {
    super::audit_change(&ctx.db, &ctx.config, action, target, detail).await;
}

// === output ===

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn print_secret(secret: &SecretString) {
    use secrecy::ExposeSecret;
    println!("client_secret  {}", secret.expose_secret());
}

fn shown_once() {
    eprintln!(
        "portcullis: the secret above is shown this once and will not be shown again: only \
         a keyed hash of it is stored. Keep it in your secret store now."
    );
}

fn report(json: bool, id: &ClientId, state: Value, revoked: Option<usize>) {
    if json {
        let mut out = json!({ "id": id.as_str(), "sessions_revoked": revoked });
        if let (Some(out), Some(state)) = (out.as_object_mut(), state.as_object()) {
            out.extend(state.clone());
        }
        print_json(&out);
    } else {
        let what = if state.get("deleted").is_some() {
            "deleted"
        } else {
            "disabled"
        };
        match revoked {
            Some(n) => println!("{id}: {what}; {n} refresh-token session(s) revoked"),
            None => println!("{id}: {what}"),
        }
    }
}

fn print_client(v: &ClientView) {
    let list = |items: &[String]| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(" ")
        }
    };
    println!("client_id      {}", v.id);
    println!("name           {}", v.name);
    println!("enabled        {}", if v.enabled { "yes" } else { "no" });
    println!("grant_types    {}", list(&v.grant_types));
    println!("scopes         {}", list(&v.scopes));
    println!("audiences      {}", list(&v.audiences));
    println!(
        "token lifetime {}",
        v.access_token_lifetime.as_deref().unwrap_or("default")
    );
    println!("created        {}", instant(v.created_at));
    println!("updated        {}", instant(v.updated_at));
    if let Some(t) = v.previous_secret_expires_at {
        println!("old secret     works until {}", instant(t));
    }
}

fn print_table(views: &[ClientView]) {
    println!(
        "{:<28} {:<24} {:<8} {:<34} {:<9} SCOPES",
        "ID", "NAME", "ENABLED", "GRANTS", "LIFETIME"
    );
    for v in views {
        println!(
            "{:<28} {:<24} {:<8} {:<34} {:<9} {}",
            v.id,
            v.name,
            if v.enabled { "yes" } else { "no" },
            v.grant_types.join(","),
            v.access_token_lifetime.as_deref().unwrap_or("default"),
            v.scopes.join(" "),
        );
    }
    if views.is_empty() {
        println!("(no clients)");
    }
}
