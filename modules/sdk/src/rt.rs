//! Runtime glue behind [`handler!`](crate::handler): the global allocator, the panic handler,
//! and the per-event block that `tp_alloc` hands to the host and `tp_on_event` frees. Not a
//! stable API; only the macros use it.

use alloc::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::{Error, Event};

pub use crate::log::log_fmt;

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// A panic traps; the gateway then discards the instance and fails the event.
#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
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
        (Some(topic), Some(payload)) => match core::str::from_utf8(topic) {
            Ok(topic) => match handler(&Event { topic, payload }) {
                Ok(()) => 0,
                Err(_) => 1,
            },
            Err(_) => 2,
        },
        _ => 2,
    };
    free_block();
    code
}

/// Exports a handler function as the module's `tp_alloc` and `tp_on_event`.
///
/// The function takes `&Event` and returns `Result<(), Error>`; `tp_on_event` returns 0 for
/// `Ok`, 1 for `Err` and 2 when the host passed a bad event (topic not UTF-8). Use it once per
/// module.
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
#[macro_export]
macro_rules! handler {
    ($handler:expr) => {
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
}
