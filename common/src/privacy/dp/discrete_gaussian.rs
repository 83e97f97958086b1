//! Exact sampler for the discrete Gaussian `N_Z(0, σ²)`, the noise a client
//! adds to its update in the fixed-point integer domain before secure
//! aggregation.
//!
//! Algorithm: Canonne, Kamath, Steinke 2020, "The Discrete Gaussian for
//! Differential Privacy" (NeurIPS 2020, arXiv:2004.00010): Algorithm 1
//! (Bernoulli(exp(−γ)) for rational γ), Algorithm 2 (discrete Laplace) and
//! Algorithm 3 (discrete Gaussian by rejection from the discrete Laplace with
//! `t = ⌊σ⌋ + 1`). CKS20 show that adding it to an integer-valued query of L2
//! sensitivity Δ gives ½(Δ/σ)²-concentrated DP, as the continuous Gaussian
//! does.
//!
//! # Why no floating point
//! Mironov 2012 ("On Significance of the Least Significant Bits for
//! Differential Privacy", CCS 2012) showed that textbook samplers built on
//! floating-point `ln(U)` leak the secret through which doubles they can and
//! cannot produce. Here σ² is held as an exact rational `num/den`; every
//! random decision in [`DiscreteGaussian::sample`] is a comparison of a
//! uniformly drawn integer with an integer threshold, computed in `u128`
//! (with a 256-bit square where needed). No float touches a sample. The
//! only float is the *parameter* in [`DiscreteGaussian::from_sigma`], which
//! is converted once, exactly (see there).
//!
//! The output is `i64`; candidates with `|Y| > i64::MAX` (probability about
//! `exp(−2^63/t)`) are rejected, i.e. the sample is `N_Z(0, σ²)` conditioned
//! on fitting an `i64`. When the rejection exponent γ exceeds `2^128` it is
//! capped there, which changes an acceptance probability below
//! `exp(−2^128)`. Neither is observable; otherwise the sampler is exact.
//!
//! The generator must be cryptographically secure (`R: CryptoRng`): the
//! privacy argument assumes the noise is unpredictable to the server. In
//! production pass `rand::rngs::OsRng.unwrap_err()` (rand 0.9's `OsRng` is a
//! fallible `TryCryptoRng`), `rand::rng()`, or a
//! `rand_chacha::ChaCha20Rng::from_os_rng()`; tests use a seeded ChaCha20.
//!
//! # Distributed noise and its caveat
//! In distributed DP each of `n` clients adds its own share, so that the
//! aggregate carries the full noise even though no party saw it all.
//! [`DiscreteGaussian::per_party`] gives each party variance
//! `σ²/n_honest_min`, where `n_honest_min` is the number of parties whose
//! noise is guaranteed to reach the sum (not dropped out, not colluding with
//! the server): only their shares count, so the sum of honest shares has
//! variance ≥ σ².
//!
//! Unlike the continuous case, a sum of independent discrete Gaussians is
//! *not* a discrete Gaussian. Kairouz, Liu, Steinke 2021 ("The Distributed
//! Discrete Gaussian Mechanism for Federated Learning with Secure
//! Aggregation", ICML 2021, arXiv:2102.06387, Thm. 1 and Prop. 14) show it is
//! close: with per-party variance `s²` (integer units) and `n` parties,
//! `τ = 10 · Σ_{k=1}^{n−1} exp(−2π² s² · k/(k+1))` (see [`kls21_tau`]) and the
//! RDP at order α in dimension `d` is at most
//! `min(α Δ₂²/(2σ²) + τ d, (α/2)(Δ₂/σ + τ √d)²)`. τ is dominated by its
//! `k = 1` term `10·e^{−π² s²}` (s = 1, n = 100: τ ≈ 5.5e-4; s = 2: ≈ 7e-17),
//! so it is negligible once each share has s ≳ 2, but it is *not* zero and
//! must be added when accounting the distributed mechanism; the plain
//! continuous-Gaussian accountant in [`super::accountant`] does not include
//! it, and its subsampling bound (MTZ19) is derived for continuous noise —
//! KLS21 instead feed the bound above into the generic Poisson-subsampled RDP
//! bound of Zhu & Wang 2019. KLS21 also inflate Δ₂ for the randomized rounding
//! into the integer domain; that belongs to the caller that does the rounding.

