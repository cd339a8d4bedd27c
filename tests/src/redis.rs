//! Real `redis-server` processes: a single server and a Redis Cluster.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::http::redis_command;
use crate::process::{Service, Spec, retry_on_port_clash, run};
use crate::{HarnessError, Result, find_program, free_port};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(60);

/// A `redis-server` on 127.0.0.1, killed on drop.
#[derive(Debug)]
pub struct Redis {
    service: Service,
    port: u16,
}

/// A Redis Cluster of `masters` master nodes (no replicas), each its own [`Redis`].
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Redis>,
}

// === impl Redis ===

impl Redis {
    /// Starts an in-memory server (`--save "" --appendonly no`) on a free port.
    pub fn start() -> Result<Redis> {
        retry_on_port_clash(|| Redis::launch(&["--save", "", "--appendonly", "no"]))
    }

    /// Starts a server with `appendonly yes` in its temp dir: [`Redis::restart`] keeps the data.
    pub fn start_persistent() -> Result<Redis> {
        retry_on_port_clash(|| {
            Redis::launch(&[
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
        })
    }

    /// One in-memory server per test binary, started on first use. Isolate tests by key
    /// prefix. Panics when it cannot start (the message says why).
    pub fn shared() -> &'static Redis {
        static SHARED: OnceLock<std::result::Result<Redis, String>> = OnceLock::new();
        match SHARED.get_or_init(|| Redis::start().map_err(|e| e.to_string())) {
            Ok(redis) => redis,
            Err(e) => panic!("the shared Redis did not start: {e}"),
        }
    }

    fn launch(extra: &[&str]) -> Result<Redis> {
        let program = find_program("redis-server", &["/usr/bin", "/usr/sbin"])?;
        let port = free_port();
        let spec = Spec::new(program)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--daemonize", "no", "--logfile", ""])
            .args(extra.iter().copied());
        Redis::from_spec("redis", spec, port)
    }

    /// Starts `spec` (whose args lack `--dir`) in a new temp dir and waits for PING.
    fn from_spec(name: &str, spec: Spec, port: u16) -> Result<Redis> {
        let mut service = Service::new(name, spec, None)?;
        let dir = service.dir().to_path_buf();
        service = service.with_args(["--dir".into(), dir.into_os_string()]);
        let redis = Redis { service, port };
        redis.service.spawn()?;
        redis.wait_ready()?;
        Ok(redis)
    }

    fn wait_ready(&self) -> Result<()> {
        let port = self.port;
        // PING answers -LOADING while an append-only file is replayed: wait for PONG.
        self.service
            .wait_until("PING answers PONG", READY_TIMEOUT, || {
                (redis_command(port, &["PING"]).ok()? == "PONG").then_some(())
            })
    }

    /// `redis://127.0.0.1:P/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (SIGTERM, SIGKILL after a grace period). Idempotent.
    pub fn stop(&self) {
        self.service.stop();
    }

    /// Stops (if running) and starts the server again on the same port and dir.
    pub fn restart(&self) -> Result<()> {
        self.service.stop();
        self.service.spawn()?;
        self.wait_ready()
    }

    /// The server's temp dir (its data lives here).
    pub fn dir(&self) -> &Path {
        self.service.dir()
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.service.log_path().to_path_buf()
    }
}

// === impl RedisCluster ===

impl RedisCluster {
    /// Starts `masters` (at least 3) cluster-enabled servers, joins them with
    /// `redis-cli --cluster create`, and waits until every node reports `cluster_state:ok`.
    pub fn start(masters: usize) -> Result<RedisCluster> {
        if masters < 3 {
            return Err(HarnessError::Unexpected(format!(
                "a Redis Cluster needs at least 3 masters, not {masters}"
            )));
        }
        let program = find_program("redis-server", &["/usr/bin", "/usr/sbin"])?;
        let cli = find_program("redis-cli", &["/usr/bin"])?;
        let mut nodes = Vec::with_capacity(masters);
        for _ in 0..masters {
            let node = retry_on_port_clash(|| {
                let port = free_port();
                let spec = Spec::new(&program)
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--daemonize", "no", "--logfile", ""])
                    .args(["--save", "", "--appendonly", "no"])
                    .args(["--cluster-enabled", "yes"])
                    .args(["--cluster-config-file", "nodes.conf"])
                    .args(["--cluster-node-timeout", "5000"])
                    // The bus port defaults to port+10000, which may be taken or > 65535.
                    .args(["--cluster-port", &free_port().to_string()]);
                Redis::from_spec("redis-cluster-node", spec, port)
            })?;
            nodes.push(node);
        }
        let cluster = RedisCluster { nodes };
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        run(Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"]))?;
        for node in &cluster.nodes {
            let port = node.port;
            node.service
                .wait_until("cluster_state:ok", CLUSTER_TIMEOUT, || {
                    let info = redis_command(port, &["CLUSTER", "INFO"]).ok()?;
                    let ok = info.contains("cluster_state:ok")
                        && info.contains(&format!("cluster_known_nodes:{masters}\r"));
                    ok.then_some(())
                })?;
        }
        Ok(cluster)
    }

    /// `redis://127.0.0.1:P/` for every node, in start order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }

    /// The nodes, to stop or restart one (a restarted node keeps its `nodes.conf`).
    pub fn nodes(&self) -> &[Redis] {
        &self.nodes
    }
}
