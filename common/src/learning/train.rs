//! Local training, evaluation and prediction on a site's data.
//!
//! Every entry point takes and returns flat parameter vectors in
//! [`ModelSpec::layout`] order and a [`BackendKind`], so callers (participant
//! daemon, example, tests) never touch burn types. Inputs from the network or a
//! CSV file are checked here and refused with [`Error::Model`] rather than
//! reaching a burn shape assertion, which would panic.
//!
//! Determinism: shuffling and dropout draw from ChaCha8 streams seeded by
//! [`LocalTraining::seed`], and nothing uses burn's process-wide backend RNG, so
//! on the ndarray backend the same start, data and configuration give the same
//! parameters bit for bit, even with other trainings running in the process.
//!
//! With [`LocalTraining::dp`] set, every step is a DP-SGD step
//! ([`crate::learning::dp_sgd`]): Poisson-sampled rows, per-example clipping and
//! noise drawn from an OS-seeded generator, so that training is deliberately
//! *not* reproducible; the determinism above is that of the non-private path.

use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::config::plan::{Optimizer, Task, TrainingPlan};
use crate::learning::backend::BackendKind;
use crate::learning::data::Dataset;
use crate::learning::dp_sgd::{DpEngine, DpNoise, DpReport, DpSgd};
use crate::learning::metrics::{self, Evaluation};
use crate::learning::mlp::{Mlp, read_vec};
use crate::learning::model::{ModelSpec, check_params};
use crate::learning::objective::{Objective, TargetBuffer, Targets};
use crate::learning::proximal::Proximal;
use crate::learning::scaffold::Correction;
use crate::{Error, Result};

/// Rows per forward pass in evaluation and prediction: bounds memory on large
/// validation sets while keeping matrix products large enough to be efficient.
const INFERENCE_BATCH: usize = 4096;

/// How one round of local training runs.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalTraining {
    pub epochs: u32,
    pub batch_size: usize,
    pub optimizer: Optimizer,
    pub learning_rate: f64,
    /// Dropout probability used while training; overrides [`ModelSpec::dropout`].
    pub dropout: f64,
    /// Seed of shuffling and dropout for this round.
    pub seed: u64,
    /// Record-level differential privacy: DP-SGD instead of shuffled mini-batches.
    pub dp: Option<DpSgd>,
    /// The sampler of DP-SGD's noise (ignored without [`LocalTraining::dp`]).
    pub dp_noise: DpNoise,
    /// FedProx's μ (`training.proximal_mu`): the weight of the pull towards
    /// the starting (global) model; 0 is plain local training.
    pub proximal_mu: f64,
    /// SCAFFOLD: c − c_i (flat, layout order), added to every step's gradient.
    pub scaffold_correction: Option<Vec<f32>>,
    /// Train only the output layer (personalisation's cheap mode): the other
    /// layers' gradients are dropped, so the optimiser leaves them as they are.
    pub last_layer_only: bool,
    /// The loss (`[training] loss`); it must suit the model's task.
    pub objective: Objective,
}

impl LocalTraining {
    /// The plan's training settings for `round`.
    ///
    /// The plan seed is mixed with the round number so each round visits the
    /// rows in a different order (otherwise every round would repeat the same
    /// batches) while a rerun of the whole training stays reproducible.
    pub fn from_plan(plan: &TrainingPlan, round: u32) -> LocalTraining {
        let t = &plan.training;
        LocalTraining {
            epochs: t.local_epochs,
            batch_size: t.batch_size,
            optimizer: t.optimizer,
            learning_rate: t.learning_rate,
            dropout: plan.model.dropout,
            seed: round_seed(t.seed, round),
            dp: None,
            dp_noise: DpNoise::default(),
            proximal_mu: t.proximal_mu,
            scaffold_correction: None,
            last_layer_only: false,
            objective: Objective::from_plan(plan),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::Model(
                "local training needs at least one epoch".into(),
            ));
        }
        if self.batch_size == 0 {
            return Err(Error::Model("batch size must be at least 1".into()));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(Error::Model(format!(
                "learning rate {} must be finite and positive",
                self.learning_rate
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Model(format!(
                "dropout {} is outside [0, 1)",
                self.dropout
            )));
        }
        if !(self.proximal_mu.is_finite() && self.proximal_mu >= 0.0) {
            return Err(Error::Model(format!(
                "proximal_mu {} must be finite and not negative",
                self.proximal_mu
            )));
        }
        if let Some(dp) = &self.dp {
            dp.validate()?;
        }
        Ok(())
    }
}

/// SplitMix64 of the seed and round: a cheap bijective mix, so neighbouring
/// rounds (or plans whose seeds differ by one) get unrelated streams.
fn round_seed(seed: u64, round: u32) -> u64 {
    let mut z = seed ^ u64::from(round).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a round of local training produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// The trained parameters, in [`ModelSpec::layout`] order.
    pub params: Vec<f32>,
    /// Mean training cross-entropy of each epoch, weighted by batch size (with
    /// DP-SGD: over the rows the epoch's steps sampled; NaN if they sampled none).
    pub epoch_losses: Vec<f64>,
    /// With DP-SGD: the steps taken and their sampling rate, for the site's accountant.
    pub dp: Option<DpReport>,
}

/// Trains from `start` on `data` for `cfg.epochs` epochs of shuffled mini-batches.
pub fn train_local(
    kind: BackendKind,
    spec: &ModelSpec,
    start: &[f32],
    data: &Dataset,
    cfg: &LocalTraining,
) -> Result<TrainOutcome> {
    train_local_observed(kind, spec, start, data, cfg, &mut |_| {})
}

/// Where a local training is: handed to the observer after every step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Steps taken, of `total` (epochs × batches per epoch).
    pub done: u64,
    pub total: u64,
    /// 1-based.
    pub epoch: u32,
    /// The step's mean loss (NaN for a DP-SGD step that sampled no row).
    pub loss: f64,
}

