//! The handler ABI's host side: the `tidepool` import module with its exact signatures,
//! pointer checks, host-call fuel and the per-invocation limits. Every guest pointer and
//! length is checked over its whole range (overflow included) before anything is touched;
//! a bad one traps, it never panics the host.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use wasmi::{Caller, Linker, Memory, ResourceLimiter, StoreLimits, ValType};
use wasmi_core::LimiterError;

use super::manifest::Limits;
use super::{Effects, Forward, HostEnv, Limit, LogLine, Meta};
use crate::pipeline::Class;
use crate::proto::topic;

/// Fuel every host call costs on top of the bytes it copies.
pub const HOST_CALL_FUEL: u64 = 20;

/// The import module name.
pub const MODULE: &str = tidepool_abi::MODULE;

pub use tidepool_abi::code::{
    BAD_ARGUMENT, NOT_FOUND, OVER_EMITS, OVER_FORWARDS, OVER_STATE_QUOTA,
};
use tidepool_abi::import;

/// The ABI's value type as wasmi's.
pub fn val_type(t: tidepool_abi::Ty) -> ValType {
    match t {
        tidepool_abi::Ty::I32 => ValType::I32,
        tidepool_abi::Ty::I64 => ValType::I64,
    }
}

/// A function's signature as wasmi's value types.
pub fn signature(f: &tidepool_abi::Func) -> (Vec<ValType>, Vec<ValType>) {
    let types = |ts: &[tidepool_abi::Ty]| ts.iter().copied().map(val_type).collect();
    (types(f.params), types(f.results))
}

/// Why a host call stopped the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostTrap {
    /// A pointer or length outside the guest's memory (or overflowing).
    BadPointer(&'static str),
    /// Not enough fuel left to pay for the host call.
    Fuel,
    /// A call that `tp_init` may not make.
    NotInInit(&'static str),
}

impl std::fmt::Display for HostTrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostTrap::BadPointer(call) => write!(f, "trap:bad pointer or length in {call}"),
            HostTrap::Fuel => write!(f, "{}", Limit::Fuel),
            HostTrap::NotInInit(call) => write!(f, "trap:{call} is not allowed in tp_init"),
        }
    }
}

impl wasmi::errors::HostError for HostTrap {}

fn trap(t: HostTrap) -> wasmi::Error {
    wasmi::Error::host(t)
}

/// From this many writes in one invocation on, read-your-writes uses a hash index.
const INDEX_FROM: usize = 8;

/// What the instance is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Init,
    Event,
    Timer,
}

/// The state of one running invocation.
#[derive(Debug)]
pub struct Invocation {
    pub mode: Mode,
    pub effects: Effects,
    /// For read-your-writes once there are many writes: key -> its last entry in
    /// `effects.state` (few writes are found by a scan, with no copy of the key).
    index: HashMap<Vec<u8>, usize>,
    /// The first limit the handler hit; it fails the invocation.
    pub limit_hit: Option<Limit>,
    /// Log bytes this invocation may still write (what is left of the handler's per-event cap).
    pub log_budget: usize,
    pub log_bytes: usize,
    pub log_dropped: usize,
    /// The lines written, when the host captures them (`tidepool invoke`).
    pub logs: Option<Vec<LogLine>>,
    /// What `event_meta` describes; encoded only when the handler asks.
    pub meta: Meta,
    pub depth: u32,
    /// Emits left for the device event's whole tree.
    pub emit_budget: u32,
}

impl Invocation {
    pub fn new(mode: Mode, meta: Meta, depth: u32, emit_budget: u32, log_budget: usize) -> Self {
        Invocation {
            mode,
            effects: Effects::default(),
            index: HashMap::new(),
            limit_hit: None,
            log_budget,
            log_bytes: 0,
            log_dropped: 0,
            logs: None,
            meta,
            depth,
            emit_budget,
        }
    }

    /// Where this invocation wrote `key` (each key has one entry: a rewrite replaces it).
    fn position(&self, key: &[u8]) -> Option<usize> {
        let state = &self.effects.state;
        if state.len() < INDEX_FROM {
            state.iter().position(|(k, _)| k == key)
        } else {
            self.index.get(key).copied()
        }
    }

    /// This invocation's last write of `key`: `Some(None)` when it deleted it.
    fn written(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        self.position(key)
            .map(|i| self.effects.state[i].1.as_deref())
    }

