//! A participant's secrets for one round and the signed advert that
//! publishes their public halves.
//!
//! Each round (each attempt of it) a participant makes fresh key material:
//! - `c`: an X25519 pair for encrypting its Shamir shares to its neighbours;
//! - `s`: an X25519 pair for agreeing the pairwise mask seeds, whose secret
//!   half is itself Shamir-shared so the coordinator can cancel this
//!   participant's pairwise masks if it drops out;
//! - `b`: a 32-byte self-mask seed, also Shamir-shared, revealed only if the
//!   participant survives (it hides the input from the moment the pairwise
//!   masks of a late dropout are cancelled).
//!
//! Fresh keys per attempt are what make a reveal harmless for the next round:
//! a reconstructed `s_sk` or `b` is worthless once the attempt is over.
//!
//! The advert carries `c_pk`, `s_pk` and a commitment to `b`; the participant
//! signs [`advert_signing_bytes`] with its TLS key (outside this module), so a
//! coordinator cannot substitute keys (it would then hold the secret halves and
//! read the shares) or replay them into another round.

use std::fmt;

use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::context::{RoundContext, Transcript, label};
use super::mask::MaskSeed;
use crate::{Error, Result};

/// Length of an X25519 public key, a commitment and every secret here.
pub const KEY_LEN: usize = 32;

/// Longest accepted organisation id in an advert, in bytes.
pub const MAX_ORG_ID_LEN: usize = 256;

/// `N` bytes from the operating system's generator. The failure is returned,
/// not panicked on: a participant without entropy must stop, not crash.
pub(super) fn random_bytes<const N: usize>() -> Result<Zeroizing<[u8; N]>> {
    let mut bytes = Zeroizing::new([0u8; N]);
    OsRng.try_fill_bytes(bytes.as_mut()).map_err(|e| {
        Error::SecureAggregation(format!(
            "the operating system's random number generator failed: {e}"
        ))
    })?;
    Ok(bytes)
}

/// One participant's secrets for one round. Zeroized on drop (x25519-dalek's
/// `StaticSecret` and [`MaskSeed`] both wipe themselves).
pub struct RoundKeys {
    c_sk: StaticSecret,
    s_sk: StaticSecret,
    b: MaskSeed,
    c_pk: [u8; KEY_LEN],
    s_pk: [u8; KEY_LEN],
}

impl RoundKeys {
    /// Fresh keys from the operating system's generator. x25519-dalek 2 takes a
    /// rand_core 0.6 generator while this crate uses rand 0.9, so the secrets
    /// are drawn as bytes and the keys built from them (X25519 clamps any 32
    /// bytes into a valid scalar).
    pub fn generate() -> Result<Self> {
        let c = random_bytes::<KEY_LEN>()?;
        let s = random_bytes::<KEY_LEN>()?;
        let b = random_bytes::<KEY_LEN>()?;
        Ok(RoundKeys::from_secret_bytes(*c, *s, *b))
    }

    /// Keys from given secret bytes: for tests and for restoring a round's
    /// state. Never reuse bytes across rounds or attempts.
    ///
    /// s_sk is kept in clamped form (the scalar X25519 actually uses). X25519
    /// ignores 5 bits of its secret, so an unclamped s_sk rebuilt from a wrong
    /// share could still match the public key with different bytes; clamped,
    /// the reconstruction check in `shamir` is exact.
    pub fn from_secret_bytes(c_sk: [u8; KEY_LEN], s_sk: [u8; KEY_LEN], b: [u8; KEY_LEN]) -> Self {
        let c_sk = StaticSecret::from(c_sk);
        let s_sk = StaticSecret::from(clamp(s_sk));
        let c_pk = PublicKey::from(&c_sk).to_bytes();
        let s_pk = PublicKey::from(&s_sk).to_bytes();
        RoundKeys {
            c_sk,
            s_sk,
            b: MaskSeed::from_bytes(b),
            c_pk,
            s_pk,
        }
    }

    pub fn c_public(&self) -> &[u8; KEY_LEN] {
        &self.c_pk
    }

    pub fn s_public(&self) -> &[u8; KEY_LEN] {
        &self.s_pk
    }

