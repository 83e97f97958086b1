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
//!
//! Client level (DP-FedAvg, McMahan et al. 2018): each site clips its update to
//! `clip_norm`, the coordinator folds every update with weight 1 (so one firm
//! moves the sum by at most the clip, whatever its size) and adds discrete
//! Gaussian noise of std `noise_multiplier × clip_norm` to the round's sum, in
//! the accumulator's fixed-point integers (exact, drawn from an OS-seeded
//! ChaCha20, never from the plan's seed). Every participant takes part in every
//! round, so each round is one Gaussian mechanism (q = 1). On a plain round the
//! guarantee holds against whoever sees the released models, not against the
//! coordinator: it sees the sum before the noise. With secure aggregation the
//! sites add the noise, each its share before masking
//! (`sangsaeng_common::privacy::dp::client_noise`), and the coordinator adds
//! none: it never sees a noise-free sum.

use std::collections::BTreeMap;

use serde::Serialize;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sangsaeng_common::aggregation::fedavg::Accumulator;
use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::privacy::{DpConfig, DpLevel};
use sangsaeng_common::learning::data::FeatureStats;
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::privacy::dp::budget::plan_budget;
use sangsaeng_common::privacy::dp::client_noise;
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
    /// `"sites"` (DP-SGD, or client-level shares under secure aggregation) or
    /// `"coordinator"` (client-level noise on the opened sum).
    pub noise_added_by: &'static str,
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

fn plan_dp(plan: &TrainingPlan) -> Option<&DpConfig> {
    plan.privacy.as_ref().and_then(|p| p.dp.as_ref())
}

fn client_dp(plan: &TrainingPlan) -> Option<&DpConfig> {
    plan.client_dp()
}

/// Who adds client-level noise: the sites under secure aggregation (each its
/// share, before masking), otherwise the coordinator.
fn noise_at_sites(plan: &TrainingPlan) -> bool {
    plan.secure_aggregation()
}

/// Client level without secure aggregation: the round's noise, added to the
/// accumulator's sum before its mean is applied. With secure aggregation the
/// opened sum already carries the sites' shares, and nothing more is added
/// (twice the noise would be accounted as once). Without client-level DP,
/// nothing.
pub fn add_aggregate_noise(plan: &TrainingPlan, acc: &mut Accumulator) -> Result<()> {
    let Some(dp) = client_dp(plan) else {
        return Ok(());
    };
    if noise_at_sites(plan) {
        return Ok(());
    }
    let budget = plan_budget(plan, None).map_err(refused)?;
    let sampler = client_noise::central(budget.noise_multiplier, dp.clip(), acc.num_params())
        .map_err(refused)?;
    let mut rng = ChaCha20Rng::try_from_os_rng().map_err(|e| {
        CoordinatorError::Store(format!(
            "the OS random source failed while drawing noise: {e}"
        ))
    })?;
    acc.add_noise(|block| sampler.fill(&mut rng, block))?;
    Ok(())
}

