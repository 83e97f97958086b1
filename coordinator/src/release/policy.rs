//! The opening rules of the AI Factory programme's delegation type, as a policy
//! file, and their evaluation against what the audit log says about a training.
//!
//! Every rule key must be present (a forgotten rule is an error, not a silent
//! default) and an unknown key is refused by name, so a typo can never turn a
//! rule off. Evaluation is a pure function of the policy, the [`Facts`] and the
//! roster: each rule is reported with the requirement, the actual value and
//! pass/fail, and the release goes ahead only if all pass.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use sangsaeng_common::config::roster::Roster;

use sangsaeng_common::config::privacy::DpLevel;

use crate::error::{CoordinatorError, Result};

/// A release policy (TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The opening rules; all must pass for a release.
    pub rules: Rules,
    /// What the model card and provenance say about contributors.
    pub disclosure: Disclosure,
    /// The licence and usage terms that travel with the model.
    pub licence: Licence,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Every organisation whose updates shaped the model must have signed the
    /// data submission agreement (roster `agreement.signed`): the intersection
    /// of consents over all rounds, not the union.
    pub require_consent: bool,
    /// At least this many distinct organisations contributed accepted updates.
    pub min_contributors: usize,
    /// No organisation's share of a round's aggregation weight above this (0, 1].
    pub max_weight_share: f64,
    /// At least this many completed rounds, and the training finished.
    pub min_rounds: u32,
    /// Federated macro-F1 of the final global model at least this, in [0, 1].
    pub min_macro_f1: f64,
    /// Whose evaluations count for `min_macro_f1`: these organisations'
    /// reports on the final model, weighted by their validation rows (e.g. the
    /// anchor's or a government test site's). Empty (the default): every
    /// site's own report. A listed organisation that did not evaluate the final
    /// model fails the rule closed, as does an audit log without per-site reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_evaluators: Vec<String>,
    /// Further floors on the final model's figures (`[[rules.min_metric]]`),
    /// each one rule: `metric = "r2"` with `min`, `"mae"` / `"rmse"` with
    /// `max` (target units), `"macro_f1"` / `"accuracy"` with `min`. A
    /// regression training needs at least one on r2, mae or rmse (it has no
    /// macro-F1 for `min_macro_f1`); the same `trusted_evaluators` decide
    /// whose figures count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub min_metric: Vec<MetricFloor>,
    /// When true, only a model trained with differential privacy within
    /// `max_epsilon` may be released; a model trained without it fails closed.
    pub require_differential_privacy: bool,
    /// Largest privacy loss ε allowed when differential privacy is required.
    pub max_epsilon: f64,
    /// Largest δ allowed when differential privacy is required (default: any δ
    /// the plan validated, which is below 1 / every site's rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delta: Option<f64>,
    /// The level differential privacy must have been applied at, when required:
    /// `"record"` or `"client"` (default: either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_level: Option<DpLevel>,
    /// When true, only a model every round of which was securely aggregated
    /// (the audit entry of each round records it) may be released: no
    /// contributor's individual update was ever open to the coordinator.
    #[serde(default)]
    pub require_secure_aggregation: bool,
}

/// One `[[rules.min_metric]]` floor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricFloor {
    pub metric: Metric,
    /// The least allowed value (metrics where higher is better).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// The largest allowed value (errors: mae, rmse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// A figure of the final model a floor can be set on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    MacroF1,
    Accuracy,
    R2,
    Mae,
    Rmse,
}

impl Metric {
    /// The name metrics.jsonl and the audit log use.
    pub fn name(self) -> &'static str {
        match self {
            Metric::MacroF1 => "macro_f1",
            Metric::Accuracy => "accuracy",
            Metric::R2 => "r2",
            Metric::Mae => "mae",
            Metric::Rmse => "rmse",
        }
    }

    /// Errors are bounded from above, scores from below.
    fn lower_is_better(self) -> bool {
        matches!(self, Metric::Mae | Metric::Rmse)
    }

    fn regression(self) -> bool {
        matches!(self, Metric::R2 | Metric::Mae | Metric::Rmse)
    }
}

