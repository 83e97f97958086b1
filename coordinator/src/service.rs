//! The participant-facing `Federation` service.
//!
//! Each handler authorises the caller first, then checks the request against the
//! training state under a short lock. A refused request changes nothing except
//! the caller's `last_error`, so one participant's mistake never disturbs the
//! round for the others.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use sangsaeng_common::data::FeatureStats;
use sangsaeng_common::encoding::UpdateEncoding;
use sangsaeng_common::roster::Role;
use sangsaeng_proto::v1 as pb;
use sangsaeng_proto::v1::federation_server::Federation;

use crate::auth::authorize;
use crate::error::{CoordinatorError, Result};
use crate::state::{AcceptedUpdate, EvalRecord, Folding, Phase, Shared, TASK_QUEUE};
use crate::transfer::{CheckedChunk, DeltaReceiver, Spill, read_spill};

#[derive(Clone)]
pub struct FederationService {
    shared: Arc<Shared>,
}

impl FederationService {
    pub fn new(shared: Arc<Shared>) -> Self {
        FederationService { shared }
    }

    fn caller<T>(&self, req: &Request<T>, rpc: &str) -> Result<String> {
        let org = authorize(&self.shared, req, Role::Participant, rpc)?;
        self.shared.touch(&org);
        Ok(org)
    }

    /// Records a refusal against the caller (for `admin status`) and logs it.
    fn refuse(&self, org: &str, rpc: &str, e: CoordinatorError) -> Status {
        tracing::warn!(org, rpc, "refused: {e}");
        self.shared.record_error(org, format!("{rpc}: {e}"));
        e.into()
    }
}

/// The Subscribe stream; dropping it (client gone) marks the participant offline.
pub struct Subscription {
    inner: ReceiverStream<std::result::Result<pb::Task, Status>>,
    shared: Arc<Shared>,
    org: String,
    session: u64,
}

