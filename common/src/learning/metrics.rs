//! Metrics reported for every round: for classification accuracy and
//! macro-F1 from a confusion matrix, for regression MAE, RMSE and R², plus the
//! [`Evaluation`] record that carries them.
//!
//! Line data is usually dominated by the "ok" class, so accuracy alone hides a
//! model that never flags a defect; macro-F1 weighs every defect class equally.
//! For a regression target (an analyser reading, a cycle time) MAE and RMSE are
//! in the target's own units, so a plant engineer reads them directly, and R²
//! says how much of the target's spread the model explains.

/// The outcome of evaluating a model on a set of rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Number of rows evaluated.
    pub n: usize,
    /// Mean cross-entropy, or for regression the mean squared error on the
    /// standardised target (whatever loss trained it).
    pub loss: f64,
    /// Classification only (0 for regression).
    pub accuracy: f64,
    /// Classification only (0 for regression); see [`macro_f1`] for which
    /// classes are averaged.
    pub macro_f1: f64,
    /// Regression only.
    pub regression: Option<RegressionMetrics>,
}

impl Evaluation {
    /// The figure rounds, personalisation and release floors rank models by:
    /// macro-F1, or R² for regression. Both are "higher is better", at most 1.
    pub fn headline(&self) -> f64 {
        self.regression.map_or(self.macro_f1, |r| r.r2)
    }
}

/// A regression model's errors, in the target's units (R² is unit-free).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RegressionMetrics {
    /// Mean absolute error.
    pub mae: f64,
    /// Root mean squared error.
    pub rmse: f64,
    /// Coefficient of determination, `1 − SSE / SST` with SST about these
    /// rows' own mean: 1 is perfect, 0 is no better than that mean, and it is
    /// negative for a model worse than it.
    pub r2: f64,
}

/// MAE, RMSE and R² of `pred` against `truth`; `None` for no rows.
///
/// Rows whose truth is constant have SST 0: R² is then 1 for a perfect
/// prediction and 0 otherwise (scikit-learn's convention), never a division by zero.
///
/// # Panics
///
/// If `truth` and `pred` differ in length.
pub fn regression(truth: &[f64], pred: &[f64]) -> Option<RegressionMetrics> {
    assert_eq!(
        truth.len(),
        pred.len(),
        "truth and predictions differ in length"
    );
    if truth.is_empty() {
        return None;
    }
    let n = truth.len() as f64;
    let mean = truth.iter().sum::<f64>() / n;
    let (mut abs, mut sse, mut sst) = (0.0, 0.0, 0.0);
    for (&t, &p) in truth.iter().zip(pred) {
        abs += (p - t).abs();
        sse += (p - t) * (p - t);
        sst += (t - mean) * (t - mean);
    }
    let r2 = if sst > 0.0 {
        1.0 - sse / sst
    } else if sse == 0.0 {
        1.0
    } else {
        0.0
    };
    Some(RegressionMetrics {
        mae: abs / n,
        rmse: (sse / n).sqrt(),
        r2,
    })
}

/// Confusion matrix: `m[t][p]` counts rows of true class `t` predicted as `p`.
///
/// # Panics
///
/// If `truth` and `pred` differ in length or hold a class `>= n_classes`;
/// callers validate labels first ([`crate::learning::train`] does), so that is a bug.
pub fn confusion(n_classes: usize, truth: &[u32], pred: &[u32]) -> Vec<Vec<u64>> {
    assert_eq!(
        truth.len(),
        pred.len(),
        "truth and predictions differ in length"
    );
    let mut m = vec![vec![0u64; n_classes]; n_classes];
    for (&t, &p) in truth.iter().zip(pred) {
        m[t as usize][p as usize] += 1;
    }
    m
}

/// Fraction of rows predicted correctly; 0 for no rows.
///
/// # Panics
///
/// If `truth` and `pred` differ in length.
pub fn accuracy(truth: &[u32], pred: &[u32]) -> f64 {
    assert_eq!(
        truth.len(),
        pred.len(),
        "truth and predictions differ in length"
    );
    if truth.is_empty() {
        return 0.0;
    }
    let correct = truth.iter().zip(pred).filter(|(t, p)| t == p).count();
    correct as f64 / truth.len() as f64
}

