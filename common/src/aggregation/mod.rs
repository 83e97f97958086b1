//! Combining the participants' updates into one: the exact, order-independent
//! fixed-point accumulator every aggregation rule builds on. Depends on nothing
//! else in the crate, so the coordinator's fold and the fuzz targets use it alone.
//!
//! - [`fedavg`]: example-weighted FedAvg in an `i64` fixed-point accumulator,
//!   folded chunk by chunk as updates arrive and exactly reversible.
//!
//! Server optimisers and robust rules (median, trimmed mean, Krum) plug in here,
//! one module each, on top of [`fedavg::Accumulator`].

pub mod fedavg;
