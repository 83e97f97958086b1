//! t-of-k Shamir sharing of a participant's two 32-byte secrets (self-mask
//! seed b and mask-agreement key s_sk) among its neighbours, and their
//! verified reconstruction.
//!
//! Shares are points of random degree-(t − 1) polynomials over GF(256), one
//! per secret byte (vsss-rs, constant time). A share is 33 bytes: its
//! x-coordinate (1 + the holder's rank among the owner's sorted neighbours,
//! see `Graph::share_x`) then 32 y-bytes.
//!
//! Plain Shamir cannot tell a wrong share: any t points interpolate to some
//! secret. A participant who lies about its share (or a coordinator that
//! swaps shares) would make the coordinator remove the wrong masks and publish
//! a wrong model without noticing. So reconstruction is checked against what
//! the owner signed in its advert: the reconstructed s_sk must give back the
//! advertised s_pk, and the reconstructed b must hash to the advertised
//! commitment. When more than t shares are at hand and the check fails, each
//! is left out in turn: a subset that passes gives the true secret (the check
//! is against what the owner signed), and the share left out is reported as
//! suspect. That blame is certain when only one share of the secret was wrong;
//! two colluding holders can craft errors that cancel when an honest share is
//! left out, so the suspect is a lead for the operator, not proof.

use std::convert::Infallible;
use std::fmt;

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use vsss_rs::{Gf256, IdentifierGf256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::context::RoundContext;
use super::keys::{KEY_LEN, is_clamped, random_bytes, self_mask_commitment};
use super::mask::MaskSeed;
use crate::{Error, Result};

/// Length of a shared secret.
pub const SECRET_LEN: usize = KEY_LEN;
/// Length of one serialised share: x-coordinate, then one byte per secret byte.
pub const SHARE_LEN: usize = 1 + SECRET_LEN;

/// One Shamir share of a 32-byte secret. Zeroized on drop; `Debug` shows only
/// the x-coordinate.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Share([u8; SHARE_LEN]);

impl Share {
    /// Parses a share received from the network: exactly [`SHARE_LEN`] bytes
    /// with a non-zero x-coordinate (the share at x = 0 would be the secret).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let array: [u8; SHARE_LEN] = bytes.try_into().map_err(|_| {
            Error::SecureAggregation(format!(
                "a Shamir share must be {SHARE_LEN} bytes, got {}",
                bytes.len()
            ))
        })?;
        if array[0] == 0 {
            return Err(Error::SecureAggregation(
                "a Shamir share has x-coordinate 0, which no holder is given".into(),
            ));
        }
        Ok(Share(array))
    }

    /// The share's x-coordinate, 1..=255.
    pub fn x(&self) -> u8 {
        self.0[0]
    }

    pub fn as_bytes(&self) -> &[u8; SHARE_LEN] {
        &self.0
    }
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Share(x = {}, ..)", self.x())
    }
}

/// vsss-rs takes a rand_core 0.10 generator, this crate has rand 0.9: the
/// polynomial coefficients come from a ChaCha20 generator (rand_chacha 0.9)
/// seeded with 32 bytes from the operating system, behind the 0.10 traits.
struct CoefficientRng(ChaCha20Rng);

