//! The spill file that keeps an upload's chunks, as sent, while it is folded in.
//!
//! It is what makes a refused upload undoable (its folded chunks are read back
//! and subtracted exactly) and, once fsynced, what makes an accepted update
//! survive a crash (`durable/store.rs`).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sangsaeng_common::transfer::encoding::{self, UpdateEncoding};

use crate::error::{CoordinatorError, Result};

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
    mut each: impl FnMut(usize, &[f32], &[u8]) -> Result<()>,
) -> Result<()> {
    let mut offset = 0usize;
    let mut values = Vec::new();
    read_spill_raw(path, frames, |n, data| {
        encoding::decode_chunk_into(data, encoding, &mut values)
            .map_err(|e| damaged(path, format!("frame {n}: {e}")))?;
        each(offset, &values, data)?;
        offset += values.len();
        Ok(())
    })
}

fn damaged(path: &Path, m: String) -> CoordinatorError {
    CoordinatorError::Store(format!("spilled update {} is damaged: {m}", path.display()))
}

/// Reads a spill file's frames as written (the first `frames`, or all), each
/// handed to `each` with its number: for payloads [`read_spill`] does not
/// decode (masked words).
pub fn read_spill_raw(
    path: &Path,
    frames: Option<u32>,
    mut each: impl FnMut(u32, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut r = FrameReader::open(path)?;
    let mut buf = Vec::new();
    while frames.is_none_or(|f| r.frame < f) {
        let n = r.frame;
        match r.next_frame(&mut buf, frames.is_none())? {
            Some(len) => each(n, &buf[..len])?,
            None => break,
        }
    }
    Ok(())
}

/// The read buffer of a spill file. Frames are up to a chunk (1 MiB by
/// default) and are read straight into the caller's buffer past this much, so
/// a larger one would only add a chunk per reader to the robust rules' K open
/// readers.
const READ_BUFFER: usize = 64 << 10;

/// A spill file read frame by frame, on demand.
struct FrameReader {
    path: PathBuf,
    r: Box<dyn Read + Send>,
    padded: bool,
    /// The number of the next frame.
    frame: u32,
}

impl FrameReader {
    fn open(path: &Path) -> Result<Self> {
        let damaged = |m: String| damaged(path, m);
        let file = File::open(path)
            .map_err(|e| CoordinatorError::io(format!("opening {}", path.display()), e))?;
        let mut r = BufReader::with_capacity(READ_BUFFER, file);
        // The format: padded frames after a header block, or (no magic) the
        // earlier frames back to back, starting with the bytes just read.
        let mut first = Vec::with_capacity(SPILL_MAGIC.len());
        (&mut r)
            .take(SPILL_MAGIC.len() as u64)
            .read_to_end(&mut first)
            .map_err(|e| damaged(format!("header block: {e}")))?;
        let (r, padded): (Box<dyn Read + Send>, bool) = if first == SPILL_MAGIC {
            let mut rest = vec![0u8; SPILL_ALIGN - SPILL_MAGIC.len()];
            r.read_exact(&mut rest)
                .map_err(|e| damaged(format!("header block: {e}")))?;
            (Box::new(r), true)
        } else {
            (Box::new(std::io::Cursor::new(first).chain(r)), false)
        };
        Ok(FrameReader {
            path: path.to_path_buf(),
            r,
            padded,
            frame: 0,
        })
    }

    /// The next frame's bytes into `buf` (its length returned; `buf` may hold
    /// padding beyond it), or `None` at a clean end of the file where
    /// `end_allowed`.
    fn next_frame(&mut self, buf: &mut Vec<u8>, end_allowed: bool) -> Result<Option<usize>> {
        let n = self.frame;
        let mut len = [0u8; 4];
        match self.r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && end_allowed => {
                return Ok(None);
            }
            Err(e) => return Err(damaged(&self.path, format!("frame {n}: {e}"))),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(damaged(&self.path, format!("frame {n} claims {len} bytes")));
        }
        let pad = if self.padded { frame_padding(len) } else { 0 };
        buf.resize(len + pad, 0);
        self.r
            .read_exact(buf)
            .map_err(|e| damaged(&self.path, format!("frame {n}: {e}")))?;
        self.frame += 1;
        Ok(Some(len))
    }
}

