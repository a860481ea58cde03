//! The offline inbox, `<data-dir>/inbox/` (0700): a `*.tpb` put there (copied as `NAME.part`,
//! then renamed: a USB stick, scp on a LAN) is verified and deployed exactly like a pushed one,
//! then moved to `inbox/done/`, or to `inbox/rejected/` with `NAME.reason` beside it. inotify
//! wakes it (a rename into the folder, a file closed after writing, a link made); it also
//! looks at start and once a minute. A file created in place is left alone until closed.
//! A file is opened without following a link (a link is rejected, and moved, not followed),
//! must be a regular file, and its bytes are read once, up to the size cap: what is verified
//! is what is deployed.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::deploy::{DeployError, Deployer};

/// The inbox folder of a data dir.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("inbox")
}

/// The inbox thread, running; [`Running::stop`] ends it (after a deploy under way).
pub struct Running {
    thread: std::thread::JoinHandle<()>,
    stop: Arc<AtomicBool>,
    wake: UnixDatagram,
}

impl Running {
    /// Stops the thread and waits for it (a deploy under way finishes first).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.send(&[1]);
        let _ = self.thread.join();
    }
}

/// Makes the inbox and its `done/` and `rejected/` (0700) and starts its thread, which deploys
/// what arrives until stopped.
pub fn spawn(data_dir: &Path, deployer: Arc<Deployer>) -> io::Result<Running> {
    let inbox = dir(data_dir);
    for d in [inbox.clone(), inbox.join("done"), inbox.join("rejected")] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)?;
        // A link planted in place of a folder is not followed (nor chmod-ed).
        if !std::fs::symlink_metadata(&d)?.is_dir() {
            return Err(io::Error::other(format!(
                "{} is not a folder (a link?)",
                d.display()
            )));
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
    }
    let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    watch.add_watch(
        &inbox,
        AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_CREATE,
    )?;
    let (wake, woken) = UnixDatagram::pair()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::Builder::new()
        .name("inbox".into())
        .spawn(move || {
            // Files created in the folder and not closed yet: still being written in place.
            let mut writing = Writing::default();
            while !stopped.load(Ordering::Acquire) {
                look(&inbox, &deployer, &stopped, &writing);
                let mut fds = [
                    PollFd::new(std::os::fd::AsFd::as_fd(&watch), PollFlags::POLLIN),
                    PollFd::new(std::os::fd::AsFd::as_fd(&woken), PollFlags::POLLIN),
                ];
                // Woken by inotify, or by `stop`; a look a minute all the same (an event lost
                // to a full inotify queue is not a bundle lost).
                if nix::poll::poll(&mut fds, PollTimeout::from(60_000u16)).unwrap_or(0) > 0 {
                    while let Ok(events) = watch.read_events() {
                        if events.is_empty() {
                            break;
                        }
                        for e in events {
                            writing.saw(&inbox, e);
                        }
                    }
                }
            }
        })?;
    Ok(Running { thread, stop, wake })
}

/// Regular files created in the inbox and not closed since (a copy in place under way), and
/// when: skipped until closed, or for a minute (a hard link is never closed).
#[derive(Default)]
struct Writing(std::collections::HashMap<String, std::time::Instant>);

impl Writing {
    fn saw(&mut self, inbox: &Path, e: nix::sys::inotify::InotifyEvent) {
        let Some(name) = e.name.and_then(|n| n.into_string().ok()) else {
            return;
        };
        if e.mask.contains(AddWatchFlags::IN_CREATE) {
            // A link is never written: it is taken (and rejected) at once.
            let link = std::fs::symlink_metadata(inbox.join(&name))
                .is_ok_and(|m| m.file_type().is_symlink());
            if !link {
                self.0.insert(name, std::time::Instant::now());
            }
        } else {
            self.0.remove(&name);
        }
    }

    fn is_writing(&self, name: &str) -> bool {
        self.0
            .get(name)
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(60))
    }
}

/// Deploys every `*.tpb` in the inbox that is not being written, in name order, until stopped.
fn look(inbox: &Path, deployer: &Deployer, stop: &AtomicBool, writing: &Writing) {
    let Ok(entries) = std::fs::read_dir(inbox) else {
        return;
    };
    // Names that are not UTF-8 are left alone (they could not be named in a reason).
    let mut names: Vec<_> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".tpb") && !n.starts_with('.') && !writing.is_writing(n))
        .collect();
    names.sort();
    for name in names {
        if stop.load(Ordering::Acquire) {
            return;
        }
        take(inbox, &name, deployer);
    }
}

/// One bundle: deployed and moved to `done/`, or moved to `rejected/` with its reason (written
/// first, so that a reader who sees the bundle there sees the whole reason); left where it is
/// when the gateway is stopping.
fn take(inbox: &Path, name: &str, deployer: &Deployer) {
    let path = inbox.join(name);
    let result = read_once(&path, deployer.max_bytes())
        .map_err(DeployError::Refused)
        .and_then(|bytes| deployer.deploy(&bytes, &format!("the inbox ({name})")));
    match result {
        Ok(_) => {
            if let Err(e) = move_into(&path, &inbox.join("done"), name, None) {
                tracing::error!(file = name, "deployed, but cannot move it to done/: {e}");
            }
        }
        Err(DeployError::Stopping) => {}
        Err(DeployError::Refused(why)) => {
            tracing::warn!(file = name, "bundle rejected from the inbox: {why}");
            if let Err(e) = move_into(&path, &inbox.join("rejected"), name, Some(&why)) {
                tracing::error!(file = name, "cannot move it to rejected/: {e}");
            }
        }
    }
}

/// The file's bytes, read once through a descriptor opened without following a link, if it
/// is a regular file; at most `max + 1` bytes (a larger one is refused for its size).
fn read_once(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(nix::libc::ELOOP) => "a symbolic link: not followed".to_string(),
            _ => format!("cannot open it: {e}"),
        })?;
    if !f.metadata().map_err(|e| e.to_string())?.is_file() {
        return Err("not a regular file".into());
    }
    let mut bytes = Vec::new();
    Read::take(f, max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    Ok(bytes)
}

/// Renames `path` (a link itself, not what it names) into `dir` as `name`, or `name.1`, `.2`,
/// … when taken, after writing `reason` (if any) beside it as `<that name>.reason` (created
/// exclusively: never through a planted link).
fn move_into(path: &Path, dir: &Path, name: &str, reason: Option<&str>) -> io::Result<PathBuf> {
    for n in 0..1000 {
        let to = match n {
            0 => dir.join(name),
            n => dir.join(format!("{name}.{n}")),
        };
        let why = to.with_file_name(format!(
            "{}.reason",
            to.file_name().unwrap_or_default().to_string_lossy()
        ));
        if std::fs::symlink_metadata(&to).is_ok() || std::fs::symlink_metadata(&why).is_ok() {
            continue;
        }
        if let Some(reason) = reason {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&why)?;
            io::Write::write_all(&mut f, format!("{reason}\n").as_bytes())?;
        }
        std::fs::rename(path, &to)?;
        return Ok(to);
    }
    Err(io::Error::other("1000 files of that name already"))
}
