//! The admin requests and their answers, and the local control socket that carries them.
//! `<data-dir>/control.sock` (in the private data dir, 0600, from our uid or root) and the
//! admin channel (`admin/channel.rs`, operators over QUIC) speak the same: one request line,
//! a body for `deploy`, then one answer (JSON, or JSON lines for `dead-letters`, streamed)
//! and a last line `#ok` or `#error: <why>`; an answer without it was cut short. Requests:
//! `status`, `health`, `dead-letters`, `list`, `deploy <bytes>` (then the bundle's bytes),
//! `rollback <name>`, `remove <name>`. `docs/bundles.md` documents them. Idle, the socket costs
//! no wake-ups.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
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
    /// Deploys, rollbacks, removals, the registry, and the handlers that did not load.
    pub deployer: Arc<crate::admin::deploy::Deployer>,
    /// One deploy's bundle read at a time (each may be `deploy.max_bundle_bytes`).
    pub uploads: tokio::sync::Semaphore,
    /// Items submitted to the committer and not yet durable (for `health`).
    pub backlog: Arc<crate::store::commit::Backlog>,
    /// The watchdog's last verdict, while systemd's watchdog is on (`health` answers it).
    pub watchdog: crate::os::watchdog::LastVerdict,
}

/// One request, as its line reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Status,
    Health,
    DeadLetters,
    List,
    /// A bundle of this many bytes follows the line.
    Deploy(u64),
    Rollback(String),
    Remove(String),
}

impl Request {
    /// Parses a request line (without its newline).
    pub fn parse(line: &str) -> Result<Request, String> {
        let mut words = line.split(' ');
        let (verb, arg) = (words.next().unwrap_or(""), words.next());
        if words.next().is_some() {
            return Err(format!("`{line}`: one argument at most"));
        }
        let name = |arg: Option<&str>| match arg {
            Some(n) if crate::proto::topic::valid_device_id(n) => Ok(n.to_string()),
            Some(n) => Err(format!("`{n}` is not a handler name")),
            None => Err(format!("`{verb}` needs a handler name")),
        };
        match (verb, arg) {
            ("status", None) => Ok(Request::Status),
            ("health", None) => Ok(Request::Health),
            ("dead-letters", None) => Ok(Request::DeadLetters),
            ("list", None) => Ok(Request::List),
            ("deploy", Some(n)) => n
                .parse()
                .map(Request::Deploy)
                .map_err(|_| format!("`deploy {n}`: the bundle's length in bytes")),
            ("rollback", arg) => name(arg).map(Request::Rollback),
            ("remove", arg) => name(arg).map(Request::Remove),
            _ => Err(format!(
                "unknown request `{line}` (status, health, dead-letters, list, deploy <bytes>, rollback <name>, remove <name>)"
            )),
        }
    }

    /// The request's line (without its newline).
    pub fn line(&self) -> String {
        match self {
            Request::Status => "status".into(),
            Request::Health => "health".into(),
            Request::DeadLetters => "dead-letters".into(),
            Request::List => "list".into(),
            Request::Deploy(n) => format!("deploy {n}"),
            Request::Rollback(n) => format!("rollback {n}"),
            Request::Remove(n) => format!("remove {n}"),
        }
    }
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
        // What last happened to deployed handlers, and why (a rollback, a removal).
        let listed = match handlers.clone() {
            Some(hs) => {
                let deployer = self.deployer.clone();
                tokio::task::spawn_blocking(move || deployer.list(&hs).ok())
                    .await
                    .ok()
                    .flatten()
            }
            None => None,
        };
        let notes: serde_json::Map<String, serde_json::Value> = listed
            .unwrap_or_default()
            .into_iter()
            .filter_map(|l| Some((l.name, l.note?.into())))
            .collect();
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
                        "probation": h.probation,
                        "runs": h.runs,
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
            "skipped": self.deployer.skipped(),
            "notes": notes,
            "outbox": {
                "entries": pending.urgent + pending.normal + pending.bulk,
                "bytes": self.outbox.used_bytes(),
            },
            "disk": {
                "free_bytes": self.disk.free_bytes(),
                "low": self.disk.is_low(),
            },
            "clock": clock_status(),
            "metrics": self.metrics.snapshot(),
        })
    }
}

