//! The plan's `[privacy]` section: what privacy guarantee the federation
//! promised its suppliers, checked once at plan load like every other key.
//!
//! Only the settings live here; the arithmetic (accounting, calibration,
//! sampling) is in [`crate::privacy::dp`].

use serde::{Deserialize, Serialize};

/// `[privacy]`: absent means no privacy mechanism beyond "only deltas leave a site".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// Differential privacy of the released model (`[privacy.dp]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<DpConfig>,
    /// Secure aggregation (SecAgg+): each participant masks its update so that
    /// the coordinator can open only the round's sum, never one firm's update.
    /// The result is bit-identical to the plain round's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secure_aggregation: bool,
    /// How many of a participant's neighbours must answer for its masks to be
    /// removed (Shamir threshold t). Absent: more than half of the neighbours.
    /// It must be more than half of them: below that a coordinator could ask two
    /// disjoint halves for the two secrets of one participant and unmask it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation_threshold: Option<u32>,
    /// Neighbours per participant (SecAgg+'s k-regular graph), even. Absent:
    /// everyone masks against everyone (the complete graph), which is
    /// practical to a few dozen participants; with hundreds, about
    /// 2·log2(participants) keeps the round's cost near-linear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation_degree: Option<u32>,
}

/// The fewest participants a secure round can run with: a threshold of at
/// least 2 that is more than half of the n − 1 neighbours needs n ≥ 3.
pub const MIN_SECURE_PARTICIPANTS: usize = 3;

/// Who the guarantee protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpLevel {
    /// Each row of each site's line data (DP-SGD in local training): the level
    /// that keeps its utility with 10-50 firms.
    Record,
    /// Each firm's whole contribution (its update clipped, noise on the sum):
    /// for federations with many participants.
    Client,
}

/// `[privacy.dp]`: a differential-privacy budget for the whole training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// `"record"` (DP-SGD at each site) or `"client"` (each update clipped, noise
    /// on the sum).
    pub level: DpLevel,
    /// The privacy loss ε the whole training may spend, at `delta`.
    pub target_epsilon: f64,
    /// The δ of the (ε, δ) guarantee, in (0, 1); at record level it must also be
    /// below 1 / (each site's training rows).
    pub delta: f64,
    /// Gaussian noise standard deviation as a multiple of the clip. Absent: each
    /// site derives the smallest one that meets `target_epsilon` from the rounds,
    /// the epochs and its own row count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
    /// Record level: the L2 bound each example's gradient is clipped to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// Client level: the L2 bound each update is clipped to at the participant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_norm: Option<f64>,
}

impl PrivacyConfig {
    /// Checks every value; the message names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(dp) = &self.dp {
            dp.validate()?;
        }
        self.validate_secure_aggregation()
    }

    fn validate_secure_aggregation(&self) -> Result<(), String> {
        let tuned =
            self.secure_aggregation_threshold.is_some() || self.secure_aggregation_degree.is_some();
        if !self.secure_aggregation {
            return match tuned {
                true => Err("privacy.secure_aggregation_threshold / _degree: set only with privacy.secure_aggregation = true".into()),
                false => Ok(()),
            };
        }
        if let Some(k) = self.secure_aggregation_degree
            && (k < 2 || k % 2 == 1 || k > 254)
        {
            return Err(format!(
                "privacy.secure_aggregation_degree: {k} must be an even number from 2 to 254 (each neighbour holds one Shamir share at its own x-coordinate)"
            ));
        }
        if let Some(t) = self.secure_aggregation_threshold {
            if t < 2 {
                return Err(format!(
                    "privacy.secure_aggregation_threshold: {t} must be at least 2 (with 1, any single neighbour could reveal a participant's secrets)"
                ));
            }
            if let Some(k) = self.secure_aggregation_degree
                && (t > k || t <= k / 2)
            {
                return Err(format!(
                    "privacy.secure_aggregation_threshold: {t} must be more than half of secure_aggregation_degree = {k} and at most {k}"
                ));
            }
        }
        Ok(())
    }
}

