//! One attempt of a secure round, as the coordinator sees it: the round's
//! public parameters, the organisation behind each index, and the core state
//! machine (`sangsaeng_common::privacy::secagg::Coordinator`) fed with what
//! arrived. Pure bookkeeping under the training lock; nothing here waits.

use std::collections::{BTreeMap, BTreeSet};

use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::privacy::secagg::{
    self, Advert, RoundContext, SealedSharePair, UnmaskResponse, Unmasker, default_threshold, wire,
};
use sangsaeng_proto::v1 as pb;

use crate::error::{CoordinatorError, Result};

/// Where an attempt stands. Each stage accepts only its own messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for the selected participants' signed adverts.
    Advertising,
    /// Adverts relayed; waiting for each advertiser's sealed shares.
    Sharing,
    /// Shares relayed; waiting for masked uploads.
    Masking,
    /// Unmasking requests sent; waiting for the survivors' shares.
    Unmasking,
}

/// What the audit log and metrics line say of a secure round.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SecureRecord {
    /// Always true: the key's presence is what a release rule checks.
    pub secure_aggregation: bool,
    pub attempt: u32,
    pub participants: usize,
    pub degree: u32,
    pub threshold: u32,
    /// Organisations whose masked update is in the sum.
    pub survivors: Vec<String>,
    /// Organisations that shared keys but whose update is not in the sum:
    /// their pairwise masks were removed from their neighbours' shares.
    pub dropped: Vec<String>,
    /// Organisations left out before masking (no advert, no or bad shares), with why.
    pub excluded: BTreeMap<String, String>,
    /// Shares that did not fit their secret and were left out (their holders are suspects).
    pub suspect_shares: Vec<String>,
    /// Set when the coordinator restarted between committing the round and
    /// recording it: the round was secure (the plan allows nothing else), but
    /// its attempt's details (degree, threshold, who dropped) were in memory
    /// only and are reported as 0 / empty.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub recorded_after_restart: bool,
}

impl SecureRecord {
    /// What is known of a committed secure round after a restart.
    pub fn after_restart(survivors: Vec<String>) -> Self {
        SecureRecord {
            secure_aggregation: true,
            attempt: 0,
            participants: survivors.len(),
            degree: 0,
            threshold: 0,
            survivors,
            dropped: Vec::new(),
            excluded: BTreeMap::new(),
            suspect_shares: Vec::new(),
            recorded_after_restart: true,
        }
    }
}

/// One attempt of a secure round.
pub struct SecureAttempt {
    pub ctx: RoundContext,
    /// Which attempt of the round this is, from 1 (the audit log's count);
    /// the protocol's attempt id (`round.attempt`) is random instead.
    count: u32,
    pub round: pb::SecureRound,
    pub stage: Stage,
    index: BTreeMap<String, u32>,
    /// Signed adverts as relayed (certificates filled in from the TLS connection).
    adverts: BTreeMap<u32, (pb::SignedAdvert, Advert)>,
    outboxes: BTreeMap<u32, Vec<SealedSharePair>>,
    machine: Option<secagg::Coordinator>,
    answered_unmask: BTreeSet<u32>,
    pub excluded: BTreeMap<String, String>,
    /// The secure task each participant was last sent, resent if it reconnects.
    pending: BTreeMap<String, pb::Task>,
}

impl std::fmt::Debug for SecureAttempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureAttempt")
            .field("ctx", &self.ctx)
            .field("stage", &self.stage)
            .field("adverts", &self.adverts.len())
            .finish_non_exhaustive()
    }
}

/// Degree and threshold of a round with `n` participants under `plan`: the
/// plan's degree (at most n − 1, the complete graph) and threshold (default:
/// more than half of the neighbours).
pub fn parameters(plan: &TrainingPlan, n: usize) -> Result<(u32, u32)> {
    let p = plan.privacy.clone().unwrap_or_default();
    let complete = n.saturating_sub(1) as u32;
    let degree = p
        .secure_aggregation_degree
        .map_or(complete, |k| k.min(complete));
    let threshold = p
        .secure_aggregation_threshold
        .unwrap_or_else(|| default_threshold(degree) as u32);
    secagg::validate_threshold(threshold as usize, degree).map_err(|e| {
        CoordinatorError::FailedPrecondition(format!(
            "privacy.secure_aggregation_threshold does not fit a round of {n} participants: {e}"
        ))
    })?;
    Ok((degree, threshold))
}

