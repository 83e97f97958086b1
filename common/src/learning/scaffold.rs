//! SCAFFOLD's client side (Karimireddy et al. 2020, "SCAFFOLD: Stochastic
//! Controlled Averaging for Federated Learning"): each local step's gradient
//! is corrected by c − c_i, the server's control variate minus the site's,
//! so a label-skewed site steps along the federation's gradient rather than
//! its own; after the round the site's control variate becomes its rows'
//! mean gradient at the round's global model (the paper's option I).
//!
//! Option I costs one extra pass of forward and backward over the site's rows
//! (no update), but its control variate is a gradient whatever the local
//! optimiser: option II's (x − y_i)/(K η) assumes plain SGD steps of size η,
//! and the example trains with Adam.

use burn::optim::GradientsParams;
use burn::prelude::*;

use crate::learning::backend::BackendKind;
use crate::learning::data::Dataset;
use crate::learning::mlp::{Mlp, read_vec};
use crate::learning::model::{ModelSpec, check_params};
use crate::learning::objective::{Objective, Targets};
use crate::{Error, Result};

/// Rows per forward and backward pass of the mean gradient.
const GRADIENT_BATCH: usize = 1024;

/// The correction c − c_i added to each local step's gradient.
pub(crate) struct Correction {
    /// c − c_i as a model of the same shape, without autodiff.
    offset: Mlp,
}

impl Correction {
    /// The correction for flat `c_minus_ci` (layout order).
    pub(crate) fn new(spec: &ModelSpec, c_minus_ci: &[f32], device: &Device) -> Result<Self> {
        let offset = Mlp::from_flat(spec, c_minus_ci, &device.clone().inner())?;
        Ok(Correction { offset })
    }

    /// Adds c − c_i to the gradient of each of `model`'s parameters.
    pub(crate) fn add_gradient(&self, model: &Mlp, grads: &mut GradientsParams) {
        for (layer, offset) in model.layers.iter().zip(&self.offset.layers) {
            let id = layer.weight.id;
            let g = match grads.remove::<2>(id) {
                Some(g) => g.inner() + offset.weight.val(),
                None => offset.weight.val(),
            };
            grads.register(id, g);
            if let (Some(b), Some(b0)) = (&layer.bias, &offset.bias) {
                let g = match grads.remove::<1>(b.id) {
                    Some(g) => g.inner() + b0.val(),
                    None => b0.val(),
                };
                grads.register(b.id, g);
            }
        }
    }
}

/// The gradient of the mean cross-entropy over every row of `data` at
/// `params`, flat in layout order (no dropout: the gradient of the model the
/// site was sent). Batches are weighted by their rows, summed in f64.
pub fn mean_gradient(
    kind: BackendKind,
    spec: &ModelSpec,
    params: &[f32],
    data: &Dataset,
    objective: Objective,
) -> Result<Vec<f32>> {
    check_params(spec, params)?;
    if data.is_empty() || data.n_features != spec.n_features {
        return Err(Error::Model(format!(
            "a mean gradient needs rows of {} features; the dataset has {} rows of {}",
            spec.n_features,
            data.len(),
            data.n_features
        )));
    }
    let device = kind.autodiff_device()?;
    let model = Mlp::from_flat(spec, params, &device)?;
    let targets = Targets::of(data);
    objective.check(targets, spec.n_classes)?;
    let nf = data.n_features;
    let mut sum = vec![0f64; params.len()];
    for start in (0..data.len()).step_by(GRADIENT_BATCH) {
        let end = (start + GRADIENT_BATCH).min(data.len());
        let rows = end - start;
        let x = Tensor::<2>::from_data(
            TensorData::new(data.features[start * nf..end * nf].to_vec(), [rows, nf]),
            &device,
        );
        let l = objective.mean_loss(model.forward(x), targets.slice(start, end), &device);
        let grads = GradientsParams::from_grads(l.backward(), &model);
        let flat = flat_gradient(&model, &grads)?;
        let w = rows as f64 / data.len() as f64;
        for (s, g) in sum.iter_mut().zip(flat) {
            *s += w * g as f64;
        }
    }
    Ok(sum.into_iter().map(|v| v as f32).collect())
}

/// Each parameter's gradient, flat in layout order (zeros where burn has none).
fn flat_gradient(model: &Mlp, grads: &GradientsParams) -> Result<Vec<f32>> {
    let mut flat = Vec::new();
    for layer in &model.layers {
        let [i, o] = layer.weight.val().dims();
        match grads.get::<2>(layer.weight.id) {
            Some(g) => flat.extend(read_vec::<f32, 2, Float>(g)?),
            None => flat.extend(std::iter::repeat_n(0.0, i * o)),
        }
        if let Some(b) = &layer.bias {
            match grads.get::<1>(b.id) {
                Some(g) => flat.extend(read_vec::<f32, 1, Float>(g)?),
                None => flat.extend(std::iter::repeat_n(0.0, o)),
            }
        }
    }
    Ok(flat)
}
