//! `sangsaeng-participant predict`: the federation's model at work on the
//! site's own line data. A CSV export goes in; one row per input row comes out
//! (the predicted class and each class's probability), computed at the site.
//!
//! The model is found from one path ([`Model::open`]):
//! - a folder with `global.safetensors` and `plan.toml`: a training's output
//!   at the coordinator, or one training under this site's `model_dir`;
//! - this site's `model_dir` itself: its most recently finished training;
//! - a release pulled with `sangsaeng-coordinator release pull`
//!   (`model.safetensors`, the plan inside `provenance.intoto.json`);
//! - a `.safetensors` file with `plan.toml` beside it.
//!
//! The plan carries the input schema and the federated scaling; rows are
//! scaled exactly as in training. The input streams through in batches of
//! [`BATCH_ROWS`] (a file larger than memory is fine), and the output is
//! written to a temporary file in the output's folder, renamed into place only
//! once every row is scored: a bad row (named, with its line and column) leaves
//! nothing half-written behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::learning::backend::BackendKind;
use sangsaeng_common::learning::data::Dataset;
use sangsaeng_common::learning::metrics;
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::learning::scoring::ScoringRows;
use sangsaeng_common::learning::train;
use sangsaeng_common::transfer::weights;

use crate::error::{ParticipantError, Result};

/// Rows scored per forward pass: bounds memory whatever the file's size.
pub const BATCH_ROWS: usize = 8192;

/// The model file and plan of a training, as kept in a folder.
pub const MODEL_FILE: &str = "global.safetensors";
pub const PLAN_FILE: &str = "plan.toml";
const RELEASE_WEIGHTS: &str = "model.safetensors";
const RELEASE_PROVENANCE: &str = "provenance.intoto.json";

/// A trained model ready to score rows.
#[derive(Debug)]
pub struct Model {
    pub plan: TrainingPlan,
    pub params: Vec<f32>,
    /// The weights file it was read from.
    pub weights: PathBuf,
}

fn bad(m: String) -> ParticipantError {
    ParticipantError::Config(m)
}

impl Model {
    /// Finds and loads the model `path` names (see the module's list).
    pub fn open(path: &Path) -> Result<Model> {
        let (weights_file, plan) = locate(path)?;
        if plan.scaling.is_none() {
            return Err(bad(format!(
                "the plan of {} has no federated scaling: it is a plan as written, not one a training ran with",
                weights_file.display()
            )));
        }
        let layout = ModelSpec::from_plan(&plan).layout();
        let params = weights::load_safetensors(&weights_file, &layout)?;
        Ok(Model {
            plan,
            params,
            weights: weights_file,
        })
    }
}

/// The weights file and plan behind `path`.
fn locate(path: &Path) -> Result<(PathBuf, TrainingPlan)> {
    if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new("."));
        return Ok((path.to_path_buf(), plan_in(dir)?));
    }
    if !path.is_dir() {
        return Err(bad(format!(
            "--model {}: no such file or folder",
            path.display()
        )));
    }
    if path.join(MODEL_FILE).is_file() {
        return Ok((path.join(MODEL_FILE), plan_in(path)?));
    }
    if path.join(RELEASE_WEIGHTS).is_file() {
        return Ok((path.join(RELEASE_WEIGHTS), plan_in(path)?));
    }
    let latest = latest_training(path)?.ok_or_else(|| {
        bad(format!(
            "--model {}: no {MODEL_FILE} or {RELEASE_WEIGHTS} in it, nor a training folder with one",
            path.display()
        ))
    })?;
    tracing::info!(model = %latest.display(), "using the most recently finished training");
    Ok((latest.join(MODEL_FILE), plan_in(&latest)?))
}

