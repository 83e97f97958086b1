//! The mechanics every phase shares: who is eligible, sending a phase's task to
//! the selected participants, and waiting until they answered or the deadline passed.
//!
//! A phase sends one task to each selected participant and then waits until all
//! of them answered (or left, or declined) or the deadline passes.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::sleep_until;

use sangsaeng_common::aggregation::fedavg::Accumulator;
use sangsaeng_proto::v1 as pb;

use crate::durable::store::StoredContribution;
use crate::error::{CoordinatorError, Result};
use crate::state::{Phase, Shared, Training};

pub(super) fn task(training_id: &str, round: u32, kind: pb::task::Kind) -> pb::Task {
    pb::Task {
        training_id: training_id.to_string(),
        round,
        kind: Some(kind),
    }
}

/// Waits until `done` holds, the deadline passes (false) or the coordinator shuts down.
pub(super) async fn wait_until(
    shared: &Shared,
    deadline: Option<tokio::time::Instant>,
    mut done: impl FnMut(&Shared) -> bool,
) -> Result<bool> {
    loop {
        let notified = shared.progress.notified();
        tokio::pin!(notified);
        // Register before checking, so a change between the check and the await is not missed.
        notified.as_mut().enable();
        if done(shared) {
            return Ok(true);
        }
        let far = tokio::time::Instant::now() + Duration::from_secs(24 * 3600);
        tokio::select! {
            _ = &mut notified => {}
            _ = sleep_until(deadline.unwrap_or(far)) => {
                if deadline.is_some() { return Ok(done(shared)); }
            }
            _ = shared.shutdown.cancelled() => {
                return Err(CoordinatorError::Aborted("the coordinator is shutting down".into()));
            }
        }
    }
}

/// Participants eligible for the training: connected and not declined.
pub(super) fn eligible(shared: &Shared) -> BTreeSet<String> {
    let declined: BTreeSet<String> = shared
        .training()
        .as_ref()
        .map(|t| t.declined.keys().cloned().collect())
        .unwrap_or_default();
    shared
        .connected()
        .into_iter()
        .filter(|o| !declined.contains(o))
        .collect()
}

pub(super) fn set_phase(shared: &Shared, phase: Phase) {
    if let Some(t) = shared.training().as_mut() {
        t.phase = phase;
    }
}

/// Waits until at least `min` eligible participants are connected.
pub(super) async fn wait_for_participants(shared: &Shared, min: usize) -> Result<()> {
    if eligible(shared).len() < min {
        set_phase(shared, Phase::WaitingForParticipants);
        tracing::info!(
            connected = eligible(shared).len(),
            needed = min,
            "waiting for participants to connect"
        );
    }
    wait_until(shared, None, |s| eligible(s).len() >= min).await?;
    Ok(())
}

/// Sends a phase's task to every eligible participant and records who was asked.
///
/// `preload` are contributions to this training round already durably accepted
/// before a restart: they are folded in first and their senders are not asked again.
pub(super) fn open_phase(
    shared: &Shared,
    phase: Phase,
    round: u32,
    preload: Vec<StoredContribution>,
    make: impl FnOnce(&mut Training) -> Result<pb::Task>,
) -> Result<BTreeSet<String>> {
    let mut selected = eligible(shared);
    let task = {
        let mut guard = shared.training();
        let t = guard.as_mut().expect("a driver runs only with a training");
        t.phase = phase;
        t.round = round;
        t.stats.clear();
        t.accepted.clear();
        t.spilled.clear();
        t.rejected.clear();
        t.uploading.clear();
        t.evaluations.clear();
        t.left.clear();
        t.partial.clear();
        t.fold_time = Duration::ZERO;
        if phase == Phase::Training {
            let n = t.update_len(t.models[&(round - 1)].params.len());
            let mut acc = match t.spare_accumulator.take() {
                Some(mut acc) if acc.num_params() == n => {
                    acc.reset();
                    acc
                }
                _ => Accumulator::new(n),
            };
            for c in preload {
                let weight = t.fold_weight(c.num_examples);
                c.fold_into(&mut acc, weight)?;
                if super::aggregate::keeps_spills(&t.plan) {
                    t.spilled
                        .insert(c.org_id.clone(), c.spilled_update(weight)?);
                }
                selected.insert(c.org_id.clone());
                t.accepted.insert(c.org_id.clone(), c.accepted());
            }
            t.accumulator = Some(acc);
        }
        t.selected = selected.clone();
        let task = make(t)?;
        t.current_task = Some(task.clone());
        task
    };
    let asked: BTreeSet<String> = {
        let guard = shared.training();
        let t = guard.as_ref().expect("training");
        selected
            .iter()
            .filter(|o| !t.has_answered(o))
            .cloned()
            .collect()
    };
    for org in &asked {
        shared.send_task(org, task.clone());
    }
    Ok(selected)
}

/// True when every selected participant answered, left or declined. A participant
/// that only lost its connection is still waited for (until the deadline).
pub(super) fn all_answered(shared: &Shared) -> bool {
    let guard = shared.training();
    let Some(t) = guard.as_ref() else { return true };
    t.selected.iter().all(|o| t.has_answered(o))
}
