//! Chunked model transfers: the global model published once per round and
//! streamed to every downloader; the checks on an uploaded delta's chunks; and
//! the spill file that keeps an upload's chunks, as sent, while it is folded in.
//!
//! A model is digested once when published (whole with SHA-256, its identity,
//! and BLAKE3, what current participants check; per chunk with SHA-256 and
//! CRC-32C); every download of that round reads the same `f32` values, so
//! the coordinator holds one copy of the model whatever the number of downloaders.
//!
//! An upload is folded into the round's accumulator chunk by chunk as it arrives
//! (`service.rs`), so the coordinator never holds a whole delta. The chunks are
//! appended to a spill file on disk meanwhile: it is what makes a refused upload
//! undoable (its folded chunks are read back and subtracted exactly) and, once
//! fsynced, what makes an accepted update survive a crash (`store.rs`).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sangsaeng_common::digest::{self, DigestAlgorithm};
use sangsaeng_common::encoding::{self, UpdateEncoding};
use sangsaeng_common::weights;
use sangsaeng_proto::v1 as pb;

use crate::error::{CoordinatorError, Result};

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

/// One chunk that passed every check, decoded, and where its values go: a view
/// of the receiver's decode buffer, valid until its next chunk.
#[derive(Debug)]
pub struct CheckedChunk<'a> {
    pub offset: usize,
    pub values: &'a [f32],
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
        }
    }

    /// Checks one chunk and returns its decoded values with their offset.
    pub fn push(&mut self, chunk: &pb::UpdateChunk) -> Result<CheckedChunk<'_>> {
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
        match encoding::decode_chunk_into(&chunk.data, self.encoding, &mut self.values) {
            Ok(()) => {}
            Err(sangsaeng_common::Error::Protocol(m)) => {
                return bad(format!("chunk {}: {m}", chunk.index));
            }
            Err(e) => return bad(format!("chunk {}: {e}", chunk.index)),
        };
        let values = &self.values[..];
        if self.received_values + values.len() > self.expected_values {
            return bad(format!(
                "chunk {} takes the delta beyond the model's {} values",
                chunk.index, self.expected_values
            ));
        }
        self.hasher.update(&chunk.data);
        let offset = self.received_values;
        self.received_values += values.len();
        self.next_index += 1;
        Ok(CheckedChunk { offset, values })
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
/// (`sangsaeng_common::digest`: hex, or `blake3:` and hex).
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

/// An upload's chunks as sent, in a spill file: a 4 KiB header block (the
/// magic [`SPILL_MAGIC`], then zeros), then one frame per chunk: a little-endian
/// `u32` length, the bytes, and zeros up to the next 4 KiB boundary.
///
/// The padding is what lets a durable coordinator write with `O_DIRECT`
/// (Linux): a buffered write of an update costs a page-cache copy, measured
/// as 12 % of all CPU in a P=1e7, K=32 round, and then the fsync waits for
/// the whole update to reach the disk; a direct write costs one copy into an
/// aligned buffer and leaves the fsync only the metadata. Where the file
/// system refuses `O_DIRECT` (tmpfs, some overlays), or when updates are not
/// made durable, the same format is written through the page cache. Either
/// way a chunk is readable from the file as soon as `append` returns, which an
/// undo relies on (it reads back the folded chunks).
pub struct Spill {
    path: PathBuf,
    file: File,
    direct: bool,
    /// Bytes written so far: whole frames, a multiple of [`SPILL_ALIGN`].
    written: u64,
    #[cfg(test)]
    refuse_next_write: bool,
    /// Staging buffer for a frame, over-allocated so a 4 KiB-aligned window
    /// of it can be handed to a direct write; kept across chunks so each chunk
    /// does not fault in a fresh megabyte.
    staging: Vec<u8>,
}

impl std::fmt::Debug for Spill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spill")
            .field("path", &self.path)
            .field("direct", &self.direct)
            .finish()
    }
}

/// Largest spill frame read back: a chunk is at most 64 MiB (`limits.max_chunk_bytes`).
const MAX_FRAME: usize = 64 << 20;
/// Alignment of every write (offset, length and buffer): 4 KiB covers disks
/// with 512-byte and with 4 KiB logical blocks.
const SPILL_ALIGN: usize = 4096;
/// First bytes of a spill file. A file without them is of the earlier,
/// unpadded format (frames back to back), still read so that a coordinator
/// upgraded mid-round can replay the updates it had accepted.
pub const SPILL_MAGIC: &[u8; 16] = b"SANGSAENG-SPILL2";

