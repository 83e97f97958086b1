//! Server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization",
//! Algorithm 2): the round's aggregate delta Δ (the exact FedAvg mean, or a
//! robust rule's aggregate) is a pseudo-gradient, and the server takes a step
//! with it instead of adding it as it is.
//!
//! - fedavg: x += η Δ (η = 1: plain FedAvg, bit for bit as the accumulator
//!   applies it);
//! - fedavgm: m = β m + Δ; x += η m;
//! - fedadagrad: m = β1 m + (1 − β1) Δ; v = v + Δ²; x += η m / (√v + τ);
//! - fedadam: as fedadagrad with v = β2 v + (1 − β2) Δ²;
//! - fedyogi: v = v − (1 − β2) Δ² sign(v − Δ²);
//! - scaffold: x += η Δ, as fedavg; its state is the server control variate
//!   c (Karimireddy et al. 2020), the example-weighted mean of the sites'
//!   control variates, which [`ServerOptimizer::control_window`] moves by the
//!   round's mean control-variate change.
//!
//! Every step is computed in f64 from the same inputs in the same order, and
//! the state is kept in f32 (what is persisted is exactly what is used), so a
//! coordinator resumed after a crash from its saved state takes bit-identical
//! steps. The moments start at m = 0 and v = τ² (the paper's v₋₁ ≥ τ²).

use crate::config::aggregation::{ServerSettings, Strategy};
use crate::{Error, Result};

/// One training's server optimiser and its state.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerOptimizer {
    settings: ServerSettings,
    /// First moment (fedavgm's momentum buffer; scaffold's control variate);
    /// empty for fedavg.
    m: Vec<f32>,
    /// Second moment; empty for fedavg and fedavgm.
    v: Vec<f32>,
}

impl ServerOptimizer {
    /// A fresh optimiser for a model of `num_params` values.
    pub fn new(settings: ServerSettings, num_params: usize) -> Self {
        let (m, v) = match settings.strategy {
            Strategy::FedAvg => (0, 0),
            Strategy::FedAvgM | Strategy::Scaffold => (num_params, 0),
            _ => (num_params, num_params),
        };
        let v0 = (settings.tau * settings.tau) as f32;
        ServerOptimizer {
            settings,
            m: vec![0.0; m],
            v: vec![v0; v],
        }
    }

    /// An optimiser restored from saved moments (which must fit the strategy).
    pub fn restore(settings: ServerSettings, m: Vec<f32>, v: Vec<f32>) -> Result<Self> {
        let fresh = ServerOptimizer::new(settings, m.len().max(v.len()));
        if fresh.m.len() != m.len() || fresh.v.len() != v.len() {
            return Err(Error::Aggregation(format!(
                "the saved {} state has moments of {} and {} values, which do not fit the strategy",
                settings.strategy.name(),
                m.len(),
                v.len()
            )));
        }
        Ok(ServerOptimizer { settings, m, v })
    }

    /// Whether there is state to keep between rounds.
    pub fn has_state(&self) -> bool {
        !self.m.is_empty()
    }

    pub fn moments(&self) -> (&[f32], &[f32]) {
        (&self.m, &self.v)
    }

    pub fn settings(&self) -> &ServerSettings {
        &self.settings
    }

    /// SCAFFOLD's server control variate c (empty for other strategies): what
    /// every site's local steps are corrected with in the next round.
    pub fn control(&self) -> &[f32] {
        match self.settings.strategy {
            Strategy::Scaffold => &self.m,
            _ => &[],
        }
    }

    /// SCAFFOLD: c += share × Δc for values `offset..offset + changes.len()`,
    /// where `changes` is the round's example-weighted mean control-variate
    /// change and `share` the weight of the round's sites in the whole
    /// federation's (c stays the weighted mean of every site's c_i when some
    /// sites miss a round; Karimireddy et al.'s |S|/N, by weight).
    pub fn control_window(&mut self, offset: usize, changes: &[f64], share: f64) -> Result<()> {
        let end = offset + changes.len();
        if self.settings.strategy != Strategy::Scaffold || end > self.m.len() {
            return Err(Error::Aggregation(format!(
                "a control-variate step over values {offset}..{end} does not fit a {} state of {} values",
                self.settings.strategy.name(),
                self.m.len()
            )));
        }
        for (c, d) in self.m[offset..end].iter_mut().zip(changes) {
            *c = (*c as f64 + share * d) as f32;
        }
        Ok(())
    }

