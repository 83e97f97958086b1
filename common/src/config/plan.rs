//! The training plan: what the supply chain agreed to train, in what shape and how.
//!
//! The plan is a TOML file given to the coordinator. Unknown keys are refused
//! (a typo must not silently fall back to a default) and every value is range
//! checked once, in [`TrainingPlan::validate`], so the rest of the code can trust it.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::config::aggregation::AggregationConfig;
use crate::config::privacy::PrivacyConfig;
use crate::{Error, Result};

/// The whole plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingPlan {
    /// The columns of the line data the model reads.
    pub schema: DataSchema,
    /// The model's shape.
    pub model: ModelConfig,
    /// How rounds and local training run.
    pub training: TrainingConfig,
    /// Privacy guarantees beyond "only deltas leave a site" (`[privacy]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyConfig>,
    /// How updates become the next model (`[aggregation]`); absent: FedAvg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<AggregationConfig>,
    /// Global standardisation, computed federatedly by the coordinator before
    /// round 1. Never written by hand; absent in a plan file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Scaling>,
}

/// Columns of the line data the model uses.
///
/// A classification plan names its `label_column` and `classes`; a regression
/// plan names its `target_column` and no classes. Each key belongs to one task
/// only, so a plan that mixes them is refused rather than half-read.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSchema {
    /// What the model predicts: a class (defect type) or a number (a quality
    /// reading, a cycle time).
    #[serde(default, skip_serializing_if = "Task::is_classification")]
    pub task: Task,
    /// Feature columns, in the order the model consumes them.
    pub feature_columns: Vec<String>,
    /// Classification: the column holding the class label.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label_column: String,
    /// Classification: class labels as written in the label column; model
    /// output `i` is `classes[i]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    /// Regression: the numeric column the model predicts.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target_column: String,
}

/// `[schema] task`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    #[default]
    Classification,
    Regression,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::Regression => "regression",
        }
    }

    pub fn is_classification(&self) -> bool {
        *self == Task::Classification
    }

    /// Parses a name as written in plans and on the wire; empty means
    /// classification (what a coordinator before regression sends).
    pub fn from_name(name: &str) -> Option<Task> {
        match name {
            "" | "classification" => Some(Task::Classification),
            "regression" => Some(Task::Regression),
            _ => None,
        }
    }
}

impl DataSchema {
    /// The column the model predicts: the label or the regression target.
    pub fn target(&self) -> &str {
        match self.task {
            Task::Classification => &self.label_column,
            Task::Regression => &self.target_column,
        }
    }

    /// The plan key naming [`DataSchema::target`], for messages.
    pub fn target_key(&self) -> &'static str {
        match self.task {
            Task::Classification => "label_column",
            Task::Regression => "target_column",
        }
    }
}

/// `[training] loss`: what local training minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loss {
    /// Classification's only loss.
    CrossEntropy,
    /// Mean squared error on the standardised target; regression's default.
    Mse,
    /// Huber's loss on the standardised target (quadratic within
    /// `huber_delta`, linear beyond): a few bad analyser readings pull the
    /// model less than under MSE.
    Huber,
}

impl Loss {
    pub fn name(self) -> &'static str {
        match self {
            Loss::CrossEntropy => "cross-entropy",
            Loss::Mse => "mse",
            Loss::Huber => "huber",
        }
    }

    /// Parses a name as written in plans and on the wire.
    pub fn from_name(name: &str) -> Option<Loss> {
        match name {
            "cross-entropy" => Some(Loss::CrossEntropy),
            "mse" => Some(Loss::Mse),
            "huber" => Some(Loss::Huber),
            _ => None,
        }
    }
}

/// The model: a multi-layer perceptron classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Hidden layer widths, input to output. May be empty (a linear model).
    pub hidden_layers: Vec<usize>,
    /// The activation after each hidden layer.
    #[serde(default)]
    pub activation: Activation,
    /// Dropout probability after each hidden activation, in `[0, 1)`.
    #[serde(default)]
    pub dropout: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Relu,
    Tanh,
    Gelu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    Sgd,
    #[default]
    Adam,
}

