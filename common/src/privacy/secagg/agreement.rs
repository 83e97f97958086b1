//! Pairwise key agreement: the mask seed two neighbours share, and the key
//! that encrypts the Shamir shares one sends the other.
//!
//! Both come from X25519 followed by HKDF-SHA256. The HKDF info holds the
//! purpose label, the round and the pair (lower index first, with its public
//! key), so:
//! - the seed is the same whichever side computes it (the pair is ordered),
//!   which is what lets the two masks cancel;
//! - the mask seed and the share key are unrelated even if a participant
//!   used one key pair for both (the labels differ);
//! - nothing agreed in one round or attempt is valid in another.
//!
//! A low-order public key would make the X25519 output independent of the
//! secret key (an all-zero "shared" secret the coordinator knows), so
//! non-contributory results are refused.

use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::context::{RoundContext, Transcript, label};
use super::keys::KEY_LEN;
use super::mask::MaskSeed;
use crate::Result;

/// One side of a pairwise agreement: a participant's index, secret key and
/// the public key it advertised for that secret.
pub struct Party<'a> {
    pub index: u32,
    pub secret: &'a StaticSecret,
    pub public: &'a [u8; KEY_LEN],
}

/// The seed of the pairwise mask between `me` and participant `their_index`
/// (whose advertised mask-agreement key is `their_s_pk`), from the `s` keys.
pub fn pairwise_mask_seed(
    ctx: &RoundContext,
    me: &Party<'_>,
    their_index: u32,
    their_s_pk: &[u8; KEY_LEN],
) -> Result<MaskSeed> {
    let okm = derive(ctx, label::PAIRWISE_MASK_SEED, me, their_index, their_s_pk)?;
    Ok(MaskSeed::from_bytes(*okm))
}

/// The ChaCha20-Poly1305 key for the shares `me` and participant
/// `their_index` send each other, from the `c` keys. The same key serves both
/// directions; the direction is bound in the associated data (see `sealed`).
pub fn share_encryption_key(
    ctx: &RoundContext,
    me: &Party<'_>,
    their_index: u32,
    their_c_pk: &[u8; KEY_LEN],
) -> Result<Zeroizing<[u8; KEY_LEN]>> {
    derive(
        ctx,
        label::SHARE_ENCRYPTION_KEY,
        me,
        their_index,
        their_c_pk,
    )
}

fn derive(
    ctx: &RoundContext,
    purpose: &str,
    me: &Party<'_>,
    their_index: u32,
    their_pk: &[u8; KEY_LEN],
) -> Result<Zeroizing<[u8; KEY_LEN]>> {
    if me.index == their_index {
        return Err(ctx.error(format!(
            "participant {} cannot agree a {purpose} with itself",
            me.index
        )));
    }
    let shared = me.secret.diffie_hellman(&PublicKey::from(*their_pk));
    if !shared.was_contributory() {
        return Err(ctx.error(format!(
            "participant {their_index}'s advertised public key is of low order (its {purpose} would be known to anyone); refusing it"
        )));
    }
    let ((lo, lo_pk), (hi, hi_pk)) = if me.index < their_index {
        ((me.index, me.public), (their_index, their_pk))
    } else {
        ((their_index, their_pk), (me.index, me.public))
    };
    let mut info = Transcript::for_round(purpose, ctx);
    info.u32(lo).bytes(lo_pk).u32(hi).bytes(hi_pk);
    let info = info.finish();
    let hkdf = Hkdf::<Sha256>::new(None, shared.as_bytes());
    let mut okm = Zeroizing::new([0u8; KEY_LEN]);
    hkdf.expand(&info, okm.as_mut())
        .map_err(|e| ctx.error(format!("HKDF expansion failed: {e}")))?;
    Ok(okm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::secagg::keys::RoundKeys;

    fn ctx(attempt: u32) -> RoundContext {
        RoundContext::new("t", 4, attempt).unwrap()
    }

    fn party(index: u32, keys: &RoundKeys) -> Party<'_> {
        Party {
            index,
            secret: keys.s_secret(),
            public: keys.s_public(),
        }
    }

    #[test]
    fn seeds_are_symmetric_and_round_bound() {
        let a = RoundKeys::generate().unwrap();
        let b = RoundKeys::generate().unwrap();
        let ab = pairwise_mask_seed(&ctx(0), &party(2, &a), 7, b.s_public()).unwrap();
        let ba = pairwise_mask_seed(&ctx(0), &party(7, &b), 2, a.s_public()).unwrap();
        assert_eq!(ab.as_bytes(), ba.as_bytes());
        let other = pairwise_mask_seed(&ctx(1), &party(2, &a), 7, b.s_public()).unwrap();
        assert_ne!(ab.as_bytes(), other.as_bytes());
        let k = share_encryption_key(&ctx(0), &party(2, &a), 7, b.s_public()).unwrap();
        assert_ne!(ab.as_bytes(), &*k);
    }

    #[test]
    fn low_order_keys_and_self_agreement_are_refused() {
        let a = RoundKeys::generate().unwrap();
        let zero = [0u8; 32];
        let err = pairwise_mask_seed(&ctx(0), &party(1, &a), 2, &zero).unwrap_err();
        assert!(err.to_string().contains("participant 2"), "{err}");
        // 1 is the x-coordinate of a point of order 4.
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(pairwise_mask_seed(&ctx(0), &party(1, &a), 2, &one).is_err());
        assert!(pairwise_mask_seed(&ctx(0), &party(1, &a), 1, a.s_public()).is_err());
    }
}
