//! Secure aggregation on the coordinator (plans with `[privacy]
//! secure_aggregation`): the bookkeeping of one attempt of a secure round,
//! and the handling of what participants send for it.
//!
//! The coordinator relays keys and sealed shares, folds masked updates into
//! the round's accumulator (wrapping adds in Z_2^64) and removes the masks
//! once the survivors have revealed the shares that let it. At no point does
//! it hold a participant's unmasked update: the masked words it folds and
//! spills are uniformly random to it, and it learns a participant's secret only
//! when t of that participant's neighbours agree to reveal it.
//!
//! - [`attempt`]: one attempt's state: who has which index, adverts, shares,
//!   masked inputs, unmasking answers, and the task each participant waits on.
//! - [`receive`]: the `SecureAggregation` RPC's steps (advert, shares, unmask
//!   answer), checked against the attempt.
//!
//! The round's steps in time (advertise, share, mask, unmask) are driven by
//! [`crate::round`]'s secure collection.

pub mod attempt;
pub mod receive;

pub use attempt::{SecureAttempt, SecureRecord, Stage};
