//! What a round leaves behind for people: one line of `metrics.jsonl`, its
//! audit entry, and the readable log line.

use serde::Serialize;

use crate::durable::store::AcceptedUpdate;
use crate::error::{CoordinatorError, Result};
use crate::state::{EvalRecord, Shared};

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
    pub eval_accuracy: Option<f64>,
    pub eval_macro_f1: Option<f64>,
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
    let eval_n: u64 = evaluations.iter().map(|e| e.num_examples).sum();
    let weighted = |f: fn(&EvalRecord) -> f64| {
        (eval_n > 0).then(|| {
            evaluations
                .iter()
                .map(|e| f(e) * e.num_examples as f64)
                .sum::<f64>()
                / eval_n as f64
        })
    };
    let eval_outliers = super::outliers::flag_outliers(&evaluations);
    for o in &eval_outliers {
        tracing::warn!(
            org = %o.org_id,
            round,
            macro_f1 = o.macro_f1,
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
        eval_loss: weighted(|e| e.loss),
        eval_accuracy: weighted(|e| e.accuracy),
        eval_macro_f1: weighted(|e| e.macro_f1),
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
            "eval_macro_f1": r.eval_macro_f1,
            "eval_accuracy": r.eval_accuracy,
            "eval_examples": r.evaluations.iter().map(|e| e.num_examples).sum::<u64>(),
            // Each site's own report, so a release rule can choose whose count.
            "evaluations": r.evaluations.iter().map(|e| serde_json::json!({
                "org": e.org_id,
                "examples": e.num_examples,
                "macro_f1": e.macro_f1,
                "accuracy": e.accuracy,
            })).collect::<Vec<_>>(),
    });
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