impl rand_core_010::TryRng for CoefficientRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> std::result::Result<u32, Infallible> {
        Ok(self.0.next_u32())
    }

    fn try_next_u64(&mut self) -> std::result::Result<u64, Infallible> {
        Ok(self.0.next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> std::result::Result<(), Infallible> {
        self.0.fill_bytes(dst);
        Ok(())
    }
}

impl rand_core_010::TryCryptoRng for CoefficientRng {}

/// Splits `secret` into `holders` shares, any `threshold` of which recover it;
/// share `r` (0-based) has x-coordinate `r + 1`.
pub fn split(secret: &[u8; SECRET_LEN], threshold: usize, holders: usize) -> Result<Vec<Share>> {
    if threshold < 2 || threshold > holders || holders > 255 {
        return Err(Error::SecureAggregation(format!(
            "cannot split a secret {threshold}-of-{holders}: need 2 <= threshold <= holders <= 255"
        )));
    }
    let seed = random_bytes::<32>()?;
    let mut rng = CoefficientRng(ChaCha20Rng::from_seed(*seed));
    let ids = (1..=holders as u8).map(|x| IdentifierGf256(Gf256(x)));
    let mut raw =
        Gf256::split_bytes_with_participant_ids_iter(threshold, holders, secret, &mut rng, ids)
            .map_err(|e| Error::SecureAggregation(format!("Shamir splitting failed: {e}")))?;
    let shares = raw.iter().map(|s| Share::from_bytes(s)).collect();
    raw.iter_mut().for_each(|s| s.zeroize());
    shares
}

/// Recovers a secret from at least `threshold` shares with distinct
/// x-coordinates. Interpolating through all given shares means one that is
/// inconsistent with the others changes the result, so the verified
/// reconstructions below notice it.
pub fn combine(shares: &[&Share], threshold: usize) -> Result<Zeroizing<[u8; SECRET_LEN]>> {
    if threshold < 2 || shares.len() < threshold {
        return Err(Error::SecureAggregation(format!(
            "{} shares cannot recover a secret shared {threshold}-of-n",
            shares.len()
        )));
    }
    let mut seen = [false; 256];
    for s in shares {
        if std::mem::replace(&mut seen[s.x() as usize], true) {
            return Err(Error::SecureAggregation(format!(
                "two shares have the same x-coordinate {}",
                s.x()
            )));
        }
    }
    // vsss-rs wants a slice of Vec<u8>: copy the shares into one, wiped after.
    let mut input: Vec<Vec<u8>> = shares.iter().map(|s| s.as_bytes().to_vec()).collect();
    let result = Gf256::combine_bytes(&input);
    input.iter_mut().for_each(|s| s.zeroize());
    let mut bytes = Zeroizing::new(
        result.map_err(|e| Error::SecureAggregation(format!("Shamir recovery failed: {e}")))?,
    );
    let secret: [u8; SECRET_LEN] = bytes.as_slice().try_into().map_err(|_| {
        Error::SecureAggregation(format!(
            "Shamir recovery gave {} bytes, expected {SECRET_LEN}",
            bytes.len()
        ))
    })?;
    bytes.zeroize();
    Ok(Zeroizing::new(secret))
}

/// Which of an owner's two secrets a share is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SecretKind {
    /// The self-mask seed b, revealed for participants that survived.
    SelfMaskSeed,
    /// The mask-agreement key s_sk, revealed for participants that dropped.
    MaskKey,
}

impl fmt::Display for SecretKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SecretKind::SelfMaskSeed => "self-mask seed",
            SecretKind::MaskKey => "mask-agreement key",
        })
    }
}

/// A verified secret, with the holder whose share was left out to obtain it
/// (empty when all shares agreed). See the module documentation for how far
/// that blame goes.
pub struct Reconstructed<T> {
    pub secret: T,
    pub suspect_holders: Vec<u32>,
}

/// Recovers `owner`'s self-mask seed from `(holder, share)` pairs and checks
/// it against the commitment `owner` signed in its advert.
pub fn reconstruct_self_mask_seed(
    ctx: &RoundContext,
    owner: u32,
    shares: &[(u32, Share)],
    threshold: usize,
    commitment: &[u8; KEY_LEN],
) -> Result<Reconstructed<MaskSeed>> {
    reconstruct_verified(
        ctx,
        owner,
        SecretKind::SelfMaskSeed,
        shares,
        threshold,
        |bytes| {
            let seed = MaskSeed::from_bytes(*bytes);
            (self_mask_commitment(ctx, owner, &seed) == *commitment).then_some(seed)
        },
    )
}

