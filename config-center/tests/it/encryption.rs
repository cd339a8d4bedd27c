//! Envelope encryption against a real OpenBao Transit engine.

use config_center::{
    ChangeNote, CryptoError, Envelope, Expected, KeyWrapper, LocalWrapper, Store, StoreError,
    TransitWrapper,
};

use crate::common::{self, app, entry, env, secret};

async fn sqlite_pool(dir: &std::path::Path) -> config_center::Pool {
    common::pool_for(&format!("sqlite:{}", dir.join("config.db").display())).await
}

#[tokio::test]
async fn transit_rotation_and_rewrap_keep_old_releases_readable() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(dir.path()).await;
    let (wrapper, mount) = common::transit_wrapper_on("rotate").await;
    let store = Store::new(
        pool.clone(),
        Envelope::new(KeyWrapper::Transit(wrapper.clone())),
    );
    let (e, a) = (env("prod"), app("orders"));
    let note = ChangeNote::new("ops", "");
    store
        .publish(
            &e,
            &a,
            Expected::Version(0),
            vec![secret("db.password", "before-rotation")],
            &note,
        )
        .await
        .unwrap();
    let raw = common::raw_rows(&pool).await;
    assert!(
        raw.contains("vault:v1:"),
        "the data key is wrapped by Transit: {raw}"
    );
    assert!(!raw.contains("before-rotation"));

    let config_center::Pool::Sqlite(sqlite) = &pool else {
        unreachable!()
    };
    let old_wrapped: String = sqlx::query_scalar("SELECT wrapped FROM config_data_keys")
        .fetch_one(sqlite)
        .await
        .unwrap();

    // rotate the Transit key while the store keeps serving, then rewrap
    KeyWrapper::Transit(wrapper.clone()).rotate().await.unwrap();
    store
        .publish(
            &e,
            &a,
            Expected::Version(1),
            vec![secret("db.password", "during-rotation")],
            &note,
        )
        .await
        .unwrap();
    assert_eq!(store.rewrap_data_keys().await.unwrap(), 1);
    let raw = common::raw_rows(&pool).await;
    assert!(
        raw.contains("vault:v2:") && !raw.contains("vault:v1:"),
        "{raw}"
    );

    // retire Transit key version 1: only rewrapped data keys still unwrap
    harness::OpenBao::shared()
        .bao(&[
            "write",
            &format!("{mount}/keys/config-data-keys/config"),
            "min_decryption_version=2",
        ])
        .unwrap();
    let bao = harness::OpenBao::shared();
    let refused = bao.bao(&[
        "write",
        &format!("{mount}/decrypt/config-data-keys"),
        &format!("ciphertext={old_wrapped}"),
    ]);
    assert!(
        refused.is_err(),
        "version 1 is retired: the old wrapped key no longer unwraps"
    );
    // a fresh instance (empty cache) reads both releases through the rewrapped key
    let fresh = Store::new(pool, Envelope::new(KeyWrapper::Transit(wrapper)));
    assert_eq!(
        fresh
            .release(&e, &a, 1)
            .await
            .unwrap()
            .get("db.password")
            .unwrap()
            .value
            .expose(),
        "before-rotation"
    );
    assert_eq!(
        fresh
            .release(&e, &a, 2)
            .await
            .unwrap()
            .get("db.password")
            .unwrap()
            .value
            .expose(),
        "during-rotation"
    );
}

#[tokio::test]
async fn an_unreachable_key_service_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(dir.path()).await;
    let port = harness::free_port();
    let wrapper = TransitWrapper::new(
        common::vault_client(&format!("http://127.0.0.1:{port}"), "nothing"),
        "transit",
        "config-data-keys",
    );
    let store = Store::new(pool, Envelope::new(KeyWrapper::Transit(wrapper)));
    let err = store
        .publish(
            &env("prod"),
            &app("orders"),
            Expected::Version(0),
            vec![entry("k", "v")],
            &ChangeNote::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Crypto(CryptoError::KeyService(_))),
        "{err}"
    );
    assert_eq!(
        store
            .current_version(&env("prod"), &app("orders"))
            .await
            .unwrap(),
        None,
        "nothing was written"
    );
}

#[tokio::test]
async fn a_different_transit_key_cannot_unwrap_and_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(dir.path()).await;
    let right = common::transit_wrapper("right").await;
    let wrong = common::transit_wrapper("wrong").await;
    let (e, a) = (env("prod"), app("orders"));
    Store::new(pool.clone(), Envelope::new(KeyWrapper::Transit(right)))
        .publish(
            &e,
            &a,
            Expected::Version(0),
            vec![entry("k", "v")],
            &ChangeNote::default(),
        )
        .await
        .unwrap();
    let err = Store::new(pool, Envelope::new(KeyWrapper::Transit(wrong)))
        .release(&e, &a, 1)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Crypto(CryptoError::Unwrap { .. } | CryptoError::KeyService(_))
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_store_wrapped_locally_refuses_to_read_with_transit() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(dir.path()).await;
    let (e, a) = (env("dev"), app("orders"));
    Store::new(pool.clone(), common::local_envelope(dir.path()))
        .publish(
            &e,
            &a,
            Expected::Version(0),
            vec![entry("k", "v")],
            &ChangeNote::default(),
        )
        .await
        .unwrap();
    let transit = common::transit_wrapper("mismatch").await;
    let err = Store::new(pool, Envelope::new(KeyWrapper::Transit(transit)))
        .release(&e, &a, 1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Crypto(CryptoError::WrapperMismatch { .. })),
        "{err}"
    );
}

#[test]
fn the_master_key_file_is_created_owner_only_and_a_loose_one_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    LocalWrapper::open_or_create(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    LocalWrapper::open(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        LocalWrapper::open(&path).unwrap_err(),
        CryptoError::MasterKeyFile { .. }
    ));
    assert!(matches!(
        LocalWrapper::open(&dir.path().join("missing")).unwrap_err(),
        CryptoError::MasterKeyFile { .. }
    ));
    std::fs::write(dir.path().join("short"), "c2hvcnQ=").unwrap();
    std::fs::set_permissions(
        dir.path().join("short"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    assert!(LocalWrapper::open(&dir.path().join("short")).is_err());
}
