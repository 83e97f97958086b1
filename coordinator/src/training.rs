//! The round driver: one task per training that moves it through its phases.
//!
//! waiting for participants → collecting statistics (federated scaling) →
//! for each round: training (collect deltas, FedAvg) → evaluating (each site
//! scores the new global model on its validation split) → completed.
//!
//! A phase sends one task to each selected participant and then waits until all
//! of them answered (or left, or declined) or the round deadline passes. A round
//! with fewer than `min_participants` updates is re-run up to
//! `limits.round_attempts` times; after that the training fails with a status that
//! says why, never a silent hang.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::time::sleep_until;

use sangsaeng_common::data::FeatureStats;
use sangsaeng_common::fedavg::Accumulator;
use sangsaeng_common::model::ModelSpec;
use sangsaeng_common::plan::TrainingPlan;
use sangsaeng_common::weights;
use sangsaeng_common::wire::plan_to_proto;
use sangsaeng_proto::v1 as pb;

use crate::error::{CoordinatorError, Result};
use crate::state::{AcceptedUpdate, EvalRecord, Phase, Shared, Training};
use crate::store::{Store, StoredContribution, TrainingRecord};
use crate::transfer::{ModelDigests, PublishedModel};

/// Evaluation is a forward pass over a validation split: it gets a shorter wait than training.
const EVALUATION_DEADLINE_FRACTION: u32 = 4;

/// One line of `metrics.jsonl`.
#[derive(Debug, Serialize)]
pub struct RoundRecord {
    pub training_id: String,
    pub round: u32,
    pub finished_at: String,
    pub model_sha256: String,
    pub participants: Vec<AcceptedUpdate>,
    pub total_examples: u64,
    /// Example-weighted mean of the participants' last-epoch training loss.
    pub train_loss: f64,
    /// Validation metrics of this round's global model, weighted by validation rows.
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_macro_f1: Option<f64>,
    pub evaluations: Vec<EvalRecord>,
    pub timings: Timings,
    pub attempts: u32,
}

#[derive(Debug, Serialize)]
pub struct Timings {
    pub train_phase_secs: f64,
    /// CPU time spent folding update chunks into the accumulator (thread CPU
    /// time, not wall time), summed over all uploads of the round (it overlaps
    /// the training phase: chunks are folded as they arrive).
    pub fold_secs: f64,
    /// Applying the accumulated mean to the model once the round closed.
    pub aggregate_secs: f64,
    pub eval_phase_secs: f64,
    pub round_secs: f64,
}

/// Starts a training: creates its folder, its durable record and its state, and spawns its driver.
pub fn start(shared: &Arc<Shared>, plan: TrainingPlan) -> Result<String> {
    shared.config.check_plan(&plan)?;
    let id = format!(
        "t-{}",
        time::OffsetDateTime::now_utc()
            .format(time::macros::format_description!(
                "[year][month][day]-[hour][minute][second]-[subsecond digits:3]"
            ))
            .expect("formatting a UTC time cannot fail")
    );
    {
        let guard = shared.training();
        if let Some(t) = guard.as_ref().filter(|t| !t.phase.is_finished()) {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "training {} is still running (phase: {}); one training runs at a time",
                t.id,
                t.phase.name()
            )));
        }
    }
    let output_dir = shared.config.output_dir.join(&id);
    std::fs::create_dir_all(&output_dir)
        .map_err(|e| CoordinatorError::io(format!("creating {}", output_dir.display()), e))?;
    std::fs::write(output_dir.join("plan.toml"), plan.to_toml())
        .map_err(|e| CoordinatorError::io("writing plan.toml", e))?;
    let rec = Store::new_record(&id, plan.to_toml(), &output_dir);
    shared.store.put_training(&rec)?;
    shared.audit.append(
        "training_started",
        serde_json::json!({
            "training": id,
            "plan_sha256": crate::audit::text_digest(&rec.plan_toml),
            "plan_toml": rec.plan_toml,
        }),
    )?;
    *shared.training() = Some(Training::new(id.clone(), plan, output_dir));
    tracing::info!(training = %id, "training started");
    spawn_driver(shared, rec, None);
    Ok(id)
}

