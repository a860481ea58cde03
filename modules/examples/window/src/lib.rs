//! Per-minute window handler: for each series (a device and the last level of the topic it
//! publishes on), keeps the current minute's count, min, max and sum of a reading, and forwards
//! each finished minute once, as class bulk, on `windows/<device>/<metric>`:
//!
//! ```json
//! {"device":"d1","metric":"temp","start_ms":1700000040000,"end_ms":1700000100000,
//!  "count":12,"min":20.5,"max":22.0,"mean":21.2}
//! ```
//!
//! The minute comes from the event's `ts` if the device sent one, else from when the gateway
//! received it (`received_ms`). A window is forwarded by the first event of its series from
//! another minute (normally the next one; an earlier one after a clock jump or a resend closes
//! it too), or, if none comes, by the timer (`timer_ms = 60000` in the manifest) once the
//! minute is over on the gateway's clock plus 5 s of grace. A device clock that is off does
//! not matter: its minute's end is mapped to gateway time by the offset (`received_ms - ts`)
//! seen at its latest event.
//!
//! Config: `field` (the payload's JSON key, default `v`), `sweep_max` (the most series one
//! timer call looks at and so the most windows it forwards, default 16; keep it at most the
//! manifest's `forwards_per_event`, and budget about 40k fuel per window it flushes).
//!
//! State (CBOR): `w/<device>/<metric>` = the open [`window::Window`] as the array `[minute,
//! count, min, max, sum, skew_ms]`; `index` = the array of series (`<device>/<metric>`) with an
//! open window (the ABI has no key listing), which the timer goes round `sweep_max` at a time,
//! dropping what it flushed (and deleting `index` when it is empty). Per event: one state read
//! and one write, plus a read and a write of `index` when a series opens a window. A payload
//! without a finite number under `field` fails the event (dead letter).
#![cfg_attr(all(target_arch = "wasm32", not(test)), no_std)]

extern crate alloc;

pub mod window;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use tidepool_sdk::{config, forward_json, state, warn, Cached, Class, Error, Event, Timer};

use crate::window::{Config, Window};

/// The state key of the list of series with an open window.
const INDEX: &[u8] = b"index";

static CONFIG: Cached<Config> = Cached::new();

tidepool_sdk::handler!(on_event, init = init, timer = on_timer);

/// The parsed config, read once per instance.
fn config() -> Result<&'static Config, Error> {
    config::cached(&CONFIG, Config::parse)
}

fn init() -> Result<(), Error> {
    config().map(drop)
}

/// The state key of a series' open window.
fn window_key(series: &str) -> Vec<u8> {
    [b"w/", series.as_bytes()].concat()
}

/// Forwards a finished window of `series`.
fn flush(series: &str, w: &Window) -> Result<(), Error> {
    let topic = format!("windows/{series}");
    forward_json(&topic, &w.summary(series), Class::Bulk)
}

fn on_event(ev: &Event) -> Result<(), Error> {
    let cfg = config()?;
    let Some(reading) = ev.number(&cfg.field).filter(|r| r.is_finite()) else {
        warn!(
            "no finite number `{}` in the payload on {}",
            cfg.field, ev.topic
        );
        return Err(Error::NotFound);
    };
    let meta = ev.meta().ok_or(Error::BadArgument)?;
    let series = window::series(&meta.device, ev.topic);
    let key = window_key(&series);
    let open = state::get_cbor::<Window>(&key)?;
    let opens = open.is_none();
    let (w, finished) = window::record(open, meta.time_ms(), meta.received_ms, reading);
    if let Some(done) = finished {
        flush(&series, &done)?;
    }
    state::put_cbor(&key, &w)?;
    if opens {
        let mut index: Vec<String> = state::get_cbor(INDEX)?.unwrap_or_default();
        index.push(series);
        state::put_cbor(INDEX, &index)?;
    }
    Ok(())
}

fn on_timer(t: &Timer) -> Result<(), Error> {
    let cfg = config()?;
    let Some(mut index) = state::get_cbor::<Vec<String>>(INDEX)? else {
        return Ok(());
    };
    let changed = window::sweep(&mut index, cfg.sweep_max, |series| {
        let key = window_key(series);
        match state::get_cbor::<Window>(&key)? {
            Some(w) if !w.is_over(t.now_ms) => Ok(false),
            Some(w) => {
                flush(series, &w)?;
                state::delete(&key);
                Ok(true)
            }
            None => Ok(true),
        }
    })?;
    if index.is_empty() {
        state::delete(INDEX);
    } else if changed {
        state::put_cbor(INDEX, &index)?;
    }
    Ok(())
}