impl MetricFloor {
    fn validate(&self, i: usize) -> std::result::Result<(), String> {
        let key = format!("rules.min_metric[{i}] ({})", self.metric.name());
        match (self.metric.lower_is_better(), self.min, self.max) {
            (true, None, Some(v)) if v.is_finite() && v >= 0.0 => Ok(()),
            (false, Some(v), None) if v.is_finite() && v <= 1.0 => Ok(()),
            (true, _, _) => Err(format!(
                "{key}: an error metric takes `max` (a finite number >= 0, in the target's units) and no `min`"
            )),
            (false, _, _) => Err(format!(
                "{key}: a score takes `min` (a finite number <= 1) and no `max`"
            )),
        }
    }

    fn passes(&self, v: f64) -> bool {
        match (self.min, self.max) {
            (Some(min), _) => v >= min,
            (_, Some(max)) => v <= max,
            _ => false,
        }
    }

    fn requirement(&self) -> String {
        match (self.min, self.max) {
            (Some(min), _) => format!("at least {min:.4}"),
            (_, Some(max)) => format!("at most {max:.4}"),
            _ => "a bound".into(),
        }
    }
}

/// How contributors appear in the model card and provenance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContributorDisclosure {
    /// Organisation id and name.
    Name,
    /// Tier only ("tier-1", "tier-2", ...).
    Tier,
    /// Only how many organisations contributed.
    Count,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disclosure {
    /// How contributors appear: by name, by tier, or only their count.
    pub contributors: ContributorDisclosure,
}

/// The licence and usage terms that travel with the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Licence {
    /// SPDX identifier or licence name, e.g. "Apache-2.0" or "KOGL-Type-1".
    pub id: String,
    /// Usage terms in words (who may use the model and for what).
    pub terms: String,
}

impl Policy {
    /// Parses and checks a policy; errors name the file and the rule.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let p: Policy = toml::from_str(text).map_err(|e| {
            CoordinatorError::InvalidArgument(format!("policy {origin}: {}", e.message().trim()))
        })?;
        p.validate()
            .map_err(|m| CoordinatorError::InvalidArgument(format!("policy {origin}: {m}")))?;
        Ok(p)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let r = &self.rules;
        if !(r.max_weight_share > 0.0 && r.max_weight_share <= 1.0) {
            return Err(format!(
                "rules.max_weight_share must lie in (0, 1], got {}",
                r.max_weight_share
            ));
        }
        if !(0.0..=1.0).contains(&r.min_macro_f1) {
            return Err(format!(
                "rules.min_macro_f1 must lie in [0, 1], got {}",
                r.min_macro_f1
            ));
        }
        for (i, floor) in r.min_metric.iter().enumerate() {
            floor.validate(i)?;
        }
        if r.trusted_evaluators.iter().any(|o| o.trim().is_empty()) {
            return Err(
                "rules.trusted_evaluators must name organisations (an entry is empty)".into(),
            );
        }
        if r.min_contributors == 0 {
            return Err("rules.min_contributors must be at least 1".into());
        }
        if !(r.max_epsilon.is_finite() && r.max_epsilon > 0.0) {
            return Err(format!(
                "rules.max_epsilon must be a positive number, got {}",
                r.max_epsilon
            ));
        }
        if let Some(d) = r.max_delta
            && !(d.is_finite() && d > 0.0 && d < 1.0)
        {
            return Err(format!(
                "rules.max_delta must lie strictly between 0 and 1, got {d}"
            ));
        }
        if self.licence.id.trim().is_empty() {
            return Err("licence.id must name the licence the model is released under".into());
        }
        Ok(())
    }
}

/// One accepted update as the audit log records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    pub org: String,
    pub sha256: String,
    pub weight: u64,
}

/// One site's report of a round's model, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationFact {
    pub org: String,
    pub examples: u64,
    /// Its figures by name (`macro_f1`, `accuracy`; `mae`, `rmse`, `r2`).
    pub figures: BTreeMap<String, f64>,
}

/// One completed round as the audit log records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundFact {
    pub round: u32,
    pub contributions: Vec<Contribution>,
    pub global_model_sha256: String,
    pub eval_macro_f1: Option<f64>,
    pub eval_accuracy: Option<f64>,
    /// Regression trainings: the weighted MAE, RMSE and R².
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_mae: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_rmse: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_r2: Option<f64>,
    /// ε of the model after this round (differentially private trainings only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_epsilon: Option<f64>,
    /// The round's audit entry records secure aggregation.
    #[serde(default)]
    pub secure_aggregation: bool,
    /// Each site's own report (empty in entries written before they were recorded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evaluations: Vec<EvaluationFact>,
}

