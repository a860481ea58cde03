//! The process as a daemon: core dumps off (it holds private keys: the CAs', the server's),
//! the open-file limit raised to its hard limit, and, started as root with `gateway.user`
//! set, the drop to that user and its group once the port is bound (a port below 1024 stays
//! open to it) and the data dir handed to it.

use std::path::Path;

use nix::unistd::{Gid, Uid, User};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("gateway.user = `{0}`: no such user")]
    NoUser(String),
    #[error("gateway.user = `{user}` needs the gateway started as root to switch to it (it runs as uid {uid})")]
    NotRoot { user: String, uid: u32 },
    #[error("switching to gateway.user = `{user}`: {source}")]
    Switch { user: String, source: nix::Error },
    #[error("handing the data dir {path} to gateway.user: {source}")]
    Chown {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Core dumps off and the open-file limit at its hard limit; returns the open-file limit.
/// Failures are logged (a container may forbid them), never fatal. `rlim_t` is 32 bits on
/// armv7.
pub fn harden() -> nix::libc::rlim_t {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Err(e) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
        tracing::warn!("cannot turn core dumps off: {e}");
    }
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!("cannot mark the process not dumpable: {e}");
    }
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}

/// Sets this thread's timer slack to `ms` (0: leaves the kernel's); threads started after it
/// inherit it. A failure is logged, never fatal.
pub fn timer_slack(ms: u64) {
    if ms == 0 {
        return;
    }
    use nix::libc::c_ulong;
    // c_ulong is 32 bits on armv7 (at most 4.29 s), 64 elsewhere (where the cast is a no-op).
    #[allow(clippy::unnecessary_cast)]
    let ns = ms.saturating_mul(1_000_000).min(c_ulong::MAX as u64) as c_ulong;
    if let Err(e) = nix::sys::prctl::set_timerslack(ns) {
        tracing::warn!("cannot set the timer slack to {ms} ms: {e}");
    }
}

/// Switches to `user` (and its primary group, no others) for good, after handing it
/// `data_dir` (recursively: an earlier start as root may have left files there). Running as
/// that user already is fine; running as anyone else but root is an error.
pub fn drop_to(user: &str, data_dir: &Path) -> Result<(), ProcessError> {
    let u = User::from_name(user)
        .ok()
        .flatten()
        .ok_or_else(|| ProcessError::NoUser(user.to_string()))?;
    let me = Uid::effective();
    if me == u.uid {
        return Ok(());
    }
    if !me.is_root() {
        return Err(ProcessError::NotRoot {
            user: user.to_string(),
            uid: me.as_raw(),
        });
    }
    chown_tree(data_dir, u.uid, u.gid).map_err(|source| ProcessError::Chown {
        path: data_dir.to_path_buf(),
        source,
    })?;
    let switch = |source| ProcessError::Switch {
        user: user.to_string(),
        source,
    };
    nix::unistd::setgroups(&[u.gid]).map_err(switch)?;
    nix::unistd::setgid(u.gid).map_err(switch)?;
    nix::unistd::setuid(u.uid).map_err(switch)?;
    // setuid makes the process dumpable again.
    let _ = nix::sys::prctl::set_dumpable(false);
    Ok(())
}

/// `chown -R` without following links.
fn chown_tree(path: &Path, uid: Uid, gid: Gid) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(uid),
        Some(gid),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(std::io::Error::from)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}
