//! What this site does about a plan's differential-privacy budget: decline a
//! plan above its own limits, derive its noise from its own rows, train with
//! DP-SGD or clip its update, and report what it spent.
//!
//! The supplier decides: its `[privacy]` section (`max_epsilon`,
//! `require_differential_privacy`) is checked against every plan before any
//! statistic leaves the site, and a round that would take it above the plan's
//! target is not trained.

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::privacy::{DpConfig, DpLevel};
use sangsaeng_common::learning::dp_sgd::DpSgd;
use sangsaeng_common::privacy::dp::budget::plan_budget;
use sangsaeng_common::privacy::dp::client_noise::{self, NoiseShare};
use sangsaeng_common::transfer::encoding;
use sangsaeng_proto::v1 as pb;

use crate::config::SitePrivacy;
use crate::error::{ParticipantError, Result};

/// How this site trains one round under the plan's privacy settings.
#[derive(Debug, Clone, PartialEq)]
pub enum RoundPrivacy {
    /// No differential privacy in the plan.
    None,
    /// Record level: DP-SGD with these settings, and the report to send.
    Record { sgd: DpSgd, spend: pb::DpSpend },
    /// Client level: the delta is clipped to this L2 norm before it is sent.
    Client { clip_norm: f64 },
}

fn refuse(message: String) -> ParticipantError {
    ParticipantError::Common(sangsaeng_common::Error::Privacy(message))
}

/// Checks a plan against the site's own limits; called on the first task of a
/// training, so a plan the site will not accept is declined before its
/// statistics leave the site.
pub fn accept_plan(site: &SitePrivacy, plan: &TrainingPlan) -> Result<()> {
    if site.require_secure_aggregation && !plan.secure_aggregation() {
        return Err(refuse(
            "this site requires secure aggregation (participant.toml privacy.require_secure_aggregation) and the plan does not set privacy.secure_aggregation = true".into(),
        ));
    }
    let dp = plan.privacy.as_ref().and_then(|p| p.dp.as_ref());
    match (dp, site.max_epsilon) {
        (None, _) if site.require_differential_privacy => Err(refuse(
            "this site requires differential privacy (participant.toml privacy.require_differential_privacy) and the plan has no [privacy.dp]".into(),
        )),
        (Some(dp), Some(max)) if dp.target_epsilon > max => Err(refuse(format!(
            "the plan's privacy.dp.target_epsilon = {} is above this site's privacy.max_epsilon = {max}",
            dp.target_epsilon
        ))),
        _ => Ok(()),
    }
}

/// The privacy settings of `round` at a site with `rows` training rows: for
/// record level the noise (the plan's, or derived so the site meets the target
/// over all rounds) and the ε spent once this round is trained.
pub fn for_round(
    site: &SitePrivacy,
    plan: &TrainingPlan,
    rows: u64,
    round: u32,
) -> Result<RoundPrivacy> {
    accept_plan(site, plan)?;
    let Some(dp) = plan.privacy.as_ref().and_then(|p| p.dp.as_ref()) else {
        return Ok(RoundPrivacy::None);
    };
    match dp.level {
        DpLevel::Client => Ok(RoundPrivacy::Client {
            clip_norm: dp.clip(),
        }),
        DpLevel::Record => record_round(dp, plan, rows, round),
    }
}

fn record_round(dp: &DpConfig, plan: &TrainingPlan, rows: u64, round: u32) -> Result<RoundPrivacy> {
    let budget = plan_budget(plan, Some(rows))?;
    let epsilon = budget
        .epsilon_by_round
        .get(round.saturating_sub(1) as usize)
        .copied()
        .ok_or_else(|| refuse(format!("round {round} is beyond the plan's rounds")))?;
    // A round is never trained past the budget: with an explicit noise
    // multiplier the budget can run out before the plan's last round.
    if epsilon > dp.target_epsilon {
        return Err(refuse(format!(
            "round {round} would take this site (training rows {rows}) to epsilon {epsilon:.4}, above the plan's target {}",
            dp.target_epsilon
        )));
    }
    Ok(RoundPrivacy::Record {
        sgd: DpSgd {
            max_grad_norm: dp.clip(),
            noise_multiplier: budget.noise_multiplier,
        },
        spend: pb::DpSpend {
            noise_multiplier: budget.noise_multiplier,
            sample_rate: budget.q,
            steps: budget.steps_per_round,
            epsilon,
        },
    })
}

