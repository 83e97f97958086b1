//! What the participants and the coordinator agree on for one round (its
//! context, graph and threshold), and the messages of the unmasking step.
//!
//! The round runs in four steps (Bonawitz et al. 2017, §4; Bell et al. 2020
//! for the sparse graph):
//! 1. advertise keys: every participant publishes a signed [`Advert`];
//! 2. share keys: each one Shamir-shares b and s_sk among its neighbours and
//!    seals each neighbour's pair ([`Participant::share_keys`]); the
//!    coordinator relays them ([`Coordinator::route_shares`]);
//! 3. masked input: each one masks its update against the neighbours it got
//!    shares from, chunk by chunk ([`Participant::mask_chunk`]);
//! 4. unmasking: the coordinator tells each survivor which of its neighbours
//!    survived and which dropped ([`UnmaskRequest`]); the survivor returns b
//!    shares of the former and s_sk shares of the latter
//!    ([`UnmaskResponse`]), after checking that the request is consistent
//!    with everything it was asked before.
//!
//! Why the threshold must exceed half the neighbourhood: an honest
//! participant reveals, for any one neighbour, either a b-share or an
//! s_sk-share, never both. A coordinator wanting both secrets of a victim must
//! then collect t b-shares and t s_sk-shares from disjoint sets of the
//! victim's k neighbours, which needs 2t ≤ k. With t > k/2 it cannot. (Every
//! colluding neighbour lowers that margin by one; choose k and t with the
//! expected number of colluders in mind.)
//!
//! [`Advert`]: super::keys::Advert
//! [`Participant::share_keys`]: super::participant::Participant::share_keys
//! [`Participant::mask_chunk`]: super::participant::Participant::mask_chunk
//! [`Coordinator::route_shares`]: super::coordinator::Coordinator::route_shares

use super::context::RoundContext;
use super::graph::Graph;
use super::shamir::Share;
use crate::{Error, Result};

/// The default threshold for a group of `group_size` share holders (the
/// degree k for SecAgg+, n − 1 for the complete graph): more than half.
pub fn default_threshold(group_size: u32) -> usize {
    group_size as usize / 2 + 1
}

/// Checks threshold `t` for neighbourhoods of `degree` k: at least 2 (t = 1
/// would hand each secret to any single neighbour), at most k (else no
/// neighbourhood could ever reconstruct), and more than k/2 (see the module
/// documentation: below that, a coordinator can ask disjoint halves of a
/// neighbourhood for each of one participant's secrets).
pub fn validate_threshold(threshold: usize, degree: u32) -> Result<()> {
    let k = degree as usize;
    if threshold < 2 || threshold > k || threshold <= k / 2 {
        return Err(Error::SecureAggregation(format!(
            "threshold {threshold} is invalid for neighbourhoods of {k}: it must be at least 2, at most {k}, and more than half of {k} (default {})",
            default_threshold(degree)
        )));
    }
    Ok(())
}

/// The public parameters of one round: context, graph and threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundConfig {
    ctx: RoundContext,
    graph: Graph,
    threshold: usize,
}

impl RoundConfig {
    pub fn new(ctx: RoundContext, graph: Graph, threshold: usize) -> Result<Self> {
        validate_threshold(threshold, graph.degree()).map_err(|e| ctx.error(e.to_string()))?;
        Ok(RoundConfig {
            ctx,
            graph,
            threshold,
        })
    }

    pub fn context(&self) -> &RoundContext {
        &self.ctx
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }
}

/// The coordinator's unmasking request to one survivor: which of its
/// neighbours it should treat as dropped (they sent shares but no masked
/// input) and which as survivors (their masked input is in the sum).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnmaskRequest {
    pub dropped: Vec<u32>,
    pub survivors: Vec<u32>,
}

/// A survivor's answer: its share of each surviving neighbour's self-mask
/// seed and of each dropped neighbour's mask-agreement key, by owner.
#[derive(Clone, Debug)]
pub struct UnmaskResponse {
    /// The answering participant.
    pub participant: u32,
    /// `(owner, share of owner's b)` for each survivor in the request.
    pub self_mask_shares: Vec<(u32, Share)>,
    /// `(owner, share of owner's s_sk)` for each dropped neighbour in the request.
    pub mask_key_shares: Vec<(u32, Share)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        assert_eq!(default_threshold(4), 3);
        assert_eq!(default_threshold(8), 5);
        assert_eq!(default_threshold(7), 4);
        assert!(validate_threshold(5, 8).is_ok());
        assert!(validate_threshold(8, 8).is_ok());
        assert!(validate_threshold(4, 8).is_err());
        assert!(validate_threshold(9, 8).is_err());
        assert!(validate_threshold(1, 2).is_err());
        assert!(validate_threshold(2, 2).is_ok());
        for k in 2..=255 {
            assert!(
                validate_threshold(default_threshold(k), k).is_ok(),
                "k = {k}"
            );
        }
    }

    #[test]
    fn config_refuses_bad_threshold_naming_round() {
        let ctx = RoundContext::new("t", 3, 0).unwrap();
        let g = Graph::complete(5).unwrap();
        let err = RoundConfig::new(ctx, g, 2).unwrap_err().to_string();
        assert!(
            err.contains("round 3") && err.contains("threshold 2"),
            "{err}"
        );
    }
}