impl RoundFact {
    /// The round's federated (all sites, weighted) figure.
    pub fn figure(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::MacroF1 => self.eval_macro_f1,
            Metric::Accuracy => self.eval_accuracy,
            Metric::R2 => self.eval_r2,
            Metric::Mae => self.eval_mae,
            Metric::Rmse => self.eval_rmse,
        }
    }

    /// Whether the round's evaluations are a regression's.
    pub fn regression(&self) -> bool {
        self.eval_r2.is_some()
    }
}

/// What is known about a training when a release is requested.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub training: String,
    /// The training ran all its planned rounds.
    pub finished: bool,
    pub planned_rounds: u32,
    /// Completed rounds, ascending, one per round.
    pub rounds: Vec<RoundFact>,
    /// Privacy loss ε of the training, `None` when trained without differential privacy.
    pub epsilon: Option<f64>,
    /// The differential-privacy settings the audit log's plan trained with.
    pub privacy: Option<DpFacts>,
}

/// A differentially private training's settings, from the plan in the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct DpFacts {
    pub level: DpLevel,
    pub delta: f64,
    pub clip: f64,
    /// The plan's noise multiplier; `None` when each site derived its own (the
    /// audit log's round entries record each site's).
    pub noise_multiplier: Option<f64>,
}

impl Facts {
    /// Every organisation with an accepted update in any round.
    pub fn contributors(&self) -> BTreeSet<String> {
        self.rounds
            .iter()
            .flat_map(|r| r.contributions.iter().map(|c| c.org.clone()))
            .collect()
    }

    /// The largest share of one round's aggregation weight held by one organisation.
    pub fn largest_share(&self) -> Option<(String, u32, f64)> {
        let mut best: Option<(String, u32, f64)> = None;
        for r in &self.rounds {
            let total: u64 = r.contributions.iter().map(|c| c.weight).sum();
            if total == 0 {
                continue;
            }
            let mut per_org: BTreeMap<&str, u64> = BTreeMap::new();
            for c in &r.contributions {
                *per_org.entry(&c.org).or_default() += c.weight;
            }
            for (org, w) in per_org {
                let share = w as f64 / total as f64;
                if best.as_ref().is_none_or(|b| share > b.2) {
                    best = Some((org.to_string(), r.round, share));
                }
            }
        }
        best
    }
}

/// A rule's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleResult {
    pub rule: String,
    pub requirement: String,
    pub actual: String,
    pub passed: bool,
}

fn rule(rule: &str, requirement: String, actual: String, passed: bool) -> RuleResult {
    RuleResult {
        rule: rule.into(),
        requirement,
        actual,
        passed,
    }
}

/// Evaluates every rule, in policy order.
pub fn evaluate(policy: &Policy, facts: &Facts, roster: &Roster) -> Vec<RuleResult> {
    let r = &policy.rules;
    let contributors = facts.contributors();
    let mut results = vec![
        consent_rule(r, &contributors, roster),
        min_contributors_rule(r, &contributors),
        max_weight_share_rule(r, facts),
        min_rounds_rule(r, facts),
        min_macro_f1_rule(r, facts),
    ];
    results.extend(r.min_metric.iter().map(|f| min_metric_rule(r, f, facts)));
    results.push(differential_privacy_rule(r, facts));
    results.push(secure_aggregation_rule(r, facts));
    results
}

/// `require_secure_aggregation`: every round, from the audit log; a training
/// with no round, or one plain round, fails closed.
fn secure_aggregation_rule(r: &Rules, facts: &Facts) -> RuleResult {
    let plain: Vec<u32> = facts
        .rounds
        .iter()
        .filter(|f| !f.secure_aggregation)
        .map(|f| f.round)
        .collect();
    let actual = match (facts.rounds.len(), plain.len()) {
        (0, _) => "no completed round".to_string(),
        (n, 0) => format!("all {n} rounds securely aggregated"),
        (n, _) => format!(
            "{} of {n} rounds without secure aggregation (rounds {plain:?})",
            plain.len()
        ),
    };
    match r.require_secure_aggregation {
        false => rule(
            "require_secure_aggregation",
            "not required by this policy".into(),
            actual,
            true,
        ),
        true => rule(
            "require_secure_aggregation",
            "every round securely aggregated".into(),
            actual,
            !facts.rounds.is_empty() && plain.is_empty(),
        ),
    }
}

