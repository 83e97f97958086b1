//! Prometheus metrics of the coordinator, served on `/metrics` of the optional
//! `metrics_listen` address (plain HTTP, loopback by default: the numbers name
//! no organisation, but the endpoint is for the anchor company's own monitoring).
//!
//! The official `prometheus-client` crate renders the text exposition format.
//! Names follow Prometheus conventions: a `sangsaeng_` prefix, base units
//! (`_seconds`, `_bytes`), `_total` on counters. Labels take a fixed, small set
//! of values (phase names, participant states, refusal reasons), never an
//! organisation id or a training id, so their number stays bounded however many
//! firms join. Counters are bumped where the event happens; gauges that describe
//! the current state are read from [`Shared`] at each scrape.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::error::{CoordinatorError, Result};
use crate::state::{Phase, Shared};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Every metric the coordinator exports.
pub struct Metrics {
    registry: Registry,
    phase: Family<PhaseLabel, Gauge>,
    round: Gauge,
    participants: Family<StateLabel, Gauge>,
    upload_slots_in_use: Gauge,
    pub rounds_completed: Counter,
    pub updates_accepted: Counter,
    pub updates_refused: Family<ReasonLabel, Counter>,
    pub received_bytes: Counter,
    pub sent_bytes: Counter,
    pub round_duration: Histogram,
    pub fold_duration: Histogram,
    pub store_commit_duration: Histogram,
    pub last_train_loss: Gauge<f64, AtomicU64>,
    pub last_macro_f1: Gauge<f64, AtomicU64>,
    /// Regression trainings' counterpart of `last_macro_f1`.
    pub last_r2: Gauge<f64, AtomicU64>,
    audit_entries: Gauge,
    secure: SecureMetrics,
    /// ε the released model has spent so far (0 without differential privacy).
    privacy_epsilon: Gauge<f64, AtomicU64>,
}

/// What secure-aggregation rounds leave: how many, and how many sites each
/// lost at which step (a rising dropped count is the first sign of sites that
/// cannot finish the protocol in time).
#[derive(Default)]
struct SecureMetrics {
    rounds: Counter,
    survivors: Gauge,
    dropped: Counter,
    excluded: Counter,
    suspect_shares: Counter,
}