    /// Records a write; rewriting a key replaces its entry, so a loop of puts to one key
    /// holds one value, not one per call.
    fn write(&mut self, key: Vec<u8>, val: Option<Vec<u8>>) {
        if let Some(i) = self.position(&key) {
            self.effects.state[i].1 = val;
            return;
        }
        let i = self.effects.state.len();
        if i + 1 >= INDEX_FROM {
            if self.index.is_empty() {
                for (j, (k, _)) in self.effects.state.iter().enumerate() {
                    self.index.insert(k.clone(), j);
                }
            }
            self.index.insert(key.clone(), i);
        }
        self.effects.state.push((key, val));
    }

    /// Whether `key` may be written with at most `cap` distinct keys written per invocation
    /// (a key written before is free: its entry is replaced). A put and a delete of fresh
    /// keys leave a tombstone each while the quota returns to 0: without this cap one event
    /// could hold the host's memory without bound.
    fn may_write(&self, key: &[u8], cap: u32) -> bool {
        self.effects.state.len() < cap as usize || self.position(key).is_some()
    }

    fn hit(&mut self, limit: Limit, code: i32) -> i32 {
        self.limit_hit.get_or_insert(limit);
        code
    }
}

/// wasmi's store limits, remembering a refused growth: `memory.grow` past `memory_pages` (or
/// `table.grow` past the table cap) returns -1 inside the guest, and the invocation fails with
/// `limit:memory_pages` (`limit:table_elements`).
pub struct Limiter {
    pub inner: StoreLimits,
    pub refused: Option<Limit>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool, LimiterError> {
        let ok = self.inner.memory_growing(current, desired, maximum)?;
        if !ok {
            self.refused.get_or_insert(Limit::MemoryPages);
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool, LimiterError> {
        let ok = self.inner.table_growing(current, desired, maximum)?;
        if !ok {
            self.refused.get_or_insert(Limit::TableElements);
        }
        Ok(ok)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// The host data of one handler's wasmi store.
pub struct Host {
    pub limits: Limiter,
    pub memory: Option<Memory>,
    pub name: Arc<str>,
    pub config: Arc<BTreeMap<String, String>>,
    pub env: HostEnv,
    pub manifest_limits: Limits,
    /// Bytes (keys + values) the handler's state held before this invocation.
    pub state_used: u64,
    pub inv: Invocation,
}

impl Host {
    fn current(&self, key: &[u8]) -> Option<Vec<u8>> {
        match self.inv.written(key) {
            Some(v) => v.map(<[u8]>::to_vec),
            None => self.env.state.get(&self.name, key),
        }
    }
}

/// The byte range `[ptr, ptr + len)` if it lies inside `mem_len` bytes.
fn range(
    mem_len: usize,
    ptr: i32,
    len: i32,
    call: &'static str,
) -> Result<Range<usize>, wasmi::Error> {
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(len as u32 as usize)
        .ok_or(trap(HostTrap::BadPointer(call)))?;
    if end > mem_len {
        return Err(trap(HostTrap::BadPointer(call)));
    }
    Ok(start..end)
}

fn memory(caller: &Caller<'_, Host>, call: &'static str) -> Result<Memory, wasmi::Error> {
    caller.data().memory.ok_or(trap(HostTrap::BadPointer(call)))
}

/// Copies a guest range out, checking it and paying for its bytes first (the host does no
/// work the guest has not paid for).
fn read(
    caller: &mut Caller<'_, Host>,
    mem: Memory,
    ptr: i32,
    len: i32,
    call: &'static str,
) -> Result<Vec<u8>, wasmi::Error> {
    let r = range(mem.data(&*caller).len(), ptr, len, call)?;
    pay(caller, r.len() as u64)?;
    Ok(mem.data(&*caller)[r].to_vec())
}

/// Takes `HOST_CALL_FUEL + bytes` from the guest's fuel, or traps.
fn charge(caller: &mut Caller<'_, Host>, bytes: usize) -> Result<(), wasmi::Error> {
    pay(caller, HOST_CALL_FUEL.saturating_add(bytes as u64))
}

/// Takes `cost` from the guest's fuel, or traps (with no fuel left).
fn pay(caller: &mut Caller<'_, Host>, cost: u64) -> Result<(), wasmi::Error> {
    let left = caller.get_fuel()?;
    if left < cost {
        caller.set_fuel(0)?;
        return Err(trap(HostTrap::Fuel));
    }
    caller.set_fuel(left - cost)
}

fn deny_in_init(caller: &Caller<'_, Host>, call: &'static str) -> Result<(), wasmi::Error> {
    if caller.data().inv.mode == Mode::Init {
        return Err(trap(HostTrap::NotInInit(call)));
    }
    Ok(())
}

/// Shared shape of `state_get`, `config_get` and `event_meta`: check the out range, write the
/// value only if it fits, return its full length (or -1). The value's whole length is paid
/// for, written or not: the host read and copied all of it (a loop of length queries on a
/// large value is not free).
fn answer(
    caller: &mut Caller<'_, Host>,
    mem: Memory,
    value: Option<Vec<u8>>,
    out_ptr: i32,
    out_cap: i32,
    call: &'static str,
) -> Result<i32, wasmi::Error> {
    let out = range(mem.data(&*caller).len(), out_ptr, out_cap, call)?;
    let Some(v) = value else {
        charge(caller, 0)?;
        return Ok(NOT_FOUND);
    };
    let fits = v.len() <= out.len();
    charge(caller, v.len())?;
    if fits {
        mem.data_mut(&mut *caller)[out.start..out.start + v.len()].copy_from_slice(&v);
    }
    Ok(i32::try_from(v.len()).unwrap_or(i32::MAX))
}

/// A handler's log text with control characters escaped (`\n`, `\u{1b}`): a line a handler
/// writes cannot forge journal lines or drive the terminal `tidepool invoke` prints to.
fn printable(text: &str) -> String {
    if !text.chars().any(topic::hides_text) {
        return text.to_string();
    }
    text.chars()
        .map(|c| match topic::hides_text(c) {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

fn topic_ok(t: &[u8]) -> Option<String> {
    let t = std::str::from_utf8(t).ok()?;
    topic::validate(t).ok()?;
    Some(t.to_string())
}

/// The shared start of `forward` and `emit`: not in `tp_init`, read and pay for the topic and
/// the payload. The topic is `None` (`-5`) when it is not a valid concrete topic or the payload
/// is larger than `max_payload_bytes`.
fn publication(
    c: &mut Caller<'_, Host>,
    tp: i32,
    tl: i32,
    pp: i32,
    pl: i32,
    call: &'static str,
) -> Result<(Option<String>, Vec<u8>), wasmi::Error> {
    deny_in_init(c, call)?;
    let mem = memory(c, call)?;
    let data = mem.data(&*c);
    let (tr, pr) = (
        range(data.len(), tp, tl, call)?,
        range(data.len(), pp, pl, call)?,
    );
    // Too large: refused after checking the range, before copying (and paying for) it.
    if pr.len() > c.data().env.max_payload_bytes || tr.len() > topic::MAX_TOPIC_BYTES {
        charge(c, 0)?;
        return Ok((None, Vec::new()));
    }
    // Paid for before it is copied.
    charge(c, tr.len() + pr.len())?;
    let data = mem.data(&*c);
    let (t, payload) = (data[tr].to_vec(), data[pr].to_vec());
    Ok((topic_ok(&t), payload))
}

/// A linker with the whole `tidepool` import module.
pub fn linker(engine: &wasmi::Engine) -> Linker<Host> {
    let mut l = Linker::<Host>::new(engine);
    let add = |r: Result<&mut Linker<Host>, wasmi::errors::LinkerError>| {
        r.expect("each ABI import is defined once");
    };
    add(l.func_wrap(
        MODULE,
        import::STATE_GET,
        |mut c: Caller<'_, Host>, kp: i32, kl: i32, op: i32, oc: i32| {
            let mem = memory(&c, "state_get")?;
            let key = read(&mut c, mem, kp, kl, "state_get")?;
            let value = c.data().current(&key);
            answer(&mut c, mem, value, op, oc, "state_get")
        },
    ));
    add(l.func_wrap(
        MODULE,
        import::STATE_PUT,
        |mut c: Caller<'_, Host>, kp: i32, kl: i32, vp: i32, vl: i32| {
            deny_in_init(&c, "state_put")?;
            let mem = memory(&c, "state_put")?;
            let key = read(&mut c, mem, kp, kl, "state_put")?;
            let val = read(&mut c, mem, vp, vl, "state_put")?;
            charge(&mut c, 0)?;
            let h = c.data_mut();
            // Refused before the old value is read: a loop of refused writes costs the host
            // nothing it is not paid for.
            if !h.inv.may_write(&key, h.env.state_writes) {
                return Ok(h.inv.hit(Limit::StateWrites, OVER_STATE_QUOTA));
            }
            let old = h.current(&key).map(|v| v.len());
            // The old value was read (and copied): paid for, by its length.
            pay(&mut c, old.unwrap_or(0) as u64)?;
            let h = c.data_mut();
            let old = old.map(|v| (key.len() + v) as i64).unwrap_or(0);
            let delta = (key.len() + val.len()) as i64 - old;
            let after = h.state_used as i64 + h.inv.effects.state_delta + delta;
            if after > h.manifest_limits.state_bytes as i64 {
                return Ok(h.inv.hit(Limit::StateBytes, OVER_STATE_QUOTA));
            }
            h.inv.effects.state_delta += delta;
            h.inv.write(key, Some(val));
            Ok(0)
        },
    ));
    add(l.func_wrap(
        MODULE,
        import::STATE_DELETE,
        |mut c: Caller<'_, Host>, kp: i32, kl: i32| {
            deny_in_init(&c, "state_delete")?;
            let mem = memory(&c, "state_delete")?;
            let key = read(&mut c, mem, kp, kl, "state_delete")?;
            charge(&mut c, 0)?;
            let h = c.data_mut();
            // Refused before the old value is read (a delete of a missing key would write
            // nothing, but telling needs the read).
            if !h.inv.may_write(&key, h.env.state_writes) {
                return Ok(h.inv.hit(Limit::StateWrites, OVER_STATE_QUOTA));
            }
            let Some(old) = h.current(&key).map(|v| v.len()) else {
                return Ok(0);
            };
            // The old value was read (and copied): paid for, by its length.
            pay(&mut c, old as u64)?;
            let h = c.data_mut();
            h.inv.effects.state_delta -= (key.len() + old) as i64;
            h.inv.write(key, None);
            Ok(0)
        },
    ));
    add(l.func_wrap(
        MODULE,
        import::FORWARD,
        |mut c: Caller<'_, Host>, tp: i32, tl: i32, pp: i32, pl: i32, class: i32| {
            let (topic, payload) = publication(&mut c, tp, tl, pp, pl, "forward")?;
            let (Some(class), Some(topic)) = (Class::from_abi(class), topic) else {
                return Ok(BAD_ARGUMENT);
            };
            let h = c.data_mut();
            if h.inv.effects.forwards.len() >= h.manifest_limits.forwards_per_event as usize {
                return Ok(h.inv.hit(Limit::ForwardsPerEvent, OVER_FORWARDS));
            }
            h.inv.effects.forwards.push(Forward {
                topic,
                payload,
                class,
            });
            Ok(0)
        },
    ));
    add(l.func_wrap(
        MODULE,
        import::EMIT,
        |mut c: Caller<'_, Host>, tp: i32, tl: i32, pp: i32, pl: i32| {
            let (topic, payload) = publication(&mut c, tp, tl, pp, pl, "emit")?;
            let Some(topic) = topic else {
                return Ok(BAD_ARGUMENT);
            };
            let h = c.data_mut();
            // Not in another device's part of the ACL: the emitted event would pass for that
            // device's (a timer's tree has no device, so no device's part is its own).
            let device = match &h.inv.meta {
                Meta::Event { device, .. } => &**device,
                _ => "",
            };
            if h.env
                .acl
                .get()
                .iter()
                .any(|p| topic::names_other_device(p, &topic, device))
            {
                return Ok(BAD_ARGUMENT);
            }
            if h.inv.depth >= h.env.emit_depth {
                return Ok(h.inv.hit(Limit::EmitDepth, OVER_EMITS));
            }
            let allowed = h.manifest_limits.emits_per_event.min(h.inv.emit_budget);
            if h.inv.effects.emits.len() >= allowed as usize {
                return Ok(h.inv.hit(Limit::EmitsPerEvent, OVER_EMITS));
            }
            h.inv.effects.emits.push((topic, payload));
            Ok(0)
        },
    ));
    add(l.func_wrap(
        MODULE,
        import::LOG,
        |mut c: Caller<'_, Host>, level: i32, p: i32, len: i32| {
            let mem = memory(&c, "log")?;
            let data = mem.data(&c);
            let r = range(data.len(), p, len, "log")?;
            let h = c.data();
            let room = h.inv.log_budget.saturating_sub(h.inv.log_bytes);
            let take = r.len().min(room);
            let text = printable(&String::from_utf8_lossy(&data[r.start..r.start + take]));
            let dropped = r.len() - take;
            charge(&mut c, take)?;
            let h = c.data_mut();
            h.inv.log_bytes += take;
            h.inv.log_dropped += dropped;
            if take == 0 {
                return Ok(());
            }
            use tidepool_abi::level::{DEBUG, ERROR, INFO, TRACE, WARN};
            let level = level.clamp(ERROR, TRACE);
            let name = &*h.name;
            match level {
                ERROR => tracing::error!(handler = name, "{text}"),
                WARN => tracing::warn!(handler = name, "{text}"),
                INFO => tracing::info!(handler = name, "{text}"),
                DEBUG => tracing::debug!(handler = name, "{text}"),
                _ => tracing::trace!(handler = name, "{text}"),
            }
            let level = level as u8;
            if let Some(lines) = h.inv.logs.as_mut() {
                lines.push(LogLine { level, text });
            }
            Ok(())
        },
    ));
    add(l.func_wrap(
        MODULE,
        import::NOW_MS,
        |mut c: Caller<'_, Host>| -> Result<i64, wasmi::Error> {
            charge(&mut c, 0)?;
            Ok(crate::clock::now_ms() as i64)
        },
    ));
    add(l.func_wrap(
        MODULE,
        import::CONFIG_GET,
        |mut c: Caller<'_, Host>, kp: i32, kl: i32, op: i32, oc: i32| {
            let mem = memory(&c, "config_get")?;
            let key = read(&mut c, mem, kp, kl, "config_get")?;
            let value = std::str::from_utf8(&key)
                .ok()
                .and_then(|k| c.data().config.get(k))
                .map(|v| v.as_bytes().to_vec());
            answer(&mut c, mem, value, op, oc, "config_get")
        },
    ));
    add(l.func_wrap(
        MODULE,
        import::EVENT_META,
        |mut c: Caller<'_, Host>, op: i32, oc: i32| {
            let mem = memory(&c, "event_meta")?;
            let meta = c.data().inv.meta.encode();
            answer(&mut c, mem, Some(meta), op, oc, "event_meta")
        },
    ));
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The finding: control characters passed in handler log lines (forged journal lines,
    /// terminal escapes in `invoke`).
    #[test]
    fn control_characters_in_log_text_are_escaped() {
        assert_eq!(printable("plain text ünïcode"), "plain text ünïcode");
        assert_eq!(
            printable("a\nFAKE tidepool: ok\u{1b}[2J\r\u{85}"),
            "a\\nFAKE tidepool: ok\\u{1b}[2J\\r\\u{85}"
        );
        // Bidi overrides, zero-width and line separators reorder or hide text in a terminal.
        assert_eq!(
            printable("ok\u{202e}evil\u{200b}\u{2028}"),
            "ok\\u{202e}evil\\u{200b}\\u{2028}"
        );
    }

    #[test]
    fn read_your_writes_sees_the_last_write_of_a_key_below_and_above_the_index_threshold() {
        let mut inv = Invocation::new(Mode::Event, Meta::None, 0, 0, 0);
        let key = |i: u8| vec![b'k', i];
        for round in 0..3u8 {
            for i in 0..(INDEX_FROM as u8 + 4) {
                inv.write(key(i), Some(vec![round, i]));
                assert_eq!(inv.written(&key(i)), Some(Some(&[round, i][..])));
            }
        }
        inv.write(key(2), None);
        assert_eq!(inv.written(&key(2)), Some(None), "a delete is seen as one");
        assert_eq!(inv.written(&key(3)), Some(Some(&[2, 3][..])));
        assert_eq!(inv.written(b"other"), None);
        assert_eq!(
            inv.effects.state.len(),
            INDEX_FROM + 4,
            "three rounds of writes to the same keys hold one entry per key"
        );
    }
}
