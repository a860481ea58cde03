//! The local control socket, `<data-dir>/control.sock` (in the private data dir, so only the
//! gateway's user can reach it): `tidepool status` and `tidepool dead-letters export` ask a
//! running gateway through it, since the store is locked while the gateway runs. One request
//! line (`status` or `dead-letters`), one answer (JSON, or JSON lines), then the socket closes.
//! Idle, it costs no wake-ups.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::dispatch::Dispatcher;
use crate::jsonl::Line;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::store::{DeadLetter, Store, StoreError};

/// The socket's path in a data dir.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// What the control socket can read of the running gateway.
pub struct Control {
    pub gateway: String,
    pub started: Instant,
    pub dispatcher: Arc<Mutex<Dispatcher>>,
    pub metrics: Arc<Metrics>,
    pub outbox: Arc<Outbox>,
    pub store: Store,
}

impl Control {
    /// The `status` answer: the gateway, its handlers (quarantine included) and its counters.
    pub fn status(&self) -> serde_json::Value {
        let handlers = self
            .dispatcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handler_status();
        let pending = self.outbox.pending();
        serde_json::json!({
            "gateway": self.gateway,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "handlers": handlers.iter().map(|h| serde_json::json!({
                "name": h.name,
                "version": h.version,
                "quarantined": h.quarantined,
                "errors_in_row": h.errors_in_row,
                "timer_ms": h.timer_ms,
            })).collect::<Vec<_>>(),
            "outbox": {
                "entries": pending.urgent + pending.normal + pending.bulk,
                "bytes": self.outbox.used_bytes(),
            },
            "metrics": self.metrics.snapshot(),
        })
    }
}

/// Writes every dead letter, oldest first, as a JSON line; returns how many.
pub fn export_dead_letters(store: &Store, out: &mut impl Write) -> Result<usize, StoreError> {
    let mut n = 0;
    for kv in store.tree.scan_prefix(crate::store::keys::DEAD) {
        let (_, v) = kv?;
        let d: DeadLetter =
            ciborium::from_reader(&*v).map_err(|_| StoreError::Corrupt("d/".into()))?;
        writeln!(out, "{}", d.to_line().to_json())?;
        n += 1;
    }
    Ok(n)
}

impl DeadLetter {
    /// The letter as a line `tidepool invoke` can replay (a failed timer call as a timer tick).
    pub fn to_line(&self) -> Line {
        let base = if self.topic.is_empty() {
            Line {
                timer: true,
                now_ms: Some(self.received_ms),
                due_ms: self.ts,
                ..Line::default()
            }
        } else {
            Line {
                device: Some(self.device.clone()).filter(|d| !d.is_empty()),
                seq: Some(self.seq).filter(|s| *s > 0),
                ts: self.ts,
                received_ms: Some(self.received_ms),
                ..Line::event(&self.topic, &self.payload)
            }
        };
        Line {
            handler: Some(self.handler.clone()).filter(|h| !h.is_empty()),
            reason: Some(self.reason.clone()),
            ..base
        }
    }
}

/// Binds the socket (replacing a stale one left by a crash).
pub fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    let path = socket_path(data_dir);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    UnixListener::bind(&path)
}

/// Answers requests until `stop`.
pub async fn serve(listener: UnixListener, control: Arc<Control>, mut stop: watch::Receiver<bool>) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.wait_for(|s| *s) => return,
        };
        match conn {
            Ok((stream, _)) => {
                let control = control.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &control).await {
                        tracing::debug!("control socket: {e}");
                    }
                });
            }
            Err(e) => tracing::warn!("control socket: {e}"),
        }
    }
}

async fn answer(stream: UnixStream, control: &Control) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(256)).read_line(&mut line).await?;
    let body = match line.trim() {
        "status" => {
            let mut v = serde_json::to_vec_pretty(&control.status()).unwrap_or_default();
            v.push(b'\n');
            v
        }
        "dead-letters" => {
            let store = control.store.clone();
            tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                export_dead_letters(&store, &mut out).map(|_| out)
            })
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?
        }
        other => format!("error: unknown request `{other}` (status, dead-letters)\n").into_bytes(),
    };
    write.write_all(&body).await?;
    write.shutdown().await
}

/// Sends one request to a running gateway and returns its answer; `None` when no gateway
/// listens on the data dir's socket.
pub fn request(data_dir: &Path, what: &str) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut s = match std::os::unix::net::UnixStream::connect(socket_path(data_dir)) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    s.write_all(format!("{what}\n").as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(Some(out))
}
