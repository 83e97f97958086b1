//! The round driver: one task per training that moves it through its phases,
//! written as the protocol's steps in the order they happen.
//!
//! waiting for participants → collecting statistics (federated scaling) →
//! for each round: open it → collect updates (folded as they arrive, see
//! [`super::upload`]) → close it → aggregate ([`super::aggregate`]: robust
//! rule, server optimiser) → commit → evaluate → record → completed.
//!
//! A round with fewer than `min_participants` updates is re-run up to
//! `limits.round_attempts` times; after that the training fails with a status that
//! says why, never a silent hang.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sangsaeng_common::aggregation::fedavg::Accumulator;
use sangsaeng_common::aggregation::server::ServerOptimizer;
use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::learning::model::{ModelSpec, TensorSpec};
use sangsaeng_common::transfer::weights;
use sangsaeng_common::transfer::wire::plan_to_proto;
use sangsaeng_proto::v1 as pb;

use super::aggregate::{
    RoundInputs, aggregate, load_optimizer, remove_older_optimizer_state, save_optimizer,
};
use super::commit::{
    commit_model_off_runtime, model_metadata, publish, remove_spills, remove_spills_later,
    remove_stale_spills,
};
use super::evaluate::evaluate;
use super::phase::{all_answered, open_phase, task, wait_for_participants, wait_until};
use super::record::{RoundRecord, Timings, append_jsonl, audit_round, fmt_opt, round_record};
use super::statistics::collect_scaling;
use crate::durable::store::{AcceptedUpdate, TrainingRecord};
use crate::error::{CoordinatorError, Result};
use crate::state::{Phase, Shared};
use crate::transfer::PublishedModel;
use crate::transfer::spill::SpilledUpdate;

/// What every step of one training's rounds needs, fixed once the plan is final.
struct Run {
    id: String,
    plan: TrainingPlan,
    wire_plan: pb::TrainingPlan,
    layout: Vec<TensorSpec>,
    out_dir: PathBuf,
    metrics_path: PathBuf,
    deadline: Duration,
}

/// The updates of a round that closed with enough of them.
struct Collected {
    accepted: Vec<AcceptedUpdate>,
    accumulator: Accumulator,
    /// The accepted updates' spills, when the robust rule reads them back.
    spilled: Vec<SpilledUpdate>,
    /// Updates refused this round, with the reason.
    refused: BTreeMap<String, String>,
    attempts: u32,
    train_phase_secs: f64,
    fold_secs: f64,
    /// How the secure round went (secure aggregation only).
    secure: Option<crate::secure::SecureRecord>,
}

/// Drives one training from its statistics phase (or the round it stopped at,
/// after a restart) to its end.
pub(super) async fn drive(
    shared: &Arc<Shared>,
    mut rec: TrainingRecord,
    stored_global: Option<Vec<f32>>,
) -> Result<()> {
    let (plan, mut published) = prepare_global_model(shared, &mut rec, stored_global).await?;
    let run = Run::new(shared, plan);
    let mut optimizer = Some(load_optimizer(
        &run.plan,
        &run.out_dir,
        published.params.len(),
        rec.completed_round,
    )?);
    let first_round = rec.completed_round + 1;
    tracing::info!(
        training = %run.id,
        params = published.params.len(),
        rounds = run.plan.training.rounds,
        from_round = first_round,
        "global model published"
    );
    remove_stale_spills(&run.out_dir, first_round);
    evaluate_committed_round(shared, &run, &mut rec, &published).await?;
    for round in first_round..=run.plan.training.rounds {
        published = run_round(shared, &run, &mut rec, published, round, &mut optimizer).await?;
    }
    finish_training(shared, &run, &published)
}

impl Run {
    fn new(shared: &Shared, plan: TrainingPlan) -> Self {
        let (id, out_dir) = {
            let guard = shared.training();
            let t = guard.as_ref().expect("a driver runs only with a training");
            (t.id.clone(), t.output_dir.clone())
        };
        Run {
            wire_plan: plan_to_proto(&plan),
            layout: ModelSpec::from_plan(&plan).layout(),
            metrics_path: out_dir.join("metrics.jsonl"),
            deadline: Duration::from_secs(plan.training.round_deadline_secs),
            id,
            plan,
            out_dir,
        }
    }
}

