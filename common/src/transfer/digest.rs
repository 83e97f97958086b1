//! Whole-object digests of transfers (a downloaded model, an uploaded delta),
//! with SHA-256 or BLAKE3, and the one text form the coordinator records them in.
//!
//! Every byte of a transfer is hashed once at each end (chunks carry a CRC-32C
//! only), so the hash function's speed is a per-byte cost of every round: on a
//! 1e7-parameter, 32-participant round SHA-256 was 23 % of all CPU time. BLAKE3
//! is as strong for this purpose (a 256-bit cryptographic hash) and 2.5x faster
//! per core here, so current peers use it where both ends know it: the
//! coordinator advertises it by sending `ModelInfo.blake3`, and a participant
//! then declares `DIGEST_ALGORITHM_BLAKE3` for its delta. SHA-256 stays the
//! model's identity (audit log, releases, `base_model_digest`) and the default
//! for peers that predate BLAKE3.
//!
//! Text form ("digest id"): lowercase hex for SHA-256 (what every record held
//! before BLAKE3), `blake3:` and lowercase hex for BLAKE3, so the algorithm
//! travels with the digest into receipts, the store and the audit log.

use sangsaeng_proto::v1 as pb;

/// Prefix of a BLAKE3 digest id.
const BLAKE3_PREFIX: &str = "blake3:";

/// Hash function of a whole-object digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestAlgorithm {
    Sha256,
    Blake3,
}

impl DigestAlgorithm {
    /// The algorithm a protocol field names; `None` for a value this build does
    /// not know (the caller names the field in its refusal).
    pub fn from_wire(value: i32) -> Option<Self> {
        match pb::DigestAlgorithm::try_from(value) {
            Ok(pb::DigestAlgorithm::Sha256) => Some(DigestAlgorithm::Sha256),
            Ok(pb::DigestAlgorithm::Blake3) => Some(DigestAlgorithm::Blake3),
            Err(_) => None,
        }
    }

    pub fn to_wire(self) -> pb::DigestAlgorithm {
        match self {
            DigestAlgorithm::Sha256 => pb::DigestAlgorithm::Sha256,
            DigestAlgorithm::Blake3 => pb::DigestAlgorithm::Blake3,
        }
    }

    /// The whole-object digest a participant uses with the coordinator that
    /// sent `info`: BLAKE3 where the model info announces the model's BLAKE3
    /// (such a coordinator also accepts BLAKE3 delta digests), else SHA-256.
    pub fn announced_by(info: &pb::ModelInfo) -> Self {
        if info.blake3.is_empty() {
            DigestAlgorithm::Sha256
        } else {
            DigestAlgorithm::Blake3
        }
    }

    /// The algorithm of a digest id (see the module docs).
    pub fn of_id(id: &str) -> Self {
        if id.starts_with(BLAKE3_PREFIX) {
            DigestAlgorithm::Blake3
        } else {
            DigestAlgorithm::Sha256
        }
    }

    /// The id of a digest given as its 32 raw bytes.
    pub fn id(self, raw: &[u8]) -> String {
        match self {
            DigestAlgorithm::Sha256 => hex::encode(raw),
            DigestAlgorithm::Blake3 => format!("{BLAKE3_PREFIX}{}", hex::encode(raw)),
        }
    }

    /// The id of a digest given as lowercase hex (a protocol field's text form).
    pub fn id_of_hex(self, hex_digest: &str) -> String {
        match self {
            DigestAlgorithm::Sha256 => hex_digest.to_string(),
            DigestAlgorithm::Blake3 => format!("{BLAKE3_PREFIX}{hex_digest}"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "SHA-256",
            DigestAlgorithm::Blake3 => "BLAKE3",
        }
    }
}

/// The 32 raw bytes of a digest id; `None` if it is not one.
pub fn raw_of_id(id: &str) -> Option<[u8; 32]> {
    let hex_digest = id.strip_prefix(BLAKE3_PREFIX).unwrap_or(id);
    let mut raw = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut raw).ok()?;
    Some(raw)
}