use crate::{Error, Result};
use rand::{CryptoRng, RngCore};

/// The discrete Gaussian `N_Z(0, σ²)` with `σ² = num/den` exactly.
///
/// Everything the inner loop needs is precomputed here so that `sample`
/// performs only integer arithmetic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscreteGaussian {
    /// σ² numerator, in lowest terms with `den`.
    num: u64,
    den: u64,
    /// Discrete Laplace scale `⌊σ⌋ + 1` (CKS20 Alg. 3).
    t: u64,
    /// `den · t`, < 2^64, so that `|Y| · den · t < 2^127`.
    den_t: u128,
    /// Denominator of the rejection exponent, `2 · num · den · t²`, < 2^127.
    gamma_den: u128,
}

impl DiscreteGaussian {
    /// `N_Z(0, num/den)`.
    ///
    /// Fails if `num` or `den` is 0, or if the rational is so large or so
    /// finely specified that `2·num·den·(⌊σ⌋+1)² ≥ 2^127` (roughly
    /// `num ≳ 2^61` in lowest terms); a coarser rational then fixes it.
    pub fn new(sigma_sq_num: u64, sigma_sq_den: u64) -> Result<Self> {
        if sigma_sq_den == 0 {
            return Err(Error::Privacy(
                "discrete Gaussian sigma_sq_den=0 is invalid: sigma^2 = num/den needs den >= 1"
                    .into(),
            ));
        }
        if sigma_sq_num == 0 {
            return Err(Error::Privacy(format!(
                "discrete Gaussian sigma_sq_num=0 (sigma^2 = 0/{sigma_sq_den}) is invalid: \
                 zero noise gives no privacy; sigma^2 must be > 0"
            )));
        }
        let g = gcd(sigma_sq_num, sigma_sq_den);
        let (num, den) = (sigma_sq_num / g, sigma_sq_den / g);
        // ⌊sqrt(num/den)⌋ = ⌊sqrt(⌊num/den⌋)⌋, so integer isqrt is exact.
        let t = (num / den).isqrt() + 1;
        let too_big = || {
            Error::Privacy(format!(
                "discrete Gaussian sigma^2 = {num}/{den} needs more than 127-bit exact \
                 arithmetic (2*num*den*t^2 with t = {t}); use a smaller sigma or a rational \
                 with a smaller denominator"
            ))
        };
        let den_t = u128::from(den) * u128::from(t);
        if den_t > u128::from(u64::MAX) {
            return Err(too_big());
        }
        let gamma_den = 2u128
            .checked_mul(u128::from(num))
            .and_then(|v| v.checked_mul(den_t))
            .and_then(|v| v.checked_mul(u128::from(t)))
            .filter(|&v| v < 1u128 << 127)
            .ok_or_else(too_big)?;
        Ok(Self {
            num,
            den,
            t,
            den_t,
            gamma_den,
        })
    }

    /// `N_Z(0, sigma²)` for a standard deviation given as `f64`.
    ///
    /// `sigma * sigma` is rounded once to the nearest `f64` (relative error
    /// ≤ 2⁻⁵³ in σ², i.e. ≤ 2⁻⁵⁴ in σ) and that double is converted to the
    /// rational it *exactly* is (`m · 2^e`); no further rounding. Works for
    /// σ from about 0.022 (2^-5.5) to about 2^31; outside, build the rational yourself
    /// with [`new`](Self::new).
    pub fn from_sigma(sigma: f64) -> Result<Self> {
        if !(sigma.is_finite() && sigma > 0.0) {
            return Err(Error::Privacy(format!(
                "discrete Gaussian sigma={sigma} is invalid: sigma must be finite and > 0"
            )));
        }
        let var = sigma * sigma;
        let out_of_range = || {
            Error::Privacy(format!(
                "discrete Gaussian sigma={sigma} (sigma^2={var:e}) cannot be represented \
                 exactly: from_sigma supports sigma in about [0.022, 2^31]; use \
                 DiscreteGaussian::new with an explicit rational sigma^2"
            ))
        };
        let (mut m, mut e) = decompose(var).ok_or_else(out_of_range)?;
        let tz = m.trailing_zeros();
        m >>= tz;
        e += tz as i32;
        let (num, den) = if e >= 0 {
            let scale = 1u64.checked_shl(e as u32).ok_or_else(out_of_range)?;
            (m.checked_mul(scale).ok_or_else(out_of_range)?, 1)
        } else {
            (m, 1u64.checked_shl((-e) as u32).ok_or_else(out_of_range)?)
        };
        Self::new(num, den).map_err(|_| out_of_range())
    }

