//! The model every site trains: a multi-layer perceptron classifier, its
//! canonical parameter layout, and conversion to and from one flat `f32` vector.
//!
//! The flat vector is what travels: the coordinator initialises it
//! ([`ModelSpec::init_params`]), averages it and stores it, and participants
//! load it into a burn [`Mlp`] only to train or evaluate. Keeping the layout
//! defined here, by name and shape, lets the coordinator work without burn
//! models at all and lets the weights file name its tensors.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::activation;
use rand::distr::{Bernoulli, Distribution, Uniform};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::plan::{Activation, TrainingPlan};
use crate::{Error, Result};

/// Shape of the MLP: input width, hidden widths, classes and regularisation.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub n_features: usize,
    /// Hidden layer widths, input to output; empty makes a linear (softmax regression) model.
    pub hidden: Vec<usize>,
    pub n_classes: usize,
    pub activation: Activation,
    /// Dropout probability after each hidden activation, in `[0, 1)`; only applied in training.
    pub dropout: f64,
}

/// Name and shape of one tensor of the flat parameter vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of values the tensor holds.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl ModelSpec {
    /// The model the plan describes.
    pub fn from_plan(plan: &TrainingPlan) -> ModelSpec {
        ModelSpec {
            n_features: plan.n_features(),
            hidden: plan.model.hidden_layers.clone(),
            n_classes: plan.n_classes(),
            activation: plan.model.activation,
            dropout: plan.model.dropout,
        }
    }

    /// Refuses shapes no layer can be built from; a validated plan always passes.
    pub fn validate(&self) -> Result<()> {
        if self.n_features == 0 {
            return Err(Error::Model(
                "the model needs at least one input feature".into(),
            ));
        }
        if self.n_classes < 2 {
            return Err(Error::Model(format!(
                "the model needs at least two classes, got {}",
                self.n_classes
            )));
        }
        if let Some(i) = self.hidden.iter().position(|&w| w == 0) {
            return Err(Error::Model(format!("hidden layer {i} has width 0")));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Model(format!(
                "dropout {} is outside [0, 1)",
                self.dropout
            )));
        }
        Ok(())
    }

    /// `(fan_in, fan_out)` of each linear layer, hidden layers first, output last.
    fn layer_dims(&self) -> Vec<(usize, usize)> {
        let widths: Vec<usize> = std::iter::once(self.n_features)
            .chain(self.hidden.iter().copied())
            .chain(std::iter::once(self.n_classes))
            .collect();
        widths.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// The canonical order of the flat parameter vector: for each linear layer `i`
    /// (hidden layers, then the output layer) `layers.{i}.weight` of shape
    /// `[in, out]`, row-major, then `layers.{i}.bias` of shape `[out]`.
    ///
    /// `[in, out]` is burn's own `Linear` storage, so loading needs no transpose.
    pub fn layout(&self) -> Vec<TensorSpec> {
        self.layer_dims()
            .into_iter()
            .enumerate()
            .flat_map(|(i, (fan_in, fan_out))| {
                [
                    TensorSpec {
                        name: format!("layers.{i}.weight"),
                        shape: vec![fan_in, fan_out],
                    },
                    TensorSpec {
                        name: format!("layers.{i}.bias"),
                        shape: vec![fan_out],
                    },
                ]
            })
            .collect()
    }

    /// Length of the flat parameter vector.
    pub fn num_params(&self) -> usize {
        self.layer_dims()
            .iter()
            .map(|&(fan_in, fan_out)| fan_in * fan_out + fan_out)
            .sum()
    }

    /// Initial parameters, a pure function of the spec and `seed`.
    ///
    /// Weights and biases are drawn from `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`,
    /// the distribution of burn's `Linear` default (Kaiming-uniform with gain
    /// `1/sqrt(3)`). It is computed here in plain Rust with ChaCha8 rather than
    /// with burn's RNG so the coordinator, which has no burn model, produces the
    /// same vector on every platform and backend.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = Vec::with_capacity(self.num_params());
        for (fan_in, fan_out) in self.layer_dims() {
            // `max(1)` only matters for an invalid spec; it keeps this function total.
            let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
            let dist = Uniform::new(-bound, bound).expect("a positive finite bound");
            params.extend((0..fan_in * fan_out + fan_out).map(|_| dist.sample(&mut rng)));
        }
        params
    }
}