/// After local training: at client level the delta is clipped; at record level
/// the spend to report is logged and returned.
pub fn finish_update(
    privacy: RoundPrivacy,
    delta: &mut [f32],
    plan: &TrainingPlan,
    tid: &str,
    round: u32,
) -> Option<pb::DpSpend> {
    match privacy {
        RoundPrivacy::Record { spend, .. } => {
            tracing::info!(
                training = tid,
                round,
                noise_multiplier = spend.noise_multiplier,
                "DP-SGD: epsilon spent so far {:.4} (delta {:e})",
                spend.epsilon,
                plan.privacy
                    .as_ref()
                    .and_then(|p| p.dp.as_ref())
                    .map_or(0.0, |d| d.delta)
            );
            Some(spend)
        }
        RoundPrivacy::Client { clip_norm } => {
            let norm = clip_update(delta, clip_norm);
            tracing::info!(
                training = tid,
                round,
                "update clipped to L2 norm {clip_norm} (was {norm:.4})"
            );
            None
        }
        RoundPrivacy::None => None,
    }
}

/// The delta in the plan's encoding. Under client-level DP the *decoded*
/// values (what the coordinator sums and checks against the clip) must stay
/// within `clip_norm`, and fp16/int8 rounding can move a clipped delta past
/// it: the delta is then scaled down by the excess and encoded again. Both
/// encodings scale with their input (int8 keeps one scale per chunk), so one
/// or two passes settle it.
pub fn encode_within_clip(
    plan: &TrainingPlan,
    delta: &mut [f32],
    chunk_bytes: usize,
) -> Result<Vec<Vec<u8>>> {
    let encoding = plan.training.update_encoding;
    let mut chunks = encoding::encode_chunks(delta, encoding, chunk_bytes)?;
    let Some(dp) = plan.client_dp() else {
        return Ok(chunks);
    };
    let clip = dp.clip();
    for _ in 0..MAX_CLIP_PASSES {
        let mut sq = 0.0f64;
        for c in &chunks {
            sq += encoding::decode_chunk(c, encoding)?
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>();
        }
        let norm = sq.sqrt();
        if norm <= clip {
            return Ok(chunks);
        }
        let factor = (clip / norm * (1.0 - 1e-6)) as f32;
        delta.iter_mut().for_each(|v| *v *= factor);
        chunks = encoding::encode_chunks(delta, encoding, chunk_bytes)?;
    }
    Err(refuse(format!(
        "the update encoded as {encoding:?} stays above privacy.dp.clip_norm = {clip} after {MAX_CLIP_PASSES} passes; use update_encoding = \"float32\""
    )))
}

/// Bound on the re-encoding passes of [`encode_within_clip`]: rounding moves
/// a norm by a relative 2^-8 at most (int8), so more passes mean a bug.
const MAX_CLIP_PASSES: usize = 8;

/// Secure rounds under client-level DP: this site's share of the round's noise,
/// fresh for the attempt (see `sangsaeng_common::privacy::dp::client_noise`).
pub fn noise_share(plan: &TrainingPlan, dim: usize) -> Result<Option<NoiseShare>> {
    let Some(dp) = plan.client_dp().filter(|_| plan.secure_aggregation()) else {
        return Ok(None);
    };
    let budget = plan_budget(plan, None)?;
    let sampler = client_noise::share(
        budget.noise_multiplier,
        dp.clip(),
        dim,
        plan.training.min_participants,
    )?;
    Ok(Some(NoiseShare::fresh(sampler)?))
}