    /// The share each party adds so that the honest parties' shares sum to
    /// variance ≥ σ²: `N_Z(0, σ²/n_honest_min)`. See the module doc for why
    /// the sum is only approximately `N_Z(0, σ²)` ([`kls21_tau`]).
    pub fn per_party(&self, n_honest_min: u64) -> Result<Self> {
        if n_honest_min == 0 {
            return Err(Error::Privacy(
                "n_honest_min=0 is invalid: at least one party's noise must reach the sum".into(),
            ));
        }
        let den = self.den.checked_mul(n_honest_min).ok_or_else(|| {
            Error::Privacy(format!(
                "n_honest_min={n_honest_min} with sigma^2 = {}/{} overflows the 64-bit \
                 denominator; use a coarser sigma^2",
                self.num, self.den
            ))
        })?;
        Self::new(self.num, den)
    }

    /// σ² as the exact rational `(num, den)` in lowest terms.
    pub fn sigma_sq(&self) -> (u64, u64) {
        (self.num, self.den)
    }

    /// σ as a float, for reporting only (never used by the sampler). The
    /// variance of `N_Z(0, σ²)` is slightly *below* σ² (CKS20), by a relative
    /// ≈ `8π²σ² e^{−2π²σ²}`: 2e-7 at σ = 1, 14 % at σ = 0.5, nil beyond.
    pub fn sigma(&self) -> f64 {
        (self.num as f64 / self.den as f64).sqrt()
    }

    /// One sample of `N_Z(0, σ²)` (CKS20 Algorithm 3).
    pub fn sample<R: CryptoRng + RngCore + ?Sized>(&self, rng: &mut R) -> i64 {
        loop {
            let y = discrete_laplace(rng, self.t);
            // γ = (|Y| − σ²/t)² / (2σ²) = (|Y|·den·t − num)² / (2·num·den·t²).
            let x = (u128::from(y.unsigned_abs()) * self.den_t).abs_diff(u128::from(self.num));
            let (whole, rem) = square_divrem(x, self.gamma_den);
            if bernoulli_exp_neg(rng, whole, rem, self.gamma_den) {
                return y;
            }
        }
    }

    /// Fills `out` with independent samples — the noise vector to add to a
    /// fixed-point update (see [`fixed_point_sigma`] for the scale).
    pub fn fill<R: CryptoRng + RngCore + ?Sized>(&self, rng: &mut R, out: &mut [i64]) {
        for v in out {
            *v = self.sample(rng);
        }
    }
}

/// Integer-domain standard deviation for noise of std `std_model_units` in
/// model units when values are encoded in fixed point with `frac_bits`
/// fraction bits (`x ↦ round(x · 2^F)`): `s · 2^F`. Scaling by a power of two
/// is exact in `f64`. Feed the result to [`DiscreteGaussian::from_sigma`].
pub fn fixed_point_sigma(std_model_units: f64, frac_bits: u32) -> Result<f64> {
    if !(std_model_units.is_finite() && std_model_units > 0.0) {
        return Err(Error::Privacy(format!(
            "noise std std_model_units={std_model_units} is invalid: it must be finite and > 0"
        )));
    }
    if frac_bits > 62 {
        return Err(Error::Privacy(format!(
            "fixed-point frac_bits={frac_bits} is invalid: at most 62 fraction bits fit an i64"
        )));
    }
    Ok(std_model_units * (1u64 << frac_bits) as f64)
}

