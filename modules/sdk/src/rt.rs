//! Runtime glue behind [`handler!`](crate::handler): the global allocator, the panic trap,
//! the per-event block that `tp_alloc` hands to the host and `tp_on_event` frees, and the
//! `tp_init` and `tp_on_timer` wrappers. Not a stable API; only the macros use it.

use alloc::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::{Error, Event, Timer};

pub use crate::log::log_fmt;

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// The panic handler's body, which [`handler!`](crate::handler) defines in the module's own
/// crate (outside its tests, which link `std` and so its panic handler): a panic traps; the
/// gateway then discards the instance and fails the event.
#[cfg(target_arch = "wasm32")]
pub fn trap() -> ! {
    core::arch::wasm32::unreachable()
}

// The block from the last `tp_alloc`, freed by `tp_on_event` (or by the next `tp_alloc`, so at
// most one is ever live). SIZE == 0 means none. Wasm without threads is single-threaded; the
// atomics are only a safe way to have mutable statics.
static BLOCK_ADDR: AtomicUsize = AtomicUsize::new(0);
static BLOCK_SIZE: AtomicUsize = AtomicUsize::new(0);

/// `tp_alloc`: allocates `len` bytes (at least one, so the pointer is never null) for the host
/// to write the topic and payload into. Traps on a negative length or when out of memory.
pub fn alloc_block(len: i32) -> i32 {
    free_block();
    let Ok(len) = usize::try_from(len) else {
        panic!()
    };
    let Ok(layout) = Layout::from_size_align(len.max(1), 1) else {
        panic!()
    };
    // SAFETY: the layout's size is at least 1.
    let ptr = unsafe { alloc(layout) };
    if ptr.is_null() {
        handle_alloc_error(layout);
    }
    BLOCK_ADDR.store(ptr as usize, Relaxed);
    BLOCK_SIZE.store(layout.size(), Relaxed);
    ptr as usize as i32
}

fn free_block() {
    let size = BLOCK_SIZE.swap(0, Relaxed);
    if size != 0 {
        let addr = BLOCK_ADDR.load(Relaxed);
        // SAFETY: `addr` and `size` describe the block that `alloc_block` got from the global
        // allocator with exactly this layout, and zeroing SIZE above makes this the only free.
        unsafe { dealloc(addr as *mut u8, Layout::from_size_align_unchecked(size, 1)) }
    }
}

/// The `len` bytes at `ptr`, if they lie inside the live block.
fn block_bytes<'a>(ptr: i32, len: i32) -> Option<&'a [u8]> {
    let (addr, len) = (ptr as u32 as usize, usize::try_from(len).ok()?);
    if len == 0 {
        return Some(&[]);
    }
    let (start, size) = (BLOCK_ADDR.load(Relaxed), BLOCK_SIZE.load(Relaxed));
    if size == 0 || addr < start || addr.checked_add(len)? > start + size {
        return None;
    }
    // SAFETY: the range is inside the live block, which the host has filled; nothing else
    // refers to it, and it stays allocated until `on_event` frees it after the last use.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
}

