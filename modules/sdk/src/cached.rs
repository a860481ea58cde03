//! [`Cached`]: a value computed once per instance and kept in a `static`, such as parsed config.
//!
//! Statics live as long as the instance: the gateway makes a fresh one after a trap (and runs
//! `tp_init` again), so a cache is rebuilt then. Never keep state here; use [`crate::state`].

use alloc::boxed::Box;
use core::convert::Infallible;
use core::marker::PhantomData;
use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};

/// A write-once cell for a `static`: the first `get_or_init` computes the value, later calls
/// return it. The value is boxed and lives as long as the cell (forever, in a `static`).
///
/// ```
/// use tidepool_sdk::Cached;
///
/// static LIMIT: Cached<f64> = Cached::new();
///
/// assert_eq!(LIMIT.get(), None);
/// assert_eq!(*LIMIT.get_or_init(|| 30.0), 30.0);
/// assert_eq!(*LIMIT.get_or_init(|| 99.0), 30.0); // computed once
/// ```
pub struct Cached<T> {
    ptr: AtomicPtr<T>,
    /// Owns a `T` (for drop check) without the `Send`/`Sync` that `AtomicPtr` would imply.
    _owns: PhantomData<*const T>,
}

// SAFETY: the cell hands out `&T` to any thread and may drop its `T` on another thread than
// the one that made it, so it is `Sync` for `T: Send + Sync` and `Send` for `T: Send`, like
// `OnceLock`. Racing initializers each box a value; one wins the swap and the others free theirs.
unsafe impl<T: Send + Sync> Sync for Cached<T> {}
// SAFETY: see above.
unsafe impl<T: Send> Send for Cached<T> {}

impl<T> Cached<T> {
    /// An empty cell.
    ///
    /// ```
    /// static NAME: tidepool_sdk::Cached<String> = tidepool_sdk::Cached::new();
    /// ```
    pub const fn new() -> Self {
        Cached {
            ptr: AtomicPtr::new(ptr::null_mut()),
            _owns: PhantomData,
        }
    }

    /// The value, if it has been computed.
    ///
    /// ```
    /// let c = tidepool_sdk::Cached::new();
    /// assert_eq!(c.get(), None);
    /// c.get_or_init(|| 1);
    /// assert_eq!(c.get(), Some(&1));
    /// ```
    pub fn get(&self) -> Option<&T> {
        // SAFETY: a non-null pointer came from `Box::into_raw` in `get_or_try_init` and is
        // only freed by `drop`, which takes `&mut self`.
        unsafe { self.ptr.load(Ordering::Acquire).as_ref() }
    }

    /// The value, computing it with `init` if this is the first call.
    ///
    /// ```
    /// let field = tidepool_sdk::Cached::new();
    /// assert_eq!(field.get_or_init(|| String::from("v")), "v");
    /// ```
    pub fn get_or_init(&self, init: impl FnOnce() -> T) -> &T {
        match self.get_or_try_init(|| Ok::<T, Infallible>(init())) {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// The value, computing it with `init` if this is the first call; an `Err` from `init` is
    /// returned and leaves the cell empty, so the next call tries again.
    ///
    /// ```
    /// use tidepool_sdk::{Cached, Error};
    ///
    /// struct Config { threshold: f64 }
    /// static CONFIG: Cached<Config> = Cached::new();
    ///
    /// fn config() -> Result<&'static Config, Error> {
    ///     CONFIG.get_or_try_init(|| {
    ///         let threshold = Some(30.0).ok_or(Error::NotFound)?; // config::get_f64("threshold")
    ///         Ok(Config { threshold })
    ///     })
    /// }
    /// assert_eq!(config()?.threshold, 30.0);
    /// # Ok::<(), Error>(())
    /// ```
    pub fn get_or_try_init<E>(&self, init: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
        if let Some(value) = self.get() {
            return Ok(value);
        }
        let new = Box::into_raw(Box::new(init()?));
        match self
            .ptr
            .compare_exchange(ptr::null_mut(), new, Ordering::AcqRel, Ordering::Acquire)
        {
            // SAFETY: `new` is now owned by the cell, freed only by `drop` (`&mut self`).
            Ok(_) => Ok(unsafe { &*new }),
            Err(existing) => {
                // SAFETY: `new` was not published; `existing` is owned by the cell as above.
                unsafe {
                    drop(Box::from_raw(new));
                    Ok(&*existing)
                }
            }
        }
    }
}

impl<T> Default for Cached<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Drop for Cached<T> {
    fn drop(&mut self) {
        let p = *self.ptr.get_mut();
        if !p.is_null() {
            // SAFETY: the pointer came from `Box::into_raw` and nothing borrows it (`&mut self`).
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

impl<T: core::fmt::Debug> core::fmt::Debug for Cached<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("Cached").field(&self.get()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::Cached;
    use alloc::string::String;

    #[test]
    fn a_failed_init_leaves_it_empty_and_a_later_one_fills_it() {
        let c: Cached<String> = Cached::new();
        assert_eq!(c.get_or_try_init(|| Err::<String, _>(7)), Err(7));
        assert!(c.get().is_none());
        assert_eq!(c.get_or_try_init(|| Ok::<_, ()>("a".into())).unwrap(), "a");
        assert_eq!(c.get_or_try_init(|| Err::<String, _>(8)).unwrap(), "a");
        assert_eq!(alloc::format!("{c:?}"), r#"Cached(Some("a"))"#);
    }
}
