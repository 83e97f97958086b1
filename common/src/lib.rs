//! Shared building blocks of Sangsaeng, used by the coordinator, the participant
//! daemon, the example and the tests.
//!
//! Map of the crate, one folder per concern, listed bottom-up: each depends only
//! on the ones above it in this list.
//! - [`error`]: the crate's one error enum.
//! - [`config`]: the typed, validated files an anchor company writes (training
//!   plan, roster) and the reading of daemon config files.
//! - [`identity`]: PKI, mutual TLS, signatures with an endpoint's TLS key, and
//!   the dial to the coordinator.
//! - [`aggregation`]: the exact fixed-point FedAvg accumulator.
//! - [`privacy`]: differential privacy (accountant, calibration, discrete
//!   Gaussian noise).
//! - [`learning`]: line data, the model's shape, metrics, and (with the `train`
//!   feature, the default) local training with burn.
//! - [`transfer`]: model files, update encodings, digests, protocol conversions.
//! - [`process`]: logging set-up and SIGINT/SIGTERM handling shared by the daemons.
//! - [`exposition`] (`metrics` feature): the daemons' Prometheus `/metrics` page.

pub mod aggregation;
pub mod config;
pub mod error;
#[cfg(feature = "metrics")]
pub mod exposition;
pub mod identity;
pub mod learning;
pub mod privacy;
pub mod process;
pub mod transfer;

pub use error::{Error, Result};
