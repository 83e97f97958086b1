//! The plan's `[aggregation]` section: how the round's updates become the next
//! model. The server optimiser (Reddi et al. 2021, "Adaptive Federated
//! Optimization") treats the exact FedAvg mean (or a robust rule's aggregate)
//! as a pseudo-gradient; a robust rule decides which updates, or which values
//! of them, count at all.
//!
//! Only the settings live here; the arithmetic is in
//! [`crate::aggregation`].

use serde::{Deserialize, Serialize};

/// `[aggregation]`: absent means plain FedAvg over every accepted update.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationConfig {
    /// The server optimiser: `"fedavg"` (the mean is the step), `"fedavgm"`
    /// (with server momentum), `"fedadam"`, `"fedyogi"`, `"fedadagrad"`, or
    /// `"scaffold"` (FedAvg's step, with control variates that correct each
    /// site's local steps for its drift: Karimireddy et al. 2020).
    #[serde(default)]
    pub strategy: Strategy,
    /// The server optimiser's step size η. Default: 1.0 for fedavg and fedavgm,
    /// 0.1 for the adaptive ones (Reddi et al.'s grids centre there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_learning_rate: Option<f64>,
    /// fedavgm's momentum β, in [0, 1). Default 0.9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_momentum: Option<f64>,
    /// First-moment decay β1 of fedadam, fedyogi and fedadagrad, in [0, 1). Default 0.9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    /// Second-moment decay β2 of fedadam and fedyogi, in [0, 1). Default 0.99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    /// Adaptivity τ of the adaptive optimisers (added to √v), above 0. Default 1e-3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
    /// A rule that keeps one bad supplier from pulling the model anywhere:
    /// `"none"`, `"norm-bound"` (an update whose L2 norm exceeds
    /// `max_update_norm` is refused as it streams in), `"trimmed-mean"`,
    /// `"median"` (coordinate-wise, from the round's spilled updates) or
    /// `"multi-krum"` (the updates closest to their neighbours are averaged).
    #[serde(default)]
    pub robust: RobustRule,
    /// norm-bound: the largest L2 norm an update may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_update_norm: Option<f64>,
    /// trimmed-mean: the fraction of values dropped at each end, per
    /// coordinate, in [0, 0.5). Default 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trim_fraction: Option<f64>,
    /// multi-krum: how many hostile updates f to tolerate; the round then
    /// needs at least 2f + 3 updates and averages the K − f best. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub krum_byzantine: Option<u32>,
    /// The largest share of the federation's FedAvg weight any one firm may
    /// have, in (0, 1]: a firm declaring more rows folds with a capped weight
    /// (see `crate::aggregation::weight_cap`). Absent: weights are the rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_weight_share: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    FedAvg,
    FedAvgM,
    FedAdam,
    FedYogi,
    FedAdagrad,
    Scaffold,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RobustRule {
    #[default]
    None,
    NormBound,
    TrimmedMean,
    Median,
    MultiKrum,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::FedAvg => "fedavg",
            Strategy::FedAvgM => "fedavgm",
            Strategy::FedAdam => "fedadam",
            Strategy::FedYogi => "fedyogi",
            Strategy::FedAdagrad => "fedadagrad",
            Strategy::Scaffold => "scaffold",
        }
    }
}

impl RobustRule {
    pub fn name(self) -> &'static str {
        match self {
            RobustRule::None => "none",
            RobustRule::NormBound => "norm-bound",
            RobustRule::TrimmedMean => "trimmed-mean",
            RobustRule::Median => "median",
            RobustRule::MultiKrum => "multi-krum",
        }
    }

    /// Whether the rule needs each update on its own (after the round closed).
    pub fn needs_individual_updates(self) -> bool {
        matches!(
            self,
            RobustRule::TrimmedMean | RobustRule::Median | RobustRule::MultiKrum
        )
    }
}

/// The server optimiser's settings with the defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerSettings {
    pub strategy: Strategy,
    pub learning_rate: f64,
    pub momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
}

