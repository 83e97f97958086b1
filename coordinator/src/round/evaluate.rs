//! The evaluation phase: each site scores the round's global model on its own
//! validation split and reports loss, accuracy and macro-F1.

use std::time::Duration;

use sangsaeng_proto::v1 as pb;

use super::phase::{all_answered, open_phase, task, wait_until};
use crate::error::Result;
use crate::state::{EvalRecord, Phase, Shared};
use crate::transfer::PublishedModel;

/// Evaluation is a forward pass over a validation split: it gets a shorter wait than training.
pub(super) const EVALUATION_DEADLINE_FRACTION: u32 = 4;

/// Asks every connected participant to score a global model on its validation split.
pub(super) async fn evaluate(
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
        Ok(task(
            &t.id,
            model.round,
            pb::task::Kind::Evaluate(pb::EvaluateTask {
                plan: Some(wire_plan.clone()),
                model: Some(info.clone()),
            }),
        ))
    })?;
    let eval_deadline = tokio::time::Instant::now() + deadline / EVALUATION_DEADLINE_FRACTION;
    wait_until(shared, Some(eval_deadline), all_answered).await?;
    Ok(shared
        .training()
        .as_ref()
        .map(|t| t.evaluations.values().cloned().collect())
        .unwrap_or_default())
}
