//! FedAvg: the example-weighted mean of participants' weight deltas, computed
//! exactly so the result does not depend on the order updates arrive in.
//!
//! Floating-point addition is not associative: summing the same deltas in a
//! different order changes low bits, so two runs of the same training could
//! publish different models. Instead each delta value is quantised once to a
//! fixed-point integer `q = round(v * 2^FRACTION_BITS)` and the weighted sum
//! `Σ w_i q_i` is accumulated in `i64`, which is exact and associative. The
//! division happens once, at the end.
//!
//! Error bound: quantisation moves each value by at most `2^-(FRACTION_BITS+1)`
//! (≈ 3.0e-8), and a weighted mean of values each off by at most ε is off by at
//! most ε, so the aggregated delta is within 3.0e-8 of the exact real-number
//! FedAvg, before the final rounding to f32.
//!
//! Overflow is impossible by construction: |v| ≤ 2^10 ([`MAX_ABS_DELTA`]) and the
//! total weight of a round is capped at 2^28 ([`MAX_TOTAL_WEIGHT`]), so
//! |Σ w_i q_i| ≤ 2^10 · 2^24 · 2^28 = 2^62 < 2^63. A delta above the cap is not
//! a plausible local training step; it is refused as an absurd update.
//!
//! The accumulator costs 8 bytes per parameter whatever the number of
//! participants: the coordinator's memory depends on the model, not the roster.

use crate::{Error, Result};

/// Fixed-point fraction bits of the accumulator.
pub const FRACTION_BITS: u32 = 24;
/// Largest accepted absolute value of one delta element.
pub const MAX_ABS_DELTA: f32 = 1024.0;
/// Largest total example weight of one round (268 million examples).
pub const MAX_TOTAL_WEIGHT: u64 = 1 << 28;

const SCALE: f64 = (1u64 << FRACTION_BITS) as f64;

/// Running, order-independent FedAvg accumulator for one round.
#[derive(Debug, Clone)]
pub struct Accumulator {
    sums: Vec<i64>,
    total_weight: u64,
    contributions: u32,
}

impl Accumulator {
    pub fn new(num_params: usize) -> Self {
        Accumulator {
            sums: vec![0; num_params],
            total_weight: 0,
            contributions: 0,
        }
    }

    pub fn num_params(&self) -> usize {
        self.sums.len()
    }

    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }

    pub fn contributions(&self) -> u32 {
        self.contributions
    }

    /// Checks an update without touching the accumulator: right length, weight in
    /// range, every value finite and within [`MAX_ABS_DELTA`]. The message names
    /// the first offending element.
    pub fn check(&self, delta: &[f32], weight: u64) -> Result<()> {
        if delta.len() != self.sums.len() {
            return Err(Error::Aggregation(format!(
                "delta has {} values, the model has {}",
                delta.len(),
                self.sums.len()
            )));
        }
        if weight == 0 {
            return Err(Error::Aggregation(
                "an update must cover at least one example".into(),
            ));
        }
        if self.total_weight + weight > MAX_TOTAL_WEIGHT {
            return Err(Error::Aggregation(format!(
                "example count {weight} would take the round's total above {MAX_TOTAL_WEIGHT}"
            )));
        }
        if let Some((i, v)) = delta
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite() || v.abs() > MAX_ABS_DELTA)
        {
            let what = if v.is_nan() {
                "NaN".to_string()
            } else if v.is_infinite() {
                "infinite".to_string()
            } else {
                format!("{v}, beyond the ±{MAX_ABS_DELTA} plausibility bound")
            };
            return Err(Error::Aggregation(format!("delta value #{i} is {what}")));
        }
        Ok(())
    }

    /// Folds one update in, all or nothing: on error the accumulator is unchanged.
    pub fn add(&mut self, delta: &[f32], weight: u64) -> Result<()> {
        self.check(delta, weight)?;
        let w = weight as i64;
        for (s, &v) in self.sums.iter_mut().zip(delta) {
            *s += quantise(v) * w;
        }
        self.total_weight += weight;
        self.contributions += 1;
        Ok(())
    }

    /// The weighted mean delta, as f64.
    pub fn mean_delta(&self) -> Result<Vec<f64>> {
        if self.total_weight == 0 {
            return Err(Error::Aggregation("no update was accepted".into()));
        }
        let denom = self.total_weight as f64 * SCALE;
        Ok(self.sums.iter().map(|&s| s as f64 / denom).collect())
    }

    /// The new global model: `global + mean delta`, rounded once to f32.
    pub fn apply_to(&self, global: &[f32]) -> Result<Vec<f32>> {
        if global.len() != self.sums.len() {
            return Err(Error::Aggregation(format!(
                "global model has {} values, the accumulator {}",
                global.len(),
                self.sums.len()
            )));
        }
        let mean = self.mean_delta()?;
        Ok(global
            .iter()
            .zip(mean)
            .map(|(&g, d)| (g as f64 + d) as f32)
            .collect())
    }
}

