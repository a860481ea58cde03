//! The handlers the config file pins (`[[handler]]`): an entry read from disk ([`read`], with
//! a digest of what the handler is made of), the names the entries pin ([`Pinned`]), and which
//! entries a reload (SIGHUP) loads ([`plan`], pure; a name no entry pins any more is released
//! by the deployer).
//!
//! The rule a reload keeps: the box runs what a restart with the new file would run, except
//! that an entry that does not load takes nothing away: a changed handler keeps its running
//! version, and a deployed version of the name keeps running (its name unpinned until the
//! entry loads); a restart would run neither. A handler taken out of the file is unloaded and
//! its state stays on disk, as after a restart; a deployed bundle of its name that the entry
//! pinned runs again, in its place.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use crate::config::HandlerEntry;
use crate::sandbox::{Manifest, ManifestError};

/// The handler names the local config pins: every configured manifest that reads, loaded or
/// not. While one does not read, which names it pins is unknown, and deploys are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pinned {
    pub names: BTreeSet<String>,
    /// A configured manifest that does not read (its path), if any.
    pub unknown: Option<String>,
}

/// A configured handler that did not load: the gateway serves the others, logs it at ERROR
/// and `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// Where it came from: its manifest's path, as configured, or `bundle <name>` (deployed).
    pub source: String,
    /// Why, with the handler's name when the manifest was read that far.
    pub reason: String,
}

/// One `[[handler]]` entry as read from disk.
pub struct Read {
    /// Its manifest's path, as configured (what `status` names it by).
    pub source: String,
    pub manifest: Manifest,
    /// The module's bytes, or why they do not read.
    pub wasm: Result<Vec<u8>, String>,
    /// The entry's `config` overrides.
    pub overrides: BTreeMap<String, String>,
    /// What the handler is made of: the manifest's text, the module's bytes and the
    /// overrides. Equal digests, the same handler (within one process: the hash is std's).
    pub digest: u64,
}

/// Reads `entry`'s manifest and module. Only a manifest that does not read is an error: a
/// module that does not read is the handler's failure to load, told in [`Read::wasm`].
pub fn read(entry: &HandlerEntry) -> Result<Read, ManifestError> {
    let (manifest, text) = Manifest::load_with_text(&entry.manifest)?;
    let wasm = std::fs::read(&entry.wasm)
        .map_err(|e| format!("cannot read {}: {e}", entry.wasm.display()));
    let mut h = std::hash::DefaultHasher::new();
    text.hash(&mut h);
    wasm.as_ref().ok().hash(&mut h);
    entry.config.hash(&mut h);
    Ok(Read {
        source: entry.manifest.display().to_string(),
        manifest,
        wasm,
        overrides: entry.config.clone(),
        digest: h.finish(),
    })
}

/// The `[[handler]]` list in force.
#[derive(Debug, Clone, Default)]
pub struct Configured {
    pub pinned: Pinned,
    /// The configured handlers that run.
    pub running: Vec<Running>,
    /// The entries that did not load.
    pub skipped: Vec<Skipped>,
}

/// A configured handler that runs: its name and the digest of what it was loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub name: String,
    pub digest: u64,
}

/// What a reload does, by [`plan`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Entries (indices) to load: a new name, a changed one, or one that did not run.
    pub load: Vec<usize>,
    /// Entries (indices) naming a handler another entry stands for: not loaded.
    pub duplicate: Vec<usize>,
    /// Entries that run as they are.
    pub unchanged: usize,
}