/// The model round 1 starts from: the stored one after a restart, or (first
/// run) the statistics phase's scaling written into the plan and a freshly
/// initialised model committed as round 0.
async fn prepare_global_model(
    shared: &Arc<Shared>,
    rec: &mut TrainingRecord,
    stored_global: Option<Vec<f32>>,
) -> Result<(TrainingPlan, Arc<PublishedModel>)> {
    let (plan, out_dir) = {
        let guard = shared.training();
        let t = guard.as_ref().expect("a driver runs only with a training");
        (t.plan.clone(), t.output_dir.clone())
    };
    if let Some(global) = stored_global {
        let chunk_bytes = shared.config.limits.max_chunk_bytes;
        let model = PublishedModel::new(rec.completed_round, global, chunk_bytes);
        return Ok((plan, publish(shared, model)));
    }
    let plan = collect_scaling(shared, plan, &shared.config.limits).await?;
    std::fs::write(out_dir.join("plan.toml"), plan.to_toml())
        .map_err(|e| CoordinatorError::io("writing plan.toml", e))?;
    shared.training().as_mut().expect("training").plan = plan.clone();
    let spec = ModelSpec::from_plan(&plan);
    let global = spec.init_params(plan.training.seed);
    rec.plan_toml = plan.to_toml();
    rec.completed_round = 0;
    rec.evaluated_round = 0;
    let published = commit_model_off_runtime(shared, &plan, &spec.layout(), rec, global).await?;
    Ok((plan, published))
}

/// A restart between committing a round and writing its metrics: evaluate and
/// record that round now, so every committed round has its line and audit entry.
async fn evaluate_committed_round(
    shared: &Shared,
    run: &Run,
    rec: &mut TrainingRecord,
    published: &PublishedModel,
) -> Result<()> {
    if rec.completed_round <= rec.evaluated_round {
        return Ok(());
    }
    let round = rec.completed_round;
    let evaluations = evaluate(shared, &run.wire_plan, published, run.deadline).await?;
    let timings = Timings {
        train_phase_secs: 0.0,
        fold_secs: 0.0,
        aggregate_secs: 0.0,
        eval_phase_secs: 0.0,
        round_secs: 0.0,
    };
    let updates = rec.last_updates.clone();
    let spend = super::privacy::round_spend(&run.plan, &updates, round)?;
    let mut record = round_record(
        &run.id,
        round,
        &published.sha256,
        updates,
        evaluations,
        timings,
        1,
    );
    record.privacy = spend;
    if run.plan.secure_aggregation() {
        let survivors = record
            .participants
            .iter()
            .map(|u| u.org_id.clone())
            .collect();
        record.secure = Some(crate::secure::SecureRecord::after_restart(survivors));
    }
    record_round(shared, run, rec, &record)
}

/// One round, from opening it to its recorded evaluation; returns the new global model.
async fn run_round(
    shared: &Arc<Shared>,
    run: &Run,
    rec: &mut TrainingRecord,
    published: Arc<PublishedModel>,
    round: u32,
    optimizer: &mut Option<ServerOptimizer>,
) -> Result<Arc<PublishedModel>> {
    let round_start = Instant::now();
    publish_control(
        shared,
        round,
        optimizer.as_ref().expect("the driver holds it"),
    );
    let mut collected = collect_updates(shared, run, round, &published).await?;
    let agg_start = Instant::now();
    let inputs = RoundInputs {
        accumulator: collected.accumulator,
        spilled: std::mem::take(&mut collected.spilled),
    };
    let aggregated = aggregate(shared, &run.plan, published, inputs, optimizer).await?;
    let aggregate_secs = agg_start.elapsed().as_secs_f64();
    if let Some(r) = &aggregated.robust {
        // An update a rule left out is not a contribution to the model: the
        // release rules (consent, k contributors, shares) must not count it.
        collected
            .accepted
            .retain(|u| !r.excluded.contains_key(&u.org_id));
    }
    save_optimizer(
        optimizer.as_ref().expect("handed back"),
        &run.out_dir,
        round,
    )?;
    rec.completed_round = round;
    rec.last_updates = collected.accepted.clone();
    let published =
        commit_model_off_runtime(shared, &run.plan, &run.layout, rec, aggregated.global).await?;
    remove_spills_later(&run.out_dir, round);
    remove_older_optimizer_state(&run.out_dir, round);

    let eval_start = Instant::now();
    let evaluations = evaluate(shared, &run.wire_plan, &published, run.deadline).await?;
    let timings = Timings {
        train_phase_secs: collected.train_phase_secs,
        fold_secs: collected.fold_secs,
        aggregate_secs,
        eval_phase_secs: eval_start.elapsed().as_secs_f64(),
        round_secs: round_start.elapsed().as_secs_f64(),
    };
    let spend = super::privacy::round_spend(&run.plan, &collected.accepted, round)?;
    let mut record = round_record(
        &run.id,
        round,
        &published.sha256,
        collected.accepted,
        evaluations,
        timings,
        collected.attempts,
    );
    record.privacy = spend;
    record.secure = collected.secure;
    record.robust = aggregated.robust;
    record.refused = collected.refused;
    record_round(shared, run, rec, &record)?;
    log_round(&run.plan, &record);
    Ok(published)
}

