//! Noise calibration: the smallest noise multiplier that meets an (ε, δ)
//! target for `steps` rounds of the Poisson-subsampled Gaussian mechanism.
//!
//! ε is computed by the RDP accountant in [`super::accountant`] (Mironov,
//! Talwar, Zhang 2019, arXiv:1908.10530, with the RDP → (ε, δ) conversion of
//! Canonne, Kamath, Steinke 2020, arXiv:2004.00010 v4, Prop. 12), so a
//! calibrated σ is exactly what that accountant will later certify — the
//! training job and the budget check cannot disagree. The equivalent in
//! Google's `dp_accounting` is `calibrate_dp_mechanism` with an
//! `RdpAccountant`; `tests/against_dp_accounting.rs` compares the two.
//!
//! ε(σ) is non-increasing in σ (each order's RDP is, and the conversion is
//! monotone in RDP), so bisection on σ is sound; it runs on log σ because
//! the bracket spans five decades and the tolerance is relative.

use super::accountant::{
    RdpAccountant, check_delta, check_epsilon, check_q, check_sigma, check_steps,
};
use crate::{Error, Result};

/// Smallest noise multiplier the search considers. Below 0.1 the Gaussian
/// mechanism gives ε in the tens even at q = 0.001; a target met there is met
/// by 0.1 as well, and 0.1 is what is returned.
pub const MIN_NOISE_MULTIPLIER: f64 = 0.1;

/// Largest noise multiplier the search considers; a target still missed here
/// is unreachable in practice (and the model would learn nothing).
pub const MAX_NOISE_MULTIPLIER: f64 = 1e4;

/// Relative width at which bisection stops. The returned σ is at most this
/// much above the true minimum, and always on the safe side of it.
pub const NOISE_MULTIPLIER_REL_TOL: f64 = 1e-5;

/// Checks one Poisson-subsampled Gaussian configuration before it is used:
/// `sigma` finite and ≥ 0, `q` in (0, 1], `steps` ≥ 1, `delta` in (0, 1).
/// The error names the first offending parameter and its value.
pub fn validate(sigma: f64, q: f64, steps: u64, delta: f64) -> Result<()> {
    check_sigma(sigma)?;
    check_q(q)?;
    check_steps(steps)?;
    check_delta(delta)
}

/// ε after `steps` compositions of the Poisson-subsampled Gaussian, at `delta`.
pub fn epsilon_for(sigma: f64, q: f64, steps: u64, delta: f64) -> Result<f64> {
    validate(sigma, q, steps, delta)?;
    let mut acc = RdpAccountant::new();
    acc.compose(q, sigma, steps)?;
    Ok(acc.epsilon(delta))
}

