//! The coordinator's shared in-memory state: who is connected, and the training
//! in progress with the round's collections (statistics, accepted updates,
//! evaluations).
//!
//! Locks are std mutexes held only for short, non-async sections; anything slow
//! (disk, network) happens outside them. Every change a waiting round driver may
//! care about is followed by `progress.notify_waiters()`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use sangsaeng_common::aggregation::fedavg::Accumulator;
use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::roster::Roster;
use sangsaeng_common::learning::data::FeatureStats;
use sangsaeng_proto::v1 as pb;

use crate::config::CoordinatorConfig;
use crate::durable::audit::AuditLog;
use crate::durable::store::{AcceptedUpdate, Store};
use crate::transfer::PublishedModel;

/// Tasks waiting to be read by one participant. Small: a participant has at most
/// one outstanding task, the rest is slack for a finished-notice.
pub const TASK_QUEUE: usize = 8;

pub type TaskSender = mpsc::Sender<Result<pb::Task, tonic::Status>>;

/// One organisation's connection state.
#[derive(Debug, Default)]
pub struct Presence {
    /// Incremented on every Subscribe, so a stale stream's cleanup does not
    /// disconnect a newer one.
    pub session: u64,
    pub tasks: Option<TaskSender>,
    pub last_seen: Option<time::OffsetDateTime>,
    pub last_error: Option<String>,
}

