//! Privacy mechanisms: what lets a supplier join without trusting the anchor
//! company with its rows. Depends on [`crate::config`], and (secure aggregation's wire
//! messages) on [`crate::aggregation`] and [`crate::identity`], so the coordinator
//! and the participant use the same arithmetic.
//!
//! - [`dp`]: differential privacy: the Rényi-DP accountant of the subsampled
//!   Gaussian mechanism, noise calibration to a target ε, and an exact
//!   discrete-Gaussian sampler for noise added in the fixed-point domain.
//! - [`secagg`]: the cryptographic core of SecAgg+ secure aggregation: masks in
//!   the accumulator's ring Z_2^64, so the masked sum is bit-identical to the
//!   plain one; dropout recovery through Shamir shares (`[privacy]
//!   secure_aggregation` turns it on).

pub mod dp;
pub mod secagg;
