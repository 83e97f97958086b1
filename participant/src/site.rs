//! The site's private line data, prepared once per training: checked against the
//! plan's schema, split into training and validation rows (deterministically by
//! the plan's seed), and standardised with the federated scaling parameters.
//! Nothing in here leaves the site except the aggregate statistics of [`Site::stats`].

use std::sync::Arc;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::learning::data::{self, Dataset, FeatureStats, SiteData};

use crate::error::Result;

/// Data of one training: raw training rows (for statistics) and the split.
pub struct Prepared {
    pub training_id: String,
    pub train_raw: Dataset,
    pub validation_raw: Dataset,
}

pub struct Site {
    pub data: SiteData,
    pub features_from_plan: bool,
    cache: Option<Arc<Prepared>>,
}

impl Site {
    pub fn new(data: SiteData, features_from_plan: bool) -> Self {
        Site {
            data,
            features_from_plan,
            cache: None,
        }
    }

    /// Loads and splits the data for a training (once; later calls reuse it).
    pub fn prepare(&mut self, training_id: &str, plan: &TrainingPlan) -> Result<Arc<Prepared>> {
        if let Some(p) = self.cache.as_ref().filter(|p| p.training_id == training_id) {
            return Ok(p.clone());
        }
        let features = if self.features_from_plan {
            &plan.schema.feature_columns
        } else {
            &self.data.feature_columns
        };
        data::check_schema(&self.data.label_column, features, &plan.schema)?;
        let all = data::load_csvs(&self.data.files, &plan.schema)?;
        let (train_raw, validation_raw) =
            all.split_validation(plan.training.validation_fraction, plan.training.seed);
        if train_raw.is_empty() || validation_raw.is_empty() {
            return Err(sangsaeng_common::Error::Schema(format!(
                "{} rows are too few to keep a validation split of {:.0} %",
                all.len(),
                plan.training.validation_fraction * 100.0
            ))
            .into());
        }
        tracing::info!(
            training = training_id,
            rows = all.len(),
            train = train_raw.len(),
            validation = validation_raw.len(),
            "line data loaded and checked against the plan"
        );
        let p = Arc::new(Prepared {
            training_id: training_id.to_string(),
            train_raw,
            validation_raw,
        });
        self.cache = Some(p.clone());
        Ok(p)
    }

    /// The only thing about the rows that leaves the site before training.
    pub fn stats(p: &Prepared) -> FeatureStats {
        FeatureStats::of(&p.train_raw)
    }
}

/// Standardised copies of the split, for training and evaluation.
pub fn scaled(p: &Prepared, plan: &TrainingPlan) -> Result<(Dataset, Dataset)> {
    let scaling = plan.scaling.as_ref().ok_or_else(|| {
        sangsaeng_common::Error::Protocol("the plan has no scaling parameters yet".into())
    })?;
    let mut train = p.train_raw.clone();
    let mut val = p.validation_raw.clone();
    train.standardise(scaling)?;
    val.standardise(scaling)?;
    Ok((train, val))
}