/// Resumes an unfinished training from the store after a restart.
pub fn resume(shared: &Arc<Shared>, rec: TrainingRecord) -> Result<()> {
    let plan = TrainingPlan::from_toml(&rec.plan_toml, &format!("stored plan of {}", rec.id))?;
    // Without scaling the statistics phase had not finished: it simply runs again.
    let global = match plan.scaling {
        Some(_) => shared.store.model(&rec.id)?,
        None => None,
    };
    tracing::info!(
        training = %rec.id,
        completed_round = rec.completed_round,
        rounds = plan.training.rounds,
        "resuming the unfinished training"
    );
    *shared.training() = Some(Training::new(
        rec.id.clone(),
        plan,
        rec.output_dir.clone().into(),
    ));
    spawn_driver(shared, rec, global);
    Ok(())
}

/// Marks an unfinished training as failed without running it.
pub fn abandon(shared: &Shared, mut rec: TrainingRecord) -> Result<()> {
    rec.finished = true;
    rec.error = Some("abandoned at restart: a newer training was pending".into());
    shared.store.put_training(&rec)
}

fn spawn_driver(shared: &Arc<Shared>, rec: TrainingRecord, global: Option<Vec<f32>>) {
    let driver = shared.clone();
    let tid = rec.id.clone();
    tokio::spawn(async move {
        let outcome = drive(&driver, rec, global).await;
        let interrupted = driver.shutdown.is_cancelled();
        let mut guard = driver.training();
        let Some(t) = guard.as_mut() else { return };
        match &outcome {
            Ok(()) => {
                t.phase = Phase::Completed;
                tracing::info!(training = %tid, "training completed: {}", t.output_dir.display());
            }
            // Stopped by shutdown: the store keeps it unfinished, so the next start resumes it.
            Err(_) if interrupted => {
                t.phase = Phase::Failed;
                t.error =
                    Some("interrupted by shutdown; resumes when the coordinator restarts".into());
                tracing::info!(training = %tid, round = t.round, "training interrupted by shutdown; it resumes at the next start");
                return;
            }
            Err(e) => {
                t.phase = Phase::Failed;
                t.error = Some(e.to_string());
                tracing::error!(training = %tid, "training failed: {e}");
            }
        }
        t.current_task = None;
        let error = t.error.clone();
        let outcome_text = error
            .clone()
            .unwrap_or_else(|| format!("completed {} rounds", t.plan.training.rounds));
        let task = task(
            &tid,
            t.round,
            pb::task::Kind::Finished(pb::TrainingFinished {
                outcome: outcome_text,
            }),
        );
        drop(guard);
        match driver.store.training(&tid) {
            Ok(Some(mut rec)) => {
                rec.finished = true;
                rec.error = error;
                if let Err(e) = driver.store.put_training(&rec) {
                    tracing::error!(training = %tid, "could not record the end of the training: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(training = %tid, "could not record the end of the training: {e}")
            }
        }
        for org in driver.connected() {
            driver.send_task(&org, task.clone());
        }
        driver.notify();
    });
}

fn task(training_id: &str, round: u32, kind: pb::task::Kind) -> pb::Task {
    pb::Task {
        training_id: training_id.to_string(),
        round,
        kind: Some(kind),
    }
}

/// Waits until `done` holds, the deadline passes (false) or the coordinator shuts down.
async fn wait_until(
    shared: &Shared,
    deadline: Option<tokio::time::Instant>,
    mut done: impl FnMut(&Shared) -> bool,
) -> Result<bool> {
    loop {
        let notified = shared.progress.notified();
        tokio::pin!(notified);
        // Register before checking, so a change between the check and the await is not missed.
        notified.as_mut().enable();
        if done(shared) {
            return Ok(true);
        }
        let far = tokio::time::Instant::now() + Duration::from_secs(24 * 3600);
        tokio::select! {
            _ = &mut notified => {}
            _ = sleep_until(deadline.unwrap_or(far)) => {
                if deadline.is_some() { return Ok(done(shared)); }
            }
            _ = shared.shutdown.cancelled() => {
                return Err(CoordinatorError::Aborted("the coordinator is shutting down".into()));
            }
        }
    }
}

/// Participants eligible for the training: connected and not declined.
fn eligible(shared: &Shared) -> BTreeSet<String> {
    let declined: BTreeSet<String> = shared
        .training()
        .as_ref()
        .map(|t| t.declined.keys().cloned().collect())
        .unwrap_or_default();
    shared
        .connected()
        .into_iter()
        .filter(|o| !declined.contains(o))
        .collect()
}

fn set_phase(shared: &Shared, phase: Phase) {
    if let Some(t) = shared.training().as_mut() {
        t.phase = phase;
    }
}

/// Waits until at least `min` eligible participants are connected.
async fn wait_for_participants(shared: &Shared, min: usize) -> Result<()> {
    if eligible(shared).len() < min {
        set_phase(shared, Phase::WaitingForParticipants);
        tracing::info!(
            connected = eligible(shared).len(),
            needed = min,
            "waiting for participants to connect"
        );
    }
    wait_until(shared, None, |s| eligible(s).len() >= min).await?;
    Ok(())
}

/// Sends a phase's task to every eligible participant and records who was asked.
///
/// `preload` are contributions to this training round already durably accepted
/// before a restart: they are folded in first and their senders are not asked again.
fn open_phase(
    shared: &Shared,
    phase: Phase,
    round: u32,
    preload: Vec<StoredContribution>,
    make: impl Fn(&Training) -> pb::Task,
) -> Result<BTreeSet<String>> {
    let mut selected = eligible(shared);
    let task = {
        let mut guard = shared.training();
        let t = guard.as_mut().expect("a driver runs only with a training");
        t.phase = phase;
        t.round = round;
        t.stats.clear();
        t.accepted.clear();
        t.rejected.clear();
        t.uploading.clear();
        t.evaluations.clear();
        t.left.clear();
        t.partial.clear();
        t.fold_time = Duration::ZERO;
        if phase == Phase::Training {
            let n = t.models[&(round - 1)].params.len();
            let mut acc = match t.spare_accumulator.take() {
                Some(mut acc) if acc.num_params() == n => {
                    acc.reset();
                    acc
                }
                _ => Accumulator::new(n),
            };
            for c in preload {
                c.fold_into(&mut acc)?;
                selected.insert(c.org_id.clone());
                t.accepted.insert(c.org_id.clone(), c.accepted());
            }
            t.accumulator = Some(acc);
        }
        t.selected = selected.clone();
        let task = make(t);
        t.current_task = Some(task.clone());
        task
    };
    let asked: BTreeSet<String> = {
        let guard = shared.training();
        let t = guard.as_ref().expect("training");
        selected
            .iter()
            .filter(|o| !t.has_answered(o))
            .cloned()
            .collect()
    };
    for org in &asked {
        shared.send_task(org, task.clone());
    }
    Ok(selected)
}

/// True when every selected participant answered, left or declined. A participant
/// that only lost its connection is still waited for (until the deadline).
fn all_answered(shared: &Shared) -> bool {
    let guard = shared.training();
    let Some(t) = guard.as_ref() else { return true };
    t.selected.iter().all(|o| t.has_answered(o))
}

async fn drive(
    shared: &Arc<Shared>,
    mut rec: TrainingRecord,
    stored_global: Option<Vec<f32>>,
) -> Result<()> {
    let (plan, id, out_dir) = {
        let guard = shared.training();
        let t = guard.as_ref().expect("a driver runs only with a training");
        (t.plan.clone(), t.id.clone(), t.output_dir.clone())
    };
    let min = plan.training.min_participants;
    let deadline = Duration::from_secs(plan.training.round_deadline_secs);
    let limits = shared.config.limits.clone();

    let (plan, mut published) = match stored_global {
        Some(global) => {
            shared.training().as_mut().expect("training").plan = plan.clone();
            let model = PublishedModel::new(
                rec.completed_round,
                global,
                shared.config.limits.max_chunk_bytes,
            );
            (plan, publish(shared, model))
        }
        None => {
            let plan = collect_scaling(shared, plan, &limits).await?;
            std::fs::write(out_dir.join("plan.toml"), plan.to_toml())
                .map_err(|e| CoordinatorError::io("writing plan.toml", e))?;
            shared.training().as_mut().expect("training").plan = plan.clone();
            let global = ModelSpec::from_plan(&plan).init_params(plan.training.seed);
            rec.plan_toml = plan.to_toml();
            rec.completed_round = 0;
            rec.evaluated_round = 0;
            let layout = ModelSpec::from_plan(&plan).layout();
            let published = commit_model_off_runtime(shared, &plan, &layout, &rec, global).await?;
            (plan, published)
        }
    };
    let wire_plan = plan_to_proto(&plan);
    let spec = ModelSpec::from_plan(&plan);
    let layout = spec.layout();
    let metrics_path = out_dir.join("metrics.jsonl");
    let first_round = rec.completed_round + 1;
    tracing::info!(
        training = %id,
        params = published.params.len(),
        rounds = plan.training.rounds,
        from_round = first_round,
        "global model published"
    );
    remove_stale_spills(&out_dir, first_round);

    // A restart between committing a round and writing its metrics: evaluate it now.
    if rec.completed_round > rec.evaluated_round {
        let round = rec.completed_round;
        let evaluations = evaluate(shared, &wire_plan, &published, deadline).await?;
        let timings = Timings {
            train_phase_secs: 0.0,
            fold_secs: 0.0,
            aggregate_secs: 0.0,
            eval_phase_secs: 0.0,
            round_secs: 0.0,
        };
        let record = round_record(
            &id,
            round,
            &published.sha256,
            rec.last_updates.clone(),
            evaluations,
            timings,
            1,
        );
        append_jsonl(&metrics_path, &record)?;
        audit_round(shared, &record)?;
        rec.evaluated_round = round;
        shared.store.put_training(&rec)?;
    }

    for round in first_round..=plan.training.rounds {
        let round_start = Instant::now();
        let mut attempt = 0;
        let (accepted, acc, train_secs, fold_secs) = loop {
            attempt += 1;
            wait_for_participants(shared, min).await?;
            let phase_start = Instant::now();
            let model_info = published.info();
            let preload = shared.store.contributions(&id, round)?;
            if !preload.is_empty() {
                tracing::info!(
                    round,
                    updates = preload.len(),
                    "restoring updates accepted before the restart"
                );
            }
            let selected = open_phase(shared, Phase::Training, round, preload, |t| {
                task(
                    &t.id,
                    round,
                    pb::task::Kind::Train(pb::TrainTask {
                        plan: Some(wire_plan.clone()),
                        model: Some(model_info.clone()),
                    }),
                )
            })?;
            tracing::info!(round, participants = selected.len(), "round opened");
            let all = wait_until(
                shared,
                Some(tokio::time::Instant::now() + deadline),
                all_answered,
            )
            .await?;
            let waiting: Vec<String> = {
                let mut guard = shared.training();
                let t = guard.as_mut().expect("training");
                // Closing the round: later uploads for it get FAILED_PRECONDITION.
                t.phase = Phase::WaitingForParticipants;
                t.selected
                    .iter()
                    .filter(|o| !t.has_answered(o))
                    .cloned()
                    .collect()
            };
            // Uploads still folding in (or kept for resumption) are undone before the
            // round is applied, so the model holds accepted updates only.
            crate::service::undo_unfinished_uploads(shared).await?;
            let released = shared.release_reserved_uploads();
            if released > 0 {
                tracing::info!(
                    round,
                    released,
                    "upload slots reserved for the closed round freed"
                );
            }
            let (accepted, acc, fold_secs): (Vec<AcceptedUpdate>, Option<Accumulator>, f64) = {
                let mut guard = shared.training();
                let t = guard.as_mut().expect("training");
                (
                    t.accepted.values().cloned().collect(),
                    t.accumulator.take(),
                    t.fold_time.as_secs_f64(),
                )
            };
            if !all {
                tracing::warn!(round, missing = ?waiting, "round deadline passed; closing with the updates received");
                for org in &waiting {
                    shared.record_error(
                        org,
                        format!("no update for round {round} before the deadline"),
                    );
                }
            }
            if accepted.len() >= min {
                break (
                    accepted,
                    acc.expect("accumulator"),
                    phase_start.elapsed().as_secs_f64(),
                    fold_secs,
                );
            }
            let msg = format!(
                "round {round}: only {} of the required {min} updates were accepted",
                accepted.len()
            );
            if attempt >= limits.round_attempts {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "{msg} after {attempt} attempts"
                )));
            }
            shared.store.clear_contributions(&id, round)?;
            remove_spills(&out_dir, round);
            tracing::warn!(
                "{msg}; re-running the round (attempt {attempt} of {})",
                limits.round_attempts
            );
        };

        let agg_start = Instant::now();
        // In place when no download still holds the old model: at 1e9 parameters a
        // second copy would be another 4 GB of coordinator memory.
        shared.training().as_mut().expect("training").models.clear();
        let mut global = match Arc::try_unwrap(published) {
            Ok(m) => m.into_params(),
            Err(shared_model) => shared_model.params.clone(),
        };
        acc.apply_in_place(&mut global)?;
        shared
            .training()
            .as_mut()
            .expect("training")
            .spare_accumulator = Some(acc);
        let aggregate_secs = agg_start.elapsed().as_secs_f64();
        rec.completed_round = round;
        rec.last_updates = accepted.clone();
        published = commit_model_off_runtime(shared, &plan, &layout, &rec, global).await?;
        remove_spills_later(&out_dir, round);

        let eval_start = Instant::now();
        let evaluations = evaluate(shared, &wire_plan, &published, deadline).await?;
        let record = round_record(
            &id,
            round,
            &published.sha256,
            accepted,
            evaluations,
            Timings {
                train_phase_secs: train_secs,
                fold_secs,
                aggregate_secs,
                eval_phase_secs: eval_start.elapsed().as_secs_f64(),
                round_secs: round_start.elapsed().as_secs_f64(),
            },
            attempt,
        );
        append_jsonl(&metrics_path, &record)?;
        audit_round(shared, &record)?;
        rec.evaluated_round = round;
        shared.store.put_training(&rec)?;
        tracing::info!(
            "round {}/{}: {} updates, {} examples, train loss {:.4}, val loss {}, accuracy {}, macro-F1 {}, {:.2}s",
            round,
            plan.training.rounds,
            record.participants.len(),
            record.total_examples,
            record.train_loss,
            fmt_opt(record.eval_loss),
            fmt_opt(record.eval_accuracy),
            fmt_opt(record.eval_macro_f1),
            record.timings.round_secs
        );
    }
    let final_path = out_dir.join("global.safetensors");
    weights::save_safetensors(
        &final_path,
        &layout,
        &published.params,
        model_metadata(&plan, plan.training.rounds),
    )?;
    shared.audit.append(
        "training_finished",
        serde_json::json!({
            "training": id,
            "rounds": plan.training.rounds,
            "plan_sha256": crate::audit::text_digest(&plan.to_toml()),
            "global_model_sha256": published.sha256,
        }),
    )?;
    Ok(())
}

