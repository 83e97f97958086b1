//! Differential privacy, accounted exactly.
//!
//! - [`accountant`]: RDP of the Poisson-subsampled Gaussian mechanism (Mironov,
//!   Talwar, Zhang 2019) for integer and fractional orders, composed over
//!   heterogeneous events, converted to (ε, δ) with the improved conversion
//!   (Canonne, Kamath, Steinke 2020; Balle et al. 2020). It matches Google's
//!   `dp_accounting` (same order grid) to about 1e-11 relative:
//!   `tests/dp_accounting.rs` checks it on every CI run.
//! - [`calibrate`]: the smallest noise multiplier that meets a target ε, and the
//!   checks on (σ, q, steps, δ) that name the parameter at fault.
//! - [`budget`]: what a plan's `[privacy.dp]` spends, round by round, at a site
//!   (record level) or for the model (client level).
//! - [`client_noise`]: client-level noise in the accumulator's integers,
//!   scaled to the rounded update's sensitivity: all of it at the coordinator
//!   (plain rounds), or a share at each site before masking (with secure
//!   aggregation, the distributed discrete Gaussian of Kairouz, Liu, Steinke
//!   2021).
//! - [`discrete_gaussian`]: an exact sampler of the discrete Gaussian (Canonne,
//!   Kamath, Steinke 2020) in integer arithmetic only, so it is not open to the
//!   floating-point attacks on naive samplers (Mironov 2012); it draws from a
//!   caller's cryptographically secure generator, never from the plan's seed.

pub mod accountant;
pub mod budget;
pub mod calibrate;
pub mod client_noise;
pub mod discrete_gaussian;
