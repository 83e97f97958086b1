//! How a weight delta is encoded on the wire: float32 (exact, the default),
//! float16, or int8 with one scale per chunk. Chosen per training in the plan
//! (`[training] update_encoding`), declared in each upload's header, and
//! checked by the coordinator.
//!
//! Chunks are self-contained, so the coordinator decodes each as it arrives and
//! a resumed upload needs nothing from the chunks before it:
//! - `float32`: little-endian f32 values;
//! - `float16`: little-endian IEEE half-precision values (`half`, the standard
//!   crate for it);
//! - `int8`: a little-endian f32 scale, then one signed byte per value;
//!   value = byte × scale, with scale = max |x| / 127 over the chunk.
//!
//! Digests (per chunk and whole) are over the encoded bytes, i.e. over what
//! was sent. Quantisation happens at the participant, so what the coordinator
//! aggregates is exactly what [`decode_chunk`] returns, deterministically.

pub use crate::config::plan::UpdateEncoding;
use crate::{Error, Result};

/// Bytes of the per-chunk scale of `int8`.
const SCALE_BYTES: usize = 4;

impl UpdateEncoding {
    /// Values that fit in a chunk of at most `chunk_bytes` bytes (at least one).
    pub fn values_per_chunk(self, chunk_bytes: usize) -> usize {
        match self {
            UpdateEncoding::Float32 => chunk_bytes / 4,
            UpdateEncoding::Float16 => chunk_bytes / 2,
            UpdateEncoding::Int8 => chunk_bytes.saturating_sub(SCALE_BYTES),
        }
        .max(1)
    }
}

/// Encodes `values` into chunks of at most `chunk_bytes` bytes each.
/// Refuses non-finite values: a delta with NaN or Inf is never sent.
pub fn encode_chunks(
    values: &[f32],
    enc: UpdateEncoding,
    chunk_bytes: usize,
) -> Result<Vec<Vec<u8>>> {
    // A branch-free scan first (it vectorises; `position` stops early and does
    // not), the search for the culprit only when there is one.
    if !values.iter().fold(true, |ok, v| ok & v.is_finite()) {
        let i = values
            .iter()
            .position(|v| !v.is_finite())
            .expect("found above");
        return Err(Error::Model(format!(
            "delta value {i} is not finite ({})",
            values[i]
        )));
    }
    Ok(values
        .chunks(enc.values_per_chunk(chunk_bytes))
        .map(|c| match enc {
            // One copy of the bytes as they lie (little-endian), not a push per byte.
            UpdateEncoding::Float32 => crate::transfer::weights::to_le_bytes(c),
            UpdateEncoding::Float16 => c
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            UpdateEncoding::Int8 => {
                let max = c.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = max / 127.0;
                let mut out = Vec::with_capacity(SCALE_BYTES + c.len());
                out.extend_from_slice(&scale.to_le_bytes());
                out.extend(c.iter().map(|&v| {
                    let q = if scale > 0.0 {
                        (v / scale).round().clamp(-127.0, 127.0)
                    } else {
                        0.0
                    };
                    (q as i8) as u8
                }));
                out
            }
        })
        .collect())
}

/// Decodes one chunk; a length that is not a whole number of values, or an
/// `int8` scale that is not a finite non-negative number, is an error.
pub fn decode_chunk(data: &[u8], enc: UpdateEncoding) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    decode_chunk_into(data, enc, &mut out)?;
    Ok(out)
}

/// [`decode_chunk`] into `out` (emptied first), so a receiver decoding chunk
/// after chunk reuses one buffer: a fresh megabyte per chunk cost the
/// coordinator an allocation and a page fault per 4 KiB of every upload.
pub fn decode_chunk_into(data: &[u8], enc: UpdateEncoding, out: &mut Vec<f32>) -> Result<()> {
    out.clear();
    let n = chunk_values(data, enc)?;
    decode_range_into(data, enc, 0..n, out);
    Ok(())
}

