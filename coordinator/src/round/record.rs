//! What a round leaves behind for people: one line of `metrics.jsonl`, its
//! audit entry, and the readable log line.

use serde::Serialize;

use crate::durable::store::AcceptedUpdate;
use crate::error::{CoordinatorError, Result};
use crate::state::{EvalRecord, Shared};
use sangsaeng_common::learning::metrics::RegressionMetrics;

/// One line of `metrics.jsonl`.
#[derive(Debug, Serialize)]
pub struct RoundRecord {
    pub training_id: String,
    pub round: u32,
    pub finished_at: String,
    pub model_sha256: String,
    pub participants: Vec<AcceptedUpdate>,
    pub total_examples: u64,
    /// Example-weighted mean of the participants' last-epoch training loss.
    pub train_loss: f64,
    /// Validation metrics of this round's global model, weighted by validation rows.
    pub eval_loss: Option<f64>,
    /// Classification only.
    pub eval_accuracy: Option<f64>,
    pub eval_macro_f1: Option<f64>,
    /// Regression only: MAE, RMSE and R², each the example-weighted mean of
    /// the sites' own figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_mae: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_rmse: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_r2: Option<f64>,
    pub evaluations: Vec<EvalRecord>,
    pub timings: Timings,
    pub attempts: u32,
    /// Differential privacy spent once this round is committed (absent without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<super::privacy::RoundSpend>,
    /// How the secure-aggregation round went (absent without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secure: Option<crate::secure::SecureRecord>,
    /// What the plan's robust rule did (absent with `robust = "none"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub robust: Option<super::aggregate::RobustRecord>,
    /// Updates refused this round (a norm bound, a bad chunk, ...), with the
    /// reason; absent when none was.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub refused: std::collections::BTreeMap<String, String>,
    /// Evaluations far from the other sites' on the same model (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub eval_outliers: Vec<super::outliers::EvalOutlier>,
}

#[derive(Debug, Serialize)]
pub struct Timings {
    pub train_phase_secs: f64,
    /// CPU time spent folding update chunks into the accumulator (thread CPU
    /// time, not wall time), summed over all uploads of the round (it overlaps
    /// the training phase: chunks are folded as they arrive).
    pub fold_secs: f64,
    /// Applying the accumulated mean to the model once the round closed.
    pub aggregate_secs: f64,
    pub eval_phase_secs: f64,
    pub round_secs: f64,
}

pub(super) fn round_record(
    id: &str,
    round: u32,
    sha: &str,
    participants: Vec<AcceptedUpdate>,
    evaluations: Vec<EvalRecord>,
    timings: Timings,
    attempts: u32,
) -> RoundRecord {
    let total_examples: u64 = participants.iter().map(|p| p.num_examples).sum();
    let train_loss = participants
        .iter()
        .map(|p| p.train_loss * p.num_examples as f64)
        .sum::<f64>()
        / total_examples.max(1) as f64;
    let weighted = |f: &dyn Fn(&EvalRecord) -> f64| weighted_mean(&evaluations, f);
    // The coordinator refuses an evaluation of the other task, so either
    // every evaluation carries regression metrics or none does.
    let regression = evaluations.iter().any(|e| e.regression.is_some());
    let regressed = |f: fn(&RegressionMetrics) -> f64| {
        if regression {
            weighted(&|e| e.regression.as_ref().map_or(f64::NAN, f))
        } else {
            None
        }
    };
    let classified = |f: fn(&EvalRecord) -> f64| if regression { None } else { weighted(&f) };
    let eval_outliers = super::outliers::flag_outliers(&evaluations);
    for o in &eval_outliers {
        tracing::warn!(
            org = %o.org_id,
            round,
            metric = o.metric,
            value = o.value,
            others_median = o.others_median,
            "a site's evaluation lies far from the other sites' on the same model (flagged in metrics.jsonl and the audit log)"
        );
    }
    RoundRecord {
        eval_outliers,
        training_id: id.to_string(),
        round,
        finished_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .expect("RFC 3339 formatting of a UTC time cannot fail"),
        model_sha256: sha.to_string(),
        total_examples,
        train_loss,
        eval_loss: weighted(&|e| e.loss),
        eval_accuracy: classified(|e| e.accuracy),
        eval_macro_f1: classified(|e| e.macro_f1),
        eval_mae: regressed(|r| r.mae),
        eval_rmse: regressed(|r| r.rmse),
        eval_r2: regressed(|r| r.r2),
        participants,
        evaluations,
        timings,
        attempts,
        privacy: None,
        secure: None,
        robust: None,
        refused: Default::default(),
    }
}