/// The wall clock against the floor: `synced` false while it is behind (no RTC, no NTP yet),
/// and the time certificates are checked at meanwhile.
fn clock_status() -> serde_json::Value {
    let wall_s = crate::clock::now_ms() / 1000;
    match crate::clock::floor() {
        Some(f) => serde_json::json!({
            "synced": crate::clock::is_set(wall_s * 1000),
            "wall_s": wall_s,
            "floor_s": f.floor_s(),
            "checked_at_s": f.trusted_s(),
        }),
        None => serde_json::json!({ "wall_s": wall_s }),
    }
}

impl Control {
    /// The `health` answer, judged as the watchdog judges (`os/watchdog.rs`) over a second:
    /// the dispatcher's thread answers, the commit path moves or has nothing waiting; a disk
    /// below its reserve is `degraded` (publishes get `busy`).
    async fn health(&self) -> serde_json::Value {
        use crate::os::watchdog::{Sample, Watchdog};
        let watched = self
            .watchdog
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(verdict) = watched {
            // The watchdog's own judgement, over its longer window.
            return self.health_answer(verdict, None, "the watchdog's last sample");
        }
        let groups = || {
            self.metrics
                .groups
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let mut judge = Watchdog::default();
        let _ = judge.judge(Sample {
            dispatcher_answered: true,
            backlog_items: self.backlog.items(),
            groups: groups(),
        });
        let wait = std::time::Duration::from_secs(1);
        let started = Instant::now();
        let answered = matches!(
            tokio::time::timeout(wait, self.inbox.status()).await,
            Ok(Ok(_))
        );
        // A second between the samples, so a commit path with work waiting has had time to
        // move.
        tokio::time::sleep(wait.saturating_sub(started.elapsed())).await;
        let verdict = judge.judge(Sample {
            dispatcher_answered: answered,
            backlog_items: self.backlog.items(),
            groups: groups(),
        });
        self.health_answer(verdict, Some(answered), "a second's samples")
    }

    fn health_answer(
        &self,
        verdict: Result<(), String>,
        answered: Option<bool>,
        judged_by: &str,
    ) -> serde_json::Value {
        let low = self.disk.is_low();
        let (state, why) = match (verdict, low) {
            (Err(why), _) => ("unhealthy", why),
            (Ok(()), true) => (
                "degraded",
                "the data dir's disk is below store.min_free_bytes: publishes are answered busy"
                    .to_string(),
            ),
            (Ok(()), false) => ("healthy", String::new()),
        };
        serde_json::json!({
            "state": state,
            "why": why,
            "judged_by": judged_by,
            "dispatcher_answered": answered,
            "commit_backlog": self.backlog.items(),
            "disk_low": low,
            "uptime_s": self.started.elapsed().as_secs(),
        })
    }

    /// The `list` answer: every handler name, deployed or pinned, with what runs.
    async fn list(&self) -> Result<serde_json::Value, String> {
        let wait = std::time::Duration::from_secs(1);
        let running = match tokio::time::timeout(wait, self.inbox.status()).await {
            Ok(Ok(hs)) => hs,
            Ok(Err(_)) => return Err("the gateway is stopping".into()),
            Err(_) => return Err("the dispatcher did not answer within a second".into()),
        };
        // The registry's bundles are read whole: off the runtime's threads.
        let deployer = self.deployer.clone();
        let listed = tokio::task::spawn_blocking(move || deployer.list(&running))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok(serde_json::to_value(listed).unwrap_or_default())
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
async fn send<W: AsyncWrite + Unpin>(write: &mut W, bytes: &[u8]) -> std::io::Result<()> {
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
    let (mut read, mut write) = stream.into_split();
    let by = format!("the local socket (uid {peer})");
    serve_one(&mut read, &mut write, control, &by, &|| None).await?;
    write.shutdown().await?;
    // A client still sending (a bundle refused from its length) reads the answer before the
    // socket closes: closed with its bytes unread, its reads would fail with a reset.
    let mut sink = tokio::io::sink();
    let drained = tokio::io::copy(&mut read, &mut sink);
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, drained).await;
    Ok(())
}

/// How long a client has to send a deploy's bundle.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, what.to_string())
}

/// Reads one request from `read` and writes its answer to `write` (the caller ends the
/// stream). `by` names the client, for the log of what it changed; `refused` says why the
/// client may no longer change anything (asked again once a deploy's bundle is in, before
/// anything changes: access can be withdrawn while it uploads).
pub async fn serve_one<R, W>(
    read: R,
    write: &mut W,
    control: &Control,
    by: &str,
    refused: &(dyn Fn() -> Option<String> + Sync),
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    let mut head = (&mut reader).take(256);
    let request = head.read_line(&mut line);
    // A client that connects and says nothing does not hold a task for good.
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| timed_out("no request line within 5 s"))??;
    Metrics::inc(&control.metrics.admin_requests);
    let request = match Request::parse(line.trim_end_matches(['\n', '\r'])) {
        Ok(r) => r,
        Err(why) => return send(write, format!("#error: {why}\n").as_bytes()).await,
    };
    let changes = matches!(
        request,
        Request::Deploy(_) | Request::Rollback(_) | Request::Remove(_)
    );
    if let (true, Some(why)) = (changes, refused()) {
        return send(write, format!("#error: {why}\n").as_bytes()).await;
    }
    match request {
        Request::Status => {
            let mut v = serde_json::to_vec_pretty(&control.status().await).unwrap_or_default();
            v.extend_from_slice(b"\n");
            v.extend_from_slice(OK.as_bytes());
            send(write, &v).await
        }
        Request::Health => {
            let answer = Ok(control.health().await);
            send(write, &json_answer(answer)).await
        }
        Request::List => {
            let answer = control.list().await;
            send(write, &json_answer(answer)).await
        }
        Request::DeadLetters => {
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
                send(write, &chunk).await?;
            }
            let trailer = match scan.await {
                Ok(Ok(_)) => OK.to_string(),
                Ok(Err(e)) => format!("#error: {e}\n"),
                Err(e) => format!("#error: {e}\n"),
            };
            send(write, trailer.as_bytes()).await
        }
        Request::Deploy(len) => {
            let max = control.deployer.max_bytes();
            if len > max {
                let why = format!(
                    "#error: a bundle of {len} bytes is over deploy.max_bundle_bytes ({max}); nothing was read\n"
                );
                return send(write, why.as_bytes()).await;
            }
            // One bundle in memory at a time: the others wait their turn (the wait counts in
            // their 300 s).
            let upload = async {
                let _one = control.uploads.acquire().await;
                let mut bytes = Vec::new();
                (&mut reader).take(len).read_to_end(&mut bytes).await?;
                Ok::<_, std::io::Error>(bytes)
            };
            let bytes = tokio::time::timeout(BODY_TIMEOUT, upload)
                .await
                .map_err(|_| timed_out("the bundle did not arrive within 300 s"))??;
            if bytes.len() as u64 != len {
                let why = format!(
                    "#error: the bundle ended after {} of its {len} bytes; nothing changed\n",
                    bytes.len()
                );
                return send(write, why.as_bytes()).await;
            }
            if let Some(why) = refused() {
                return send(
                    write,
                    format!("#error: {why}; nothing changed\n").as_bytes(),
                )
                .await;
            }
            let (deployer, by) = (control.deployer.clone(), by.to_string());
            let done = tokio::task::spawn_blocking(move || deployer.deploy(&bytes, &by)).await;
            send(write, &change_answer(done)).await
        }
        Request::Rollback(name) => {
            let (deployer, by) = (control.deployer.clone(), by.to_string());
            let done =
                tokio::task::spawn_blocking(move || deployer.rollback(&name, &by, "asked for"))
                    .await;
            send(write, &change_answer(done)).await
        }
        Request::Remove(name) => {
            let (deployer, by) = (control.deployer.clone(), by.to_string());
            let done =
                tokio::task::spawn_blocking(move || deployer.remove(&name, &by, "asked for")).await;
            send(write, &change_answer(done)).await
        }
    }
}

