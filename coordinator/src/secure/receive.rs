//! The `SecureAggregation` RPC: one step's answer from one participant,
//! checked against the training, round and attempt in progress and handed to
//! the attempt's bookkeeping. A refusal changes nothing; the round goes on
//! without whatever was refused (and the participant, if it cannot be
//! counted, is a dropout the protocol recovers from).

use sangsaeng_proto::v1 as pb;

use crate::error::{CoordinatorError, Result};
use crate::state::{Shared, current_training};

/// Takes `msg` from `org`, whose TLS leaf certificate is `cert` (DER).
pub fn receive(
    shared: &Shared,
    org: &str,
    cert: Vec<u8>,
    msg: pb::SecureAggregationMessage,
) -> Result<()> {
    let mut guard = shared.training();
    let t = current_training(&mut guard, &msg.training_id)?;
    let Some(attempt) = t.secure.as_mut() else {
        return Err(CoordinatorError::FailedPrecondition(format!(
            "training {} has no secure-aggregation round in progress",
            t.id
        )));
    };
    if msg.round != attempt.ctx.round() || msg.attempt != attempt.round.attempt {
        return Err(CoordinatorError::FailedPrecondition(format!(
            "the message is for attempt {} of round {}, but attempt {} of round {} is in progress",
            msg.attempt,
            msg.round,
            attempt.round.attempt,
            attempt.ctx.round()
        )));
    }
    use pb::secure_aggregation_message::Step;
    let step = msg.step.ok_or_else(|| {
        CoordinatorError::InvalidArgument("a secure-aggregation message with no step set".into())
    })?;
    let what = match step {
        Step::Advert(a) => {
            attempt.take_advert(org, a, cert)?;
            "key advert"
        }
        Step::Shares(s) => {
            attempt.take_shares(org, &s.sealed)?;
            "sealed key shares"
        }
        Step::Unmask(u) => {
            attempt.take_unmask(org, &u)?;
            "unmasking shares"
        }
    };
    tracing::debug!(
        org,
        round = msg.round,
        attempt = msg.attempt,
        "secure aggregation: {what} received"
    );
    drop(guard);
    shared.notify();
    Ok(())
}
