//! Checking a global model as its chunks arrive: the part of the download that
//! does not depend on the transport, so every way a coordinator (or whatever sits
//! between it and the participant) can serve a bad model is tested without one.
//!
//! [`crate::session::download`] opens the stream, feeds each chunk to a
//! [`ModelAssembler`] and, when a stream breaks, asks again from
//! [`ModelAssembler::next_chunk`]: a chunk is only kept once it passed its check,
//! so a resumed download never starts from a bad one.

use sangsaeng_common::transfer::digest::{self, DigestAlgorithm};
use sangsaeng_common::transfer::weights;
use sangsaeng_proto::v1 as pb;

use crate::error::{ParticipantError, Result};

/// Largest model a participant accepts: 2^34 parameters (64 GiB of float32). The
/// announced size is what the download buffer is reserved for, so an absurd
/// announcement is refused before any memory is taken.
const MAX_MODEL_BYTES: u64 = 1 << 36;

/// The chunks of one model received so far, each checked.
#[derive(Debug)]
pub struct ModelAssembler {
    round: u32,
    sha256: String,
    blake3: Vec<u8>,
    /// The whole-model digest the download is checked against: BLAKE3 when the
    /// coordinator announces one (2.5x faster per core), else SHA-256.
    expected: [u8; 32],
    /// Fed as each chunk is kept, while its bytes are still in cache.
    hasher: digest::Hasher,
    expected_bytes: usize,
    bytes: Vec<u8>,
    next: u32,
}

impl ModelAssembler {
    /// Starts a download of the model `info` announces.
    pub fn new(info: &pb::ModelInfo) -> Result<Self> {
        let expected_bytes = info
            .num_params
            .checked_mul(4)
            .filter(|&b| b <= MAX_MODEL_BYTES)
            .ok_or_else(|| {
                ParticipantError::Transfer(format!("implausible model size {}", info.num_params))
            })? as usize;
        let bad_digest = || {
            ParticipantError::Transfer(format!(
                "the model of round {} is announced with a malformed digest",
                info.round
            ))
        };
        let algorithm = DigestAlgorithm::announced_by(info);
        let expected = match algorithm {
            DigestAlgorithm::Sha256 => digest::raw_of_id(&info.sha256)
                .filter(|_| DigestAlgorithm::of_id(&info.sha256) == DigestAlgorithm::Sha256),
            DigestAlgorithm::Blake3 => info.blake3[..].try_into().ok(),
        }
        .ok_or_else(bad_digest)?;
        Ok(ModelAssembler {
            round: info.round,
            sha256: info.sha256.clone(),
            blake3: info.blake3.clone(),
            expected,
            hasher: digest::Hasher::new(algorithm),
            expected_bytes,
            bytes: Vec::with_capacity(expected_bytes),
            next: 0,
        })
    }

    /// The chunk to ask for next (where a broken-off download resumes).
    pub fn next_chunk(&self) -> u32 {
        self.next
    }

    /// Checks one chunk and keeps it; true once it was the last. A chunk that
    /// fails a check is not kept, and the error names it.
    pub fn push(&mut self, c: &pb::ModelChunk) -> Result<bool> {
        let next = self.next;
        if c.index != next {
            return Err(ParticipantError::Transfer(format!(
                "chunk {} arrived, expected {next}",
                c.index
            )));
        }
        if c.model_sha256 != self.sha256 || c.model_blake3 != self.blake3 {
            return Err(ParticipantError::Transfer(
                "the model changed during the download".into(),
            ));
        }
        // The CRC when the coordinator sends one (the whole-model digest checked
        // in `finish` vouches for the content, so each byte is hashed once); the
        // chunk's SHA-256 from a coordinator that does not.
        let chunk_ok = match c.crc32c {
            Some(crc) => crc32c::crc32c(&c.data) == crc,
            None => weights::sha256_hex(&c.data) == c.sha256,
        };
        if !chunk_ok {
            return Err(ParticipantError::Transfer(format!(
                "chunk {next} digest mismatch"
            )));
        }
        if self.bytes.len() + c.data.len() > self.expected_bytes {
            return Err(ParticipantError::Transfer(
                "the model is longer than announced".into(),
            ));
        }
        self.hasher.update(&c.data);
        self.bytes.extend_from_slice(&c.data);
        self.next += 1;
        Ok(self.next == c.total_chunks)
    }

