//! Pushing handlers to boxes: signed bundles (`bundle.rs`), one deploy checked then installed
//! (`deploy.rs`), the offline inbox (`inbox.rs`). The admin channel, rollback and probation
//! come here too (issue 10).

pub mod bundle;
pub mod deploy;
pub mod inbox;
