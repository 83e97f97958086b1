//! The round steps of differential privacy at the coordinator: what it checks,
//! not what it is told.
//!
//! Record level (DP-SGD at each site): every figure a site reports with its
//! update (noise multiplier, sampling rate, steps, ε so far) follows from the
//! plan, the site's training rows (the update's `num_examples`) and the round,
//! so the coordinator recomputes it with the same accountant and refuses an
//! update whose report differs. The ε recorded for the model is the largest
//! site's: each row lives at one site, so the sites' guarantees compose in
//! parallel. A site is accounted as if it took part in every round up to this
//! one, an upper bound when it skipped some.

use std::collections::BTreeMap;

use serde::Serialize;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::privacy::{DpConfig, DpLevel};
use sangsaeng_common::learning::data::FeatureStats;
use sangsaeng_common::privacy::dp::budget::plan_budget;
use sangsaeng_proto::v1 as pb;

use crate::durable::store::AcceptedUpdate;
use crate::error::{CoordinatorError, Result};

/// Relative tolerance between a site's reported figures and the coordinator's:
/// both run the same code on the same inputs, so only a different (or lying)
/// accountant differs by more.
const REPORT_TOLERANCE: f64 = 1e-9;

/// The privacy spent once a round is committed, for `metrics.jsonl` and the audit log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundSpend {
    pub mechanism: &'static str,
    pub level: &'static str,
    pub delta: f64,
    pub target_epsilon: f64,
    /// ε of the released model so far: the largest of the sites'.
    pub model_epsilon: f64,
    /// ε spent so far by each contributing site, and the noise it trained with.
    pub sites: BTreeMap<String, SiteSpend>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteSpend {
    pub epsilon: f64,
    pub noise_multiplier: f64,
    pub clip: f64,
}

fn record_dp(plan: &TrainingPlan) -> Option<&DpConfig> {
    plan.privacy
        .as_ref()
        .and_then(|p| p.dp.as_ref())
        .filter(|dp| dp.level == DpLevel::Record)
}

fn refused(e: sangsaeng_common::Error) -> CoordinatorError {
    CoordinatorError::FailedPrecondition(e.to_string())
}

/// After the statistics phase: every site's budget must last all the plan's
/// rounds (it can run out only with an explicit noise multiplier), so no round
/// is ever opened that would take a site past the target.
pub fn check_site_budgets(
    plan: &TrainingPlan,
    stats: &BTreeMap<String, FeatureStats>,
) -> Result<()> {
    let Some(dp) = record_dp(plan) else {
        return Ok(());
    };
    for (org, s) in stats {
        let budget = plan_budget(plan, Some(s.count)).map_err(|e| {
            CoordinatorError::FailedPrecondition(format!(
                "privacy budget of {org} ({} training rows): {e}",
                s.count
            ))
        })?;
        if let Some(round) = budget
            .epsilon_by_round
            .iter()
            .position(|e| *e > dp.target_epsilon)
        {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "privacy budget: round {} would take {org} ({} training rows) to epsilon {:.4}, above privacy.dp.target_epsilon = {}; raise noise_multiplier or lower training.rounds",
                round + 1,
                s.count,
                budget.epsilon_by_round[round],
                dp.target_epsilon
            )));
        }
    }
    Ok(())
}

/// Checks a site's report against the plan's accounting for its rows and round.
pub fn check_reported_spend(plan: &TrainingPlan, header: &pb::UpdateHeader) -> Result<()> {
    if record_dp(plan).is_none() {
        return Ok(());
    }
    let Some(report) = header.dp.as_ref() else {
        return Err(CoordinatorError::InvalidArgument(
            "the plan trains with record-level differential privacy, and the update carries no dp report".into(),
        ));
    };
    let budget = plan_budget(plan, Some(header.num_examples)).map_err(|e| {
        CoordinatorError::InvalidArgument(format!(
            "no privacy budget for an update of {} rows: {e}",
            header.num_examples
        ))
    })?;
    let epsilon = budget
        .epsilon_by_round
        .get(header.round.saturating_sub(1) as usize)
        .copied()
        .unwrap_or(f64::INFINITY);
    let close = |a: f64, b: f64| (a - b).abs() <= REPORT_TOLERANCE * b.abs().max(1e-12);
    let agrees = close(report.noise_multiplier, budget.noise_multiplier)
        && close(report.sample_rate, budget.q)
        && report.steps == budget.steps_per_round
        && close(report.epsilon, epsilon);
    if !agrees {
        return Err(CoordinatorError::InvalidArgument(format!(
            "the update's privacy report (noise {}, q {}, {} steps, epsilon {}) differs from the plan's accounting for {} rows at round {} (noise {}, q {}, {} steps, epsilon {})",
            report.noise_multiplier,
            report.sample_rate,
            report.steps,
            report.epsilon,
            header.num_examples,
            header.round,
            budget.noise_multiplier,
            budget.q,
            budget.steps_per_round,
            epsilon
        )));
    }
    Ok(())
}

/// What the committed round spent, site by site and for the model.
pub fn round_spend(
    plan: &TrainingPlan,
    accepted: &[AcceptedUpdate],
    round: u32,
) -> Result<Option<RoundSpend>> {
    let Some(dp) = record_dp(plan) else {
        return Ok(None);
    };
    let mut sites = BTreeMap::new();
    for u in accepted {
        let budget = plan_budget(plan, Some(u.num_examples)).map_err(refused)?;
        let epsilon = budget.epsilon_by_round[round.saturating_sub(1) as usize];
        sites.insert(
            u.org_id.clone(),
            SiteSpend {
                epsilon,
                noise_multiplier: budget.noise_multiplier,
                clip: dp.clip(),
            },
        );
    }
    let model_epsilon = sites.values().map(|s| s.epsilon).fold(0.0, f64::max);
    Ok(Some(RoundSpend {
        mechanism: "DP-SGD (Poisson-subsampled Gaussian, RDP accountant)",
        level: dp.level.name(),
        delta: dp.delta,
        target_epsilon: dp.target_epsilon,
        model_epsilon,
        sites,
    }))
}