impl Stream for Subscription {
    type Item = std::result::Result<pb::Task, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut parts = self.shared.participants();
        if let Some(p) = parts.get_mut(&self.org)
            && p.session == self.session
        {
            p.tasks = None;
            tracing::info!(org = %self.org, "participant disconnected");
        }
        drop(parts);
        self.shared.notify();
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = std::result::Result<pb::ModelChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for FederationService {
    type SubscribeStream = Subscription;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> std::result::Result<Response<Self::SubscribeStream>, Status> {
        let org = self.caller(&req, "Subscribe")?;
        let (tx, rx) = mpsc::channel(TASK_QUEUE);
        let session = {
            let mut parts = self.shared.participants();
            let p = parts.entry(org.clone()).or_default();
            p.session += 1;
            p.tasks = Some(tx.clone());
            p.last_error = None;
            p.session
        };
        tracing::info!(
            org,
            version = %req.get_ref().software_version,
            "participant connected"
        );
        self.shared.audit.record(
            "joined",
            serde_json::json!({"org": org, "software_version": req.get_ref().software_version}),
        );
        // A participant that reconnects in the middle of a phase it was selected
        // for gets that phase's task again instead of being waited for in vain.
        let resend = {
            let mut t = self.shared.training();
            // Coming back after a Leave: it is waited for again in the current phase.
            if let Some(t) = t.as_mut() {
                t.left.remove(&org);
            }
            t.as_ref().and_then(|t| {
                (t.selected.contains(&org) && !t.has_answered(&org) && !t.phase.is_finished())
                    .then(|| t.current_task.clone())
                    .flatten()
            })
        };
        if let Some(task) = resend {
            let _ = tx.try_send(Ok(task));
        }
        self.shared.notify();
        Ok(Response::new(Subscription {
            inner: ReceiverStream::new(rx),
            shared: self.shared.clone(),
            org,
            session,
        }))
    }

    async fn submit_stats(
        &self,
        req: Request<pb::StatsReport>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        let org = self.caller(&req, "SubmitStats")?;
        let r = req.into_inner();
        let result = (|| {
            let mut guard = self.shared.training();
            let t = current(&mut guard, &r.training_id)?;
            if t.phase != Phase::CollectingStatistics {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "training {} is not collecting statistics (phase: {})",
                    t.id,
                    t.phase.name()
                )));
            }
            if !t.selected.contains(&org) {
                return Err(CoordinatorError::FailedPrecondition(
                    "statistics were not requested from this organisation".into(),
                ));
            }
            if t.stats.contains_key(&org) {
                return Err(CoordinatorError::AlreadyExists(
                    "statistics for this training were already received".into(),
                ));
            }
            let stats = FeatureStats {
                count: r.count,
                sum: r.sum,
                sum_sq: r.sum_sq,
            };
            stats
                .validate(t.plan.n_features())
                .map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?;
            check_stats_bounds(&stats, self.shared.config.limits.max_examples_per_update)?;
            t.stats.insert(org.clone(), stats);
            Ok(())
        })();
        result.map_err(|e| self.refuse(&org, "SubmitStats", e))?;
        tracing::info!(org, rows = r.count, "feature statistics received");
        self.shared.notify();
        Ok(Response::new(pb::Ack::default()))
    }

    type DownloadModelStream = ChunkStream;

    async fn download_model(
        &self,
        req: Request<pb::DownloadRequest>,
    ) -> std::result::Result<Response<Self::DownloadModelStream>, Status> {
        let org = self.caller(&req, "DownloadModel")?;
        let r = req.into_inner();
        let model = (|| {
            let mut guard = self.shared.training();
            let t = current(&mut guard, &r.training_id)?;
            let m = t.models.get(&r.model_round).cloned().ok_or_else(|| {
                CoordinatorError::NotFound(format!(
                    "the global model of round {} is not available (current round: {})",
                    r.model_round, t.round
                ))
            })?;
            if r.start_chunk > m.total_chunks() {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "start_chunk {} is beyond the model's {} chunks",
                    r.start_chunk,
                    m.total_chunks()
                )));
            }
            Ok(m)
        })()
        .map_err(|e| self.refuse(&org, "DownloadModel", e))?;
        tracing::debug!(
            org,
            round = model.round,
            from = r.start_chunk,
            "model download"
        );
        let permit = self
            .transfer_slot(
                &self.shared.download_permits,
                self.shared.config.limits.max_concurrent_downloads,
                "downloads",
            )
            .await
            .map_err(|e| self.refuse(&org, "DownloadModel", e))?;
        let stream = tokio_stream::iter(r.start_chunk..model.total_chunks()).map(move |i| {
            let _held = &permit;
            Ok(model.chunk(i))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn upload_update(
        &self,
        req: Request<Streaming<pb::UpdateMessage>>,
    ) -> std::result::Result<Response<pb::UploadReceipt>, Status> {
        let org = self.caller(&req, "UploadUpdate")?;
        let stream = req.into_inner();
        // In a task of its own: hyper may drop the handler of a stream whose
        // connection closes (tests/federation.rs shows it for a clean close
        // mid-upload), and a dropped handler would leave the upload's reserved
        // weight and folded chunks in the accumulator, with no one to keep them
        // for resumption or undo them. The task reads on until the stream
        // reports the break, then keeps or undoes the upload as for any other
        // broken stream.
        let this = self.clone();
        let receiving = tokio::spawn(async move {
            this.receive_update(&org, stream)
                .await
                .map_err(|e| this.refuse(&org, "UploadUpdate", e))
        });
        match receiving.await {
            Ok(Ok(receipt)) => Ok(Response::new(receipt)),
            Ok(Err(status)) => Err(status),
            Err(e) => Err(Status::internal(format!("the upload's task failed: {e}"))),
        }
    }

    async fn upload_progress(
        &self,
        req: Request<pb::UploadProgressRequest>,
    ) -> std::result::Result<Response<pb::UploadProgressResponse>, Status> {
        let org = self.caller(&req, "UploadProgress")?;
        let r = req.into_inner();
        let next_chunk = {
            let mut guard = self.shared.training();
            let t = current(&mut guard, &r.training_id)
                .map_err(|e| self.refuse(&org, "UploadProgress", e))?;
            if r.reserve_slot {
                may_upload(t, &org, r.round).map_err(|e| self.refuse(&org, "UploadProgress", e))?;
            }
            t.partial
                .get(&org)
                .filter(|p| {
                    p.round == r.round
                        && !r.delta_sha256.is_empty()
                        && p.delta_sha256 == r.delta_sha256
                })
                .map(|p| p.receiver.next_index())
                .unwrap_or(0)
        };
        let mut slot_secs = 0;
        if r.reserve_slot {
            let limits = &self.shared.config.limits;
            // A reservation outlives this call by at most the idle time an upload
            // stream may stay silent: holding a slot unused costs the others as much.
            let ttl = limits.transfer_idle();
            if !self.shared.has_reserved_upload(&org) {
                let permit = self
                    .acquire_upload_slot()
                    .await
                    .map_err(|e| self.refuse(&org, "UploadProgress", e))?;
                self.shared.reserve_upload(&org, permit, ttl);
                tracing::debug!(org, round = r.round, "upload slot reserved");
            }
            slot_secs = ttl.as_secs() as u32;
        }
        Ok(Response::new(pb::UploadProgressResponse {
            next_chunk,
            slot_secs,
        }))
    }

    async fn submit_evaluation(
        &self,
        req: Request<pb::EvaluationReport>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        let org = self.caller(&req, "SubmitEvaluation")?;
        let r = req.into_inner();
        (|| {
            let mut guard = self.shared.training();
            let t = current(&mut guard, &r.training_id)?;
            if t.phase != Phase::Evaluating || r.model_round != t.round {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "no evaluation of round {} is being collected (phase: {}, round {})",
                    r.model_round,
                    t.phase.name(),
                    t.round
                )));
            }
            let finite = [r.loss, r.accuracy, r.macro_f1].iter().all(|v| v.is_finite());
            let in_range = (0.0..=1.0).contains(&r.accuracy) && (0.0..=1.0).contains(&r.macro_f1);
            // Bounded like an update's weight: the round's record sums these counts.
            let max_rows = self.shared.config.limits.max_examples_per_update;
            if !finite || !in_range || r.num_examples == 0 || r.num_examples > max_rows {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "evaluation metrics must be finite, accuracy and macro-F1 in [0, 1], over at least one and at most {max_rows} examples"
                )));
            }
            if t.evaluations.contains_key(&org) {
                return Err(CoordinatorError::AlreadyExists(format!(
                    "an evaluation of round {} was already received",
                    r.model_round
                )));
            }
            t.evaluations.insert(
                org.clone(),
                EvalRecord {
                    org_id: org.clone(),
                    num_examples: r.num_examples,
                    loss: r.loss,
                    accuracy: r.accuracy,
                    macro_f1: r.macro_f1,
                },
            );
            Ok(())
        })()
        .map_err(|e| self.refuse(&org, "SubmitEvaluation", e))?;
        self.shared.notify();
        Ok(Response::new(pb::Ack::default()))
    }

    async fn report_problem(
        &self,
        req: Request<pb::ProblemReport>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        let org = self.caller(&req, "ReportProblem")?;
        let r = req.into_inner();
        let message: String = r.message.chars().take(2000).collect();
        tracing::warn!(org, training = %r.training_id, round = r.round, "participant reports a problem: {message}");
        self.shared.record_error(&org, message.clone());
        {
            let mut guard = self.shared.training();
            if let Some(t) = guard.as_mut().filter(|t| t.id == r.training_id) {
                t.declined.insert(org.clone(), message);
            }
        }
        self.shared.notify();
        Ok(Response::new(pb::Ack {
            message: "recorded; this organisation is not waited for in this training".into(),
        }))
    }

    async fn leave(
        &self,
        req: Request<pb::LeaveRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        let org = self.caller(&req, "Leave")?;
        let reason = req.into_inner().reason;
        tracing::info!(org, reason, "participant leaves");
        self.shared
            .audit
            .record("left", serde_json::json!({"org": org, "reason": reason}));
        if let Some(p) = self.shared.participants().get_mut(&org) {
            p.tasks = None;
        }
        if let Some(t) = self.shared.training().as_mut() {
            t.left.insert(org.clone());
        }
        // A participant that leaves will not use the upload slot it reserved.
        drop(self.shared.take_reserved_upload(&org));
        self.shared.notify();
        Ok(Response::new(pb::Ack::default()))
    }
}

