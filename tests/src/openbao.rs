//! A real OpenBao server (the open-source Vault fork, same HTTP API).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::http::{get_status, request};
use crate::process::{Service, Spec, retry_on_port_clash, run, run_with_stdin};
use crate::{HarnessError, Result, free_port, port_is_free, reserve, workspace_root};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// An OpenBao server on 127.0.0.1, killed on drop.
///
/// [`OpenBao::start`] runs a dev server (in memory, unsealed, kv-v2 at `secret/`);
/// [`OpenBao::start_persistent`] runs a real one with raft storage on disk that
/// [`OpenBao::restart`] unseals again with its data intact.
#[derive(Debug)]
pub struct OpenBao {
    service: Service,
    port: u16,
    root_token: String,
    /// The unseal key of a persistent server; `None` in dev mode.
    unseal_key: Option<String>,
}

// === impl OpenBao ===

impl OpenBao {
    /// Starts `bao server -dev` with a random root token on a free port. kv-v2 is mounted
    /// at `secret/`. Data lives in memory: [`OpenBao::restart`] comes back empty (same
    /// port and token).
    pub fn start() -> Result<OpenBao> {
        let bao = bao_binary()?;
        retry_on_port_clash(|| {
            // A dev server also binds port+1 for its cluster listener.
            let port = free_port_pair();
            let token = format!("root-{}", uuid::Uuid::new_v4().simple());
            let spec = Spec::new(&bao)
                .arg("server")
                .arg("-dev")
                .arg("-dev-no-store-token")
                .arg(format!("-dev-root-token-id={token}"))
                .arg(format!("-dev-listen-address=127.0.0.1:{port}"));
            let service = Service::new("openbao", spec, None)?;
            let home = service.dir().display().to_string();
            let service = with_clean_env(service.with_env("HOME", home));
            let bao = OpenBao {
                service,
                port,
                root_token: token,
                unseal_key: None,
            };
            bao.service.spawn()?;
            bao.wait_active()?;
            bao.wait_kv_ready()?;
            Ok(bao)
        })
    }

