//! The participant-facing `Federation` service: thin RPC handlers.
//!
//! Each handler authorises the caller, checks the request against the training
//! state and hands anything that belongs to a round's protocol to [`crate::round`]
//! (an upload to [`crate::round::upload`]). Checks run under a short lock. A
//! refused request changes nothing except
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

use sangsaeng_common::config::roster::Role;
use sangsaeng_common::learning::data::FeatureStats;
use sangsaeng_common::learning::metrics::RegressionMetrics;
use sangsaeng_proto::v1 as pb;
use sangsaeng_proto::v1::federation_server::Federation;

use crate::error::{CoordinatorError, Result};
use crate::rpc::auth::authorize;
use crate::state::{EvalRecord, Phase, Shared, TASK_QUEUE, current_training};

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
            // In a secure round, also the step it waits on (after its TrainTask,
            // whose keys it still holds).
            t.as_ref().and_then(|t| {
                (t.selected.contains(&org) && !t.has_answered(&org) && !t.phase.is_finished()).then(
                    || {
                        let step = t.secure.as_ref().and_then(|s| s.pending_task(&org));
                        [t.current_task.clone(), step]
                    },
                )
            })
        };
        for task in resend.into_iter().flatten().flatten() {
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
            let t = current_training(&mut guard, &r.training_id)?;
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
                .validate(t.plan.n_stat_columns())
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
            let t = current_training(&mut guard, &r.training_id)?;
            let m = match r.control_variate {
                false => t.models.get(&r.model_round).cloned(),
                true => t.control.clone().filter(|c| c.round == r.model_round),
            };
            let m = m.ok_or_else(|| {
                CoordinatorError::NotFound(format!(
                    "the {} of round {} is not available (current round: {}{})",
                    if r.control_variate {
                        "SCAFFOLD control variate"
                    } else {
                        "global model"
                    },
                    r.model_round,
                    t.round,
                    if r.control_variate && !t.plan.scaffold() {
                        "; the plan has no SCAFFOLD"
                    } else {
                        ""
                    }
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
        let limit = self.shared.config.limits.max_concurrent_downloads;
        let permit = self
            .shared
            .transfer_slot(&self.shared.download_permits, limit, "downloads")
            .await
            .map_err(|e| self.refuse(&org, "DownloadModel", e))?;
        let shared = self.shared.clone();
        let stream = tokio_stream::iter(r.start_chunk..model.total_chunks()).map(move |i| {
            let _held = &permit;
            let chunk = model.chunk(i);
            shared.metrics.sent_bytes.inc_by(chunk.data.len() as u64);
            Ok(chunk)
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
            let outcome = crate::round::upload::receive_update(&this.shared, &org, stream).await;
            match &outcome {
                Ok(_) => {
                    this.shared.metrics.updates_accepted.inc();
                }
                Err(e) => this.shared.metrics.refused(e),
            }
            outcome.map_err(|e| this.refuse(&org, "UploadUpdate", e))
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
            let t = current_training(&mut guard, &r.training_id)
                .map_err(|e| self.refuse(&org, "UploadProgress", e))?;
            if r.reserve_slot {
                crate::round::upload::may_upload(t, &org, r.round)
                    .map_err(|e| self.refuse(&org, "UploadProgress", e))?;
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
                    .shared
                    .upload_slot()
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
            let t = current_training(&mut guard, &r.training_id)?;
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
            let regression = check_regression_metrics(t.plan.regression(), r.regression)?;
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
                    regression,
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

    async fn secure_aggregation(
        &self,
        req: Request<pb::SecureAggregationMessage>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        let org = self.caller(&req, "SecureAggregation")?;
        // The advert's certificate is the one this connection authenticated
        // with: a participant cannot present another's.
        let cert = req
            .peer_certs()
            .and_then(|c| c.first().map(|c| c.to_vec()))
            .unwrap_or_default();
        crate::secure::receive::receive(&self.shared, &org, cert, req.into_inner())
            .map_err(|e| self.refuse(&org, "SecureAggregation", e))?;
        Ok(Response::new(pb::Ack::default()))
    }
}

/// Bounds one site's statistics by what its rows can produce (at most
/// `max_rows` rows of 32-bit values), so that merging every site's statistics can
/// neither overflow the row count nor reach infinity: statistics that are valid on
/// their own must not be able to fail the whole training when merged.
/// A regression plan's evaluations carry MAE, RMSE and R², a classification
/// plan's none: a site cannot report figures the other task would misread,
/// and each figure must be one a real model on real rows can give
/// (0 ≤ MAE ≤ RMSE, R² ≤ 1).
fn check_regression_metrics(
    regression_plan: bool,
    m: Option<pb::RegressionMetrics>,
) -> Result<Option<RegressionMetrics>> {
    match (regression_plan, m) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(CoordinatorError::InvalidArgument(
            "regression metrics sent for a classification training".into(),
        )),
        (true, None) => Err(CoordinatorError::InvalidArgument(
            "a regression training's evaluation must carry MAE, RMSE and R²".into(),
        )),
        (true, Some(m)) => {
            let finite = [m.mae, m.rmse, m.r2].iter().all(|v| v.is_finite());
            // RMSE ≥ MAE always holds (Jensen); rounding may put them a hair apart.
            let ordered = m.mae >= 0.0 && m.rmse >= m.mae * (1.0 - 1e-9);
            if !finite || !ordered || m.r2 > 1.0 {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "regression metrics must be finite with 0 <= MAE <= RMSE and R² <= 1 (got MAE {}, RMSE {}, R² {})",
                    m.mae, m.rmse, m.r2
                )));
            }
            Ok(Some(RegressionMetrics {
                mae: m.mae,
                rmse: m.rmse,
                r2: m.r2,
            }))
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn m(mae: f64, rmse: f64, r2: f64) -> Option<pb::RegressionMetrics> {
        Some(pb::RegressionMetrics { mae, rmse, r2 })
    }

    /// Issue 22's hostile evaluations: figures of the other task, or figures
    /// no model on real rows can give, are refused with what was wrong.
    #[test]
    fn regression_metrics_must_suit_the_task_and_be_possible() {
        assert!(check_regression_metrics(false, None).unwrap().is_none());
        assert_eq!(
            check_regression_metrics(true, m(0.5, 0.7, 0.4)).unwrap(),
            Some(RegressionMetrics {
                mae: 0.5,
                rmse: 0.7,
                r2: 0.4
            })
        );
        for (plan, sent, needle) in [
            (false, m(0.5, 0.7, 0.4), "classification"),
            (true, None, "must carry"),
            (true, m(0.9, 0.7, 0.4), "MAE <= RMSE"),
            (true, m(-0.1, 0.7, 0.4), "MAE <= RMSE"),
            (true, m(0.5, 0.7, 1.5), "R² <= 1"),
            (true, m(0.5, f64::NAN, 0.4), "finite"),
        ] {
            let e = check_regression_metrics(plan, sent)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