/// Bounds one site's statistics by what its rows can produce (at most
/// `max_rows` rows of 32-bit values), so that merging every site's statistics can
/// neither overflow the row count nor reach infinity: statistics that are valid on
/// their own must not be able to fail the whole training when merged.
fn check_stats_bounds(stats: &FeatureStats, max_rows: u64) -> Result<()> {
    if stats.count > max_rows {
        return Err(CoordinatorError::InvalidArgument(format!(
            "feature statistics cover {} rows, above the limit of {max_rows}",
            stats.count
        )));
    }
    let max_abs = f64::from(f32::MAX);
    let (max_sum, max_sum_sq) = (
        stats.count as f64 * max_abs,
        stats.count as f64 * max_abs * max_abs,
    );
    let beyond = |v: &[f64], bound: f64| v.iter().position(|x| x.abs() > bound);
    if let Some(j) = beyond(&stats.sum, max_sum).or(beyond(&stats.sum_sq, max_sum_sq)) {
        return Err(CoordinatorError::InvalidArgument(format!(
            "feature statistics: the sums of feature {} are beyond what {} rows of 32-bit values can add up to",
            j + 1,
            stats.count
        )));
    }
    Ok(())
}

/// The training a request names, if it is the current one.
fn current<'a>(
    guard: &'a mut Option<crate::state::Training>,
    training_id: &str,
) -> Result<&'a mut crate::state::Training> {
    match guard.as_mut() {
        Some(t) if t.id == training_id => Ok(t),
        Some(t) => Err(CoordinatorError::NotFound(format!(
            "unknown training '{training_id}' (the current training is '{}')",
            t.id
        ))),
        None => Err(CoordinatorError::NotFound(format!(
            "unknown training '{training_id}': no training is running"
        ))),
    }
}

