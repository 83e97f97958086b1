//! Conversions between protocol messages (`sangsaeng.v1`) and the crate's types.
//!
//! A plan received over the wire is validated exactly like a plan file: the
//! participant does not trust the coordinator to have sent something sensible.
//! [`upload_messages`] builds the one form of an update upload that participants
//! send, so that the figures measured on it are those of the real stream.

use std::sync::Arc;

use sangsaeng_proto::v1 as pb;

use crate::config::plan::{
    Activation, DataSchema, Loss, ModelConfig, Optimizer, Scaling, Task, TrainingConfig,
    TrainingPlan,
};
use crate::config::privacy::{DpConfig, DpLevel, PrivacyConfig};
use crate::transfer::digest::DigestAlgorithm;
use crate::transfer::encoding::UpdateEncoding;
use crate::{Error, Result};

pub fn plan_to_proto(p: &TrainingPlan) -> pb::TrainingPlan {
    let (mean, std) = p
        .scaling
        .as_ref()
        .map(|s| (s.mean.clone(), s.std.clone()))
        .unwrap_or_default();
    let (target_mean, target_std) = p
        .scaling
        .as_ref()
        .and_then(Scaling::target)
        .unwrap_or_default();
    pb::TrainingPlan {
        feature_columns: p.schema.feature_columns.clone(),
        label_column: p.schema.target().to_owned(),
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
        proximal_mu: p.training.proximal_mu,
        dp: p
            .privacy
            .as_ref()
            .and_then(|p| p.dp.as_ref())
            .map(dp_to_proto),
        secure_aggregation: p.secure_aggregation(),
        secure_aggregation_threshold: p
            .privacy
            .as_ref()
            .and_then(|p| p.secure_aggregation_threshold)
            .unwrap_or(0),
        secure_aggregation_degree: p
            .privacy
            .as_ref()
            .and_then(|p| p.secure_aggregation_degree)
            .unwrap_or(0),
        task: p.schema.task.name().into(),
        loss: p.training.loss.map(Loss::name).unwrap_or_default().into(),
        huber_delta: p.training.huber_delta,
        scaling_target_mean: target_mean,
        scaling_target_std: target_std,
    }
}

fn dp_to_proto(dp: &DpConfig) -> pb::DifferentialPrivacy {
    pb::DifferentialPrivacy {
        level: dp.level.name().into(),
        target_epsilon: dp.target_epsilon,
        delta: dp.delta,
        noise_multiplier: dp.noise_multiplier.unwrap_or(0.0),
        max_grad_norm: dp.max_grad_norm.unwrap_or(0.0),
        clip_norm: dp.clip_norm.unwrap_or(0.0),
    }
}

/// The plan's `[privacy]` from the wire; validated with the rest of the plan.
fn privacy_from_proto(p: &pb::TrainingPlan) -> Result<Option<PrivacyConfig>> {
    let set = |v: u32| (v != 0).then_some(v);
    let secure = PrivacyConfig {
        dp: None,
        secure_aggregation: p.secure_aggregation,
        secure_aggregation_threshold: set(p.secure_aggregation_threshold),
        secure_aggregation_degree: set(p.secure_aggregation_degree),
    };
    let dp = dp_from_proto(p.dp.as_ref())?;
    Ok(match (dp, p.secure_aggregation) {
        (None, false) => None,
        (dp, _) => Some(PrivacyConfig { dp, ..secure }),
    })
}

