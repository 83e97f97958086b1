//! Flags a site whose reported evaluation of a round's model lies far from the
//! others' on the same model. Each site scores the global model on its own
//! validation split and reports the figures; nothing proves them. A site that
//! reports macro-F1 1.0 for a model every other site scores at 0.4 is either
//! broken or lying, and the release quality floor should not lean on it
//! (`[rules] trusted_evaluators` in the release policy names whose figures
//! count).
//!
//! The rule: with at least three evaluations, a site is flagged when its
//! macro-F1 (R² for regression) differs by more than [`OUTLIER_GAP`] from the
//! median of the other sites' reports. Label-skewed sites honestly differ by 0.1–0.2 on the
//! example (each sees other fault types); 0.35 is beyond that. With two
//! evaluations no one can tell which of them is off, so nothing is flagged.

use serde::Serialize;

use crate::state::EvalRecord;

/// The largest honest gap from the others' median, in macro-F1 or R².
pub const OUTLIER_GAP: f64 = 0.35;

/// One flagged evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalOutlier {
    pub org_id: String,
    /// Which figure was compared: "macro_f1", or "r2" for regression.
    pub metric: &'static str,
    /// The site's figure.
    pub value: f64,
    /// The median of the other sites' figures on the same model.
    pub others_median: f64,
}

/// The evaluations of one round that lie far from the others'.
pub fn flag_outliers(evaluations: &[EvalRecord]) -> Vec<EvalOutlier> {
    if evaluations.len() < 3 {
        return vec![];
    }
    evaluations
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let mut others: Vec<f64> = evaluations
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, o)| o.headline())
                .collect();
            let m = median(&mut others);
            ((e.headline() - m).abs() > OUTLIER_GAP).then(|| EvalOutlier {
                org_id: e.org_id.clone(),
                metric: e.headline_name(),
                value: e.headline(),
                others_median: m,
            })
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(org: &str, f1: f64) -> EvalRecord {
        EvalRecord {
            org_id: org.into(),
            num_examples: 40,
            loss: 1.0,
            accuracy: f1,
            macro_f1: f1,
            regression: None,
        }
    }

    #[test]
    fn a_site_reporting_far_above_the_others_is_flagged_alone() {
        let got = flag_outliers(&[
            eval("a", 1.0),
            eval("b", 0.4),
            eval("c", 0.45),
            eval("d", 0.38),
        ]);
        assert_eq!(
            got,
            vec![EvalOutlier {
                org_id: "a".into(),
                metric: "macro_f1",
                value: 1.0,
                others_median: 0.4
            }]
        );
    }

    #[test]
    fn honest_spread_and_two_sites_are_not_flagged() {
        assert!(flag_outliers(&[eval("a", 0.8), eval("b", 0.6), eval("c", 0.55)]).is_empty());
        assert!(flag_outliers(&[eval("a", 1.0), eval("b", 0.1)]).is_empty());
    }
}
