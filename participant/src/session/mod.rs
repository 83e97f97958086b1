//! One participant's conversation with the coordinator: dial out, subscribe,
//! and carry out each pushed task (statistics, local training, evaluation).
//!
//! The daemon never listens on a port. If the connection drops it reconnects with
//! capped exponential backoff and jitter; the coordinator resends a task it still
//! waits for. Local training runs on a blocking thread so the connection stays
//! responsive (keepalives) however long it takes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::learning::train::{self, LocalTraining};
use sangsaeng_common::transfer::digest::{self, DigestAlgorithm};
use sangsaeng_common::transfer::encoding::{self, UpdateEncoding};
use sangsaeng_common::transfer::weights;
use sangsaeng_common::transfer::wire::{self, plan_from_proto};
use sangsaeng_proto::v1 as pb;
use sangsaeng_proto::v1::federation_client::FederationClient;

use crate::config::ParticipantConfig;
use crate::download::ModelAssembler;
use crate::error::{ParticipantError, Result};
use crate::privacy::RoundPrivacy;
use crate::site::{self, Site};

mod secure_round;

/// A broken-off model download resumes from the last good chunk this many times.
const DOWNLOAD_ATTEMPTS: u32 = 4;

/// Why a subscription ended without error.
enum Ended {
    /// The training finished and the config asks to stop.
    Done,
    /// Shutdown was requested.
    Shutdown,
}

pub struct Session {
    cfg: ParticipantConfig,
    site: Site,
    tls: sangsaeng_common::identity::tls::TlsMaterial,
    /// Trainings this site declined (e.g. schema mismatch): their tasks are ignored.
    declined: HashMap<String, String>,
    client: Option<FederationClient<Channel>>,
    /// Set once a subscription was established; resets the reconnect backoff.
    subscribed: bool,
    /// The last delta computed and not yet acknowledged: if the connection breaks
    /// during its upload, the same round's task comes again after reconnecting and
    /// the upload resumes instead of training again.
    pending: Option<PendingUpload>,
    /// Who this site is in secure-aggregation rounds.
    identity: crate::secure::Identity,
    /// The secure-aggregation attempt this site is in, if any.
    secure: Option<crate::secure::SecureRound>,
    /// What `/metrics` shows.
    metrics: Arc<crate::metrics::Metrics>,
    /// Subscriptions established so far (the ones after the first are reconnects).
    subscriptions: u64,
}

/// A delta as it is sent: encoded once, hashed once, and kept in that form (the
/// delta itself is dropped) until the coordinator acknowledges it, so a site
/// holds one model-sized buffer for it, however many attempts the upload takes.
struct PendingUpload {
    training_id: String,
    round: u32,
    base_sha256: String,
    num_params: u64,
    encoding: UpdateEncoding,
    chunks: Arc<[bytes::Bytes]>,
    /// For a secure round: the delta's values as the coordinator would decode
    /// them (after the plan's encoding), masked only as they are sent; `chunks`
    /// is then empty.
    values: Option<Arc<Vec<f32>>>,
    algorithm: DigestAlgorithm,
    /// Digest id of all chunks' bytes (`sangsaeng_common::transfer::digest`).
    delta_digest: String,
    num_examples: u64,
    /// The weight the update is folded with: its example count, or 1 under
    /// client-level DP. A secure round's site weights its own integers.
    weight: u64,
    train_loss: f64,
    /// What record-level DP-SGD spent, reported with the update.
    dp: Option<pb::DpSpend>,
    /// SCAFFOLD: the site's new control variate, kept once the update is acknowledged.
    control: Option<PendingControl>,
}

/// SCAFFOLD's inputs to a round at this site.
struct ScaffoldInputs {
    /// Where c_i is kept.
    path: std::path::PathBuf,
    /// c, the server's.
    server: Vec<f32>,
    /// c_i, this site's.
    own: Vec<f32>,
}

impl ScaffoldInputs {
    /// c − c_i, added to every local step's gradient.
    fn correction(&self) -> Vec<f32> {
        self.server
            .iter()
            .zip(&self.own)
            .map(|(c, ci)| c - ci)
            .collect()
    }

    /// Appends c_i' − c_i to the delta (the update's second half) and returns
    /// c_i' to keep once the coordinator has it.
    fn append_change(self, delta: &mut Vec<f32>, updated: Vec<f32>) -> PendingControl {
        delta.extend(updated.iter().zip(&self.own).map(|(new, old)| new - old));
        PendingControl {
            path: self.path,
            updated,
        }
    }
}