/// Scales `delta` down to L2 norm `clip` if it is longer (client-level DP: the
/// sensitivity of the sum to one firm is then at most `clip`).
pub fn clip_update(delta: &mut [f32], clip: f64) -> f64 {
    let norm = delta
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt();
    if norm > clip {
        let factor = (clip / norm) as f32;
        for v in delta.iter_mut() {
            *v *= factor;
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use sangsaeng_common::config::privacy::PrivacyConfig;

    fn plan(dp: Option<DpConfig>) -> TrainingPlan {
        let mut plan = TrainingPlan::from_toml(
            "[schema]\nfeature_columns = [\"a\"]\nlabel_column = \"y\"\nclasses = [\"0\", \"1\"]\n\
             [model]\nhidden_layers = []\n\
             [training]\nrounds = 4\nlearning_rate = 0.1\nmin_participants = 1\nbatch_size = 50\n",
            "test",
        )
        .unwrap();
        plan.privacy = dp.map(|dp| PrivacyConfig {
            dp: Some(dp),
            ..Default::default()
        });
        plan
    }

    fn record(sigma: Option<f64>) -> DpConfig {
        DpConfig {
            level: DpLevel::Record,
            target_epsilon: 4.0,
            delta: 1e-5,
            noise_multiplier: sigma,
            max_grad_norm: Some(1.0),
            clip_norm: None,
        }
    }

    #[test]
    fn the_site_declines_plans_beyond_its_own_limits() {
        let strict = SitePrivacy {
            max_epsilon: Some(2.0),
            require_differential_privacy: true,
            require_secure_aggregation: false,
        };
        let e = accept_plan(&strict, &plan(Some(record(None)))).unwrap_err();
        assert!(e.to_string().contains("privacy.max_epsilon = 2"), "{e}");
        let e = accept_plan(&strict, &plan(None)).unwrap_err();
        assert!(
            e.to_string().contains("requires differential privacy"),
            "{e}"
        );
        accept_plan(&SitePrivacy::default(), &plan(None)).unwrap();
        accept_plan(
            &SitePrivacy {
                max_epsilon: Some(4.0),
                ..Default::default()
            },
            &plan(Some(record(None))),
        )
        .unwrap();
    }

    #[test]
    fn the_report_grows_round_by_round_and_stays_within_the_target() {
        let p = plan(Some(record(None)));
        let site = SitePrivacy::default();
        let mut last = 0.0;
        for round in 1..=4 {
            let RoundPrivacy::Record { sgd, spend } = for_round(&site, &p, 5_000, round).unwrap()
            else {
                panic!("record level")
            };
            assert_eq!(spend.steps, 100, "1 epoch x 5000/50");
            assert_eq!(spend.sample_rate, 0.01);
            assert_eq!(sgd.noise_multiplier, spend.noise_multiplier);
            assert!(spend.epsilon > last && spend.epsilon <= 4.0);
            last = spend.epsilon;
        }
        assert!(
            last > 3.99,
            "the derived noise spends the whole target: {last}"
        );
    }

    #[test]
    fn a_round_past_the_budget_is_not_trained() {
        // σ = 0.7 spends the target of 4 before round 4.
        let p = plan(Some(record(Some(0.7))));
        let e = for_round(&SitePrivacy::default(), &p, 5_000, 4).unwrap_err();
        assert!(e.to_string().contains("above the plan's target 4"), "{e}");
    }

    /// int8 keeps one scale per chunk and rounds each value to it, which can
    /// take a clipped delta past the clip; what is sent must decode within it.
    #[test]
    fn the_encoded_update_decodes_within_the_clip() {
        use sangsaeng_common::config::plan::UpdateEncoding;
        let mut p = plan(Some(DpConfig {
            level: DpLevel::Client,
            target_epsilon: 4.0,
            delta: 1e-5,
            noise_multiplier: Some(1.0),
            max_grad_norm: None,
            clip_norm: Some(1.0),
        }));
        let decoded_norm = |chunks: &[Vec<u8>], enc| {
            chunks
                .iter()
                .flat_map(|c| encoding::decode_chunk(c, enc).unwrap())
                .map(|v| f64::from(v).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        for enc in [
            UpdateEncoding::Int8,
            UpdateEncoding::Float16,
            UpdateEncoding::Float32,
        ] {
            p.training.update_encoding = enc;
            // Values just below each int8 rounding step: rounding goes up.
            let mut delta: Vec<f32> = (0..10_000).map(|i| 0.5 + (i % 127) as f32 * 1e-3).collect();
            clip_update(&mut delta, 1.0);
            let plain = encoding::encode_chunks(&delta, enc, 4096).unwrap();
            if enc == UpdateEncoding::Int8 {
                assert!(
                    decoded_norm(&plain, enc) > 1.0,
                    "int8 rounding alone passes the clip"
                );
            }
            let chunks = encode_within_clip(&p, &mut delta, 4096).unwrap();
            let norm = decoded_norm(&chunks, enc);
            assert!(norm <= 1.0 && norm > 0.99, "{enc:?}: {norm}");
        }
    }

    #[test]
    fn clipping_bounds_the_update_norm_and_leaves_short_ones_alone() {
        let mut long = vec![3.0f32, 4.0];
        assert_eq!(clip_update(&mut long, 1.0), 5.0);
        assert!((long[0] - 0.6).abs() < 1e-6 && (long[1] - 0.8).abs() < 1e-6);
        let mut short = vec![0.3f32, 0.4];
        clip_update(&mut short, 1.0);
        assert_eq!(short, vec![0.3, 0.4]);
    }
}