/// KLS21's τ for `n_parties` each adding `N_Z(0, per_party_sigma²)` (integer
/// units): `10 · Σ_{k=1}^{n−1} exp(−2π² σ² k/(k+1))`. It bounds how far the
/// sum is from a single discrete Gaussian; see the module doc for how it
/// enters the RDP bound. This is accounting, not sampling, so `f64` is fine.
pub fn kls21_tau(per_party_sigma: f64, n_parties: u64) -> f64 {
    use std::f64::consts::PI;
    let c = 2.0 * (PI * per_party_sigma).powi(2);
    let mut tau = 0.0;
    for k in 1..n_parties {
        let k = k as f64;
        tau += (-c * k / (k + 1.0)).exp();
    }
    10.0 * tau
}

// ---------------------------------------------------------------------------
// Exact primitives. Each returns a bool/integer from integer comparisons only.

/// Uniform integer in `[0, n)`, `n ≥ 1`, by masking and rejection: unbiased,
/// and fewer than two draws on average.
fn uniform_below<R: RngCore + ?Sized>(rng: &mut R, n: u128) -> u128 {
    debug_assert!(n >= 1);
    if n == 1 {
        return 0;
    }
    let bits = 128 - (n - 1).leading_zeros();
    let mask = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    loop {
        let raw = if bits <= 64 {
            u128::from(rng.next_u64())
        } else {
            (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64())
        };
        let x = raw & mask;
        if x < n {
            return x;
        }
    }
}

/// Bernoulli(`num/den`), `num ≤ den`.
fn bernoulli_ratio<R: RngCore + ?Sized>(rng: &mut R, num: u128, den: u128) -> bool {
    uniform_below(rng, den) < num
}

/// Bernoulli(exp(−num/den)) for `num ≤ den` (CKS20 Alg. 1, γ ∈ [0, 1]):
/// the index of the first failure in Bernoulli(γ/k), k = 1, 2, …, is odd with
/// probability `Σ (−γ)^k / k! = e^{−γ}`.
fn bernoulli_exp_neg_le1<R: RngCore + ?Sized>(rng: &mut R, num: u128, den: u128) -> bool {
    let mut k: u128 = 1;
    // Bernoulli(γ/k) as Bernoulli(γ) ∧ Bernoulli(1/k): exact, and avoids
    // forming den·k, which could overflow.
    while bernoulli_ratio(rng, num, den) && (k == 1 || uniform_below(rng, k) == 0) {
        k += 1;
    }
    k % 2 == 1
}

/// Bernoulli(exp(−γ)) for `γ = whole + rem/den`, `rem < den` (CKS20 Alg. 1,
/// γ > 1): `e^{−γ} = (e^{−1})^whole · e^{−rem/den}`, sampled as independent
/// factors with early exit.
fn bernoulli_exp_neg<R: RngCore + ?Sized>(rng: &mut R, whole: u128, rem: u128, den: u128) -> bool {
    let mut i = 0;
    while i < whole {
        if !bernoulli_exp_neg_le1(rng, 1, 1) {
            return false;
        }
        i += 1;
    }
    bernoulli_exp_neg_le1(rng, rem, den)
}

/// Discrete Laplace with scale `t` (CKS20 Alg. 2): `P(Y = y) ∝ e^{−|y|/t}`.
fn discrete_laplace<R: RngCore + ?Sized>(rng: &mut R, t: u64) -> i64 {
    let t128 = u128::from(t);
    loop {
        let u = uniform_below(rng, t128);
        if !bernoulli_exp_neg(rng, 0, u, t128) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp_neg_le1(rng, 1, 1) {
            v += 1;
        }
        let Some(x) = v.checked_mul(t128).and_then(|tv| tv.checked_add(u)) else {
            continue;
        };
        let Ok(x) = i64::try_from(x) else {
            continue;
        };
        let negative = rng.next_u32() & 1 == 1;
        if negative && x == 0 {
            // Otherwise 0 would be drawn twice as often as it should.
            continue;
        }
        return if negative { -x } else { x };
    }
}

