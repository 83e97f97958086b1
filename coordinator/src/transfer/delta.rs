//! The checks on an uploaded delta: each chunk's index, size, CRC-32C or
//! SHA-256 and decoding, and the whole delta's digest against the trailer.
//!
//! An upload is folded into the round's accumulator chunk by chunk as it arrives
//! (`round/upload.rs`), so the coordinator never holds a whole delta: a
//! [`DeltaReceiver`] hands out each checked chunk's values and keeps only the
//! running digest.

use sangsaeng_common::transfer::digest::{self, DigestAlgorithm};
use sangsaeng_common::transfer::encoding::{self, UpdateEncoding};
use sangsaeng_proto::v1 as pb;

use crate::error::{CoordinatorError, Result};

/// One chunk that passed every check, decoded, and where its values go: a view
/// of the receiver's decode buffer, valid until its next chunk.
#[derive(Debug)]
pub struct CheckedChunk<'a> {
    pub offset: usize,
    pub payload: Payload<'a>,
}

impl<'a> CheckedChunk<'a> {
    /// The delta values of a plain upload's chunk (`None` for a masked one).
    pub fn values(&self) -> Option<&'a [f32]> {
        match self.payload {
            Payload::Values(v) => Some(v),
            Payload::Masked(_) => None,
        }
    }
}

/// A chunk's decoded content.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// Delta values (a plain upload).
    Values(&'a [f32]),
    /// Masked fixed-point words (a secure-aggregation upload).
    Masked(&'a [i64]),
}

/// Checks a delta's chunks in order (index, size, CRC-32C and/or digest,
/// decoding, length) and the whole-delta digest at the end. It holds no values:
/// each checked chunk is handed back to be folded, so it can be set aside when a
/// connection breaks and resumed at [`DeltaReceiver::next_index`] at the cost of
/// a hasher.
pub struct DeltaReceiver {
    expected_values: usize,
    max_chunk_bytes: usize,
    encoding: UpdateEncoding,
    next_index: u32,
    received_values: usize,
    hasher: digest::Hasher,
    /// Decoded values of the latest chunk, reused from chunk to chunk.
    values: Vec<f32>,
    /// Set for a masked upload: chunks are words of Z_2^64, decoded here.
    masked: Option<Vec<i64>>,
    /// With a norm bound (`aggregation.robust = "norm-bound"`): the bound and
    /// the running Σ v² of the values received.
    /// (bound, the plan key that sets it, sum of squares so far).
    norm_bound: Option<(f64, &'static str, f64)>,
}

impl std::fmt::Debug for DeltaReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaReceiver")
            .field("expected_values", &self.expected_values)
            .field("received_values", &self.received_values)
            .field("next_index", &self.next_index)
            .finish()
    }
}

impl DeltaReceiver {
    /// Gives back the decode buffer (a chunk's worth of values), for a receiver
    /// set aside until its upload resumes.
    pub fn release_buffer(&mut self) {
        self.values = Vec::new();
        if let Some(words) = &mut self.masked {
            *words = Vec::new();
        }
    }

    /// Index of the next chunk expected (the number of chunks accepted so far).
    pub fn next_index(&self) -> u32 {
        self.next_index
    }

    pub fn encoding(&self) -> UpdateEncoding {
        self.encoding
    }

    /// A receiver for `expected_values` values sent in `encoding`, chunks of at
    /// most `max_chunk_bytes` encoded bytes, the whole hashed with `algorithm`.
    pub fn new(
        expected_values: usize,
        max_chunk_bytes: usize,
        encoding: UpdateEncoding,
        algorithm: DigestAlgorithm,
    ) -> Self {
        DeltaReceiver {
            expected_values,
            max_chunk_bytes,
            encoding,
            next_index: 0,
            received_values: 0,
            hasher: digest::Hasher::new(algorithm),
            values: Vec::new(),
            masked: None,
            norm_bound: None,
        }
    }

    /// Refuses the update as soon as the L2 norm of its values passes `bound`
    /// (`aggregation.robust = "norm-bound"`): the chunk that crosses it is
    /// never folded, so one oversized update costs the round nothing.
    pub fn bounding_norm(mut self, bound: f64, key: &'static str) -> Self {
        self.norm_bound = Some((bound, key, 0.0));
        self
    }