impl AggregationConfig {
    pub fn server(&self) -> ServerSettings {
        let adaptive = !matches!(
            self.strategy,
            Strategy::FedAvg | Strategy::FedAvgM | Strategy::Scaffold
        );
        ServerSettings {
            strategy: self.strategy,
            learning_rate: self
                .server_learning_rate
                .unwrap_or(if adaptive { 0.1 } else { 1.0 }),
            momentum: self.server_momentum.unwrap_or(0.9),
            beta1: self.beta1.unwrap_or(0.9),
            beta2: self.beta2.unwrap_or(0.99),
            tau: self.tau.unwrap_or(1e-3),
        }
    }

    pub fn trim_fraction(&self) -> f64 {
        self.trim_fraction.unwrap_or(0.2)
    }

    pub fn krum_byzantine(&self) -> u32 {
        self.krum_byzantine.unwrap_or(1)
    }

    /// The fewest updates a round needs under the robust rule.
    pub fn min_updates(&self) -> usize {
        match self.robust {
            RobustRule::MultiKrum => 2 * self.krum_byzantine() as usize + 3,
            RobustRule::Median | RobustRule::TrimmedMean => 3,
            _ => 1,
        }
    }

    /// Checks every value; the message names the key at fault. `min_participants`
    /// and `secure` are the plan's, for the rules that depend on them.
    pub fn validate(&self, min_participants: usize, secure: bool) -> Result<(), String> {
        let unit = |key: &str, v: Option<f64>, hi_open: f64| match v {
            Some(v) if !(v.is_finite() && (0.0..hi_open).contains(&v)) => {
                Err(format!("aggregation.{key}: {v} must lie in [0, {hi_open})"))
            }
            _ => Ok(()),
        };
        let positive = |key: &str, v: Option<f64>| match v {
            Some(v) if !(v.is_finite() && v > 0.0) => Err(format!(
                "aggregation.{key}: {v} must be a finite number above 0"
            )),
            _ => Ok(()),
        };
        positive("server_learning_rate", self.server_learning_rate)?;
        positive("tau", self.tau)?;
        positive("max_update_norm", self.max_update_norm)?;
        unit("server_momentum", self.server_momentum, 1.0)?;
        unit("beta1", self.beta1, 1.0)?;
        unit("beta2", self.beta2, 1.0)?;
        unit("trim_fraction", self.trim_fraction, 0.5)?;
        self.validate_weight_share(min_participants, secure)?;
        self.validate_rule(min_participants, secure)?;
        if self.strategy == Strategy::Scaffold && self.robust != RobustRule::None {
            return Err(format!(
                "aggregation.strategy: \"scaffold\" cannot run with robust = \"{}\": an update carries the site's control-variate change beside its delta, and a rule that drops or trims values would break the control variates' sum",
                self.robust.name()
            ));
        }
        if self.strategy == Strategy::Scaffold && secure {
            return Err("aggregation.strategy: \"scaffold\" cannot run with privacy.secure_aggregation yet: the masked upload carries the delta only".into());
        }
        Ok(())
    }

    fn validate_weight_share(&self, min_participants: usize, secure: bool) -> Result<(), String> {
        let Some(s) = self.max_weight_share else {
            return Ok(());
        };
        if !(s.is_finite() && s > 0.0 && s <= 1.0) {
            return Err(format!(
                "aggregation.max_weight_share: {s} must lie in (0, 1]"
            ));
        }
        if s * (min_participants as f64) < 1.0 {
            return Err(format!(
                "aggregation.max_weight_share: {s} cannot be met by training.min_participants = {min_participants} firms (each has at least 1/{min_participants} of the weight); raise it to at least {:.4}",
                1.0 / min_participants as f64
            ));
        }
        if secure {
            return Err("aggregation.max_weight_share: cannot run with privacy.secure_aggregation: each site applies its weight inside its masks, so the coordinator cannot cap it".into());
        }
        Ok(())
    }