/// The audit entry of a completed and evaluated round: who contributed, with which
/// update (digest) and weight, the resulting global model and its evaluation.
/// Written after the round is committed and its metrics line written, so a
/// restart that re-evaluates a committed round also writes its entry.
fn audit_round(shared: &Shared, r: &RoundRecord) -> Result<()> {
    let contributions: Vec<serde_json::Value> = r
        .participants
        .iter()
        .map(|p| serde_json::json!({"org": p.org_id, "sha256": p.sha256, "weight": p.num_examples}))
        .collect();
    shared.audit.append(
        "round_completed",
        serde_json::json!({
            "training": r.training_id,
            "round": r.round,
            "contributions": contributions,
            "global_model_sha256": r.model_sha256,
            "eval_macro_f1": r.eval_macro_f1,
            "eval_accuracy": r.eval_accuracy,
            "eval_examples": r.evaluations.iter().map(|e| e.num_examples).sum::<u64>(),
        }),
    )?;
    Ok(())
}

/// Federated feature scaling: only counts, sums and sums of squares leave a site.
async fn collect_scaling(
    shared: &Shared,
    mut plan: TrainingPlan,
    limits: &crate::config::Limits,
) -> Result<TrainingPlan> {
    let min = plan.training.min_participants;
    let deadline = Duration::from_secs(plan.training.round_deadline_secs);
    let mut attempt = 0;
    loop {
        attempt += 1;
        wait_for_participants(shared, min).await?;
        let wire_plan = plan_to_proto(&plan);
        let selected = open_phase(shared, Phase::CollectingStatistics, 0, vec![], |t| {
            task(
                &t.id,
                0,
                pb::task::Kind::Stats(pb::StatsTask {
                    plan: Some(wire_plan.clone()),
                }),
            )
        })?;
        tracing::info!(
            participants = selected.len(),
            "collecting feature statistics"
        );
        wait_until(
            shared,
            Some(tokio::time::Instant::now() + deadline),
            all_answered,
        )
        .await?;
        let stats: BTreeMap<String, FeatureStats> = shared
            .training()
            .as_ref()
            .map(|t| t.stats.clone())
            .unwrap_or_default();
        if stats.len() >= min {
            let mut total = FeatureStats::empty(plan.n_features());
            // BTreeMap order: the merged statistics do not depend on arrival order.
            for s in stats.values() {
                total.merge(s)?;
            }
            tracing::info!(
                sites = stats.len(),
                rows = total.count,
                "global feature scaling computed"
            );
            plan.scaling = Some(total.to_scaling()?);
            return Ok(plan);
        }
        let msg = format!(
            "only {} of the required {min} participants sent statistics",
            stats.len()
        );
        if attempt >= limits.round_attempts {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "{msg} after {attempt} attempts"
            )));
        }
        tracing::warn!(
            "{msg}; retrying (attempt {attempt} of {})",
            limits.round_attempts
        );
    }
}