/// A JSON answer and its trailer, or the error trailer.
fn json_answer(answer: Result<serde_json::Value, String>) -> Vec<u8> {
    match answer {
        Ok(v) => {
            let mut out = serde_json::to_vec_pretty(&v).unwrap_or_default();
            out.extend_from_slice(b"\n");
            out.extend_from_slice(OK.as_bytes());
            out
        }
        Err(why) => format!("#error: {}\n", why.replace('\n', " ")).into_bytes(),
    }
}

/// The answer to a deploy, a rollback or a removal run on a blocking thread.
fn change_answer<T: serde::Serialize>(
    done: Result<Result<T, crate::admin::deploy::DeployError>, tokio::task::JoinError>,
) -> Vec<u8> {
    json_answer(match done {
        Ok(Ok(d)) => Ok(serde_json::to_value(d).unwrap_or_default()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    })
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
    let mut out = Vec::new();
    Ok(ask(data_dir, what, &[], &mut out)?.map(|_| out))
}

/// Sends one request line (and `body`, for a deploy) through the data dir's socket and
/// streams the answer, without its trailer, to `out`; `None` when no gateway listens there.
pub fn ask(
    data_dir: &Path,
    line: &str,
    body: &[u8],
    out: &mut dyn Write,
) -> std::io::Result<Option<()>> {
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
    // A gateway that stops answering (a stalled disk) must not hang the command for good: a
    // deploy may wait its turn to upload (up to 300 s) and for its handler's `tp_init`.
    s.set_read_timeout(Some(std::time::Duration::from_secs(360)))?;
    // Sent from another thread while the answer is read: a gateway that refuses a bundle from
    // its length answers and stops reading, and its answer is what counts.
    let mut w = s.try_clone()?;
    let request = [format!("{line}\n").into_bytes(), body.to_vec()].concat();
    let sender = std::thread::spawn(move || {
        w.write_all(&request)?;
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut answer = Answer::default();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = s.read(&mut buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => std::io::Error::other(
                "the gateway stopped answering for 360 s: what it did with the request is unknown (see `tidepool list`)",
            ),
            _ => e,
        })?;
        if n == 0 {
            break;
        }
        answer.feed(&buf[..n], out)?;
    }
    let sent = sender
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the sending thread failed")));
    match (answer.finish(), sent) {
        (Ok(()), _) => Ok(Some(())),
        (Err(e), _) if e.to_string().starts_with("the gateway answered") => Err(e),
        (Err(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
    }
}

/// An answer as it arrives: passed through but for its last line, held back until the end,
/// which must be `#ok` (`#error: <why>` is the gateway's refusal; nothing, a cut).
#[derive(Default)]
pub struct Answer {
    held: Vec<u8>,
}

impl Answer {
    /// Takes the next bytes of the answer, writing out all but the last line seen so far.
    pub fn feed<W: Write + ?Sized>(&mut self, chunk: &[u8], out: &mut W) -> std::io::Result<()> {
        self.held.extend_from_slice(chunk);
        let Some(last_end) = self.held.iter().rposition(|b| *b == b'\n') else {
            return Ok(());
        };
        let last_start = self.held[..last_end]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        out.write_all(&self.held[..last_start])?;
        self.held.drain(..last_start);
        Ok(())
    }

    /// The end of the answer: whether it ended with `#ok`.
    pub fn finish(self) -> std::io::Result<()> {
        let last = String::from_utf8_lossy(&self.held).trim_end().to_string();
        if last == OK.trim_end() {
            return Ok(());
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer fed in chunks of every size, as the client sees it.
    fn strip_trailer(whole: Vec<u8>) -> std::io::Result<Vec<u8>> {
        let mut results = Vec::new();
        for size in 1..=whole.len().max(1) {
            let (mut a, mut out) = (Answer::default(), Vec::new());
            for chunk in whole.chunks(size) {
                a.feed(chunk, &mut out)?;
            }
            results.push(a.finish().map(|_| out).map_err(|e| e.to_string()));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]), "{results:?}");
        results.pop().unwrap().map_err(std::io::Error::other)
    }

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

    #[test]
    fn request_lines_parse_and_print_back() {
        for r in [
            Request::Status,
            Request::Health,
            Request::DeadLetters,
            Request::List,
            Request::Deploy(1234),
            Request::Rollback("threshold".into()),
            Request::Remove("a.b-c_1".into()),
        ] {
            assert_eq!(Request::parse(&r.line()), Ok(r));
        }
        for bad in [
            "",
            "deploy",
            "deploy -1",
            "deploy 1 2",
            "rollback",
            "rollback ../x",
            "remove a/b",
            "status now",
            "shutdown",
        ] {
            assert!(Request::parse(bad).is_err(), "{bad}");
        }
    }
}
