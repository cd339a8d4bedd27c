//! OAuth2 clients against real Postgres and the `--dev` SQLite: one conformance set, run
//! on each backend.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use harness::Postgres;
use keyrotation::{Clock, ManualClock};
use portcullis::clients::{
    ADMIN_SCOPE, Audience, ClientError, ClientId, ClientStore, ClientUpdate, GrantType, NewClient,
    REREAD_AFTER, SECRET_PREFIX, Scope, ScopeSet,
};
use portcullis::config::DatabaseConfig;
use portcullis::db::{Database, Pool};
use portcullis::server_key::ServerKey;
use secrecy::{ExposeSecret, SecretString};
use sqlx::{Column, Row};
use time::OffsetDateTime;

/// A migrated database of one kind, a store over it and a clock standing still.
struct Backend {
    db: Database,
    store: ClientStore,
    clock: ManualClock,
    /// SQLite: the directory holding the database files (searched for secrets too).
    dir: Option<tempfile::TempDir>,
    /// The store's keyed-hash key (another instance's store over the same database).
    key: ServerKey,
}

async fn backend(url: String, dir: Option<tempfile::TempDir>) -> Backend {
    let db = Database::connect_lazy(&DatabaseConfig {
        url: SecretString::from(url),
        max_connections: 4,
        min_connections: 1,
        acquire_timeout: Duration::from_secs(30),
    })
    .unwrap();
    db.migrate().await.unwrap();
    let (key, _) = ServerKey::generate().unwrap();
    Backend {
        store: ClientStore::new(db.clone(), key.clone()),
        db,
        clock: ManualClock::new(OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()),
        dir,
        key,
    }
}

async fn postgres(prefix: &str) -> Backend {
    let url = Postgres::shared()
        .fresh_database(&format!("clients_{prefix}"))
        .unwrap();
    backend(url, None).await
}

async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/x.db", dir.path().display());
    backend(url, Some(dir)).await
}

/// Each conformance test, once per backend: `clients::postgres::<name>` and
/// `clients::sqlite::<name>`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::postgres(stringify!($name)).await).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::sqlite().await).await;
                }
            )*
        }
    };
}

conformance!(
    a_created_client_authenticates_with_its_secret_and_nothing_else,
    a_disabled_client_is_refused_until_enabled_again,
    stored_rows_hold_no_plaintext_secret,
    a_rotated_secret_overlaps_then_only_the_new_one_works,
    a_zero_overlap_rotation_ends_the_old_secret_at_once,
    a_secret_rotated_or_a_client_enabled_elsewhere_works_at_once_where_it_is_cached,
    scopes_narrow_to_what_the_client_is_allowed,
    audiences_default_to_the_first_and_refuse_others,
    a_duplicate_id_is_refused_and_the_first_client_is_untouched,
    bad_input_is_refused_precisely_and_nothing_is_stored,
    an_unnamed_client_gets_a_generated_id,
    update_changes_only_the_named_settings,
    delete_removes_a_client_for_good,
    list_returns_every_client_by_id,
    bootstrap_admin_creates_the_admin_client_once,
);

// === helpers ===

fn id(text: &str) -> ClientId {
    ClientId::parse(text).unwrap()
}

fn grants(list: &[GrantType]) -> BTreeSet<GrantType> {
    list.iter().copied().collect()
}

fn new_client(name: &str, scopes: &str) -> NewClient {
    NewClient {
        id: Some(id(name)),
        name: format!("The {name} service"),
        grant_types: grants(&[GrantType::ClientCredentials]),
        scopes: ScopeSet::parse(scopes).unwrap(),
        audiences: vec![Audience::parse("xxl-job-admin").unwrap()],
        access_token_lifetime: None,
    }
}

fn secret(text: &str) -> SecretString {
    SecretString::from(text.to_owned())
}

async fn refused(b: &Backend, client_id: &str, presented: &SecretString) {
    let result = b
        .store
        .authenticate(client_id, presented, b.clock.now())
        .await;
    assert!(
        matches!(result, Err(ClientError::InvalidClient)),
        "{client_id}: {result:?}"
    );
}

async fn accepted(b: &Backend, client_id: &str, presented: &SecretString) {
    let client = b
        .store
        .authenticate(client_id, presented, b.clock.now())
        .await
        .unwrap();
    assert_eq!(client.id.as_str(), client_id);
}