fn refused(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::InvalidArgument(e.to_string())
}

impl SecureAttempt {
    /// Attempt `attempt` of `round` over the `selected` organisations (their
    /// order is their index: sorted, so every participant can check it).
    pub fn new(
        training_id: &str,
        round: u32,
        attempt: u32,
        selected: &BTreeSet<String>,
        plan: &TrainingPlan,
    ) -> Result<Self> {
        let (degree, threshold) = parameters(plan, selected.len())?;
        // Random, not the attempt's count: a coordinator restarted mid-round
        // counts from 1 again, and every key, share and advert is bound to the
        // id. A participant still holding the lost attempt's state must not take
        // the new one for it (its shares were sealed to keys that are gone).
        let id = loop {
            let id: u32 = rand::random();
            if id != 0 {
                break id;
            }
        };
        let ctx = wire::context(training_id, round, id).map_err(refused)?;
        let participants: Vec<String> = selected.iter().cloned().collect();
        Ok(SecureAttempt {
            ctx,
            index: participants
                .iter()
                .enumerate()
                .map(|(i, o)| (o.clone(), i as u32))
                .collect(),
            count: attempt,
            round: pb::SecureRound {
                attempt: id,
                participants,
                degree,
                threshold,
            },
            stage: Stage::Advertising,
            adverts: BTreeMap::new(),
            outboxes: BTreeMap::new(),
            machine: None,
            answered_unmask: BTreeSet::new(),
            excluded: BTreeMap::new(),
            pending: BTreeMap::new(),
        })
    }

    pub fn index_of(&self, org: &str) -> Result<u32> {
        self.index.get(org).copied().ok_or_else(|| {
            CoordinatorError::FailedPrecondition(format!(
                "this organisation is not in attempt {} of round {}",
                self.round.attempt,
                self.ctx.round()
            ))
        })
    }

    pub fn org_of(&self, i: u32) -> &str {
        self.round
            .participants
            .get(i as usize)
            .map_or("?", String::as_str)
    }