/// Asks every connected participant to score a global model on its validation split.
async fn evaluate(
    shared: &Shared,
    wire_plan: &pb::TrainingPlan,
    model: &PublishedModel,
    deadline: Duration,
) -> Result<Vec<EvalRecord>> {
    let enabled = shared
        .training()
        .as_ref()
        .is_some_and(|t| t.plan.training.evaluate);
    if !enabled {
        return Ok(vec![]);
    }
    let info = model.info();
    open_phase(shared, Phase::Evaluating, model.round, vec![], |t| {
        task(
            &t.id,
            model.round,
            pb::task::Kind::Evaluate(pb::EvaluateTask {
                plan: Some(wire_plan.clone()),
                model: Some(info.clone()),
            }),
        )
    })?;
    let eval_deadline = tokio::time::Instant::now() + deadline / EVALUATION_DEADLINE_FRACTION;
    wait_until(shared, Some(eval_deadline), all_answered).await?;
    Ok(shared
        .training()
        .as_ref()
        .map(|t| t.evaluations.values().cloned().collect())
        .unwrap_or_default())
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into())
}

fn model_metadata(plan: &TrainingPlan, round: u32) -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), "sangsaeng-mlp-v1".to_string()),
        ("round".to_string(), round.to_string()),
        ("plan_toml".to_string(), plan.to_toml()),
    ])
}

