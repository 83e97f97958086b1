//! FedAvg: the example-weighted mean of participants' weight deltas, computed
//! exactly so the result does not depend on the order updates arrive in.
//!
//! Floating-point addition is not associative: summing the same deltas in a
//! different order changes low bits, so two runs of the same training could
//! publish different models. Instead each delta value is quantised once to a
//! fixed-point integer `q = round(v * 2^FRACTION_BITS)` (to nearest, ties to
//! even) and the weighted sum
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

    /// Empties the accumulator for another round of the same model, keeping its
    /// memory. A fresh allocation is mapped lazily, so the first fold into each
    /// 4 KiB page takes a page fault; at 1e8 parameters those faults were a third
    /// of the fold's time in the aggregation bench. Zeroing mapped pages is one
    /// memset instead.
    pub fn reset(&mut self) {
        self.sums.fill(0);
        self.total_weight = 0;
        self.contributions = 0;
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

    /// Starts folding one update of `weight` examples chunk by chunk: reserves its
    /// weight (so the total-weight cap is checked before any value is folded).
    /// Follow with [`Accumulator::fold`] per chunk and [`Accumulator::commit`], or
    /// undo with [`Accumulator::unfold`] per folded chunk and [`Accumulator::release`].
    pub fn reserve(&mut self, weight: u64) -> Result<()> {
        self.check_weight(weight)?;
        self.total_weight += weight;
        Ok(())
    }

    /// A weight of at least one example that keeps the round within [`MAX_TOTAL_WEIGHT`].
    fn check_weight(&self, weight: u64) -> Result<()> {
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
        Ok(())
    }

    /// Gives back the weight of an update that was abandoned (after unfolding its chunks).
    pub fn release(&mut self, weight: u64) {
        self.total_weight -= weight.min(self.total_weight);
    }

    /// Counts a fully folded update.
    pub fn commit(&mut self) {
        self.contributions += 1;
    }

    /// Folds the values of one chunk, starting at parameter `offset`, all or nothing:
    /// a value that is not finite or beyond [`MAX_ABS_DELTA`] refuses the chunk and
    /// leaves the accumulator unchanged. Error messages name the parameter index.
    pub fn fold(&mut self, offset: usize, values: &[f32], weight: u64) -> Result<()> {
        let end = offset
            .checked_add(values.len())
            .filter(|&e| e <= self.sums.len())
            .ok_or_else(|| {
                Error::Aggregation(format!(
                    "values {offset}..{} lie beyond the model's {} parameters",
                    offset.saturating_add(values.len()),
                    self.sums.len()
                ))
            })?;
        let sums = &mut self.sums[offset..end];
        // The plausibility scan runs block by block inside the fold (one pass over
        // the chunk instead of two); a bad value is rare, so the blocks folded
        // before it are subtracted again rather than every chunk scanned first.
        let folded = add_quantised(sums, values, weight as i64);
        if folded < values.len() {
            add_quantised(&mut sums[..folded], &values[..folded], -(weight as i64));
            return Err(check_values(&values[folded..], offset + folded)
                .expect_err("the fold stops only at an implausible value"));
        }
        Ok(())
    }

    /// Folds one chunk of a masked update (secure aggregation): words in
    /// Z_2^64, added with wrapping. A single masked word says nothing about the
    /// value under it, so there is nothing to check here; the plausibility of
    /// the round is checked on the unmasked sum ([`Accumulator::check_sum`]).
    pub fn fold_masked(&mut self, offset: usize, words: &[i64]) -> Result<()> {
        let sums = self.range_mut(offset, words.len())?;
        for (s, w) in sums.iter_mut().zip(words) {
            *s = s.wrapping_add(*w);
        }
        Ok(())
    }

    /// Exactly reverses a [`Accumulator::fold_masked`] of the same words.
    pub fn unfold_masked(&mut self, offset: usize, words: &[i64]) {
        if let Ok(sums) = self.range_mut(offset, words.len()) {
            for (s, w) in sums.iter_mut().zip(words) {
                *s = s.wrapping_sub(*w);
            }
        }
    }

    /// Hands the sums to `correct` block by block (offset, sums) to remove the
    /// masks of a secure round; `correct` must add in Z_2^64 (wrapping). The
    /// blocks are spread over the machine's cores: the correction is one
    /// keystream per survivor and per dropped neighbour, and every keystream
    /// is seekable, so the blocks are independent.
    pub fn correct_masked(
        &mut self,
        block: usize,
        correct: impl Fn(u64, &mut [i64]) -> Result<()> + Sync,
    ) -> Result<()> {
        let block = block.max(1);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let blocks = self.sums.len().div_ceil(block);
        let per_thread = blocks.div_ceil(threads).max(1) * block;
        let correct = &correct;
        std::thread::scope(|scope| {
            let parts: Vec<_> = self
                .sums
                .chunks_mut(per_thread)
                .enumerate()
                .map(|(p, part)| {
                    scope.spawn(move || {
                        for (b, sums) in part.chunks_mut(block).enumerate() {
                            correct((p * per_thread + b * block) as u64, sums)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            parts
                .into_iter()
                .try_for_each(|h| h.join().expect("an unmasking thread panicked"))
        })
    }

    /// After unmasking: every sum must be one a plausible round gives, the
    /// total weight times a mean within ±[`MAX_ABS_DELTA`]. Anything else means
    /// a mask was not removed (a wrong share, a participant that masked with
    /// keys it did not advertise) and the sum is noise; it must not be applied.
    pub fn check_sum(&self) -> Result<()> {
        let bound = (MAX_ABS_DELTA as f64 * SCALE * self.total_weight as f64) as i64;
        match self
            .sums
            .iter()
            .position(|s| s.unsigned_abs() > bound as u64)
        {
            None => Ok(()),
            Some(i) => Err(Error::Aggregation(format!(
                "the unmasked sum at parameter {i} is beyond what {} examples of plausible deltas can give: the masks did not cancel",
                self.total_weight
            ))),
        }
    }

    fn range_mut(&mut self, offset: usize, len: usize) -> Result<&mut [i64]> {
        let n = self.sums.len();
        let end = offset.checked_add(len).filter(|&e| e <= n).ok_or_else(|| {
            Error::Aggregation(format!(
                "values {offset}..{} lie beyond the model's {n} parameters",
                offset.saturating_add(len)
            ))
        })?;
        Ok(&mut self.sums[offset..end])
    }

    /// Exactly reverses a [`Accumulator::fold`] of the same values: integer
    /// addition is invertible, so an update refused halfway leaves no trace.
    pub fn unfold(&mut self, offset: usize, values: &[f32], weight: u64) {
        let end = (offset + values.len()).min(self.sums.len());
        let folded = add_quantised(&mut self.sums[offset..end], values, -(weight as i64));
        debug_assert_eq!(
            folded,
            values.len(),
            "unfolded values that were never folded"
        );
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
        self.check_weight(weight)?;
        check_values(delta, 0)
    }

    /// Folds one update in, all or nothing: on error the accumulator is unchanged.
    pub fn add(&mut self, delta: &[f32], weight: u64) -> Result<()> {
        self.check(delta, weight)?;
        self.reserve(weight)?;
        self.fold(0, delta, weight)?;
        self.commit();
        Ok(())
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
        let mut out = global.to_vec();
        self.apply_in_place(&mut out)?;
        Ok(out)
    }

    /// `global += mean delta`, in place and in one pass (no temporary of the
    /// model's size: at 1e9 parameters a second copy is 4 GB).
    /// Adds integer noise in the accumulator's own fixed-point units (one unit
    /// is 2^-[`FRACTION_BITS`] of a weighted delta value) to every sum: the noise
    /// of client-level differential privacy, added once to the round's total.
    /// Integer addition keeps every bit of it (no rounding can swallow the
    /// noise's low bits) and commutes with the folds, so it does not matter
    /// when in the round it is added. `fill` writes the next block of samples.
    pub fn add_noise(&mut self, mut fill: impl FnMut(&mut [i64])) -> Result<()> {
        const BLOCK: usize = 1 << 14;
        let mut noise = vec![0i64; BLOCK.min(self.sums.len())];
        for (b, sums) in self.sums.chunks_mut(BLOCK).enumerate() {
            let noise = &mut noise[..sums.len()];
            fill(noise);
            for (i, (s, n)) in sums.iter_mut().zip(noise.iter()).enumerate() {
                *s = s.checked_add(*n).ok_or_else(|| {
                    Error::Aggregation(format!(
                        "noise at parameter {} overflows the accumulator",
                        b * BLOCK + i
                    ))
                })?;
            }
        }
        Ok(())
    }

    pub fn apply_in_place(&self, global: &mut [f32]) -> Result<()> {
        if global.len() != self.sums.len() {
            return Err(Error::Aggregation(format!(
                "global model has {} values, the accumulator {}",
                global.len(),
                self.sums.len()
            )));
        }
        if self.total_weight == 0 {
            return Err(Error::Aggregation("no update was accepted".into()));
        }
        let denom = self.total_weight as f64 * SCALE;
        for (g, &s) in global.iter_mut().zip(&self.sums) {
            *g = (*g as f64 + s as f64 / denom) as f32;
        }
        Ok(())
    }

    /// The exact mean delta of values `offset..offset + out.len()`, in f64 (a
    /// server optimiser's pseudo-gradient): the same quotient
    /// [`Accumulator::apply_in_place`] adds, so a step of `x += 1.0 · mean`
    /// gives the plain FedAvg model bit for bit.
    pub fn mean_window(&self, offset: usize, out: &mut [f64]) -> Result<()> {
        let sums = offset
            .checked_add(out.len())
            .and_then(|end| self.sums.get(offset..end))
            .ok_or_else(|| {
                Error::Aggregation(format!(
                    "a mean over values {offset}..{} lies beyond the model's {}",
                    offset.saturating_add(out.len()),
                    self.sums.len()
                ))
            })?;
        if self.total_weight == 0 {
            return Err(Error::Aggregation("no update was accepted".into()));
        }
        let denom = self.total_weight as f64 * SCALE;
        for (o, &s) in out.iter_mut().zip(sums) {
            *o = s as f64 / denom;
        }
        Ok(())
    }

    /// Takes a whole accepted update out again (a robust rule excluded it):
    /// follow [`Accumulator::unfold`] of each of its chunks with this.
    pub fn withdraw(&mut self, weight: u64) {
        self.release(weight);
        self.contributions = self.contributions.saturating_sub(1);
    }
}

/// The integers a fold of `values` at `weight` adds to the accumulator,
/// `weight · round(v · 2^FRACTION_BITS)` per value, into `out` (same length):
/// what a participant masks in a secure round, so that the unmasked sum is the
/// plain round's accumulator bit for bit. Refuses values a fold would refuse.
pub fn weighted_fixed_point(values: &[f32], weight: u64, out: &mut [i64]) -> Result<()> {
    if values.len() != out.len() {
        return Err(Error::Aggregation(format!(
            "{} values for {} fixed-point words",
            values.len(),
            out.len()
        )));
    }
    if weight == 0 || weight > MAX_TOTAL_WEIGHT {
        return Err(Error::Aggregation(format!(
            "example count {weight} is outside 1..={MAX_TOTAL_WEIGHT}"
        )));
    }
    check_values(values, 0)?;
    out.fill(0);
    add_quantised(out, values, weight as i64);
    Ok(())
}

/// Refuses a value that is not finite or beyond the plausibility bound; `offset`
/// is the index of `values[0]` in the whole delta, so the message names the parameter.
fn check_values(values: &[f32], offset: usize) -> Result<()> {
    // A branch-free scan first (vectorises), the slow search only on failure.
    if all_plausible(values) {
        return Ok(());
    }
    let (i, v) = values
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite() || v.abs() > MAX_ABS_DELTA)
        .expect("the scan found a bad value");
    let what = if v.is_nan() {
        "NaN".to_string()
    } else if v.is_infinite() {
        "infinite".to_string()
    } else {
        format!("{v}, beyond the ±{MAX_ABS_DELTA} plausibility bound")
    };
    Err(Error::Aggregation(format!(
        "delta value #{} is {what}",
        offset + i
    )))
}

/// Whether every value is finite and within [`MAX_ABS_DELTA`] (NaN fails the
/// comparison), for [`Accumulator::check`]'s whole delta (the fold scans its
/// blocks itself). Dispatched like [`add_quantised`]: compiled for baseline
/// x86-64, the scan took a quarter of the fold's time in the aggregation bench.
fn all_plausible(values: &[f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, checked just above.
        return unsafe { all_plausible_avx512(values) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { all_plausible_avx2(values) };
    }
    all_plausible_scan(values)
}

#[inline(always)]
fn all_plausible_scan(values: &[f32]) -> bool {
    values
        .iter()
        .fold(true, |ok, v| ok & (v.abs() <= MAX_ABS_DELTA))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn all_plausible_avx2(values: &[f32]) -> bool {
    all_plausible_scan(values)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn all_plausible_avx512(values: &[f32]) -> bool {
    all_plausible_scan(values)
}

/// `sums[i] += quantise(values[i]) · w`: the fold's inner loop, which also
/// checks plausibility block by block. It stops before the first block holding a
/// value that is not finite or beyond [`MAX_ABS_DELTA`] and returns how many
/// values it folded (all of them when every value is plausible). On x86-64 the
/// same loop is also compiled for AVX2 and for AVX-512 and chosen at run time: a
/// build for baseline x86-64 has SSE2 only, whose two 64-bit lanes make the
/// conversions and the 64-bit products mostly scalar, and the loop then runs at
/// half the speed or less; AVX-512 doubles the lanes again over AVX2. Integer
/// results are the same whichever version runs.
fn add_quantised(sums: &mut [i64], values: &[f32], w: i64) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, checked just above (it implies AVX2).
        return unsafe { add_quantised_avx512(sums, values, w) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { add_quantised_avx2(sums, values, w) };
    }
    // Baseline x86-64 (SSE2) has no instruction for the narrow path's rounding
    // (`roundps` is SSE4.1) and would call libm per value: wide path only.
    #[cfg(target_arch = "x86_64")]
    return add_quantised_blocks::<false>(sums, values, w);
    #[cfg(not(target_arch = "x86_64"))]
    add_quantised_blocks::<true>(sums, values, w)
}

/// Values per block of the fold: 16 KiB of f32, so the narrow-range scan and the
/// fold that follows it read the block from L1.
const FOLD_BLOCK: usize = 4096;

/// Below this magnitude `v · 2^FRACTION_BITS` rounds to an integer that fits an
/// `i32` (|v · 2^24| < 2^31), and the fold can take its narrow path.
const NARROW_LIMIT: f32 = (1u32 << (31 - FRACTION_BITS)) as f32;

/// The fold, block by block: a block whose values all lie below [`NARROW_LIMIT`]
/// (every plausible training delta does, and such a block is plausible) takes
/// the narrow path when `NARROW`, a plausible block the wide one; both give the
/// same integers ([`quantise`]'s definition). Stops before an implausible block
/// and returns the values folded.
#[inline(always)]
fn add_quantised_blocks<const NARROW: bool>(sums: &mut [i64], values: &[f32], w: i64) -> usize {
    // |w| ≤ MAX_TOTAL_WEIGHT = 2^28, so it fits an i32 and the narrow path's
    // 32 x 32 → 64-bit products are exact.
    let narrow_w = i32::try_from(w).ok().filter(|_| NARROW);
    for (b, (s, v)) in sums
        .chunks_mut(FOLD_BLOCK)
        .zip(values.chunks(FOLD_BLOCK))
        .enumerate()
    {
        match narrow_w {
            Some(w) if v.iter().fold(true, |ok, x| ok & (x.abs() < NARROW_LIMIT)) => {
                add_quantised_narrow(s, v, w)
            }
            _ if all_plausible_scan(v) => add_quantised_wide(s, v, w),
            _ => return b * FOLD_BLOCK,
        }
    }
    values.len()
}

/// The narrow path: `v · 2^24` is exact in f32 (a power-of-two scaling), so
/// rounding it in f32 gives the same integer as [`quantise`]'s f64 route, and
/// for |v| below [`NARROW_LIMIT`] that integer fits an `i32`. Eight values per
/// AVX2 instruction instead of four, and the product is one signed 32 x 32 →
/// 64-bit multiply (x86 has no packed 64 x 64-bit multiply before AVX-512).
#[inline(always)]
fn add_quantised_narrow(sums: &mut [i64], values: &[f32], w: i32) {
    for (s, &v) in sums.iter_mut().zip(values) {
        let q = (v * SCALE_F32).round_ties_even();
        // SAFETY: the caller's scan put |v| below NARROW_LIMIT (NaN fails that
        // test), so `q` is finite and |q| < 2^31. Not `as i32`: its saturation
        // and NaN handling stop the loop from vectorising (measured 1.5x slower
        // than the wide path); unchecked, it compiles to one `cvtps2dq`.
        let q: i32 = unsafe { q.to_int_unchecked() };
        *s += q as i64 * w as i64;
    }
}

#[inline(always)]
fn add_quantised_wide(sums: &mut [i64], values: &[f32], w: i64) {
    for (s, &v) in sums.iter_mut().zip(values) {
        *s += quantise(v) * w;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn add_quantised_avx2(sums: &mut [i64], values: &[f32], w: i64) -> usize {
    add_quantised_blocks::<true>(sums, values, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn add_quantised_avx512(sums: &mut [i64], values: &[f32], w: i64) -> usize {
    add_quantised_blocks::<true>(sums, values, w)
}

const SCALE_F32: f32 = (1u32 << FRACTION_BITS) as f32;

/// 1.5 · 2^52: adding it to an `f64` of magnitude below 2^51 leaves exactly the
/// value rounded to the nearest integer (ties to even) in the low mantissa bits.
const ROUND_MAGIC: f64 = 6_755_399_441_055_744.0;

/// `round(v · 2^FRACTION_BITS)` to the nearest integer, ties to even, computed
/// with the magic-number trick instead of `f64::round` (a libm call that made
/// folding three times slower): the sum lands in the binade [2^52, 2^53) where
/// one unit in the last place is 1, so the difference of the bit patterns is the
/// rounded integer. Exact for the accepted range (|v · 2^24| ≤ 2^34 < 2^51).
#[inline(always)]
fn quantise(v: f32) -> i64 {
    let y = v as f64 * SCALE + ROUND_MAGIC;
    y.to_bits() as i64 - ROUND_MAGIC.to_bits() as i64
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

    /// The reference: every update folded whole, in the given order, then applied.
    fn aggregate(ups: &[(Vec<f32>, u64)], global: &[f32]) -> Vec<f32> {
        let mut acc = Accumulator::new(global.len());
        ups.iter().for_each(|(d, w)| acc.add(d, *w).unwrap());
        acc.apply_to(global).unwrap()
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

    /// Compared as bit patterns, so "equal" means identical to the last bit.
    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
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
        let reference = aggregate(&ups, &global);
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        for _ in 0..5 {
            let mut order: Vec<usize> = (0..ups.len()).collect();
            order.shuffle(&mut rng);
            let mut acc = Accumulator::new(4096);
            for &i in &order {
                acc.add(&ups[i].0, ups[i].1).unwrap();
            }
            let out = acc.apply_to(&global).unwrap();
            assert_eq!(bits(&out), bits(&reference));
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
    fn chunks_of_interleaved_uploads_fold_to_the_same_bits_and_undo_exactly() {
        let ups = updates(6, 1000, 3);
        let global = vec![0.5f32; 1000];
        let whole = aggregate(&ups, &global);
        // Every update in chunks of 128 values, the chunks of all updates interleaved
        // in a shuffled order (as concurrent streams arrive), plus one upload that is
        // folded halfway and then undone.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut steps: Vec<(usize, usize)> = (0..ups.len())
            .flat_map(|u| (0..1000).step_by(128).map(move |o| (u, o)))
            .collect();
        steps.shuffle(&mut rng);
        let mut acc = Accumulator::new(1000);
        for (_, w) in &ups {
            acc.reserve(*w).unwrap();
        }
        let bad: Vec<f32> = (0..1000).map(|i| i as f32 * 1e-3).collect();
        acc.reserve(77).unwrap();
        for (k, &(u, o)) in steps.iter().enumerate() {
            let end = (o + 128).min(1000);
            acc.fold(o, &ups[u].0[o..end], ups[u].1).unwrap();
            if k < 4 {
                acc.fold(k * 128, &bad[k * 128..(k + 1) * 128], 77).unwrap();
            }
        }
        for k in 0..4 {
            acc.unfold(k * 128, &bad[k * 128..(k + 1) * 128], 77);
        }
        acc.release(77);
        ups.iter().for_each(|_| acc.commit());
        let out = acc.apply_to(&global).unwrap();
        assert_eq!(bits(&out), bits(&whole));
    }

    #[test]
    fn a_chunk_with_a_bad_value_is_refused_whole_and_named_by_its_parameter() {
        let mut acc = Accumulator::new(8);
        acc.reserve(2).unwrap();
        acc.fold(0, &[0.5; 4], 2).unwrap();
        let before = acc.clone();
        let e = acc
            .fold(4, &[0.1, 0.2, f32::NAN, 0.3], 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("#6 is NaN"), "{e}");
        assert_eq!(acc, before);
        let e = acc.fold(6, &[0.1, 0.2, 0.3], 2).unwrap_err().to_string();
        assert!(e.contains("beyond the model's 8"), "{e}");
        assert_eq!(acc, before);
    }

    #[test]
    fn quantisation_rounds_to_nearest_ties_to_even() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut cases: Vec<f32> = (0..100_000)
            .map(|_| rng.random_range(-MAX_ABS_DELTA..MAX_ABS_DELTA))
            .collect();
        let half = 0.5 / SCALE as f32;
        cases.extend([
            0.0,
            -0.0,
            half,
            -half,
            3.0 * half,
            -3.0 * half,
            MAX_ABS_DELTA,
            -MAX_ABS_DELTA,
        ]);
        cases.extend((0..200).map(|_| rng.random_range(-1e-6f32..1e-6)));
        for v in cases {
            assert_eq!(
                quantise(v),
                (v as f64 * SCALE).round_ties_even() as i64,
                "{v:e}"
            );
        }
    }

    /// Values that exercise both fold paths: whole blocks of plausible deltas
    /// (narrow path), a block spoilt by one large value (wide path), and the edges
    /// of the narrow range, rounding ties and subnormals.
    fn fold_cases() -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let half = 0.5 / SCALE as f32;
        let below_limit = f32::from_bits(NARROW_LIMIT.to_bits() - 1);
        let mut values: Vec<f32> = (0..3 * FOLD_BLOCK)
            .map(|_| rng.random_range(-0.05f32..0.05))
            .collect();
        values[FOLD_BLOCK + 17] = 900.0;
        values.extend((0..FOLD_BLOCK).map(|_| rng.random_range(-NARROW_LIMIT..NARROW_LIMIT)));
        // A narrow block of edge cases: rounding ties (x.5 after scaling), the
        // largest values below the limit, subnormals, signed zeros.
        let edges = [
            half,
            -half,
            3.0 * half,
            -3.0 * half,
            below_limit,
            -below_limit,
            f32::from_bits(1),
            -f32::MIN_POSITIVE,
            0.0,
            -0.0,
        ];
        values.extend(edges);
        values.extend((0..FOLD_BLOCK - edges.len()).map(|i| (i as f32 + 0.5) * half * 2.0));
        // A wide block: the limit itself and values up to the plausibility bound.
        values.extend([NARROW_LIMIT, -NARROW_LIMIT]);
        values.extend((0..FOLD_BLOCK).map(|_| rng.random_range(-MAX_ABS_DELTA..=MAX_ABS_DELTA)));
        values
    }

    #[test]
    fn every_fold_path_gives_the_reference_integers() {
        // On x86-64 `add_quantised` runs the block fold compiled for AVX-512 or
        // AVX2 where the CPU has them; the block fold is also run as compiled for
        // the baseline target, and each vector version the CPU supports is run
        // directly. All must equal `quantise` value by value, and undo exactly.
        let values = fold_cases();
        let mut expected = vec![3i64; values.len()];
        for (s, &v) in expected.iter_mut().zip(&values) {
            *s += (v as f64 * SCALE).round_ties_even() as i64 * (MAX_TOTAL_WEIGHT as i64 - 1);
        }
        for w in [MAX_TOTAL_WEIGHT as i64 - 1, -(MAX_TOTAL_WEIGHT as i64 - 1)] {
            let sign = w.signum();
            let want: Vec<i64> = expected.iter().map(|&e| (e - 3) * sign + 3).collect();
            let n = values.len();
            let mut got = vec![3i64; n];
            assert_eq!(add_quantised(&mut got, &values, w), n);
            assert_eq!(got, want, "dispatched fold, w = {w}");
            let mut got = vec![3i64; n];
            assert_eq!(add_quantised_blocks::<false>(&mut got, &values, w), n);
            assert_eq!(got, want, "wide block fold, w = {w}");
            let mut got = vec![3i64; n];
            assert_eq!(add_quantised_blocks::<true>(&mut got, &values, w), n);
            assert_eq!(got, want, "block fold, w = {w}");
            // Each x86-64 version this CPU can run, whichever the dispatch picks.
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    let mut got = vec![3i64; values.len()];
                    // SAFETY: AVX2 checked just above.
                    assert_eq!(unsafe { add_quantised_avx2(&mut got, &values, w) }, n);
                    assert_eq!(got, want, "AVX2 fold, w = {w}");
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    let mut got = vec![3i64; values.len()];
                    // SAFETY: AVX-512F checked just above.
                    assert_eq!(unsafe { add_quantised_avx512(&mut got, &values, w) }, n);
                    assert_eq!(got, want, "AVX-512 fold, w = {w}");
                }
            }
            add_quantised_blocks::<true>(&mut got, &values, -w);
            assert!(got.iter().all(|&s| s == 3));
        }
    }

    #[test]
    fn every_fold_path_stops_before_the_block_of_a_bad_value_and_fold_undoes_the_rest() {
        type Fold = fn(&mut [i64], &[f32], i64) -> usize;
        let mut folds: Vec<(&str, Fold)> = vec![
            ("dispatched", add_quantised),
            ("wide", add_quantised_blocks::<false>),
            ("narrow", add_quantised_blocks::<true>),
        ];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 checked just above.
                folds.push(("AVX2", |s, v, w| unsafe { add_quantised_avx2(s, v, w) }));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F checked just above.
                folds.push(("AVX-512", |s, v, w| unsafe {
                    add_quantised_avx512(s, v, w)
                }));
            }
        }
        let n = 3 * FOLD_BLOCK + 17;
        let good: Vec<f32> = (0..n).map(|i| (i % 201) as f32 * 1e-3 - 0.1).collect();
        for at in [0, FOLD_BLOCK - 1, FOLD_BLOCK, 2 * FOLD_BLOCK + 5, n - 1] {
            for bad in [f32::NAN, f32::NEG_INFINITY, MAX_ABS_DELTA * 1.5] {
                let mut values = good.clone();
                values[at] = bad;
                let stop = at / FOLD_BLOCK * FOLD_BLOCK;
                for (name, fold) in &folds {
                    let mut sums = vec![5i64; n];
                    assert_eq!(fold(&mut sums, &values, 300), stop, "{name}: {bad} at {at}");
                    assert!(
                        sums[stop..].iter().all(|&s| s == 5),
                        "{name}: folded past {stop}"
                    );
                }
                // The accumulator subtracts what it folded before the bad block.
                let mut acc = Accumulator::new(n + 3);
                acc.reserve(300).unwrap();
                acc.fold(3, &good, 300).unwrap();
                let before = acc.clone();
                let e = acc.fold(3, &values, 300).unwrap_err().to_string();
                assert!(e.contains(&format!("delta value #{}", at + 3)), "{e}");
                assert_eq!(acc, before, "{bad} at {at}");
            }
        }
    }

    #[test]
    fn every_plausibility_scan_refuses_each_bad_value_wherever_it_sits() {
        type Scan = fn(&[f32]) -> bool;
        let scans: Vec<(&str, Scan)> = {
            let mut v: Vec<(&str, Scan)> = vec![
                ("dispatched", all_plausible),
                ("baseline", |x| all_plausible_scan(x)),
            ];
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 checked just above.
                    v.push(("AVX2", |x| unsafe { all_plausible_avx2(x) }));
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F checked just above.
                    v.push(("AVX-512", |x| unsafe { all_plausible_avx512(x) }));
                }
            }
            v
        };
        let bound = MAX_ABS_DELTA;
        let good: Vec<f32> = (0..1000)
            .map(|i| (i as f32 - 500.0) * bound / 500.0)
            .collect();
        let bad = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            bound * 1.0001,
            -bound * 1.0001,
        ];
        for (name, scan) in &scans {
            assert!(scan(&good), "{name}: plausible values refused");
            assert!(scan(&[]), "{name}: an empty chunk refused");
            // First, last, and positions inside and across vector widths.
            for at in [0, 1, 7, 15, 16, 17, 63, 500, 998, 999] {
                for b in bad {
                    let mut v = good.clone();
                    v[at] = b;
                    assert!(!scan(&v), "{name}: {b} at {at} accepted");
                }
            }
        }
    }

    #[test]
    fn a_reset_accumulator_equals_a_new_one() {
        let ups = updates(3, 500, 4);
        let mut acc = Accumulator::new(500);
        ups.iter().for_each(|(d, w)| acc.add(d, *w).unwrap());
        acc.reset();
        assert_eq!(acc, Accumulator::new(500));
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

    #[test]
    fn noise_is_added_exactly_and_shifts_the_mean_by_noise_over_weight() {
        let mut acc = Accumulator::new(40_000);
        acc.reserve(4).unwrap();
        let zeros = vec![0.0f32; 40_000];
        acc.fold(0, &zeros, 4).unwrap();
        acc.commit();
        let mut k = 0i64;
        acc.add_noise(|block| {
            for n in block.iter_mut() {
                *n = (k % 7 - 3) << FRACTION_BITS;
                k += 1;
            }
        })
        .unwrap();
        let mut global = vec![0.0f32; 40_000];
        acc.apply_in_place(&mut global).unwrap();
        for (i, g) in global.iter().enumerate() {
            assert_eq!(*g, ((i as i64 % 7) - 3) as f32 / 4.0, "parameter {i}");
        }
        let mut full = Accumulator::new(2);
        full.sums[1] = i64::MAX - 1;
        let e = full.add_noise(|b| b.fill(5)).unwrap_err().to_string();
        assert!(e.contains("parameter 1 overflows"), "{e}");
    }
}
