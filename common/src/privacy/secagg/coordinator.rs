//! The coordinator's side of one round, as a state machine of pure steps.
//!
//! The coordinator relays everything but can read nothing it is not meant to:
//! the shares travel sealed, and it learns a participant's secret only when t
//! of that participant's neighbours agree to reveal it. Its job here is
//! bookkeeping that must be consistent for the masks to cancel:
//! - who shared keys (U2): only they are anyone's mask partners, and a
//!   share pair is relayed only between two of them, so "i masks against j"
//!   holds exactly when "j masks against i";
//! - who sent a masked input (U3 = the survivors S): D = U2 \ U3 dropped;
//! - the same S and D in every unmasking request, so no honest participant
//!   refuses and none is asked for two kinds of share of one neighbour.
//!
//! The masked inputs themselves are summed outside (wrapping `i64` adds in
//! the accumulator); this object only records whose inputs were summed.

use std::collections::{BTreeMap, BTreeSet};

use super::keys::{Advert, KEY_LEN};
use super::mask::MaskSeed;
use super::protocol::{RoundConfig, UnmaskRequest, UnmaskResponse};
use super::sealed::SealedSharePair;
use super::shamir::{SecretKind, Share, reconstruct_mask_key, reconstruct_self_mask_seed};
use super::unmask::Unmasker;
use crate::Result;

/// Where the coordinator sends the relayed share pairs, and whose outboxes it
/// refused.
#[derive(Debug, Default)]
pub struct ShareRouting {
    /// Sealed pairs to deliver, by receiver.
    pub inboxes: BTreeMap<u32, Vec<SealedSharePair>>,
    /// Participants left out of the round at this step, with the reason.
    pub excluded: Vec<(u32, String)>,
}

/// A share that was left out so that a secret's reconstruction passed its
/// check: its holder most likely sent something other than what it was given
/// (certain if it was the only wrong share of that secret; see `shamir`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuspectShare {
    pub owner: u32,
    pub holder: u32,
    pub kind: SecretKind,
}

/// The coordinator in one attempt of one round.
#[derive(Debug)]
pub struct Coordinator {
    config: RoundConfig,
    adverts: BTreeMap<u32, Advert>,
    /// U2, once the shares were routed.
    shared: Option<BTreeSet<u32>>,
    /// U3 so far.
    masked: BTreeSet<u32>,
    /// Frozen once built: every survivor gets the one consistent view.
    requests: Option<BTreeMap<u32, UnmaskRequest>>,
    responses: BTreeMap<u32, UnmaskResponse>,
    suspects: Vec<SuspectShare>,
}

impl Coordinator {
    /// Starts a round from its configuration and the adverts received
    /// (signatures already verified). Adverts from unknown indices, two for one
    /// index, or keys advertised twice are refused.
    pub fn new(config: RoundConfig, adverts: Vec<Advert>) -> Result<Self> {
        let ctx = config.context();
        let n = config.graph().participants();
        let mut by_index = BTreeMap::new();
        let mut keys = BTreeSet::new();
        for advert in adverts {
            advert.validate(ctx)?;
            let i = advert.participant;
            if i >= n {
                return Err(ctx.error(format!(
                    "an advert names participant {i}, but the round has {n} participants"
                )));
            }
            if !keys.insert(advert.c_pk) || !keys.insert(advert.s_pk) {
                return Err(ctx.error(format!(
                    "participant {i}'s advert repeats a public key already advertised this round"
                )));
            }
            if by_index.insert(i, advert).is_some() {
                return Err(ctx.error(format!("two adverts for participant {i}")));
            }
        }
        Ok(Coordinator {
            config,
            adverts: by_index,
            shared: None,
            masked: BTreeSet::new(),
            requests: None,
            responses: BTreeMap::new(),
            suspects: Vec::new(),
        })
    }

    pub fn config(&self) -> &RoundConfig {
        &self.config
    }

    /// The adverts to relay to every participant (each needs its neighbours',
    /// and all of them to recompute the graph seed).
    pub fn adverts(&self) -> Vec<Advert> {
        self.adverts.values().cloned().collect()
    }

    fn advert(&self, i: u32) -> Result<&Advert> {
        self.adverts.get(&i).ok_or_else(|| {
            self.config
                .context()
                .error(format!("participant {i} never advertised keys"))
        })
    }

    fn advertised_neighbours(&self, i: u32) -> Result<BTreeSet<u32>> {
        Ok(self
            .config
            .graph()
            .neighbours(i)?
            .into_iter()
            .filter(|j| self.adverts.contains_key(j))
            .collect())
    }

