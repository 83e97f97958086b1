//! Privacy mechanisms: what lets a supplier join without trusting the anchor
//! company with its rows. Depends on [`crate::error`] only, so the coordinator
//! and the participant use the same arithmetic.
//!
//! - [`dp`]: differential privacy: the Rényi-DP accountant of the subsampled
//!   Gaussian mechanism, noise calibration to a target ε, and an exact
//!   discrete-Gaussian sampler for noise added in the fixed-point domain.
//!
//! Secure aggregation (masking in the accumulator's ring) plugs in here beside it.

pub mod dp;
