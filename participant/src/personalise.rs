//! `sangsaeng-participant personalise`: the federation's model fitted to this
//! site's own line. A small firm whose process differs from the others' can
//! fine-tune the global model on its own training rows for a few epochs (all
//! layers, or only the output layer), and see on its own validation rows
//! whether that beats both the global model and a model trained on its rows
//! alone.
//!
//! Nothing here connects anywhere: the rows, the personalised model and the
//! comparison stay at the site. The split is the one federated training used
//! (the plan's `validation_fraction` and seed), and every model is scored
//! with the plan's federated scaling, so the three figures are comparable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sangsaeng_common::learning::metrics::Evaluation;
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::learning::train::{self, LocalTraining};
use sangsaeng_common::transfer::weights;

use crate::config::ParticipantConfig;
use crate::error::Result;
use crate::predict::Model;
use crate::site::{self, Site};

/// How to personalise.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Epochs of fine-tuning from the global model.
    pub epochs: u32,
    /// Fine-tune only the output layer (the features the federation learnt stay).
    pub last_layer_only: bool,
}

/// The three models on the site's own validation rows.
#[derive(Debug, Clone)]
pub struct Report {
    pub train_rows: usize,
    pub validation_rows: usize,
    /// Trained on this site's rows alone, from the plan's initial model, for as
    /// many epochs as the federation trained (rounds × local epochs).
    pub local_only: Evaluation,
    pub global: Evaluation,
    pub personalised: Evaluation,
    /// Where the personalised model was written.
    pub saved: PathBuf,
}

/// Fine-tunes `model` on the site's training split and compares it with the
/// global and a local-only model on the validation split; the personalised
/// model goes to `out`.
pub fn personalise(
    cfg: &ParticipantConfig,
    model: &Model,
    settings: Settings,
    out: &Path,
) -> Result<Report> {
    let plan = &model.plan;
    let mut site = Site::new(cfg.data.clone(), cfg.features_from_plan);
    let prepared = site.prepare("personalise", plan)?;
    let (train_set, val) = site::scaled(&prepared, plan)?;
    let spec = ModelSpec::from_plan(plan);
    let backend = cfg.backend;
    // Plain local training: no FedProx pull, no SCAFFOLD correction, no DP
    // (nothing of it leaves the site).
    let base = LocalTraining {
        proximal_mu: 0.0,
        ..LocalTraining::from_plan(plan, 1)
    };
    let tuned = train::train_local(
        backend,
        &spec,
        &model.params,
        &train_set,
        &LocalTraining {
            epochs: settings.epochs,
            last_layer_only: settings.last_layer_only,
            ..base.clone()
        },
    )?;
    let alone = train::train_local(
        backend,
        &spec,
        &spec.init_params(plan.training.seed),
        &train_set,
        &LocalTraining {
            epochs: plan.training.rounds * plan.training.local_epochs,
            ..base
        },
    )?;
    let score = |params: &[f32]| train::evaluate(backend, &spec, params, &val);
    let report = Report {
        train_rows: train_set.len(),
        validation_rows: val.len(),
        local_only: score(&alone.params)?,
        global: score(&model.params)?,
        personalised: score(&tuned.params)?,
        saved: out.to_path_buf(),
    };
    let meta = HashMap::from([
        (
            "personalised_from".to_string(),
            weights::digest(&model.params),
        ),
        ("epochs".to_string(), settings.epochs.to_string()),
        (
            "last_layer_only".to_string(),
            settings.last_layer_only.to_string(),
        ),
    ]);
    weights::save_safetensors(out, &spec.layout(), &tuned.params, meta)?;
    Ok(report)
}