/// How rounds run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Number of federated rounds.
    pub rounds: u32,
    /// Local epochs per round.
    #[serde(default = "default_local_epochs")]
    pub local_epochs: u32,
    /// Rows per local optimiser step.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// The local optimiser each site trains with.
    #[serde(default)]
    pub optimizer: Optimizer,
    /// The local optimiser's learning rate, in (0, 10].
    pub learning_rate: f64,
    /// A round starts only when at least this many participants are connected,
    /// and closes at the deadline only if at least this many updates arrived.
    pub min_participants: usize,
    /// Seconds a round waits for updates before closing with what it has.
    #[serde(default = "default_round_deadline")]
    pub round_deadline_secs: u64,
    /// Fraction of each site's rows kept aside for local validation.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Seed of model initialisation, shuffling and the validation split.
    #[serde(default)]
    pub seed: u64,
    /// How participants encode their deltas: "float32" (exact), "float16", or
    /// "int8" (one scale per chunk, about 4x fewer bytes). See `crate::transfer::encoding`.
    #[serde(default)]
    pub update_encoding: UpdateEncoding,
    /// Whether each round's global model is scored by the sites on their validation
    /// splits (an evaluation phase per round). Off for workloads with nothing to
    /// score, such as the transport benchmark.
    #[serde(default = "default_evaluate")]
    pub evaluate: bool,
    /// FedProx's μ (Li et al. 2020): each site adds `μ/2 · ‖w − w_global‖²` to
    /// its local loss, which keeps label-skewed sites from drifting apart
    /// within a round. 0 (the default) is plain FedAvg local training; the
    /// paper's values are 0.001 to 1.
    #[serde(default)]
    pub proximal_mu: f64,
    /// The local loss; absent: cross-entropy for classification, MSE for regression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<Loss>,
    /// Huber's threshold in units of the target's (federated) standard
    /// deviation; only with `loss = "huber"`.
    #[serde(default = "default_huber_delta")]
    pub huber_delta: f64,
}

/// Per-feature standardisation `x' = (x - mean) / std`, and for regression
/// the target's, from the same federated sums: the model learns and predicts
/// the standardised target, and predictions are mapped back with these.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scaling {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_mean: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_std: Option<f64>,
}

impl Scaling {
    /// The target's `(mean, std)`, for regression plans.
    pub fn target(&self) -> Option<(f64, f64)> {
        self.target_mean.zip(self.target_std)
    }
}

fn default_local_epochs() -> u32 {
    1
}
fn default_batch_size() -> usize {
    64
}
fn default_round_deadline() -> u64 {
    600
}
fn default_evaluate() -> bool {
    true
}
fn default_validation_fraction() -> f64 {
    0.2
}
fn default_huber_delta() -> f64 {
    1.0
}

/// Upper bounds that keep a plan from asking a small supplier's machine for the impossible.
const MAX_ROUNDS: u32 = 100_000;
const MAX_LAYER_WIDTH: usize = 1 << 16;
const MAX_LAYERS: usize = 64;
const MAX_FEATURES: usize = 1 << 16;
const MAX_CLASSES: usize = 1 << 16;
/// Beyond this the pull dominates any loss and the sites stop learning: a typo.
const MAX_PROXIMAL_MU: f64 = 100.0;

