//! A TCP proxy to PostgreSQL that a test controls, to put the relay's connections in states
//! the real server cannot be asked for: `cut()` drops every open connection and refuses new
//! ones until `restore()` (what the relay sees when the database goes away), and `hold(text)`
//! stalls every connection that sends a statement containing `text` until `release()` (to
//! make one relay task, e.g. the wake-up poller, fall behind the others deterministically).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt, copy};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The proxy; connections end when it is dropped only through `cut()`.
pub struct PgProxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    /// The statement text whose connections are held, while one is set.
    held: watch::Sender<Option<String>>,
}

impl PgProxy {
    /// Proxies to `target` (`host:port`) from a free loopback port.
    pub async fn start(target: String) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0u64);
        let (held, _) = watch::channel(None::<String>);
        let (up2, gen2, held2) = (up.clone(), generation.clone(), held.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused-ish
                }
                let mut cut = gen2.subscribe();
                let hold = held2.subscribe();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut from_client, to_server) = (inbound, outbound);
                    let (client_read, mut client_write) = from_client.split();
                    let (mut server_read, server_write) = {
                        let (r, w) = tokio::io::split(to_server);
                        (r, w)
                    };
                    tokio::select! {
                        _ = forward_holding(client_read, server_write, hold) => {}
                        _ = copy(&mut server_read, &mut client_write) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        PgProxy {
            port,
            up,
            generation,
            held,
        }
    }

    /// A connection URL through the proxy, for `url`'s user and database.
    pub fn url_for(&self, url: &str) -> String {
        let pg: tokio_postgres::Config = url.parse().expect("url");
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            pg.get_user().unwrap_or("outbox"),
            self.port,
            pg.get_dbname().unwrap_or("outbox_test")
        )
    }

    /// Drops every open connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Stalls every connection, from the moment it sends a statement containing `text`, until
    /// `release`.
    pub fn hold(&self, text: &str) {
        self.held.send_replace(Some(text.to_owned()));
    }

    /// Lets held connections go on.
    pub fn release(&self) {
        self.held.send_replace(None);
    }
}

/// Copies client bytes to the server; a chunk containing the held text waits for `release`.
async fn forward_holding(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut hold: watch::Receiver<Option<String>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let needle = hold.borrow().clone();
            match needle {
                Some(text) if contains(&buf[..n], text.as_bytes()) => {
                    if hold.changed().await.is_err() {
                        return;
                    }
                }
                _ => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