    /// The L2 norm of the values received so far (`None` without a bound).
    pub fn norm(&self) -> Option<f64> {
        self.norm_bound.map(|(_, _, sq)| sq.sqrt())
    }

    /// A receiver for a masked upload (secure aggregation): its chunks are
    /// 8-byte words, one per parameter.
    pub fn masked(mut self) -> Self {
        self.masked = Some(Vec::new());
        self
    }

    pub fn is_masked(&self) -> bool {
        self.masked.is_some()
    }

    /// Checks one chunk and returns its decoded values with their offset.
    pub fn push(&mut self, chunk: &pb::UpdateChunk) -> Result<CheckedChunk<'_>> {
        self.check_transfer(chunk)?;
        self.decode(chunk)
    }

    /// The chunk as sent: in order, within the size limit, and matching its
    /// CRC-32C and/or SHA-256.
    fn check_transfer(&self, chunk: &pb::UpdateChunk) -> Result<()> {
        use sha2::Digest;
        let bad = |m: String| Err(CoordinatorError::InvalidArgument(m));
        if chunk.index != self.next_index {
            return bad(format!(
                "chunk {} arrived where chunk {} was expected",
                chunk.index, self.next_index
            ));
        }
        if chunk.data.len() > self.max_chunk_bytes {
            return Err(CoordinatorError::ResourceExhausted(format!(
                "chunk {} is {} bytes, above the limit of {}",
                chunk.index,
                chunk.data.len(),
                self.max_chunk_bytes
            )));
        }
        let has_digest = !(chunk.sha256.is_empty() && chunk.digest.is_empty());
        if !has_digest && chunk.crc32c.is_none() {
            return bad(format!(
                "chunk {} carries no digest (sha256 or digest) and no crc32c",
                chunk.index
            ));
        }
        if let Some(declared) = chunk.crc32c {
            let crc = crc32c::crc32c(&chunk.data);
            if crc != declared {
                return bad(format!(
                    "chunk {} checksum mismatch: declared crc32c {declared:08x}, received data gives {crc:08x}",
                    chunk.index
                ));
            }
        }
        // A chunk's own SHA-256 is computed only when the chunk declares one: with
        // the CRC alone, the whole-delta digest below is the one pass of a hash.
        let digest = if has_digest {
            sha2::Sha256::digest(&chunk.data)
        } else {
            Default::default()
        };
        let hex_ok = chunk.sha256.is_empty() || hex::encode(digest) == chunk.sha256;
        let raw_ok = chunk.digest.is_empty() || chunk.digest[..] == digest[..];
        if !(hex_ok && raw_ok) {
            let declared = if hex_ok {
                hex::encode(&chunk.digest)
            } else {
                chunk.sha256.clone()
            };
            return bad(format!(
                "chunk {} digest mismatch: declared {declared}, received data hashes to {}",
                chunk.index,
                hex::encode(digest)
            ));
        }
        Ok(())
    }

    /// Decodes a checked chunk (values, or masked words) and advances.
    fn decode(&mut self, chunk: &pb::UpdateChunk) -> Result<CheckedChunk<'_>> {
        let bad = |m: String| Err(CoordinatorError::InvalidArgument(m));
        let decoded = match &mut self.masked {
            Some(words) => {
                sangsaeng_common::privacy::secagg::wire::decode_words(&chunk.data, words)
            }
            None => encoding::decode_chunk_into(&chunk.data, self.encoding, &mut self.values),
        };
        match decoded {
            Ok(()) => {}
            Err(sangsaeng_common::Error::Protocol(m)) => {
                return bad(format!("chunk {}: {m}", chunk.index));
            }
            Err(e) => return bad(format!("chunk {}: {e}", chunk.index)),
        };
        let payload = match &self.masked {
            Some(words) => Payload::Masked(words),
            None => Payload::Values(&self.values),
        };
        let len = match payload {
            Payload::Values(v) => v.len(),
            Payload::Masked(w) => w.len(),
        };
        if self.received_values + len > self.expected_values {
            return bad(format!(
                "chunk {} takes the delta beyond the model's {} values",
                chunk.index, self.expected_values
            ));
        }
        if let (Some((bound, key, sq)), Payload::Values(v)) = (&mut self.norm_bound, payload) {
            let total = *sq + v.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
            if total.sqrt() > *bound {
                return bad(format!(
                    "the update's L2 norm passes {key} = {bound} at chunk {} (at least {:.6}): refused by the plan's norm bound",
                    chunk.index,
                    total.sqrt()
                ));
            }
            *sq = total;
        }
        self.hasher.update(&chunk.data);
        let offset = self.received_values;
        self.received_values += len;
        self.next_index += 1;
        Ok(CheckedChunk { offset, payload })
    }

    /// Checks the length and the trailer's whole-delta digest (settled by
    /// [`settle_trailer`]); returns the digest's id.
    pub fn finish(self, trailer: &pb::UpdateTrailer) -> Result<String> {
        if self.received_values != self.expected_values {
            return Err(CoordinatorError::InvalidArgument(format!(
                "the delta ended after {} of {} values",
                self.received_values, self.expected_values
            )));
        }
        if trailer.sha256.is_empty() {
            return Err(CoordinatorError::InvalidArgument(
                "the upload declared no whole-delta digest, in its header or its trailer".into(),
            ));
        }
        let digest = self.hasher.finalize_id();
        if digest != trailer.sha256 {
            return Err(CoordinatorError::InvalidArgument(format!(
                "whole-delta digest mismatch: declared {}, received data hashes to {digest}",
                trailer.sha256
            )));
        }
        Ok(digest)
    }
}

