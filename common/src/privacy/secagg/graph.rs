//! The SecAgg+ communication graph: who shares secrets with, and masks
//! against, whom.
//!
//! Bonawitz et al.'s protocol has every participant mask against every other,
//! which costs O(n) key agreements and O(n) keystreams per participant. Bell et
//! al. show that a random k-regular graph with k = O(log n) keeps the same
//! guarantees with high probability, at O(k) cost. The graph here is a Harary
//! graph H(k, n): participants stand on a ring and each is joined to the k/2
//! nearest on either side. Who stands where is a permutation drawn from a
//! public round seed, so neighbourhoods change every round and a participant's
//! neighbours are not chosen by their roster order.
//!
//! The seed must be something the coordinator cannot grind to place colluders
//! around a victim: [`graph_seed`] hashes the signed adverts of the round, which
//! are fixed before anyone knows the graph. That is not grind-proof against a
//! participant colluding with the coordinator (it can retry its own keys until
//! the seed suits it); a commit-then-reveal round or a public beacon would be.
//! Without a seed, whoever assigns roster indices chooses the neighbourhoods:
//! unpermuted sparse graphs are for tests. The complete graph (k = n − 1) is
//! the original SecAgg and needs no seed.
//!
//! Every participant must compute the same graph from the same inputs, so the
//! shuffle is specified here (Fisher–Yates over a ChaCha20 keystream with
//! unbiased rejection sampling) rather than taken from a random-number crate
//! whose algorithm may change between versions.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use sha2::{Digest, Sha256};

use super::context::{RoundContext, Transcript, label};
use super::keys::Advert;
use crate::{Error, Result};

/// Most neighbours a participant may have: its Shamir shares are points of a
/// polynomial over GF(256), whose 255 non-zero x-coordinates are shared out
/// one per neighbour.
pub const MAX_DEGREE: u32 = 255;

/// Most participants in one round: bounds the graph's memory for a hostile n.
pub const MAX_PARTICIPANTS: u32 = 1 << 20;

/// A k-regular neighbourhood graph over participants `0..n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Graph {
    n: u32,
    k: u32,
    /// `ring[p]`: the participant standing at ring position `p`.
    ring: Vec<u32>,
    /// `position[i]`: the ring position of participant `i`.
    position: Vec<u32>,
    seed: Option<[u8; 32]>,
}

impl Graph {
    /// The Harary graph H(k, n), with ring positions permuted by `seed` when
    /// given (participant order otherwise). `k` must be even, or `n − 1` for the
    /// complete graph.
    pub fn harary(n: u32, k: u32, seed: Option<&[u8; 32]>) -> Result<Self> {
        let refuse = |why: String| {
            Err(Error::SecureAggregation(format!(
                "invalid neighbourhood graph with {n} participants and {k} neighbours each: {why}"
            )))
        };
        if n < 3 {
            // With two participants the sum reveals each one's input to the other.
            return refuse("secure aggregation needs at least 3 participants".into());
        }
        if n > MAX_PARTICIPANTS {
            return refuse(format!(
                "at most {MAX_PARTICIPANTS} participants are supported"
            ));
        }
        if k == 0 {
            return refuse("every participant needs at least one neighbour".into());
        }
        if k >= n {
            return refuse(format!(
                "a participant can have at most n - 1 = {} neighbours",
                n - 1
            ));
        }
        if k % 2 == 1 && k != n - 1 {
            return refuse(
                "the degree must be even (k/2 on each side of the ring), or n - 1 for the complete graph"
                    .into(),
            );
        }
        if k > MAX_DEGREE {
            return refuse(format!(
                "at most {MAX_DEGREE} neighbours (Shamir shares over GF(256)); use a smaller k"
            ));
        }
        let ring = match seed {
            Some(seed) => permutation(n, seed),
            None => (0..n).collect(),
        };
        let mut position = vec![0u32; n as usize];
        for (p, &i) in ring.iter().enumerate() {
            position[i as usize] = p as u32;
        }
        Ok(Graph {
            n,
            k,
            ring,
            position,
            seed: seed.copied(),
        })
    }