/// Bytes of padding after a frame of `len` data bytes (with its 4-byte length).
fn frame_padding(len: usize) -> usize {
    (SPILL_ALIGN - (4 + len) % SPILL_ALIGN) % SPILL_ALIGN
}

impl Spill {
    /// A new spill file holding no chunk (an older file of the same name is
    /// replaced). `direct` asks for `O_DIRECT` writes (see [`Spill`]); it falls
    /// back to buffered writes where the file system does not allow them.
    pub fn create(path: &Path, direct: bool) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| CoordinatorError::io(format!("creating {}", dir.display()), e))?;
        }
        // O_DIRECT is Linux's; elsewhere the spill is written buffered.
        let direct = direct && cfg!(target_os = "linux");
        let (file, direct) = match open_spill(path, direct) {
            Ok(f) => (f, direct),
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(path = %path.display(), "no O_DIRECT here, spilling through the page cache");
                (
                    open_spill(path, false).map_err(|e| create_error(path, e))?,
                    false,
                )
            }
            Err(e) => return Err(create_error(path, e)),
        };
        let mut spill = Spill {
            path: path.to_path_buf(),
            file,
            direct,
            written: 0,
            #[cfg(test)]
            refuse_next_write: false,
            staging: Vec::new(),
        };
        let header = spill.stage(|b| b[..SPILL_MAGIC.len()].copy_from_slice(SPILL_MAGIC), 0);
        spill.write_staged(header)?;
        Ok(spill)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether writes bypass the page cache (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn append(&mut self, data: &[u8]) -> Result<()> {
        if data.len() > MAX_FRAME {
            return Err(CoordinatorError::InvalidArgument(format!(
                "a chunk of {} bytes is above the spill's limit of {MAX_FRAME}",
                data.len()
            )));
        }
        let len = self.stage(
            |b| {
                b[..4].copy_from_slice(&(data.len() as u32).to_le_bytes());
                b[4..4 + data.len()].copy_from_slice(data);
            },
            4 + data.len(),
        );
        self.write_staged(len)
    }

    /// Fills the staging window with zeros, lets `fill` write its first bytes,
    /// and returns the window's length: `used` rounded up to [`SPILL_ALIGN`]
    /// (at least one block).
    fn stage(&mut self, fill: impl FnOnce(&mut [u8]), used: usize) -> usize {
        let len = used.div_ceil(SPILL_ALIGN).max(1) * SPILL_ALIGN;
        if self.staging.len() < len + SPILL_ALIGN {
            self.staging = vec![0; len + SPILL_ALIGN];
        }
        let at = self.staging.as_ptr().align_offset(SPILL_ALIGN);
        let window = &mut self.staging[at..at + len];
        // Only the tail needs zeroing: `fill` writes the first `used` bytes.
        window[used..].fill(0);
        fill(window);
        len
    }

    /// Writes the staged window of `len` bytes. A direct write refused as
    /// invalid (some file systems accept `O_DIRECT` at open and refuse it per
    /// write) reopens the file buffered and writes again.
    fn write_staged(&mut self, len: usize) -> Result<()> {
        let at = self.staging.as_ptr().align_offset(SPILL_ALIGN);
        let written = self.try_write(at, len);
        let io = |e| CoordinatorError::io(format!("writing {}", self.path.display()), e);
        match written {
            Ok(()) => {}
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(path = %self.path.display(), "O_DIRECT write refused, spilling through the page cache");
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&self.path)
                    .map_err(io)?;
                // A refused write may have written part of the frame: cut the
                // file back to the frames written whole, and write it again.
                file.set_len(self.written).map_err(io)?;
                std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(io)?;
                self.file = file;
                self.direct = false;
                self.file
                    .write_all(&self.staging[at..at + len])
                    .map_err(io)?;
            }
            Err(e) => return Err(io(e)),
        }
        self.written += len as u64;
        Ok(())
    }

    /// Writes the staged window `at..at + len` to the file as opened.
    fn try_write(&mut self, at: usize, len: usize) -> std::io::Result<()> {
        // Tests stand in for a file system that takes the first block of a
        // direct write and then refuses it (none at hand does).
        #[cfg(test)]
        if std::mem::take(&mut self.refuse_next_write) {
            self.file
                .write_all(&self.staging[at..at + len.min(SPILL_ALIGN)])?;
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.file.write_all(&self.staging[at..at + len])
    }

    /// Fsyncs: after this the chunks survive a crash.
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| CoordinatorError::io(format!("syncing {}", self.path.display()), e))
    }
}

