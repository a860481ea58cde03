//! Tidepool: a small daemon for edge boxes. Devices publish over QUIC; sandboxed Wasm
//! handlers run on each event; state, outbox and high-water marks are committed to sled in
//! groups; the uplink wakes the cloud only for what handlers forward.
//!
//! `docs/architecture.md` is the map of this crate and its invariants.

pub mod admin;
pub mod client;
pub mod clock;
pub mod config;
pub mod control;
pub mod dispatch;
pub mod gateway;
pub mod ingress;
pub mod jsonl;
pub mod metrics;
pub mod os;
pub mod outbox;
pub mod pipeline;
pub mod pki;
pub mod prometheus;
pub mod proto;
pub mod record;
pub mod router;
pub mod sandbox;
pub mod store;
pub mod timers;
pub mod uplink;

#[cfg(test)]
mod tidy;

#[cfg(test)]
mod sim;
