//! What a plan's `[privacy.dp]` will spend, before anyone trains: the sampling
//! rate and step count the plan implies, the noise multiplier (given, or derived
//! from the target ε), and the ε after every round.
//!
//! Record level (DP-SGD at each site): each local step samples a batch of
//! `batch_size` of the site's `rows` training rows, accounted as Poisson
//! sampling with q = batch_size / rows; a round is `local_epochs × ⌈rows /
//! batch_size⌉` steps. Each site has its own rows, so each site has its own
//! ε (a site with fewer rows spends more per step) and, without an explicit
//! noise multiplier, derives its own σ so that every site meets the target.
//!
//! Client level: every selected participant contributes to every round, so
//! q = 1 and a round is one step of the Gaussian mechanism on the clipped sum.

use super::accountant::RdpAccountant;
use super::calibrate::noise_multiplier_for;
use crate::config::plan::TrainingPlan;
use crate::config::privacy::{DpConfig, DpLevel};
use crate::{Error, Result};

/// The accounting of one plan at one site (record level) or for the model
/// (client level).
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub level: DpLevel,
    /// Sampling rate of one step.
    pub q: f64,
    /// Steps per round.
    pub steps_per_round: u64,
    /// The noise multiplier used: the plan's, or the one derived from the target.
    pub noise_multiplier: f64,
    /// Whether `noise_multiplier` was derived from `target_epsilon`.
    pub derived: bool,
    pub delta: f64,
    pub target_epsilon: f64,
    /// ε spent after rounds 1, 2, ..., `rounds`.
    pub epsilon_by_round: Vec<f64>,
}

impl Budget {
    /// ε after the last round.
    pub fn total_epsilon(&self) -> f64 {
        self.epsilon_by_round.last().copied().unwrap_or(0.0)
    }

    /// Whether the whole training stays within the plan's target.
    pub fn within_target(&self) -> bool {
        self.total_epsilon() <= self.target_epsilon
    }
}

/// The budget of `plan` at a site with `rows` training rows (record level; ignored
/// at client level). An error names what makes the budget impossible.
pub fn plan_budget(plan: &TrainingPlan, rows: Option<u64>) -> Result<Budget> {
    let dp = plan
        .privacy
        .as_ref()
        .and_then(|p| p.dp.as_ref())
        .ok_or_else(|| Error::Privacy("the plan has no [privacy.dp] section".into()))?;
    let rounds = u64::from(plan.training.rounds);
    let (q, steps_per_round) = match dp.level {
        DpLevel::Client => (1.0, 1),
        DpLevel::Record => record_sampling(plan, dp, rows)?,
    };
    let total_steps = steps_per_round * rounds;
    let (noise_multiplier, derived) = match dp.noise_multiplier {
        Some(sigma) => (sigma, false),
        None => (
            noise_multiplier_for(dp.target_epsilon, dp.delta, q, total_steps)?,
            true,
        ),
    };
    let mut accountant = RdpAccountant::new();
    let mut epsilon_by_round = Vec::with_capacity(rounds as usize);
    for _ in 0..rounds {
        accountant.compose(q, noise_multiplier, steps_per_round)?;
        epsilon_by_round.push(accountant.checked_epsilon(dp.delta)?);
    }
    Ok(Budget {
        level: dp.level,
        q,
        steps_per_round,
        noise_multiplier,
        derived,
        delta: dp.delta,
        target_epsilon: dp.target_epsilon,
        epsilon_by_round,
    })
}