fn create_error(path: &Path, e: std::io::Error) -> CoordinatorError {
    CoordinatorError::io(format!("creating {}", path.display()), e)
}

fn open_spill(path: &Path, direct: bool) -> std::io::Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(target_os = "linux")]
    if direct {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_DIRECT);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = direct;
    o.open(path)
}

/// Reads back the first `frames` chunks of a spill file (all of them when `None`),
/// decoding each as `encoding` and calling `each(offset, values, raw bytes)`.
pub fn read_spill(
    path: &Path,
    encoding: UpdateEncoding,
    frames: Option<u32>,
    each: impl FnMut(usize, &[f32], &[u8]) -> Result<()>,
) -> Result<()> {
    let damaged = |m: String| {
        CoordinatorError::Store(format!("spilled update {} is damaged: {m}", path.display()))
    };
    let file = File::open(path)
        .map_err(|e| CoordinatorError::io(format!("opening {}", path.display()), e))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    // The format: padded frames after a header block, or (no magic) the
    // earlier frames back to back, starting with the bytes just read.
    let mut first = Vec::with_capacity(SPILL_MAGIC.len());
    (&mut r)
        .take(SPILL_MAGIC.len() as u64)
        .read_to_end(&mut first)
        .map_err(|e| damaged(format!("header block: {e}")))?;
    if first == SPILL_MAGIC {
        let mut rest = vec![0u8; SPILL_ALIGN - SPILL_MAGIC.len()];
        r.read_exact(&mut rest)
            .map_err(|e| damaged(format!("header block: {e}")))?;
        read_frames(r, encoding, frames, true, damaged, each)
    } else {
        let r = std::io::Cursor::new(first).chain(r);
        read_frames(r, encoding, frames, false, damaged, each)
    }
}