fn dp_from_proto(dp: Option<&pb::DifferentialPrivacy>) -> Result<Option<DpConfig>> {
    let Some(dp) = dp else { return Ok(None) };
    let level = match dp.level.as_str() {
        "record" => DpLevel::Record,
        "client" => DpLevel::Client,
        other => {
            return Err(Error::Protocol(format!(
                "plan: privacy.dp.level '{other}' is not \"record\" or \"client\""
            )));
        }
    };
    // Zero is proto3's "unset" for the optional figures.
    let set = |v: f64| (v != 0.0).then_some(v);
    Ok(Some(DpConfig {
        level,
        target_epsilon: dp.target_epsilon,
        delta: dp.delta,
        noise_multiplier: set(dp.noise_multiplier),
        max_grad_norm: set(dp.max_grad_norm),
        clip_norm: set(dp.clip_norm),
    }))
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
    let task = Task::from_name(&p.task).ok_or_else(|| bad(format!("unknown task '{}'", p.task)))?;
    let loss = match p.loss.as_str() {
        "" => None,
        name => Some(Loss::from_name(name).ok_or_else(|| bad(format!("unknown loss '{name}'")))?),
    };
    let regression = task == Task::Regression;
    let scaling = if p.scaling_mean.is_empty() && p.scaling_std.is_empty() {
        None
    } else {
        Some(Scaling {
            mean: p.scaling_mean.clone(),
            std: p.scaling_std.clone(),
            // Zero is proto3's "unset"; a regression plan's validation refuses it.
            target_mean: regression.then_some(p.scaling_target_mean),
            target_std: regression.then_some(p.scaling_target_std),
        })
    };
    let (label_column, target_column) = if regression {
        (String::new(), p.label_column.clone())
    } else {
        (p.label_column.clone(), String::new())
    };
    let plan = TrainingPlan {
        schema: DataSchema {
            task,
            feature_columns: p.feature_columns.clone(),
            label_column,
            classes: p.classes.clone(),
            target_column,
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
            update_encoding: crate::transfer::encoding::UpdateEncoding::from_name(
                &p.update_encoding,
            )
            .map_err(|e| bad(e.to_string()))?,
            evaluate: !p.skip_evaluation,
            proximal_mu: p.proximal_mu,
            loss,
            // Zero: an older coordinator, which only trains classifiers.
            huber_delta: if p.huber_delta == 0.0 {
                1.0
            } else {
                p.huber_delta
            },
        },
        privacy: privacy_from_proto(p)?,
        // How the coordinator aggregates is its own business: sites train the
        // same way whatever it is.
        aggregation: None,
        scaling,
    };
    plan.validate().map_err(bad)?;
    Ok(plan)
}

/// One weight delta to upload: everything an `UploadUpdate` stream carries.
#[derive(Debug, Clone)]
pub struct UpdateUpload {
    pub training_id: String,
    pub round: u32,
    /// Lowercase hex SHA-256 of the model the delta starts from (`ModelInfo.sha256`).
    pub base_model_sha256: String,
    pub num_params: u64,
    pub encoding: UpdateEncoding,
    /// The delta's encoded chunks (`encoding::encode_chunks`), shared: each
    /// message refers to its chunk rather than copying it, so a participant
    /// keeping the chunks for a resumed upload holds them once, not once more
    /// per attempt.
    pub chunks: Arc<[bytes::Bytes]>,
    /// Digest id (`digest`: SHA-256 hex, or `blake3:` and hex) of all chunks'
    /// bytes, declared up front so that a broken-off upload can be resumed.
    pub delta_digest: String,
    pub num_examples: u64,
    pub train_loss: f64,
    /// 0 for a new upload; the coordinator's `next_chunk` to resume one.
    pub first_chunk: u32,
    /// What record-level DP-SGD spent at the site (`None` without it).
    pub dp: Option<pb::DpSpend>,
    /// A secure-aggregation upload: its chunks are made as they are sent
    /// (`chunks` is then unused), so the site never holds the masked update
    /// whole.
    pub masked: Option<MaskedChunks>,
}

impl std::fmt::Debug for MaskedChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskedChunks")
            .field("input", &self.input)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

/// The chunks of a masked upload, made on demand: chunk `i` of `count`.
#[derive(Clone)]
pub struct MaskedChunks {
    pub input: pb::SecureInput,
    pub count: usize,
    /// Chunk `i`'s bytes; `None` ends the stream early (the coordinator then
    /// refuses the truncated upload), for a failure already logged.
    pub chunk: Arc<dyn Fn(usize) -> Option<bytes::Bytes> + Send + Sync>,
}