    /// Applies the step for parameters `offset..offset + deltas.len()`.
    pub fn step_window(&mut self, offset: usize, deltas: &[f64], global: &mut [f32]) -> Result<()> {
        let end = offset + deltas.len();
        if global.len() != deltas.len() || (self.has_state() && end > self.m.len()) {
            return Err(Error::Aggregation(format!(
                "a server step over values {offset}..{end} does not fit the model"
            )));
        }
        let s = self.settings;
        let eta = s.learning_rate;
        match s.strategy {
            Strategy::FedAvg | Strategy::Scaffold => {
                for (g, d) in global.iter_mut().zip(deltas) {
                    *g = (*g as f64 + eta * d) as f32;
                }
            }
            Strategy::FedAvgM => {
                for ((g, d), m) in global.iter_mut().zip(deltas).zip(&mut self.m[offset..end]) {
                    let mm = s.momentum * *m as f64 + d;
                    *m = mm as f32;
                    *g = (*g as f64 + eta * *m as f64) as f32;
                }
            }
            adaptive => {
                let m = &mut self.m[offset..end];
                let v = &mut self.v[offset..end];
                for (((g, d), m), v) in global.iter_mut().zip(deltas).zip(m).zip(v) {
                    let mm = s.beta1 * *m as f64 + (1.0 - s.beta1) * d;
                    let d2 = d * d;
                    let old = *v as f64;
                    let vv = match adaptive {
                        Strategy::FedAdagrad => old + d2,
                        Strategy::FedAdam => s.beta2 * old + (1.0 - s.beta2) * d2,
                        _ => old - (1.0 - s.beta2) * d2 * (old - d2).signum(),
                    };
                    *m = mm as f32;
                    *v = vv as f32;
                    let step = eta * *m as f64 / ((*v as f64).max(0.0).sqrt() + s.tau);
                    *g = (*g as f64 + step) as f32;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::aggregation::AggregationConfig;

    fn settings(strategy: Strategy) -> ServerSettings {
        AggregationConfig {
            strategy,
            ..Default::default()
        }
        .server()
    }

    #[test]
    fn scaffold_steps_as_fedavg_and_moves_its_control_variate_by_the_weighted_share() {
        let mut opt = ServerOptimizer::new(settings(Strategy::Scaffold), 2);
        let mut g = vec![1.0f32, 2.0];
        opt.step_window(0, &[0.5, -0.25], &mut g).unwrap();
        assert_eq!(g, vec![1.5, 1.75]);
        assert_eq!(opt.control(), &[0.0, 0.0]);
        opt.control_window(0, &[0.2, -0.4], 0.5).unwrap();
        assert_eq!(opt.control(), &[0.1, -0.2]);
        opt.control_window(1, &[1.0], 1.0).unwrap();
        assert_eq!(opt.control(), &[0.1, (-0.2f32 as f64 + 1.0) as f32]);
        assert!(opt.control_window(1, &[1.0, 1.0], 1.0).is_err());
        let restored =
            ServerOptimizer::restore(settings(Strategy::Scaffold), opt.control().to_vec(), vec![])
                .unwrap();
        assert_eq!(restored, opt);
        let mut fedavg = ServerOptimizer::new(settings(Strategy::FedAvg), 2);
        assert!(fedavg.control().is_empty());
        assert!(fedavg.control_window(0, &[1.0], 1.0).is_err());
    }

    #[test]
    fn fedavg_at_rate_one_is_the_plain_step() {
        let mut opt = ServerOptimizer::new(settings(Strategy::FedAvg), 3);
        let mut g = vec![1.0f32, -2.0, 0.5];
        opt.step_window(0, &[0.25, 1e-9, -0.5], &mut g).unwrap();
        assert_eq!(g, vec![1.25, (-2.0f64 + 1e-9) as f32, 0.0]);
        assert!(!opt.has_state());
    }

    #[test]
    fn fedavgm_accumulates_momentum() {
        let mut opt = ServerOptimizer::new(settings(Strategy::FedAvgM), 1);
        let mut g = vec![0.0f32];
        opt.step_window(0, &[1.0], &mut g).unwrap();
        opt.step_window(0, &[1.0], &mut g).unwrap();
        // m: 1, then 0.9 + 1 = 1.9; x: 1 + 1.9.
        assert!((g[0] - 2.9).abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn adaptive_steps_are_bounded_by_the_learning_rate() {
        for s in [Strategy::FedAdam, Strategy::FedYogi, Strategy::FedAdagrad] {
            let mut opt = ServerOptimizer::new(settings(s), 2);
            let mut g = vec![0.0f32; 2];
            opt.step_window(0, &[1e-3, -50.0], &mut g).unwrap();
            // Adam-like steps are about η (1 − β1) / √(1 − β2)-scaled signs,
            // never the raw delta.
            assert!(g[0] > 0.0 && g[1] < 0.0, "{s:?}: {g:?}");
            assert!(g[1].abs() < 1.0, "{s:?}: {g:?}");
        }
    }

    #[test]
    fn a_restored_optimiser_takes_the_same_steps() {
        let mut a = ServerOptimizer::new(settings(Strategy::FedYogi), 4);
        let mut ga = vec![0.1f32, 0.2, 0.3, 0.4];
        a.step_window(0, &[0.1, -0.2, 0.3, -0.4], &mut ga).unwrap();
        let (m, v) = a.moments();
        let mut b = ServerOptimizer::restore(*a.settings(), m.to_vec(), v.to_vec()).unwrap();
        let mut gb = ga.clone();
        a.step_window(0, &[0.5, 0.5, -0.5, 0.0], &mut ga).unwrap();
        b.step_window(0, &[0.5, 0.5, -0.5, 0.0], &mut gb).unwrap();
        assert_eq!(ga, gb);
        assert_eq!(a, b);
        assert!(
            ServerOptimizer::restore(settings(Strategy::FedAdam), vec![0.0; 4], vec![]).is_err()
        );
    }
}
