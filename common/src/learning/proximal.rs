//! FedProx's proximal term (Li et al. 2020, "Federated Optimization in
//! Heterogeneous Networks"): each site minimises `f(w) + μ/2 · ‖w − w_g‖²`,
//! where `w_g` is the round's global model, so that label-skewed sites cannot
//! drift as far from each other within one round.
//!
//! The term's gradient `μ (w − w_g)` is added to each step's gradient after
//! backward (or after DP-SGD's clipping and noise) rather than to the loss:
//! it depends only on the parameters and on the global model the coordinator
//! sent to every site, not on any row, so it is post-processing for DP-SGD and
//! leaves the per-example clipping and the privacy account unchanged. It is
//! also cheaper: one fused add per parameter tensor instead of a second
//! backward graph over all parameters.

use burn::optim::GradientsParams;
use burn::prelude::*;

use crate::Result;
use crate::learning::mlp::Mlp;
use crate::learning::model::ModelSpec;

/// The proximal pull towards the round's global model.
pub(crate) struct Proximal {
    mu: f64,
    /// The global model's parameters, without autodiff.
    anchor: Mlp,
}

impl Proximal {
    /// The term for `mu > 0` around `global` (flat, in layout order); `None`
    /// for `mu == 0`, plain FedAvg's local objective.
    pub(crate) fn new(
        mu: f64,
        spec: &ModelSpec,
        global: &[f32],
        device: &Device,
    ) -> Result<Option<Self>> {
        if mu == 0.0 {
            return Ok(None);
        }
        let anchor = Mlp::from_flat(spec, global, &device.clone().inner())?;
        Ok(Some(Proximal { mu, anchor }))
    }

    /// Adds `μ (w − w_g)` to the gradient of each of `model`'s parameters.
    pub(crate) fn add_gradient(&self, model: &Mlp, grads: &mut GradientsParams) {
        for (layer, anchor) in model.layers.iter().zip(&self.anchor.layers) {
            let pull = (layer.weight.val().inner() - anchor.weight.val()).mul_scalar(self.mu);
            let id = layer.weight.id;
            let g = match grads.remove::<2>(id) {
                Some(g) => g.inner() + pull,
                None => pull,
            };
            grads.register(id, g);
            if let (Some(b), Some(b0)) = (&layer.bias, &anchor.bias) {
                let pull = (b.val().inner() - b0.val()).mul_scalar(self.mu);
                let g = match grads.remove::<1>(b.id) {
                    Some(g) => g.inner() + pull,
                    None => pull,
                };
                grads.register(b.id, g);
            }
        }
    }
}
