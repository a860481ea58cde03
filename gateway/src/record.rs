//! The `[record]` recording: events whose topic matches a pattern are appended as JSON lines
//! (see [`crate::jsonl`]) to `<data-dir>/record/events.jsonl`, rotated to `events.jsonl.1` ..
//! `.N-1` at a size cap, so a field problem can be replayed on a laptop with `tidepool invoke`.
//! Written without fsync by a thread of its own, behind a bounded queue: a recording is a
//! debugging aid, never part of an event's durability, and never slows the dispatcher (a full
//! queue drops the line and counts it).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

use crate::config::RecordConfig;
use crate::jsonl::Line;
use crate::proto::topic;

/// Lines waiting for the writer thread.
const QUEUE: usize = 1024;

/// The dispatcher's side: which topics to record, and the queue to the writer thread.
pub struct RecordTap {
    topics: Vec<String>,
    tx: SyncSender<Line>,
    writer: std::thread::JoinHandle<()>,
}

/// What became of an offered line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// The writer is behind: the line is dropped.
    Full,
    /// The writer stopped (a write failed; it logged why).
    Closed,
}

impl RecordTap {
    /// Opens the recording and starts its writer thread; `None` when nothing is recorded.
    pub fn start(cfg: &RecordConfig, data_dir: &Path) -> std::io::Result<Option<RecordTap>> {
        let Some(mut rec) = Recorder::open(cfg, data_dir)? else {
            return Ok(None);
        };
        let (tx, rx) = sync_channel::<Line>(QUEUE);
        let writer = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || {
                for line in rx {
                    if let Err(e) = rec.write(&line) {
                        tracing::error!(dir = %rec.dir.display(), "recording stopped: {e}");
                        return;
                    }
                }
            })?;
        Ok(Some(RecordTap {
            topics: cfg.topics.clone(),
            tx,
            writer,
        }))
    }

    pub fn wants(&self, t: &str) -> bool {
        self.topics.iter().any(|p| topic::matches(p, t, None))
    }

    /// Closes the queue and waits until the writer has written what it holds.
    pub fn finish(self) {
        drop(self.tx);
        let _ = self.writer.join();
    }

    pub fn offer(&self, line: Line) -> Offer {
        match self.tx.try_send(line) {
            Ok(()) => Offer::Queued,
            Err(TrySendError::Full(_)) => Offer::Full,
            Err(TrySendError::Disconnected(_)) => Offer::Closed,
        }
    }
}

/// The writer: appends lines and rotates the files.
pub struct Recorder {
    dir: PathBuf,
    max_file_bytes: u64,
    files: u32,
    file: File,
    size: u64,
}

impl Recorder {
    /// `None` when the config records nothing.
    pub fn open(cfg: &RecordConfig, data_dir: &Path) -> std::io::Result<Option<Recorder>> {
        if cfg.topics.is_empty() {
            return Ok(None);
        }
        let dir = data_dir.join("record");
        std::fs::create_dir_all(&dir)?;
        let (file, size) = open_current(&dir)?;
        Ok(Some(Recorder {
            dir,
            max_file_bytes: cfg.max_file_bytes,
            files: cfg.files.max(1),
            file,
            size,
        }))
    }

    /// Appends one event, rotating first if it would pass the size cap.
    pub fn write(&mut self, line: &Line) -> std::io::Result<()> {
        let mut text = line.to_json();
        text.push('\n');
        if self.size > 0 && self.size + text.len() as u64 > self.max_file_bytes {
            self.rotate()?;
        }
        self.file.write_all(text.as_bytes())?;
        self.size += text.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let name = |i: u32| match i {
            0 => self.dir.join("events.jsonl"),
            i => self.dir.join(format!("events.jsonl.{i}")),
        };
        if self.files == 1 {
            std::fs::remove_file(name(0))?;
        }
        for i in (0..self.files - 1).rev() {
            match std::fs::rename(name(i), name(i + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        (self.file, self.size) = open_current(&self.dir)?;
        Ok(())
    }
}

fn open_current(dir: &Path) -> std::io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("events.jsonl"))?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_matching_topics_and_rotates_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RecordConfig {
            topics: vec!["devices/+/temp".into()],
            max_file_bytes: 100,
            files: 2,
        };
        let tap = RecordTap::start(&cfg, dir.path()).unwrap().unwrap();
        assert!(tap.wants("devices/a/temp") && !tap.wants("devices/a/hum"));
        tap.finish();
        let mut r = Recorder::open(&cfg, dir.path()).unwrap().unwrap();
        for i in 0..5 {
            r.write(&Line::event(
                "devices/a/temp",
                format!("{{\"v\":{i}}}").as_bytes(),
            ))
            .unwrap();
        }
        let cur = std::fs::read_to_string(dir.path().join("record/events.jsonl")).unwrap();
        let old = std::fs::read_to_string(dir.path().join("record/events.jsonl.1")).unwrap();
        assert!(cur.len() <= 100 && old.len() <= 100);
        assert!(cur.contains(r#"\"v\":4"#), "{cur}");
        assert!(!dir.path().join("record/events.jsonl.2").exists());
        let off = RecordConfig {
            topics: vec![],
            ..cfg
        };
        assert!(Recorder::open(&off, dir.path()).unwrap().is_none());
    }
}