    /// The model, once its length and whole digest match what was announced.
    pub fn finish(self) -> Result<Vec<f32>> {
        if self.bytes.len() != self.expected_bytes || self.hasher.finalize() != self.expected {
            return Err(ParticipantError::Transfer(format!(
                "downloaded model of round {} does not match its digest",
                self.round
            )));
        }
        Ok(weights::from_le_bytes(&self.bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: usize = 64;

    /// A 100-parameter model as a coordinator serves it: 7 chunks of up to 64
    /// bytes, each with its CRC-32C and SHA-256, the whole with SHA-256 and BLAKE3.
    fn served() -> (pb::ModelInfo, Vec<pb::ModelChunk>, Vec<f32>) {
        let params: Vec<f32> = (0..100).map(|i| i as f32 * 0.25 - 3.0).collect();
        let bytes = weights::to_le_bytes(&params);
        let sha = weights::sha256_hex(&bytes);
        let b3 = digest::digest(DigestAlgorithm::Blake3, &bytes).to_vec();
        let total = bytes.len().div_ceil(CHUNK) as u32;
        let chunks = bytes
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, d)| pb::ModelChunk {
                index: i as u32,
                total_chunks: total,
                data: d.to_vec().into(),
                sha256: weights::sha256_hex(d),
                model_sha256: sha.clone(),
                crc32c: Some(crc32c::crc32c(d)),
                model_blake3: b3.clone(),
            })
            .collect();
        let info = pb::ModelInfo {
            round: 3,
            num_params: 100,
            sha256: sha,
            blake3: b3,
        };
        (info, chunks, params)
    }

    /// The same model from a coordinator that predates BLAKE3.
    fn served_sha256_only() -> (pb::ModelInfo, Vec<pb::ModelChunk>, Vec<f32>) {
        let (mut info, mut chunks, params) = served();
        info.blake3.clear();
        chunks.iter_mut().for_each(|c| c.model_blake3.clear());
        (info, chunks, params)
    }

    /// Feeds the chunks in order; the first error, or the finished model.
    /// `data` with byte `at` XORed with `mask` (a chunk's payload is immutable).
    fn flip(data: &mut bytes::Bytes, at: usize, mask: u8) {
        let mut v = data.to_vec();
        v[at] ^= mask;
        *data = v.into();
    }

    fn assemble(info: &pb::ModelInfo, chunks: &[pb::ModelChunk]) -> Result<Vec<f32>> {
        let mut m = ModelAssembler::new(info)?;
        for c in chunks {
            if m.push(c)? {
                return m.finish();
            }
        }
        Err(ParticipantError::Transfer("ended early".into()))
    }

    fn refused(info: &pb::ModelInfo, chunks: &[pb::ModelChunk], needle: &str) {
        let e = assemble(info, chunks).unwrap_err().to_string();
        assert!(e.contains(needle), "expected {needle:?}, got {e:?}");
    }

    #[test]
    fn a_good_model_is_assembled_exactly() {
        let (info, chunks, params) = served();
        assert_eq!(assemble(&info, &chunks).unwrap(), params);
        // From a coordinator that sends no CRC: the chunks' SHA-256 are checked.
        let no_crc: Vec<_> = chunks
            .iter()
            .cloned()
            .map(|c| pb::ModelChunk { crc32c: None, ..c })
            .collect();
        assert_eq!(assemble(&info, &no_crc).unwrap(), params);
    }

    #[test]
    fn a_chunk_that_fails_its_crc_is_refused_and_not_kept() {
        let (info, mut chunks, params) = served();
        flip(&mut chunks[2].data, 5, 0x10);
        refused(&info, &chunks, "chunk 2 digest mismatch");
        // The bad chunk is not kept: the download resumes at it, and a good copy
        // completes the model.
        let mut m = ModelAssembler::new(&info).unwrap();
        m.push(&chunks[0]).unwrap();
        m.push(&chunks[1]).unwrap();
        assert!(m.push(&chunks[2]).is_err());
        assert_eq!(m.next_chunk(), 2);
        let (_, good, _) = served();
        for c in &good[2..] {
            m.push(c).unwrap();
        }
        assert_eq!(m.finish().unwrap(), params);
    }

    #[test]
    fn without_a_crc_the_chunk_sha256_is_checked() {
        let (info, mut chunks, _) = served();
        chunks[4].crc32c = None;
        flip(&mut chunks[4].data, 0, 1);
        refused(&info, &chunks, "chunk 4 digest mismatch");
    }

    #[test]
    fn a_chunk_altered_with_its_crc_recomputed_fails_the_whole_model_digest() {
        for (info, mut chunks, _) in [served(), served_sha256_only()] {
            flip(&mut chunks[1].data, 0, 1);
            chunks[1].crc32c = Some(crc32c::crc32c(&chunks[1].data));
            refused(&info, &chunks, "round 3 does not match its digest");
        }
    }

    #[test]
    fn the_whole_model_is_checked_with_blake3_when_announced_else_sha256() {
        let (info, chunks, params) = served_sha256_only();
        assert_eq!(assemble(&info, &chunks).unwrap(), params);

        // With BLAKE3 announced it is BLAKE3 that decides: a wrong one refuses
        // the model although its SHA-256 is right.
        let (mut info, mut chunks, _) = served();
        let mut wrong = info.blake3.clone();
        wrong[0] ^= 1;
        info.blake3.clone_from(&wrong);
        chunks
            .iter_mut()
            .for_each(|c| c.model_blake3.clone_from(&wrong));
        refused(&info, &chunks, "round 3 does not match its digest");

        // Chunks announcing another BLAKE3 than the model did are another model.
        let (info, mut chunks, _) = served();
        chunks[2].model_blake3 = vec![0; 32];
        refused(&info, &chunks, "the model changed during the download");

        let (mut info, chunks, _) = served();
        info.blake3.truncate(31);
        refused(&info, &chunks, "announced with a malformed digest");
        let (mut info, chunks, _) = served_sha256_only();
        info.sha256 = "not hex".into();
        refused(&info, &chunks, "announced with a malformed digest");
    }

    #[test]
    fn out_of_order_changed_long_short_and_absurd_models_are_refused() {
        let (info, chunks, _) = served();
        let mut skipped = chunks.clone();
        skipped.remove(1);
        refused(&info, &skipped, "chunk 2 arrived, expected 1");

        let mut changed = chunks.clone();
        changed[3].model_sha256 = "0".repeat(64);
        refused(&info, &changed, "the model changed during the download");

        let small = pb::ModelInfo {
            num_params: 20,
            ..info.clone()
        };
        refused(&small, &chunks, "longer than announced");

        // Fewer chunks than the model has, each valid: the length check catches it.
        let mut short = chunks[..2].to_vec();
        short.iter_mut().for_each(|c| c.total_chunks = 2);
        refused(&info, &short, "does not match its digest");

        let absurd = pb::ModelInfo {
            num_params: u64::MAX / 2,
            ..info
        };
        refused(&absurd, &chunks, "implausible model size");
    }
}
