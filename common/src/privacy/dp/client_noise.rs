//! Client-level noise in the accumulator's fixed-point integers: how much, who
//! adds it, and how a site regenerates its share of it chunk by chunk.
//!
//! DP-FedAvg bounds each firm's update to L2 norm `clip_norm` and adds
//! Gaussian noise of std `noise_multiplier × clip_norm` to the sum. Sangsaeng
//! sums `round(v · 2^F)` (F = [`FRACTION_BITS`]), so the sensitivity of the sum
//! to one firm is that of its *rounded* update: at most
//! `2^F · clip + √d / 2` units, each of the d values moving by at most half a
//! unit (KLS21 inflate Δ₂ the same way for their rounding), with a slack of
//! 2^-22 on the clip for the f32 arithmetic of clipping. The noise is
//! scaled to that bound, so the accountant's ε holds for the integers actually
//! summed, not just for the real-valued update.
//!
//! Two ways to add it:
//! - **central** (plain rounds): the coordinator adds all of it to the opened
//!   sum; the guarantee holds against whoever sees the models, not against the
//!   coordinator.
//! - **distributed** (with secure aggregation): each site adds
//!   `N_Z(0, σ²/m)` to its own integers before masking, where m is the plan's
//!   `training.min_participants`, the fewest updates a round is ever opened
//!   with. The opened sum carries the noise of every site in it, variance
//!   ≥ σ², and no party ever saw it all (Kairouz, Liu, Steinke 2021, "The
//!   Distributed Discrete Gaussian Mechanism"). The assumption, stated in the
//!   README: the sites whose updates are in the sum added their noise and did
//!   not reveal it to the coordinator. If c of the m collude with it, the
//!   noise it cannot subtract has variance σ²·(m − c)/m.
//!
//! A sum of discrete Gaussians is not exactly one: KLS21's τ bounds the gap.
//! Each share here is refused below [`MIN_SHARE_SIGMA`] integer units, where τ
//! is below 10·e^(−π²·16) ≈ 10^−67 per coordinate, so the accountant's ε (that
//! of the continuous Gaussian of std σ) is exact to every printed digit.
//!
//! A site's noise must be the same in both of its masking passes (one for the
//! up-front digest, one for the upload, and again on a resume), so it is drawn
//! from a ChaCha20 generator keyed by a fresh 32-byte seed from the operating
//! system, one stream per chunk, named by the chunk's first parameter: any
//! chunk can be regenerated alone. The seed stays in the site's memory for the
//! round and is wiped on drop; it never leaves the site.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::discrete_gaussian::DiscreteGaussian;
use crate::aggregation::fedavg::FRACTION_BITS;
use crate::config::plan::TrainingPlan;
use crate::{Error, Result};

/// The smallest per-site noise std, in integer units, a distributed round
/// accepts: below it KLS21's τ would no longer be negligible (module doc).
pub const MIN_SHARE_SIGMA: f64 = 4.0;

/// The sensitivity of the fixed-point sum to one update of L2 norm ≤ `clip`
/// with `dim` values, in integer units.
pub fn sensitivity_units(clip: f64, dim: usize) -> f64 {
    clip * CLIP_SLACK * f64::from(1u32 << FRACTION_BITS) + (dim as f64).sqrt() / 2.0
}

/// Clipping scales f32 values by an f32 factor, each product rounded to
/// within 2^-24 of its exact value: the clipped norm is at most clip·(1 + 2^-24).
/// 2^-22 covers it with room.
const CLIP_SLACK: f64 = 1.0 + 1.0 / (1u32 << 22) as f64;

/// The largest update norm the coordinator accepts under a clip: the clip
/// with the slack the sensitivity is computed with, so whatever it accepts
/// is covered by the noise.
pub fn accepted_norm(clip: f64) -> f64 {
    clip * CLIP_SLACK
}

/// Under client-level DP every update folds with weight 1, so one firm moves
/// the sum by at most its clip, whatever its size; otherwise by its example
/// count. The site (which weights its own masked integers) and the coordinator
/// both use this.
pub fn fold_weight(plan: &TrainingPlan, num_examples: u64) -> u64 {
    if plan.client_level_dp() {
        1
    } else {
        num_examples
    }
}

/// The noise of the whole sum: `N_Z(0, (σ · Δ)²)` with Δ from
/// [`sensitivity_units`].
pub fn central(noise_multiplier: f64, clip: f64, dim: usize) -> Result<DiscreteGaussian> {
    DiscreteGaussian::from_sigma(noise_multiplier * sensitivity_units(clip, dim))
}

