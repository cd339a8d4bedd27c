//! A TCP forwarder that can go silent on the connections it carries (see [`Forwarder`]).

/// A TCP forwarder (to Postgres, say) that can go silent on the connections it carries,
/// as when the database host crashes or a VIP fails over to a new primary: the server's
/// side of each connection is closed (the server forgets it, its locks with it), while
/// the client's side is held open and passes nothing more, so the client learns nothing.
/// Connections made afterwards are forwarded as before (the new primary).
pub struct Forwarder {
    addr: std::net::SocketAddr,
    /// Connections accepted before the value last changed are silent.
    silence: tokio::sync::watch::Sender<u64>,
}

impl Forwarder {
    /// Listens on a free local port and forwards every connection to `upstream`.
    ///
    /// # Errors
    ///
    /// When no local port can be bound.
    pub async fn to(upstream: std::net::SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (silence, _) = tokio::sync::watch::channel(0u64);
        let cut = silence.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let generation = *cut.borrow();
                let (client_rx, client_tx) = client.into_split();
                let (server_rx, server_tx) = server.into_split();
                let silence = || (cut.subscribe(), generation);
                tokio::spawn(pipe(client_rx, server_tx, silence(), Side::Reader));
                tokio::spawn(pipe(server_rx, client_tx, silence(), Side::Writer));
            }
        });
        Ok(Self { addr, silence })
    }

    /// Where clients connect.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Stops passing anything on the connections open now: their server side is closed,
    /// their client side held open in silence.
    pub fn go_silent(&self) {
        self.silence.send_modify(|g| *g += 1);
    }
}

/// Which end of a pipe is the client's, to be held open once the forwarder goes silent.
#[derive(Clone, Copy)]
enum Side {
    Reader,
    Writer,
}

/// Copies `from` to `to` until either closes, or until the forwarder goes silent: then
/// closes the server's end and holds the client's open, passing nothing, until the
/// test's runtime ends.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    (mut silence, generation): (tokio::sync::watch::Receiver<u64>, u64),
    client: Side,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 16 * 1024];
    let silenced = |silence: &tokio::sync::watch::Receiver<u64>| *silence.borrow() > generation;
    loop {
        // the silence first: going silent closes the server's end (in the other pipe), so
        // this pipe may find the server's end closed in the same turn; the client's end
        // must then be held, not closed (a close would tell the client, a silent host
        // does not)
        tokio::select! {
            biased;
            // the guard `wait_for` returns is not `Send`: keep only that it happened
            () = async { let _ = silence.wait_for(|g| *g > generation).await; } => break,
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) if silenced(&silence) => break,
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        if silenced(&silence) {
                            break;
                        }
                        return;
                    }
                }
            },
        }
    }
    match client {
        Side::Reader => {
            drop(to);
            std::future::pending::<()>().await;
            drop(from);
        }
        Side::Writer => {
            drop(from);
            std::future::pending::<()>().await;
            drop(to);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// An upstream that answers each connection's first byte with one byte, then closes
    /// its socket as soon as the forwarder closes its end (as Redis and Postgres do).
    async fn prompt_closer() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut byte = [0u8; 1];
                    if socket.read_exact(&mut byte).await.is_ok() {
                        let _ = socket.write_all(&byte).await;
                    }
                    // EOF (the forwarder went silent): close at once
                    let _ = socket.read(&mut byte).await;
                });
            }
        });
        addr
    }

    /// Going silent closes the server's end; the server then closing its socket must
    /// never reach the client as a close: a silent host sends nothing at all. Asked many
    /// times, since which of the two a pipe sees first was a race.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_connection_never_shows_the_client_a_close() {
        let upstream = prompt_closer().await;
        for round in 0..200 {
            let forwarder = Forwarder::to(upstream).await.unwrap();
            let mut client = tokio::net::TcpStream::connect(forwarder.addr())
                .await
                .unwrap();
            client.write_all(b"x").await.unwrap();
            let mut byte = [0u8; 1];
            client.read_exact(&mut byte).await.unwrap();
            forwarder.go_silent();
            let read =
                tokio::time::timeout(std::time::Duration::from_millis(20), client.read(&mut byte))
                    .await;
            assert!(read.is_err(), "round {round}: the client saw {read:?}");
        }
    }
}
