//! The participant's side of one round, as a state machine of pure steps:
//! no networking, no clock. Each step checks what the coordinator sent
//! against what this participant already knows before it reveals anything.
//!
//! Steps, in order (each once, except masking and unmasking):
//! [`Participant::new`] → [`Participant::share_keys`] →
//! [`Participant::receive_shares`] → [`Participant::mask_chunk`] (per chunk)
//! → [`Participant::unmask`] (per request).
//!
//! The participant's memory of what it revealed lives in this object, with
//! the round's keys: if either is lost (a restart), both are, and the round's
//! secrets can no longer be revealed at all. Whoever persists one must
//! persist the other.

use std::collections::{BTreeMap, BTreeSet};

use super::agreement::{Party, pairwise_mask_seed};
use super::context::RoundContext;
use super::graph::Graph;
use super::keys::{Advert, RoundKeys};
use super::mask::{MaskSeed, MaskWord, mask_chunk};
use super::protocol::{RoundConfig, UnmaskRequest, UnmaskResponse};
use super::sealed::{SealedSharePair, SharePair, open, seal};
use super::shamir::{SecretKind, split};
use crate::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Advertised,
    SharesSent,
    Masking,
    Unmasking,
}

/// One participant in one attempt of one round.
pub struct Participant {
    ctx: RoundContext,
    index: u32,
    keys: RoundKeys,
    advert: Advert,
    stage: Stage,
    config: Option<RoundConfig>,
    /// Adverts of the neighbours that advertised, by index.
    neighbours: BTreeMap<u32, Advert>,
    /// Shares received from neighbours, by owner.
    held: BTreeMap<u32, SharePair>,
    /// Pairwise seeds with the neighbours whose shares arrived.
    pairwise: Vec<(u32, MaskSeed)>,
    /// Which secret of each neighbour a share was revealed of.
    revealed: BTreeMap<u32, SecretKind>,
}

impl Participant {
    /// Starts participant `index` (organisation `org_id`) in round `ctx` with
    /// fresh keys. Sign `participant.advert().signing_bytes(ctx)` and send it.
    pub fn new(ctx: RoundContext, index: u32, org_id: &str) -> Result<Self> {
        Participant::with_keys(ctx, index, org_id, RoundKeys::generate()?)
    }

