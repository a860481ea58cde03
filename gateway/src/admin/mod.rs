//! Pushing handlers to boxes: signed bundles (`bundle.rs`). The admin channel, the registry,
//! the offline inbox and probation come here too (issue 10).

pub mod bundle;