/// Folds the raw-byte form of a digest (the `*_digest` fields of an upload's
/// messages) into its hex form, the one the coordinator compares and records.
fn settle_digest(hex_form: &mut String, raw: &[u8], field: &str, kind: &str) -> Result<()> {
    if raw.is_empty() {
        return Ok(());
    }
    if raw.len() != 32 {
        return Err(CoordinatorError::InvalidArgument(format!(
            "{field} must be the 32 bytes of a {kind}, not {}",
            raw.len()
        )));
    }
    let hex = hex::encode(raw);
    if !hex_form.is_empty() && *hex_form != hex {
        return Err(CoordinatorError::InvalidArgument(format!(
            "{field} {hex} disagrees with its hex form {hex_form}"
        )));
    }
    *hex_form = hex;
    Ok(())
}

/// The hash function of an upload's whole-delta digest, as its header names it.
pub fn delta_algorithm(h: &pb::UpdateHeader) -> Result<DigestAlgorithm> {
    DigestAlgorithm::from_wire(h.delta_digest_algorithm).ok_or_else(|| {
        CoordinatorError::InvalidArgument(format!(
            "delta_digest_algorithm {} is not one this coordinator knows (0 = SHA-256, 1 = BLAKE3)",
            h.delta_digest_algorithm
        ))
    })
}

/// An upload header with its digests in the coordinator's text form, whichever
/// form was sent: the base model's SHA-256 in hex, the delta's digest as its id
/// (`sangsaeng_common::transfer::digest`: hex, or `blake3:` and hex).
pub fn settle_header(h: &mut pb::UpdateHeader) -> Result<()> {
    settle_digest(
        &mut h.base_model_sha256,
        &h.base_model_digest,
        "base_model_digest",
        "SHA-256 digest",
    )?;
    let kind = format!("{} digest", delta_algorithm(h)?.name());
    settle_digest(&mut h.delta_sha256, &h.delta_digest, "delta_digest", &kind)?;
    if !h.delta_sha256.is_empty() {
        h.delta_sha256 = delta_algorithm(h)?.id_of_hex(&h.delta_sha256);
    }
    Ok(())
}

