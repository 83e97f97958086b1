//! Chunked model transfers: the global model published once per round and
//! streamed to every downloader, and the checks on an uploaded delta's chunks.
//!
//! A model is encoded (little-endian f32) and digested once when published; every
//! download of that round shares the same bytes and per-chunk digests.

use std::sync::Arc;

use sangsaeng_common::encoding::{self, UpdateEncoding};
use sangsaeng_common::weights;
use sangsaeng_proto::v1 as pb;

use crate::error::{CoordinatorError, Result};

/// A global model ready to be downloaded.
#[derive(Debug)]
pub struct PublishedModel {
    pub round: u32,
    pub params: Arc<Vec<f32>>,
    pub sha256: String,
    bytes: Vec<u8>,
    chunk_bytes: usize,
    chunk_digests: Vec<String>,
}

impl PublishedModel {
    pub fn new(round: u32, params: Vec<f32>, chunk_bytes: usize) -> Self {
        let bytes = weights::to_le_bytes(&params);
        let sha256 = weights::sha256_hex(&bytes);
        let chunk_digests = bytes.chunks(chunk_bytes).map(weights::sha256_hex).collect();
        PublishedModel {
            round,
            params: Arc::new(params),
            sha256,
            bytes,
            chunk_bytes,
            chunk_digests,
        }
    }

    pub fn info(&self) -> pb::ModelInfo {
        pb::ModelInfo {
            round: self.round,
            num_params: self.params.len() as u64,
            sha256: self.sha256.clone(),
        }
    }

    pub fn total_chunks(&self) -> u32 {
        self.chunk_digests.len() as u32
    }

    pub fn chunk(&self, index: u32) -> pb::ModelChunk {
        let i = index as usize;
        let start = i * self.chunk_bytes;
        let end = (start + self.chunk_bytes).min(self.bytes.len());
        pb::ModelChunk {
            index,
            total_chunks: self.total_chunks(),
            data: self.bytes[start..end].to_vec(),
            sha256: self.chunk_digests[i].clone(),
            model_sha256: self.sha256.clone(),
        }
    }
}

/// Receives a delta's chunks in order, checking each, into one preallocated buffer.
/// It can be set aside when a connection breaks and resumed at [`DeltaReceiver::next_index`].
pub struct DeltaReceiver {
    expected_values: usize,
    max_chunk_bytes: usize,
    encoding: UpdateEncoding,
    next_index: u32,
    values: Vec<f32>,
    hasher: sha2::Sha256,
}

impl std::fmt::Debug for DeltaReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaReceiver")
            .field("expected_values", &self.expected_values)
            .field("received_values", &self.values.len())
            .field("next_index", &self.next_index)
            .finish()
    }
}

impl DeltaReceiver {
    /// Index of the next chunk expected (the number of chunks accepted so far).
    pub fn next_index(&self) -> u32 {
        self.next_index
    }

    /// A receiver for `expected_values` values sent in `encoding`, chunks of at
    /// most `max_chunk_bytes` encoded bytes.
    pub fn new(expected_values: usize, max_chunk_bytes: usize, encoding: UpdateEncoding) -> Self {
        DeltaReceiver {
            expected_values,
            max_chunk_bytes,
            encoding,
            next_index: 0,
            values: Vec::with_capacity(expected_values),
            hasher: <sha2::Sha256 as sha2::Digest>::new(),
        }
    }

    pub fn push(&mut self, chunk: &pb::UpdateChunk) -> Result<()> {
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
        let values = match encoding::decode_chunk(&chunk.data, self.encoding) {
            Ok(v) => v,
            Err(sangsaeng_common::Error::Protocol(m)) => {
                return bad(format!("chunk {}: {m}", chunk.index));
            }
            Err(e) => return bad(format!("chunk {}: {e}", chunk.index)),
        };
        if self.values.len() + values.len() > self.expected_values {
            return bad(format!(
                "chunk {} takes the delta beyond the model's {} values",
                chunk.index, self.expected_values
            ));
        }
        let digest = weights::sha256_hex(&chunk.data);
        if digest != chunk.sha256 {
            return bad(format!(
                "chunk {} digest mismatch: declared {}, received data hashes to {digest}",
                chunk.index, chunk.sha256
            ));
        }
        self.hasher.update(&chunk.data);
        self.values.extend(values);
        self.next_index += 1;
        Ok(())
    }