/// `(⌊x²/d⌋, x² mod d)` for `d < 2^127`; the quotient saturates at
/// `u128::MAX` (see the module doc).
fn square_divrem(x: u128, d: u128) -> (u128, u128) {
    debug_assert!(d > 0 && d < 1u128 << 127);
    if x <= u128::from(u64::MAX) {
        let sq = x * x;
        return (sq / d, sq % d);
    }
    let (hi, lo) = mul_wide(x, x);
    // Schoolbook binary long division; r < d < 2^127 so `r << 1` never
    // overflows. Only reached for |Y| far out in the tail or huge σ.
    let mut r: u128 = 0;
    let mut q: u128 = 0;
    let mut saturated = false;
    for i in (0..256).rev() {
        let bit = if i >= 128 {
            (hi >> (i - 128)) & 1
        } else {
            (lo >> i) & 1
        };
        r = (r << 1) | bit;
        saturated |= q >> 127 != 0;
        q <<= 1;
        if r >= d {
            r -= d;
            q |= 1;
        }
    }
    (if saturated { u128::MAX } else { q }, r)
}

/// Full 256-bit product `a · b` as `(high, low)` halves.
fn mul_wide(a: u128, b: u128) -> (u128, u128) {
    const LO: u128 = u64::MAX as u128;
    let (a1, a0) = (a >> 64, a & LO);
    let (b1, b0) = (b >> 64, b & LO);
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 64) + (p01 & LO) + (p10 & LO);
    let lo = (p00 & LO) | (mid << 64);
    let hi = p11 + (p01 >> 64) + (p10 >> 64) + (mid >> 64);
    (hi, lo)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A positive finite `f64` as `(m, e)` with value `m · 2^e` exactly.
