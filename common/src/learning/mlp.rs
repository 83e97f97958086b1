//! The burn module of a [`ModelSpec`]: loads the flat parameter vector into
//! `Linear` layers to train or evaluate, and reads it back.
//!
//! Only participants (and the example and benches) need this; it is compiled
//! with the `train` feature so the coordinator and the fuzz targets build
//! without burn.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::activation;
use rand::RngCore;
use rand::distr::{Bernoulli, Distribution};

use crate::config::plan::Activation;
use crate::learning::model::{ModelSpec, check_params};
use crate::{Error, Result};

/// The burn module of a [`ModelSpec`].
///
/// burn 0.22 tensors carry their backend in their device, so the module has no
/// backend type parameter: the device given to [`Mlp::from_flat`] (see
/// [`crate::learning::backend`]) decides where it runs and whether gradients are recorded.
#[derive(Module, Debug)]
pub struct Mlp {
    /// Hidden layers, then the output layer.
    pub layers: Vec<Linear>,
    #[module(skip)]
    pub activation: Activation,
    #[module(skip)]
    pub dropout: f64,
}

impl Mlp {
    /// Builds the model from a flat vector in [`ModelSpec::layout`] order.
    ///
    /// Fails with [`Error::Model`] on a wrong length or a non-finite value, so a
    /// corrupt or hostile update never reaches training.
    pub fn from_flat(spec: &ModelSpec, params: &[f32], device: &Device) -> Result<Mlp> {
        spec.validate()?;
        check_params(spec, params)?;
        let mut rest = params;
        let mut take = |n: usize| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head.to_vec()
        };
        let layers = spec
            .layer_dims()
            .into_iter()
            .map(|(fan_in, fan_out)| {
                let weight = take(fan_in * fan_out);
                let bias = take(fan_out);
                Linear {
                    weight: Param::from_data(TensorData::new(weight, [fan_in, fan_out]), device),
                    bias: Some(Param::from_data(TensorData::new(bias, [fan_out]), device)),
                }
            })
            .collect();
        Ok(Mlp {
            layers,
            activation: spec.activation,
            dropout: spec.dropout,
        })
    }

    /// A freshly initialised model, as [`ModelSpec::init_params`] makes it.
    pub fn init(spec: &ModelSpec, seed: u64, device: &Device) -> Result<Mlp> {
        Mlp::from_flat(spec, &spec.init_params(seed), device)
    }

    /// The parameters as one flat vector in [`ModelSpec::layout`] order;
    /// `from_flat` then `to_flat` reproduces the input bit for bit.
    pub fn to_flat(&self) -> Vec<f32> {
        let mut flat = Vec::new();
        for layer in &self.layers {
            flat.extend(read_f32(layer.weight.val()));
            if let Some(bias) = &layer.bias {
                flat.extend(read_f32(bias.val()));
            }
        }
        flat
    }

    /// Logits `[batch, n_classes]` for inputs `[batch, n_features]`, without dropout.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.run(x, None)
    }

    /// Logits with inverted dropout after each hidden activation, masks drawn from `rng`.
    ///
    /// The masks come from a caller-seeded host RNG rather than burn's
    /// `Dropout`: the ndarray and flex backends keep one process-wide RNG, so
    /// two trainings running at once (parallel tests, a daemon with two jobs)
    /// would interleave draws and lose reproducibility.
    pub fn forward_train<R: RngCore>(&self, x: Tensor<2>, rng: &mut R) -> Tensor<2> {
        self.run(x, Some(rng as &mut dyn RngCore))
    }

    fn run(&self, mut x: Tensor<2>, mut rng: Option<&mut dyn RngCore>) -> Tensor<2> {
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i == last {
                break;
            }
            x = activate(self.activation, x);
            if let Some(rng) = rng.as_deref_mut()
                && self.dropout > 0.0
            {
                let [rows, cols] = x.dims();
                let device = x.device();
                x = x * dropout_mask(rows, cols, self.dropout, rng, &device);
            }
        }
        x
    }
}