/// SCAFFOLD: the server control variate this round's sites correct their
/// steps with, published for download beside the model.
fn publish_control(shared: &Shared, round: u32, optimizer: &ServerOptimizer) {
    let c = optimizer.control();
    let mut guard = shared.training();
    let t = guard.as_mut().expect("a driver runs only with a training");
    t.control = (!c.is_empty()).then(|| {
        let chunk_bytes = shared.config.limits.max_chunk_bytes;
        Arc::new(PublishedModel::new(round - 1, c.to_vec(), chunk_bytes))
    });
}

/// Opens the round, waits for its updates and closes it, re-running it while
/// fewer than `min_participants` updates were accepted (up to `limits.round_attempts`).
async fn collect_updates(
    shared: &Arc<Shared>,
    run: &Run,
    round: u32,
    published: &PublishedModel,
) -> Result<Collected> {
    let min = run.plan.training.min_participants;
    let mut attempt = 0;
    loop {
        attempt += 1;
        wait_for_participants(shared, min).await?;
        let phase_start = Instant::now();
        let deadline = tokio::time::Instant::now() + run.deadline;
        let opened = open_round(shared, run, round, published, attempt);
        let exchanged = match opened {
            Ok(()) if run.plan.secure_aggregation() => {
                super::secure::exchange_keys(shared, &run.id, deadline).await
            }
            other => other,
        };
        if let Err(e) = exchanged {
            rerun_or_fail_because(shared, run, round, attempt, e)?;
            continue;
        }
        let all = wait_until(shared, Some(deadline), all_answered).await?;
        let closed = close_round(shared, round, all).await?;
        let (accepted, fold_secs) = (closed.accepted, closed.fold_secs);
        let accumulator = closed
            .accumulator
            .expect("a training round has an accumulator");
        if accepted.len() < min {
            let msg = format!(
                "only {} of the required {min} updates were accepted",
                accepted.len()
            );
            rerun_or_fail_because(
                shared,
                run,
                round,
                attempt,
                CoordinatorError::FailedPrecondition(msg),
            )?;
            continue;
        }
        let (accumulator, secure) = match run.plan.secure_aggregation() {
            false => (accumulator, None),
            true => {
                match super::secure::unmask_sum(shared, &run.id, accumulator, run.deadline).await {
                    Ok((acc, record)) => (acc, Some(record)),
                    Err(e) => {
                        rerun_or_fail_because(shared, run, round, attempt, e)?;
                        continue;
                    }
                }
            }
        };
        return Ok(Collected {
            accepted,
            accumulator,
            spilled: closed.spilled,
            refused: closed.refused,
            attempts: attempt,
            train_phase_secs: phase_start.elapsed().as_secs_f64(),
            fold_secs,
            secure,
        });
    }
}

/// Sends the training task to every eligible participant; updates accepted in
/// this round before a restart are folded in first and not asked for again
/// (except in a secure round, whose masks died with the attempt's keys: it is
/// redone whole).
fn open_round(
    shared: &Shared,
    run: &Run,
    round: u32,
    published: &PublishedModel,
    attempt: u32,
) -> Result<()> {
    let model_info = published.info();
    let secure = run.plan.secure_aggregation();
    if secure {
        shared.store.clear_contributions(&run.id, round)?;
    }
    let preload = shared.store.contributions(&run.id, round)?;
    if !preload.is_empty() {
        tracing::info!(
            round,
            updates = preload.len(),
            "restoring updates accepted before the restart"
        );
    }
    let selected = open_phase(shared, Phase::Training, round, preload, |t| {
        let secure = match secure {
            true => Some(super::secure::open_attempt(t, round, attempt)?),
            false => None,
        };
        Ok(task(
            &t.id,
            round,
            pb::task::Kind::Train(pb::TrainTask {
                plan: Some(run.wire_plan.clone()),
                model: Some(model_info.clone()),
                secure,
                control: t.control.as_ref().map(|c| c.info()),
            }),
        ))
    })?;
    tracing::info!(round, participants = selected.len(), "round opened");
    Ok(())
}

/// What a closed round hands back.
struct Closed {
    accepted: Vec<AcceptedUpdate>,
    accumulator: Option<Accumulator>,
    spilled: Vec<SpilledUpdate>,
    refused: BTreeMap<String, String>,
    /// CPU seconds of folding.
    fold_secs: f64,
}

