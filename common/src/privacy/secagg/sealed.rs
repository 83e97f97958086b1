//! Shares in transit: the pair (share of b_i, share of s_sk_i) that
//! participant i sends neighbour j, encrypted so the coordinator relaying it
//! can neither read, alter, swap nor replay it.
//!
//! Reading would be fatal: a coordinator holding t shares of both secrets of
//! one participant unmasks its input. So the pair is sealed with
//! ChaCha20-Poly1305 under the key i and j agree from their `c` keys, with
//! associated data binding training, round, attempt, sender and receiver:
//! - a pair moved to another receiver, or presented as coming from another
//!   sender, fails authentication (different key, different AD);
//! - a pair sent j → i reflected back to j as if from i fails (the key is the
//!   same both ways, the AD's direction is not);
//! - a pair replayed from another round or attempt fails (key and AD differ).
//!
//! The nonce is random and carried along, so sealing again (a retry) never
//! reuses a nonce under the key even if the plaintext were different.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use zeroize::Zeroizing;

use super::agreement::{Party, share_encryption_key};
use super::context::{RoundContext, Transcript, label};
use super::keys::{KEY_LEN, random_bytes};
use super::shamir::{SHARE_LEN, Share};
use crate::Result;

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Plaintext: the b-share, then the s_sk-share.
pub const SHARE_PAIR_LEN: usize = 2 * SHARE_LEN;
/// Serialised sealed pair: sender (u32 LE), receiver (u32 LE), nonce,
/// ciphertext, tag.
pub const SEALED_LEN: usize = 4 + 4 + NONCE_LEN + SHARE_PAIR_LEN + TAG_LEN;

/// The two shares participant i gives one neighbour.
#[derive(Clone, Debug)]
pub struct SharePair {
    /// Share of i's self-mask seed b_i.
    pub self_mask: Share,
    /// Share of i's mask-agreement secret key s_sk_i.
    pub mask_key: Share,
}

/// A [`SharePair`] sealed from `sender` to `receiver`. The indices travel in
/// the clear so the coordinator can route it; they are also authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedSharePair {
    sender: u32,
    receiver: u32,
    nonce: [u8; NONCE_LEN],
    ciphertext: [u8; SHARE_PAIR_LEN],
    tag: [u8; TAG_LEN],
}

impl SealedSharePair {
    pub fn sender(&self) -> u32 {
        self.sender
    }

    pub fn receiver(&self) -> u32 {
        self.receiver
    }

    pub fn to_bytes(&self) -> [u8; SEALED_LEN] {
        let mut out = [0u8; SEALED_LEN];
        out[0..4].copy_from_slice(&self.sender.to_le_bytes());
        out[4..8].copy_from_slice(&self.receiver.to_le_bytes());
        let mut at = 8;
        for part in [&self.nonce[..], &self.ciphertext[..], &self.tag[..]] {
            out[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        out
    }

    /// Parses a sealed pair from the network; only the length can be checked
    /// before opening.
    pub fn from_bytes(ctx: &RoundContext, bytes: &[u8]) -> Result<Self> {
        if bytes.len() != SEALED_LEN {
            return Err(ctx.error(format!(
                "a sealed share pair must be {SEALED_LEN} bytes, got {}",
                bytes.len()
            )));
        }
        let mut s = SealedSharePair {
            sender: u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            receiver: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            nonce: [0; NONCE_LEN],
            ciphertext: [0; SHARE_PAIR_LEN],
            tag: [0; TAG_LEN],
        };
        let (nonce, rest) = bytes[8..].split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(SHARE_PAIR_LEN);
        s.nonce.copy_from_slice(nonce);
        s.ciphertext.copy_from_slice(ciphertext);
        s.tag.copy_from_slice(tag);
        Ok(s)
    }
}

fn associated_data(ctx: &RoundContext, sender: u32, receiver: u32) -> Vec<u8> {
    let mut t = Transcript::for_round(label::SEALED_SHARE_PAIR, ctx);
    t.u32(sender).u32(receiver);
    t.finish()
}

fn cipher(
    ctx: &RoundContext,
    me: &Party<'_>,
    peer: u32,
    peer_c_pk: &[u8; KEY_LEN],
) -> Result<ChaCha20Poly1305> {
    let key = share_encryption_key(ctx, me, peer, peer_c_pk)?;
    Ok(ChaCha20Poly1305::new(Key::from_slice(key.as_slice())))
}

/// Seals `pair` from `sender` (its index, `c` secret and advertised `c_pk`) to
/// `receiver`, whose advertised `c` public key is `receiver_c_pk`.
pub fn seal(
    ctx: &RoundContext,
    sender: &Party<'_>,
    receiver: u32,
    receiver_c_pk: &[u8; KEY_LEN],
    pair: &SharePair,
) -> Result<SealedSharePair> {
    let aead = cipher(ctx, sender, receiver, receiver_c_pk)?;
    let nonce = *random_bytes::<NONCE_LEN>()?;
    let mut buffer = Zeroizing::new([0u8; SHARE_PAIR_LEN]);
    buffer[..SHARE_LEN].copy_from_slice(pair.self_mask.as_bytes());
    buffer[SHARE_LEN..].copy_from_slice(pair.mask_key.as_bytes());
    let ad = associated_data(ctx, sender.index, receiver);
    let tag = aead
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), &ad, buffer.as_mut())
        .map_err(|_| {
            ctx.error(format!(
                "could not encrypt participant {}'s shares for participant {receiver}",
                sender.index
            ))
        })?;
    Ok(SealedSharePair {
        sender: sender.index,
        receiver,
        nonce,
        ciphertext: *buffer,
        tag: tag.into(),
    })
}