impl Presence {
    pub fn connected(&self) -> bool {
        self.tasks.as_ref().is_some_and(|t| !t.is_closed())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    WaitingForParticipants,
    CollectingStatistics,
    Training,
    Evaluating,
    Completed,
    Failed,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::WaitingForParticipants => "waiting-for-participants",
            Phase::CollectingStatistics => "collecting-statistics",
            Phase::Training => "training",
            Phase::Evaluating => "evaluating",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalRecord {
    pub org_id: String,
    pub num_examples: u64,
    pub loss: f64,
    pub accuracy: f64,
    pub macro_f1: f64,
    /// Regression trainings only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regression: Option<sangsaeng_common::learning::metrics::RegressionMetrics>,
}

impl EvalRecord {
    /// The figure sites are compared and floors are set by: macro-F1, or R².
    pub fn headline(&self) -> f64 {
        self.regression.map_or(self.macro_f1, |r| r.r2)
    }

    /// The name of [`EvalRecord::headline`] as metrics.jsonl writes it.
    pub fn headline_name(&self) -> &'static str {
        if self.regression.is_some() {
            "r2"
        } else {
            "macro_f1"
        }
    }
}

/// An upload that broke off, kept so its sender can resume from the next chunk.
/// Its chunks so far stay folded in the accumulator (see [`Folding`]).
#[derive(Debug)]
pub struct PartialUpload {
    pub round: u32,
    pub base_model_sha256: String,
    pub num_examples: u64,
    pub delta_sha256: String,
    pub receiver: crate::transfer::DeltaReceiver,
    pub spill: crate::transfer::Spill,
    /// The [`Folding`] entry of this upload.
    pub upload_id: u64,
}

/// An upload of the current round whose chunks are (partly) folded into the
/// accumulator but which is not accepted yet: what it takes to undo it exactly.
#[derive(Debug, Clone)]
pub struct Folding {
    pub upload_id: u64,
    pub spill: PathBuf,
    pub encoding: sangsaeng_common::transfer::encoding::UpdateEncoding,
    /// A masked upload (secure aggregation): undone word by word.
    pub masked: bool,
    pub weight: u64,
    /// Chunks folded so far (the spill file may hold one more, not folded).
    pub folded: u32,
}

/// The training in progress (or the last one, once finished).
#[derive(Debug)]
pub struct Training {
    pub id: String,
    pub plan: TrainingPlan,
    pub output_dir: PathBuf,
    pub phase: Phase,
    pub round: u32,
    /// Global models that may still be downloaded, by round (0 = initial).
    pub models: BTreeMap<u32, Arc<PublishedModel>>,
    /// SCAFFOLD: the server control variate the open round's sites download
    /// (`TrainTask.control`); `None` for other strategies.
    pub control: Option<Arc<PublishedModel>>,
    /// Participants the current phase sent a task to and waits for.
    pub selected: BTreeSet<String>,
    /// Participants that reported they cannot take part, with their reason; excluded for the rest of the training.
    pub declined: BTreeMap<String, String>,
    pub stats: BTreeMap<String, FeatureStats>,
    /// Each site's training rows as its statistics declared them (stored, so
    /// a restart keeps them): an update's example count must equal them.
    /// Empty before the statistics phase ends, and for a training resumed
    /// from a store that predates them.
    pub declared_rows: BTreeMap<String, u64>,
    /// Sites that joined after the statistics phase: the count each claimed
    /// with its first update (stored), which its later updates must repeat.
    pub claimed_rows: BTreeMap<String, u64>,
    /// `[aggregation] max_weight_share`'s cap on any update's weight, from
    /// the declared rows (`None`: uncapped).
    pub weight_cap: Option<u64>,
    pub accumulator: Option<Accumulator>,
    /// The last round's accumulator, zeroed and reused by the next round: its
    /// pages are already mapped, so folding into it takes no page faults.
    pub spare_accumulator: Option<Accumulator>,
    pub accepted: BTreeMap<String, AcceptedUpdate>,
    /// The spill file of each accepted update, kept for the round's robust rule
    /// (only when the plan's rule reads updates back).
    pub spilled: BTreeMap<String, crate::transfer::spill::SpilledUpdate>,
    /// Participants whose upload for this round is being received right now, each
    /// with its upload's mark id: an upload cut off by a round's re-run may end
    /// after the same participant's next upload began, and must not clear its mark.
    pub uploading: BTreeMap<String, u64>,
    /// Participants whose update for this round was refused; they are not waited for.
    pub rejected: BTreeMap<String, String>,
    pub evaluations: BTreeMap<String, EvalRecord>,
    /// Broken-off uploads of this round, by organisation (bounded by `max_concurrent_uploads`).
    pub partial: BTreeMap<String, PartialUpload>,
    /// Uploads folded in part, by organisation. Whoever removes an entry (the
    /// upload refusing itself, or the driver closing the round) undoes it.
    pub folding: BTreeMap<String, Folding>,
    /// Undos in progress outside the lock; the round is applied only at zero.
    pub undoing: usize,
    /// Source of [`Folding::upload_id`].
    pub next_upload_id: u64,
    /// Set when an undo could not read its spill back (a failing disk): the
    /// round's aggregate is then unknown and the training fails when it closes.
    pub undo_failed: Option<String>,
    /// CPU time spent folding chunks this round (the benchmark's aggregation
    /// throughput): thread CPU time, so a fold preempted on a busy machine counts
    /// only the time it ran.
    pub fold_time: std::time::Duration,
    /// Participants that said they leave (Leave RPC) during this phase: not waited for.
    /// One that merely disconnected is waited for until the deadline, since it may
    /// come back (it gets the phase's task again when it resubscribes).
    pub left: BTreeSet<String>,
    /// The task each selected participant was sent this phase, resent if it reconnects.
    pub current_task: Option<pb::Task>,
    /// The attempt in progress of a secure-aggregation round.
    pub secure: Option<crate::secure::SecureAttempt>,
    pub error: Option<String>,
}

impl Training {
    /// Binds each site's update weight to its declared training rows, and
    /// derives `max_weight_share`'s cap from them.
    pub fn declare_rows(&mut self, rows: BTreeMap<String, u64>) {
        let counts: Vec<u64> = rows.values().copied().collect();
        self.weight_cap = self
            .plan
            .aggregation
            .as_ref()
            .and_then(|a| a.max_weight_share)
            .and_then(|share| {
                sangsaeng_common::aggregation::weight_cap::weight_cap(&counts, share)
            });
        self.declared_rows = rows;
    }

    /// Values an update of a model of `model_params` carries: the delta, and
    /// under SCAFFOLD the site's control-variate change after it.
    pub fn update_len(&self, model_params: usize) -> usize {
        if self.plan.scaffold() {
            2 * model_params
        } else {
            model_params
        }
    }

    /// The weight an update of `num_examples` is folded with: its example
    /// count (1 under client-level DP), capped by `max_weight_share`.
    pub fn fold_weight(&self, num_examples: u64) -> u64 {
        let w = sangsaeng_common::privacy::dp::client_noise::fold_weight(&self.plan, num_examples);
        sangsaeng_common::aggregation::weight_cap::capped(w, self.weight_cap)
    }

