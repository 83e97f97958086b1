//! Classification metrics reported for every round: accuracy and macro-F1 from a
//! confusion matrix, plus the [`Evaluation`] record that carries them.
//!
//! Line data is usually dominated by the "ok" class, so accuracy alone hides a
//! model that never flags a defect; macro-F1 weighs every defect class equally.

/// The outcome of evaluating a model on a set of rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Number of rows evaluated.
    pub n: usize,
    /// Mean cross-entropy.
    pub loss: f64,
    pub accuracy: f64,
    /// See [`macro_f1`] for which classes are averaged.
    pub macro_f1: f64,
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
    #[should_panic(expected = "differ in length")]
    fn mismatched_lengths_are_a_bug() {
        confusion(2, &[0, 1], &[0]);
    }
}
