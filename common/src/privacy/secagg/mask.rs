//! Mask streams: the pseudo-random vectors that hide each input, generated
//! chunk by chunk at any parameter offset.
//!
//! Masks live in Z_2^64 because the coordinator sums fixed-point updates in
//! `i64` with |sum| < 2^63 (the FedAvg accumulator, `aggregation/fedavg.rs`):
//! adding uniform u64 masks with wrapping arithmetic and removing them again
//! gives back the plain sum bit for bit, and each masked value on its own is
//! uniform, so it says nothing about the input.
//!
//! Mask value `m` of parameter `p` under seed `s` is the little-endian u64 at
//! bytes `8p..8p+8` of the ChaCha20 keystream keyed by `s`. ChaCha20 can seek
//! to any block, so a 1 MiB chunk at offset 10^8 costs the same as the first,
//! and a model is never masked (or unmasked) as a whole.
//!
//! Participant `i` sends y_i = x_i + PRG(b_i) + Σ_{j ∈ N(i), j > i} PRG(s_ij)
//! − Σ_{j ∈ N(i), j < i} PRG(s_ij): each pairwise term appears once with each
//! sign across the pair, so it cancels in the sum of survivors.

use std::fmt;

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::keys::KEY_LEN;
use crate::{Error, Result};

/// ChaCha20's 32-bit block counter covers 2^32 blocks of 64 bytes (the
/// `chacha20` crate stops one block short), i.e. about 2^35 parameters of 8
/// bytes; past that the keystream would repeat (the counter wraps), so masks
/// stop there. 3.4e10 parameters is far above any model this framework trains.
pub const MAX_PARAMS: u64 = (u32::MAX as u64) * 8;

/// The fixed IETF nonce of every mask stream. Each seed is used for exactly
/// one stream (seeds are fresh per round and per pair), so a constant nonce is
/// safe; it is not all zeros only to keep these streams apart from any other
/// ChaCha20 use of the same bytes.
const MASK_NONCE: [u8; 12] = *b"sgsg-mask-v1";

/// Parameters generated per keystream call: 4 KiB, small enough to stay in L1
/// while every stream of a chunk is added into it.
const BLOCK: usize = 512;

/// A 32-byte seed of a mask stream (a self-mask seed b_i or a pairwise seed
/// s_ij). Zeroized on drop; not printable.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MaskSeed([u8; KEY_LEN]);

impl MaskSeed {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        MaskSeed(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for MaskSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MaskSeed(..)")
    }
}

/// Whether a stream is added to or subtracted from the values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sign {
    Add,
    Subtract,
}

impl Sign {
    pub fn inverse(self) -> Sign {
        match self {
            Sign::Add => Sign::Subtract,
            Sign::Subtract => Sign::Add,
        }
    }
}

/// A value masks are added to: `u64`, or `i64` (the accumulator's type, whose
/// wrapping addition is the same bit operation).
pub trait MaskWord: Copy + sealed::Sealed {
    fn add_mask(self, mask: u64) -> Self;
    fn sub_mask(self, mask: u64) -> Self;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for u64 {}
    impl Sealed for i64 {}
}

impl MaskWord for u64 {
    #[inline(always)]
    fn add_mask(self, mask: u64) -> Self {
        self.wrapping_add(mask)
    }
    #[inline(always)]
    fn sub_mask(self, mask: u64) -> Self {
        self.wrapping_sub(mask)
    }
}

impl MaskWord for i64 {
    #[inline(always)]
    fn add_mask(self, mask: u64) -> Self {
        self.wrapping_add(mask as i64)
    }
    #[inline(always)]
    fn sub_mask(self, mask: u64) -> Self {
        self.wrapping_sub(mask as i64)
    }
}

/// The mask values of one seed, from any parameter offset.
pub struct MaskStream {
    cipher: ChaCha20,
}

impl MaskStream {
    pub fn new(seed: &MaskSeed) -> Self {
        MaskStream {
            cipher: ChaCha20::new(seed.as_bytes().into(), &MASK_NONCE.into()),
        }
    }