/// The next part of an upload, bounded by the idle timeout.
async fn next_part(
    s: &mut Streaming<pb::UpdateMessage>,
    idle: std::time::Duration,
) -> Result<pb::update_message::Part> {
    match tokio::time::timeout(idle, s.message()).await {
        Err(_) => Err(CoordinatorError::Aborted(format!(
            "upload idle for more than {}s",
            idle.as_secs()
        ))),
        // tonic's decoder could not read the message: the caller sent bytes that are not
        // an UpdateMessage (INTERNAL, as gRPC reports parse errors) or one above the
        // message size limit. Neither gets better by retrying, unlike a broken stream.
        Ok(Err(status))
            if status.code() == tonic::Code::Internal && status.message().contains("decod") =>
        {
            Err(CoordinatorError::InvalidArgument(format!(
                "upload message could not be decoded: {}",
                status.message()
            )))
        }
        Ok(Err(status)) if status.code() == tonic::Code::OutOfRange => {
            Err(CoordinatorError::ResourceExhausted(format!(
                "upload message refused: {}",
                status.message()
            )))
        }
        Ok(Err(status)) => Err(CoordinatorError::Aborted(format!(
            "upload stream broke: {}",
            status.message()
        ))),
        Ok(Ok(None)) => Err(CoordinatorError::InvalidArgument(
            "upload stream ended before its trailer (truncated)".into(),
        )),
        Ok(Ok(Some(m))) => m.part.ok_or_else(|| {
            CoordinatorError::InvalidArgument("upload message with no part set".into())
        }),
    }
}

/// Whether `org` may upload (or reserve an upload slot) for `round` of training
/// `t`: the round is open, `org` was asked for an update and has neither
/// delivered one nor an upload in progress. Shared by the upload's header check
/// and the reservation, so a slot is never held for an upload that would be
/// refused and a caller never holds two.
fn may_upload(t: &crate::state::Training, org: &str, round: u32) -> Result<()> {
    if t.phase != Phase::Training {
        return Err(CoordinatorError::FailedPrecondition(format!(
            "training {} is not collecting updates (phase: {})",
            t.id,
            t.phase.name()
        )));
    }
    if round != t.round {
        let when = if round < t.round { "closed" } else { "future" };
        return Err(CoordinatorError::FailedPrecondition(format!(
            "update for {when} round {round}; round {} is in progress",
            t.round
        )));
    }
    if !t.selected.contains(org) {
        return Err(CoordinatorError::FailedPrecondition(format!(
            "this organisation was not selected for round {}",
            t.round
        )));
    }
    if t.accepted.contains_key(org) || t.uploading.contains_key(org) {
        return Err(CoordinatorError::AlreadyExists(format!(
            "an update for round {} was already received from this organisation, or is being received",
            t.round
        )));
    }
    Ok(())
}

/// Clears the caller's in-progress upload mark however the upload ends (unless
/// a newer upload of the same caller has replaced it).
struct UploadMark<'a> {
    shared: &'a Shared,
    org: String,
    id: u64,
}

impl Drop for UploadMark<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.shared.training().as_mut()
            && t.uploading.get(&self.org) == Some(&self.id)
        {
            t.uploading.remove(&self.org);
        }
    }
}

