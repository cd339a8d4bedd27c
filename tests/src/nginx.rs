//! A real nginx with a configuration the test provides.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::http::accepts;
use crate::process::{Service, Spec};
use crate::{HarnessError, Result, find_program};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Temp-path directives Debian's nginx would otherwise point at `/var/lib/nginx`.
const TEMP_PATHS: &[&str] = &[
    "client_body_temp_path",
    "proxy_temp_path",
    "fastcgi_temp_path",
    "uwsgi_temp_path",
    "scgi_temp_path",
];

/// nginx running a full `nginx.conf` given as text, killed on drop.
///
/// Runs `nginx -p <tmpdir>/ -c <tmpdir>/nginx.conf -e stderr -g 'daemon off; pid ...;'`,
/// so the error log goes to the harness log file. Unless the configuration sets them
/// itself, the harness also puts `pid`, `access_log` and the `*_temp_path`s inside the
/// temp dir (the latter two are inserted at the top of the `http {}` block).
#[derive(Debug)]
pub struct Nginx {
    service: Service,
    port: u16,
}

// === impl Nginx ===

impl Nginx {
    /// Writes `config` into a new temp dir, starts nginx on it and waits until the port
    /// of the first `listen` directive accepts connections.
    pub fn start(config: &str) -> Result<Nginx> {
        let nginx = find_program("nginx", &["/usr/sbin", "/usr/local/sbin"])?;
        let port = first_listen_port(config).ok_or_else(|| {
            HarnessError::Unexpected("the nginx config has no `listen <port>` directive".into())
        })?;
        let service = Service::new("nginx", Spec::new(nginx), None)?;
        let prefix = service.dir().to_path_buf();
        // Workers run as an unprivileged user when we are root; they need to reach the
        // temp paths inside the prefix.
        std::fs::set_permissions(&prefix, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| HarnessError::io(format!("chmod {}", prefix.display()), e))?;
        let tmp = prefix.join("tmp");
        std::fs::create_dir_all(&tmp)
            .map_err(|e| HarnessError::io(format!("creating {}", tmp.display()), e))?;
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, complete_config(config, &prefix))
            .map_err(|e| HarnessError::io(format!("writing {}", conf_path.display()), e))?;

        let mut globals = String::new();
        if !has_directive(config, "daemon") {
            globals.push_str("daemon off; ");
        }
        if !has_directive(config, "pid") {
            globals.push_str(&format!("pid {}; ", prefix.join("nginx.pid").display()));
        }
        let mut service = service.with_args([
            "-p".into(),
            format!("{}/", prefix.display()).into(),
            "-c".into(),
            conf_path.into_os_string(),
            "-e".into(),
            "stderr".into(),
        ]);
        if !globals.is_empty() {
            service = service.with_args(["-g".into(), globals.into()]);
        }
        let nginx = Nginx { service, port };
        nginx.service.spawn()?;
        nginx
            .service
            .wait_until(&format!("port {port} accepts"), READY_TIMEOUT, || {
                accepts(port).then_some(())
            })?;
        Ok(nginx)
    }

    /// The `-p` prefix: the temp dir holding `nginx.conf`, logs and temp paths.
    pub fn prefix(&self) -> &Path {
        self.service.dir()
    }

    /// The port of the configuration's first `listen` directive.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops nginx. Idempotent.
    pub fn stop(&self) {
        self.service.stop();
    }

    /// The log file (nginx's stderr, including its error log unless the config moves it).
    pub fn log_path(&self) -> PathBuf {
        self.service.log_path().to_path_buf()
    }
}

/// Whether a line of `config` starts with the directive `name`.
fn has_directive(config: &str, name: &str) -> bool {
    config.lines().any(|line| {
        let line = line.trim_start();
        line.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with(char::is_whitespace))
    })
}

/// The port of the first `listen` directive: `listen 8080;`, `listen 127.0.0.1:8080 ssl;`,
/// `listen [::1]:8080;` (comments skipped, any layout).
fn first_listen_port(config: &str) -> Option<u16> {
    let code: String = config
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    code.split(['{', '}', ';'])
        .filter_map(|statement| statement.trim().strip_prefix("listen"))
        .filter(|rest| rest.starts_with(char::is_whitespace))
        .find_map(|rest| {
            let address = rest.split_whitespace().next()?;
            let port = address.rsplit(':').next()?.trim_end_matches(']');
            port.parse().ok()
        })
}

/// `config` with temp paths and an access log inside `prefix`, unless it sets them.
fn complete_config(config: &str, prefix: &Path) -> String {
    let mut inserted = String::new();
    for directive in TEMP_PATHS {
        if !config.contains(directive) {
            let name = directive.trim_end_matches("_temp_path");
            inserted.push_str(&format!(
                "\n    {directive} {};",
                prefix.join("tmp").join(name).display()
            ));
        }
    }
    if !config.contains("access_log") {
        inserted.push_str(&format!(
            "\n    access_log {};",
            prefix.join("access.log").display()
        ));
    }
    match http_block_body_start(config) {
        Some(at) if !inserted.is_empty() => {
            format!("{}{inserted}\n{}", &config[..at], &config[at..])
        }
        _ => config.to_owned(),
    }
}

/// The byte offset just after the `{` of the top-level `http` block.
fn http_block_body_start(config: &str) -> Option<usize> {
    let bytes = config.as_bytes();
    let mut from = 0;
    while let Some(found) = config[from..].find("http") {
        let at = from + found;
        let before_ok = at == 0 || matches!(bytes[at - 1], b' ' | b'\n' | b'\t' | b';' | b'}');
        let after = &config[at + 4..];
        let trimmed = after.trim_start();
        if before_ok && trimmed.starts_with('{') {
            return Some(at + 4 + (after.len() - trimmed.len()) + 1);
        }
        from = at + 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_listen_port() {
        let conf = "events {}\nhttp {\n  server {\n    # listen 1;\n    listen 127.0.0.1:8081 ssl;\n    listen 9;\n  }\n}";
        assert_eq!(first_listen_port(conf), Some(8081));
        assert_eq!(first_listen_port("listen [::1]:443;"), Some(443));
        assert_eq!(first_listen_port("listen 80;"), Some(80));
        assert_eq!(first_listen_port("listen_x 1;"), None);
        assert_eq!(
            first_listen_port("http { server { listen 127.0.0.1:7; } }"),
            Some(7)
        );
    }

    #[test]
    fn inserts_temp_paths_into_the_http_block() {
        let conf = "events {}\nhttp {\n  proxy_temp_path /x;\n}\n";
        let out = complete_config(conf, Path::new("/p"));
        assert!(
            out.starts_with("events {}\nhttp {\n    client_body_temp_path /p/tmp/client_body;")
        );
        assert!(!out.contains("/p/tmp/proxy"));
        assert!(out.contains("access_log /p/access.log;"));
    }

    #[test]
    fn sees_directives_at_line_start() {
        assert!(has_directive("user x;\n  pid /run/x.pid;", "pid"));
        assert!(!has_directive("# pid\npidfile", "pid"));
    }
}