/// The plan in `dir`: `plan.toml`, or a release's provenance.
fn plan_in(dir: &Path) -> Result<TrainingPlan> {
    let toml = dir.join(PLAN_FILE);
    if toml.is_file() {
        return Ok(TrainingPlan::from_file(&toml)?);
    }
    let prov = dir.join(RELEASE_PROVENANCE);
    if prov.is_file() {
        let text =
            std::fs::read_to_string(&prov).map_err(|e| sangsaeng_common::Error::io(&prov, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", prov.display())))?;
        let plan = find_string(&v, "plan_toml")
            .ok_or_else(|| bad(format!("{} carries no plan_toml", prov.display())))?;
        return Ok(TrainingPlan::from_toml(plan, &prov.display().to_string())?);
    }
    Err(bad(format!(
        "no {PLAN_FILE} (or a release's {RELEASE_PROVENANCE}) beside the model in {}: the plan gives the input columns and the federated scaling",
        dir.display()
    )))
}

fn find_string<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .and_then(|x| x.as_str())
            .or_else(|| m.values().find_map(|x| find_string(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_string(x, key)),
        _ => None,
    }
}

/// The sub-folder of `dir` holding a model, most recently written.
fn latest_training(dir: &Path) -> Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| sangsaeng_common::Error::io(dir, e))?;
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in entries.flatten() {
        let m = e.path().join(MODEL_FILE);
        let Ok(modified) = m.metadata().and_then(|md| md.modified()) else {
            continue;
        };
        if best.as_ref().is_none_or(|(t, _)| modified > *t) {
            best = Some((modified, e.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// What a prediction run did.
#[derive(Debug, Clone)]
pub struct Predicted {
    pub rows: u64,
    pub secs: f64,
    pub out: PathBuf,
    /// For an input with the label (or target) column: how the predictions scored.
    pub scored: Option<Scored>,
}

/// The predictions of a labelled input against its labels or target values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scored {
    Classes { accuracy: f64, macro_f1: f64 },
    Values(metrics::RegressionMetrics),
}

impl Predicted {
    pub fn rows_per_sec(&self) -> f64 {
        self.rows as f64 / self.secs.max(1e-9)
    }
}

/// Scores every row of `input` with `model` into `out`.
pub fn predict(model: &Model, backend: BackendKind, input: &Path, out: &Path) -> Result<Predicted> {
    let begin = Instant::now();
    let plan = &model.plan;
    let scaling = plan.scaling.as_ref().expect("checked by Model::open");
    let spec = ModelSpec::from_plan(plan);
    let mut rows = ScoringRows::open(input, &plan.schema)?;
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(|e| sangsaeng_common::Error::io(dir, e))?;
    let mut w = std::io::BufWriter::new(tmp);
    let io = |e: std::io::Error| ParticipantError::Common(sangsaeng_common::Error::io(out, e));
    write_header(&mut w, plan).map_err(io)?;
    let (mut features, mut labels, mut values) = (Vec::new(), Vec::new(), Vec::new());
    let (mut truth, mut predicted) = (Vec::new(), Vec::new());
    let (mut truth_values, mut predicted_values) = (Vec::new(), Vec::new());
    let n_classes = plan.n_classes();
    let target = scaling.target();
    loop {
        let n = rows.next_batch(BATCH_ROWS, &mut features, &mut labels, &mut values)?;
        if n == 0 {
            break;
        }
        // Scaled exactly as training scaled its rows (and checked the same way).
        let mut batch = Dataset {
            features: std::mem::take(&mut features),
            labels: vec![],
            n_features: spec.n_features,
            ..Default::default()
        };
        batch.standardise(scaling)?;
        features = batch.features;
        let logits = train::predict_logits(backend, &spec, &model.params, &features, n)?;
        if let Some((mean, std)) = target {
            for (i, &z) in logits.iter().enumerate() {
                // The model predicts the standardised target; the site reads its own units.
                let y = f64::from(z) * std + mean;
                writeln!(w, "{y}").map_err(io)?;
                if rows.has_labels() {
                    truth_values.push(f64::from(values[i]));
                    predicted_values.push(y);
                }
            }
            continue;
        }
        for (i, row) in logits.chunks(n_classes).enumerate() {
            let (class, probs) = softmax(row);
            write_row(&mut w, &plan.schema.classes[class], &probs).map_err(io)?;
            if rows.has_labels() {
                truth.push(labels[i]);
                predicted.push(class as u32);
            }
        }
    }
    let tmp = w.into_inner().map_err(|e| io(e.into_error()))?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(out).map_err(|e| io(e.error))?;
    let scored = match (rows.has_labels(), target) {
        (false, _) => None,
        (true, Some(_)) => {
            metrics::regression(&truth_values, &predicted_values).map(Scored::Values)
        }
        (true, None) => Some(Scored::Classes {
            accuracy: metrics::accuracy(&truth, &predicted),
            macro_f1: metrics::macro_f1(n_classes, &truth, &predicted),
        }),
    };
    Ok(Predicted {
        rows: rows.rows(),
        secs: begin.elapsed().as_secs_f64(),
        out: out.to_path_buf(),
        scored,
    })
}

/// The most probable class (the first on a tie, as argmax in evaluation) and
/// every class's probability, from one row's logits.
fn softmax(logits: &[f32]) -> (usize, Vec<f64>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exp: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    (best, exp.into_iter().map(|e| e / sum).collect())
}

fn write_header(w: &mut impl Write, plan: &TrainingPlan) -> std::io::Result<()> {
    write!(w, "prediction")?;
    for c in &plan.schema.classes {
        write!(w, ",p_{}", csv_field(c))?;
    }
    writeln!(w)
}

fn write_row(w: &mut impl Write, class: &str, probs: &[f64]) -> std::io::Result<()> {
    write!(w, "{}", csv_field(class))?;
    for p in probs {
        write!(w, ",{p:.6}")?;
    }
    writeln!(w)
}

/// A class name as one CSV field (quoted when it needs to be).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