/// Recovers `owner`'s mask-agreement secret key from `(holder, share)` pairs
/// and checks that it gives back the public key `owner` advertised. The key
/// was shared in clamped form, so a result that is not clamped is wrong even
/// if X25519 (which ignores the clamped bits) would map it to the same key.
pub fn reconstruct_mask_key(
    ctx: &RoundContext,
    owner: u32,
    shares: &[(u32, Share)],
    threshold: usize,
    s_pk: &[u8; KEY_LEN],
) -> Result<Reconstructed<StaticSecret>> {
    reconstruct_verified(
        ctx,
        owner,
        SecretKind::MaskKey,
        shares,
        threshold,
        |bytes| {
            if !is_clamped(bytes) {
                return None;
            }
            let secret = StaticSecret::from(*bytes);
            (PublicKey::from(&secret).as_bytes() == s_pk).then_some(secret)
        },
    )
}

fn reconstruct_verified<T>(
    ctx: &RoundContext,
    owner: u32,
    kind: SecretKind,
    shares: &[(u32, Share)],
    threshold: usize,
    verify: impl Fn(&[u8; SECRET_LEN]) -> Option<T>,
) -> Result<Reconstructed<T>> {
    let holders: Vec<u32> = shares.iter().map(|(h, _)| *h).collect();
    if shares.len() < threshold {
        return Err(ctx.error(format!(
            "cannot recover participant {owner}'s {kind}: only {} of the {threshold} shares needed arrived (from participants {holders:?})",
            shares.len()
        )));
    }
    let attempt = |skip: Option<usize>| -> Result<Option<T>> {
        let subset: Vec<&Share> = shares
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != skip)
            .map(|(_, (_, s))| s)
            .collect();
        let bytes = combine(&subset, threshold).map_err(|e| {
            ctx.error(format!(
                "cannot recover participant {owner}'s {kind} from the shares of participants {holders:?}: {e}"
            ))
        })?;
        Ok(verify(&bytes))
    };
    if let Some(secret) = attempt(None)? {
        return Ok(Reconstructed {
            secret,
            suspect_holders: Vec::new(),
        });
    }
    // Some share is wrong. With a spare share, leaving each out in turn finds
    // a single wrong one; whatever subset passes, its secret is the signed one.
    // Bounded to leave-one-out: trying all t-subsets of k = 32 shares would be
    // hundreds of millions of interpolations.
    if shares.len() > threshold {
        for (i, (holder, _)) in shares.iter().enumerate() {
            if let Some(secret) = attempt(Some(i))? {
                return Ok(Reconstructed {
                    secret,
                    suspect_holders: vec![*holder],
                });
            }
        }
    }
    let against = match kind {
        SecretKind::SelfMaskSeed => "the self-mask commitment in its signed advert",
        SecretKind::MaskKey => "the public key in its signed advert",
    };
    Err(ctx.error(format!(
        "participant {owner}'s {kind} recovered from the shares of participants {holders:?} does not match {against}: at least one of those shares is wrong{}",
        if shares.len() > threshold {
            " (more than one, as leaving out any single share did not help)"
        } else {
            " (with no spare share, the wrong one cannot be told apart)"
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::secagg::keys::RoundKeys;

    fn ctx() -> RoundContext {
        RoundContext::new("t", 1, 0).unwrap()
    }

    #[test]
    fn any_threshold_subset_recovers() {
        let secret = [0xa5u8; 32];
        let shares = split(&secret, 3, 5).unwrap();
        assert_eq!(
            shares.iter().map(Share::x).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        for a in 0..5 {
            for b in a + 1..5 {
                for c in b + 1..5 {
                    let got = combine(&[&shares[a], &shares[b], &shares[c]], 3).unwrap();
                    assert_eq!(*got, secret);
                }
            }
        }
        let all: Vec<&Share> = shares.iter().collect();
        assert_eq!(*combine(&all, 3).unwrap(), secret);
    }

    #[test]
    fn fewer_than_threshold_or_duplicates_are_refused() {
        let shares = split(&[1; 32], 3, 5).unwrap();
        assert!(combine(&[&shares[0], &shares[1]], 3).is_err());
        assert!(combine(&[&shares[0], &shares[0], &shares[1]], 3).is_err());
        assert!(split(&[1; 32], 1, 5).is_err());
        assert!(split(&[1; 32], 6, 5).is_err());
        assert!(split(&[1; 32], 2, 256).is_err());
    }

    #[test]
    fn share_bytes_are_checked() {
        assert!(Share::from_bytes(&[1; 32]).is_err());
        assert!(Share::from_bytes(&[1; 34]).is_err());
        assert!(Share::from_bytes(&[0; 33]).is_err());
        let s = split(&[9; 32], 2, 3).unwrap();
        let back = Share::from_bytes(s[1].as_bytes()).unwrap();
        assert_eq!(back.as_bytes(), s[1].as_bytes());
        assert_eq!(format!("{back:?}"), "Share(x = 2, ..)");
    }

    #[test]
    fn verified_reconstruction_names_owner_and_suspect_holder() {
        let keys = RoundKeys::generate().unwrap();
        let s_sk = keys.s_secret().to_bytes();
        let shares = split(&s_sk, 3, 5).unwrap();
        let held: Vec<(u32, Share)> = shares
            .into_iter()
            .enumerate()
            .map(|(i, s)| (10 + i as u32, s))
            .collect();
        let ok = reconstruct_mask_key(&ctx(), 7, &held[..3], 3, keys.s_public()).unwrap();
        assert_eq!(ok.secret.to_bytes(), s_sk);
        assert!(ok.suspect_holders.is_empty());

        // One wrong share among exactly t: refused, naming the owner.
        let mut bad = held.clone();
        let mut bytes = *bad[1].1.as_bytes();
        bytes[5] ^= 1;
        bad[1].1 = Share::from_bytes(&bytes).unwrap();
        let err = reconstruct_mask_key(&ctx(), 7, &bad[..3], 3, keys.s_public())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("participant 7's mask-agreement key"), "{err}");
        assert!(err.contains("round 1"), "{err}");

        // With spares, the single wrong share is found and its holder named.
        let found = reconstruct_mask_key(&ctx(), 7, &bad, 3, keys.s_public()).unwrap();
        assert_eq!(found.secret.to_bytes(), s_sk);
        assert_eq!(found.suspect_holders, vec![11]);

        // Two wrong shares among five: refused.
        let mut bytes = *bad[3].1.as_bytes();
        bytes[0x10] ^= 0x80;
        bad[3].1 = Share::from_bytes(&bytes).unwrap();
        assert!(reconstruct_mask_key(&ctx(), 7, &bad, 3, keys.s_public()).is_err());
    }

    #[test]
    fn self_mask_seed_is_checked_against_commitment() {
        let keys = RoundKeys::generate().unwrap();
        let commitment = self_mask_commitment(&ctx(), 2, keys.self_mask_seed());
        let shares = split(keys.self_mask_seed().as_bytes(), 2, 3).unwrap();
        let held: Vec<(u32, Share)> = shares
            .into_iter()
            .zip([0u32, 1, 3])
            .map(|(s, h)| (h, s))
            .collect();
        let got = reconstruct_self_mask_seed(&ctx(), 2, &held[..2], 2, &commitment).unwrap();
        assert_eq!(got.secret.as_bytes(), keys.self_mask_seed().as_bytes());
        // The same shares against another participant's commitment: refused.
        let err = reconstruct_self_mask_seed(&ctx(), 4, &held[..2], 2, &commitment)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("participant 4's self-mask seed"), "{err}");
        assert!(err.contains("[0, 1]"), "{err}");
    }
}
