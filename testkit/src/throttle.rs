//! A rate-limiting TCP proxy for tests: listens on 127.0.0.1:<free port>, forwards every
//! connection to one loopback target, and limits the server -> client direction to N bytes/s.
//!
//! Lets a test slow a pull down enough to interrupt it midway (drop the proxy, or set the rate
//! to 0) at a deterministic point. Owns its own thread and current-thread tokio runtime, so it
//! works from sync and async tests alike; dropping it stops the runtime, which closes every
//! proxied connection.
//!
//! It only ever connects to the loopback address it was given. Hand-written: a token bucket and
//! two copy loops are smaller than any proxy crate's configuration.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest single read forwarded to the client; small enough to keep the rate smooth.
const MAX_CHUNK: usize = 16 * 1024;
/// How often a paused (rate 0) connection looks at the rate again.
const PAUSE_POLL: Duration = Duration::from_millis(10);

/// A running proxy. Stops (closing all connections) on drop.
#[derive(Debug)]
pub struct ThrottleProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    /// Server -> client bytes per second; 0 pauses forwarding.
    rate: AtomicU64,
    /// Bytes delivered to clients so far.
    to_client: AtomicU64,
    /// Connections accepted so far.
    connections: AtomicU64,
    bucket: Mutex<Bucket>,
}

/// Token bucket shared by all connections, so the limit holds for the proxy as a whole. Tokens
/// may go negative (debt): a reader takes what it read, then sleeps off the debt.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl ThrottleProxy {
    /// Starts a proxy to `target` (must be a loopback address) limited to `bytes_per_sec`
    /// server -> client.
    pub fn start(target: SocketAddr, bytes_per_sec: u64) -> anyhow::Result<ThrottleProxy> {
        if !target.ip().is_loopback() {
            bail!("throttle proxy: target {target} is not a loopback address");
        }
        let std_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("throttle proxy: bind 127.0.0.1:0")?;
        std_listener
            .set_nonblocking(true)
            .context("throttle proxy: set listener non-blocking")?;
        let addr = std_listener
            .local_addr()
            .context("throttle proxy: listener address")?;
        let shared = Arc::new(Shared {
            target,
            rate: AtomicU64::new(bytes_per_sec),
            to_client: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                last: Instant::now(),
            }),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("throttle proxy: build tokio runtime")?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let shared2 = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("throttle-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("throttle proxy {addr}: listener: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = stop_rx => {}
                        () = accept_loop(listener, shared2) => {}
                    }
                });
                // Dropping the runtime here cancels every connection task and closes its sockets.
            })
            .context("throttle proxy: spawn thread")?;
        Ok(ThrottleProxy {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, usable as the registry part of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The address every connection is forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// Changes the server -> client limit; 0 pauses forwarding (connections stay open).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.shared.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Server -> client bytes delivered so far, over all connections.
    pub fn bytes_to_client(&self) -> u64 {
        self.shared.to_client.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }
}

impl Drop for ThrottleProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // Fails only if the proxy thread already ended.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("throttle proxy: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            if let Err(e) = proxy_conn(client, &shared).await {
                eprintln!("throttle proxy -> {}: {e:#}", shared.target);
            }
        });
    }
}

async fn proxy_conn(client: TcpStream, shared: &Shared) -> anyhow::Result<()> {
    let server = TcpStream::connect(shared.target)
        .await
        .with_context(|| format!("connect {}", shared.target))?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();

    let upstream = async {
        // Resets and aborted peers are normal when a test kills a transfer.
        let _ = tokio::io::copy(&mut client_rd, &mut server_wr).await;
        let _ = server_wr.shutdown().await;
    };
    let downstream = async {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let want = chunk_len(shared.rate.load(Ordering::Relaxed));
            let n = match server_rd.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            shared.take(n).await;
            if client_wr.write_all(&buf[..n]).await.is_err() {
                break;
            }
            shared.to_client.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = client_wr.shutdown().await;
    };
    tokio::join!(upstream, downstream);
    Ok(())
}

/// Read size for a rate: about 1/50 s worth of bytes, between 1 byte and [`MAX_CHUNK`].
fn chunk_len(rate: u64) -> usize {
    usize::try_from(rate / 50)
        .unwrap_or(MAX_CHUNK)
        .clamp(1, MAX_CHUNK)
}

impl Shared {
    /// Takes `n` tokens, sleeping as long as the bucket is in debt.
    async fn take(&self, n: usize) {
        loop {
            let rate = self.rate.load(Ordering::Relaxed);
            if rate == 0 {
                tokio::time::sleep(PAUSE_POLL).await;
                continue;
            }
            let wait = {
                // A poisoned lock only means another connection task panicked mid-update; the
                // bucket's numbers are still usable.
                let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
                b.take(n, rate as f64, Instant::now())
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            return;
        }
    }
}

impl Bucket {
    /// Refills at `rate` up to a burst of 1/50 s, takes `n`, and returns how long to sleep to pay
    /// back any debt.
    fn take(&mut self, n: usize, rate: f64, now: Instant) -> Duration {
        let burst = (rate / 50.0).max(1.0);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_charges_debt_at_rate() {
        let t0 = Instant::now();
        let mut b = Bucket {
            tokens: 0.0,
            last: t0,
        };
        // 1000 B/s: taking 500 bytes from an empty bucket costs half a second.
        let w = b.take(500, 1000.0, t0);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-9, "{w:?}");
        // After sleeping it off, the bucket is even again.
        let w = b.take(0, 1000.0, t0 + Duration::from_millis(500));
        assert_eq!(w, Duration::ZERO);
        // Idle time refills only up to the burst (1/50 s = 20 bytes).
        let w = b.take(20, 1000.0, t0 + Duration::from_secs(100));
        assert_eq!(w, Duration::ZERO);
        let w = b.take(10, 1000.0, t0 + Duration::from_secs(100));
        assert!((w.as_secs_f64() - 0.01).abs() < 1e-9, "{w:?}");
    }

    #[test]
    fn chunk_len_bounds() {
        assert_eq!(chunk_len(0), 1);
        assert_eq!(chunk_len(1000), 20);
        assert_eq!(chunk_len(u64::MAX), MAX_CHUNK);
    }

    #[test]
    fn refuses_non_loopback_target() {
        let err = ThrottleProxy::start(SocketAddr::from(([192, 0, 2, 1], 80)), 1).unwrap_err();
        assert!(err.to_string().contains("not a loopback"), "{err}");
    }
}