fn quantise(v: f32) -> i64 {
    (v as f64 * SCALE).round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn updates(k: usize, p: usize, seed: u64) -> Vec<(Vec<f32>, u64)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..k)
            .map(|i| {
                let d = (0..p).map(|_| rng.random_range(-0.5f32..0.5)).collect();
                (d, 100 + 7 * i as u64)
            })
            .collect()
    }

    #[test]
    fn weighted_mean_matches_f64_reference_within_bound() {
        let ups = updates(5, 1000, 1);
        let global: Vec<f32> = (0..1000).map(|i| (i as f32) * 1e-3).collect();
        let mut acc = Accumulator::new(1000);
        for (d, w) in &ups {
            acc.add(d, *w).unwrap();
        }
        let out = acc.apply_to(&global).unwrap();
        let total: u64 = ups.iter().map(|u| u.1).sum();
        for j in 0..1000 {
            let mean: f64 = ups
                .iter()
                .map(|(d, w)| d[j] as f64 * *w as f64)
                .sum::<f64>()
                / total as f64;
            let want = global[j] as f64 + mean;
            // quantisation bound plus one f32 rounding of a value below 2.
            assert!((out[j] as f64 - want).abs() <= 3.0e-8 + 2.4e-7, "{j}");
        }
        assert_eq!(acc.contributions(), 5);
        assert_eq!(acc.total_weight(), total);
    }

    #[test]
    fn hand_computed_example() {
        let mut acc = Accumulator::new(2);
        acc.add(&[1.0, -2.0], 1).unwrap();
        acc.add(&[4.0, 2.0], 3).unwrap();
        // (1*1 + 4*3)/4 = 3.25 ; (-2*1 + 2*3)/4 = 1.0
        assert_eq!(acc.apply_to(&[0.5, 0.0]).unwrap(), vec![3.75, 1.0]);
    }

    #[test]
    fn order_does_not_change_a_single_bit() {
        let ups = updates(16, 4096, 7);
        let global = vec![0.25f32; 4096];
        let reference = {
            let mut acc = Accumulator::new(4096);
            ups.iter().for_each(|(d, w)| acc.add(d, *w).unwrap());
            acc.apply_to(&global).unwrap()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        for _ in 0..5 {
            let mut order: Vec<usize> = (0..ups.len()).collect();
            order.shuffle(&mut rng);
            let mut acc = Accumulator::new(4096);
            for &i in &order {
                acc.add(&ups[i].0, ups[i].1).unwrap();
            }
            let out = acc.apply_to(&global).unwrap();
            let a: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
            let b: Vec<u32> = reference.iter().map(|v| v.to_bits()).collect();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn bad_updates_are_refused_and_leave_the_accumulator_untouched() {
        let mut acc = Accumulator::new(3);
        acc.add(&[0.1, 0.2, 0.3], 10).unwrap();
        let before = acc.clone();
        let cases: [(&[f32], u64, &str); 6] = [
            (&[0.1, 0.2], 1, "has 2 values"),
            (&[0.1, f32::NAN, 0.3], 1, "#1 is NaN"),
            (&[f32::INFINITY, 0.2, 0.3], 1, "#0 is infinite"),
            (&[0.1, 0.2, 5000.0], 1, "plausibility"),
            (&[0.1, 0.2, 0.3], 0, "at least one example"),
            (&[0.1, 0.2, 0.3], MAX_TOTAL_WEIGHT, "above"),
        ];
        for (d, w, needle) in cases {
            let e = acc.add(d, w).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
            assert_eq!(acc.sums, before.sums);
            assert_eq!(acc.total_weight, before.total_weight);
            assert_eq!(acc.contributions, before.contributions);
        }
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let mut acc = Accumulator::new(1);
        acc.add(&[MAX_ABS_DELTA], MAX_TOTAL_WEIGHT / 2).unwrap();
        acc.add(&[MAX_ABS_DELTA], MAX_TOTAL_WEIGHT / 2).unwrap();
        assert_eq!(acc.apply_to(&[0.0]).unwrap(), vec![MAX_ABS_DELTA]);
    }

    #[test]
    fn empty_round_is_an_error() {
        assert!(Accumulator::new(2).apply_to(&[0.0, 0.0]).is_err());
    }
}