    /// Writes the mask values of parameters `offset..offset + out.len()`.
    pub fn fill(&mut self, offset: u64, out: &mut [u64]) -> Result<()> {
        out.fill(0);
        self.apply(offset, out, Sign::Add)
    }

    /// Adds (or subtracts) the mask values of parameters
    /// `offset..offset + values.len()` to `values`, wrapping.
    pub fn apply<W: MaskWord>(&mut self, offset: u64, values: &mut [W], sign: Sign) -> Result<()> {
        check_range(offset, values.len())?;
        self.seek(offset)?;
        let mut scratch = [0u8; BLOCK * 8];
        for block in values.chunks_mut(BLOCK) {
            self.add_block(block, &mut scratch, sign)?;
        }
        Ok(())
    }

    fn seek(&mut self, offset: u64) -> Result<()> {
        self.cipher.try_seek(offset * 8).map_err(|e| {
            Error::SecureAggregation(format!(
                "cannot seek a mask stream to parameter {offset}: {e}"
            ))
        })
    }

    /// Adds the next `block.len()` mask values into `block`.
    #[inline]
    fn add_block<W: MaskWord>(
        &mut self,
        block: &mut [W],
        scratch: &mut [u8; BLOCK * 8],
        sign: Sign,
    ) -> Result<()> {
        let bytes = &mut scratch[..block.len() * 8];
        // XOR onto zeros yields the raw keystream.
        bytes.fill(0);
        self.cipher
            .try_apply_keystream(bytes)
            .map_err(|e| Error::SecureAggregation(format!("mask stream exhausted: {e}")))?;
        let words = bytes.chunks_exact(8).map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        });
        match sign {
            Sign::Add => block
                .iter_mut()
                .zip(words)
                .for_each(|(v, m)| *v = v.add_mask(m)),
            Sign::Subtract => block
                .iter_mut()
                .zip(words)
                .for_each(|(v, m)| *v = v.sub_mask(m)),
        }
        Ok(())
    }
}

fn check_range(offset: u64, len: usize) -> Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= MAX_PARAMS => Ok(()),
        _ => Err(Error::SecureAggregation(format!(
            "parameters {offset}..{} lie beyond the {MAX_PARAMS} a mask stream covers",
            offset.saturating_add(len as u64)
        ))),
    }
}

/// Adds every `(seed, sign)` stream to `values` (parameters
/// `offset..offset + values.len()`). The streams advance together over 4 KiB
/// blocks of `values`, so the chunk is read and written once whatever the
/// number of streams.
pub fn apply_masks<W: MaskWord>(
    values: &mut [W],
    offset: u64,
    streams: &[(&MaskSeed, Sign)],
) -> Result<()> {
    check_range(offset, values.len())?;
    let mut ciphers = Vec::with_capacity(streams.len());
    for &(seed, sign) in streams {
        let mut stream = MaskStream::new(seed);
        stream.seek(offset)?;
        ciphers.push((stream, sign));
    }
    let mut scratch = [0u8; BLOCK * 8];
    for block in values.chunks_mut(BLOCK) {
        for (stream, sign) in &mut ciphers {
            stream.add_block(block, &mut scratch, *sign)?;
        }
    }
    scratch.zeroize();
    Ok(())
}

