//! Prometheus metrics of one participant daemon, on `/metrics` of its
//! optional `metrics_listen` address (loopback by default: a supplier's own
//! monitoring). Rendered and served as the coordinator's are
//! (`sangsaeng_common::exposition`), with the `sangsaeng_participant_` prefix.
//!
//! What an SME's IT person asks of a daemon that runs for months: is it
//! connected, does it train (rounds, how long, the last loss, whether a local
//! training runs now), how many bytes went each way, how often it reconnected,
//! and when it last failed, by kind (a fixed set of labels, never a message).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::error::ParticipantError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    pub connected: Gauge,
    pub reconnects: Counter,
    pub rounds_trained: Counter,
    pub training_in_progress: Gauge,
    pub local_training: Histogram,
    pub last_train_loss: Gauge<f64, AtomicU64>,
    pub evaluations: Counter,
    pub downloaded_bytes: Counter,
    pub uploaded_bytes: Counter,
    pub errors: Family<KindLabel, Counter>,
    pub last_error_time: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("sangsaeng_participant");
        let m = Metrics {
            registry: Registry::default(),
            connected: Gauge::default(),
            reconnects: Counter::default(),
            rounds_trained: Counter::default(),
            training_in_progress: Gauge::default(),
            // 10 ms to ~3 h of local training.
            local_training: Histogram::new(exponential_buckets(0.01, 4.0, 12)),
            last_train_loss: Gauge::default(),
            evaluations: Counter::default(),
            downloaded_bytes: Counter::default(),
            uploaded_bytes: Counter::default(),
            errors: Family::default(),
            last_error_time: Gauge::default(),
        };
        r.register(
            "connected",
            "1 while subscribed to the coordinator",
            m.connected.clone(),
        );
        r.register(
            "reconnects",
            "Connections to the coordinator after the first",
            m.reconnects.clone(),
        );
        r.register(
            "rounds_trained",
            "Rounds this site trained for and uploaded",
            m.rounds_trained.clone(),
        );
        r.register(
            "training_in_progress",
            "1 while a local training runs",
            m.training_in_progress.clone(),
        );
        r.register_with_unit(
            "local_training_duration",
            "Wall time of each round's local training",
            Unit::Seconds,
            m.local_training.clone(),
        );
        r.register(
            "last_train_loss",
            "Mean training loss of the last local epoch of the last round",
            m.last_train_loss.clone(),
        );
        r.register(
            "evaluations",
            "Global models evaluated on this site's validation split",
            m.evaluations.clone(),
        );
        r.register_with_unit(
            "downloaded",
            "Model bytes downloaded from the coordinator",
            Unit::Bytes,
            m.downloaded_bytes.clone(),
        );
        r.register_with_unit(
            "uploaded",
            "Update bytes sent to the coordinator (chunk payloads)",
            Unit::Bytes,
            m.uploaded_bytes.clone(),
        );
        r.register(
            "errors",
            "Errors by kind: connection, refused (the coordinator said no), data, config, other",
            m.errors.clone(),
        );
        r.register(
            "last_error_timestamp_seconds",
            "Unix time of the last error (0: none yet)",
            m.last_error_time.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// The page, in Prometheus's text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        sangsaeng_common::exposition::text_format(&out)
    }

    /// Counts `e` under its kind and stamps the time.
    pub fn error(&self, e: &ParticipantError) {
        let kind = match e {
            ParticipantError::Rpc { .. } | ParticipantError::Transfer(_) if e.is_transient() => {
                "connection"
            }
            ParticipantError::Rpc { .. } | ParticipantError::Refused(_) => "refused",
            ParticipantError::Config(_) => "config",
            ParticipantError::Common(sangsaeng_common::Error::Data { .. })
            | ParticipantError::Common(sangsaeng_common::Error::Schema(_)) => "data",
            _ => "other",
        };
        self.errors.get_or_create(&KindLabel { kind }).inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_error_time.set(now as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_every_series_in_base_units_with_the_prefix() {
        let m = Metrics::new();
        m.uploaded_bytes.inc_by(40);
        m.error(&ParticipantError::Config("x".into()));
        let page = m.render();
        for line in [
            "# TYPE sangsaeng_participant_uploaded_bytes_total counter",
            "sangsaeng_participant_uploaded_bytes_total 40",
            "sangsaeng_participant_errors_total{kind=\"config\"} 1",
            "# TYPE sangsaeng_participant_local_training_duration_seconds histogram",
            "sangsaeng_participant_connected 0",
        ] {
            assert!(page.lines().any(|l| l == line), "{line} in:\n{page}");
        }
    }
}