/// The burn module of a [`ModelSpec`].
///
/// burn 0.22 tensors carry their backend in their device, so the module has no
/// backend type parameter: the device given to [`Mlp::from_flat`] (see
/// [`crate::backend`]) decides where it runs and whether gradients are recorded.
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
            x = match self.activation {
                Activation::Relu => activation::relu(x),
                Activation::Tanh => activation::tanh(x),
                Activation::Gelu => activation::gelu(x),
            };
            if let Some(rng) = rng.as_deref_mut()
                && self.dropout > 0.0
            {
                x = apply_dropout(x, self.dropout, rng);
            }
        }
        x
    }
}

fn apply_dropout(x: Tensor<2>, p: f64, rng: &mut dyn RngCore) -> Tensor<2> {
    let keep = 1.0 - p;
    let scale = (1.0 / keep) as f32;
    let bernoulli = Bernoulli::new(keep).expect("dropout validated to lie in [0, 1)");
    let [rows, cols] = x.dims();
    let mask: Vec<f32> = (0..rows * cols)
        .map(|_| if bernoulli.sample(rng) { scale } else { 0.0 })
        .collect();
    let mask = Tensor::<2>::from_data(TensorData::new(mask, [rows, cols]), &x.device());
    x * mask
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

/// Length and finiteness check shared by every entry point that accepts parameters.
pub(crate) fn check_params(spec: &ModelSpec, params: &[f32]) -> Result<()> {
    let expected = spec.num_params();
    if params.len() != expected {
        return Err(Error::Model(format!(
            "expected {expected} parameters for this model, got {}",
            params.len()
        )));
    }
    if let Some(i) = params.iter().position(|v| !v.is_finite()) {
        return Err(Error::Model(format!(
            "parameter {i} is not finite ({})",
            params[i]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendKind;

    fn spec() -> ModelSpec {
        ModelSpec {
            n_features: 5,
            hidden: vec![4, 3],
            n_classes: 2,
            activation: Activation::Relu,
            dropout: 0.0,
        }
    }

    #[test]
    fn layout_names_shapes_and_count() {
        let s = spec();
        let layout = s.layout();
        let names: Vec<&str> = layout.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "layers.0.weight",
                "layers.0.bias",
                "layers.1.weight",
                "layers.1.bias",
                "layers.2.weight",
                "layers.2.bias"
            ]
        );
        let shapes: Vec<Vec<usize>> = layout.iter().map(|t| t.shape.clone()).collect();
        assert_eq!(
            shapes,
            [
                vec![5, 4],
                vec![4],
                vec![4, 3],
                vec![3],
                vec![3, 2],
                vec![2]
            ]
        );
        assert_eq!(s.num_params(), 5 * 4 + 4 + 4 * 3 + 3 + 3 * 2 + 2);
        assert_eq!(
            s.num_params(),
            layout.iter().map(TensorSpec::numel).sum::<usize>()
        );
    }

    #[test]
    fn linear_model_has_one_layer() {
        let s = ModelSpec {
            hidden: vec![],
            ..spec()
        };
        assert_eq!(s.layout().len(), 2);
        assert_eq!(s.num_params(), 5 * 2 + 2);
    }

    #[test]
    fn init_is_deterministic_per_seed_and_bounded() {
        let s = spec();
        let a = s.init_params(7);
        assert_eq!(a.len(), s.num_params());
        assert_eq!(a, s.init_params(7));
        assert_ne!(a, s.init_params(8));
        // First layer: fan_in 5.
        let bound = 1.0 / 5f32.sqrt();
        assert!(a[..24].iter().all(|v| v.abs() <= bound));
        // Output layer: fan_in 3, a wider bound that a few values should use.
        let out = &a[a.len() - 8..];
        assert!(out.iter().all(|v| v.abs() <= 1.0 / 3f32.sqrt()));
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

    #[test]
    fn impossible_specs_are_refused() {
        for bad in [
            ModelSpec {
                n_features: 0,
                ..spec()
            },
            ModelSpec {
                n_classes: 1,
                ..spec()
            },
            ModelSpec {
                hidden: vec![4, 0],
                ..spec()
            },
            ModelSpec {
                dropout: 1.0,
                ..spec()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn from_plan_copies_the_shape() {
        let plan = TrainingPlan::from_toml(
            r#"
[schema]
feature_columns = ["a", "b", "c"]
label_column = "y"
classes = ["ok", "scratch", "dent"]
[model]
hidden_layers = [8, 4]
activation = "tanh"
dropout = 0.1
[training]
rounds = 1
learning_rate = 0.01
min_participants = 1
"#,
            "plan.toml",
        )
        .unwrap();
        let s = ModelSpec::from_plan(&plan);
        assert_eq!(
            s,
            ModelSpec {
                n_features: 3,
                hidden: vec![8, 4],
                n_classes: 3,
                activation: Activation::Tanh,
                dropout: 0.1,
            }
        );
    }
}