impl TrainingPlan {
    /// Reads and validates a plan file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates plan TOML; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let plan: TrainingPlan =
            toml::from_str(text).map_err(|e| Error::config(origin, toml_message(&e)))?;
        plan.validate().map_err(|m| Error::config(origin, m))?;
        Ok(plan)
    }

    /// Checks every value; the message names the offending key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.validate_schema()?;
        self.validate_model()?;
        self.validate_training()?;
        self.validate_loss()?;
        if let Some(p) = &self.privacy {
            p.validate()?;
        }
        if let Some(a) = &self.aggregation {
            a.validate(self.training.min_participants, self.secure_aggregation())?;
            if a.robust.needs_individual_updates() && self.client_level_dp() {
                return Err(format!(
                    "aggregation.robust: \"{}\" cannot run with privacy.dp.level = \"client\": the noise is calibrated to the clipped sum the exact accumulator holds, and a coordinate-wise or selecting rule would aggregate without it; use robust = \"norm-bound\" (or none: client-level DP already clips each update to clip_norm)",
                    a.robust.name()
                ));
            }
            self.validate_scaffold()?;
        }
        if self.secure_aggregation()
            && self.training.min_participants < crate::config::privacy::MIN_SECURE_PARTICIPANTS
        {
            return Err(format!(
                "training.min_participants: {} is too few for privacy.secure_aggregation, which needs at least {} (with two, each would learn the other's update from the sum)",
                self.training.min_participants,
                crate::config::privacy::MIN_SECURE_PARTICIPANTS
            ));
        }
        self.validate_scaling()
    }

    /// SCAFFOLD's limits: its control variates are gradients of a site's rows
    /// at the global model, sent beside the delta without clipping or noise,
    /// and they are small next to the delta, which int8's one scale per chunk
    /// would round away.
    fn validate_scaffold(&self) -> std::result::Result<(), String> {
        if !self.scaffold() {
            return Ok(());
        }
        if self.privacy.as_ref().is_some_and(|p| p.dp.is_some()) {
            return Err("aggregation.strategy: \"scaffold\" cannot run with privacy.dp: a site's control variate is its rows' gradient at the global model, sent unclipped and without noise, which no DP account covers; use FedProx (training.proximal_mu) with DP".into());
        }
        if self.training.update_encoding == UpdateEncoding::Int8 {
            return Err("training.update_encoding: \"int8\" cannot carry SCAFFOLD's control-variate changes (aggregation.strategy = \"scaffold\"): they are orders of magnitude below the delta's values; use float32 or float16".into());
        }
        Ok(())
    }

    /// Whether the plan trains with SCAFFOLD's control variates: every update
    /// then carries 2 × the model's values, the delta then the site's
    /// control-variate change.
    pub fn scaffold(&self) -> bool {
        self.aggregation
            .as_ref()
            .is_some_and(|a| a.strategy == crate::config::aggregation::Strategy::Scaffold)
    }

    /// The `[aggregation]` section, defaults filled in when absent.
    pub fn aggregation(&self) -> AggregationConfig {
        self.aggregation.clone().unwrap_or_default()
    }

    /// The plan's `[privacy.dp]` when it is at client level.
    pub fn client_dp(&self) -> Option<&crate::config::privacy::DpConfig> {
        self.privacy
            .as_ref()
            .and_then(|p| p.dp.as_ref())
            .filter(|d| d.level == crate::config::privacy::DpLevel::Client)
    }

    /// Whether the plan asks for client-level differential privacy.
    pub fn client_level_dp(&self) -> bool {
        self.client_dp().is_some()
    }

    /// Whether rounds run with secure aggregation (`[privacy] secure_aggregation`).
    pub fn secure_aggregation(&self) -> bool {
        self.privacy.as_ref().is_some_and(|p| p.secure_aggregation)
    }

    /// The columns: named, distinct, the label not also a feature, and within
    /// the bounds a site's memory and the wire can hold.
    fn validate_schema(&self) -> std::result::Result<(), String> {
        let s = &self.schema;
        if s.feature_columns.is_empty() {
            return Err("schema.feature_columns: at least one feature column is required".into());
        }
        if s.feature_columns.len() > MAX_FEATURES {
            return Err(format!(
                "schema.feature_columns: more than {MAX_FEATURES} columns"
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for c in &s.feature_columns {
            if c.trim().is_empty() {
                return Err("schema.feature_columns: empty column name".into());
            }
            if !seen.insert(c) {
                return Err(format!("schema.feature_columns: '{c}' is listed twice"));
            }
        }
        match s.task {
            Task::Classification => {
                if !s.target_column.is_empty() {
                    return Err("schema.target_column: only a regression plan (task = \"regression\") has a target column; a classification plan names its label_column and classes".into());
                }
            }
            Task::Regression => return validate_regression_schema(s, &seen),
        }
        if s.label_column.trim().is_empty() {
            return Err("schema.label_column: must not be empty".into());
        }
        if seen.contains(&s.label_column) {
            return Err(format!(
                "schema.label_column: '{}' is also a feature column",
                s.label_column
            ));
        }
        if s.classes.len() < 2 {
            return Err("schema.classes: at least two classes are required".into());
        }
        if s.classes.len() > MAX_CLASSES {
            return Err(format!("schema.classes: more than {MAX_CLASSES} classes"));
        }
        let mut seen = std::collections::HashSet::new();
        for c in &s.classes {
            if !seen.insert(c) {
                return Err(format!("schema.classes: '{c}' is listed twice"));
            }
        }
        Ok(())
    }

    /// The loss belongs to the task, and Huber's threshold is a positive number.
    fn validate_loss(&self) -> std::result::Result<(), String> {
        let t = &self.training;
        let loss = self.loss();
        let fits = match self.schema.task {
            Task::Classification => loss == Loss::CrossEntropy,
            Task::Regression => loss != Loss::CrossEntropy,
        };
        if !fits {
            return Err(format!(
                "training.loss: \"{}\" does not suit task = \"{}\" (classification trains with \"cross-entropy\", regression with \"mse\" or \"huber\")",
                loss.name(),
                self.schema.task.name()
            ));
        }
        if !(t.huber_delta.is_finite() && t.huber_delta > 0.0 && t.huber_delta <= 1e6) {
            return Err(format!(
                "training.huber_delta: {} must be a number in (0, 1e6] (target standard deviations)",
                t.huber_delta
            ));
        }
        Ok(())
    }

    /// The local loss, defaults filled in.
    pub fn loss(&self) -> Loss {
        self.training.loss.unwrap_or(match self.schema.task {
            Task::Classification => Loss::CrossEntropy,
            Task::Regression => Loss::Mse,
        })
    }

    /// Whether the plan predicts a number rather than a class.
    pub fn regression(&self) -> bool {
        self.schema.task == Task::Regression
    }

    /// Columns the statistics phase sums: the features, then for regression
    /// the target, so its standardisation is federated like theirs.
    pub fn n_stat_columns(&self) -> usize {
        self.n_features() + usize::from(self.regression())
    }

    /// The model's shape, bounded so a plan cannot ask sites for more memory
    /// than a model of this kind needs.
    fn validate_model(&self) -> std::result::Result<(), String> {
        let m = &self.model;
        if m.hidden_layers.len() > MAX_LAYERS {
            return Err(format!(
                "model.hidden_layers: more than {MAX_LAYERS} layers"
            ));
        }
        if let Some(w) = m
            .hidden_layers
            .iter()
            .find(|&&w| w == 0 || w > MAX_LAYER_WIDTH)
        {
            return Err(format!(
                "model.hidden_layers: width {w} is out of range 1..={MAX_LAYER_WIDTH}"
            ));
        }
        if !(0.0..1.0).contains(&m.dropout) {
            return Err(format!("model.dropout: {} is outside [0, 1)", m.dropout));
        }
        Ok(())
    }

    /// The round and local-training settings, each bounded so a typo cannot
    /// stall or run away with a training.
    fn validate_training(&self) -> std::result::Result<(), String> {
        let t = &self.training;
        if t.rounds == 0 || t.rounds > MAX_ROUNDS {
            return Err(format!(
                "training.rounds: {} is out of range 1..={MAX_ROUNDS}",
                t.rounds
            ));
        }
        if t.local_epochs == 0 || t.local_epochs > 10_000 {
            return Err(format!(
                "training.local_epochs: {} is out of range 1..=10000",
                t.local_epochs
            ));
        }
        if t.batch_size == 0 || t.batch_size > 1 << 20 {
            return Err(format!(
                "training.batch_size: {} is out of range 1..=1048576",
                t.batch_size
            ));
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0 && t.learning_rate <= 10.0) {
            return Err(format!(
                "training.learning_rate: {} must be a number in (0, 10]",
                t.learning_rate
            ));
        }
        if t.min_participants == 0 {
            return Err("training.min_participants: must be at least 1".into());
        }
        if t.round_deadline_secs == 0 || t.round_deadline_secs > 7 * 24 * 3600 {
            return Err(format!(
                "training.round_deadline_secs: {} is out of range 1..=604800",
                t.round_deadline_secs
            ));
        }
        if !(t.proximal_mu.is_finite() && (0.0..=MAX_PROXIMAL_MU).contains(&t.proximal_mu)) {
            return Err(format!(
                "training.proximal_mu: {} must be a number in [0, {MAX_PROXIMAL_MU}] (0 turns FedProx off)",
                t.proximal_mu
            ));
        }
        if !(t.validation_fraction > 0.0 && t.validation_fraction < 1.0) {
            return Err(format!(
                "training.validation_fraction: {} must be strictly between 0 and 1",
                t.validation_fraction
            ));
        }
        Ok(())
    }

    /// The federated standardisation, when present: one finite mean and one
    /// positive std per feature, so standardising can never divide by zero.
    fn validate_scaling(&self) -> std::result::Result<(), String> {
        if let Some(sc) = &self.scaling {
            let d = self.schema.feature_columns.len();
            if sc.mean.len() != d || sc.std.len() != d {
                return Err(format!(
                    "scaling: expected {d} means and stds, got {} and {}",
                    sc.mean.len(),
                    sc.std.len()
                ));
            }
            if sc.mean.iter().any(|v| !v.is_finite())
                || sc.std.iter().any(|v| !(v.is_finite() && *v > 0.0))
            {
                return Err("scaling: means must be finite and stds finite and positive".into());
            }
            match (self.regression(), sc.target()) {
                (true, Some((m, sd))) if m.is_finite() && sd.is_finite() && sd > 0.0 => {}
                (true, _) => {
                    return Err("scaling: a regression plan needs a finite target_mean and a finite, positive target_std".into());
                }
                (false, None) if sc.target_mean.is_none() && sc.target_std.is_none() => {}
                (false, _) => {
                    return Err(
                        "scaling: target_mean and target_std belong to regression plans only"
                            .into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// Number of input features.
    pub fn n_features(&self) -> usize {
        self.schema.feature_columns.len()
    }

    /// Number of output classes (0 for regression: see [`TrainingPlan::n_outputs`]).
    pub fn n_classes(&self) -> usize {
        self.schema.classes.len()
    }

    /// Width of the model's output: one per class, or one predicted value.
    pub fn n_outputs(&self) -> usize {
        match self.schema.task {
            Task::Classification => self.n_classes(),
            Task::Regression => 1,
        }
    }

    /// Serialises the plan back to TOML (used to archive the plan beside a training's outputs).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a validated plan always serialises")
    }
}

/// A regression schema: a target column that is not a feature, and no classes.
fn validate_regression_schema(
    s: &DataSchema,
    features: &std::collections::HashSet<&String>,
) -> std::result::Result<(), String> {
    if !s.classes.is_empty() {
        return Err("schema.classes: a regression plan (task = \"regression\") predicts a number and has no classes; remove classes, or set task = \"classification\"".into());
    }
    if !s.label_column.is_empty() {
        return Err("schema.label_column: a regression plan names the column it predicts with target_column, not label_column".into());
    }
    if s.target_column.trim().is_empty() {
        return Err("schema.target_column: a regression plan (task = \"regression\") must name the numeric column it predicts".into());
    }
    if features.contains(&s.target_column) {
        return Err(format!(
            "schema.target_column: '{}' is also a feature column",
            s.target_column
        ));
    }
    Ok(())
}

/// Makes a toml error one line that still names the key and position.
pub(crate) fn toml_message(e: &toml::de::Error) -> String {
    e.to_string()
        .replace('\n', " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Encoding of update deltas (`[training] update_encoding`). The wire layout of
/// each encoding lives in [`crate::transfer::encoding`]; the plan only names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateEncoding {
    #[default]
    Float32,
    Float16,
    Int8,
}

impl UpdateEncoding {
    pub fn name(self) -> &'static str {
        match self {
            UpdateEncoding::Float32 => "float32",
            UpdateEncoding::Float16 => "float16",
            UpdateEncoding::Int8 => "int8",
        }
    }

    /// Parses a name as written in plans and headers; empty means float32 (older peers).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "" | "float32" => Ok(UpdateEncoding::Float32),
            "float16" => Ok(UpdateEncoding::Float16),
            "int8" => Ok(UpdateEncoding::Int8),
            other => Err(Error::Protocol(format!(
                "unknown update encoding '{other}' (expected float32, float16 or int8)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const PLAN: &str = r#"
[schema]
feature_columns = ["a", "b"]
label_column = "y"
classes = ["0", "1"]

[model]
hidden_layers = [8]
activation = "relu"
dropout = 0.0

[training]
rounds = 3
learning_rate = 0.01
min_participants = 2
"#;

    #[test]
    fn parses_a_minimal_plan_with_defaults() {
        let p = TrainingPlan::from_toml(PLAN, "plan.toml").unwrap();
        assert_eq!(p.n_features(), 2);
        assert_eq!(p.training.batch_size, 64);
        assert_eq!(p.training.optimizer, Optimizer::Adam);
        assert!(p.scaling.is_none());
        // Round-trips through TOML.
        assert_eq!(TrainingPlan::from_toml(&p.to_toml(), "x").unwrap(), p);
    }

    #[test]
    fn unknown_key_is_refused_and_named() {
        let text = PLAN.replace("rounds = 3", "rounds = 3\nroundz = 4");
        let err = TrainingPlan::from_toml(&text, "plan.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("plan.toml"), "{err}");
        assert!(err.contains("roundz"), "{err}");
    }

    #[test]
    fn impossible_values_are_refused_with_the_key() {
        for (from, to, key) in [
            ("rounds = 3", "rounds = 0", "training.rounds"),
            (
                "learning_rate = 0.01",
                "learning_rate = -1.0",
                "training.learning_rate",
            ),
            (
                "min_participants = 2",
                "min_participants = 0",
                "training.min_participants",
            ),
            ("dropout = 0.0", "dropout = 1.5", "model.dropout"),
            (
                "hidden_layers = [8]",
                "hidden_layers = [0]",
                "model.hidden_layers",
            ),
            (
                "classes = [\"0\", \"1\"]",
                "classes = [\"0\"]",
                "schema.classes",
            ),
            (
                "feature_columns = [\"a\", \"b\"]",
                "feature_columns = [\"a\", \"a\"]",
                "schema.feature_columns",
            ),
            (
                "label_column = \"y\"",
                "label_column = \"a\"",
                "schema.label_column",
            ),
            (
                "rounds = 3",
                "rounds = 3\nproximal_mu = -0.01",
                "training.proximal_mu",
            ),
            (
                "rounds = 3",
                "rounds = 3\nproximal_mu = nan",
                "training.proximal_mu",
            ),
            (
                "rounds = 3",
                "rounds = 3\nproximal_mu = 1e9",
                "training.proximal_mu",
            ),
        ] {
            let text = PLAN.replace(from, to);
            let err = TrainingPlan::from_toml(&text, "plan.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{to}: {err}");
        }
    }

    const REGRESSION: &str = r#"
[schema]
task = "regression"
feature_columns = ["a", "b"]
target_column = "y"

[model]
hidden_layers = [8]

[training]
rounds = 3
learning_rate = 0.01
min_participants = 2
"#;

    #[test]
    fn a_regression_plan_has_one_output_and_the_mse_loss_by_default() {
        let p = TrainingPlan::from_toml(REGRESSION, "plan.toml").unwrap();
        assert!(p.regression());
        assert_eq!(p.n_outputs(), 1);
        assert_eq!(p.loss(), Loss::Mse);
        assert_eq!(p.schema.target(), "y");
        assert_eq!(p.n_stat_columns(), 3);
        assert_eq!(TrainingPlan::from_toml(&p.to_toml(), "x").unwrap(), p);
    }

    /// Issue 22's bad input: each mix of the two tasks' keys is refused by key.
    #[test]
    fn regression_and_classification_keys_do_not_mix() {
        for (text, key) in [
            (
                REGRESSION.replace(
                    "target_column = \"y\"",
                    "target_column = \"y\"\nclasses = [\"0\", \"1\"]",
                ),
                "schema.classes",
            ),
            (
                REGRESSION.replace(
                    "target_column = \"y\"",
                    "target_column = \"y\"\nlabel_column = \"y\"",
                ),
                "schema.label_column",
            ),
            (
                REGRESSION.replace("target_column = \"y\"", ""),
                "schema.target_column",
            ),
            (
                REGRESSION.replace("target_column = \"y\"", "target_column = \"a\""),
                "schema.target_column",
            ),
            (
                REGRESSION.replace("rounds = 3", "rounds = 3\nloss = \"cross-entropy\""),
                "training.loss",
            ),
            (
                REGRESSION.replace(
                    "rounds = 3",
                    "rounds = 3\nloss = \"huber\"\nhuber_delta = 0.0",
                ),
                "training.huber_delta",
            ),
            (
                PLAN.replace("rounds = 3", "rounds = 3\nloss = \"mse\""),
                "training.loss",
            ),
            (
                PLAN.replace(
                    "label_column = \"y\"",
                    "label_column = \"y\"\ntarget_column = \"y\"",
                ),
                "schema.target_column",
            ),
            (REGRESSION.replace("\"regression\"", "\"ranking\""), "task"),
        ] {
            let err = TrainingPlan::from_toml(&text, "plan.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn wrong_type_is_refused() {
        let text = PLAN.replace("rounds = 3", "rounds = \"three\"");
        let err = TrainingPlan::from_toml(&text, "plan.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rounds"), "{err}");
    }
}
