//! Combining the participants' updates into one: the exact, order-independent
//! fixed-point accumulator every aggregation rule builds on, the server
//! optimisers that step with its mean, and the robust rules. Depends only on
//! [`crate::config`] (the `[aggregation]` settings), so the coordinator's fold
//! and the fuzz targets use it alone.
//!
//! - [`fedavg`]: example-weighted FedAvg in an `i64` fixed-point accumulator,
//!   folded chunk by chunk as updates arrive and exactly reversible.
//! - [`server`]: FedAvgM, FedAdam, FedYogi, FedAdagrad on the aggregate delta.
//! - [`robust`]: coordinate-wise median and trimmed mean over a window of
//!   every update's values, and Multi-Krum's selection.
//! - [`weight_cap`]: `max_weight_share`, the cap on any one firm's weight.

pub mod fedavg;
pub mod robust;
pub mod server;
pub mod weight_cap;