/// What a reload to `entries` (each entry's handler name and digest, in file order) does
/// to the configured handlers `running`. Of several entries naming one handler, the one it
/// runs from stands for the name (a start loads the next entry of a name when the first
/// fails), else the first; the others are duplicates.
pub fn plan(running: &[Running], entries: &[(&str, u64)]) -> Plan {
    let runs = |i: usize| {
        let (name, digest) = entries[i];
        running.iter().any(|r| r.name == name && r.digest == digest)
    };
    let mut p = Plan::default();
    let mut chosen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, &(name, _)) in entries.iter().enumerate() {
        match chosen.get(name).copied() {
            None => {
                chosen.insert(name, i);
            }
            Some(c) if runs(i) && !runs(c) => {
                p.duplicate.push(c);
                chosen.insert(name, i);
            }
            Some(_) => p.duplicate.push(i),
        }
    }
    for &i in chosen.values() {
        match runs(i) {
            true => p.unchanged += 1,
            false => p.load.push(i),
        }
    }
    p.load.sort_unstable();
    p.duplicate.sort_unstable();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(of: &[(&str, u64)]) -> Vec<Running> {
        of.iter()
            .map(|&(name, digest)| Running {
                name: name.into(),
                digest,
            })
            .collect()
    }

    #[test]
    fn the_same_list_changes_nothing() {
        let p = plan(&running(&[("a", 1), ("b", 2)]), &[("a", 1), ("b", 2)]);
        assert_eq!(
            p,
            Plan {
                unchanged: 2,
                ..Plan::default()
            }
        );
    }

    #[test]
    fn new_changed_and_gone_handlers() {
        let p = plan(
            &running(&[("a", 1), ("b", 2), ("gone", 3)]),
            &[("b", 20), ("a", 1), ("new", 4)],
        );
        assert_eq!(p.load, vec![0, 2], "b changed, new is new");
        assert_eq!(
            p.unchanged, 1,
            "gone is released by its name (`Pinned`), not planned"
        );
        assert!(p.duplicate.is_empty());
    }

    #[test]
    fn a_second_entry_of_a_name_is_not_loaded_and_does_not_unload_the_first() {
        let p = plan(&running(&[("a", 1)]), &[("a", 1), ("a", 9)]);
        assert_eq!(p.duplicate, vec![1]);
        assert!(p.load.is_empty());
    }

    #[test]
    fn of_two_entries_of_a_name_the_one_it_runs_from_stands_for_it() {
        // The first entry failed at start; the second loaded.
        let p = plan(&running(&[("a", 9)]), &[("a", 1), ("a", 9)]);
        assert_eq!(p.duplicate, vec![0]);
        assert_eq!((p.unchanged, p.load.len()), (1, 0));
    }

    #[test]
    fn an_entry_that_did_not_run_is_loaded_again() {
        // Skipped at start (or at the last reload): the same entry is tried again.
        let p = plan(&[], &[("a", 1)]);
        assert_eq!(p.load, vec![0]);
    }

    #[test]
    fn the_digest_sees_the_module_the_manifest_and_the_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let (m, w) = (dir.path().join("m.toml"), dir.path().join("h.wasm"));
        std::fs::write(&m, "name = \"a\"\nversion = 1\nsubscribe = [\"x\"]\n").unwrap();
        std::fs::write(&w, b"one").unwrap();
        let mut entry = HandlerEntry {
            wasm: w.clone(),
            manifest: m.clone(),
            config: BTreeMap::new(),
        };
        let d0 = read(&entry).unwrap().digest;
        assert_eq!(read(&entry).unwrap().digest, d0, "read twice, the same");
        std::fs::write(&w, b"two").unwrap();
        let d1 = read(&entry).unwrap().digest;
        assert_ne!(d1, d0, "a new module");
        entry.config.insert("k".into(), "v".into());
        let d2 = read(&entry).unwrap().digest;
        assert_ne!(d2, d1, "an override");
        std::fs::write(&m, "name = \"a\"\nversion = 2\nsubscribe = [\"x\"]\n").unwrap();
        assert_ne!(read(&entry).unwrap().digest, d2, "a manifest");
        std::fs::remove_file(&w).unwrap();
        let r = read(&entry).unwrap();
        assert!(r.wasm.is_err(), "a missing module is the handler's failure");
        std::fs::write(&m, "not toml [").unwrap();
        assert!(read(&entry).is_err(), "a manifest that does not read");
    }
}