    /// The complete graph: every participant is every other's neighbour (the
    /// original SecAgg).
    pub fn complete(n: u32) -> Result<Self> {
        Graph::harary(n, n.saturating_sub(1), None)
    }

    pub fn participants(&self) -> u32 {
        self.n
    }

    pub fn degree(&self) -> u32 {
        self.k
    }

    /// The seed the ring was permuted with, for a participant to check
    /// against [`graph_seed`] of the adverts it received.
    pub fn seed(&self) -> Option<&[u8; 32]> {
        self.seed.as_ref()
    }

    pub fn is_complete(&self) -> bool {
        self.k == self.n - 1
    }

    fn check(&self, i: u32) -> Result<()> {
        if i >= self.n {
            return Err(Error::SecureAggregation(format!(
                "participant index {i} is outside the round's {} participants",
                self.n
            )));
        }
        Ok(())
    }

    /// Participant `i`'s neighbours, sorted.
    pub fn neighbours(&self, i: u32) -> Result<Vec<u32>> {
        self.check(i)?;
        let mut out = Vec::with_capacity(self.k as usize);
        if self.is_complete() {
            out.extend((0..self.n).filter(|&j| j != i));
            return Ok(out);
        }
        let p = self.position[i as usize];
        for d in 1..=self.k / 2 {
            out.push(self.ring[((p + d) % self.n) as usize]);
            out.push(self.ring[((p + self.n - d) % self.n) as usize]);
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Whether `i` and `j` are neighbours (false for out-of-range indices and i = j).
    pub fn are_neighbours(&self, i: u32, j: u32) -> bool {
        if i >= self.n || j >= self.n || i == j {
            return false;
        }
        if self.is_complete() {
            return true;
        }
        let (pi, pj) = (self.position[i as usize], self.position[j as usize]);
        let d = pi.abs_diff(pj);
        d.min(self.n - d) <= self.k / 2
    }

    /// The Shamir x-coordinate of the share of `owner`'s secrets held by
    /// `holder`: 1 + the holder's rank among `owner`'s sorted neighbours. Both
    /// ends compute it, so a share handed in under the wrong holder is caught.
    pub fn share_x(&self, owner: u32, holder: u32) -> Result<u8> {
        let neighbours = self.neighbours(owner)?;
        let rank = neighbours.binary_search(&holder).map_err(|_| {
            Error::SecureAggregation(format!(
                "participant {holder} is not a neighbour of participant {owner}, so holds none of its shares"
            ))
        })?;
        // rank < k ≤ 255, checked at construction.
        u8::try_from(rank + 1)
            .map_err(|_| Error::SecureAggregation(format!("share index {} exceeds 255", rank + 1)))
    }
}

/// The round's graph seed: SHA-256 over all signed adverts, sorted by index.
/// The adverts are fixed (signed) before anyone knows the graph, so the
/// coordinator can influence it only by leaving adverts out; every participant
/// that receives the full advert list can recompute it.
pub fn graph_seed(ctx: &RoundContext, adverts: &[Advert]) -> [u8; 32] {
    let mut sorted: Vec<&Advert> = adverts.iter().collect();
    sorted.sort_by_key(|a| a.participant);
    let mut t = Transcript::for_round(label::GRAPH_SEED, ctx);
    t.u32(sorted.len() as u32);
    for a in sorted {
        t.bytes(&a.signing_bytes(ctx));
    }
    Sha256::digest(t.finish()).into()
}

/// A uniformly random permutation of `0..n` determined by `seed`:
/// Fisher–Yates driven by a ChaCha20 keystream.
fn permutation(n: u32, seed: &[u8; 32]) -> Vec<u32> {
    let mut t = Transcript::new(label::GRAPH_PERMUTATION);
    t.bytes(seed);
    let key: [u8; 32] = Sha256::digest(t.finish()).into();
    let mut words = KeystreamWords::new(&key);
    let mut ring: Vec<u32> = (0..n).collect();
    for i in (1..n as usize).rev() {
        let j = words.below(i as u64 + 1) as usize;
        ring.swap(i, j);
    }
    ring
}

/// Unbiased integers from a ChaCha20 keystream.
struct KeystreamWords {
    cipher: ChaCha20,
}

impl KeystreamWords {
    fn new(key: &[u8; 32]) -> Self {
        KeystreamWords {
            cipher: ChaCha20::new(key.into(), &[0u8; 12].into()),
        }
    }

    fn next(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        // 2^38 bytes of keystream would be needed to reach the counter's end;
        // a shuffle of MAX_PARTICIPANTS takes a few MiB at most.
        self.cipher.apply_keystream(&mut bytes);
        u64::from_le_bytes(bytes)
    }

    /// Uniform in `0..m`, m ≥ 1: rejecting the lowest 2^64 mod m values leaves a
    /// range whose size is a multiple of m.
    fn below(&mut self, m: u64) -> u64 {
        let reject_below = m.wrapping_neg() % m;
        loop {
            let x = self.next();
            if x >= reject_below {
                return x % m;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harary_is_k_regular_symmetric_and_sorted() {
        for (n, k) in [(5, 4), (40, 8), (41, 8), (9, 2), (100, 32), (7, 6), (8, 7)] {
            for seed in [None, Some([7u8; 32])] {
                let g = Graph::harary(n, k, seed.as_ref()).unwrap();
                for i in 0..n {
                    let nb = g.neighbours(i).unwrap();
                    assert_eq!(nb.len(), k as usize, "n={n} k={k} i={i}");
                    assert!(nb.windows(2).all(|w| w[0] < w[1]));
                    assert!(!nb.contains(&i));
                    for &j in &nb {
                        assert!(g.neighbours(j).unwrap().contains(&i));
                        assert!(g.are_neighbours(i, j));
                    }
                    let not: Vec<u32> = (0..n).filter(|j| !nb.contains(j)).collect();
                    assert!(not.iter().all(|&j| !g.are_neighbours(i, j)));
                }
            }
        }
    }

    #[test]
    fn seed_permutes_deterministically() {
        let a = Graph::harary(40, 8, Some(&[1; 32])).unwrap();
        let b = Graph::harary(40, 8, Some(&[1; 32])).unwrap();
        let c = Graph::harary(40, 8, Some(&[2; 32])).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.neighbours(0).unwrap(), c.neighbours(0).unwrap());
        let mut ring = a.ring.clone();
        ring.sort_unstable();
        assert_eq!(ring, (0..40).collect::<Vec<_>>());
    }

    #[test]
    fn permutation_is_pinned() {
        // The shuffle is part of the protocol: every participant must get the
        // same graph. A change here breaks mixed-version rounds.
        let g = Graph::harary(10, 2, Some(&[0u8; 32])).unwrap();
        assert_eq!(g.ring, vec![9, 5, 3, 7, 6, 2, 0, 8, 1, 4]);
        assert_eq!(g.neighbours(0).unwrap(), vec![2, 8]);
    }

    #[test]
    fn invalid_parameters_are_refused() {
        assert!(Graph::harary(5, 0, None).is_err());
        assert!(Graph::harary(5, 5, None).is_err());
        assert!(Graph::harary(5, 6, None).is_err());
        assert!(Graph::harary(10, 3, None).is_err());
        assert!(Graph::harary(2, 1, None).is_err());
        assert!(Graph::harary(300, 299, None).is_err());
        assert!(Graph::harary(8, 7, None).is_ok());
        assert!(Graph::complete(256).is_ok());
        let g = Graph::complete(5).unwrap();
        assert!(g.neighbours(5).is_err());
        assert!(!g.are_neighbours(1, 1));
        assert!(!g.are_neighbours(1, 9));
    }

    #[test]
    fn share_x_is_rank_plus_one() {
        let g = Graph::harary(40, 8, Some(&[3; 32])).unwrap();
        let nb = g.neighbours(5).unwrap();
        for (r, &h) in nb.iter().enumerate() {
            assert_eq!(g.share_x(5, h).unwrap() as usize, r + 1);
        }
        assert!(g.share_x(5, 5).is_err());
    }

    #[test]
    fn below_is_in_range() {
        let mut w = KeystreamWords::new(&[9; 32]);
        for m in 1..200 {
            assert!(w.below(m) < m);
        }
    }
}