/// `require_consent`: judged against the roster now, so a consent withdrawn
/// after training still blocks the release; an empty training never passes.
fn consent_rule(r: &Rules, contributors: &BTreeSet<String>, roster: &Roster) -> RuleResult {
    let unconsented: Vec<String> = contributors
        .iter()
        .filter(|id| !roster.get(id).is_some_and(|o| o.agreement.signed))
        .cloned()
        .collect();
    if r.require_consent {
        rule(
            "require_consent",
            "every contributing organisation signed the data submission agreement".into(),
            if unconsented.is_empty() {
                format!("all {} contributors signed", contributors.len())
            } else {
                format!(
                    "not signed (or no longer in the roster): {}",
                    unconsented.join(", ")
                )
            },
            unconsented.is_empty() && !contributors.is_empty(),
        )
    } else {
        rule(
            "require_consent",
            "not required by this policy".into(),
            format!(
                "{} of {} contributors signed",
                contributors.len() - unconsented.len(),
                contributors.len()
            ),
            true,
        )
    }
}

/// `min_contributors`: distinct organisations, not updates, so one firm's many
/// sites count once.
fn min_contributors_rule(r: &Rules, contributors: &BTreeSet<String>) -> RuleResult {
    rule(
        "min_contributors",
        format!(
            "at least {} distinct contributing organisations",
            r.min_contributors
        ),
        format!("{} contributed", contributors.len()),
        contributors.len() >= r.min_contributors,
    )
}

/// `max_weight_share`: the worst round decides, so no firm dominates the model
/// even in one round; no accepted update at all fails.
fn max_weight_share_rule(r: &Rules, facts: &Facts) -> RuleResult {
    let share = facts.largest_share();
    rule(
        "max_weight_share",
        format!(
            "no organisation above {:.1}% of a round's aggregation weight",
            r.max_weight_share * 100.0
        ),
        match &share {
            // The organisation is named only in the coordinator's answer to its
            // administrator, never in the released artifact.
            Some((org, round, s)) => format!("largest: {:.1}% ({org}, round {round})", s * 100.0),
            None => "no accepted updates".into(),
        },
        share
            .as_ref()
            .is_some_and(|(_, _, s)| *s <= r.max_weight_share),
    )
}

/// `min_rounds`: an unfinished training fails however many rounds it has, so
/// a stopped run is never released as if complete.
fn min_rounds_rule(r: &Rules, facts: &Facts) -> RuleResult {
    let completed = facts.rounds.len() as u32;
    rule(
        "min_rounds",
        format!(
            "at least {} completed rounds, training finished",
            r.min_rounds
        ),
        format!(
            "{completed} of {} rounds completed{}",
            facts.planned_rounds,
            if facts.finished {
                ", finished"
            } else {
                ", not finished"
            }
        ),
        facts.finished && completed >= r.min_rounds,
    )
}

/// `min_macro_f1`: the final model's federated score is the one released, so
/// only the last round counts; a missing evaluation fails.
fn min_macro_f1_rule(r: &Rules, facts: &Facts) -> RuleResult {
    let last = facts.rounds.last();
    if last.is_some_and(RoundFact::regression) {
        return regression_floor_rule(r);
    }
    let (f1, source) = final_figure(r, last, Metric::MacroF1);
    let wanted = if r.trusted_evaluators.is_empty() {
        format!(
            "federated macro-F1 of the final model at least {:.4}",
            r.min_macro_f1
        )
    } else {
        format!(
            "macro-F1 of the final model on the validation data of {} at least {:.4}",
            r.trusted_evaluators.join(", "),
            r.min_macro_f1
        )
    };
    rule(
        "min_macro_f1",
        wanted,
        match f1 {
            Some(v) => format!("{v:.4}, from {source}"),
            None => format!("no evaluation of the final model to use ({source})"),
        },
        f1.is_some_and(|v| v >= r.min_macro_f1),
    )
}