/// `tp_on_event`: runs `handler` on the event in the block, then frees the block. Returns 0
/// on `Ok`, 1 on `Err`, 2 when the ranges are outside the block or the topic is not UTF-8.
pub fn on_event(
    topic: (i32, i32),
    payload: (i32, i32),
    handler: impl FnOnce(&Event<'_>) -> Result<(), Error>,
) -> i32 {
    let event = (
        block_bytes(topic.0, topic.1),
        block_bytes(payload.0, payload.1),
    );
    let code = match event {
        (Some(topic), Some(payload)) => match crate::sys::utf8(topic) {
            Some(topic) => match handler(&Event { topic, payload }) {
                Ok(()) => 0,
                Err(_) => 1,
            },
            None => 2,
        },
        _ => 2,
    };
    free_block();
    code
}

/// `tp_init`: runs `init`; 0 on `Ok`, 1 on `Err`. At load the gateway then refuses the
/// handler; when an instance is rebuilt after a trap, the event that needed it fails instead.
pub fn init(init: impl FnOnce() -> Result<(), Error>) -> i32 {
    match init() {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// `tp_on_timer`: runs `handler` with the timer call's times; 0 on `Ok`, 1 on `Err`. `due_ms`
/// and `late_ms` come from `event_meta`; if the host does not give them, the call counts as
/// due now.
pub fn on_timer(now_ms: i64, handler: impl FnOnce(&Timer) -> Result<(), Error>) -> i32 {
    let now_ms = u64::try_from(now_ms).unwrap_or(0);
    let timer = match crate::with_event_meta(|cbor| Timer::decode(cbor?)) {
        Some(t) => Timer { now_ms, ..t },
        None => Timer {
            now_ms,
            due_ms: now_ms,
            late_ms: 0,
        },
    };
    match handler(&timer) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// Exports a handler's functions as the module's ABI: always `tp_alloc` and `tp_on_event`,
/// `tp_init` with `init = ...` and `tp_on_timer` with `timer = ...`; also defines the panic
/// handler (a panic traps) when building for wasm32 outside tests. Use it once per module.
///
/// - `on_event`: `fn(&Event) -> Result<(), Error>`. `tp_on_event` returns 0 for `Ok`, 1 for
///   `Err` and 2 when the host passed a bad event (topic not UTF-8). `Err` dead-letters the
///   event.
/// - `init = f`: `fn() -> Result<(), Error>`, run once per instance before its first event
///   (again after a trap). It may read config and state only: parse and check the config here
///   so a bad one fails the deploy instead of every event. `tp_init` returns 0 or 1.
/// - `timer = f`: `fn(&Timer) -> Result<(), Error>`, called every `timer_ms` of the manifest
///   (which must set it). `tp_on_timer` returns 0 or 1.
///
/// `init` and `timer` may come in either order.
///
/// ```no_run
/// use tidepool_sdk::{Error, Event};
///
/// tidepool_sdk::handler!(on_event);
///
/// fn on_event(ev: &Event) -> Result<(), Error> {
///     tidepool_sdk::info!("{} bytes on {}", ev.payload.len(), ev.topic);
///     Ok(())
/// }
/// ```
///
/// With a timer and an init function:
///
/// ```no_run
/// use tidepool_sdk::{config, Cached, Error, Event, Timer};
///
/// static LIMIT: Cached<f64> = Cached::new();
///
/// tidepool_sdk::handler!(on_event, init = init, timer = on_timer);
///
/// fn init() -> Result<(), Error> {
///     LIMIT.get_or_try_init(|| config::get_f64("limit").ok_or(Error::NotFound))?;
///     Ok(())
/// }
///
/// fn on_event(_ev: &Event) -> Result<(), Error> {
///     Ok(())
/// }
///
/// fn on_timer(t: &Timer) -> Result<(), Error> {
///     tidepool_sdk::debug!("tick at {} ({} ms late)", t.now_ms, t.late_ms);
///     Ok(())
/// }
/// ```
#[macro_export]
macro_rules! handler {
    (@event $handler:expr) => {
        /// A panic traps (see `tidepool_sdk::rt::trap`).
        #[cfg(all(target_arch = "wasm32", not(test)))]
        #[panic_handler]
        fn tp_panic(_: &::core::panic::PanicInfo<'_>) -> ! {
            $crate::rt::trap()
        }

        /// Allocates the block the host writes the event's topic and payload into.
        #[no_mangle]
        pub extern "C" fn tp_alloc(len: i32) -> i32 {
            $crate::rt::alloc_block(len)
        }

        /// Runs the handler on the event in the block from `tp_alloc`; 0 means success.
        #[no_mangle]
        pub extern "C" fn tp_on_event(
            topic_ptr: i32,
            topic_len: i32,
            payload_ptr: i32,
            payload_len: i32,
        ) -> i32 {
            $crate::rt::on_event((topic_ptr, topic_len), (payload_ptr, payload_len), $handler)
        }
    };
    (@init $init:expr) => {
        /// Runs the handler's init function once per instance; 0 means success.
        #[no_mangle]
        pub extern "C" fn tp_init() -> i32 {
            $crate::rt::init($init)
        }
    };
    (@timer $timer:expr) => {
        /// Runs the handler's timer function; 0 means success.
        #[no_mangle]
        pub extern "C" fn tp_on_timer(now_ms: i64) -> i32 {
            $crate::rt::on_timer(now_ms, $timer)
        }
    };
    ($handler:expr $(,)?) => {
        $crate::handler!(@event $handler);
    };
    ($handler:expr, init = $init:expr $(,)?) => {
        $crate::handler!(@event $handler);
        $crate::handler!(@init $init);
    };
    ($handler:expr, timer = $timer:expr $(,)?) => {
        $crate::handler!(@event $handler);
        $crate::handler!(@timer $timer);
    };
    ($handler:expr, init = $init:expr, timer = $timer:expr $(,)?) => {
        $crate::handler!(@event $handler);
        $crate::handler!(@init $init);
        $crate::handler!(@timer $timer);
    };
    ($handler:expr, timer = $timer:expr, init = $init:expr $(,)?) => {
        $crate::handler!(@event $handler);
        $crate::handler!(@init $init);
        $crate::handler!(@timer $timer);
    };
}