const PHASES: &[Phase] = &[
    Phase::WaitingForParticipants,
    Phase::CollectingStatistics,
    Phase::Training,
    Phase::Evaluating,
    Phase::Completed,
    Phase::Failed,
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sangsaeng");
        let m = Metrics {
            phase: Family::default(),
            round: Gauge::default(),
            participants: Family::default(),
            upload_slots_in_use: Gauge::default(),
            rounds_completed: Counter::default(),
            updates_accepted: Counter::default(),
            updates_refused: Family::default(),
            received_bytes: Counter::default(),
            sent_bytes: Counter::default(),
            // 10 ms to ~3 h: a round of a small model to one of a 1e9-parameter one.
            round_duration: Histogram::new(exponential_buckets(0.01, 4.0, 12)),
            fold_duration: Histogram::new(exponential_buckets(0.001, 4.0, 12)),
            store_commit_duration: Histogram::new(exponential_buckets(0.001, 4.0, 10)),
            last_train_loss: Gauge::default(),
            last_macro_f1: Gauge::default(),
            last_r2: Gauge::default(),
            audit_entries: Gauge::default(),
            secure: SecureMetrics::default(),
            privacy_epsilon: Gauge::default(),
            registry: Registry::default(),
        };
        register(&mut registry, &m);
        Metrics { registry, ..m }
    }

    /// The exposition text, with the state gauges read from `shared` now.
    pub fn render(&self, shared: &Shared) -> String {
        self.refresh(shared);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        text_format(&out)
    }

    fn refresh(&self, shared: &Shared) {
        let (phase, round, selected, answered) = match shared.training().as_ref() {
            Some(t) => (
                Some(t.phase),
                t.round,
                t.selected.len(),
                t.selected.iter().filter(|o| t.has_answered(o)).count(),
            ),
            None => (None, 0, 0, 0),
        };
        for p in PHASES {
            let on = i64::from(phase == Some(*p));
            self.phase
                .get_or_create(&PhaseLabel { phase: p.name() })
                .set(on);
        }
        self.round.set(i64::from(round));
        let known = shared.roster.iter().count();
        let connected = shared.connected().len();
        for (state, n) in [
            ("known", known),
            ("connected", connected),
            ("selected", selected),
            ("answered", answered),
        ] {
            self.participants
                .get_or_create(&StateLabel { state })
                .set(n as i64);
        }
        let limit = shared.config.limits.max_concurrent_uploads;
        let free = shared.upload_permits.available_permits();
        self.upload_slots_in_use
            .set(limit.saturating_sub(free) as i64);
        self.audit_entries.set(shared.audit.entries() as i64);
    }

    /// What a committed round leaves in the metrics.
    pub fn round_recorded(&self, r: &crate::round::RoundRecord) {
        self.rounds_completed.inc();
        self.round_duration.observe(r.timings.round_secs);
        self.fold_duration.observe(r.timings.fold_secs);
        self.last_train_loss.set(r.train_loss);
        if let Some(f1) = r.eval_macro_f1 {
            self.last_macro_f1.set(f1);
        }
        if let Some(r2) = r.eval_r2 {
            self.last_r2.set(r2);
        }
        if let Some(s) = &r.secure {
            self.secure_recorded(s);
        }
        if let Some(p) = &r.privacy {
            self.privacy_epsilon.set(p.model_epsilon);
        }
    }

    fn secure_recorded(&self, s: &crate::secure::SecureRecord) {
        let m = &self.secure;
        m.rounds.inc();
        m.survivors.set(s.survivors.len() as i64);
        m.dropped.inc_by(s.dropped.len() as u64);
        m.excluded.inc_by(s.excluded.len() as u64);
        m.suspect_shares.inc_by(s.suspect_shares.len() as u64);
    }

    /// Counts a refused update under a bounded reason, the gRPC status it got.
    pub fn refused(&self, e: &CoordinatorError) {
        let reason = match e.code() {
            tonic::Code::InvalidArgument => "invalid_argument",
            tonic::Code::FailedPrecondition => "failed_precondition",
            tonic::Code::ResourceExhausted => "resource_exhausted",
            tonic::Code::Aborted => "aborted",
            tonic::Code::AlreadyExists => "already_exists",
            tonic::Code::NotFound => "not_found",
            _ => "other",
        };
        self.updates_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

use sangsaeng_common::exposition::text_format;

fn register(r: &mut Registry, m: &Metrics) {
    r.register(
        "training_phase",
        "1 for the phase the current training is in",
        m.phase.clone(),
    );
    r.register("round", "Round of the current training", m.round.clone());
    r.register(
        "participants",
        "Organisations by state: known (roster), connected, selected and answered (this phase)",
        m.participants.clone(),
    );
    r.register(
        "upload_slots_in_use",
        "Upload slots held by uploads in flight or reserved",
        m.upload_slots_in_use.clone(),
    );
    r.register(
        "rounds_completed",
        "Rounds committed and evaluated",
        m.rounds_completed.clone(),
    );
    r.register(
        "updates_accepted",
        "Updates accepted into a round",
        m.updates_accepted.clone(),
    );
    r.register(
        "updates_refused",
        "Updates refused, by the gRPC status they got",
        m.updates_refused.clone(),
    );
    r.register_with_unit(
        "received",
        "Update chunk bytes received",
        prometheus_client::registry::Unit::Bytes,
        m.received_bytes.clone(),
    );
    r.register_with_unit(
        "sent",
        "Model chunk bytes sent to downloaders",
        prometheus_client::registry::Unit::Bytes,
        m.sent_bytes.clone(),
    );
    r.register_with_unit(
        "round_duration",
        "Wall time of a round, from opening to its recorded evaluation",
        prometheus_client::registry::Unit::Seconds,
        m.round_duration.clone(),
    );
    r.register_with_unit(
        "fold_duration",
        "CPU time spent folding a round's update chunks into the accumulator",
        prometheus_client::registry::Unit::Seconds,
        m.fold_duration.clone(),
    );
    r.register_with_unit(
        "store_commit_duration",
        "Writing, fsyncing and committing a round's model",
        prometheus_client::registry::Unit::Seconds,
        m.store_commit_duration.clone(),
    );
    r.register(
        "last_round_train_loss",
        "Example-weighted training loss of the last completed round",
        m.last_train_loss.clone(),
    );
    r.register(
        "last_round_macro_f1",
        "Validation macro-F1 of the last completed round's model, weighted by validation rows",
        m.last_macro_f1.clone(),
    );
    r.register(
        "last_round_r2",
        "Validation R² of the last completed round's model (regression trainings), weighted by validation rows",
        m.last_r2.clone(),
    );
    r.register(
        "audit_entries",
        "Entries in the signed audit log",
        m.audit_entries.clone(),
    );
    r.register(
        "privacy_epsilon",
        "Differential-privacy epsilon the current training's model has spent so far",
        m.privacy_epsilon.clone(),
    );
    register_secure(r, &m.secure);
}

fn register_secure(r: &mut Registry, m: &SecureMetrics) {
    r.register(
        "secure_rounds",
        "Rounds committed with secure aggregation",
        m.rounds.clone(),
    );
    r.register(
        "secure_last_round_survivors",
        "Sites whose masked update is in the last secure round's sum",
        m.survivors.clone(),
    );
    r.register(
        "secure_dropped",
        "Sites that shared keys but whose update is not in the sum (their masks removed from neighbours' shares)",
        m.dropped.clone(),
    );
    r.register(
        "secure_excluded",
        "Sites left out of a secure attempt before masking (no advert, missing or bad shares)",
        m.excluded.clone(),
    );
    r.register(
        "secure_suspect_shares",
        "Shamir shares that did not fit their secret and were left out",
        m.suspect_shares.clone(),
    );
}

/// Serves `/metrics` on `addr` until `shutdown`; a port in use is an error
/// naming it (the coordinator does not start half-monitored).
pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Result<SocketAddr> {
    let render = Arc::new(move || shared.metrics.render(&shared));
    sangsaeng_common::exposition::serve(addr, render, shutdown)
        .await
        .map_err(|e| CoordinatorError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.received_bytes.inc_by(10);
        m.updates_refused
            .get_or_create(&ReasonLabel {
                reason: "invalid_argument",
            })
            .inc();
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &m.registry).unwrap();
        let out = text_format(&om);
        for name in [
            "sangsaeng_received_bytes_total 10",
            "# TYPE sangsaeng_received_bytes_total counter",
            "# HELP sangsaeng_updates_refused_total Updates refused",
            "sangsaeng_updates_refused_total{reason=\"invalid_argument\"} 1",
            "# TYPE sangsaeng_round_duration_seconds histogram",
        ] {
            assert!(out.contains(name), "{name} in:\n{out}");
        }
        assert!(!out.contains("# UNIT") && !out.contains("# EOF"), "{out}");
    }

    #[test]
    fn a_secure_round_counts_its_survivors_and_dropouts() {
        let m = Metrics::new();
        let mut excluded = std::collections::BTreeMap::new();
        excluded.insert("site-d".to_string(), "no advert".to_string());
        let record = crate::secure::SecureRecord {
            secure_aggregation: true,
            attempt: 1,
            participants: 4,
            degree: 3,
            threshold: 2,
            survivors: vec!["site-a".into(), "site-b".into()],
            dropped: vec!["site-c".into()],
            excluded,
            suspect_shares: vec![],
            recorded_after_restart: false,
        };
        m.secure_recorded(&record);
        m.secure_recorded(&record);
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &m.registry).unwrap();
        let out = text_format(&om);
        for line in [
            "sangsaeng_secure_rounds_total 2",
            "sangsaeng_secure_last_round_survivors 2",
            "sangsaeng_secure_dropped_total 2",
            "sangsaeng_secure_excluded_total 2",
            "sangsaeng_secure_suspect_shares_total 0",
            "sangsaeng_privacy_epsilon 0.0",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in:\n{out}");
        }
    }
}