/// `min_macro_f1` on a regression training, which has no macro-F1: its
/// quality floor must come from `min_metric` instead, or the rule fails closed.
fn regression_floor_rule(r: &Rules) -> RuleResult {
    let floors: Vec<&str> = r
        .min_metric
        .iter()
        .filter(|f| f.metric.regression())
        .map(|f| f.metric.name())
        .collect();
    rule(
        "min_macro_f1",
        "a quality floor on the final model (a regression training's: a rules.min_metric on r2, mae or rmse)".into(),
        if floors.is_empty() {
            "regression training, and the policy sets no min_metric on r2, mae or rmse".into()
        } else {
            format!(
                "regression training: its floor is the min_metric rule(s) on {}",
                floors.join(", ")
            )
        },
        !floors.is_empty(),
    )
}

/// One `[[rules.min_metric]]` floor on the final model.
fn min_metric_rule(r: &Rules, floor: &MetricFloor, facts: &Facts) -> RuleResult {
    let (v, source) = final_figure(r, facts.rounds.last(), floor.metric);
    rule(
        "min_metric",
        format!(
            "{} of the final model {}",
            floor.metric.name(),
            floor.requirement()
        ),
        match v {
            Some(v) => format!("{v:.4}, from {source}"),
            None => format!(
                "no {} of the final model to use ({source})",
                floor.metric.name()
            ),
        },
        v.is_some_and(|v| floor.passes(v)),
    )
}

/// The final model's `metric` a floor is checked against: everyone's
/// federated figure, or the trusted evaluators' own, and whose it is.
fn final_figure(r: &Rules, last: Option<&RoundFact>, metric: Metric) -> (Option<f64>, String) {
    if r.trusted_evaluators.is_empty() {
        let n = last.map_or(0, |l| l.evaluations.len());
        let whose = match n {
            0 => "every site's own report".to_string(),
            n => format!("the {n} sites' own reports"),
        };
        (last.and_then(|l| l.figure(metric)), whose)
    } else {
        trusted_figure(&r.trusted_evaluators, last, metric)
    }
}

/// The trusted organisations' figure of the final model, weighted by their
/// rows, and whose figures these are; `None` (failing the rule) unless every
/// trusted organisation reported it.
fn trusted_figure(
    trusted: &[String],
    last: Option<&RoundFact>,
    metric: Metric,
) -> (Option<f64>, String) {
    let evals = last.map(|l| l.evaluations.as_slice()).unwrap_or_default();
    let missing: Vec<&str> = trusted
        .iter()
        .filter(|o| !evals.iter().any(|e| &e.org == *o))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return (None, format!("no report from {}", missing.join(", ")));
    }
    let used: Vec<&EvaluationFact> = evals.iter().filter(|e| trusted.contains(&e.org)).collect();
    if used.iter().any(|e| !e.figures.contains_key(metric.name())) {
        return (
            None,
            format!("the trusted reports carry no {}", metric.name()),
        );
    }
    let rows: u64 = used.iter().map(|e| e.examples).sum();
    let f1 = used
        .iter()
        .map(|e| e.figures[metric.name()] * e.examples as f64)
        .sum::<f64>()
        / rows.max(1) as f64;
    let whose = used
        .iter()
        .map(|e| format!("{} ({} rows)", e.org, e.examples))
        .collect::<Vec<_>>()
        .join(", ");
    (Some(f1), whose)
}