    pub(super) fn c_secret(&self) -> &StaticSecret {
        &self.c_sk
    }

    pub(super) fn s_secret(&self) -> &StaticSecret {
        &self.s_sk
    }

    pub(super) fn self_mask_seed(&self) -> &MaskSeed {
        &self.b
    }

    /// The advert publishing these keys for `participant` (its index in the
    /// round's roster) of organisation `org_id`.
    pub fn advert(&self, ctx: &RoundContext, participant: u32, org_id: &str) -> Result<Advert> {
        let advert = Advert {
            participant,
            org_id: org_id.to_owned(),
            c_pk: self.c_pk,
            s_pk: self.s_pk,
            b_commitment: self_mask_commitment(ctx, participant, &self.b),
        };
        advert.validate(ctx)?;
        Ok(advert)
    }
}

impl fmt::Debug for RoundKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoundKeys")
            .field("c_pk", &hex(&self.c_pk))
            .field("s_pk", &hex(&self.s_pk))
            .finish_non_exhaustive()
    }
}

/// What a participant publishes about itself for one round. Relayed by the
/// coordinator to every participant, with the participant's signature over
/// [`Advert::signing_bytes`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    /// Index of the participant in the round's roster, `0..n`.
    pub participant: u32,
    /// The organisation the participant's TLS certificate names; the verifier
    /// of the signature checks that the certificate matches it.
    pub org_id: String,
    /// Public key for encrypting shares to this participant.
    pub c_pk: [u8; KEY_LEN],
    /// Public key for pairwise mask agreement.
    pub s_pk: [u8; KEY_LEN],
    /// [`self_mask_commitment`] of the self-mask seed, so a reconstructed seed
    /// can be checked.
    pub b_commitment: [u8; KEY_LEN],
}

impl Advert {
    /// The bytes this advert's participant signs for round `ctx`.
    pub fn signing_bytes(&self, ctx: &RoundContext) -> Vec<u8> {
        advert_signing_bytes(
            ctx,
            self.participant,
            &self.org_id,
            &self.c_pk,
            &self.s_pk,
            &self.b_commitment,
        )
    }

    /// Checks what can be checked without the signature: sizes, and that the
    /// two public keys differ (one key for both purposes would mean a
    /// participant encrypts its shares under the key it also shares out).
    pub fn validate(&self, ctx: &RoundContext) -> Result<()> {
        if self.org_id.is_empty() || self.org_id.len() > MAX_ORG_ID_LEN {
            return Err(ctx.error(format!(
                "participant {}'s advert has an organisation id of {} bytes; 1 to {MAX_ORG_ID_LEN} allowed",
                self.participant,
                self.org_id.len()
            )));
        }
        if self.c_pk == self.s_pk {
            return Err(ctx.error(format!(
                "participant {} (organisation '{}') advertised the same key for share encryption and mask agreement",
                self.participant, self.org_id
            )));
        }
        Ok(())
    }
}

/// Canonical, domain-separated bytes that participant `participant_index` of
/// organisation `org_id` signs to publish its keys for one round. Binding the
/// training, round and attempt stops a coordinator from replaying an old
/// advert (whose secrets it may since have reconstructed) into a new round;
/// binding the index and organisation stops it from moving keys between
/// participants.
pub fn advert_signing_bytes(
    ctx: &RoundContext,
    participant_index: u32,
    org_id: &str,
    c_pk: &[u8; KEY_LEN],
    s_pk: &[u8; KEY_LEN],
    b_commitment: &[u8; KEY_LEN],
) -> Vec<u8> {
    let mut t = Transcript::for_round(label::ADVERT, ctx);
    t.u32(participant_index)
        .bytes(org_id.as_bytes())
        .bytes(c_pk)
        .bytes(s_pk)
        .bytes(b_commitment);
    t.finish()
}

/// SHA-256 commitment to participant `participant`'s self-mask seed `b` for
/// round `ctx`. `b` is 32 uniformly random bytes, so the hash hides it; the
/// round and index are hashed in so a commitment cannot be reused elsewhere.
pub fn self_mask_commitment(ctx: &RoundContext, participant: u32, b: &MaskSeed) -> [u8; KEY_LEN] {
    let mut t = Transcript::for_round(label::SELF_MASK_COMMITMENT, ctx);
    t.u32(participant).bytes(b.as_bytes());
    let preimage = Zeroizing::new(t.finish());
    Sha256::digest(preimage.as_slice()).into()
}