/// Closes the round to further uploads, undoes the unfinished ones and hands
/// back what was accepted: the updates, the accumulator and the fold's CPU time.
async fn close_round(shared: &Arc<Shared>, round: u32, all_answered: bool) -> Result<Closed> {
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
    super::upload::undo_unfinished_uploads(shared).await?;
    let released = shared.release_reserved_uploads();
    if released > 0 {
        tracing::info!(
            round,
            released,
            "upload slots reserved for the closed round freed"
        );
    }
    if !all_answered {
        tracing::warn!(round, missing = ?waiting, "round deadline passed; closing with the updates received");
        for org in &waiting {
            shared.record_error(
                org,
                format!("no update for round {round} before the deadline"),
            );
        }
    }
    let mut guard = shared.training();
    let t = guard.as_mut().expect("training");
    Ok(Closed {
        accepted: t.accepted.values().cloned().collect(),
        accumulator: t.accumulator.take(),
        // Ordered by organisation (the map's order), as everything a rule
        // computes must not depend on the order updates arrived in.
        spilled: std::mem::take(&mut t.spilled).into_values().collect(),
        refused: t.rejected.clone(),
        fold_secs: t.fold_time.as_secs_f64(),
    })
}

/// A round that could not complete (short of `min_participants`, or a secure
/// round that lost too many participants to unmask): forgets its updates so it
/// can run again, or fails the training once `limits.round_attempts` are spent.
/// Only a round-level condition (FAILED_PRECONDITION) re-runs; anything else
/// (the shutdown, a failing disk) ends the training as before. Each re-run is
/// in the audit log with its reason.
fn rerun_or_fail_because(
    shared: &Shared,
    run: &Run,
    round: u32,
    attempt: u32,
    why: CoordinatorError,
) -> Result<()> {
    let CoordinatorError::FailedPrecondition(reason) = why else {
        return Err(why);
    };
    if let Some(t) = shared.training().as_mut() {
        t.secure = None;
    }
    let attempts = shared.config.limits.round_attempts;
    let msg = format!("round {round}: {reason}");
    if attempt >= attempts {
        return Err(CoordinatorError::FailedPrecondition(format!(
            "{msg} after {attempt} attempts"
        )));
    }
    shared.store.clear_contributions(&run.id, round)?;
    remove_spills(&run.out_dir, round);
    shared.audit.record(
        "round_rerun",
        serde_json::json!({"training": run.id, "round": round, "attempt": attempt, "reason": reason}),
    );
    tracing::warn!("{msg}; re-running the round (attempt {attempt} of {attempts})");
    Ok(())
}

/// Writes the round's metrics line and audit entry, then marks it evaluated in
/// the store (so a restart does not evaluate it again).
fn record_round(
    shared: &Shared,
    run: &Run,
    rec: &mut TrainingRecord,
    record: &RoundRecord,
) -> Result<()> {
    append_jsonl(&run.metrics_path, record)?;
    audit_round(shared, record)?;
    shared.metrics.round_recorded(record);
    rec.evaluated_round = record.round;
    shared.store.put_training(rec)
}

fn log_round(plan: &TrainingPlan, record: &RoundRecord) {
    if let Some(r2) = record.eval_r2 {
        tracing::info!(
            "round {}/{}: {} updates, {} examples, train loss {:.4}, val loss {}, MAE {}, RMSE {}, R² {:.4}, {:.2}s",
            record.round,
            plan.training.rounds,
            record.participants.len(),
            record.total_examples,
            record.train_loss,
            fmt_opt(record.eval_loss),
            fmt_opt(record.eval_mae),
            fmt_opt(record.eval_rmse),
            r2,
            record.timings.round_secs
        );
        return;
    }
    tracing::info!(
        "round {}/{}: {} updates, {} examples, train loss {:.4}, val loss {}, accuracy {}, macro-F1 {}, {:.2}s",
        record.round,
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

/// The final model as `global.safetensors` and the training's last audit entry.
fn finish_training(shared: &Shared, run: &Run, published: &PublishedModel) -> Result<()> {
    let rounds = run.plan.training.rounds;
    weights::save_safetensors(
        &run.out_dir.join("global.safetensors"),
        &run.layout,
        &published.params,
        model_metadata(&run.plan, rounds),
    )?;
    shared.audit.append(
        "training_finished",
        serde_json::json!({
            "training": run.id,
            "rounds": rounds,
            "plan_sha256": crate::durable::audit::text_digest(&run.plan.to_toml()),
            "global_model_sha256": published.sha256,
        }),
    )?;
    Ok(())
}
