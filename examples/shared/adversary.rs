//! A hostile supplier for attack studies: a site of the roster, with a
//! certificate like any other, that answers the statistics and trains on its
//! rows exactly as the daemon does, then sends its delta multiplied by a
//! factor (× 100: a scaling attack that would dominate FedAvg; × −10: a sign
//! flip that pushes the model away from where the others pull it).
//!
//! It is built from the participant library's own steps (site data, chunked
//! download, local training, upload), so only the multiplication differs from
//! an honest site. The daemon has no such switch: this lives with the examples.
//! (The label-flip attack needs no code: an ordinary daemon on a CSV whose
//! labels are rotated.)

use anyhow::Context;
use tonic::transport::Channel;

use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::learning::train::{self, LocalTraining};
use sangsaeng_common::transfer::digest::{self, DigestAlgorithm};
use sangsaeng_common::transfer::encoding::{self, UpdateEncoding};
use sangsaeng_common::transfer::wire::{self, plan_from_proto};
use sangsaeng_participant::ParticipantConfig;
use sangsaeng_participant::session;
use sangsaeng_participant::site::{self, Site};
use sangsaeng_proto::v1 as pb;
use sangsaeng_proto::v1::federation_client::FederationClient;

/// Runs the hostile site until its training ends: every delta it computes is
/// multiplied by `factor` before it is sent.
pub async fn run(cfg: ParticipantConfig, factor: f32) -> anyhow::Result<()> {
    let tls = cfg.tls.load()?;
    let channel =
        sangsaeng_common::identity::channel::connect(&cfg.coordinator, &tls, &cfg.server_name)
            .await?;
    let mut client = FederationClient::new(channel);
    let mut site = Site::new(cfg.data.clone(), cfg.features_from_plan);
    let mut tasks = client
        .subscribe(pb::SubscribeRequest::default())
        .await?
        .into_inner();
    while let Some(task) = tasks.message().await? {
        let tid = task.training_id.clone();
        match task.kind.clone() {
            Some(pb::task::Kind::Stats(s)) => {
                let plan = plan_from_proto(s.plan.as_ref().context("a plan")?)?;
                let stats = Site::stats(&*site.prepare(&tid, &plan)?);
                client
                    .submit_stats(pb::StatsReport {
                        training_id: tid,
                        count: stats.count,
                        sum: stats.sum,
                        sum_sq: stats.sum_sq,
                    })
                    .await?;
            }
            Some(pb::task::Kind::Train(t)) => {
                let plan = plan_from_proto(t.plan.as_ref().context("a plan")?)?;
                let info = t.model.context("a model")?;
                let prepared = site.prepare(&tid, &plan)?;
                let (train_set, _) = site::scaled(&prepared, &plan)?;
                let start = session::download(&mut client, &tid, &info).await?;
                let spec = ModelSpec::from_plan(&plan);
                let cfg_round = LocalTraining::from_plan(&plan, task.round);
                let out = train::train_local(cfg.backend, &spec, &start, &train_set, &cfg_round)?;
                let delta: Vec<f32> = out
                    .params
                    .iter()
                    .zip(&start)
                    .map(|(p, g)| (p - g) * factor)
                    .collect();
                let n = train_set.len() as u64;
                upload(&mut client, &task, &info, &delta, n).await?;
            }
            Some(pb::task::Kind::Evaluate(e)) => {
                // It reports its honest view of the model, as a quiet attacker would.
                let plan = plan_from_proto(e.plan.as_ref().context("a plan")?)?;
                let info = e.model.context("a model")?;
                let prepared = site.prepare(&tid, &plan)?;
                let (_, val) = site::scaled(&prepared, &plan)?;
                let params = session::download(&mut client, &tid, &info).await?;
                let ev = train::evaluate(cfg.backend, &ModelSpec::from_plan(&plan), &params, &val)?;
                client
                    .submit_evaluation(pb::EvaluationReport {
                        training_id: tid,
                        model_round: info.round,
                        num_examples: ev.n as u64,
                        loss: ev.loss,
                        accuracy: ev.accuracy,
                        macro_f1: ev.macro_f1,
                        regression: None,
                    })
                    .await?;
            }
            Some(pb::task::Kind::Finished(_)) => return Ok(()),
            _ => {}
        }
    }
    Ok(())
}

/// Sends `delta` as a float32 update of `n` examples. A refusal (say, by a
/// norm bound) is what the study measures, so it is logged, not an error.
async fn upload(
    client: &mut FederationClient<Channel>,
    task: &pb::Task,
    info: &pb::ModelInfo,
    delta: &[f32],
    n: u64,
) -> anyhow::Result<()> {
    let chunks: Vec<bytes::Bytes> =
        encoding::encode_chunks(delta, UpdateEncoding::Float32, 1 << 20)?
            .into_iter()
            .map(bytes::Bytes::from)
            .collect();
    let algorithm = DigestAlgorithm::announced_by(info);
    let mut h = digest::Hasher::new(algorithm);
    for c in &chunks {
        h.update(c);
    }
    let u = wire::UpdateUpload {
        training_id: task.training_id.clone(),
        round: task.round,
        base_model_sha256: info.sha256.clone(),
        num_params: info.num_params,
        encoding: UpdateEncoding::Float32,
        chunks: chunks.into(),
        delta_digest: h.finalize_id(),
        num_examples: n,
        train_loss: 0.0,
        first_chunk: 0,
        dp: None,
        masked: None,
    };
    if let Err(e) = session::upload(client, u).await {
        tracing::warn!(round = task.round, "the hostile update was refused: {e}");
    }
    Ok(())
}