/// [`commit_model`] on a blocking thread: hashing, writing and fsyncing a model
/// (4 GB at P = 1e9, many seconds) would otherwise hold one of the runtime's
/// workers, which also serve every transfer, subscription and keepalive.
async fn commit_model_off_runtime(
    shared: &Arc<Shared>,
    plan: &TrainingPlan,
    layout: &[sangsaeng_common::model::TensorSpec],
    rec: &TrainingRecord,
    params: Vec<f32>,
) -> Result<Arc<PublishedModel>> {
    let (shared, plan, layout, rec) = (shared.clone(), plan.clone(), layout.to_vec(), rec.clone());
    tokio::task::spawn_blocking(move || commit_model(&shared, &plan, &layout, &rec, params))
        .await
        .map_err(|e| CoordinatorError::Store(format!("committing the round's model: {e}")))?
}

/// Makes a round's model the committed one: its file written and fsynced, then
/// the store's commit point 2 (round counter, model digest, contributions
/// dropped), then published for download.
fn commit_model(
    shared: &Shared,
    plan: &TrainingPlan,
    layout: &[sangsaeng_common::model::TensorSpec],
    rec: &TrainingRecord,
    params: Vec<f32>,
) -> Result<Arc<PublishedModel>> {
    let round = rec.completed_round;
    let file =
        std::path::Path::new(&rec.output_dir).join(format!("model-round-{round:04}.safetensors"));
    // The digests (SHA-256, BLAKE3, per chunk) on a second thread while this one
    // writes and fsyncs the file: both lie between the round's last update and
    // the next round's opening, with the cores otherwise idle (at P = 1e7 about
    // 57 ms of hashing beside 40-120 ms of writing).
    let chunk_bytes = shared.config.limits.max_chunk_bytes;
    let (digests, saved) = std::thread::scope(|s| {
        let digests = s.spawn(|| ModelDigests::of(&params, chunk_bytes));
        let saved = weights::save_safetensors(&file, layout, &params, model_metadata(plan, round));
        (
            digests.join().expect("hashing a model does not panic"),
            saved,
        )
    });
    saved?;
    let model = PublishedModel::with_digests(round, params, chunk_bytes, digests);
    shared.store.complete_round(
        rec,
        &crate::store::StoredModel {
            version: crate::store::RECORD_VERSION,
            round,
            sha256: model.sha256.clone(),
            file: file.display().to_string(),
        },
    )?;
    Ok(publish(shared, model))
}