    /// One dev server per test binary, started on first use. Isolate tests by mount path
    /// or key prefix. Panics when it cannot start (the message says why).
    pub fn shared() -> &'static OpenBao {
        static SHARED: OnceLock<std::result::Result<OpenBao, String>> = OnceLock::new();
        match SHARED.get_or_init(|| OpenBao::start().map_err(|e| e.to_string())) {
            Ok(bao) => bao,
            Err(e) => panic!("the shared OpenBao did not start: {e}"),
        }
    }

    /// Starts a non-dev server (single-node raft storage in its temp dir — OpenBao has no
    /// `file` storage — and a plain-HTTP listener), then
    /// `operator init -key-shares=1 -key-threshold=1`, unseals it and enables kv-v2 at
    /// `secret/`. [`OpenBao::restart`] unseals it again; its data survives.
    pub fn start_persistent() -> Result<OpenBao> {
        let bao = bao_binary()?;
        retry_on_port_clash(|| {
            let port = free_port();
            let cluster_port = free_port();
            let service = Service::new("openbao", Spec::new(&bao), None)?;
            let dir = service.dir().to_path_buf();
            let config = dir.join("config.hcl");
            // OpenBao has no `file` storage; single-node raft (integrated storage) it is.
            let data = dir.join("data");
            std::fs::create_dir_all(&data)
                .map_err(|e| HarnessError::io(format!("creating {}", data.display()), e))?;
            std::fs::write(
                &config,
                format!(
                    r#"storage "raft" {{
  path    = "{data}"
  node_id = "portcullis-test"
  # Production raft timers (multiplier 5) make a one-node election take ~5 s.
  performance_multiplier = 1
}}
listener "tcp" {{
  address         = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable     = true
}}
api_addr     = "http://127.0.0.1:{port}"
cluster_addr = "https://127.0.0.1:{cluster_port}"
ui           = false
"#,
                    data = data.display()
                ),
            )
            .map_err(|e| HarnessError::io(format!("writing {}", config.display()), e))?;
            let service = with_clean_env(
                service
                    .with_args([
                        "server".into(),
                        format!("-config={}", config.display()).into(),
                    ])
                    .with_env("HOME", dir.display().to_string()),
            );
            service.spawn()?;
            // Any answer from /sys/health means the listener is up (501: not initialised).
            service.wait_until("the HTTP listener answers", READY_TIMEOUT, || {
                get_status(port, "/v1/sys/health").map(|_| ())
            })?;
            let mut bao = OpenBao {
                service,
                port,
                root_token: String::new(),
                unseal_key: None,
            };
            let init = bao.bao(&[
                "operator",
                "init",
                "-key-shares=1",
                "-key-threshold=1",
                "-format=json",
            ])?;
            let init: serde_json::Value = serde_json::from_str(&init)
                .map_err(|e| HarnessError::Unexpected(format!("bao operator init: {e}: {init}")))?;
            let field = |v: &serde_json::Value| v.as_str().map(str::to_owned);
            bao.unseal_key = init["unseal_keys_b64"].get(0).and_then(field);
            bao.root_token = field(&init["root_token"]).unwrap_or_default();
            if bao.unseal_key.is_none() || bao.root_token.is_empty() {
                return Err(HarnessError::Unexpected(format!(
                    "bao operator init printed no unseal key or root token: {init}"
                )));
            }
            bao.unseal_and_wait()?;
            bao.bao(&["secrets", "enable", "-path=secret", "kv-v2"])?;
            bao.wait_kv_ready()?;
            Ok(bao)
        })
    }

    fn unseal_and_wait(&self) -> Result<()> {
        if let Some(key) = &self.unseal_key {
            self.bao(&["operator", "unseal", key])?;
        }
        self.wait_active()
    }

    /// Waits until `/sys/health` says initialised, unsealed and active (200).
    fn wait_active(&self) -> Result<()> {
        let port = self.port;
        self.service
            .wait_until("/v1/sys/health answers 200", READY_TIMEOUT, || {
                (get_status(port, "/v1/sys/health")? == 200).then_some(())
            })
    }

    /// Waits until the kv-v2 mount at `secret/` accepts requests (a new kv-v2 mount
    /// finishes an internal upgrade step before it does).
    fn wait_kv_ready(&self) -> Result<()> {
        let port = self.port;
        let token = self.root_token.clone();
        self.service
            .wait_until("kv-v2 at secret/ answers", READY_TIMEOUT, || {
                let response = request(
                    port,
                    "GET",
                    "/v1/secret/config",
                    &[("X-Vault-Token", &token)],
                    "",
                )
                .ok()?;
                (response.status == 200).then_some(())
            })
    }

    /// `http://127.0.0.1:P`
    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The root token.
    pub fn root_token(&self) -> String {
        self.root_token.clone()
    }

    /// Stops the server. Idempotent.
    pub fn stop(&self) {
        self.service.stop();
    }

    /// Stops (if running) and starts the server again on the same port. A persistent
    /// server is unsealed again and keeps its data; a dev server comes back empty.
    pub fn restart(&self) -> Result<()> {
        self.service.stop();
        self.service.spawn()?;
        if self.unseal_key.is_some() {
            let port = self.port;
            self.service
                .wait_until("the HTTP listener answers", READY_TIMEOUT, || {
                    get_status(port, "/v1/sys/health").map(|_| ())
                })?;
            self.unseal_and_wait()?;
        } else {
            self.wait_active()?;
        }
        self.wait_kv_ready()
    }

    /// Runs the `bao` CLI against this server (`BAO_ADDR`/`VAULT_ADDR` and the root token
    /// set) and returns its stdout, e.g. `bao(&["secrets", "enable", "transit"])`.
    pub fn bao(&self, args: &[&str]) -> Result<String> {
        run(&mut self.bao_command(args)?)
    }

    /// Like [`OpenBao::bao`], with `stdin` as the command's standard input, for
    /// arguments that read `-`: `bao_with_stdin(&["policy", "write", "reader", "-"], hcl)`.
    pub fn bao_with_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        run_with_stdin(&mut self.bao_command(args)?, stdin)
    }

    fn bao_command(&self, args: &[&str]) -> Result<Command> {
        let addr = self.addr();
        let mut command = Command::new(bao_binary()?);
        for var in SCRUBBED_ENV {
            command.env_remove(var);
        }
        command
            .args(args)
            .env("BAO_ADDR", &addr)
            .env("VAULT_ADDR", &addr)
            .env("BAO_TOKEN", &self.root_token)
            .env("VAULT_TOKEN", &self.root_token)
            .env("HOME", self.service.dir())
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost");
        Ok(command)
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.service.log_path().to_path_buf()
    }
}

/// Variables from the caller's environment that would point the server or CLI elsewhere.
const SCRUBBED_ENV: &[&str] = &[
    "BAO_ADDR",
    "VAULT_ADDR",
    "BAO_TOKEN",
    "VAULT_TOKEN",
    "BAO_NAMESPACE",
    "VAULT_NAMESPACE",
    "BAO_CACERT",
    "VAULT_CACERT",
    "BAO_DEV_ROOT_TOKEN_ID",
    "VAULT_DEV_ROOT_TOKEN_ID",
    "BAO_DEV_LISTEN_ADDRESS",
    "VAULT_DEV_LISTEN_ADDRESS",
];

fn with_clean_env(service: Service) -> Service {
    service
        .without_env(SCRUBBED_ENV)
        .with_env("NO_PROXY", "127.0.0.1,localhost")
}

/// `.tools/venv/bin/bao`, installed by `scripts/install-prereqs.sh`.
fn bao_binary() -> Result<PathBuf> {
    let bao = workspace_root().join(".tools/venv/bin/bao");
    if bao.is_file() {
        Ok(bao)
    } else {
        Err(HarnessError::MissingBinary {
            program: "bao (OpenBao)".into(),
            looked_in: bao.display().to_string(),
        })
    }
}

/// A free port whose successor is free too, both reserved for this process as
/// [`free_port`]'s are.
fn free_port_pair() -> u16 {
    loop {
        let port = free_port();
        if port < u16::MAX && port_is_free(port + 1) && reserve(port + 1) {
            return port;
        }
    }
}