/// [`train_local`], calling `observe` after every step (progress bars, logs).
pub fn train_local_observed(
    kind: BackendKind,
    spec: &ModelSpec,
    start: &[f32],
    data: &Dataset,
    cfg: &LocalTraining,
    observe: &mut dyn FnMut(Progress),
) -> Result<TrainOutcome> {
    check_dataset(spec, data)?;
    check_dp_rows(cfg, data)?;
    let trainer = LocalTrainer::new(kind, spec, start, cfg)?;
    train_with(trainer, spec, data, cfg, observe)
}

/// The epochs of [`train_local`] on a ready trainer (tests inject a seeded DP generator).
fn train_with(
    mut trainer: LocalTrainer,
    spec: &ModelSpec,
    data: &Dataset,
    cfg: &LocalTraining,
    observe: &mut dyn FnMut(Progress),
) -> Result<TrainOutcome> {
    let per_epoch = data.len().div_ceil(cfg.batch_size) as u64;
    let total = per_epoch * u64::from(cfg.epochs);
    let epoch_losses = (0..cfg.epochs)
        .map(|e| {
            let mut step = 0u64;
            trainer.epoch_checked(data, &mut |loss| {
                step += 1;
                observe(Progress {
                    done: u64::from(e) * per_epoch + step,
                    total,
                    epoch: e + 1,
                    loss,
                })
            })
        })
        .collect::<Result<Vec<f64>>>()?;
    let params = trainer.params();
    check_params(spec, &params)
        .map_err(|e| Error::Model(format!("training produced unusable parameters: {e}")))?;
    let dp = match (&cfg.dp, &trainer.dp) {
        (Some(dp), Some(engine)) => Some(DpReport {
            steps: engine.steps(),
            sample_rate: cfg.batch_size as f64 / data.len() as f64,
            noise_multiplier: dp.noise_multiplier,
            max_grad_norm: dp.max_grad_norm,
        }),
        _ => None,
    };
    Ok(TrainOutcome {
        params,
        epoch_losses,
        dp,
    })
}

/// DP-SGD samples at rate `batch_size / rows`, which must be at most 1.
fn check_dp_rows(cfg: &LocalTraining, data: &Dataset) -> Result<()> {
    if cfg.dp.is_some() && data.len() < cfg.batch_size {
        return Err(Error::Privacy(format!(
            "a site with {} training rows cannot sample batches of {} (training.batch_size) \
             for DP-SGD",
            data.len(),
            cfg.batch_size
        )));
    }
    Ok(())
}

/// A model being trained, one mini-batch or epoch at a time.
///
/// [`train_local`] is the usual entry point; this exists for callers that need
/// the steps themselves, such as the training-step benchmark. A trainer made
/// with [`LocalTraining::dp`] set takes only DP-SGD steps.
pub struct LocalTrainer {
    spec: ModelSpec,
    model: Mlp,
    optimizer: ModuleOptimizer,
    objective: Objective,
    device: Device,
    learning_rate: f64,
    batch_size: usize,
    shuffle_rng: ChaCha8Rng,
    dropout_rng: ChaCha8Rng,
    dp: Option<DpEngine>,
    proximal: Option<Proximal>,
    correction: Option<Correction>,
    last_layer_only: bool,
    /// The rows of the current DP-SGD step (reused buffer).
    sample: Vec<usize>,
}

impl LocalTrainer {
    /// Loads `start` onto `kind`'s autodiff device with a fresh optimizer state.
    pub fn new(
        kind: BackendKind,
        spec: &ModelSpec,
        start: &[f32],
        cfg: &LocalTraining,
    ) -> Result<LocalTrainer> {
        cfg.validate()?;
        if cfg.objective.task() != spec.task {
            return Err(Error::Model(format!(
                "a {} model cannot train with the {:?} loss",
                spec.task.name(),
                cfg.objective
            )));
        }
        let spec = ModelSpec {
            dropout: cfg.dropout,
            ..spec.clone()
        };
        let device = kind.autodiff_device()?;
        let model = Mlp::from_flat(&spec, start, &device)?;
        let proximal = Proximal::new(cfg.proximal_mu, &spec, start, &device)?;
        let correction = cfg
            .scaffold_correction
            .as_deref()
            .map(|c| Correction::new(&spec, c, &device))
            .transpose()?;
        let optimizer = match cfg.optimizer {
            Optimizer::Adam => AdamConfig::new().init(),
            Optimizer::Sgd => SgdConfig::new().init(),
        };
        let shuffle_rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        // Same seed, separate stream: changing the dropout rate must not change the batch order.
        let mut dropout_rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        dropout_rng.set_stream(1);
        let dp = cfg
            .dp
            .clone()
            .map(|dp| DpEngine::new(dp, cfg.dp_noise, spec.num_params()))
            .transpose()?
            .map(|mut engine| {
                engine.objective = cfg.objective;
                engine
            });
        Ok(LocalTrainer {
            spec,
            model,
            optimizer,
            objective: cfg.objective,
            device,
            learning_rate: cfg.learning_rate,
            batch_size: cfg.batch_size,
            shuffle_rng,
            dropout_rng,
            dp,
            proximal,
            correction,
            last_layer_only: cfg.last_layer_only,
            sample: Vec::new(),
        })
    }

    /// One forward, backward and optimizer step on the given rows; returns their mean loss.
    ///
    /// With DP-SGD the rows are taken as one step's Poisson sample (none is a
    /// valid, noise-only step, whose loss is NaN): clipped, noised and divided
    /// by the expected batch size `batch_size`.
    pub fn step(&mut self, features: &[f32], targets: Targets<'_>) -> Result<f64> {
        check_rows(&self.spec, features, targets)?;
        self.objective.check(targets, self.spec.n_classes)?;
        if self.dp.is_some() {
            let loss_sum = self.dp_step(features, targets)?;
            return Ok(loss_sum / targets.len() as f64);
        }
        if targets.is_empty() {
            return Err(Error::Model(
                "a training step needs at least one row".into(),
            ));
        }
        self.step_unchecked(features, targets)
    }

