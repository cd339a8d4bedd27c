//! Stores over real databases and key wrappers for the tests.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use config_center::{
    AppName, ConfigEntry, Envelope, Environment, Environments, Format, KeyWrapper, LocalWrapper,
    Pool, Store, TransitWrapper, migrate,
};
use tempfile::TempDir;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

/// How long a test waits for an event before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A store and what keeps it alive (temp dirs).
pub struct TestStore {
    pub store: Store,
    /// Keeps the master key (and SQLite file) alive.
    pub _dir: TempDir,
    /// The database URL.
    pub url: String,
}

pub fn env(name: &str) -> Environment {
    Environments::default().parse(name).unwrap()
}

pub fn app(name: &str) -> AppName {
    AppName::parse(name).unwrap()
}

pub fn entry(key: &str, value: &str) -> ConfigEntry {
    ConfigEntry::parse(key, value, Format::Plain, false).unwrap()
}

pub fn secret(key: &str, value: &str) -> ConfigEntry {
    ConfigEntry::parse(key, value, Format::Plain, true).unwrap()
}

/// A local-master-key envelope with its key file in `dir`.
pub fn local_envelope(dir: &Path) -> Envelope {
    let wrapper = LocalWrapper::open_or_create(&dir.join("master.key")).unwrap();
    Envelope::new(KeyWrapper::Local(wrapper))
}

pub async fn pool_for(url: &str) -> Pool {
    let pool = config_center::store::lazy_pool(url).unwrap();
    migrate(&pool).await.unwrap();
    pool
}

/// A store on a fresh Postgres database.
pub async fn postgres_store(name: &str) -> TestStore {
    let url = harness::Postgres::shared().fresh_database(name).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pool = pool_for(&url).await;
    let store = Store::new(pool, local_envelope(dir.path()));
    TestStore {
        store,
        _dir: dir,
        url,
    }
}

/// A store on a fresh SQLite file in a temp dir.
pub async fn sqlite_store(_name: &str) -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("config.db").display());
    let pool = pool_for(&url).await;
    let store = Store::new(pool, local_envelope(dir.path()));
    TestStore {
        store,
        _dir: dir,
        url,
    }
}

/// A Vault client on the shared OpenBao with its root token.
pub fn vault_client(addr: &str, token: &str) -> Arc<VaultClient> {
    let settings = VaultClientSettingsBuilder::default()
        .address(addr)
        .token(token)
        .timeout(Some(Duration::from_secs(5)))
        .build()
        .unwrap();
    Arc::new(VaultClient::new(settings).unwrap())
}

/// A Transit wrapper on a new transit mount of the shared OpenBao, its key created.
pub async fn transit_wrapper(mount_suffix: &str) -> TransitWrapper {
    transit_wrapper_on(mount_suffix).await.0
}

/// Like [`transit_wrapper`], also naming the mount.
pub async fn transit_wrapper_on(mount_suffix: &str) -> (TransitWrapper, String) {
    let bao = harness::OpenBao::shared();
    let mount = format!("transit-{mount_suffix}-{}", uuid_like());
    bao.bao(&["secrets", "enable", &format!("-path={mount}"), "transit"])
        .unwrap();
    let wrapper = TransitWrapper::new(
        vault_client(&bao.addr(), &bao.root_token()),
        mount.clone(),
        "config-data-keys",
    );
    wrapper.ensure_key().await.unwrap();
    (wrapper, mount)
}

/// A short unique suffix (process id and a counter).
pub fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Every stored byte a database holds for the config center, as text (lossy), for
/// grepping: wrapped keys, sealed values and all text columns.
pub async fn raw_rows(pool: &Pool) -> String {
    const ENTRIES: &str =
        "SELECT environment, application, key, format, sealed FROM config_entries";
    const RELEASES: &str = "SELECT environment, application, author, message FROM config_releases";
    const KEYS: &str = "SELECT environment, wrapper, wrapped FROM config_data_keys";
    let mut out = String::new();
    macro_rules! dump {
        ($p:expr) => {{
            let rows: Vec<(String, String, String, String, Vec<u8>)> =
                sqlx::query_as(ENTRIES).fetch_all($p).await.unwrap();
            for (a, b, c, d, e) in rows {
                out.push_str(&format!(
                    "{a} {b} {c} {d} {}\n",
                    String::from_utf8_lossy(&e)
                ));
            }
            let rows: Vec<(String, String, String, String)> =
                sqlx::query_as(RELEASES).fetch_all($p).await.unwrap();
            for (a, b, c, d) in rows {
                out.push_str(&format!("{a} {b} {c} {d}\n"));
            }
            let rows: Vec<(String, String, String)> =
                sqlx::query_as(KEYS).fetch_all($p).await.unwrap();
            for (a, b, c) in rows {
                out.push_str(&format!("{a} {b} {c}\n"));
            }
        }};
    }
    match pool {
        Pool::Postgres(p) => dump!(p),
        Pool::Sqlite(p) => dump!(p),
    }
    out
}
