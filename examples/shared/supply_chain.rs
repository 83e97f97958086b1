//! The supply chain the examples federate: four firms (an anchor plant and
//! three suppliers of different sizes), their non-IID split of the committed
//! Tennessee Eastman data with per-firm sensor skew, their roster, and the
//! yardsticks the examples print (local-only training, a training's model on
//! the common test set, rounds to 95 %).
//!
//! Shared by `supply_chain` and `attack_study` through `#[path]` (Cargo builds
//! each example from its own file; this one is no example of its own).

// Each example uses its own part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::roster::Roster;
use sangsaeng_common::learning::data::{Dataset, FeatureStats};
use sangsaeng_common::learning::metrics::Evaluation;
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::learning::train::{self, LocalTraining};
use sangsaeng_common::transfer::weights;

/// One firm of the supply chain and the slice of the process it has seen.
pub struct Firm {
    pub id: &'static str,
    pub name: &'static str,
    pub tier: &'static str,
    /// Fault types (besides normal operation) in its historian data.
    pub faults: &'static [&'static str],
    /// Share of the normal-operation rows it holds.
    pub normal_share: f64,
    /// Share of each of its fault types' rows it holds.
    pub fault_share: f64,
}

pub const FIRMS: &[Firm] = &[
    Firm {
        id: "hanbit-motors",
        name: "Hanbit Motors (anchor plant)",
        tier: "anchor",
        faults: &["1", "2", "4", "5", "6"],
        normal_share: 0.40,
        fault_share: 0.6,
    },
    Firm {
        id: "daesung-precision",
        name: "Daesung Precision",
        tier: "tier-1",
        faults: &["1", "7", "11", "14"],
        normal_share: 0.30,
        fault_share: 0.6,
    },
    Firm {
        id: "mirae-castings",
        name: "Mirae Castings",
        tier: "tier-2",
        faults: &["2", "4", "7", "11"],
        normal_share: 0.20,
        fault_share: 0.4,
    },
    Firm {
        id: "jinwoo-sensors",
        name: "Jinwoo Sensors",
        tier: "tier-2",
        faults: &["5", "6", "14"],
        normal_share: 0.10,
        fault_share: 0.4,
    },
];
pub const CLASSES: &[&str] = &["0", "1", "2", "4", "5", "6", "7", "11", "14"];

/// The examples' plan without its `[aggregation]` section (each example adds
/// its own): the MLP, Adam, 20 % of each firm's rows held out for validation.
pub fn plan_toml(
    rounds: u32,
    local_epochs: u32,
    seed: u64,
    proximal_mu: f64,
    min_participants: usize,
) -> String {
    let quoted = |v: Vec<String>| {
        v.iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let features = quoted(columns());
    let classes = quoted(CLASSES.iter().map(|c| c.to_string()).collect());
    format!(
        r#"
[schema]
feature_columns = [{features}]
label_column = "fault"
classes = [{classes}]

[model]
hidden_layers = [64, 32]
activation = "relu"
dropout = 0.0

[training]
rounds = {rounds}
local_epochs = {local_epochs}
batch_size = 32
optimizer = "adam"
learning_rate = 0.003
min_participants = {min_participants}
round_deadline_secs = 300
validation_fraction = 0.2
seed = {seed}
proximal_mu = {proximal_mu:?}
"#
    )
}

/// An extra firm holding a random `fraction` of every class's rows, drawn
/// apart from (so overlapping) the four firms' split: the plausible process
/// data an attacker in the chain would train on.
pub fn sample_firm(all: &Dataset, fraction: f64, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_a77a_c4e5);
    let d = all.n_features;
    let mut ds = Dataset {
        features: vec![],
        labels: vec![],
        n_features: d,
        ..Default::default()
    };
    for i in 0..all.len() {
        if rng.random_bool(fraction) {
            ds.features.extend_from_slice(all.row(i));
            ds.labels.push(all.labels[i]);
        }
    }
    ds
}

pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/tennessee-eastman")
}

pub fn columns() -> Vec<String> {
    (1..=41)
        .map(|i| format!("xmeas_{i}"))
        .chain((1..=11).map(|i| format!("xmv_{i}")))
        .collect()
}

/// The four firms (and `extra` ones), each with a signed agreement, and the
/// anchor's federation office as administrator.
pub fn roster(extra: &[Firm]) -> Roster {
    let mut text = String::new();
    for Firm { id, name, tier, .. } in FIRMS.iter().chain(extra) {
        text.push_str(&format!(
            "[[organisation]]\nid = \"{id}\"\nname = \"{name}\"\ntier = \"{tier}\"\nrole = \"participant\"\nagreement = {{ signed = true, date = \"2026-03-02\" }}\n\n"
        ));
    }
    text.push_str("[[organisation]]\nid = \"hanbit-admin\"\nname = \"Hanbit Motors federation office\"\ntier = \"anchor\"\nrole = \"admin\"\n");
    Roster::from_toml(&text, "supply-chain roster").expect("the example roster is valid")
}