    /// One pass over `data` in a freshly shuffled order; returns the mean loss.
    ///
    /// With DP-SGD: `⌈rows / batch_size⌉` steps, each on a fresh Poisson sample.
    pub fn epoch(&mut self, data: &Dataset) -> Result<f64> {
        check_dataset(&self.spec, data)?;
        if self.dp.is_some() && data.len() < self.batch_size {
            return Err(Error::Privacy(format!(
                "a site with {} training rows cannot sample batches of {} (training.batch_size) \
                 for DP-SGD",
                data.len(),
                self.batch_size
            )));
        }
        self.epoch_checked(data, &mut |_| {})
    }

    /// The current parameters, in [`ModelSpec::layout`] order.
    pub fn params(&self) -> Vec<f32> {
        self.model.to_flat()
    }

    /// DP-SGD steps taken so far; `None` without DP-SGD.
    pub fn dp_steps(&self) -> Option<u64> {
        self.dp.as_ref().map(DpEngine::steps)
    }

    /// Test-only: a seeded generator for DP-SGD's sampling and noise.
    #[cfg(test)]
    pub(crate) fn set_dp_rng(&mut self, rng: rand_chacha::ChaCha20Rng) {
        if let Some(dp) = &mut self.dp {
            dp.set_rng(rng);
        }
    }

    fn epoch_checked(&mut self, data: &Dataset, stepped: &mut dyn FnMut(f64)) -> Result<f64> {
        if self.dp.is_some() {
            return self.dp_epoch(data, stepped);
        }
        let nf = data.n_features;
        let mut order: Vec<usize> = (0..data.len()).collect();
        order.shuffle(&mut self.shuffle_rng);
        let mut features = Vec::with_capacity(self.batch_size * nf);
        let mut targets = TargetBuffer::default();
        let mut total = 0.0;
        for batch in order.chunks(self.batch_size) {
            features.clear();
            targets.clear(data);
            for &row in batch {
                features.extend_from_slice(&data.features[row * nf..(row + 1) * nf]);
                targets.push(data, row);
            }
            let loss = self.step_unchecked(&features, targets.targets())?;
            stepped(loss);
            total += loss * batch.len() as f64;
        }
        Ok(total / data.len() as f64)
    }

    /// `⌈rows / batch_size⌉` DP-SGD steps, each on a Poisson sample of `data`.
    fn dp_epoch(&mut self, data: &Dataset, stepped: &mut dyn FnMut(f64)) -> Result<f64> {
        let nf = data.n_features;
        let (mut features, mut targets) = (Vec::new(), TargetBuffer::default());
        let (mut loss_sum, mut rows) = (0.0, 0usize);
        let mut sample = std::mem::take(&mut self.sample);
        for _ in 0..data.len().div_ceil(self.batch_size) {
            let engine = self.dp.as_mut().expect("dp_epoch runs with DP-SGD only");
            engine.sample(data.len(), self.batch_size, &mut sample);
            features.clear();
            targets.clear(data);
            for &row in &sample {
                features.extend_from_slice(&data.features[row * nf..(row + 1) * nf]);
                targets.push(data, row);
            }
            let step_loss = self.dp_step(&features, targets.targets())?;
            stepped(step_loss / sample.len() as f64);
            loss_sum += step_loss;
            rows += sample.len();
        }
        self.sample = sample;
        Ok(loss_sum / rows as f64)
    }

    /// One DP-SGD step on the sampled rows; returns the sum of their losses.
    fn dp_step(&mut self, features: &[f32], targets: Targets<'_>) -> Result<f64> {
        let engine = self.dp.as_mut().expect("dp_step runs with DP-SGD only");
        let (mut grads, loss_sum) = engine.gradient(
            &self.model,
            features,
            targets,
            self.batch_size,
            &mut self.dropout_rng,
            &self.device,
        )?;
        self.pull_towards_global(&mut grads);
        self.model = self
            .optimizer
            .step(self.learning_rate, self.model.clone(), grads);
        Ok(loss_sum)
    }

    fn step_unchecked(&mut self, features: &[f32], targets: Targets<'_>) -> Result<f64> {
        let rows = targets.len();
        let x = Tensor::<2>::from_data(
            TensorData::new(features.to_vec(), [rows, self.spec.n_features]),
            &self.device,
        );
        let outputs = self.model.forward_train(x, &mut self.dropout_rng);
        let loss = self.objective.mean_loss(outputs, targets, &self.device);
        let value: f64 = loss
            .clone()
            .try_into_scalar::<f32>()
            .map_err(|e| Error::Model(format!("reading the training loss failed: {e}")))?
            .into();
        // A diverged model would be sent to the coordinator as garbage; stop here instead.
        if !value.is_finite() {
            return Err(Error::Model(format!(
                "training diverged (loss {value}); lower the learning rate"
            )));
        }
        let mut grads = GradientsParams::from_grads(loss.backward(), &self.model);
        self.pull_towards_global(&mut grads);
        self.model = self
            .optimizer
            .step(self.learning_rate, self.model.clone(), grads);
        Ok(value)
    }

    /// FedProx: the proximal term's gradient, and SCAFFOLD: the drift
    /// correction, when the plan has them.
    fn pull_towards_global(&self, grads: &mut GradientsParams) {
        if let Some(p) = &self.proximal {
            p.add_gradient(&self.model, grads);
        }
        if let Some(c) = &self.correction {
            c.add_gradient(&self.model, grads);
        }
        if self.last_layer_only {
            let frozen = self.model.layers.len().saturating_sub(1);
            for layer in &self.model.layers[..frozen] {
                grads.remove::<2>(layer.weight.id);
                if let Some(b) = &layer.bias {
                    grads.remove::<1>(b.id);
                }
            }
        }
    }
}