/// Checks one chunk's framing (length, int8 scale) and returns how many
/// values it holds.
pub fn chunk_values(data: &[u8], enc: UpdateEncoding) -> Result<usize> {
    let bad = |m: String| Err(Error::Protocol(m));
    match enc {
        UpdateEncoding::Float32 => {
            if data.is_empty() || !data.len().is_multiple_of(4) {
                return bad(format!(
                    "{} bytes are not a positive whole number of float32 values",
                    data.len()
                ));
            }
            Ok(data.len() / 4)
        }
        UpdateEncoding::Float16 => {
            if data.is_empty() || !data.len().is_multiple_of(2) {
                return bad(format!(
                    "{} bytes are not a positive whole number of float16 values",
                    data.len()
                ));
            }
            Ok(data.len() / 2)
        }
        UpdateEncoding::Int8 => {
            if data.len() <= SCALE_BYTES {
                return bad(format!(
                    "{} bytes cannot hold an int8 chunk (a 4-byte scale and at least one value)",
                    data.len()
                ));
            }
            let scale = int8_scale(data);
            if !(scale.is_finite() && scale >= 0.0) {
                return bad(format!(
                    "int8 chunk scale {scale} is not a finite non-negative number"
                ));
            }
            Ok(data.len() - SCALE_BYTES)
        }
    }
}

fn int8_scale(data: &[u8]) -> f32 {
    f32::from_le_bytes([data[0], data[1], data[2], data[3]])
}