    pub fn new(id: String, plan: TrainingPlan, output_dir: PathBuf) -> Self {
        Training {
            id,
            plan,
            output_dir,
            phase: Phase::WaitingForParticipants,
            round: 0,
            models: BTreeMap::new(),
            control: None,
            selected: BTreeSet::new(),
            declined: BTreeMap::new(),
            stats: BTreeMap::new(),
            declared_rows: BTreeMap::new(),
            claimed_rows: BTreeMap::new(),
            weight_cap: None,
            accumulator: None,
            spare_accumulator: None,
            accepted: BTreeMap::new(),
            spilled: BTreeMap::new(),
            uploading: BTreeMap::new(),
            rejected: BTreeMap::new(),
            evaluations: BTreeMap::new(),
            left: BTreeSet::new(),
            partial: BTreeMap::new(),
            folding: BTreeMap::new(),
            undoing: 0,
            next_upload_id: 0,
            undo_failed: None,
            fold_time: std::time::Duration::ZERO,
            current_task: None,
            secure: None,
            error: None,
        }
    }

    /// Whether `org` has answered the current phase (or can no longer answer).
    pub fn has_answered(&self, org: &str) -> bool {
        if self.declined.contains_key(org) || self.left.contains(org) {
            return true;
        }
        match self.phase {
            Phase::CollectingStatistics => self.stats.contains_key(org),
            Phase::Training => self.accepted.contains_key(org) || self.rejected.contains_key(org),
            Phase::Evaluating => self.evaluations.contains_key(org),
            _ => true,
        }
    }
}

/// Everything the RPC handlers and the round driver share.
pub struct Shared {
    pub config: CoordinatorConfig,
    pub roster: Roster,
    participants: Mutex<BTreeMap<String, Presence>>,
    training: Mutex<Option<Training>>,
    /// Woken on every change a round driver may be waiting for.
    pub progress: Notify,
    /// Owned permits: an upload slot may be reserved (`UploadProgress` with
    /// `reserve_slot`) before the upload that uses it starts.
    /// Prometheus metrics ([`crate::metrics`]).
    pub metrics: crate::metrics::Metrics,
    pub upload_permits: Arc<Semaphore>,
    /// Upload slots held for an organisation's next upload, each with the id its
    /// expiry checks so that it never releases a newer reservation.
    reserved_uploads: Mutex<BTreeMap<String, (u64, OwnedSemaphorePermit)>>,
    next_reservation: AtomicU64,
    /// Owned permits: a download's permit lives as long as its response stream.
    pub download_permits: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    /// Durable record of trainings, rounds and accepted contributions.
    pub store: Store,
    /// Signed, hash-chained record of joins, rounds and releases.
    pub audit: AuditLog,
}

impl Shared {
    pub fn new(
        config: CoordinatorConfig,
        store: Store,
        audit: AuditLog,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let permits = config.limits.max_concurrent_uploads;
        let downloads = config.limits.max_concurrent_downloads;
        Arc::new(Shared {
            roster: config.roster.clone(),
            config,
            participants: Mutex::new(BTreeMap::new()),
            training: Mutex::new(None),
            progress: Notify::new(),
            metrics: crate::metrics::Metrics::new(),
            upload_permits: Arc::new(Semaphore::new(permits)),
            reserved_uploads: Mutex::new(BTreeMap::new()),
            next_reservation: AtomicU64::new(0),
            download_permits: Arc::new(Semaphore::new(downloads)),
            shutdown,
            store,
            audit,
        })
    }

    /// One of the `limits.max_concurrent_uploads` upload slots.
    pub async fn upload_slot(&self) -> crate::error::Result<OwnedSemaphorePermit> {
        let limit = self.config.limits.max_concurrent_uploads;
        self.transfer_slot(&self.upload_permits, limit, "uploads")
            .await
    }

    /// One of the `limit` slots of a kind of transfer, waiting at most the transfer
    /// idle time for it (the tokio semaphore serves waiters in order).
    pub async fn transfer_slot(
        &self,
        permits: &Arc<Semaphore>,
        limit: usize,
        kind: &str,
    ) -> crate::error::Result<OwnedSemaphorePermit> {
        use crate::error::CoordinatorError;
        tokio::time::timeout(
            self.config.limits.transfer_idle(),
            permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| {
            CoordinatorError::ResourceExhausted(format!(
                "{limit} {kind} are already in progress; retry shortly"
            ))
        })?
        .map_err(|_| CoordinatorError::Aborted("the coordinator is shutting down".into()))
    }