fn record_dp(plan: &TrainingPlan) -> Option<&DpConfig> {
    plan_dp(plan).filter(|dp| dp.level == DpLevel::Record)
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
    if let Some(dp) = client_dp(plan) {
        return check_client_budget(plan, dp);
    }
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

/// Client level: the model's budget must last every round, and with secure
/// aggregation each site's share of the noise must be large enough to account.
fn check_client_budget(plan: &TrainingPlan, dp: &DpConfig) -> Result<()> {
    let budget = plan_budget(plan, None).map_err(refused)?;
    if noise_at_sites(plan) {
        let dim = ModelSpec::from_plan(plan).num_params();
        client_noise::share(
            budget.noise_multiplier,
            dp.clip(),
            dim,
            plan.training.min_participants,
        )
        .map_err(refused)?;
    }
    match budget
        .epsilon_by_round
        .iter()
        .position(|e| *e > dp.target_epsilon)
    {
        Some(round) => Err(CoordinatorError::FailedPrecondition(format!(
            "privacy budget: round {} would take the model to epsilon {:.4}, above privacy.dp.target_epsilon = {}; raise noise_multiplier or lower training.rounds",
            round + 1,
            budget.epsilon_by_round[round],
            dp.target_epsilon
        ))),
        None => Ok(()),
    }
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
    if let Some(dp) = client_dp(plan) {
        let budget = plan_budget(plan, None).map_err(refused)?;
        let mechanism = match noise_at_sites(plan) {
            true => {
                "DP-FedAvg with distributed noise (clipped updates, equal weights, a discrete Gaussian share added by each site before masking, Kairouz-Liu-Steinke 2021; RDP accountant)"
            }
            false => {
                "DP-FedAvg (clipped updates, equal weights, discrete Gaussian noise on the sum, RDP accountant)"
            }
        };
        return Ok(Some(RoundSpend {
            mechanism,
            noise_added_by: if noise_at_sites(plan) {
                "sites"
            } else {
                "coordinator"
            },
            level: dp.level.name(),
            delta: dp.delta,
            target_epsilon: dp.target_epsilon,
            model_epsilon: budget.epsilon_by_round[round.saturating_sub(1) as usize],
            sites: BTreeMap::new(),
        }));
    }
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
        noise_added_by: "sites",
        level: dp.level.name(),
        delta: dp.delta,
        target_epsilon: dp.target_epsilon,
        model_epsilon,
        sites,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sangsaeng_common::config::privacy::PrivacyConfig;

    fn client_plan(sigma: f64) -> TrainingPlan {
        let mut plan = TrainingPlan::from_toml(
            "[schema]\nfeature_columns = [\"a\"]\nlabel_column = \"y\"\nclasses = [\"0\", \"1\"]\n\
             [model]\nhidden_layers = []\n\
             [training]\nrounds = 5\nlearning_rate = 0.1\nmin_participants = 1\n",
            "test",
        )
        .unwrap();
        plan.privacy = Some(PrivacyConfig {
            dp: Some(DpConfig {
                level: DpLevel::Client,
                target_epsilon: 50.0,
                delta: 1e-5,
                noise_multiplier: Some(sigma),
                max_grad_norm: None,
                clip_norm: Some(0.5),
            }),
            ..Default::default()
        });
        plan.validate().unwrap();
        plan
    }

    /// With secure aggregation each of min_participants sites adds a share; a
    /// share too small to account as a discrete Gaussian stops the training
    /// before its first round, naming the key.
    #[test]
    fn a_distributed_noise_share_too_small_to_account_is_refused_before_training() {
        let mut plan = client_plan(1.0);
        plan.training.min_participants = 3;
        let p = plan.privacy.as_mut().unwrap();
        p.secure_aggregation = true;
        // 4 parameters clipped to 1e-8: a share of std 0.7 fixed-point units.
        p.dp.as_mut().unwrap().clip_norm = Some(1e-8);
        plan.validate().unwrap();
        let e = check_site_budgets(&plan, &BTreeMap::new()).unwrap_err();
        assert!(
            e.to_string().contains("privacy.dp.noise_multiplier")
                && e.to_string().contains("each of 3 sites' share"),
            "{e}"
        );
        plan.privacy.as_mut().unwrap().secure_aggregation = false;
        check_site_budgets(&plan, &BTreeMap::new()).expect("central noise has no share");
    }

    /// The noise added to a sum of K = 4 equally weighted zero updates moves the
    /// mean by N(0, (σC)²) / K per parameter. Over 200,000 parameters the sample
    /// variance of the applied mean has a relative standard error of
    /// sqrt(2/n) = 0.32 %; the tolerance is 5 of them (1.6 %).
    #[test]
    fn the_noise_on_the_sum_has_the_variance_the_plan_says() {
        let (sigma, clip, k, n) = (1.3, 0.5, 4u64, 200_000usize);
        let plan = client_plan(sigma);
        let mut acc = Accumulator::new(n);
        acc.reserve(k).unwrap();
        for _ in 0..k {
            acc.fold(0, &vec![0.0; n], 1).unwrap();
            acc.commit();
        }
        add_aggregate_noise(&plan, &mut acc).unwrap();
        let mut global = vec![0.0f32; n];
        acc.apply_in_place(&mut global).unwrap();
        let mean = global.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let var = global
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / (n - 1) as f64;
        let want = (sigma * clip / k as f64).powi(2);
        assert!(
            (var / want - 1.0).abs() < 0.016,
            "variance {var}, want {want}"
        );
        assert!(mean.abs() < 5.0 * (want / n as f64).sqrt(), "mean {mean}");
        // Without client-level DP nothing is added.
        let mut plain = plan.clone();
        plain.privacy = None;
        let mut untouched = Accumulator::new(8);
        untouched.reserve(1).unwrap();
        let before = untouched.clone();
        add_aggregate_noise(&plain, &mut untouched).unwrap();
        assert_eq!(untouched, before);
    }
}
