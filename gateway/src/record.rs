//! The `[record]` recording: events whose topic matches a pattern are appended as JSON lines
//! (see [`crate::jsonl`]) to `<data-dir>/record/events.jsonl`, rotated to `events.jsonl.1` ..
//! `.N-1` at a size cap, so a field problem can be replayed on a laptop with `tidepool invoke`.
//! Written without fsync: a recording is a debugging aid, never part of an event's durability.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::RecordConfig;
use crate::jsonl::Line;
use crate::proto::topic;

pub struct Recorder {
    topics: Vec<String>,
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
            topics: cfg.topics.clone(),
            dir,
            max_file_bytes: cfg.max_file_bytes,
            files: cfg.files.max(1),
            file,
            size,
        }))
    }

    pub fn wants(&self, t: &str) -> bool {
        self.topics.iter().any(|p| topic::matches(p, t, None))
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
        let mut r = Recorder::open(&cfg, dir.path()).unwrap().unwrap();
        assert!(r.wants("devices/a/temp") && !r.wants("devices/a/hum"));
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
