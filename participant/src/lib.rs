//! The Sangsaeng participant daemon, run by each supplier beside its private
//! line data. It only dials out to the coordinator; the data never leaves the
//! site, only aggregate feature statistics, weight deltas and evaluation metrics.
//!
//! Map of the crate:
//! - [`config`]: typed, validated configuration (file + CLI) and reconnect backoff.
//! - [`error`]: the crate's error enum; which errors are worth a reconnect.
//! - [`site`]: loading, checking, splitting and scaling the site's CSV data.
//! - [`download`]: checking a downloaded model chunk by chunk and whole.
//! - [`privacy`]: the site's own privacy limits against a plan's budget, the
//!   noise it derives from its rows, and what it reports having spent.
//! - [`secure`]: this site's side of secure aggregation (keys, checked
//!   adverts, masked upload, unmasking answers).
//! - [`predict`]: scoring the site's own CSV exports with a trained model.
//! - [`personalise`]: fine-tuning the global model on the site's own rows, locally.
//! - [`scaffold`]: this site's SCAFFOLD control variate, kept between rounds.
//! - [`spill`]: the masked upload kept in a temporary file between its digest
//!   pass and the upload, so it is masked once.
//! - [`session`]: the conversation with the coordinator: subscribe, statistics,
//!   chunked model download with resume, local burn training, delta upload, evaluation.
//!
//! - [`metrics`]: the daemon's optional Prometheus page (`metrics_listen`).
//! - [`progress`]: progress bars on a terminal, periodic log lines off one.
//! - [`doctor`]: pre-flight checks for operators (`sangsaeng-participant doctor`).
//!
//! [`run`] is what `sangsaeng-participant run` calls; tests and the example call it too.

pub mod config;
pub mod doctor;
pub mod download;
pub mod error;
pub mod metrics;
pub mod personalise;
pub mod predict;
pub mod privacy;
pub mod progress;
pub mod scaffold;
pub mod secure;
pub mod session;
pub mod site;
pub mod spill;

use tokio_util::sync::CancellationToken;

pub use config::ParticipantConfig;
pub use error::{ParticipantError, Result};

/// Runs the participant until `shutdown` is cancelled (then it tells the
/// coordinator it leaves) or, with `exit_after_training`, until a training ends.
pub async fn run(config: ParticipantConfig, shutdown: CancellationToken) -> Result<()> {
    let metrics = std::sync::Arc::new(metrics::Metrics::new());
    // Stopped with the daemon; a port in use stops it before it dials out.
    let served = CancellationToken::new();
    let _stop_serving = served.clone().drop_guard();
    if let Some(addr) = config.metrics_listen {
        let m = metrics.clone();
        sangsaeng_common::exposition::serve(
            addr,
            std::sync::Arc::new(move || m.render()),
            served.clone(),
        )
        .await?;
    }
    session::Session::with_metrics(config, metrics)?
        .run(shutdown)
        .await
}