impl DpConfig {
    /// Checks the values that do not depend on a site's data: impossible noise,
    /// clips and budgets are refused at plan load, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "privacy.dp.{key}: {v} must be a finite number above 0"
                ))
            }
        };
        positive("target_epsilon", self.target_epsilon)?;
        if !(self.delta.is_finite() && self.delta > 0.0 && self.delta < 1.0) {
            return Err(format!(
                "privacy.dp.delta: {} must lie strictly between 0 and 1",
                self.delta
            ));
        }
        if let Some(sigma) = self.noise_multiplier {
            positive("noise_multiplier", sigma)?;
        }
        let (needed, other) = match self.level {
            DpLevel::Record => (
                ("max_grad_norm", self.max_grad_norm),
                ("clip_norm", self.clip_norm),
            ),
            DpLevel::Client => (
                ("clip_norm", self.clip_norm),
                ("max_grad_norm", self.max_grad_norm),
            ),
        };
        let level = self.level.name();
        match needed.1 {
            Some(v) => positive(needed.0, v)?,
            None => {
                return Err(format!(
                    "privacy.dp.{}: required at level \"{level}\" (the bound the noise is scaled to)",
                    needed.0
                ));
            }
        }
        if other.1.is_some() {
            return Err(format!(
                "privacy.dp.{}: not used at level \"{level}\"; remove it or change the level",
                other.0
            ));
        }
        Ok(())
    }

    /// The clip the noise is scaled to at this level.
    pub fn clip(&self) -> f64 {
        match self.level {
            DpLevel::Record => self.max_grad_norm,
            DpLevel::Client => self.clip_norm,
        }
        .unwrap_or(0.0)
    }
}

impl DpLevel {
    pub fn name(self) -> &'static str {
        match self {
            DpLevel::Record => "record",
            DpLevel::Client => "client",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> DpConfig {
        DpConfig {
            level: DpLevel::Record,
            target_epsilon: 8.0,
            delta: 1e-5,
            noise_multiplier: None,
            max_grad_norm: Some(1.0),
            clip_norm: None,
        }
    }

    #[test]
    fn a_sound_record_level_budget_is_accepted() {
        record().validate().unwrap();
        let client = DpConfig {
            level: DpLevel::Client,
            max_grad_norm: None,
            clip_norm: Some(0.5),
            noise_multiplier: Some(1.2),
            ..record()
        };
        client.validate().unwrap();
        assert_eq!(client.clip(), 0.5);
    }

    #[test]
    fn impossible_settings_are_refused_naming_the_key() {
        let cases: Vec<(DpConfig, &str)> = vec![
            (
                DpConfig {
                    noise_multiplier: Some(-1.0),
                    ..record()
                },
                "privacy.dp.noise_multiplier",
            ),
            (
                DpConfig {
                    noise_multiplier: Some(f64::NAN),
                    ..record()
                },
                "privacy.dp.noise_multiplier",
            ),
            (
                DpConfig {
                    max_grad_norm: Some(0.0),
                    ..record()
                },
                "privacy.dp.max_grad_norm",
            ),
            (
                DpConfig {
                    max_grad_norm: None,
                    ..record()
                },
                "privacy.dp.max_grad_norm: required",
            ),
            (
                DpConfig {
                    clip_norm: Some(1.0),
                    ..record()
                },
                "privacy.dp.clip_norm: not used",
            ),
            (
                DpConfig {
                    delta: 1.0,
                    ..record()
                },
                "privacy.dp.delta",
            ),
            (
                DpConfig {
                    delta: 0.0,
                    ..record()
                },
                "privacy.dp.delta",
            ),
            (
                DpConfig {
                    target_epsilon: f64::INFINITY,
                    ..record()
                },
                "privacy.dp.target_epsilon",
            ),
            (
                DpConfig {
                    target_epsilon: 0.0,
                    ..record()
                },
                "privacy.dp.target_epsilon",
            ),
        ];
        for (c, key) in cases {
            let e = c.validate().unwrap_err();
            assert!(e.starts_with(key), "{e} should name {key}");
        }
    }
}