/// q and steps per round of DP-SGD at a site with `rows` training rows.
fn record_sampling(plan: &TrainingPlan, dp: &DpConfig, rows: Option<u64>) -> Result<(f64, u64)> {
    let rows = rows.ok_or_else(|| {
        Error::Privacy(
            "record-level privacy is accounted per site: give the site's training rows".into(),
        )
    })?;
    let batch = plan.training.batch_size as u64;
    if rows < batch {
        return Err(Error::Privacy(format!(
            "a site with {rows} training rows cannot sample batches of {batch} (training.batch_size)"
        )));
    }
    // δ must be well below the chance of singling out one row, or the guarantee
    // allows the mechanism to publish a row outright.
    if dp.delta >= 1.0 / rows as f64 {
        return Err(Error::Privacy(format!(
            "privacy.dp.delta: {} is not below 1 / rows = {:.3e} for a site with {rows} training rows",
            dp.delta,
            1.0 / rows as f64
        )));
    }
    let steps = u64::from(plan.training.local_epochs) * rows.div_ceil(batch);
    Ok((batch as f64 / rows as f64, steps))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::privacy::PrivacyConfig;

    fn plan(dp: DpConfig) -> TrainingPlan {
        let mut plan = TrainingPlan::from_toml(
            "[schema]\nfeature_columns = [\"a\"]\nlabel_column = \"y\"\nclasses = [\"0\", \"1\"]\n\
             [model]\nhidden_layers = []\n\
             [training]\nrounds = 10\nlearning_rate = 0.1\nmin_participants = 1\nbatch_size = 64\nlocal_epochs = 2\n",
            "test",
        )
        .unwrap();
        plan.privacy = Some(PrivacyConfig {
            dp: Some(dp),
            ..Default::default()
        });
        plan
    }

    fn record(target: f64, sigma: Option<f64>) -> DpConfig {
        DpConfig {
            level: DpLevel::Record,
            target_epsilon: target,
            delta: 1e-5,
            noise_multiplier: sigma,
            max_grad_norm: Some(1.0),
            clip_norm: None,
        }
    }

    #[test]
    fn a_derived_noise_multiplier_meets_the_target_at_every_site() {
        for rows in [6_400u64, 20_000, 99_000] {
            let b = plan_budget(&plan(record(8.0, None)), Some(rows)).unwrap();
            assert!(b.derived);
            assert_eq!(b.steps_per_round, 2 * rows.div_ceil(64));
            assert!(b.within_target(), "{rows} rows: {}", b.total_epsilon());
            assert!(
                b.total_epsilon() > 7.9,
                "calibrated tightly: {}",
                b.total_epsilon()
            );
        }
    }

    #[test]
    fn epsilon_grows_round_by_round_and_a_given_sigma_is_used_as_is() {
        let b = plan_budget(&plan(record(8.0, Some(1.0))), Some(10_000)).unwrap();
        assert!(!b.derived);
        assert_eq!(b.noise_multiplier, 1.0);
        assert_eq!(b.epsilon_by_round.len(), 10);
        assert!(b.epsilon_by_round.windows(2).all(|w| w[0] < w[1]));
        // The same composition done at once gives the same ε.
        let mut acc = RdpAccountant::new();
        acc.compose(64.0 / 10_000.0, 1.0, 10 * 2 * 157).unwrap();
        let once = acc.epsilon(1e-5);
        assert!((once - b.total_epsilon()).abs() < 1e-9 * once);
    }

    #[test]
    fn impossible_budgets_are_refused_with_the_reason() {
        let p = plan(record(8.0, None));
        let no_rows = plan_budget(&p, None).unwrap_err().to_string();
        assert!(no_rows.contains("training rows"), "{no_rows}");
        let few = plan_budget(&p, Some(10)).unwrap_err().to_string();
        assert!(few.contains("training.batch_size"), "{few}");
        let delta = plan_budget(&p, Some(200_000)).unwrap_err().to_string();
        assert!(delta.contains("privacy.dp.delta"), "{delta}");
        let unreachable = plan_budget(&plan(record(1e-9, None)), Some(10_000))
            .unwrap_err()
            .to_string();
        assert!(unreachable.contains("target"), "{unreachable}");
    }

    #[test]
    fn client_level_is_one_gaussian_step_per_round() {
        let dp = DpConfig {
            level: DpLevel::Client,
            max_grad_norm: None,
            clip_norm: Some(1.0),
            ..record(4.0, None)
        };
        let b = plan_budget(&plan(dp), None).unwrap();
        assert_eq!((b.q, b.steps_per_round), (1.0, 1));
        assert!(b.within_target());
    }
}
