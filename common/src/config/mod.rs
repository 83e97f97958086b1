//! What the federation agreed on, as typed and validated files: the bottom of
//! the crate, depending on nothing else in it.
//!
//! - [`plan`]: the training plan (schema, model shape, training settings, update
//!   encoding), validated once so everything above can trust it.
//! - [`privacy`]: the plan's `[privacy]` section (differential-privacy budget,
//!   secure aggregation).
//! - [`aggregation`]: the plan's `[aggregation]` section (server optimiser,
//!   robust rule).
//! - [`roster`]: the organisations, their tiers, roles and agreements, and the
//!   one rule for what an organisation id may look like.
//! - [`file`]: reading a daemon's TOML config file (errors name file and key).

pub mod aggregation;
pub mod file;
pub mod plan;
pub mod privacy;
pub mod roster;