/// Splits the pooled training rows into non-IID firm datasets with per-firm sensor skew.
pub fn split_firms(all: &Dataset, plan: &TrainingPlan, seed: u64) -> Vec<Dataset> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let class_index = |c: &str| {
        plan.schema
            .classes
            .iter()
            .position(|x| x == c)
            .expect("class") as u32
    };
    let d = all.n_features;
    // Scale of each sensor, so an offset is a fraction of its spread.
    let stats = FeatureStats::of(all);
    let scaling = stats.to_scaling(false).expect("pooled statistics");
    let m = &scaling.mean;
    // Rows of each class, shuffled once.
    let mut by_class: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for i in 0..all.len() {
        by_class.entry(all.labels[i]).or_default().push(i);
    }
    for rows in by_class.values_mut() {
        for i in (1..rows.len()).rev() {
            rows.swap(i, rng.random_range(0..=i));
        }
    }
    let mut cursor: BTreeMap<u32, usize> = BTreeMap::new();
    let mut take = |class: u32, fraction: f64| -> Vec<usize> {
        let rows = &by_class[&class];
        let n = ((rows.len() as f64) * fraction).round() as usize;
        let start = cursor.entry(class).or_default();
        let end = (*start + n).min(rows.len());
        let out = rows[*start..end].to_vec();
        *start = end;
        out
    };
    FIRMS
        .iter()
        .map(|firm| {
            let mut rows = take(class_index("0"), firm.normal_share);
            for f in firm.faults {
                rows.extend(take(class_index(f), firm.fault_share));
            }
            // Different instruments: each sensor has a span (gain) error of up to ±5 % around
            // the plant's operating point and a zero (offset) error of up to ±0.2 of its spread.
            let gain: Vec<f64> = (0..d)
                .map(|_| 1.0 + rng.random_range(-0.05..0.05))
                .collect();
            let offset: Vec<f64> = (0..d)
                .map(|j| rng.random_range(-0.2..0.2) * scaling.std[j])
                .collect();
            let mut ds = Dataset {
                features: Vec::with_capacity(rows.len() * d),
                labels: vec![],
                n_features: d,
                ..Default::default()
            };
            for &i in &rows {
                for (j, &x) in all.row(i).iter().enumerate() {
                    ds.features
                        .push((m[j] + gain[j] * (x as f64 - m[j]) + offset[j]) as f32);
                }
                ds.labels.push(all.labels[i]);
            }
            ds
        })
        .collect()
}

/// Trains from the plan's initial model for rounds × local epochs on one dataset
/// (standardised by its own statistics) and evaluates on the test set.
pub fn train_alone(
    plan: &TrainingPlan,
    ds: &Dataset,
    test: &Dataset,
    epochs: u32,
) -> anyhow::Result<Evaluation> {
    let scaling = FeatureStats::of(ds).to_scaling(false)?;
    let mut train_set = ds.clone();
    train_set.standardise(&scaling)?;
    let mut test_set = test.clone();
    test_set.standardise(&scaling)?;
    let spec = ModelSpec::from_plan(plan);
    let mut cfg = LocalTraining::from_plan(plan, 1);
    cfg.epochs = epochs;
    // One long training from the initial model: FedProx's pull would hold it there.
    cfg.proximal_mu = 0.0;
    let backend = Default::default();
    let out = train::train_local(
        backend,
        &spec,
        &spec.init_params(plan.training.seed),
        &train_set,
        &cfg,
    )?;
    Ok(train::evaluate(backend, &spec, &out.params, &test_set)?)
}

/// A completed training's final model on the common test set, and the ε its
/// last round recorded (0 without DP).
pub fn evaluate_training(
    t: &sangsaeng_proto::v1::TrainingStatus,
    test: &Dataset,
) -> anyhow::Result<(Evaluation, f64)> {
    let out_dir = PathBuf::from(&t.output_dir);
    let plan = TrainingPlan::from_file(&out_dir.join("plan.toml"))?;
    let spec = ModelSpec::from_plan(&plan);
    let global = weights::load_safetensors(&out_dir.join("global.safetensors"), &spec.layout())?;
    let mut scaled = test.clone();
    scaled.standardise(plan.scaling.as_ref().expect("federated scaling"))?;
    let e = train::evaluate(Default::default(), &spec, &global, &scaled)?;
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl"))?;
    let spent = metrics
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["privacy"]["model_epsilon"].as_f64())
        .unwrap_or(0.0);
    Ok((e, spent))
}

/// The federated validation macro-F1 (weighted by the sites' validation rows)
/// of each round's global model, from the training's metrics.jsonl.
pub fn validation_curve(out_dir: &Path) -> anyhow::Result<Vec<f64>> {
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl"))?;
    Ok(metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["eval_macro_f1"].as_f64())
        .collect())
}

/// The first round (1-based) whose value is at least `fraction` of the last's.
pub fn rounds_to_reach(curve: &[f64], fraction: f64) -> Option<usize> {
    let last = *curve.last()?;
    curve
        .iter()
        .position(|v| *v >= fraction * last)
        .map(|i| i + 1)
}

pub fn present(ds: &Dataset, plan: &TrainingPlan) -> Vec<String> {
    ds.class_counts(plan.n_classes())
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, _)| plan.schema.classes[i].clone())
        .collect()
}