/// Loss and the task's metrics of `params` on `data`, without dropout:
/// cross-entropy, accuracy and macro-F1, or for regression the MSE on the
/// standardised target and MAE, RMSE and R² in the target's units.
pub fn evaluate(
    kind: BackendKind,
    spec: &ModelSpec,
    params: &[f32],
    data: &Dataset,
) -> Result<Evaluation> {
    check_dataset(spec, data)?;
    let device = kind.device()?;
    let model = Mlp::from_flat(spec, params, &device)?;
    let objective = Objective::for_evaluation(spec.task);
    let nf = spec.n_features;
    let targets = Targets::of(data);
    // Summed (not averaged) per batch so the last, shorter batch is weighted correctly.
    let mut loss_sum = 0.0;
    let mut outputs = Vec::with_capacity(data.len());
    for (b, x) in data.features.chunks(INFERENCE_BATCH * nf).enumerate() {
        let rows = x.len() / nf;
        let start = b * INFERENCE_BATCH;
        let x = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [rows, nf]), &device);
        let z = model.forward(x);
        let (loss, _) =
            objective.sum_and_output_grads(z.clone(), targets.slice(start, start + rows))?;
        loss_sum += loss;
        match spec.task {
            Task::Classification => {
                let classes = read_vec::<i64, 2, Int>(z.argmax(1))?;
                outputs.extend(classes.into_iter().map(|c| c as f64));
            }
            Task::Regression => {
                outputs.extend(read_vec::<f32, 2, Float>(z)?.into_iter().map(f64::from));
            }
        }
    }
    let n = data.len();
    let loss = loss_sum / n as f64;
    Ok(match spec.task {
        Task::Classification => {
            let pred: Vec<u32> = outputs.into_iter().map(|c| c as u32).collect();
            Evaluation {
                n,
                loss,
                accuracy: metrics::accuracy(&data.labels, &pred),
                macro_f1: metrics::macro_f1(spec.n_classes, &data.labels, &pred),
                regression: None,
            }
        }
        Task::Regression => {
            let units = |v: f64| data.target_in_units(v);
            let truth: Vec<f64> = data.targets.iter().map(|&y| units(f64::from(y))).collect();
            let pred: Vec<f64> = outputs.into_iter().map(units).collect();
            Evaluation {
                n,
                loss,
                accuracy: 0.0,
                macro_f1: 0.0,
                regression: metrics::regression(&truth, &pred),
            }
        }
    })
}

/// Logits of `n_rows` rows (row-major `features`), `n_rows * n_classes` values row-major.
pub fn predict_logits(
    kind: BackendKind,
    spec: &ModelSpec,
    params: &[f32],
    features: &[f32],
    n_rows: usize,
) -> Result<Vec<f32>> {
    let nf = spec.n_features;
    if n_rows.checked_mul(nf) != Some(features.len()) {
        return Err(Error::Model(format!(
            "{} feature values do not make {n_rows} rows of {nf} features",
            features.len()
        )));
    }
    check_finite(features)?;
    let device = kind.device()?;
    let model = Mlp::from_flat(spec, params, &device)?;
    let mut out = Vec::with_capacity(n_rows * spec.n_classes);
    for x in features.chunks(INFERENCE_BATCH * nf) {
        let rows = x.len() / nf;
        let x = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [rows, nf]), &device);
        out.extend(read_vec::<f32, 2, Float>(model.forward(x))?);
    }
    Ok(out)
}

fn check_dataset(spec: &ModelSpec, data: &Dataset) -> Result<()> {
    if data.is_empty() {
        return Err(Error::Model("the dataset has no rows".into()));
    }
    if data.n_features != spec.n_features {
        return Err(Error::Model(format!(
            "the dataset has {} features but the model expects {}",
            data.n_features, spec.n_features
        )));
    }
    let targets = Targets::of(data);
    if targets.len() != data.len() {
        return Err(Error::Model(format!(
            "the dataset has {} rows but {} regression targets",
            data.len(),
            data.targets.len()
        )));
    }
    check_rows(spec, &data.features, targets)?;
    let objective = Objective::for_evaluation(spec.task);
    objective.check(targets, spec.n_classes)
}

fn check_rows(spec: &ModelSpec, features: &[f32], targets: Targets<'_>) -> Result<()> {
    let nf = spec.n_features;
    if targets.len().checked_mul(nf) != Some(features.len()) {
        return Err(Error::Model(format!(
            "{} feature values do not make {} rows of {nf} features",
            features.len(),
            targets.len()
        )));
    }
    check_finite(features)
}