/// `require_differential_privacy`: fails closed, a model trained without it
/// never passes when the policy requires it.
fn differential_privacy_rule(r: &Rules, facts: &Facts) -> RuleResult {
    let actual = match (&facts.privacy, facts.epsilon) {
        (Some(p), Some(e)) => format!("{} level, ε = {e:.3}, δ = {:e}", p.level.name(), p.delta),
        _ => "trained without differential privacy".into(),
    };
    if !r.require_differential_privacy {
        return rule(
            "require_differential_privacy",
            "not required by this policy".into(),
            actual,
            true,
        );
    }
    let mut requirement = format!("trained with differential privacy, ε ≤ {}", r.max_epsilon);
    if let Some(d) = r.max_delta {
        requirement.push_str(&format!(", δ ≤ {d:e}"));
    }
    if let Some(l) = r.dp_level {
        requirement.push_str(&format!(", {} level", l.name()));
    }
    let passed = match (&facts.privacy, facts.epsilon) {
        (Some(p), Some(e)) => {
            e <= r.max_epsilon
                && r.max_delta.is_none_or(|d| p.delta <= d)
                && r.dp_level.is_none_or(|l| l == p.level)
        }
        _ => false,
    };
    rule("require_differential_privacy", requirement, actual, passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const POLICY: &str = r#"
[rules]
require_consent = true
min_contributors = 3
max_weight_share = 0.5
min_rounds = 2
min_macro_f1 = 0.6
require_differential_privacy = false
max_epsilon = 8.0

[disclosure]
contributors = "tier"

[licence]
id = "Apache-2.0"
terms = "For defect detection research within the AI Factory programme."
"#;

    fn roster(unsigned: &[&str]) -> Roster {
        let mut t = String::new();
        for id in ["a", "b", "c", "d"] {
            let agreement = if unsigned.contains(&id) {
                "agreement = { signed = false }".to_string()
            } else {
                "agreement = { signed = true, date = \"2026-03-02\" }".to_string()
            };
            t.push_str(&format!(
                "[[organisation]]\nid = \"{id}\"\nname = \"{id}\"\ntier = \"tier-1\"\nrole = \"participant\"\n{agreement}\n"
            ));
        }
        Roster::from_toml(&t, "test").unwrap()
    }

    fn facts(weights: &[(&str, u64)], rounds: u32, f1: Option<f64>) -> Facts {
        Facts {
            training: "t-1".into(),
            finished: true,
            planned_rounds: rounds,
            rounds: (1..=rounds)
                .map(|round| RoundFact {
                    round,
                    contributions: weights
                        .iter()
                        .map(|(org, w)| Contribution {
                            org: org.to_string(),
                            sha256: "00".into(),
                            weight: *w,
                        })
                        .collect(),
                    global_model_sha256: "11".into(),
                    eval_macro_f1: f1,
                    eval_accuracy: f1,
                    eval_mae: None,
                    eval_rmse: None,
                    eval_r2: None,
                    dp_epsilon: None,
                    secure_aggregation: false,
                    evaluations: vec![],
                })
                .collect(),
            epsilon: None,
            privacy: None,
        }
    }

    /// Issue 21 (e): site "a" reports macro-F1 1.0 for a model the others score
    /// at 0.4. Every site's report together passes a 0.5 floor; the anchor's
    /// own figures do not, and the rule says whose it used.
    #[test]
    fn trusted_evaluators_decide_the_quality_floor_and_are_named() {
        let mut f = facts(&[("a", 1), ("b", 1), ("c", 1)], 2, Some(0.6));
        let last = f.rounds.last_mut().unwrap();
        last.evaluations = [("a", 100, 1.0), ("b", 100, 0.4), ("c", 50, 0.4)]
            .iter()
            .map(|(o, n, v)| EvaluationFact {
                org: o.to_string(),
                examples: *n,
                figures: [("macro_f1".to_string(), *v)].into(),
            })
            .collect();
        let mut p = Policy::from_toml(POLICY, "test").unwrap();
        p.rules.min_macro_f1 = 0.5;
        let all = outcome(&p, &f, &roster(&[]), "min_macro_f1");
        assert!(all.passed, "{all:?}");
        assert!(all.actual.contains("the 3 sites' own reports"), "{all:?}");
        p.rules.trusted_evaluators = vec!["b".into(), "c".into()];
        let trusted = outcome(&p, &f, &roster(&[]), "min_macro_f1");
        assert!(!trusted.passed, "{trusted:?}");
        assert!(
            trusted
                .actual
                .starts_with("0.4000, from b (100 rows), c (50 rows)"),
            "{trusted:?}"
        );
        p.rules.trusted_evaluators = vec!["gov-test-site".into()];
        let absent = outcome(&p, &f, &roster(&[]), "min_macro_f1");
        assert!(!absent.passed);
        assert!(
            absent.actual.contains("no report from gov-test-site"),
            "{absent:?}"
        );
        p.rules.trusted_evaluators = vec![" ".into()];
        assert!(p.validate().unwrap_err().contains("trusted_evaluators"));
    }

    #[test]
    fn differential_privacy_is_required_with_its_figures() {
        let mut p = Policy::from_toml(POLICY, "test").unwrap();
        p.rules.require_differential_privacy = true;
        let plain = outcome(&p, &good(), &roster(&[]), "require_differential_privacy");
        assert!(!plain.passed, "a model trained without DP fails closed");
        assert_eq!(plain.actual, "trained without differential privacy");
        let mut dp = good();
        dp.epsilon = Some(7.5);
        dp.privacy = Some(DpFacts {
            level: DpLevel::Record,
            delta: 1e-5,
            clip: 1.0,
            noise_multiplier: None,
        });
        let ok = outcome(&p, &dp, &roster(&[]), "require_differential_privacy");
        assert!(ok.passed, "{ok:?}");
        assert!(ok.actual.contains("ε = 7.500"), "{}", ok.actual);
        p.rules.max_epsilon = 4.0;
        assert!(!outcome(&p, &dp, &roster(&[]), "require_differential_privacy").passed);
        p.rules.max_epsilon = 8.0;
        p.rules.max_delta = Some(1e-6);
        let tight = outcome(&p, &dp, &roster(&[]), "require_differential_privacy");
        assert!(
            !tight.passed && tight.requirement.contains("δ ≤ 1e-6"),
            "{tight:?}"
        );
        p.rules.max_delta = None;
        p.rules.dp_level = Some(DpLevel::Client);
        assert!(!outcome(&p, &dp, &roster(&[]), "require_differential_privacy").passed);
    }

    fn outcome(policy: &Policy, f: &Facts, r: &Roster, name: &str) -> RuleResult {
        evaluate(policy, f, r)
            .into_iter()
            .find(|x| x.rule == name)
            .unwrap()
    }

    fn good() -> Facts {
        facts(&[("a", 100), ("b", 120), ("c", 90)], 2, Some(0.8))
    }

    #[test]
    fn a_good_training_passes_every_rule() {
        let p = Policy::from_toml(POLICY, "test").unwrap();
        let results = evaluate(&p, &good(), &roster(&[]));
        assert_eq!(results.len(), 7);
        assert!(results.iter().all(|r| r.passed), "{results:#?}");
    }

    #[test]
    fn consent_is_the_intersection_over_all_rounds() {
        let p = Policy::from_toml(POLICY, "test").unwrap();
        let mut f = good();
        // "d" contributed in round 1 only, and never signed.
        f.rounds[0].contributions.push(Contribution {
            org: "d".into(),
            sha256: "0".into(),
            weight: 1,
        });
        let r = outcome(&p, &f, &roster(&["d"]), "require_consent");
        assert!(!r.passed);
        assert!(r.actual.contains('d'), "{}", r.actual);
        // An organisation removed from the roster since no longer consents.
        let mut f = good();
        f.rounds[1].contributions.push(Contribution {
            org: "gone".into(),
            sha256: "0".into(),
            weight: 1,
        });
        assert!(!outcome(&p, &f, &roster(&[]), "require_consent").passed);
        // Not required: passes, still reported.
        let mut p2 = p.clone();
        p2.rules.require_consent = false;
        assert!(outcome(&p2, &f, &roster(&[]), "require_consent").passed);
    }

    #[test]
    fn min_contributors_both_ways() {
        let p = Policy::from_toml(POLICY, "test").unwrap();
        assert!(outcome(&p, &good(), &roster(&[]), "min_contributors").passed);
        let f = facts(&[("a", 100), ("b", 100)], 2, Some(0.8));
        let r = outcome(&p, &f, &roster(&[]), "min_contributors");
        assert!(!r.passed);
        assert_eq!(r.actual, "2 contributed");
    }

    #[test]
    fn secure_aggregation_is_required_of_every_round() {
        let mut p = Policy::from_toml(POLICY, "test").unwrap();
        let mut f = good();
        assert!(outcome(&p, &f, &roster(&[]), "require_secure_aggregation").passed);
        p.rules.require_secure_aggregation = true;
        let r = outcome(&p, &f, &roster(&[]), "require_secure_aggregation");
        assert!(
            !r.passed && r.actual.contains("without secure aggregation"),
            "{r:?}"
        );
        for round in &mut f.rounds {
            round.secure_aggregation = true;
        }
        assert!(outcome(&p, &f, &roster(&[]), "require_secure_aggregation").passed);
        f.rounds[0].secure_aggregation = false;
        let r = outcome(&p, &f, &roster(&[]), "require_secure_aggregation");
        assert!(!r.passed && r.actual.contains("rounds [1]"), "{r:?}");
        f.rounds.clear();
        assert!(!outcome(&p, &f, &roster(&[]), "require_secure_aggregation").passed);
    }

    #[test]
    fn max_weight_share_both_ways() {
        let p = Policy::from_toml(POLICY, "test").unwrap();
        assert!(outcome(&p, &good(), &roster(&[]), "max_weight_share").passed);
        let f = facts(&[("a", 600), ("b", 200), ("c", 199)], 2, Some(0.8));
        let r = outcome(&p, &f, &roster(&[]), "max_weight_share");
        assert!(!r.passed);
        assert!(
            r.actual.contains("60.1%") && r.actual.contains("a,"),
            "{}",
            r.actual
        );
        // Exactly at the limit passes.
        let f = facts(&[("a", 100), ("b", 50), ("c", 50)], 2, Some(0.8));
        assert!(outcome(&p, &f, &roster(&[]), "max_weight_share").passed);
    }

    #[test]
    fn min_rounds_both_ways_and_unfinished_fails() {
        let p = Policy::from_toml(POLICY, "test").unwrap();
        assert!(outcome(&p, &good(), &roster(&[]), "min_rounds").passed);
        let f = facts(&[("a", 1), ("b", 1), ("c", 1)], 1, Some(0.8));
        assert!(!outcome(&p, &f, &roster(&[]), "min_rounds").passed);
        let mut f = good();
        f.finished = false;
        let r = outcome(&p, &f, &roster(&[]), "min_rounds");
        assert!(!r.passed && r.actual.contains("not finished"));
    }

    #[test]
    fn quality_floor_both_ways() {
        let p = Policy::from_toml(POLICY, "test").unwrap();
        assert!(outcome(&p, &good(), &roster(&[]), "min_macro_f1").passed);
        let f = facts(&[("a", 1), ("b", 1), ("c", 1)], 2, Some(0.59));
        assert!(!outcome(&p, &f, &roster(&[]), "min_macro_f1").passed);
        let f = facts(&[("a", 1), ("b", 1), ("c", 1)], 2, None);
        assert!(!outcome(&p, &f, &roster(&[]), "min_macro_f1").passed);
    }

    #[test]
    fn differential_privacy_fails_closed() {
        let mut p = Policy::from_toml(POLICY, "test").unwrap();
        assert!(outcome(&p, &good(), &roster(&[]), "require_differential_privacy").passed);
        p.rules.require_differential_privacy = true;
        let r = outcome(&p, &good(), &roster(&[]), "require_differential_privacy");
        assert!(!r.passed);
        assert_eq!(r.actual, "trained without differential privacy");
        let mut f = good();
        f.epsilon = Some(3.0);
        // An ε without the settings it was spent with is not evidence.
        assert!(!outcome(&p, &f, &roster(&[]), "require_differential_privacy").passed);
        f.privacy = Some(DpFacts {
            level: DpLevel::Record,
            delta: 1e-5,
            clip: 1.0,
            noise_multiplier: Some(1.1),
        });
        assert!(outcome(&p, &f, &roster(&[]), "require_differential_privacy").passed);
        f.epsilon = Some(9.0);
        assert!(!outcome(&p, &f, &roster(&[]), "require_differential_privacy").passed);
    }

    #[test]
    fn unknown_missing_or_impossible_rules_are_refused_by_name() {
        let e = Policy::from_toml(&POLICY.replace("min_rounds", "min_round"), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("min_round") && e.contains("p.toml"), "{e}");
        let e = Policy::from_toml(&POLICY.replace("min_macro_f1 = 0.6\n", ""), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("min_macro_f1"), "{e}");
        let e = Policy::from_toml(&POLICY.replace("0.5", "1.5"), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_weight_share"), "{e}");
        let e = Policy::from_toml(&POLICY.replace("\"tier\"", "\"logo\""), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("logo"), "{e}");
        let e = Policy::from_toml(&format!("{POLICY}\n[extra]\nx = 1\n"), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("extra"), "{e}");
    }
}
