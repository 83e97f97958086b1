//! The session's secure-aggregation steps: the TrainTask of a secure round
//! (advertise fresh keys, then train), and each later step the coordinator
//! pushes (share keys, upload masked, answer the unmasking request). The
//! protocol's checks are in [`crate::secure`]; this is the conversation.

use std::sync::Arc;

use tonic::transport::Channel;

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::transfer::encoding;
use sangsaeng_common::transfer::wire;
use sangsaeng_proto::v1 as pb;
use sangsaeng_proto::v1::federation_client::FederationClient;

use super::{Session, upload};
use crate::error::{ParticipantError, Result};
use crate::secure::SecureRound;

fn protocol(m: String) -> ParticipantError {
    ParticipantError::Common(sangsaeng_common::Error::Protocol(m))
}

impl Session {
    /// Step 1 and local training: a fresh attempt's keys are advertised before
    /// training, so the key exchange overlaps it; the update waits (unmasked,
    /// in this site's memory only) for the neighbours' shares.
    pub(super) async fn train_secure(
        &mut self,
        client: &mut FederationClient<Channel>,
        tid: &str,
        round: u32,
        plan: &TrainingPlan,
        info: &pb::ModelInfo,
        secure: pb::SecureRound,
    ) -> Result<()> {
        if !plan.secure_aggregation() {
            return Err(protocol(
                "the round asks for secure aggregation but the plan does not set privacy.secure_aggregation".into(),
            ));
        }
        let same = self
            .secure
            .as_ref()
            .is_some_and(|s| s.matches(tid, round, secure.attempt));
        if !same {
            self.secure = Some(SecureRound::begin(&self.identity, tid, round, secure)?);
        }
        let attempt = self.secure.as_ref().expect("set above");
        client
            .secure_aggregation(attempt.advert_message())
            .await
            .map_err(|s| ParticipantError::rpc("SecureAggregation", s))?;
        tracing::info!(
            training = tid,
            round,
            participant = attempt.index(),
            "secure aggregation: keys advertised"
        );
        let reuse = self.pending.as_ref().is_some_and(|p| {
            p.training_id == tid && p.round == round && p.base_sha256 == info.sha256
        });
        if !reuse {
            let mut pending = self
                .compute_delta(client, tid, round, plan, info, None)
                .await?;
            // The values as the coordinator would decode them: masking works on
            // those, so the unmasked sum is the plain round's bit for bit.
            let mut values = Vec::with_capacity(pending.num_params as usize);
            for c in pending.chunks.iter() {
                values.extend(encoding::decode_chunk(c, pending.encoding)?);
            }
            pending.chunks = Arc::from(Vec::new());
            pending.values = Some(Arc::new(values));
            self.pending = Some(pending);
        }
        let dim = self.pending.as_ref().map_or(0, |p| p.num_params as usize);
        self.secure
            .as_mut()
            .expect("set above")
            .draw_noise_once(|| crate::privacy::noise_share(plan, dim))?;
        Ok(())
    }

    /// A later step of the attempt this site is in.
    pub(super) async fn secure_step(
        &mut self,
        client: &mut FederationClient<Channel>,
        tid: &str,
        round: u32,
        task: pb::SecureAggregationTask,
    ) -> Result<()> {
        let Some(attempt) = self
            .secure
            .as_mut()
            .filter(|s| s.matches(tid, round, task.attempt))
        else {
            return Err(ParticipantError::Refused(format!(
                "a secure-aggregation step for attempt {} of round {round}, which this site did not start (or restarted since)",
                task.attempt
            )));
        };
        use pb::secure_aggregation_task::Step;
        let reply = match task.step {
            None => return Err(protocol("a secure-aggregation task with no step".into())),
            Some(Step::ShareKeys(step)) => attempt.share_keys(&self.identity, &step)?,
            Some(Step::MaskInput(step)) => {
                attempt.receive_shares(&step)?;
                return self.upload_masked(client, tid, round).await;
            }
            Some(Step::Unmask(step)) => attempt.unmask(&step)?,
        };
        client
            .secure_aggregation(reply)
            .await
            .map_err(|s| ParticipantError::rpc("SecureAggregation", s))?;
        Ok(())
    }

    /// Step 3: the update, masked chunk by chunk as it is sent.
    async fn upload_masked(
        &mut self,
        client: &mut FederationClient<Channel>,
        tid: &str,
        round: u32,
    ) -> Result<()> {
        let attempt = self.secure.as_ref().expect("checked by the caller");
        let p = self
            .pending
            .as_ref()
            .filter(|p| p.training_id == tid && p.round == round)
            .ok_or_else(|| {
                ParticipantError::Refused(format!(
                    "asked for a masked update of round {round}, but this site has no update of that round"
                ))
            })?;
        let values = p
            .values
            .clone()
            .ok_or_else(|| protocol("the update was not prepared for masking".into()))?;
        let chunk_bytes = self.cfg.upload_chunk_bytes;
        let (algorithm, weight) = (p.algorithm, p.weight);
        let masker = attempt.masker();
        let (masked, digest) = tokio::task::spawn_blocking(move || {
            masker.chunks(values, weight, chunk_bytes, algorithm)
        })
        .await
        .map_err(|e| ParticipantError::Transfer(format!("masking thread: {e}")))??;
        let first_chunk = client
            .upload_progress(pb::UploadProgressRequest {
                training_id: tid.into(),
                round,
                delta_sha256: digest.clone(),
                reserve_slot: true,
            })
            .await
            .map_err(|s| ParticipantError::rpc("UploadProgress", s))?
            .into_inner()
            .next_chunk;
        let receipt = upload(
            client,
            wire::UpdateUpload {
                training_id: tid.into(),
                round,
                base_model_sha256: p.base_sha256.clone(),
                num_params: p.num_params,
                encoding: p.encoding,
                chunks: Arc::from(Vec::new()),
                delta_digest: digest,
                num_examples: p.num_examples,
                train_loss: p.train_loss,
                first_chunk,
                dp: p.dp,
                masked: Some(masked),
            },
        )
        .await?;
        self.pending = None;
        tracing::info!(
            training = tid,
            round,
            digest = receipt.sha256.get(..19).unwrap_or(&receipt.sha256),
            "masked update accepted by the coordinator"
        );
        Ok(())
    }
}
