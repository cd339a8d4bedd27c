//! Tiny blocking HTTP/1.1 and RESP clients on `std::net`, for readiness probes only.
//!
//! The harness is synchronous (tests may or may not run a tokio runtime), so its probes
//! do not use reqwest or the redis crate.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const IO_TIMEOUT: Duration = Duration::from_secs(2);

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub(crate) fn accepts(port: u16) -> bool {
    connect(port).is_ok()
}

/// A response from [`request`].
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
}

/// Sends one request (`Connection: close`) and reads the whole response.
pub(crate) fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<Response> {
    let mut stream = connect(port)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:.80}")))?;
    Ok(Response { status })
}

/// The status of `GET path`, or `None` when nothing answers.
pub(crate) fn get_status(port: u16, path: &str) -> Option<u16> {
    request(port, "GET", path, &[], "").ok().map(|r| r.status)
}

/// Sends one Redis command (as a RESP array) and returns the reply: the text of a
/// simple string, error (prefixed `-`), integer or bulk string.
pub(crate) fn redis_command(port: u16, args: &[&str]) -> std::io::Result<String> {
    let mut stream = connect(port)?;
    let mut out = format!("*{}\r\n", args.len());
    for arg in args {
        out.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(out.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let line = line.trim_end();
    match line.split_at_checked(1) {
        Some(("$", len)) => {
            let len: usize = len
                .parse()
                .map_err(|_| std::io::Error::other(format!("bad bulk length {len}")))?;
            let mut buf = vec![0; len + 2];
            reader.read_exact(&mut buf)?;
            buf.truncate(len);
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        Some(("-", _)) => Ok(line.to_owned()),
        Some((_, rest)) => Ok(rest.to_owned()),
        None => Err(std::io::Error::other("empty Redis reply")),
    }
}