/// A control variate waiting for its update's acknowledgement.
struct PendingControl {
    path: std::path::PathBuf,
    updated: Vec<f32>,
}

impl Session {
    pub fn new(cfg: ParticipantConfig) -> Result<Self> {
        Self::with_metrics(cfg, Arc::default())
    }

    /// A session that counts into `metrics` (served by [`crate::run`]).
    pub fn with_metrics(
        cfg: ParticipantConfig,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Self> {
        let tls = cfg.tls.load()?;
        let site = Site::new(cfg.data.clone(), cfg.features_from_plan);
        let identity = crate::secure::Identity::from_tls(&tls)?;
        Ok(Session {
            identity,
            secure: None,
            cfg,
            site,
            tls,
            declined: HashMap::new(),
            client: None,
            subscribed: false,
            pending: None,
            metrics,
            subscriptions: 0,
        })
    }

    /// Runs until shutdown (or, with `exit_after_training`, the end of a training).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        let mut attempt: u32 = 0;
        // Configuration, TLS files and data folder are loaded: ready, even if the
        // coordinator is not reachable yet (it is dialled with backoff).
        sangsaeng_common::process::notify_ready(&format!("dialling {}", self.cfg.coordinator));
        loop {
            self.subscribed = false;
            let outcome = self.connect_and_serve(&shutdown).await;
            self.metrics.connected.set(0);
            if let Err(e) = &outcome {
                self.metrics.error(e);
            }
            match outcome {
                Ok(Ended::Done) => return Ok(()),
                Ok(Ended::Shutdown) | Err(ParticipantError::Shutdown) => {
                    sangsaeng_common::process::notify_stopping();
                    self.leave("shutdown requested").await;
                    return Ok(());
                }
                Err(e) if e.is_transient() => {
                    if self.subscribed {
                        attempt = 0;
                    }
                    self.client = None;
                    let jitter = rand::random::<f64>() * 2.0 - 1.0;
                    let delay = self.cfg.reconnect.delay(attempt, jitter);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!("{e}; reconnecting in {:.1}s", delay.as_secs_f64());
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn client(&mut self) -> Result<FederationClient<Channel>> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let ch = sangsaeng_common::identity::channel::connect(
            &self.cfg.coordinator,
            &self.tls,
            &self.cfg.server_name,
        )
        .await?;
        let max = self.cfg.upload_chunk_bytes.max(64 << 20) + (64 << 10);
        let c = FederationClient::new(ch)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        self.client = Some(c.clone());
        Ok(c)
    }

    async fn connect_and_serve(&mut self, shutdown: &CancellationToken) -> Result<Ended> {
        let mut client = self.client().await?;
        let mut tasks = client
            .subscribe(pb::SubscribeRequest {
                software_version: concat!("sangsaeng-participant ", env!("CARGO_PKG_VERSION"))
                    .into(),
            })
            .await
            .map_err(|s| ParticipantError::rpc("Subscribe", s))?
            .into_inner();
        self.subscribed = true;
        self.metrics.connected.set(1);
        if self.subscriptions > 0 {
            self.metrics.reconnects.inc();
        }
        self.subscriptions += 1;
        tracing::info!(coordinator = %self.cfg.coordinator, "subscribed; waiting for tasks");
        loop {
            let task = tokio::select! {
                t = tasks.message() => t.map_err(|s| ParticipantError::rpc("Subscribe", s))?,
                _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
            };
            let Some(task) = task else {
                return Err(ParticipantError::Rpc {
                    rpc: "Subscribe",
                    code: tonic::Code::Unavailable,
                    message: "the coordinator closed the task stream".into(),
                });
            };
            let finished = matches!(task.kind, Some(pb::task::Kind::Finished(_)));
            if let Some(why) = self.declined.get(&task.training_id).filter(|_| !finished) {
                tracing::debug!(training = %task.training_id, "ignoring task of a declined training: {why}");
                continue;
            }
            let training_id = task.training_id.clone();
            let round = task.round;
            let result = tokio::select! {
                r = self.handle(&mut client, task) => r,
                _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
            };
            if let Err(e) = &result {
                self.metrics.error(e);
            }
            match result {
                Ok(true) if self.cfg.exit_after_training => return Ok(Ended::Done),
                Ok(_) => {}
                Err(e) if e.is_transient() => return Err(e),
                Err(e @ (ParticipantError::Rpc { .. } | ParticipantError::Refused(_))) => {
                    // The coordinator refused this piece of work (e.g. the round closed);
                    // the next task will come down the stream.
                    tracing::warn!(training = %training_id, round, "{e}");
                }
                Err(e) => {
                    // Our own data or the plan is unusable: say so to the coordinator and
                    // sit this training out instead of failing every round again.
                    let message = e.to_string();
                    tracing::error!(training = %training_id, round, "cannot take part: {message}");
                    let _ = client
                        .report_problem(pb::ProblemReport {
                            training_id: training_id.clone(),
                            round,
                            message: message.clone(),
                        })
                        .await;
                    self.declined.insert(training_id, message);
                }
            }
        }
    }

    /// Carries out one task; returns true when the training finished.
    async fn handle(
        &mut self,
        client: &mut FederationClient<Channel>,
        task: pb::Task,
    ) -> Result<bool> {
        let missing = |what: &str| {
            ParticipantError::Common(sangsaeng_common::Error::Protocol(format!(
                "task without {what}"
            )))
        };
        let kind = task.kind.ok_or_else(|| missing("a kind"))?;
        let tid = task.training_id;
        match kind {
            pb::task::Kind::Stats(s) => {
                let plan = plan_from_proto(s.plan.as_ref().ok_or_else(|| missing("a plan"))?)?;
                // Before any statistic leaves the site: a plan beyond its limits is declined.
                crate::privacy::accept_plan(&self.cfg.privacy, &plan)?;
                let prepared = self.site.prepare(&tid, &plan)?;
                let stats = Site::stats(&prepared);
                let sent = client
                    .submit_stats(pb::StatsReport {
                        training_id: tid.clone(),
                        count: stats.count,
                        sum: stats.sum,
                        sum_sq: stats.sum_sq,
                    })
                    .await;
                match sent {
                    // The same task can arrive twice (pushed as the phase opens and
                    // again on subscribing): the coordinator has them, which is the point.
                    Err(s) if s.code() == tonic::Code::AlreadyExists => {
                        tracing::debug!(training = %tid, "the coordinator already has this site's statistics");
                        return Ok(false);
                    }
                    other => other.map_err(|s| ParticipantError::rpc("SubmitStats", s))?,
                };
                tracing::info!(training = %tid, rows = stats.count, "sent feature statistics (counts and sums only)");
                Ok(false)
            }
            pb::task::Kind::Train(t) => {
                let plan = plan_from_proto(t.plan.as_ref().ok_or_else(|| missing("a plan"))?)?;
                let info = t.model.ok_or_else(|| missing("a model"))?;
                match t.secure {
                    Some(secure) => {
                        self.train_secure(client, &tid, task.round, &plan, &info, secure)
                            .await?
                    }
                    None => {
                        self.train(client, &tid, task.round, &plan, &info, t.control)
                            .await?
                    }
                }
                Ok(false)
            }
            pb::task::Kind::Secure(step) => {
                self.secure_step(client, &tid, task.round, step).await?;
                Ok(false)
            }
            pb::task::Kind::Evaluate(e) => {
                let plan = plan_from_proto(e.plan.as_ref().ok_or_else(|| missing("a plan"))?)?;
                let info = e.model.ok_or_else(|| missing("a model"))?;
                self.evaluate(client, &tid, &plan, &info).await?;
                Ok(false)
            }
            pb::task::Kind::Finished(f) => {
                tracing::info!(training = %tid, "training finished: {}", f.outcome);
                if let (Some(dir), Some(model), Some(plan)) =
                    (self.cfg.model_dir.clone(), &f.model, &f.plan)
                {
                    // Keeping the model is a convenience: a failure is logged, not fatal.
                    match keep_final_model(client, &dir, &tid, model, plan).await {
                        Ok(path) => {
                            tracing::info!(training = %tid, model = %path.display(), "kept the final global model for `predict`")
                        }
                        Err(e) => {
                            tracing::warn!(training = %tid, "could not keep the final global model: {e}")
                        }
                    }
                }
                Ok(true)
            }
        }
    }

    /// Scores the round's global model on this site's validation split.
    async fn evaluate(
        &mut self,
        client: &mut FederationClient<Channel>,
        tid: &str,
        plan: &TrainingPlan,
        info: &pb::ModelInfo,
    ) -> Result<()> {
        let prepared = self.site.prepare(tid, plan)?;
        let params = download(client, tid, info).await?;
        self.metrics
            .downloaded_bytes
            .inc_by(4 * params.len() as u64);
        let (_, val) = site::scaled(&prepared, plan)?;
        let spec = ModelSpec::from_plan(plan);
        let backend = self.cfg.backend;
        let ev =
            tokio::task::spawn_blocking(move || train::evaluate(backend, &spec, &params, &val))
                .await
                .map_err(|e| ParticipantError::Transfer(format!("evaluation thread: {e}")))??;
        client
            .submit_evaluation(pb::EvaluationReport {
                training_id: tid.to_string(),
                model_round: info.round,
                num_examples: ev.n as u64,
                loss: ev.loss,
                accuracy: ev.accuracy,
                macro_f1: ev.macro_f1,
                regression: ev.regression.map(|r| pb::RegressionMetrics {
                    mae: r.mae,
                    rmse: r.rmse,
                    r2: r.r2,
                }),
            })
            .await
            .map_err(|s| ParticipantError::rpc("SubmitEvaluation", s))?;
        self.metrics.evaluations.inc();
        match ev.regression {
            Some(r) => tracing::info!(
                training = %tid,
                round = info.round,
                "global model on local validation: loss {:.4}, MAE {:.4}, RMSE {:.4}, R² {:.4}",
                ev.loss, r.mae, r.rmse, r.r2
            ),
            None => tracing::info!(
                training = %tid,
                round = info.round,
                "global model on local validation: loss {:.4}, accuracy {:.4}, macro-F1 {:.4}",
                ev.loss, ev.accuracy, ev.macro_f1
            ),
        }
        Ok(())
    }

    async fn train(
        &mut self,
        client: &mut FederationClient<Channel>,
        tid: &str,
        round: u32,
        plan: &TrainingPlan,
        info: &pb::ModelInfo,
        control: Option<pb::ModelInfo>,
    ) -> Result<()> {
        let reuse = self.pending.as_ref().is_some_and(|p| {
            p.training_id == tid && p.round == round && p.base_sha256 == info.sha256
        });
        if !reuse {
            let pending = self
                .compute_delta(client, tid, round, plan, info, control)
                .await?;
            self.pending = Some(pending);
        }
        let p = self.pending.as_ref().expect("a delta to upload");
        // Wait for an upload slot here rather than inside the upload stream (where the
        // first chunks would sit in the coordinator's buffers meanwhile), and learn how
        // much of an earlier, broken-off upload of this same delta the coordinator kept.
        let first_chunk = client
            .upload_progress(pb::UploadProgressRequest {
                training_id: tid.into(),
                round,
                delta_sha256: p.delta_digest.clone(),
                reserve_slot: true,
            })
            .await
            .map_err(|s| ParticipantError::rpc("UploadProgress", s))?
            .into_inner()
            .next_chunk;
        if first_chunk > 0 {
            tracing::info!(
                training = tid,
                round,
                from_chunk = first_chunk,
                "resuming the upload"
            );
        }
        let sending: u64 = p
            .chunks
            .iter()
            .skip(first_chunk as usize)
            .map(|c| c.len() as u64)
            .sum();
        let receipt = upload(
            client,
            wire::UpdateUpload {
                training_id: tid.into(),
                round,
                base_model_sha256: info.sha256.clone(),
                num_params: p.num_params,
                encoding: p.encoding,
                chunks: p.chunks.clone(),
                delta_digest: p.delta_digest.clone(),
                num_examples: p.num_examples,
                train_loss: p.train_loss,
                first_chunk,
                dp: p.dp,
                masked: None,
            },
        )
        .await?;
        self.metrics.uploaded_bytes.inc_by(sending);
        self.metrics.rounds_trained.inc();
        if let Some(pending) = self.pending.take()
            && let Some(c) = pending.control
        {
            let layout = ModelSpec::from_plan(plan).layout();
            crate::scaffold::save(&c.path, &layout, &c.updated, round)?;
        }
        tracing::info!(
            training = tid,
            round,
            // Whatever the coordinator sent, shortened (a char boundary, never a panic).
            digest = receipt.sha256.get(..19).unwrap_or(&receipt.sha256),
            "delta accepted by the coordinator"
        );
        Ok(())
    }

    /// Downloads the round's model, trains locally and returns the delta to send.
    async fn compute_delta(
        &mut self,
        client: &mut FederationClient<Channel>,
        tid: &str,
        round: u32,
        plan: &TrainingPlan,
        info: &pb::ModelInfo,
        control: Option<pb::ModelInfo>,
    ) -> Result<PendingUpload> {
        let prepared = self.site.prepare(tid, plan)?;
        let scaffold = match control {
            Some(c) => Some(self.scaffold_inputs(client, tid, plan, &c).await?),
            None => None,
        };
        let start = download(client, tid, info).await?;
        self.metrics.downloaded_bytes.inc_by(4 * start.len() as u64);
        let (train_set, _) = site::scaled(&prepared, plan)?;
        let n = train_set.len() as u64;
        let spec = ModelSpec::from_plan(plan);
        let privacy = crate::privacy::for_round(&self.cfg.privacy, plan, n, round)?;
        let mut cfg = LocalTraining::from_plan(plan, round);
        if let RoundPrivacy::Record { sgd, .. } = &privacy {
            cfg.dp = Some(sgd.clone());
        }
        cfg.scaffold_correction = scaffold.as_ref().map(ScaffoldInputs::correction);
        let backend = self.cfg.backend;
        let begin = std::time::Instant::now();
        let with_control = scaffold.is_some();
        self.metrics.training_in_progress.set(1);
        // The global model goes to the training thread and comes back, rather than
        // being cloned for it: one model-sized buffer fewer at the peak.
        let outcome = tokio::task::spawn_blocking(move || {
            train_on_this_thread(backend, &spec, start, &train_set, &cfg, with_control, round)
        })
        .await
        .map_err(|e| ParticipantError::Transfer(format!("training thread: {e}")));
        self.metrics.training_in_progress.set(0);
        let (outcome, gradient, start) = outcome?;
        let outcome = outcome?;
        let gradient = gradient.transpose()?;
        let loss = outcome.epoch_losses.last().copied().unwrap_or(f64::NAN);
        let mut delta = outcome.params;
        for (d, g) in delta.iter_mut().zip(&start) {
            *d -= g;
        }
        drop(start);
        self.metrics
            .local_training
            .observe(begin.elapsed().as_secs_f64());
        self.metrics.last_train_loss.set(loss);
        tracing::info!(
            training = tid,
            round,
            examples = n,
            "local training done in {:.2}s, loss {:.4}",
            begin.elapsed().as_secs_f64(),
            loss
        );
        let dp = crate::privacy::finish_update(privacy, &mut delta, plan, tid, round);
        let control = match (scaffold, gradient) {
            (Some(inputs), Some(updated)) => Some(inputs.append_change(&mut delta, updated)),
            _ => None,
        };
        // Encoding is deterministic, so a resumed upload sends the same chunks
        // (and the same digest) as the attempt that broke off.
        let encoding = plan.training.update_encoding;
        let num_params = delta.len() as u64;
        let chunks: Arc<[bytes::Bytes]> =
            crate::privacy::encode_within_clip(plan, &mut delta, self.cfg.upload_chunk_bytes)?
                .into_iter()
                .map(bytes::Bytes::from)
                .collect();
        drop(delta);
        let algorithm = DigestAlgorithm::announced_by(info);
        let delta_digest = {
            let mut h = digest::Hasher::new(algorithm);
            for c in chunks.iter() {
                h.update(c);
            }
            h.finalize_id()
        };
        if let Some(dir) = &self.cfg.record_dir {
            record_delta(dir, tid, round, plan, &chunks, &delta_digest, n)?;
        }
        Ok(PendingUpload {
            training_id: tid.to_string(),
            round,
            base_sha256: info.sha256.clone(),
            num_params,
            encoding,
            chunks,
            values: None,
            algorithm,
            delta_digest,
            num_examples: n,
            weight: sangsaeng_common::privacy::dp::client_noise::fold_weight(plan, n),
            train_loss: loss,
            dp,
            control,
        })
    }

    /// SCAFFOLD: the round's server control variate c (downloaded like the
    /// model) and this site's own c_i (kept under `state_dir`).
    async fn scaffold_inputs(
        &mut self,
        client: &mut FederationClient<Channel>,
        tid: &str,
        plan: &TrainingPlan,
        info: &pb::ModelInfo,
    ) -> Result<ScaffoldInputs> {
        let path = crate::scaffold::control_path(self.cfg.state_dir.as_deref(), tid)?;
        let layout = ModelSpec::from_plan(plan).layout();
        let own = crate::scaffold::load(&path, &layout)?;
        let server = download_object(client, tid, info, true).await?;
        if server.len() != own.len() {
            return Err(ParticipantError::Common(sangsaeng_common::Error::Protocol(
                format!(
                    "the server control variate has {} values, the model {}",
                    server.len(),
                    own.len()
                ),
            )));
        }
        Ok(ScaffoldInputs { path, server, own })
    }

    async fn leave(&mut self, reason: &str) {
        if let Some(c) = self.client.as_mut() {
            // Bounded: a coordinator that is gone must not hold up our shutdown.
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(3),
                c.leave(pb::LeaveRequest {
                    reason: reason.into(),
                }),
            )
            .await;
            match r {
                Ok(Ok(_)) => tracing::info!("told the coordinator we are leaving"),
                _ => tracing::warn!("could not tell the coordinator we are leaving"),
            }
        }
    }
}

/// Downloads a global model, checking each chunk and the whole
/// ([`ModelAssembler`]); resumes a broken transfer from the last good chunk.
pub async fn download(
    client: &mut FederationClient<Channel>,
    training_id: &str,
    info: &pb::ModelInfo,
) -> Result<Vec<f32>> {
    download_object(client, training_id, info, false).await
}

/// [`download`] of the round's model, or (`control_variate`) of SCAFFOLD's
/// server control variate, checked and resumed the same way.
async fn download_object(
    client: &mut FederationClient<Channel>,
    training_id: &str,
    info: &pb::ModelInfo,
    control_variate: bool,
) -> Result<Vec<f32>> {
    let mut model = ModelAssembler::new(info)?;
    let mut attempts = 0;
    let mut bar: Option<crate::progress::Progress> = None;
    loop {
        attempts += 1;
        let result: Result<bool> = async {
            let mut stream = client
                .download_model(pb::DownloadRequest {
                    training_id: training_id.into(),
                    model_round: info.round,
                    start_chunk: model.next_chunk(),
                    control_variate,
                })
                .await
                .map_err(|s| ParticipantError::rpc("DownloadModel", s))?
                .into_inner();
            while let Some(c) = stream
                .message()
                .await
                .map_err(|s| ParticipantError::rpc("DownloadModel", s))?
            {
                let (index, total) = (c.index, c.total_chunks);
                let complete = model.push(&c)?;
                bar.get_or_insert_with(|| {
                    crate::progress::Progress::new(
                        format!("round {} model download", info.round),
                        u64::from(total),
                        "chunks",
                    )
                })
                .set(u64::from(index) + 1, String::new);
                if complete {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        .await;
        match result {
            Ok(true) => break,
            Ok(false) => {
                if attempts >= DOWNLOAD_ATTEMPTS {
                    return Err(ParticipantError::Transfer(
                        "model download ended early".into(),
                    ));
                }
            }
            Err(e) if e.is_transient() && attempts < DOWNLOAD_ATTEMPTS => {
                tracing::warn!(
                    "model download interrupted at chunk {} ({e}); resuming",
                    model.next_chunk()
                );
            }
            Err(e) => return Err(e),
        }
    }
    model.finish()
}

/// One round's local training (on a blocking thread), with its progress bar,
/// and under SCAFFOLD the control variate c_i' (option I: the rows' mean
/// gradient at the global model). Hands `start` back for the delta.
fn train_on_this_thread(
    backend: sangsaeng_common::learning::backend::BackendKind,
    spec: &ModelSpec,
    start: Vec<f32>,
    train_set: &sangsaeng_common::learning::data::Dataset,
    cfg: &LocalTraining,
    with_control: bool,
    round: u32,
) -> (
    sangsaeng_common::Result<train::TrainOutcome>,
    Option<sangsaeng_common::Result<Vec<f32>>>,
    Vec<f32>,
) {
    let gradient = with_control.then(|| {
        sangsaeng_common::learning::scaffold::mean_gradient(
            backend,
            spec,
            &start,
            train_set,
            cfg.objective,
        )
    });
    let mut bar: Option<crate::progress::Progress> = None;
    let outcome = train::train_local_observed(backend, spec, &start, train_set, cfg, &mut |p| {
        bar.get_or_insert_with(|| {
            crate::progress::Progress::new(
                format!("round {round} local training"),
                p.total,
                "steps",
            )
        })
        .set(p.done, || format!("epoch {} loss {:.4}", p.epoch, p.loss))
    });
    drop(bar);
    (outcome, gradient, start)
}

/// Downloads a finished training's final model and writes it, with its plan,
/// to `model_dir/<training>/` (each file written atomically).
async fn keep_final_model(
    client: &mut FederationClient<Channel>,
    model_dir: &Path,
    tid: &str,
    info: &pb::ModelInfo,
    plan: &pb::TrainingPlan,
) -> Result<std::path::PathBuf> {
    let plan = plan_from_proto(plan)?;
    let dir = crate::scaffold::training_dir(model_dir, tid)?;
    let params = download(client, tid, info).await?;
    std::fs::create_dir_all(&dir).map_err(|e| sangsaeng_common::Error::io(&dir, e))?;
    let plan_path = dir.join(crate::predict::PLAN_FILE);
    let tmp = dir.join("plan.toml.tmp");
    std::fs::write(&tmp, plan.to_toml()).map_err(|e| sangsaeng_common::Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &plan_path).map_err(|e| sangsaeng_common::Error::io(&plan_path, e))?;
    let path = dir.join(crate::predict::MODEL_FILE);
    let meta = HashMap::from([
        ("round".to_string(), info.round.to_string()),
        ("sha256".to_string(), info.sha256.clone()),
        ("training".to_string(), tid.to_string()),
    ]);
    weights::save_safetensors(&path, &ModelSpec::from_plan(&plan).layout(), &params, meta)?;
    Ok(path)
}

/// Streams a delta (`wire::upload_messages`): header with the whole digest
/// declared (so a broken-off upload can be resumed), checked chunks from
/// `first_chunk`, trailer.
pub async fn upload(
    client: &mut FederationClient<Channel>,
    u: wire::UpdateUpload,
) -> Result<pb::UploadReceipt> {
    let total = u.chunks.len() as u64;
    let mut sent = u64::from(u.first_chunk);
    let mut bar =
        crate::progress::Progress::new(format!("round {} upload", u.round), total, "chunks");
    // The bar moves as tonic pulls each message from the stream.
    let stream = tokio_stream::iter(wire::upload_messages(u)?.inspect(move |m| {
        if matches!(m.part, Some(pb::update_message::Part::Chunk(_))) {
            sent += 1;
            bar.set(sent, String::new);
        }
    }));
    client
        .upload_update(stream)
        .await
        .map(|r| r.into_inner())
        .map_err(|s| ParticipantError::rpc("UploadUpdate", s))
}

/// Keeps the site's own copy of what it sent (safetensors, same layout as the
/// model): the delta as the coordinator decodes it from `chunks` (after
/// float16/int8 quantisation, if the plan asks for it), with the digest id of
/// the bytes sent (metadata `delta_digest`, as the coordinator's receipt names it).
fn record_delta(
    dir: &Path,
    tid: &str,
    round: u32,
    plan: &TrainingPlan,
    chunks: &[bytes::Bytes],
    wire_digest: &str,
    n: u64,
) -> Result<()> {
    let enc = plan.training.update_encoding;
    let mut sent = Vec::new();
    for c in chunks {
        sent.extend(encoding::decode_chunk(c, enc)?);
    }
    // Under SCAFFOLD the control-variate change follows; the record is the delta.
    let model_params = ModelSpec::from_plan(plan).num_params();
    let delta = &sent[..model_params.min(sent.len())];
    let d = dir.join(tid);
    std::fs::create_dir_all(&d).map_err(|e| sangsaeng_common::Error::io(&d, e))?;
    let meta = HashMap::from([
        ("round".to_string(), round.to_string()),
        ("num_examples".to_string(), n.to_string()),
        ("delta_digest".to_string(), wire_digest.to_string()),
        ("encoding".to_string(), enc.name().to_string()),
    ]);
    let layout = ModelSpec::from_plan(plan).layout();
    weights::save_safetensors(
        &d.join(format!("delta-round-{round:04}.safetensors")),
        &layout,
        delta,
        meta,
    )?;
    Ok(())
}