/// Masks participant `my_index`'s values in place:
/// y = x + PRG(b) + Σ_{j > i} PRG(s_ij) − Σ_{j < i} PRG(s_ij) (mod 2^64), for
/// parameters `offset..offset + values.len()`. `pairwise` holds the seed shared
/// with each neighbour, by the neighbour's index.
pub fn mask_chunk<W: MaskWord>(
    values: &mut [W],
    offset: u64,
    self_seed: &MaskSeed,
    pairwise: &[(u32, MaskSeed)],
    my_index: u32,
) -> Result<()> {
    let mut streams = Vec::with_capacity(pairwise.len() + 1);
    streams.push((self_seed, Sign::Add));
    for (j, seed) in pairwise {
        let sign = match j.cmp(&my_index) {
            std::cmp::Ordering::Greater => Sign::Add,
            std::cmp::Ordering::Less => Sign::Subtract,
            std::cmp::Ordering::Equal => {
                return Err(Error::SecureAggregation(format!(
                    "participant {my_index} listed itself among its pairwise mask partners"
                )));
            }
        };
        streams.push((seed, sign));
    }
    apply_masks(values, offset, &streams)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(b: u8) -> MaskSeed {
        MaskSeed::from_bytes([b; 32])
    }

    #[test]
    fn stream_is_seekable_at_any_offset() {
        let mut whole = vec![0u64; 3000];
        MaskStream::new(&seed(1)).fill(0, &mut whole).unwrap();
        for (offset, len) in [(0, 1), (1, 7), (511, 2), (513, 1024), (2999, 1), (17, 2983)] {
            let mut part = vec![0u64; len];
            MaskStream::new(&seed(1))
                .fill(offset as u64, &mut part)
                .unwrap();
            assert_eq!(
                part,
                whole[offset..offset + len],
                "offset {offset} len {len}"
            );
        }
    }

    #[test]
    fn keystream_is_chacha20_le_words() {
        // Parameter p is bytes 8p..8p+8 of the ChaCha20 keystream: the same
        // values from the cipher directly.
        let mut bytes = vec![0u8; 80];
        let mut c = ChaCha20::new((&[4u8; 32]).into(), &MASK_NONCE.into());
        c.apply_keystream(&mut bytes);
        let mut v = vec![0u64; 10];
        MaskStream::new(&seed(4)).fill(0, &mut v).unwrap();
        for (p, val) in v.iter().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[8 * p..8 * p + 8]);
            assert_eq!(*val, u64::from_le_bytes(w));
        }
    }

    #[test]
    fn pairwise_masks_cancel() {
        let x1: Vec<i64> = (0..1000).map(|v| v * 3 - 1500).collect();
        let x2: Vec<i64> = (0..1000).map(|v| -v * 7 + 11).collect();
        let (mut y1, mut y2) = (x1.clone(), x2.clone());
        let (b1, b2) = (seed(1), seed(2));
        mask_chunk(&mut y1, 5, &b1, &[(9, seed(3))], 4).unwrap();
        mask_chunk(&mut y2, 5, &b2, &[(4, seed(3))], 9).unwrap();
        let mut sum: Vec<i64> = y1
            .iter()
            .zip(&y2)
            .map(|(a, b)| a.wrapping_add(*b))
            .collect();
        apply_masks(&mut sum, 5, &[(&b1, Sign::Subtract), (&b2, Sign::Subtract)]).unwrap();
        let plain: Vec<i64> = x1.iter().zip(&x2).map(|(a, b)| a + b).collect();
        assert_eq!(sum, plain);
    }

    #[test]
    fn i64_and_u64_agree() {
        let mut a = vec![-5i64; 700];
        let mut b = vec![(-5i64) as u64; 700];
        mask_chunk(&mut a, 3, &seed(1), &[(0, seed(2)), (8, seed(3))], 2).unwrap();
        mask_chunk(&mut b, 3, &seed(1), &[(0, seed(2)), (8, seed(3))], 2).unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| *x as u64 == *y));
    }

    #[test]
    fn out_of_range_is_an_error_not_a_panic() {
        let mut v = vec![0u64; 4];
        assert!(
            MaskStream::new(&seed(1))
                .fill(MAX_PARAMS - 2, &mut v)
                .is_err()
        );
        assert!(MaskStream::new(&seed(1)).fill(u64::MAX, &mut v).is_err());
        assert!(
            MaskStream::new(&seed(1))
                .fill(MAX_PARAMS - 4, &mut v)
                .is_ok()
        );
        assert!(mask_chunk(&mut v, 0, &seed(1), &[(3, seed(2))], 3).is_err());
    }
}