/// One site's share of the noise when `min_sites` sites' updates are in every
/// opened sum.
pub fn share(
    noise_multiplier: f64,
    clip: f64,
    dim: usize,
    min_sites: usize,
) -> Result<DiscreteGaussian> {
    let m = min_sites.max(1);
    let std = noise_multiplier * sensitivity_units(clip, dim) / (m as f64).sqrt();
    if std.is_nan() || std < MIN_SHARE_SIGMA {
        return Err(Error::Privacy(format!(
            "privacy.dp.noise_multiplier: each of {m} sites' share of the noise would have std {std:.3} fixed-point units, below {MIN_SHARE_SIGMA}: the sum of the shares would then not be close enough to a discrete Gaussian to be accounted as one; raise noise_multiplier or clip_norm"
        )));
    }
    DiscreteGaussian::from_sigma(std)
}

/// A site's share of the noise for one round, regenerable chunk by chunk.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct NoiseShare {
    seed: [u8; 32],
    #[zeroize(skip)]
    sampler: DiscreteGaussian,
}

impl std::fmt::Debug for NoiseShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoiseShare(..)")
    }
}

impl NoiseShare {
    /// A share keyed by a fresh seed from the operating system.
    pub fn fresh(sampler: DiscreteGaussian) -> Result<Self> {
        use rand::TryRngCore;
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.try_fill_bytes(&mut seed).map_err(|e| {
            Error::Privacy(format!(
                "the operating system's random number generator failed while drawing noise: {e}"
            ))
        })?;
        Ok(NoiseShare { seed, sampler })
    }

    /// A share keyed by `seed` (tests, which need to know the noise).
    pub fn with_seed(seed: [u8; 32], sampler: DiscreteGaussian) -> Self {
        NoiseShare { seed, sampler }
    }

    /// Adds the noise of the chunk starting at parameter `offset` to `words`
    /// (wrapping, as the masks are: the ring is Z_2^64). The same offset and
    /// length always give the same noise.
    pub fn add_to(&self, offset: u64, words: &mut [i64]) {
        let mut rng = ChaCha20Rng::from_seed(self.seed);
        rng.set_stream(offset);
        for w in words {
            *w = w.wrapping_add(self.sampler.sample(&mut rng));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variance(v: &[i64]) -> f64 {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)
    }

    #[test]
    fn the_sensitivity_covers_the_rounding_of_every_value() {
        let unit = f64::from(1u32 << FRACTION_BITS);
        assert_eq!(sensitivity_units(0.5, 0), 0.5 * CLIP_SLACK * unit);
        assert_eq!(
            sensitivity_units(0.5, 10_000),
            0.5 * CLIP_SLACK * unit + 50.0
        );
    }

    /// m sites' shares sum to the central noise's variance. 100,000 values per
    /// site: the relative standard error of a sample variance is sqrt(2/n) =
    /// 0.45 %; the tolerance is 5 of them.
    #[test]
    fn the_shares_of_the_minimum_number_of_sites_sum_to_the_central_variance() {
        let (sigma, clip, dim, m) = (1.1, 1e-4, 100_000usize, 4usize);
        let want = central(sigma, clip, dim).unwrap().sigma_sq();
        let want = want.0 as f64 / want.1 as f64;
        let mut sum = vec![0i64; dim];
        for s in 0..m {
            let share = NoiseShare::with_seed([s as u8; 32], share(sigma, clip, dim, m).unwrap());
            share.add_to(0, &mut sum);
        }
        let got = variance(&sum);
        assert!((got / want - 1.0).abs() < 0.0225, "{got} vs {want}");
    }

    #[test]
    fn a_chunk_regenerates_alone_and_chunks_differ() {
        let share = NoiseShare::with_seed([7; 32], share(1.0, 1.0, 1000, 3).unwrap());
        let (mut a, mut b, mut c) = (vec![5i64; 64], vec![5i64; 64], vec![5i64; 64]);
        share.add_to(128, &mut a);
        share.add_to(128, &mut b);
        share.add_to(192, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().any(|&x| x != 5));
    }

    #[test]
    fn a_share_too_small_to_account_is_refused_with_the_key() {
        let e = share(1e-9, 1e-3, 10, 50).unwrap_err().to_string();
        assert!(e.contains("privacy.dp.noise_multiplier"), "{e}");
        assert!(share(1.0, 1e-3, 10, 50).is_ok());
    }

    #[test]
    fn only_client_level_folds_with_equal_weights() {
        let toml = "[schema]\nfeature_columns = [\"a\"]\nlabel_column = \"y\"\nclasses = [\"0\", \"1\"]\n\
                    [model]\nhidden_layers = []\n[training]\nrounds = 1\nlearning_rate = 0.1\nmin_participants = 1\n";
        let mut plan = TrainingPlan::from_toml(toml, "t").unwrap();
        assert_eq!(fold_weight(&plan, 99), 99);
        plan.privacy = Some(crate::config::privacy::PrivacyConfig {
            dp: Some(crate::config::privacy::DpConfig {
                level: crate::config::privacy::DpLevel::Client,
                target_epsilon: 5.0,
                delta: 1e-5,
                noise_multiplier: Some(1.0),
                max_grad_norm: None,
                clip_norm: Some(1.0),
            }),
            ..Default::default()
        });
        assert_eq!(fold_weight(&plan, 99), 1);
    }
}