/// A trailer with the whole-delta digest as an id in the header's algorithm:
/// the one it carries, or else the one the header declared (empty if neither did).
pub fn settle_trailer(t: &mut pb::UpdateTrailer, header: &pb::UpdateHeader) -> Result<()> {
    let kind = format!("{} digest", delta_algorithm(header)?.name());
    settle_digest(&mut t.sha256, &t.digest, "the trailer's digest", &kind)?;
    if t.sha256.is_empty() {
        t.sha256.clone_from(&header.delta_sha256);
    } else {
        t.sha256 = delta_algorithm(header)?.id_of_hex(&t.sha256);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sangsaeng_common::transfer::weights;

    /// A trailer declaring the whole-delta digest of `v`.
    fn trailer(v: &[f32]) -> pb::UpdateTrailer {
        pb::UpdateTrailer {
            sha256: weights::digest(v),
            ..Default::default()
        }
    }

    fn chunk(index: u32, v: &[f32]) -> pb::UpdateChunk {
        let data = weights::to_le_bytes(v);
        pb::UpdateChunk {
            index,
            sha256: weights::sha256_hex(&data),
            data: data.into(),
            ..Default::default()
        }
    }

    #[test]
    fn receiver_accepts_a_good_delta_and_refuses_bad_chunks() {
        let v: Vec<f32> = (0..10).map(|i| i as f32 * 0.5).collect();
        let mut r = DeltaReceiver::new(10, 4096, UpdateEncoding::Float32, DigestAlgorithm::Sha256);
        let a = r.push(&chunk(0, &v[..6])).unwrap();
        assert_eq!((a.offset, a.values().unwrap()), (0, &v[..6]));
        let b = r.push(&chunk(1, &v[6..])).unwrap();
        assert_eq!((b.offset, b.values().unwrap()), (6, &v[6..]));
        assert_eq!(r.finish(&trailer(&v)).unwrap(), weights::digest(&v));

        let mut r = DeltaReceiver::new(10, 4096, UpdateEncoding::Float32, DigestAlgorithm::Sha256);
        assert!(
            r.push(&chunk(1, &v))
                .unwrap_err()
                .to_string()
                .contains("expected")
        );
        let mut c = chunk(0, &v[..2]);
        c.sha256 = "00".into();
        assert!(
            r.push(&c)
                .unwrap_err()
                .to_string()
                .contains("digest mismatch")
        );
        let mut r = DeltaReceiver::new(10, 8, UpdateEncoding::Float32, DigestAlgorithm::Sha256);
        assert!(matches!(
            r.push(&chunk(0, &v[..3])),
            Err(CoordinatorError::ResourceExhausted(_))
        ));
        let mut r = DeltaReceiver::new(2, 4096, UpdateEncoding::Float32, DigestAlgorithm::Sha256);
        assert!(
            r.push(&chunk(0, &v[..3]))
                .unwrap_err()
                .to_string()
                .contains("beyond")
        );
        let mut r = DeltaReceiver::new(10, 4096, UpdateEncoding::Float32, DigestAlgorithm::Sha256);
        r.push(&chunk(0, &v[..4])).unwrap();
        let e = r.finish(&trailer(&v[..4])).unwrap_err();
        assert!(e.to_string().contains("ended after 4 of 10"));
    }

    #[test]
    fn a_blake3_delta_digest_is_checked_and_recorded_with_its_algorithm() {
        let v: Vec<f32> = (0..10).map(|i| i as f32 * 0.5).collect();
        let bytes = weights::to_le_bytes(&v);
        let b3 = digest::digest(DigestAlgorithm::Blake3, &bytes);
        let header = |raw: Vec<u8>, algorithm: i32| {
            let mut h = pb::UpdateHeader {
                delta_digest: raw,
                delta_digest_algorithm: algorithm,
                ..Default::default()
            };
            settle_header(&mut h).map(|()| h)
        };
        let blake3 = pb::DigestAlgorithm::Blake3 as i32;
        let h = header(b3.to_vec(), blake3).unwrap();
        assert_eq!(h.delta_sha256, format!("blake3:{}", hex::encode(b3)));
        let receive = |h: &pb::UpdateHeader, t: &mut pb::UpdateTrailer| {
            settle_trailer(t, h)?;
            let mut r = DeltaReceiver::new(10, 4096, UpdateEncoding::Float32, delta_algorithm(h)?);
            r.push(&chunk(0, &v[..6]))?;
            r.push(&chunk(1, &v[6..]))?;
            r.finish(t)
        };
        // Declared in the header, left implicit in the trailer.
        assert_eq!(
            receive(&h, &mut pb::UpdateTrailer::default()).unwrap(),
            h.delta_sha256
        );
        // Declared in the trailer only, as raw bytes.
        let bare = header(vec![], blake3).unwrap();
        let mut t = pb::UpdateTrailer {
            digest: b3.to_vec(),
            ..Default::default()
        };
        assert_eq!(receive(&bare, &mut t).unwrap(), h.delta_sha256);
        // The SHA-256 of the same bytes declared as BLAKE3 does not pass.
        let sha = digest::digest(DigestAlgorithm::Sha256, &bytes);
        let wrong = header(sha.to_vec(), blake3).unwrap();
        let e = receive(&wrong, &mut pb::UpdateTrailer::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole-delta digest mismatch"), "{e}");
        assert!(
            e.contains(&format!("hashes to blake3:{}", hex::encode(b3))),
            "{e}"
        );
        // An algorithm this coordinator does not know is named, not guessed.
        let e = header(b3.to_vec(), 9).unwrap_err().to_string();
        assert!(e.contains("delta_digest_algorithm 9 is not one"), "{e}");
    }

    #[test]
    fn receiver_checks_a_chunk_by_its_crc_alone_and_refuses_a_wrong_one() {
        let v: Vec<f32> = (0..10).map(|i| i as f32 * 0.5).collect();
        let crc_only = |index: u32, v: &[f32]| {
            let data = weights::to_le_bytes(v);
            pb::UpdateChunk {
                index,
                crc32c: Some(crc32c::crc32c(&data)),
                data: data.into(),
                ..Default::default()
            }
        };
        let mut r = DeltaReceiver::new(10, 4096, UpdateEncoding::Float32, DigestAlgorithm::Sha256);
        r.push(&crc_only(0, &v[..6])).unwrap();
        r.push(&crc_only(1, &v[6..])).unwrap();
        // The whole-delta SHA-256 still decides.
        assert_eq!(r.finish(&trailer(&v)).unwrap(), weights::digest(&v));

        let mut r = DeltaReceiver::new(10, 4096, UpdateEncoding::Float32, DigestAlgorithm::Sha256);
        let mut c = crc_only(0, &v[..6]);
        let mut data = c.data.to_vec();
        data[0] ^= 1;
        c.data = data.into();
        let e = r.push(&c).unwrap_err().to_string();
        assert!(e.contains("chunk 0 checksum mismatch"), "{e}");
        assert_eq!(r.next_index(), 0);
        // A right CRC does not excuse a wrong digest when both are declared.
        let mut c = chunk(0, &v[..6]);
        c.crc32c = Some(crc32c::crc32c(&c.data));
        c.sha256 = weights::sha256_hex(b"something else");
        assert!(
            r.push(&c)
                .unwrap_err()
                .to_string()
                .contains("digest mismatch")
        );
        c.crc32c = None;
        c.sha256.clear();
        let e = r.push(&c).unwrap_err().to_string();
        assert!(e.contains("no crc32c"), "{e}");
    }

    #[test]
    fn receiver_decodes_int8_chunks_and_refuses_a_bad_scale() {
        let v: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 0.01).collect();
        let chunks = encoding::encode_chunks(&v, UpdateEncoding::Int8, 64).unwrap();
        let mut r = DeltaReceiver::new(100, 64, UpdateEncoding::Int8, DigestAlgorithm::Sha256);
        let mut all = vec![];
        let mut got = vec![];
        for (i, c) in chunks.iter().enumerate() {
            all.extend_from_slice(c);
            let checked = r
                .push(&pb::UpdateChunk {
                    index: i as u32,
                    sha256: weights::sha256_hex(c),
                    data: c.clone().into(),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(checked.offset, got.len());
            got.extend_from_slice(checked.values().unwrap());
        }
        let sha = r
            .finish(&pb::UpdateTrailer {
                sha256: weights::sha256_hex(&all),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            got,
            encoding::round_trip(&v, UpdateEncoding::Int8, 64).unwrap()
        );
        assert_eq!(sha, weights::sha256_hex(&all));

        let mut bad = f32::INFINITY.to_le_bytes().to_vec();
        bad.extend([1u8, 2, 3]);
        let mut r = DeltaReceiver::new(100, 64, UpdateEncoding::Int8, DigestAlgorithm::Sha256);
        let e = r
            .push(&pb::UpdateChunk {
                index: 0,
                sha256: weights::sha256_hex(&bad),
                data: bad.into(),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("scale"), "{e}");
    }
}
