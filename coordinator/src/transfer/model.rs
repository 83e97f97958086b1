//! The global model of a round, published once and streamed to every downloader.
//!
//! A model is digested once when published (whole with SHA-256, its identity,
//! and BLAKE3, what current participants check; per chunk with SHA-256 and
//! CRC-32C); every download of that round reads the same `f32` values, so the
//! coordinator holds one copy of the model whatever the number of downloaders.

use sangsaeng_common::transfer::digest::{self, DigestAlgorithm};
use sangsaeng_common::transfer::weights;
use sangsaeng_proto::v1 as pb;

/// A global model ready to be downloaded.
#[derive(Debug)]
pub struct PublishedModel {
    pub round: u32,
    pub params: Vec<f32>,
    pub sha256: String,
    blake3: [u8; 32],
    chunk_bytes: usize,
    chunk_digests: Vec<String>,
    chunk_crcs: Vec<u32>,
}

/// The digests a published model is served with.
#[derive(Debug)]
pub struct ModelDigests {
    sha256: String,
    blake3: [u8; 32],
    chunk_digests: Vec<String>,
    chunk_crcs: Vec<u32>,
}

impl ModelDigests {
    /// Digests `params` whole and per chunk of `chunk_bytes` (a multiple of 4).
    pub fn of(params: &[f32], chunk_bytes: usize) -> Self {
        let bytes = weights::le_bytes(params);
        // One pass over the chunks for both checks (the SHA-256 is for participants
        // that predate the CRC field).
        let (chunk_digests, chunk_crcs) = bytes
            .chunks(chunk_bytes)
            .map(|c| (weights::sha256_hex(c), crc32c::crc32c(c)))
            .unzip();
        ModelDigests {
            sha256: weights::sha256_hex(&bytes),
            blake3: digest::digest(DigestAlgorithm::Blake3, &bytes),
            chunk_digests,
            chunk_crcs,
        }
    }
}

impl PublishedModel {
    /// Digests `params` whole and per chunk of `chunk_bytes` (a multiple of 4).
    pub fn new(round: u32, params: Vec<f32>, chunk_bytes: usize) -> Self {
        let digests = ModelDigests::of(&params, chunk_bytes);
        Self::with_digests(round, params, chunk_bytes, digests)
    }

    /// A model whose digests were computed beforehand by [`ModelDigests::of`]
    /// with the same `params` and `chunk_bytes`.
    pub fn with_digests(
        round: u32,
        params: Vec<f32>,
        chunk_bytes: usize,
        digests: ModelDigests,
    ) -> Self {
        PublishedModel {
            round,
            params,
            sha256: digests.sha256,
            blake3: digests.blake3,
            chunk_bytes,
            chunk_digests: digests.chunk_digests,
            chunk_crcs: digests.chunk_crcs,
        }
    }

    pub fn info(&self) -> pb::ModelInfo {
        pb::ModelInfo {
            round: self.round,
            num_params: self.params.len() as u64,
            sha256: self.sha256.clone(),
            blake3: self.blake3.to_vec(),
        }
    }

    pub fn total_chunks(&self) -> u32 {
        self.chunk_digests.len() as u32
    }

    /// Chunk `index`: a view of the one copy of the values (on little-endian
    /// machines), so a download costs no per-chunk encoding or allocation; the
    /// view holds the model until the chunk has been written out.
    pub fn chunk(self: &std::sync::Arc<Self>, index: u32) -> pb::ModelChunk {
        let i = index as usize;
        let per = self.chunk_bytes / 4;
        let start = i * per;
        let end = (start + per).min(self.params.len());
        let data = if cfg!(target_endian = "little") {
            bytes::Bytes::from_owner(ChunkView {
                model: self.clone(),
                start,
                end,
            })
        } else {
            weights::to_le_bytes(&self.params[start..end]).into()
        };
        pb::ModelChunk {
            index,
            total_chunks: self.total_chunks(),
            data,
            sha256: self.chunk_digests[i].clone(),
            model_sha256: self.sha256.clone(),
            crc32c: Some(self.chunk_crcs[i]),
            model_blake3: self.blake3.to_vec(),
        }
    }

    /// The values, when no download holds the model any more (so the next round
    /// can be computed in place instead of beside a second copy).
    pub fn into_params(self) -> Vec<f32> {
        self.params
    }
}

/// The bytes of values `start..end` of a published model, in place (used on
/// little-endian machines only, where they are the wire encoding).
struct ChunkView {
    model: std::sync::Arc<PublishedModel>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for ChunkView {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.model.params[self.start..self.end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_model_chunks_reassemble_to_the_model() {
        let params: Vec<f32> = (0..3000).map(|i| i as f32).collect();
        let m = std::sync::Arc::new(PublishedModel::new(2, params.clone(), 4096));
        assert_eq!(m.total_chunks(), 3);
        let mut bytes = vec![];
        for i in 0..m.total_chunks() {
            let c = m.chunk(i);
            assert_eq!(weights::sha256_hex(&c.data), c.sha256);
            assert_eq!(Some(crc32c::crc32c(&c.data)), c.crc32c);
            bytes.extend_from_slice(&c.data);
        }
        assert_eq!(weights::from_le_bytes(&bytes).unwrap(), params);
        assert_eq!(m.sha256, weights::digest(&params));
        let b3 = digest::digest(DigestAlgorithm::Blake3, &bytes);
        assert_eq!(m.info().blake3, b3);
        assert_eq!(m.chunk(2).model_blake3, b3);
        // A chunk holds the model only while it lives: once sent, the values can
        // be taken back for the next round without a copy.
        let held = m.chunk(1);
        let m = std::sync::Arc::try_unwrap(m).expect_err("a live chunk holds the model");
        drop(held);
        let m = std::sync::Arc::try_unwrap(m).expect("no chunk left holds the model");
        assert_eq!(m.into_params(), params);
    }
}
