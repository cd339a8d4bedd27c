//! nginx: a request through a real nginx to an upstream the test runs.

use harness::{Nginx, free_port, render_template};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

const CONFIG: &str = r#"
worker_processes 1;
events { worker_connections 64; }
http {
    upstream app { server 127.0.0.1:{{UPSTREAM_PORT}}; }
    server {
        listen 127.0.0.1:{{LISTEN_PORT}};
        location / {
            proxy_pass http://app;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header Host $host;
        }
    }
}
"#;

/// Answers one HTTP request with 200 and hands back the request head it saw.
async fn one_shot_upstream(listener: TcpListener) -> String {
    let (mut socket, _) = listener.accept().await.expect("nginx connects upstream");
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf).await.expect("read the request");
        assert!(n > 0, "nginx closed before sending a full request head");
        head.extend_from_slice(&buf[..n]);
    }
    let body = "hello from upstream";
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket
        .write_all(response.as_bytes())
        .await
        .expect("write the response");
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn proxies_to_the_upstream_with_x_forwarded_for() {
    let upstream = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let upstream_port = upstream.local_addr().expect("upstream addr").port();
    let seen = tokio::spawn(one_shot_upstream(upstream));
    let listen_port = free_port();
    let config = render_template(
        CONFIG,
        &[
            ("UPSTREAM_PORT", upstream_port.to_string()),
            ("LISTEN_PORT", listen_port.to_string()),
        ],
    )
    .expect("every placeholder filled");
    let nginx = Nginx::start(&config).expect("nginx starts");
    assert_eq!(nginx.port(), listen_port);
    assert!(nginx.prefix().join("nginx.conf").is_file());

    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .get(format!("http://127.0.0.1:{listen_port}/jobs?page=2"))
        .header("X-Forwarded-For", "203.0.113.7")
        .send()
        .await
        .expect("request through nginx");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "hello from upstream");

    let head = seen.await.expect("upstream task").to_ascii_lowercase();
    assert!(head.starts_with("get /jobs?page=2 http/1.0\r\n"), "{head}");
    assert!(
        head.contains("\r\nx-forwarded-for: 203.0.113.7, 127.0.0.1\r\n"),
        "upstream saw: {head}"
    );
}

#[test]
fn unfilled_placeholders_are_an_error_not_a_broken_config() {
    let err = render_template(CONFIG, &[("LISTEN_PORT", "1".into())])
        .expect_err("UPSTREAM_PORT is missing");
    assert!(err.to_string().contains("UPSTREAM_PORT"), "{err}");
}

#[test]
fn a_broken_config_fails_fast_with_the_nginx_log() {
    let config = format!(
        "events {{}}\nhttp {{ server {{ listen 127.0.0.1:{}; bogus_directive on; }} }}",
        free_port()
    );
    let err = Nginx::start(&config).expect_err("nginx must refuse the config");
    let message = err.to_string();
    assert!(message.contains("bogus_directive"), "{message}");
}