/// The mean of `f` over the evaluations, weighted by their validation rows;
/// `None` without rows.
fn weighted_mean(evaluations: &[EvalRecord], f: &dyn Fn(&EvalRecord) -> f64) -> Option<f64> {
    let n: u64 = evaluations.iter().map(|e| e.num_examples).sum();
    (n > 0).then(|| {
        evaluations
            .iter()
            .map(|e| f(e) * e.num_examples as f64)
            .sum::<f64>()
            / n as f64
    })
}

/// One site's evaluation as the audit log records it: its task's figures only.
fn audit_evaluation(e: &EvalRecord) -> serde_json::Value {
    match &e.regression {
        Some(m) => serde_json::json!({
            "org": e.org_id,
            "examples": e.num_examples,
            "mae": m.mae,
            "rmse": m.rmse,
            "r2": m.r2,
        }),
        None => serde_json::json!({
            "org": e.org_id,
            "examples": e.num_examples,
            "macro_f1": e.macro_f1,
            "accuracy": e.accuracy,
        }),
    }
}

pub(super) fn append_jsonl(path: &std::path::Path, record: &RoundRecord) -> Result<()> {
    use std::io::Write;
    let mut line = serde_json::to_string(record).expect("a round record always serialises");
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| CoordinatorError::io(format!("opening {}", path.display()), e))?;
    f.write_all(line.as_bytes())
        .and_then(|_| f.sync_data())
        .map_err(|e| CoordinatorError::io(format!("appending to {}", path.display()), e))
}

/// The audit entry of a completed and evaluated round: who contributed, with which
/// update (digest) and weight, the resulting global model and its evaluation.
/// Written after the round is committed and its metrics line written, so a
/// restart that re-evaluates a committed round also writes its entry.
pub(super) fn audit_round(shared: &Shared, r: &RoundRecord) -> Result<()> {
    // The weight each update was folded with (what the release rule
    // max_weight_share checks), and the examples it declared when they differ.
    let weights: Vec<u64> = {
        let guard = shared.training();
        r.participants
            .iter()
            .map(|p| {
                guard
                    .as_ref()
                    .map_or(p.num_examples, |t| t.fold_weight(p.num_examples))
            })
            .collect()
    };
    let contributions: Vec<serde_json::Value> = r
        .participants
        .iter()
        .zip(weights)
        .map(|(p, weight)| {
            let mut c = serde_json::json!({"org": p.org_id, "sha256": p.sha256, "weight": weight});
            if weight != p.num_examples {
                c["examples"] = p.num_examples.into();
            }
            c
        })
        .collect();
    let mut entry = serde_json::json!({
            "training": r.training_id,
            "round": r.round,
            "contributions": contributions,
            "global_model_sha256": r.model_sha256,
            "eval_examples": r.evaluations.iter().map(|e| e.num_examples).sum::<u64>(),
            // Each site's own report, so a release rule can choose whose count.
            "evaluations": r.evaluations.iter().map(audit_evaluation).collect::<Vec<_>>(),
    });
    if r.eval_r2.is_some() {
        entry["eval_mae"] = r.eval_mae.into();
        entry["eval_rmse"] = r.eval_rmse.into();
        entry["eval_r2"] = r.eval_r2.into();
    } else {
        entry["eval_macro_f1"] = r.eval_macro_f1.into();
        entry["eval_accuracy"] = r.eval_accuracy.into();
    }
    if !r.eval_outliers.is_empty() {
        entry["eval_outliers"] =
            serde_json::to_value(&r.eval_outliers).expect("outliers serialise");
    }
    // Only differentially private trainings carry the key, so the entries of
    // plain ones are as before.
    if let Some(spend) = &r.privacy {
        entry["dp"] = serde_json::to_value(spend).expect("a privacy record serialises");
    }
    if let Some(robust) = &r.robust {
        entry["robust"] = serde_json::to_value(robust).expect("a robust record serialises");
    }
    if !r.refused.is_empty() {
        entry["refused"] = serde_json::to_value(&r.refused).expect("a map of strings serialises");
    }
    if let Some(secure) = &r.secure {
        entry["secure_aggregation"] =
            serde_json::to_value(secure).expect("a secure-aggregation record serialises");
    }
    shared.audit.append("round_completed", entry)?;
    Ok(())
}

pub(super) fn fmt_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into())
}
