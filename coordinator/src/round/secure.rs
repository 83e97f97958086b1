//! The steps of a secure-aggregation round around the ordinary collection of
//! updates: the key exchange before it (adverts, then sealed shares), and the
//! unmasking after it closed (survivors reveal shares, the coordinator
//! removes the remaining masks from the accumulator).
//!
//! open attempt (TrainTask.secure) → adverts → ShareKeys tasks → shares →
//! MaskInput tasks → masked uploads (folded as they arrive, like plain ones) →
//! close → Unmask tasks → shares → unmask → the plain round's accumulator.
//!
//! Every wait is bounded by the round's deadline. A participant missing at a
//! step is left out of the rest of the attempt (as refused for the round); a
//! step that can no longer succeed returns FAILED_PRECONDITION, which the
//! driver answers by re-running the round with fresh keys.

use std::collections::BTreeSet;
use std::time::Duration;

use sangsaeng_common::aggregation::fedavg::Accumulator;
use sangsaeng_proto::v1 as pb;

use super::phase::wait_until;
use crate::error::{CoordinatorError, Result};
use crate::secure::{SecureAttempt, SecureRecord};
use crate::state::{Shared, Training};

/// Blocks of the accumulator unmasked at a time: a chunk's worth of words.
const UNMASK_BLOCK: usize = 1 << 17;

/// Starts attempt `attempt` of `round` over the training's selected
/// participants; returns what their TrainTask carries.
pub(super) fn open_attempt(t: &mut Training, round: u32, attempt: u32) -> Result<pb::SecureRound> {
    let secure = SecureAttempt::new(&t.id, round, attempt, &t.selected, &t.plan)?;
    let wire = secure.round.clone();
    tracing::info!(
        round,
        attempt,
        participants = wire.participants.len(),
        degree = wire.degree,
        threshold = wire.threshold,
        "secure aggregation: attempt opened"
    );
    t.secure = Some(secure);
    Ok(wire)
}

/// Whether everyone the attempt waits for at its current step has answered,
/// left, declined or been refused.
fn step_answered(shared: &Shared) -> bool {
    let guard = shared.training();
    let Some(t) = guard.as_ref() else { return true };
    let Some(secure) = t.secure.as_ref() else {
        return true;
    };
    secure
        .waiting_for()
        .iter()
        .all(|o| t.left.contains(o) || t.declined.contains_key(o) || t.rejected.contains_key(o))
}

/// Runs one step change on the attempt under the lock, leaves out whoever it
/// excluded (refused for the round, so it is not waited for) and sends the
/// tasks it made.
fn advance(
    shared: &Shared,
    step: impl FnOnce(&mut SecureAttempt, &str) -> Result<Vec<(String, pb::Task)>>,
) -> Result<()> {
    let tasks = {
        let mut guard = shared.training();
        let t = guard.as_mut().expect("a driver runs only with a training");
        let id = t.id.clone();
        let secure = t.secure.as_mut().ok_or_else(|| {
            CoordinatorError::FailedPrecondition("the secure attempt ended".into())
        })?;
        let tasks = step(secure, &id)?;
        for (org, why) in secure.excluded.clone() {
            if !t.rejected.contains_key(&org) {
                tracing::warn!(
                    org,
                    round = t.round,
                    "secure aggregation: left out of this attempt: {why}"
                );
                t.rejected.insert(org, why);
            }
        }
        tasks
    };
    for (org, task) in tasks {
        shared.send_task(&org, task);
    }
    shared.notify();
    Ok(())
}

/// Steps 1 and 2: waits for the adverts, relays them, waits for the sealed
/// shares and relays each participant its inbox, so that masked uploads can
/// start. Fails when too few advertised for any of them to share keys.
pub(super) async fn exchange_keys(
    shared: &Shared,
    training_id: &str,
    deadline: tokio::time::Instant,
) -> Result<()> {
    wait_until(shared, Some(deadline), step_answered).await?;
    advance(shared, |s, id| {
        let advertised = s.round.participants.len() - s.waiting_for().len();
        let needed = s.round.threshold as usize + 1;
        if advertised < needed {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "secure aggregation: only {advertised} of {} participants advertised keys; threshold {} needs at least {needed}",
                s.round.participants.len(),
                s.round.threshold
            )));
        }
        s.start_sharing(id)
    })?;
    wait_until(shared, Some(deadline), step_answered).await?;
    advance(shared, |s, id| s.start_masking(id))?;
    tracing::debug!(
        training = training_id,
        "secure aggregation: shares relayed; masked uploads may start"
    );
    Ok(())
}

/// Step 4, once the round closed: asks the survivors for the shares that
/// remove the remaining masks, waits for them (at most `wait`), and removes
/// the masks from `acc` off the runtime. Returns the unmasked accumulator —
/// the plain round's, bit for bit — and the attempt's account.
pub(super) async fn unmask_sum(
    shared: &Shared,
    training_id: &str,
    mut acc: Accumulator,
    wait: Duration,
) -> Result<(Accumulator, SecureRecord)> {
    advance(shared, |s, id| s.start_unmasking(id))?;
    let deadline = tokio::time::Instant::now() + wait;
    wait_until(shared, Some(deadline), step_answered).await?;
    let (unmasker, record) = {
        let mut guard = shared.training();
        let t = guard.as_mut().expect("a driver runs only with a training");
        let survivors: BTreeSet<String> = t.accepted.keys().cloned().collect();
        let mut secure = t.secure.take().ok_or_else(|| {
            CoordinatorError::FailedPrecondition("the secure attempt ended".into())
        })?;
        let unmasker = secure.finish()?;
        (unmasker, secure.record(&survivors))
    };
    tracing::info!(
        training = training_id,
        survivors = record.survivors.len(),
        dropped = record.dropped.len(),
        keystreams = unmasker.keystreams(),
        "secure aggregation: secrets reconstructed; removing the masks"
    );
    acc = tokio::task::spawn_blocking(move || {
        acc.correct_masked(UNMASK_BLOCK, |offset, sums| {
            unmasker.unmask_chunk(sums, offset)
        })?;
        Ok::<_, sangsaeng_common::Error>(acc)
    })
    .await
    .map_err(|e| CoordinatorError::Store(format!("unmasking the sum: {e}")))??;
    acc.check_sum()
        .map_err(|e| CoordinatorError::FailedPrecondition(format!("secure aggregation: {e}")))?;
    Ok((acc, record))
}
