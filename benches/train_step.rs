//! Benchmark of local training cost on each compiled-in CPU backend: one
//! mini-batch step and one local epoch of the example's model.
//!
//! Plain `std::time::Instant` timing with a median over repetitions, so no
//! benchmarking framework joins the dependency tree. Run with
//! `cargo bench --bench train_step` (add `--features flex` to include burn-flex);
//! the figures and the machine they came from are recorded in `docs/BENCHMARKS.md`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sangsaeng_common::config::plan::{Activation, Optimizer};
use sangsaeng_common::learning::backend::{self, BackendKind};
use sangsaeng_common::learning::data::Dataset;
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::learning::train::{LocalTrainer, LocalTraining};

/// The example's model: 52 sensor features, two hidden layers, 9 defect classes.
const N_FEATURES: usize = 52;
const HIDDEN: [usize; 2] = [64, 32];
const N_CLASSES: usize = 9;
const BATCH: usize = 64;
const EPOCH_ROWS: usize = 4000;

const WARMUP_STEPS: usize = 20;
const TIMED_STEPS: usize = 300;
const TIMED_EPOCHS: usize = 9;

fn main() {
    let spec = ModelSpec {
        n_features: N_FEATURES,
        hidden: HIDDEN.to_vec(),
        n_classes: N_CLASSES,
        activation: Activation::Relu,
        dropout: 0.0,
    };
    let data = synthetic(EPOCH_ROWS, 7);
    let start = spec.init_params(1);
    let cfg = LocalTraining {
        epochs: 1,
        batch_size: BATCH,
        optimizer: Optimizer::Adam,
        learning_rate: 1e-3,
        dropout: 0.0,
        seed: 3,
    };

    println!(
        "model {N_FEATURES}-{}-{}-{N_CLASSES} ({} parameters), Adam, batch {BATCH}, epoch {EPOCH_ROWS} rows",
        HIDDEN[0],
        HIDDEN[1],
        spec.num_params()
    );
    println!(
        "{:<8} {:>14} {:>14} {:>14} {:>14}",
        "backend", "step median", "step p10", "step p90", "epoch median"
    );
    for kind in backend::available() {
        let steps = time_steps(kind, &spec, &start, &data, &cfg);
        let epochs = time_epochs(kind, &spec, &start, &data, &cfg);
        println!(
            "{:<8} {:>14} {:>14} {:>14} {:>14}",
            kind.name(),
            fmt(percentile(&steps, 0.5)),
            fmt(percentile(&steps, 0.1)),
            fmt(percentile(&steps, 0.9)),
            fmt(percentile(&epochs, 0.5)),
        );
    }
}

/// One forward + backward + Adam update on a batch of 64 rows, timed one by one.
fn time_steps(
    kind: BackendKind,
    spec: &ModelSpec,
    start: &[f32],
    data: &Dataset,
    cfg: &LocalTraining,
) -> Vec<Duration> {
    let mut trainer = LocalTrainer::new(kind, spec, start, cfg).expect("trainer");
    let n_batches = data.len() / BATCH;
    let batch = |i: usize| {
        let rows = (i % n_batches) * BATCH..(i % n_batches + 1) * BATCH;
        (
            &data.features[rows.start * N_FEATURES..rows.end * N_FEATURES],
            &data.labels[rows],
        )
    };
    for i in 0..WARMUP_STEPS {
        let (x, y) = batch(i);
        trainer.step(x, y).expect("warm-up step");
    }
    (0..TIMED_STEPS)
        .map(|i| {
            let (x, y) = batch(i);
            let t = Instant::now();
            black_box(trainer.step(x, y).expect("step"));
            t.elapsed()
        })
        .collect()
}

/// A whole shuffled epoch over 4000 rows (63 steps), after one warm-up epoch.
fn time_epochs(
    kind: BackendKind,
    spec: &ModelSpec,
    start: &[f32],
    data: &Dataset,
    cfg: &LocalTraining,
) -> Vec<Duration> {
    let mut trainer = LocalTrainer::new(kind, spec, start, cfg).expect("trainer");
    trainer.epoch(data).expect("warm-up epoch");
    (0..TIMED_EPOCHS)
        .map(|_| {
            let t = Instant::now();
            black_box(trainer.epoch(data).expect("epoch"));
            t.elapsed()
        })
        .collect()
}

/// Standardised-looking features with a class-dependent shift, so the loss is realistic.
fn synthetic(rows: usize, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut features = Vec::with_capacity(rows * N_FEATURES);
    let mut labels = Vec::with_capacity(rows);
    for _ in 0..rows {
        let class = rng.random_range(0..N_CLASSES);
        for f in 0..N_FEATURES {
            let shift = if f % N_CLASSES == class { 1.5 } else { 0.0 };
            features.push(shift + rng.random_range(-1.0f32..1.0));
        }
        labels.push(class as u32);
    }
    Dataset {
        features,
        labels,
        n_features: N_FEATURES,
    }
}

fn percentile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}