fn read_frames(
    mut r: impl Read,
    encoding: UpdateEncoding,
    frames: Option<u32>,
    padded: bool,
    damaged: impl Fn(String) -> CoordinatorError,
    mut each: impl FnMut(usize, &[f32], &[u8]) -> Result<()>,
) -> Result<()> {
    let mut offset = 0usize;
    let mut buf = Vec::new();
    let mut values = Vec::new();
    let mut n = 0u32;
    while frames.is_none_or(|f| n < f) {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && frames.is_none() => break,
            Err(e) => return Err(damaged(format!("frame {n}: {e}"))),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(damaged(format!("frame {n} claims {len} bytes")));
        }
        let pad = if padded { frame_padding(len) } else { 0 };
        buf.resize(len + pad, 0);
        r.read_exact(&mut buf)
            .map_err(|e| damaged(format!("frame {n}: {e}")))?;
        let data = &buf[..len];
        encoding::decode_chunk_into(data, encoding, &mut values)
            .map_err(|e| damaged(format!("frame {n}: {e}")))?;
        each(offset, &values, data)?;
        offset += values.len();
        n += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn receiver_accepts_a_good_delta_and_refuses_bad_chunks() {
        let v: Vec<f32> = (0..10).map(|i| i as f32 * 0.5).collect();
        let mut r = DeltaReceiver::new(10, 4096, UpdateEncoding::Float32, DigestAlgorithm::Sha256);
        let a = r.push(&chunk(0, &v[..6])).unwrap();
        assert_eq!((a.offset, a.values), (0, &v[..6]));
        let b = r.push(&chunk(1, &v[6..])).unwrap();
        assert_eq!((b.offset, b.values), (6, &v[6..]));
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
    fn spill_reads_back_the_chunks_as_written() {
        // Direct where the file system allows it (not tmpfs), buffered otherwise:
        // the same frames either way.
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("u").join("a.bin");
            let v: Vec<f32> = (0..100).map(|i| i as f32 * 0.25 - 3.0).collect();
            let chunks = encoding::encode_chunks(&v, UpdateEncoding::Float16, 64).unwrap();
            let mut spill = Spill::create(&path, direct).unwrap();
            assert!(direct || !spill.is_direct());
            for (i, c) in chunks.iter().enumerate() {
                spill.append(c).unwrap();
                // Readable as soon as appended (an undo reads folded chunks back).
                let mut n = 0;
                read_spill(
                    &path,
                    UpdateEncoding::Float16,
                    Some(i as u32 + 1),
                    |_, _, _| {
                        n += 1;
                        Ok(())
                    },
                )
                .unwrap();
                assert_eq!(n, i + 1);
            }
            spill.sync().unwrap();
            // Every write was whole aligned blocks: the header and one per frame.
            let len = std::fs::metadata(&path).unwrap().len();
            assert_eq!(len, (1 + chunks.len() as u64) * SPILL_ALIGN as u64);
            let mut got = vec![];
            read_spill(&path, UpdateEncoding::Float16, None, |o, vals, raw| {
                assert_eq!(o, got.len());
                assert_eq!(raw, chunks[got.len() / 32].as_slice());
                got.extend_from_slice(vals);
                Ok(())
            })
            .unwrap();
            assert_eq!(
                got,
                encoding::round_trip(&v, UpdateEncoding::Float16, 64).unwrap()
            );
            // Only the first two frames, when asked.
            let mut n = 0;
            read_spill(&path, UpdateEncoding::Float16, Some(2), |_, vals, _| {
                n += vals.len();
                Ok(())
            })
            .unwrap();
            assert_eq!(n, 64);
            // A truncated file is a clear error when its frames are needed.
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
            let e = read_spill(&path, UpdateEncoding::Float16, Some(4), |_, _, _| Ok(()))
                .unwrap_err()
                .to_string();
            assert!(e.contains("damaged"), "{e}");
        }
    }

    #[test]
    fn a_direct_write_refused_midway_is_written_again_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        let v: Vec<f32> = (0..3000).map(|i| i as f32 * 0.5).collect();
        // Two frames of two blocks each (4,004 bytes with the length, padded).
        let chunks = encoding::encode_chunks(&v, UpdateEncoding::Float32, 6000).unwrap();
        assert_eq!(chunks.len(), 2);
        let mut spill = Spill::create(&path, true).unwrap();
        spill.append(&chunks[0]).unwrap();
        // Whether or not this file system took O_DIRECT at open, the spill now
        // believes its writes are direct, and the next one is refused after its
        // first block reached the file.
        spill.direct = true;
        spill.refuse_next_write = true;
        spill.append(&chunks[1]).unwrap();
        assert!(
            !spill.is_direct(),
            "the spill went on through the page cache"
        );
        spill.sync().unwrap();
        // The partly written frame was cut off and written whole, once.
        let frame = |c: &[u8]| (4 + c.len()).div_ceil(SPILL_ALIGN) * SPILL_ALIGN;
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        assert_eq!(len, SPILL_ALIGN + frame(&chunks[0]) + frame(&chunks[1]));
        assert_eq!(read_back(&path), v);
    }

    /// Every value of a float32 spill file, in order.
    fn read_back(path: &Path) -> Vec<f32> {
        let mut got = vec![];
        read_spill(path, UpdateEncoding::Float32, None, |_, vals, _| {
            got.extend_from_slice(vals);
            Ok(())
        })
        .unwrap();
        got
    }

    #[test]
    fn a_spill_of_the_earlier_unpadded_format_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.bin");
        let v: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let chunks = encoding::encode_chunks(&v, UpdateEncoding::Float32, 16).unwrap();
        let mut old = Vec::new();
        for c in &chunks {
            old.extend_from_slice(&(c.len() as u32).to_le_bytes());
            old.extend_from_slice(c);
        }
        std::fs::write(&path, &old).unwrap();
        assert_eq!(read_back(&path), v);
        // And an empty one holds no frame.
        std::fs::write(&path, b"").unwrap();
        read_spill(&path, UpdateEncoding::Float32, None, |_, _, _| {
            panic!("no frame expected")
        })
        .unwrap();
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
            got.extend_from_slice(checked.values);
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
