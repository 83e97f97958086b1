//! Starting, resuming and abandoning a training, and the task that drives it.

use std::sync::Arc;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_proto::v1 as pb;

use super::driver::drive;
use super::phase::task;
use crate::durable::store::{Store, TrainingRecord};
use crate::error::{CoordinatorError, Result};
use crate::state::{Phase, Shared, Training};

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
            "plan_sha256": crate::durable::audit::text_digest(&rec.plan_toml),
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
    let declared_rows = shared.store.declared_rows(&rec.id)?;
    if declared_rows.is_empty() && global.is_some() {
        tracing::warn!(
            training = %rec.id,
            "this training's declared rows are not in the store (it began before they were recorded): its updates' example counts are bounded by limits.max_examples_per_update only"
        );
    }
    let mut t = Training::new(rec.id.clone(), plan, rec.output_dir.clone().into());
    t.declare_rows(declared_rows);
    t.claimed_rows = shared.store.claimed_rows(&rec.id)?;
    *shared.training() = Some(t);
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
        // A completed training's final model, for the sites to keep.
        let last = (t.phase == Phase::Completed)
            .then(|| t.models.values().next_back().map(|m| m.info()))
            .flatten();
        let task = task(
            &tid,
            t.round,
            pb::task::Kind::Finished(pb::TrainingFinished {
                outcome: outcome_text,
                plan: last
                    .is_some()
                    .then(|| sangsaeng_common::transfer::wire::plan_to_proto(&t.plan)),
                model: last,
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