impl FederationService {
    /// One of the `limits.max_concurrent_uploads` upload slots.
    async fn acquire_upload_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.transfer_slot(
            &self.shared.upload_permits,
            self.shared.config.limits.max_concurrent_uploads,
            "uploads",
        )
        .await
    }

    /// One of the `limit` slots of a kind of transfer, waiting at most the transfer
    /// idle time for it (the tokio semaphore serves waiters in order).
    async fn transfer_slot(
        &self,
        permits: &Arc<tokio::sync::Semaphore>,
        limit: usize,
        kind: &str,
    ) -> Result<tokio::sync::OwnedSemaphorePermit> {
        tokio::time::timeout(
            self.shared.config.limits.transfer_idle(),
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

    /// A fresh upload (receiver, spill file, weight reserved in the accumulator,
    /// an undo entry), or the one kept from this organisation's broken-off upload
    /// when the header asks to resume it (and describes the same update).
    fn resume_or_new(
        &self,
        org: &str,
        header: &pb::UpdateHeader,
        num_params: usize,
    ) -> Result<(DeltaReceiver, Spill, u64)> {
        if header.first_chunk == 0 {
            let algorithm = crate::transfer::delta_algorithm(header)?;
            // Two short lock sections around the spill file's creation (disk work
            // stays outside the lock): one allocates the upload, one reserves its
            // weight. A new upload first replaces whatever was kept of an earlier
            // one, whose undo reads its spill and so also runs outside the lock.
            let (encoding, upload_id, path) = loop {
                let mut guard = self.shared.training();
                let t = current(&mut guard, &header.training_id)?;
                if let Some(p) = t.partial.remove(org) {
                    drop(guard);
                    self.abandon(org, p.upload_id, header.round);
                    continue;
                }
                t.next_upload_id += 1;
                let id = t.next_upload_id;
                break (
                    t.plan.training.update_encoding,
                    id,
                    spill_path(&t.output_dir, header.round, org, id),
                );
            };
            let spill = Spill::create(&path, self.shared.config.durable_updates)?;
            let mut guard = self.shared.training();
            let t = current(&mut guard, &header.training_id)?;
            if t.phase != Phase::Training || t.round != header.round {
                drop(guard);
                let _ = std::fs::remove_file(&path);
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "round {} closed before this update could start",
                    header.round
                )));
            }
            let acc = t
                .accumulator
                .as_mut()
                .expect("a training round has an accumulator");
            if let Err(e) = acc.reserve(header.num_examples) {
                drop(guard);
                let _ = std::fs::remove_file(&path);
                return Err(e.into());
            }
            t.folding.insert(
                org.to_string(),
                Folding {
                    upload_id,
                    spill: path,
                    encoding,
                    weight: header.num_examples,
                    folded: 0,
                },
            );
            return Ok((
                DeltaReceiver::new(
                    num_params,
                    self.shared.config.limits.max_chunk_bytes,
                    encoding,
                    algorithm,
                ),
                spill,
                upload_id,
            ));
        }
        let mut guard = self.shared.training();
        let Some(t) = guard.as_mut() else {
            return Err(CoordinatorError::FailedPrecondition(
                "no training is running".into(),
            ));
        };
        let matches = t.partial.get(org).is_some_and(|p| {
            !header.delta_sha256.is_empty()
                && p.round == header.round
                && p.base_model_sha256 == header.base_model_sha256
                && p.num_examples == header.num_examples
                && p.delta_sha256 == header.delta_sha256
                && p.receiver.next_index() == header.first_chunk
        });
        // A mismatching request leaves the kept part alone: the right resume may follow.
        match if matches { t.partial.remove(org) } else { None } {
            Some(p) => {
                tracing::info!(
                    org,
                    round = header.round,
                    from = header.first_chunk,
                    "upload resumed"
                );
                Ok((p.receiver, p.spill, p.upload_id))
            }
            _ => Err(CoordinatorError::FailedPrecondition(format!(
                "nothing kept to resume from chunk {}: ask UploadProgress, or start again from chunk 0",
                header.first_chunk
            ))),
        }
    }

    /// Keeps a broken-off upload for resumption, if it declared its digest and
    /// there is room (at most `max_concurrent_uploads` are kept). Its folded chunks
    /// stay in the accumulator; false means it was not kept (the caller undoes it).
    fn keep_partial(
        &self,
        org: &str,
        header: &pb::UpdateHeader,
        mut receiver: DeltaReceiver,
        spill: Spill,
        upload_id: u64,
    ) -> bool {
        if header.delta_sha256.is_empty() || receiver.next_index() == 0 {
            return false;
        }
        let mut guard = self.shared.training();
        let Some(t) = guard.as_mut() else {
            return false;
        };
        let ours = t.folding.get(org).is_some_and(|f| f.upload_id == upload_id);
        if !ours
            || t.round != header.round
            || t.partial.len() >= self.shared.config.limits.max_concurrent_uploads
        {
            return false;
        }
        tracing::info!(
            org,
            round = header.round,
            chunks = receiver.next_index(),
            "kept a broken-off upload for resumption"
        );
        receiver.release_buffer();
        t.partial.insert(
            org.to_string(),
            crate::state::PartialUpload {
                round: header.round,
                base_model_sha256: header.base_model_sha256.clone(),
                num_examples: header.num_examples,
                delta_sha256: header.delta_sha256.clone(),
                receiver,
                spill,
                upload_id,
            },
        );
        true
    }

    /// Folds one checked chunk into the round's accumulator, if the upload is still
    /// this round's (the round may have closed, and undone it, meanwhile).
    fn fold_chunk(
        &self,
        org: &str,
        header: &pb::UpdateHeader,
        upload_id: u64,
        chunk: &CheckedChunk,
    ) -> Result<()> {
        let mut guard = self.shared.training();
        let t = current(&mut guard, &header.training_id)?;
        let open = t.phase == Phase::Training && t.round == header.round;
        let Some(f) = t
            .folding
            .get_mut(org)
            .filter(|f| open && f.upload_id == upload_id)
        else {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "round {} closed while this update was being received",
                header.round
            )));
        };
        let start = sangsaeng_common::process::thread_cpu_time();
        // All or nothing: a refused chunk is not folded, so it is not counted.
        let folded = t
            .accumulator
            .as_mut()
            .expect("a training round has an accumulator")
            .fold(chunk.offset, chunk.values, header.num_examples);
        t.fold_time += sangsaeng_common::process::thread_cpu_time().saturating_sub(start);
        folded?;
        f.folded += 1;
        Ok(())
    }

    /// Undoes an upload that will not be accepted, unless the round driver already
    /// did (it undoes every unfinished upload when it closes the round).
    fn abandon(&self, org: &str, upload_id: u64, round: u32) {
        let entry = {
            let mut guard = self.shared.training();
            let Some(t) = guard.as_mut() else { return };
            if t.folding.get(org).is_none_or(|f| f.upload_id != upload_id) {
                return;
            }
            t.partial.remove(org);
            t.undoing += 1;
            t.folding.remove(org).expect("checked above")
        };
        undo(&self.shared, round, entry);
        if let Some(t) = self.shared.training().as_mut() {
            t.undoing = t.undoing.saturating_sub(1);
        }
        self.shared.notify();
    }

    async fn receive_update(
        &self,
        org: &str,
        mut stream: Streaming<pb::UpdateMessage>,
    ) -> Result<pb::UploadReceipt> {
        let limits = &self.shared.config.limits;
        let idle = limits.transfer_idle();
        let header = match next_part(&mut stream, idle).await? {
            pb::update_message::Part::Header(mut h) => {
                crate::transfer::settle_header(&mut h)?;
                h
            }
            _ => {
                return Err(CoordinatorError::InvalidArgument(
                    "an upload must start with its header".into(),
                ));
            }
        };
        let (num_params, round, mark_id) = {
            let mut guard = self.shared.training();
            let t = current(&mut guard, &header.training_id)?;
            may_upload(t, org, header.round)?;
            let base = t
                .models
                .get(&(t.round - 1))
                .expect("the round's base model is published");
            if header.base_model_sha256 != base.sha256 {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "the update starts from model {}, but round {} started from {}",
                    header.base_model_sha256, t.round, base.sha256
                )));
            }
            let n = base.params.len();
            if header.num_params != n as u64 {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "the update declares {} values, the model has {n}",
                    header.num_params
                )));
            }
            let encoding = UpdateEncoding::from_name(&header.encoding)
                .map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?;
            if encoding != t.plan.training.update_encoding {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "the update is encoded as {}, the plan asks for {}",
                    encoding.name(),
                    t.plan.training.update_encoding.name()
                )));
            }
            if header.num_examples == 0 || header.num_examples > limits.max_examples_per_update {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "num_examples {} is outside 1..={}",
                    header.num_examples, limits.max_examples_per_update
                )));
            }
            t.next_upload_id += 1;
            t.uploading.insert(org.to_string(), t.next_upload_id);
            (n, t.round, t.next_upload_id)
        };
        let _mark = UploadMark {
            shared: &self.shared,
            org: org.to_string(),
            id: mark_id,
        };
        // Bounded: each upload in flight has a spill file and chunk buffers. Taken
        // only after the header passed its checks, so a caller holds at most one slot
        // (its upload is marked) and streams that never send a header hold none. A
        // participant that reserved its slot beforehand (UploadProgress) uses that one.
        let mut permit = Some(match self.shared.take_reserved_upload(org) {
            Some(permit) => permit,
            None => self.acquire_upload_slot().await?,
        });

        let mut upload: Option<u64> = None;
        let outcome = async {
            let (mut rx, mut spill, upload_id) = self.resume_or_new(org, &header, num_params)?;
            upload = Some(upload_id);
            let encoding = rx.encoding();
            let trailer = loop {
                let part = match next_part(&mut stream, idle).await {
                    Ok(part) => part,
                    // The connection broke or went quiet: keep what arrived (folded)
                    // so the participant can resume from the next chunk.
                    Err(e @ CoordinatorError::Aborted(_)) => {
                        if self.keep_partial(org, &header, rx, spill, upload_id) {
                            upload = None;
                        }
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                };
                match part {
                    pb::update_message::Part::Chunk(c) => {
                        let checked = rx.push(&c)?;
                        // Spilled before it is folded, so an undo can always read
                        // back every folded chunk. On a blocking thread: a direct
                        // write waits for the disk (and a buffered one may be
                        // throttled by the kernel's dirty-page limit), which would
                        // otherwise stall every other transfer on this worker.
                        let data = c.data;
                        spill = tokio::task::spawn_blocking(move || {
                            spill.append(&data).map(|()| spill)
                        })
                        .await
                        .map_err(|e| CoordinatorError::Store(format!("spilling a chunk: {e}")))??;
                        self.fold_chunk(org, &header, upload_id, &checked)?;
                    }
                    pb::update_message::Part::Trailer(mut t) => {
                        crate::transfer::settle_trailer(&mut t, &header)?;
                        break t;
                    }
                    pb::update_message::Part::Header(_) => {
                        return Err(CoordinatorError::InvalidArgument(
                            "a second header arrived in the same upload".into(),
                        ));
                    }
                }
            };
            if !header.delta_sha256.is_empty() && trailer.sha256 != header.delta_sha256 {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "the trailer's digest {} differs from the digest {} declared in the header",
                    trailer.sha256, header.delta_sha256
                )));
            }
            let sha256 = rx.finish(&trailer)?;
            // Every chunk is in: the slot (which bounds uploads receiving chunks)
            // passes to the next upload now, so its transfer overlaps this one's
            // fsync instead of waiting for the disk.
            drop(permit.take());

            let update = AcceptedUpdate {
                org_id: org.to_string(),
                sha256: sha256.clone(),
                num_examples: header.num_examples,
                train_loss: header.train_loss,
            };
            // The update is acknowledged only once it would survive a crash: its
            // spill fsynced and recorded (outside the lock, so an fsync does not
            // stall the other participants' requests), then counted.
            let durable = self.shared.config.durable_updates;
            if durable {
                // Both wait for the disk (fsync): on a blocking thread, so the
                // runtime's few workers keep serving the other participants meanwhile.
                let shared = self.shared.clone();
                let record = crate::store::StoredContribution::new(&update, encoding, spill.path());
                let training_id = header.training_id.clone();
                spill = tokio::task::spawn_blocking(move || {
                    spill.sync()?;
                    shared
                        .store
                        .put_contribution(&training_id, round, &record)?;
                    Ok::<_, CoordinatorError>(spill)
                })
                .await
                .map_err(|e| CoordinatorError::Store(format!("recording the update: {e}")))??;
            }
            let accepted_in_round = {
                let mut guard = self.shared.training();
                let t = current(&mut guard, &header.training_id)?;
                let ours = t.phase == Phase::Training
                    && t.round == round
                    && t.folding.get(org).is_some_and(|f| f.upload_id == upload_id);
                if !ours {
                    return Err(CoordinatorError::FailedPrecondition(format!(
                        "round {round} closed while this update was being received"
                    )));
                }
                t.folding.remove(org);
                t.accumulator
                    .as_mut()
                    .expect("a training round has an accumulator")
                    .commit();
                t.accepted.insert(org.to_string(), update);
                t.accepted.len() as u32
            };
            upload = None;
            if !durable {
                let _ = std::fs::remove_file(spill.path());
            }
            Ok::<_, CoordinatorError>((sha256, accepted_in_round))
        }
        .await;
        if let (Some(id), Err(_)) = (upload, &outcome) {
            self.abandon(org, id, round);
        }
        let (sha256, accepted_in_round) = match outcome {
            Ok(v) => v,
            // A connection that broke or a round that closed may be retried; an update
            // that is malformed is refused for this round so the round does not wait for it.
            Err(e @ (CoordinatorError::Aborted(_) | CoordinatorError::FailedPrecondition(_))) => {
                return Err(e);
            }
            Err(e) => {
                if let Some(t) = self.shared.training().as_mut().filter(|t| t.round == round) {
                    t.rejected.insert(org.to_string(), e.to_string());
                }
                self.shared.notify();
                return Err(e);
            }
        };
        tracing::info!(
            org,
            round,
            examples = header.num_examples,
            sha256 = &sha256[..12],
            "update accepted"
        );
        self.shared.notify();
        Ok(pb::UploadReceipt {
            sha256,
            accepted_in_round,
        })
    }
}