/// Unweighted mean of the per-class F1 scores, `F1 = 2·TP / (2·TP + FP + FN)`.
///
/// The mean runs over the classes that occur in `truth` or in `pred`. A class
/// that has no rows and is never predicted is left out: its F1 is 0/0, and a
/// site that simply has no rows of a rare defect should not be scored as if it
/// had missed them all. A class that is predicted but absent from `truth` is
/// kept, with F1 = 0, since those predictions are all false alarms.
/// Returns 0 for no rows.
///
/// # Panics
///
/// As [`confusion`].
pub fn macro_f1(n_classes: usize, truth: &[u32], pred: &[u32]) -> f64 {
    macro_f1_from_confusion(&confusion(n_classes, truth, pred))
}

/// [`macro_f1`] computed from an existing confusion matrix.
pub fn macro_f1_from_confusion(m: &[Vec<u64>]) -> f64 {
    let n = m.len();
    let mut sum = 0.0;
    let mut counted = 0usize;
    for c in 0..n {
        let tp = m[c][c];
        let support: u64 = m[c].iter().sum();
        let predicted: u64 = m.iter().map(|row| row[c]).sum();
        if support == 0 && predicted == 0 {
            continue;
        }
        let fn_ = support - tp;
        let fp = predicted - tp;
        sum += 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64;
        counted += 1;
    }
    if counted == 0 {
        0.0
    } else {
        sum / counted as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn confusion_counts_truth_by_prediction() {
        let truth = [0, 0, 1, 1, 2, 2, 2];
        let pred = [0, 1, 1, 1, 2, 0, 2];
        assert_eq!(
            confusion(3, &truth, &pred),
            vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 2]]
        );
    }

    #[test]
    fn accuracy_and_macro_f1_on_a_hand_computed_case() {
        let truth = [0, 0, 1, 1, 2, 2, 2];
        let pred = [0, 1, 1, 1, 2, 0, 2];
        assert!(close(accuracy(&truth, &pred), 5.0 / 7.0));
        // Class 0: TP 1, FP 1, FN 1 -> 2/4. Class 1: TP 2, FP 1, FN 0 -> 4/5.
        // Class 2: TP 2, FP 0, FN 1 -> 4/5. Mean = (0.5 + 0.8 + 0.8) / 3 = 0.7.
        assert!(close(macro_f1(3, &truth, &pred), 0.7));
    }

    #[test]
    fn classes_without_support_or_prediction_are_excluded() {
        // Class 2 never occurs and is never predicted: the mean is over classes 0 and 1.
        let truth = [0, 0, 1, 1];
        let pred = [0, 0, 1, 1];
        assert!(close(macro_f1(3, &truth, &pred), 1.0));
        // Class 2 is predicted but never true: it counts, with F1 0.
        // Class 0: TP 1, FN 1 -> 2/3. Class 1: 1. Class 2: 0. Mean = 5/9.
        let pred = [0, 2, 1, 1];
        assert!(close(macro_f1(3, &truth, &pred), 5.0 / 9.0));
    }

    #[test]
    fn perfect_and_empty_inputs() {
        let truth = [3, 1, 2, 0];
        assert!(close(accuracy(&truth, &truth), 1.0));
        assert!(close(macro_f1(4, &truth, &truth), 1.0));
        assert_eq!(accuracy(&[], &[]), 0.0);
        assert_eq!(macro_f1(2, &[], &[]), 0.0);
    }

    #[test]
    fn regression_metrics_on_a_hand_computed_case() {
        let truth = [1.0, 2.0, 3.0, 4.0];
        let pred = [1.5, 2.0, 2.0, 4.0];
        let m = regression(&truth, &pred).unwrap();
        // |errors| 0.5, 0, 1, 0; squares 0.25, 0, 1, 0; SST about 2.5 = 5.
        assert!(close(m.mae, 1.5 / 4.0));
        assert!(close(m.rmse, (1.25f64 / 4.0).sqrt()));
        assert!(close(m.r2, 1.0 - 1.25 / 5.0));
        // The mean itself scores R² = 0; worse than the mean is negative.
        assert!(close(regression(&truth, &[2.5; 4]).unwrap().r2, 0.0));
        assert!(regression(&truth, &[4.0, 3.0, 2.0, 1.0]).unwrap().r2 < 0.0);
    }

    #[test]
    fn regression_metrics_on_a_constant_target_and_no_rows() {
        let truth = [3.0; 3];
        assert!(close(regression(&truth, &truth).unwrap().r2, 1.0));
        assert!(close(regression(&truth, &[3.0, 3.0, 4.0]).unwrap().r2, 0.0));
        assert!(regression(&[], &[]).is_none());
    }

    #[test]
    #[should_panic(expected = "differ in length")]
    fn mismatched_lengths_are_a_bug() {
        confusion(2, &[0, 1], &[0]);
    }
}