    fn validate_rule(&self, min_participants: usize, secure: bool) -> Result<(), String> {
        let rule = self.robust.name();
        if self.robust == RobustRule::NormBound && self.max_update_norm.is_none() {
            return Err(
                "aggregation.max_update_norm: required with robust = \"norm-bound\"".into(),
            );
        }
        if secure && self.robust != RobustRule::None {
            return Err(format!(
                "aggregation.robust: \"{rule}\" cannot run with privacy.secure_aggregation: it needs each update (or its norm) in the clear, and secure aggregation shows the coordinator only the sum; bound each update's norm at the sites instead (privacy.dp.level = \"record\" clips every example)"
            ));
        }
        if self.robust.needs_individual_updates() && min_participants < self.min_updates() {
            return Err(format!(
                "aggregation.robust: \"{rule}\" needs at least {} updates per round{}, but training.min_participants is {min_participants}",
                self.min_updates(),
                match self.robust {
                    RobustRule::MultiKrum =>
                        format!(" (2 × krum_byzantine {} + 3)", self.krum_byzantine()),
                    _ => String::new(),
                }
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::plan::TrainingPlan;

    fn plan_with(min_participants: usize, extra: &str) -> crate::Result<TrainingPlan> {
        TrainingPlan::from_toml(
            &format!(
                "[schema]\nfeature_columns = [\"a\", \"b\"]\nlabel_column = \"y\"\nclasses = [\"0\", \"1\"]\n\
                 [model]\nhidden_layers = [4]\n\
                 [training]\nrounds = 2\nlearning_rate = 0.1\nmin_participants = {min_participants}\n{extra}"
            ),
            "plan.toml",
        )
    }

    #[test]
    fn impossible_aggregation_settings_are_refused_with_the_key() {
        for (min, extra, needle) in [
            (
                5,
                "[aggregation]\nrobust = \"trimmed-mean\"\ntrim_fraction = 0.5",
                "aggregation.trim_fraction",
            ),
            (
                4,
                "[aggregation]\nrobust = \"multi-krum\"\nkrum_byzantine = 1",
                "needs at least 5 updates per round",
            ),
            (
                3,
                "[aggregation]\nrobust = \"norm-bound\"",
                "aggregation.max_update_norm: required",
            ),
            (
                3,
                "[aggregation]\nrobust = \"median\"\n[privacy]\nsecure_aggregation = true",
                "cannot run with privacy.secure_aggregation",
            ),
            (
                5,
                "[aggregation]\nstrategy = \"scaffold\"\nrobust = \"median\"",
                "\"scaffold\" cannot run with robust = \"median\"",
            ),
            (
                3,
                "[aggregation]\nstrategy = \"scaffold\"\n[privacy]\nsecure_aggregation = true",
                "\"scaffold\" cannot run with privacy.secure_aggregation",
            ),
            (
                3,
                "update_encoding = \"int8\"\n[aggregation]\nstrategy = \"scaffold\"",
                "training.update_encoding: \"int8\" cannot carry SCAFFOLD",
            ),
            (
                3,
                "[aggregation]\nstrategy = \"scaffold\"\n[privacy.dp]\nlevel = \"record\"\ntarget_epsilon = 8.0\ndelta = 1e-5\nmax_grad_norm = 1.0",
                "\"scaffold\" cannot run with privacy.dp",
            ),
            (
                4,
                "[aggregation]\nmax_weight_share = 0",
                "aggregation.max_weight_share: 0 must lie in (0, 1]",
            ),
            (
                4,
                "[aggregation]\nmax_weight_share = 1.5",
                "aggregation.max_weight_share",
            ),
            (
                4,
                "[aggregation]\nmax_weight_share = nan",
                "aggregation.max_weight_share",
            ),
            (
                4,
                "[aggregation]\nmax_weight_share = 0.2",
                "cannot be met by training.min_participants = 4",
            ),
            (
                3,
                "[aggregation]\nmax_weight_share = 0.5\n[privacy]\nsecure_aggregation = true",
                "max_weight_share: cannot run with privacy.secure_aggregation",
            ),
        ] {
            let err = plan_with(min, extra).unwrap_err().to_string();
            assert!(err.contains(needle), "{extra}: {err}");
        }
        let ok = plan_with(4, "[aggregation]\nmax_weight_share = 0.25").unwrap();
        assert_eq!(ok.aggregation().max_weight_share, Some(0.25));
    }
}
