//! Benchmark of local training cost on each compiled-in CPU backend: one
//! mini-batch step and one local epoch of the example's model, plain and with
//! DP-SGD (per-example clipping and exact discrete-Gaussian noise), measured in
//! the same run, and the speed of the noise sampler alone.
//!
//! Plain `std::time::Instant` timing with a median over repetitions, so no
//! benchmarking framework joins the dependency tree. Run with
//! `cargo bench --bench train_step` (add `--features flex` to include burn-flex);
//! the figures and the machine they came from are recorded in `docs/BENCHMARKS.md`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::{ChaCha8Rng, ChaCha20Rng};
use sangsaeng_common::config::plan::{Activation, Optimizer};
use sangsaeng_common::learning::backend::{self, BackendKind};
use sangsaeng_common::learning::data::Dataset;
use sangsaeng_common::learning::dp_sgd::{DpNoise, DpSgd};
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::learning::objective::Targets;
use sangsaeng_common::learning::train::{LocalTrainer, LocalTraining};
use sangsaeng_common::privacy::dp::discrete_gaussian::DiscreteGaussian;

/// The example's model: 52 sensor features, two hidden layers, 9 defect classes.
const N_FEATURES: usize = 52;
const HIDDEN: [usize; 2] = [64, 32];
const N_CLASSES: usize = 9;
const BATCH: usize = 64;
const EPOCH_ROWS: usize = 4000;

const WARMUP_STEPS: usize = 20;
const TIMED_STEPS: usize = 300;
const TIMED_EPOCHS: usize = 9;
/// DP-SGD settings of the DP rows: a typical clip and noise multiplier.
const DP: DpSgd = DpSgd {
    max_grad_norm: 1.0,
    noise_multiplier: 1.0,
};
const NOISE_SAMPLES: usize = 1_000_000;

fn main() {
    let spec = ModelSpec {
        n_features: N_FEATURES,
        hidden: HIDDEN.to_vec(),
        n_classes: N_CLASSES,
        task: sangsaeng_common::config::plan::Task::Classification,
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
        dp: None,
        dp_noise: DpNoise::SnappedGaussian,
        proximal_mu: 0.0,
        scaffold_correction: None,
        last_layer_only: false,
        objective: Default::default(),
    };
    let dp_cfg = LocalTraining {
        dp: Some(DP),
        ..cfg.clone()
    };
    let dp_exact_cfg = LocalTraining {
        dp_noise: DpNoise::ExactDiscreteGaussian,
        ..dp_cfg.clone()
    };
    let dp_no_noise_cfg = LocalTraining {
        dp: Some(DpSgd {
            noise_multiplier: 0.0,
            ..DP
        }),
        ..cfg.clone()
    };

    println!(
        "model {N_FEATURES}-{}-{}-{N_CLASSES} ({} parameters), Adam, batch {BATCH}, epoch {EPOCH_ROWS} rows",
        HIDDEN[0],
        HIDDEN[1],
        spec.num_params()
    );
    println!(
        "DP-SGD: max_grad_norm {}, noise_multiplier {}, Poisson q = {BATCH}/{EPOCH_ROWS}",
        DP.max_grad_norm, DP.noise_multiplier
    );
    println!(
        "{:<8} {:<10} {:>14} {:>14} {:>14} {:>14}",
        "backend", "mode", "step median", "step p10", "step p90", "epoch median"
    );
    // dp-snapped: the default sampler; dp-exact: the exact discrete Gaussian;
    // dp-sigma0: clipping without noise (the per-example gradient work alone).
    for kind in backend::available() {
        let mut medians = Vec::new();
        for (mode, c) in [
            ("plain", &cfg),
            ("dp-snapped", &dp_cfg),
            ("dp-exact", &dp_exact_cfg),
            ("dp-sigma0", &dp_no_noise_cfg),
        ] {
            let steps = time_steps(kind, &spec, &start, &data, c);
            let epochs = time_epochs(kind, &spec, &start, &data, c);
            medians.push((percentile(&steps, 0.5), percentile(&epochs, 0.5)));
            println!(
                "{:<8} {:<10} {:>14} {:>14} {:>14} {:>14}",
                kind.name(),
                mode,
                fmt(percentile(&steps, 0.5)),
                fmt(percentile(&steps, 0.1)),
                fmt(percentile(&steps, 0.9)),
                fmt(percentile(&epochs, 0.5)),
            );
        }
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
        for (i, mode) in [(1, "dp-snapped"), (2, "dp-exact"), (3, "dp-sigma0")] {
            println!(
                "{:<8} {mode} / plain: step {:.2}x, epoch {:.2}x",
                kind.name(),
                ratio(medians[i].0, medians[0].0),
                ratio(medians[i].1, medians[0].1),
            );
        }
    }
    let rate = noise_rate();
    println!(
        "exact discrete Gaussian (sigma 2^20.5 grid steps, ChaCha20 from the OS): {:.2} M samples/s, \
         {} per step for {} parameters",
        rate / 1e6,
        fmt(Duration::from_secs_f64(spec.num_params() as f64 / rate)),
        spec.num_params()
    );
}

/// Samples per second of the exact discrete Gaussian at the scale DP-SGD uses
/// (standard deviation between 2^20 and 2^21 grid steps).
fn noise_rate() -> f64 {
    let sampler = DiscreteGaussian::from_sigma(1.5 * f64::from(1u32 << 20)).expect("sampler");
    let mut rng = ChaCha20Rng::from_os_rng();
    let mut out = vec![0i64; NOISE_SAMPLES];
    sampler.fill(&mut rng, &mut out[..NOISE_SAMPLES / 10]);
    let t = Instant::now();
    sampler.fill(&mut rng, &mut out);
    let secs = t.elapsed().as_secs_f64();
    black_box(&out);
    NOISE_SAMPLES as f64 / secs
}

/// One forward + backward + Adam update on a batch of 64 rows, timed one by one
/// (with DP-SGD: the batch is the step's sample; clipping, noise and the update).
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
        trainer.step(x, Targets::Classes(y)).expect("warm-up step");
    }
    (0..TIMED_STEPS)
        .map(|i| {
            let (x, y) = batch(i);
            let t = Instant::now();
            black_box(trainer.step(x, Targets::Classes(y)).expect("step"));
            t.elapsed()
        })
        .collect()
}

/// A whole shuffled epoch over 4000 rows (63 steps), after one warm-up epoch
/// (with DP-SGD: 63 steps on Poisson samples of 64 rows on average).
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
        ..Default::default()
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