fn check_finite(features: &[f32]) -> Result<()> {
    match features.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::Model(format!(
            "feature value {i} is not finite ({}); clean or impute the data first",
            features[i]
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::plan::Activation;
    use rand::Rng;

    fn spec() -> ModelSpec {
        ModelSpec {
            n_features: 4,
            hidden: vec![16],
            n_classes: 3,
            task: crate::config::plan::Task::Classification,
            activation: Activation::Relu,
            dropout: 0.0,
        }
    }

    /// Three well-separated Gaussian-ish blobs, one per class.
    fn blobs(n: usize, seed: u64) -> Dataset {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let centres = [
            [2.0, 0.0, 0.0, 1.0],
            [-2.0, 2.0, 0.0, 0.0],
            [0.0, -2.0, 2.0, -1.0],
        ];
        let mut features = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let class = i % 3;
            for c in centres[class] {
                features.push(c + rng.random_range(-0.5f32..0.5));
            }
            labels.push(class as u32);
        }
        Dataset {
            features,
            labels,
            n_features: 4,
            ..Default::default()
        }
    }

    fn cfg(optimizer: Optimizer, dropout: f64) -> LocalTraining {
        LocalTraining {
            epochs: 5,
            batch_size: 16,
            optimizer,
            learning_rate: if optimizer == Optimizer::Adam {
                0.01
            } else {
                0.1
            },
            dropout,
            seed: 42,
            dp: None,
            dp_noise: DpNoise::default(),
            proximal_mu: 0.0,
            scaffold_correction: None,
            last_layer_only: false,
            objective: Default::default(),
        }
    }

    #[test]
    fn training_decreases_the_loss_with_adam_and_sgd() {
        let s = spec();
        let data = blobs(300, 1);
        let start = s.init_params(0);
        for optimizer in [Optimizer::Adam, Optimizer::Sgd] {
            let out = train_local(
                BackendKind::NdArray,
                &s,
                &start,
                &data,
                &cfg(optimizer, 0.0),
            )
            .unwrap();
            assert_eq!(out.epoch_losses.len(), 5);
            assert_eq!(out.params.len(), s.num_params());
            let (first, last) = (out.epoch_losses[0], out.epoch_losses[4]);
            assert!(last < first * 0.5, "{optimizer:?}: {:?}", out.epoch_losses);
            let before = evaluate(BackendKind::NdArray, &s, &start, &data).unwrap();
            let after = evaluate(BackendKind::NdArray, &s, &out.params, &data).unwrap();
            assert!(
                after.loss < before.loss,
                "{optimizer:?}: {before:?} -> {after:?}"
            );
            assert!(after.accuracy > 0.95, "{optimizer:?}: {after:?}");
        }
    }

    #[test]
    fn training_is_deterministic_given_the_seed_even_with_dropout() {
        let s = spec();
        let data = blobs(120, 2);
        let start = s.init_params(5);
        let c = LocalTraining {
            epochs: 2,
            ..cfg(Optimizer::Adam, 0.3)
        };
        let a = train_local(BackendKind::NdArray, &s, &start, &data, &c).unwrap();
        let b = train_local(BackendKind::NdArray, &s, &start, &data, &c).unwrap();
        assert_eq!(a, b);
        let other = LocalTraining { seed: 43, ..c };
        let d = train_local(BackendKind::NdArray, &s, &start, &data, &other).unwrap();
        assert_ne!(a.params, d.params);
    }

    #[test]
    fn rounds_get_different_seeds() {
        let plan = TrainingPlan::from_toml(
            r#"
[schema]
feature_columns = ["a", "b"]
label_column = "y"
classes = ["0", "1"]
[model]
hidden_layers = [8]
dropout = 0.2
[training]
rounds = 3
local_epochs = 2
batch_size = 32
optimizer = "sgd"
learning_rate = 0.05
min_participants = 1
seed = 9
"#,
            "plan.toml",
        )
        .unwrap();
        let r1 = LocalTraining::from_plan(&plan, 1);
        let r2 = LocalTraining::from_plan(&plan, 2);
        assert_eq!(
            (
                r1.epochs,
                r1.batch_size,
                r1.optimizer,
                r1.learning_rate,
                r1.dropout
            ),
            (2, 32, Optimizer::Sgd, 0.05, 0.2)
        );
        assert_ne!(r1.seed, r2.seed);
        assert_eq!(r1, LocalTraining::from_plan(&plan, 1));
    }

    #[test]
    fn evaluate_scores_a_perfect_model() {
        // A linear model whose weights copy the one-hot inputs to the logits.
        let s = ModelSpec {
            n_features: 3,
            hidden: vec![],
            n_classes: 3,
            task: crate::config::plan::Task::Classification,
            activation: Activation::Relu,
            dropout: 0.0,
        };
        let mut params = vec![0.0f32; s.num_params()];
        for c in 0..3 {
            params[c * 3 + c] = 10.0;
        }
        let data = Dataset {
            features: vec![1., 0., 0., 0., 1., 0., 0., 0., 1., 0., 1., 0.],
            labels: vec![0, 1, 2, 1],
            n_features: 3,
            ..Default::default()
        };
        let e = evaluate(BackendKind::NdArray, &s, &params, &data).unwrap();
        assert_eq!(e.n, 4);
        assert_eq!(e.accuracy, 1.0);
        assert_eq!(e.macro_f1, 1.0);
        // Cross-entropy of logits (10, 0, 0): ln(1 + 2 e^-10).
        let expected = (1.0 + 2.0 * (-10.0f64).exp()).ln();
        assert!((e.loss - expected).abs() < 1e-6, "{}", e.loss);

        let logits = predict_logits(BackendKind::NdArray, &s, &params, &data.features, 4).unwrap();
        assert_eq!(&logits[..6], &[10., 0., 0., 0., 10., 0.]);
        assert_eq!(logits.len(), 12);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let s = spec();
        let start = s.init_params(0);
        let c = cfg(Optimizer::Adam, 0.0);
        let nd = BackendKind::NdArray;
        let msg = |r: Result<TrainOutcome>| r.unwrap_err().to_string();

        let empty = Dataset {
            n_features: 4,
            ..Dataset::default()
        };
        assert!(msg(train_local(nd, &s, &start, &empty, &c)).contains("no rows"));

        let mut wrong_width = blobs(6, 0);
        wrong_width.n_features = 2;
        assert!(msg(train_local(nd, &s, &start, &wrong_width, &c)).contains("has 2 features"));

        let mut short = blobs(6, 0);
        short.features.pop();
        assert!(msg(train_local(nd, &s, &start, &short, &c)).contains("do not make 6 rows"));

        let mut bad_label = blobs(6, 0);
        bad_label.labels[4] = 3;
        assert!(msg(train_local(nd, &s, &start, &bad_label, &c)).contains("row 4 has label 3"));

        let mut nan = blobs(6, 0);
        nan.features[7] = f32::NAN;
        assert!(msg(train_local(nd, &s, &start, &nan, &c)).contains("feature value 7"));

        let data = blobs(6, 0);
        assert!(msg(train_local(nd, &s, &start[1..], &data, &c)).contains("parameters"));
        let zero_batch = LocalTraining {
            batch_size: 0,
            ..c.clone()
        };
        assert!(msg(train_local(nd, &s, &start, &data, &zero_batch)).contains("batch size"));

        assert!(evaluate(nd, &s, &start, &bad_label).is_err());
        assert!(predict_logits(nd, &s, &start, &data.features, 5).is_err());
        assert_eq!(
            predict_logits(nd, &s, &start, &[], 0).unwrap(),
            Vec::<f32>::new()
        );
    }

    #[test]
    fn flex_trains_when_compiled_in_and_is_refused_otherwise() {
        let s = spec();
        let data = blobs(60, 4);
        let result = train_local(
            BackendKind::Flex,
            &s,
            &s.init_params(0),
            &data,
            &cfg(Optimizer::Adam, 0.0),
        );
        if cfg!(feature = "flex") {
            let out = result.unwrap();
            assert!(
                out.epoch_losses[4] < out.epoch_losses[0],
                "{:?}",
                out.epoch_losses
            );
            let e = evaluate(BackendKind::Flex, &s, &out.params, &data).unwrap();
            assert!(e.accuracy > 0.9, "{e:?}");
        } else {
            let err = result.unwrap_err().to_string();
            assert!(err.contains("rebuild with --features flex"), "{err}");
        }
    }

    #[test]
    fn fedprox_adds_mu_times_the_distance_to_the_global_model_to_each_gradient() {
        // Plain SGD is stateless, so the second proximal step from w0 must be
        // a plain step from w1 minus lr·μ·(w1 − w0), and the first (w = w0)
        // must be exactly the plain one.
        let s = spec();
        let data = blobs(32, 4);
        let (x, y) = (&data.features[..], &data.labels[..]);
        let mu = 0.5;
        let plain = LocalTraining {
            learning_rate: 0.1,
            ..cfg(Optimizer::Sgd, 0.0)
        };
        let prox = LocalTraining {
            proximal_mu: mu,
            ..plain.clone()
        };
        let w0 = s.init_params(3);
        let mut t = LocalTrainer::new(BackendKind::NdArray, &s, &w0, &prox).unwrap();
        t.step(x, Targets::Classes(y)).unwrap();
        let w1 = t.params();
        let mut p = LocalTrainer::new(BackendKind::NdArray, &s, &w0, &plain).unwrap();
        p.step(x, Targets::Classes(y)).unwrap();
        assert_eq!(w1, p.params(), "the pull is zero at the global model");
        t.step(x, Targets::Classes(y)).unwrap();
        let w2 = t.params();
        let mut p = LocalTrainer::new(BackendKind::NdArray, &s, &w1, &plain).unwrap();
        p.step(x, Targets::Classes(y)).unwrap();
        let moved = w1.iter().zip(&w0).any(|(a, b)| a != b);
        assert!(moved, "the first step moved the model");
        for (i, ((got, plain), (a, b))) in w2
            .iter()
            .zip(p.params())
            .zip(w1.iter().zip(&w0))
            .enumerate()
        {
            let want = plain - (0.1 * mu) as f32 * (a - b);
            assert!((got - want).abs() < 1e-6, "parameter {i}: {got} vs {want}");
        }
    }

    #[test]
    fn scaffold_correction_shifts_each_sgd_step_by_lr_times_c_minus_ci() {
        let s = spec();
        let data = blobs(16, 2);
        let (x, y) = (&data.features[..], &data.labels[..]);
        let plain = LocalTraining {
            learning_rate: 0.1,
            ..cfg(Optimizer::Sgd, 0.0)
        };
        let w0 = s.init_params(5);
        let correction: Vec<f32> = (0..w0.len())
            .map(|i| (i % 7) as f32 * 0.01 - 0.03)
            .collect();
        let corrected = LocalTraining {
            scaffold_correction: Some(correction.clone()),
            ..plain.clone()
        };
        let mut p = LocalTrainer::new(BackendKind::NdArray, &s, &w0, &plain).unwrap();
        p.step(x, Targets::Classes(y)).unwrap();
        let mut c = LocalTrainer::new(BackendKind::NdArray, &s, &w0, &corrected).unwrap();
        c.step(x, Targets::Classes(y)).unwrap();
        for (i, ((got, plain), k)) in c
            .params()
            .iter()
            .zip(p.params())
            .zip(&correction)
            .enumerate()
        {
            let want = plain - 0.1 * k;
            assert!((got - want).abs() < 1e-6, "parameter {i}: {got} vs {want}");
        }
    }

    #[test]
    fn the_observer_sees_every_step_in_order_and_the_training_is_unchanged() {
        let s = spec();
        let data = blobs(70, 3);
        let w0 = s.init_params(4);
        let c = LocalTraining {
            epochs: 3,
            batch_size: 32,
            ..cfg(Optimizer::Sgd, 0.0)
        };
        let mut seen = vec![];
        let observed = train_local_observed(BackendKind::NdArray, &s, &w0, &data, &c, &mut |p| {
            seen.push(p)
        })
        .unwrap();
        assert_eq!(seen.len(), 9, "3 epochs of ceil(70 / 32) = 3 steps");
        for (i, p) in seen.iter().enumerate() {
            assert_eq!(
                (p.done, p.total, p.epoch),
                (i as u64 + 1, 9, i as u32 / 3 + 1)
            );
            assert!(p.loss.is_finite() && p.loss > 0.0);
        }
        let plain = train_local(BackendKind::NdArray, &s, &w0, &data, &c).unwrap();
        assert_eq!(observed, plain);
    }

    #[test]
    fn last_layer_only_training_leaves_every_other_layer_as_it_was() {
        let s = spec();
        let data = blobs(64, 6);
        let w0 = s.init_params(2);
        let c = LocalTraining {
            last_layer_only: true,
            ..cfg(Optimizer::Adam, 0.0)
        };
        let out = train_local(BackendKind::NdArray, &s, &w0, &data, &c).unwrap();
        let (fan_in, fan_out) = *s.layer_dims().last().unwrap();
        let last = fan_in * fan_out + fan_out;
        let n = w0.len();
        assert_eq!(
            out.params[..n - last],
            w0[..n - last],
            "hidden layers frozen"
        );
        assert_ne!(
            out.params[n - last..],
            w0[n - last..],
            "the output layer learnt"
        );
    }

    #[test]
    fn mean_gradient_is_the_gradient_one_full_batch_sgd_step_takes() {
        let s = spec();
        let data = blobs(40, 4);
        let w0 = s.init_params(8);
        let g = crate::learning::scaffold::mean_gradient(
            BackendKind::NdArray,
            &s,
            &w0,
            &data,
            Objective::CrossEntropy,
        )
        .unwrap();
        let lr = 0.5;
        let one_step = LocalTraining {
            learning_rate: lr,
            ..cfg(Optimizer::Sgd, 0.0)
        };
        let mut t = LocalTrainer::new(BackendKind::NdArray, &s, &w0, &one_step).unwrap();
        t.step(&data.features, Targets::Classes(&data.labels))
            .unwrap();
        let implied: Vec<f32> = w0
            .iter()
            .zip(t.params())
            .map(|(a, b)| (a - b) / lr as f32)
            .collect();
        assert!(g.iter().any(|v| *v != 0.0));
        for (i, (a, b)) in g.iter().zip(&implied).enumerate() {
            assert!((a - b).abs() < 1e-5, "parameter {i}: {a} vs {b}");
        }
        let empty = Dataset {
            features: vec![],
            labels: vec![],
            n_features: s.n_features,
            ..Default::default()
        };
        assert!(
            crate::learning::scaffold::mean_gradient(
                BackendKind::NdArray,
                &s,
                &w0,
                &empty,
                Objective::CrossEntropy
            )
            .is_err()
        );
    }

    #[test]
    fn fedprox_keeps_local_training_closer_to_the_global_model_and_still_learns() {
        let s = spec();
        let data = blobs(200, 5);
        let w0 = s.init_params(9);
        let distance = |mu: f64| {
            let c = LocalTraining {
                proximal_mu: mu,
                ..cfg(Optimizer::Sgd, 0.0)
            };
            let out = train_local(BackendKind::NdArray, &s, &w0, &data, &c).unwrap();
            let d: f64 = out
                .params
                .iter()
                .zip(&w0)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum();
            (d.sqrt(), *out.epoch_losses.last().unwrap())
        };
        let (free, free_loss) = distance(0.0);
        let (pulled, pulled_loss) = distance(1.0);
        assert!(
            pulled < 0.8 * free,
            "μ = 1 moved {pulled}, μ = 0 moved {free}"
        );
        let start_loss = evaluate(BackendKind::NdArray, &s, &w0, &data).unwrap().loss;
        assert!(
            pulled_loss < start_loss,
            "{pulled_loss} vs {start_loss} (free: {free_loss})"
        );
        let bad = LocalTraining {
            proximal_mu: -1.0,
            ..cfg(Optimizer::Sgd, 0.0)
        };
        assert!(train_local(BackendKind::NdArray, &s, &w0, &data, &bad).is_err());
    }

    #[test]
    fn trainer_steps_match_train_local() {
        let s = spec();
        let data = blobs(50, 3);
        let start = s.init_params(1);
        let c = LocalTraining {
            epochs: 2,
            ..cfg(Optimizer::Sgd, 0.1)
        };
        let mut t = LocalTrainer::new(BackendKind::NdArray, &s, &start, &c).unwrap();
        let losses = vec![t.epoch(&data).unwrap(), t.epoch(&data).unwrap()];
        let out = train_local(BackendKind::NdArray, &s, &start, &data, &c).unwrap();
        assert_eq!(out.epoch_losses, losses);
        assert_eq!(out.params, t.params());
        assert!(
            t.step(&data.features[..4], Targets::Classes(&data.labels[..1]))
                .is_ok()
        );
        assert!(t.step(&[], Targets::Classes(&[])).is_err());
    }

    fn dp_cfg(optimizer: Optimizer, batch_size: usize, dp: DpSgd) -> LocalTraining {
        LocalTraining {
            epochs: 2,
            batch_size,
            dp: Some(dp),
            ..cfg(optimizer, 0.0)
        }
    }

    fn seeded_trainer(s: &ModelSpec, start: &[f32], c: &LocalTraining, seed: u64) -> LocalTrainer {
        let mut t = LocalTrainer::new(BackendKind::NdArray, s, start, c).unwrap();
        t.set_dp_rng(rand_chacha::ChaCha20Rng::seed_from_u64(seed));
        t
    }

    /// Test 3: with σ = 0, a clip no gradient reaches and q = 1 (batch = rows),
    /// DP-SGD is the plain full-batch mean-gradient step (SGD and Adam, two
    /// epochs, within 1e-5), which checks the division by the expected batch
    /// size; the report counts ⌈rows / batch⌉ steps per epoch at q = 1.
    #[test]
    fn dp_sgd_without_noise_or_clipping_at_q_one_is_the_mean_gradient_step() {
        let s = ModelSpec {
            hidden: vec![16, 8],
            ..spec()
        };
        let data = blobs(90, 6);
        let start = s.init_params(2);
        let dp = DpSgd {
            max_grad_norm: 1e6,
            noise_multiplier: 0.0,
        };
        for optimizer in [Optimizer::Sgd, Optimizer::Adam] {
            let plain = LocalTraining {
                epochs: 2,
                batch_size: 90,
                ..cfg(optimizer, 0.0)
            };
            let want = train_local(BackendKind::NdArray, &s, &start, &data, &plain).unwrap();
            let got = train_local(
                BackendKind::NdArray,
                &s,
                &start,
                &data,
                &dp_cfg(optimizer, 90, dp.clone()),
            )
            .unwrap();
            assert_eq!(
                got.dp,
                Some(DpReport {
                    steps: 2,
                    sample_rate: 1.0,
                    noise_multiplier: 0.0,
                    max_grad_norm: 1e6
                })
            );
            assert_ne!(got.params, start);
            for (i, (a, b)) in want.params.iter().zip(&got.params).enumerate() {
                assert!((a - b).abs() < 1e-5, "{optimizer:?} param {i}: {a} vs {b}");
            }
            for (a, b) in want.epoch_losses.iter().zip(&got.epoch_losses) {
                assert!((a - b).abs() < 1e-5, "{optimizer:?}: {a} vs {b}");
            }
        }
    }

    /// Test 4: the noise has the variance the plan says. Empty samples give
    /// noise-only steps; with SGD at learning rate 1 and batch size 1 each
    /// step moves the parameters by exactly minus the noise, so the moves are
    /// d = 15,625 coordinates × 4 steps = 62,500 noise samples, for each
    /// sampler. Expected variance (σC)² = (1.3·0.7)², inflated by the grid
    /// term (1 + √d·h/C)² < 1.005 (h ≤ σC·2^-16) and, for the snapped
    /// Gaussian, the rounding's h²/12 (nil); the sample variance of n normal
    /// draws has relative sd √(2/n) = 0.57 %, so 5 sd is 2.8 %. The mean must be
    /// within 5 sd of 0.
    #[test]
    fn dp_sgd_noise_has_the_planned_variance() {
        let s = ModelSpec {
            n_features: 52,
            hidden: vec![128, 64],
            n_classes: 9,
            task: crate::config::plan::Task::Classification,
            ..spec()
        };
        assert_eq!(s.num_params(), 15_625);
        let (sigma, clip) = (1.3, 0.7);
        for kind in [DpNoise::SnappedGaussian, DpNoise::ExactDiscreteGaussian] {
            let c = LocalTraining {
                learning_rate: 1.0,
                dp_noise: kind,
                ..dp_cfg(
                    Optimizer::Sgd,
                    1,
                    DpSgd {
                        max_grad_norm: clip,
                        noise_multiplier: sigma,
                    },
                )
            };
            let mut params = s.init_params(4);
            let mut t = seeded_trainer(&s, &params, &c, 11);
            let mut noise = Vec::new();
            for _ in 0..4 {
                assert!(t.step(&[], Targets::Classes(&[])).unwrap().is_nan());
                let next = t.params();
                noise.extend(params.iter().zip(&next).map(|(a, b)| f64::from(a - b)));
                params = next;
            }
            assert_eq!(t.dp_steps(), Some(4));
            let n = noise.len() as f64;
            let want = (sigma * clip).powi(2);
            let mean = noise.iter().sum::<f64>() / n;
            let var = noise.iter().map(|x| x * x).sum::<f64>() / n;
            assert!(
                mean.abs() < 5.0 * (want / n).sqrt(),
                "{kind:?}: mean {mean}"
            );
            assert!(
                (var / want - 1.0).abs() < 5.0 * (2.0 / n).sqrt(),
                "{kind:?}: variance {var} vs {want}"
            );
        }
    }

    /// Test 5: DP training at σ = 1, C = 1 still learns the three separable
    /// blobs. Noise on the mean gradient is σC/B = 1/64 per coordinate against
    /// clipped per-example gradients of norm up to 1, and the classes are 4
    /// apart with ±0.5 jitter, so DP-SGD should get near the non-private ~100 %;
    /// 0.8 is 2.4 × chance (1/3) and leaves a wide margin for the noise.
    #[test]
    fn dp_training_still_learns_separable_data() {
        let s = spec();
        let data = blobs(3000, 8);
        let start = s.init_params(0);
        let c = LocalTraining {
            epochs: 3,
            ..dp_cfg(
                Optimizer::Adam,
                64,
                DpSgd {
                    max_grad_norm: 1.0,
                    noise_multiplier: 1.0,
                },
            )
        };
        let out = train_with(
            seeded_trainer(&s, &start, &c, 3),
            &s,
            &data,
            &c,
            &mut |_| {},
        )
        .unwrap();
        let report = out.dp.unwrap();
        assert_eq!(report.steps, 3 * 3000u64.div_ceil(64));
        assert_eq!(report.sample_rate, 64.0 / 3000.0);
        let before = evaluate(BackendKind::NdArray, &s, &start, &data).unwrap();
        let after = evaluate(BackendKind::NdArray, &s, &out.params, &data).unwrap();
        assert!(after.accuracy > 0.8, "{before:?} -> {after:?}");
        assert!(after.loss < before.loss, "{before:?} -> {after:?}");
    }

    #[test]
    fn dp_training_runs_with_dropout_and_from_the_os_generator() {
        let s = spec();
        let data = blobs(200, 9);
        let c = LocalTraining {
            dropout: 0.3,
            ..dp_cfg(
                Optimizer::Adam,
                32,
                DpSgd {
                    max_grad_norm: 1.0,
                    noise_multiplier: 0.8,
                },
            )
        };
        let start = s.init_params(1);
        let a = train_local(BackendKind::NdArray, &s, &start, &data, &c).unwrap();
        let b = train_local(BackendKind::NdArray, &s, &start, &data, &c).unwrap();
        assert_eq!(a.dp.unwrap().steps, 2 * 7);
        // OS-seeded noise: the same round never repeats.
        assert_ne!(a.params, b.params);
    }

    #[test]
    fn bad_dp_settings_are_errors_not_panics() {
        let s = spec();
        let start = s.init_params(0);
        let nd = BackendKind::NdArray;
        let data = blobs(30, 0);
        let msg = |c: &LocalTraining| {
            train_local(nd, &s, &start, &data, c)
                .unwrap_err()
                .to_string()
        };
        let dp = |max_grad_norm, noise_multiplier| {
            dp_cfg(
                Optimizer::Sgd,
                16,
                DpSgd {
                    max_grad_norm,
                    noise_multiplier,
                },
            )
        };
        assert!(msg(&dp(0.0, 1.0)).contains("max_grad_norm=0"));
        assert!(msg(&dp(f64::NAN, 1.0)).contains("max_grad_norm=NaN"));
        assert!(msg(&dp(1.0, -1.0)).contains("noise_multiplier=-1"));
        assert!(msg(&dp(1.0, f64::NAN)).contains("noise_multiplier=NaN"));
        let big_batch = LocalTraining {
            batch_size: 31,
            ..dp(1.0, 1.0)
        };
        let err = msg(&big_batch);
        assert!(
            err.contains("30 training rows") && err.contains("batches of 31"),
            "{err}"
        );
        let mut t = LocalTrainer::new(nd, &s, &start, &dp(1.0, 1.0)).unwrap();
        assert!(
            t.epoch(&blobs(10, 1))
                .unwrap_err()
                .to_string()
                .contains("10 training rows")
        );
        assert!(LocalTrainer::new(nd, &s, &start, &dp(-2.0, 1.0)).is_err());
    }
}