    fn expect_stage(&self, stage: Stage, what: &str) -> Result<()> {
        if self.stage != stage {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "{what} arrived while attempt {} of round {} is at step {:?}",
                self.round.attempt,
                self.ctx.round(),
                self.stage
            )));
        }
        Ok(())
    }

    /// Step 1: a participant's advert. The certificate is the caller's TLS
    /// certificate, so the advert's signature is checked here too: a bad one
    /// is refused at once rather than relayed to every neighbour.
    pub fn take_advert(&mut self, org: &str, mut a: pb::SignedAdvert, cert: Vec<u8>) -> Result<()> {
        self.expect_stage(Stage::Advertising, "an advert")?;
        let i = self.index_of(org)?;
        if a.participant != i || a.org_id != org {
            return Err(refused(format!(
                "the advert is for participant {} ('{}'), but the caller is participant {i} ('{org}')",
                a.participant, a.org_id
            )));
        }
        let advert = wire::advert_from_proto(&self.ctx, &a).map_err(refused)?;
        sangsaeng_common::identity::signing::Verifier::from_cert_der(&cert)
            .and_then(|v| v.verify(&advert.signing_bytes(&self.ctx), &a.signature))
            .map_err(|e| refused(format!("{}: the advert's signature: {e}", self.ctx)))?;
        if let Some((_, earlier)) = self.adverts.get(&i) {
            return match *earlier == advert {
                true => Ok(()),
                false => Err(CoordinatorError::AlreadyExists(format!(
                    "participant {i} already advertised other keys for this attempt"
                ))),
            };
        }
        a.certificate = cert.into();
        self.adverts.insert(i, (a, advert));
        Ok(())
    }

    /// Organisations still expected at the current stage.
    pub fn waiting_for(&self) -> BTreeSet<String> {
        let done: BTreeSet<u32> = match self.stage {
            Stage::Advertising => self.adverts.keys().copied().collect(),
            Stage::Sharing => self.outboxes.keys().copied().collect(),
            Stage::Masking => return BTreeSet::new(),
            Stage::Unmasking => self.answered_unmask.clone(),
        };
        let expected: BTreeSet<u32> = match self.stage {
            Stage::Advertising => self.index.values().copied().collect(),
            Stage::Sharing => self.adverts.keys().copied().collect(),
            _ => self.unmask_expected(),
        };
        expected
            .difference(&done)
            .map(|i| self.org_of(*i).to_string())
            .collect()
    }

    fn unmask_expected(&self) -> BTreeSet<u32> {
        self.pending
            .keys()
            .filter_map(|o| self.index.get(o).copied())
            .collect()
    }

    /// Closes step 1: participants that did not advertise are excluded, and
    /// every advertiser gets the adverts (task per organisation).
    pub fn start_sharing(&mut self, training_id: &str) -> Result<Vec<(String, pb::Task)>> {
        self.expect_stage(Stage::Advertising, "sharing")?;
        for (org, i) in &self.index {
            if !self.adverts.contains_key(i) {
                self.excluded
                    .insert(org.clone(), "sent no key advert in time".into());
            }
        }
        let adverts: Vec<Advert> = self.adverts.values().map(|(_, a)| a.clone()).collect();
        let config = wire::round_config(&self.ctx, &self.round, &adverts).map_err(refused)?;
        self.machine = Some(secagg::Coordinator::new(config, adverts).map_err(refused)?);
        self.stage = Stage::Sharing;
        let step = pb::secure_aggregation_task::Step::ShareKeys(pb::ShareKeysStep {
            adverts: self.adverts.values().map(|(p, _)| p.clone()).collect(),
        });
        let orgs: Vec<String> = self
            .adverts
            .keys()
            .map(|i| self.org_of(*i).to_string())
            .collect();
        Ok(self.tasks(training_id, orgs, |_| step.clone()))
    }

    fn tasks(
        &mut self,
        training_id: &str,
        orgs: Vec<String>,
        step: impl Fn(&str) -> pb::secure_aggregation_task::Step,
    ) -> Vec<(String, pb::Task)> {
        self.pending.clear();
        orgs.into_iter()
            .map(|org| {
                let task = pb::Task {
                    training_id: training_id.to_string(),
                    round: self.ctx.round(),
                    kind: Some(pb::task::Kind::Secure(pb::SecureAggregationTask {
                        attempt: self.round.attempt,
                        step: Some(step(&org)),
                    })),
                };
                self.pending.insert(org.clone(), task.clone());
                (org, task)
            })
            .collect()
    }

    /// The secure task `org` waits on, if any (resent when it reconnects).
    pub fn pending_task(&self, org: &str) -> Option<pb::Task> {
        self.pending.get(org).cloned()
    }

    /// Step 2: a participant's sealed shares (parsed; routing checks them).
    pub fn take_shares(&mut self, org: &str, sealed: &[Vec<u8>]) -> Result<()> {
        self.expect_stage(Stage::Sharing, "key shares")?;
        let i = self.index_of(org)?;
        if !self.adverts.contains_key(&i) {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "participant {i} did not advertise keys in time; it is not in this attempt"
            )));
        }
        if self.outboxes.contains_key(&i) {
            return Err(CoordinatorError::AlreadyExists(format!(
                "participant {i} already sent its shares for this attempt"
            )));
        }
        let max = self.round.participants.len();
        if sealed.len() > max {
            return Err(refused(format!(
                "{} sealed shares for a round of {max} participants",
                sealed.len()
            )));
        }
        let parsed = sealed
            .iter()
            .map(|b| wire::sealed_from_proto(&self.ctx, b))
            .collect::<sangsaeng_common::Result<Vec<_>>>()
            .map_err(refused)?;
        self.outboxes.insert(i, parsed);
        Ok(())
    }

    /// Closes step 2: relays each member of U2 its inbox. Participants whose
    /// outbox was missing or malformed are excluded.
    pub fn start_masking(&mut self, training_id: &str) -> Result<Vec<(String, pb::Task)>> {
        self.expect_stage(Stage::Sharing, "masking")?;
        let machine = self.machine.as_mut().expect("sharing has a state machine");
        let routing = machine
            .route_shares(std::mem::take(&mut self.outboxes).into_iter().collect())
            .map_err(refused)?;
        for (i, why) in routing.excluded {
            let org = self.org_of(i).to_string();
            self.excluded.entry(org).or_insert(why);
        }
        self.stage = Stage::Masking;
        let inboxes: BTreeMap<String, pb::secure_aggregation_task::Step> = routing
            .inboxes
            .into_iter()
            .map(|(i, inbox)| {
                let step = pb::secure_aggregation_task::Step::MaskInput(pb::MaskInputStep {
                    sealed: wire::sealed_to_proto(&inbox),
                });
                (self.org_of(i).to_string(), step)
            })
            .collect();
        let orgs = inboxes.keys().cloned().collect();
        Ok(self.tasks(training_id, orgs, |o| inboxes[o].clone()))
    }

    /// Whether `org` may upload a masked update under `input` now.
    pub fn check_upload(&self, org: &str, input: &pb::SecureInput) -> Result<()> {
        let i = self.index_of(org)?;
        if input.attempt != self.round.attempt || input.participant != i {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "the update is masked for attempt {} as participant {}, but this is attempt {} and the caller is participant {i}",
                input.attempt, input.participant, self.round.attempt
            )));
        }
        self.expect_stage(Stage::Masking, "a masked update")?;
        let shared = self.machine.as_ref().and_then(|m| m.shared());
        if !shared.is_some_and(|s| s.contains(&i)) {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "participant {i} is not among those whose shares were relayed, so its masks could never be removed"
            )));
        }
        Ok(())
    }

    /// Step 3: `org`'s masked update was folded in full and accepted.
    pub fn masked_input_accepted(&mut self, org: &str) -> Result<()> {
        let i = self.index_of(org)?;
        let machine = self.machine.as_mut().expect("masking has a state machine");
        machine.record_masked_input(i).map_err(refused)
    }

    /// Closes step 3: the unmasking request of each survivor. Fails (the round
    /// must re-run) when some secret could never be recovered.
    pub fn start_unmasking(&mut self, training_id: &str) -> Result<Vec<(String, pb::Task)>> {
        self.expect_stage(Stage::Masking, "unmasking")?;
        let machine = self.machine.as_mut().expect("masking has a state machine");
        let requests = machine
            .unmask_requests()
            .map_err(|e| CoordinatorError::FailedPrecondition(e.to_string()))?;
        self.stage = Stage::Unmasking;
        let steps: BTreeMap<String, pb::secure_aggregation_task::Step> = requests
            .iter()
            .map(|(i, r)| {
                let step =
                    pb::secure_aggregation_task::Step::Unmask(wire::unmask_request_to_proto(r));
                (self.org_of(*i).to_string(), step)
            })
            .collect();
        let orgs = steps.keys().cloned().collect();
        Ok(self.tasks(training_id, orgs, |o| steps[o].clone()))
    }

    /// Step 4: a survivor's shares. A wrong answer is refused whole; the others
    /// may still suffice.
    pub fn take_unmask(&mut self, org: &str, shares: &pb::UnmaskShares) -> Result<()> {
        self.expect_stage(Stage::Unmasking, "unmasking shares")?;
        let i = self.index_of(org)?;
        let response: UnmaskResponse =
            wire::unmask_response_from_proto(&self.ctx, i, shares).map_err(refused)?;
        let machine = self
            .machine
            .as_mut()
            .expect("unmasking has a state machine");
        machine.receive_unmask_response(response).map_err(refused)?;
        self.answered_unmask.insert(i);
        Ok(())
    }

    /// Closes step 4: reconstructs the secrets and returns the correction.
    pub fn finish(&mut self) -> Result<Unmasker> {
        self.expect_stage(Stage::Unmasking, "finishing")?;
        self.pending.clear();
        let machine = self
            .machine
            .as_mut()
            .expect("unmasking has a state machine");
        machine
            .finish()
            .map_err(|e| CoordinatorError::FailedPrecondition(e.to_string()))
    }

    /// The attempt's account for the audit log, once finished.
    pub fn record(&self, survivors: &BTreeSet<String>) -> SecureRecord {
        let shared: BTreeSet<String> = self
            .machine
            .as_ref()
            .and_then(|m| m.shared())
            .map(|s| s.iter().map(|i| self.org_of(*i).to_string()).collect())
            .unwrap_or_default();
        let suspects = self
            .machine
            .as_ref()
            .map(|m| {
                m.suspect_shares()
                    .iter()
                    .map(|s| {
                        format!(
                            "{}'s {} share of {}",
                            self.org_of(s.holder),
                            s.kind,
                            self.org_of(s.owner)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        SecureRecord {
            secure_aggregation: true,
            attempt: self.count,
            participants: self.round.participants.len(),
            degree: self.round.degree,
            threshold: self.round.threshold,
            survivors: survivors.iter().cloned().collect(),
            dropped: shared.difference(survivors).cloned().collect(),
            excluded: self.excluded.clone(),
            suspect_shares: suspects,
            recorded_after_restart: false,
        }
    }
}