    /// Checks the trailer and returns the complete delta with its digest.
    pub fn finish(self, trailer: &pb::UpdateTrailer) -> Result<(Vec<f32>, String)> {
        use sha2::Digest;
        if self.values.len() != self.expected_values {
            return Err(CoordinatorError::InvalidArgument(format!(
                "the delta ended after {} of {} values",
                self.values.len(),
                self.expected_values
            )));
        }
        let digest = hex::encode(self.hasher.finalize());
        if digest != trailer.sha256 {
            return Err(CoordinatorError::InvalidArgument(format!(
                "whole-delta digest mismatch: declared {}, received data hashes to {digest}",
                trailer.sha256
            )));
        }
        Ok((self.values, digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(index: u32, v: &[f32]) -> pb::UpdateChunk {
        let data = weights::to_le_bytes(v);
        pb::UpdateChunk {
            index,
            sha256: weights::sha256_hex(&data),
            data,
        }
    }

    #[test]
    fn published_model_chunks_reassemble_to_the_model() {
        let params: Vec<f32> = (0..3000).map(|i| i as f32).collect();
        let m = PublishedModel::new(2, params.clone(), 4096);
        assert_eq!(m.total_chunks(), 3);
        let mut bytes = vec![];
        for i in 0..m.total_chunks() {
            let c = m.chunk(i);
            assert_eq!(weights::sha256_hex(&c.data), c.sha256);
            bytes.extend(c.data);
        }
        assert_eq!(weights::from_le_bytes(&bytes).unwrap(), params);
        assert_eq!(m.sha256, weights::digest(&params));
    }

    #[test]
    fn receiver_accepts_a_good_delta_and_refuses_bad_chunks() {
        let v: Vec<f32> = (0..10).map(|i| i as f32 * 0.5).collect();
        let mut r = DeltaReceiver::new(10, 4096, UpdateEncoding::Float32);
        r.push(&chunk(0, &v[..6])).unwrap();
        r.push(&chunk(1, &v[6..])).unwrap();
        let (got, sha) = r
            .finish(&pb::UpdateTrailer {
                sha256: weights::digest(&v),
            })
            .unwrap();
        assert_eq!(got, v);
        assert_eq!(sha, weights::digest(&v));

        let mut r = DeltaReceiver::new(10, 4096, UpdateEncoding::Float32);
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
        let mut r = DeltaReceiver::new(10, 8, UpdateEncoding::Float32);
        assert!(matches!(
            r.push(&chunk(0, &v[..3])),
            Err(CoordinatorError::ResourceExhausted(_))
        ));
        let mut r = DeltaReceiver::new(2, 4096, UpdateEncoding::Float32);
        assert!(
            r.push(&chunk(0, &v[..3]))
                .unwrap_err()
                .to_string()
                .contains("beyond")
        );
        let mut r = DeltaReceiver::new(10, 4096, UpdateEncoding::Float32);
        r.push(&chunk(0, &v[..4])).unwrap();
        let e = r
            .finish(&pb::UpdateTrailer {
                sha256: weights::digest(&v[..4]),
            })
            .unwrap_err();
        assert!(e.to_string().contains("ended after 4 of 10"));
    }

    #[test]
    fn receiver_decodes_int8_chunks_and_refuses_a_bad_scale() {
        let v: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 0.01).collect();
        let chunks = encoding::encode_chunks(&v, UpdateEncoding::Int8, 64).unwrap();
        let mut r = DeltaReceiver::new(100, 64, UpdateEncoding::Int8);
        let mut all = vec![];
        for (i, c) in chunks.iter().enumerate() {
            all.extend_from_slice(c);
            r.push(&pb::UpdateChunk {
                index: i as u32,
                sha256: weights::sha256_hex(c),
                data: c.clone(),
            })
            .unwrap();
        }
        let (got, sha) = r
            .finish(&pb::UpdateTrailer {
                sha256: weights::sha256_hex(&all),
            })
            .unwrap();
        assert_eq!(
            got,
            encoding::round_trip(&v, UpdateEncoding::Int8, 64).unwrap()
        );
        assert_eq!(sha, weights::sha256_hex(&all));

        let mut bad = f32::INFINITY.to_le_bytes().to_vec();
        bad.extend([1u8, 2, 3]);
        let mut r = DeltaReceiver::new(100, 64, UpdateEncoding::Int8);
        let e = r
            .push(&pb::UpdateChunk {
                index: 0,
                sha256: weights::sha256_hex(&bad),
                data: bad,
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("scale"), "{e}");
    }
}
