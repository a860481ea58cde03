//! The local control socket, `<data-dir>/control.sock` (in the private data dir, so only the
//! gateway's user can reach it): `tidepool status` and `tidepool dead-letters export` ask a
//! running gateway through it, since the store is locked while the gateway runs. One request
//! line (`status` or `dead-letters`), one answer (JSON, or JSON lines, streamed), then a last
//! line `#ok` or `#error: <why>`, and the socket closes: an answer without it was cut short.
//! The socket is made 0600. Idle, it costs no wake-ups.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::dispatch::thread::Inbox;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::store::{Store, StoreError};

/// The socket's path in a data dir.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// What the control socket can read of the running gateway.
pub struct Control {
    pub gateway: String,
    pub started: Instant,
    pub inbox: Inbox,
    pub metrics: Arc<Metrics>,
    pub outbox: Arc<Outbox>,
    pub disk: Arc<crate::os::disk::DiskWatch>,
    pub store: Store,
    /// Configured handlers that did not load at start, and why.
    pub skipped: Vec<crate::gateway::Skipped>,
}

impl Control {
    /// The `status` answer: the gateway, its handlers (quarantine included) and its counters.
    /// The handlers come from the dispatcher's thread, which may be held up (a long handler, a
    /// stalled disk): after a second they are reported as unknown, and the rest still answers.
    pub async fn status(&self) -> serde_json::Value {
        let wait = std::time::Duration::from_secs(1);
        let handlers = match tokio::time::timeout(wait, self.inbox.status()).await {
            Ok(Ok(hs)) => Some(hs),
            Ok(Err(_)) | Err(_) => None,
        };
        let handlers = handlers.map(|hs| {
            hs.iter()
                .map(|h| {
                    serde_json::json!({
                        "name": h.name,
                        "version": h.version,
                        "quarantined": h.quarantined,
                        "quarantined_for": h.quarantined_for,
                        "errors_in_row": h.errors_in_row,
                        "cpu_percent": h.cpu_percent,
                        "cpu_share": h.cpu_share,
                        "cpu_refused": h.cpu_refused,
                        "timer_ms": h.timer_ms,
                    })
                })
                .collect::<Vec<_>>()
        });
        let pending = self.outbox.pending();
        serde_json::json!({
            "gateway": self.gateway,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "handlers": handlers,
            "skipped": self.skipped,
            "outbox": {
                "entries": pending.urgent + pending.normal + pending.bulk,
                "bytes": self.outbox.used_bytes(),
            },
            "disk": {
                "free_bytes": self.disk.free_bytes(),
                "low": self.disk.is_low(),
            },
            "metrics": self.metrics.snapshot(),
        })
    }
}

/// Writes every dead letter, oldest first, as a JSON line; returns how many.
pub fn export_dead_letters(
    store: &Store,
    out: &mut (impl Write + ?Sized),
) -> Result<usize, StoreError> {
    let mut n = 0;
    for d in store.dead_letter_scan() {
        let d = d?;
        writeln!(out, "{}", d.to_line().to_json())?;
        n += 1;
    }
    Ok(n)
}

/// Binds the socket (replacing a stale one left by a crash; the store's lock, taken before,
/// means no other gateway uses this data dir) and makes it 0600.
pub fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(data_dir);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
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

/// The last line of every answer.
const OK: &str = "#ok\n";

/// Writes `bytes` to a client, which has [`WRITE_TIMEOUT`] to take them: a client that asks
/// and never reads does not hold the task (and the export's scan) for good.
async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, bytes: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, write.write_all(bytes))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading")
        })?
}

/// How long a client has to take each chunk of an answer.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a client of the control socket has to send its request line.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn answer(stream: UnixStream, control: &Control) -> std::io::Result<()> {
    // The socket is 0600, so only our user (and root) can connect; the peer's credentials are
    // checked too, in case the mode was changed or the directory is shared.
    let peer = stream.peer_cred()?.uid();
    let me = nix::unistd::geteuid().as_raw();
    if peer != me && peer != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("refused a client of uid {peer} (only uid {me} or root)"),
        ));
    }
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(256));
    let request = reader.read_line(&mut line);
    // A client that connects and says nothing does not hold a task for good.
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no request line within 5 s")
        })??;
    match line.trim() {
        "status" => {
            let mut v = serde_json::to_vec_pretty(&control.status().await).unwrap_or_default();
            v.extend_from_slice(b"\n");
            v.extend_from_slice(OK.as_bytes());
            send(&mut write, &v).await?;
        }
        "dead-letters" => {
            // Streamed in chunks from a blocking scan: the export never sits whole in memory.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
            let store = control.store.clone();
            let scan = tokio::task::spawn_blocking(move || {
                let mut out = ChunkWriter {
                    buf: Vec::new(),
                    tx,
                };
                let n = export_dead_letters(&store, &mut out)?;
                out.flush()?;
                Ok::<usize, StoreError>(n)
            });
            while let Some(chunk) = rx.recv().await {
                send(&mut write, &chunk).await?;
            }
            let trailer = match scan.await {
                Ok(Ok(_)) => OK.to_string(),
                Ok(Err(e)) => format!("#error: {e}\n"),
                Err(e) => format!("#error: {e}\n"),
            };
            send(&mut write, trailer.as_bytes()).await?;
        }
        other => {
            let msg = format!("#error: unknown request `{other}` (status, dead-letters)\n");
            send(&mut write, msg.as_bytes()).await?;
        }
    }
    write.shutdown().await
}

/// A `Write` that sends 64 KiB chunks into a channel (from a blocking thread).
struct ChunkWriter {
    buf: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
}

impl Write for ChunkWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.buf);
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::other("the client went away"))
    }
}

/// Sends one request to a running gateway and returns its answer (without the trailer);
/// `None` when no gateway listens on the data dir's socket. An `#error` trailer, or none (the
/// answer was cut short), is an error.
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
    // A gateway that stops answering (a stalled disk) must not hang the command.
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    s.write_all(format!("{what}\n").as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    strip_trailer(out).map(Some)
}

/// The answer without its last line, which must be `#ok`.
fn strip_trailer(mut out: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let body_end = out[..out.len().saturating_sub(1)]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let last = String::from_utf8_lossy(&out[body_end..])
        .trim_end()
        .to_string();
    if last == OK.trim_end() {
        out.truncate(body_end);
        return Ok(out);
    }
    match last.strip_prefix("#error: ") {
        Some(why) => Err(std::io::Error::other(format!(
            "the gateway answered: {why}"
        ))),
        None => Err(std::io::Error::other(
            "the gateway's answer was cut short (no #ok at the end)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_answer_ending_in_ok_is_whole() {
        assert_eq!(strip_trailer(b"a\nb\n#ok\n".to_vec()).unwrap(), b"a\nb\n");
        assert_eq!(strip_trailer(b"#ok\n".to_vec()).unwrap(), b"");
        let err = strip_trailer(b"a\n#error: store: corrupt\n".to_vec()).unwrap_err();
        assert!(err.to_string().contains("store: corrupt"), "{err}");
        let err = strip_trailer(b"a\nb\n".to_vec()).unwrap_err();
        assert!(err.to_string().contains("cut short"), "{err}");
        assert!(strip_trailer(Vec::new()).is_err());
    }
}
