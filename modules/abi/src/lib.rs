//! The Tidepool handler ABI, written once: the `tidepool` import module's functions with their
//! exact signatures, the exports a handler provides, the return codes, the forward classes and
//! the log levels. The gateway links and checks modules against these tables
//! (`gateway/src/sandbox`); the guest SDK (`modules/sdk`) declares its imports from the same
//! names and tests them against these tables. `docs/handlers.md` describes what each call does.
//!
//! `no_std`, no dependencies: it builds for the host and for `wasm32-unknown-unknown`.

#![no_std]

/// The import module every host function lives in.
pub const MODULE: &str = "tidepool";

/// A WebAssembly value type of the ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    I32,
    I64,
}

/// A function of the ABI: its name, parameters and results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Func {
    pub name: &'static str,
    pub params: &'static [Ty],
    pub results: &'static [Ty],
}

/// The names of the host's functions.
pub mod import {
    pub const STATE_GET: &str = "state_get";
    pub const STATE_PUT: &str = "state_put";
    pub const STATE_DELETE: &str = "state_delete";
    pub const FORWARD: &str = "forward";
    pub const EMIT: &str = "emit";
    pub const LOG: &str = "log";
    pub const NOW_MS: &str = "now_ms";
    pub const CONFIG_GET: &str = "config_get";
    pub const EVENT_META: &str = "event_meta";
}

use Ty::{I32, I64};

/// Every host function a handler may import (pointers and lengths are `i32` offsets and sizes
/// in the handler's memory).
pub const IMPORTS: &[Func] = &[
    // (key_ptr, key_len, out_ptr, out_cap) -> full length, or NOT_FOUND
    Func {
        name: import::STATE_GET,
        params: &[I32, I32, I32, I32],
        results: &[I32],
    },
    // (key_ptr, key_len, val_ptr, val_len) -> OK or OVER_STATE_QUOTA
    Func {
        name: import::STATE_PUT,
        params: &[I32, I32, I32, I32],
        results: &[I32],
    },
    // (key_ptr, key_len) -> OK or OVER_STATE_QUOTA (past the distinct keys one invocation may
    // write: `limits.state_writes_per_event`)
    Func {
        name: import::STATE_DELETE,
        params: &[I32, I32],
        results: &[I32],
    },
    // (topic_ptr, topic_len, payload_ptr, payload_len, class) -> OK, OVER_FORWARDS, BAD_ARGUMENT
    Func {
        name: import::FORWARD,
        params: &[I32, I32, I32, I32, I32],
        results: &[I32],
    },
    // (topic_ptr, topic_len, payload_ptr, payload_len) -> OK, OVER_EMITS, BAD_ARGUMENT
    Func {
        name: import::EMIT,
        params: &[I32, I32, I32, I32],
        results: &[I32],
    },
    // (level, ptr, len)
    Func {
        name: import::LOG,
        params: &[I32, I32, I32],
        results: &[],
    },
    // () -> ms since the Unix epoch
    Func {
        name: import::NOW_MS,
        params: &[],
        results: &[I64],
    },
    // (key_ptr, key_len, out_ptr, out_cap) -> full length, or NOT_FOUND
    Func {
        name: import::CONFIG_GET,
        params: &[I32, I32, I32, I32],
        results: &[I32],
    },
    // (out_ptr, out_cap) -> full length of the call's CBOR metadata map
    Func {
        name: import::EVENT_META,
        params: &[I32, I32],
        results: &[I32],
    },
];

/// The function `name` of the import module, if the ABI has it.
pub fn import(name: &str) -> Option<&'static Func> {
    IMPORTS.iter().find(|f| f.name == name)
}

/// The names of what a handler exports.
pub mod export {
    /// `(len) -> ptr`: a block of `len` bytes the host copies the topic and payload into.
    pub const ALLOC: &str = "tp_alloc";
    /// `(topic_ptr, topic_len, payload_ptr, payload_len) -> 0 or a rejection code`.
    pub const ON_EVENT: &str = "tp_on_event";
    /// `() -> 0`: once at load; it may only read.
    pub const INIT: &str = "tp_init";
    /// `(now_ms) -> 0`: each firing of the manifest's `timer_ms`.
    pub const ON_TIMER: &str = "tp_on_timer";
    /// The handler's linear memory.
    pub const MEMORY: &str = "memory";
}

/// The functions a handler exports, and whether each is required.
pub const EXPORTS: &[(Func, bool)] = &[
    (
        Func {
            name: export::ALLOC,
            params: &[I32],
            results: &[I32],
        },
        true,
    ),
    (
        Func {
            name: export::ON_EVENT,
            params: &[I32, I32, I32, I32],
            results: &[I32],
        },
        true,
    ),
    (
        Func {
            name: export::INIT,
            params: &[],
            results: &[I32],
        },
        false,
    ),
    (
        Func {
            name: export::ON_TIMER,
            params: &[I64],
            results: &[I32],
        },
        false,
    ),
];

/// What the host functions return.
pub mod code {
    pub const OK: i32 = 0;
    /// `state_get`, `config_get`: the key is not set.
    pub const NOT_FOUND: i32 = -1;
    /// `state_put`: the handler's state would exceed its quota; `state_put`, `state_delete`: past
    /// the distinct keys one invocation may write.
    pub const OVER_STATE_QUOTA: i32 = -2;
    /// `forward`: past `forwards_per_event`.
    pub const OVER_FORWARDS: i32 = -3;
    /// `emit`: past `emits_per_event`, the emit depth or the box's budget per device event.
    pub const OVER_EMITS: i32 = -4;
    /// `forward`, `emit`: a bad class, topic or payload.
    pub const BAD_ARGUMENT: i32 = -5;
}

/// A forward's class (`forward`'s last argument).
pub mod class {
    pub const URGENT: i32 = 0;
    pub const NORMAL: i32 = 1;
    pub const BULK: i32 = 2;
}

/// `log`'s levels (above `TRACE` counts as `TRACE`).
pub mod level {
    pub const ERROR: i32 = 0;
    pub const WARN: i32 = 1;
    pub const INFO: i32 = 2;
    pub const DEBUG: i32 = 3;
    pub const TRACE: i32 = 4;
}

// `log` clamps a level into ERROR..=TRACE.
const _: () = assert!(level::ERROR < level::TRACE);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for (i, f) in IMPORTS.iter().enumerate() {
            assert_eq!(import(f.name), Some(f));
            assert!(IMPORTS[..i].iter().all(|g| g.name != f.name));
        }
        assert_eq!(import("fd_write"), None);
        for (i, (f, _)) in EXPORTS.iter().enumerate() {
            assert!(EXPORTS[..i].iter().all(|(g, _)| g.name != f.name));
        }
    }
}