/// An incremental hash of a transfer, fed chunk by chunk.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    // Boxed: BLAKE3's hasher keeps a stack of chaining values (1.9 KB), and a
    // hasher lives in every kept, resumable upload.
    Blake3(Box<blake3::Hasher>),
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hasher({})", self.algorithm().name())
    }
}

impl Hasher {
    pub fn new(algorithm: DigestAlgorithm) -> Self {
        match algorithm {
            DigestAlgorithm::Sha256 => Hasher::Sha256(<sha2::Sha256 as sha2::Digest>::new()),
            DigestAlgorithm::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    pub fn algorithm(&self) -> DigestAlgorithm {
        match self {
            Hasher::Sha256(_) => DigestAlgorithm::Sha256,
            Hasher::Blake3(_) => DigestAlgorithm::Blake3,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => sha2::Digest::update(h, bytes),
            Hasher::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    /// The digest's 32 raw bytes.
    pub fn finalize(self) -> [u8; 32] {
        match self {
            Hasher::Sha256(h) => sha2::Digest::finalize(h).into(),
            Hasher::Blake3(h) => *h.finalize().as_bytes(),
        }
    }

    /// The digest's id (see the module docs).
    pub fn finalize_id(self) -> String {
        let algorithm = self.algorithm();
        algorithm.id(&self.finalize())
    }
}

/// The raw digest of `bytes`, in one call.
pub fn digest(algorithm: DigestAlgorithm, bytes: &[u8]) -> [u8; 32] {
    let mut h = Hasher::new(algorithm);
    h.update(bytes);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_algorithms_give_their_published_test_vectors() {
        // FIPS 180-4 and the BLAKE3 reference: the digests of "abc".
        let sha = digest(DigestAlgorithm::Sha256, b"abc");
        assert_eq!(
            hex::encode(sha),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let b3 = digest(DigestAlgorithm::Blake3, b"abc");
        assert_eq!(
            hex::encode(b3),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }

    #[test]
    fn a_hash_fed_in_chunks_equals_the_hash_of_the_whole() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
        for algorithm in [DigestAlgorithm::Sha256, DigestAlgorithm::Blake3] {
            let mut h = Hasher::new(algorithm);
            for c in data.chunks(4093) {
                h.update(c);
            }
            assert_eq!(h.finalize(), digest(algorithm, &data), "{algorithm:?}");
        }
    }

    #[test]
    fn an_id_names_its_algorithm_and_gives_back_its_bytes() {
        let raw = digest(DigestAlgorithm::Blake3, b"delta");
        let id = DigestAlgorithm::Blake3.id(&raw);
        assert!(id.starts_with("blake3:"), "{id}");
        assert_eq!(DigestAlgorithm::of_id(&id), DigestAlgorithm::Blake3);
        assert_eq!(raw_of_id(&id), Some(raw));
        assert_eq!(DigestAlgorithm::Blake3.id_of_hex(&hex::encode(raw)), id);

        let raw = digest(DigestAlgorithm::Sha256, b"delta");
        let id = DigestAlgorithm::Sha256.id(&raw);
        assert_eq!(id, hex::encode(raw));
        assert_eq!(DigestAlgorithm::of_id(&id), DigestAlgorithm::Sha256);
        assert_eq!(raw_of_id(&id), Some(raw));

        assert_eq!(raw_of_id("blake3:abcd"), None);
        assert_eq!(raw_of_id(&"zz".repeat(32)), None);
    }

    #[test]
    fn a_participant_uses_blake3_only_with_a_coordinator_that_announces_it() {
        let mut info = pb::ModelInfo::default();
        assert_eq!(
            DigestAlgorithm::announced_by(&info),
            DigestAlgorithm::Sha256
        );
        info.blake3 = vec![0; 32];
        assert_eq!(
            DigestAlgorithm::announced_by(&info),
            DigestAlgorithm::Blake3
        );
    }

    #[test]
    fn wire_values_round_trip_and_an_unknown_one_is_not_guessed() {
        for a in [DigestAlgorithm::Sha256, DigestAlgorithm::Blake3] {
            assert_eq!(DigestAlgorithm::from_wire(a.to_wire() as i32), Some(a));
        }
        assert_eq!(DigestAlgorithm::from_wire(7), None);
    }
}
