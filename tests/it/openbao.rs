//! OpenBao: KV v2 through vaultrs on the shared dev server, the CLI helper, and a
//! persistent server whose data survives a restart.

use std::collections::HashMap;

use harness::OpenBao;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::kv2;

fn client(bao: &OpenBao, token: &str) -> VaultClient {
    VaultClient::new(
        VaultClientSettingsBuilder::default()
            .address(bao.addr())
            .token(token)
            .build()
            .expect("vault client settings"),
    )
    .expect("a vault client")
}

fn secret(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test]
async fn kv2_write_then_read_through_vaultrs() {
    let bao = OpenBao::shared();
    let vault = client(bao, &bao.root_token());

    let written = secret(&[("kid", "k-2024-01"), ("pem", "-----BEGIN PRIVATE KEY-----")]);
    let meta = kv2::set(&vault, "secret", "proof/kv2/signing-key", &written)
        .await
        .expect("kv2 set");
    assert_eq!(meta.version, 1);
    kv2::set(
        &vault,
        "secret",
        "proof/kv2/signing-key",
        &secret(&[("kid", "k2")]),
    )
    .await
    .expect("kv2 set v2");

    let latest: HashMap<String, String> = kv2::read(&vault, "secret", "proof/kv2/signing-key")
        .await
        .expect("kv2 read");
    assert_eq!(latest, secret(&[("kid", "k2")]));
    let first: HashMap<String, String> =
        kv2::read_version(&vault, "secret", "proof/kv2/signing-key", 1)
            .await
            .expect("kv2 read version 1");
    assert_eq!(first, written);
}

#[tokio::test]
async fn wrong_token_is_refused() {
    let bao = OpenBao::shared();
    let vault = client(bao, "not-a-token");
    let result: Result<HashMap<String, String>, _> =
        kv2::read(&vault, "secret", "proof/kv2/anything").await;
    let err = result.expect_err("a bad token must not read secrets");
    assert!(err.to_string().contains("403"), "{err}");
}

#[test]
fn bao_cli_enables_engines_and_writes_policies() {
    let bao = OpenBao::shared();
    bao.bao(&["secrets", "enable", "-path=proof-transit", "transit"])
        .expect("enable transit");
    bao.bao(&["write", "-f", "proof-transit/keys/config-dek"])
        .expect("create a transit key");
    let key = bao
        .bao(&["read", "-format=json", "proof-transit/keys/config-dek"])
        .expect("read the transit key");
    let key: serde_json::Value = serde_json::from_str(&key).expect("json");
    assert_eq!(key["data"]["type"], "aes256-gcm96");

    let policy = "path \"secret/data/proof/*\" { capabilities = [\"read\"] }";
    bao.bao_with_stdin(&["policy", "write", "proof-reader", "-"], policy)
        .expect("policy write from stdin");
    let read_back = bao
        .bao(&["policy", "read", "proof-reader"])
        .expect("policy read");
    assert!(read_back.contains("secret/data/proof/*"), "{read_back}");
}

#[tokio::test]
async fn persistent_openbao_keeps_secrets_across_restart() {
    let bao = OpenBao::start_persistent().expect("a persistent OpenBao");
    let token = bao.root_token();
    let addr = bao.addr();
    kv2::set(
        &client(&bao, &token),
        "secret",
        "proof/persistent",
        &secret(&[("survives", "yes")]),
    )
    .await
    .expect("kv2 set");

    bao.restart().expect("restart and unseal");

    assert_eq!(bao.addr(), addr, "restart keeps the address");
    let status = bao.bao(&["status", "-format=json"]).expect("bao status");
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert_eq!(status["sealed"], false);
    assert_eq!(status["storage_type"], "raft");
    let read: HashMap<String, String> =
        kv2::read(&client(&bao, &token), "secret", "proof/persistent")
            .await
            .expect("kv2 read after restart");
    assert_eq!(read, secret(&[("survives", "yes")]));
}
