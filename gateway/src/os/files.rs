//! Files the gateway writes: private unless said otherwise, and never through a link someone
//! planted. The process's umask is 0o077 ([`private_by_default`]), so what sled, the recorder
//! or the control socket create is the owner's alone; a file meant to be shared (a device
//! certificate, a CA certificate) gets its mode set explicitly ([`create_fresh`]).

use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Sets the process's umask to 0o077: files and directories it creates are its owner's alone
/// (the data dir, sled's files, the control socket, exports), whatever the shell's umask.
pub fn private_by_default() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Creates `path` anew with `mode` (exactly: the umask does not narrow it). Whatever was at
/// `path` (a stale temp file, or a link planted to catch a private key) is removed first, not
/// followed, and the file is created exclusively (`O_EXCL`, which never follows a link): a
/// link planted between the two makes this fail, and nothing is written through it.
pub fn create_fresh(path: &Path, mode: u32) -> io::Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.set_permissions(Permissions::from_mode(mode))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_planted_link_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("stolen");
        let path = dir.path().join("key.tmp");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let mut f = create_fresh(&path, 0o600).unwrap();
        f.write_all(b"secret").unwrap();
        assert!(!target.exists(), "the key went through the planted link");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn the_mode_is_exact_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.crt");
        create_fresh(&path, 0o644).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }
}
