//! `[aggregation] max_weight_share`: no firm's FedAvg weight above a share of
//! the federation's, applied in the fold rather than only checked at release.
//!
//! The cap is one integer weight `c`: a site folds with `min(rows, c)`. It is
//! computed once per training from the rows every site declared in the
//! statistics phase (stored, so a restarted coordinator folds with the same
//! weights and the model stays bit-identical), as the largest `c` with
//! `min(max rows, c) ≤ share · Σ min(rows_j, c)`: the big firms are cut down
//! to the same weight, the small ones keep theirs, and the order of arrival
//! plays no part. A round that some sites miss can give the largest firm more
//! than `share` of that round's weight; the release rule `max_weight_share`
//! checks the weights actually folded.

/// The cap for sites declaring `rows`, or `None` when no site needs capping.
/// `share` is in (0, 1]; a share below 1/K (K sites) cannot be met by any
/// weights and gives every site the smallest one (equal weights).
pub fn weight_cap(rows: &[u64], share: f64) -> Option<u64> {
    let largest = *rows.iter().max()?;
    let fits = |c: u64| {
        let total: u128 = rows.iter().map(|&n| u128::from(n.min(c))).sum();
        (largest.min(c) as f64) <= share * total as f64
    };
    if fits(largest) {
        return None;
    }
    // `fits` holds at the smallest declared rows whenever share ≥ 1/K (all
    // weights equal) and turns false as c grows: bisect for the last c it holds.
    let (mut lo, mut hi) = (1u64, largest);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) { lo = mid } else { hi = mid }
    }
    Some(lo.max(*rows.iter().min().expect("not empty")))
}

/// The weight an update of `n` examples folds with under `cap`.
pub fn capped(n: u64, cap: Option<u64>) -> u64 {
    cap.map_or(n, |c| n.min(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(rows: &[u64], cap: Option<u64>) -> Vec<f64> {
        let w: Vec<u64> = rows.iter().map(|&n| capped(n, cap)).collect();
        let total: u64 = w.iter().sum();
        w.iter().map(|&x| x as f64 / total as f64).collect()
    }

    #[test]
    fn a_dominant_firm_is_cut_to_the_share_and_small_ones_keep_their_weight() {
        let rows = [9_000, 500, 300, 200];
        let cap = weight_cap(&rows, 0.4).expect("9,000 of 10,000 needs capping");
        let s = shares(&rows, cap.into());
        assert!(s[0] <= 0.4 && s[0] > 0.39, "{s:?} (cap {cap})");
        assert_eq!(capped(300, Some(cap)), 300);
        // One more unit of weight would pass the share: the cap is the largest.
        let over = shares(&rows, Some(cap + 1));
        assert!(over[0] > 0.4, "{over:?}");
    }

    #[test]
    fn no_cap_when_every_firm_is_within_the_share() {
        assert_eq!(weight_cap(&[300, 500, 400], 0.5), None);
        assert_eq!(weight_cap(&[], 0.5), None);
        assert_eq!(capped(7, None), 7);
    }

    #[test]
    fn two_big_firms_are_capped_together() {
        let rows = [5_000, 4_000, 100, 100, 100];
        let cap = weight_cap(&rows, 0.3).unwrap();
        let s = shares(&rows, Some(cap));
        assert!(s[0] <= 0.3 && s[1] <= 0.3, "{s:?}");
        assert_eq!(s[0], s[1], "both at the cap");
    }

    #[test]
    fn a_share_below_one_over_k_gives_equal_weights() {
        let rows = [900, 50, 30];
        let cap = weight_cap(&rows, 0.2).unwrap();
        assert_eq!(cap, 30);
        assert_eq!(shares(&rows, Some(cap)), vec![1.0 / 3.0; 3]);
    }
}