    /// As [`Participant::new`] with given keys (tests; restoring a round).
    pub fn with_keys(ctx: RoundContext, index: u32, org_id: &str, keys: RoundKeys) -> Result<Self> {
        let advert = keys.advert(&ctx, index, org_id)?;
        Ok(Participant {
            ctx,
            index,
            keys,
            advert,
            stage: Stage::Advertised,
            config: None,
            neighbours: BTreeMap::new(),
            held: BTreeMap::new(),
            pairwise: Vec::new(),
            revealed: BTreeMap::new(),
        })
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn advert(&self) -> &Advert {
        &self.advert
    }

    /// The neighbours this participant masks against (known after
    /// [`Participant::receive_shares`]).
    pub fn mask_partners(&self) -> Vec<u32> {
        self.pairwise.iter().map(|(j, _)| *j).collect()
    }

    fn refuse(&self, why: impl std::fmt::Display) -> crate::Error {
        self.ctx.error(format!("participant {}: {why}", self.index))
    }

    fn config(&self) -> Result<&RoundConfig> {
        self.config
            .as_ref()
            .ok_or_else(|| self.refuse("the round's configuration is not known yet"))
    }

    /// Step 2: given the round's configuration and the adverts (signatures
    /// already verified), Shamir-shares b and s_sk among the neighbours and
    /// returns one sealed pair per neighbour that advertised.
    ///
    /// Runs once: sharing again would hand each neighbour a second,
    /// independent share of the same secrets, and two sets of shares together
    /// can fall below the threshold.
    pub fn share_keys(
        &mut self,
        config: RoundConfig,
        adverts: &[Advert],
    ) -> Result<Vec<SealedSharePair>> {
        if self.stage != Stage::Advertised {
            return Err(self.refuse(
                "keys were already shared this round; sharing again would give neighbours a second, independent set of shares",
            ));
        }
        if config.context() != &self.ctx {
            return Err(self.refuse(format!(
                "the coordinator sent the configuration of another round ({})",
                config.context()
            )));
        }
        let graph = config.graph();
        let t = config.threshold();
        let all_neighbours = graph.neighbours(self.index)?;

        let neighbours = self.check_adverts(graph, adverts)?;
        if neighbours.len() < t {
            return Err(self.refuse(format!(
                "only {} of its {} neighbours advertised keys; at least the threshold {t} are needed to hold its shares",
                neighbours.len(),
                all_neighbours.len()
            )));
        }

        let out = self.seal_shares(&all_neighbours, &neighbours, t)?;
        self.neighbours = neighbours;
        self.config = Some(config);
        self.stage = Stage::SharesSent;
        Ok(out)
    }

    /// The adverts of this participant's neighbours, after checking the list the
    /// coordinator relayed: no participant twice, its own advert unchanged, and
    /// no public key under two indices.
    fn check_adverts(&self, graph: &Graph, adverts: &[Advert]) -> Result<BTreeMap<u32, Advert>> {
        let mut seen = BTreeSet::new();
        let mut own_seen = false;
        let mut neighbours = BTreeMap::new();
        for advert in adverts {
            advert.validate(&self.ctx)?;
            if !seen.insert(advert.participant) {
                return Err(self.refuse(format!(
                    "the coordinator sent two adverts for participant {}",
                    advert.participant
                )));
            }
            if advert.participant == self.index {
                if advert != &self.advert {
                    return Err(self.refuse(
                        "the coordinator relayed an advert for this participant that is not the one it signed",
                    ));
                }
                own_seen = true;
            } else if graph.are_neighbours(self.index, advert.participant) {
                neighbours.insert(advert.participant, advert.clone());
            }
        }
        if !own_seen {
            return Err(self.refuse("the coordinator's advert list leaves this participant out"));
        }
        // The same key under two indices is a replay: whoever copied it
        // cannot hold the secret half, and would skew the threshold.
        let mut keys_seen = BTreeSet::from([self.advert.c_pk, self.advert.s_pk]);
        for a in neighbours.values() {
            if !keys_seen.insert(a.c_pk) || !keys_seen.insert(a.s_pk) {
                return Err(self.refuse(format!(
                    "participant {}'s advert repeats a public key already advertised this round",
                    a.participant
                )));
            }
        }
        Ok(neighbours)
    }

    /// One sealed share pair per neighbour that advertised, addressed by its
    /// position among all neighbours.
    fn seal_shares(
        &self,
        all_neighbours: &[u32],
        neighbours: &BTreeMap<u32, Advert>,
        t: usize,
    ) -> Result<Vec<SealedSharePair>> {
        // Shares for every neighbour position (x = rank + 1); those of
        // neighbours that did not advertise are dropped (and wiped) here.
        let k = all_neighbours.len();
        let b_shares = split(self.keys.self_mask_seed().as_bytes(), t, k)?;
        let s_sk = zeroize::Zeroizing::new(self.keys.s_secret().to_bytes());
        let s_shares = split(&s_sk, t, k)?;
        let me = Party {
            index: self.index,
            secret: self.keys.c_secret(),
            public: self.keys.c_public(),
        };
        let mut out = Vec::with_capacity(neighbours.len());
        for (rank, j) in all_neighbours.iter().enumerate() {
            let Some(advert) = neighbours.get(j) else {
                continue;
            };
            let pair = SharePair {
                self_mask: b_shares[rank].clone(),
                mask_key: s_shares[rank].clone(),
            };
            out.push(seal(&self.ctx, &me, *j, &advert.c_pk, &pair)?);
        }
        Ok(out)
    }

    /// Step 3 (start): opens the share pairs relayed from the neighbours and
    /// agrees a pairwise mask seed with each sender. A participant masks only
    /// against neighbours whose shares it holds, so that if one of them drops
    /// its pairwise mask can be rebuilt from shares.
    ///
    /// Refuses fewer than the threshold of senders: with too few pairwise
    /// masks, revealing b at the end (as for every survivor) would leave the
    /// input covered by masks the coordinator can strip.
    pub fn receive_shares(&mut self, inbox: &[SealedSharePair]) -> Result<()> {
        if self.stage != Stage::SharesSent {
            return Err(self.refuse(match self.stage {
                Stage::Advertised => "shares arrived before this participant shared its own",
                _ => "shares for this round were already received",
            }));
        }
        let config = self.config()?;
        let graph = config.graph();
        let t = config.threshold();
        let me_c = Party {
            index: self.index,
            secret: self.keys.c_secret(),
            public: self.keys.c_public(),
        };
        let me_s = Party {
            index: self.index,
            secret: self.keys.s_secret(),
            public: self.keys.s_public(),
        };
        let mut held = BTreeMap::new();
        for sealed in inbox {
            let sender = sealed.sender();
            let advert = self.neighbours.get(&sender).ok_or_else(|| {
                self.refuse(format!(
                    "received shares from participant {sender}, which is not a neighbour that advertised keys"
                ))
            })?;
            if held.contains_key(&sender) {
                return Err(self.refuse(format!(
                    "received two share pairs from participant {sender}"
                )));
            }
            let pair = open(&self.ctx, &me_c, sender, &advert.c_pk, sealed)?;
            let x = graph.share_x(sender, self.index)?;
            if pair.self_mask.x() != x || pair.mask_key.x() != x {
                return Err(self.refuse(format!(
                    "participant {sender} sent shares at x = {} and {}, but this participant's shares of it are at x = {x}",
                    pair.self_mask.x(),
                    pair.mask_key.x()
                )));
            }
            held.insert(sender, pair);
        }
        if held.len() < t {
            return Err(self.refuse(format!(
                "only {} neighbours' shares arrived; at least the threshold {t} are needed to mask the input safely",
                held.len()
            )));
        }
        let mut pairwise = Vec::with_capacity(held.len());
        for j in held.keys() {
            let advert = &self.neighbours[j];
            pairwise.push((*j, pairwise_mask_seed(&self.ctx, &me_s, *j, &advert.s_pk)?));
        }
        self.held = held;
        self.pairwise = pairwise;
        self.stage = Stage::Masking;
        Ok(())
    }

    /// Step 3: masks the values of parameters `offset..offset + values.len()`
    /// in place (any chunking; chunks need not be in order). Values are the
    /// fixed-point, example-weighted update `w · round(delta · 2^24)`.
    ///
    /// Refused once unmasking has begun: the masked input is then final.
    pub fn mask_chunk<W: MaskWord>(&self, values: &mut [W], offset: u64) -> Result<()> {
        if self.stage != Stage::Masking {
            return Err(self.refuse(match self.stage {
                Stage::Unmasking => {
                    "masking after unmasking began is refused: the masked input is final"
                }
                _ => "cannot mask before the neighbours' shares were received",
            }));
        }
        mask_chunk(
            values,
            offset,
            self.keys.self_mask_seed(),
            &self.pairwise,
            self.index,
        )
        .map_err(|e| self.refuse(e))
    }

    /// Step 4: answers an unmasking request, or refuses it whole (revealing
    /// nothing) if it is inconsistent in itself or with an earlier request.
    ///
    /// The rule that matters: for any neighbour, reveal a share of its b or of
    /// its s_sk, never both. A survivor's b and s_sk together unmask its input;
    /// a coordinator that calls it dropped to one neighbour and surviving to
    /// another (or to the same one, later) is attempting exactly that.
    pub fn unmask(&mut self, request: &UnmaskRequest) -> Result<UnmaskResponse> {
        if !matches!(self.stage, Stage::Masking | Stage::Unmasking) {
            return Err(self
                .refuse("an unmasking request arrived before this participant masked its input"));
        }
        let (dropped, survivors) = self.check_unmask_request(request)?;
        let me = self.index;
        // All checks passed: record before answering.
        for j in &survivors {
            self.revealed.insert(*j, SecretKind::SelfMaskSeed);
        }
        for d in &dropped {
            self.revealed.insert(*d, SecretKind::MaskKey);
        }
        self.stage = Stage::Unmasking;
        Ok(UnmaskResponse {
            participant: me,
            self_mask_shares: survivors
                .iter()
                .map(|j| (*j, self.held[j].self_mask.clone()))
                .collect(),
            mask_key_shares: dropped
                .iter()
                .map(|d| (*d, self.held[d].mask_key.clone()))
                .collect(),
        })
    }

    /// The request's dropped and surviving neighbours, if an honest participant
    /// may answer it: disjoint, all neighbours, itself in neither, enough
    /// survivors, and no participant reported the opposite way earlier.
    fn check_unmask_request(
        &self,
        request: &UnmaskRequest,
    ) -> Result<(BTreeSet<u32>, BTreeSet<u32>)> {
        let t = self.config()?.threshold();
        let me = self.index;
        let to_set = |list: &[u32], what: &str| -> Result<BTreeSet<u32>> {
            let set: BTreeSet<u32> = list.iter().copied().collect();
            if set.len() != list.len() {
                return Err(self.refuse(format!(
                    "the unmasking request lists a participant twice among the {what}"
                )));
            }
            Ok(set)
        };
        let dropped = to_set(&request.dropped, "dropped")?;
        let survivors = to_set(&request.survivors, "survivors")?;
        if dropped.contains(&me) {
            return Err(self.refuse(
                "the unmasking request lists this participant itself as dropped; refusing",
            ));
        }
        if survivors.contains(&me) {
            return Err(self
                .refuse("the unmasking request lists this participant among its own neighbours"));
        }
        if let Some(both) = dropped.intersection(&survivors).next() {
            return Err(self.refuse(format!(
                "the unmasking request lists participant {both} as both dropped and surviving; refusing to reveal both of its secrets"
            )));
        }
        if let Some(stranger) = dropped
            .iter()
            .chain(&survivors)
            .find(|j| !self.held.contains_key(j))
        {
            return Err(self.refuse(format!(
                "the unmasking request names participant {stranger}, which is not a neighbour whose shares this participant holds"
            )));
        }
        if survivors.len() < t {
            return Err(self.refuse(format!(
                "the unmasking request names {} surviving neighbours, below the threshold {t}; refusing",
                survivors.len()
            )));
        }
        for (set, kind, opposite) in [
            (&survivors, SecretKind::SelfMaskSeed, "dropped"),
            (&dropped, SecretKind::MaskKey, "surviving"),
        ] {
            if let Some(j) = set
                .iter()
                .find(|j| self.revealed.get(j).is_some_and(|k| *k != kind))
            {
                return Err(self.refuse(format!(
                    "participant {j} was reported {opposite} in an earlier unmasking request of this round, and its other share was revealed then; refusing to reveal its {kind} share too, which would expose its input"
                )));
            }
        }

        Ok((dropped, survivors))
    }
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant")
            .field("round", &self.ctx)
            .field("index", &self.index)
            .field("stage", &self.stage)
            .field("mask_partners", &self.mask_partners())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::secagg::graph::Graph;

    fn round(n: u32) -> (RoundConfig, Vec<Participant>, Vec<Advert>) {
        let ctx = RoundContext::new("t", 2, 0).unwrap();
        let ps: Vec<Participant> = (0..n)
            .map(|i| Participant::new(ctx.clone(), i, "org").unwrap())
            .collect();
        let adverts = ps.iter().map(|p| p.advert().clone()).collect();
        let config = RoundConfig::new(ctx, Graph::complete(n).unwrap(), 3).unwrap();
        (config, ps, adverts)
    }

    #[test]
    fn steps_out_of_order_are_refused() {
        let (config, mut ps, adverts) = round(5);
        let mut v = vec![0i64; 4];
        assert!(ps[0].mask_chunk(&mut v, 0).is_err());
        assert!(ps[0].receive_shares(&[]).is_err());
        assert!(ps[0].unmask(&UnmaskRequest::default()).is_err());
        ps[0].share_keys(config.clone(), &adverts).unwrap();
        let err = ps[0].share_keys(config, &adverts).unwrap_err().to_string();
        assert!(err.contains("already shared"), "{err}");
        assert!(ps[0].mask_chunk(&mut v, 0).is_err());
    }

    #[test]
    fn substituted_or_missing_adverts_are_refused() {
        let (config, mut ps, mut adverts) = round(5);
        // Our own advert replaced by the coordinator.
        let mut forged = adverts.clone();
        forged[0].s_pk = adverts[1].s_pk;
        let err = ps[0]
            .share_keys(config.clone(), &forged)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not the one it signed"), "{err}");
        // A neighbour's keys replayed under another index.
        let mut replayed = adverts.clone();
        replayed[2].c_pk = adverts[3].c_pk;
        assert!(ps[0].share_keys(config.clone(), &replayed).is_err());
        // Two adverts for one index.
        let mut doubled = adverts.clone();
        doubled.push(adverts[4].clone());
        assert!(ps[0].share_keys(config.clone(), &doubled).is_err());
        // Too few neighbours advertised (2 < t = 3).
        adverts.truncate(3);
        let err = ps[0]
            .share_keys(config.clone(), &adverts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("only 2 of its 4 neighbours"), "{err}");
        // Another round's configuration.
        let other = RoundConfig::new(
            RoundContext::new("t", 3, 0).unwrap(),
            Graph::complete(5).unwrap(),
            3,
        )
        .unwrap();
        assert!(ps[0].share_keys(other, &adverts).is_err());
    }

    #[test]
    fn too_few_senders_and_foreign_senders_are_refused() {
        let (config, mut ps, adverts) = round(5);
        let outboxes: Vec<Vec<SealedSharePair>> = ps
            .iter_mut()
            .map(|p| p.share_keys(config.clone(), &adverts).unwrap())
            .collect();
        let inbox: Vec<SealedSharePair> = outboxes
            .iter()
            .flatten()
            .filter(|s| s.receiver() == 0)
            .cloned()
            .collect();
        let err = ps[0].receive_shares(&inbox[..2]).unwrap_err().to_string();
        assert!(err.contains("only 2 neighbours' shares arrived"), "{err}");
        let mut doubled = inbox.clone();
        doubled.push(inbox[0].clone());
        assert!(ps[0].receive_shares(&doubled).is_err());
        // A pair addressed to someone else.
        let mut stray = inbox.clone();
        stray[0] = outboxes[1]
            .iter()
            .find(|s| s.receiver() == 2)
            .unwrap()
            .clone();
        assert!(ps[0].receive_shares(&stray).is_err());
        ps[0].receive_shares(&inbox).unwrap();
        assert_eq!(ps[0].mask_partners(), vec![1, 2, 3, 4]);
        assert!(ps[0].receive_shares(&inbox).is_err());
    }
}
