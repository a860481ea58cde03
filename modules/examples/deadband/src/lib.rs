//! Dead-band filter handler: forwards an event (as is, on its own topic, class normal) only when
//! its reading moved by more than `delta` from the last reading forwarded on that topic. The
//! first reading on a topic is always forwarded. Cuts the uplink traffic of sensors that report
//! often but change slowly.
//!
//! Config: `delta` (a JSON number >= 0, required), `field` (the payload's JSON key, default
//! `v`). A missing or bad config fails `tp_init`, so the deploy.
//!
//! State: `last/<topic>` = the last forwarded reading (f64, 8 bytes little-endian). Per event:
//! one state read, and a write only when the event is forwarded. A payload without a finite
//! number under `field` fails the event (dead letter).
#![cfg_attr(all(target_arch = "wasm32", not(test)), no_std)]

extern crate alloc;

mod band;

use tidepool_sdk::{config, forward, state, warn, Cached, Class, Error, Event};

use crate::band::Config;

static CONFIG: Cached<Config> = Cached::new();

tidepool_sdk::handler!(on_event, init = init);

/// The parsed config, read once per instance.
fn config() -> Result<&'static Config, Error> {
    config::cached(&CONFIG, Config::parse)
}

fn init() -> Result<(), Error> {
    config().map(drop)
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
    let key = [b"last/", ev.topic.as_bytes()].concat();
    let last = state::get(&key)
        .and_then(|v| v.try_into().ok())
        .map(f64::from_le_bytes);
    if band::should_forward(cfg.delta, last, reading) {
        forward(ev.topic, ev.payload, Class::Normal)?;
        state::put(&key, &reading.to_le_bytes())?;
    }
    Ok(())
}