/// Opens a pair that claims to come from `sender` (whose advertised `c` public
/// key is `sender_c_pk`) for `receiver`. Anything altered, redirected,
/// reflected or replayed from another round is refused, naming the sender.
pub fn open(
    ctx: &RoundContext,
    receiver: &Party<'_>,
    sender: u32,
    sender_c_pk: &[u8; KEY_LEN],
    sealed: &SealedSharePair,
) -> Result<SharePair> {
    if sealed.sender != sender || sealed.receiver != receiver.index {
        return Err(ctx.error(format!(
            "a sealed share pair addressed from participant {} to participant {} was handed to participant {} as coming from participant {sender}",
            sealed.sender, sealed.receiver, receiver.index
        )));
    }
    let aead = cipher(ctx, receiver, sender, sender_c_pk)?;
    let ad = associated_data(ctx, sender, receiver.index);
    let mut buffer = Zeroizing::new(sealed.ciphertext);
    aead.decrypt_in_place_detached(
        Nonce::from_slice(&sealed.nonce),
        &ad,
        buffer.as_mut(),
        Tag::from_slice(&sealed.tag),
    )
    .map_err(|_| {
        ctx.error(format!(
            "the shares participant {sender} sealed for participant {} fail authentication: altered in transit, sealed for another round or attempt, or not from participant {sender}",
            receiver.index
        ))
    })?;
    Ok(SharePair {
        self_mask: Share::from_bytes(&buffer[..SHARE_LEN])?,
        mask_key: Share::from_bytes(&buffer[SHARE_LEN..])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::secagg::keys::RoundKeys;
    use crate::privacy::secagg::shamir::split;

    fn ctx(round: u32) -> RoundContext {
        RoundContext::new("t", round, 0).unwrap()
    }

    fn party(index: u32, keys: &RoundKeys) -> Party<'_> {
        Party {
            index,
            secret: keys.c_secret(),
            public: keys.c_public(),
        }
    }

    fn pair() -> SharePair {
        let b = split(&[1; 32], 2, 3).unwrap();
        let s = split(&[2; 32], 2, 3).unwrap();
        SharePair {
            self_mask: b[0].clone(),
            mask_key: s[0].clone(),
        }
    }

    #[test]
    fn round_trip_and_size() {
        let (a, b) = (
            RoundKeys::generate().unwrap(),
            RoundKeys::generate().unwrap(),
        );
        let original = pair();
        let sealed = seal(&ctx(1), &party(0, &a), 1, b.c_public(), &original).unwrap();
        let bytes = sealed.to_bytes();
        assert_eq!(bytes.len(), SEALED_LEN);
        assert_eq!(SEALED_LEN, 102);
        let back = SealedSharePair::from_bytes(&ctx(1), &bytes).unwrap();
        assert_eq!(back, sealed);
        let opened = open(&ctx(1), &party(1, &b), 0, a.c_public(), &back).unwrap();
        assert_eq!(opened.self_mask.as_bytes(), original.self_mask.as_bytes());
        assert_eq!(opened.mask_key.as_bytes(), original.mask_key.as_bytes());
        assert!(SealedSharePair::from_bytes(&ctx(1), &bytes[1..]).is_err());
    }

    #[test]
    fn tampering_redirection_reflection_and_replay_are_refused() {
        let (a, b, c) = (
            RoundKeys::generate().unwrap(),
            RoundKeys::generate().unwrap(),
            RoundKeys::generate().unwrap(),
        );
        let sealed = seal(&ctx(1), &party(0, &a), 1, b.c_public(), &pair()).unwrap();

        // A flipped ciphertext bit.
        let mut bytes = sealed.to_bytes();
        bytes[30] ^= 1;
        let tampered = SealedSharePair::from_bytes(&ctx(1), &bytes).unwrap();
        let err = open(&ctx(1), &party(1, &b), 0, a.c_public(), &tampered).unwrap_err();
        assert!(err.to_string().contains("participant 0"), "{err}");

        // Wrong round in the associated data (replay into round 2).
        assert!(open(&ctx(2), &party(1, &b), 0, a.c_public(), &sealed).is_err());

        // Header rewritten to claim another sender: key and AD no longer match.
        let mut bytes = sealed.to_bytes();
        bytes[0] = 2;
        let moved = SealedSharePair::from_bytes(&ctx(1), &bytes).unwrap();
        assert!(open(&ctx(1), &party(1, &b), 2, c.c_public(), &moved).is_err());

        // Handed to the wrong receiver.
        assert!(open(&ctx(1), &party(2, &c), 0, a.c_public(), &sealed).is_err());

        // Reflection: 1 → 0 sealed pair presented to 1 as if 0 → 1.
        let back = seal(&ctx(1), &party(1, &b), 0, a.c_public(), &pair()).unwrap();
        let mut bytes = back.to_bytes();
        bytes[0..4].copy_from_slice(&0u32.to_le_bytes());
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        let reflected = SealedSharePair::from_bytes(&ctx(1), &bytes).unwrap();
        assert!(open(&ctx(1), &party(1, &b), 0, a.c_public(), &reflected).is_err());
    }
}
