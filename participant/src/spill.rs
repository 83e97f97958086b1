//! The masked upload of one secure attempt, kept at the site between the pass
//! that computes its digest and the upload that sends it.
//!
//! The upload's digest must be declared before its first chunk (the
//! coordinator keys a resumed upload by it), so the site masks the whole update
//! once before sending. Masking is the expensive part of a secure round: one
//! ChaCha20 word per neighbour and per value, about 32 words per value with
//! the complete graph at K = 32. Masking again for the upload doubled that. The
//! first pass therefore writes each masked chunk to an anonymous temporary
//! file (`tempfile::tempfile`: unlinked at creation, so nothing stays on disk
//! when the daemon is killed), and the upload and any resume read the chunks
//! back. Memory stays O(chunk); the disk holds 8 bytes per parameter, which
//! reveal nothing without the masks.
//!
//! A site whose temporary directory cannot take the file (full, read-only)
//! still uploads: it masks each chunk again as it is sent, with a warning.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::sync::Mutex;

/// Masked chunks written in order, read back by index.
pub struct MaskedSpill {
    writer: Option<BufWriter<File>>,
    chunk_len: u64,
    written: u64,
}

/// The spilled chunks, readable from any thread.
pub struct SpilledChunks {
    file: Mutex<File>,
    chunk_len: u64,
    total: u64,
}

impl MaskedSpill {
    /// A spill for chunks of `chunk_len` bytes (all but the last), or one that
    /// keeps nothing if no temporary file can be made.
    pub fn new(chunk_len: usize) -> Self {
        let writer = match tempfile::tempfile() {
            Ok(f) => Some(BufWriter::with_capacity(1 << 20, f)),
            Err(e) => {
                warn_unspilled(&e);
                None
            }
        };
        MaskedSpill {
            writer,
            chunk_len: chunk_len as u64,
            written: 0,
        }
    }

    /// Appends the next chunk; on a write error the spill gives up (the
    /// upload then masks again) rather than failing the round.
    pub fn push(&mut self, chunk: &[u8]) {
        if let Some(w) = self.writer.as_mut() {
            match w.write_all(chunk) {
                Ok(()) => self.written += chunk.len() as u64,
                Err(e) => {
                    warn_unspilled(&e);
                    self.writer = None;
                }
            }
        }
    }

    /// The chunks for reading, or `None` if they could not all be kept.
    pub fn finish(self) -> Option<SpilledChunks> {
        let file = self
            .writer?
            .into_inner()
            .map_err(|e| warn_unspilled(e.error()))
            .ok()?;
        Some(SpilledChunks {
            file: Mutex::new(file),
            chunk_len: self.chunk_len,
            total: self.written,
        })
    }
}

impl SpilledChunks {
    /// Chunk `i` as written.
    pub fn read(&self, i: usize) -> std::io::Result<Vec<u8>> {
        let start = i as u64 * self.chunk_len;
        let end = (start + self.chunk_len).min(self.total);
        if start >= end {
            return Err(std::io::Error::other(format!(
                "chunk {i} is past the {} spilled bytes",
                self.total
            )));
        }
        let mut buf = vec![0u8; (end - start) as usize];
        let mut f = self.file.lock().expect("the spill file");
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf)?;
        Ok(buf)
    }
}

fn warn_unspilled(e: &std::io::Error) {
    tracing::warn!(
        "cannot keep the masked update in a temporary file ({e}); it will be masked again as it is sent, which doubles the masking time (check TMPDIR's free space)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_read_back_as_written_including_a_short_last_one() {
        let mut s = MaskedSpill::new(4);
        for c in [&b"abcd"[..], b"efgh", b"ij"] {
            s.push(c);
        }
        let r = s.finish().expect("a temporary file");
        assert_eq!(r.read(1).unwrap(), b"efgh");
        assert_eq!(r.read(0).unwrap(), b"abcd");
        assert_eq!(r.read(2).unwrap(), b"ij");
        assert!(r.read(3).is_err(), "past the end");
    }
}