/// Offers a committed model for download (only the current round's model is kept).
fn publish(shared: &Shared, model: PublishedModel) -> Arc<PublishedModel> {
    let round = model.round;
    let published = Arc::new(model);
    let mut guard = shared.training();
    let t = guard.as_mut().expect("training");
    t.models.clear();
    t.models.insert(round, published.clone());
    published
}

/// Deletes a committed round's spill files on a blocking thread, off the round
/// loop: unlinking a round's updates (1.28 GB at P = 1e7, K = 32) took 0.2 s,
/// which sat between the round's commit and the next round's opening. A crash
/// before it is done leaves them to [`remove_stale_spills`] at the next start.
fn remove_spills_later(out_dir: &std::path::Path, round: u32) {
    let out_dir = out_dir.to_path_buf();
    tokio::task::spawn_blocking(move || remove_spills(&out_dir, round));
}

/// Deletes the spill directories of rounds before `first_round`, all committed:
/// left behind by a crash between a round's commit and their removal.
fn remove_stale_spills(out_dir: &std::path::Path, first_round: u32) {
    let Ok(entries) = std::fs::read_dir(out_dir.join("updates")) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let stale = name
            .to_str()
            .and_then(|n| n.strip_prefix("round-"))
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|r| r < first_round);
        if stale {
            tracing::info!(dir = %e.path().display(), "deleting the spilled updates of a committed round");
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(dir = %e.path().display(), "could not delete spilled updates: {err}");
            }
        }
    }
}