/// Where a round's uploads are spilled while they are received.
pub fn spill_dir(output_dir: &std::path::Path, round: u32) -> std::path::PathBuf {
    output_dir.join("updates").join(format!("round-{round:04}"))
}

/// A spill file name that is safe whatever the organisation id holds.
fn spill_path(
    output_dir: &std::path::Path,
    round: u32,
    org: &str,
    upload_id: u64,
) -> std::path::PathBuf {
    let tag = &sangsaeng_common::weights::sha256_hex(org.as_bytes())[..16];
    spill_dir(output_dir, round).join(format!("{tag}-{upload_id}.bin"))
}

/// Subtracts the folded chunks of an unfinished upload and gives back its weight,
/// so the accumulator is exactly as if the upload had never arrived.
fn undo(shared: &Shared, round: u32, f: Folding) {
    let unfold = |offset: usize, values: &[f32], _: &[u8]| {
        if let Some(acc) = shared
            .training()
            .as_mut()
            .filter(|t| t.round == round)
            .and_then(|t| t.accumulator.as_mut())
        {
            acc.unfold(offset, values, f.weight);
        }
        Ok(())
    };
    if f.folded > 0
        && let Err(e) = read_spill(&f.spill, f.encoding, Some(f.folded), unfold)
    {
        // The spill was written by this process moments ago; failing to read it
        // back means the disk is failing. The round cannot be trusted any more.
        tracing::error!(spill = %f.spill.display(), "could not undo a refused update: {e}");
        if let Some(t) = shared.training().as_mut().filter(|t| t.round == round) {
            t.undo_failed = Some(format!("could not undo a refused update: {e}"));
        }
    }
    if let Some(acc) = shared
        .training()
        .as_mut()
        .filter(|t| t.round == round)
        .and_then(|t| t.accumulator.as_mut())
    {
        acc.release(f.weight);
    }
    let _ = std::fs::remove_file(&f.spill);
}