/// The messages of the `UploadUpdate` stream for `u`, in order: the header, the
/// chunks from `first_chunk`, and a trailer that leaves the declared whole digest
/// implicit. Each chunk is checked by its CRC-32C, so the whole-delta hash (which
/// the caller computed) is the one pass of a hash over each byte. Digests travel
/// as their 32 raw bytes (half the size of hex, which on the example's
/// 5,769-parameter model is 2 % of an int8 update). Each chunk moves into its
/// message only when the stream is polled for it, by reference.
pub fn upload_messages(
    u: UpdateUpload,
) -> Result<impl Iterator<Item = pb::UpdateMessage> + Send + 'static> {
    use pb::update_message::Part;
    let raw = |id: &str, what: &str| -> Result<Vec<u8>> {
        crate::transfer::digest::raw_of_id(id)
            .map(Vec::from)
            .ok_or_else(|| Error::Protocol(format!("{what} '{id}' is not a 32-byte hex digest")))
    };
    if DigestAlgorithm::of_id(&u.base_model_sha256) != DigestAlgorithm::Sha256 {
        return Err(Error::Protocol(format!(
            "the base model's digest '{}' must be its SHA-256 (ModelInfo.sha256)",
            u.base_model_sha256
        )));
    }
    let header = Part::Header(pb::UpdateHeader {
        training_id: u.training_id,
        round: u.round,
        base_model_digest: raw(&u.base_model_sha256, "the base model's digest")?,
        num_params: u.num_params,
        num_examples: u.num_examples,
        train_loss: u.train_loss,
        delta_digest: raw(&u.delta_digest, "the delta's digest")?,
        delta_digest_algorithm: DigestAlgorithm::of_id(&u.delta_digest).to_wire() as i32,
        first_chunk: u.first_chunk,
        encoding: u.encoding.name().into(),
        dp: u.dp,
        secure: u.masked.as_ref().map(|m| m.input),
        ..Default::default()
    });
    let all = u.chunks;
    let (count, masked) = match u.masked {
        Some(m) => (m.count, Some(m.chunk)),
        None => (all.len(), None),
    };
    let chunks = (u.first_chunk as usize..count).map_while(move |i| {
        let data = match &masked {
            Some(make) => make(i)?,
            None => all[i].clone(),
        };
        Some(Part::Chunk(pb::UpdateChunk {
            index: i as u32,
            crc32c: Some(crc32c::crc32c(&data)),
            data,
            ..Default::default()
        }))
    });
    let trailer = Part::Trailer(pb::UpdateTrailer::default());
    Ok(std::iter::once(header)
        .chain(chunks)
        .chain(std::iter::once(trailer))
        .map(|p| pb::UpdateMessage { part: Some(p) }))
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
proximal_mu = 0.01
"#,
            "t",
        )
        .unwrap();
        plan.scaling = Some(Scaling {
            mean: vec![1.0, 2.0],
            std: vec![0.5, 3.0],
            ..Default::default()
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
        let mut good = plan_to_proto(&TrainingPlan::from_toml(
            "[schema]\nfeature_columns = [\"a\"]\nlabel_column = \"y\"\nclasses = [\"0\", \"1\"]\n\
             [model]\nhidden_layers = [2]\n[training]\nrounds = 1\nlearning_rate = 0.1\nmin_participants = 1\n",
            "t",
        )
        .unwrap());
        for mu in [f64::NAN, -0.1, 1e6] {
            good.proximal_mu = mu;
            let err = plan_from_proto(&good).unwrap_err().to_string();
            assert!(err.contains("training.proximal_mu"), "{mu}: {err}");
        }
    }

    #[test]
    fn an_upload_header_carries_its_digests_raw_with_the_delta_s_algorithm() {
        use crate::transfer::digest::{self, DigestAlgorithm};
        let base = digest::digest(DigestAlgorithm::Sha256, b"model");
        let delta = digest::digest(DigestAlgorithm::Blake3, b"delta");
        let upload = |delta_digest: String, base_model_sha256: String| UpdateUpload {
            training_id: "t".into(),
            round: 1,
            base_model_sha256,
            num_params: 1,
            encoding: UpdateEncoding::Float32,
            chunks: vec![bytes::Bytes::from_static(&[0, 0, 0, 0])].into(),
            delta_digest,
            num_examples: 1,
            train_loss: 0.0,
            first_chunk: 0,
            dp: None,
            masked: None,
        };
        let header = |u: UpdateUpload| match upload_messages(u).unwrap().next() {
            Some(pb::UpdateMessage {
                part: Some(pb::update_message::Part::Header(h)),
            }) => h,
            other => panic!("not a header: {other:?}"),
        };
        let h = header(upload(
            DigestAlgorithm::Blake3.id(&delta),
            hex::encode(base),
        ));
        assert_eq!(h.delta_digest, delta);
        assert_eq!(h.delta_digest_algorithm, pb::DigestAlgorithm::Blake3 as i32);
        assert_eq!(h.base_model_digest, base);
        assert!(h.delta_sha256.is_empty() && h.base_model_sha256.is_empty());

        let h = header(upload(hex::encode(delta), hex::encode(base)));
        assert_eq!(h.delta_digest_algorithm, pb::DigestAlgorithm::Sha256 as i32);

        // The base model is named by its SHA-256 identity only.
        let e = upload_messages(upload(
            hex::encode(delta),
            DigestAlgorithm::Blake3.id(&base),
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("must be its SHA-256"), "{e}");
        let e = upload_messages(upload("blake3:12".into(), hex::encode(base)))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a 32-byte hex digest"), "{e}");
    }
}