/// Appends the values at `range` of a chunk [`chunk_values`] accepted, so a
/// reader can take a window of a chunk without decoding all of it (the
/// coordinator's robust rules hold K chunks' bytes, not K decoded chunks too).
pub fn decode_range_into(
    data: &[u8],
    enc: UpdateEncoding,
    range: std::ops::Range<usize>,
    out: &mut Vec<f32>,
) {
    match enc {
        UpdateEncoding::Float32 => out.extend(
            data[range.start * 4..range.end * 4]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        UpdateEncoding::Float16 => out.extend(
            data[range.start * 2..range.end * 2]
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        UpdateEncoding::Int8 => {
            let scale = int8_scale(data);
            out.extend(
                data[SCALE_BYTES + range.start..SCALE_BYTES + range.end]
                    .iter()
                    .map(|&b| f32::from(b as i8) * scale),
            )
        }
    }
}

/// What the coordinator will aggregate for `values` sent this way (for a site's own record).
pub fn round_trip(values: &[f32], enc: UpdateEncoding, chunk_bytes: usize) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(values.len());
    for c in encode_chunks(values, enc, chunk_bytes)? {
        out.extend(decode_chunk(&c, enc)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4)
            .collect()
    }

    #[test]
    fn float32_is_exact() {
        let v = sample(1000);
        assert_eq!(round_trip(&v, UpdateEncoding::Float32, 4096).unwrap(), v);
    }

    #[test]
    fn float16_and_int8_stay_within_their_error_bounds() {
        let v = sample(10_000);
        let h = round_trip(&v, UpdateEncoding::Float16, 4096).unwrap();
        for (a, b) in v.iter().zip(&h) {
            // Half precision keeps 11 significant bits (relative error 2^-11), subnormals aside.
            assert!((a - b).abs() <= a.abs() * 4.9e-4 + 6e-8, "{a} {b}");
        }
        let chunk = 4096;
        let q = round_trip(&v, UpdateEncoding::Int8, chunk).unwrap();
        let per = UpdateEncoding::Int8.values_per_chunk(chunk);
        for (orig, got) in v.chunks(per).zip(q.chunks(per)) {
            let scale = orig.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (a, b) in orig.iter().zip(got) {
                assert!((a - b).abs() <= scale * 0.5 + 1e-9, "{a} {b} {scale}");
            }
        }
    }

    #[test]
    fn bytes_on_the_wire() {
        let v = sample(1 << 20);
        let size = |enc| -> usize {
            encode_chunks(&v, enc, 1 << 20)
                .unwrap()
                .iter()
                .map(Vec::len)
                .sum()
        };
        let f32_bytes = size(UpdateEncoding::Float32);
        assert_eq!(f32_bytes, 4 << 20);
        assert_eq!(size(UpdateEncoding::Float16), 2 << 20);
        let int8 = size(UpdateEncoding::Int8);
        assert!(f32_bytes as f64 / int8 as f64 >= 3.99, "{int8}");
    }

    #[test]
    fn an_all_zero_chunk_and_extremes_encode() {
        let zeros = vec![0.0; 10];
        assert_eq!(round_trip(&zeros, UpdateEncoding::Int8, 64).unwrap(), zeros);
        let v = vec![1.0, -1.0, 0.5];
        let q = round_trip(&v, UpdateEncoding::Int8, 64).unwrap();
        assert_eq!(q[0], 1.0);
        assert_eq!(q[1], -1.0);
    }

    #[test]
    fn bad_chunks_and_values_are_refused() {
        assert!(decode_chunk(&[1, 2, 3], UpdateEncoding::Float32).is_err());
        assert!(decode_chunk(&[1], UpdateEncoding::Float16).is_err());
        assert!(decode_chunk(&[0, 0, 0, 0], UpdateEncoding::Int8).is_err());
        let mut nan_scale = f32::NAN.to_le_bytes().to_vec();
        nan_scale.push(1);
        let e = decode_chunk(&nan_scale, UpdateEncoding::Int8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("scale"), "{e}");
        for enc in [
            UpdateEncoding::Float32,
            UpdateEncoding::Float16,
            UpdateEncoding::Int8,
        ] {
            for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
                let mut v = vec![0.5f32; 100];
                v[37] = bad;
                let e = encode_chunks(&v, enc, 64).unwrap_err().to_string();
                assert!(e.contains("delta value 37 is not finite"), "{e}");
            }
        }
        assert!(UpdateEncoding::from_name("bf16").is_err());
        assert_eq!(
            UpdateEncoding::from_name("").unwrap(),
            UpdateEncoding::Float32
        );
    }

    /// Whole `UploadUpdate` streams as participants send them
    /// (`wire::upload_messages`: header, chunks, trailer, protobuf framing
    /// included) for the example's model (5,769 parameters) and a 1M-parameter one.
    #[test]
    fn bytes_of_a_whole_upload_stream() {
        use prost::Message;
        let stream_bytes = |p: usize, enc: UpdateEncoding| -> usize {
            let chunks = encode_chunks(&sample(p), enc, 1 << 20).unwrap();
            let upload = crate::transfer::wire::UpdateUpload {
                training_id: "t-20261128-043241-116".into(),
                round: 20,
                base_model_sha256: "ab".repeat(32),
                num_params: p as u64,
                encoding: enc,
                chunks: chunks.into_iter().map(bytes::Bytes::from).collect(),
                delta_digest: format!("blake3:{}", "cd".repeat(32)),
                num_examples: 4000,
                train_loss: 0.5,
                first_chunk: 0,
                dp: None,
                masked: None,
            };
            // gRPC adds a 5-byte frame header per message.
            crate::transfer::wire::upload_messages(upload)
                .unwrap()
                .map(|m| m.encoded_len() + 5)
                .sum()
        };
        for p in [5_769, 1_000_000] {
            let f32b = stream_bytes(p, UpdateEncoding::Float32);
            let f16b = stream_bytes(p, UpdateEncoding::Float16);
            let i8b = stream_bytes(p, UpdateEncoding::Int8);
            eprintln!(
                "P={p}: float32 {f32b} B, float16 {f16b} B, int8 {i8b} B, float32/int8 {:.3}",
                f32b as f64 / i8b as f64
            );
            assert!(f16b < f32b && i8b < f16b);
        }
        // The target: int8 at least 3.9x fewer bytes than float32, on the
        // example's model as on large ones.
        for p in [5_769, 1_000_000] {
            let ratio = stream_bytes(p, UpdateEncoding::Float32) as f64
                / stream_bytes(p, UpdateEncoding::Int8) as f64;
            assert!(ratio >= 3.9, "P = {p}: float32/int8 = {ratio}");
        }
    }
}
