//! The statistics phase: federated feature scaling, computed from each site's
//! count, sum and sum of squares per feature (nothing else leaves a site).

use std::collections::BTreeMap;
use std::time::Duration;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::learning::data::FeatureStats;
use sangsaeng_common::transfer::wire::plan_to_proto;
use sangsaeng_proto::v1 as pb;

use super::phase::{all_answered, open_phase, task, wait_for_participants, wait_until};
use crate::error::{CoordinatorError, Result};
use crate::state::{Phase, Shared};

/// Binds each site's update weight to the rows its statistics counted, before
/// round 1 (stored first: a restart must check the same claims).
fn declare_rows(shared: &Shared, stats: &BTreeMap<String, FeatureStats>) -> Result<()> {
    let rows: BTreeMap<String, u64> = stats.iter().map(|(o, s)| (o.clone(), s.count)).collect();
    let mut guard = shared.training();
    let t = guard.as_mut().expect("a driver runs only with a training");
    shared.store.put_declared_rows(&t.id, &rows)?;
    t.declare_rows(rows);
    if let Some(cap) = t.weight_cap {
        tracing::info!(
            cap,
            "aggregation.max_weight_share: updates fold with at most this weight"
        );
    }
    Ok(())
}

/// Federated feature scaling: only counts, sums and sums of squares leave a site.
pub(super) async fn collect_scaling(
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
            Ok(task(
                &t.id,
                0,
                pb::task::Kind::Stats(pb::StatsTask {
                    plan: Some(wire_plan.clone()),
                }),
            ))
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
            let mut total = FeatureStats::empty(plan.n_stat_columns());
            // BTreeMap order: the merged statistics do not depend on arrival order.
            for s in stats.values() {
                total.merge(s)?;
            }
            tracing::info!(
                sites = stats.len(),
                rows = total.count,
                "global feature scaling computed"
            );
            super::privacy::check_site_budgets(&plan, &stats)?;
            plan.scaling = Some(total.to_scaling(plan.regression())?);
            declare_rows(shared, &stats)?;
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
