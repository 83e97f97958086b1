//! The round a secure-aggregation message belongs to, and the one canonical,
//! domain-separated byte encoding that every signature, key derivation,
//! commitment and AEAD associated data of this module is built from.
//!
//! Why one encoder: a coordinator that can make two different messages encode
//! to the same bytes can move a signature, a key or a ciphertext from one
//! context to another (another round, another participant, another purpose).
//! Every field is therefore length-prefixed or fixed-width, and every use
//! starts with its own purpose label, so no two different inputs share an
//! encoding.

use std::fmt;

use crate::{Error, Result};

/// Version tag at the start of every transcript: a future change of encoding
/// must change it, so old and new signatures can never be confused.
const PROTOCOL_TAG: &[u8] = b"sangsaeng/secagg/v1";

/// Longest accepted training id, in bytes. Real ids are short; the bound keeps
/// a hostile id from inflating every transcript.
pub const MAX_TRAINING_ID_LEN: usize = 256;

/// Purpose labels. Each derivation uses its own, so a value derived for one
/// purpose is useless for any other even from the same key material.
pub(super) mod label {
    pub const ADVERT: &str = "advert";
    pub const SELF_MASK_COMMITMENT: &str = "self-mask-commitment";
    pub const PAIRWISE_MASK_SEED: &str = "pairwise-mask-seed";
    pub const SHARE_ENCRYPTION_KEY: &str = "share-encryption-key";
    pub const SEALED_SHARE_PAIR: &str = "sealed-share-pair";
    pub const GRAPH_SEED: &str = "graph-seed";
    pub const GRAPH_PERMUTATION: &str = "graph-permutation";
}

/// Which training, round and attempt a message belongs to. Every key, seed,
/// commitment and ciphertext of the protocol is bound to it, so nothing from
/// one round (or from a failed attempt of the same round) is accepted in
/// another.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RoundContext {
    training_id: String,
    round: u32,
    attempt: u32,
}

impl RoundContext {
    /// A context for `round` (and its `attempt`, counted from 0) of `training_id`.
    pub fn new(training_id: impl Into<String>, round: u32, attempt: u32) -> Result<Self> {
        let training_id = training_id.into();
        if training_id.is_empty() || training_id.len() > MAX_TRAINING_ID_LEN {
            return Err(Error::SecureAggregation(format!(
                "training id must be 1 to {MAX_TRAINING_ID_LEN} bytes, got {} bytes",
                training_id.len()
            )));
        }
        Ok(RoundContext {
            training_id,
            round,
            attempt,
        })
    }

    pub fn training_id(&self) -> &str {
        &self.training_id
    }

    pub fn round(&self) -> u32 {
        self.round
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// An error about this round, prefixed so an operator knows which one.
    pub(super) fn error(&self, message: impl fmt::Display) -> Error {
        Error::SecureAggregation(format!("{self}: {message}"))
    }
}

impl fmt::Display for RoundContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "secure aggregation of training '{}', round {}, attempt {}",
            self.training_id, self.round, self.attempt
        )
    }
}

/// Builder of canonical, domain-separated byte strings: protocol tag, purpose
/// label, then fields, each either fixed-width little-endian or
/// length-prefixed.
pub(super) struct Transcript(Vec<u8>);

impl Transcript {
    pub(super) fn new(purpose: &str) -> Self {
        let mut t = Transcript(Vec::with_capacity(256));
        t.bytes(PROTOCOL_TAG);
        t.bytes(purpose.as_bytes());
        t
    }

    /// Starts a transcript for `purpose` in round `ctx`.
    pub(super) fn for_round(purpose: &str, ctx: &RoundContext) -> Self {
        let mut t = Transcript::new(purpose);
        t.bytes(ctx.training_id.as_bytes());
        t.u32(ctx.round);
        t.u32(ctx.attempt);
        t
    }

    pub(super) fn u32(&mut self, value: u32) -> &mut Self {
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// A variable-length field, prefixed by its length as u64.
    pub(super) fn bytes(&mut self, value: &[u8]) -> &mut Self {
        self.0
            .extend_from_slice(&(value.len() as u64).to_le_bytes());
        self.0.extend_from_slice(value);
        self
    }

    pub(super) fn finish(self) -> Vec<u8> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_cannot_slide_into_each_other() {
        // "ab" + "c" and "a" + "bc" must differ: that is what the length prefix is for.
        let mut a = Transcript::new("x");
        a.bytes(b"ab").bytes(b"c");
        let mut b = Transcript::new("x");
        b.bytes(b"a").bytes(b"bc");
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn context_is_bound() {
        let c1 = RoundContext::new("t", 1, 0).unwrap();
        let c2 = RoundContext::new("t", 1, 1).unwrap();
        assert_ne!(
            Transcript::for_round("p", &c1).finish(),
            Transcript::for_round("p", &c2).finish()
        );
    }

    #[test]
    fn bad_training_ids_are_refused() {
        assert!(RoundContext::new("", 0, 0).is_err());
        assert!(RoundContext::new("x".repeat(MAX_TRAINING_ID_LEN + 1), 0, 0).is_err());
    }
}