fn decompose(x: f64) -> Option<(u64, i32)> {
    if !(x.is_finite() && x > 0.0) {
        return None;
    }
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32;
    let frac = bits & ((1u64 << 52) - 1);
    Some(if exp == 0 {
        (frac, -1074)
    } else {
        (frac | (1u64 << 52), exp - 1075)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    /// Exact moments of N_Z(0, σ²) by direct summation of the pmf, to compare
    /// the sample against (its variance is slightly below σ²).
    fn exact_pmf_stats(sigma: f64) -> (f64, f64) {
        let s2 = sigma * sigma;
        let kmax = (40.0 * sigma).ceil() as i64 + 10;
        let (mut z, mut m2) = (0.0, 0.0);
        for k in -kmax..=kmax {
            let w = (-((k * k) as f64) / (2.0 * s2)).exp();
            z += w;
            m2 += (k * k) as f64 * w;
        }
        (m2 / z, 1.0 / z) // (variance, P(Y = 0))
    }

    /// 200k samples per σ with a fixed seed.
    ///
    /// Tolerances (n = 200 000):
    /// * mean: standard error σ/√n; require |mean| < 4 SE.
    /// * variance: for a (near-)Gaussian the sample variance has std
    ///   ≈ Var·√(2/n) = 0.316 % of Var; require |s² − Var| < 5 such
    ///   standard deviations, i.e. 1.58 % relative. Var is the exact
    ///   discrete-Gaussian variance from the pmf.
    /// * symmetry: among the m nonzero samples #positive ~ Bin(m, ½);
    ///   require |#pos − #neg| < 4√m.
    /// * P(Y = 0): binomial; require |f₀ − p₀| < 5·√(p₀(1−p₀)/n). This is the
    ///   point where a slightly-wrong sampler (e.g. 0 counted twice in the
    ///   Laplace step) shows first.
    #[test]
    fn statistics_match_the_discrete_gaussian() {
        const N: usize = 200_000;
        let mut rng = ChaCha20Rng::seed_from_u64(0x5a17_5ae9);
        for sigma in [1.0, 3.7, 100.0] {
            let dg = DiscreteGaussian::from_sigma(sigma).unwrap();
            let mut xs = vec![0i64; N];
            dg.fill(&mut rng, &mut xs);
            let n = N as f64;
            let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
            let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
            let (true_var, p0) = exact_pmf_stats(sigma);

            let se = sigma / n.sqrt();
            assert!(
                mean.abs() < 4.0 * se,
                "sigma={sigma}: mean {mean} vs SE {se}"
            );

            let var_sd = true_var * (2.0 / n).sqrt();
            assert!(
                (var - true_var).abs() < 5.0 * var_sd,
                "sigma={sigma}: variance {var} vs exact {true_var} (sd {var_sd})"
            );

            let pos = xs.iter().filter(|&&x| x > 0).count() as f64;
            let neg = xs.iter().filter(|&&x| x < 0).count() as f64;
            let zero = n - pos - neg;
            let m = pos + neg;
            assert!(
                (pos - neg).abs() < 4.0 * m.sqrt(),
                "sigma={sigma}: {pos} vs {neg}"
            );
            let f0 = zero / n;
            let f0_sd = (p0 * (1.0 - p0) / n).sqrt();
            assert!(
                (f0 - p0).abs() < 5.0 * f0_sd,
                "sigma={sigma}: P0 {f0} vs {p0}"
            );
        }
    }

    /// The generators the module doc recommends for production must satisfy
    /// the `CryptoRng + RngCore` bound as written.
    #[test]
    fn production_generators_fit_the_bound() {
        use rand::TryRngCore;
        let dg = DiscreteGaussian::from_sigma(2.0).unwrap();
        let mut out = [0i64; 8];
        dg.fill(&mut rand::rngs::OsRng.unwrap_err(), &mut out);
        dg.fill(&mut rand::rng(), &mut out);
        dg.fill(&mut ChaCha20Rng::from_os_rng(), &mut out);
        let dyn_rng: &mut dyn rand::CryptoRng = &mut ChaCha20Rng::seed_from_u64(1);
        let _ = dg.sample(dyn_rng);
    }

    /// A σ² with a 2^61 denominator drives the rejection exponent's
    /// denominator to ~2^125, near the 127-bit limit; the distribution must
    /// be unaffected. 50k samples, P(Y = 0) within 5 binomial sd and the
    /// variance within 5·Var·√(2/n) (3.2 %), as in the main test.
    #[test]
    fn large_rational_parameters_stay_exact() {
        const N: usize = 50_000;
        let num = 3u64 * (1 << 60) + 1;
        let den = 1u64 << 61;
        let dg = DiscreteGaussian::new(num, den).unwrap();
        assert_eq!(dg.sigma_sq(), (num, den));
        assert!(dg.gamma_den > 1u128 << 124);
        let sigma = (num as f64 / den as f64).sqrt();
        let mut rng = ChaCha20Rng::seed_from_u64(99);
        let mut xs = vec![0i64; N];
        dg.fill(&mut rng, &mut xs);
        let n = N as f64;
        let (true_var, p0) = exact_pmf_stats(sigma);
        let var = xs.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n;
        assert!(
            (var - true_var).abs() < 5.0 * true_var * (2.0 / n).sqrt(),
            "{var}"
        );
        let f0 = xs.iter().filter(|&&x| x == 0).count() as f64 / n;
        assert!(
            (f0 - p0).abs() < 5.0 * (p0 * (1.0 - p0) / n).sqrt(),
            "{f0} vs {p0}"
        );
    }

    #[test]
    fn same_seed_same_noise() {
        let dg = DiscreteGaussian::from_sigma(3.7).unwrap();
        let mut a = vec![0; 64];
        let mut b = vec![0; 64];
        dg.fill(&mut ChaCha20Rng::seed_from_u64(7), &mut a);
        dg.fill(&mut ChaCha20Rng::seed_from_u64(7), &mut b);
        assert_eq!(a, b);
        assert!(a.iter().any(|&x| x != 0));
    }

    #[test]
    fn bernoulli_exp_neg_frequency() {
        // P = e^{-γ} for γ = 7/3 (> 1, exercises the split) and 1/5.
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        const N: usize = 100_000;
        for (num, den) in [(7u128, 3u128), (1, 5)] {
            let hits = (0..N)
                .filter(|_| bernoulli_exp_neg(&mut rng, num / den, num % den, den))
                .count() as f64;
            let p = (-(num as f64) / den as f64).exp();
            let sd = (p * (1.0 - p) / N as f64).sqrt();
            assert!((hits / N as f64 - p).abs() < 5.0 * sd, "{num}/{den}");
        }
    }

    #[test]
    fn rational_conversion_is_exact() {
        assert_eq!(
            DiscreteGaussian::from_sigma(1.0).unwrap().sigma_sq(),
            (1, 1)
        );
        assert_eq!(
            DiscreteGaussian::from_sigma(0.5).unwrap().sigma_sq(),
            (1, 4)
        );
        assert_eq!(
            DiscreteGaussian::from_sigma(100.0).unwrap().sigma_sq(),
            (10_000, 1)
        );
        let (n, d) = DiscreteGaussian::from_sigma(3.7).unwrap().sigma_sq();
        assert_eq!(n as f64 / d as f64, 3.7 * 3.7);
        assert!(d.is_power_of_two());
        assert_eq!(DiscreteGaussian::new(6, 4).unwrap().sigma_sq(), (3, 2));
        assert_eq!(DiscreteGaussian::new(10, 1).unwrap().t, 4);
        assert_eq!(DiscreteGaussian::new(9, 1).unwrap().t, 4);
        assert_eq!(DiscreteGaussian::new(1, 2).unwrap().t, 1);
        // Large σ such as 2^20 fixed-point scaling still fits.
        let big = fixed_point_sigma(1.5, 20).unwrap();
        assert_eq!(big, 1.5 * 1048576.0);
        assert!(DiscreteGaussian::from_sigma(big).is_ok());
        assert!(DiscreteGaussian::from_sigma(1e9).is_ok());
    }

    #[test]
    fn invalid_parameters_are_named() {
        let e = |r: Result<DiscreteGaussian>| r.unwrap_err().to_string();
        assert!(e(DiscreteGaussian::new(1, 0)).contains("sigma_sq_den=0"));
        assert!(e(DiscreteGaussian::new(0, 1)).contains("sigma_sq_num=0"));
        assert!(e(DiscreteGaussian::new(u64::MAX, 1)).contains("127-bit"));
        assert!(e(DiscreteGaussian::from_sigma(-1.0)).contains("sigma=-1"));
        assert!(e(DiscreteGaussian::from_sigma(f64::NAN)).contains("sigma=NaN"));
        assert!(e(DiscreteGaussian::from_sigma(1e-200)).contains("sigma=0.000"));
        assert!(e(DiscreteGaussian::from_sigma(1e12)).contains("sigma=1000000000000"));
        let dg = DiscreteGaussian::from_sigma(2.0).unwrap();
        assert!(e(dg.per_party(0)).contains("n_honest_min=0"));
        assert!(
            fixed_point_sigma(0.0, 8)
                .unwrap_err()
                .to_string()
                .contains("std_model_units=0")
        );
        assert!(
            fixed_point_sigma(1.0, 63)
                .unwrap_err()
                .to_string()
                .contains("frac_bits=63")
        );
    }

    #[test]
    fn per_party_divides_the_variance() {
        let total = DiscreteGaussian::new(30, 1).unwrap();
        let share = total.per_party(12).unwrap();
        assert_eq!(share.sigma_sq(), (5, 2));
        // τ shrinks fast with the per-party σ and grows with n.
        // Reference: 10 * sum(exp(-2 pi^2 k/(k+1)) for k in 1..99) in Python.
        let want = 0.000_547_788_699_060_149;
        assert!((kls21_tau(1.0, 100) - want).abs() < 1e-12 * want);
        assert!(kls21_tau(0.5, 100) > kls21_tau(1.0, 100));
        assert!(kls21_tau(1.0, 1000) > kls21_tau(1.0, 100));
        assert_eq!(kls21_tau(1.0, 1), 0.0);
    }

    #[test]
    fn wide_arithmetic() {
        let (hi, lo) = mul_wide(u128::MAX, u128::MAX);
        assert_eq!((hi, lo), (u128::MAX - 1, 1));
        // q·d + r == x² for an x that forces the 256-bit path.
        let x: u128 = (1 << 100) + 12_345_678_901;
        let d: u128 = (1 << 126) + 987_654_321;
        let (q, r) = square_divrem(x, d);
        assert!(r < d);
        let (qd_hi, qd_lo) = mul_wide(q, d);
        let (lo, carry) = qd_lo.overflowing_add(r);
        assert_eq!((qd_hi + u128::from(carry), lo), mul_wide(x, x));
        // Small path agrees with the wide one.
        let (q1, r1) = square_divrem(u128::from(u64::MAX), 12_345);
        let sq = u128::from(u64::MAX) * u128::from(u64::MAX);
        assert_eq!((q1, r1), (sq / 12_345, sq % 12_345));
    }
}
