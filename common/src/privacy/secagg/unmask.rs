//! The coordinator's last step: removing the masks from the masked sum, chunk
//! by chunk, once the secrets needed have been reconstructed.
//!
//! After the survivors S sent their masked inputs, the masked sum holds
//! Σ_{i∈S} x_i + Σ_{i∈S} PRG(b_i) + (pairwise masks). Pairwise masks between
//! two survivors cancel. What is left is, for each dropped participant d
//! (it shared keys but sent no masked input) and each surviving neighbour j of
//! d, the mask j applied for the pair: +PRG(s_jd) if d > j, −PRG(s_jd) if
//! d < j. The coordinator rebuilds s_jd from d's reconstructed s_sk and j's
//! advertised s_pk, and each b_i from its shares, and subtracts all of it.
//!
//! Memory is O(chunk + number of streams); the work per parameter is one
//! ChaCha20 word per stream: |S| + Σ_d |N(d) ∩ S| streams.

use std::collections::{BTreeMap, BTreeSet};

use x25519_dalek::StaticSecret;

use super::agreement::{Party, pairwise_mask_seed};
use super::context::RoundContext;
use super::graph::Graph;
use super::keys::KEY_LEN;
use super::mask::{MaskSeed, MaskWord, Sign, apply_masks};
use crate::Result;

/// Removes the masks of one round from its masked sum, for any chunk.
pub struct Unmasker {
    /// Each mask stream left in the masked sum, with the sign it has there.
    streams: Vec<(MaskSeed, Sign)>,
    survivors: Vec<u32>,
    dropped: Vec<u32>,
}

impl Unmasker {
    /// Builds the correction from the reconstructed secrets: the self-mask
    /// seed of every survivor, and the mask-agreement key of every dropped
    /// participant (which must not be a survivor). `s_public_keys` holds the
    /// advertised s_pk of every participant concerned.
    pub fn new(
        ctx: &RoundContext,
        graph: &Graph,
        s_public_keys: &BTreeMap<u32, [u8; KEY_LEN]>,
        survivors: &BTreeSet<u32>,
        self_mask_seeds: BTreeMap<u32, MaskSeed>,
        dropped_mask_keys: BTreeMap<u32, StaticSecret>,
    ) -> Result<Self> {
        if let Some(j) = survivors.iter().find(|j| !self_mask_seeds.contains_key(j)) {
            return Err(ctx.error(format!(
                "cannot unmask: participant {j}'s input is in the sum but its self-mask seed was not recovered"
            )));
        }
        if let Some(j) = self_mask_seeds.keys().find(|j| !survivors.contains(j)) {
            return Err(ctx.error(format!(
                "participant {j}'s self-mask seed was recovered, but its input is not in the sum"
            )));
        }
        if let Some(d) = dropped_mask_keys.keys().find(|d| survivors.contains(d)) {
            return Err(ctx.error(format!(
                "participant {d} is listed both as a survivor and as dropped"
            )));
        }
        let pk = |i: u32| {
            s_public_keys.get(&i).ok_or_else(|| {
                ctx.error(format!(
                    "participant {i}'s mask-agreement public key is missing"
                ))
            })
        };
        let mut streams: Vec<(MaskSeed, Sign)> = self_mask_seeds
            .into_values()
            .map(|seed| (seed, Sign::Add))
            .collect();
        for (d, s_sk) in &dropped_mask_keys {
            let dropped = Party {
                index: *d,
                secret: s_sk,
                public: pk(*d)?,
            };
            for j in graph.neighbours(*d)? {
                if !survivors.contains(&j) {
                    continue;
                }
                let seed = pairwise_mask_seed(ctx, &dropped, j, pk(j)?)?;
                // j added the pair's stream if d > j, subtracted it if d < j.
                let sign = if *d > j { Sign::Add } else { Sign::Subtract };
                streams.push((seed, sign));
            }
        }
        Ok(Unmasker {
            streams,
            survivors: survivors.iter().copied().collect(),
            dropped: dropped_mask_keys.keys().copied().collect(),
        })
    }

    /// The participants whose inputs the unmasked sum holds.
    pub fn survivors(&self) -> &[u32] {
        &self.survivors
    }

    /// The participants whose pairwise masks are cancelled.
    pub fn dropped(&self) -> &[u32] {
        &self.dropped
    }

    /// Number of keystreams per parameter (the cost of unmasking).
    pub fn keystreams(&self) -> usize {
        self.streams.len()
    }

    /// Turns the masked sum of parameters `offset..offset + masked_sum.len()`
    /// into the plain sum Σ_{i∈S} x_i, in place.
    pub fn unmask_chunk<W: MaskWord>(&self, masked_sum: &mut [W], offset: u64) -> Result<()> {
        let inverse: Vec<(&MaskSeed, Sign)> = self
            .streams
            .iter()
            .map(|(seed, sign)| (seed, sign.inverse()))
            .collect();
        apply_masks(masked_sum, offset, &inverse)
    }

    /// Writes the total mask the masked sum holds for parameters
    /// `offset..offset + out.len()`: plain = masked − correction (mod 2^64).
    pub fn correction_chunk(&self, offset: u64, out: &mut [u64]) -> Result<()> {
        out.fill(0);
        let streams: Vec<(&MaskSeed, Sign)> = self
            .streams
            .iter()
            .map(|(seed, sign)| (seed, *sign))
            .collect();
        apply_masks(out, offset, &streams)
    }
}

impl std::fmt::Debug for Unmasker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unmasker")
            .field("survivors", &self.survivors)
            .field("dropped", &self.dropped)
            .field("keystreams", &self.streams.len())
            .finish()
    }
}