    /// Step 2: takes each participant's outbox of sealed pairs and works out
    /// U2, the participants whose outbox holds exactly one pair for each
    /// neighbour that advertised. Each member of U2 gets the pairs its U2
    /// neighbours sealed for it. A malformed outbox excludes its sender (it
    /// does not stop the round).
    pub fn route_shares(
        &mut self,
        outboxes: Vec<(u32, Vec<SealedSharePair>)>,
    ) -> Result<ShareRouting> {
        let ctx = self.config.context().clone();
        if self.shared.is_some() {
            return Err(ctx.error("the round's shares were already routed"));
        }
        let mut routing = ShareRouting::default();
        let mut valid: BTreeMap<u32, Vec<SealedSharePair>> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for (sender, outbox) in outboxes {
            if !self.adverts.contains_key(&sender) {
                return Err(ctx.error(format!(
                    "shares from participant {sender}, which did not advertise keys"
                )));
            }
            if !seen.insert(sender) {
                return Err(ctx.error(format!("two outboxes from participant {sender}")));
            }
            let expected = self.advertised_neighbours(sender)?;
            let receivers: BTreeSet<u32> = outbox.iter().map(|s| s.receiver()).collect();
            let problem = if outbox.iter().any(|s| s.sender() != sender) {
                Some("its outbox holds pairs sealed by another sender".to_string())
            } else if receivers.len() != outbox.len() {
                Some("its outbox holds two pairs for one neighbour".to_string())
            } else if receivers != expected {
                Some(format!(
                    "its outbox is for participants {receivers:?}, not for its advertised neighbours {expected:?}"
                ))
            } else {
                None
            };
            match problem {
                Some(why) => routing.excluded.push((sender, why)),
                None => {
                    valid.insert(sender, outbox);
                }
            }
        }
        for i in self.adverts.keys() {
            if !seen.contains(i) {
                routing
                    .excluded
                    .push((*i, "it sent no shares (dropped before sharing keys)".into()));
            }
        }
        let shared: BTreeSet<u32> = valid.keys().copied().collect();
        for (_, outbox) in valid {
            for sealed in outbox {
                if shared.contains(&sealed.receiver()) {
                    routing
                        .inboxes
                        .entry(sealed.receiver())
                        .or_default()
                        .push(sealed);
                }
            }
        }
        for i in &shared {
            routing.inboxes.entry(*i).or_default();
        }
        self.shared = Some(shared);
        Ok(routing)
    }

    /// U2: the participants whose shares were relayed.
    pub fn shared(&self) -> Option<&BTreeSet<u32>> {
        self.shared.as_ref()
    }

    /// Step 3: records that `participant`'s masked input was summed in full.
    /// Call only after its last chunk was folded into the accumulator.
    pub fn record_masked_input(&mut self, participant: u32) -> Result<()> {
        let ctx = self.config.context();
        if self.requests.is_some() {
            return Err(ctx.error(format!(
                "participant {participant}'s masked input arrived after unmasking began; it cannot be counted"
            )));
        }
        let shared = self
            .shared
            .as_ref()
            .ok_or_else(|| ctx.error("masked input before the shares were routed"))?;
        if !shared.contains(&participant) {
            return Err(ctx.error(format!(
                "participant {participant} sent a masked input but did not share its keys"
            )));
        }
        if !self.masked.insert(participant) {
            return Err(ctx.error(format!(
                "participant {participant}'s masked input was already counted"
            )));
        }
        Ok(())
    }

    /// Step 4: closes the input collection and builds each survivor's
    /// unmasking request. Fails early, naming the participant, if some secret
    /// could never be recovered (fewer than t of its neighbours survived).
    pub fn unmask_requests(&mut self) -> Result<BTreeMap<u32, UnmaskRequest>> {
        if let Some(requests) = &self.requests {
            return Ok(requests.clone());
        }
        let ctx = self.config.context();
        let t = self.config.threshold();
        let graph = self.config.graph();
        let shared = self
            .shared
            .as_ref()
            .ok_or_else(|| ctx.error("unmasking before the shares were routed"))?;
        if self.masked.is_empty() {
            return Err(ctx.error("no participant sent a masked input"));
        }
        let dropped: BTreeSet<u32> = shared.difference(&self.masked).copied().collect();
        for (i, what) in self
            .masked
            .iter()
            .map(|i| (i, "survived"))
            .chain(dropped.iter().map(|d| (d, "dropped")))
        {
            let alive = graph
                .neighbours(*i)?
                .into_iter()
                .filter(|j| self.masked.contains(j))
                .count();
            if alive < t {
                return Err(ctx.error(format!(
                    "cannot unmask: participant {i} {what}, but only {alive} of its neighbours sent masked inputs and the threshold is {t}"
                )));
            }
        }
        let mut requests = BTreeMap::new();
        for i in &self.masked {
            let neighbours = graph.neighbours(*i)?;
            requests.insert(
                *i,
                UnmaskRequest {
                    dropped: neighbours
                        .iter()
                        .copied()
                        .filter(|j| dropped.contains(j))
                        .collect(),
                    survivors: neighbours
                        .iter()
                        .copied()
                        .filter(|j| self.masked.contains(j))
                        .collect(),
                },
            );
        }
        self.requests = Some(requests.clone());
        Ok(requests)
    }

