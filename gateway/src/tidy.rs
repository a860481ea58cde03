//! The dependency rules of `docs/architecture.md`, checked on the source (in the way of
//! rust-analyzer's tidy tests): which module may not name which. A rule broken here is a design
//! change: change the map first.

use std::path::{Path, PathBuf};

/// No stage of the data path, no store, no network, no runtime: code that works on what it
/// is given (the sandbox, the bundle format).
const NO_STAGE_NO_IO: &[&str] = &[
    "crate::store",
    "crate::dispatch",
    "crate::ingress",
    "crate::outbox",
    "crate::uplink",
    "sled::",
    "tokio::",
    "quinn::",
];

/// (module: a folder or a file under `src/`, what its code may not name, why).
const RULES: &[(&str, &[&str], &str)] = &[
    (
        "proto",
        &["crate::", "tokio::", "quinn::", "sled::"],
        "the wire protocol is pure: bytes in, messages out",
    ),
    (
        "router.rs",
        &["crate::store", "crate::sandbox", "tokio::", "sled::"],
        "the router is pure",
    ),
    (
        "timers.rs",
        &["crate::", "tokio::", "sled::"],
        "timers are pure",
    ),
    (
        "jsonl.rs",
        &["crate::", "tokio::", "sled::"],
        "the JSON lines format is pure",
    ),
    (
        "pipeline.rs",
        &[
            "crate::store",
            "crate::dispatch",
            "crate::ingress",
            "crate::sandbox",
            "sled::",
        ],
        "the pipeline's words belong to no stage",
    ),
    (
        "sandbox",
        NO_STAGE_NO_IO,
        "the sandbox runs one handler on data it is given: it knows nothing of sled or the network",
    ),
    (
        "admin/bundle.rs",
        NO_STAGE_NO_IO,
        "a bundle is checked on bytes alone: no store, no network",
    ),
    (
        "ingress",
        &[
            "crate::store",
            "crate::sandbox",
            "crate::outbox",
            "crate::uplink",
            "sled::",
        ],
        "the ingress moves bytes to and from the dispatcher's inbox; it knows nothing of the store",
    ),
    (
        "dispatch",
        &[
            "crate::ingress",
            "crate::uplink",
            "crate::control",
            "quinn::",
            "sled::",
        ],
        "the dispatcher knows no socket and reaches sled only through the store",
    ),
    (
        "dispatch/tree.rs",
        &[
            "crate::store::commit",
            "crate::outbox::Outbox",
            "crate::outbox::Admission",
            "super::Durable",
            "super::Dispatcher",
            "crate::clock",
            "SyncSender",
        ],
        "the event tree returns what it grew as data: admission, submission and durable reads are the sequencer's",
    ),
    (
        "uplink",
        &["crate::dispatch", "crate::ingress", "crate::sandbox"],
        "the uplink reads the outbox; it never runs a handler",
    ),
    (
        "outbox",
        &[
            "crate::dispatch",
            "crate::ingress",
            "crate::sandbox",
            "crate::uplink",
        ],
        "the outbox is below every stage that uses it",
    ),
];

/// Outside `store/`, no code reaches under the store's typed operations.
#[test]
fn only_the_store_touches_sled() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    for f in sources(&src) {
        let rel = f.strip_prefix(&src).unwrap();
        if rel.starts_with("store") || rel == Path::new("tidy.rs") {
            continue;
        }
        let text = code(&std::fs::read_to_string(&f).unwrap());
        for b in ["sled::", "use sled", "raw_tree(", "raw_db("] {
            if text.contains(b) {
                broken.push(format!("{} names `{b}`", rel.display()));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

fn sources(at: &Path) -> Vec<PathBuf> {
    if at.is_file() {
        return vec![at.to_path_buf()];
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(at).unwrap().map(Result::unwrap) {
        out.extend(sources(&e.path()));
    }
    out.retain(|p| p.extension().is_some_and(|x| x == "rs"));
    out
}

/// The code of a file: comments and the tests module dropped (a doc link may name anything;
/// a test may build what it needs), and grouped paths spelled out (`crate::{a::X, b}` becomes
/// `crate::a::X, crate::b`), so a grouped import is checked like a plain one.
fn code(text: &str) -> String {
    let end = text.find("#[cfg(test)]\nmod tests {").unwrap_or(text.len());
    let text: String = text[..end]
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    expand_groups(&text)
}

/// `p::{a, b::{c, d}}` as `p::a, p::b::c, p::b::d` (one level of text at a time, outside in).
fn expand_groups(text: &str) -> String {
    let mut out = text.to_string();
    while let Some(open) = out.find("::{") {
        let start = out[..open]
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .map_or(0, |i| i + 1);
        let prefix = out[start..open].to_string();
        let (mut depth, mut close) = (0, None);
        for (i, c) in out[open + 2..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(open + 2 + i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let Some(close) = close else { break };
        let inner = &out[open + 3..close];
        let (mut parts, mut depth, mut from) = (Vec::new(), 0, 0);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&inner[from..i]);
                    from = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&inner[from..]);
        let spelled: Vec<String> = parts
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(|p| format!("{prefix}::{p}"))
            .collect();
        out.replace_range(start..=close, &spelled.join(", "));
    }
    out
}

#[test]
fn grouped_paths_are_spelled_out() {
    assert_eq!(
        expand_groups("use crate::{store::{Store, keys}, proto::msg};"),
        "use crate::store::Store, crate::store::keys, crate::proto::msg;"
    );
}

#[test]
fn each_module_names_only_what_the_map_allows() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    for (module, banned, why) in RULES {
        let files = sources(&src.join(module));
        assert!(!files.is_empty(), "no source for `{module}`");
        for f in files {
            let text = code(&std::fs::read_to_string(&f).unwrap());
            for b in *banned {
                // `crate::proto` inside proto/ is its own.
                let own = format!("crate::{}", module.trim_end_matches(".rs"));
                let hits = text.matches(b).count()
                    - text.matches(&own).count() * (b == &"crate::") as usize;
                if hits > 0 {
                    broken.push(format!(
                        "{} names `{b}`: {why}",
                        f.strip_prefix(&src).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}