/// X25519 scalar clamping (RFC 7748 §5): clear the 3 low bits and the top
/// bit, set bit 254.
pub(super) fn clamp(mut scalar: [u8; KEY_LEN]) -> [u8; KEY_LEN] {
    scalar[0] &= 248;
    scalar[31] &= 127;
    scalar[31] |= 64;
    scalar
}

/// Whether `scalar` is in clamped form.
pub(super) fn is_clamped(scalar: &[u8; KEY_LEN]) -> bool {
    clamp(*scalar) == *scalar
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(round: u32) -> RoundContext {
        RoundContext::new("training-1", round, 0).unwrap()
    }

    #[test]
    fn generated_keys_are_fresh_and_distinct() {
        let a = RoundKeys::generate().unwrap();
        let b = RoundKeys::generate().unwrap();
        assert_ne!(a.c_public(), b.c_public());
        assert_ne!(a.c_public(), a.s_public());
    }

    #[test]
    fn signing_bytes_bind_round_index_and_keys() {
        let keys = RoundKeys::generate().unwrap();
        let advert = keys.advert(&ctx(1), 3, "org-a").unwrap();
        let base = advert.signing_bytes(&ctx(1));
        assert_ne!(base, advert.signing_bytes(&ctx(2)));
        let mut moved = advert.clone();
        moved.participant = 4;
        assert_ne!(base, moved.signing_bytes(&ctx(1)));
        let mut swapped = advert.clone();
        std::mem::swap(&mut swapped.c_pk, &mut swapped.s_pk);
        assert_ne!(base, swapped.signing_bytes(&ctx(1)));
    }

    #[test]
    fn signing_bytes_length() {
        // 189 fixed bytes (tag, label, length prefixes, integers, 3 keys) plus
        // the training and organisation ids.
        let keys = RoundKeys::generate().unwrap();
        let training = "0b6c8a3e-2f4d-4c1a-9e7b-5d3f1a2b4c6d";
        let ctx = RoundContext::new(training, 12, 1).unwrap();
        let advert = keys.advert(&ctx, 7, "hanbit-steel-01").unwrap();
        assert_eq!(
            advert.signing_bytes(&ctx).len(),
            189 + training.len() + "hanbit-steel-01".len()
        );
    }

    #[test]
    fn commitment_binds_round_and_participant() {
        let keys = RoundKeys::generate().unwrap();
        let b = keys.self_mask_seed();
        assert_ne!(
            self_mask_commitment(&ctx(1), 0, b),
            self_mask_commitment(&ctx(1), 1, b)
        );
        assert_ne!(
            self_mask_commitment(&ctx(1), 0, b),
            self_mask_commitment(&ctx(2), 0, b)
        );
    }

    #[test]
    fn adverts_with_one_key_for_both_uses_are_refused() {
        let keys = RoundKeys::generate().unwrap();
        let mut advert = keys.advert(&ctx(1), 0, "org").unwrap();
        advert.s_pk = advert.c_pk;
        assert!(advert.validate(&ctx(1)).is_err());
        advert.s_pk = *keys.s_public();
        advert.org_id.clear();
        assert!(advert.validate(&ctx(1)).is_err());
    }

    #[test]
    fn mask_key_is_stored_clamped_with_the_same_public_key() {
        let raw = [0xffu8; 32];
        let keys = RoundKeys::from_secret_bytes([1; 32], raw, [3; 32]);
        assert!(is_clamped(&keys.s_secret().to_bytes()));
        assert_eq!(
            PublicKey::from(&StaticSecret::from(raw)).as_bytes(),
            keys.s_public()
        );
    }

    #[test]
    fn debug_does_not_print_secrets() {
        let keys = RoundKeys::from_secret_bytes([1; 32], [2; 32], [3; 32]);
        let shown = format!("{keys:?}");
        assert!(!shown.contains(&hex(&[3; 32])));
        assert!(!shown.contains(&hex(&[1; 32])));
    }
}