/// Every value of every column of `oauth_clients`, as text (byte columns both as lossy
/// UTF-8 and as hex).
/// Every value stored in `oauth_clients`, as the database hands it out: text as its
/// UTF-8, binary columns as their raw bytes and again as hex, numbers as decimal text;
/// on Postgres also each row's text form.
async fn raw_table(db: &Database) -> Vec<(String, Vec<u8>)> {
    const SQL: &str = "SELECT * FROM oauth_clients";
    macro_rules! dump {
        ($rows:expr) => {{
            let mut out = Vec::new();
            for row in $rows {
                for i in 0..row.len() {
                    let name = row.column(i).name().to_owned();
                    if let Ok(v) = row.try_get::<Option<String>, _>(i) {
                        out.push((name, v.unwrap_or_default().into_bytes()));
                    } else if let Ok(v) = row.try_get::<Option<Vec<u8>>, _>(i) {
                        let v = v.unwrap_or_default();
                        out.push((format!("{name} (hex)"), hex(&v).into_bytes()));
                        out.push((name, v));
                    } else if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
                        let v = v.map(|v| v.to_string()).unwrap_or_default();
                        out.push((name, v.into_bytes()));
                    } else {
                        let v = row.try_get::<bool, _>(i).unwrap().to_string();
                        out.push((name, v.into_bytes()));
                    }
                }
            }
            out
        }};
    }
    match db.pool() {
        Pool::Postgres(p) => {
            let rows = sqlx::query(SQL).fetch_all(p).await.unwrap();
            let whole: Vec<String> = sqlx::query_scalar("SELECT c::text FROM oauth_clients c")
                .fetch_all(p)
                .await
                .unwrap();
            let mut out = dump!(rows);
            out.extend(
                whole
                    .into_iter()
                    .map(|w| ("row".to_owned(), w.into_bytes())),
            );
            out
        }
        Pool::Sqlite(p) => {
            let rows = sqlx::query(SQL).fetch_all(p).await.unwrap();
            dump!(rows)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The forms a client secret could be stored in by mistake, each named: its text, its
/// base64url body, the 32 random bytes that body encodes, and those bytes as hex (either
/// case) and as standard base64 (without its padding, so that padded forms match too);
/// also the whole text as hex.
fn secret_forms(secret: &SecretString) -> Vec<(&'static str, Vec<u8>)> {
    use base64::Engine;
    let text = secret.expose_secret();
    let body = text.strip_prefix(SECRET_PREFIX).unwrap();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .unwrap();
    assert_eq!(raw.len(), 32);
    vec![
        ("its text", text.as_bytes().to_vec()),
        ("its body", body.as_bytes().to_vec()),
        ("its bytes", raw.clone()),
        ("its bytes as hex", hex(&raw).into_bytes()),
        ("its bytes as HEX", hex(&raw).to_uppercase().into_bytes()),
        (
            "its bytes as standard base64",
            base64::engine::general_purpose::STANDARD_NO_PAD
                .encode(&raw)
                .into_bytes(),
        ),
        ("its text as hex", hex(text.as_bytes()).into_bytes()),
    ]
}

fn sqlite_files(dir: &tempfile::TempDir) -> Vec<PathBuf> {
    std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

/// A change that makes a [`NewClient`] invalid.
type Spoil = Box<dyn Fn(&mut NewClient)>;

// === the conformance set ===

async fn a_created_client_authenticates_with_its_secret_and_nothing_else(b: Backend) {
    let (created, s) = b
        .store
        .create(new_client("executor-orders", "jobs:run"), b.clock.now())
        .await
        .unwrap();
    let (_, other) = b
        .store
        .create(new_client("executor-billing", "jobs:run"), b.clock.now())
        .await
        .unwrap();
    assert!(s.expose_secret().starts_with(SECRET_PREFIX));

    let client = b
        .store
        .authenticate("executor-orders", &s, b.clock.now())
        .await
        .unwrap();
    assert_eq!(*client, created);
    assert_eq!(*client, b.store.get(&id("executor-orders")).await.unwrap());
    assert!(client.enabled);
    assert_eq!(client.created_at, b.clock.now());

    // the last character changed (to another one: a fixed replacement would equal the
    // original one time in sixteen)
    let mut wrong = s.expose_secret().to_owned();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'A' { 'B' } else { 'A' });
    refused(&b, "executor-orders", &secret(&wrong)).await;
    refused(&b, "executor-orders", &secret("")).await;
    refused(&b, "executor-orders", &other).await;
    refused(&b, "executor-billing", &s).await;
    refused(&b, "nobody-here", &s).await;
    refused(&b, "Executor-Orders", &s).await;
    refused(&b, "", &s).await;
    refused(&b, "executor-orders\0", &s).await;

    // neither the secret nor its hash shows in Debug
    let debug = format!("{client:?}");
    assert!(!debug.contains(s.expose_secret()));
    assert!(debug.contains("<redacted>"), "{debug}");
}

async fn a_disabled_client_is_refused_until_enabled_again(b: Backend) {
    let (_, s) = b
        .store
        .create(new_client("executor-orders", "jobs:run"), b.clock.now())
        .await
        .unwrap();
    b.clock.advance(time::Duration::minutes(5));
    b.store
        .disable(&id("executor-orders"), b.clock.now())
        .await
        .unwrap();
    refused(&b, "executor-orders", &s).await;
    let stored = b.store.get(&id("executor-orders")).await.unwrap();
    assert!(!stored.enabled);
    assert_eq!(stored.updated_at, b.clock.now());

    b.store
        .enable(&id("executor-orders"), b.clock.now())
        .await
        .unwrap();
    accepted(&b, "executor-orders", &s).await;
    assert!(matches!(
        b.store.disable(&id("nobody-here"), b.clock.now()).await,
        Err(ClientError::NotFound)
    ));
}

async fn stored_rows_hold_no_plaintext_secret(b: Backend) {
    let (_, first) = b
        .store
        .create(new_client("executor-orders", "jobs:run"), b.clock.now())
        .await
        .unwrap();
    let rotated = b
        .store
        .rotate_secret(
            &id("executor-orders"),
            Duration::from_secs(3600),
            b.clock.now(),
        )
        .await
        .unwrap();
    let (_, admin) = b
        .store
        .bootstrap_admin(b.clock.now())
        .await
        .unwrap()
        .unwrap();

    let table = raw_table(&b.db).await;
    let stored = |column: &str, needle: &[u8]| {
        table
            .iter()
            .any(|(name, value)| name == column && holds(value, needle))
    };
    assert!(stored("id", b"executor-orders"), "{table:?}");
    assert!(
        table
            .iter()
            .any(|(name, value)| name == "previous_secret_hash" && value.len() == 32),
        "{table:?}"
    );
    for s in [&first, &rotated, &admin] {
        for (form, needle) in secret_forms(s) {
            for (column, value) in &table {
                assert!(!holds(value, &needle), "{column} holds a secret: {form}");
            }
        }
    }
    // SQLite: not in the database files either (main file and write-ahead log)
    if let Some(dir) = &b.dir {
        let files = sqlite_files(dir);
        assert!(!files.is_empty());
        for path in files {
            let bytes = std::fs::read(&path).unwrap();
            for s in [&first, &rotated, &admin] {
                for (form, needle) in secret_forms(s) {
                    assert!(
                        !holds(&bytes, &needle),
                        "a secret is in {}: {form}",
                        path.display()
                    );
                }
            }
        }
    }
}

async fn a_rotated_secret_overlaps_then_only_the_new_one_works(b: Backend) {
    let (_, old) = b
        .store
        .create(new_client("executor-orders", "jobs:run"), b.clock.now())
        .await
        .unwrap();
    let rotated_at = b.clock.now();
    let new = b
        .store
        .rotate_secret(
            &id("executor-orders"),
            Duration::from_secs(3600),
            rotated_at,
        )
        .await
        .unwrap();
    assert_ne!(old.expose_secret(), new.expose_secret());
    accepted(&b, "executor-orders", &old).await;
    accepted(&b, "executor-orders", &new).await;
    let client = b.store.get(&id("executor-orders")).await.unwrap();
    assert_eq!(
        client.previous_secret_expires_at(b.clock.now()),
        Some(rotated_at + time::Duration::hours(1))
    );

    b.clock
        .advance(time::Duration::hours(1) - time::Duration::milliseconds(1));
    accepted(&b, "executor-orders", &old).await;

    b.clock.advance(time::Duration::milliseconds(1));
    refused(&b, "executor-orders", &old).await;
    accepted(&b, "executor-orders", &new).await;
    let client = b.store.get(&id("executor-orders")).await.unwrap();
    assert_eq!(client.previous_secret_expires_at(b.clock.now()), None);

    // rotating during an overlap keeps only the latest previous secret
    let third = b
        .store
        .rotate_secret(
            &id("executor-orders"),
            Duration::from_secs(3600),
            b.clock.now(),
        )
        .await
        .unwrap();
    let fourth = b
        .store
        .rotate_secret(
            &id("executor-orders"),
            Duration::from_secs(3600),
            b.clock.now(),
        )
        .await
        .unwrap();
    refused(&b, "executor-orders", &new).await;
    accepted(&b, "executor-orders", &third).await;
    accepted(&b, "executor-orders", &fourth).await;
    refused(&b, "executor-orders", &old).await;

    assert!(matches!(
        b.store
            .rotate_secret(&id("nobody-here"), Duration::ZERO, b.clock.now())
            .await,
        Err(ClientError::NotFound)
    ));
}

async fn a_zero_overlap_rotation_ends_the_old_secret_at_once(b: Backend) {
    let (_, old) = b
        .store
        .create(new_client("executor-orders", "jobs:run"), b.clock.now())
        .await
        .unwrap();
    let new = b
        .store
        .rotate_secret(&id("executor-orders"), Duration::ZERO, b.clock.now())
        .await
        .unwrap();
    refused(&b, "executor-orders", &old).await;
    accepted(&b, "executor-orders", &new).await;
}

/// Another instance, which holds the client's record in its cache: a secret rotated (or
/// the client enabled again) through this one works there within a second, since a
/// cached record that refuses the credentials and is older than that is read again
/// before they are refused; a younger one's refusal stands, so a stream of wrong secrets
/// reads the database at most once a second. (What the cache still allows, the old
/// secret, ends there within its TTL, as documented.)
async fn a_secret_rotated_or_a_client_enabled_elsewhere_works_at_once_where_it_is_cached(
    b: Backend,
) {
    let (_, mut old) = b
        .store
        .create(new_client("executor-orders", "jobs:run"), b.clock.now())
        .await
        .unwrap();
    let now = b.clock.now();
    // the record there was read just now: its refusal stands for a moment. Whether the
    // moment has passed is measured (the cache ages its records by the real clock): when
    // the rotation's write took so long that the record there may have been read again,
    // the refusal proves nothing either way, and the round is tried again
    let mut rounds = 0;
    let (elsewhere, new) = loop {
        let elsewhere =
            ClientStore::with_cache_ttl(b.db.clone(), b.key.clone(), Duration::from_secs(3600));
        // before the read, so at least as long ago as the record there was read
        let read = std::time::Instant::now();
        elsewhere
            .authenticate("executor-orders", &old, now)
            .await
            .unwrap();
        let new = b
            .store
            .rotate_secret(&id("executor-orders"), Duration::ZERO, now)
            .await
            .unwrap();
        let answer = elsewhere.authenticate("executor-orders", &new, now).await;
        if read.elapsed() < REREAD_AFTER {
            assert!(
                matches!(answer, Err(ClientError::InvalidClient)),
                "a record read {:?} ago was read again: {answer:?}",
                read.elapsed()
            );
            break (elsewhere, new);
        }
        rounds += 1;
        assert!(rounds < 5, "no round finished within {REREAD_AFTER:?}");
        old = new;
    };
    tokio::time::sleep(REREAD_AFTER).await;
    let client = elsewhere
        .authenticate("executor-orders", &new, now)
        .await
        .unwrap();
    assert_eq!(client.id.as_str(), "executor-orders");
    // the record read again is the one kept: the old secret is refused there now too
    assert!(matches!(
        elsewhere.authenticate("executor-orders", &old, now).await,
        Err(ClientError::InvalidClient)
    ));

    // disabled here; the other instance, its cache emptied meanwhile, reads and keeps
    // the disabled record; enabled again here: it works there at once too
    b.store.disable(&id("executor-orders"), now).await.unwrap();
    let later = now + time::Duration::hours(2);
    let elsewhere =
        ClientStore::with_cache_ttl(b.db.clone(), b.key.clone(), Duration::from_secs(3600));
    assert!(matches!(
        elsewhere.authenticate("executor-orders", &new, later).await,
        Err(ClientError::InvalidClient)
    ));
    b.store.enable(&id("executor-orders"), later).await.unwrap();
    tokio::time::sleep(REREAD_AFTER).await;
    elsewhere
        .authenticate("executor-orders", &new, later)
        .await
        .unwrap();
}

async fn scopes_narrow_to_what_the_client_is_allowed(b: Backend) {
    let (client, _) = b
        .store
        .create(
            new_client("executor-orders", "config:read:prod jobs:run"),
            b.clock.now(),
        )
        .await
        .unwrap();
    let stored = b.store.get(&client.id).await.unwrap();
    assert_eq!(stored.scopes.to_string(), "config:read:prod jobs:run");

    let all = stored.grant_scopes(&ScopeSet::new()).unwrap();
    assert_eq!(all, stored.scopes);
    let narrowed = stored
        .grant_scopes(&ScopeSet::parse("jobs:run").unwrap())
        .unwrap();
    assert_eq!(narrowed.to_string(), "jobs:run");
    match stored
        .grant_scopes(&ScopeSet::parse("jobs:run config:write:prod portcullis:admin").unwrap())
    {
        Err(ClientError::ScopeNotAllowed(extra)) => {
            assert_eq!(extra.to_string(), "config:write:prod portcullis:admin");
        }
        other => panic!("{other:?}"),
    }
    assert!(stored.scopes.contains(&Scope::parse("jobs:run").unwrap()));

    // grants are checked the same way
    stored.check_grant(GrantType::ClientCredentials).unwrap();
    assert!(matches!(
        stored.check_grant(GrantType::RefreshToken),
        Err(ClientError::UnauthorizedGrant(GrantType::RefreshToken))
    ));

    // narrowing the client narrows what it can get
    let updated = b
        .store
        .update(
            &client.id,
            ClientUpdate {
                scopes: Some(ScopeSet::parse("jobs:run").unwrap()),
                ..ClientUpdate::default()
            },
            b.clock.now(),
        )
        .await
        .unwrap();
    assert!(matches!(
        updated.grant_scopes(&ScopeSet::parse("config:read:prod").unwrap()),
        Err(ClientError::ScopeNotAllowed(_))
    ));
}

async fn audiences_default_to_the_first_and_refuse_others(b: Backend) {
    let mut new = new_client("executor-orders", "jobs:run");
    new.audiences = vec![
        Audience::parse("https://admin.example.com/api").unwrap(),
        Audience::parse("xxl-job-admin").unwrap(),
    ];
    let (client, _) = b.store.create(new, b.clock.now()).await.unwrap();
    let stored = b.store.get(&client.id).await.unwrap();
    assert_eq!(stored.audiences, client.audiences);
    assert_eq!(
        stored.audience_for(None).unwrap().unwrap().as_str(),
        "https://admin.example.com/api"
    );
    let other = Audience::parse("xxl-job-admin").unwrap();
    assert_eq!(stored.audience_for(Some(&other)).unwrap(), Some(other));
    let foreign = Audience::parse("urn:elsewhere").unwrap();
    assert!(matches!(
        stored.audience_for(Some(&foreign)),
        Err(ClientError::AudienceNotAllowed(a)) if a == foreign
    ));

    let mut none = new_client("no-audience", "jobs:run");
    none.audiences = Vec::new();
    let (client, _) = b.store.create(none, b.clock.now()).await.unwrap();
    assert_eq!(client.audience_for(None).unwrap(), None);
}

async fn a_duplicate_id_is_refused_and_the_first_client_is_untouched(b: Backend) {
    let (first, s) = b
        .store
        .create(new_client("executor-orders", "jobs:run"), b.clock.now())
        .await
        .unwrap();
    b.clock.advance(time::Duration::minutes(1));
    let mut again = new_client("executor-orders", "portcullis:admin");
    again.name = "impostor".to_owned();
    assert!(matches!(
        b.store.create(again, b.clock.now()).await,
        Err(ClientError::AlreadyExists)
    ));
    assert_eq!(b.store.get(&first.id).await.unwrap(), first);
    accepted(&b, "executor-orders", &s).await;
    assert_eq!(b.store.list().await.unwrap().len(), 1);
}

async fn bad_input_is_refused_precisely_and_nothing_is_stored(b: Backend) {
    for bad in ["ab", "Orders", "-orders", "orders service", "orders/1"] {
        assert!(
            matches!(
                ClientId::parse(bad),
                Err(ClientError::Invalid("client_id", _))
            ),
            "{bad}"
        );
    }
    for bad in [
        "jobs:run  x",
        " jobs:run",
        "say\"hi\"",
        "back\\slash",
        "caf\u{e9}",
    ] {
        assert!(
            matches!(ScopeSet::parse(bad), Err(ClientError::Invalid("scope", _))),
            "{bad}"
        );
    }
    assert!(matches!(
        Audience::parse("not a uri"),
        Err(ClientError::Invalid("audience", _))
    ));
    assert!(matches!(
        GrantType::parse("password"),
        Err(ClientError::Invalid("grant_type", _))
    ));

    let cases: Vec<(&str, Spoil)> = vec![
        ("name", Box::new(|c| c.name = "  ".to_owned())),
        ("name", Box::new(|c| c.name = "line\nbreak".to_owned())),
        ("name", Box::new(|c| c.name = "n".repeat(201))),
        ("grant_types", Box::new(|c| c.grant_types.clear())),
        (
            "audiences",
            Box::new(|c| {
                let a = Audience::parse("xxl-job-admin").unwrap();
                c.audiences = vec![a.clone(), a];
            }),
        ),
        (
            "access_token_lifetime",
            Box::new(|c| c.access_token_lifetime = Some(Duration::ZERO)),
        ),
        (
            "access_token_lifetime",
            Box::new(|c| c.access_token_lifetime = Some(Duration::from_millis(1500))),
        ),
        (
            "access_token_lifetime",
            Box::new(|c| c.access_token_lifetime = Some(Duration::from_secs(86_401))),
        ),
    ];
    for (field, spoil) in cases {
        let mut new = new_client("executor-orders", "jobs:run");
        spoil(&mut new);
        match b.store.create(new, b.clock.now()).await {
            Err(ClientError::Invalid(f, _)) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    assert!(b.store.list().await.unwrap().is_empty());

    // a bad update changes nothing
    let (client, _) = b
        .store
        .create(new_client("executor-orders", "jobs:run"), b.clock.now())
        .await
        .unwrap();
    let result = b
        .store
        .update(
            &client.id,
            ClientUpdate {
                scopes: Some(ScopeSet::new()),
                grant_types: Some(BTreeSet::new()),
                ..ClientUpdate::default()
            },
            b.clock.now(),
        )
        .await;
    assert!(matches!(
        result,
        Err(ClientError::Invalid("grant_types", _))
    ));
    assert_eq!(b.store.get(&client.id).await.unwrap(), client);
}

async fn an_unnamed_client_gets_a_generated_id(b: Backend) {
    let mut new = new_client("placeholder", "jobs:run");
    new.id = None;
    let (client, s) = b.store.create(new.clone(), b.clock.now()).await.unwrap();
    assert!(client.id.as_str().starts_with("client-"));
    accepted(&b, client.id.as_str(), &s).await;
    let (other, _) = b.store.create(new, b.clock.now()).await.unwrap();
    assert_ne!(client.id, other.id);
}

async fn update_changes_only_the_named_settings(b: Backend) {
    let (client, s) = b
        .store
        .create(new_client("executor-orders", "jobs:run"), b.clock.now())
        .await
        .unwrap();
    b.clock.advance(time::Duration::minutes(1));
    let updated = b
        .store
        .update(
            &client.id,
            ClientUpdate {
                name: Some("Orders executor".to_owned()),
                grant_types: Some(grants(&[
                    GrantType::ClientCredentials,
                    GrantType::RefreshToken,
                ])),
                access_token_lifetime: Some(Some(Duration::from_secs(600))),
                ..ClientUpdate::default()
            },
            b.clock.now(),
        )
        .await
        .unwrap();
    assert_eq!(updated.name, "Orders executor");
    assert!(updated.allows_grant(GrantType::RefreshToken));
    assert_eq!(
        updated.access_token_lifetime,
        Some(Duration::from_secs(600))
    );
    assert_eq!(updated.scopes, client.scopes);
    assert_eq!(updated.audiences, client.audiences);
    assert_eq!(updated.created_at, client.created_at);
    assert_eq!(updated.updated_at, b.clock.now());
    assert_eq!(b.store.get(&client.id).await.unwrap(), updated);
    accepted(&b, "executor-orders", &s).await;

    let cleared = b
        .store
        .update(
            &client.id,
            ClientUpdate {
                access_token_lifetime: Some(None),
                ..ClientUpdate::default()
            },
            b.clock.now(),
        )
        .await
        .unwrap();
    assert_eq!(cleared.access_token_lifetime, None);
    assert_eq!(cleared.name, "Orders executor");

    assert!(matches!(
        b.store
            .update(&id("nobody-here"), ClientUpdate::default(), b.clock.now())
            .await,
        Err(ClientError::NotFound)
    ));
}

async fn delete_removes_a_client_for_good(b: Backend) {
    let (client, s) = b
        .store
        .create(new_client("executor-orders", "jobs:run"), b.clock.now())
        .await
        .unwrap();
    b.store
        .create(new_client("executor-billing", "jobs:run"), b.clock.now())
        .await
        .unwrap();
    b.store.delete(&client.id).await.unwrap();
    assert!(matches!(
        b.store.get(&client.id).await,
        Err(ClientError::NotFound)
    ));
    refused(&b, "executor-orders", &s).await;
    assert!(matches!(
        b.store.delete(&client.id).await,
        Err(ClientError::NotFound)
    ));
    let left: Vec<String> = b
        .store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id.to_string())
        .collect();
    assert_eq!(left, ["executor-billing"]);
}

async fn list_returns_every_client_by_id(b: Backend) {
    assert!(b.store.list().await.unwrap().is_empty());
    for name in ["zeta-svc", "alpha-svc", "mid-svc"] {
        b.store
            .create(new_client(name, "jobs:run"), b.clock.now())
            .await
            .unwrap();
    }
    b.store
        .disable(&id("mid-svc"), b.clock.now())
        .await
        .unwrap();
    let listed = b.store.list().await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["alpha-svc", "mid-svc", "zeta-svc"]);
    assert!(!listed[1].enabled);
    assert_eq!(listed[0], b.store.get(&id("alpha-svc")).await.unwrap());
}

async fn bootstrap_admin_creates_the_admin_client_once(b: Backend) {
    let (admin_id, s) = b
        .store
        .bootstrap_admin(b.clock.now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(admin_id.as_str(), "admin");
    let admin = b
        .store
        .authenticate("admin", &s, b.clock.now())
        .await
        .unwrap();
    assert_eq!(admin.scopes.to_string(), ADMIN_SCOPE);
    assert_eq!(admin.grant_types, grants(&[GrantType::ClientCredentials]));
    assert!(
        b.store
            .bootstrap_admin(b.clock.now())
            .await
            .unwrap()
            .is_none()
    );
    accepted(&b, "admin", &s).await;
    assert_eq!(b.store.list().await.unwrap().len(), 1);
}

/// Once migrated, a Postgres pool holds its `min_connections` open, so the first writes
/// after start-up do not each wait for a new connection.
#[tokio::test]
async fn a_migrated_postgres_pool_holds_its_minimum_connections_open() {
    let url = Postgres::shared().fresh_database("pool_minimum").unwrap();
    let db = Database::connect_lazy(&DatabaseConfig {
        url: SecretString::from(url),
        max_connections: 6,
        min_connections: 3,
        acquire_timeout: Duration::from_secs(30),
    })
    .unwrap();
    let Pool::Postgres(pool) = db.pool() else {
        panic!("a postgres pool");
    };
    assert_eq!(pool.size(), 0, "nothing is opened before the schema");
    db.migrate().await.unwrap();
    assert!(pool.size() >= 3, "{} connections open", pool.size());
    // and back in the pool, idle (each is given back by a task of its own)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pool.num_idle() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} idle",
            pool.num_idle()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