/// Deletes the spill files of a round once it no longer needs them.
fn remove_spills(out_dir: &std::path::Path, round: u32) {
    let dir = crate::service::spill_dir(out_dir, round);
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), "could not delete spilled updates: {e}");
    }
}

fn round_record(
    id: &str,
    round: u32,
    sha: &str,
    participants: Vec<AcceptedUpdate>,
    evaluations: Vec<EvalRecord>,
    timings: Timings,
    attempts: u32,
) -> RoundRecord {
    let total_examples: u64 = participants.iter().map(|p| p.num_examples).sum();
    let train_loss = participants
        .iter()
        .map(|p| p.train_loss * p.num_examples as f64)
        .sum::<f64>()
        / total_examples.max(1) as f64;
    let eval_n: u64 = evaluations.iter().map(|e| e.num_examples).sum();
    let weighted = |f: fn(&EvalRecord) -> f64| {
        (eval_n > 0).then(|| {
            evaluations
                .iter()
                .map(|e| f(e) * e.num_examples as f64)
                .sum::<f64>()
                / eval_n as f64
        })
    };
    RoundRecord {
        training_id: id.to_string(),
        round,
        finished_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .expect("RFC 3339 formatting of a UTC time cannot fail"),
        model_sha256: sha.to_string(),
        total_examples,
        train_loss,
        eval_loss: weighted(|e| e.loss),
        eval_accuracy: weighted(|e| e.accuracy),
        eval_macro_f1: weighted(|e| e.macro_f1),
        participants,
        evaluations,
        timings,
        attempts,
    }
}

fn append_jsonl(path: &std::path::Path, record: &RoundRecord) -> Result<()> {
    use std::io::Write;
    let mut line = serde_json::to_string(record).expect("a round record always serialises");
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| CoordinatorError::io(format!("opening {}", path.display()), e))?;
    f.write_all(line.as_bytes())
        .and_then(|_| f.sync_data())
        .map_err(|e| CoordinatorError::io(format!("appending to {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_spills_of_committed_rounds_are_deleted_at_start() {
        let dir = tempfile::tempdir().unwrap();
        for round in [1, 2, 3] {
            let d = crate::service::spill_dir(dir.path(), round);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("a-1.bin"), b"x").unwrap();
        }
        let other = dir.path().join("updates").join("notes");
        std::fs::create_dir_all(&other).unwrap();
        // Rounds 1 and 2 are committed; round 3 is the one to resume, with its
        // spilled updates still needed.
        remove_stale_spills(dir.path(), 3);
        assert!(!crate::service::spill_dir(dir.path(), 1).exists());
        assert!(!crate::service::spill_dir(dir.path(), 2).exists());
        assert!(
            crate::service::spill_dir(dir.path(), 3)
                .join("a-1.bin")
                .exists()
        );
        assert!(other.exists(), "only round-NNNN folders are touched");
        // A coordinator that never spilled anything has no folder to read.
        remove_stale_spills(&dir.path().join("nowhere"), 5);
    }
}