/// The hidden-layer activation, shared with the hand-written DP-SGD pass
/// ([`crate::learning::dp_sgd`]) so both compute the same forward.
pub(crate) fn activate(activation: Activation, x: Tensor<2>) -> Tensor<2> {
    match activation {
        Activation::Relu => activation::relu(x),
        Activation::Tanh => activation::tanh(x),
        Activation::Gelu => activation::gelu(x),
    }
}

/// An inverted-dropout mask `[rows, cols]`: `1/(1-p)` where a unit is kept, `0`
/// where it is dropped, drawn row-major from `rng`. DP-SGD keeps the mask for
/// its backward pass; the draws are the same as the training forward's.
pub(crate) fn dropout_mask(
    rows: usize,
    cols: usize,
    p: f64,
    rng: &mut dyn RngCore,
    device: &Device,
) -> Tensor<2> {
    let keep = 1.0 - p;
    let scale = (1.0 / keep) as f32;
    let bernoulli = Bernoulli::new(keep).expect("dropout validated to lie in [0, 1)");
    let mask: Vec<f32> = (0..rows * cols)
        .map(|_| if bernoulli.sample(rng) { scale } else { 0.0 })
        .collect();
    Tensor::<2>::from_data(TensorData::new(mask, [rows, cols]), device)
}

/// Reads a tensor back as row-major `f32`s.
///
/// Only a failing backend read can panic here; on the CPU backends that is a bug, and
/// `to_flat` stays infallible for the coordinator's and tests' sake.
fn read_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    read_vec::<f32, D, Float>(t).unwrap_or_else(|e| panic!("{e}"))
}

/// Reads a tensor back as a row-major vector of `E`, converting the dtype if needed.
pub(crate) fn read_vec<E, const D: usize, K>(t: Tensor<D, K>) -> Result<Vec<E>>
where
    E: burn::tensor::Element,
    K: burn::tensor::kind::Basic,
{
    t.try_into_data()
        .map_err(|e| Error::Model(format!("reading a tensor from the backend failed: {e}")))?
        .try_into_vec_as::<E>()
        .map_err(|e| Error::Model(format!("reading a tensor from the backend failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::plan::Activation;
    use crate::learning::backend::BackendKind;

    fn spec() -> ModelSpec {
        ModelSpec {
            n_features: 5,
            hidden: vec![4, 3],
            n_classes: 2,
            task: crate::config::plan::Task::Classification,
            activation: Activation::Relu,
            dropout: 0.0,
        }
    }

    #[test]
    fn flatten_restore_flatten_is_bit_exact() {
        let s = spec();
        let device = BackendKind::NdArray.device().unwrap();
        // Awkward values (subnormal, negative zero, extremes) must survive untouched.
        let mut params = s.init_params(3);
        params[0] = f32::MIN_POSITIVE / 2.0;
        params[1] = -0.0;
        params[2] = f32::MAX;
        params[3] = 1.0e-30;
        let mlp = Mlp::from_flat(&s, &params, &device).unwrap();
        let flat = mlp.to_flat();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&flat), bits(&params));
        let again = Mlp::from_flat(&s, &flat, &device.autodiff())
            .unwrap()
            .to_flat();
        assert_eq!(bits(&again), bits(&params));
    }

    #[test]
    fn forward_gives_logits_per_class() {
        let s = spec();
        let device = BackendKind::NdArray.device().unwrap();
        let mlp = Mlp::init(&s, 1, &device).unwrap();
        let x = Tensor::<2>::zeros([3, 5], &device);
        assert_eq!(mlp.forward(x).dims(), [3, 2]);
    }

    #[test]
    fn wrong_length_or_non_finite_parameters_are_refused() {
        let s = spec();
        let device = BackendKind::NdArray.device().unwrap();
        let mut params = s.init_params(0);
        params.pop();
        let err = Mlp::from_flat(&s, &params, &device)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected 47 parameters"), "{err}");
        let mut params = s.init_params(0);
        params[10] = f32::NAN;
        let err = Mlp::from_flat(&s, &params, &device)
            .unwrap_err()
            .to_string();
        assert!(err.contains("parameter 10 is not finite"), "{err}");
    }
}