/// Smallest noise multiplier σ (to [`NOISE_MULTIPLIER_REL_TOL`]) such that
/// `steps` compositions of the Poisson-subsampled Gaussian with sampling
/// probability `q` are `(target_epsilon, delta)`-DP by the RDP accountant.
///
/// The result always satisfies `epsilon_for(σ, q, steps, delta) <=
/// target_epsilon`. If even [`MIN_NOISE_MULTIPLIER`] meets the target, that
/// value is returned; if [`MAX_NOISE_MULTIPLIER`] does not, this is an error.
pub fn noise_multiplier_for(target_epsilon: f64, delta: f64, q: f64, steps: u64) -> Result<f64> {
    check_epsilon(target_epsilon)?;
    check_delta(delta)?;
    check_q(q)?;
    check_steps(steps)?;

    let eps = |sigma: f64| -> Result<f64> {
        let mut acc = RdpAccountant::new();
        acc.compose(q, sigma, steps)?;
        Ok(acc.epsilon(delta))
    };

    let mut lo = MIN_NOISE_MULTIPLIER;
    if eps(lo)? <= target_epsilon {
        return Ok(lo);
    }
    let mut hi = MAX_NOISE_MULTIPLIER;
    let eps_hi = eps(hi)?;
    if eps_hi > target_epsilon {
        return Err(Error::Privacy(format!(
            "target epsilon={target_epsilon} at delta={delta} is unreachable with q={q} and \
             steps={steps}: even noise multiplier sigma={hi} gives epsilon={eps_hi}; \
             raise the target epsilon or delta, or lower q or steps"
        )));
    }
    // Invariant: eps(lo) > target >= eps(hi). Returning `hi` keeps the
    // answer on the private side of the threshold.
    while hi / lo > 1.0 + NOISE_MULTIPLIER_REL_TOL {
        let mid = (lo * hi).sqrt();
        if eps(mid)? <= target_epsilon {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_meets_target_tightly() {
        for (target, delta, q, steps) in [
            (1.0, 1e-5, 0.01, 1000),
            (8.0, 1e-6, 0.05, 500),
            (3.0, 1e-5, 1.0, 10),
            (0.5, 1e-6, 0.001, 10_000),
        ] {
            let sigma = noise_multiplier_for(target, delta, q, steps).unwrap();
            let eps = epsilon_for(sigma, q, steps, delta).unwrap();
            assert!(eps <= target, "sigma={sigma}: eps {eps} > target {target}");
            // Slightly less noise must break the target: sigma is minimal.
            let below = sigma * (1.0 - 2.0 * NOISE_MULTIPLIER_REL_TOL);
            let eps_below = epsilon_for(below, q, steps, delta).unwrap();
            assert!(eps_below > target, "sigma={below} still meets {target}");
            assert!(
                (target - eps) / target < 1e-3,
                "eps {eps} not close to {target}"
            );
        }
    }

    #[test]
    fn loose_target_returns_floor_and_impossible_target_errors() {
        assert_eq!(
            noise_multiplier_for(1e6, 1e-5, 0.01, 10).unwrap(),
            MIN_NOISE_MULTIPLIER
        );
        let err = noise_multiplier_for(1e-9, 1e-5, 1.0, 10_000)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unreachable") && err.contains("epsilon=0.000000001"),
            "{err}"
        );
    }

    #[test]
    fn validation_errors_name_the_parameter() {
        let e = |r: Result<f64>| r.unwrap_err().to_string();
        assert!(e(noise_multiplier_for(0.0, 1e-5, 0.01, 10)).contains("epsilon=0"));
        assert!(e(noise_multiplier_for(-1.0, 1e-5, 0.01, 10)).contains("epsilon=-1"));
        assert!(e(noise_multiplier_for(f64::INFINITY, 1e-5, 0.01, 10)).contains("epsilon=inf"));
        assert!(e(noise_multiplier_for(f64::NAN, 1e-5, 0.01, 10)).contains("epsilon=NaN"));
        assert!(e(noise_multiplier_for(1.0, 0.0, 0.01, 10)).contains("delta=0"));
        assert!(e(noise_multiplier_for(1.0, 1.0, 0.01, 10)).contains("delta=1"));
        assert!(e(noise_multiplier_for(1.0, f64::NAN, 0.01, 10)).contains("delta=NaN"));
        assert!(e(noise_multiplier_for(1.0, 1e-5, 0.0, 10)).contains("q=0"));
        assert!(e(noise_multiplier_for(1.0, 1e-5, 1.01, 10)).contains("q=1.01"));
        assert!(e(noise_multiplier_for(1.0, 1e-5, 0.01, 0)).contains("steps=0"));

        let v = |s, q, n, d| validate(s, q, n, d).unwrap_err().to_string();
        assert!(v(-0.5, 0.1, 1, 1e-5).contains("sigma=-0.5"));
        assert!(v(f64::NAN, 0.1, 1, 1e-5).contains("sigma=NaN"));
        assert!(v(1.0, -0.1, 1, 1e-5).contains("q=-0.1"));
        assert!(v(1.0, 0.1, 0, 1e-5).contains("steps=0"));
        assert!(v(1.0, 0.1, 1, 2.0).contains("delta=2"));
        assert!(validate(1.0, 1.0, 1, 1e-5).is_ok());
        assert!(validate(0.0, 0.5, 1, 1e-5).is_ok());
    }
}
