//! Threshold alert handler: forwards an event as urgent when its reading crosses the configured
//! threshold upwards, and keeps each topic's last reading in state.
//!
//! Config: `threshold` (number, required) and `field` (the payload's JSON key, default `v`).
//! State: `last/<topic>` = the last reading as an f64, 8 bytes little-endian.
#![no_std]

use tidepool_sdk::{config, error, forward, json, state, warn, Class, Error, Event};

tidepool_sdk::handler!(on_event);

fn on_event(ev: &Event) -> Result<(), Error> {
    let Some(threshold) = config::get_f64("threshold").filter(|t| !t.is_nan()) else {
        error!("config `threshold` is missing or not a number");
        return Err(Error::BadArgument);
    };
    let field = config::get("field");
    let field = field.as_deref().unwrap_or("v");
    let Some(reading) = json::number(ev.payload, field) else {
        warn!("no numeric `{}` in the payload on {}", field, ev.topic);
        return Err(Error::NotFound);
    };

    let key = [b"last/", ev.topic.as_bytes()].concat();
    let previous = state::get(&key)
        .and_then(|v| v.try_into().ok())
        .map(f64::from_le_bytes);
    if reading > threshold && previous.map_or(true, |p| p <= threshold) {
        forward(ev.topic, ev.payload, Class::Urgent)?;
    }
    state::put(&key, &reading.to_le_bytes())
}