/// One accepted update as a robust rule reads it back.
#[derive(Debug, Clone)]
pub struct SpilledUpdate {
    pub org_id: String,
    pub path: PathBuf,
    pub encoding: UpdateEncoding,
    /// Its weight in the accumulator (the example count, or 1 under client-level DP).
    pub weight: u64,
}

/// An accepted update's decoded values read back from its spill file a window
/// at a time: what lets a robust rule look at every update of a round with
/// one window of each in memory (K windows), never K models.
pub struct SpilledValues {
    frames: FrameReader,
    encoding: UpdateEncoding,
    /// The current frame's bytes, its value count and how many were taken:
    /// values are decoded from the bytes as a window takes them, so a reader
    /// holds one chunk, not a chunk and its decoded copy (K readers at once).
    raw: Vec<u8>,
    len: usize,
    taken: usize,
}

impl SpilledValues {
    pub fn open(path: &Path, encoding: UpdateEncoding) -> Result<Self> {
        Ok(SpilledValues {
            frames: FrameReader::open(path)?,
            encoding,
            raw: Vec::new(),
            len: 0,
            taken: 0,
        })
    }

    /// The next `n` values into `out` (replacing what it held); an update
    /// that ends before them is damaged.
    pub fn take(&mut self, n: usize, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        while out.len() < n {
            if self.taken == self.len {
                let bytes = self
                    .frames
                    .next_frame(&mut self.raw, false)?
                    .expect("an end is an error");
                self.raw.truncate(bytes);
                self.len = encoding::chunk_values(&self.raw, self.encoding).map_err(|e| {
                    damaged(
                        &self.frames.path,
                        format!("frame {}: {e}", self.frames.frame - 1),
                    )
                })?;
                self.taken = 0;
            }
            let k = (n - out.len()).min(self.len - self.taken);
            encoding::decode_range_into(&self.raw, self.encoding, self.taken..self.taken + k, out);
            self.taken += k;
        }
        Ok(())
    }
}

/// Where a round's uploads are spilled while they are received.
pub fn spill_dir(output_dir: &Path, round: u32) -> PathBuf {
    output_dir.join("updates").join(format!("round-{round:04}"))
}

/// A spill file name that is safe whatever the organisation id holds.
pub fn spill_path(output_dir: &Path, round: u32, org: &str, upload_id: u64) -> PathBuf {
    let tag = &sangsaeng_common::transfer::weights::sha256_hex(org.as_bytes())[..16];
    spill_dir(output_dir, round).join(format!("{tag}-{upload_id}.bin"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilled_values_come_back_in_windows_that_cross_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u").join("w.bin");
        let v: Vec<f32> = (0..1000).map(|i| i as f32 / 7.0).collect();
        // Frames of 37 values, windows of 100: every window spans frames.
        let mut spill = Spill::create(&path, false).unwrap();
        for c in encoding::encode_chunks(&v, UpdateEncoding::Float32, 37 * 4).unwrap() {
            spill.append(&c).unwrap();
        }
        let mut r = SpilledValues::open(&path, UpdateEncoding::Float32).unwrap();
        let mut got = Vec::new();
        let mut w = Vec::new();
        for _ in 0..10 {
            r.take(100, &mut w).unwrap();
            assert_eq!(w.len(), 100);
            got.extend_from_slice(&w);
        }
        assert_eq!(got, v);
        // Past its end the update is damaged, not silently short.
        let e = r.take(1, &mut w).unwrap_err();
        assert!(e.to_string().contains("is damaged"), "{e}");
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
}