    /// The survivors S (U3) and the dropped D = U2 \ U3.
    pub fn survivors(&self) -> &BTreeSet<u32> {
        &self.masked
    }

    pub fn dropped(&self) -> BTreeSet<u32> {
        self.shared
            .as_ref()
            .map(|s| s.difference(&self.masked).copied().collect())
            .unwrap_or_default()
    }

    /// Step 4: takes one survivor's answer. It must hold exactly the shares
    /// asked for, each at the x-coordinate its holder was given; anything else
    /// is refused and the answer ignored (the round can still complete from
    /// the others).
    pub fn receive_unmask_response(&mut self, response: UnmaskResponse) -> Result<()> {
        let ctx = self.config.context();
        let graph = self.config.graph();
        let r = response.participant;
        let requests = self
            .requests
            .as_ref()
            .ok_or_else(|| ctx.error(format!("participant {r} answered before any request")))?;
        let request = requests
            .get(&r)
            .ok_or_else(|| ctx.error(format!("participant {r} answered, but was not asked")))?;
        if self.responses.contains_key(&r) {
            return Err(ctx.error(format!("participant {r} answered twice")));
        }
        for (shares, asked, kind) in [
            (
                &response.self_mask_shares,
                &request.survivors,
                SecretKind::SelfMaskSeed,
            ),
            (
                &response.mask_key_shares,
                &request.dropped,
                SecretKind::MaskKey,
            ),
        ] {
            let owners: Vec<u32> = shares.iter().map(|(o, _)| *o).collect();
            let mut sorted = owners.clone();
            sorted.sort_unstable();
            if &sorted != asked {
                return Err(ctx.error(format!(
                    "participant {r} returned {kind} shares of participants {owners:?}, but was asked for those of {asked:?}"
                )));
            }
            for (owner, share) in shares {
                let x = graph.share_x(*owner, r)?;
                if share.x() != x {
                    return Err(ctx.error(format!(
                        "participant {r} returned its {kind} share of participant {owner} at x = {}, but its share is at x = {x}",
                        share.x()
                    )));
                }
            }
        }
        self.responses.insert(r, response);
        Ok(())
    }

    /// The shares of `owner`'s `kind` secret received so far, by holder.
    fn shares_of(&self, owner: u32, kind: SecretKind) -> Vec<(u32, Share)> {
        self.responses
            .values()
            .filter_map(|resp| {
                let list = match kind {
                    SecretKind::SelfMaskSeed => &resp.self_mask_shares,
                    SecretKind::MaskKey => &resp.mask_key_shares,
                };
                list.iter()
                    .find(|(o, _)| *o == owner)
                    .map(|(_, s)| (resp.participant, s.clone()))
            })
            .collect()
    }

    /// Step 4 (end): reconstructs and checks every secret needed, and returns
    /// the [`Unmasker`] for the masked sum. Fails, naming the participant,
    /// when fewer than t of its neighbours answered, or when its shares do not
    /// reconstruct the secret it signed for. Shares left out to make a
    /// reconstruction pass are listed by [`Coordinator::suspect_shares`].
    pub fn finish(&mut self) -> Result<Unmasker> {
        let ctx = self.config.context().clone();
        let t = self.config.threshold();
        if self.requests.is_none() {
            return Err(ctx.error("unmasking requests were never sent"));
        }
        let mut suspects = Vec::new();
        let mut seeds: BTreeMap<u32, MaskSeed> = BTreeMap::new();
        for j in &self.masked {
            let shares = self.shares_of(*j, SecretKind::SelfMaskSeed);
            let advert = self.advert(*j)?;
            let got = reconstruct_self_mask_seed(&ctx, *j, &shares, t, &advert.b_commitment)?;
            suspects.extend(got.suspect_holders.iter().map(|h| SuspectShare {
                owner: *j,
                holder: *h,
                kind: SecretKind::SelfMaskSeed,
            }));
            seeds.insert(*j, got.secret);
        }
        let mut keys = BTreeMap::new();
        for d in self.dropped() {
            let shares = self.shares_of(d, SecretKind::MaskKey);
            let advert = self.advert(d)?;
            let got = reconstruct_mask_key(&ctx, d, &shares, t, &advert.s_pk)?;
            suspects.extend(got.suspect_holders.iter().map(|h| SuspectShare {
                owner: d,
                holder: *h,
                kind: SecretKind::MaskKey,
            }));
            keys.insert(d, got.secret);
        }
        self.suspects = suspects;
        let s_pks: BTreeMap<u32, [u8; KEY_LEN]> =
            self.adverts.iter().map(|(i, a)| (*i, a.s_pk)).collect();
        Unmasker::new(&ctx, self.config.graph(), &s_pks, &self.masked, seeds, keys)
    }

    /// Shares that [`Coordinator::finish`] left out to make a reconstruction
    /// pass: their holders are suspected of sending wrong shares.
    pub fn suspect_shares(&self) -> &[SuspectShare] {
        &self.suspects
    }
}
