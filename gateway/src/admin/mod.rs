//! Changing what a box runs, from outside it: signed bundles (`bundle.rs`); deploy, rollback,
//! removal, probation's verdicts and the registry (`deploy.rs`); the handlers the config file
//! pins and what a reload changes among them (`configured.rs`); the offline inbox
//! (`inbox.rs`); the admin channel for operators over QUIC (`channel.rs`) and its client
//! (`client.rs`), which speak the control protocol of `control.rs`; a rollout to a fleet in
//! waves (`fleet.rs`).

pub mod bundle;
pub mod channel;
pub mod client;
pub mod configured;
pub mod deploy;
pub mod fleet;
pub mod inbox;