/// Called by the round driver once the round is closed: undoes every upload that
/// is still folding in or kept for resumption, and waits for undos in progress.
pub async fn undo_unfinished_uploads(shared: &Arc<Shared>) -> Result<()> {
    let (round, entries) = {
        let mut guard = shared.training();
        let t = guard.as_mut().expect("training");
        t.partial.clear();
        (t.round, std::mem::take(&mut t.folding))
    };
    if !entries.is_empty() {
        tracing::info!(
            round,
            uploads = entries.len(),
            "undoing unfinished uploads of the closed round"
        );
        let s = shared.clone();
        tokio::task::spawn_blocking(move || {
            for (_, f) in entries {
                undo(&s, round, f);
            }
        })
        .await
        .map_err(|e| CoordinatorError::Store(format!("undoing uploads: {e}")))?;
    }
    loop {
        // Created before the check so a notification in between is not missed.
        let notified = shared.progress.notified();
        {
            let mut guard = shared.training();
            let Some(t) = guard.as_mut() else {
                return Ok(());
            };
            if let Some(e) = t.undo_failed.take() {
                return Err(CoordinatorError::Store(format!(
                    "round {round}: {e}; the round's aggregate cannot be trusted"
                )));
            }
            if t.undoing == 0 {
                return Ok(());
            }
        }
        notified.await;
    }
}
