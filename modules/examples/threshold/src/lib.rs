//! Threshold alarm handler with hysteresis: forwards an alarm (class urgent) when a topic's
//! reading rises above `threshold`, and a clear (class normal) when it then falls below
//! `threshold - hysteresis`. Readings in between change nothing, so a value hovering at the
//! threshold does not flap.
//!
//! Config: `threshold` (number, required), `hysteresis` (number >= 0, default 0), `field` (the
//! payload's JSON key, default `v`). A missing or bad config fails `tp_init`, so the deploy.
//!
//! Forwards, on the event's own topic: `{"alarm":true,"value":31.2,"threshold":30,"device":"d1"}`
//! (urgent) and `{"alarm":false,...}` (normal), at most one per event.
//!
//! State: `alarm/<topic>` exists while the topic is alarmed and holds the reading that raised it
//! (f64, 8 bytes little-endian). Per event: one state read; a write (put or delete) only when the
//! alarm changes, so a steady stream costs one host read and no write. A payload without a
//! finite number under `field` fails the event (dead letter).
#![cfg_attr(all(target_arch = "wasm32", not(test)), no_std)]

extern crate alloc;

mod alarm;

use tidepool_sdk::{config, forward, json, state, warn, Cached, Class, Error, Event};

use crate::alarm::{Change, Config};

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
    let text = json::number_text(ev.payload, &cfg.field);
    let Some((text, reading)) = text
        .and_then(|t| Some((t, t.parse::<f64>().ok()?)))
        .filter(|(_, r)| r.is_finite())
    else {
        warn!(
            "no finite number `{}` in the payload on {}",
            cfg.field, ev.topic
        );
        return Err(Error::NotFound);
    };
    let key = [b"alarm/", ev.topic.as_bytes()].concat();
    let alarmed = state::get(&key).is_some();
    let Some(change) = alarm::decide(cfg, alarmed, reading) else {
        return Ok(());
    };
    let device = ev.meta().map(|m| m.device).unwrap_or_default();
    let msg = alarm::message(change, text, cfg, &device);
    match change {
        Change::Raise => {
            forward(ev.topic, msg.as_bytes(), Class::Urgent)?;
            state::put(&key, &reading.to_le_bytes())
        }
        Change::Clear => {
            forward(ev.topic, msg.as_bytes(), Class::Normal)?;
            state::delete(&key);
            Ok(())
        }
    }
}
