//! What a site learns from: its line data, the model's shape, and (with the
//! `train` feature) local training and evaluation with burn.
//!
//! Layering inside: [`model`] (shape, parameter layout, seeded initialisation,
//! plain Rust) and [`data`] (CSV line data, schema checks, federated feature
//! statistics) depend only on [`crate::config`]; [`metrics`] is pure arithmetic;
//! [`backend`], [`mlp`], [`objective`], [`train`], [`dp_sgd`], [`proximal`] and [`scaffold`] sit on top and are the only modules that
//! name burn, so the coordinator and the fuzz targets build without it.
//!
//! - [`model`]: the MLP's shape, canonical parameter layout, flat vectors.
//! - [`data`]: reading, checking, splitting and scaling a site's CSV exports.
//! - [`metrics`]: accuracy, macro-F1 and the evaluation record.
//! - [`scoring`]: a CSV to score, checked strictly and read in bounded batches.
//! - [`backend`] (`train`): the single place that chooses the burn backend.
//! - [`mlp`] (`train`): the burn module of a model spec.
//! - [`objective`] (`train`): the losses (cross-entropy, MSE, Huber), batch mean and closed form.
//! - [`train`] (`train`): local training, evaluation and prediction.
//! - [`dp_sgd`] (`train`): record-level differential privacy in local training (DP-SGD).
//! - [`proximal`] (`train`): FedProx's pull towards the round's global model.
//! - [`scaffold`] (`train`): SCAFFOLD's gradient correction and control variates.

#[cfg(feature = "train")]
pub mod backend;
pub mod data;
#[cfg(feature = "train")]
pub mod dp_sgd;
pub mod metrics;
#[cfg(feature = "train")]
pub mod mlp;
pub mod model;
#[cfg(feature = "train")]
pub mod objective;
#[cfg(feature = "train")]
pub mod proximal;
#[cfg(feature = "train")]
pub mod scaffold;
pub mod scoring;
#[cfg(feature = "train")]
pub mod train;
