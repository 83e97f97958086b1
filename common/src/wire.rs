//! Conversions between protocol messages (`sangsaeng.v1`) and the crate's types.
//!
//! A plan received over the wire is validated exactly like a plan file: the
//! participant does not trust the coordinator to have sent something sensible.

use sangsaeng_proto::v1 as pb;

use crate::plan::{
    Activation, DataSchema, ModelConfig, Optimizer, Scaling, TrainingConfig, TrainingPlan,
};
use crate::{Error, Result};

pub fn plan_to_proto(p: &TrainingPlan) -> pb::TrainingPlan {
    let (mean, std) = p
        .scaling
        .as_ref()
        .map(|s| (s.mean.clone(), s.std.clone()))
        .unwrap_or_default();
    pb::TrainingPlan {
        feature_columns: p.schema.feature_columns.clone(),
        label_column: p.schema.label_column.clone(),
        classes: p.schema.classes.clone(),
        hidden_layers: p.model.hidden_layers.iter().map(|&w| w as u32).collect(),
        activation: activation_name(p.model.activation).into(),
        dropout: p.model.dropout,
        rounds: p.training.rounds,
        local_epochs: p.training.local_epochs,
        batch_size: p.training.batch_size as u32,
        optimizer: match p.training.optimizer {
            Optimizer::Sgd => "sgd",
            Optimizer::Adam => "adam",
        }
        .into(),
        learning_rate: p.training.learning_rate,
        validation_fraction: p.training.validation_fraction,
        seed: p.training.seed,
        scaling_mean: mean,
        scaling_std: std,
        min_participants: p.training.min_participants as u32,
        round_deadline_secs: p.training.round_deadline_secs,
        update_encoding: p.training.update_encoding.name().into(),
        skip_evaluation: !p.training.evaluate,
    }
}

pub fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::Relu => "relu",
        Activation::Tanh => "tanh",
        Activation::Gelu => "gelu",
    }
}

pub fn plan_from_proto(p: &pb::TrainingPlan) -> Result<TrainingPlan> {
    let bad = |m: String| Error::Protocol(format!("training plan from the coordinator: {m}"));
    let activation = match p.activation.as_str() {
        "relu" => Activation::Relu,
        "tanh" => Activation::Tanh,
        "gelu" => Activation::Gelu,
        other => return Err(bad(format!("unknown activation '{other}'"))),
    };
    let optimizer = match p.optimizer.as_str() {
        "sgd" => Optimizer::Sgd,
        "adam" => Optimizer::Adam,
        other => return Err(bad(format!("unknown optimizer '{other}'"))),
    };
    let scaling = if p.scaling_mean.is_empty() && p.scaling_std.is_empty() {
        None
    } else {
        Some(Scaling {
            mean: p.scaling_mean.clone(),
            std: p.scaling_std.clone(),
        })
    };
    let plan = TrainingPlan {
        schema: DataSchema {
            feature_columns: p.feature_columns.clone(),
            label_column: p.label_column.clone(),
            classes: p.classes.clone(),
        },
        model: ModelConfig {
            hidden_layers: p.hidden_layers.iter().map(|&w| w as usize).collect(),
            activation,
            dropout: p.dropout,
        },
        training: TrainingConfig {
            rounds: p.rounds,
            local_epochs: p.local_epochs,
            batch_size: p.batch_size as usize,
            optimizer,
            learning_rate: p.learning_rate,
            min_participants: p.min_participants as usize,
            round_deadline_secs: p.round_deadline_secs,
            validation_fraction: p.validation_fraction,
            seed: p.seed,
            update_encoding: crate::encoding::UpdateEncoding::from_name(&p.update_encoding)
                .map_err(|e| bad(e.to_string()))?,
            evaluate: !p.skip_evaluation,
        },
        scaling,
    };
    plan.validate().map_err(bad)?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_round_trips_through_the_wire() {
        let mut plan = TrainingPlan::from_toml(
            r#"
[schema]
feature_columns = ["a", "b"]
label_column = "y"
classes = ["ok", "bad"]
[model]
hidden_layers = [4, 3]
activation = "tanh"
dropout = 0.1
[training]
rounds = 2
learning_rate = 0.5
optimizer = "sgd"
min_participants = 1
seed = 42
"#,
            "t",
        )
        .unwrap();
        plan.scaling = Some(Scaling {
            mean: vec![1.0, 2.0],
            std: vec![0.5, 3.0],
        });
        assert_eq!(plan_from_proto(&plan_to_proto(&plan)).unwrap(), plan);
    }

    #[test]
    fn a_bad_plan_from_the_wire_is_refused() {
        let mut p = pb::TrainingPlan {
            activation: "relu".into(),
            optimizer: "adam".into(),
            ..Default::default()
        };
        assert!(
            plan_from_proto(&p)
                .unwrap_err()
                .to_string()
                .contains("feature_columns")
        );
        p.activation = "swish".into();
        assert!(
            plan_from_proto(&p)
                .unwrap_err()
                .to_string()
                .contains("swish")
        );
    }
}
