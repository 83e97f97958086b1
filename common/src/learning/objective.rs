//! What local training minimises: cross-entropy over class labels, or the
//! mean squared error or Huber loss on the standardised regression target.
//!
//! Two forms of each loss live side by side so they cannot drift apart: a
//! batch mean built from tensor operations, which burn's autodiff
//! differentiates (ordinary steps, SCAFFOLD's gradients), and the per-row sum
//! with its closed-form gradient with respect to the model's outputs, which
//! DP-SGD's per-example backward pass starts from
//! ([`crate::learning::dp_sgd`]). A unit test checks one against the other.
//!
//! The target is standardised with the federated mean and standard deviation
//! (`Scaling::target_mean`, `target_std`), so the losses and Huber's threshold
//! are in target standard deviations: one learning rate suits a cycle time in
//! seconds and a concentration in mol %.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use burn::tensor::activation;

use crate::config::plan::{Loss, Task, TrainingPlan};
use crate::learning::data::Dataset;
use crate::{Error, Result};

/// The rows' targets: class indices, or standardised regression values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Targets<'a> {
    Classes(&'a [u32]),
    Values(&'a [f32]),
}

impl<'a> Targets<'a> {
    /// The whole dataset's targets, as its task stores them.
    pub fn of(data: &'a Dataset) -> Targets<'a> {
        if data.targets.is_empty() {
            Targets::Classes(&data.labels)
        } else {
            Targets::Values(&data.targets)
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Targets::Classes(c) => c.len(),
            Targets::Values(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `start..end`.
    pub fn slice(&self, start: usize, end: usize) -> Targets<'a> {
        match self {
            Targets::Classes(c) => Targets::Classes(&c[start..end]),
            Targets::Values(v) => Targets::Values(&v[start..end]),
        }
    }
}

/// A batch's targets gathered row by row (reused buffers).
#[derive(Debug, Default)]
pub(crate) struct TargetBuffer {
    classes: Vec<u32>,
    values: Vec<f32>,
    regression: bool,
}

impl TargetBuffer {
    pub(crate) fn clear(&mut self, data: &Dataset) {
        self.classes.clear();
        self.values.clear();
        self.regression = !data.targets.is_empty();
    }

    pub(crate) fn push(&mut self, data: &Dataset, row: usize) {
        if self.regression {
            self.values.push(data.targets[row]);
        } else {
            self.classes.push(data.labels[row]);
        }
    }

    pub(crate) fn targets(&self) -> Targets<'_> {
        if self.regression {
            Targets::Values(&self.values)
        } else {
            Targets::Classes(&self.classes)
        }
    }
}

/// The loss of a plan, with its parameter.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Objective {
    #[default]
    CrossEntropy,
    Mse,
    /// Threshold in target standard deviations.
    Huber {
        delta: f64,
    },
}

impl Objective {
    /// The plan's `[training] loss`.
    pub fn from_plan(plan: &TrainingPlan) -> Objective {
        match plan.loss() {
            Loss::CrossEntropy => Objective::CrossEntropy,
            Loss::Mse => Objective::Mse,
            Loss::Huber => Objective::Huber {
                delta: plan.training.huber_delta,
            },
        }
    }

    /// The loss evaluation reports for a task, whatever loss trained the
    /// model: cross-entropy, or MSE on the standardised target.
    pub fn for_evaluation(task: Task) -> Objective {
        match task {
            Task::Classification => Objective::CrossEntropy,
            Task::Regression => Objective::Mse,
        }
    }

    /// The task this loss trains for.
    pub fn task(self) -> Task {
        match self {
            Objective::CrossEntropy => Task::Classification,
            Objective::Mse | Objective::Huber { .. } => Task::Regression,
        }
    }

    /// Refuses targets of the other task, class indices beyond the model's
    /// outputs and non-finite values: checked before any tensor is built,
    /// since burn would panic on them.
    pub(crate) fn check(self, targets: Targets<'_>, n_outputs: usize) -> Result<()> {
        match (self.task(), targets) {
            (Task::Classification, Targets::Classes(labels)) => {
                match labels.iter().position(|&l| l as usize >= n_outputs) {
                    Some(row) => Err(Error::Model(format!(
                        "row {row} has label {} but the model has {n_outputs} classes",
                        labels[row]
                    ))),
                    None => Ok(()),
                }
            }
            (Task::Regression, Targets::Values(values)) => {
                match values.iter().position(|v| !v.is_finite()) {
                    Some(row) => Err(Error::Model(format!(
                        "row {row}'s target is not finite ({})",
                        values[row]
                    ))),
                    None => Ok(()),
                }
            }
            (task, _) => Err(Error::Model(format!(
                "the data's targets do not suit a {} model",
                task.name()
            ))),
        }
    }

    /// The batch's mean loss as a tensor autodiff can differentiate;
    /// `outputs` is `[rows, n_outputs]` on `device`.
    pub(crate) fn mean_loss(
        self,
        outputs: Tensor<2>,
        targets: Targets<'_>,
        device: &Device,
    ) -> Tensor<1> {
        match (self, targets) {
            (Objective::CrossEntropy, Targets::Classes(labels)) => CrossEntropyLossConfig::new()
                .init(device)
                .forward(outputs, class_tensor(labels, device)),
            (objective, targets) => {
                let rows = targets.len();
                per_row_loss(objective, outputs, targets, device).sum() / rows as f32
            }
        }
    }

    /// The sum of the rows' losses and each row's gradient with respect to
    /// its outputs (`[rows, n_outputs]`), in closed form:
    /// softmax(z) − onehot(y) for cross-entropy, 2(ŷ − y) for MSE,
    /// clamp(ŷ − y, −δ, δ) for Huber.
    pub(crate) fn sum_and_output_grads(
        self,
        outputs: Tensor<2>,
        targets: Targets<'_>,
    ) -> Result<(f64, Tensor<2>)> {
        let device = outputs.device();
        let (loss, grads) = match (self, targets) {
            (Objective::CrossEntropy, Targets::Classes(labels)) => {
                let [rows, n_classes] = outputs.dims();
                let log_p = activation::log_softmax(outputs, 1);
                let picked = Tensor::<2, Int>::from_data(
                    TensorData::new(
                        labels.iter().map(|&y| i64::from(y)).collect::<Vec<_>>(),
                        [rows, 1],
                    ),
                    &device,
                );
                let loss = log_p.clone().gather(1, picked).sum().neg();
                let mut onehot = vec![0.0f32; rows * n_classes];
                for (i, &y) in labels.iter().enumerate() {
                    onehot[i * n_classes + y as usize] = 1.0;
                }
                let onehot =
                    Tensor::<2>::from_data(TensorData::new(onehot, [rows, n_classes]), &device);
                (loss, log_p.exp() - onehot)
            }
            (objective, targets) => {
                let residual = outputs.clone() - value_tensor(targets, &device);
                let grads = match objective {
                    Objective::Huber { delta } => residual.clamp(-delta as f32, delta as f32),
                    _ => residual * 2.0,
                };
                (
                    per_row_loss(objective, outputs, targets, &device).sum(),
                    grads,
                )
            }
        };
        let loss_sum = f64::from(
            loss.try_into_scalar::<f32>()
                .map_err(|e| Error::Model(format!("reading the training loss failed: {e}")))?,
        );
        if !loss_sum.is_finite() {
            return Err(Error::Model(format!(
                "training diverged (loss {loss_sum}); lower the learning rate"
            )));
        }
        Ok((loss_sum, grads))
    }
}

/// Each regression row's loss, `[rows, 1]`: (ŷ − y)², or Huber's
/// ½·min(|r|, δ)² + δ·(|r| − min(|r|, δ)), which is ½r² within δ and
/// δ|r| − ½δ² beyond it, written without a branch so autodiff follows it.
fn per_row_loss(
    objective: Objective,
    outputs: Tensor<2>,
    targets: Targets<'_>,
    device: &Device,
) -> Tensor<2> {
    let residual = outputs - value_tensor(targets, device);
    match objective {
        Objective::Huber { delta } => {
            let delta = delta as f32;
            let size = residual.abs();
            let inner = size.clone().clamp_max(delta);
            inner.clone() * inner.clone() * 0.5 + (size - inner) * delta
        }
        _ => residual.clone() * residual,
    }
}

fn class_tensor(labels: &[u32], device: &Device) -> Tensor<1, Int> {
    let labels: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
    let n = labels.len();
    Tensor::from_data(TensorData::new(labels, [n]), device)
}

/// Regression targets as a `[rows, 1]` column; class targets never reach
/// here ([`Objective::check`] runs first), and would give an empty column.
fn value_tensor(targets: Targets<'_>, device: &Device) -> Tensor<2> {
    let values = match targets {
        Targets::Values(v) => v.to_vec(),
        Targets::Classes(_) => Vec::new(),
    };
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n, 1]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learning::backend::BackendKind;

    fn read(t: Tensor<2>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// The closed-form gradients DP-SGD starts from equal autodiff's of the
    /// mean loss (times the rows, since one is a sum and the other a mean).
    #[test]
    fn closed_form_output_gradients_match_autodiff() {
        let plain = BackendKind::NdArray.device().unwrap();
        let ad = BackendKind::NdArray.autodiff_device().unwrap();
        let values = [0.5f32, -1.0, 3.0, 0.0];
        let outputs = [0.4f32, 1.5, -0.5, 0.05];
        for objective in [
            Objective::Mse,
            Objective::Huber { delta: 1.0 },
            Objective::Huber { delta: 0.2 },
        ] {
            let targets = Targets::Values(&values);
            let z = Tensor::<2>::from_data(TensorData::new(outputs.to_vec(), [4, 1]), &ad)
                .require_grad();
            let loss = objective.mean_loss(z.clone(), targets, &ad);
            let mean: f32 = loss.clone().into_scalar();
            let grads = loss.backward();
            let auto = read(z.grad(&grads).unwrap());
            let zp = Tensor::<2>::from_data(TensorData::new(outputs.to_vec(), [4, 1]), &plain);
            let (sum, closed) = objective.sum_and_output_grads(zp, targets).unwrap();
            assert!((sum / 4.0 - f64::from(mean)).abs() < 1e-6, "{objective:?}");
            for (a, c) in auto.iter().zip(read(closed)) {
                assert!((a * 4.0 - c).abs() < 1e-5, "{objective:?}: {a} vs {c}");
            }
        }
    }

    #[test]
    fn huber_is_quadratic_inside_delta_and_linear_beyond() {
        let plain = BackendKind::NdArray.device().unwrap();
        let z = Tensor::<2>::from_data(TensorData::new(vec![0.5f32, 3.0], [2, 1]), &plain);
        let values = [0.0f32, 0.0];
        let (sum, _) = Objective::Huber { delta: 1.0 }
            .sum_and_output_grads(z, Targets::Values(&values))
            .unwrap();
        // ½·0.5² + (1·3 − ½) = 0.125 + 2.5.
        assert!((sum - 2.625).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn targets_of_the_other_task_are_refused() {
        let e = Objective::Mse
            .check(Targets::Classes(&[0, 1]), 1)
            .unwrap_err();
        assert!(e.to_string().contains("regression"), "{e}");
        let e = Objective::CrossEntropy
            .check(Targets::Classes(&[0, 2]), 2)
            .unwrap_err();
        assert!(e.to_string().contains("label 2"), "{e}");
        let e = Objective::Mse
            .check(Targets::Values(&[0.0, f32::NAN]), 1)
            .unwrap_err();
        assert!(e.to_string().contains("not finite"), "{e}");
    }
}
