//! The model every site trains: a multi-layer perceptron classifier, its
//! canonical parameter layout, and conversion to and from one flat `f32` vector.
//!
//! The flat vector is what travels: the coordinator initialises it
//! ([`ModelSpec::init_params`]), averages it and stores it, and participants
//! load it into a burn `Mlp` (`crate::learning::mlp`, `train` feature) only to train or
//! evaluate. Keeping the layout
//! defined here, by name and shape, lets the coordinator work without burn
//! models at all and lets the weights file name its tensors.

use rand::SeedableRng;
use rand::distr::{Distribution, Uniform};
use rand_chacha::ChaCha8Rng;

use crate::config::plan::{Activation, Task, TrainingPlan};
use crate::{Error, Result};

/// Shape of the MLP: input width, hidden widths, classes and regularisation.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub n_features: usize,
    /// Hidden layer widths, input to output; empty makes a linear (softmax regression) model.
    pub hidden: Vec<usize>,
    /// Width of the output layer: the number of classes, or 1 for regression.
    pub n_classes: usize,
    /// Classification (softmax over `n_classes` logits) or regression (one
    /// output, the standardised target).
    pub task: Task,
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
            n_classes: plan.n_outputs(),
            task: plan.schema.task,
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
        match self.task {
            Task::Classification if self.n_classes < 2 => {
                return Err(Error::Model(format!(
                    "the model needs at least two classes, got {}",
                    self.n_classes
                )));
            }
            Task::Regression if self.n_classes != 1 => {
                return Err(Error::Model(format!(
                    "a regression model has one output, not {}",
                    self.n_classes
                )));
            }
            _ => {}
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
    pub(crate) fn layer_dims(&self) -> Vec<(usize, usize)> {
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

/// Length and finiteness check shared by every entry point that accepts parameters.
pub fn check_params(spec: &ModelSpec, params: &[f32]) -> Result<()> {
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
    fn impossible_specs_are_refused() {
        for bad in [
            ModelSpec {
                n_features: 0,
                ..spec()
            },
            ModelSpec {
                n_classes: 1,
                task: crate::config::plan::Task::Classification,
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
                task: crate::config::plan::Task::Classification,
                activation: Activation::Tanh,
                dropout: 0.1,
            }
        );
    }
}