    pub fn participants(&self) -> MutexGuard<'_, BTreeMap<String, Presence>> {
        // A panic while holding the lock cannot leave this map half-updated in a
        // way later readers would misread, so a poisoned lock is still usable.
        self.participants.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn training(&self) -> MutexGuard<'_, Option<Training>> {
        self.training.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn notify(&self) {
        self.progress.notify_waiters();
    }

    fn reserved_uploads(&self) -> MutexGuard<'_, BTreeMap<String, (u64, OwnedSemaphorePermit)>> {
        self.reserved_uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `org` holds a reserved upload slot.
    pub fn has_reserved_upload(&self, org: &str) -> bool {
        self.reserved_uploads().contains_key(org)
    }

    /// Holds `permit` for `org`'s next upload for at most `ttl`: a participant that
    /// reserved a slot and then vanished must not keep it from the others.
    pub fn reserve_upload(
        self: &Arc<Self>,
        org: &str,
        permit: OwnedSemaphorePermit,
        ttl: std::time::Duration,
    ) {
        let id = self.next_reservation.fetch_add(1, Ordering::Relaxed);
        self.reserved_uploads()
            .insert(org.to_string(), (id, permit));
        let shared = Arc::downgrade(self);
        let org = org.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(ttl).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut held = shared.reserved_uploads();
            if held.get(&org).is_some_and(|(i, _)| *i == id) {
                held.remove(&org);
                tracing::info!(org, "an unused upload slot reservation expired");
            }
        });
    }

    /// The upload slot reserved for `org`, if it holds one.
    pub fn take_reserved_upload(&self, org: &str) -> Option<OwnedSemaphorePermit> {
        self.reserved_uploads().remove(org).map(|(_, p)| p)
    }

    /// Frees every reserved upload slot: when a round closes, a reservation made
    /// for it can only be used by an upload the coordinator would refuse, so it
    /// would otherwise sit out its time-to-live while others wait for slots.
    pub fn release_reserved_uploads(&self) -> usize {
        std::mem::take(&mut *self.reserved_uploads()).len()
    }

    /// Records the last error of an organisation, shown by `admin status`.
    pub fn record_error(&self, org: &str, message: impl Into<String>) {
        let message = message.into();
        self.participants()
            .entry(org.to_string())
            .or_default()
            .last_error = Some(message);
    }

    pub fn touch(&self, org: &str) {
        self.participants()
            .entry(org.to_string())
            .or_default()
            .last_seen = Some(time::OffsetDateTime::now_utc());
    }

    /// Organisations with an open subscription, excluding those that declined the given training.
    pub fn connected(&self) -> BTreeSet<String> {
        self.participants()
            .iter()
            .filter(|(_, p)| p.connected())
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn is_connected(&self, org: &str) -> bool {
        self.participants()
            .get(org)
            .is_some_and(Presence::connected)
    }

    /// Queues a task for a participant without waiting; false if it cannot take it.
    pub fn send_task(&self, org: &str, task: pb::Task) -> bool {
        let sender = self.participants().get(org).and_then(|p| p.tasks.clone());
        match sender {
            Some(tx) => match tx.try_send(Ok(task)) {
                Ok(()) => true,
                Err(e) => {
                    let why = match e {
                        mpsc::error::TrySendError::Full(_) => {
                            "its task queue is full (it is not reading tasks)"
                        }
                        mpsc::error::TrySendError::Closed(_) => "its subscription closed",
                    };
                    tracing::warn!(org, "could not send a task: {why}");
                    self.record_error(org, format!("could not receive a task: {why}"));
                    false
                }
            },
            None => false,
        }
    }
}

/// The training a request names, if it is the current one.
pub fn current_training<'a>(
    guard: &'a mut Option<Training>,
    training_id: &str,
) -> crate::error::Result<&'a mut Training> {
    match guard.as_mut() {
        Some(t) if t.id == training_id => Ok(t),
        Some(t) => Err(crate::error::CoordinatorError::NotFound(format!(
            "unknown training '{training_id}' (the current training is '{}')",
            t.id
        ))),
        None => Err(crate::error::CoordinatorError::NotFound(format!(
            "unknown training '{training_id}': no training is running"
        ))),
    }
}
